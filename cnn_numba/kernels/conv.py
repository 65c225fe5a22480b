"""Convolution kernels: conv2d forward, input-gradient, weight-gradient, bias-gradient.

Layouts (PyTorch's):
    x   (N, C, H, W)             input            gx  same, its gradient
    w   (CO, CI/G, KH, KW)       weight           gw  same
    y   (N, CO, OH, OW)          output           gy  same
Symbols: n batch, c/co input/output channels, g groups, cig = c/g and cog = co/g
channels per group, kh/kw kernel, sh/sw stride, ph/pw leading (top/left) padding,
dh/dw dilation, oh/ow output size: the fields of ``shapes.ConvGeom``. Trailing
padding never appears: it only sets oh/ow, which the output's shape carries.

Contract: every kernel *writes* (=) its output array; none accumulates into what
the caller passed. The caller allocates outputs; kernels never allocate per
element.

Dualities (docs/convolution.md): conv_transpose2d's forward is ``backward_input``,
its input-gradient is ``forward``, its weight-gradient is ``backward_weight`` with
the roles of x and gy swapped. So this module has no transposed-conv kernels.

Two algorithms, same signatures (kernels/conv_algos.py lists them, with their
specialisations in kernels/conv_stride1.py: direct's flat kernels, any stride; im2col's
shifted products, stride 1):
    direct   loops over output planes and kernel taps; no unfolded copy.
    im2col   unfolds receptive fields of a chunk of samples into columns
             cols (cig*kh*kw, nb*oh*ow) and does one BLAS product per group:
               forward          y_g   = w_g   @ cols
               backward_input   cols  = w_g^T @ gy_g,   then col2im (a gather)
               backward_weight  gw_g += gy_g  @ cols^T
Epilogue: the forward kernels (every algorithm's) take ``ep, relu`` and apply ``epilogue`` to
each output as they store it: y = relu((conv + b - mean) * scale + shift) per output channel,
with ep (3, CO) the rows (mean, scale, shift), or (3, 0) for no affine step, and ``relu`` a
flag. That is eval-mode batch_norm then relu, operation for operation (see ``epilogue``), in
the pass that writes y instead of two more passes over it. ``no_epilogue`` is the plain conv.
(A residual operand, y = relu(bn(conv) + shortcut) for the residual blocks, was tried and
dropped: bit-exact, but the extra operand in the store loops, a view or an offset per output
row, made the plain conv 2-6% slower, 10-35% with a view, on 256-sample LeNet/resnet8 shapes,
more than the add pass it saved; not the epilogue's size: LLVM still inlined it.)

Parallel loops run over outputs only (an output plane, a weight slice, a column
row): no two iterations write the same element. The launchers at the end take a
``shapes.ConvGeom`` and pass its fields to the kernels as scalars.
"""
import numpy as np
from numba import njit, prange

from ..backend import register
from . import PARALLEL, get_num_threads
from .elementwise import relu_value
from .index import axpy, column_row, copy_run, dot, out_range, tap
from .simd import vadd, vmul, vrelu, vsub

# Reassociation lets LLVM vectorise the reductions; no 'nnan'/'ninf', NaN propagates.
FASTMATH = {"reassoc", "contract"}
KERNEL = dict(cache=True, fastmath=FASTMATH)

# Columns per im2col chunk: big enough for an efficient GEMM, small enough for cache.
IM2COL_COLUMNS = 4096


@njit(cache=True, fastmath=False)
def epilogue(v, chan, relu):
    """One output ``v`` (conv + bias) of a channel whose ``chan`` = (affine, mean, scale, shift)
    (``channel``): ``(v - mean) * scale + shift`` where affine, then 0 where ``relu`` and it is
    below 0. kernels/nn.py's batch_norm_forward and relu_forward_kernel, operation for
    operation: fastmath=False stated, not inherited from the fastmath kernels that call this
    (Numba's default), so LLVM cannot fuse the multiply-add into an FMA, and fused and unfused
    outputs agree bit for bit. Not inline="always": that would inline Numba's IR under the
    caller's flags; LLVM inlines the compiled function, flags kept, and still vectorises."""
    affine, mu, scale, shift = chan
    if affine:
        v = (v - mu) * scale + shift
    return relu_value(v) if relu else v


@njit(cache=True, fastmath=False)
def epilogue_vec(v, mu, scale, shift, affine, relu):
    """``epilogue`` on a Vec (kernels/simd.py) of outputs of several channels, their per-channel
    values in Vecs ``mu``, ``scale``, ``shift`` lane by lane: the same operations, in the same
    order and precision, so the results are equal bit for bit (fastmath=False here for the
    same reason)."""
    if affine:
        v = vadd(vmul(vsub(v, mu), scale), shift)
    return vrelu(v) if relu else v


@njit(cache=True, inline="always")
def channel(ep, o):
    """``epilogue``'s per-channel values for output channel o: (affine, mean, scale, shift),
    read once per row or plane (scalars: LLVM cannot hoist loads from ep past stores into y)."""
    z = ep.dtype.type(0)
    if ep.shape[1] == 0:
        return False, z, z, z
    return True, ep[0, o], ep[1, o], ep[2, o]


def no_epilogue(dtype):
    """``(ep, relu)`` of a plain conv: no affine step, no relu."""
    return np.empty((3, 0), dtype), False


def epilogue_args(epilogue, dtype):
    """A forward launcher's ``epilogue=`` as the kernels' ``(ep, relu)``: itself, or
    ``no_epilogue`` for None."""
    return no_epilogue(dtype) if epilogue is None else epilogue


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
def conv2d_forward_direct(x, w, b, y, ep, relu, sh, sw, ph, pw, dh, dw, g):
    """y[n, o] = b[o] + sum_{ci, a, bb} w[o, ci, a, bb] * x[n, c0 + ci, tap(oh, a), tap(ow, bb)],
    then the epilogue over the plane (still in cache)."""
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
        chan = channel(ep, o)
        if chan[0] or relu:
            for r in range(oh):
                store_run(acc[r], acc[r], 0, 1, chan, relu)


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
        ci, a, bb = column_row(row, kh, kw)
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
def store_run(src, dst, q0, step, chan, relu):
    """dst[q0 + j*step] = epilogue(src[j]) for j < src.size (1-d; src may be dst): accumulators
    into an output row, every step-th element from q0 (one phase of gx's columns)."""
    if step == 1:
        d = dst[q0:q0 + src.size]  # a view indexed from 0: the loop vectorises
        for j in range(src.size):
            d[j] = epilogue(src[j], chan, relu)
    else:
        for j in range(src.size):
            dst[q0 + j * step] = epilogue(src[j], chan, relu)


@njit(cache=True, inline="always")
def biased_run(src, bias, dst, chan, relu):
    """dst[j] = epilogue(src[j] + bias) for j < src.size (1-d): a product's output row into y."""
    for j in range(src.size):
        dst[j] = epilogue(src[j] + bias, chan, relu)


@njit(**KERNEL)
def columns_to_planes(src, b, ep, relu, c0, y):
    """y[:, c0:c0+cg] = epilogue(src (cg, nb*oh*ow) + b[c0:c0+cg]): the inverse of
    planes_to_columns, plus bias and epilogue."""
    nb, oh, ow = y.shape[0], y.shape[2], y.shape[3]
    m = oh * ow
    for o in range(src.shape[0]):
        chan = channel(ep, c0 + o)
        for i in range(nb):
            biased_run(src[o, i * m:(i + 1) * m], b[c0 + o], y[i, c0 + o].reshape(m), chan, relu)


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


# With fewer tasks than slots (a batch of 1) the forward splits each task's product by rows
# (output channels) between the slots, each unfolding the columns itself, where a part keeps
# at least this many multiply-adds. At b1 on 2 shared cores (2026-12-01, fastest of 210,
# split/whole us): resnet8's 32->64 14x14 s2 (903k multiply-adds) 30.6/37.5, 64->128 14x14
# s2 72.7/104.2, 256->256 8x8 429.7/723.9; its 1x1 shortcuts (100k) stay whole (8.2, 7.2).
# A part's product has fewer rows than the whole: BLAS may round its sums differently.
SPLIT_MIN_MACS = 1 << 18


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_im2col(x, w, b, y, ep, relu, sh, sw, ph, pw, dh, dw, g, slots):
    n = x.shape[0]
    co, cig, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    cog, k, m, nb, tasks = _plan(n, co, cig, kh, kw, oh, ow, g, slots)
    parts = max(1, min(-(-slots // tasks), cog * k * nb * m // SPLIT_MIN_MACS, cog))  # of each task's rows
    chunk = -(-cog // parts)
    w2 = w.reshape(co, k)
    col_buf = np.empty((slots, k * nb * m), x.dtype)
    out_buf = np.empty((slots, chunk * nb * m), x.dtype)
    for tid in prange(slots):
        for t in range(tid, tasks * parts, slots):  # round-robin: equal tasks, equal shares
            n0, nc, gi = _task(t // parts, g, nb, n)
            o0 = gi * cog + (t % parts) * chunk  # this task's output channels: [o0, o1)
            o1 = min(o0 + chunk, (gi + 1) * cog)
            if o0 >= o1:  # the last parts of a short split
                continue
            cols = col_buf[tid, :k * nc * m].reshape(k, nc * m)
            out = out_buf[tid, :(o1 - o0) * nc * m].reshape(o1 - o0, nc * m)
            im2col(x[n0:n0 + nc], gi * cig, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow)
            np.dot(w2[o0:o1], cols, out)
            columns_to_planes(out, b, ep, relu, o0, y[n0:n0 + nc])


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


# ----------------------------------------------------------------------------- launchers
#
# One per pass and algorithm, as kernels/conv_algos.py's table calls them: the arrays,
# outputs allocated by the caller, then the layer's ConvGeom (and the forward's optional
# ``epilogue=(ep, relu)``, no_epilogue when None).

def forward_direct(x, w, b, y, geom, epilogue=None):
    conv2d_forward_direct(x, w, b, y, *epilogue_args(epilogue, y.dtype), geom.sh, geom.sw, geom.ph, geom.pw,
                          geom.dh, geom.dw, geom.g)


def backward_input_direct(gy, w, gx, geom):
    conv2d_backward_input_direct(gy, w, gx, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g)


def backward_weight_direct(x, gy, gw, geom):
    conv2d_backward_weight_direct(x, gy, gw, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g)


def forward_im2col(x, w, b, y, geom, epilogue=None):
    conv2d_forward_im2col(x, w, b, y, *epilogue_args(epilogue, y.dtype), geom.sh, geom.sw, geom.ph, geom.pw,
                          geom.dh, geom.dw, geom.g, get_num_threads())


def backward_input_im2col(gy, w, gx, geom):
    conv2d_backward_input_im2col(gy, w, gx, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g,
                                 get_num_threads())


def backward_weight_im2col(x, gy, gw, geom):
    conv2d_backward_weight_im2col(x, gy, gw, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g,
                                  get_num_threads())


@register("conv2d_backward_bias", "cpu")
def backward_bias(gy):
    gb = np.empty(gy.shape[1], gy.dtype)
    conv2d_backward_bias(np.ascontiguousarray(gy), gb)  # the kernel reads flat planes
    return gb


@register("add_channel_bias", "cpu")
def add_channel_bias(y, b):
    y += b.reshape(1, -1, 1, 1)
    return y
