"""A GGUF file (LLaMA architecture, F32 tensors) written from a Hugging Face ``LlamaForCausalLM``'s own
tensors, so that llama.cpp can run the random-weight shapes of the decode benchmark on the very
same weights as actsparse.

What llama.cpp's LLaMA graph expects and how it differs from the HF checkpoint:

* names: ``token_embd``, ``blk.<i>.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}``, ``output_norm``, ``output`` (absent when the embedding is tied:
  llama.cpp then multiplies by ``token_embd`` as the output matrix);
* a 2-D tensor is stored as the (out, in) row-major matrix a ``torch.nn.Linear`` holds (GGUF lists
  the dimensions innermost first, so it reads as ``[in, out]``);
* RoPE: HF rotates the two halves of each head (dimension j with j + d/2), llama.cpp's LLaMA rope
  rotates adjacent pairs (2j with 2j + 1). The rows of q and k are reordered per head so that
  both compute the same attention: see :func:`rope_rows_to_pairs`. v, o and the rest are unchanged.

Tokenizer: the random shapes use SmolLM2's tokenizer with a smaller model vocabulary (ids are
taken modulo it), so the tokenizer.* metadata is copied from the embedded SmolLM2 GGUF with the
token list cut to the model's vocabulary (and the merges to those whose parts and result are in
it). llama.cpp needs a vocabulary of exactly the embedding's rows; only token ids are fed to it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from actsparse.errors import ConfigError

LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def rope_rows_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k projection with ``n_heads`` heads from HF's half-split
    RoPE layout to llama.cpp's adjacent-pair layout: within each head of d rows, row j (first
    half) goes to 2j and row j + d/2 (second half) to 2j + 1, so the pair HF rotates together
    lands on the pair llama.cpp rotates together, with the same frequency index j."""
    out = w.shape[0]
    if out % (2 * n_heads):
        raise ConfigError(f"{out} rows do not split into {n_heads} heads of an even size")
    d = out // n_heads
    # [head, half, j, ...] -> [head, j, half, ...]: rows (h, 0, j) and (h, 1, j) become h*d + 2j and h*d + 2j + 1
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"only plain RoPE is written to GGUF, not {params.get('rope_type')!r}")
    return float(theta if theta is not None else 10000.0)


def _copy_tokenizer(writer, source: Path, n_vocab: int) -> None:
    """The tokenizer.* keys of the GGUF ``source``, the token list cut to ``n_vocab`` entries."""
    import gguf

    reader = gguf.GGUFReader(source)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) < n_vocab:
        raise ConfigError(f"{source.name} has {len(tokens)} tokens, fewer than the model's {n_vocab}")
    kept = set(tokens[:n_vocab])
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:n_vocab]
        elif key == "tokenizer.ggml.merges":
            pairs = [(m, *m.split(" ", 1)) for m in value]  # "left right" -> the token left + right
            value = [m for m, a, b in pairs if a in kept and b in kept and a + b in kept]
        elif key.endswith("_token_id") and int(value) >= n_vocab:
            continue  # a special token the cut vocabulary does not have
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub)


def write_llama_gguf(model, path: Path, tokenizer_gguf: Path) -> Path:
    """Write ``model`` (an HF LlamaForCausalLM without biases) as an F32 LLaMA GGUF at ``path``."""
    import gguf

    cfg = model.config
    if cfg.model_type != "llama" or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConfigError("the GGUF writer handles LLaMA models without biases")
    if cfg.hidden_act != "silu":
        raise ConfigError(f"llama.cpp's LLaMA graph is SwiGLU (silu), not {cfg.hidden_act!r}")
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if head_dim * n_heads != cfg.hidden_size:
        raise ConfigError("head_dim x heads != hidden size: not written")
    f32 = lambda t: t.detach().to(torch.float32).contiguous().numpy()  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"actsparse random llama {cfg.num_hidden_layers}x{cfg.hidden_size}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(w, tokenizer_gguf, cfg.vocab_size)
    inner = model.model
    w.add_tensor("token_embd.weight", f32(inner.embed_tokens.weight))
    for i, layer in enumerate(inner.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(layer.input_layernorm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(layer.post_attention_layernorm.weight))
        for hf, name in LINEARS.items():
            weight = layer.get_submodule(hf).weight.detach()
            if name == "attn_q":
                weight = rope_rows_to_pairs(weight, n_heads)
            elif name == "attn_k":
                weight = rope_rows_to_pairs(weight, n_kv)
            w.add_tensor(f"blk.{i}.{name}.weight", f32(weight))
    w.add_tensor("output_norm.weight", f32(inner.norm.weight))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", f32(model.lm_head.weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def synthetic_gguf(name: str, model, seed: int, config: dict) -> Path:
    """The F32 GGUF of the random-weight LLaMA shape ``name`` (its HF ``config`` fields) built with
    ``seed`` (``model``: that very model, fp32), written once into the cache under a key of the
    name, seed and config."""
    from actsparse.cache import cache_dir
    from actsparse.models.loading import embedded_gguf

    if model.config.model_type != "llama":
        raise ConfigError(f"{name!r} is not a LLaMA model ({model.config.model_type}); the GGUF writer writes LLaMA")
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError("write the GGUF from the fp32 model, before it is cast")
    key = hashlib.sha256(json.dumps([name, seed, config], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"random-{name}-seed{seed}-{key}.F32.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        try:
            write_llama_gguf(model, tmp, embedded_gguf("smollm2-135m"))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target

