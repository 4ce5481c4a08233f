"""The typed decode plan: built from the site map and the sparse modules, grouped kernel
arguments, an explicit weight format, clear refusals."""
import numpy as np
import pytest
import torch

from actsparse.decode.codes import Mode, Role
from actsparse.decode.plan import DecodePlan
from actsparse.errors import UnsupportedError
from actsparse.kernels.formats import WeightFormat
from actsparse.sparsify.modules import MaskedLinear

from test_fast_decoder import install, tiny_llama


def test_modes_follow_the_sparse_modules():
    model = tiny_llama()
    assert (DecodePlan.from_model(model).modes() == Mode.DENSE).all()
    install(model, "shared", np.random.default_rng(0))
    plan = DecodePlan.from_model(model)
    modes = plan.modes()
    assert (modes[:, [Role.Q, Role.O, Role.GATE, Role.DOWN]] == Mode.THRESHOLD).all()
    assert (modes[:, [Role.K, Role.V, Role.UP]] == Mode.FUSED).all()
    assert plan.layers[0].linears[Role.Q].group == (Role.Q, Role.K, Role.V)
    assert plan.layers[0].linears[Role.Q].path == "model.layers.0.self_attn.q_proj"  # from the site map
    assert (DecodePlan.from_model(model, dense=True).modes() == Mode.DENSE).all()


def test_activation_site_makes_down_skip_zeros():
    model = tiny_llama()
    install(model, "act_topk", np.random.default_rng(0))
    plan = DecodePlan.from_model(model)
    assert (plan.act_modes() == Mode.TOPK).all()
    assert (plan.modes()[:, Role.DOWN] == Mode.THRESHOLD).all()
    assert plan.layers[0].linears[Role.DOWN].test.threshold.tolist() == [0.0]
    assert plan.sparse_roles()["mlp.act"] == 2


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, WeightFormat.F32), (torch.bfloat16, WeightFormat.BF16)])
def test_kernel_arguments_are_grouped_and_tagged(dtype, fmt):
    model = tiny_llama().to(dtype)
    install(model, "scalar", np.random.default_rng(1))
    plan = DecodePlan.from_model(model)
    args, keep, copy_bytes = plan.kernel_args(max_len=8)
    assert plan.fmt == fmt and (args.weights.fmt == int(fmt)).all()
    n = plan.num_layers * len(Role)
    assert len(args.weights.w) == len(args.weights.wt) == len(args.tests.thr) == n
    assert args.weights.wt[0].dtype == (np.uint16 if dtype == torch.bfloat16 else np.float32)
    assert args.rope.cos.shape == (1, 8, plan.head_dim) and args.attn.n_heads == 6 and (args.attn.window == 0).all()
    masked = [m.weight for m in model.modules() if isinstance(m, MaskedLinear)]
    assert len(masked) == n and copy_bytes == sum(w.numel() * w.element_size() for w in masked)


def test_unsupported_models_are_refused_up_front():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedError, match="LLaMA-style"):
        DecodePlan.from_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    with pytest.raises(UnsupportedError, match="fp32 or bf16"):
        DecodePlan.from_model(tiny_llama().to(torch.float16))
