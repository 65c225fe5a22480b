"""Winograd convolution for 3x3, stride-1, dilation-1 layers: forward, input-gradient and
weight-gradient, with the layouts, symbols and contract of kernels/conv.py (outputs written
with =).

Winograd's minimal filtering F(m x m, 3 x 3) computes an m x m tile of outputs from an
a x a tile of inputs (a = m + 2) with a*a multiplications per (output channel, input
channel) instead of 9*m*m:

    Y = A^T [ (G w G^T) . (B^T d B) ] A          (. elementwise; d the input tile, w 3x3)

summed over the input channels before the output transform, so the channel sums are
a*a batched products, one per tile position t:

    U[t, co, ci]   = (G w[co, ci] G^T)[t]              once per call (float64, then cast)
    V[t, ci, tile] = (B^T d[ci, tile] B)[t]            per block of tiles, per thread
                                                        (BT_F2/BT_F4, AT_F2/AT_F4, G_F2/G_F4)
    M[t, co, tile] = sum_ci U[t, co, ci] * V[t, ci, tile]
    y[co, tile]    = A^T M[:, co, tile] A + b[co]

Symbols beyond kernels/conv.py's: m the output tile (2 or 4), a = m + 2 the input tile,
t < a*a a tile position, th x tw the tiles of an output plane (ceil(oh/m) x ceil(ow/m)),
T the tiles of a block, cip the group's input channels rounded up to a multiple of TAPS
(the extra rows of V stay 0 and their weights are 0).

The matrices (Lavin and Gray 2015), for correlation as conv2d computes it:

    F(2x2, 3x3), interpolation points 0, 1, -1 (and infinity):
        B^T = [1  0 -1  0]    G = [ 1    0    0 ]    A^T = [1 1  1  0]
              [0  1  1  0]        [1/2  1/2  1/2]          [0 1 -1 -1]
              [0 -1  1  0]        [1/2 -1/2  1/2]
              [0  1  0 -1]        [ 0    0    1 ]

    F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2 (and infinity):
        B^T = [4  0 -5  0  1  0]    G = [ 1/4     0     0  ]    A^T = [1 1  1 1  1 0]
              [0 -4 -4  1  1  0]        [-1/6  -1/6  -1/6 ]          [0 1 -1 2 -2 0]
              [0  4 -4 -1  1  0]        [-1/6   1/6  -1/6 ]          [0 1  1 4  4 0]
              [0 -2 -1  2  1  0]        [1/24  1/12   1/6 ]          [0 1 -1 8 -8 1]
              [0  2 -1 -2  1  0]        [1/24 -1/12   1/6 ]
              [0  4  0 -5  0  1]        [  0     0     1  ]

Passes:
    forward          as above; blocks of T tiles (consecutive tile rows, across samples)
                     are dealt to per-thread slots, each with its own V and M buffers.
    backward_input   the same forward, of gy with the flipped kernel and the full
                     padding (``flip_kernel``, docs/convolution.md): no new kernel.
    backward_weight  y = A^T [U . V] A is linear in U, so its adjoint gives
                         GU[t, co, ci] = sum_tiles (A gy[co, tile] A^T)[t] * V[t, ci, tile]
                         gw[co, ci]    = G^T GU[:, co, ci] G
                     the products summed in per-thread slots, reduced, then transformed
                     (float64). Outputs past the plane's edge are gy = 0 there.

The batched products are conv_stride1's register-blocked loops with input channels in the
place of taps: ``_axpy_quad`` (4 output channels x 3 input channels per pass over the
tiles of a block, contiguous) for M, ``_dot_quad`` for GU.

Which m: F(4x4) does 2.25 multiplications per output against F(2x2)'s 4, but its
transforms have larger coefficients, and a plane whose side is not a multiple of 4
computes more dropped outputs. ``tile_size`` picks F(4x4) where both sides of the computed
plane (the output plane; gx's for the input-gradient) are at least F4_MIN_SIDE, F(2x2)
otherwise.

Error (float32, randn inputs, 16x16 planes, max |error| / max |reference| against the
float64 reference): F(2x2) 2.3e-7, 4.2e-7, 5.0e-7, 6.3e-7 at 16, 64, 128, 256 input
channels, below the direct kernels' 3.5e-7 ... 1.7e-6 (fewer products per output);
F(4x4) 3.2e-6, 5.9e-6, 8.1e-6, 2.1e-5, about ten times more, growing with the channels.
The bounds ERR_F2 and ERR_F4 hold up to 128 channels per group (tests/test_winograd.py);
both stay inside the package's float32 tolerance of 1e-4 * max(1, max |reference|)
(tests/reference.py) at every width measured.

Non-finite values: the transforms subtract inputs from one another, so an inf in a tile
gives inf - inf = NaN where the direct sum gives inf, and a NaN spreads to the tile's
other outputs. The kernels count the non-finite outputs they write (gw is scanned) and the
launchers recompute such a call with the general direct kernels, whose sums read only the
taps PyTorch reads. Finite inputs pay nothing but the count.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from . import PARALLEL
from .conv import (KERNEL, _reduce_slots, backward_input_direct, backward_weight_direct, channel, epilogue,
                   epilogue_args, forward_direct, no_epilogue)
from .conv_stride1 import QUAD, TAPS, _axpy_one, _axpy_quad, _block, _dot_one, _dot_quad, transpose_groups
from .index import axpy, out_range, tap


def flip_kernel(w, g):
    """w (CO, CI/G, 3, 3) -> (CI, CO/G, 3, 3), group by group, rotated 180 degrees: the weight of the
    stride-1 forward that computes conv2d's input-gradient (the flat kernels keep the rotation
    in their tap offsets instead, conv_stride1.transpose_groups)."""
    return np.ascontiguousarray(transpose_groups(w, g)[..., ::-1, ::-1])

# F(4x4) where both sides of the computed plane are at least this: below it the dropped
# outputs of partial tiles eat F(4x4)'s saving (a 12-pixel side is 3 whole tiles).
F4_MIN_SIDE = 12
# Bounds on max|error| / max|reference| in float32 (randn inputs, up to 128 channels per
# group; measured 5.0e-7 and 8.1e-6 there), asserted by tests/test_winograd.py.
ERR_F2 = 1e-6
ERR_F4 = 2e-5
# Tiles per block (T, rounded up to whole tile rows): the products' inner loop runs over
# them; a thread's V (a*a x cip x T) and M (a*a x CO/G x T) are then 1.2 MB each at 128
# channels, V[t] (cip x T, 64 KB) staying in L2 while every quad of output channels
# streams through it.
TILES = 128

G_F2 = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
G_F4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


BT_F2 = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
AT_F2 = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
BT_F4 = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
AT_F4 = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)


# ----------------------------------------------------------------------------- transforms of a block
#
# A block is nr tile rows of tw tiles, tile (k, j) at f = k*(tw + 1) + j in every
# per-block buffer: one column per tile row more than the tiles, so that each transform
# stage is one long loop over the block (j = tw is a dropped tile; its gy is 0). Tile j of a
# tile row reads input columns j*m - pw + c, c < a. Each of the tile row's a input rows is
# first split by phase, p[r, c, f] = row r's column j*m - pw + c for c < m (a strided
# gather, zeros outside the plane); columns m and m+1 of tile f are then columns 0 and 1
# of tile f + 1. Each stage of a 2-d transform is then, per output row, a few axpys over
# the block (``_mix``): down the rows (B^T d), then along each tile (d B); the output and
# gy transforms likewise. (One loop per output row: a loop writing all a rows at once
# reads and writes too many arrays for LLVM's run-time alias checks, and stays scalar.)

@njit(cache=True, inline="always")
def _mix(mat, k, src, period, dst, length):
    """dst[:length] = sum_r mat[k, r] * src[r % period, r // period:][:length]: row k of a
    transform matrix applied to rows of ``src`` (shifted by one tile past ``period``)."""
    dst[:length] = 0
    for r in range(mat.shape[1]):
        if mat[k, r] != 0:
            axpy(mat[k, r], src[r % period], r // period, 1, dst, 0, 1, length)


@njit(cache=True, inline="always")
def _phases(row, c0, m, pb, r, f0, nt):
    """pb[r, c, f0 + j] = row[j*m + c - c0] for c < m, j < nt, 0 outside ``row``."""
    for c in range(m):
        lo, hi = out_range(c, m, c0, 1, row.size, nt)
        dst = pb[r, c, f0:f0 + nt]
        dst[:lo] = 0
        for j in range(lo, hi):
            dst[j] = row[tap(j, m, c0, c, 1)]
        dst[hi:] = 0


@njit(cache=True, inline="always")
def _tile_row(t0, k, th):
    """Sample and tile row of the block's k-th tile row."""
    return (t0 + k) // th, (t0 + k) % th


@njit(**KERNEL)
def _input_block(x, c0, cig, t0, nr, th, tw, ph, pw, bt, pb, td, v):
    """v[t, ci, f] = (B^T d_f B)[t] for the tiles f of the block's tile rows t0 + k (k < nr,
    over samples) and the group's channels c0 + ci; pb, td (a, m, span + 1) scratch."""
    h = x.shape[2]
    a, m, width = pb.shape[0], pb.shape[1], pb.shape[2]
    length = nr * (tw + 1)
    p, d = pb.reshape(a, m * width), td.reshape(a, m * width)
    for ci in range(cig):
        for k in range(nr):
            i, tr = _tile_row(t0, k, th)
            f0 = k * (tw + 1)
            for r in range(a):
                xr = tr * m - ph + r
                if 0 <= xr < h:
                    _phases(x[i, c0 + ci, xr], pw, m, pb, r, f0, tw + 1)
                else:
                    pb[r, :, f0:f0 + tw + 1] = 0
        for k in range(a):  # td[k] = (B^T p)[k], all phases at once
            _mix(bt, k, p, a, d[k], m * width)
        for k in range(a):  # v[k*a + l] = (td[k] B)[l]
            for q in range(a):
                _mix(bt, q, td[k], m, v[k * a + q, ci], length)


@njit(**KERNEL)
def _output_block(mt, bias, y, o, t0, nr, th, tw, at, rt, yt, chan, relu):
    """y[i, o, tr*m + r, j*m + c] = epilogue((A^T M_f A)[r, c] + bias) for the block's tiles
    inside the plane, M_f[t] = mt[t, f] (a*a, span); rt (m, a, span) and yt (m, m, span)
    scratch. Returns 0, or NaN where an output before the epilogue is not finite."""
    oh, ow = y.shape[2], y.shape[3]
    m, a = rt.shape[0], rt.shape[1]
    length = nr * (tw + 1)
    chk = zero = mt.dtype.type(0)
    for k in range(a):  # rt[c, k] = (M A)[k, c]
        for c in range(m):
            _mix(at, c, mt[k * a:(k + 1) * a], a, rt[c, k], length)
    for c in range(m):  # yt[r, c] = (A^T M A)[r, c]
        for r in range(m):
            _mix(at, r, rt[c], a, yt[r, c], length)
    for k in range(nr):
        i, tr = _tile_row(t0, k, th)
        f0 = k * (tw + 1)
        full = ow // m  # tiles entirely inside the plane; their m stores unrolled
        for r in range(min(m, oh - tr * m)):
            yr = y[i, o, tr * m + r]
            s0, s1 = yt[r, 0, f0:], yt[r, 1, f0:]
            if m == 2:
                for j in range(full):
                    v0, v1 = s0[j] + bias, s1[j] + bias
                    yr[2 * j], yr[2 * j + 1] = epilogue(v0, chan, relu), epilogue(v1, chan, relu)
                    chk += (v0 + v1) * zero  # NaN once a value is inf or NaN
            else:
                s2, s3 = yt[r, 2, f0:], yt[r, 3, f0:]
                for j in range(full):
                    v0, v1, v2, v3 = s0[j] + bias, s1[j] + bias, s2[j] + bias, s3[j] + bias
                    yr[4 * j], yr[4 * j + 1] = epilogue(v0, chan, relu), epilogue(v1, chan, relu)
                    yr[4 * j + 2], yr[4 * j + 3] = epilogue(v2, chan, relu), epilogue(v3, chan, relu)
                    chk += (v0 + v1 + v2 + v3) * zero
            for c in range(ow - full * m):  # the last, partial tile
                val = yt[r, c, f0 + full] + bias
                yr[full * m + c] = epilogue(val, chan, relu)
                chk += val * zero
    return chk


@njit(**KERNEL)
def _gy_block(gy, o, t0, nr, th, tw, ag, gb, tg, gt):
    """gt[t, f] = (A g_f A^T)[t] for the block's tiles of gy[:, o] (0 past the plane, and in
    the dropped tiles); ag = A (a, m); gb (m, m, span + 1) and tg (a, m, span + 1) scratch."""
    oh = gy.shape[2]
    m, width = gb.shape[0], gb.shape[2]
    a = m + 2
    length = nr * (tw + 1)
    for k in range(nr):
        i, tr = _tile_row(t0, k, th)
        f0 = k * (tw + 1)
        for r in range(m):
            if tr * m + r < oh:
                _phases(gy[i, o, tr * m + r], 0, m, gb, r, f0, tw + 1)
            else:
                gb[r, :, f0:f0 + tw + 1] = 0
    p, d = gb.reshape(m, m * width), tg.reshape(a, m * width)
    for k in range(a):  # tg[k] = (A g)[k]
        _mix(ag, k, p, m, d[k], m * width)
    for k in range(a):  # gt[k*a + l] = (tg[k] A^T)[l]
        for q in range(a):
            _mix(ag, q, tg[k], m, gt[k * a + q], length)


# ----------------------------------------------------------------------------- kernels

@njit(cache=True)
def _tile_plan(n, oh, ow, m, slots, g):
    """Sizes of a Winograd pass: ``(a, th, tw, rows, span, tasks)``, with ``rows`` tile rows
    per block (about TILES tiles, and at least two tasks per slot where the batch allows),
    ``span`` = rows*(tw + 1) tiles in the block's buffers, and one task per (block, group)."""
    a, th, tw = m + 2, -(-oh // m), -(-ow // m)
    rows = max(1, min(n * th, -(-TILES // (tw + 1)), -(-(n * th * g) // (2 * slots))))
    return a, th, tw, rows, rows * (tw + 1), -(-(n * th) // rows) * g


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_winograd(x, u, b, y, ep, relu, ph, pw, g, bt, at, slots):
    """y = epilogue(conv2d(x, w) + b) (kernels/conv.py's: ep, relu) with u (a*a, CO, cip) =
    G w G^T, bt = B^T (a, a), at = A^T (m, a); returns 0, or NaN where an output before the
    epilogue is not finite."""
    n, c = x.shape[0], x.shape[1]
    m = at.shape[0]
    co, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    cig, cog, cip = c // g, co // g, u.shape[2]
    a, th, tw, rows, span, tasks = _tile_plan(n, oh, ow, m, slots, g)
    v_buf = np.zeros((slots, a * a, cip, span), x.dtype)  # rows cig.. stay 0
    m_buf = np.empty((slots, cog, a * a, span), x.dtype)
    pb_buf = np.empty((slots, a, m, span + 1), x.dtype)
    td_buf = np.empty((slots, a, m, span + 1), x.dtype)
    rt_buf = np.empty((slots, m, a, span), x.dtype)
    yt_buf = np.empty((slots, m, m, span), x.dtype)
    chk = np.zeros(slots, x.dtype)
    for tid in prange(slots):
        v, mm = v_buf[tid], m_buf[tid]
        for task in range(tid, tasks, slots):
            t0, gi = (task // g) * rows, task % g
            nr = min(rows, n * th - t0)  # tile rows in this block
            length = nr * (tw + 1)
            og = gi * cog
            _input_block(x, gi * cig, cig, t0, nr, th, tw, ph, pw, bt, pb_buf[tid], td_buf[tid], v)
            for t in range(a * a):  # M[t] = U[t] @ V[t], V[t] (cip, length) reused by every quad
                vt = v[t]
                o = 0
                while o < cog:
                    nu = _block(o, cog)
                    for uu in range(nu):
                        mm[o + uu, t, :length] = 0
                    a0 = mm[o, t, :length]
                    for ci in range(0, cip, TAPS):
                        s0, s1, s2 = vt[ci, :length], vt[ci + 1, :length], vt[ci + 2, :length]
                        if nu == QUAD:
                            _axpy_quad(u[t, og + o:og + o + QUAD, ci:ci + TAPS], s0, s1, s2, a0, mm[o + 1, t, :length],
                                       mm[o + 2, t, :length], mm[o + 3, t, :length])
                        else:
                            _axpy_one(u[t, og + o, ci:ci + TAPS], s0, s1, s2, a0)
                    o += nu
            for o in range(cog):
                chk[tid] += _output_block(mm[o], b[og + o], y, og + o, t0, nr, th, tw, at, rt_buf[tid], yt_buf[tid],
                                          channel(ep, og + o), relu)
    return chk.sum()


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_winograd(x, gy, gu, ph, pw, g, bt, ag, slots):
    """gu (a*a*CO, cip) = sum over tiles of (A gy A^T) . V, the weight-gradient before
    gw = G^T gu G, with bt = B^T (a, a) and ag = A (a, m); per-slot partial sums, reduced."""
    n, c = x.shape[0], x.shape[1]
    m = ag.shape[1]
    co, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    cip = gu.shape[1]
    cig, cog = c // g, co // g
    a, th, tw, rows, span, tasks = _tile_plan(n, oh, ow, m, slots, g)
    v_buf = np.zeros((slots, a * a, cip, span), x.dtype)  # rows cig.. stay 0
    gt_buf = np.empty((slots, cog, a * a, span), x.dtype)
    pb_buf = np.empty((slots, a, m, span + 1), x.dtype)
    td_buf = np.empty((slots, a, m, span + 1), x.dtype)
    gb_buf = np.empty((slots, m, m, span + 1), x.dtype)
    tg_buf = np.empty((slots, a, m, span + 1), x.dtype)
    partial = np.zeros((slots, a * a, co, cip), x.dtype)
    for tid in prange(slots):
        v, gq, part = v_buf[tid], gt_buf[tid], partial[tid]
        for task in range(tid, tasks, slots):
            t0, gi = (task // g) * rows, task % g
            nr = min(rows, n * th - t0)
            length = nr * (tw + 1)
            og = gi * cog
            _input_block(x, gi * cig, cig, t0, nr, th, tw, ph, pw, bt, pb_buf[tid], td_buf[tid], v)
            for o in range(cog):
                _gy_block(gy, og + o, t0, nr, th, tw, ag, gb_buf[tid], tg_buf[tid], gq[o])
            for t in range(a * a):  # GU[t] += G'[t] @ V[t]^T, V[t] (cip, length) reused by every quad
                vt = v[t]
                o = 0
                while o < cog:
                    nu = _block(o, cog)
                    g0 = gq[o, t, :length]
                    for ci in range(0, cip, TAPS):
                        s0, s1, s2 = vt[ci, :length], vt[ci + 1, :length], vt[ci + 2, :length]
                        if nu == QUAD:
                            _dot_quad(s0, s1, s2, g0, gq[o + 1, t, :length], gq[o + 2, t, :length],
                                      gq[o + 3, t, :length], part[t, og + o:og + o + QUAD, ci:ci + TAPS])
                        else:
                            _dot_one(s0, s1, s2, g0, part[t, og + o, ci:ci + TAPS])
                    o += nu
    _reduce_slots(partial.reshape(slots, a * a * co, cip), gu)


# ----------------------------------------------------------------------------- launchers

def supports(geom, pass_) -> bool:
    """3x3, stride 1, dilation 1, at least 16 input channels per group; for the
    input-gradient (the flipped forward, whose input channels are the CO/G) also at least 16
    output channels per group and a full padding >= 0. The scratch is a block of tiles
    (TILES), whatever the plane or the padding."""
    if (geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw) != (3, 3, 1, 1, 1, 1) or geom.cig < 16:
        return False
    return pass_ != "backward_input" or (geom.cog >= 16 and min(geom.full_padding) >= 0)


def tile_size(oh, ow) -> int:
    """m of F(m x m, 3x3) for a computed plane of oh x ow (module docstring)."""
    return 4 if min(oh, ow) >= F4_MIN_SIDE else 2


# B^T (a, a), A^T (m, a) and G (a, 3) of F(m x m, 3x3), by m
MATRICES = {2: (BT_F2, AT_F2, G_F2), 4: (BT_F4, AT_F4, G_F4)}


def _matrices(m, dtype):
    """B^T and A^T of F(m x m, 3x3) in ``dtype`` (the kernels' transforms)."""
    bt, at, _ = MATRICES[m]
    return bt.astype(dtype), at.astype(dtype)


def transform_weight(w, m):
    """u (a*a, CO, cip) = G w G^T per (co, ci), in float64, cast to w's dtype; the input
    channels zero-padded to a multiple of TAPS."""
    co, cig = w.shape[:2]
    gm = MATRICES[m][2]
    a = m + 2
    u = np.zeros((a * a, co, -(-cig // TAPS) * TAPS), w.dtype)
    u[:, :, :cig] = np.einsum("ta,oiab,sb->tsoi", gm, w.astype(np.float64), gm).reshape(a * a, co, cig)
    return u


def _forward(x, w, b, y, epilogue, ph, pw, g):
    """y = epilogue(conv2d(x, w, padding=(ph, pw)) + b) at stride 1 by Winograd; False where an
    output is not finite (the caller recomputes)."""
    m = tile_size(y.shape[2], y.shape[3])
    bt, at = _matrices(m, y.dtype)
    return conv2d_forward_winograd(x, transform_weight(w, m), b, y, *epilogue, ph, pw, g, bt, at,
                                   get_num_threads()) == 0


def forward(x, w, b, y, geom, epilogue=None):
    if not _forward(x, w, b, y, epilogue_args(epilogue, y.dtype), geom.ph, geom.pw, geom.g):
        forward_direct(x, w, b, y, geom, epilogue)


def backward_input(gy, w, gx, geom):
    """gx = the Winograd forward of gy with the flipped kernel and the full padding."""
    fh, fw = geom.full_padding
    if not _forward(gy, flip_kernel(w, geom.g), np.zeros(geom.c, gx.dtype), gx, no_epilogue(gx.dtype), fh, fw,
                    geom.g):
        backward_input_direct(gy, w, gx, geom)


def backward_weight(x, gy, gw, geom):
    m = tile_size(geom.oh, geom.ow)
    a, co, cig = m + 2, geom.co, geom.cig
    gu = np.empty((a * a * co, -(-cig // TAPS) * TAPS), gw.dtype)
    bt, at = _matrices(m, gw.dtype)
    conv2d_backward_weight_winograd(x, gy, gu, geom.ph, geom.pw, geom.g, bt, np.ascontiguousarray(at.T), get_num_threads())
    gm = MATRICES[m][2]
    gu4 = gu[:, :cig].reshape(a, a, co, cig).astype(np.float64)
    gw[...] = np.einsum("ta,tsoi,sb->oiab", gm, gu4, gm)
    if not np.isfinite(gw).all():
        gw[...] = 0
        backward_weight_direct(x, gy, gw, geom)
