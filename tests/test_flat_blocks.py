"""The flat conv kernels' inner loops (kernels/conv_stride1.py): the register-blocked ones
(_pairs*, _dots*; AVX-512 targets) and the passes they replace elsewhere (_taps*, _sums*;
8-lane targets such as AVX2) compute the same sums: the forward's bit for bit, the
weight-gradient's to float32 rounding. The machine running the suite takes one of the two
paths in its kernels; this runs both, and, in a process compiled for Haswell, a whole conv."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from cnn_numba.kernels import conv_stride1 as S
from cnn_numba.kernels.simd import LANES, vector_length

BLOCKS = [(S._pairs8, None, 8), (S._pairs4, S._taps4, 4), (S._pairs1, S._taps1, 1)]


def _run(rng, count, length, channels):
    """A run buffer with three source runs a pair, zeros at ``size`` (the padding pairs')."""
    size = 4 * length + 64
    src = np.zeros(size + vector_length(length) + 2 * LANES, np.float32)
    src[:size] = rng.standard_normal(size)
    width = -(-count // 3) * 3
    sources = np.full(width, size, np.int64)
    sources[:count] = rng.integers(0, size - length, count)
    w = np.zeros((channels, width), np.float32)
    w[:, :count] = rng.standard_normal((channels, count))
    return src, sources, w


@pytest.mark.parametrize("count,length", [(9, 100), (16, 1024), (3, 31), (144, 290)])
def test_forward_blocks_agree_bit_for_bit(count, length, rng):
    for blocked, passes, nu in BLOCKS:
        src, sources, w = _run(rng, count, length, nu)
        bias = rng.standard_normal(nu).astype(np.float32)
        acc = np.zeros((nu, vector_length(length)), np.float32)
        blocked(w, bias, src, sources, count, acc, length)
        want = bias[:, None] + np.zeros((nu, length), np.float32)
        for k in range(count):
            want = (want.astype(np.float64) + w[:, k:k + 1].astype(np.float64)
                    * src[sources[k]:sources[k] + length]).astype(np.float32)  # one rounding per pair
        np.testing.assert_allclose(acc[:, :length], want, rtol=1e-5, atol=1e-5)
        if passes is not None:
            other = np.zeros_like(acc)
            passes(w, bias, src, sources, count, other, length)
            np.testing.assert_array_equal(other[:, :length], acc[:, :length])


@pytest.mark.parametrize("count,length", [(9, 100), (12, 1024), (3, 31)])
def test_weight_gradient_blocks_agree(count, length, rng):
    for blocked, passes, nu in [(S._dots8, None, 8), (S._dots4, S._sums4, 4), (S._dots1, S._sums1, 1)]:
        src, sources, _ = _run(rng, count, length, nu)
        gyw = np.zeros((nu, vector_length(length)), np.float32)
        gyw[:, :length] = rng.standard_normal((nu, length))
        for k in range(0, count, 3):
            out = np.zeros((nu, 3), np.float32)
            blocked(src, sources, k, gyw, out, length)
            want = np.array([[gyw[u, :length].astype(np.float64) @ src[sources[k + i]:sources[k + i] + length]
                              for i in range(3)] for u in range(nu)])
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
            if passes is not None:
                other = np.zeros_like(out)
                passes(src, sources, k, gyw, other, length)
                np.testing.assert_allclose(other, out, rtol=1e-5, atol=1e-4)


def test_a_conv_compiled_for_avx2(tmp_path):
    """In a process compiled for Haswell (8-lane registers: the passes, not the register
    blocks), the flat kernels' three passes match the general direct kernels."""
    code = """
import numpy as np
from cnn_numba import shapes
from cnn_numba.kernels import conv as C, conv_stride1 as S
assert not S.REGISTER_BLOCKED and S.BLOCK == 4
rng = np.random.default_rng(0)
for xs, ws, s, p in [((3, 8, 9, 9), (12, 8, 3, 3), 1, 1), ((2, 6, 11, 11), (6, 3, 3, 3), 2, 1)]:
    g = shapes.conv2d_geom(xs, ws, s, p, 1, xs[1] // ws[1])
    x, w, gy = (rng.standard_normal(t).astype(np.float32) for t in (xs, ws, g.y_shape))
    b = rng.standard_normal(ws[0]).astype(np.float32)
    for flat, general, args, shape in [(S.forward_flat, C.forward_direct, (x, w, b), g.y_shape),
                                       (S.backward_input_flat, C.backward_input_direct, (gy, w), g.x_shape),
                                       (S.backward_weight_flat, C.backward_weight_direct, (x, gy), ws)]:
        got, want = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        flat(*args, got, g)
        general(*args, want, g)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), flat.__name__
print("ok")
"""
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CPU_FEATURES", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_only_the_phases_read_are_loaded(rng):
    """phases_read: the input phases a strided forward's taps read (a 1x1 stride-2 kernel one
    of four, a 3x3 all four, dilation 2 at stride 2 phase 0 alone); the flat forward and
    weight-gradient that load just those agree with the float64 reference."""
    import reference as R
    from conftest import random
    from cnn_numba.shapes import conv2d_geom
    assert S.phases_read(1, 1, 2, 2, 1, 1) == 1
    assert S.phases_read(3, 3, 2, 2, 1, 1) == 15
    assert S.phases_read(3, 3, 2, 2, 2, 2) == 1
    assert S.phases_read(1, 3, 1, 2, 1, 1) == 0b11
    assert S.phases_read(2, 1, 3, 1, 1, 1) == 0b011
    for xs, ws, s, p, d in [((3, 4, 9, 10), (8, 4, 1, 1), 2, 0, 1), ((2, 3, 11, 11), (5, 3, 3, 3), 2, 2, 2),
                            ((2, 2, 9, 8), (4, 2, 2, 1), 3, 1, 1)]:
        geom = conv2d_geom(xs, ws, s, p, d, 1)
        x, w = random(rng, xs, np.float32), random(rng, ws, np.float32)
        y = np.empty(geom.y_shape, np.float32)
        S.forward_flat(x, w, np.zeros(ws[0], np.float32), y, geom)
        R.assert_close(y, R.conv2d(x, w, None, s, p, d), np.float32, f"y {ws} s{s}")
        gy = random(rng, geom.y_shape, np.float32)
        gw = np.zeros(ws, np.float32)
        S.backward_weight_flat(x, gy, gw, geom)
        R.assert_close(gw, R.conv2d_grads(x, w, gy, s, p, d)[1], np.float32, f"gw {ws} s{s}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stride_two_phase_planes_are_the_padded_input_split(dtype, rng):
    """pad_phases at stride 2 (both column phases of a row at once, in vector chunks): every
    phase plane is the padded input's [r::2, q::2], cropped to the plane, for rows shorter and
    longer than a chunk, odd widths, paddings 0-3 and crops, a strided view of x (the element
    loop); nothing past a plane's columns is written."""
    for h, w, ph, pw in [(32, 32, 1, 1), (7, 70, 2, 3), (5, 1, 0, 1), (9, 33, 1, 0), (6, 40, 0, 2), (8, 12, -1, -1)]:
        for strided in (False, True):
            x = rng.standard_normal((3, h, 2 * w if strided else w)).astype(dtype)
            x = x[..., ::2] if strided else x
            hp, wp = (h + 2 * max(ph, 0) + 1) // 2 + 1, (w + 2 * max(pw, 0) + 1) // 2 - 1
            buf = np.full((3, 4, hp, wp + 5), -7.0, dtype)
            xp = buf[..., :wp]
            xp[...] = 0
            S.pad_phases(x, 0, xp, ph, pw, 2, 2)
            pad = np.zeros((3, h + 2 * abs(ph) + 4, w + 2 * abs(pw) + 4), dtype)
            if ph >= 0 and pw >= 0:
                pad[:, ph:ph + h, pw:pw + w] = x
            else:
                pad[:, :h + ph, :w + pw] = x[:, -ph:, -pw:]
            for r in range(2):
                for q in range(2):
                    np.testing.assert_array_equal(xp[:, 2 * r + q], pad[:, r::2, q::2][:, :hp, :wp],
                                                  err_msg=f"{(h, w, ph, pw, strided)} phase {(r, q)}")
            assert (buf[..., wp:] == -7.0).all()
