"""The numba backend: whether it may be used, where it caches compiled code, its threads.

Every module that compiles numba code imports this module before ``numba``::

    import actsparse.numba_backend  # noqa: F401  (cache directory set before numba loads)

so compiled kernels are cached under ``<cache dir>/numba/<key>`` (see
:mod:`actsparse.cache`), never inside the package. The key hashes the source of every
module of the package that imports numba: numba checks only the timestamp of the file
that defines a function, not of the files it calls into, so a changed primitive would
otherwise be served stale from the cache. ``ACTSPARSE_DISABLE_NUMBA=1`` (or true/yes/on) switches every
numba path off: the pure-torch references run instead.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from actsparse.cache import cache_dir
from actsparse.version import __version__

_FALSE = ("", "0", "false", "no", "off")


def _sources_key() -> str:
    h = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        text = path.read_bytes()
        if b"from numba" in text or b"import numba" in text:
            h.update(path.name.encode() + text)
    return h.hexdigest()[:12]


def numba_cache_dir() -> str:
    return str(cache_dir() / "numba" / _sources_key())


def _point_cache() -> None:
    """Cache numba's compiled code under actsparse's cache dir unless the user chose a place."""
    if "NUMBA_CACHE_DIR" not in os.environ:
        os.environ["NUMBA_CACHE_DIR"] = numba_cache_dir()
    numba = sys.modules.get("numba")
    if numba is not None and not getattr(numba.config, "CACHE_DIR", ""):
        numba.config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]  # numba was imported before actsparse


_point_cache()


def disabled_by_env() -> bool:
    return os.environ.get("ACTSPARSE_DISABLE_NUMBA", "").strip().lower() not in _FALSE


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def numba_enabled() -> bool:
    """True when numba code may run: numba imports and ``ACTSPARSE_DISABLE_NUMBA`` is not set."""
    return not disabled_by_env() and numba_available()


_pool_started = False


def start_thread_pool() -> None:
    """Start numba's thread pool with a passive OpenMP wait policy (once).

    Numba's OpenMP pool is a second libgomp next to torch's. With the default policy the
    caller spins at the end of each parallel region; when another busy process (or torch's
    spinning pool) holds the other core, the woken worker waits a whole scheduler slice:
    measured here 15-18 ms per 2-thread call instead of 0.1 ms. Passive waiting lets the
    worker run on the caller's core. torch's own libgomp read its environment when torch was
    imported (before this), so it is not affected; the variable is set only while numba's
    pool starts, and only if the user did not set ``OMP_WAIT_POLICY`` (or
    ``ACTSPARSE_NUMBA_SPIN=1``). Starting the pool can reset torch's thread count: it is put back.
    """
    global _pool_started
    if _pool_started:
        return
    import torch

    torch_threads = torch.get_num_threads()
    spin = "OMP_WAIT_POLICY" in os.environ or os.environ.get("ACTSPARSE_NUMBA_SPIN") == "1"
    if not spin:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()
    except Exception:  # noqa: BLE001 - private API; the pool then starts on first use
        pass
    finally:
        if not spin:
            os.environ.pop("OMP_WAIT_POLICY", None)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        _pool_started = True


def kernel_threads() -> int:
    """Set numba's thread count to torch's (clamped to numba's pool) and return it."""
    import numba
    import torch

    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
