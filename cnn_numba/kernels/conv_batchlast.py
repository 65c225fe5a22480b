"""Direct conv2d at stride 1 with the batch innermost: ``algo="batchlast"``.

The flat kernels (conv_stride1.py) run each tap as one long loop over a padded plane, rows
as wide as the padding makes them, and drop the columns past the output: on ResNet's 7x7
and 8x8 planes that is 9 columns computed per 7 (or 8) kept, plus the rows between
samples, about half again the work. Here the input is first copied channel-major with the
batch last, xt (C, Hp, Wp, N), padded; then one output row r of channel o, all its ow
pixels for all N samples, is one contiguous run y_o[r] (ow*N elements, sample innermost),
and tap (a, bb) of input channel c reads one contiguous run of xt too, from
((c*Hp + r + a*dh)*Wp + bb*dw)*N. Nothing outside the output is computed, the runs are
long wherever the batch is (7 x 128 = 896 elements for resnet8's last stage at batch 128),
and the inner loop is the flat kernels' own: three (channel, tap) pairs for four output
channels per pass (_axpy_quad). The price is two copies the flat kernels do not make, the
input into xt and the output back from rows, small beside the work of a layer with many
channels; at batch 1 the runs are as short as a row.

    forward          y = conv2d(x, w) + b                   xt = x padded by (ph, pw)
    backward_input   gx = conv2d(gy, w flipped, groups' channels transposed), gy padded by
                     dh*(kh-1) - ph (a crop where that is negative): at stride 1 the
                     input-gradient is a forward (docs/convolution.md)

No weight-gradient: as twelve dot products per pass over these runs (gy with the batch
last too) it measured 1.0-1.5x the flat kernel's time (64->64 channels, 7x7 and 8x8 planes,
batch 64-128, one thread), so the table's fallback, direct, runs it. Stride 1 only
(``supports``); at stride s > 1 the flat kernels' polyphase planes serve.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from . import PARALLEL
from .conv import KERNEL, channel, epilogue, no_epilogue
from .conv_stride1 import (FLAT_RUN, QUAD, SCRATCH_RATIO, SCRATCH_SLACK, TAPS, _axpy_one, _axpy_quad, _row_buffer,
                           _tap_runs, transpose_groups)


@njit(parallel=PARALLEL, **KERNEL)
def to_batchlast(x, xt, lead_h, lead_w):
    """xt[c, lead_h + r, lead_w + q, i] = x[i, c, r, q] wherever that is inside xt (a
    negative lead crops); x (N, C, H, W), xt (C, Hp, Wp, N). The rest of xt is left as it
    is: callers pass zeros."""
    n, c, h, w = x.shape
    hp, wp = xt.shape[1], xt.shape[2]
    r0, r1 = max(0, -lead_h), min(h, hp - lead_h)
    q0, q1 = max(0, -lead_w), min(w, wp - lead_w)
    for ci in prange(c):
        for r in range(r0, r1):
            for q in range(q0, q1):
                dst = xt[ci, lead_h + r, lead_w + q]
                for i in range(n):
                    dst[i] = x[i, ci, r, q]


@njit(cache=True)
def _pairs(cig, kh, kw, hp, wp, n, dh, dw):
    """``(count, sources)``: a group's cig*kh*kw (channel, tap) pairs, in the flat weight's
    order, and where each reads in xt (flat, from its group's first channel and the output
    row's first element), padded with zero pairs to a multiple of TAPS."""
    count = cig * kh * kw
    sources = np.zeros(-(-count // TAPS) * TAPS, np.int64)
    for p in range(count):
        ci, a, bb = p // (kh * kw), (p // kw) % kh, p % kw
        sources[p] = ((ci * hp + a * dh) * wp + bb * dw) * n
    return count, sources


@njit(cache=True, inline="always")
def _block_at(bi, cog):
    """Block ``bi`` of a group's cog output channels (quads, then one at a time): its first
    channel and size."""
    quads = cog // QUAD
    return (bi * QUAD, QUAD) if bi < quads else (quads * QUAD + bi - quads, 1)


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_batchlast(xt, w, b, y, ep, relu, dh, dw, g, slots):
    """y (N, CO, OH, OW) = epilogue(conv2d + b) (kernels/conv.py's: ep, relu) at stride 1 from
    xt (C, OH + dh*(KH-1), OW + dw*(KW-1), N),
    the input padded with the batch last (see above). Tasks: (group, output row, chunk of the
    row's run of at most FLAT_RUN elements, which keeps the four accumulator rows in L1,
    channel block), the block changing fastest, so that a thread's consecutive tasks read
    the same rows of xt (64 channels x 3 rows of 9 x 128: 0.9 MB, within L2)."""
    n, co, oh, ow = y.shape
    cig, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    cog = co // g
    hp, wp = xt.shape[1], xt.shape[2]
    count, sources = _pairs(cig, kh, kw, hp, wp, n, dh, dw)
    width = sources.size
    wt = np.zeros((co, width), w.dtype)  # zero weights for the padding pairs
    wt[:, :count] = w.reshape(co, count)
    run = ow * n
    chunks = -(-run // FLAT_RUN)
    clen = -(-run // chunks)
    blocks = cog // QUAD + cog % QUAD
    tasks = g * blocks * oh * chunks
    src_all = xt.reshape(xt.size)
    plane = hp * wp * n  # one channel of xt
    acc_buf = _row_buffer(slots, clen, y.dtype)
    zeros = np.zeros(clen, y.dtype)  # what the padding pairs read
    for tid in prange(slots):
        acc = acc_buf[tid]
        for t in range(tid, tasks, slots):
            bi, rest = t % blocks, t // blocks  # a thread's next task: the same rows of xt
            ch, rest = rest % chunks, rest // chunks
            r, gi = rest % oh, rest // oh
            o, nu = _block_at(bi, cog)
            o += gi * cog
            j0 = ch * clen
            m = min(clen, run - j0)
            src = src_all[gi * cig * plane + r * wp * n + j0:]
            a0, a1, a2, a3 = acc[0, :m], acc[1, :m], acc[2, :m], acc[3, :m]
            for u in range(nu):
                acc[u, :m] = b[o + u]
            for k in range(0, width, TAPS):
                s0, s1, s2 = _tap_runs(src, sources, count, k, zeros)
                if nu == QUAD:
                    _axpy_quad(wt[o:o + QUAD, k:k + TAPS], s0, s1, s2, a0, a1, a2, a3)
                else:
                    _axpy_one(wt[o, k:k + TAPS], s0, s1, s2, a0)
            # back to (N, C, H, W): run element j0 + jj is pixel q, sample i of row r
            for u in range(nu):
                chan = channel(ep, o + u)
                q, i = j0 // n, j0 % n
                for jj in range(m):
                    y[i, o + u, r, q] = epilogue(acc[u, jj], chan, relu)
                    i += 1
                    if i == n:
                        q, i = q + 1, 0


def _padded(x, rows, cols, lead_h, lead_w):
    """x (N, C, H, W) as xt (C, rows, cols, N), placed at (lead_h, lead_w) in zeros."""
    xt = np.zeros((x.shape[1], rows, cols, x.shape[0]), x.dtype)
    to_batchlast(x, xt, lead_h, lead_w)
    return xt


def _span(out, k, d):
    """Rows (or columns) a stride-1 pass reads for ``out`` outputs of a k-tap kernel."""
    return out + d * (k - 1)


def supports(geom, pass_) -> bool:
    """Forward and input-gradient at stride 1, with padded planes within conv_stride1's
    scratch bound (a large dilation on a small plane would make xt far larger than the input)."""
    if geom.stride != (1, 1) or pass_ == "backward_weight":
        return False
    if pass_ == "backward_input":
        plane = _span(geom.h, geom.kh, geom.dh) * _span(geom.w, geom.kw, geom.dw)
    else:
        plane = _span(geom.oh, geom.kh, geom.dh) * _span(geom.ow, geom.kw, geom.dw)
    return plane <= SCRATCH_RATIO * (geom.h * geom.w + geom.oh * geom.ow) + SCRATCH_SLACK


def forward(x, w, b, y, geom, epilogue=None):
    xt = _padded(x, _span(geom.oh, geom.kh, geom.dh), _span(geom.ow, geom.kw, geom.dw), geom.ph, geom.pw)
    conv2d_forward_batchlast(xt, w, b, y, *(epilogue or no_epilogue(y.dtype)), geom.dh, geom.dw, geom.g,
                             get_num_threads())


def backward_input(gy, w, gx, geom):
    """gx = the stride-1 forward of gy with the flipped, group-transposed weight (see above)."""
    wf = np.ascontiguousarray(transpose_groups(w, geom.g)[:, :, ::-1, ::-1])
    gyt = _padded(gy, _span(geom.h, geom.kh, geom.dh), _span(geom.w, geom.kw, geom.dw),
                  geom.dh * (geom.kh - 1) - geom.ph, geom.dw * (geom.kw - 1) - geom.pw)
    conv2d_forward_batchlast(gyt, wf, np.zeros(geom.c, gx.dtype), gx, *no_epilogue(gx.dtype), geom.dh, geom.dw,
                             geom.g, get_num_threads())

