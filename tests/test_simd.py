"""kernels/simd.py: the vector helpers the flat conv kernels hold their accumulators in."""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from cnn_numba.kernels.simd import (LANES, copy_row, vadd, vdeinterleave, vector_length, vfma, vload, vload_masked,
                                    vmul, vrelu, vsplat, vstore, vstore_lanes, vstore_masked, vsub, vtranspose8)


@njit
def _axpby(w, x, b, out):
    """out = b + w * x, vector by vector (x.size a multiple of LANES)."""
    for i in range(0, x.size, LANES):
        vstore(out, i, vfma(vsplat(b, x), w, vload(x, i)))


@njit
def _dot_sums(w, xs, offsets, out):
    """out[j] = sum_k w[k] * xs[offsets[k] + j], the flat kernels' loop shape."""
    for j in range(0, out.size, LANES):
        acc = vsplat(0.0, out)
        for k in range(w.size):
            acc = vfma(acc, w[k], vload(xs, offsets[k] + j))
        vstore(out, j, acc)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lanes_compute_what_numpy_does(dtype, rng):
    x = rng.standard_normal(4 * LANES).astype(dtype)
    out = np.full_like(x, np.nan)
    _axpby(dtype(1.5), x, dtype(-0.25), out)
    want = dtype(1.5) * x.astype(np.float64) + dtype(-0.25)  # one rounding: exact in float32
    if dtype == np.float32:
        np.testing.assert_array_equal(out, want.astype(dtype))
    else:
        np.testing.assert_allclose(out, want, rtol=1e-15, atol=1e-15)
    xs = rng.standard_normal(10 * LANES).astype(dtype)
    w, offsets = rng.standard_normal(5).astype(dtype), np.array([0, 3, 17, LANES, 5 * LANES + 1])
    out = np.empty(3 * LANES, dtype)
    _dot_sums(w, xs, offsets, out)
    want = np.zeros(out.size, dtype)
    for k in range(w.size):  # in order, one rounding per multiply-add (a fused one)
        want = (want.astype(np.float64) + np.float64(w[k]) * xs[offsets[k]:offsets[k] + out.size]).astype(dtype)
    np.testing.assert_allclose(out, want, rtol=2e-6 if dtype == np.float32 else 1e-14)


def test_non_finite_lanes_propagate():
    x = np.array([np.inf, -np.inf, np.nan, 0.0] * (LANES // 4), np.float32)
    out = np.empty_like(x)
    _axpby(np.float32(0.0), x, np.float32(1.0), out)  # 0 * inf is NaN, as in numpy
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out, np.float32(0.0) * x + np.float32(1.0))


def test_vector_length_rounds_up_to_vector_pairs():
    assert [vector_length(n) for n in (0, 1, 2 * LANES, 2 * LANES + 1)] == [0, 2 * LANES, 2 * LANES, 4 * LANES]


def test_bad_operands_are_typing_errors():
    @njit
    def load2d(a):
        return vload(a, 0)

    with pytest.raises(TypingError, match="1-D contiguous float array"):
        load2d(np.zeros((2, LANES), np.float32))
    with pytest.raises(TypingError, match="1-D contiguous float array"):
        load2d(np.zeros(LANES, np.int64))

    @njit
    def mixed(a, b):
        return vfma(vload(a, 0), 1.0, vload(b, 0))

    with pytest.raises(TypingError, match="two Vecs of one dtype"):
        mixed(np.zeros(LANES, np.float32), np.zeros(LANES, np.float64))


def test_bounds_are_checked_under_numba_boundscheck(tmp_path):
    """With NUMBA_BOUNDSCHECK=1 a vector reaching past either end is an IndexError (so the
    bounds-checked run of every kernel, tests/test_boundscheck.py, covers the vector reads)."""
    import os
    import subprocess
    import sys
    code = """
import numpy as np
from numba import njit
from cnn_numba.kernels.simd import LANES, vload, vload_masked, vstore, vstore_masked
@njit
def copy(a, i, out):
    vstore(out, 0, vload(a, i))
a, out = np.arange(2 * LANES, dtype=np.float32), np.zeros(LANES, np.float32)
copy(a, LANES, out)
assert out[0] == LANES
try:
    copy(a, LANES + 1, out)
except IndexError:
    pass
else:
    raise SystemExit("vload past the end was not caught")

@njit
def masked(a, i, out, n):
    vstore_masked(out, 0, vload_masked(a, i, n), n)

masked(a, 2 * LANES - 3, out, 3)  # the last three elements: in bounds, though a whole vector is not
try:
    masked(a, 2 * LANES - 3, out, 4)
except IndexError:
    print("ok")
"""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@njit
def _copy(src, i, dst, j, n):
    copy_row(src, i, dst, j, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_copy_row_copies_exactly_its_elements(dtype, rng):
    """Masked vector copies: every count from 0 to past two vectors, at odd offsets, touch
    those elements only; a strided view takes the element loop, as does an int array."""
    src = rng.standard_normal(3 * LANES + 7).astype(dtype)
    for n in range(0, 2 * LANES + 3):
        dst = np.full(3 * LANES + 9, -7.0, dtype)
        _copy(src, 3, dst, 5, n)
        want = np.full_like(dst, -7.0)
        want[5:5 + n] = src[3:3 + n]
        np.testing.assert_array_equal(dst, want)
    grid = np.zeros((4, 2 * LANES), dtype)
    _copy(src, 1, grid[:, 1:][2], 0, LANES + 2)  # layout 'A', adjacent elements: the vector path
    np.testing.assert_array_equal(grid[2, 1:LANES + 3], src[1:LANES + 3])
    column = np.zeros((2 * LANES, 3), dtype)
    _copy(src, 0, column[:, 1], 2, LANES)  # strided: elementwise
    np.testing.assert_array_equal(column[2:LANES + 2, 1], src[:LANES])
    assert not column[:, [0, 2]].any()
    ints = np.zeros(10, np.int64)
    _copy(np.arange(10), 2, ints, 0, 5)
    np.testing.assert_array_equal(ints[:5], np.arange(2, 7))


@njit
def _deinterleave(a, out):
    even, odd = vdeinterleave(vload(a, 0), vload(a, LANES))
    vstore(out[0], 0, even)
    vstore(out[1], 0, odd)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deinterleave_takes_even_and_odd_lanes(dtype):
    out = np.zeros((2, LANES), dtype)
    _deinterleave(np.arange(2 * LANES, dtype=dtype), out)
    np.testing.assert_array_equal(out, [np.arange(0, 2 * LANES, 2), np.arange(1, 2 * LANES, 2)])


@njit
def _transpose(a, out):
    t = vtranspose8(vload(a[0], 0), vload(a[1], 0), vload(a[2], 0), vload(a[3], 0),
                    vload(a[4], 0), vload(a[5], 0), vload(a[6], 0), vload(a[7], 0))
    for j in range(8):
        vstore(out[j], 0, t[j])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transpose8_moves_every_lane(dtype):
    """t_j[8h + p] = r_p[8h + j]: each group of 8 lanes is an 8 x 8 matrix, transposed."""
    a = np.arange(8 * LANES, dtype=dtype).reshape(8, LANES)
    out = np.full_like(a, -1)
    _transpose(a, out)
    want = a.reshape(8, LANES // 8, 8).transpose(2, 1, 0).reshape(8, LANES)
    np.testing.assert_array_equal(out, want)


@njit
def _store_lanes(v, a, i, lo, n):
    vstore_lanes(a, i, vload(v, 0), lo, n)


def test_store_lanes_writes_exactly_its_elements():
    v = np.arange(LANES, dtype=np.float32) + 100
    for lo in range(LANES):
        for n in range(LANES - lo + 1):
            a = np.full(2 * LANES, -7.0, np.float32)
            _store_lanes(v, a, 3, lo, n)
            want = np.full_like(a, -7.0)
            want[3:3 + n] = v[lo:lo + n]
            np.testing.assert_array_equal(a, want)
    a = np.full(LANES, -7.0, np.float32)
    _store_lanes(v, a, 0, LANES - 2, 2)  # the vector would start before the array: masked lanes only
    np.testing.assert_array_equal(a[:3], [v[-2], v[-1], -7.0])


@njit
def _arith(v, w, out):
    x, y = vload(v, 0), vload(w, 0)
    vstore(out[0], 0, vadd(x, y))
    vstore(out[1], 0, vsub(x, y))
    vstore(out[2], 0, vmul(x, y))
    vstore(out[3], 0, vsub(x, np.float32(0.5)))
    vstore(out[4], 0, vrelu(x))


def test_lane_arithmetic_is_numpys_and_relu_keeps_nan_and_negative_zero(rng):
    v = np.array([-1.5, -0.0, np.nan, 3.0, -np.inf, np.inf, 2.0, -2.0] * (LANES // 8), np.float32)
    w = rng.standard_normal(LANES).astype(np.float32)
    out = np.empty((5, LANES), np.float32)
    _arith(v, w, out)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out[:4], [v + w, v - w, v * w, v - np.float32(0.5)])
    relu = np.where(v < 0, np.float32(0), v)
    np.testing.assert_array_equal(out[4], relu)
    assert np.signbit(out[4][1])  # -0.0 is not below 0: kept, as elementwise.relu_value does
