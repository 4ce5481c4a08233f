import argparse
import json

import pytest
import torch

from actsparse.data.text import Windows
from actsparse.errors import ConfigError
from actsparse.train.loop import FinetuneConfig, batch_indices, train_loop
from actsparse.train.relufy import relufy_


def tiny_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    relufy_(model)
    return model


def windows(n=7, t=8):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, 5:] = 0
    return Windows(ids, mask)


CFG = FinetuneConfig(model="tiny", steps=6, batch_size=3, lr=3e-3, lam=1e-2, schedule="prosparse", stages=2,
                     checkpoint_every=2, window=8, seed=1)


def _log(path):
    return [json.loads(line) for line in open(path)]


def test_batch_indices_deterministic_and_cover_epochs():
    n, bs = 7, 3
    seq = torch.cat([batch_indices(s, bs, n, 0) for s in range(7)])  # 21 = 3 epochs
    for e in range(3):
        assert sorted(seq[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert torch.equal(batch_indices(4, bs, n, 0), batch_indices(4, bs, n, 0))
    assert not torch.equal(torch.cat([batch_indices(s, bs, n, 1) for s in range(3)]), seq[:9])


def test_resume_gives_identical_weights_and_log(tmp_path):
    torch.set_num_threads(1)
    data = windows()
    straight = tiny_llama()
    last = train_loop(straight, data, CFG, tmp_path / "a", progress=False)
    assert last["step"] == 6
    log_a = _log(tmp_path / "a" / "log.jsonl")
    assert [r["step"] for r in log_a] == list(range(1, 7))
    assert log_a[-1]["lambda"] == pytest.approx(1e-2) and log_a[0]["lambda"] == pytest.approx(5e-3)

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    first = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        train_loop(first, data, CFG, tmp_path / "b", progress=False, callback=interrupt)
    assert json.loads((tmp_path / "b" / "latest.json").read_text())["step"] == 2
    assert [r["step"] for r in _log(tmp_path / "b" / "log.jsonl")] == [1, 2, 3]
    # without --resume an existing run is not overwritten
    with pytest.raises(ConfigError, match="resume"):
        train_loop(tiny_llama(), data, CFG, tmp_path / "b", progress=False)
    # a resume with different settings is refused
    import dataclasses

    with pytest.raises(ConfigError, match="lr"):
        train_loop(tiny_llama(), data, dataclasses.replace(CFG, lr=1.0), tmp_path / "b", resume=True, progress=False)
    resumed = tiny_llama(seed=99)  # weights come from the checkpoint, not the fresh init
    train_loop(resumed, data, CFG, tmp_path / "b", resume=True, progress=False)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    log_b = _log(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in log_b] == list(range(1, 7))
    for ra, rb in zip(log_a, log_b):
        for key in ("loss", "lm_loss", "l1", "lambda", "sparsity"):
            assert ra[key] == rb[key], (ra, rb)
    # one checkpoint kept, no pickle anywhere
    files = sorted(p.name for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files == ["latest.json", "log.jsonl", "model.safetensors", "optimizer.safetensors", "state.json"]
    # resuming a finished run is a no-op
    assert train_loop(resumed, data, CFG, tmp_path / "b", resume=True, progress=False)["step"] == 6


def test_l1_raises_down_input_sparsity(tmp_path):
    torch.set_num_threads(1)
    import dataclasses

    data = windows()
    base = dataclasses.replace(CFG, steps=25, checkpoint_every=100, lr=1e-2)
    runs = {}
    for name, cfg in {"none": dataclasses.replace(base, schedule="none"),
                      "l1": dataclasses.replace(base, schedule="constant", lam=1.0)}.items():
        train_loop(tiny_llama(), data, cfg, tmp_path / name, progress=False)
        log = _log(tmp_path / name / "log.jsonl")
        runs[name] = sum(r["sparsity"] for r in log[-5:]) / 5
        assert log[-1]["lambda"] == (0.0 if name == "none" else 1.0)
    assert runs["l1"] > runs["none"] + 0.05, runs


@pytest.mark.parametrize("kwargs,match", [
    ({"schedule": "cosine"}, "schedule"),
    ({"lam": -1.0}, "lambda"),
    ({"steps": 0}, "steps"),
    ({"fatrelu": -0.5}, "threshold"),
    ({"lr": 0.0}, "lr"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**kwargs)


def test_config_round_trip():
    assert FinetuneConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ConfigError, match="unknown"):
        FinetuneConfig.from_dict({**CFG.to_dict(), "nope": 1})


def test_cli_help_and_end_to_end(tmp_path, smollm2, capsys):
    from actsparse.commands import finetune as cmd
    from actsparse.io import read_json

    parser = argparse.ArgumentParser(prog="actsparse")
    cmd.register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--relufy", "--schedule", "--lambda", "--resume", "--fatrelu", "--checkpoint-every", "--eval-batch-size",
                 "log.jsonl"):
        assert flag in help_text
    # a tiny model with SmolLM2's tokenizer, saved as a local HF directory
    torch.set_num_threads(1)
    tok = smollm2.tokenizer
    model = tiny_llama(vocab=len(tok))
    model.config.hidden_act = "silu"
    for layer in model.model.layers:
        from transformers.activations import ACT2FN

        layer.mlp.act_fn = ACT2FN["silu"]
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = parser.parse_args(["finetune", "--model", str(model_dir), "--relufy", "--schedule", "prosparse",
                              "--lambda", "1e-3", "--steps", "2", "--data", "news", "--out", str(out),
                              "--window", "32", "--batch-size", "2", "--max-tokens", "512", "--eval-tokens", "256",
                              "--fatrelu", "0.01", "--no-progress", "--checkpoint-every", "1",
                              "--eval-batch-size", "3"])
    assert args.func(args) == 0
    summary = read_json(out / "summary.json")
    assert summary["last"]["step"] == 2
    assert summary["config"]["eval_batch_size"] == 3
    assert summary["eval"]["relu"]["ppl"] > 1 and summary["eval"]["fatrelu"]["sparsity"] >= \
        summary["eval"]["relu"]["sparsity"]
    assert any(c["after"] == "ReLU" for c in summary["changes"])
    assert (out / "model" / "model.safetensors").is_file()
    assert "PPL" in capsys.readouterr().out
