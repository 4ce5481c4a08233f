"""Tiny LLaMA models and GGUF files of them (written with gguf.GGUFWriter) for the GGUF loader tests."""
from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

ROLES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def tiny_llama(seed: int = 0, layers: int = 2):
    """A random LLaMA with GQA (4 query heads, 2 kv heads), every dimension a multiple of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order: per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, model, types, *, head_type=T.Q8_0, adopt: bool = True) -> dict:
    """Write ``model``'s block linears to ``path`` as ``types`` (one GGMLQuantizationType, or a
    function (layer, role) -> type), q/k permuted as llama.cpp does, the tied embedding as
    ``head_type``. ``adopt``: set the model's weights to the file's dequantised values (what
    asp.load gives for the file). Returns {module path: the file's raw bytes, GGUF order}."""
    cfg = model.config
    pick = types if callable(types) else (lambda layer, role: types)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    raw = {}

    def put(name, hf_path, weight, qtype, n_head=None):
        x = weight.detach().float().numpy()
        if n_head is not None:
            x = llamacpp_permute(x, n_head)
        if qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
            data = gguf.quants.quantize(x, qtype)
        else:  # a type gguf cannot quantise: random bytes of the right size (never dequantised)
            size, bytes_per = gguf.GGML_QUANT_SIZES[qtype]
            data = np.random.default_rng(0).integers(0, 256, (x.shape[0], x.shape[1] // size * bytes_per),
                                                     dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=qtype)
        raw[hf_path] = (data, qtype)
        if adopt and qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
            deq = gguf.quants.dequantize(data, qtype)
            if n_head is not None:  # back to HF's row order
                deq = deq.reshape(n_head, deq.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(deq.shape)
            weight.data.copy_(torch.from_numpy(np.ascontiguousarray(deq)))

    put("token_embd.weight", "lm_head", model.model.embed_tokens.weight, head_type)
    for i in range(cfg.num_hidden_layers):
        for role, g in ROLES.items():
            lin = model.get_submodule(f"model.layers.{i}.{role}")
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(g)
            put(f"blk.{i}.{g}.weight", f"model.layers.{i}.{role}", lin.weight, pick(i, g), heads)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raw
