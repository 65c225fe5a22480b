"""Direct convolution with output channels across the vector lanes ("blocked"): conv2d's
forward, and its input-gradient at stride 1 (the flipped forward), with the layouts, symbols
and contract of kernels/conv.py (outputs written with =, the forward's epilogue applied as
each output is stored).

The flat kernels (kernels/conv_stride1.py) lay an output plane along the lanes: each vector
holds 16 neighbouring outputs of one channel, and the rows are computed as wide as the
padded plane, so a small plane pays for its padding: a 7x7 output is computed as 8x8 (31%
more), and at stride 2 the input is first split into four phase planes. Here a vector holds
one output pixel's value for ``LANES`` output channels instead, as oneDNN's blocked layouts
do: a tile is TILE consecutive output pixels (in raster order, across rows and samples)
times CHANNELS output channels, its TILE * VECTORS accumulators in registers, and each
(input channel, tap) pair adds, per pixel, one input value (a broadcast) times the pair's
CHANNELS weights (VECTORS vector loads):

    acc[p, o] = b[o] + sum_k  w[o, k] * xp[base[p] + taps[k]]       k = ci*kh*kw + a*kw + bb

with xp the samples of a run, each zero-padded (cig, hp, wp), base[p] where pixel p's
window starts (s*plane + oy*sh*wp + ox*sw) and taps[k] = ci*hp*wp + a*dh*wp + bb*dw. No
output is computed that is not stored, at any stride, except in the last tile of a run
(TILE = 7 divides every plane of 7 x 7, 14 x 14, 28 x 28). The accumulators start at the
bias and add the pairs in the flat weight's order, one fused multiply-add each: the sums of
the flat kernels' register blocks, bit for bit.

Per pair: VECTORS weight loads, TILE broadcasts, TILE * VECTORS multiply-adds (14 for 9
loads). The weights are laid out (group, block, pair, CHANNELS) once per call, zero past the
group's output channels. A tile's results leave from the registers: the epilogue on the
accumulators (``epilogue_vec``), each group of 8 lanes transposed in registers (simd's
``vtranspose8``), then one masked store of a channel's outputs (``vstore_lanes``), where the
tile's pixels lie side by side in y (within one sample); a tile across two samples goes
through a small buffer, output by output.

Where it pays: layers with at least CHANNELS output channels per group whose planes waste
the most in the flat layout (small planes, stride 2); 'auto' leaves the choice to the
autotuner (kernels/autotune.py), which times it where vector registers hold 16 float32
(``tuned``): with 8-lane registers its 14 accumulators and two weight vectors would not fit
in AVX2's 16.
"""
import numpy as np
from numba import njit, prange

from . import PARALLEL, get_num_threads
from .conv import KERNEL, channel, epilogue, epilogue_args, epilogue_vec, no_epilogue
from .conv_stride1 import REGISTER_BLOCKED, even_runs, flip_kernel, pad_phases
from .simd import LANES, vfma, vload, vstore, vstore_lanes, vtranspose8

VECTORS = 2               # output-channel vectors per tile
CHANNELS = VECTORS * LANES
TILE = 7                  # output pixels per tile
RUN_TILES = 64            # tiles per run of samples, about (a run's padded input stays in L2)


@njit(cache=True)
def _tile(wv, bias, src, base, taps, count):
    """The tile's accumulators ((c_p), (d_p)), p < TILE: output channels [0, LANES) and
    [LANES, CHANNELS) of pixel p = bias + sum_{k < count} wv[k*CHANNELS:(k+1)*CHANNELS] *
    src[base[p] + taps[k]], each in a vector register, one fused multiply-add per pair."""
    b0, b1, b2, b3, b4, b5, b6 = base[0], base[1], base[2], base[3], base[4], base[5], base[6]
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = vload(bias, 0)
    d0 = d1 = d2 = d3 = d4 = d5 = d6 = vload(bias, LANES)
    for k in range(count):
        t, j = taps[k], k * CHANNELS
        u, v = vload(wv, j), vload(wv, j + LANES)
        x = src[b0 + t]
        c0, d0 = vfma(c0, x, u), vfma(d0, x, v)
        x = src[b1 + t]
        c1, d1 = vfma(c1, x, u), vfma(d1, x, v)
        x = src[b2 + t]
        c2, d2 = vfma(c2, x, u), vfma(d2, x, v)
        x = src[b3 + t]
        c3, d3 = vfma(c3, x, u), vfma(d3, x, v)
        x = src[b4 + t]
        c4, d4 = vfma(c4, x, u), vfma(d4, x, v)
        x = src[b5 + t]
        c5, d5 = vfma(c5, x, u), vfma(d5, x, v)
        x = src[b6 + t]
        c6, d6 = vfma(c6, x, u), vfma(d6, x, v)
    return (c0, c1, c2, c3, c4, c5, c6), (d0, d1, d2, d3, d4, d5, d6)


@njit(cache=True)
def _store_side_by_side(acc, epv, first, affine, relu, yf, at, pixels, valid, p_count):
    """A tile whose p_count pixels lie side by side in y (within one sample): the epilogue on
    ``acc`` (one Vec per pixel: channels first + l, l < LANES, of the block; their epilogue
    values epv[:, first + l]), an in-register transpose, then per channel one masked store of
    its p_count outputs at yf[at + channel * pixels], for the channels below ``valid``."""
    mu, scale, shift = vload(epv[0], first), vload(epv[1], first), vload(epv[2], first)
    a0 = epilogue_vec(acc[0], mu, scale, shift, affine, relu)
    a1 = epilogue_vec(acc[1], mu, scale, shift, affine, relu)
    a2 = epilogue_vec(acc[2], mu, scale, shift, affine, relu)
    a3 = epilogue_vec(acc[3], mu, scale, shift, affine, relu)
    a4 = epilogue_vec(acc[4], mu, scale, shift, affine, relu)
    a5 = epilogue_vec(acc[5], mu, scale, shift, affine, relu)
    a6 = epilogue_vec(acc[6], mu, scale, shift, affine, relu)
    t = vtranspose8(a0, a1, a2, a3, a4, a5, a6, a6)  # row 7 repeats row 6: its lanes are never stored
    _store_channels(t[0], first, yf, at, pixels, valid, p_count)
    _store_channels(t[1], first + 1, yf, at, pixels, valid, p_count)
    _store_channels(t[2], first + 2, yf, at, pixels, valid, p_count)
    _store_channels(t[3], first + 3, yf, at, pixels, valid, p_count)
    _store_channels(t[4], first + 4, yf, at, pixels, valid, p_count)
    _store_channels(t[5], first + 5, yf, at, pixels, valid, p_count)
    _store_channels(t[6], first + 6, yf, at, pixels, valid, p_count)
    _store_channels(t[7], first + 7, yf, at, pixels, valid, p_count)


@njit(cache=True, inline="always")
def _store_channels(row, c, yf, at, pixels, valid, p_count):
    """A transposed row's lanes [8h, 8h + p_count): the outputs of channel c + 8h."""
    for h in range(LANES // 8):
        if c + 8 * h < valid:
            vstore_lanes(yf, at + (c + 8 * h) * pixels, row, 8 * h, p_count)


@njit(cache=True, inline="always")
def _stage(out, acc, first):
    """out[p, first:first + LANES] = acc[p] for p < TILE: a tile for ``_scatter``."""
    vstore(out[0], first, acc[0])
    vstore(out[1], first, acc[1])
    vstore(out[2], first, acc[2])
    vstore(out[3], first, acc[3])
    vstore(out[4], first, acc[4])
    vstore(out[5], first, acc[5])
    vstore(out[6], first, acc[6])


@njit(cache=True)
def _blocked_weights(w, b, ep, g):
    """(wv, bv, epv): wv (g, blocks, cig*kh*kw*CHANNELS), each block's pairs in the flat
    weight's order with the block's CHANNELS weights contiguous; bv (g, blocks, CHANNELS) the
    biases and epv (g, blocks, 3, CHANNELS) the epilogue's per-channel values (``channel``;
    zeros without one); zeros past each group's output channels."""
    co, cig, kh, kw = w.shape
    cog, k = co // g, cig * kh * kw
    blocks = -(-cog // CHANNELS)
    wf = w.reshape(co, k)
    wv = np.zeros((g, blocks, k * CHANNELS), w.dtype)
    bv = np.zeros((g, blocks, CHANNELS), w.dtype)
    epv = np.zeros((g, blocks, 3, CHANNELS), w.dtype)
    for gi in range(g):
        for o in range(cog):
            blk, c = o // CHANNELS, o % CHANNELS
            bv[gi, blk, c] = b[gi * cog + o]
            _, epv[gi, blk, 0, c], epv[gi, blk, 1, c], epv[gi, blk, 2, c] = channel(ep, gi * cog + o)
            row, dst = wf[gi * cog + o], wv[gi, blk]
            for j in range(k):
                dst[j * CHANNELS + c] = row[j]
    return wv, bv, epv


@njit(cache=True)
def _plan(n, cog, oh, ow, g, slots):
    """``(nb, runs, parts)``: nb samples per run (about RUN_TILES tiles), and, where fewer
    (run, group) tasks than ``slots`` (a small batch), each group's blocks of output channels
    split into ``parts`` tasks, so that every thread has work."""
    nb = even_runs(n, max(1, min(n, (RUN_TILES * TILE) // max(oh * ow, 1))), slots)
    runs = -(-n // nb)
    blocks = -(-cog // CHANNELS)
    parts = max(1, min(blocks, -(-slots // (runs * g))))
    return nb, runs, parts


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_blocked(x, w, b, y, ep, relu, sh, sw, ph, pw, dh, dw, g, slots):
    """y = epilogue(conv2d(x, w) + b) at stride (sh, sw), padding (ph, pw) (negative crops),
    dilation (dh, dw) and g groups (see above; kernels/conv.py's epilogue: ep, relu)."""
    n = x.shape[0]
    co, cig, kh, kw = w.shape
    oh, ow = y.shape[2], y.shape[3]
    cog = co // g
    hp, wp = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    plane, pixels, count = cig * hp * wp, oh * ow, cig * kh * kw
    wv, bv, epv = _blocked_weights(w, b, ep, g)
    affine = ep.shape[1] > 0
    blocks = wv.shape[1]
    taps = np.empty(count, np.uint64)  # unsigned: no wraparound checks in the tile's loads
    for ci in range(cig):
        for a in range(kh):
            for bb in range(kw):
                taps[(ci * kh + a) * kw + bb] = ci * hp * wp + a * dh * wp + bb * dw
    nb, runs, parts = _plan(n, cog, oh, ow, g, slots)
    per_part = -(-blocks // parts)
    tiles = -(-(nb * pixels) // TILE)
    src_buf = np.zeros((slots, nb * plane), x.dtype)  # the padding stays 0 (pad_phases)
    base_buf = np.zeros((slots, tiles * TILE), np.uint64)
    dst_buf = np.zeros((slots, tiles * TILE), np.uint64)
    out_buf = np.empty((slots, TILE, CHANNELS), x.dtype)
    yf = y.reshape(y.size)
    for tid in prange(slots):
        src, base, dst, out = src_buf[tid], base_buf[tid], dst_buf[tid], out_buf[tid]
        xp = src.reshape(nb, cig, 1, hp, wp)
        for t in range(tid, runs * g * parts, slots):
            i0, gi, part = (t // (g * parts)) * nb, (t // parts) % g, t % parts
            m = min(nb, n - i0)
            for s in range(m):
                pad_phases(x[i0 + s], gi * cig, xp[s], ph, pw, 1, 1)
            outputs = m * pixels
            for q in range(outputs):  # where each output's window starts (0, unused, past them),
                s, pix = q // pixels, q % pixels  # and where channel 0 of it is in y
                base[q] = s * plane + (pix // ow) * sh * wp + (pix % ow) * sw
                dst[q] = (i0 + s) * co * pixels + pix
            base[outputs:] = 0
            for blk in range(part * per_part, min(blocks, (part + 1) * per_part)):
                o0 = gi * cog + blk * CHANNELS
                valid = min(CHANNELS, (gi + 1) * cog - o0)
                epb = epv[gi, blk]
                for q0 in range(0, outputs, TILE):
                    p_count = min(TILE, outputs - q0)
                    c, d = _tile(wv[gi, blk], bv[gi, blk], src, base[q0:], taps, count)
                    if dst[q0 + p_count - 1] - dst[q0] == p_count - 1:  # side by side in y
                        at = dst[q0] + np.uint64(o0 * pixels)
                        _store_side_by_side(c, epb, 0, affine, relu, yf, at, pixels, valid, p_count)
                        _store_side_by_side(d, epb, LANES, affine, relu, yf, at, pixels, valid, p_count)
                    else:
                        _stage(out, c, 0)
                        _stage(out, d, LANES)
                        _scatter(out, dst[q0:], p_count, ep, relu, o0, valid, pixels, yf)


@njit(cache=True)
def _scatter(out, dst, p_count, ep, relu, o0, valid, pixels, yf):
    """yf[dst[p] + (o0 + c)*pixels] = epilogue(out[p, c]) for p < p_count, c < valid: a tile's
    results into y (flat), channel by channel; a whole tile's TILE destinations held in
    registers (unsigned: no wraparound checks)."""
    if p_count < TILE:
        for c in range(valid):
            chan, at = channel(ep, o0 + c), np.uint64((o0 + c) * pixels)
            for p in range(p_count):
                yf[dst[p] + at] = epilogue(out[p, c], chan, relu)
        return
    q0, q1, q2, q3, q4, q5, q6 = dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6]
    for c in range(valid):
        chan, at = channel(ep, o0 + c), np.uint64((o0 + c) * pixels)
        yf[q0 + at] = epilogue(out[0, c], chan, relu)
        yf[q1 + at] = epilogue(out[1, c], chan, relu)
        yf[q2 + at] = epilogue(out[2, c], chan, relu)
        yf[q3 + at] = epilogue(out[3, c], chan, relu)
        yf[q4 + at] = epilogue(out[4, c], chan, relu)
        yf[q5 + at] = epilogue(out[5, c], chan, relu)
        yf[q6 + at] = epilogue(out[6, c], chan, relu)


# ----------------------------------------------------------------------------- launchers

def supports(geom, pass_) -> bool:
    """The forward, and the input-gradient at stride 1 (the flipped forward of gy, whose output
    channels are the C_in/G), where the pass has at least CHANNELS output channels per group
    (fewer would leave lanes idle in every multiply-add); not the weight-gradient. The kernel
    itself takes any geometry (``conv2d_forward_blocked``)."""
    if pass_ == "forward":
        return geom.cog >= CHANNELS
    return pass_ == "backward_input" and geom.stride == (1, 1) and geom.cig >= CHANNELS


def tuned() -> bool:
    """Whether the autotuner times it: where vector registers hold 16 float32 (see above)."""
    return REGISTER_BLOCKED


def forward(x, w, b, y, geom, epilogue=None):
    conv2d_forward_blocked(x, w, b, y, *epilogue_args(epilogue, y.dtype), geom.sh, geom.sw, geom.ph, geom.pw,
                           geom.dh, geom.dw, geom.g, get_num_threads())


def backward_input(gy, w, gx, geom):
    """gx = the stride-1 forward of gy with the flipped kernel and the full padding (a negative
    one crops: pad_phases)."""
    fh, fw = geom.full_padding
    conv2d_forward_blocked(gy, flip_kernel(w, geom.g), np.zeros(geom.c, gx.dtype), gx, *no_epilogue(gx.dtype),
                           1, 1, fh, fw, geom.dh, geom.dw, geom.g, get_num_threads())
