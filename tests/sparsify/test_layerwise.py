"""Layer-by-layer calibration (one decoder layer in memory at a time, read from safetensors)
gives the in-memory statistics and plan, bit for bit."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsify_helpers import random_windows, tiny_llama


def same_stats(a: dict, b: dict) -> bool:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            ta, tb = a[k].to_tensors(), b[k].to_tensors()
            assert all(torch.equal(ta[f], tb[f]) for f in ta), k
    return True


def same_assignments(A, B) -> bool:
    assert len(A) == len(B)
    for x, y in zip(A, B):
        fields = ("path", "module", "site_kind", "mode", "k", "skips", "width", "target")
        assert [getattr(x, f) for f in fields] == [getattr(y, f) for f in fields]
        if isinstance(x.threshold, torch.Tensor):
            assert torch.equal(x.threshold, y.threshold), x.path
        else:
            assert x.threshold == y.threshold, x.path
    return True


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=3).save_pretrained(d)
    return d, AutoModelForCausalLM.from_pretrained(d).eval()


def test_layerwise_statistics_and_plans_equal_the_in_memory_ones(tiny_dir):
    from actsparse.models.loading import weights_identity
    from actsparse.sparsify import CATS, CETT, CHESS, TEAL, TopK, WINA, calibrate
    from actsparse.sparsify.api import plan_assignments
    from actsparse.sparsify.layerwise import assign_layerwise, calibrate_layerwise, identity_layerwise

    d, model = tiny_dir
    cfgs = [TEAL(), CATS(), CHESS(selective=True), TopK(), WINA(), CETT(sample_tokens=256),
            TEAL(allocation="greedy", greedy_error="linear", greedy_tokens=256,
                 overrides=(("model.layers.0.*", None),))]
    w = random_windows(pad_last=20)
    mem = calibrate(model, cfgs, w, batch_size=3)
    lw = calibrate_layerwise(d, cfgs, w, batch_size=3)
    assert any(k.endswith(":chess") for k in lw) and any(isinstance(v, torch.Tensor) for v in lw.values())
    assert same_stats(mem, lw)
    for c in cfgs:
        assert same_assignments(plan_assignments(model, c, mem), assign_layerwise(d, c, lw)), c
    assert identity_layerwise(d) == weights_identity(model)


def test_layerwise_refuses_the_block_output_greedy(tiny_dir):
    from actsparse.errors import UnsupportedError
    from actsparse.sparsify import TEAL
    from actsparse.sparsify.layerwise import assign_layerwise, calibrate_layerwise

    d, _ = tiny_dir
    with pytest.raises(UnsupportedError, match="greedy_error='linear'"):
        calibrate_layerwise(d, [TEAL(allocation="greedy")], random_windows())
    with pytest.raises(UnsupportedError, match="greedy_error='linear'"):
        assign_layerwise(d, TEAL(allocation="greedy"), {})


def test_layerwise_keeps_one_layer_of_weights(tiny_dir, monkeypatch):
    from actsparse.sparsify import TEAL
    from actsparse.sparsify import layerwise

    d, _ = tiny_dir
    resident = []
    real = layerwise._materialise

    def watch(module, tensors, what):
        real(module, tensors, what)
        resident.append(what)

    monkeypatch.setattr(layerwise, "_materialise", watch)
    seen = []
    real_free = layerwise._free
    monkeypatch.setattr(layerwise, "_free", lambda m: (seen.append(sum(p.numel() for p in m.parameters()
                                                                         if not p.is_meta)), real_free(m)))
    layerwise.calibrate_layerwise(d, TEAL(), random_windows(), batch_size=4)
    assert resident == [f"decoder layer {i}" for i in range(3)]  # the embedding is read by rows
    assert all(n > 0 for n in seen)  # each was freed after use


def test_layerwise_refuses_other_families_and_missing_weights(tmp_path, tiny_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from actsparse.errors import ModelNotFoundError, UnsupportedError
    from actsparse.sparsify import CATS, TEAL
    from actsparse.sparsify.layerwise import calibrate_layerwise

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=500)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedError, match="LLaMA family"):
        calibrate_layerwise(tmp_path / "gpt2", CATS(), random_windows())
    d, _ = tiny_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((d / "config.json").read_text())
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.down_proj.weight"]
    save_file(t, broken / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="decoder layer 1.*down_proj"):
        calibrate_layerwise(broken, TEAL(), random_windows())


def test_cli_layerwise_plan_equals_the_in_memory_plan_smollm2(smollm2, tmp_path):
    from actsparse.cli import main

    args = ["calibrate", "--method", "chess", "--tokens", "768", "--window", "128", "--batch-size", "2",
            "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "mem")]) == 0
    assert main(args + ["--layerwise", "--out", str(tmp_path / "lw")]) == 0
    mem = json.loads((tmp_path / "mem" / "plan.json").read_text())
    lw = json.loads((tmp_path / "lw" / "plan.json").read_text())
    assert lw["meta"].pop("layerwise") is True
    assert mem["modules"] == lw["modules"] and mem["model"] == lw["model"] and mem["meta"] == lw["meta"]
    a, b = load_file(tmp_path / "mem" / "plan.safetensors"), load_file(tmp_path / "lw" / "plan.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_read_by_blocks_of_rows_equals_the_lookup(tiny_dir):
    from actsparse.sparsify.layerwise import SafetensorsWeights

    d, model = tiny_dir
    ids = random_windows(n=3).input_ids
    got = SafetensorsWeights(d).embed("model.embed_tokens.weight", ids, torch.float32, rows_per_read=37)
    assert torch.equal(got, model.get_input_embeddings()(ids))


def test_mmap_threshold_is_pinned_on_glibc():
    """Without it, each freed layer raised glibc's threshold and the next layers stayed resident."""
    import platform

    from actsparse.sparsify.layerwise import fixed_mmap_threshold

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert fixed_mmap_threshold() is True
