"""Tiny models for the contrast and intervention tests: a constructed LLaMA whose one neuron
fires only on one token (a known answer), tiny random MoE models, and a character tokenizer."""
import copy

import torch

MARK = "x"  # the token that drives the constructed neuron
MARK_LAYER, MARK_NEURON = 0, 2


class CharTokenizer:
    """One id per lowercase letter or space (ids 3..), BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    alphabet = " abcdefghijklmnopqrstuvwxyz"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + self.alphabet.index(c) for c in t] for t in texts]}


def constructed_llama(seed=0):
    """A 2-layer LLaMA (hidden 8, MLP 6) with no attention output and an embedding where only the
    MARK token has a component on hidden dim 0; MLP neuron MARK_NEURON of layer 0 reads only that
    dim, so it is exactly 0 on every other token (SiLU(0) * up = 0) and large on MARK."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    mark = 3 + CharTokenizer.alphabet.index(MARK)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[mark] = 0.0
        emb[mark, 0] = 3.0
        mlp = model.model.layers[MARK_LAYER].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[MARK_NEURON] = 0.0
            w[MARK_NEURON, 0] = 2.0
    return model


def tiny_moe(family, seed=0, experts=4, top_k=2, layers=2):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=32, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, num_experts_per_tok=top_k)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=24, num_local_experts=experts, **common)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12, shared_expert_intermediate_size=12,
                             num_experts=experts, **common)
    else:
        cfg = Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=12, num_experts=experts, head_dim=8, **common)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # from_config leaves Qwen routers at zero: give them real preferences
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    return model


def without_expert(model, layer, expert):
    """A copy of ``model`` in which ``expert`` of ``layer`` does not exist (its router row and its
    weights removed): what a switched-off expert must give."""
    ref = copy.deepcopy(model)
    block = ref.model.layers[layer].mlp
    keep = [e for e in range(block.gate.num_experts) if e != expert]
    with torch.no_grad():
        block.gate.weight = torch.nn.Parameter(block.gate.weight[keep].clone())
        block.experts.gate_up_proj = torch.nn.Parameter(block.experts.gate_up_proj[keep].clone())
        block.experts.down_proj = torch.nn.Parameter(block.experts.down_proj[keep].clone())
    block.gate.num_experts = len(keep)
    block.experts.num_experts = len(keep)
    return ref
