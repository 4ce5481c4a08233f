"""Data parallelism with ``torch.distributed``: shards of windows, exact merges of statistics.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_from_env` joins the process group (gloo
on CPU, NCCL when every rank has a GPU). Each rank runs a contiguous block of whole batches
(:func:`shard_batches`, the same batches a single process would form, so every activation is
computed on the same inputs and shapes); the statistics are then merged:

* :class:`~actsparse.measure.accumulators.SiteStats` are sums and counts: one all-reduce of
  the int64 fields (exact) and one of the float64 fields (equal up to float summation order);
  quantile thresholds are read from the merged histograms afterwards;
* row samples (a bounded sample of token rows) are gathered in rank order; each rank knows
  how many rows the earlier ranks kept (a function of the batches' token counts, see
  :func:`rows_kept_before`), so the concatenation is the sample one process keeps;
* lists (per-window NLLs) are gathered in rank order, so they equal the one-process list.

Before any merge, :func:`check_same` compares a small description of every rank's run
(config, model identity, data, and the keys and shapes of the statistics) and raises a
:class:`~actsparse.errors.ConfigError` naming the rank and the field that differ. No pickle:
descriptions travel as UTF-8 JSON in uint8 tensors.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from datetime import timedelta

import torch

from actsparse.errors import ConfigError, DataError
from actsparse.measure.accumulators import SiteStats

DEFAULT_TIMEOUT_S = 1800  # a rank that died leaves the others waiting at most this long (ACTSPARSE_DIST_TIMEOUT)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (``size == 1``: a single process)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def init_from_env(backend: str | None = None) -> World:
    """The world ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``/``PORT``);
    joins the process group when there is more than one rank. Without torchrun: one process."""
    import torch.distributed as dist

    size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} do not describe a world (need 0 <= RANK < WORLD_SIZE)")
    if size == 1:
        return SINGLE
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process (without torchrun)")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        timeout = timedelta(seconds=_env_int("ACTSPARSE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend=backend, rank=rank, world_size=size, timeout=timeout)
    return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())


def current() -> World:
    """The world of an already-initialised process group (one process otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return SINGLE


def _device(world: World) -> torch.device:
    if world.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- shards
def shard_range(n_batches: int, world: World, *, what: str = "batches", detail: str = "") -> range:
    """The contiguous block of batch indices of ``world.rank``: batches ``[r*n//W, (r+1)*n//W)``.
    Refuses a world in which some rank would get nothing."""
    if n_batches < world.size:
        raise DataError(
            f"{n_batches} {what} for {world.size} ranks: every rank needs at least one "
            f"({detail or 'give more tokens, a smaller --batch-size, or fewer ranks (--nproc-per-node)'})")
    lo = world.rank * n_batches // world.size
    hi = (world.rank + 1) * n_batches // world.size
    return range(lo, hi)


def shard_batches(windows, batch_size: int, world: World):
    """``(windows of this rank, batch indices)``: whole batches of ``windows`` (in the order
    ``windows.batches(batch_size)`` forms them), a contiguous block per rank. Every rank gets
    at least one batch, or a :class:`DataError` gives the counts."""
    n = windows.num_batches(batch_size)
    idx = shard_range(n, world, detail=f"{len(windows)} windows in batches of {batch_size}: give more tokens, "
                                       f"a smaller --batch-size, or fewer ranks")
    lo, hi = idx.start * batch_size, min(idx.stop * batch_size, len(windows))
    return _slice_windows(windows, lo, hi), idx


def _slice_windows(windows, lo: int, hi: int):
    from dataclasses import replace

    return replace(windows, input_ids=windows.input_ids[lo:hi], attention_mask=windows.attention_mask[lo:hi])


def batch_tokens(windows, batch_size: int) -> list[int]:
    """Real (unmasked) tokens of each batch, in batch order."""
    return [int(windows.attention_mask[i:i + batch_size].sum()) for i in range(0, len(windows), batch_size)]


def rows_kept_before(tokens_per_call: list[int], rows: int, total: int) -> int:
    """Rows a row-sampling probe (``rows`` of ``total`` tokens, see ``capture``) has kept after
    the calls of ``tokens_per_call``: what the ranks before this one kept."""
    have = 0
    for n in tokens_per_call:
        quota = math.ceil(n * min(1.0, rows / max(total, 1)))
        have += max(0, min(quota, rows - have, n))
    return have


# ---------------------------------------------------------------- collectives
def _gather_bytes(data: bytes, world: World) -> list[bytes]:
    import torch.distributed as dist

    dev = _device(world)
    length = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    lengths = [torch.zeros_like(length) for _ in range(world.size)]
    dist.all_gather(lengths, length)
    longest = max(int(n) for n in lengths)
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.zeros_like(buf) for _ in range(world.size)]
    dist.all_gather(bufs, buf)
    return [bytes(b[:int(n)].cpu().tolist()) for b, n in zip(bufs, lengths)]


def gather_json(obj, world: World) -> list:
    """``obj`` (JSON-able) of every rank, in rank order."""
    if not world.active:
        return [obj]
    return [json.loads(b.decode("utf-8")) for b in _gather_bytes(json.dumps(obj, sort_keys=True).encode(), world)]


def _flat(d, prefix=""):
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_same(description: dict, world: World, *, what: str = "run") -> None:
    """Refuse a world whose ranks describe different runs: raises :class:`ConfigError` on every
    rank, naming the first differing field and the ranks' values."""
    if not world.active:
        return
    docs = gather_json(description, world)
    ref = _flat(docs[0])
    for r, doc in enumerate(docs[1:], 1):
        other = _flat(doc)
        for key in sorted(set(ref) | set(other)):
            if ref.get(key) != other.get(key):
                a, b = _short(ref.get(key)), _short(other.get(key))
                raise ConfigError(
                    f"the ranks of this torchrun world do not run the same {what}: {key} is {a} on rank 0 but "
                    f"{b} on rank {r}; start every rank with the same command line, model and data")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:100] + f"... (sha1 {hashlib.sha1(s.encode()).hexdigest()[:12]})"


def describe_stats(stats: dict) -> dict:
    """Keys, kinds and shapes of a statistics dict (what must agree before a merge)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, SiteStats):
            out[k] = {"kind": "stats", "width": v.width, "eps": list(v.eps)}
        elif isinstance(v, torch.Tensor):
            out[k] = {"kind": "rows", "width": int(v.shape[-1]) if v.ndim == 2 else None, "dtype": str(v.dtype)}
        else:
            out[k] = {"kind": type(v).__name__}
    return out


_SCALARS = ("rows", "nonfinite", "pairs")


def _tensor_fields(st: SiteStats):
    ints, floats = [], []
    for f in fields(st):
        v = getattr(st, f.name)
        if isinstance(v, torch.Tensor):
            (floats if v.dtype.is_floating_point else ints).append(f.name)
    return ints, floats


def all_reduce_stats(stats: dict, world: World, *, description: dict | None = None) -> dict:
    """Merge the statistics of every rank (in place for SiteStats; gathered row samples are new
    tensors). All ranks must hold the same keys (checked first, with ``description`` merged
    into the check: the config and model identity). Returns the merged dict."""
    import torch.distributed as dist

    if not world.active:
        return stats
    check_same({"statistics": describe_stats(stats), **(description or {})}, world, what="calibration")
    dev = _device(world)
    keys = [k for k in stats if isinstance(stats[k], SiteStats)]
    if keys:
        int_parts, float_parts = [], []
        for k in keys:
            st = stats[k]
            ints, floats = _tensor_fields(st)
            int_parts += [torch.tensor([getattr(st, n) for n in _SCALARS], dtype=torch.int64)]
            int_parts += [getattr(st, n).reshape(-1).to(torch.int64) for n in ints]
            float_parts += [getattr(st, n).reshape(-1).to(torch.float64) for n in floats]
        ibuf = torch.cat(int_parts).to(dev)
        fbuf = torch.cat(float_parts).to(dev)
        dist.all_reduce(ibuf)  # int64 sums: exact
        dist.all_reduce(fbuf)
        ibuf, fbuf = ibuf.cpu(), fbuf.cpu()
        io = fo = 0
        for k in keys:
            st = stats[k]
            ints, floats = _tensor_fields(st)
            for n in _SCALARS:
                setattr(st, n, int(ibuf[io]))
                io += 1
            for n in ints:
                t = getattr(st, n)
                setattr(st, n, ibuf[io:io + t.numel()].reshape(t.shape).clone())
                io += t.numel()
            for n in floats:
                t = getattr(st, n)
                setattr(st, n, fbuf[fo:fo + t.numel()].reshape(t.shape).clone())
                fo += t.numel()
    for k, v in stats.items():
        if isinstance(v, torch.Tensor):
            stats[k] = gather_rows(v, world)
    return stats


def gather_rows(rows: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``(n_r, width)`` rows concatenated in rank order (``n_r`` may differ)."""
    import torch.distributed as dist

    dev = _device(world)
    rows = rows.contiguous()
    n = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(n) for _ in range(world.size)]
    dist.all_gather(counts, n)
    longest = max(int(c) for c in counts)
    buf = torch.zeros((longest,) + tuple(rows.shape[1:]), dtype=rows.dtype, device=dev)
    buf[:rows.shape[0]] = rows.to(dev)
    bufs = [torch.zeros_like(buf) for _ in range(world.size)]
    dist.all_gather(bufs, buf)
    return torch.cat([b[:int(c)].cpu() for b, c in zip(bufs, counts)])


def gather_list(values: list, world: World, dtype=torch.float64) -> list:
    """A per-rank list of numbers, concatenated in rank order (exactly: float64 / int64)."""
    if not world.active:
        return list(values)
    t = torch.tensor(values, dtype=dtype).reshape(-1, 1)
    return gather_rows(t, world).reshape(-1).tolist()


def all_reduce_ints(values: list[int], world: World) -> list[int]:
    import torch.distributed as dist

    if not world.active or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_device(world))
    dist.all_reduce(t)
    return [int(v) for v in t.cpu().tolist()]


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.active:
        dist.barrier()


def finish(world: World) -> None:
    """Leave the process group (after the last collective of a command)."""
    import torch.distributed as dist

    if world.active and dist.is_initialized():
        dist.destroy_process_group()
