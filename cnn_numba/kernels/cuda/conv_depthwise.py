"""CUDA depthwise convolution: the layers whose groups have one input channel each (C/G = 1,
G > 1; CO/G = m outputs per group, the "channel multiplier"), forward and input-gradient.

Such a layer has no product to speak of: each output reads kH*kW inputs of one plane, so
its speed is the memory's, and what counts is reading each input once from DRAM and every
output written in full lines. The direct kernel (conv.py's ``_correlate``) serves it, but
its C_T = 4 output channels per thread come from one group, which here has m (often 1):
3/4 of its multiply-adds and filter loads are on zeros, and each block stages a shared
patch for a single plane. Here each thread computes V consecutive outputs of one row of
one channel, gathering its inputs straight from global memory (the kH x kW windows of
neighbouring threads overlap: the L1 cache serves the re-reads); consecutive threads own
consecutive runs of a row, so a warp's loads and stores cover whole lines.

    forward          y[n, d, r, q] = b[d] + sum_{a, b'} w[d, 0, a, b'] x[n, d // m, tap(r, a), tap(q, b')]
    input-gradient   gx[n, c] = sum over the group's m outputs d = c*m + k of the flipped
                     correlation of gy[n, d] with w[d, 0], per phase of gx at stride s
                     (kernels/cuda/index.py's ``correlations``: only the taps that land on
                     each phase, as the direct kernel's input-gradient)

The sums run bias first, then source channel, row tap, column tap, as the direct kernel's;
the forward's epilogue (eval-mode batch norm, relu) is applied at the store (elementwise.py).
The weight-gradient, a reduction over N*OH*OW per (channel, tap), is the direct kernel's
(the table gives that pass to it: ``supports``).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from .elementwise import channel, epilogue, no_epilogue
from .index import correlations, tap
from .launch import BLOCK, blocks, flat, jit, launch_grid

V = 4             # consecutive outputs of a row per thread
MAX_GRID = 65535  # grid.y (samples) limit: a launch per 65535 samples


@jit
def _depthwise(src, w, b, dst, sh, sw, ph, pw, dh, dw, ka, kb, a0, sa, b0, sb, fh, fw, fr, fq, uh, uw, m,
               flip, has_bias, ep, relu, n0):
    """dst[n, d, r*fh + fr, q*fw + fq] for (r, q) in the phase's uh x uw plane, V consecutive q
    per thread: epilogue(b[d] + sum over source channels, taps (a, bb) < (ka, kb) of
    w[o, 0, a0 + a*sa, b0 + bb*sb] * src[n, c, tap(r, sh, ph, a, dh), tap(q, sw, pw, bb, dw)])
    with (c, o) = (d // m, d) for the forward (flip=0: one source channel) and (d*m + k, d*m + k)
    for k < m for the input-gradient (flip=1). The scalars are kernels/cuda/index.py's
    ``correlations``. Grid: (channels x rows x runs of V, samples n0 + [0, grid.y)): one sample per
    thread (a loop over samples here took 72 registers, this 56: bench/ptx_check.py)."""
    acc = cuda.local.array(V, dst.dtype)
    runs = (uw + V - 1) // V
    e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if e < dst.shape[1] * uh * runs:
        d, p = e // (uh * runs), e % (uh * runs)
        r, q0 = p // runs, (p % runs) * V
        sources = m if flip else 1
        chan = channel(ep, d)
        n = n0 + cuda.blockIdx.y
        for v in range(V):
            acc[v] = 0
            if has_bias:
                acc[v] = b[d]
        for k in range(sources):
            c, o = (d * m + k, d * m + k) if flip else (d // m, d)
            for a in range(ka):
                i = tap(r, sh, ph, a, dh)
                if 0 <= i < src.shape[2]:
                    for bb in range(kb):
                        wv = w[o, 0, a0 + a * sa, b0 + bb * sb]
                        for v in range(V):
                            j = tap(q0 + v, sw, pw, bb, dw)
                            if 0 <= j < src.shape[3]:
                                acc[v] += wv * src[n, c, i, j]
        for v in range(V):
            if q0 + v < uw:
                dst[n, d, r * fh + fr, (q0 + v) * fw + fq] = epilogue(acc[v], chan, relu)


def supports(geom, pass_: str) -> bool:
    """Depthwise layers (one input channel per group, G > 1), forward and input-gradient."""
    return geom.cig == 1 and geom.g > 1 and pass_ != "backward_weight"


def _launch(src, w, b, dst, geom, pass_, epilogue=None):
    ep, relu = no_epilogue(dst.dtype) if epilogue is None else epilogue
    bias = flat(w) if b is None else b
    for scalars, (uh, uw) in correlations(geom, pass_):
        for n0 in range(0, dst.shape[0], MAX_GRID):
            grid = (blocks(dst.shape[1] * uh * blocks(uw, V), BLOCK), min(dst.shape[0] - n0, MAX_GRID))
            launch_grid(_depthwise, grid, BLOCK, src, w, bias, dst, *scalars, uh, uw, geom.cog,
                        int(pass_ != "forward"), int(b is not None), ep, int(relu), n0)


def forward(x, w, b, y, geom, epilogue=None):
    _launch(x, w, b, y, geom, "forward", epilogue)


def backward_input(gy, w, gx, geom):
    _launch(gy, w, None, gx, geom, "backward_input")
