"""Implicit-GEMM convolution on CUDA: im2col's products without its column buffer.

Layouts, symbols and the launchers' contract are kernels/cuda/conv.py's (each launcher
writes its fresh output with =); K below is the GEMM's reduction length, m = OH*OW.

Per group g (channels [g*C/G, (g+1)*C/G) in, [g*CO/G, ...) out), one tiled product of
gemm.py (all groups in one launch) in which the im2col matrix cols (C/G*KH*KW rows (c, a, b), N*m columns (n, r, q))
is never stored: gemm.py's ``conv`` kernels gather each of its elements
(``column_entry``, kernels/cuda/index.py) as they stage a K step of B in shared memory,
double-buffered, with the same register tiles, split-K and epilogue as the GEMM itself.

    forward          y_g (CO/G, N*m) = w_g (CO/G, K) @ cols(x)_g (K, N*m)  + b_g
                     K = C/G*KH*KW; y written in place through its (N, CO, m) planes
                     (the panelled C view), the bias added as each output is stored,
                     and the fused batch norm and relu (``epilogue=``) applied there.
    input-gradient   gx_g (C/G, N*H*W) = wt_g (C/G, K) @ cols(up(gy))_g (K, N*H*W)
                     K = CO/G*KH*KW: the forward's kernel on the transposed problem,
                     the duality conv.py's direct kernel uses (its ``flip``): gy
                     upsampled by the stride (zeros between samples), correlated at
                     stride 1 with the full padding d*(k-1) - p and the flipped filter
                     with its channel axes swapped, wt[g, c, (o*KH + a)*KW + b] =
                     w[g*CO/G + o, c, KH-1-a, KW-1-b] (``_flip_weight``, a copy the
                     size of w). At stride s it multiplies the s_h*s_w - 1 zeros of
                     every upsampled window too: the price of one kernel for both.
    weight-gradient  gw_g (CO/G, K) = gy_g (CO/G, N*m) @ cols(x)_g^T (N*m, K)
                     K = C/G*KH*KW columns, reduction over the N*m pixels: gy read in
                     place through panels on its K (gemm.py's ``conv_weight`` kernels),
                     split-K into partials summed in slice order (deterministic).

Every tile shape of gemm.py (``Tile``) runs every pass; ``tile_for`` picks one by the
product's M (see its comment); bench/gpu_sweep.py times them all. Depthwise layers are left
to the direct kernel (``supports``).
"""
from __future__ import annotations

from numba import cuda

from . import gemm as G
from .index import column_row
from .launch import blocks, flat, jit, launch

# ----------------------------------------------------------------------------- kernels


@jit
def _flip_weight(w, wt):
    """wt[g, c, (o*kh + a)*kw + b] = w[g*cog + o, c, kh-1-a, kw-1-b]: each group's filter
    as the input-gradient's A, wt (G, C/G, CO/G*KH*KW). One thread per element of wt."""
    e = cuda.grid(1)
    kh, kw = w.shape[2], w.shape[3]
    k = wt.shape[2]
    if e < wt.size:
        gi, c, row = e // (wt.shape[1] * k), (e // k) % wt.shape[1], e % k
        o, a, bb = column_row(row, kh, kw)
        wt[gi, c, row] = w[gi * (k // (kh * kw)) + o, c, kh - 1 - a, kw - 1 - bb]


# ----------------------------------------------------------------------------- launchers

# The tile by the product's M (a group's output channels; input channels for the
# input-gradient): the GEMM's 128-row tile wastes 3/4 of its rows on a 32-channel layer.
# No GPU measurement exists yet: until bench/gpu_sweep.py has timed CANDIDATES on the
# table's layers this is only "the smallest candidate M tile that covers M, at least 32
# rows" (vectorised or not as DEFAULT is); under the simulator the default tile always.
def tile_for(m: int) -> G.Tile:
    if G.SIMULATOR:
        return G.DEFAULT
    fits = [t for t in G.CANDIDATES if t.bk == G.DEFAULT.bk and t.bn == 128 and t.vec == G.DEFAULT.vec
            and t.bm >= min(max(m, 32), 128)]
    return min(fits, key=lambda t: t.bm)


def supports(geom, pass_: str) -> bool:
    """Every layer but the depthwise ones (one input channel per group, G > 1), whose
    products are C_out/G x N*m x KH*KW slivers of a tile, where the direct kernel (its own
    depthwise tiles) has no GEMM to waste (the table gives them to it); and but those
    whose groups' M tiles would overflow grid.y (65535, at the smallest tile of 16 rows)."""
    return (geom.cig > 1 or geom.g == 1) and geom.g * blocks(max(geom.cog, geom.cig), 16) <= 65535


def window(geom, pass_: str) -> tuple:
    """The window through which ``column_entry`` reads the source of ``pass_`` (from its
    first channel; group g's starts g*C/G further on, the kernels' group step): the
    forward's (and weight-gradient's) x at the layer's stride and padding into (OH, OW);
    the input-gradient's gy upsampled by the stride, at stride 1 and the full padding,
    into (H, W)."""
    if pass_ == "backward_input":
        ph, pw = geom.full_padding
        return (0, 1, 1, ph, pw, geom.dh, geom.dw, geom.sh, geom.sw, geom.kh, geom.kw, geom.h, geom.w)
    return (0, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, 1, 1, geom.kh, geom.kw, geom.oh, geom.ow)


def _planes(m, channels):
    """The (channel, n*m + pixel) matrix view of an (N, channels, m) array."""
    return G.view(m, panel=m, panel_stride=channels * m)


def forward(x, w, b, y, geom, tile=None, epilogue=None):
    m, k = geom.oh * geom.ow, geom.cig * geom.kh * geom.kw
    G.product("conv", tile or tile_for(geom.cog), geom.cog, geom.n * m, k,
              flat(w), G.view(k), x, window(geom, "forward"), flat(y), _planes(m, geom.co),
              bias=b, vbias=(0, 1, 0), groups=geom.g, gs=(geom.cog * k, geom.cig, geom.cog * m, geom.cog),
              epilogue=epilogue)


def backward_input(gy, w, gx, geom, tile=None):
    m, k = geom.h * geom.w, geom.cog * geom.kh * geom.kw
    wt = G.workspace("implicit-flipped-w", w.size, w.dtype).reshape(geom.g, geom.cig, k)
    launch(_flip_weight, wt.size, w, wt)
    G.product("conv", tile or tile_for(geom.cig), geom.cig, geom.n * m, k,
              flat(wt), G.view(k), gy, window(geom, "backward_input"), flat(gx), _planes(m, geom.c),
              groups=geom.g, gs=(geom.cig * k, geom.cog, geom.cig * m, 0))


def backward_weight(x, gy, gw, geom, tile=None):
    m, k = geom.oh * geom.ow, geom.cig * geom.kh * geom.kw
    G.product("conv_weight", tile or tile_for(geom.cog), geom.cog, k, geom.n * m,
              flat(gy), _planes(m, geom.co), x, window(geom, "forward"), flat(gw), G.view(k),
              groups=geom.g, gs=(geom.cog * m, geom.cig, geom.cog * k, 0))
