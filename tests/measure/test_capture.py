"""Capture sessions own their hooks and reduce exactly what the model computes."""
import numpy as np
import pytest
import torch
from torch import nn

from actsparse.measure import capture, metrics


class TinyReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_matches_manual_relu_outputs():
    torch.manual_seed(0)
    model = TinyReLU()
    x = torch.randn(2, 5, 4)
    with capture(model, sites=["act", "fc2:input"]) as cap:
        model(x)
    stats = cap.stats()
    h = model.act(model.fc1(x)).detach().reshape(-1, 8).numpy()
    assert set(stats) == {"act:output", "fc2:input"}
    for st in stats.values():
        assert metrics.zero_sparsity(st) == pytest.approx(np.mean(h == 0))
        np.testing.assert_array_equal(st.nonzero.numpy(), (h != 0).sum(0))


def test_hooks_removed_on_exit_and_error_user_hooks_kept():
    model = TinyReLU()
    user = model.act.register_forward_hook(lambda *a: None)
    base = _hook_count(model)
    with capture(model, sites="act"):
        assert _hook_count(model) > base
    assert _hook_count(model) == base
    with pytest.raises(RuntimeError):
        with capture(model, sites="act"):
            raise RuntimeError("boom")
    assert _hook_count(model) == base
    assert user.id in model.act._forward_hooks
    user.remove()


def test_nested_sessions_are_independent():
    model = TinyReLU()
    x = torch.randn(3, 4)
    with capture(model, sites="act") as outer:
        model(x)
        with capture(model, sites="act") as inner:
            model(x)
        model(x)
    assert outer.stats()["act:output"].rows == 9
    assert inner.stats()["act:output"].rows == 3
    assert _hook_count(model) == 0


def test_padding_excluded_through_attention_mask():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, input_ids, attention_mask=None):
            return self.act(input_ids.float()[..., None].repeat(1, 1, 2) - 1)

    model = Seq()
    ids = torch.tensor([[3, 2, 0, 0], [2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with capture(model, sites="act") as cap:
        model(ids, attention_mask=mask)
    st = cap.stats()["act:output"]
    assert st.rows == 6
    assert metrics.zero_sparsity(st) == 0.0  # padded tokens (value -1 -> 0) are not counted


def test_conv_outputs_reduce_per_channel():
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
    x = torch.randn(2, 1, 4, 4)
    with capture(model, sites="1") as cap:
        y = model(x)
    st = cap.stats()["1:output"]
    assert st.width == 3 and st.rows == 2 * 16
    np.testing.assert_array_equal(st.nonzero.numpy(), (y != 0).sum((0, 2, 3)).numpy())


def test_unknown_site_names_the_fix():
    with pytest.raises(KeyError, match="module path"):
        capture(TinyReLU(), sites="mlp.down:input")


def test_unknown_site_is_a_config_error_printed_as_its_message():
    """Before: a bare KeyError, printed with quotes around the whole message."""
    from actsparse.errors import ConfigError
    from actsparse.measure.capture import resolve_sites

    with pytest.raises(ConfigError) as err:
        resolve_sites(TinyReLU(), ["mlp.foo"])
    assert isinstance(err.value, KeyError) and str(err.value).startswith("unknown site 'mlp.foo'")
