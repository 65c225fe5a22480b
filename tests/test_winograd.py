"""Winograd convolution (kernels/conv_winograd.py) against the float64 reference: every pass,
odd planes, groups, bias, padding; its float32 error bounds for F(2x2) and F(4x4); inf/NaN
as the direct sum gives them; where the table runs it."""
from __future__ import annotations

import numpy as np
import pytest
from numba import get_num_threads

import cnn_numba.functional as F
from cnn_numba.kernels import conv_winograd as W
from cnn_numba.kernels.conv import no_epilogue
from cnn_numba.kernels.conv_algos import TABLE
from cnn_numba.shapes import conv2d_geom
import reference as R
from conftest import DTYPES, forward_backward, random

PASSES = ("forward", "backward_input", "backward_weight")

# (x shape, w shape, padding, groups): planes that are not multiples of either tile
CASES = [
    ((2, 16, 7, 9), (16, 16, 3, 3), 1, 1),
    ((1, 16, 1, 1), (17, 16, 3, 3), 1, 1),        # a 1x1 plane; 17 = four quads and one
    ((3, 16, 2, 3), (16, 16, 3, 3), 2, 1),        # planes smaller than a tile, padding 2
    ((2, 32, 13, 14), (32, 16, 3, 3), (0, 2), 2),  # groups, asymmetric padding
    ((2, 17, 20, 17), (18, 17, 3, 3), 1, 1),      # F(4x4) forward and weight-gradient; 17 channels
    ((1, 16, 26, 15), (16, 16, 3, 3), 0, 1),      # no padding
]


def _geom(xs, ws, padding, groups):
    return conv2d_geom(xs, ws, 1, padding, 1, groups)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[str(c[:2]) for c in CASES])
def test_every_pass_matches_the_reference(rng, case, dtype):
    xs, ws, padding, groups = case
    geom = _geom(*case)
    assert TABLE.pick("winograd", geom, "forward").name == "winograd"
    assert TABLE.pick("winograd", geom, "backward_weight").name == "winograd"
    x, w, b = random(rng, xs, dtype), random(rng, ws, dtype), random(rng, (ws[0],), dtype)
    out, (gx, gw, gb), gy = forward_backward(F.conv2d, (x, w, b), algo="winograd", padding=padding, groups=groups)
    R.assert_close(out, R.conv2d(x, w, b, padding=padding, groups=groups), dtype, "y")
    rgx, rgw, rgb = R.conv2d_grads(x, w, gy, padding=padding, groups=groups)
    R.assert_close(gx, rgx, dtype, "gx")
    R.assert_close(gw, rgw, dtype, "gw")
    R.assert_close(gb, rgb, dtype, "gb")
    assert out.dtype == gx.dtype == gw.dtype == dtype


def test_the_input_gradient_runs_where_the_full_padding_allows(rng):
    """conv_transpose2d's forward is the input-gradient: Winograd at padding <= 2, the fallback
    at 3 (a negative full padding), both against the reference."""
    x, w = random(rng, (2, 16, 6, 7), np.float32), random(rng, (16, 16, 3, 3), np.float32)
    for p in (0, 1, 2, 3):
        y = F.conv_transpose2d(x, w, padding=p, algo="winograd").numpy()
        R.assert_close(y, R.conv_transpose2d(x, w, padding=p), np.float32, f"padding {p}")
    assert TABLE.pick("winograd", _geom((1, 16, 8, 8), (16, 16, 3, 3), 2, 1), "backward_input").name == "winograd"
    assert TABLE.pick("winograd", _geom((1, 16, 8, 8), (16, 16, 3, 3), 3, 1), "backward_input").name != "winograd"


@pytest.mark.parametrize("m, err", [(2, W.ERR_F2), (4, W.ERR_F4)])
def test_float32_error_is_within_the_documented_bound(rng, m, err):
    """max |error| / max |reference| of the float32 forward, both tile sizes on the same
    randn data, 128 input channels (the error grows with the transforms' coefficients, not
    with the channel sum, which the direct kernels share)."""
    x, w = rng.standard_normal((2, 128, 16, 16)), rng.standard_normal((32, 128, 3, 3))
    ref = R.conv2d(x, w, padding=1)
    y = np.empty(ref.shape, np.float32)
    bt, at = W._matrices(m, np.float32)
    u = W.transform_weight(w.astype(np.float32), m)
    bad = W.conv2d_forward_winograd(x.astype(np.float32), u, np.zeros(32, np.float32), y, *no_epilogue(np.float32),
                                    1, 1, 1, bt, at, get_num_threads())
    rel = np.abs(y - ref).max() / np.abs(ref).max()
    assert bad == 0 and rel < err, (m, rel)
    if m == 4:  # F(4x4) is measurably the coarser of the two
        assert rel > W.ERR_F2 / 4


def test_tile_size_rule():
    assert W.tile_size(8, 8) == 4 and W.tile_size(5, 5) == 2 and W.tile_size(1, 100) == 2 and W.tile_size(7, 7) == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_inf_and_nan_are_the_direct_sums(dtype):
    """The transforms would make inf - inf = NaN and spread a NaN over its tile; the
    launchers recompute such a pass with the direct kernels."""
    rng = np.random.default_rng(3)
    x, w, gy = random(rng, (2, 16, 12, 12), dtype), random(rng, (16, 16, 3, 3), dtype), random(rng, (2, 16, 12, 12),
                                                                                               dtype)
    x[0, 1, 5, 11] = np.inf
    x[1, 2, 0, 3] = -np.inf
    x[1, 3, 7, 7] = np.nan
    gy[0, 4, 2, 2] = np.inf
    out, (gx, gw), _ = forward_backward(F.conv2d, (x, w), gy=gy, padding=1, algo="winograd")
    rgx, rgw, _ = R.conv2d_grads(x.astype(np.float64), w.astype(np.float64), gy.astype(np.float64), padding=1)
    R.assert_close(out, R.conv2d(x.astype(np.float64), w.astype(np.float64), padding=1), dtype, "y")
    R.assert_close(gx, rgx, dtype, "gx")
    R.assert_close(gw, rgw, dtype, "gw")


@pytest.mark.parametrize("ws, kw, ok", [
    ((16, 16, 3, 3), dict(padding=1), True),
    ((16, 8, 3, 3), dict(padding=1), False),             # 8 input channels
    ((16, 16, 5, 5), dict(padding=2), False),            # 5x5
    ((16, 16, 3, 3), dict(stride=2, padding=1), False),
    ((16, 16, 3, 3), dict(dilation=2, padding=2), False),
])
def test_supports(ws, kw, ok):
    geom = conv2d_geom((1, ws[1], 9, 9), ws, kw.get("stride", 1), kw["padding"], kw.get("dilation", 1), 1)
    assert all(W.supports(geom, p) == ok for p in PASSES)


def test_auto_picks_winograd_where_the_products_are_blas_sized(monkeypatch):
    """The rule (conv_algos.WINOGRAD_MIN_CHANNELS, docs/convolution.md): Winograd on the 3x3
    stride-1 layers with at least 64 input and output channels per group, where it measured
    faster than the direct kernels in every pass; direct/im2col on narrower ones. With
    CNN_NUMBA_WINOGRAD=0 neither the rule nor the tuner runs it; algo='winograd' still does."""
    cases = [((64, 16, 32, 32), (16, 16, 3, 3), False), ((64, 32, 16, 16), (32, 32, 3, 3), False),
             ((64, 64, 8, 8), (64, 64, 3, 3), True), ((32, 128, 28, 28), (128, 128, 3, 3), True),
             ((8, 64, 8, 8), (32, 64, 3, 3), False), ((8, 64, 8, 8), (128, 64, 3, 3), True)]
    for off in (False, True):
        if off:
            monkeypatch.setenv(W.ENV, "0")
        TABLE._picked.clear()
        for xs, ws, wino in cases:
            geom = _geom(xs, ws, 1, 1)
            assert all((TABLE.pick("auto", geom, p).name == "winograd") == (wino and not off) for p in PASSES), (xs, ws)
            assert all(TABLE.pick("winograd", geom, p).name == "winograd" for p in PASSES)
        assert TABLE.by_name["winograd"].tuned() is not off
    TABLE._picked.clear()
    stride2 = conv2d_geom((8, 64, 16, 16), (64, 64, 3, 3), 2, 1, 1, 1)
    assert TABLE.pick("auto", stride2, "forward").name != "winograd"
