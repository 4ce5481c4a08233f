"""A cloze task from any text: last-word prediction, LAMBADA-style.

Construction (deterministic; what ``cloze_passages`` returns):

* each document is split on whitespace into words (so newlines and runs of spaces become one
  space in the context);
* a **target** is a word that ends a sentence: three or more letters followed by one full stop
  (``re.fullmatch(r"[^\\W\\d_]{3,}\\.", word)``: "river." qualifies, "U.S.", "1990.",
  "it." and "said," do not); the full stop is dropped from the target;
* a **passage** is the ``context_words`` words before a target (all in the same document) and
  the target; passages do not overlap: the next passage's context starts after the previous
  target. Documents are walked in order, each target taken as soon as its context is complete;
* with ``limit``, ``limit`` passages are taken evenly spread over all of them (passage
  ``floor(j * n / limit)`` for ``j < limit``), so a small subset still covers the whole split.

The task (``lmeval_tasks/cloze.yaml``) asks for the log-likelihood of ``" " + target`` after
the context; a passage is right when every token of it is the model's greedy (argmax) choice.
"""
from __future__ import annotations

import re

from actsparse.errors import DataError

TARGET = re.compile(r"[^\W\d_]{3,}\.")


def cloze_passages(docs, *, context_words: int = 64, limit: int | None = None) -> list[dict]:
    """The passages of ``docs`` (an iterable of strings) as dicts ``{"context", "target",
    "doc"}`` (``doc``: the document's index), as described in the module docstring."""
    if context_words < 1:
        raise DataError(f"context_words must be >= 1, got {context_words}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of passages (or None for all), got {limit}")
    passages = []
    for d, doc in enumerate(docs):
        words = doc.split()
        start = 0
        for i in range(context_words, len(words)):
            if i - context_words >= start and TARGET.fullmatch(words[i]):
                passages.append({"context": " ".join(words[i - context_words:i]), "target": words[i][:-1],
                                 "doc": d})
                start = i + 1
    if not passages:
        raise DataError(f"the text gives no cloze passage: no sentence-final word (letters and a full stop) with "
                        f"{context_words} words before it in the same document; give more text or fewer "
                        f"context words (--cloze-context-words)")
    if limit is not None and limit < len(passages):
        n = len(passages)
        passages = [passages[j * n // limit] for j in range(limit)]
    return passages
