import pytest

from sparsify_helpers import random_windows, tiny_llama


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def tiny_stats():
    from actsparse.sparsify import CATS, CETT, CHESS, TEAL, TopK, WINA, calibrate

    model = tiny_llama()
    cal = random_windows()
    cfgs = [TEAL(), CATS(), CHESS(selective=True), TopK(), WINA(), CETT(sample_tokens=256)]
    return model, cal, calibrate(model, cfgs, cal)
