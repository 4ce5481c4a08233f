import json

import pytest
import torch

from actsparse.data.text import documents, text, token_windows
from actsparse.errors import DataError


def test_wiki_and_news_are_real_and_split_disjointly():
    docs = documents("wiki")
    assert len(docs) > 100 and sum(map(len, docs)) > 2_000_000
    parts = {s: text("wiki", s) for s in ("calibration", "validation", "test")}
    assert sum(len(p) for p in parts.values()) == len(docs)
    assert not set(parts["calibration"]) & set(parts["test"])
    assert text("wiki", "test") == parts["test"]  # deterministic
    assert len(documents("news")) == 300


def test_user_files_jsonl_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n")
    assert documents(str(tmp_path / "a.txt")) == ["first doc", "second doc"]
    assert documents(str(tmp_path / "b.jsonl")) == ["third", "fourth"]
    folder = documents(str(tmp_path))
    assert "third" in folder and any("first doc" in d for d in folder)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1 is not valid JSON"):
        documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="--text-field"):
        documents(str(tmp_path / "nofield.jsonl"))


def test_errors_for_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="not an embedded corpus"):
        documents(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        documents(str(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match="unknown split"):
        text("wiki", "train")


def test_windows_pad_and_mask(smollm2):
    _, tok = smollm2
    w = token_windows(tok, ["one two three four five six seven eight nine ten"] * 3, window=8)
    assert w.input_ids.shape[1] == 8
    assert (w.attention_mask[:-1] == 1).all()
    assert w.attention_mask[-1, -1] == 0  # right padding in the last window
    assert (w.input_ids[:, 0] == tok.bos_token_id).all()
    with pytest.raises(DataError, match="fewer than one window of 512; need at least 512 tokens"):
        token_windows(tok, ["tiny"], window=512)


# ---------------------------------------------------------------- encodings, binary input, separators
def test_latin1_files_are_refused_with_offset_and_read_with_encoding(tmp_path):
    """Before: latin-1 .txt was read with replacement characters, .jsonl raised UnicodeDecodeError."""
    (tmp_path / "l1.txt").write_bytes("caf\xe9 au lait\n\nna\xefve".encode("latin-1"))
    (tmp_path / "l1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    for name, offset in (("l1.txt", 3), ("l1.jsonl", 28)):
        with pytest.raises(DataError, match=rf"{name} is not valid utf-8 text: byte offset {offset} .*--encoding"):
            documents(str(tmp_path / name))
    assert documents(str(tmp_path / "l1.txt"), encoding="latin-1") == ["café au lait", "naïve"]
    assert documents(str(tmp_path / "l1.jsonl"), encoding="latin-1") == ["ok", "café"]
    with pytest.raises(DataError, match="unknown text encoding 'no-such-codec'"):
        documents(str(tmp_path / "l1.txt"), encoding="no-such-codec")


def test_binary_files_are_refused(tmp_path):
    """Before: binary garbage was profiled as text without a word."""
    import random

    rng = random.Random(0)
    (tmp_path / "nul.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)) + b"\x00")
    (tmp_path / "noisy.txt").write_bytes(bytes(rng.randrange(1, 256) for _ in range(600)))
    with pytest.raises(DataError, match="nul.txt looks like a binary file .NUL byte"):
        documents(str(tmp_path / "nul.txt"))
    for enc in ("utf-8", "latin-1"):  # garbage is refused whatever the encoding
        with pytest.raises(DataError, match="noisy.txt looks like a binary file"):
            documents(str(tmp_path / "noisy.txt"), encoding=enc)
    (tmp_path / "u16.txt").write_bytes("first\n\nsecond".encode("utf-16"))  # NUL bytes, but text
    assert documents(str(tmp_path / "u16.txt"), encoding="utf-16") == ["first", "second"]
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.md").write_bytes(b"\x00\x01binary")
    with pytest.raises(DataError, match="a.md looks like a binary file"):
        documents(str(tmp_path / "folder"))


def test_doc_separator_and_text_field(tmp_path):
    play = "ACT I\n\nScene one.\n\nA line.\n===\nACT II\n\nScene two."
    (tmp_path / "play.txt").write_text(play)
    assert len(documents(str(tmp_path / "play.txt"))) == 4  # default: a document at every blank line
    assert documents(str(tmp_path / "play.txt"), doc_separator=r"\n===\n") == [
        "ACT I\n\nScene one.\n\nA line.", "ACT II\n\nScene two."]
    with pytest.raises(DataError, match="--doc-separator .* is not a valid regular expression"):
        documents(str(tmp_path / "play.txt"), doc_separator="(")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    assert documents(str(tmp_path / "b.jsonl"), text_field="body") == ["x"]
    with pytest.raises(DataError, match=r"no string field 'text' \(its keys: body, id\); pass --text-field"):
        documents(str(tmp_path / "b.jsonl"))


# ---------------------------------------------------------------- which windows a token budget takes
def test_spread_sampling_covers_the_split_and_prefix_keeps_the_old_windows(smollm2):
    """Before: a budget took the first windows of a split (all calibration tokens from one
    document of a corpus of plays); now they are spread evenly over the whole split."""
    _, tok = smollm2
    docs = text("wiki", "calibration")
    whole = token_windows(tok, docs, window=256)
    prefix = token_windows(tok, docs, window=256, max_tokens=2000, sampling="prefix")
    spread = token_windows(tok, docs, window=256, max_tokens=2000)
    assert spread.sampling == "spread" and prefix.sampling == "prefix"
    assert spread.available == prefix.available == len(whole) > 100
    assert len(spread) == len(prefix) == 8 and spread.tokens == prefix.tokens == 2000 + 8  # + BOS per window
    assert torch.equal(prefix.input_ids[:7], whole.input_ids[:7])  # the first windows, the 8th cut to the budget
    n_last = int(prefix.attention_mask[7].sum())
    assert torch.equal(prefix.input_ids[7, :n_last], whole.input_ids[7, :n_last])
    # spread windows are whole-stream windows evenly spaced: the first in the first eighth, the
    # last in the last eighth (the last one cut to the budget)
    rows = [next(i for i in range(len(whole)) if torch.equal(whole.input_ids[i, :40], w[:40]))
            for w in spread.input_ids]
    assert rows == sorted(rows) and rows[0] < len(whole) / 8 and rows[-1] > 7 * len(whole) / 8
    assert torch.equal(spread.input_ids[:-1], whole.input_ids[rows[:-1]])
    assert token_windows(tok, docs, window=256, max_tokens=2000).input_ids.equal(spread.input_ids)  # deterministic
    # a budget of the whole split or more: every window, as before
    assert token_windows(tok, docs, window=256, max_tokens=10 ** 9).input_ids.equal(whole.input_ids)
    with pytest.raises(DataError, match="unknown sampling 'random'"):
        token_windows(tok, docs, window=256, max_tokens=512, sampling="random")
    with pytest.raises(DataError, match="max_tokens must be a positive"):
        token_windows(tok, docs, window=256, max_tokens=0)


def test_spread_indices_are_even_and_distinct():
    from actsparse.data.text import spread_indices

    assert spread_indices(10, 10) == list(range(10))
    assert spread_indices(100, 4) == [12, 37, 62, 87]
    assert spread_indices(7, 1) == [3]
    for avail in range(1, 40):
        for n in range(1, avail + 1):
            idx = spread_indices(avail, n)
            assert len(set(idx)) == n and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < avail


def test_token_stream_is_tokenised_once_per_text(smollm2):
    from actsparse.data.text import token_stream

    _, tok = smollm2
    docs = ["a few words of text"] * 50 + ["a different ending"]
    first = token_stream(tok, docs)
    assert token_stream(tok, list(docs)) is first  # the same text again: the cached stream
    other = token_stream(tok, docs[:-1])
    assert other is not first and other == first[:len(other)]
