"""The GGUF written from a random LLaMA's own tensors (bench/llama_gguf.py) is the same model for
llama.cpp, and the bytes per token of llama.cpp's files are read from their tensors."""
import numpy as np
import pytest
import torch

from actsparse.bench.llama_gguf import rope_rows_to_pairs


def _half_rope(x, pos, theta):  # HF: dimension j rotates with j + d/2
    d = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    return x * cos + torch.cat([-x[d // 2:], x[:d // 2]]) * sin


def _pair_rope(x, pos, theta):  # llama.cpp's LLaMA rope: 2j rotates with 2j + 1
    d = x.shape[-1]
    ang = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * ang.cos() - b * ang.sin(), a * ang.sin() + b * ang.cos()
    return out


def test_reordered_q_rows_give_the_same_rotated_dot_products():
    torch.manual_seed(0)
    n_heads, d, hidden = 3, 8, 16
    wq, wk = torch.randn(n_heads * d, hidden, dtype=torch.float64), torch.randn(d, hidden, dtype=torch.float64)
    x, y = torch.randn(hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    pq, pk = rope_rows_to_pairs(wq, n_heads), rope_rows_to_pairs(wk, 1)
    for h in range(n_heads):
        rows = slice(h * d, (h + 1) * d)
        hf = _half_rope(wq[rows] @ x, 5, 1e4) @ _half_rope(wk @ y, 2, 1e4)
        ours = _pair_rope(pq[rows] @ x, 5, 1e4) @ _pair_rope(pk @ y, 2, 1e4)
        assert ours.item() == pytest.approx(hf.item(), rel=1e-12)
    assert not torch.equal(pq, wq)  # a real reordering, and a permutation of the rows
    assert sorted(map(tuple, pq.tolist())) == sorted(map(tuple, wq.tolist()))


def _small_llama(tie: bool):
    import transformers

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=50000.0, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_llama_cpp_on_the_written_gguf_is_the_hf_model(tmp_path, tie):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional build (see the README)")
    from actsparse.bench.llama_gguf import write_llama_gguf
    from actsparse.models.loading import embedded_gguf

    model = _small_llama(tie)
    path = write_llama_gguf(model, tmp_path / "small.F32.gguf", embedded_gguf("smollm2-135m"))
    # an fp32 KV cache (llama.cpp's default is f16), so that only summation orders differ
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    ids = [5, 77, 300, 12, 999, 41]
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    # every position (RoPE acts from the second on): without the q/k reordering they differ by ~3e-3
    np.testing.assert_allclose(theirs, ours, atol=1e-5 * np.abs(ours).max(), rtol=0)
    greedy = []
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        greedy.append(int(t))
        if len(greedy) == 8:
            break
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert greedy == hf[0, len(ids):].tolist()


def test_requantised_files_and_their_bytes_per_token(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))  # this test's own files, never stale ones
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional build (see the README)")
    from actsparse.bench.llama_gguf import write_llama_gguf
    from actsparse.bench.llamacpp import gguf_bytes_per_token, quantise
    from actsparse.models.loading import embedded_gguf

    model = _small_llama(tie=True)
    f32 = write_llama_gguf(model, tmp_path / "small.F32.gguf", embedded_gguf("smollm2-135m"))
    n_linear = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    n_embd = model.model.embed_tokens.weight.numel()
    b = gguf_bytes_per_token(f32)
    assert quantise(f32, "float32") == f32  # F32 is the source itself
    assert b["tied_embedding"] and b["block_linears"] == 4 * n_linear and b["lm_head"] == 4 * n_embd
    assert b["total"] == b["block_linears"] + b["lm_head"]  # the tied embedding once, as the head
    q8 = quantise(f32, "q8_0")
    assert q8 == tmp_path / "cache" / "gguf" / "small.Q8_0.gguf" and q8.is_file() and not list(q8.parent.glob(".*.part"))
    b8 = gguf_bytes_per_token(q8)
    assert b8["block_linear_types"] == ["Q8_0"] and b8["block_linears"] == n_linear // 32 * 34  # int8 + fp16 scale
    q4 = gguf_bytes_per_token(quantise(f32, "q4_0"))
    assert q4["block_linear_types"] == ["Q4_0"] and q4["block_linears"] == n_linear // 32 * 18  # 16 B codes + scale
    assert q4["lm_head"] == sum(v for k, v in q4["bytes_by_type"].items() if k != "Q4_0")  # its own head format
    assert quantise(f32, "q8_0") == q8  # cached


@pytest.mark.slow  # calibrates and times seven engines on a tiny random LLaMA: ~1-2 min on 2 busy cores
def test_bench_decode_runs_llama_cpp_q4_0_beside_the_q4_engines(tmp_path):
    import json

    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional build (see the README)")
    from actsparse.cli import main

    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--models", "llama-tiny", "--dtypes", "float32", "--weights", "fp32,q4",
                 "--threads", "1", "--repeats", "1", "--new-tokens", "3", "--prompt-tokens", "4",
                 "--calib-tokens", "512", "--llama-cpp", "on", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    g = json.loads(out.read_text())["groups"][0]
    assert g["llama_cpp"]["format"] == "F32" and g["llama_cpp"]["gguf"].startswith("random-llama-tiny-seed0-")
    q = g["quantized"]["q4"]
    llama = q["llama_cpp"]
    assert llama["engine"] == "llama-cpp-q4_0" and llama["format"] == "Q4_0" and "llama-cpp-q4_0" in q["engines"]
    assert llama["bytes_per_token"]["block_linear_types"] == ["Q4_0"]
    assert llama["fast_sparse_vs_llama_cpp"] == pytest.approx(
        q["engines"]["fast-sparse-q4"]["median"] / q["engines"]["llama-cpp-q4_0"]["median"])
    assert llama["effective_GBps"] == pytest.approx(
        q["engines"]["llama-cpp-q4_0"]["median"] * llama["bytes_per_token"]["total"] / 1e9)
