"""The machine's streaming read bandwidth, measured beside the decode engines.

Batch-1 decoding reads every weight once per token, so no engine can go faster than the
bytes per token divided by the rate at which the cores can stream memory. Timing a plain
read of a buffer far larger than the last-level cache, interleaved with the engines in the
same run, gives that roof for the same threads and the same moment: an engine's GB/s over
it is how close to the hardware it runs, and the roof over the Hugging Face engine's GB/s is
the most any engine reading the same bytes can gain over it.
"""
from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

from actsparse.kernels.primitives import JIT, chunk

READ_MIB = 512  # far above any L3 here (32 MiB per CCD on the EPYC, 2.5 MiB per core on the Xeons)


@njit(**JIT)
def _sum_range(a, lo, hi):
    # a slice, not range(lo, hi): with a start numba cannot prove non-negative, every index
    # gets a wraparound test and the loop runs ~7x slower (measured here)
    b = a[lo:hi]
    s = np.float32(0.0)
    for i in range(b.shape[0]):  # fastmath: a vectorised reduction, one sequential stream
        s += b[i]
    return s


@njit(parallel=True, **JIT)
def _read_sum(a, nthreads):
    parts = np.zeros(nthreads, np.float32)
    for t in prange(nthreads):
        lo, hi = chunk(t, nthreads, a.size)
        parts[t] = _sum_range(a, lo, hi)
    return parts.sum()


class ReadProbe:
    """``probe()`` reads the whole buffer once with ``threads`` numba threads and returns GB/s."""

    def __init__(self, threads: int, mib: int = READ_MIB):
        import numba

        self.threads = threads
        self.buf = np.ones(mib * 2**20 // 4, np.float32)
        numba.set_num_threads(threads)
        _read_sum(self.buf[:1024], threads)  # compile

    def __call__(self) -> float:
        import numba

        numba.set_num_threads(self.threads)
        t0 = time.perf_counter()
        total = _read_sum(self.buf, self.threads)
        dt = time.perf_counter() - t0
        if abs(total - self.buf.size) > 1e-3 * self.buf.size:  # every element read once, none twice
            raise RuntimeError(f"bandwidth probe summed {total}, expected {self.buf.size}")
        return self.buf.nbytes / dt / 1e9
