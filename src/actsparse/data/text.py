"""Real text that works offline, deterministic document splits, tokenised windows.

Sources: ``wiki`` (the English Wikipedia articles shipped in gensim's test data),
``news`` (gensim's Lee news corpus), or a user path: a ``.txt`` file (documents
separated by a blank line, or by the ``doc_separator`` regular expression), a ``.jsonl``
file (one document per line, field ``text``), or a folder of such files (each ``.txt`` /
``.md`` file one document). User files are decoded strictly (UTF-8 unless ``encoding``);
binary files are refused.

Splits are by document, in corpus order: calibration = the first 40%, validation = the
next 30%, test = the last 30%, so calibration and evaluation never share a document.
A token budget smaller than a split takes windows spread evenly over the whole split
(``sampling="spread"``, the default) or its first windows (``"prefix"``).
"""
from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import weakref
from collections import OrderedDict
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


DEFAULT_SEPARATOR = r"\n\s*\n"  # a blank line (possibly holding spaces) between .txt documents
ENCODING_HINT = "pass the file's encoding with --encoding (Python: encoding=), e.g. --encoding latin-1"


_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")
BINARY_FRACTION = 0.05  # more control characters than this: not text


def _refuse_binary_bytes(path: Path, data: bytes) -> None:
    """Refuse bytes that are not text in any 8-bit or UTF-8 encoding: a NUL byte, or many
    control bytes (text has almost none besides tabs and line breaks)."""
    if b"\x00" in data:
        raise DataError(f"{path} looks like a binary file (NUL byte at offset {data.index(0)}), not text; "
                        "pass a UTF-8 .txt/.jsonl file (UTF-16 text: --encoding utf-16)")
    sample = data[:1 << 16]
    control = sum(1 for b in sample if b < 0x20 and b not in _TEXT_CONTROLS)
    if sample and control > BINARY_FRACTION * len(sample):
        raise DataError(f"{path} looks like a binary file ({control} of its first {len(sample)} bytes are control "
                        "bytes), not text")


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """The text of ``path``, decoded strictly; binary files and undecodable bytes are refused
    with a message naming the file, the byte offset and the fix."""
    data = path.read_bytes()
    wide = encoding.lower().replace("_", "-").startswith(("utf-16", "utf16", "utf-32", "utf32"))
    if not wide:
        _refuse_binary_bytes(path, data)
    try:
        text = data.decode(encoding)
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r} (for {path}); use a Python codec name such as "
                        "utf-8 or latin-1") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid {encoding} text: byte offset {err.start} "
                        f"(0x{data[err.start]:02x}): {err.reason}; {ENCODING_HINT}") from None
    sample = text[:1 << 16]
    control = sum(1 for c in sample if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\t\n\r\f\v")
    if sample and control > BINARY_FRACTION * len(sample):
        raise DataError(f"{path} looks like a binary file ({control} of its first {len(sample)} characters are "
                        f"control characters when read as {encoding}), not text")
    return text


def _jsonl_documents(path: Path, field: str, encoding: str) -> list[str]:
    docs = []
    for i, line in enumerate(read_text_file(path, encoding).split("\n"), 1):
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
            keys = f" (its keys: {', '.join(map(str, obj))})" if isinstance(obj, dict) else ""
            raise DataError(f"{path}:{i} has no string field {field!r}{keys}; pass --text-field to name it")
    return docs


def _split_documents(text: str, separator: str | None) -> list[str]:
    try:
        pattern = re.compile(separator or DEFAULT_SEPARATOR)
    except re.error as err:
        raise DataError(f"--doc-separator {separator!r} is not a valid regular expression: {err}") from None
    return [d.strip() for d in pattern.split(text) if d.strip()]


def _file_documents(path: Path, field: str, encoding: str, separator: str | None) -> list[str]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, field, encoding)
    return _split_documents(read_text_file(path, encoding), separator)


def documents(source: str, *, text_field: str = "text", encoding: str = "utf-8",
              doc_separator: str | None = None) -> list[str]:
    """All documents of ``source`` (an embedded name or a path), in a fixed order.

    A ``.txt`` file is split into documents at ``doc_separator`` (a regular expression;
    default: a blank line); a ``.jsonl`` file holds one document per line (a JSON string,
    or an object whose ``text_field`` is the text); in a folder each ``.txt`` / ``.md``
    file is one document and each ``.jsonl`` file adds its lines. User files are decoded
    strictly with ``encoding``."""
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
                docs += _jsonl_documents(f, text_field, encoding)
            else:
                text = read_text_file(f, encoding).strip()
                if text:
                    docs.append(text)
    else:
        docs = _file_documents(path, text_field, encoding, doc_separator)
    if not docs:
        raise DataError(f"{path} holds no text (need .txt, .md or .jsonl files with content)")
    return docs


def text(source: str = "wiki", split: str = "all", *, text_field: str = "text", encoding: str = "utf-8",
         doc_separator: str | None = None) -> list[str]:
    """Documents of one split of ``source``: calibration, validation, test or all."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    docs = documents(source, text_field=text_field, encoding=encoding, doc_separator=doc_separator)
    lo, hi = SPLITS[split]
    n = len(docs)
    start, stop = round(lo * n), round(hi * n)
    if split != "all" and n < 3:
        raise DataError(f"{source!r} has {n} document(s); splitting needs at least 3 (one per split)")
    out = docs[start:stop]
    if not out:
        raise DataError(f"split {split!r} of {source!r} is empty ({n} documents)")
    return out


SAMPLINGS = ("spread", "prefix")


@dataclass
class Windows:
    """Fixed-length token windows: ``input_ids`` and ``attention_mask`` of shape (n, window).
    ``sampling`` and ``available`` record how :func:`token_windows` chose them (None when
    built by hand)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    sampling: str | None = None  # "spread" or "prefix"
    available: int | None = None  # windows the whole token stream gives, before sampling

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

    @property
    def protocol(self) -> dict:
        """How the windows were chosen, for a result's protocol."""
        return {"sampling": self.sampling, "windows": len(self), "windows_available": self.available,
                "window": int(self.input_ids.shape[1]), "tokens": self.tokens}


# tokenised streams, per tokenizer (weakly held) and per text: a sweep tokenises each split once
_STREAMS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_STREAMS_PER_TOKENIZER = 8


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """``docs`` tokenised, each followed by EOS, concatenated; cached in-process by the
    tokenizer and the text's hash (a returned list must not be modified)."""
    eos = tokenizer.eos_token_id
    digest = hashlib.sha1(f"{eos}\x00".encode())
    for doc in docs:
        digest.update(doc.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00\x01")
    key = digest.hexdigest()
    try:
        cache = _STREAMS.setdefault(tokenizer, OrderedDict())
    except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: no cache
        cache = OrderedDict()
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    stream: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        stream += ids
        if eos is not None:
            stream.append(eos)
    cache[key] = stream
    while len(cache) > _STREAMS_PER_TOKENIZER:
        cache.popitem(last=False)
    return stream


def spread_indices(available: int, n: int) -> list[int]:
    """``n`` of ``range(available)`` evenly spaced (the middle of each of n equal parts):
    a pure function of the two counts."""
    if not 0 < n <= available:
        raise ValueError(f"need 0 < n <= available, got n={n}, available={available}")
    return [(2 * i + 1) * available // (2 * n) for i in range(n)]


def token_windows(tokenizer, docs: list[str], *, window: int = 512, max_tokens: int | None = None,
                  add_bos: bool = True, sampling: str = "spread") -> Windows:
    """Tokenise ``docs`` (each followed by EOS), concatenate and cut into windows of
    ``window`` tokens (BOS first when ``add_bos``). The last window is right-padded and its
    padding masked out.

    ``max_tokens`` caps the stream tokens used (BOS not counted). When it is smaller than the
    stream, ``sampling`` picks which windows: ``"spread"`` takes the needed number of
    windows evenly spaced over all full windows of the stream (deterministic: a function of
    the text and the budget), ``"prefix"`` the first ones. Either way the last window taken
    is cut to the budget, so both give the same number of tokens."""
    if sampling not in SAMPLINGS:
        raise DataError(f"unknown sampling {sampling!r}; use one of {', '.join(SAMPLINGS)}")
    if window < 2:
        raise DataError(f"window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be a positive number of tokens (or None for all), got {max_tokens}")
    if not docs:
        raise DataError("no documents to tokenise")
    stream = token_stream(tokenizer, docs)
    if len(stream) < window:
        raise DataError(
            f"the data gives {len(stream)} tokens, fewer than one window of {window}; "
            f"need at least {window} tokens (add text or lower --window)"
        )
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if add_bos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    body = window - 1 if bos is not None else window
    starts = list(range(0, len(stream), body))
    budget = len(stream) if max_tokens is None else min(max_tokens, len(stream))
    needed = -(-budget // body)
    full = len(stream) // body
    if sampling == "spread" and needed < full:
        chosen = [starts[i] for i in spread_indices(full, needed)]
    else:
        chosen = starts[:needed]
    last = budget - (needed - 1) * body  # tokens of the last window taken
    rows, masks = [], []
    for j, i in enumerate(chosen):
        chunk = stream[i:i + (last if j == needed - 1 else body)]
        if bos is not None:
            chunk = [bos] + chunk
        n = len(chunk)
        rows.append(chunk + [pad] * (window - n))
        masks.append([1] * n + [0] * (window - n))
    return Windows(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long),
                   sampling=sampling, available=len(starts))
