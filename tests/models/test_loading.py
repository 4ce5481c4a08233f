
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
