"""One-pass numba reduction of a site tensor into SiteStats fields.

The torch path in :mod:`actsparse.measure.accumulators` issues a dozen full-tensor ops
per hook call; this kernel reads each value once, so capture stays cheap next to the
forward pass. Columns (neurons) are split into chunks across threads; each chunk owns
its columns and its own histogram, so there are no races. It is tested against the
torch path, which stays the fallback (``ACTSPARSE_DISABLE_NUMBA=1`` or numba missing).
"""
from __future__ import annotations

import numpy as np
import torch

from actsparse.measure import histogram as hist
from actsparse.numba_backend import numba_enabled  # noqa: F401  (the switch accumulators ask)


def _kernel():
    from actsparse.measure._fused_numba import reduce_site

    return reduce_site


def reduce_into(st, v, valid, *, temporal: bool, flow_threshold: float) -> None:
    """Fold ``v`` (batch, time, width) float32 with ``valid`` (batch, time) bool into ``st``."""
    v = np.ascontiguousarray(v, dtype=np.float32)
    valid = np.ascontiguousarray(valid, dtype=np.bool_)
    from actsparse.measure._fused_numba import CHUNK

    n_chunks = -(-st.width // CHUNK)
    hist_chunks = np.zeros((n_chunks, hist.HIST_BINS), dtype=np.int64)
    bad_chunks = np.zeros(n_chunks, dtype=np.int64)
    views = {name: getattr(st, name).numpy() for name in (
        "count", "nonzero", "positive", "le_eps", "abs_sum", "sum", "sq_sum", "pos_sum", "pos_sq_sum",
        "delta_zero", "delta_le_eps", "flow_active", "both_active")}
    _kernel()(v, v.view(np.int32), valid, temporal, np.float32(flow_threshold),
              np.asarray(st.eps, dtype=np.float32), hist.SHIFT, hist.BASE - 1, hist.HIST_BINS,
              views["count"], views["nonzero"], views["positive"], views["le_eps"], views["abs_sum"],
              views["sum"], views["sq_sum"], views["pos_sum"], views["pos_sq_sum"], hist_chunks,
              views["delta_zero"], views["delta_le_eps"], views["flow_active"], views["both_active"], bad_chunks)
    st.hist += torch.from_numpy(hist_chunks.sum(0))
    st.nonfinite += int(bad_chunks.sum())
    st.rows += int(valid.sum())
    if temporal and v.shape[1] > 1:
        st.pairs += int((valid[:, 1:] & valid[:, :-1]).sum())


def reduce_light_into(st, v, valid, scale=None) -> None:
    """Fold ``v`` (batch, time, width) float32 at the ``valid`` (batch, time) tokens into the
    light fields of ``st`` (see ``SiteStats.update_light``), optionally of ``|v| * scale``."""
    from actsparse.measure._fused_numba import CHUNK, reduce_light

    v = np.ascontiguousarray(v, dtype=np.float32)
    valid = np.ascontiguousarray(valid, dtype=np.bool_)
    n_chunks = -(-st.width // CHUNK)
    hist_chunks = np.zeros((n_chunks, hist.HIST_BINS), dtype=np.int64)
    bad_chunks = np.zeros(n_chunks, dtype=np.int64)
    sc = np.ones(1, np.float32) if scale is None else np.ascontiguousarray(scale, dtype=np.float32)
    reduce_light(v, valid, sc, scale is not None, hist.SHIFT, hist.BASE - 1, hist.HIST_BINS, st.count.numpy(),
                 st.nonzero.numpy(), st.abs_sum.numpy(), hist_chunks, bad_chunks)
    st.hist += torch.from_numpy(hist_chunks.sum(0))
    st.nonfinite += int(bad_chunks.sum())
    st.rows += int(valid.sum())
