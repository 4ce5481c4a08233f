"""Real text that works offline, deterministic document splits, tokenised windows.

Sources: ``wiki`` (the English Wikipedia articles shipped in gensim's test data),
``news`` (gensim's Lee news corpus), or a user path: a ``.txt`` file (documents
separated by blank lines), a ``.jsonl`` file (one document per line, field ``text``),
or a folder of such files (each ``.txt`` / ``.md`` file one document).

Splits are by document, in corpus order: calibration = the first 40%, validation = the
next 30%, test = the last 30%, so calibration and evaluation never share a document.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from actsparse.errors import DataError

SPLITS = {"calibration": (0.0, 0.4), "validation": (0.4, 0.7), "test": (0.7, 1.0), "all": (0.0, 1.0)}
EMBEDDED_TEXT = {
    "wiki": "English Wikipedia articles shipped in gensim's test data (~106 articles, 3 MB)",
    "news": "Lee news corpus shipped in gensim's test data (300 short articles)",
}
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@lru_cache(maxsize=4)
def _wiki_documents() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    from gensim.test.utils import datapath
    import bz2

    docs = []
    with bz2.open(datapath(WIKI_FILE), "rt", encoding="utf-8") as fh:
        for title, text, _pageid in extract_pages(fh):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text)
            plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            if len(plain) > 200:
                docs.append(f"{title}\n\n{plain}")
    return tuple(docs)


@lru_cache(maxsize=4)
def _news_documents() -> tuple[str, ...]:
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as fh:
        return tuple(line.strip() for line in fh if line.strip())


def _file_documents(path: Path, field: str) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{i} is not valid JSON ({err.msg}); each line must be one JSON object") from err
                if isinstance(obj, str):
                    docs.append(obj)
                elif isinstance(obj, dict) and isinstance(obj.get(field), str):
                    docs.append(obj[field])
                else:
                    raise DataError(f"{path}:{i} has no string field {field!r}; pass --text-field to name it")
        return docs
    text = path.read_text(encoding="utf-8", errors="replace")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def documents(source: str, *, text_field: str = "text") -> list[str]:
    """All documents of ``source`` (an embedded name or a path), in a fixed order."""
    if source == "wiki":
        return list(_wiki_documents())
    if source == "news":
        return list(_news_documents())
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"unknown data source {source!r}: not an embedded corpus ({', '.join(EMBEDDED_TEXT)}) "
            f"and no such file or folder"
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
        docs = []
        for f in files:
            if f.suffix == ".jsonl":
                docs += _file_documents(f, text_field)
            else:
                text = f.read_text(encoding="utf-8", errors="replace").strip()
                if text:
                    docs.append(text)
    else:
        docs = _file_documents(path, text_field)
    if not docs:
        raise DataError(f"{path} holds no text (need .txt, .md or .jsonl files with content)")
    return docs


def text(source: str = "wiki", split: str = "all", *, text_field: str = "text") -> list[str]:
    """Documents of one split of ``source``: calibration, validation, test or all."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    docs = documents(source, text_field=text_field)
    lo, hi = SPLITS[split]
    n = len(docs)
    start, stop = round(lo * n), round(hi * n)
    if split != "all" and n < 3:
        raise DataError(f"{source!r} has {n} document(s); splitting needs at least 3 (one per split)")
    out = docs[start:stop]
    if not out:
        raise DataError(f"split {split!r} of {source!r} is empty ({n} documents)")
    return out


@dataclass
class Windows:
    """Fixed-length token windows: ``input_ids`` and ``attention_mask`` of shape (n, window)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int = 1):
        for i in range(0, len(self), batch_size):
            yield {"input_ids": self.input_ids[i:i + batch_size], "attention_mask": self.attention_mask[i:i + batch_size]}

    def num_batches(self, batch_size: int = 1) -> int:
        return -(-len(self) // batch_size)


def token_windows(tokenizer, docs: list[str], *, window: int = 512, max_tokens: int | None = None,
                  add_bos: bool = True) -> Windows:
    """Tokenise ``docs`` (each followed by EOS), concatenate and cut into windows of
    ``window`` tokens. The last window is right-padded and its padding masked out.
    ``max_tokens`` caps the total number of real tokens."""
    if window < 2:
        raise DataError(f"window must be at least 2 tokens, got {window}")
    if not docs:
        raise DataError("no documents to tokenise")
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if add_bos else None
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
        if max_tokens and len(stream) >= max_tokens:
            break
    if max_tokens:
        stream = stream[:max_tokens]
    if len(stream) < window:
        raise DataError(
            f"the data gives {len(stream)} tokens, fewer than one window of {window}; "
            f"need at least {window} tokens (add text or lower --window)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    body = window - 1 if bos is not None else window
    rows, masks = [], []
    for i in range(0, len(stream), body):
        chunk = stream[i:i + body]
        if bos is not None:
            chunk = [bos] + chunk
        n = len(chunk)
        rows.append(chunk + [pad] * (window - n))
        masks.append([1] * n + [0] * (window - n))
    return Windows(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))
