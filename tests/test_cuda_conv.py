"""CUDA convolution and matrix-product kernels (kernels/cuda/conv.py, gemm.py) on device
"cuda", through the public API, against the float64 references of tests/reference.py.

Under Numba's CUDA simulator every thread is a Python thread, so shapes are tiny there
(they still cross tile, chunk and split boundaries: the simulator's tiles are small);
on a real GPU the last tests add realistic sizes.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import cnn_numba.functional as F
import reference as R
from cnn_numba.backend import kernel
from conftest import CUDA_AVAILABLE, CUDA_SIMULATED, forward_backward, needs_cuda, random
from test_fusion import _bn_stats, _same_bits, non_finite_inputs  # the CPU fusion's test inputs and check

if CUDA_AVAILABLE:
    from cnn_numba.kernels.cuda import gemm

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
    ((1, 3, 3, 4), (3, 1, 3, 3), True, dict(groups=3, stride=2, padding=1, output_padding=1)),  # depthwise
]


# Depthwise layers (one input channel per group), for the table's 'depthwise' entry; its
# weight-gradient is direct's. Multipliers 1-3, widths not a multiple of its V = 4 outputs per
# thread (and below it), strides, dilation, 'same', an even kernel, padding wider than the
# kernel, and a dilation whose window lies wholly in the padding but for one tap.
DEPTHWISE_CASES = [
    ((2, 3, 7, 9), (3, 1, 3, 3), True, dict(groups=3, padding=1)),
    ((2, 2, 6, 5), (6, 1, 3, 2), False, dict(groups=2, stride=2, padding=(1, 0))),
    ((2, 4, 9, 3), (8, 1, 5, 3), True, dict(groups=4, stride=(3, 1), dilation=(1, 2), padding=2)),
    ((1, 2, 4, 4), (2, 1, 3, 3), True, dict(groups=2, padding="same", dilation=2)),
    ((1, 2, 5, 6), (4, 1, 4, 4), True, dict(groups=2, stride=2, padding=3)),
    ((2, 3, 1, 1), (3, 1, 3, 3), True, dict(groups=3, padding=10000, dilation=10000)),
]


def _depthwise(case) -> bool:
    """Whether a case's conv (a conv_transpose2d case's too: its w's second axis is then the
    conv's C/G as well) is depthwise: one input channel per group, G > 1."""
    return case[1][1] == 1 and case[3].get("groups", 1) > 1


def _with_algos(cases, ids, algos=ALGOS, runs_itself=False):
    """(case, algo) parameters: each algorithm on each case, but 'depthwise' on depthwise layers
    alone (elsewhere the table gives every pass to direct: the same test twice); with
    ``runs_itself``, only where the table runs the algorithm itself for the forward."""
    def runs(case, algo):
        if not runs_itself:
            return algo != "depthwise" or _depthwise(case)
        xs, ws, _, kw = case
        return kernel("conv2d_algorithms", "cuda")().pick(algo, _geom(xs, ws, kw), "forward").name == algo
    return [pytest.param(c, a, id=f"{i}-{a}") for c, i in zip(cases, ids) for a in algos if runs(c, a)]


GENERAL = [a for a in ALGOS if a != "depthwise"]  # the algorithms that take every layer


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


@pytest.mark.parametrize("case, algo", _with_algos(CASES, IDS))
def test_conv2d_forward_and_grads(rng, case, algo):
    _check_conv(rng, case, np.float32, algo)


@pytest.mark.parametrize("case, algo", _with_algos([CASES[i] for i in (3, 7)], ["strided", "depthwise"]))
def test_conv2d_float64(rng, case, algo):
    _check_conv(rng, case, np.float64, algo)


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=[f"dw{i}" for i in range(len(DEPTHWISE_CASES))])
def test_depthwise_forward_and_grads(rng, case):
    _check_conv(rng, case, np.float32, "depthwise")


def test_depthwise_launches_per_chunk_of_samples(rng, monkeypatch):
    """Past grid.y's limit of samples (here made 1) the depthwise kernel runs a launch per chunk."""
    from cnn_numba.kernels.cuda import conv_depthwise

    monkeypatch.setattr(conv_depthwise, "MAX_GRID", 1)
    _check_conv(rng, DEPTHWISE_CASES[1], np.float32, "depthwise")


def test_depthwise_runs_its_kernel_per_phase_and_leaves_the_weight_gradient_to_direct(rng, monkeypatch):
    """'depthwise' runs its own kernel for the forward (one launch) and the input-gradient (one
    per phase of gx: stride (2, 3), 6), direct's reduction for the weight-gradient; on a layer
    that is not depthwise, every pass is direct's."""
    from cnn_numba.kernels.cuda import launch

    launched = []
    record = launch.record
    monkeypatch.setattr(launch, "record", lambda k, args: (launched.append(k.fn.__name__), record and record(k, args)))
    x, w, b, kw = _inputs(rng, ((2, 3, 7, 8), (6, 1, 3, 3), True, dict(groups=3, stride=(2, 3), padding=1)),
                          np.float32)
    forward_backward(F.conv2d, (x, w, b), device="cuda", algo="depthwise", **kw)
    assert launched.count("_depthwise") == 1 + 6 and "_weight_partials" in launched, launched
    assert "_correlate" not in launched, launched
    del launched[:]
    x, w, b, kw = _inputs(rng, CASES[6], np.float32)  # groups of two input channels
    forward_backward(F.conv2d, (x, w, b), device="cuda", algo="depthwise", **kw)
    assert "_depthwise" not in launched and launched.count("_correlate") == 2, launched


def test_conv2d_auto_and_several_im2col_chunks(rng):
    """Five samples of columns are more than one im2col pass holds on the simulator."""
    _check_conv(rng, ((5, 2, 4, 4), (4, 1, 3, 3), True, dict(groups=2, padding=1)), np.float32, "im2col")
    _check_conv(rng, ((2, 2, 4, 4), (3, 2, 3, 3), True, dict(padding=1)), np.float32, "auto")


@pytest.mark.parametrize("algo", GENERAL)
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


@pytest.mark.parametrize("algo", GENERAL + ["auto"])
def test_conv2d_huge_dilation_runs_in_memory_of_the_output(rng, algo):
    """1x1 input, dilation = padding = 10000: a 1x1 output. Direct's shared patch cannot hold
    the receptive field, so its forward and input-gradient fall back to im2col, whose columns
    are C*KH*KW x OH*OW."""
    _check_conv(rng, ((2, 3, 1, 1), (4, 3, 3, 3), True, dict(padding=10000, dilation=10000)), np.float32, algo)


# ----------------------------------------------------------------------------- implicit GEMM and its tiles

# 19 output channels and K = 5*3*2 = 30 cross the simulator's 16-row tiles and 8-deep K steps
# with remainders; stride, dilation, asymmetric padding; then groups, whose weight-gradient
# (3 x 18 outputs per group, in one launch) the split test below cuts into K slices. The
# gathers carry each thread's row and pixel splits from K step to K step (gemm.py): these cross
# channels, taps, rows and samples on the way.
IMPLICIT_CASES = [
    ((2, 5, 7, 6), (19, 5, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))),
    ((3, 6, 5, 5), (9, 2, 3, 3), dict(groups=3, padding=1, dilation=2)),
    ((3, 4, 5, 5), (18, 4, 1, 1), dict(stride=2)),  # a 1x1 shortcut: every tap split is (c, 0, 0)
]


@pytest.mark.parametrize("case", IMPLICIT_CASES, ids=["remainders", "groups", "pointwise"])
@pytest.mark.parametrize("tile", [t.name for t in gemm.CANDIDATES] if CUDA_AVAILABLE else [])
def test_implicit_gemm_every_candidate_tile_all_passes(rng, case, tile):
    """conv_implicit's three launchers with each tile bench/gpu_sweep.py times, against the
    float64 references: every tile shape gives the same convolution."""
    from numba import cuda

    from cnn_numba import shapes
    from cnn_numba.kernels.cuda import conv_implicit as CI

    xs, ws, kw = case
    x, w, b = random(rng, xs, np.float32), random(rng, ws, np.float32), random(rng, ws[:1], np.float32)
    geom = shapes.conv2d_geom(xs, ws, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                              kw.get("groups", 1))
    gy = random(rng, geom.y_shape, np.float32)
    t = gemm.Tile.parse(tile)
    y, gx, gw = (cuda.device_array(s, np.float32) for s in (geom.y_shape, geom.x_shape, geom.w_shape))
    CI.forward(cuda.to_device(x), cuda.to_device(w), cuda.to_device(b), y, geom, tile=t)
    CI.backward_input(cuda.to_device(gy), cuda.to_device(w), gx, geom, tile=t)
    CI.backward_weight(cuda.to_device(x), cuda.to_device(gy), gw, geom, tile=t)
    R.assert_close(y.copy_to_host(), R.conv2d(x, w, b, **kw), np.float32, "y")
    ref_gx, ref_gw, _ = R.conv2d_grads(x, w, gy, **kw)
    R.assert_close(gx.copy_to_host(), ref_gx, np.float32, "gx")
    R.assert_close(gw.copy_to_host(), ref_gw, np.float32, "gw")


def test_implicit_gemm_weight_gradient_splits_k_in_order(rng, monkeypatch):
    """The weight-gradient's reduction over N*OH*OW is cut into K slices (partials summed by
    _sum_partials in slice order, no atomics): the split runs, and two runs agree bit for bit."""
    from cnn_numba.kernels.cuda import launch

    launched = []
    monkeypatch.setattr(launch, "record", lambda kernel, args: launched.append(kernel.fn.__name__))
    monkeypatch.setattr(gemm, "MIN_TILES", 64)  # its 6 tiles (3 groups x 1 x 2) too few, on any device
    monkeypatch.setattr(gemm, "MIN_SPLIT_K", 8)
    xs, ws, kw = IMPLICIT_CASES[1]
    x, w = random(rng, xs, np.float32), random(rng, ws, np.float32)
    runs = [forward_backward(F.conv2d, (x, w, None), device="cuda", algo="implicit_gemm", **kw)[1][1]
            for _ in range(2)]
    assert "_sum_partials" in launched and any(n.startswith("_conv_weight_") for n in launched), launched
    np.testing.assert_array_equal(runs[0], runs[1])


# The strided input-gradient, one product per phase of gx (conv_implicit's docstring): kernels 1-5,
# strides 2 and 3, dilation 1 and 2, padding 0-2, groups; odd sizes (phases of different sizes), a
# plane smaller than the stride (an empty phase plane), phases no tap reaches (a 1x1 stride-2
# kernel: 3 of 4; k 4 at stride 2 and dilation 2: the odd phases).
PHASE_CASES = [
    ((1, 2, 7, 5), (3, 2, 3, 3), dict(stride=2, padding=1)),
    ((1, 2, 8, 7), (2, 2, 5, 4), dict(stride=(3, 2), padding=(2, 1), dilation=(1, 2))),
    ((2, 4, 5, 6), (4, 2, 2, 3), dict(stride=3, groups=2, dilation=2)),
    ((1, 3, 2, 5), (2, 3, 3, 1), dict(stride=3, padding=(1, 0))),
    ((2, 3, 5, 4), (4, 3, 1, 1), dict(stride=2)),
    ((1, 4, 9, 7), (2, 2, 4, 2), dict(stride=2, padding=2, dilation=2, groups=2)),
    ((1, 2, 9, 8), (3, 2, 5, 5), dict(stride=2, padding=2)),
]


def _geom(xs, ws, kw):
    from cnn_numba import shapes
    return shapes.conv2d_geom(xs, ws, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                              kw.get("groups", 1))


def test_phase_taps_are_the_taps_that_land_on_each_phase():
    """kernels/index.py's ``phase_taps`` against brute force (every (o, a) with s*o - p + a*d = i)
    and against the CPU's per-tap plan (conv_stride1._axis_plan): the same taps per phase."""
    import itertools

    from cnn_numba.kernels.conv_stride1 import _axis_plan
    from cnn_numba.kernels.index import phase_taps

    for k, s, p, d, size in itertools.product(range(1, 6), range(1, 5), range(3), range(1, 4), (1, 2, 5, 8)):
        oh = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if oh < 1:
            continue
        out_phase = _axis_plan.py_func(k, s, p, d, size, oh, True)[0]
        for r in range(s):
            a0, step, taps, lead, dil, u = phase_taps.py_func(r, k, s, p, d, size)
            assert u == len(range(r, size, s))
            assert [a0 + j * step for j in range(taps)] == [a for a in range(k) if out_phase[a] == r]
            for i in range(r, size, s):  # the phase's correlation reads what gx[i] sums, no more
                want = sorted((o, a) for o in range(oh) for a in range(k) if s * o - p + a * d == i)
                got = sorted((o, a0 + (taps - 1 - t) * step) for t in range(taps)
                             for o in [(i - r) // s - lead + t * dil] if 0 <= o < oh)
                assert got == want, (k, s, p, d, size, r, i)


@pytest.mark.parametrize("algo", ["implicit_gemm", "direct"])
@pytest.mark.parametrize("case", PHASE_CASES, ids=[f"phase{i}" for i in range(len(PHASE_CASES))])
def test_strided_input_gradient_by_phases(rng, case, algo):
    """implicit_gemm's products and direct's correlations per phase of gx, each phase with only
    its taps: every element of gx written (the zeros of the phases no tap reaches too)."""
    from numba import cuda

    xs, ws, kw = case
    geom = _geom(xs, ws, kw)
    x, w, gy = random(rng, xs, np.float32), random(rng, ws, np.float32), random(rng, geom.y_shape, np.float32)
    gx = cuda.device_array(geom.x_shape, np.float32)
    gx[:] = np.nan
    kernel("conv2d_algorithms", "cuda")().by_name[algo].run("backward_input", geom, cuda.to_device(gy),
                                                             cuda.to_device(w), gx)
    R.assert_close(gx.copy_to_host(), R.conv2d_grads(x, w, gy, **kw)[0], np.float32, "gx")


@pytest.mark.parametrize("case, products", [
    (((1, 2, 6, 6), (3, 2, 3, 3), dict(stride=2, padding=1)), [(2, 9, 3), (2, 9, 6), (2, 9, 6), (2, 9, 12)]),
    (((2, 3, 5, 4), (4, 3, 1, 1), dict(stride=2)), [(3, 2 * 3 * 2, 4)]),  # phase (0, 0) alone
    (((1, 4, 5, 5), (2, 2, 3, 3), dict(stride=(1, 2), padding=1, groups=2)), [(2, 15, 3), (2, 10, 6)]),
    (((1, 2, 6, 6), (3, 2, 3, 3), dict(padding=1)), [(2, 36, 27)]),  # stride 1: one product into gx
], ids=["3x3s2", "1x1s2", "3x3s1x2_groups", "stride1"])
def test_implicit_gemm_input_gradient_multiplies_no_upsampling_zeros(monkeypatch, rng, case, products):
    """The input-gradient launches one product (m, n, k) per phase of gx that a tap reaches, whose
    K sum to CO/G*KH*KW (the stride-1 product's alone), and gathers the phases into gx only when
    there are several."""
    from numba import cuda

    from cnn_numba.kernels.cuda import conv_implicit as CI
    from cnn_numba.kernels.cuda import launch

    xs, ws, kw = case
    geom = _geom(xs, ws, kw)
    ran, launched = [], []
    product = gemm.product
    monkeypatch.setattr(gemm, "product", lambda kind, tile, m, n, k, *a, **k_: (ran.append((m, n, k)),
                                                                               product(kind, tile, m, n, k, *a, **k_)))
    record = launch.record
    monkeypatch.setattr(launch, "record", lambda kernel, args: (launched.append(kernel.fn.__name__),
                                                                record and record(kernel, args)))
    gy, w = random(rng, geom.y_shape, np.float32), random(rng, ws, np.float32)
    gx = cuda.device_array(geom.x_shape, np.float32)
    CI.backward_input(cuda.to_device(gy), cuda.to_device(w), gx, geom)
    assert ran == products and sum(k for _, _, k in ran) == geom.cog * geom.kh * geom.kw
    assert ("_from_phases" in launched) == (geom.sh * geom.sw > 1), launched
    R.assert_close(gx.copy_to_host(), R.conv2d_grads(random(rng, xs), w, gy, **kw)[0], np.float32, "gx")


@pytest.mark.parametrize("case, taps", [
    (((1, 2, 6, 6), (3, 2, 3, 3), dict(stride=2, padding=1)), [(1, 1), (1, 2), (2, 1), (2, 2)]),
    (((2, 3, 5, 4), (4, 3, 1, 1), dict(stride=2)), [(1, 1), (1, 0), (0, 1), (0, 0)]),
    # columns: dilation 2 at stride 2 puts every tap on the even phase, none on the odd one
    (((1, 2, 9, 8), (3, 2, 5, 4), dict(stride=(3, 2), dilation=(1, 2))), [(2, 4), (2, 0), (2, 4), (2, 0),
                                                                            (1, 4), (1, 0)]),
    (((1, 2, 6, 6), (3, 2, 3, 3), dict(padding=1)), [(3, 3)]),  # stride 1: one correlation, the whole kernel
], ids=["3x3s2", "1x1s2", "5x4s3x2d1x2", "stride1"])
def test_direct_input_gradient_multiplies_no_upsampling_zeros(monkeypatch, rng, case, taps):
    """The direct input-gradient launches one correlation per phase of gx (r-major) with that
    phase's (row taps, column taps), which sum to KH*KW over the phases."""
    from numba import cuda

    from cnn_numba.kernels.cuda import conv, launch

    xs, ws, kw = case
    geom = _geom(xs, ws, kw)
    launched = []
    record = launch.record
    monkeypatch.setattr(launch, "record", lambda k, args: (launched.append(args[10:12]) if k.fn is conv._correlate.fn
                                                            else None, record and record(k, args)))
    gy, w = random(rng, geom.y_shape, np.float32), random(rng, ws, np.float32)
    gx = cuda.device_array(geom.x_shape, np.float32)
    conv.TABLE.by_name["direct"].run("backward_input", geom, cuda.to_device(gy), cuda.to_device(w), gx)
    assert launched == taps and sum(a * b for a, b in launched) == geom.kh * geom.kw
    R.assert_close(gx.copy_to_host(), R.conv2d_grads(random(rng, xs), w, gy, **kw)[0], np.float32, "gx")


def test_implicit_gemm_leaves_depthwise_layers_to_direct():
    from cnn_numba import shapes
    from cnn_numba.kernels.conv_algos import PASSES

    table = kernel("conv2d_algorithms", "cuda")()
    depthwise = shapes.conv2d_geom((1, 4, 6, 6), (8, 1, 3, 3), 1, 1, 1, 4)
    grouped = shapes.conv2d_geom((1, 4, 6, 6), (8, 2, 3, 3), 1, 1, 1, 2)
    for p in PASSES:
        assert table.pick("implicit_gemm", depthwise, p).name == "direct"
        assert table.pick("implicit_gemm", grouped, p).name == "implicit_gemm"


def test_gemm_kernels_are_found_by_name_for_the_typecheck():
    """tests/cuda_typecheck.py looks each launched kernel up by module and name: the tile
    factory's kernels answer to theirs."""
    for tile in gemm.CANDIDATES:
        for kind in gemm.KINDS:
            k = getattr(gemm, f"_{kind}_{tile.name}")
            assert k is gemm.kernel(kind, tile) and k.py_func.__name__ == f"_{kind}_{tile.name}"
    with pytest.raises(AttributeError):
        gemm._conv_nonsense
    # ptxas refuses more than 48 KiB of static shared memory (bench/ptx_check.py found this one)
    assert gemm.Tile(128, 128, 16, 8, 8).fits(np.float32) and not gemm.Tile(128, 128, 16, 8, 8).fits(np.float64)
    assert all(gemm.DEFAULT.fits(d) for d in (np.float32, np.float64))
    # vectorised tiles: a name of their own, and only where each thread's share is whole runs of 4
    assert gemm.Tile.parse("128x128x8_8x8_v4") == gemm.Tile(128, 128, 8, 8, 8, vec=True)
    assert any(t.vec for t in gemm.CANDIDATES) and not gemm.DEFAULT.vec
    with pytest.raises(AssertionError):
        gemm.Tile(64, 64, 8, 4, 4, vec=True)  # 2 elements of each tile per thread
    # which operands run (bench/ptx_check.py expects 128-bit loads where one does): the views, but
    # conv_weight's A (K in panels)
    vec = replace(gemm.DEFAULT, vec=True)
    assert [gemm.vec_operands(k, vec) for k in ("gemm", "conv", "conv_weight")] == [(True, True), (True, False),
                                                                                     (False, False)]
    assert not any(gemm.vec_operands("gemm", gemm.DEFAULT))


# ----------------------------------------------------------------------------- per-shape choice


def test_gpu_tuner_times_each_algorithm_once_and_auto_runs_the_fastest(rng, monkeypatch, tmp_path):
    """CudaTuner (kernels/autotune.py) with a fake clock: the first 'auto' call of each pass
    times every algorithm of the CUDA table, later calls (and a fresh process, through the
    table file) run the fastest alone; explicit names still run; the simulator switches it off."""
    from cnn_numba.kernels import autotune
    from cnn_numba.kernels.conv_algos import PASSES, ConvAlgo

    table = kernel("conv2d_algorithms", "cuda")()
    tuner = table.tuner
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.FILE_ENV, str(tmp_path / "autotune.json"))
    assert isinstance(tuner, autotune.CudaTuner) and tuner._enabled() != CUDA_SIMULATED  # off on the simulator
    monkeypatch.setattr(tuner, "_enabled", lambda: True)
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    fake = {"direct": 3e-3, "im2col": 2e-3, "implicit_gemm": 1e-3}
    timed, ran = [], []

    def clock(name, run):
        run()
        timed.append(name)
        return fake[name]

    def spy(self, pass_, geom, *arrays, **kw):
        ran.append((self.name, pass_))
        return run(self, pass_, geom, *arrays, **kw)

    run = ConvAlgo.run
    monkeypatch.setattr(tuner, "clock", clock)
    monkeypatch.setattr(ConvAlgo, "run", spy)
    tuner.clear()
    try:
        x, w, b = random(rng, (2, 3, 5, 5), np.float32), random(rng, (4, 3, 3, 3), np.float32), None
        assert {table.policy(shapes_geom(x, w), p) for p in PASSES} == {"direct"}  # the rule's choice
        out, grads, gy = forward_backward(F.conv2d, (x, w, b), device="cuda", padding=1)
        # every pass timed every algorithm in rounds (at most REPEATS, within BUDGET_S)
        rounds = {timed.count(name) for name in fake}
        assert len(rounds) == 1 and len(PASSES) <= rounds.pop() <= len(PASSES) * autotune.REPEATS, timed
        R.assert_close(out, R.conv2d(x, w, padding=1), np.float32, "y")
        for fresh in (False, True):  # later calls; a fresh process reads the table file
            if fresh:
                tuner.clear()
            timed.clear(), ran.clear()
            forward_backward(F.conv2d, (x, w, b), device="cuda", padding=1)
            assert timed == [] and sorted(ran) == sorted(("implicit_gemm", p) for p in PASSES), ran
        ran.clear()
        forward_backward(F.conv2d, (x, w, b), device="cuda", padding=1, algo="direct")
        assert {n for n, _ in ran} == {"direct"}

        # The rule's choice stands unless another is MARGIN faster.
        tuner.clear()
        (tmp_path / "autotune.json").unlink()
        fake.update(direct=1e-3, implicit_gemm=1e-3 * (1 - autotune.MARGIN / 2))
        forward_backward(F.conv2d, (x, w, b), device="cuda", padding=1)  # times them
        ran.clear()
        forward_backward(F.conv2d, (x, w, b), device="cuda", padding=1)
        assert sorted(ran) == sorted(("direct", p) for p in PASSES), ran
    finally:
        tuner.clear()


def shapes_geom(x, w):
    from cnn_numba import shapes
    return shapes.conv2d_geom(x.shape, w.shape, 1, 1, 1, 1)


def test_gpu_sweep_script_records_every_algorithm_and_tile(tmp_path):
    """bench/gpu_sweep.py (the GPU session's tile and algorithm sweep) on its tiny shapes: a
    row per algorithm and per candidate tile for each pass, and per tile for the GEMM, none
    failed, each output equal to the reference case's."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_sweep

    path = tmp_path / "sweep.json"
    assert gpu_sweep.main(["--tiny", "--shapes", "tiny_grouped_strided", "--reps", "1", "--json", str(path)]) == 0
    rec = json.loads(path.read_text())
    rows = rec["conv"] + rec["gemm"]
    assert not [r for r in rows if "error" in r]
    tiles = [t.name for t in gemm.CANDIDATES]
    assert any(t.vec for t in gemm.CANDIDATES)
    for p in ("fwd", "gx", "gw"):
        mine = [r for r in rec["conv"] if r["pass"] == p]
        assert [r["algo"] for r in mine if r["kind"] == "algo"] == list(ALGOS)
        # the weight-gradient's operands stay scalar in a vectorised tile: its twin is not timed again
        want = [t.name for t in gemm.CANDIDATES if not (p == "gw" and t.vec)]
        assert [r["tile"] for r in mine if r["kind"] == "tile"] == want
    assert sorted(r["tile"] for r in rec["gemm"] if r["kind"] == "tile") == sorted(tiles)
    for section in ("conv", "gemm"):  # the untried vectorised kernels run after every other case
        vec = [r.get("tile", "").endswith("_v4") for r in rec[section]]
        assert any(vec) and vec == sorted(vec), section
    # 'depthwise' gives way to direct on a layer that is not depthwise: direct's row again, untimed
    same = [(r["pass"], r["algo"], r["same_as"]) for r in rows if "same_as" in r]
    assert same == [(p, "depthwise", "direct") for p in ("fwd", "gx", "gw")], same
    diffs = [r["max_rel_diff"] for r in rows if "max_rel_diff" in r]
    assert len(diffs) == len(rows) - 3 - 1 - len(same) and max(diffs) < 1e-5  # all but each reference case
    assert all(r["device_ms_min"] is not None and r["wall_ms_median"] > 0 for r in rows)


# ----------------------------------------------------------------------------- conv2d -> batch norm -> relu, fused

# (x shape, w shape, conv bias?, conv2d keyword arguments): groups with padding; stride, odd
# and non-square sizes, no conv bias, one sample (its GEMM is split over K on the simulator,
# the epilogue applied to the slices' sums); 19 output channels (a 16-row GEMM tile and a
# remainder, four 4-channel direct blocks and one of 3) with dilation. Each by every algorithm.
FUSED_CASES = [
    ((2, 4, 5, 5), (6, 2, 3, 3), True, dict(groups=2, padding=1)),
    ((1, 3, 7, 6), (5, 3, 3, 2), False, dict(stride=(2, 1), padding=(1, 2))),
    ((1, 3, 5, 5), (19, 3, 3, 3), True, dict(padding=2, dilation=2)),
    ((2, 4, 5, 6), (8, 1, 3, 3), True, dict(groups=4, padding=1, stride=(1, 2))),  # depthwise
]


def _cuda(*arrays):
    import cnn_numba as cn
    return [None if a is None else cn.tensor(a, device="cuda") for a in arrays]


@pytest.fixture
def fused_calls(monkeypatch):
    """(calls, launched): the relu flag of each fused conv so far (calls of Conv2dEpilogue's
    forward), and the names of the CUDA kernels launched (still recorded for the typecheck)."""
    from cnn_numba.kernels.cuda import launch

    calls, launched = [], []
    inner = F.Conv2dEpilogue.forward

    def forward(self, *args, **kwargs):
        calls.append(kwargs["epilogue"][1])
        return inner(self, *args, **kwargs)

    def record(kernel, args, recorded=launch.record):
        launched.append(kernel.fn.__name__)
        if recorded is not None:  # conftest's, for the typecheck
            recorded(kernel, args)

    monkeypatch.setattr(F.Conv2dEpilogue, "forward", forward)
    monkeypatch.setattr(launch, "record", record)
    return calls, launched


def _unfused_cuda(y, stats, relu):
    """Eval batch_norm and relu of the CUDA conv output y, one by one on the device."""
    if stats is not None:
        y = F.batch_norm(y, *_cuda(*stats), training=False, eps=1e-5)
    return (F.relu(y) if relu else y).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case, algo", _with_algos(FUSED_CASES, [f"case{i}" for i in range(len(FUSED_CASES))],
                                                runs_itself=True))
def test_conv2d_bn_relu_fused_equals_unfused(rng, algo, case, dtype, fused_calls):
    """conv2d_bn_relu on "cuda" under no_grad runs the conv with the batch norm and relu in its
    store (no batch-norm kernel runs) and gives the bits of conv2d, batch_norm (eval), relu one
    by one on the device, for each algorithm; close to the float64 reference."""
    import cnn_numba as cn
    from cnn_numba import shapes

    calls, launched = fused_calls
    xs, ws, has_bias, kw = case
    geom = shapes.conv2d_geom(xs, ws, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                              kw.get("groups", 1))
    x, w = random(rng, xs, dtype), random(rng, ws, dtype)
    b = random(rng, ws[:1], dtype) if has_bias else None
    xd, wd, bd = _cuda(x, w, b)
    assert F._fuses("conv2d_epilogue", "cuda", xd, wd, bd)
    with cn.no_grad():
        del launched[:]
        conv = F.conv2d(xd, wd, bd, algo=algo, **kw)
        split = "_sum_partials" in launched  # K cut into slices: the fused sums must follow
        assert split == (case is FUSED_CASES[1] and algo != "direct")  # one sample, no bias: the simulator splits
        ref_conv = R.conv2d(x, w, b, **kw)
        for bn, relu in (("affine", True), ("affine", False), ("plain", True), (None, True)):
            stats = None if bn is None else _bn_stats(rng, ws[0], dtype, affine=bn == "affine")
            want = _unfused_cuda(conv, stats, relu)
            del launched[:]
            got = F.conv2d_bn_relu(xd, wd, bd, bn=None if stats is None else (*_cuda(*stats), 1e-5), with_relu=relu,
                                   algo=algo, **kw).numpy()
            assert calls[-1] is relu and not any(n in ("_bn_forward", "_relu_forward") for n in launched), launched
            assert ("_sum_partials_epilogue" in launched) == split, launched
            assert _same_bits(got, want), (bn, relu, np.abs(got - want).max())
            ref = ref_conv if stats is None else R.batch_norm_eval(ref_conv, *stats)
            R.assert_close(got, R.relu(ref) if relu else ref, dtype, f"{bn} relu={relu}")
    assert len(calls) == 4


@pytest.mark.parametrize("algo", GENERAL)
def test_conv2d_bn_relu_non_finite_and_signed_zeros(rng, algo):
    """inf and NaN inputs, and -0.0 outputs, come out of the fused pass as out of the three ops."""
    import cnn_numba as cn

    x, w, stats = non_finite_inputs(rng, (2, 3, 6, 6), 5)
    xd, wd = _cuda(x, w)
    with cn.no_grad():
        conv = F.conv2d(xd, wd, padding=1, algo=algo)
        for relu in (False, True):
            want = _unfused_cuda(conv, stats, relu)
            got = F.conv2d_bn_relu(xd, wd, padding=1, bn=(*_cuda(*stats), 1e-5), with_relu=relu, algo=algo).numpy()
            assert _same_bits(got, want), relu
            assert np.isnan(got).any()


def test_conv2d_bn_relu_records_the_unfused_ops_when_grad_is_on(rng, fused_calls, monkeypatch):
    """With a graph recorded the CUDA conv2d_bn_relu is the three ops (differentiable), with
    the fused op's bits; an eval-mode Sequential under no_grad fuses, bit for bit."""
    import cnn_numba as cn
    from cnn_numba import nn
    from cnn_numba.nn import module as M

    calls, _ = fused_calls
    stats = (*_cuda(*_bn_stats(rng, 4, np.float32)), 1e-5)
    xd, = _cuda(random(rng, (2, 3, 5, 5), np.float32))
    wt = cn.tensor(random(rng, (4, 3, 3, 3), np.float32), device="cuda", requires_grad=True)
    with cn.no_grad():
        fused = F.conv2d_bn_relu(xd, wt, padding=1, bn=stats, with_relu=True).numpy()
    y = F.conv2d_bn_relu(xd, wt, padding=1, bn=stats, with_relu=True)
    assert len(calls) == 1 and y.requires_grad and _same_bits(y.numpy(), fused)
    y.sum().backward()
    assert wt.grad is not None

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).to("cuda").eval()
    with cn.no_grad():
        got = model(xd).numpy()
        assert len(calls) == 2
        monkeypatch.setattr(M, "FUSE", False)
        off = model(xd).numpy()
    assert len(calls) == 2 and _same_bits(got, off)


# ----------------------------------------------------------------------------- conv_transpose2d


@pytest.mark.parametrize("case, algo", _with_algos(TRANSPOSED, [f"case{i}" for i in range(len(TRANSPOSED))]))
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


# ----------------------------------------------------------------------------- vectorised tiles

# gemm.py's vectorised tiles (its "Vectors") against their scalar twin, bit for bit (the same
# products in the same order) and against float64, through views that send _fetch_runs down
# both paths: (m, n, k, A's and B's offset, their rows' padding, B's (and a transposed A's)
# panels (width, stride) or None, the device arrays one element off their 16-byte alignment).
VEC_CASES = {
    "aligned": (16, 32, 24, 0, 0, 0, 0, None, False),   # every run one 128-bit load
    "odd": (19, 17, 21, 0, 0, 0, 0, None, False),       # rows 21, 19, 17 long: runs on some rows, tile edges
    "offset": (12, 16, 8, 1, 4, 3, 0, None, False),     # views at offsets 1 and 3: no run aligned
    "shifted": (12, 16, 8, 0, 0, 0, 0, None, True),     # the arrays' data one element off 16 bytes
    "panels": (8, 12, 16, 0, 0, 0, 0, (6, 8), False),   # runs across a panel's end, or off 16 bytes in the next
}


def _stored(rng, rows, cols, off, ld, panel, dtype):
    """A flat buffer holding S (rows, cols) at ``off``, rows ``ld`` apart, its columns cut into
    ``panel`` = (width, stride) (or None), as gemm.view reads it; and S."""
    width, stride = panel or (gemm.NO_PANEL, 0)
    q = np.arange(cols)
    idx = off + np.arange(rows)[:, None] * ld + (q // width) * stride + q % width
    buf = random(rng, (int(idx.max()) + 1,), dtype)
    return buf, buf[idx]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(VEC_CASES), ids=list(VEC_CASES))
def test_vectorised_tile_same_bits_as_scalar(rng, monkeypatch, case, dtype):
    from numba import cuda

    m, n, k, off_a, pad_a, off_b, pad_b, panel, shifted = VEC_CASES[case]
    vec = replace(gemm.DEFAULT, vec=True)
    loads = []
    if CUDA_SIMULATED:  # count the 128-bit loads (a GPU runs compiled code)
        inner = gemm.load4
        monkeypatch.setattr(gemm, "load4", lambda arr, i: (loads.append(i), inner(arr, i))[1])

    def device(buf):
        if not shifted:
            return cuda.to_device(buf)
        return cuda.to_device(np.concatenate([buf[:1], buf]))[1:]  # (fresh allocations are 16-byte aligned)

    for trans_a in (False, True):
        for trans_b in (False, True):
            pa, pb = panel if trans_a else None, None if trans_b else panel  # panels where x is the inner index
            (ra, ca), (rb, cb) = ((k, m) if trans_a else (m, k)), ((n, k) if trans_b else (k, n))
            a, sa = _stored(rng, ra, ca, off_a, ca + pad_a if pa is None else 2 * ca + pad_a, pa, dtype)
            b, sb = _stored(rng, rb, cb, off_b, cb + pad_b if pb is None else 2 * cb + pad_b, pb, dtype)
            ref = (sa.T if trans_a else sa).astype(np.float64) @ (sb.T if trans_b else sb)
            va = gemm.view(ca + pad_a if pa is None else 2 * ca + pad_a, off_a, trans_a, *(pa or (gemm.NO_PANEL, 0)))
            vb = gemm.view(cb + pad_b if pb is None else 2 * cb + pad_b, off_b, trans_b, *(pb or (gemm.NO_PANEL, 0)))
            outs = []
            for tile in (gemm.DEFAULT, vec):
                c = cuda.to_device(np.full((m, n), np.nan, dtype))
                gemm.gemm(m, n, k, device(a), va, device(b), vb, c.reshape(m * n), gemm.view(n), tile=tile)
                outs.append(c.copy_to_host())
            what = f"{case} trans_a={trans_a} trans_b={trans_b}"
            np.testing.assert_array_equal(outs[1], outs[0], what)
            R.assert_close(outs[1], ref, dtype, what)
    if CUDA_SIMULATED:
        bm, bn = gemm.DEFAULT.bm, gemm.DEFAULT.bn
        if case == "aligned":  # every element of both operands by runs, in each of the 4 products
            assert len(loads) == 4 * (n // bn * m * k + m // bm * k * n) // 4
        elif case in ("offset", "shifted"):
            assert not loads
        else:
            assert loads, "no run was aligned"


@pytest.mark.parametrize("case", [0, 2], ids=["remainders", "pointwise"])
def test_vectorised_tile_implicit_gemm_same_bits(rng, case):
    """The conv kinds stage their A (the weight, a plain view) in runs too: the forward and
    input-gradient of a vectorised tile equal its scalar twin's bit for bit (K = 30 rows of
    the weight, runs on every other one; K = 4, every run aligned)."""
    from numba import cuda

    from cnn_numba import shapes
    from cnn_numba.kernels.cuda import conv_implicit as CI

    xs, ws, kw = IMPLICIT_CASES[case]
    x, w = random(rng, xs, np.float32), random(rng, ws, np.float32)
    geom = shapes.conv2d_geom(xs, ws, kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1),
                              kw.get("groups", 1))
    gy = random(rng, geom.y_shape, np.float32)
    outs = []
    for tile in (gemm.DEFAULT, replace(gemm.DEFAULT, vec=True)):
        y, gx = cuda.device_array(geom.y_shape, np.float32), cuda.device_array(geom.x_shape, np.float32)
        CI.forward(cuda.to_device(x), cuda.to_device(w), None, y, geom, tile=tile)
        CI.backward_input(cuda.to_device(gy), cuda.to_device(w), gx, geom, tile=tile)
        outs.append((y.copy_to_host(), gx.copy_to_host()))
    for got, ref in zip(outs[1], outs[0]):
        np.testing.assert_array_equal(got, ref)
    R.assert_close(outs[1][0], R.conv2d(x, w, None, **kw), np.float32, "y")


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
@pytest.mark.parametrize("case, algo", _with_algos([
    ((8, 64, 28, 28), (64, 64, 3, 3), True, dict(padding=1)),
    ((4, 32, 30, 29), (32, 1, 3, 3), True, dict(groups=32, stride=2, padding=1)),
    ((2, 16, 33, 31), (96, 16, 5, 5), False, dict(stride=2, dilation=2, padding=(4, 3))),
], ["resnet", "depthwise", "wide"]))
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
