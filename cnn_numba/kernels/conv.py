"""Convolution kernels: conv2d forward, input-gradient, weight-gradient, bias-gradient.

Layouts (PyTorch's):
    x   (N, C, H, W)             input            gx  same, its gradient
    w   (CO, CI/G, KH, KW)       weight           gw  same
    y   (N, CO, OH, OW)          output           gy  same
Symbols: n batch, c/co input/output channels, g groups, cig = c/g and cog = co/g
channels per group, kh/kw kernel, sh/sw stride, ph/pw leading (top/left) padding,
dh/dw dilation, oh/ow output size. Trailing padding never appears: it only sets
oh/ow, which the caller computes (shapes.py) and passes as the output's shape.

Contract: every kernel *writes* (=) its output array; none accumulates into what
the caller passed. The caller allocates outputs; kernels never allocate per
element.

Dualities (docs/convolution.md): conv_transpose2d's forward is ``backward_input``,
its input-gradient is ``forward``, its weight-gradient is ``backward_weight`` with
the roles of x and gy swapped. So this module has no transposed-conv kernels.

Two algorithms, same signatures:
    direct   loops over output planes and kernel taps; no unfolded copy. At stride 1
             it runs on flat padded planes, and its input-gradient is a stride-1
             forward with the flipped kernel ("direct, stride 1" below).
    im2col   unfolds receptive fields of a chunk of samples into columns
             cols (cig*kh*kw, nb*oh*ow) and does one BLAS product per group:
               forward          y_g   = w_g   @ cols
               backward_input   cols  = w_g^T @ gy_g,   then col2im (a gather)
               backward_weight  gw_g += gy_g  @ cols^T
             At stride 1 forward and weight-gradient unfold only the kw column shifts
             and take the kh row shifts through the BLAS leading dimension
             (kernels/blas.py; "im2col, stride 1" below).
Parallel loops run over outputs only (an output plane, a weight slice, a column
row): no two iterations write the same element.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from ..backend import register
from . import PARALLEL
from .blas import gemm
from .index import axpy, copy_run, dot, out_range, tap

# Reassociation lets LLVM vectorise the reductions; no 'nnan'/'ninf', NaN propagates.
FASTMATH = {"reassoc", "contract"}
KERNEL = dict(cache=True, fastmath=FASTMATH)

# Columns per im2col chunk: big enough for an efficient GEMM, small enough for cache.
IM2COL_COLUMNS = 4096


@njit(cache=True)
def _reduce_slots(partial, out):
    """out (R, C) = the sum over slots of partial (slots, R, C2 >= C), its first C columns: the
    per-thread partial sums of a weight-gradient, reduced."""
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            s = partial.dtype.type(0)
            for t in range(partial.shape[0]):
                s += partial[t, r, j]
            out[r, j] = s


# ----------------------------------------------------------------------------- direct

@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_direct(x, w, b, y, sh, sw, ph, pw, dh, dw, g):
    """y[n, o] = b[o] + sum_{ci, a, bb} w[o, ci, a, bb] * x[n, c0 + ci, tap(oh, a), tap(ow, bb)]."""
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    cog = co // g
    for p in prange(n * co):
        i, o = p // co, p % co
        c0 = (o // cog) * cig
        acc = y[i, o]
        acc[:, :] = b[o]
        for ci in range(cig):
            for a in range(kh):
                r0, r1 = out_range(a, sh, ph, dh, h, oh)
                for bb in range(kw):
                    q0, q1 = out_range(bb, sw, pw, dw, wd, ow)
                    wv = w[o, ci, a, bb]
                    for r in range(r0, r1):
                        axpy(wv, x[i, c0 + ci, tap(r, sh, ph, a, dh)], tap(q0, sw, pw, bb, dw), sw,
                             acc[r], q0, 1, q1 - q0)


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_input_direct(gy, w, gx, sh, sw, ph, pw, dh, dw, g):
    """gx[n, c] = sum over the outputs that tap (n, c, ih, iw): gy * w. A gather per gx plane."""
    n, c, h, wd = gx.shape
    co, cig, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog = co // g
    for p in prange(n * c):
        i, cc = p // c, p % c
        gi, ci = cc // cig, cc % cig
        acc = gx[i, cc]
        acc[:, :] = 0
        for o in range(gi * cog, (gi + 1) * cog):
            for a in range(kh):
                r0, r1 = out_range(a, sh, ph, dh, h, oh)
                for bb in range(kw):
                    q0, q1 = out_range(bb, sw, pw, dw, wd, ow)
                    wv = w[o, ci, a, bb]
                    for r in range(r0, r1):
                        axpy(wv, gy[i, o, r], q0, 1, acc[tap(r, sh, ph, a, dh)], tap(q0, sw, pw, bb, dw), sw,
                             q1 - q0)


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_direct(x, gy, gw, sh, sw, ph, pw, dh, dw, g):
    """gw[o, ci, a, bb] = sum_{n, oh, ow} gy[n, o, oh, ow] * x[n, c0 + ci, tap(oh, a), tap(ow, bb)]."""
    n, c, h, wd = x.shape
    co, cig, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog = co // g
    for p in prange(co * cig):
        o, ci = p // cig, p % cig
        cc = (o // cog) * cig + ci
        for a in range(kh):
            r0, r1 = out_range(a, sh, ph, dh, h, oh)
            for bb in range(kw):
                q0, q1 = out_range(bb, sw, pw, dw, wd, ow)
                s = gw.dtype.type(0)
                for i in range(n):
                    for r in range(r0, r1):
                        s = dot(gy[i, o, r], q0, 1, x[i, cc, tap(r, sh, ph, a, dh)], tap(q0, sw, pw, bb, dw), sw,
                                q1 - q0, s)
                gw[o, ci, a, bb] = s


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_bias(gy, gb):
    """gb[o] = sum_{n, oh, ow} gy[n, o, oh, ow]."""
    n, co, m = gy.shape[0], gy.shape[1], gy.shape[2] * gy.shape[3]
    for o in prange(co):
        s = gb.dtype.type(0)
        for i in range(n):
            plane = gy[i, o].reshape(m)
            for j in range(m):
                s += plane[j]
        gb[o] = s


# ----------------------------------------------------------------------------- direct, stride 1
#
# With stride 1 a tap (a, bb) reads the padded input plane shifted by a constant, so
# if the output is computed on rows as wide as the padded plane (wp = ow + dw*(kw-1))
# the whole plane is one run: acc.flat[j] += w * xp.flat[a*dh*wp + bb*dw + j] for
# j < (oh-1)*wp + ow, a single long vectorised loop per tap instead of oh short ones.
# The extra dw*(kw-1) columns per row are computed and dropped. Small planes of
# consecutive samples sit end to end, so one run covers several (up to FLAT_RUN
# elements; LeNet's 14x14 planes go five to a run, 1.3-1.5x faster than one). Tasks
# are (run of samples, group) pairs dealt to per-thread slots, each with its own
# padded planes.
#
# Each pass over a run does three taps for four output channels ("a quad"): it loads
# three shifted inputs and four accumulators and does twelve FMAs. One tap per pass
# would store an accumulator per FMA, and the stores, not the FMA units, would set the
# pace (measured 2.3x slower on ResNet's 16-channel 3x3 layer). A group's channels go in
# quads, then one at a time (three taps per pass still; depthwise layers have one
# channel per group). The kh*kw taps are listed flat and padded with zero-weight taps
# to a multiple of three, which read a run of zeros: never the input, where 0 * inf
# would turn an inf output into NaN.

TAPS = 3   # taps per pass over a run
QUAD = 4   # output channels per pass
FLAT_RUN = 1024  # elements per run, at most, when samples are batched into one
LINE = 16  # float32 elements per 64-byte cache line


@njit(**KERNEL)
def pad_planes(x, c0, xp, ph, pw):
    """xp (cg, hp, wp) = x[c0:c0+cg] shifted by (ph, pw) into zeros; x (C, H, W).

    Writes the interior only: callers zero xp once (a buffer reused with the same sizes
    keeps its zero border)."""
    h, wd = x.shape[1], x.shape[2]
    hp, wp = xp.shape[1], xp.shape[2]
    r0, r1 = max(0, ph), min(hp, h + ph)
    q0, q1 = max(0, pw), min(wp, wd + pw)
    for ci in range(xp.shape[0]):
        for r in range(r0, r1):
            copy_run(x[c0 + ci, r - ph, q0 - pw:q1 - pw], xp[ci, r, q0:])


@njit(cache=True)
def _flat_sizes(oh, ow, kh, kw, dh, dw):
    """Padded plane (hp, wp) and the length of the flat run covering the output."""
    hp, wp = oh + dh * (kh - 1), ow + dw * (kw - 1)
    return hp, wp, (oh - 1) * wp + ow


@njit(**KERNEL)
def to_wide_rows(planes, wide, wp):
    """wide[c, r*wp:r*wp + ow] = planes[c, r]: planes (C, OH, OW) onto rows wp wide (the
    flat runs' layout); the other columns of ``wide`` are left as they are."""
    oh, ow = planes.shape[1], planes.shape[2]
    for c in range(planes.shape[0]):
        for r in range(oh):
            copy_run(planes[c, r], wide[c, r * wp:])


@njit(cache=True)
def _flat_plan(n, oh, ow, kh, kw, dh, dw):
    """Sizes of a stride-1 direct pass over ``n`` samples: ``(hp, wp, run, taps, offsets, nb)``
    with the padded plane (hp, wp), one sample's flat output run, the taps padded to a
    multiple of TAPS, each real tap's offset in the flat padded plane, and the samples per
    run: small planes of consecutive samples sit end to end, so one pass covers several
    (the outputs between them are computed and dropped), in runs of up to FLAT_RUN
    elements, which keep the four accumulator rows in L1."""
    hp, wp, run = _flat_sizes(oh, ow, kh, kw, dh, dw)
    offsets = np.empty(kh * kw, np.int64)
    for t in range(kh * kw):
        offsets[t] = (t // kw) * dh * wp + (t % kw) * dw
    nb = max(1, min(n, FLAT_RUN // (hp * wp)))
    return hp, wp, run, -(-(kh * kw) // TAPS) * TAPS, offsets, nb


@njit(cache=True)
def _row_buffer(slots, length, dtype):
    """Zeroed (slots, QUAD, length) rows that each start on a cache line (Numba aligns an
    array to 32 bytes; the row length is rounded up to whole lines). Unaligned rows make
    half the accumulators' vector loads and stores straddle two lines: 8% slower forward."""
    return np.zeros((slots, QUAD, -(-length // LINE) * LINE), dtype)


@njit(**KERNEL)
def _load_run(x, i0, m, c0, xp, ph, pw, run):
    """Pad the m samples from i0 (channels c0 onwards) into the run buffer xp (cig, nb, hp, wp);
    the length of their flat output run (``run`` per sample, the last one's only)."""
    for s in range(m):
        pad_planes(x[i0 + s], c0, xp[:, s], ph, pw)
    return (m - 1) * xp.shape[2] * xp.shape[3] + run


@njit(cache=True, inline="always")
def _shifted(src, offsets, t, zeros):
    """The input run that flat tap ``t`` reads: ``src`` from its offset, or ``zeros`` for a
    padding tap."""
    return src[offsets[t]:] if t < offsets.size else zeros


@njit(cache=True, inline="always")
def _tap_runs(src, offsets, k, zeros):
    """The input runs of flat taps k, k+1, k+2."""
    return (_shifted(src, offsets, k, zeros), _shifted(src, offsets, k + 1, zeros),
            _shifted(src, offsets, k + 2, zeros))


@njit(cache=True, inline="always")
def _block(q, cog):
    """Channels in the block starting at ``q`` of a group of ``cog``: a quad, else one."""
    return QUAD if cog - q >= QUAD else 1


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _axpy_quad(wq, s0, s1, s2, a0, a1, a2, a3):
    """a_u[j] += wq[u, 0]*s0[j] + wq[u, 1]*s1[j] + wq[u, 2]*s2[j], tap by tap, for u < 4.

    The twelve weights are read into scalars before the loop: LLVM cannot prove that the
    stores into a_u leave wq alone, and would reload them every iteration."""
    w00, w01, w02 = wq[0, 0], wq[0, 1], wq[0, 2]
    w10, w11, w12 = wq[1, 0], wq[1, 1], wq[1, 2]
    w20, w21, w22 = wq[2, 0], wq[2, 1], wq[2, 2]
    w30, w31, w32 = wq[3, 0], wq[3, 1], wq[3, 2]
    for j in range(a0.size):
        x0, x1, x2 = s0[j], s1[j], s2[j]
        a0[j] = ((a0[j] + w00 * x0) + w01 * x1) + w02 * x2
        a1[j] = ((a1[j] + w10 * x0) + w11 * x1) + w12 * x2
        a2[j] = ((a2[j] + w20 * x0) + w21 * x1) + w22 * x2
        a3[j] = ((a3[j] + w30 * x0) + w31 * x1) + w32 * x2


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _axpy_one(wt, s0, s1, s2, a):
    """a[j] += wt[0]*s0[j] + wt[1]*s1[j] + wt[2]*s2[j], tap by tap: one channel."""
    w0, w1, w2 = wt[0], wt[1], wt[2]
    for j in range(a.size):
        a[j] = ((a[j] + w0 * s0[j]) + w1 * s1[j]) + w2 * s2[j]


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_flat(x, w, b, y, ph, pw, dh, dw, g, slots):
    """Stride-1 forward (see above); ph/pw may exceed the kernel (any leading padding >= 0)."""
    n = x.shape[0]
    co, cig, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    cog = co // g
    hp, wp, run, taps, offsets, nb = _flat_plan(n, oh, ow, kh, kw, dh, dw)
    plane = hp * wp
    blocks = -(-n // nb)
    wt = np.zeros((co, cig, taps), w.dtype)  # the taps flat, zero-padded
    wf = w.reshape(co, cig, kh * kw)
    for o in range(co):
        for ci in range(cig):
            copy_run(wf[o, ci], wt[o, ci])
    xp_buf = np.zeros((slots, cig, nb, hp, wp), x.dtype)  # borders stay 0 (pad_planes)
    acc_buf = _row_buffer(slots, nb * plane, x.dtype)
    zeros = np.zeros(nb * plane, x.dtype)  # what the padding taps read
    for tid in prange(slots):
        xp, acc = xp_buf[tid], acc_buf[tid]
        for t in range(tid, blocks * g, slots):
            i0, gi = (t // g) * nb, t % g
            m = min(nb, n - i0)  # samples in this run
            length = _load_run(x, i0, m, gi * cig, xp, ph, pw, run)
            a0, a1, a2, a3 = acc[0, :length], acc[1, :length], acc[2, :length], acc[3, :length]
            o = gi * cog
            while o < (gi + 1) * cog:
                nu = _block(o - gi * cog, cog)
                for u in range(nu):
                    acc[u, :] = b[o + u]
                for ci in range(cig):
                    src = xp[ci].reshape(nb * plane)
                    for k in range(0, taps, TAPS):
                        s0, s1, s2 = _tap_runs(src, offsets, k, zeros)
                        if nu == QUAD:
                            _axpy_quad(wt[o:o + QUAD, ci, k:k + TAPS], s0, s1, s2, a0, a1, a2, a3)
                        else:
                            _axpy_one(wt[o, ci, k:k + TAPS], s0, s1, s2, a0)
                for s in range(m):
                    for u in range(nu):
                        for r in range(oh):
                            copy_run(acc[u, s * plane + r * wp:s * plane + r * wp + ow], y[i0 + s, o + u, r])
                o += nu


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot_quad(s0, s1, s2, g0, g1, g2, g3, out):
    """out[u, k] += sum_j g_u[j] * s_k[j] for u < 4, k < 3: twelve dot products sharing
    one pass over three shifted input runs and four gy runs."""
    z = s0.dtype.type(0)
    t00 = t01 = t02 = t10 = t11 = t12 = t20 = t21 = t22 = t30 = t31 = t32 = z
    for j in range(g0.size):
        x0, x1, x2 = s0[j], s1[j], s2[j]
        h0, h1, h2, h3 = g0[j], g1[j], g2[j], g3[j]
        t00, t01, t02 = t00 + h0 * x0, t01 + h0 * x1, t02 + h0 * x2
        t10, t11, t12 = t10 + h1 * x0, t11 + h1 * x1, t12 + h1 * x2
        t20, t21, t22 = t20 + h2 * x0, t21 + h2 * x1, t22 + h2 * x2
        t30, t31, t32 = t30 + h3 * x0, t31 + h3 * x1, t32 + h3 * x2
    sums = ((t00, t01, t02), (t10, t11, t12), (t20, t21, t22), (t30, t31, t32))
    for u in range(QUAD):
        for k in range(TAPS):
            out[u, k] += sums[u][k]


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _dot_one(s0, s1, s2, h, out):
    """out[k] += sum_j h[j] * s_k[j] for k < 3: one channel."""
    t0 = t1 = t2 = s0.dtype.type(0)
    for j in range(h.size):
        t0, t1, t2 = t0 + h[j] * s0[j], t1 + h[j] * s1[j], t2 + h[j] * s2[j]
    out[0] += t0
    out[1] += t1
    out[2] += t2


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_flat(x, gy, gw, ph, pw, dh, dw, g, slots):
    """Stride-1 weight-gradient: a long dot product per tap, twelve (three taps by four
    output channels) per pass over the input, in per-slot partial sums; samples batched
    into runs as in the forward (gy is 0 between them)."""
    n = x.shape[0]
    co, cig, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog = co // g
    hp, wp, run, taps, offsets, nb = _flat_plan(n, oh, ow, kh, kw, dh, dw)
    plane = hp * wp
    blocks = -(-n // nb)
    xp_buf = np.zeros((slots, cig, nb, hp, wp), x.dtype)  # borders stay 0 (pad_planes)
    gyw_buf = _row_buffer(slots, nb * plane, x.dtype)  # gy on wide rows; the rest stays 0
    partial = np.zeros((slots, co, cig, taps), x.dtype)
    zeros = np.zeros(nb * plane, x.dtype)  # what the padding taps read
    for tid in prange(slots):
        xp, rows, part = xp_buf[tid], gyw_buf[tid], partial[tid]
        for t in range(tid, blocks * g, slots):
            i0, gi = (t // g) * nb, t % g
            m = min(nb, n - i0)  # samples in this run
            length = _load_run(x, i0, m, gi * cig, xp, ph, pw, run)
            g0, g1, g2, g3 = rows[0, :length], rows[1, :length], rows[2, :length], rows[3, :length]
            o = gi * cog
            while o < (gi + 1) * cog:
                nu = _block(o - gi * cog, cog)
                for s in range(m):
                    to_wide_rows(gy[i0 + s, o:o + nu], rows[:, s * plane:(s + 1) * plane], wp)
                for ci in range(cig):
                    src = xp[ci].reshape(nb * plane)
                    for k in range(0, taps, TAPS):
                        s0, s1, s2 = _tap_runs(src, offsets, k, zeros)
                        if nu == QUAD:
                            _dot_quad(s0, s1, s2, g0, g1, g2, g3, part[o:o + QUAD, ci, k:k + TAPS])
                        else:
                            _dot_one(s0, s1, s2, g0, part[o, ci, k:k + TAPS])
                o += nu
    _reduce_slots(partial.reshape(slots, co * cig, taps), gw.reshape(co * cig, kh * kw))


def flip_kernel(w, g):
    """w (CO, CI/G, KH, KW) -> (CI, CO/G, KH, KW) rotated 180 degrees, group by group: the
    weight of the stride-1 conv that computes conv2d's input-gradient (docs/convolution.md)."""
    co, cig, kh, kw = w.shape
    cog = co // g
    wf = w.reshape(g, cog, cig, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    return np.ascontiguousarray(wf.reshape(g * cig, cog, kh, kw))


# ----------------------------------------------------------------------------- im2col
#
# One parallel loop over (chunk of samples, group) tasks; inside a task everything is
# serial: unfold, one single-threaded BLAS product, fold back. Each thread owns its
# scratch buffers, so there is one thread pool, Numba's,
# and no scatter across tasks: forward and input-gradient tasks write disjoint output
# slices; weight-gradient tasks add into their slot's own partial sum, reduced at
# the end. Tasks are dealt round-robin to ``slots`` (one per thread, passed in by the
# launcher; Numba's get_thread_id would make the kernels uncacheable). (Two pools, Numba's OpenMP loops alternating with a multi-threaded BLAS,
# measured up to 10x slower on 2 cores: each pool's idle workers spin on the cores the
# other needs.)

@njit(**KERNEL)
def im2col(x, c0, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow):
    """cols[(ci*kh + a)*kw + bb, i*oh*ow + r*ow + q] = x[i, c0 + ci, tap(r, a), tap(q, bb)] (0 in padding).

    x (nb, C, H, W); cols (cig*kh*kw, nb*oh*ow).
    """
    nb, h, wd = x.shape[0], x.shape[2], x.shape[3]
    m = oh * ow
    for row in range(cols.shape[0]):
        ci, a, bb = row // (kh * kw), (row // kw) % kh, row % kw
        r0, r1 = out_range(a, sh, ph, dh, h, oh)
        q0, q1 = out_range(bb, sw, pw, dw, wd, ow)
        for i in range(nb):
            dst = cols[row, i * m:(i + 1) * m]
            dst[:] = 0
            t0 = tap(q0, sw, pw, bb, dw)
            for r in range(r0, r1):
                xrow = x[i, c0 + ci, tap(r, sh, ph, a, dh)]
                if sw == 1:  # a contiguous run: a vectorised copy
                    copy_run(xrow[t0:t0 + q1 - q0], dst[r * ow + q0:])
                else:
                    for q in range(q0, q1):
                        dst[r * ow + q] = xrow[t0 + (q - q0) * sw]


@njit(**KERNEL)
def col2im(cols, gx, c0, cig, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow):
    """The adjoint of im2col, as a gather: gx[i, c0+ci] = sum of the column entries that read it."""
    nb, h, wd = gx.shape[0], gx.shape[2], gx.shape[3]
    m = oh * ow
    one = cols.dtype.type(1)
    for i in range(nb):
        for ci in range(cig):
            acc = gx[i, c0 + ci]
            acc[:, :] = 0
            for a in range(kh):
                r0, r1 = out_range(a, sh, ph, dh, h, oh)
                for bb in range(kw):
                    q0, q1 = out_range(bb, sw, pw, dw, wd, ow)
                    src = cols[(ci * kh + a) * kw + bb, i * m:(i + 1) * m]
                    for r in range(r0, r1):
                        axpy(one, src, r * ow + q0, 1, acc[tap(r, sh, ph, a, dh)], tap(q0, sw, pw, bb, dw), sw,
                             q1 - q0)


@njit(**KERNEL)
def planes_to_columns(y, c0, out):
    """out (cg, nb*oh*ow) = y[:, c0:c0+cg] with the batch moved next to the pixels."""
    nb, m = y.shape[0], y.shape[2] * y.shape[3]
    for o in range(out.shape[0]):
        for i in range(nb):
            copy_run(y[i, c0 + o].reshape(m), out[o, i * m:])


@njit(cache=True, inline="always")
def _biased_run(src, bias, dst):
    """dst[j] = src[j] + bias for j < src.size (1-d): a product's output row into y."""
    for j in range(src.size):
        dst[j] = src[j] + bias


@njit(**KERNEL)
def columns_to_planes(src, b, c0, y):
    """y[:, c0:c0+cg] = src (cg, nb*oh*ow) + b[c0:c0+cg]: the inverse of planes_to_columns, plus bias."""
    nb, oh, ow = y.shape[0], y.shape[2], y.shape[3]
    m = oh * ow
    for o in range(src.shape[0]):
        for i in range(nb):
            _biased_run(src[o, i * m:(i + 1) * m], b[c0 + o], y[i, c0 + o].reshape(m))


@njit(cache=True)
def _plan(n, co, cig, kh, kw, oh, ow, g, slots):
    """Sizes of an im2col pass: ``(cog, k, m, nb, tasks)`` with k rows of columns, m pixels
    per sample, nb samples per task (about IM2COL_COLUMNS columns, and at least two tasks
    per slot), and one task per (chunk of samples, group)."""
    cog, k, m = co // g, cig * kh * kw, oh * ow
    nb = max(1, min(n, IM2COL_COLUMNS // max(m, 1), -(-n // (2 * slots))))
    return cog, k, m, nb, -(-n // nb) * g


@njit(cache=True, inline="always")
def _task(t, g, nb, n):
    """Task ``t``: samples ``[n0, n0 + nc)`` of group ``gi``."""
    n0 = (t // g) * nb
    return n0, min(nb, n - n0), t % g


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_im2col(x, w, b, y, sh, sw, ph, pw, dh, dw, g, slots):
    n = x.shape[0]
    co, cig, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    cog, k, m, nb, tasks = _plan(n, co, cig, kh, kw, oh, ow, g, slots)
    w2 = w.reshape(co, k)
    col_buf = np.empty((slots, k * nb * m), x.dtype)
    out_buf = np.empty((slots, cog * nb * m), x.dtype)
    for tid in prange(slots):
        for t in range(tid, tasks, slots):  # round-robin: equal tasks, equal shares
            n0, nc, gi = _task(t, g, nb, n)
            cols = col_buf[tid, :k * nc * m].reshape(k, nc * m)
            out = out_buf[tid, :cog * nc * m].reshape(cog, nc * m)
            im2col(x[n0:n0 + nc], gi * cig, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
            np.dot(w2[gi * cog:(gi + 1) * cog], cols, out)
            columns_to_planes(out, b, gi * cog, y[n0:n0 + nc])


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_input_im2col(gy, w, gx, sh, sw, ph, pw, dh, dw, g, slots):
    n = gx.shape[0]
    co, cig, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog, k, m, nb, tasks = _plan(n, co, cig, kh, kw, oh, ow, g, slots)
    w2 = w.reshape(co, k)
    col_buf = np.empty((slots, k * nb * m), gy.dtype)
    gy_buf = np.empty((slots, cog * nb * m), gy.dtype)
    for tid in prange(slots):
        for t in range(tid, tasks, slots):  # round-robin: equal tasks, equal shares
            n0, nc, gi = _task(t, g, nb, n)
            cols = col_buf[tid, :k * nc * m].reshape(k, nc * m)
            gyc = gy_buf[tid, :cog * nc * m].reshape(cog, nc * m)
            planes_to_columns(gy[n0:n0 + nc], gi * cog, gyc)
            np.dot(w2[gi * cog:(gi + 1) * cog].T, gyc, cols)
            col2im(cols, gx[n0:n0 + nc], gi * cig, cig, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_im2col(x, gy, gw, sh, sw, ph, pw, dh, dw, g, slots):
    n = x.shape[0]
    co, cig, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog, k, m, nb, tasks = _plan(n, co, cig, kh, kw, oh, ow, g, slots)
    col_buf = np.empty((slots, k * nb * m), x.dtype)
    gy_buf = np.empty((slots, cog * nb * m), x.dtype)
    prod = np.empty((slots, cog, k), x.dtype)
    partial = np.zeros((slots, co, k), x.dtype)  # each slot's own sum over its tasks
    for tid in prange(slots):
        for t in range(tid, tasks, slots):  # round-robin: equal tasks, equal shares
            n0, nc, gi = _task(t, g, nb, n)
            cols = col_buf[tid, :k * nc * m].reshape(k, nc * m)
            gyc = gy_buf[tid, :cog * nc * m].reshape(cog, nc * m)
            im2col(x[n0:n0 + nc], gi * cig, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
            planes_to_columns(gy[n0:n0 + nc], gi * cog, gyc)
            np.dot(gyc, cols.T, prod[tid])
            part, pr = partial[tid, gi * cog:(gi + 1) * cog].reshape(cog * k), prod[tid].reshape(cog * k)
            for j in range(cog * k):
                part[j] += pr[j]
    _reduce_slots(partial, gw.reshape(co, k))


# ----------------------------------------------------------------------------- im2col, stride 1
#
# At stride 1 the unfolded columns of tap (a, bb) are the padded plane read from offset
# a*dh*wp + bb*dw on "wide" rows (the flat runs of the direct kernels above). So the
# kw column shifts are copied once, shifted[ci*kw + bb, j] = xp[ci].flat[bb*dw + j], and
# the kh row shifts cost nothing: tap row a's columns are ``shifted`` read from column
# a*dh*wp on, a window a BLAS product takes through its leading dimension. A pass is then
# kh products with K = cig*kw, accumulated (beta = 1) on wide output rows, and the
# unfolded copy is kw times the input instead of kh*kw times. Weights are rearranged to
# w3 (kh, CO, CI/G*kw): w3[a, o, ci*kw + bb] = w[o, ci, a, bb].

@njit(**KERNEL)
def shift_columns(xp, shifted, kw, dw):
    """shifted[ci*kw + bb, :] = xp[ci].flat[bb*dw:][:L], L = shifted's row length."""
    cig, length = xp.shape[0], shifted.shape[1]
    for ci in range(cig):
        src = xp[ci].reshape(xp.shape[1] * xp.shape[2])
        for bb in range(kw):
            copy_run(src[bb * dw:bb * dw + length], shifted[ci * kw + bb])


@njit(cache=True)
def _shift_plan(c, w3_shape, g, oh, ow, dh, dw):
    """Sizes of a stride-1 im2col pass with weights w3 (kh, co, k = cig*kw):
    ``(kh, co, k, cig, cog, kw, hp, wp, run, L)``, with the padded plane (hp, wp), the flat
    output run, and L the shifted rows' length, the longest that every tap row's window
    (a*dh*wp + run <= L) and every shift fit."""
    kh, co, k = w3_shape
    cig, cog = c // g, co // g
    kw = k // cig
    hp, wp, run = _flat_sizes(oh, ow, kh, kw, dh, dw)
    return kh, co, k, cig, cog, kw, hp, wp, run, hp * wp - (kw - 1) * dw


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_shifted(x, w3, b, y, ph, pw, dh, dw, g, slots):
    """Stride-1 forward as kh products per (sample, group): y_g = sum_a w3[a]_g @ shifted(a)."""
    n, oh, ow = x.shape[0], y.shape[2], y.shape[3]
    kh, co, k, cig, cog, kw, hp, wp, run, length = _shift_plan(x.shape[1], w3.shape, g, oh, ow, dh, dw)
    xp_buf = np.zeros((slots, cig, hp, wp), x.dtype)  # borders stay 0 (pad_planes)
    sh_buf = np.empty((slots, k, length), x.dtype)
    out_buf = np.empty((slots, cog, oh * wp), x.dtype)
    wf = w3.reshape(kh * co * k)
    for tid in prange(slots):
        xp, shifted, out = xp_buf[tid], sh_buf[tid], out_buf[tid]
        sf, of = shifted.reshape(k * length), out.reshape(cog * oh * wp)
        for t in range(tid, n * g, slots):
            i, gi = t // g, t % g
            pad_planes(x[i], gi * cig, xp, ph, pw)
            shift_columns(xp, shifted, kw, dw)
            for a in range(kh):
                gemm(False, False, cog, run, k, wf, (a * co + gi * cog) * k, k, sf, a * dh * wp, length,
                     0.0 if a == 0 else 1.0, of, 0, oh * wp)
            for o in range(cog):
                for r in range(oh):
                    _biased_run(out[o, r * wp:r * wp + ow], b[gi * cog + o], y[i, gi * cog + o, r])


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_shifted(x, gy, gw3, ph, pw, dh, dw, g, slots):
    """Stride-1 weight-gradient: gw3[a]_g += gy_g (wide rows) @ shifted(a)^T per sample,
    in per-slot partial sums."""
    n, oh, ow = x.shape[0], gy.shape[2], gy.shape[3]
    kh, co, k, cig, cog, kw, hp, wp, run, length = _shift_plan(x.shape[1], gw3.shape, g, oh, ow, dh, dw)
    xp_buf = np.zeros((slots, cig, hp, wp), x.dtype)  # borders stay 0 (pad_planes)
    sh_buf = np.empty((slots, k, length), x.dtype)
    gyw_buf = np.zeros((slots, cog, oh * wp), x.dtype)  # gy on wide rows; the extra columns stay 0
    partial = np.zeros((slots, kh * co * k), x.dtype)
    for tid in prange(slots):
        xp, shifted, gyw, part = xp_buf[tid], sh_buf[tid], gyw_buf[tid], partial[tid]
        sf, gf = shifted.reshape(k * length), gyw.reshape(cog * oh * wp)
        for t in range(tid, n * g, slots):
            i, gi = t // g, t % g
            pad_planes(x[i], gi * cig, xp, ph, pw)
            shift_columns(xp, shifted, kw, dw)
            to_wide_rows(gy[i, gi * cog:(gi + 1) * cog], gyw, wp)
            for a in range(kh):
                gemm(False, True, cog, k, run, gf, 0, oh * wp, sf, a * dh * wp, length,
                     1.0, part, (a * co + gi * cog) * k, k)
    _reduce_slots(partial.reshape(slots, 1, kh * co * k), gw3.reshape(1, kh * co * k))


def _taps_first(w):
    """w (CO, CI/G, KH, KW) -> w3 (KH, CO, CI/G*KW), the stride-1 im2col products' layout."""
    co, cig, kh, kw = w.shape
    return np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(kh, co, cig * kw)


def _run_shifted(which, arrays, ph, pw, dh, dw, g, slots) -> None:
    """Stride-1 im2col forward (which 0) or weight-gradient (which 2). (Its input-gradient
    stays the general one: as a flipped forward its products have only CI/G rows, and
    w^T @ gy then col2im measured as fast or faster on every benchmark shape.)"""
    if which == 0:
        x, w, b, y = arrays
        conv2d_forward_shifted(x, _taps_first(w), b, y, ph, pw, dh, dw, g, slots)
    else:
        x, gy, gw = arrays
        co, cig, kh, kw = gw.shape
        gw3 = np.empty((kh, co, cig * kw), gw.dtype)
        conv2d_backward_weight_shifted(x, gy, gw3, ph, pw, dh, dw, g, slots)
        gw[:] = gw3.reshape(kh, co, cig, kw).transpose(1, 2, 0, 3)


# ----------------------------------------------------------------------------- launchers

_ALGOS = {
    "direct": (conv2d_forward_direct, conv2d_backward_input_direct, conv2d_backward_weight_direct),
    "im2col": (conv2d_forward_im2col, conv2d_backward_input_im2col, conv2d_backward_weight_im2col),
}


# 'auto' runs the stride-1 direct kernels on output planes of at least this many pixels
# (shorter flat runs pay the per-pass set-up and the dropped columns), and only up to
# this many inputs per output (wider layers make a BLAS product with a long K the faster).
FLAT_MIN_PLANE = 100
FLAT_MAX_K = 576


def auto_algo(c, co, g, kh, kw, stride, out_hw, which=0):
    """The algorithm 'auto' picks for pass ``which`` (0 forward, 1 input-, 2 weight-gradient)
    of a conv2d layer with output planes ``out_hw``. Direct when each output reads fewer
    than 16 inputs (depthwise). At stride 1 direct when the flat kernels pay: planes big
    enough, a layer narrow enough, at least TAPS taps (a 1x1 kernel would pad its one tap
    to three), and for the input-gradient, whose flat pass computes the C_in/G input
    channels four at a time, at least 8 of them. im2col otherwise. (Measured per shape
    and pass in bench/results/cpu-*.md.)"""
    cig = c // g
    k = cig * kh * kw
    if k < 16:
        return "direct"
    flat = (tuple(stride) == (1, 1) and kh * kw >= TAPS and out_hw[0] * out_hw[1] >= FLAT_MIN_PLANE
            and k <= FLAT_MAX_K and (which != 1 or cig >= 2 * QUAD))
    return "direct" if flat else "im2col"


def _run(algo, which, arrays, hyper, w_shape, c, out_hw):
    """Pass ``which`` (0 forward, 1 input-, 2 weight-gradient) with 'auto' resolved.

    ``hyper`` = (sh, sw, ph, pw, dh, dw, g); ``out_hw`` the conv2d output planes. Direct at
    stride 1 runs the flat kernels; its input-gradient is then the stride-1 forward of gy
    with the flipped kernel and the 'full' padding d*(k-1) - p, when that is >= 0 (else
    the general direct kernel, or im2col under 'auto').
    """
    sh, sw, ph, pw, dh, dw, g = hyper
    kh, kw = w_shape[2], w_shape[3]
    fh, fw = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    flat = (sh, sw) == (1, 1) and (which != 1 or min(fh, fw) >= 0)
    if algo == "auto":
        algo = auto_algo(c, w_shape[0], g, kh, kw, (sh, sw), out_hw, which)
        if algo == "direct" and (sh, sw) == (1, 1) and not flat:
            algo = "im2col"
    slots = get_num_threads()
    extra = (slots,) if algo == "im2col" else ()
    if algo == "direct" and flat:
        if which == 0:
            return conv2d_forward_flat(*arrays, ph, pw, dh, dw, g, slots)
        if which == 2:
            conv2d_backward_weight_flat(*arrays, ph, pw, dh, dw, g, slots)
            return _exact_if_nan(arrays, hyper, extra, algo)
        gy, w, gx = arrays
        zeros = np.zeros(gx.shape[1], gx.dtype)
        return conv2d_forward_flat(gy, flip_kernel(w, g), zeros, gx, fh, fw, dh, dw, g, slots)
    if algo == "im2col" and (sh, sw) == (1, 1) and which != 1:
        _run_shifted(which, arrays, ph, pw, dh, dw, g, slots)
        return _exact_if_nan(arrays, hyper, extra, algo) if which == 2 else None
    _ALGOS[algo][which](*arrays, *hyper, *extra)


def _exact_if_nan(arrays, hyper, extra, algo) -> None:
    """Redo a stride-1 weight-gradient with the general kernel of ``algo`` when it holds a NaN.

    The flat and shifted kernels sum over wide rows, whose gap columns pair zeros of gy with
    input pixels that the true sum never reads: an inf there makes a NaN that PyTorch does
    not have. Only a non-finite input can do that, and a NaN in gw (a small array) shows it,
    so finite inputs pay one scan of gw; the general kernel reads exact windows only."""
    x, gy, gw = arrays
    if np.isnan(gw).any():
        gw[...] = 0
        _ALGOS[algo][2](x, gy, gw, *hyper, *extra)


@register("conv2d_forward", "cpu")
def forward(x, w, b, out_hw, stride, pad, dilation, groups, algo):
    """y (N, CO, OH, OW); ``pad`` is the leading (top, left) padding."""
    n, c = x.shape[:2]
    y = np.empty((n, w.shape[0]) + tuple(out_hw), x.dtype)
    if b is None:
        b = np.zeros(w.shape[0], x.dtype)
    if n:
        _run(algo, 0, (x, w, b, y), (*stride, *pad, *dilation, groups), w.shape, c, out_hw)
    return y


@register("conv2d_backward_input", "cpu")
def backward_input(gy, w, in_hw, stride, pad, dilation, groups, algo):
    """gx (N, CI, H, W) from gy (N, CO, OH, OW); also conv_transpose2d's forward."""
    n = gy.shape[0]
    gx = np.empty((n, w.shape[1] * groups) + tuple(in_hw), gy.dtype)
    if n:
        _run(algo, 1, (gy, w, gx), (*stride, *pad, *dilation, groups), w.shape, gx.shape[1], gy.shape[2:])
    return gx


@register("conv2d_backward_weight", "cpu")
def backward_weight(x, gy, kernel_hw, stride, pad, dilation, groups, algo):
    """gw (CO, CI/G, KH, KW); also conv_transpose2d's weight-gradient with x and gy swapped."""
    co = gy.shape[1]
    gw = np.zeros((co, x.shape[1] // groups) + tuple(kernel_hw), x.dtype)
    if x.shape[0]:
        _run(algo, 2, (x, gy, gw), (*stride, *pad, *dilation, groups), gw.shape, x.shape[1], gy.shape[2:])
    return gw


@register("conv2d_backward_bias", "cpu")
def backward_bias(gy):
    gb = np.empty(gy.shape[1], gy.dtype)
    conv2d_backward_bias(np.ascontiguousarray(gy), gb)  # the kernel reads flat planes
    return gb


@register("add_channel_bias", "cpu")
def add_channel_bias(y, b):
    y += b.reshape(1, -1, 1, 1)
    return y
