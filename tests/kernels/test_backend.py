"""The numba backend: one enable switch, compiled code cached under $ACTSPARSE_CACHE (never
inside the package), a cache key that changes with the kernel sources."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import actsparse
from actsparse import numba_backend

PACKAGE = Path(actsparse.__file__).parent


@pytest.mark.parametrize("value,disabled", [("", False), ("0", False), ("false", False), ("1", True), ("yes", True),
                                            ("on", True), ("TRUE", True)])
def test_one_disable_switch(monkeypatch, value, disabled):
    monkeypatch.setenv("ACTSPARSE_DISABLE_NUMBA", value)
    from actsparse.measure import fused
    from actsparse.kernels import dispatch

    assert numba_backend.numba_enabled() is (not disabled)
    assert fused.numba_enabled() is (not disabled)
    assert dispatch.numba_enabled() is (not disabled)


def test_compiled_code_goes_under_the_cache_dir(tmp_path):
    """A fresh process with its own ACTSPARSE_CACHE compiles the measure kernel (imported
    first, without the kernels package) and a GEMV: the cache files land there."""
    env = dict(os.environ, ACTSPARSE_CACHE=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    before = set(PACKAGE.rglob("*.nbi"))
    code = ("import torch\nfrom actsparse.measure.accumulators import SiteStats\n"
            "SiteStats(8).update(torch.randn(4, 8), backend='numba')\n"
            "from actsparse.kernels import sparse_input_gemv, to_kernel_layout\n"
            "sparse_input_gemv(torch.randn(8), to_kernel_layout(torch.randn(3, 8)), 0.5)\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    cached = list((tmp_path / "numba").rglob("*.nbi"))
    assert cached, "no numba cache files under $ACTSPARSE_CACHE/numba"
    assert all(numba_backend._sources_key() in str(p) for p in cached)
    assert set(PACKAGE.rglob("*.nbi")) == before, "numba cached code inside the package"
