"""`actsparse contrast` and `actsparse intervene` on the real model with tiny budgets."""
import json

import pytest
from actsparse.cli import main


@pytest.mark.slow  # about a minute on a quiet machine (two model loads, six short evaluations)
def test_contrast_then_intervene_on_news_vs_wiki(tmp_path, capsys):
    c = tmp_path / "c"
    assert main(["contrast", "--a", "news", "--b", "wiki", "--prompts", "4", "--max-tokens", "16", "--permutations",
                 "100", "--top", "5", "--out", str(c), "--no-progress"]) == 0
    doc = json.loads((c / "contrast.json").read_text())
    assert doc["meta"]["sets"]["a"]["source"] == "news" and doc["meta"]["exact"] and len(doc["meta"]["top"]) == 5
    assert doc["meta"]["prompts"] == {"a": 4, "b": 4} and doc["width"] == 1536 and len(doc["layers"]) == 30
    out, iv = tmp_path / "i", tmp_path / "iv.json"
    assert main(["intervene", "--contrast", str(c), "--top", "5", "--random", "0", "--tokens", "128", "--window",
                 "64", "--save-intervention", str(iv), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "intervene.json").read_text())
    row = res["rows"][0]
    assert res["eval"]["a"] == "news/test" and row["n"] == 5
    assert row["top"]["a_drop"] == pytest.approx(res["dense"]["a_logprob"] - row["top"]["a_logprob"])
    assert len(row["controls"]["uniform"]["runs"]) == 1
    saved = json.loads(iv.read_text())
    assert [(s["layer"], s["index"]) for s in saved["switches"]] == [(t["layer"], t["index"]) for t in doc["meta"]["top"]]
    assert "targeted ratio" in capsys.readouterr().out


def test_intervene_refusals(tmp_path, capsys):
    assert main(["intervene", "--contrast", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not a saved contrast" in capsys.readouterr().err
    assert main(["contrast", "--a", "news", "--b", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c"),
                 "--no-progress"]) == 2
    assert "unknown data source" in capsys.readouterr().err
