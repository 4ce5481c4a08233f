"""Tiny random models and windows for the sparsify tests."""
import torch


def tiny_llama(seed=0, hidden=64, layers=2, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=500, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def random_windows(n=8, window=64, seed=1, pad_last=0):
    from actsparse.data.text import Windows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (n, window), generator=g)
    mask = torch.ones_like(ids)
    if pad_last:
        mask[-1, -pad_last:] = 0
    return Windows(ids, mask)


