"""The one timing harness of the benchmarks: interleaved repeats, spreads, cache flushes,
and the clock for Hugging Face ``generate``.

This machine is shared and noisy (benchmarks.md): a figure is a ratio of medians measured
in the same run with the implementations interleaved in a fresh random order in every
repeat, so slow drifts hit them all alike.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import numpy as np


def interleaved(runs: dict[str, Callable[[], float | None]], repeats: int, *, rng: random.Random,
                before: Callable[[], None] | None = None, after: Callable[[str], None] | None = None) -> dict:
    """Call every runner ``repeats`` times, in a fresh random order per repeat.

    A runner returns its own measurement (e.g. tokens/s), or None to be measured by the
    wall-clock seconds of the call. ``before()`` runs before each call, untimed (a cache
    flush); ``after(name)`` after it (a progress bar). Returns ``{name: [measurements]}``."""
    out = {k: [] for k in runs}
    keys = list(runs)
    for _ in range(repeats):
        rng.shuffle(keys)
        for k in keys:
            if before is not None:
                before()
            t0 = time.perf_counter()
            value = runs[k]()
            elapsed = time.perf_counter() - t0
            out[k].append(elapsed if value is None else float(value))
            if after is not None:
                after(k)
    return out


def spread(xs) -> dict:
    """Median, p10, p90 and inter-quartile range of ``xs``."""
    a = np.asarray(xs, float)
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"median": float(p50), "p10": float(p10), "p90": float(p90), "iqr": float(p75 - p25)}


class Flusher:
    """Read a buffer larger than the last-level cache (evicts the weights). numpy's
    single-threaded sum, so neither torch's nor numba's thread pool is woken by it."""

    def __init__(self, mb: int):
        self.buf = np.ones(max(1, mb) * 2**20 // 4, dtype=np.float32)
        self.mb = mb

    def __call__(self):
        if self.mb > 0:
            self.buf.sum()


class GenerateClock:
    """A ``generate(streamer=...)`` object: timestamps each put (the prompt first, then each
    new token) and passes new token ids to ``on_token``."""

    def __init__(self, on_token=None):
        self.times: list[float] = []
        self.on_token = on_token

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > 1 and self.on_token is not None:
            for t in value.reshape(-1).tolist():
                self.on_token(t)

    def end(self) -> None:
        pass

    @property
    def prefill_s(self) -> float:
        """Prompt to first new token."""
        return self.times[1] - self.times[0] if len(self.times) > 1 else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: the tokens after the first new one."""
        t = self.times[1:]
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else math.nan
