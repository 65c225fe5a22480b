"""conv2d forward and gradients against the float64 reference, every algorithm and dtype."""
from __future__ import annotations

import numba
import numpy as np
import pytest
from scipy import signal

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba.kernels import conv as conv_kernels
from cnn_numba.kernels import conv_stride1
from cnn_numba.kernels.conv_algos import FLAT, TABLE, auto_algo
from cnn_numba.shapes import conv2d_geom
import reference as R
from conftest import ALGOS, CUDA_AVAILABLE, DTYPES, NAMED_ALGOS, assert_matches_reference, forward_backward, random

# (x shape, w shape, bias?, conv2d keyword arguments)
CASES = [
    ((1, 1, 1, 1), (1, 1, 1, 1), True, {}),                                   # 1x1 everything
    ((2, 3, 1, 1), (2, 3, 3, 3), True, dict(padding=1)),                      # 1x1 input, padded
    ((1, 2, 3, 4), (3, 2, 5, 4), True, dict(padding=(1, 0))),                 # kernel == padded input
    ((2, 2, 7, 8), (3, 2, 2, 2), False, dict(stride=3)),                      # stride > kernel
    ((2, 3, 6, 7), (4, 3, 3, 2), True, dict(stride=(2, 1), padding=(1, 2))),  # non-square all over
    ((1, 2, 5, 6), (3, 2, 3, 3), True, dict(padding="same")),
    ((2, 2, 5, 4), (2, 2, 4, 2), True, dict(padding="same")),                 # even kernel: extra pad bottom/right
    ((1, 2, 6, 5), (2, 2, 2, 4), False, dict(padding="same", dilation=(3, 1))),
    ((1, 1, 4, 5), (1, 1, 2, 3), True, dict(padding="valid")),
    ((2, 2, 7, 7), (2, 2, 3, 3), True, dict(dilation=2, padding=2)),
    ((1, 3, 9, 8), (2, 3, 3, 2), True, dict(stride=(2, 3), dilation=(2, 3), padding=(1, 1))),
    ((2, 4, 5, 5), (6, 2, 3, 3), True, dict(groups=2, padding=1)),
    ((2, 3, 5, 6), (6, 1, 3, 3), True, dict(groups=3, stride=2)),             # depthwise, multiplier 2
    ((1, 4, 6, 6), (4, 1, 3, 3), False, dict(groups=4, padding=1)),           # depthwise
    ((2, 4, 3, 5), (4, 2, 1, 1), False, dict(groups=2)),                      # grouped pointwise
    ((1, 2, 4, 4), (1, 2, 3, 3), False, dict(stride=2)),
    ((1, 1, 5, 5), (1, 1, 3, 3), True, dict(stride=4)),                       # a single output
    ((1, 1, 2, 3), (2, 1, 2, 2), True, dict(padding=3)),                      # padding wider than the kernel
    ((1, 2, 3, 3), (1, 2, 1, 1), True, dict(stride=5)),                       # stride > input
    ((2, 2, 5, 5), (8, 2, 3, 3), True, dict(padding=1)),                      # wide enough for 'auto' to pick im2col
    ((5, 2, 30, 30), (4, 1, 3, 3), True, dict(groups=2, padding=1)),          # several im2col chunks (keep last)
]
IDS = [f"case{i}" for i in range(len(CASES))]


def _inputs(rng, case, dtype):
    xs, ws, bias, kw = case
    b = random(rng, (ws[0],), dtype) if bias else None
    return random(rng, xs, dtype), random(rng, ws, dtype), b, kw


# ----------------------------------------------------------------------------- the reference itself


def test_reference_single_channel_matches_scipy(rng):
    for (h, w, kh, kw, p) in [(5, 7, 3, 2, 0), (4, 4, 4, 4, 1), (6, 3, 1, 3, 2)]:
        x, k = rng.standard_normal((h, w)), rng.standard_normal((kh, kw))
        expected = signal.correlate2d(np.pad(x, p), k, mode="valid")
        R.assert_close(R.conv2d(x[None, None], k[None, None], padding=p)[0, 0], expected)
    # dilation: correlate with the kernel spread out by zeros
    x, k = rng.standard_normal((9, 8)), rng.standard_normal((3, 2))
    spread = np.zeros((5, 4))
    spread[::2, ::3] = k
    R.assert_close(R.conv2d(x[None, None], k[None, None], dilation=(2, 3))[0, 0],
                   signal.correlate2d(x, spread, mode="valid"))
    # stride: every other output of the stride-1 correlation
    R.assert_close(R.conv2d(x[None, None], k[None, None], stride=(2, 3))[0, 0],
                   signal.correlate2d(x, k, mode="valid")[::2, ::3])


@pytest.mark.parametrize("case", CASES[:-1], ids=IDS[:-1])
def test_reference_einsum_matches_loops(rng, case):
    x, w, b, kw = _inputs(rng, case, np.float64)
    R.assert_close(R.conv2d(x, w, b, **kw), R.conv2d_loops(x, w, b, **kw))


@pytest.mark.parametrize("case", [c for c in CASES if np.prod(c[0]) < 200], ids=lambda c: str(c[3]))
def test_reference_grads_match_finite_differences(rng, case):
    x, w, b, kw = _inputs(rng, case, np.float64)
    gy = rng.standard_normal(R.conv2d(x, w, b, **kw).shape)
    gx, gw, gb = R.conv2d_grads(x, w, gy, **kw)
    R.assert_close(gx, R.numerical_grad(lambda v: R.conv2d(v, w, b, **kw), x, gy), what="gx", dtype=np.float32)
    R.assert_close(gw, R.numerical_grad(lambda v: R.conv2d(x, v, b, **kw), w, gy), what="gw", dtype=np.float32)
    if b is not None:
        R.assert_close(gb, R.numerical_grad(lambda v: R.conv2d(x, w, v, **kw), b, gy), what="gb", dtype=np.float32)


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own padded copy
@pytest.mark.parametrize("case", CASES[:-1], ids=IDS[:-1])
def test_reference_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    x, w, b, kw = _inputs(rng, case, np.float64)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    gy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(gy))
    R.assert_close(ty.detach().numpy(), R.conv2d(x, w, b, **kw))
    gx, gw, gb = R.conv2d_grads(x, w, gy, **kw)
    R.assert_close(tx.grad.numpy(), gx)
    R.assert_close(tw.grad.numpy(), gw)
    if b is not None:
        R.assert_close(tb.grad.numpy(), gb)


# ----------------------------------------------------------------------------- the package


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv2d_forward_and_grads(rng, case, dtype, algo, device):
    x, w, b, kw = _inputs(rng, case, dtype)
    out, (gx, gw, gb), gy = forward_backward(F.conv2d, (x, w, b), algo=algo, device=device, **kw)
    assert out.dtype == dtype
    R.assert_close(out, R.conv2d(x, w, b, **kw), dtype, "y")
    rgx, rgw, rgb = R.conv2d_grads(x, w, gy, **kw)
    R.assert_close(gx, rgx, dtype, "gx")
    R.assert_close(gw, rgw, dtype, "gw")
    assert gx.dtype == dtype and gw.dtype == dtype
    if b is not None:
        R.assert_close(gb, rgb, dtype, "gb")


@pytest.mark.parametrize("case", [CASES[i] for i in (4, 6, 10, 12, 18)], ids=lambda c: str(c[3]))
def test_algorithms_agree(rng, case):
    x, w, b, kw = _inputs(rng, case, np.float32)
    (o1, g1, _), *rest = [forward_backward(F.conv2d, (x, w, b), algo=algo, seed=1, **kw) for algo in NAMED_ALGOS]
    for o2, g2, _ in rest:
        R.assert_close(o1, o2, np.float32, "y")
        for a, bb in zip(g1, g2):
            if a is not None:
                R.assert_close(a, bb, np.float32, "grad")


# The stride-1 direct kernels pass over the input with three taps for four output channels
# at a time, padding the taps and each group's channels with zero weights: every remainder.
FLAT_CASES = [
    ((2, 3, 6, 7), (1, 3, 1, 1), dict()),                                  # 1 tap, 1 channel
    ((1, 2, 5, 6), (2, 2, 1, 2), dict(padding=(0, 1))),                   # 2 taps
    ((2, 2, 6, 5), (5, 2, 2, 2), dict(padding=1)),                        # 4 taps, quad + 1
    ((1, 4, 7, 6), (6, 2, 2, 3), dict(groups=2, padding=(1, 2))),         # 6 taps, 3 per group
    ((2, 6, 8, 8), (7, 6, 3, 3), dict(padding=(2, 0), dilation=(1, 2))),  # quad + 3
    ((1, 2, 9, 9), (8, 1, 5, 5), dict(groups=2, padding=2)),              # 25 taps
    ((1, 3, 7, 7), (3, 3, 3, 1), dict(padding=(4, 0))),                   # padding past the kernel
    ((7, 2, 15, 15), (5, 2, 3, 3), dict(padding=1)),                      # samples in runs of 4, 3
    ((5, 4, 18, 18), (6, 2, 3, 3), dict(groups=2, padding=1)),            # runs of 2, 2, 1 per group
    # shared padding (kernels/conv_stride1.py): rows wq = w + max(pl, pr) wide, samples hq apart
    ((61, 1, 8, 8), (2, 1, 3, 3), dict(padding=1)),                       # runs of 12: a slot's last is partial
    ((3, 2, 9, 1), (3, 2, 3, 3), dict(padding=(1, 2))),                   # 1-pixel-wide input, padding 2 > k/2
    ((4, 2, 6, 5), (3, 2, 4, 2), dict(padding="same")),                   # pads 1, 2 and 0, 1: unequal
    ((3, 2, 7, 6), (4, 2, 3, 3), dict(padding=3, dilation=2)),            # padding past the dilated footprint/2
    ((2, 2, 3, 2), (2, 2, 2, 2), dict(padding=4)),                        # padding past the kernel
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", FLAT_CASES, ids=[str(c[1]) for c in FLAT_CASES])
def test_stride1_direct_every_tap_and_channel_remainder(rng, case, dtype):
    xs, ws, kw = case
    x, w, b = random(rng, xs, dtype), random(rng, ws, dtype), random(rng, ws[:1], dtype)
    assert_matches_reference(F.conv2d, R.conv2d, R.conv2d_grads, (x, w, b), dtype, "direct", **kw)


# The flat kernels at stride > 1 (kernels/conv_stride1.py): the forward and weight-gradient
# on the input's polyphase planes, the input-gradient one stride-1 correlation per phase of
# gx. Strides 2 and 3, dilation, every padding below the kernel, odd and even sizes, groups.
STRIDED_CASES = [
    ((2, 3, 9, 8), (4, 3, 3, 3), dict(stride=2, padding=1)),                    # resnet_down's, odd and even
    ((3, 4, 8, 8), (5, 4, 3, 3), dict(stride=2)),                                # padding 0
    ((2, 2, 10, 9), (6, 2, 3, 3), dict(stride=2, padding=2)),                    # padding k - 1
    ((2, 4, 11, 10), (4, 2, 4, 4), dict(stride=2, padding=(1, 3), groups=2)),    # 4x4: 4 taps per gx phase
    ((1, 3, 13, 12), (4, 3, 3, 3), dict(stride=3, padding=(2, 1))),              # stride 3
    ((2, 2, 12, 11), (3, 2, 3, 3), dict(stride=2, dilation=2, padding=2)),       # every tap in one phase
    ((1, 2, 13, 14), (3, 2, 3, 2), dict(stride=(3, 2), dilation=(2, 3), padding=(0, 2))),
    ((2, 3, 9, 9), (3, 1, 5, 5), dict(stride=2, padding=4, groups=3)),           # depthwise 5x5, padding past k/2
    ((2, 3, 7, 6), (5, 3, 1, 1), dict(stride=2)),                                # 1x1: one phase read
    ((2, 2, 5, 5), (2, 2, 2, 2), dict(stride=3)),                                # k < s: gx phases with no tap
    ((1, 2, 4, 3), (2, 2, 3, 3), dict(stride=3, padding=2, dilation=2)),         # a 1-pixel output
    ((7, 2, 34, 34), (4, 2, 3, 3), dict(stride=2, padding=1)),                   # samples in runs of 3, 3, 1
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", STRIDED_CASES, ids=[str(c[2]) for c in STRIDED_CASES])
def test_strided_direct_runs_the_flat_kernels(rng, case, bias, dtype):
    xs, ws, kw = case
    geom = conv2d_geom(xs, ws, kw["stride"], kw.get("padding", 0), kw.get("dilation", 1), kw.get("groups", 1))
    for p in ("forward", "backward_input", "backward_weight"):
        assert TABLE.pick("direct", geom, p).special is FLAT and FLAT.supports(geom, p), p
    x, w = random(rng, xs, dtype), random(rng, ws, dtype)
    b = random(rng, ws[:1], dtype) if bias else None
    assert_matches_reference(F.conv2d, R.conv2d, R.conv2d_grads, (x, w, b), dtype, "direct", **kw)


@pytest.mark.parametrize("algo", NAMED_ALGOS)
@pytest.mark.parametrize("case", [CASES[i] for i in (2, 5, 7, 12, 13, 17)], ids=lambda c: str(c[3]))
def test_conv2d_grads_match_finite_differences(rng, case, algo):
    """The package's own float64 forward, differentiated numerically."""
    x, w, b, kw = _inputs(rng, case, np.float64)
    _, (gx, gw, gb), gy = forward_backward(F.conv2d, (x, w, b), algo=algo, **kw)

    def fwd(xx, ww, bb):
        with cn.no_grad():
            return F.conv2d(xx, ww, bb, algo=algo, **kw).numpy()

    tol = np.float32  # finite differences carry ~1e-8 error: use the float32 tolerance
    R.assert_close(gx, R.numerical_grad(lambda v: fwd(v, w, b), x, gy), tol, "gx")
    R.assert_close(gw, R.numerical_grad(lambda v: fwd(x, v, b), w, gy), tol, "gw")
    if b is not None:
        R.assert_close(gb, R.numerical_grad(lambda v: fwd(x, w, v), b, gy), tol, "gb")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_batch_zero(rng, dtype, algo, bias):
    x = np.zeros((0, 4, 5, 6), dtype)
    w = random(rng, (6, 2, 3, 2), dtype)
    b = random(rng, (6,), dtype) if bias else None
    out, (gx, gw, gb), _ = forward_backward(F.conv2d, (x, w, b), algo=algo, groups=2, stride=(2, 1), padding=1)
    assert out.shape == (0, 6, 3, 7) and out.dtype == dtype
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    if bias:
        np.testing.assert_array_equal(gb, np.zeros_like(b))


@pytest.mark.parametrize("algo", ALGOS)
def test_conv2d_accepts_non_contiguous_and_read_only_arrays(rng, algo):
    x = rng.standard_normal((2, 6, 9, 11))[:, ::2, 1::2, ::-1]          # strided, negative stride
    x.flags.writeable = False
    w = np.asfortranarray(rng.standard_normal((4, 3, 3, 2)))
    wt = rng.standard_normal((4, 2, 3, 3)).transpose(0, 3, 2, 1)        # permuted strides
    b = rng.standard_normal(8)[::2]
    b.flags.writeable = False
    ro = np.ascontiguousarray(x)
    ro.flags.writeable = False
    for xx, ww in ((x, w), (ro, wt), (x, wt)):
        y = F.conv2d(xx, ww, b, padding=1, algo=algo)
        R.assert_close(y.numpy(), R.conv2d(xx, ww, b, padding=1), np.float64)
    # the Tensor path, from a read-only, non-contiguous source array
    xt = cn.tensor(x, requires_grad=True)
    y = F.conv2d(xt, wt, b, stride=2, algo=algo)
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    R.assert_close(xt.grad.numpy(), R.conv2d_grads(x, wt, gy, stride=2)[0])
    # read-only inputs reach the kernels as writable copies: no second compile for them
    kernels = [getattr(mod, name) for mod in (conv_kernels, conv_stride1) for name in dir(mod)
               if name.startswith("conv2d_")]
    readonly = [(k.__name__, sig) for k in kernels if hasattr(k, "signatures") for sig in k.signatures
                if any(isinstance(t, numba.types.Array) and not t.mutable for t in sig)]
    assert not readonly, readonly


def test_conv2d_returns_tensor_from_arrays_and_does_not_touch_inputs(rng):
    x, w = rng.standard_normal((1, 2, 4, 4)), rng.standard_normal((3, 2, 3, 3))
    x0, w0 = x.copy(), w.copy()
    y = F.conv2d(x, w)
    assert isinstance(y, cn.Tensor) and y.shape == (1, 3, 2, 2) and y.dtype == np.float64
    assert not y.requires_grad
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


def test_conv2d_pair_arguments_equal_int_arguments(rng):
    x, w = rng.standard_normal((1, 2, 6, 6)), rng.standard_normal((3, 2, 3, 3))
    a = F.conv2d(x, w, stride=2, padding=1, dilation=1).numpy()
    b = F.conv2d(x, w, stride=(2, 2), padding=(1, 1), dilation=(1, 1)).numpy()
    np.testing.assert_array_equal(a, b)


def test_conv2d_float32_keeps_float32_and_im2col_sums_long_reductions(rng):
    """A long reduction (C*K*K = 288) in float32 still meets the float32 tolerance."""
    x = rng.standard_normal((2, 32, 5, 5)).astype(np.float32)
    w = rng.standard_normal((4, 32, 3, 3)).astype(np.float32)
    ref = R.conv2d(x, w, padding=1)
    for algo in ALGOS:
        y = F.conv2d(x, w, padding=1, algo=algo)
        assert y.dtype == np.float32
        R.assert_close(y.numpy(), ref, np.float32, algo)


def test_conv2d_propagates_nan_and_inf():
    x = np.ones((1, 1, 3, 3))
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 2, 2] = np.inf
    w = np.ones((1, 1, 2, 2))
    for algo in NAMED_ALGOS:
        y = F.conv2d(x, w, algo=algo).numpy()[0, 0]
        assert np.isnan(y[0, 0]) and np.isinf(y[1, 1]) and y[0, 1] == 4 and y[1, 0] == 4
    # inf times a weight stays inf: no zero weight may meet it (kernels that pad their taps
    # with zero weights must not point them at the input); 4 and 25 taps, both passes.
    for k in (2, 5):
        x = np.ones((1, 2, 6, 6))
        x[0, 1, 0, 0] = np.inf
        w = np.ones((3, 2, k, k))
        for algo in NAMED_ALGOS:
            y = F.conv2d(x, w, algo=algo).numpy()
            assert np.isposinf(y[0, :, 0, 0]).all() and np.isfinite(y[0, :, 1:, 1:]).all(), (k, algo)
            # conv_transpose2d's forward is conv2d's input-gradient: at stride 1 the flipped forward
            z = F.conv_transpose2d(x, np.ones((2, 3, k, k)), padding=k - 1, algo=algo).numpy()
            assert np.isposinf(z[0, :, 0, 0]).all() and np.isfinite(z[0, :, k:, k:]).all(), (k, algo)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_weight_gradient_of_an_inf_input_matches_the_reference(dtype, stride):
    # The flat and shifted kernels sum over wide rows, whose gap columns pair zeros of gy with
    # input pixels that the true sum never reads for that tap: an inf there must not make a NaN.
    rng = np.random.default_rng(0)
    x, w = random(rng, (2, 4, 12, 12)), random(rng, (8, 4, 3, 3))
    gy = random(rng, (2, 8, 12 // stride, 12 // stride))
    x[0, 1, 5, 11] = np.inf  # the last column: tap column 0 never reads it
    x[1, 2, 0, 3] = -np.inf
    _, gw_ref, _ = R.conv2d_grads(x, w, gy, padding=1, stride=stride)
    assert np.isinf(gw_ref).any() and not np.isnan(gw_ref).any()
    for algo in ALGOS:
        _, (_, gw), _ = forward_backward(F.conv2d, (x.astype(dtype), w.astype(dtype)), gy=gy.astype(dtype),
                                         padding=1, stride=stride, algo=algo)
        np.testing.assert_array_equal(np.isposinf(gw), np.isposinf(gw_ref), err_msg=algo)
        np.testing.assert_array_equal(np.isneginf(gw), np.isneginf(gw_ref), err_msg=algo)
        finite = np.isfinite(gw_ref)
        R.assert_close(gw[finite], gw_ref[finite], dtype, algo)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the reference's inf - inf
def test_flat_kernels_keep_border_infs_in_their_windows(dtype):
    # With shared padding (kernels/conv_stride1.py) a row's trailing zeros are the next row's
    # leading ones and a sample's last zero rows the next one's first: an inf on a plane's
    # border, of x (forward) or of gy (input-gradient), must reach only the outputs whose
    # windows hold it, and the weight-gradient's gap products must not make NaNs. (gy's
    # infs stay out of the weight-gradient: the reference pairs them with padding zeros.)
    rng = np.random.default_rng(1)
    x, w = random(rng, (3, 2, 7, 6)), random(rng, (4, 2, 3, 3))
    x_inf = x.copy()
    x_inf[0, 0, :, -1], x_inf[2, 0, :, 0], x_inf[1, 1, -1, :], x_inf[1, 0, 0, 2:] = np.inf, np.inf, -np.inf, np.inf
    for kw in (dict(padding=1), dict(padding=(2, 1), dilation=2), dict(padding=(1, 3))):
        y_ref = R.conv2d(x_inf, w, **kw)
        gy = random(rng, y_ref.shape)
        gy_inf = gy.copy()
        gy_inf[0, 1, :, -1], gy_inf[1, 2, 0, :], gy_inf[2, 3, :, 0] = np.inf, -np.inf, np.inf
        _, gw_ref, _ = R.conv2d_grads(x_inf, w, gy, **kw)
        gx_ref, _, _ = R.conv2d_grads(x, w, gy_inf, **kw)
        y, (_, gw), _ = forward_backward(F.conv2d, (x_inf.astype(dtype), w.astype(dtype)), gy=gy.astype(dtype),
                                         algo="direct", **kw)
        _, (gx, _), _ = forward_backward(F.conv2d, (x.astype(dtype), w.astype(dtype)), gy=gy_inf.astype(dtype),
                                         algo="direct", **kw)
        for got, ref, what in ((y, y_ref, "y"), (gx, gx_ref, "gx"), (gw, gw_ref, "gw")):
            assert np.isinf(ref).any(), what
            for test in (np.isnan, np.isposinf, np.isneginf):
                np.testing.assert_array_equal(test(got), test(ref), err_msg=f"{kw} {what} {test.__name__}")
            finite = np.isfinite(ref)
            R.assert_close(got[finite], ref[finite], dtype, what)


def test_blas_gemm_on_windows_and_its_bounds_check():
    """kernels/blas.gemm: strided windows, transposes, beta; a window past an array's end is
    an IndexError, never a read of foreign memory."""
    from cnn_numba.kernels.blas import gemm
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        big = rng.standard_normal(200).astype(dtype)
        a = big[5:5 + 3 * 10].reshape(3, 10)[:, :4]          # (3, 4) window, row stride 10
        bt = big[50:50 + 5 * 8].reshape(5, 8)[:, :4]        # B^T (5, 4), row stride 8
        c = rng.standard_normal((3, 7)).astype(dtype)
        expect = a.astype(np.float64) @ bt.T.astype(np.float64) + 0.5 * c[:, :5]
        gemm(False, True, 3, 5, 4, big, 5, 10, big, 50, 8, 0.5, c.reshape(-1), 0, 7)
        np.testing.assert_allclose(c[:, :5], expect, rtol=1e-5)
        with pytest.raises(IndexError, match="past the end"):
            gemm(False, False, 3, 5, 4, big, 190, 10, big, 0, 5, 0.0, c.reshape(-1), 0, 7)


@pytest.mark.parametrize("layer, picks", [
    # (x shape, w shape, conv2d keyword arguments) -> forward, input-gradient, weight-gradient
    (((1, 16, 32, 32), (16, 16, 3, 3), dict(padding=1)), "direct direct direct"),     # ResNet stage 1: flat
    (((1, 1, 28, 28), (6, 1, 5, 5), dict(padding=2)), "direct im2col direct"),        # LeNet C1: one input
    (((1, 64, 32, 32), (64, 1, 3, 3), dict(padding=1, groups=64)), "direct direct direct"),  # depthwise
    (((1, 64, 32, 32), (128, 64, 1, 1), {}), "im2col im2col im2col"),                 # 1x1: a plain product
    (((1, 64, 8, 8), (64, 64, 3, 3), dict(padding=1)), "winograd winograd winograd"),  # >= 64 channels
    (((128, 64, 7, 7), (64, 64, 3, 3), dict(padding=1)), "winograd winograd winograd"),  # resnet8's 7x7
    (((16, 6, 14, 14), (16, 6, 5, 5), {}), "direct im2col direct"),                   # LeNet's C3 at b16
    (((1, 64, 4, 4), (64, 64, 3, 3), dict(padding=1)), "winograd winograd winograd"),  # 4x4 planes
    (((1, 32, 16, 16), (32, 32, 3, 3), dict(padding=1)), "direct direct direct"),     # 32 channels: flat
    (((1, 64, 8, 8), (32, 64, 3, 3), dict(padding=1)), "direct direct direct"),       # 32 out: flat, K = 576
    (((1, 256, 8, 8), (256, 256, 3, 3), dict(padding=1)), "winograd winograd winograd"),  # small and wide
    (((1, 256, 8, 8), (32, 256, 3, 3), dict(padding=1)), "im2col im2col im2col"),     # 32 out: long K
    (((1, 128, 28, 28), (128, 128, 3, 3), dict(padding=1)), "winograd winograd winograd"),  # big planes
    (((1, 16, 32, 32), (32, 16, 3, 3), dict(stride=2, padding=1)), "direct direct direct"),  # stride 2: flat
    (((1, 32, 16, 16), (64, 32, 3, 3), dict(stride=2, padding=1)), "direct direct direct"),  # small planes too
    (((1, 128, 16, 16), (256, 128, 3, 3), dict(stride=2, padding=1)), "direct direct direct"),  # and wide
    (((1, 32, 14, 14), (64, 32, 3, 3), dict(stride=2, padding=1)), "im2col im2col im2col"),  # a 7x7 output
    (((1, 16, 32, 32), (32, 16, 1, 1), dict(stride=2)), "im2col im2col im2col"),      # 1x1 shortcut
    (((1, 32, 28, 28), (32, 1, 3, 3), dict(stride=2, padding=1, groups=32)), "direct direct direct"),
    (((1, 8, 12, 12), (8, 8, 3, 3), {}), "direct direct direct"),                    # gx's full padding 2,
    (((1, 8, 12, 12), (8, 8, 3, 3), dict(padding=3)), "direct direct direct"),       # or < 0: a crop
    (((1, 1, 1, 1), (1, 1, 3, 3), dict(padding=10000, dilation=10000)), "im2col im2col im2col"),  # scratch bound
    (((1, 2, 1, 1), (1, 2, 3, 3), dict(stride=2, padding=10000, dilation=10000)), "im2col im2col im2col"),
])
def test_auto_algo_rule(layer, picks):
    geom = conv2d_geom(*layer[:2], stride=layer[2].get("stride", 1), padding=layer[2].get("padding", 0),
                       dilation=layer[2].get("dilation", 1), groups=layer[2].get("groups", 1))
    assert " ".join(auto_algo(geom, p) for p in ("forward", "backward_input", "backward_weight")) == picks


# ----------------------------------------------------------------------------- the algorithm table


def test_every_device_names_its_algorithms_and_rejects_an_unknown_one_alike(rng):
    """functional checks ``algo`` against the names any device's table knows before any kernel
    runs; the launchers do the same; the message names the argument, the value and the valid
    names. A name that a device lacks (the CPU's 'winograd' on CUDA) runs that device's
    fallback, as an unsupported pass does."""
    from cnn_numba.backend import check_device, kernel
    from cnn_numba.kernels.conv_algos import ConvTable

    devices = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])
    x, w = random(rng, (1, 2, 5, 5), np.float32), random(rng, (3, 2, 3, 3), np.float32)
    messages = set()
    for device in devices:
        check_device(device)
        names = kernel("conv2d_algorithms", device)().names
        assert set(names) <= set(ConvTable.known) and names[:2] == ("direct", "im2col")
        xt, wt = cn.tensor(x, device=device), cn.tensor(w, device=device)
        for op, ww in ((F.conv2d, wt), (F.conv_transpose2d, cn.tensor(w.transpose(1, 0, 2, 3).copy(), device=device))):
            for bad in ("fft", None, "Direct", 3):
                with pytest.raises(ValueError) as e:
                    op(xt, ww, algo=bad)
                messages.add(str(e.value).replace(repr(bad), "<algo>"))
            for name in ConvTable.known:  # every known name runs on every device
                R.assert_close(op(xt, ww, algo=name).numpy(), op(xt, ww, algo="direct").numpy(), np.float32, name)
        geom = conv2d_geom(x.shape, w.shape, 1, 0, 1, 1)
        with pytest.raises(ValueError) as e:
            kernel("conv2d_forward", device)(xt.data, wt.data, None, geom, "fft")
        messages.add(str(e.value).replace("'fft'", "<algo>"))
    assert set(TABLE.names) <= set(ConvTable.known)
    assert messages == {f"algo must be one of {('auto',) + tuple(ConvTable.known)}, got <algo>"}


def test_huge_dilation_costs_memory_of_the_output_not_the_dilation(rng):
    """A 1x1 input, dilation=padding=10000, a 3x3 kernel: a 1x1 output, whose stride-1 padded
    planes would be 20001^2 elements per channel and thread (4.3 GB). Every algorithm, every
    pass runs in scratch proportional to the output, and gets PyTorch's answer (only the
    centre tap reads the input)."""
    import resource
    import time

    x, w, b = random(rng, (2, 3, 1, 1)), random(rng, (4, 3, 3, 3)), random(rng, (4,))
    geom = conv2d_geom(x.shape, w.shape, 1, 10000, 10000, 1)
    for p in ("forward", "backward_input", "backward_weight"):
        assert not conv_stride1.supports_flat(geom, p) and not conv_stride1.supports_shifted(geom, p)
    for algo in ALGOS:  # compile the general kernels (dilation 300 is over the bound too)
        forward_backward(F.conv2d, (x, w, b), algo=algo, padding=300, dilation=300)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for algo in ALGOS:
        t0 = time.perf_counter()
        out, (gx, gw, gb), gy = forward_backward(F.conv2d, (x, w, b), algo=algo, padding=10000, dilation=10000)
        assert time.perf_counter() - t0 < 2, algo  # the compiled kernels on a few elements (17 s before)
        R.assert_close(out, np.einsum("nc,oc->no", x[:, :, 0, 0], w[:, :, 1, 1])[:, :, None, None]
                       + b[None, :, None, None], np.float64, "y")
        R.assert_close(gx, np.einsum("no,oc->nc", gy[:, :, 0, 0], w[:, :, 1, 1])[:, :, None, None], np.float64, "gx")
        rgw = np.zeros_like(w)
        rgw[:, :, 1, 1] = np.einsum("no,nc->oc", gy[:, :, 0, 0], x[:, :, 0, 0])
        R.assert_close(gw, rgw, np.float64, "gw")
        # conv_transpose2d's passes are the same three kernels
        z = F.conv_transpose2d(out, w, stride=1, padding=10000, dilation=10000, algo=algo).numpy()
        assert z.shape == (2, 3, 1, 1)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nowhere near 4 GB


def test_stride1_kernels_keep_their_geometries():
    """The scratch bound turns down only planes far larger than the layer's input and output."""
    for xs, ws, kw in [((64, 16, 32, 32), (16, 16, 3, 3), dict(padding=1)),
                       ((32, 64, 32, 32), (64, 64, 3, 3), dict(padding=2, dilation=2)),
                       ((1, 2, 1, 1), (3, 2, 3, 3), dict(padding=1)),
                       ((1, 2, 5, 5), (3, 2, 3, 3), dict(padding=4, dilation=4)),
                       ((64, 16, 32, 32), (32, 16, 3, 3), dict(padding=1, stride=2)),
                       ((32, 64, 8, 8), (64, 64, 3, 3), dict(padding=2, dilation=2, stride=3))]:
        geom = conv2d_geom(xs, ws, kw.get("stride", 1), kw["padding"], kw.get("dilation", 1), 1)
        if geom.stride != (1, 1):
            assert all(conv_stride1.supports_flat(geom, p) for p in ("forward", "backward_input", "backward_weight"))
            continue
        assert all(conv_stride1.supports_flat(geom, p) for p in ("forward", "backward_input", "backward_weight"))
        assert conv_stride1.supports_shifted(geom, "forward") and conv_stride1.supports_shifted(geom, "backward_weight")
    geom = conv2d_geom((1, 1, 1, 1), (1, 1, 3, 3), 1, 300, 300, 1)  # 601^2 planes for one pixel
    assert not conv_stride1.supports_flat(geom, "forward")
    geom = conv2d_geom((1, 1, 1, 1), (1, 1, 3, 3), 2, 300, 300, 1)  # at stride 2, 4 phases of 301^2, or 301^2
    assert not any(conv_stride1.supports_flat(geom, p) for p in ("forward", "backward_input", "backward_weight"))


# ----------------------------------------------------------------------------- degenerate shapes


@pytest.mark.parametrize("op, xs, ws, kw, what", [
    (F.conv2d, (1, 1, 4, 4), (2, 1, 0, 3), {}, "kernel size"),                  # PyTorch: kernel size > 0
    (F.conv2d, (1, 1, 4, 4), (2, 1, 3, 0), dict(padding=1), "kernel size"),
    (F.conv2d, (1, 0, 4, 4), (2, 0, 3, 3), {}, "in_channels"),                  # an empty sum
    (F.conv2d, (1, 0, 4, 4), (2, 0, 3, 3), dict(groups=2), "in_channels"),
    (F.conv2d, (1, 1, 4, 4), (0, 1, 3, 3), {}, "out_channels"),                 # PyTorch: weight dim 0 >= 1
    (F.conv2d, (1, 1, 0, 4), (2, 1, 1, 1), dict(padding=1), "empty batch"),     # PyTorch: empty planes need N = 0
    (F.conv_transpose2d, (1, 1, 4, 4), (1, 2, 0, 3), {}, "kernel size"),
    (F.conv_transpose2d, (1, 1, 4, 4), (1, 2, 3, 0), dict(padding=1), "kernel size"),
    (F.conv_transpose2d, (1, 0, 4, 4), (0, 2, 3, 3), {}, "in_channels"),
    (F.conv_transpose2d, (1, 1, 4, 4), (1, 0, 3, 3), {}, "out_channels"),
    (F.conv_transpose2d, (1, 1, 0, 4), (1, 2, 3, 3), {}, "empty batch"),
])
def test_degenerate_shapes_are_value_errors_naming_the_shapes(op, xs, ws, kw, what):
    """Where PyTorch 2.13 raises, a ValueError before any kernel runs. (For C_in = 0 PyTorch
    returns an empty (N, 0, OH, OW) output, dropping C_out and the bias: a ValueError here.)"""
    with pytest.raises(ValueError, match=what) as e:
        op(np.ones(xs), np.ones(ws), **kw)
    assert str(xs) in str(e.value) and str(ws) in str(e.value)


@pytest.mark.parametrize("algo", ALGOS)
def test_empty_batch_with_empty_planes_is_pytorchs_empty_output(algo):
    """PyTorch accepts empty planes in an empty batch: (0, 1, 0, 4) padded by 1 -> (0, 2, 2, 6)."""
    w, b = np.ones((2, 1, 1, 1)), np.ones(2)
    out, (gx, gw, gb), _ = forward_backward(F.conv2d, (np.ones((0, 1, 0, 4)), w, b), algo=algo, padding=1)
    assert out.shape == (0, 2, 2, 6) and gx.shape == (0, 1, 0, 4)
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    np.testing.assert_array_equal(gb, np.zeros_like(b))
    z = F.conv_transpose2d(np.ones((0, 1, 0, 4)), np.ones((1, 2, 3, 3)), np.ones(2), algo=algo)
    assert z.shape == (0, 2, 2, 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("xs, ws, stride, padding, groups", [
    ((16, 3, 7, 7), (5, 3, 3, 3), 1, 1, 1),     # 9x9 padded planes: runs of 12 and 4, or 8 and 8
    ((3, 2, 7, 7), (4, 2, 3, 3), 1, 1, 1),      # runs of 3, or 2 and 1
    ((16, 2, 14, 14), (3, 2, 5, 5), 1, 0, 1),   # LeNet-5's conv2 planes: 5, 5, 5, 1 or 4 x 4
    ((7, 4, 9, 8), (6, 2, 3, 3), 2, 1, 2),      # strided, groups
    ((1, 2, 5, 5), (2, 2, 3, 3), 1, 1, 1),      # one sample, one quad: one task whatever the slots
    ((1, 3, 6, 6), (9, 3, 3, 3), 1, 1, 1),      # one sample: channels split [0, 8) [8, 9), or by quads
    ((1, 4, 7, 6), (10, 2, 3, 3), 1, 1, 2),     # two groups of 5 channels: [0, 4) [4, 5) each
    ((1, 2, 9, 9), (20, 2, 3, 3), 2, 1, 1),     # strided; 5 quads in 4 parts of 2 quads: the last empty
    ((1, 3, 5, 5), (6, 1, 3, 3), 1, 1, 3),      # depthwise-like: 3 tasks, 2 channels each
])
def test_flat_forward_runs_spread_over_slots_match_reference(rng, dtype, xs, ws, stride, padding, groups):
    """The flat forward's tasks spread over 2, 3 and 4 slots, by runs (``_flat_plan``'s
    ``slots``) or, with fewer runs than slots, by the output channels of each run,
    against the float64 reference; 1 slot keeps the runs of FLAT_RUN elements."""
    x, w, b = random(rng, xs, dtype), random(rng, ws, dtype), random(rng, ws[:1], dtype)
    geom = conv2d_geom(xs, ws, stride, padding, 1, groups)
    ref = R.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride, padding, 1, groups)
    hq_wq = None
    for slots in (1, 2, 3, 4):
        y = np.full(geom.y_shape, np.nan, dtype)
        conv_stride1.conv2d_forward_flat(x, w, b, y, *conv_kernels.no_epilogue(dtype), stride, stride, padding, padding,
                                         1, 1, groups, False, slots)
        R.assert_close(y, ref, dtype)
        plan = conv_stride1._flat_plan(xs[0], ws[1], geom.oh, geom.ow, xs[2], xs[3], ws[2], ws[3], stride, stride,
                                       padding, padding, 1, 1, False, slots)
        nb, (hq, wq) = plan[5], plan[3]
        runs = -(-xs[0] // nb)
        if slots == 1:
            assert nb == max(1, min(xs[0], conv_stride1.FLAT_RUN // (hq * wq)))
        else:  # a multiple of the slots where there are samples enough, all but the last full
            assert runs % slots == 0 or runs == xs[0]
            assert runs >= min(xs[0], slots) and (runs - 1) * nb < xs[0]
    if xs == (16, 3, 7, 7):
        assert conv_stride1._flat_plan(16, 3, 7, 7, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, False, 2)[5] == 8


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("xs, ws, stride, padding, groups", [
    ((1, 32, 14, 14), (64, 32, 3, 3), 2, 1, 1),  # 903k multiply-adds: rows split between the slots
    ((1, 16, 14, 14), (32, 16, 1, 1), 2, 0, 1),  # 25k: under SPLIT_MIN_MACS, one part
    ((1, 8, 56, 56), (5, 8, 3, 3), 1, 1, 1),     # 1.1M: 5 rows in up to 4 parts: 3+2, 2+2+1, 2+2+1+none
    ((1, 16, 56, 56), (6, 8, 3, 3), 1, 1, 2),    # two groups, two tasks: split in 2 from 3 slots on
    ((3, 32, 14, 14), (64, 32, 3, 3), 2, 1, 1),  # 3 tasks: whole on 1-3 slots, split in 2 on 4
])
def test_im2col_forward_split_by_rows_matches_reference(rng, dtype, xs, ws, stride, padding, groups):
    """conv2d_forward_im2col on 1-4 slots, its product split by output channels where a
    batch of 1 leaves slots idle, against the float64 reference."""
    x, w, b = random(rng, xs, dtype), random(rng, ws, dtype), random(rng, ws[:1], dtype)
    geom = conv2d_geom(xs, ws, stride, padding, 1, groups)
    ref = R.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), stride, padding, 1, groups)
    for slots in (1, 2, 3, 4):
        y = np.full(geom.y_shape, np.nan, dtype)
        conv_kernels.conv2d_forward_im2col(x, w, b, y, *conv_kernels.no_epilogue(dtype), stride, stride, padding,
                                           padding, 1, 1, groups, slots)
        R.assert_close(y, ref, dtype)


def test_digits_add_carries_a_split_like_dividing_again():
    """kernels/index.digits_add, with which the CUDA implicit GEMM walks column_row's
    (c, a, b) and a plane's (n, r, q) by a fixed step: the split of i + j from those of i
    and j, for every i, j below a bound and radices that make one or both carries happen."""
    from cnn_numba.kernels.index import column_row, digits_add

    for r1, r0 in ((1, 1), (3, 3), (2, 5), (7, 1), (4, 6)):
        for i in range(3 * r1 * r0 + 2):
            for j in range(2 * r1 * r0 + 3):
                got = digits_add(column_row(i, r1, r0), column_row(j, r1, r0), r1, r0)
                assert got == column_row(i + j, r1, r0), (i, j, r1, r0)
