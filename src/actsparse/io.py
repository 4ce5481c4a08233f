"""Atomic writes for JSON, text and safetensors: a reader never sees a half-written file."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: str | os.PathLike, write) -> Path:
    """Write through a temporary file in the same folder, then rename it over ``path``.
    The file gets the usual permissions (0666 less the umask; mkstemp alone gives 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _jsonable(obj: Any) -> Any:
    """Make floats JSON-safe (NaN/inf become strings) and numpy scalars plain."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = json.dumps(_jsonable(obj), indent=2, sort_keys=False).encode() + b"\n"
    return _atomic(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode()
    return _atomic(path, lambda fh: fh.write(data))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data))


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    return _atomic(path, lambda fh: fh.write(data))


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as fh:
        return json.load(fh)
