"""The hot loops must compile to packed fp32 FMAs on 256-bit registers (AVX2)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from actsparse.kernels import numba_enabled

pytestmark = pytest.mark.skipif(not numba_enabled(), reason="numba kernels disabled or missing")


def _host_has_avx2_fma() -> bool:
    import llvmlite.binding as llvm

    feats = llvm.get_host_cpu_features()
    return bool(feats.get("avx2")) and bool(feats.get("fma"))


def _fresh(fn):
    """An uncached copy of a kernel (numba refuses to show assembly of cached code)."""
    import numba

    from actsparse.kernels import primitives

    opts = dict(primitives.JIT)
    opts["cache"] = False
    return numba.njit(**opts)(fn.py_func)


@pytest.mark.parametrize("wdtype", [np.float32, np.uint16], ids=["fp32", "bf16"])
def test_accumulate_and_dot_use_packed_ymm_fma(wdtype):
    if not _host_has_avx2_fma():
        pytest.skip("host CPU has no AVX2+FMA")
    from actsparse.kernels import primitives as P

    wt = np.zeros((16, 100), wdtype)
    idx = np.arange(16, dtype=np.int64)
    vals = np.ones(16, np.float32)
    acc = np.empty(100, np.float32)
    acc_k = _fresh(P.accumulate_rows)
    acc_k(wt, idx, vals, 0, 16, acc)
    runs_k = _fresh(P.accumulate_runs)
    runs_k(wt, idx, vals, 0, 16, acc)
    dot = _fresh(P.dot)
    dot(wt, 0, np.ones(100, np.float32))
    for kernel in (acc_k, runs_k, dot):
        asm = "\n".join(kernel.inspect_asm().values())
        fma = re.findall(r"vfmadd\w*ps[^\n]*%ymm", asm)
        assert fma, f"{kernel.py_func.__name__}: no packed ymm FMA in the assembly"
        if wdtype is np.uint16:  # bf16 widening vectorised: zero-extend + shift on vectors
            assert re.search(r"vpmovzxwd[^\n]*%ymm", asm), "bf16 widening is not vectorised"


@pytest.mark.parametrize("fmt", ["int8", "q4"])
def test_quantised_inner_loops_use_packed_ymm_fma(fmt):
    """The int8 / q4 row dot products and input-sparse accumulations widen the codes on vectors
    (int8: sign-extend bytes; q4: mask/shift nibbles) and convert them with a packed int->fp32."""
    if not _host_has_avx2_fma():
        pytest.skip("host CPU has no AVX2+FMA")
    from actsparse.kernels import quant_numba as Q

    codes = np.zeros((8, 576), np.int8) if fmt == "int8" else np.zeros((8, 288), np.uint8)
    scales = np.full((8, 18), np.float16(1.0)).view(np.uint16)  # fp16 bits, as QuantWeight.numpy()
    mins = np.zeros((8, 18), np.uint16)
    cs = np.empty(18, np.float32)
    xf = np.ones(576, np.float32)
    idx = np.arange(8, dtype=np.int64)
    vals = np.ones(8, np.float32)
    acc = np.empty(576, np.float32)
    if fmt == "int8":
        dot, accum = _fresh(Q.i8_dot), _fresh(Q.i8_accumulate_rows)
        dot(codes, scales, 0, xf, cs)
        accum(codes, scales, idx, vals, 0, 8, acc)
    else:
        dot, accum = _fresh(Q.q4_dot), _fresh(Q.q4_accumulate_rows)
        dot(codes, scales, mins, 0, np.ones(594, np.float32), cs)
        accum(codes, scales, mins, idx, vals, 0, 8, acc)
    # the one-row dot product: what qdot_rows and the decoder's dense GEMV run
    for kernel in (dot, accum):
        asm = "\n".join(kernel.inspect_asm().values())
        name = kernel.py_func.__name__
        assert re.findall(r"vfmadd\w*ps[^\n]*%[yz]mm", asm), f"{name}: no packed FMA in the assembly"
        assert re.search(r"vcvtdq2ps[^\n]*%[yz]mm", asm), f"{name}: the code -> fp32 conversion is not vectorised"
        # codes loaded as vectors, not inserted byte by byte: written as blocks with an inner loop
        # of 32, LLVM once vectorised the loop over blocks instead and the dot took 6-9x longer
        assert "vpinsrb" not in asm, f"{name}: codes gathered byte by byte (the loop over blocks was vectorised)"
        # fp16 scales widened by the F16C instruction, not by a call to a software conversion
        assert "vcvtph2ps" in asm and not re.search(r"call[^\n]*(extendhfsf2|h2f_ieee)", asm), \
            f"{name}: fp16 scales not widened with vcvtph2ps"
        if fmt == "int8":
            assert re.search(r"vpmovsxbd[^\n]*%[yz]mm", asm), f"{name}: int8 widening is not vectorised"
        else:
            assert re.search(r"vpmovzxbd[^\n]*%[yz]mm", asm), f"{name}: nibbles not unpacked on vectors"
