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
                     padding (conv_stride1.flip_kernel, docs/convolution.md): no new kernel.
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
computes more dropped outputs. ``tile_size`` picks F(4x4) where both sides of the output
plane (the input plane for the input-gradient) are at least F4_MIN_SIDE, F(2x2) otherwise.

Error (float32, randn inputs, measured against the float64 reference; tests/test_winograd.py):
max |error| / max |reference| stays below ERR_F2 for F(2x2) and ERR_F4 for F(4x4), about
3x and 10x the direct kernels' rounding; both inside the package's float32 tolerance of
1e-4 * max(1, max |reference|) (tests/reference.py).

Non-finite values: the transforms subtract inputs from one another, so an inf in a tile
gives inf - inf = NaN where the direct sum gives inf, and a NaN spreads to the tile's
other outputs. The kernels count the non-finite outputs they write (gw is scanned) and the
launchers recompute such a call with the general direct kernels, whose sums read only the
taps PyTorch reads. Finite inputs pay nothing but the count.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from . import PARALLEL
from .conv import KERNEL, _reduce_slots, backward_input_direct, backward_weight_direct, forward_direct
from .conv_stride1 import QUAD, TAPS, _axpy_one, _axpy_quad, _block, _dot_one, _dot_quad, flip_kernel
from .index import copy_run

# F(4x4) where both sides of the computed plane are at least this (smaller planes drop too
# many of its outputs; measured in the module's A/B, see docs/convolution.md).
F4_MIN_SIDE = 12
# Bounds on max|error| / max|reference| in float32 (randn inputs, up to 128 channels per
# group), asserted by tests/test_winograd.py.
ERR_F2 = 2e-6
ERR_F4 = 1e-5
# Elements of a thread's V buffer (a*a x cip x T), at most: it stays in the L2 cache while
# each quad of output channels streams through it (measured: see docs/convolution.md).
V_ELEMENTS = 1 << 16

G_F2 = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
G_F4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])


# ----------------------------------------------------------------------------- 1-d transforms
#
# Each takes and returns scalars of the arrays' dtype; ``one`` carries that dtype, so that
# no integer or float64 literal widens float32 arithmetic.

@njit(cache=True, inline="always")
def _bt4(d0, d1, d2, d3):
    """B^T d, F(2x2): 4 -> 4."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(cache=True, inline="always")
def _bt6(d0, d1, d2, d3, d4, d5, one):
    """B^T d, F(4x4): 6 -> 6."""
    two = one + one
    four = two + two
    five = four + one
    return (four * d0 - five * d2 + d4, d3 + d4 - four * (d1 + d2), four * (d1 - d2) + d4 - d3,
            two * (d3 - d1) + d4 - d2, two * (d1 - d3) + d4 - d2, four * d1 - five * d3 + d5)


@njit(cache=True, inline="always")
def _at4(m0, m1, m2, m3):
    """A^T m, F(2x2): 4 -> 2."""
    return m0 + m1 + m2, m1 - m2 - m3


@njit(cache=True, inline="always")
def _at6(m0, m1, m2, m3, m4, m5, one):
    """A^T m, F(4x4): 6 -> 4."""
    two = one + one
    four = two + two
    p, q, r, s = m1 + m2, m1 - m2, m3 + m4, m3 - m4
    return m0 + p + r, q + two * s, p + four * r, q + (four + four) * s + m5


@njit(cache=True, inline="always")
def _a4(g0, g1):
    """A g, F(2x2): 2 -> 4 (the adjoint of _at4)."""
    return g0, g0 + g1, g0 - g1, -g1


@njit(cache=True, inline="always")
def _a6(g0, g1, g2, g3, one):
    """A g, F(4x4): 4 -> 6 (the adjoint of _at6)."""
    two = one + one
    four = two + two
    e, o, e2, o2 = g0 + g2, g1 + g3, g0 + four * g2, two * g1 + (four + four) * g3
    return g0, e + o, e - o, e2 + o2, e2 - o2, g3


# ----------------------------------------------------------------------------- 2-d transforms of a tile row
#
# A tile row is tw tiles side by side. Each 2-d transform is separable: first down the
# columns of a strip of rows (a loop over the strip's columns, contiguous), then along
# each tile's row (a loop over tiles, writing the tile-contiguous rows of V or reading M).

@njit(**KERNEL)
def _input_tile_row(xc, r0, pw, strip, td, v):
    """v[t, j] = (B^T d_j B)[t] for the tiles j < tw of one tile row; xc (H, W) one input
    plane, r0 the input row of the tiles' first row (may be < 0 or past the plane: zeros);
    strip, td (a, wp = tw*m + 2) scratch whose columns outside [pw, pw + W) stay 0."""
    h, wd = xc.shape
    a, wp = strip.shape
    m, tw = a - 2, v.shape[1]
    ncol = min(wd, wp - pw)
    for rr in range(a):
        if 0 <= r0 + rr < h:
            copy_run(xc[r0 + rr, :ncol], strip[rr, pw:])
        else:
            strip[rr, pw:pw + ncol] = 0
    one = xc.dtype.type(1)
    if a == 4:
        s0, s1, s2, s3 = strip[0], strip[1], strip[2], strip[3]
        for c in range(wp):
            td[0, c], td[1, c], td[2, c], td[3, c] = _bt4(s0[c], s1[c], s2[c], s3[c])
        for k in range(4):
            tk = td[k]
            for j in range(tw):
                q = j * m
                v[4 * k, j], v[4 * k + 1, j], v[4 * k + 2, j], v[4 * k + 3, j] = _bt4(tk[q], tk[q + 1], tk[q + 2],
                                                                                     tk[q + 3])
    else:
        s0, s1, s2, s3, s4, s5 = strip[0], strip[1], strip[2], strip[3], strip[4], strip[5]
        for c in range(wp):
            td[0, c], td[1, c], td[2, c], td[3, c], td[4, c], td[5, c] = _bt6(s0[c], s1[c], s2[c], s3[c], s4[c],
                                                                              s5[c], one)
        for k in range(6):
            tk = td[k]
            for j in range(tw):
                q = j * m
                (v[6 * k, j], v[6 * k + 1, j], v[6 * k + 2, j], v[6 * k + 3, j], v[6 * k + 4, j],
                 v[6 * k + 5, j]) = _bt6(tk[q], tk[q + 1], tk[q + 2], tk[q + 3], tk[q + 4], tk[q + 5], one)


@njit(**KERNEL)
def _output_tile_row(mt, bias, yp, r0, rows):
    """yp[r0 + r, j*m + c] = (A^T M_j A)[r, c] + bias for one tile row, inside the plane
    yp (OH, OW); mt (a*a, tw) its tiles' M; ``rows`` (a, m*tw) scratch. Returns the count
    of non-finite outputs written."""
    oh, ow = yp.shape
    a, tw = rows.shape[0], mt.shape[1]
    m = a - 2
    one = mt.dtype.type(1)
    # rows[k, j*m + c] = (M_j A)[k, c]: along each tile's rows first
    for k in range(a):
        for j in range(tw):
            q = j * m
            if a == 4:
                rows[k, q], rows[k, q + 1] = _at4(mt[4 * k, j], mt[4 * k + 1, j], mt[4 * k + 2, j], mt[4 * k + 3, j])
            else:
                rows[k, q], rows[k, q + 1], rows[k, q + 2], rows[k, q + 3] = _at6(
                    mt[6 * k, j], mt[6 * k + 1, j], mt[6 * k + 2, j], mt[6 * k + 3, j], mt[6 * k + 4, j],
                    mt[6 * k + 5, j], one)
    bad = 0
    nr = min(m, oh - r0)
    if a == 4:
        s0, s1, s2, s3 = rows[0], rows[1], rows[2], rows[3]
        y0 = yp[r0]
        for c in range(ow):
            y0[c] = s0[c] + s1[c] + s2[c] + bias
        if nr > 1:
            y1 = yp[r0 + 1]
            for c in range(ow):
                y1[c] = s1[c] - s2[c] - s3[c] + bias
    else:
        s0, s1, s2, s3, s4, s5 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5]
        for c in range(ow):
            out = _at6(s0[c], s1[c], s2[c], s3[c], s4[c], s5[c], one)
            for r in range(nr):
                yp[r0 + r, c] = out[r] + bias
    for r in range(nr):
        yr = yp[r0 + r]
        for c in range(ow):
            bad += not np.isfinite(yr[c])
    return bad


@njit(**KERNEL)
def _gy_tile_row(gyp, r0, strip, rows, gt):
    """gt[t, j] = (A g_j A^T)[t] for the tiles j < tw of one tile row of gy; gyp (OH, OW),
    r0 the tile row's first output row; outputs past the plane are 0. strip (m, m*tw) and
    rows (a, m*tw) scratch; strip's columns from OW on stay 0."""
    oh, ow = gyp.shape
    m, tw = strip.shape[0], gt.shape[1]
    for r in range(m):
        if r0 + r < oh:
            copy_run(gyp[r0 + r], strip[r])
        else:
            strip[r, :ow] = 0
    one = gyp.dtype.type(1)
    if m == 2:
        s0, s1 = strip[0], strip[1]
        for c in range(m * tw):
            rows[0, c], rows[1, c], rows[2, c], rows[3, c] = _a4(s0[c], s1[c])
        for k in range(4):
            tk = rows[k]
            for j in range(tw):
                q = j * m
                gt[4 * k, j], gt[4 * k + 1, j], gt[4 * k + 2, j], gt[4 * k + 3, j] = _a4(tk[q], tk[q + 1])
    else:
        s0, s1, s2, s3 = strip[0], strip[1], strip[2], strip[3]
        for c in range(m * tw):
            rows[0, c], rows[1, c], rows[2, c], rows[3, c], rows[4, c], rows[5, c] = _a6(s0[c], s1[c], s2[c], s3[c],
                                                                                      one)
        for k in range(6):
            tk = rows[k]
            for j in range(tw):
                q = j * m
                (gt[6 * k, j], gt[6 * k + 1, j], gt[6 * k + 2, j], gt[6 * k + 3, j], gt[6 * k + 4, j],
                 gt[6 * k + 5, j]) = _a6(tk[q], tk[q + 1], tk[q + 2], tk[q + 3], one)


# ----------------------------------------------------------------------------- kernels

@njit(cache=True)
def _tile_plan(n, oh, ow, m, cip, slots, g):
    """Sizes of a Winograd pass: ``(a, th, tw, rows, tasks)``, with ``rows`` tile rows per
    block (V of a*a x cip x rows*tw elements within V_ELEMENTS, and at least two tasks per
    slot where the batch allows) and one task per (block, group)."""
    a, th, tw = m + 2, -(-oh // m), -(-ow // m)
    rows = max(1, min(n * th, V_ELEMENTS // (a * a * cip * tw), -(-(n * th * g) // (2 * slots))))
    return a, th, tw, rows, -(-(n * th) // rows) * g


@njit(**KERNEL)
def _input_block(x, c0, cig, t0, nr, th, m, ph, pw, strip, td, v):
    """v[t, ci, k*tw + j] for the block's tile rows t0 + k (k < nr, over samples) and the
    group's channels c0 + ci."""
    tw = (td.shape[1] - 2) // m
    for k in range(nr):
        i, tr = (t0 + k) // th, (t0 + k) % th
        for ci in range(cig):
            _input_tile_row(x[i, c0 + ci], tr * m - ph, pw, strip, td, v[:, ci, k * tw:(k + 1) * tw])


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_winograd(x, u, b, y, ph, pw, g, m, slots):
    """y = conv2d(x, w) + b with u (a*a, CO, cip) = G w G^T; returns the count of
    non-finite outputs."""
    n, c = x.shape[0], x.shape[1]
    co, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    cig, cog, cip = c // g, co // g, u.shape[2]
    a, th, tw, rows, tasks = _tile_plan(n, oh, ow, m, cip, slots, g)
    span = rows * tw
    v_buf = np.zeros((slots, a * a, cip, span), x.dtype)  # rows cig.. stay 0
    m_buf = np.empty((slots, a * a, QUAD, span), x.dtype)
    strip_buf = np.zeros((slots, a, tw * m + 2), x.dtype)
    td_buf = np.zeros((slots, a, tw * m + 2), x.dtype)
    bad = np.zeros(slots, np.int64)
    for tid in prange(slots):
        v, mq, strip, td = v_buf[tid], m_buf[tid], strip_buf[tid], td_buf[tid]
        for task in range(tid, tasks, slots):
            t0, gi = (task // g) * rows, task % g
            nr = min(rows, n * th - t0)  # tile rows in this block
            length = nr * tw
            _input_block(x, gi * cig, cig, t0, nr, th, m, ph, pw, strip, td, v)
            o = gi * cog
            while o < (gi + 1) * cog:
                nu = _block(o - gi * cog, cog)
                for t in range(a * a):
                    vt, acc = v[t], mq[t]
                    a0, a1, a2, a3 = acc[0, :length], acc[1, :length], acc[2, :length], acc[3, :length]
                    acc[:nu, :length] = 0
                    for ci in range(0, cip, TAPS):
                        s0, s1, s2 = vt[ci, :length], vt[ci + 1, :length], vt[ci + 2, :length]
                        if nu == QUAD:
                            _axpy_quad(u[t, o:o + QUAD, ci:ci + TAPS], s0, s1, s2, a0, a1, a2, a3)
                        else:
                            _axpy_one(u[t, o, ci:ci + TAPS], s0, s1, s2, a0)
                for uu in range(nu):
                    for k in range(nr):
                        i, tr = (t0 + k) // th, (t0 + k) % th
                        bad[tid] += _output_tile_row(mq[:, uu, k * tw:(k + 1) * tw], b[o + uu], y[i, o + uu],
                                                     tr * m, td)
                o += nu
    return bad.sum()


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_winograd(x, gy, gu, ph, pw, g, m, slots):
    """gu (a*a*CO, cip) = sum over tiles of (A gy A^T) . V, the weight-gradient before
    gw = G^T gu G; per-slot partial sums, reduced."""
    n, c = x.shape[0], x.shape[1]
    co, oh, ow = gy.shape[1], gy.shape[2], gy.shape[3]
    cip = gu.shape[1]
    cig, cog = c // g, co // g
    a, th, tw, rows, tasks = _tile_plan(n, oh, ow, m, cip, slots, g)
    span = rows * tw
    v_buf = np.zeros((slots, a * a, cip, span), x.dtype)  # rows cig.. stay 0
    gt_buf = np.zeros((slots, a * a, QUAD, span), x.dtype)
    strip_buf = np.zeros((slots, a, tw * m + 2), x.dtype)
    td_buf = np.zeros((slots, a, tw * m + 2), x.dtype)
    gstrip_buf = np.zeros((slots, m, tw * m), x.dtype)  # columns from ow on stay 0
    partial = np.zeros((slots, a * a, co, cip), x.dtype)
    for tid in prange(slots):
        v, gq, strip, td, gstrip, part = v_buf[tid], gt_buf[tid], strip_buf[tid], td_buf[tid], gstrip_buf[tid], \
            partial[tid]
        for task in range(tid, tasks, slots):
            t0, gi = (task // g) * rows, task % g
            nr = min(rows, n * th - t0)
            length = nr * tw
            _input_block(x, gi * cig, cig, t0, nr, th, m, ph, pw, strip, td, v)
            o = gi * cog
            while o < (gi + 1) * cog:
                nu = _block(o - gi * cog, cog)
                for uu in range(nu):
                    for k in range(nr):
                        i, tr = (t0 + k) // th, (t0 + k) % th
                        _gy_tile_row(gy[i, o + uu], tr * m, gstrip, td[:, :tw * m], gq[:, uu, k * tw:(k + 1) * tw])
                for t in range(a * a):
                    vt, gt = v[t], gq[t]
                    g0, g1, g2, g3 = gt[0, :length], gt[1, :length], gt[2, :length], gt[3, :length]
                    for ci in range(0, cip, TAPS):
                        s0, s1, s2 = vt[ci, :length], vt[ci + 1, :length], vt[ci + 2, :length]
                        if nu == QUAD:
                            _dot_quad(s0, s1, s2, g0, g1, g2, g3, part[t, o:o + QUAD, ci:ci + TAPS])
                        else:
                            _dot_one(s0, s1, s2, g0, part[t, o, ci:ci + TAPS])
                o += nu
    _reduce_slots(partial.reshape(slots, a * a * co, cip), gu)


# ----------------------------------------------------------------------------- launchers

def supports(geom, pass_) -> bool:
    """3x3, stride 1, dilation 1, at least 16 input channels per group; for the
    input-gradient (the flipped forward, whose input channels are the CO/G) also at least 16
    output channels per group and a full padding >= 0. The scratch is a block of tiles
    (V_ELEMENTS), whatever the plane or the padding."""
    if (geom.kh, geom.kw, geom.sh, geom.sw, geom.dh, geom.dw) != (3, 3, 1, 1, 1, 1) or geom.cig < 16:
        return False
    return pass_ != "backward_input" or (geom.cog >= 16 and min(geom.full_padding) >= 0)


def tile_size(oh, ow) -> int:
    """m of F(m x m, 3x3) for a computed plane of oh x ow (module docstring)."""
    return 4 if min(oh, ow) >= F4_MIN_SIDE else 2


def _gmat(m):
    return G_F4 if m == 4 else G_F2


def transform_weight(w, m):
    """u (a*a, CO, cip) = G w G^T per (co, ci), in float64, cast to w's dtype; the input
    channels zero-padded to a multiple of TAPS."""
    co, cig = w.shape[:2]
    gm = _gmat(m)
    a = m + 2
    u = np.zeros((a * a, co, -(-cig // TAPS) * TAPS), w.dtype)
    u[:, :, :cig] = np.einsum("ta,oiab,sb->tsoi", gm, w.astype(np.float64), gm).reshape(a * a, co, cig)
    return u


def _forward(x, w, b, y, ph, pw, g):
    """y = conv2d(x, w, padding=(ph, pw)) + b at stride 1 by Winograd; False where an output
    is not finite (the caller recomputes)."""
    m = tile_size(y.shape[2], y.shape[3])
    return conv2d_forward_winograd(x, transform_weight(w, m), b, y, ph, pw, g, m, get_num_threads()) == 0


def forward(x, w, b, y, geom):
    if not _forward(x, w, b, y, geom.ph, geom.pw, geom.g):
        forward_direct(x, w, b, y, geom)


def backward_input(gy, w, gx, geom):
    """gx = the Winograd forward of gy with the flipped kernel and the full padding."""
    fh, fw = geom.full_padding
    if not _forward(gy, flip_kernel(w, geom.g), np.zeros(geom.c, gx.dtype), gx, fh, fw, geom.g):
        backward_input_direct(gy, w, gx, geom)


def backward_weight(x, gy, gw, geom):
    m = tile_size(geom.oh, geom.ow)
    a, co, cig = m + 2, geom.co, geom.cig
    gu = np.empty((a * a * co, -(-cig // TAPS) * TAPS), gw.dtype)
    conv2d_backward_weight_winograd(x, gy, gu, geom.ph, geom.pw, geom.g, m, get_num_threads())
    gm = _gmat(m)
    gu4 = gu[:, :cig].reshape(a, a, co, cig).astype(np.float64)
    gw[...] = np.einsum("ta,tsoi,sb->oiab", gm, gu4, gm)
    if not np.isfinite(gw).all():
        gw[...] = 0
        backward_weight_direct(x, gy, gw, geom)
