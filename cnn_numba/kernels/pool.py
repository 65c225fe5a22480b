"""Pooling kernels: max pooling with argmax indices, unpooling, average and adaptive average.

Layouts: x/gx (N, C, H, W), y/gy (N, C, OH, OW), idx (N, C, OH, OW) int64 holding
``h*W + w`` on the unpadded input plane (PyTorch's convention). Symbols as in
conv.py: kh/kw window, sh/sw stride, ph/pw padding, dh/dw dilation.

Contract: every kernel writes (=) its whole output. Parallel loops run over
(n, c) planes: an iteration owns its output plane, so the scatter inside a plane
(max-pool backward, unpooling, average-pool backward) is never a race.

Dualities: max-pool backward (op ``max_pool2d_backward``) is unpooling with
accumulation (``scatter_planes`` with ``accumulate=True``); unpooling's backward is
a gather through the same indices (``gather_planes``). Max pooling keeps nothing
but its indices.
"""
import numpy as np
from numba import njit, prange

from ..backend import register
from . import PARALLEL, serial_twin
from .index import adaptive_window, pool_window, tap

KERNEL = dict(cache=True)  # no fastmath here: NaN must propagate through comparisons


@njit(cache=True, inline="always")
def _later_max(v, at, best, arg):
    """Max pooling's rule for the next candidate ``v`` of a window (at index ``at``) against
    (best, arg) so far: the first candidate (arg < 0), a larger value, or a NaN wins, so a
    tie keeps the first maximum and a NaN the last NaN. No short-circuit: selects, not
    branches, whose outcome on real data no predictor guesses."""
    take = (arg < 0) | (v > best) | (v != v)
    return (v if take else best), (at if take else arg)


@njit(parallel=PARALLEL, **KERNEL)
def max_pool2d_forward(x, y, idx, kh, kw, sh, sw, ph, pw, dh, dw):
    """y = window max; idx = its position. First maximum wins a tie; a NaN wins (the last NaN).

    Taps outside, a row of outputs inside, each output still meeting its taps in window
    order (which is what the tie and NaN rules need), compared by ``_later_max``: the serial
    kernel took 112 us instead of 224 on LeNet-5's first pool at b16, 7.2 instead of 14.1 at
    b1."""
    n, c, h, wd = x.shape
    oh, ow = y.shape[2], y.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        plane = x[i, cc]
        for r in range(oh):
            best, arg = y[i, cc, r], idx[i, cc, r]  # (ow,) each
            for q in range(ow):
                best[q] = -np.inf
                arg[q] = -1  # no tap yet (stays so for a window wholly in the padding)
            for a in range(kh):
                ih = tap(r, sh, ph, a, dh)
                if ih < 0 or ih >= h:
                    continue
                row = plane[ih]
                for bb in range(kw):
                    for q in range(ow):
                        iw = tap(q, sw, pw, bb, dw)
                        if iw < 0 or iw >= wd:  # a predictable branch, unlike the comparisons
                            continue
                        best[q], arg[q] = _later_max(row[iw], ih * wd + iw, best[q], arg[q])


@njit(parallel=PARALLEL, **KERNEL)
def max_pool2d_forward_2x2(x, y, idx):
    """max_pool2d_forward for 2x2 windows at stride 2 with no padding or dilation whose
    windows all lie inside x (2*OH <= H, 2*OW <= W): each output row compares its windows'
    four candidates in the general kernel's order (row by row, left to right) in one
    branch-free loop. LeNet-5's 64x6x28x28 pooling took 0.5 ms in the general kernel."""
    n, c, h, wd = x.shape
    oh, ow = y.shape[2], y.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        plane, yp, ip = x[i, cc], y[i, cc], idx[i, cc]
        for r in range(oh):
            top, bottom = plane[2 * r], plane[2 * r + 1]
            yr, ir = yp[r], ip[r]
            at = 2 * r * wd
            for q in range(ow):
                j = 2 * q
                best, arg = top[j], at + j  # the first candidate
                best, arg = _later_max(top[j + 1], at + j + 1, best, arg)
                best, arg = _later_max(bottom[j], at + wd + j, best, arg)
                best, arg = _later_max(bottom[j + 1], at + wd + j + 1, best, arg)
                yr[q] = best
                ir[q] = arg


@njit(parallel=PARALLEL, **KERNEL)
def scatter_planes(src, idx, dst, accumulate):
    """dst[n, c].flat[idx[n, c, j]] (+)= src[n, c].flat[j]; the rest of dst is zero."""
    n, c = src.shape[0], src.shape[1]
    m = src.shape[2] * src.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        out = dst[i, cc].reshape(dst.shape[2] * dst.shape[3])
        out[:] = 0
        s = src[i, cc].reshape(m)
        k = idx[i, cc].reshape(m)
        for j in range(m):
            if k[j] < 0:  # a window with no input pixel in it (possible only with dilation)
                continue
            if accumulate:
                out[k[j]] += s[j]
            else:
                out[k[j]] = s[j]


@njit(parallel=PARALLEL, **KERNEL)
def gather_planes(src, idx, dst):
    """dst[n, c].flat[j] = src[n, c].flat[idx[n, c, j]]."""
    n, c = dst.shape[0], dst.shape[1]
    m = dst.shape[2] * dst.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        s = src[i, cc].reshape(src.shape[2] * src.shape[3])
        k = idx[i, cc].reshape(m)
        out = dst[i, cc].reshape(m)
        for j in range(m):
            out[j] = s[k[j]]


@njit(cache=True, inline="always")
def _avg_divisor(h0, h1, w0, w1, hp, wp, count_include_pad, divisor_override):
    if divisor_override != 0:  # 0: none given (PyTorch allows any other int, negative too)
        return divisor_override
    if count_include_pad:
        return hp * wp
    return (h1 - h0) * (w1 - w0)


# A window's sum and a spread into a window are plain loops: the array forms (a slice's
# .sum(), an array +=) go through Numba's general iterators and ufunc machinery, slower to
# run (the average-pool forward 1.8x) and to compile (its backward 10 s against 1 s).

@njit(cache=True, inline="always")
def _window_sum(plane, h0, h1, w0, w1):
    """plane[h0:h1, w0:w1].sum()."""
    win = plane[h0:h1, w0:w1]  # a view indexed from 0: no wraparound test per element
    s = plane.dtype.type(0)
    for r in range(win.shape[0]):
        for q in range(win.shape[1]):
            s += win[r, q]
    return s


@njit(cache=True, inline="always")
def _spread(plane, h0, h1, w0, w1, v):
    """plane[h0:h1, w0:w1] += v."""
    win = plane[h0:h1, w0:w1]
    for r in range(win.shape[0]):
        for q in range(win.shape[1]):
            win[r, q] += v


@njit(parallel=PARALLEL, **KERNEL)
def avg_pool2d_forward(x, y, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override):
    n, c, h, wd = x.shape
    oh, ow = y.shape[2], y.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        plane = x[i, cc]
        for r in range(oh):
            h0, h1, hp = pool_window(r, sh, ph, kh, h)
            for q in range(ow):
                w0, w1, wp = pool_window(q, sw, pw, kw, wd)
                div = _avg_divisor(h0, h1, w0, w1, hp, wp, count_include_pad, divisor_override)
                y[i, cc, r, q] = _window_sum(plane, h0, h1, w0, w1) / div


@njit(parallel=PARALLEL, **KERNEL)
def avg_pool2d_backward(gy, gx, kh, kw, sh, sw, ph, pw, count_include_pad, divisor_override):
    n, c, h, wd = gx.shape
    oh, ow = gy.shape[2], gy.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        out = gx[i, cc]
        out[:, :] = 0
        for r in range(oh):
            h0, h1, hp = pool_window(r, sh, ph, kh, h)
            for q in range(ow):
                w0, w1, wp = pool_window(q, sw, pw, kw, wd)
                div = _avg_divisor(h0, h1, w0, w1, hp, wp, count_include_pad, divisor_override)
                _spread(out, h0, h1, w0, w1, gy[i, cc, r, q] / div)


@njit(parallel=PARALLEL, **KERNEL)
def adaptive_avg_pool2d_forward(x, y):
    n, c, h, wd = x.shape
    oh, ow = y.shape[2], y.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        plane = x[i, cc]
        for r in range(oh):
            h0, h1 = adaptive_window(r, h, oh)
            for q in range(ow):
                w0, w1 = adaptive_window(q, wd, ow)
                y[i, cc, r, q] = _window_sum(plane, h0, h1, w0, w1) / ((h1 - h0) * (w1 - w0))


@njit(parallel=PARALLEL, **KERNEL)
def adaptive_avg_pool2d_backward(gy, gx):
    n, c, h, wd = gx.shape
    oh, ow = gy.shape[2], gy.shape[3]
    for p in prange(n * c):
        i, cc = p // c, p % c
        out = gx[i, cc]
        out[:, :] = 0
        for r in range(oh):
            h0, h1 = adaptive_window(r, h, oh)
            for q in range(ow):
                w0, w1 = adaptive_window(q, wd, ow)
                _spread(out, h0, h1, w0, w1, gy[i, cc, r, q] / ((h1 - h0) * (w1 - w0)))


__all__ = [
    "max_pool2d_forward", "scatter_planes", "gather_planes", "avg_pool2d_forward",
    "avg_pool2d_backward", "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward",
    "max_pool2d_forward_2x2", "max_pool2d_forward_serial", "max_pool2d_forward_2x2_serial",
    "avg_pool2d_forward_serial", "adaptive_avg_pool2d_forward_serial",
]


# ----------------------------------------------------------------------------- launchers

# Below this many window reads (outputs times taps) a forward runs on one thread: a parallel
# launch costs ~1.2 us (TBB, 2 cores) and the serial max pool reads ~1.5 ns a tap, so the
# parallel one pays from ~1,600 reads on. Measured (2026-12-01, 2 shared cores, fastest of
# 21, 2x2 windows, serial/parallel us): 2 planes 8x8 -> 4x4 (128 reads) 0.66/1.87, LeNet-5's
# first pool at b1 (4,704) 7.2/8.7 (the other core busy then), its second at b16 (25,600)
# 54.5/32.0, its first at b16 (75,264) 112/61.
POOL_PARALLEL_READS = 2048

max_pool2d_forward_serial = serial_twin(max_pool2d_forward)
max_pool2d_forward_2x2_serial = serial_twin(max_pool2d_forward_2x2)
avg_pool2d_forward_serial = serial_twin(avg_pool2d_forward)
adaptive_avg_pool2d_forward_serial = serial_twin(adaptive_avg_pool2d_forward)


def _launch(parallel, serial, reads):
    """The kernel for a pass of ``reads`` window reads: ``parallel``, or its serial twin."""
    return parallel if reads >= POOL_PARALLEL_READS else serial


@register("max_pool2d_forward", "cpu")
def max_pool2d(x, out_hw, kernel, stride, pad, dilation):
    y = np.empty(x.shape[:2] + tuple(out_hw), x.dtype)
    idx = np.empty(y.shape, np.int64)
    if not y.size:
        return y, idx
    reads = y.size * kernel[0] * kernel[1]
    if (tuple(kernel) == tuple(stride) == (2, 2) and tuple(pad) == (0, 0) and tuple(dilation) == (1, 1)
            and 2 * y.shape[2] <= x.shape[2] and 2 * y.shape[3] <= x.shape[3]):
        _launch(max_pool2d_forward_2x2, max_pool2d_forward_2x2_serial, reads)(x, y, idx)
    else:
        _launch(max_pool2d_forward, max_pool2d_forward_serial, reads)(x, y, idx, *kernel, *stride, *pad, *dilation)
    return y, idx


@register("scatter_planes", "cpu")
def scatter(src, idx, out_hw, accumulate):
    """Max-pool backward (accumulate) and max-unpool forward (assign)."""
    dst = np.zeros(src.shape[:2] + tuple(out_hw), src.dtype)
    if src.size:
        scatter_planes(src, idx, dst, accumulate)
    return dst


@register("max_pool2d_backward", "cpu")
def max_pool2d_grad(gy, idx, in_hw, kernel, stride, pad, dilation):
    """Each gradient added at its argmax: a scatter, race-free here as each iteration owns a
    plane. (The window parameters serve the CUDA kernel, which gathers instead.)"""
    return scatter(gy, idx, in_hw, True)


@register("gather_planes", "cpu")
def gather(src, idx):
    """Max-unpool backward: read each index's gradient back."""
    dst = np.empty(idx.shape, src.dtype)
    if dst.size:
        gather_planes(src, idx, dst)
    return dst


def _planes(src, out_hw, kernel, *args):
    """A new (N, C, *out_hw) array of src's dtype, filled by ``kernel(src, out, *args)``."""
    out = np.empty(src.shape[:2] + tuple(out_hw), src.dtype)
    if out.size:
        kernel(src, out, *args)
    return out


@register("avg_pool2d_forward", "cpu")
def avg_pool2d(x, out_hw, kernel, stride, pad, count_include_pad, divisor_override):
    reads = x.shape[0] * x.shape[1] * out_hw[0] * out_hw[1] * kernel[0] * kernel[1]
    return _planes(x, out_hw, _launch(avg_pool2d_forward, avg_pool2d_forward_serial, reads), *kernel, *stride, *pad,
                   count_include_pad, divisor_override)


@register("avg_pool2d_backward", "cpu")
def avg_pool2d_grad(gy, in_hw, kernel, stride, pad, count_include_pad, divisor_override):
    return _planes(gy, in_hw, avg_pool2d_backward, *kernel, *stride, *pad, count_include_pad, divisor_override)


@register("adaptive_avg_pool2d_forward", "cpu")
def adaptive_avg_pool2d(x, out_hw):
    reads = x.size  # each input pixel in about one window
    return _planes(x, out_hw, _launch(adaptive_avg_pool2d_forward, adaptive_avg_pool2d_forward_serial, reads))


@register("adaptive_avg_pool2d_backward", "cpu")
def adaptive_avg_pool2d_grad(gy, in_hw):
    return _planes(gy, in_hw, adaptive_avg_pool2d_backward)
