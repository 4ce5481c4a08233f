"""Downstream tasks through lm-eval: the cloze construction, the BLiMP folder and task checks, and,
on the real SmolLM2 with a TEAL plan, lm-eval's log-likelihoods and accuracies against the
model's own log-softmax computed directly, request by request (dense and sparse)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import actsparse as asp
from actsparse.cli import main
from actsparse.errors import ConfigError, DataError, StateError, UnsupportedError
from actsparse.eval.cloze import cloze_passages
from actsparse.eval.downstream import (BLIMP_ENV, check_tasks, evaluate_tasks, paired_difference,
                                       require_lm_eval, resolve_blimp_dir)

SUBSET = Path(__file__).with_name("blimp-subset")  # 5 paradigms x 3 pairs, one per field
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed: pip install 'actsparse[lmeval]'")


# ---------------------------------------------------------------- cloze construction
def test_cloze_passages_take_sentence_final_words_with_their_context():
    docs = ["one two three four. Five six seven eight nine river. ten",
            "a b c U.S. d e 1990. f g it. h i j k lake."]
    got = cloze_passages(docs, context_words=3)
    # doc 0: "four." has 3 words before it; "nine" is not sentence-final; "river." comes 5 words after
    # the first target; doc 1: "U.S.", "1990." and "it." are no targets, "lake." is
    assert got == [{"context": "one two three", "target": "four", "doc": 0},
                   {"context": "seven eight nine", "target": "river", "doc": 0},
                   {"context": "i j k", "target": "lake", "doc": 1}]
    # passages do not overlap: the next context starts after the previous target
    assert cloze_passages(["w1 w2 aaa. bbb. w3 ccc."], context_words=2) == [
        {"context": "w1 w2", "target": "aaa", "doc": 0}, {"context": "bbb. w3", "target": "ccc", "doc": 0}]
    # a limit spreads the subset over all passages: passage floor(j * n / limit)
    many = [" ".join(["x"] * 3 + [f"word{chr(97 + i)}."]) for i in range(10)]
    assert [p["doc"] for p in cloze_passages(many, context_words=3, limit=4)] == [0, 2, 5, 7]
    with pytest.raises(DataError, match="no cloze passage"):
        cloze_passages(["too short."], context_words=5)
    with pytest.raises(DataError, match="context_words"):
        cloze_passages(docs, context_words=0)


def test_cloze_passages_of_the_wiki_test_split_are_many_and_clean():
    ps = cloze_passages(asp.text("wiki", "test"), context_words=64)
    assert len(ps) > 1000
    assert all(p["target"].isalpha() and len(p["context"].split()) == 64 for p in ps)


# ---------------------------------------------------------------- tasks, data folder, install
def test_tasks_and_blimp_folder_are_checked(tmp_path, monkeypatch):
    assert check_tasks("blimp, cloze") == ["blimp", "cloze"]
    with pytest.raises(ConfigError, match="unknown task.*hellaswag.*the tasks are blimp, cloze"):
        check_tasks("blimp,hellaswag")
    with pytest.raises(ConfigError, match="no task"):
        check_tasks("")
    monkeypatch.delenv(BLIMP_ENV, raising=False)
    assert resolve_blimp_dir(SUBSET) == SUBSET
    with pytest.raises(DataError, match="does not exist"):
        resolve_blimp_dir(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no <paradigm>.jsonl"):
        resolve_blimp_dir(tmp_path)
    monkeypatch.setenv(BLIMP_ENV, str(SUBSET))
    assert resolve_blimp_dir() == SUBSET
    monkeypatch.delenv(BLIMP_ENV)
    import actsparse.eval.downstream as ds

    monkeypatch.setattr(ds, "_repo_blimp_dir", lambda: tmp_path / "absent")
    with pytest.raises(DataError, match=f"--blimp-dir .*{BLIMP_ENV}.*alexwarstadt/blimp"):
        resolve_blimp_dir()


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(UnsupportedError, match=r"pip install 'actsparse\[lmeval\]'"):
        require_lm_eval()
    assert main(["eval", "--tasks", "blimp", "--blimp-dir", str(SUBSET), "--no-progress"]) == 2
    assert "pip install 'actsparse[lmeval]'" in capsys.readouterr().err


def test_eval_tasks_refusals_come_before_the_model_loads(tmp_path, capsys):
    assert main(["eval", "--tasks", "blimp,lambada", "--no-progress"]) == 2
    assert "unknown task(s) lambada" in capsys.readouterr().err
    assert main(["eval", "--tasks", "blimp", "--blimp-dir", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--tasks", "cloze", "--protocol", "decode", "--no-progress"]) == 2
    assert "drop --protocol decode" in capsys.readouterr().err


def test_paired_difference_needs_the_same_items():
    dense = {"task": "t", "correct": [1, 1, 0, 1], "item_ids": list("abcd")}
    sparse = {"task": "t", "correct": [1, 0, 0, 0], "item_ids": list("abcd")}
    d = paired_difference(sparse, dense)
    assert d["difference"] == -0.5 and d["discordant"] == 2 and d["items"] == 4
    assert d["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)  # sd of (0,-1,0,-1) over sqrt(4)
    assert d["ci"][0] <= -0.5 <= d["ci"][1]
    with pytest.raises(DataError, match="same items"):
        paired_difference({**sparse, "item_ids": list("abce")}, dense)


# ---------------------------------------------------------------- the real model
@torch.no_grad()
def direct(model, context_ids, continuation_ids):
    """The model's own log-probability of the continuation after the context, and whether each
    of its tokens is the argmax: one unpadded forward of context + continuation."""
    ids = torch.tensor([context_ids + continuation_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    pos = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    target = torch.tensor(continuation_ids)
    return float(logp[pos, target].sum()), bool((logp[pos].argmax(-1) == target).all())


def direct_results(model, tok, passages, pairs):
    """BLiMP (the first ``pairs`` of each subset paradigm) and cloze (``passages``) scored
    directly: per item the log-likelihoods and the outcome. BLiMP: ' ' + sentence after BOS;
    cloze: ' ' + target after the context."""
    blimp = []
    for f in sorted(SUBSET.glob("*.jsonl")):
        for line in f.read_text().splitlines()[:pairs]:
            doc = json.loads(line)
            good, bad = (direct(model, [tok.bos_token_id], tok(" " + doc[k], add_special_tokens=False).input_ids)[0]
                         for k in ("sentence_good", "sentence_bad"))
            blimp.append((f"{doc['UID']}/{doc['pairID']}", good, bad, int(good >= bad)))
    cloze = []
    for p in passages:
        ctx = tok(p["context"])["input_ids"]
        whole = tok(p["context"] + " " + p["target"])["input_ids"]
        assert whole[:len(ctx)] == ctx  # the target's tokens start after the context's
        cloze.append(direct(model, ctx, whole[len(ctx):]))
    return blimp, cloze


def check_against_direct(res, blimp, cloze):
    b = res["blimp"]
    assert b.item_ids == [i for i, *_ in blimp] and b.items == len(blimp) == 5
    for (good, bad), (_, ref_good, ref_bad, _) in zip(b.loglikelihoods, blimp):
        assert good == pytest.approx(ref_good, rel=1e-4, abs=1e-3)
        assert bad == pytest.approx(ref_bad, rel=1e-4, abs=1e-3)
    assert b.correct == [c for *_, c in blimp]
    assert b.accuracy == pytest.approx(sum(c for *_, c in blimp) / 5)
    c = res["cloze"]
    assert [ll for (ll,) in c.loglikelihoods] == pytest.approx([ll for ll, _ in cloze], rel=1e-4, abs=1e-3)
    assert c.correct == [int(g) for _, g in cloze] and c.items == len(cloze)


@pytest.fixture(scope="module")
def teal_plan(smollm2, tmp_path_factory):
    model, tok = smollm2
    cal = asp.token_windows(tok, asp.text("wiki", "calibration"), window=256, max_tokens=512)
    asp.sparsify_(model, asp.TEAL(sparsity=0.5), calibration=cal)
    out = tmp_path_factory.mktemp("plan") / "teal"
    try:
        asp.save_plan(model, out)
    finally:
        asp.desparsify_(model)
    return out


@needs_lm_eval
def test_lm_eval_scores_equal_the_models_own_log_softmax_dense_and_sparse(smollm2, teal_plan):
    """The dense model in batches of 4 (lm-eval pads on the right); the sparse one request by
    request: a thresholded model's scores move with the batch's shape (fp32 rounding flips
    entries at the threshold and the flips cascade), so only unbatched scores can be compared
    with the unbatched reference exactly."""
    from actsparse.sparsify.modules import dense_forward, reached_sparsity, reset_counts

    model, tok = smollm2
    passages = cloze_passages(asp.text("wiki", "test"), context_words=16, limit=1)
    kw = dict(blimp_dir=SUBSET, limit=1, cloze_context_words=16)
    dense = evaluate_tasks(model, tok, ["blimp", "cloze"], batch_size=4, **kw)
    check_against_direct(dense, *direct_results(model, tok, passages, pairs=1))
    assert dense["blimp"].details["sparse_modules"] == 0
    assert dense["blimp"].per_field["syntax_semantics"]["items"] == 2  # both spellings of the field, merged
    assert set(dense["blimp"].per_field) == {"morphology", "semantics", "syntax", "syntax_semantics"}
    assert dense["blimp"].per_paradigm["adjunct_island"] == {"accuracy": dense["blimp"].correct[0],
                                                             "items": 1, "field": "syntax", "term": "island_effects"}
    asp.load_plan(model, teal_plan)
    try:
        reset_counts(model)
        sparse = evaluate_tasks(model, tok, ["blimp", "cloze"], batch_size=1, **kw)
        reached = reached_sparsity(model)
        assert 0.3 < reached["attn.q:input"] < 0.7 and 0.3 < reached["mlp.down:input"] < 0.7  # lm-eval ran sparse
        check_against_direct(sparse, *direct_results(model, tok, passages, pairs=1))
        assert sparse["blimp"].details["sparse_modules"] > 0
        # and sparse is not dense: every log-likelihood moved
        moved = [abs(s[0] - d[0]) > 1e-3 for s, d in zip(sparse["blimp"].loglikelihoods, dense["blimp"].loglikelihoods)]
        assert all(moved)
        with dense_forward(model), pytest.raises(StateError, match="bypassed"):
            evaluate_tasks(model, tok, ["blimp"], **kw)
    finally:
        asp.desparsify_(model)


@pytest.mark.slow  # loads a second model and runs the tasks twice (the test above checks the scores)
@needs_lm_eval
def test_eval_tasks_cli_reports_dense_sparse_and_their_difference(teal_plan, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert main(["eval", "--tasks", "blimp,cloze", "--plan", str(teal_plan), "--blimp-dir", str(SUBSET),
                 "--limit", "1", "--cloze-context-words", "32", "--json", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    for run in ("dense", "sparse"):
        assert doc["tasks"][run]["blimp"]["items"] == 5 and doc["tasks"][run]["cloze"]["items"] == 1
        assert set(doc["tasks"][run]["blimp"]["per_field"]) == {"morphology", "semantics", "syntax",
                                                                "syntax_semantics"}
    assert doc["tasks"]["dense"]["blimp"]["details"]["sparse_modules"] == 0
    assert doc["tasks"]["sparse"]["blimp"]["details"]["sparse_modules"] > 0
    assert doc["difference"]["blimp"]["items"] == 5 and "blimp_per_field" in doc["difference"]
    assert "blimp: sparse - dense" in printed and "(n=5)" in printed
