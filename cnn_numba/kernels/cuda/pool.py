"""CUDA pooling kernels: max pooling with argmax, unpooling, average and adaptive average.

The ops, arguments and results of the CPU launchers in kernels/pool.py (layouts and the
``h*W + w`` index convention are described there). Launchers view every (N, C, H, W)
array as N*C planes, (N*C, H, W) or (N*C, H*W), so kernels index one plane axis.

Every kernel is a gather: one thread per element it writes, consecutive threads on
consecutive w (coalesced stores, and loads as coalesced as the stride allows), each
thread summing alone in a fixed order, so results are the same run to run. The CPU's
scatters become gathers over the adjoint window: an input element visits the rectangle
of outputs whose window spans it (``_spanning``, an ``out_range``; for adaptive pooling
the adaptive window with the two sizes swapped), in row-major order, the order in which
the CPU scatters add: the max-pool gradient is the CPU's bit for bit.

Unpooling alone scatters through indices given as data, which may repeat; see
``scatter``. Arithmetic stays in the arrays' dtype (``x.dtype.type`` casts the integer
divisors), so a float32 kernel has no float64 instruction.
"""
import math

import numpy as np
from numba import cuda

from ...backend import register
from .. import pool as _cpu
from .elementwise import full
from .index import adaptive_window, out_range, pool_window, tap
from .launch import device_function, empty, jit, launch

_avg_divisor = device_function(_cpu._avg_divisor)  # PyTorch's divisor rules, the CPU's code


@jit(device=True)
def _element(a):
    """This thread's (plane, row, column) in ``a`` (planes, H, W), the column fastest;
    plane -1 for a thread past the end."""
    t = cuda.grid(1)
    if t >= a.size:
        return -1, 0, 0
    h, w = a.shape[1], a.shape[2]
    return t // (h * w), (t // w) % h, t % w


@jit(device=True)
def _entry(a):
    """This thread's (plane, position) in ``a`` (planes, H*W); plane -1 past the end."""
    t = cuda.grid(1)
    if t >= a.size:
        return -1, 0
    return t // a.shape[1], t % a.shape[1]


@jit(device=True)
def _spanning(i, k, s, p, d, size_out):
    """Outputs ``[lo, hi)`` whose window (k taps, dilation d) spans input ``i``: those whose
    first tap reads inside ``[i - (k-1)*d, i]``, ``out_range`` of tap 0 over that stretch
    (two integer divisions, not two per tap). With dilation a spanning window may step
    over ``i``; max pooling's index test filters those out."""
    extent = (k - 1) * d + 1
    return out_range(0, s, p + i - (extent - 1), 1, extent, size_out)


@jit(device=True)
def _window_sum(x, p, h0, h1, w0, w1):
    """Sum of ``x[p, h0:h1, w0:w1]`` in the array's dtype."""
    acc = x.dtype.type(0)
    for i in range(h0, h1):
        for j in range(w0, w1):
            acc += x[p, i, j]
    return acc


# ----------------------------------------------------------------------------- max pooling

@jit
def _max_pool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """y = window max, idx = its ``h*W + w``: the CPU's rule (first maximum, last NaN)."""
    p, r, q = _element(y)
    if p < 0:
        return
    h, wd = x.shape[1], x.shape[2]
    best = x.dtype.type(-math.inf)
    arg = -1  # stays -1 for a window of padding only, as on the CPU
    for a in range(kh):
        ih = tap(r, sh, ph, a, dh)
        if ih < 0 or ih >= h:
            continue
        for b in range(kw):
            iw = tap(q, sw, pw, b, dw)
            if iw < 0 or iw >= wd:
                continue
            v = x[p, ih, iw]
            if arg < 0 or v > best or math.isnan(v):
                best = v
                arg = ih * wd + iw
    y[p, r, q] = best
    idx[p, r, q] = arg


@jit
def _max_pool_backward(gy, gx, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """gx[p, ih, iw] = sum of gy over the outputs whose window spans (ih, iw) and chose it."""
    p, ih, iw = _element(gx)
    if p < 0:
        return
    r0, r1 = _spanning(ih, kh, sh, ph, dh, gy.shape[1])
    q0, q1 = _spanning(iw, kw, sw, pw, dw, gy.shape[2])
    me = ih * gx.shape[2] + iw
    acc = gx.dtype.type(0)
    for r in range(r0, r1):
        for q in range(q0, q1):
            if idx[p, r, q] == me:
                acc += gy[p, r, q]
    gx[p, ih, iw] = acc


# ----------------------------------------------------------------------------- unpooling

@jit
def _link_sources(idx, head, nxt):
    """Source j of plane p pushes itself on the list of its destination ``idx[p, j]``:
    ``head[p, k]`` is the source pushed last, ``nxt[p, j]`` the one pushed before j.

    The one atomic of the pooling kernels, and it cannot be avoided: the indices are
    data (max_unpool2d takes any), so no destination can know its sources without
    them announcing themselves, concurrently. The exchange only decides the order
    of each list; ``_gather_sources`` reads a list in source order whatever it is.
    """
    p, j = _entry(idx)
    if p < 0:
        return
    k = idx[p, j]
    if k >= 0:  # -1: a max-pool window of padding only, as skipped on the CPU
        nxt[p, j] = cuda.atomic.exch(head, (p, k), j)


@jit(device=True)
def _next_source(j, nxt, p, after):
    """The smallest source above ``after`` in the list starting at ``j`` (-1: none)."""
    best = -1
    while j >= 0:
        if j > after and (best < 0 or j < best):
            best = j
        j = nxt[p, j]
    return best


@jit
def _gather_sources(src, head, nxt, dst, accumulate):
    """dst[p, k] (+)= src[p, j] over the sources j of destination k in increasing j, as
    the CPU loop does: assignment keeps the last, accumulation adds in that order.
    O(L^2) for L sources on one destination: L is 1 for indices from a max-pool with
    stride >= kernel, a few with overlapping windows."""
    p, k = _entry(dst)
    if p < 0:
        return
    acc = dst.dtype.type(0)
    j = _next_source(head[p, k], nxt, p, -1)
    while j >= 0:
        if accumulate:
            acc += src[p, j]
        else:
            acc = src[p, j]
        j = _next_source(head[p, k], nxt, p, j)
    dst[p, k] = acc


@jit
def _gather_planes(src, idx, dst):
    """dst[p, j] = src[p, idx[p, j]]."""
    p, j = _entry(dst)
    if p < 0:
        return
    dst[p, j] = src[p, idx[p, j]]


# ----------------------------------------------------------------------------- average pooling

@jit
def _avg_pool_forward(x, y, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override):
    p, r, q = _element(y)
    if p < 0:
        return
    h0, h1, hp = pool_window(r, sh, ph, kh, x.shape[1])
    w0, w1, wp = pool_window(q, sw, pw, kw, x.shape[2])
    div = _avg_divisor(h0, h1, w0, w1, hp, wp, count_include_pad, divisor_override)
    y[p, r, q] = _window_sum(x, p, h0, h1, w0, w1) / x.dtype.type(div)


@jit
def _avg_pool_backward(gy, gx, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override):
    """gx[p, ih, iw] = sum of gy / divisor over the windows spanning (ih, iw) (clipping a
    window to the input, or to the padded input under ceil_mode, never drops an input)."""
    h, wd = gx.shape[1], gx.shape[2]
    p, ih, iw = _element(gx)
    if p < 0:
        return
    r0, r1 = _spanning(ih, kh, sh, ph, 1, gy.shape[1])
    q0, q1 = _spanning(iw, kw, sw, pw, 1, gy.shape[2])
    acc = gx.dtype.type(0)
    for r in range(r0, r1):
        h0, h1, hp = pool_window(r, sh, ph, kh, h)
        for q in range(q0, q1):
            w0, w1, wp = pool_window(q, sw, pw, kw, wd)
            div = _avg_divisor(h0, h1, w0, w1, hp, wp, count_include_pad, divisor_override)
            acc += gy[p, r, q] / gx.dtype.type(div)
    gx[p, ih, iw] = acc


@jit
def _adaptive_avg_forward(x, y):
    p, r, q = _element(y)
    if p < 0:
        return
    h0, h1 = adaptive_window(r, x.shape[1], y.shape[1])
    w0, w1 = adaptive_window(q, x.shape[2], y.shape[2])
    y[p, r, q] = _window_sum(x, p, h0, h1, w0, w1) / x.dtype.type((h1 - h0) * (w1 - w0))


@jit
def _adaptive_avg_backward(gy, gx):
    """gx[p, ih, iw] = sum of gy / area over the windows holding (ih, iw).

    The outputs r whose window [floor(r*H/O), ceil((r+1)*H/O)) holds row i are
    [floor(i*O/H), ceil((i+1)*O/H)), the adaptive window with H and O swapped:
    floor(r*H/O) <= i  <=>  r < ceil((i+1)*O/H)  and  i < ceil((r+1)*H/O)  <=>  r >= floor(i*O/H).
    """
    h, wd, oh, ow = gx.shape[1], gx.shape[2], gy.shape[1], gy.shape[2]
    p, ih, iw = _element(gx)
    if p < 0:
        return
    r0, r1 = adaptive_window(ih, oh, h)
    q0, q1 = adaptive_window(iw, ow, wd)
    acc = gx.dtype.type(0)
    for r in range(r0, r1):
        h0, h1 = adaptive_window(r, h, oh)
        for q in range(q0, q1):
            w0, w1 = adaptive_window(q, wd, ow)
            acc += gy[p, r, q] / gx.dtype.type((h1 - h0) * (w1 - w0))
    gx[p, ih, iw] = acc


# ----------------------------------------------------------------------------- launchers

def _planes(a):
    """(N, C, H, W) as (N*C, H, W), a view."""
    n, c, h, w = a.shape
    return a.reshape(n * c, h, w)


def _rows(a):
    """(N, C, H, W) as (N*C, H*W), a view: each plane a row indexed by ``h*W + w``."""
    n, c, h, w = a.shape
    return a.reshape(n * c, h * w)


def _new_planes(src, out_hw, kernel, *args):
    """A new (N, C, *out_hw) array of src's dtype, one thread per element running
    ``kernel(src, out, *args)`` on the plane views."""
    out = empty(src.shape[:2] + tuple(out_hw), src.dtype)
    launch(kernel, out.size, _planes(src), _planes(out), *args)
    return out


@register("max_pool2d_forward", "cuda")
def max_pool2d(x, out_hw, kernel, stride, pad, dilation):
    y = empty(x.shape[:2] + tuple(out_hw), x.dtype)
    idx = empty(y.shape, np.int64)
    launch(_max_pool_forward, y.size, _planes(x), _planes(y), _planes(idx), *kernel, *stride, *pad, *dilation)
    return y, idx


@register("max_pool2d_backward", "cuda")
def max_pool2d_grad(gy, idx, in_hw, kernel, stride, pad, dilation):
    return _new_planes(gy, in_hw, _max_pool_backward, _planes(idx), *kernel, *stride, *pad, *dilation)


@register("scatter_planes", "cuda")
def scatter(src, idx, out_hw, accumulate):
    """Max-unpool forward (assign: the last source in row-major order wins) and, for any
    caller, accumulation: per destination, a list of its sources (int32 positions in a
    plane), then a gather that reads each list in source order."""
    dst = empty(src.shape[:2] + tuple(out_hw), src.dtype)
    s, k, d = _rows(src), _rows(idx), _rows(dst)
    head, nxt = full(d.shape, -1, np.int32), empty(s.shape, np.int32)
    launch(_link_sources, k.size, k, head, nxt)
    launch(_gather_sources, d.size, s, head, nxt, d, bool(accumulate))
    return dst


@register("gather_planes", "cuda")
def gather(src, idx):
    """Max-unpool backward: read each index's gradient back."""
    dst = empty(idx.shape, src.dtype)
    launch(_gather_planes, dst.size, _rows(src), _rows(idx), _rows(dst))
    return dst


@register("avg_pool2d_forward", "cuda")
def avg_pool2d(x, out_hw, kernel, stride, pad, count_include_pad, divisor_override):
    return _new_planes(x, out_hw, _avg_pool_forward, *kernel, *stride, *pad, count_include_pad, divisor_override)


@register("avg_pool2d_backward", "cuda")
def avg_pool2d_grad(gy, in_hw, kernel, stride, pad, count_include_pad, divisor_override):
    return _new_planes(gy, in_hw, _avg_pool_backward, *kernel, *stride, *pad, count_include_pad, divisor_override)


@register("adaptive_avg_pool2d_forward", "cuda")
def adaptive_avg_pool2d(x, out_hw):
    return _new_planes(x, out_hw, _adaptive_avg_forward)


@register("adaptive_avg_pool2d_backward", "cuda")
def adaptive_avg_pool2d_grad(gy, in_hw):
    return _new_planes(gy, in_hw, _adaptive_avg_backward)
