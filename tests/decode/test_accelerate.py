"""accelerate_: kernel-backed linears equal the masked modules they replace."""
import numpy as np
import pytest
import torch

import actsparse as asp
from actsparse.decode import accelerate_, deaccelerate_
from actsparse.decode.accelerate import KernelLinear, ZeroSkipLinear
from actsparse.errors import StateError
from actsparse.sparsify.modules import MaskedLinear, ThresholdedActivation

from test_fast_decoder import install, tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["scalar", "per_channel", "topk"])
def test_kernel_linear_equals_masked_linear(mode, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(300, 77, bias=True).to(dtype)
    if mode == "scalar":
        m = MaskedLinear(lin, 0.4)
    elif mode == "per_channel":
        m = MaskedLinear(lin, torch.rand(300))
    else:
        m = MaskedLinear(lin, mode="topk", k=90)
    k = KernelLinear(m)
    for shape in [(300,), (1, 1, 300), (3, 300), (2, 5, 300)]:  # single tokens take the kernel
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            want, got = m(x), k(x)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert k.zeros > 0 and k.entries == m.entries


def test_zero_skip_linear_is_the_linear():
    torch.manual_seed(1)
    lin = torch.nn.Linear(128, 40)
    z = ZeroSkipLinear(lin)
    x = torch.randn(128) * (torch.rand(128) > 0.6)
    torch.testing.assert_close(z(x[None, None]), lin(x[None, None]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["scalar", "per_channel", "act", "act_topk"])
def test_generate_after_accelerate_matches_and_desparsify_restores(kind):
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules()}
    install(model, kind, np.random.default_rng(5))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    report = accelerate_(model)
    assert report.transposed_copy_bytes > 0 and report.copy_overhead > 0
    if kind.startswith("act"):
        assert report.zero_skip_linears == 2 and isinstance(model.model.layers[0].mlp.down_proj, ZeroSkipLinear)
    else:
        assert report.kernel_linears == 14
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert got.tolist() == ref.tolist()
    with pytest.raises(StateError, match="already accelerated"):
        accelerate_(model)
    asp.desparsify_(model)
    for n, m in model.named_modules():
        assert originals[n] is m
    assert not any(isinstance(m, (MaskedLinear, ThresholdedActivation)) for m in model.modules())


def test_accelerate_needs_a_sparsified_model():
    with pytest.raises(StateError, match="no sparse modules"):
        accelerate_(tiny_llama())
    deaccelerate_(tiny_llama())  # no-op
