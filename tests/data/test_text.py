import json

import pytest

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
