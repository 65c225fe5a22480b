"""Pooling on device "cuda" (max with indices, unpool, average, adaptive average), forward
and gradients, against the float64 reference and, where the CUDA kernels promise it,
against the CPU bit for bit.

Under Numba's CUDA simulator (no GPU here) every thread is a Python thread, so shapes
are tiny; on a GPU the same tests run as they are, plus one at a realistic size.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

import cnn_numba as cn
import cnn_numba.functional as F
import reference as R
from cnn_numba.backend import kernel
from conftest import CUDA_SIMULATED, DTYPES, forward_backward, needs_cuda
from test_pool import _avg_kw, _pool_data  # the CPU tests' case decoding and data (distinct, ties, NaNs)

pytestmark = needs_cuda
DTYPE_IDS = ["f32", "f64"]


def _max_pool(x, device, **kw):
    """(out, indices, gx, gy) of max_pool2d on ``device``, as numpy."""
    saved = {}

    def op(t, **kw):
        y, saved["idx"] = F.max_pool2d(t, return_indices=True, **kw)
        return y

    out, (gx,), gy = forward_backward(op, (x,), device=device, **kw)
    idx = saved["idx"]
    assert idx.device == device and idx.dtype == np.int64
    return out, idx.numpy(), gx, gy


# ----------------------------------------------------------------------------- max_pool2d

MAX_CASES = [
    ((1, 1, 1, 1), dict(kernel_size=1)),
    ((1, 2, 5, 5), dict(kernel_size=3, stride=2, padding=1)),                         # overlapping, padding
    ((1, 1, 5, 6), dict(kernel_size=3, stride=1, padding=1)),                         # heavy overlap
    ((1, 1, 7, 7), dict(kernel_size=3, stride=3, ceil_mode=True)),                    # overhang window
    ((1, 2, 7, 4), dict(kernel_size=3, stride=(3, 2), padding=(1, 0), dilation=2, ceil_mode=True)),
    ((1, 1, 6, 5), dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), dilation=(2, 1))),
    ((1, 1, 7, 7), dict(kernel_size=2, stride=3)),                                    # stride > kernel
]


@pytest.mark.parametrize("kind", ["distinct", "ties", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", MAX_CASES, ids=[f"max{i}" for i in range(len(MAX_CASES))])
def test_max_pool2d_forward_indices_and_grad(rng, case, dtype, kind):
    shape, kw = case
    x = _pool_data(rng, shape, kind, dtype)
    ref, ref_idx = R.max_pool2d(x, **kw)
    out, idx, gx, gy = _max_pool(x, "cuda", **kw)
    assert out.dtype == dtype and gx.dtype == dtype
    np.testing.assert_array_equal(idx, ref_idx)
    R.assert_close(out, ref, dtype, "y")
    R.assert_close(gx, R.max_pool2d_grad(gy, ref_idx, shape), dtype, "gx")
    # the gather adds each input's gradients in the CPU scatter's order: the same bits
    np.testing.assert_array_equal(gx, _max_pool(x, "cpu", **kw)[2])


def test_max_pool2d_first_maximum_wins_and_nan_propagates():
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 3.0],
                    [-1.0, -2.0, -5.0]]]], np.float32)
    out, idx, _, _ = _max_pool(x, "cuda", kernel_size=2, stride=1)
    np.testing.assert_array_equal(out[0, 0], [[3, 3], [3, 3]])
    np.testing.assert_array_equal(idx[0, 0], [[1, 1], [3, 5]])
    x = np.array([[[[1.0, np.nan], [np.nan, 5.0]]]], np.float32)
    out, idx, gx, gy = _max_pool(x, "cuda", kernel_size=2)
    assert np.isnan(out[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 2  # the last NaN wins
    np.testing.assert_array_equal(gx.reshape(-1), [0, 0, gy.item(), 0])


def test_max_pool2d_backward_accumulates_overlapping_windows():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0  # the maximum of every 3x3 stride-1 window that contains it
    xt = cn.tensor(x, requires_grad=True, device="cuda")
    y = F.max_pool2d(xt, 3, stride=1, padding=1)
    y.sum().backward()
    g = xt.grad.numpy()
    assert g[0, 0, 1, 2] == 9.0 and g.sum() == y.size


def test_max_pool2d_window_of_padding_only_matches_the_cpu():
    """Dilation can leave a window with no input element: -inf, index -1, no gradient."""
    x = np.arange(4.0).reshape(1, 1, 2, 2)
    kw = dict(kernel_size=2, stride=1, padding=1, dilation=3)
    got, want = _max_pool(x, "cuda", **kw), _max_pool(x, "cpu", **kw)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert got[0].item() == -np.inf and got[1].item() == -1 and not got[2].any()


# ----------------------------------------------------------------------------- max_unpool2d

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", [((1, 2, 4, 6), 2, None, 0, None),
                                  ((1, 1, 5, 7), 2, None, 0, (5, 7)),       # odd input: a row dropped
                                  ((1, 1, 6, 6), 3, 3, 1, (6, 6))], ids=["k2", "odd", "padded"])
def test_max_unpool2d_forward_and_grad(rng, case, dtype):
    shape, k, s, p, osz = case
    x = _pool_data(rng, shape, "distinct", dtype)
    pooled, idx = R.max_pool2d(x, k, s, p)
    pooled = pooled.astype(dtype)
    out, (gx, gi), gy = forward_backward(F.max_unpool2d, (pooled, idx), device="cuda", kernel_size=k, stride=s,
                                         padding=p, output_size=osz)
    assert out.dtype == dtype and gi is None
    R.assert_close(out, R.max_unpool2d(pooled, idx, k, s, p, osz), dtype, "y")
    R.assert_close(gx, R.max_unpool2d_grad(gy, idx), dtype, "gx")


def test_max_unpool2d_duplicate_indices_last_source_wins_every_run():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 3, 3))
    idx = rng.integers(0, 5, x.shape)  # 9 sources per plane on 5 of the 16 destinations
    ref = R.max_unpool2d(x, idx, 2, 1)  # numpy assignment: the last repeated index wins
    runs = [forward_backward(F.max_unpool2d, (x, idx), device="cuda", kernel_size=2, stride=1) for _ in range(2)]
    for out, (gx, _), gy in runs:
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(gx, R.max_unpool2d_grad(gy, idx))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_scatter_planes_accumulates_in_source_order(dtype):
    """No public op accumulates through scatter_planes on the device; the kernel still adds
    every source landing on a destination, in the CPU's order (so the same bits)."""
    rng = np.random.default_rng(4)
    src = rng.standard_normal((1, 2, 4, 3)).astype(dtype)
    idx = rng.integers(0, 4, src.shape)
    idx[0, 1] = 2  # one destination takes all twelve sources of a plane
    got = kernel("scatter_planes", "cuda")(cuda.to_device(src), cuda.to_device(idx), (2, 3), True).copy_to_host()
    ref = np.zeros((1, 2, 6))
    for c in range(2):
        np.add.at(ref[0, c], idx[0, c].reshape(-1), src[0, c].reshape(-1))
    R.assert_close(got, ref.reshape(1, 2, 2, 3), dtype)
    np.testing.assert_array_equal(got, kernel("scatter_planes", "cpu")(src, idx, (2, 3), True))


# ----------------------------------------------------------------------------- avg_pool2d

# (x shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CASES = [
    ((1, 1, 1, 1), 1, None, 0, False, True, None),
    ((1, 2, 5, 5), 3, 2, 1, False, True, None),          # padding counted
    ((1, 2, 5, 5), 3, 2, 1, False, False, None),         # padding not counted
    ((1, 2, 5, 5), 3, 2, 1, True, True, None),           # ceil: windows clipped at the padded edge
    ((1, 2, 5, 5), 3, 2, 1, True, False, None),
    ((1, 2, 5, 5), 2, 2, 1, True, True, None),           # last window dropped
    ((1, 1, 6, 5), (3, 2), (2, 1), (1, 1), True, True, 5),
    ((1, 1, 6, 5), (3, 2), (2, 1), (1, 0), False, False, 2),
    ((1, 1, 7, 7), 3, 3, 0, True, True, None),           # overhang without padding
    ((1, 1, 5, 6), 3, 1, 1, False, True, None),          # heavy overlap
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", AVG_CASES, ids=[f"avg{i}" for i in range(len(AVG_CASES))])
def test_avg_pool2d_forward_and_grad(rng, case, dtype):
    kw = _avg_kw(case)
    x = _pool_data(rng, case[0], "distinct", dtype)
    out, (gx,), gy = forward_backward(F.avg_pool2d, (x,), device="cuda", **kw)
    assert out.dtype == dtype and gx.dtype == dtype
    R.assert_close(out, R.avg_pool2d(x, **kw), dtype, "y")
    R.assert_close(gx, R.avg_pool2d_grad(gy, x.shape, **kw), dtype, "gx")


# ----------------------------------------------------------------------------- adaptive_avg_pool2d

ADAPTIVE_CASES = [
    ((1, 1, 1, 1), 1),
    ((1, 2, 5, 7), 1),          # global average pooling
    ((1, 2, 7, 5), (2, 4)),     # windows overlap
    ((1, 2, 7, 6), (3, 4)),     # non-divisible both ways
    ((1, 1, 3, 5), (5, 7)),     # larger than the input
    ((1, 1, 4, 4), (4, 4)),     # identity
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=[str(c[1]) for c in ADAPTIVE_CASES])
def test_adaptive_avg_pool2d_forward_and_grad(rng, case, dtype):
    shape, osz = case
    x = _pool_data(rng, shape, "distinct", dtype)
    out, (gx,), gy = forward_backward(F.adaptive_avg_pool2d, (x,), device="cuda", output_size=osz)
    assert out.dtype == dtype and gx.dtype == dtype
    R.assert_close(out, R.adaptive_avg_pool2d(x, osz), dtype, "y")
    R.assert_close(gx, R.adaptive_avg_pool2d_grad(gy, shape), dtype, "gx")


# ----------------------------------------------------------------------------- edge sizes

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pools_batch_zero(dtype):
    x = np.zeros((0, 3, 5, 6), dtype)
    out, idx, gx, _ = _max_pool(x, "cuda", kernel_size=2, padding=1, ceil_mode=True)
    assert out.shape == idx.shape == (0, 3, 3, 4) and gx.shape == x.shape and gx.dtype == dtype
    out, (gu, _), _ = forward_backward(F.max_unpool2d, (out, idx), device="cuda", kernel_size=2, padding=1,
                                       output_size=(5, 6))
    assert out.shape == (0, 3, 5, 6) and gu.shape == (0, 3, 3, 4)
    out, (gx,), _ = forward_backward(F.avg_pool2d, (x,), device="cuda", kernel_size=3, stride=2, padding=1)
    assert out.shape == (0, 3, 3, 3) and gx.shape == x.shape
    out, (gx,), _ = forward_backward(F.adaptive_avg_pool2d, (x,), device="cuda", output_size=(2, 4))
    assert out.shape == (0, 3, 2, 4) and gx.shape == x.shape


@pytest.mark.skipif(CUDA_SIMULATED, reason="a realistic size: too slow for the simulator")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_realistic_size_matches_the_cpu(rng, dtype):
    x = _pool_data(rng, (8, 16, 33, 31), "ties", dtype)
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    for g, c in zip(_max_pool(x, "cuda", **kw), _max_pool(x, "cpu", **kw)):
        np.testing.assert_array_equal(g, c)
    for op, kw in ((F.avg_pool2d, dict(kw, count_include_pad=False)),
                   (F.adaptive_avg_pool2d, dict(output_size=(5, 7)))):
        (out, (gx,), _), (ref, (gref,), _) = (forward_backward(op, (x,), device=d, **kw) for d in ("cuda", "cpu"))
        R.assert_close(out, ref, dtype, "y")
        R.assert_close(gx, gref, dtype, "gx")
