"""CUDA convolution and matrix-product kernels (kernels/cuda/conv.py, gemm.py) on device
"cuda", through the public API, against the float64 references of tests/reference.py.

Under Numba's CUDA simulator every thread is a Python thread, so shapes are tiny there
(they still cross tile, chunk and split boundaries: the simulator's tiles are small);
on a real GPU the last tests add realistic sizes.
"""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba.functional as F
import reference as R
from cnn_numba.backend import kernel
from conftest import CUDA_AVAILABLE, CUDA_SIMULATED, forward_backward, needs_cuda, random

pytestmark = needs_cuda

# The CUDA table's algorithm names; none where CUDA cannot load (needs_cuda skips the file there).
ALGOS = list(kernel("conv2d_algorithms", "cuda")().names) if CUDA_AVAILABLE else []

# (x shape, w shape, bias?, conv2d keyword arguments)
CASES = [
    ((1, 1, 1, 1), (1, 1, 1, 1), True, {}),                                   # 1x1 everything
    ((2, 3, 1, 1), (2, 3, 3, 3), True, dict(padding=1)),                      # 1x1 input, padded
    ((2, 2, 7, 8), (3, 2, 2, 2), False, dict(stride=3)),                      # stride > kernel
    ((2, 3, 6, 7), (4, 3, 3, 2), True, dict(stride=(2, 1), padding=(1, 2))),  # non-square all over
    ((2, 2, 5, 4), (2, 2, 4, 2), True, dict(padding="same")),                 # even kernel: asymmetric 'same'
    ((1, 3, 9, 8), (2, 3, 3, 2), True, dict(stride=(2, 3), dilation=(2, 3), padding=1)),
    ((2, 4, 5, 5), (6, 2, 3, 3), True, dict(groups=2, padding=1)),
    ((2, 3, 5, 6), (6, 1, 3, 3), True, dict(groups=3, stride=2)),             # depthwise, multiplier 2
    ((1, 4, 6, 6), (4, 1, 3, 3), False, dict(groups=4, padding=1)),           # depthwise
    ((1, 1, 2, 3), (2, 1, 2, 2), True, dict(padding=3)),                      # padding wider than the kernel
    ((1, 2, 3, 3), (1, 2, 1, 1), True, dict(stride=5)),                       # stride > input
]
IDS = [f"case{i}" for i in range(len(CASES))]

# (x shape, w shape (C_in, C_out/groups, kH, kW), bias?, conv_transpose2d keyword arguments)
TRANSPOSED = [
    ((2, 2, 3, 3), (2, 3, 3, 3), True, dict(stride=2, padding=1, output_padding=1)),
    ((1, 3, 4, 5), (3, 2, 3, 2), True, dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2))),
    ((2, 4, 3, 3), (4, 3, 2, 2), False, dict(groups=2, stride=2)),
    ((1, 2, 3, 3), (2, 1, 2, 2), True, dict(dilation=3, output_padding=2)),
    ((1, 2, 1, 1), (2, 3, 4, 3), True, {}),                                   # 1x1 input
]


def _inputs(rng, case, dtype, bias_channels=None):
    xs, ws, bias, kw = case
    b = random(rng, (bias_channels or ws[0],), dtype) if bias else None
    return random(rng, xs, dtype), random(rng, ws, dtype), b, kw


def _check(op, reference, reference_grads, x, w, b, dtype, **kw):
    """op forward and backward on device "cuda" against the references, in ``dtype``."""
    out, grads, gy = forward_backward(op, (x, w, b), device="cuda", **kw)
    kw.pop("algo")
    assert out.dtype == dtype and all(g is None or g.dtype == dtype for g in grads)
    R.assert_close(out, reference(x, w, b, **kw), dtype, "y")
    for name, got, ref in zip(("gx", "gw", "gb"), grads, reference_grads(x, w, gy, **kw)):
        if got is not None:
            R.assert_close(got, ref, dtype, name)


def _check_conv(rng, case, dtype, algo):
    x, w, b, kw = _inputs(rng, case, dtype)
    _check(F.conv2d, R.conv2d, R.conv2d_grads, x, w, b, dtype, algo=algo, **kw)


# ----------------------------------------------------------------------------- conv2d


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv2d_forward_and_grads(rng, case, algo):
    _check_conv(rng, case, np.float32, algo)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", [CASES[i] for i in (3, 7)], ids=["strided", "depthwise"])
def test_conv2d_float64(rng, case, algo):
    _check_conv(rng, case, np.float64, algo)


def test_conv2d_auto_and_several_im2col_chunks(rng):
    """Five samples of columns are more than one im2col pass holds on the simulator."""
    _check_conv(rng, ((5, 2, 4, 4), (4, 1, 3, 3), True, dict(groups=2, padding=1)), np.float32, "im2col")
    _check_conv(rng, ((2, 2, 4, 4), (3, 2, 3, 3), True, dict(padding=1)), np.float32, "auto")


@pytest.mark.parametrize("algo", ALGOS)
def test_conv2d_batch_zero(rng, algo):
    x = np.zeros((0, 4, 5, 6), np.float32)
    w, b = random(rng, (6, 2, 3, 2), np.float32), random(rng, (6,), np.float32)
    out, (gx, gw, gb), _ = forward_backward(F.conv2d, (x, w, b), device="cuda", algo=algo, groups=2,
                                            stride=(2, 1), padding=1)
    assert out.shape == (0, 6, 3, 7) and gx.shape == x.shape
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    np.testing.assert_array_equal(gb, np.zeros_like(b))


def test_direct_falls_back_when_the_receptive_field_exceeds_its_patch(rng):
    import cnn_numba as cn
    from cnn_numba.kernels.cuda import conv

    assert conv._tiling(1, 1, 3, 3, 1, 1, 40, 40, 1) is None  # an 81 x 81 receptive field
    x, w = random(rng, (1, 1, 81, 81), np.float32), random(rng, (1, 1, 3, 3), np.float32)
    y = F.conv2d(cn.tensor(x, device="cuda"), cn.tensor(w, device="cuda"), dilation=40, algo="direct")
    R.assert_close(y.numpy(), R.conv2d(x, w, dilation=40), np.float32)


@pytest.mark.parametrize("algo", ALGOS + ["auto"])
def test_conv2d_huge_dilation_runs_in_memory_of_the_output(rng, algo):
    """1x1 input, dilation = padding = 10000: a 1x1 output. Direct's shared patch cannot hold
    the receptive field, so its forward and input-gradient fall back to im2col, whose columns
    are C*KH*KW x OH*OW."""
    _check_conv(rng, ((2, 3, 1, 1), (4, 3, 3, 3), True, dict(padding=10000, dilation=10000)), np.float32, algo)


# ----------------------------------------------------------------------------- conv_transpose2d


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", TRANSPOSED, ids=[f"case{i}" for i in range(len(TRANSPOSED))])
def test_conv_transpose2d_forward_and_grads(rng, case, algo):
    x, w, b, kw = _inputs(rng, case, np.float32, bias_channels=case[1][1] * case[3].get("groups", 1))
    _check(F.conv_transpose2d, R.conv_transpose2d, R.conv_transpose2d_grads, x, w, b, np.float32, algo=algo, **kw)


# ----------------------------------------------------------------------------- matrix product


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
def test_matmul_odd_sizes_and_transposed_operands(rng, dtype, trans_a, trans_b):
    from numba import cuda

    from cnn_numba.kernels.cuda.gemm import matmul

    m, n, k = 19, 17, 21  # no multiple of any tile
    a = random(rng, (k, m) if trans_a else (m, k), dtype)
    b = random(rng, (n, k) if trans_b else (k, n), dtype)
    c0 = random(rng, (m, n), dtype)
    ref = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    for accumulate in (False, True):
        c = cuda.to_device(c0)
        matmul(cuda.to_device(a), cuda.to_device(b), c, trans_a, trans_b, accumulate)
        got = c.copy_to_host()
        assert got.dtype == dtype
        R.assert_close(got, ref + c0 if accumulate else ref, dtype)


@pytest.mark.parametrize("m, n, k", [(2, 3, 64), (3, 1, 1), (1, 5, 0)], ids=["split-K", "vector", "K=0"])
def test_matmul_split_k_and_degenerate_sizes(rng, m, n, k):
    """A small output with a long K is cut into K slices summed in order; K = 0 writes zeros."""
    from numba import cuda

    from cnn_numba.kernels.cuda.gemm import matmul

    a, b = random(rng, (k, m), np.float32), random(rng, (k, n), np.float32)
    c = cuda.to_device(np.full((m, n), np.nan, np.float32))
    matmul(cuda.to_device(a), cuda.to_device(b), c, trans_a=True)
    R.assert_close(c.copy_to_host(), a.T.astype(np.float64) @ b, np.float32)


@pytest.mark.parametrize("xs", [(2, 3, 5), (4, 5), (0, 5)], ids=["3d", "2d", "no-rows"])
def test_linear_forward_and_grads(rng, xs):
    x, w, b = random(rng, xs, np.float32), random(rng, (3, 5), np.float32), random(rng, (3,), np.float32)
    out, (gx, gw, gb), gy = forward_backward(F.linear, (x, w, b), device="cuda")
    x2, gy2 = x.reshape(-1, 5).astype(np.float64), gy.reshape(-1, 3).astype(np.float64)
    R.assert_close(out, x.astype(np.float64) @ w.T + b, np.float32, "y")
    R.assert_close(gx, gy.astype(np.float64) @ w, np.float32, "gx")
    R.assert_close(gw, gy2.T @ x2, np.float32, "gw")
    R.assert_close(gb, gy2.sum(axis=0), np.float32, "gb")


# ----------------------------------------------------------------------------- real GPU sizes


@pytest.mark.skipif(CUDA_SIMULATED, reason="realistic sizes need a real GPU")
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", [
    ((8, 64, 28, 28), (64, 64, 3, 3), True, dict(padding=1)),
    ((4, 32, 30, 29), (32, 1, 3, 3), True, dict(groups=32, stride=2, padding=1)),
    ((2, 16, 33, 31), (96, 16, 5, 5), False, dict(stride=2, dilation=2, padding=(4, 3))),
], ids=["resnet", "depthwise", "wide"])
def test_conv2d_realistic_sizes(rng, case, algo):
    _check_conv(rng, case, np.float32, algo)


@pytest.mark.skipif(CUDA_SIMULATED, reason="realistic sizes need a real GPU")
def test_matmul_large(rng):
    from numba import cuda

    from cnn_numba.kernels.cuda.gemm import matmul

    a, b = random(rng, (1000, 777), np.float32), random(rng, (515, 777), np.float32)
    c = cuda.device_array((1000, 515), np.float32)
    matmul(cuda.to_device(a), cuda.to_device(b), c, trans_b=True)
    R.assert_close(c.copy_to_host(), a.astype(np.float64) @ b.T.astype(np.float64), np.float32)
