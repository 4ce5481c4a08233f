"""Recovery training: the straight-through mask, the KL loss, LoRA, the resumable loop and
the saved artefact (tiny constructed models where the answer is exact), plus a short run on
the real SmolLM2."""
import copy
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from actsparse.data.text import Windows
from actsparse.errors import ConfigError, StateError
from actsparse.sparsify import TEAL, sparsify_
from actsparse.sparsify.modules import MaskedLinear, straight_through
from actsparse.train.distill import kl_on_logits
from actsparse.train.lora import LoRA, merge_lora_
from actsparse.train.loop import batch_indices
from actsparse.train.recovery import (RecoveryConfig, load_recovery, norm_parameters, plan_fingerprint,
                                      prepare_trainable_, recovery_loop, save_recovery)


# ------------------------------------------------------------ straight-through
def _tiny_masked(ste: bool):
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    m = MaskedLinear(lin, 1.0)  # keeps |x| > 1
    m.straight_through = ste
    return m


@pytest.mark.parametrize("ste", [False, True])
def test_mask_gradient_exact(ste):
    m = _tiny_masked(ste)
    x = torch.tensor([[0.5, -2.0, 3.0]], requires_grad=True)  # the first entry is dropped
    y = m(x)
    assert y.tolist() == [[-4.0 + 9.0, -10.0 + 18.0]]  # the forward is masked either way
    y.backward(torch.tensor([[1.0, 10.0]]))
    # dL/dx = W^T g = [41, 52, 63]; the plain mask zeroes the dropped entry's, STE passes it
    assert x.grad.tolist() == ([[41.0, 52.0, 63.0]] if ste else [[0.0, 52.0, 63.0]])
    # dL/dW = g (x * keep)^T in both: the weight only ever sees the masked input
    assert m.weight.grad.tolist() == [[0.0, -2.0, 3.0], [0.0, -20.0, 30.0]]


def test_straight_through_context_restores():
    m = _tiny_masked(False)
    model = nn.Sequential(m)
    with straight_through(model):
        assert m.straight_through
    assert not m.straight_through


# ------------------------------------------------------------------ KL loss
def _kl_brute(student, teacher, mask, T):
    total, n = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            zs = [float(v) / T for v in student[b, t]]
            zt = [float(v) / T for v in teacher[b, t]]
            ls = math.log(sum(math.exp(v) for v in zs))
            lt = math.log(sum(math.exp(v) for v in zt))
            total += sum(math.exp(a - lt) * ((a - lt) - (c - ls)) for a, c in zip(zt, zs))
            n += 1
    return total / n * T * T


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_matches_brute_force(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding never counts
    assert float(kl_on_logits(s, t, mask, temperature=T)) == pytest.approx(_kl_brute(s, t, mask, T), rel=1e-5)
    assert float(kl_on_logits(t, t, mask)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="differ"):
        kl_on_logits(s, t[..., :3], mask)


# --------------------------------------------------------------------- LoRA
def test_lora_forward_and_exact_merge():
    g = torch.Generator().manual_seed(1)
    lora = LoRA(4, 3, rank=2, alpha=4.0, generator=g)
    with torch.no_grad():
        lora.B.copy_(torch.randn(3, 2, generator=g))
    x = torch.randn(5, 4, generator=g)
    assert torch.allclose(lora(x), x @ (lora.B @ lora.A).t() * 2.0, atol=1e-6)

    m = MaskedLinear(nn.Linear(4, 3), 0.5)
    m.adapter = lora
    y = m(x)
    keep = x.abs() > 0.5
    ref = (x * keep) @ (m.weight + 2.0 * lora.B @ lora.A).t() + m.bias
    assert torch.allclose(y, ref, atol=1e-5)  # the adapter reads the masked input
    model = nn.Sequential(m)
    assert merge_lora_(model) == 1 and m.adapter is None
    assert torch.allclose(m(x), y, atol=1e-5)


# --------------------------------------------------------- the resumable loop
def tiny_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def windows(n=8, t=40, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 30:] = 0
    return Windows(ids, mask)


CFG = RecoveryConfig(model="tiny", tokens=6 * 2 * 40, window=40, batch_size=2, lr=1e-2, checkpoint_every=2,
                     seed=1, lora_rank=2)


def student_teacher(sparsity=0.5, seed=0):
    teacher = tiny_llama(seed)
    student = copy.deepcopy(teacher)
    sparsify_(student, TEAL(sparsity=sparsity), calibration=windows(seed=9))
    return student, teacher


def _log(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("trainable", ["lora", "norms"])
def test_resume_and_extension_are_bit_identical(tmp_path, trainable):
    torch.set_num_threads(1)
    cfg = dataclasses.replace(CFG, trainable=trainable)
    data = windows()
    student, teacher = student_teacher()
    params = prepare_trainable_(student, cfg)
    assert all(p.requires_grad for p in params.values())
    assert sum(p.requires_grad for p in student.parameters()) == len(params)
    last = recovery_loop(student, teacher, data, cfg, params, tmp_path / "a", progress=False)
    assert last["step"] == 6
    assert last["tokens"] == sum(int(data.attention_mask[batch_indices(s, 2, len(data), 1)].sum()) for s in range(6))
    log_a = _log(tmp_path / "a" / "log.jsonl")

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    s2, t2 = student_teacher()
    p2 = prepare_trainable_(s2, cfg)
    with pytest.raises(KeyboardInterrupt):
        recovery_loop(s2, t2, data, cfg, p2, tmp_path / "b", progress=False, callback=interrupt)
    with pytest.raises(ConfigError, match="resume"):
        recovery_loop(s2, t2, data, cfg, p2, tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="lr"):
        recovery_loop(s2, t2, data, dataclasses.replace(cfg, lr=1.0), p2, tmp_path / "b", resume=True,
                      progress=False)
    s3, t3 = student_teacher()
    p3 = prepare_trainable_(s3, cfg)
    with torch.no_grad():  # the trained tensors come from the checkpoint, not from here
        for p in p3.values():
            p.add_(1.0)
    # resume the interrupted run, first to 4 steps, then extend it to 6
    recovery_loop(s3, t3, data, dataclasses.replace(cfg, tokens=4 * 80), p3, tmp_path / "b", resume=True,
                  progress=False)
    recovery_loop(s3, t3, data, cfg, p3, tmp_path / "b", resume=True, progress=False)
    for k in params:
        assert torch.equal(params[k], p3[k]), k
    log_b = _log(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in log_b] == list(range(1, 7))
    for ra, rb in zip(log_a, log_b):
        assert (ra["kl"], ra["tokens"], ra["sparsity"]) == (rb["kl"], rb["tokens"], rb["sparsity"])
    files = sorted(p.name for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files == ["latest.json", "log.jsonl", "model.safetensors", "optimizer.safetensors", "state.json"]
    from safetensors.torch import load_file

    ckpt = next((tmp_path / "b").glob("checkpoint-*"))
    assert set(load_file(str(ckpt / "model.safetensors"))) == set(params)  # only the trained tensors


def test_artefact_round_trip_and_refusals(tmp_path):
    torch.set_num_threads(1)
    data = windows()
    student, teacher = student_teacher()
    params = prepare_trainable_(student, CFG)
    recovery_loop(student, teacher, data, CFG, params, tmp_path / "run", progress=False)
    save_recovery(student, tmp_path / "rec", params, CFG)
    ids = data.input_ids[:2]
    want = student(input_ids=ids).logits

    same, _ = student_teacher()
    load_recovery(same, tmp_path / "rec")
    assert torch.equal(same(input_ids=ids).logits, want)
    with pytest.raises(StateError, match="load its plan"):
        load_recovery(tiny_llama(), tmp_path / "rec")
    other_plan, _ = student_teacher(sparsity=0.3)
    assert plan_fingerprint(other_plan) != plan_fingerprint(student)
    with pytest.raises(ConfigError, match="another plan"):
        load_recovery(other_plan, tmp_path / "rec")
    other_model, _ = student_teacher(seed=3)
    with pytest.raises(ConfigError, match="other weights|another model"):
        load_recovery(other_model, tmp_path / "rec")


def test_norms_are_the_rmsnorm_weights():
    student, _ = student_teacher()
    names = sorted(norm_parameters(student))
    assert names == ["model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                     "model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
                     "model.norm.weight"]
    with pytest.raises(StateError, match="sparsif"):
        prepare_trainable_(tiny_llama(), CFG)


@pytest.mark.parametrize("kwargs,match", [({"trainable": "all"}, "trainable"), ({"tokens": 0}, "tokens"),
                                          ({"sparsity": 1.0}, "sparsity"), ({"lr": 0.0}, "lr")])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RecoveryConfig(**kwargs)


# ------------------------------------------------------------ real SmolLM2
def test_real_smollm2_kl_falls(smollm2, tmp_path):
    """Three LoRA updates on one real 64-token window of the calibration split: the KL to
    the dense model falls, the sparsity stays where the plan put it."""
    from actsparse.data.text import text, token_windows

    model, tok = smollm2
    teacher = model
    student = copy.deepcopy(model)
    cal = token_windows(tok, text("wiki", "calibration"), window=256, max_tokens=512)
    sparsify_(student, TEAL(sparsity=0.5), calibration=cal)
    first = token_windows(tok, text("wiki", "calibration"), window=64, max_tokens=64)
    train = Windows(first.input_ids[:1], first.attention_mask[:1])  # one full window, three times
    assert int(train.attention_mask.sum()) == 64
    cfg = RecoveryConfig(tokens=3 * 64, window=64, batch_size=1, lr=2e-3, checkpoint_every=3)
    params = prepare_trainable_(student, cfg)
    assert len(params) == 30 * 7 * 2  # A and B of every block linear
    recovery_loop(student, teacher, train, cfg, params, tmp_path, progress=False)
    log = _log(tmp_path / "log.jsonl")
    assert log[-1]["kl"] < log[0]["kl"] * 0.95, log
    assert all(0.4 < r["sparsity"] < 0.6 for r in log)
    assert not any(".adapter." in n for n, _ in teacher.named_parameters())


def test_cli_help_and_refusal(capsys, tmp_path):
    from actsparse.cli import main

    with pytest.raises(SystemExit):
        main(["recover", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--plan", "--trainable", "--tokens", "--resume", "--eval-every", "--final-tokens",
                 "curve.jsonl", "recovery.safetensors", "actsparse-out/recover"):
        assert flag in text, flag
    (tmp_path / "file").write_text("x")
    assert main(["recover", "--tokens", "8", "--out", str(tmp_path / "file")]) == 2
    assert "must be a directory" in capsys.readouterr().err
