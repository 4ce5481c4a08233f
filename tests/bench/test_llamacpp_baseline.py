"""llama.cpp as a decode baseline runs the same weights: its greedy tokens are FastDecoder's.
Only where llama-cpp-python is installed (an optional build, never in CI)."""
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional build (see the README)")


def test_llama_cpp_decodes_the_same_weights_as_fastdecoder(smollm2):
    import torch

    from actsparse.bench.llamacpp import LlamaCppEngine, requantised
    from actsparse.decode import FastDecoder

    model, tok = smollm2
    ids = tok("The history of the city of Paris", return_tensors="pt").input_ids[0]
    gguf = requantised("smollm2-135m", "float32")
    assert gguf.name.endswith(".F32.gguf") and gguf.stat().st_size > 4 * 130e6
    engine = LlamaCppEngine(gguf, threads=1, max_len=64)
    theirs = []
    for t in engine.llm.generate([int(i) for i in ids], top_k=1, temp=0.0, reset=True):
        theirs.append(int(t))
        if len(theirs) == 12:
            break
    torch.set_num_threads(1)
    ours = FastDecoder(model, max_len=64, dense=True).generate(ids, 12).tokens
    assert list(ours) == theirs
    assert engine(ids, 8) > 0
