"""Timing (and streaming) of Hugging Face ``model.generate`` through its streamer hook."""
from __future__ import annotations

import math
import time


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
