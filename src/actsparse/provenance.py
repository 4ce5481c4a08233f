"""Where a result came from: machine, CPU, versions, threads, git revision.

Every JSON a profile, a sweep or a benchmark writes carries one of these records, so a
figure can be compared only with figures from the same machine (see benchmarks.md).
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from actsparse.version import __version__

_HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def simd_features() -> list[str]:
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return [f for f in ("avx2", "fma", "avx512f", "avx512bf16", "avx512vnni", "amx-bf16") if feats.get(f)]
    except Exception:  # noqa: BLE001 - informative only
        return []


def git_hash(short: bool = True) -> str | None:
    """The checkout's revision (None outside a git checkout)."""
    cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=_HERE).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty(path: str = "src/actsparse") -> bool | None:
    """True if ``path`` (relative to the repository root) has uncommitted changes."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", path], capture_output=True, text=True,
                             timeout=10, cwd=_HERE.parent.parent)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions, CPU and threads: recorded with every profile and quality result."""
    import torch

    return {
        "actsparse": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": cpu_model(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def machine_info() -> dict:
    """The benchmark record: platform, CPU model and SIMD features, thread pools, git state, load."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "actsparse": __version__,
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "simd": simd_features(),
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_num_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        info["numba"] = None
    info["git"] = git_hash(short=False)
    info["git_dirty"] = git_dirty()
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info
