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
    V[t, tile, ci] = (B^T d[tile, ci] B)[t]            per block of tiles, per thread
                                                        (BT_F2/BT_F4, AT_F2/AT_F4, G_F2/G_F4)
    M[t, tile, co] = sum_ci V[t, tile, ci] * U[t, co, ci]
    y[co, tile]    = A^T M[:, tile, co] A + b[co]

Symbols beyond kernels/conv.py's: m the output tile (2 or 4), a = m + 2 the input tile,
t < a*a a tile position, th x tw the tiles of an output plane (ceil(oh/m) x ceil(ow/m)),
T the tiles of a block.

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

The batched products are BLAS calls (kernels/blas.py, single-threaded, one per tile
position and block, inside each thread's slot): the transforms keep channels last (see
"transforms of a block" below), so V[t] and M[t] are row-major matrices of a block's
tiles by channels. Their a*a multiplications per tile and channel pair against the direct
sum's 9*m*m are what Winograd saves; the transforms and the layout changes around them are
what it pays.

Which m: F(4x4) does 2.25 multiplications per output against F(2x2)'s 4, but a plane whose
side is not a multiple of 4 computes dropped outputs; ``tile_size`` picks the one with
fewer multiplications over the computed plane (the output plane; gx's for the
input-gradient), partial tiles counted whole.

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
import os

import numpy as np
from numba import njit, prange

from . import PARALLEL, get_num_threads
from .blas import gemm
from .conv import (KERNEL, _reduce_slots, backward_input_direct, backward_weight_direct, channel, epilogue,
                   epilogue_args, forward_direct, no_epilogue)
from .conv_stride1 import flip_kernel
from .index import out_range

# Bounds on max|error| / max|reference| in float32 (randn inputs, up to 128 channels per
# group; measured 5.0e-7 and 8.1e-6 there), asserted by tests/test_winograd.py.
ERR_F2 = 1e-6
ERR_F4 = 2e-5
# A block holds about this many tiles (whole tile rows; fewer where its V and M would pass
# BLOCK_BYTES): the products' rows. Measured 2026-12-01 (resnet 16/32/64-channel layers and
# big3x3, forward): see bench/README.md.
TILES = 256
BLOCK_BYTES = 1 << 20

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
# The kernels read x as padded phase planes, channels last (``phase_planes``):
# xh[i, gi, u, q, v, ci] = x[i, gi*cig + ci, u - ph, m*v + q - pw], so that padded column
# m*v + c of a row is at [c % m, v + c // m]: a tile row's columns c (< a) of its tiles
# j < tw are then one contiguous run per c (``_phase_offsets``). A block is nr whole tile
# rows (consecutive, across samples); its tile (row k, column j) is b = k*tw + j in V
# (a*a, T, cig) and M (a*a, T, cog), whose rows are channel vectors, so each product is
# one BLAS call, M[t] (T x cog) = V[t] (T x cig) @ U[t]^T. A 2-d transform is two stages,
# each output a linear combination of runs of the same length, four terms per pass over
# it (``_combine``, terms from ``_terms(matrix)``):
#   rows     S[k] = sum_r B^T[k, r] * (padded row tr*m + r), whole rows (phases x columns x
#            channels) (``_tile_rows``)
#   columns  V[k*a + l, tile row] = sum_c B^T[l, c] * S[k] at column c's run (``_columns``)
# gy's transform (A g A^T) likewise with A (a x m) for B^T, and the output transform the
# other way round: R[k, c] = sum_l A^T[c, l] M[k*a + l] over the tile row, then output row
# r = sum_k A^T[r, k] R[k], (phase c, tile j, channel) stored channel by channel, column
# j*m + c, through the epilogue (``_store_row``).

@njit(cache=True, inline="always")
def _tile_row(t0, k, th):
    """Sample and tile row of the block's k-th tile row."""
    return (t0 + k) // th, (t0 + k) % th


@njit(parallel=PARALLEL, **KERNEL)
def phase_planes(x, g, m, ph, pw, hp, wq):
    """xh (N, G, hp, m, wq, C/G): x padded, its channels last and its columns split by phase
    mod m, xh[i, gi, u, q, v, ci] = x[i, gi*C/G + ci, u - ph, m*v + q - pw], 0 outside."""
    n, c, h, w = x.shape
    cg = c // g
    xh = np.empty((n, g, hp, m, wq, cg), x.dtype)
    u0, u1 = out_range(0, 1, ph, 1, h, hp)
    for i in prange(n):
        for gi in range(g):
            xh[i, gi, :u0] = 0
            xh[i, gi, u1:] = 0
            xs = x[i, gi * cg:(gi + 1) * cg]
            for u in range(u0, u1):
                for q in range(m):
                    dst = xh[i, gi, u, q]
                    v0, v1 = out_range(q, m, pw, 1, w, wq)
                    dst[:v0] = 0
                    dst[v1:] = 0
                    for v in range(v0, v1):  # contiguous stores, a gather of loads (3x faster
                        d, col = dst[v], m * v + q - pw  # at 64 channels than the converse)
                        for ci in range(cg):
                            d[ci] = xs[ci, u - ph, col]
    return xh


@njit(cache=True)
def _terms(mat):
    """The nonzero entries of each row of ``mat``: (count (R,), index (R, C), value (R, C))."""
    rows, cols = mat.shape
    count, index, value = np.zeros(rows, np.int64), np.zeros((rows, cols), np.int64), np.zeros((rows, cols), mat.dtype)
    for k in range(rows):
        for c in range(cols):
            if mat[k, c] != 0:
                index[k, count[k]], value[k, count[k]] = c, mat[k, c]
                count[k] += 1
    return count, index, value


@njit(cache=True, inline="always")
def _combine(terms, k, offsets, src, base, dst, d0, length):
    """dst[d0:d0 + length] = sum_t value[k, t] * src[base + offsets[index[k, t]]:][:length]
    over the nonzero terms of row k (``terms`` = _terms(mat)): one pass over dst per four
    terms (a zero-weight term pads the last four: it reads a term's own input, so it adds
    0, or NaN only where that term's contribution is inf or NaN already)."""
    count, index, value = terms
    out = dst[d0:d0 + length]
    for t0 in range(0, count[k], 4):
        c0, c1, c2, c3 = value[k, t0], value.dtype.type(0), value.dtype.type(0), value.dtype.type(0)
        o0 = base + offsets[index[k, t0]]
        o1 = o2 = o3 = o0
        if t0 + 1 < count[k]:
            c1, o1 = value[k, t0 + 1], base + offsets[index[k, t0 + 1]]
        if t0 + 2 < count[k]:
            c2, o2 = value[k, t0 + 2], base + offsets[index[k, t0 + 2]]
        if t0 + 3 < count[k]:
            c3, o3 = value[k, t0 + 3], base + offsets[index[k, t0 + 3]]
        s0, s1, s2, s3 = src[o0:o0 + length], src[o1:o1 + length], src[o2:o2 + length], src[o3:o3 + length]
        if t0 == 0:
            for q in range(length):
                out[q] = ((c0 * s0[q] + c1 * s1[q]) + c2 * s2[q]) + c3 * s3[q]
        else:
            for q in range(length):
                out[q] = (((out[q] + c0 * s0[q]) + c1 * s1[q]) + c2 * s2[q]) + c3 * s3[q]


@njit(cache=True)
def _offsets(count, step):
    """step * (0, 1, ..., count - 1)."""
    return np.arange(count) * step


@njit(**KERNEL)
def _tile_rows(terms, offsets, xf, u0, width, s):
    """s[k] = sum_r mat[k, r] * xf row u0 + r for every row k of mat (``terms``): the row
    stage of a tile row, on a sample's padded phase planes xf (flat rows of ``width``,
    ``offsets`` = _offsets(mat's columns, width)); s flat (a, width)."""
    for k in range(terms[0].size):
        _combine(terms, k, offsets, xf, u0 * width, s, k * width, width)


@njit(**KERNEL)
def _columns(terms, s, offsets, ch, tw, out, b0, span):
    """out[k*a + l, b0 + j] = sum_c mat[l, c] * s[k, c % m, j + c // m] for j < tw, k and
    l < a (mat's rows, ``terms``): vectors of ``ch``; s flat (a, m, wq, ch) (a row's
    columns by phase, S[k][j*m + c] at [k, c % m, j + c // m], at ``offsets[c]`` from
    s[k]), out flat (a*a, span, ch). One loop over the tile row per four terms."""
    a = terms[0].size
    rowlen = s.size // a
    for k in range(a):
        for l in range(a):
            _combine(terms, l, offsets, s, k * rowlen, out, ((k * a + l) * span + b0) * ch, tw * ch)


@njit(**KERNEL)
def _store_row(yr, y, i, og, row, bias, ep, relu):
    """y[i, og + o, row, j*m + c] = epilogue(yr[c, j, o] + bias[og + o]) for the row's
    columns; yr (m, tw, CO/G). Returns 0, or NaN where a value of yr is not finite (the
    transforms' inf - inf; checked on yr, contiguous, where the check vectorises)."""
    chk = zero = y.dtype.type(0)
    yf = yr.reshape(-1)
    for q in range(yf.size):
        chk += yf[q] * zero
    m = yr.shape[0]
    for o in range(yr.shape[2]):
        chan, bv, dst = channel(ep, og + o), bias[og + o], y[i, og + o, row]
        for c in range(m):
            for j in range(-(-(dst.size - c) // m)):
                dst[j * m + c] = epilogue(yr[c, j, o] + bv, chan, relu)
    return chk


@njit(cache=True)
def _phase_offsets(a, m, wq, ch):
    """Offsets of a padded row's columns c < a in its phase layout (m, wq, ch)."""
    out = np.empty(a, np.int64)
    for c in range(a):
        out[c] = ((c % m) * wq + c // m) * ch
    return out


# ----------------------------------------------------------------------------- kernels

@njit(cache=True)
def _tile_plan(n, oh, ow, a, m, cig, cog, slots, g):
    """Sizes of a Winograd pass: ``(th, tw, rows, tasks)``, the tiles per column and row of
    the plane, ``rows`` tile rows per block (about TILES tiles, V and M within BLOCK_BYTES
    in float32, and at least two tasks per slot where the batch allows) and one task per
    (block, group)."""
    th, tw = -(-oh // m), -(-ow // m)
    rows = max(1, min(n * th, -(-TILES // tw), BLOCK_BYTES // (4 * tw * a * a * (cig + cog)),
                      -(-(n * th * g) // (2 * slots))))
    return th, tw, rows, -(-(n * th) // rows) * g


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_winograd(x, u, b, y, ep, relu, ph, pw, g, bt, at, slots):
    """y = epilogue(conv2d(x, w) + b) (kernels/conv.py's: ep, relu) with u (a*a, CO, C/G) =
    G w G^T, bt = B^T (a, a), at = A^T (m, a); returns 0, or NaN where an output before the
    epilogue is not finite."""
    n, c, h, wd = x.shape
    a, m = bt.shape[0], at.shape[0]
    co, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    cig, cog = c // g, co // g
    th, tw, rows, tasks = _tile_plan(n, oh, ow, a, m, cig, cog, slots, g)
    span, wq = rows * tw, tw + 1
    xh = phase_planes(x, g, m, ph, pw, th * m + 2, wq)
    bterms, aterms = _terms(bt), _terms(at)
    cols_in, rows_in = _phase_offsets(a, m, wq, cig), _offsets(a, m * wq * cig)
    tiles_out = _offsets(a, span * cog)   # M[k*a + l] for l < a, from M[k*a]
    rows_out = _offsets(a, m * tw * cog)  # R[k]
    s_buf = np.empty((slots, a * m * wq * cig), x.dtype)
    v_buf = np.empty((slots, a * a * span * cig), x.dtype)
    m_buf = np.empty((slots, a * a * span * cog), x.dtype)
    r_buf = np.empty((slots, a * m * tw * cog), x.dtype)
    y_buf = np.empty((slots, m, tw, cog), x.dtype)
    chk = np.zeros(slots, x.dtype)
    uf = u.reshape(-1)
    for tid in prange(slots):
        sf, vf, mf, rf, yr = s_buf[tid], v_buf[tid], m_buf[tid], r_buf[tid], y_buf[tid]
        yf = yr.reshape(-1)
        for task in range(tid, tasks, slots):
            t0, gi = (task // g) * rows, task % g
            nr = min(rows, n * th - t0)  # tile rows in this block
            og = gi * cog
            for k in range(nr):
                i, tr = _tile_row(t0, k, th)
                _tile_rows(bterms, rows_in, xh[i, gi].reshape(-1), tr * m, m * wq * cig, sf)
                _columns(bterms, sf, cols_in, cig, tw, vf, k * tw, span)
            for t in range(a * a):  # M[t] (tiles, cog) = V[t] (tiles, cig) @ U[t]^T
                gemm(False, True, nr * tw, cog, cig, vf, t * span * cig, cig, uf, (t * co + og) * cig, cig,
                     0.0, mf, t * span * cog, cog)
            for k in range(nr):
                i, tr = _tile_row(t0, k, th)
                for kk in range(a):  # R[kk, c, j] = sum_l A^T[c, l] M[kk*a + l, k*tw + j]
                    for c in range(m):
                        _combine(aterms, c, tiles_out, mf, (kk * a * span + k * tw) * cog, rf,
                                 (kk * m + c) * tw * cog, tw * cog)
                for r in range(min(m, oh - tr * m)):  # output row r = sum_kk A^T[r, kk] R[kk]
                    _combine(aterms, r, rows_out, rf, 0, yf, 0, m * tw * cog)
                    chk[tid] += _store_row(yr, y, i, og, tr * m + r, b, ep, relu)
    return chk.sum()


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_winograd(x, gy, gu, ph, pw, g, bt, ag, slots):
    """gu (a*a*CO, C/G) = sum over tiles of (A gy A^T) . V, the weight-gradient before
    gw = G^T gu G, with bt = B^T (a, a) and ag = A (a, m); per-slot partial sums, reduced."""
    n, c, h, wd = x.shape
    a, m = bt.shape[0], ag.shape[1]
    co, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    cig, cog = c // g, co // g
    th, tw, rows, tasks = _tile_plan(n, oh, ow, a, m, cig, cog, slots, g)
    span, wq = rows * tw, tw + 1
    xh, gh = phase_planes(x, g, m, ph, pw, th * m + 2, wq), phase_planes(gy, g, m, 0, 0, th * m, wq)
    bterms, aterms = _terms(bt), _terms(ag)
    cols_in, rows_in = _phase_offsets(a, m, wq, cig), _offsets(a, m * wq * cig)
    cols_gy, rows_gy = _phase_offsets(m, m, wq, cog), _offsets(m, m * wq * cog)
    s_buf = np.empty((slots, a * m * wq * cig), x.dtype)
    sg_buf = np.empty((slots, a * m * wq * cog), x.dtype)
    v_buf = np.empty((slots, a * a * span * cig), x.dtype)
    gq_buf = np.empty((slots, a * a * span * cog), x.dtype)
    partial = np.zeros((slots, a * a * co * cig), x.dtype)
    for tid in prange(slots):
        sf, sg, vf, gf, pf = s_buf[tid], sg_buf[tid], v_buf[tid], gq_buf[tid], partial[tid]
        for task in range(tid, tasks, slots):
            t0, gi = (task // g) * rows, task % g
            nr = min(rows, n * th - t0)
            og = gi * cog
            for k in range(nr):
                i, tr = _tile_row(t0, k, th)
                _tile_rows(bterms, rows_in, xh[i, gi].reshape(-1), tr * m, m * wq * cig, sf)
                _columns(bterms, sf, cols_in, cig, tw, vf, k * tw, span)
                _tile_rows(aterms, rows_gy, gh[i, gi].reshape(-1), tr * m, m * wq * cog, sg)
                _columns(aterms, sg, cols_gy, cog, tw, gf, k * tw, span)
            for t in range(a * a):  # GU[t] (cog, cig) += G'[t]^T (cog, tiles) @ V[t] (tiles, cig)
                gemm(True, False, cog, cig, nr * tw, gf, t * span * cog, cog, vf, t * span * cig, cig,
                     1.0, pf, (t * co + og) * cig, cig)
    _reduce_slots(partial.reshape(slots, a * a * co, cig), gu)


# ----------------------------------------------------------------------------- launchers

ENV = "CNN_NUMBA_WINOGRAD"


def enabled() -> bool:
    """Whether 'auto' may run Winograd (its rule and the tuner): unless CNN_NUMBA_WINOGRAD=0,
    read when 'auto' first meets a layer shape. Winograd's products go through BLAS in blocks
    of tiles, so an output's rounding depends on the block it falls in (at ~3e-6 of the
    layer's largest output in float32): a batch split across ranks rounds otherwise than one
    process. A training step is sensitive to that where a ReLU input lies that close to 0: a
    2-rank --sync-bn resnet8 step with Winograd in its 64-channel stage differs from the
    one-process step by 5e-3 of a batch-norm bias whose gradient nearly cancels, and so does
    the step with the direct kernels and 3e-6 of random noise added to that conv's output
    (tests/test_distributed.py compares the two runs with Winograd off; without Winograd
    they agree within 5e-7)."""
    return os.environ.get(ENV, "1").strip() != "0"


def supports(geom, pass_) -> bool:
    """3x3, stride 1, dilation 1, at least 16 input channels per group; for the
    input-gradient (the flipped forward, whose input channels are the CO/G) also at least 16
    output channels per group and a full padding >= 0. The scratch is a block of tiles
    (TILES), whatever the plane or the padding."""
    if (geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw) != (3, 3, 1, 1, 1, 1) or geom.cig < 16:
        return False
    return pass_ != "backward_input" or (geom.cog >= 16 and min(geom.full_padding) >= 0)


def tile_size(oh, ow) -> int:
    """m of F(m x m, 3x3) for a computed plane of oh x ow: the one with fewer multiplications,
    (a*a per tile) x (tiles, partial ones included); F(2x2) on a tie."""
    def products(m):
        return (m + 2) ** 2 * -(-oh // m) * -(-ow // m)
    return 4 if products(4) < products(2) else 2


# B^T (a, a), A^T (m, a) and G (a, 3) of F(m x m, 3x3), by m
MATRICES = {2: (BT_F2, AT_F2, G_F2), 4: (BT_F4, AT_F4, G_F4)}


def _matrices(m, dtype):
    """B^T and A^T of F(m x m, 3x3) in ``dtype`` (the kernels' transforms)."""
    bt, at, _ = MATRICES[m]
    return bt.astype(dtype), at.astype(dtype)


@njit(parallel=PARALLEL, cache=True)
def _filter_transform(w, gm, u):
    """u[p*a + q, o, i] = (G w[o, i] G^T)[p, q] in float64, rounded once; gm = G (a, 3).
    Written a row u[t, o] at a time (the rows of one o are a*a pages apart)."""
    a, ci = gm.shape[0], w.shape[1]
    for o in prange(w.shape[0]):
        t = np.empty((3, a, ci))
        for i in range(ci):  # t = w G^T
            for r in range(3):
                for q in range(a):
                    t[r, q, i] = (np.float64(w[o, i, r, 0]) * gm[q, 0] + np.float64(w[o, i, r, 1]) * gm[q, 1]
                                  + np.float64(w[o, i, r, 2]) * gm[q, 2])
        for p in range(a):  # G t
            for q in range(a):
                row = u[p * a + q, o]
                for i in range(ci):
                    row[i] = gm[p, 0] * t[0, q, i] + gm[p, 1] * t[1, q, i] + gm[p, 2] * t[2, q, i]


@njit(parallel=PARALLEL, cache=True)
def _filter_transform_t(gu, gm, gw):
    """gw[o, i] = G^T gu[:, o, i] G (gu as a x a), the adjoint of ``_filter_transform``, in
    float64, rounded once; gu (a*a, CO, C/G), read a row gu[t, o] at a time."""
    a, ci = gm.shape[0], gw.shape[1]
    for o in prange(gw.shape[0]):
        t = np.zeros((3, a, ci))
        for p in range(a):  # t = G^T gu
            for q in range(a):
                row = gu[p * a + q, o]
                for r in range(3):
                    coef = gm[p, r]
                    for i in range(ci):
                        t[r, q, i] += coef * np.float64(row[i])
        for i in range(ci):  # t G
            for r in range(3):
                for c in range(3):
                    acc = 0.0
                    for q in range(a):
                        acc += t[r, q, i] * gm[q, c]
                    gw[o, i, r, c] = acc


def transform_weight(w, m):
    """u (a*a, CO, C/G) = G w G^T per (co, ci), in float64, cast to w's dtype."""
    u = np.empty(((m + 2) ** 2,) + w.shape[:2], w.dtype)
    _filter_transform(w, MATRICES[m][2], u)
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
    gu = np.empty((a * a * co, cig), gw.dtype)
    bt, at = _matrices(m, gw.dtype)
    conv2d_backward_weight_winograd(x, gy, gu, geom.ph, geom.pw, geom.g, bt, np.ascontiguousarray(at.T), get_num_threads())
    _filter_transform_t(gu.reshape(a * a, co, cig), MATRICES[m][2], gw)
    if not np.isfinite(gw).all():
        gw[...] = 0
        backward_weight_direct(x, gy, gw, geom)
