"""The blocked direct kernel (kernels/conv_blocked.py): output channels across the vector
lanes, tiles of TILE output pixels. Its forward and stride-1 input-gradient against the
float64 reference on awkward geometries (partial channel blocks and tiles, stride, dilation,
groups, a cropping full padding, every thread count's split), bit for bit against the flat
kernels' register blocks where those run, through the public API, and its place in the
algorithm table."""
from __future__ import annotations

import numpy as np
import pytest
import reference as R
from conftest import random

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba.backend import kernel
from cnn_numba.kernels import conv_blocked as BL
from cnn_numba.kernels import conv_stride1 as S
from cnn_numba.kernels.conv import no_epilogue
from cnn_numba.kernels.conv_algos import TABLE
from cnn_numba.shapes import conv2d_geom

# (x shape, w shape, stride, padding, dilation, groups)
GEOMS = [
    ((2, 3, 7, 7), (32, 3, 3, 3), 1, 1, 1, 1),     # one block, 98 outputs: 14 whole tiles
    ((3, 5, 9, 8), (33, 5, 3, 3), 2, 1, 1, 1),     # a partial block (1 of 32), stride 2
    ((1, 4, 10, 11), (40, 2, 3, 2), (2, 3), (1, 0), (2, 1), 2),  # groups, rectangular everything
    ((5, 2, 6, 6), (64, 2, 1, 1), 2, 0, 1, 1),     # 1x1 stride 2, two blocks, a partial last tile
    ((2, 6, 5, 5), (35, 6, 5, 5), 1, 4, 1, 1),     # padding wider than the kernel reaches
    ((1, 1, 1, 1), (32, 1, 1, 1), 1, 0, 1, 1),     # one output
]


def _launch(x, w, b, geom, slots, ep=None):
    y = np.full(geom.y_shape, np.nan, x.dtype)
    ep = no_epilogue(x.dtype) if ep is None else ep
    BL.conv2d_forward_blocked(x, w, b, y, *ep, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g,
                              slots)
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", range(len(GEOMS)))
def test_forward_matches_reference(case, dtype, rng):
    xs, ws, s, p, d, g = GEOMS[case]
    geom = conv2d_geom(xs, ws, s, p, d, g)
    x, w, b = random(rng, xs, dtype), random(rng, ws, dtype), random(rng, (ws[0],), dtype)
    ref = R.conv2d(x, w, b, s, p, d, g)
    for slots in (1, 2, 3, 8):  # runs of samples and splits of the channel blocks
        R.assert_close(_launch(x, w, b, geom, slots), ref, dtype, f"slots={slots}")


def test_forward_with_epilogue_and_non_finite_inputs(rng):
    """The fused batch norm + relu as each output is stored; an inf or NaN input reaches the
    outputs whose windows read it, and only those (zero-weight lanes past the channels and
    the last tile's unused pixels are never stored)."""
    xs, ws = (2, 4, 9, 9), (33, 4, 3, 3)
    geom = conv2d_geom(xs, ws, 2, 1, 1, 1)
    x, w, b = random(rng, xs), random(rng, ws), random(rng, (33,))
    x[0, 1, 4, 4], x[1, 2, 0, 8] = np.inf, np.nan
    stats = (rng.standard_normal(33), rng.uniform(0.5, 2.0, 33), rng.standard_normal(33), rng.standard_normal(33))
    ep = kernel("conv2d_epilogue", "cpu")(np.float64, (*stats, 1e-5), True)
    got = _launch(x, w, b, geom, 2, ep)
    with np.errstate(invalid="ignore"):
        ref = R.relu(R.batch_norm_eval(R.conv2d(x, w, b, 2, 1), *stats))
    R.assert_close(got, ref, np.float64, "fused")


def test_input_gradient_matches_reference(rng):
    """Stride 1: the flipped forward of gy, including a padding past the kernel's reach (the
    full padding is negative there and the load crops)."""
    for xs, ws, p, d, g in [((2, 33, 6, 7), (8, 33, 3, 3), 1, 1, 1), ((1, 64, 5, 5), (6, 32, 3, 3), 3, 1, 2),
                            ((2, 40, 8, 6), (4, 40, 3, 2), (2, 1), (2, 1), 1)]:
        geom = conv2d_geom(xs, ws, 1, p, d, g)
        x, w = random(rng, xs), random(rng, ws)
        gy = random(rng, geom.y_shape)
        assert BL.supports(geom, "backward_input")
        gx = np.full(geom.x_shape, np.nan)
        BL.backward_input(gy, w, gx, geom)
        R.assert_close(gx, R.conv2d_grads(x, w, gy, 1, p, d, g)[0], np.float64, f"gx {xs} {ws}")


@pytest.mark.skipif(not S.REGISTER_BLOCKED, reason="the flat kernels' register blocks need 16-lane registers")
def test_forward_equals_flat_register_blocks_bit_for_bit(rng):
    """Both start each output at its bias and add its (channel, tap) pairs in the flat weight's
    order, one fused multiply-add each: the same float32 sums."""
    for xs, ws, s, p in [((3, 16, 14, 14), (64, 16, 3, 3), 2, 1), ((2, 32, 7, 7), (32, 32, 3, 3), 1, 1)]:
        geom = conv2d_geom(xs, ws, s, p, 1, 1)
        x, w, b = random(rng, xs, np.float32), random(rng, ws, np.float32), random(rng, (ws[0],), np.float32)
        flat = np.empty(geom.y_shape, np.float32)
        S.forward_flat(x, w, b, flat, geom)
        assert np.array_equal(_launch(x, w, b, geom, 2), flat)


def test_public_api_and_table(rng):
    """algo='blocked' through conv2d: its forward and input-gradient where it supports them,
    the weight-gradient by the first entry that does; the autotuner times it only where
    vector registers hold 16 float32."""
    assert "blocked" in TABLE.names and TABLE.by_name["blocked"].tuned() == S.REGISTER_BLOCKED
    xs, ws = (2, 32, 6, 6), (32, 32, 3, 3)
    geom = conv2d_geom(xs, ws, 1, 1, 1, 1)
    assert TABLE.pick("blocked", geom, "forward").name == "blocked"
    assert TABLE.pick("blocked", geom, "backward_input").name == "blocked"
    assert TABLE.pick("blocked", geom, "backward_weight").name != "blocked"
    small = conv2d_geom((2, 4, 6, 6), (8, 4, 3, 3), 1, 1, 1, 1)  # 8 output channels: lanes idle
    assert not BL.supports(small, "forward")
    x, w, b = random(rng, xs), random(rng, ws), random(rng, (32,))
    xt, wt, bt = (cn.tensor(a, requires_grad=True) for a in (x, w, b))
    y = F.conv2d(xt, wt, bt, padding=1, algo="blocked")
    gy = random(rng, y.shape)
    y.backward(gy)
    R.assert_close(y.numpy(), R.conv2d(x, w, b, 1, 1), np.float64, "y")
    for got, ref, what in zip((xt.grad, wt.grad, bt.grad), R.conv2d_grads(x, w, gy, 1, 1), ("gx", "gw", "gb")):
        R.assert_close(got.numpy(), ref, np.float64, what)


def test_plan_gives_every_thread_work():
    """_plan: runs of samples in a multiple of the threads where the batch allows, and the
    channel blocks split where there are fewer tasks than threads (a batch of one)."""
    nb, runs, parts = BL._plan(1, 64, 7, 7, 1, 2)
    assert (nb, runs, parts) == (1, 1, 2)
    nb, runs, parts = BL._plan(16, 64, 7, 7, 1, 2)
    assert runs % 2 == 0 and nb * runs >= 16 and parts == 1
    nb, runs, parts = BL._plan(256, 32, 28, 28, 1, 2)
    assert nb * 784 <= BL.RUN_TILES * BL.TILE * 2 and nb * runs >= 256
