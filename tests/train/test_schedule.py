import math

import pytest

from actsparse.errors import ConfigError
from actsparse.train.schedule import Constant, LinearDecay, ProSparse, schedule_from_dict


def test_prosparse_boundaries_and_midpoints():
    s = ProSparse(lambdas=(1.0, 3.0, 3.0, 7.0), steps=(10, 20, 30, 50))
    # warm-up
    assert s(0) == 1.0 and s(9) == 1.0
    # start of stage 1 (eta = 0), midpoint (eta = 1/2), end
    assert s(10) == pytest.approx(1.0)
    assert s(15) == pytest.approx(2.0)
    assert s(20) == pytest.approx(3.0)
    # a quarter: eta = (sin(-pi/4) + 1) / 2
    assert s(12.5) == pytest.approx(1.0 + 2.0 * (math.sin(-math.pi / 4) + 1) / 2)
    # flat stage
    assert s(25) == pytest.approx(3.0) and s(29) == pytest.approx(3.0)
    # last stage midpoint and after
    assert s(40) == pytest.approx(5.0)
    assert s(50) == 7.0 and s(10_000) == 7.0
    # monotone within rises
    vals = [s(t) for t in range(60)]
    assert all(b >= a - 1e-12 for a, b in zip(vals, vals[1:]))


def test_single_stage_and_zero_warmup():
    assert ProSparse(lambdas=(0.5,), steps=(0,))(0) == 0.5
    s = ProSparse(lambdas=(0.0, 2.0), steps=(0, 4))
    assert s(0) == 0.0 and s(2) == pytest.approx(1.0) and s(4) == 2.0


def test_round_trip_and_strict():
    s = ProSparse(lambdas=(1e-4, 2e-4), steps=(5, 10))
    d = s.to_dict()
    assert d["kind"] == "prosparse" and d["lambdas"] == [1e-4, 2e-4]
    assert schedule_from_dict(d) == s and ProSparse.from_dict(d) == s
    for sched in (Constant(0.3), LinearDecay(0.5, 100)):
        assert schedule_from_dict(sched.to_dict()) == sched
    with pytest.raises(ConfigError, match="unknown key"):
        schedule_from_dict({**d, "bogus": 1})
    with pytest.raises(ConfigError, match="version"):
        schedule_from_dict({**d, "version": 99})
    with pytest.raises(ConfigError, match="kind"):
        schedule_from_dict({"kind": "cosine"})


@pytest.mark.parametrize("kwargs,match", [
    ({"lambdas": (1.0, 2.0), "steps": (10, 10)}, "strictly increase"),
    ({"lambdas": (1.0, 2.0), "steps": (10, 5)}, "strictly increase"),
    ({"lambdas": (1.0, -2.0), "steps": (1, 5)}, ">= 0"),
    ({"lambdas": (1.0,), "steps": (1, 5)}, "one end step per lambda"),
    ({"lambdas": (), "steps": ()}, "at least one"),
    ({"lambdas": (float("nan"),), "steps": (0,)}, "finite"),
    ({"lambdas": (1.0,), "steps": (-1,)}, ">= 0"),
])
def test_bad_stages(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ProSparse(**kwargs)


def test_constant_negative_and_decay():
    with pytest.raises(ConfigError):
        Constant(-1.0)
    d = LinearDecay(0.5, 10)
    assert d(0) == 0.5 and d(5) == pytest.approx(0.25) and d(10) == 0.0 and d(20) == 0.0
    assert LinearDecay(0.5, 0)(0) == 0.0


def test_even_schedule():
    s = ProSparse.even(1e-3, 100, stages=4)
    assert s.lambdas[-1] == pytest.approx(1e-3) and s.lambdas[0] == pytest.approx(1.25e-4)
    assert s.steps[0] == 10 and s.steps[-1] == 82
    assert s(0) == pytest.approx(1.25e-4) and s(99) == pytest.approx(1e-3)
    assert ProSparse.even(1e-3, 2, stages=4) == ProSparse(lambdas=(1e-3,), steps=(0,))
