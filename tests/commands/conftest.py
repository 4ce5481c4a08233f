import pytest
import torch


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Commands run in-process here and set torch's threads (--threads, prune's default 1):
    put them back so later tests see the session's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
