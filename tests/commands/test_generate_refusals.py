"""`actsparse generate` refusals recommend what works from the command line."""
import pytest
import torch

from actsparse.cli import main


def _save(tmp_path, config_cls, tok, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    path = tmp_path / cfg.model_type
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2):
    from transformers import GemmaConfig, GPTNeoXConfig, OPTConfig

    _, tok = smollm2
    tmp = tmp_path_factory.mktemp("archs")
    return {"gemma": _save(tmp, GemmaConfig, tok, num_key_value_heads=1, head_dim=32),
            "gpt_neox": _save(tmp, GPTNeoXConfig, tok),
            "opt": _save(tmp, OPTConfig, tok, ffn_dim=128, word_embed_proj_dim=64)}


@pytest.mark.parametrize("arch, advice", [
    ("opt", "with --plan it decodes on the sparse kernels via accelerate_"),  # mapped, LayerNorm: not in FastDecoder
    ("gpt_neox", "this architecture has no site map, so only a TEAL plan"),  # the generic fallback
])
def test_fast_engine_refusal_points_to_engine_hf(tiny_dirs, arch, advice, capsys):
    """Before: both refusals recommended accelerate_(model) + model.generate, which is not a
    command-line option and which sparsify_ refuses on the generic fallback."""
    argv = ["generate", "--model", tiny_dirs[arch], "--max-new-tokens", "3", "--no-stream"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"is {arch!r}: use `--engine hf`" in err and advice in err
    assert "accelerate_(model)" not in err
    assert main(argv + ["--engine", "hf"]) == 0  # what the message recommends works
    assert "engine hf" in capsys.readouterr().err


def test_fast_engine_runs_gemma(tiny_dirs, capsys):
    """Gemma was refused before issue 13; now it decodes on the fast engine."""
    assert main(["generate", "--model", tiny_dirs["gemma"], "--max-new-tokens", "3", "--no-stream"]) == 0
    assert "engine fast" in capsys.readouterr().err


def test_prompt_longer_than_the_positions_is_refused(tiny_dirs, capsys):
    assert main(["generate", "--model", tiny_dirs["gemma"], "--engine", "hf", "--max-new-tokens", "300"]) == 2
    assert "exceeds" in (err := capsys.readouterr().err) and "256 positions" in err
