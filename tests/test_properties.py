"""Random shapes and hyper-parameters (valid combinations only) against the float64 reference."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cnn_numba.functional as F
import reference as R
import cnn_numba as cn
from conftest import ALGOS, CUDA_SIMULATED, forward_backward, needs_cuda

# database=None: no .hypothesis folder in the work tree; a failure prints its example anyway.
SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# The same properties on device "cuda" (the *_cuda tests): few examples under the simulator,
# where each CUDA thread is a Python thread.
CUDA_SETTINGS = settings(SETTINGS, max_examples=5 if CUDA_SIMULATED else 25)
dtypes = st.sampled_from([np.float32, np.float64])
algos = st.sampled_from(ALGOS)
small = st.integers(1, 3)


def _arrays(seed, dtype, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _check_grads(grads, refs, dtype):
    for name, g, r in zip(("gx", "gw", "gb"), grads, refs):
        if g is not None:
            R.assert_close(g, r, dtype, name)


@st.composite
def conv_cases(draw):
    g, cig, cog = draw(st.integers(1, 3)), draw(small), draw(small)
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(small), draw(small)
    padding = draw(st.one_of(
        st.tuples(st.integers(0, 3), st.integers(0, 3)),
        st.integers(0, 3),
        st.sampled_from(["same", "valid"]),
    ))
    stride = (1, 1) if padding == "same" else (draw(small), draw(small))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    t, b, l, r = R.conv_pads(padding, (kh, kw), (dh, dw))
    assume(R.conv_out_size(h, kh, stride[0], t, b, dh) > 0 and R.conv_out_size(w, kw, stride[1], l, r, dw) > 0)
    n = draw(st.integers(0, 2))
    return dict(x=(n, g * cig, h, w), w=(g * cog, cig, kh, kw), bias=draw(st.booleans()), channels=g * cog,
                kw=dict(stride=stride, padding=padding, dilation=(dh, dw), groups=g))


def _conv_property(op, reference, reference_grads, case, dtype, algo, seed, device):
    """``op`` (conv2d or conv_transpose2d) and its gradients against the float64 reference;
    ``case["channels"]`` is the output's channel count, the bias length."""
    x, w, b = _arrays(seed, dtype, case["x"], case["w"], (case["channels"],))
    b = b if case["bias"] else None
    kw = case["kw"]
    out, grads, gy = forward_backward(op, (x, w, b), algo=algo, device=device, **kw)
    R.assert_close(out, reference(x, w, b, **kw), dtype, "y")
    _check_grads(grads, reference_grads(x, w, gy, **kw), dtype)


@SETTINGS
@given(case=conv_cases(), dtype=dtypes, algo=algos, seed=st.integers(0, 2**31))
def test_conv2d_random(case, dtype, algo, seed):
    _conv_property(F.conv2d, R.conv2d, R.conv2d_grads, case, dtype, algo, seed, "cpu")


@needs_cuda
@CUDA_SETTINGS
@given(case=conv_cases(), dtype=dtypes, algo=algos, seed=st.integers(0, 2**31))
def test_conv2d_random_cuda(case, dtype, algo, seed):
    _conv_property(F.conv2d, R.conv2d, R.conv2d_grads, case, dtype, algo, seed, "cuda")


@SETTINGS
@given(g=st.integers(1, 2), cig=st.integers(1, 4), cog=st.integers(1, 40), k=st.tuples(small, small),
       stride=st.tuples(small, small), padding=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       n=st.integers(1, 3), slots=st.integers(1, 3), dtype=dtypes, seed=st.integers(0, 2**31))
def test_blocked_kernel_random(g, cig, cog, k, stride, padding, dilation, hw, n, slots, dtype, seed):
    """The blocked kernel (kernels/conv_blocked.py) on any geometry, called directly (the
    table offers it only from 32 output channels per group): partial channel blocks and
    tiles, every thread count's split; and its stride-1 input-gradient, whose full padding
    may be negative (the load crops)."""
    from cnn_numba.kernels import conv_blocked as BL
    from cnn_numba.kernels.conv import no_epilogue
    from cnn_numba.shapes import conv2d_geom
    (kh, kw), (sh, sw), (dh, dw) = k, stride, dilation
    assume(all(size + 2 * p >= d * (kk - 1) + 1 for size, p, d, kk in zip(hw, padding, dilation, k)))
    xs, ws = (n, g * cig, *hw), (g * cog, cig, kh, kw)
    geom = conv2d_geom(xs, ws, stride, padding, dilation, g)
    x, w, b = _arrays(seed, dtype, xs, ws, (g * cog,))
    y = np.full(geom.y_shape, np.nan, dtype)
    BL.conv2d_forward_blocked(x, w, b, y, *no_epilogue(dtype), sh, sw, geom.ph, geom.pw, dh, dw, g, slots)
    R.assert_close(y, R.conv2d(x, w, b, stride, padding, dilation, g), dtype, "y")
    if stride == (1, 1):
        gy = _arrays(seed + 1, dtype, geom.y_shape)[0]
        gx = np.full(geom.x_shape, np.nan, dtype)
        BL.backward_input(gy, w, gx, geom)
        R.assert_close(gx, R.conv2d_grads(x, w, gy, stride, padding, dilation, g)[0], dtype, "gx")


@st.composite
def conv_transpose_cases(draw):
    g, cig, cog = draw(st.integers(1, 3)), draw(small), draw(small)
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw, dh, dw = draw(small), draw(small), draw(small), draw(small)
    oph, opw = draw(st.integers(0, max(sh, dh) - 1)), draw(st.integers(0, max(sw, dw) - 1))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    h, w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    assume(R.conv_transpose_out_size(h, kh, sh, ph, dh, oph) > 0)
    assume(R.conv_transpose_out_size(w, kw, sw, pw, dw, opw) > 0)
    n = draw(st.integers(0, 2))
    return dict(x=(n, g * cig, h, w), w=(g * cig, cog, kh, kw), bias=draw(st.booleans()), channels=g * cog,
                kw=dict(stride=(sh, sw), padding=(ph, pw), output_padding=(oph, opw), groups=g,
                        dilation=(dh, dw)))


@SETTINGS
@given(case=conv_transpose_cases(), dtype=dtypes, algo=algos, seed=st.integers(0, 2**31))
def test_conv_transpose2d_random(case, dtype, algo, seed):
    _conv_property(F.conv_transpose2d, R.conv_transpose2d, R.conv_transpose2d_grads, case, dtype, algo, seed,
                   "cpu")


@needs_cuda
@CUDA_SETTINGS
@given(case=conv_transpose_cases(), dtype=dtypes, algo=algos, seed=st.integers(0, 2**31))
def test_conv_transpose2d_random_cuda(case, dtype, algo, seed):
    _conv_property(F.conv_transpose2d, R.conv_transpose2d, R.conv_transpose2d_grads, case, dtype, algo, seed,
                   "cuda")


@st.composite
def pool_cases(draw, dilation=True):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    dil = (draw(small), draw(small)) if dilation else (1, 1)
    ceil_mode = draw(st.booleans())
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    s = (kh, kw) if stride is None else stride
    oh = R.pool_out_size(h, kh, s[0], padding[0], dil[0], ceil_mode)
    ow = R.pool_out_size(w, kw, s[1], padding[1], dil[1], ceil_mode)
    assume(oh > 0 and ow > 0)
    kwargs = dict(kernel_size=(kh, kw), stride=stride, padding=padding, ceil_mode=ceil_mode)
    if dilation:
        kwargs["dilation"] = dil
    return (draw(st.integers(0, 2)), draw(small), h, w), kwargs


def _max_pool2d_property(case, dtype, ties, seed, device):
    shape, kw = case
    rng = np.random.default_rng(seed)
    x = (rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)).astype(dtype)
    try:
        ref, ref_idx = R.max_pool2d(x, **kw)
    except ValueError:  # a dilated window entirely in the padding: not a PyTorch-valid case
        assume(False)
    out, (gx,), gy = forward_backward(F.max_pool2d, (x,), device=device, **kw)
    R.assert_close(out, ref, dtype, "y")
    R.assert_close(gx, R.max_pool2d_grad(gy, ref_idx, shape), dtype, "gx")
    _, idx = F.max_pool2d(cn.tensor(x, device=device), return_indices=True, **kw)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


@SETTINGS
@given(case=pool_cases(), dtype=dtypes, ties=st.booleans(), seed=st.integers(0, 2**31))
def test_max_pool2d_random(case, dtype, ties, seed):
    _max_pool2d_property(case, dtype, ties, seed, "cpu")


@needs_cuda
@CUDA_SETTINGS
@given(case=pool_cases(), dtype=dtypes, ties=st.booleans(), seed=st.integers(0, 2**31))
def test_max_pool2d_random_cuda(case, dtype, ties, seed):
    _max_pool2d_property(case, dtype, ties, seed, "cuda")


def _avg_pool2d_property(case, dtype, count_include_pad, divisor_override, seed, device):
    shape, kw = case
    kw = dict(kw, count_include_pad=count_include_pad, divisor_override=divisor_override)
    (x,) = _arrays(seed, dtype, shape)
    out, (gx,), gy = forward_backward(F.avg_pool2d, (x,), device=device, **kw)
    R.assert_close(out, R.avg_pool2d(x, **kw), dtype, "y")
    R.assert_close(gx, R.avg_pool2d_grad(gy, shape, **kw), dtype, "gx")


AVG_CASE = dict(case=pool_cases(dilation=False), dtype=dtypes, count_include_pad=st.booleans(),
                divisor_override=st.one_of(st.none(), st.integers(1, 7)), seed=st.integers(0, 2**31))


@SETTINGS
@given(**AVG_CASE)
def test_avg_pool2d_random(case, dtype, count_include_pad, divisor_override, seed):
    _avg_pool2d_property(case, dtype, count_include_pad, divisor_override, seed, "cpu")


@needs_cuda
@CUDA_SETTINGS
@given(**AVG_CASE)
def test_avg_pool2d_random_cuda(case, dtype, count_include_pad, divisor_override, seed):
    _avg_pool2d_property(case, dtype, count_include_pad, divisor_override, seed, "cuda")


@SETTINGS
@given(n=st.integers(0, 2), c=small, h=st.integers(1, 9), w=st.integers(1, 9), oh=st.integers(1, 9),
       ow=st.integers(1, 9), dtype=dtypes, seed=st.integers(0, 2**31))
def test_adaptive_avg_pool2d_random(n, c, h, w, oh, ow, dtype, seed):
    (x,) = _arrays(seed, dtype, (n, c, h, w))
    out, (gx,), gy = forward_backward(F.adaptive_avg_pool2d, (x,), output_size=(oh, ow))
    R.assert_close(out, R.adaptive_avg_pool2d(x, (oh, ow)), dtype, "y")
    R.assert_close(gx, R.adaptive_avg_pool2d_grad(gy, x.shape), dtype, "gx")


@SETTINGS
@given(case=pool_cases(dilation=False), dtype=dtypes, seed=st.integers(0, 2**31))
def test_max_unpool2d_random(case, dtype, seed):
    """Unpool what max_pool2d picked, at the pooled input's size (always a valid output_size)."""
    shape, kw = case
    kw = dict(kw, ceil_mode=False)
    s = kw["stride"] or kw["kernel_size"]
    assume(all(R.pool_out_size(i, k, si, p, 1, False) > 0
               for i, k, si, p in zip(shape[2:], kw["kernel_size"], s, kw["padding"])))
    (x,) = _arrays(seed, dtype, shape)
    pooled, idx = R.max_pool2d(x, **kw)
    default = [(o - 1) * si - 2 * p + k for o, si, p, k in zip(pooled.shape[2:], s, kw["padding"], kw["kernel_size"])]
    assume(all(d - si < i < d + si for d, si, i in zip(default, s, shape[2:])))
    args = dict(kernel_size=kw["kernel_size"], stride=kw["stride"], padding=kw["padding"], output_size=shape[2:])
    pooled = pooled.astype(dtype)
    out, (gx, _), gy = forward_backward(F.max_unpool2d, (pooled, idx), **args)
    # overlapping windows may pick one element twice; PyTorch leaves that order unspecified,
    # but both write the same value there, so the reference's output is still exact.
    R.assert_close(out, R.max_unpool2d(pooled, idx, **args), dtype, "y")
    R.assert_close(gx, R.max_unpool2d_grad(gy, idx), dtype, "gx")
