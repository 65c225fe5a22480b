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
    input-gradient   gx_g (C/G, N*H*W) = wt_g (C/G, K) @ cols(gy)_g (K, N*H*W)
                     K = CO/G*KH*KW at stride 1: the forward's kernel on the transposed
                     problem, the duality conv.py's direct kernel uses (its ``flip``): gy
                     correlated at stride 1 with the full padding d*(k-1) - p and the
                     flipped filter with its channel axes swapped, wt[g, c, (o*KH + a)*KW
                     + b] = w[g*CO/G + o, c, KH-1-a, KW-1-b] (``_phase_weights``, a copy
                     the size of w), written straight into gx's planes.
                     At stride s > 1 gx splits into its sh*sw phases gx[..., r::sh, q::sw]
                     (the CPU's "adjoint" polyphase split, kernels/conv_stride1.py): on
                     phase (r, q) only the taps a with a*dh = r + ph (mod sh), and b
                     likewise, land, each at a constant shift into gy, so the phase is a
                     stride-1 correlation of gy (not upsampled) with that sub-kernel,
                     flipped: one product of the same kernel per phase,
                         gx_g[r, q] (C/G, N*U_r*U_q) = wt_g[r, q] (C/G, K_rq) @ cols_rq(gy)_g,
                     U_r = ceil((H - r)/sh) rows, K_rq = CO/G * (its taps), the taps of
                     row phase r a0, a0 + sh/gcd(dh, sh), ... read through a window of
                     dilation dh/gcd(dh, sh) and its own leading padding (``phase_taps``,
                     kernels/index.py, which derives them; ``window``). The phases' K sum
                     to CO/G*KH*KW: C/G*N*CO/G*sum_rq(U_r*U_q*K_rq) multiply-adds, where
                     the stride-1 correlation of the zero-upsampled gy did C/G*N*H*W*CO/G*
                     KH*KW, of which all but about 1/(sh*sw) were products with its zeros
                     (resnet_down, 3x3 stride 2 on 32x32: 2.25 taps per gx element on
                     average instead of 9). The sub-filters lie one after another along
                     wt's K (``_phase_weights``, one launch); the phases' products go to a
                     workspace of (N, C, U_r, U_q) planes, which ``_from_phases`` gathers
                     into gx (0 on a phase no tap reaches: a 1x1 stride-2 kernel reaches
                     one of four, whose product alone runs).
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
from .index import column_row, correlations, phase_length, phase_taps
from .launch import blocks, flat, jit, launch

# ----------------------------------------------------------------------------- kernels


@jit
def _phase_weights(w, wt, sh, sw, ph, pw, dh, dw):
    """wt (G, C/G, CO/G*KH*KW): each phase's flipped sub-filter (``phase_taps``), the phases
    (r, q) one after another along K, r-major:

        wt[g, c, k_rq + (o*th + t)*tw + u] = w[g*cog + o, c, a0 + (th-1-t)*step_h, b0 + (tw-1-u)*step_w]

    with phase (r, q)'s th x tw taps from (a0, b0) and k_rq the K of the phases before it.
    At stride 1: one phase, w[g*cog + o, c, kh-1-a, kw-1-b]. One thread per element of wt."""
    e = cuda.grid(1)
    kh, kw = w.shape[2], w.shape[3]
    k = wt.shape[2]
    cog = k // (kh * kw)
    if e < wt.size:
        gi, c, row = e // (wt.shape[1] * k), (e // k) % wt.shape[1], e % k
        for r in range(sh):
            a0, sa, th, _, _, _ = phase_taps(r, kh, sh, ph, dh, 0)
            for q in range(sw):
                b0, sb, tw, _, _, _ = phase_taps(q, kw, sw, pw, dw, 0)
                size = cog * th * tw
                if 0 <= row < size:
                    o, t, u = column_row(row, th, tw)
                    wt[gi, c, e % k] = w[gi * cog + o, c, a0 + (th - 1 - t) * sa, b0 + (tw - 1 - u) * sb]
                row -= size


@jit
def _from_phases(planes, gx, h, wd, sh, sw, rows_reached, cols_reached, phase_size):
    """gx[n, c, i, j] = phase (i % sh, j % sw)'s plane at (i // sh, j // sw), or 0 where no
    tap reaches that phase (bit i % sh of ``rows_reached`` or j % sw of ``cols_reached``
    clear); gx flat, its planes h x wd. ``planes`` holds the phases r-major, phase f's
    (N, C, U_r, U_q) array from f*phase_size. One thread per element of gx (a gather).
    The masks come from the launcher: ``phase_taps``' search for the taps here would
    double the kernel's 64-bit divisions (bench/ptx_check.py)."""
    e = cuda.grid(1)
    if e < gx.size:
        plane, p = e // (h * wd), e % (h * wd)  # plane n*C + c; (n, c) need not be split
        i, j = p // wd, p % wd
        r, q = i % sh, j % sw
        v = gx.dtype.type(0)
        if (rows_reached >> r) & 1 and (cols_reached >> q) & 1:
            uh, uw = phase_length(r, sh, h), phase_length(q, sw, wd)
            v = planes[(r * sw + q) * phase_size + (plane * uh + i // sh) * uw + j // sw]
        gx[e] = v


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


def window(geom, pass_: str, phase=(0, 0)) -> tuple:
    """The window through which ``column_entry`` reads the source of ``pass_`` (from its
    first channel; group g's starts g*C/G further on, the kernels' group step): the
    forward's (and weight-gradient's) x at the layer's stride and padding into (OH, OW);
    the input-gradient's gy, for gx's phase (r, q) = ``phase``, at stride 1 through that
    phase's sub-kernel (``correlations``) into its U_r x U_q plane (at stride 1 the one
    phase: the whole kernel, the full padding, (H, W))."""
    if pass_ == "backward_input":
        (_, _, lh, lw, dh, dw, th, tw, *_), (uh, uw) = correlations(geom, pass_)[phase[0] * geom.sw + phase[1]]
        return (0, 1, 1, lh, lw, dh, dw, 1, 1, th, tw, uh, uw)
    return (0, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, 1, 1, geom.kh, geom.kw, geom.oh, geom.ow)


def _reached(geom) -> tuple[int, int]:
    """The masks (bit r) of the row phases and of the column phases of gx that a tap reaches
    (``correlations``' taps per phase)."""
    plan = [scalars for scalars, _ in correlations(geom, "backward_input")]
    return sum(1 << r for r in range(geom.sh) if plan[r * geom.sw][6]), sum(1 << q for q in range(geom.sw) if plan[q][7])


def _planes(m, channels, off=0):
    """The (channel, n*m + pixel) matrix view of an (N, channels, m) array at ``off``."""
    return G.view(m, off=off, panel=m, panel_stride=channels * m)


def forward(x, w, b, y, geom, tile=None, epilogue=None):
    m, k = geom.oh * geom.ow, geom.cig * geom.kh * geom.kw
    G.product("conv", tile or tile_for(geom.cog), geom.cog, geom.n * m, k,
              flat(w), G.view(k), x, window(geom, "forward"), flat(y), _planes(m, geom.co),
              bias=b, vbias=(0, 1, 0), groups=geom.g, gs=(geom.cog * k, geom.cig, geom.cog * m, geom.cog),
              epilogue=epilogue)


def backward_input(gy, w, gx, geom, tile=None):
    k = geom.cog * geom.kh * geom.kw  # wt's row: every phase's K
    wt = G.workspace("implicit-flipped-w", w.size, w.dtype).reshape(geom.g, geom.cig, k)
    launch(_phase_weights, wt.size, w, wt, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw)
    phases = geom.sh * geom.sw
    # phase f's (N, C, U_r, U_q) planes at f*phase_size of a workspace; at stride 1 gx itself
    (_, (u0, v0)), *_ = correlations(geom, "backward_input")  # phase (0, 0)'s plane, the largest
    phase_size = geom.n * geom.c * u0 * v0
    out = flat(gx) if phases == 1 else G.workspace("implicit-gx-phases", phases * phase_size, gx.dtype)
    k_rq = 0
    for f in range(phases):
        win = window(geom, "backward_input", divmod(f, geom.sw))
        m, kf = win[11] * win[12], geom.cog * win[9] * win[10]
        if m and kf:  # a phase no tap reaches is left to _from_phases' zeros
            G.product("conv", tile or tile_for(geom.cig), geom.cig, geom.n * m, kf,
                      flat(wt), G.view(k, off=k_rq), gy, win, out, _planes(m, geom.c, f * phase_size),
                      groups=geom.g, gs=(geom.cig * k, geom.cog, geom.cig * m, 0))
        k_rq += kf
    if phases > 1:
        launch(_from_phases, gx.size, out, flat(gx), geom.h, geom.w, geom.sh, geom.sw,
               *_reached(geom), phase_size)


def backward_weight(x, gy, gw, geom, tile=None):
    m, k = geom.oh * geom.ow, geom.cig * geom.kh * geom.kw
    G.product("conv_weight", tile or tile_for(geom.cog), geom.cog, k, geom.n * m,
              flat(gy), _planes(m, geom.co), x, window(geom, "forward"), flat(gw), G.view(k),
              groups=geom.g, gs=(geom.cog * m, geom.cig, geom.cog * k, 0))
