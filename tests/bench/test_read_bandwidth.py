"""The read-bandwidth probe reads every element once, on 1 and 2 threads."""
import numpy as np
import pytest

from actsparse.bench import bandwidth
from actsparse.kernels import numba_enabled

pytestmark = pytest.mark.skipif(not numba_enabled(), reason="numba kernels disabled or missing")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [1, 63, 1000, 4097])
def test_read_sum_covers_every_element_once(threads, n):
    a = np.arange(n, dtype=np.float32) % 7  # exact in fp32 for these sizes
    assert bandwidth._read_sum(a, threads) == pytest.approx(float(a.sum()), rel=1e-6)


def test_probe_reports_positive_bandwidth():
    probe = bandwidth.ReadProbe(1, mib=8)
    assert probe.buf.nbytes == 8 * 2**20
    assert probe() > 0
