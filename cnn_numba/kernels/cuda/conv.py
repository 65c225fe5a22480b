"""CUDA convolution kernels: conv2d forward, input-gradient, weight-gradient, bias-gradient.

Layouts, symbols, the launchers' signatures and the contract (every launcher returns
a fresh output it wrote with =) are those of the CPU kernels, kernels/conv.py; so are
the dualities that give conv_transpose2d. Every kernel is a gather over its outputs:
no atomics, and every sum runs in an order fixed by the launch geometry, so results
are the same run to run.

Three algorithms, same signatures:

direct   One kernel, ``_correlate``, computes the forward and the input-gradient.
         A block owns a th x tw tile of output positions of one sample and C_T output
         channels of one group; each thread accumulates C_T channels x P_T positions in
         registers. Per chunk of ``cc`` input channels the block stages the input patch
         its tile reads (((th-1)*s + (kh-1)*d + 1) x (... w ...), zeros in the padding)
         and the filter slice in shared memory; then each tap is P_T patch loads, C_T
         filter loads (warp-wide broadcasts) and C_T*P_T FMAs, with no bounds test.
         The input-gradient is the same correlation run on gy with the kernel flipped
         and its in/out channels swapped, at stride 1, one phase of gx at a time: phase
         (r, q), gx[..., r::sh, q::sw], reads gy through only the taps that land on it
         (a0, a0 + s/gcd(d, s), ... at dilation d/gcd(d, s) and a leading padding of its
         own: ``phase_taps``, kernels/index.py, which the implicit GEMM's phases use too),
         and writes its plane into every sh-th row and sw-th column of gx: one launch
         per phase (a phase no tap reaches is a launch that writes its zeros), with the
         phase's taps, first tap, tap step, padding and dilation as launch scalars (in
         the constant bank: a version that derived them in the kernel from the block's
         phase took 150-160 registers, this one 96; bench/ptx_check.py). So at stride s
         it does the FMAs of a gather (resnet_down, 3x3 stride 2: 2.25 taps per gx
         element, not the 9 of a correlation of the zero-upsampled gy).
         The weight-gradient is a reduction per block: a block owns one (o, ci) pair
         and up to KT taps, its threads stride over the N*OH*OW positions and tree-sum
         in shared memory; when there are too few blocks for the GPU the positions are
         split over ``splits`` blocks too, whose partial sums are added in order
         afterwards. The bias-gradient is the same reduction over gy alone.

im2col   Per chunk of samples (at most COLUMN_ELEMENTS elements of columns):
           forward          cols = unfold(x);  y_g = w_g @ cols_g (+ b), written straight
                            into y's (N, CO, OH*OW) planes by the GEMM's panelled view
           input-gradient   cols_g = w_g^T @ gy_g (gy read in place the same way),
                            then col2im, a gather: each input element sums the column
                            entries that read it
           weight-gradient  cols = unfold(x), gy -> (CO, nb*OH*OW) columns, then
                            gw_g (=, then +=) gy_g @ cols_g^T, split-K when small
         with cols (C*KH*KW, nb*OH*OW), group g's rows [g*K, (g+1)*K), K = C/G*KH*KW,
         and the tiled GEMM of gemm.py (no transpose or sub-matrix is copied).

implicit_gemm  The same products with no column buffer: gemm.py's kernel gathers the
         columns as it stages them (kernels/cuda/conv_implicit.py, which has the details).

depthwise  Layers with one input channel per group: forward and input-gradient by a kernel
         of V consecutive outputs per thread reading global memory, the same correlations
         (kernels/cuda/conv_depthwise.py); the weight-gradient is direct's.

Epilogue: every forward launcher takes ``epilogue=(ep, relu)`` (``conv2d_epilogue`` builds
it: ep (3, CO) the rows (mean, scale, shift) of an eval-mode batch norm, or (3, 0), and a
relu flag), which the kernel that stores y applies to each output (elementwise.py's
``epilogue``, the batch-norm kernel's own expression: the fused output has the unfused
ops' bits): y = relu(batch_norm_eval(conv + b)) in one pass, as on the CPU
(functional.conv2d_bn_relu). Direct and depthwise apply it where they store their accumulators, im2col
and implicit_gemm in the GEMM's store (gemm.py), or where it adds the K slices of a split
product.

The launchers take the layer's ``shapes.ConvGeom`` and pass its fields to the kernels as
scalars; the table at the end lists the algorithms (kernels/conv_algos.py) and 'auto' is
its ``auto_algo``, or on a real GPU the timed choice of its tuner (kernels/autotune.py's
``CudaTuner``).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from ...backend import register
from ..autotune import CudaTuner
from ..conv_algos import ConvAlgo, ConvTable
from . import conv_depthwise as CD
from . import conv_implicit as CI
from .elementwise import channel, epilogue, no_epilogue
from .gemm import _sum_partials, gemm, view, workspace
from .index import column_entry, correlations, digits, digits_add, out_range, tap
from .launch import BLOCK, SIMULATOR, blocks, empty, flat, jit, launch, launch_grid
from .nn import batch_norm_epilogue

if SIMULATOR:  # every thread a Python thread: few of them
    DIRECT_THREADS, REDUCE_THREADS = 16, 16
    ROW_BLOCKS = 1               # grid.y of the unfold/fold kernels (they loop over rows)
    COLUMN_ELEMENTS = 1 << 10    # small, so the tests cross chunk boundaries
    MIN_BLOCKS, MIN_PER_THREAD = 4, 1
else:
    DIRECT_THREADS, REDUCE_THREADS = 128, 256
    ROW_BLOCKS = 65535           # the grid.y limit
    COLUMN_ELEMENTS = 1 << 25    # 128 MiB of float32 columns
    MIN_BLOCKS, MIN_PER_THREAD = 264, 32  # two waves of 132 SMs; positions per thread per split
P_T, C_T = 4, 4          # direct: positions x channels per thread
PATCH, FILTER = 4096, 1024   # direct: shared elements for the input patch and the filter slice
KT = 9                   # weight-gradient: taps per block (a 3x3 kernel in one)
MAX_GRID = 65535         # the grid.y and grid.z limit

# ----------------------------------------------------------------------------- direct


@cuda.jit(device=True, inline=True)
def _at(i):
    """Index ``i`` (>= 0) in a form the compiler can see is >= 0, so the access skips
    Python's negative-index wraparound: a compare and a select per load of an inner loop."""
    return i & 0x7FFFFFFFFFFFFFFF


@jit
def _correlate(src, w, b, dst, sh, sw, ph, pw, dh, dw, ka, kb, a0, sa, b0, sb, fh, fw, fr, fq, g, th, tw, cc,
               tiles_w, flip, has_bias, ep, relu):
    """dst[n, d, r*fh + fr, q*fw + fq] = epilogue(b[d] + sum over the group's source channels
    j and taps (a, bb) < (ka, kb) of wt[d, j, a0 + a*sa, b0 + bb*sb] * src[n, j, tap(r, sh,
    ph, a, dh), tap(q, sw, pw, bb, dw)])   (see the module docstring),
    the epilogue (ep, relu) as elementwise.py's: the forward's fused batch norm and relu, or
    none (ep (3, 0), relu 0).

    The correlation: stride (sh, sw), leading padding (ph, pw) (any sign), dilation (dh, dw),
    ka x kb taps read from w's taps a0 + a*sa, b0 + bb*sb; it fills phase (fr, fq) of dst's
    phases by (fh, fw). wt is w (flip=0) or, flip=1, w with its two channel axes swapped.
    The forward: the layer's stride, padding and dilation, the whole kernel, one phase.
    The input-gradient: stride 1, per phase of gx its taps, backwards (``phase_taps``).
    The tile: (th, tw, cc, tiles_w), see ``_tiling``. The scalars are launch arguments,
    which the compiled code reads from the constant bank as it needs them (values the
    kernel derived itself would hold registers: see the module docstring).
    """
    patch = cuda.shared.array(PATCH, src.dtype)
    filt = cuda.shared.array(FILTER, src.dtype)
    acc = cuda.local.array((C_T, P_T), src.dtype)
    val = cuda.local.array(P_T, src.dtype)
    base = cuda.local.array(P_T, np.int64)
    taps = ka * kb
    spg, dpg, cog = src.shape[1] // g, dst.shape[1] // g, w.shape[0] // g
    t = cuda.threadIdx.x & (DIRECT_THREADS - 1)  # the mask shows the compiler t >= 0 (no wraparound code)

    # This block: group gi, destination channels d0 + [0, nd), the tile at (r0, q0).
    per_group = (dpg + C_T - 1) // C_T
    gi = cuda.blockIdx.y // per_group
    dl = (cuda.blockIdx.y % per_group) * C_T
    nd = min(C_T, dpg - dl)
    d0 = gi * dpg + dl
    r0, q0 = (cuda.blockIdx.x // tiles_w) * th, (cuda.blockIdx.x % tiles_w) * tw
    prow = (tw - 1) * sw + (kb - 1) * dw + 1                   # the patch's row length
    rows = (th - 1) * sh + (ka - 1) * dh + 1
    plane = rows * prow
    ih0, iw0 = tap(r0, sh, ph, 0, dh), tap(q0, sw, pw, 0, dw)  # its origin in src
    for u in range(P_T):
        # position p of the tile; tap (a, bb) of it reads patch[base + a*dh*prow + bb*dw]
        p = t + u * DIRECT_THREADS
        pr, pc = p // tw, p % tw
        base[u] = pr * sh * prow + pc * sw if pr < th else 0

    for n in range(cuda.blockIdx.z, src.shape[0], cuda.gridDim.z):
        for c in range(C_T):
            for u in range(P_T):
                acc[c, u] = 0
                if has_bias and c < nd:
                    acc[c, u] = b[d0 + c]
        for j0 in range(0, spg if taps else 0, cc):  # no taps (a phase none reaches): zeros
            ncc = min(cc, spg - j0)
            cuda.syncthreads()  # the previous chunk's readers are done
            # element e of the patch is (channel cs, row pr, column pc): split once and carried
            # along the thread's step, no division per element (digits_add's carries written
            # out; with a three-digit step the kernel took 30 more registers)
            cs, pr, pc = gi * spg + j0 + t // plane, (t % plane) // prow, t % prow
            sr, sc = DIRECT_THREADS // prow, DIRECT_THREADS % prow
            for e in range(t, ncc * plane, DIRECT_THREADS):
                patch[e] = 0  # padding
                i, k = ih0 + pr, iw0 + pc
                if 0 <= i < src.shape[2] and 0 <= k < src.shape[3]:
                    patch[e] = src[n, cs, i, k]
                pc += sc
                pr += sr
                if pc >= prow:
                    pc -= prow
                    pr += 1
                while pr >= rows:  # once at most, unless a step spans more than a channel's rows
                    pr -= rows
                    cs += 1
            for e in range(t, C_T * ncc * taps, DIRECT_THREADS):  # filt[((j*ka + a)*kb + bb)*C_T + c]
                c, j, a, bb = e % C_T, e // (C_T * taps), (e // C_T) % taps // kb, (e // C_T) % kb
                filt[e] = 0
                if c < nd:
                    if flip:
                        filt[e] = w[gi * cog + j0 + j, dl + c, a0 + a * sa, b0 + bb * sb]
                    else:
                        filt[e] = w[d0 + c, j0 + j, a0 + a * sa, b0 + bb * sb]
            cuda.syncthreads()
            for j in range(ncc):
                for a in range(ka):
                    for bb in range(kb):
                        off = j * plane + a * dh * prow + bb * dw
                        f = ((j * ka + a) * kb + bb) * C_T
                        for u in range(P_T):
                            val[u] = patch[_at(base[u] + off)]
                        for c in range(C_T):
                            wv = filt[_at(f + c)]
                            for u in range(P_T):
                                acc[c, u] += wv * val[u]
        for u in range(P_T):
            p = t + u * DIRECT_THREADS
            r, q = (r0 + p // tw) * fh + fr, (q0 + p % tw) * fw + fq
            if p < th * tw and r < dst.shape[2] and q < dst.shape[3]:
                for c in range(C_T):
                    if c < nd:
                        dst[n, d0 + c, r, q] = epilogue(acc[c, u], channel(ep, d0 + c), relu)


@cuda.jit(device=True)
def _tree_sum(red, t, rows):
    """red[k, 0] = sum over threads of red[k, t] for k < rows, pairwise in a fixed order.
    Every thread of the block must call it (it synchronises)."""
    cuda.syncthreads()
    s = REDUCE_THREADS // 2
    while s > 0:
        if t < s:
            for k in range(rows):
                red[k, t] += red[k, t + s]
        cuda.syncthreads()
        s //= 2


@jit
def _weight_partials(x, gy, sh, sw, ph, pw, dh, dw, g, kh, kw, part, per_split):
    """part[z, (o*cig + ci)*taps + tp] = sum over positions [z*per_split, (z+1)*per_split)
    of the flattened (n, oh, ow) of gy[n, o, oh, ow] * x[n, c, tap(oh, a), tap(ow, bb)],
    tp = a*kw + bb: block (o, ci) x (KT taps from blockIdx.y*KT) x (slice blockIdx.z)."""
    red = cuda.shared.array((KT, REDUCE_THREADS), x.dtype)
    acc = cuda.local.array(KT, x.dtype)
    ta = cuda.local.array(KT, np.int64)
    tb = cuda.local.array(KT, np.int64)
    h, wd = x.shape[2], x.shape[3]
    oh, ow = gy.shape[2], gy.shape[3]
    cig, cog, m = x.shape[1] // g, gy.shape[1] // g, oh * ow
    t = cuda.threadIdx.x & (REDUCE_THREADS - 1)
    o, ci = cuda.blockIdx.x // cig, cuda.blockIdx.x % cig
    c = (o // cog) * cig + ci
    tp0 = cuda.blockIdx.y * KT
    nt = min(KT, kh * kw - tp0)
    for k in range(KT):
        acc[k] = 0
        ta[k], tb[k] = (tp0 + k) // kw, (tp0 + k) % kw
    start = cuda.blockIdx.z * per_split
    end = min(start + per_split, gy.shape[0] * m)
    # position p's (n, oh, ow), split once and carried along by the fixed step: no division per position
    p = start + t
    at, step = digits(p, oh, ow), digits(REDUCE_THREADS, oh, ow)
    while p < end:
        i, r, q = at
        gv = gy[i, o, r, q]
        for k in range(KT):
            if k < nt:
                ih, iw = tap(r, sh, ph, ta[k], dh), tap(q, sw, pw, tb[k], dw)
                if 0 <= ih < h and 0 <= iw < wd:
                    acc[k] += gv * x[i, c, ih, iw]
        p += REDUCE_THREADS
        at = digits_add(at, step, oh, ow)
    for k in range(KT):
        red[k, t] = acc[k]
    _tree_sum(red, t, KT)
    if t < nt:
        part[cuda.blockIdx.z, cuda.blockIdx.x * kh * kw + tp0 + t] = red[t, 0]


@jit
def _bias_partials(gy, part, per_split):
    """part[z, o] = sum of gy[n, o, p] (gy as (N, CO, OH*OW)) over the flattened (n, p) in
    slice z: block (o, z)."""
    red = cuda.shared.array((1, REDUCE_THREADS), gy.dtype)
    t = cuda.threadIdx.x & (REDUCE_THREADS - 1)
    o, m = cuda.blockIdx.x, gy.shape[2]
    start = cuda.blockIdx.z * per_split
    end = min(start + per_split, gy.shape[0] * m)
    p = start + t
    at, step = digits(p, 1, m), digits(REDUCE_THREADS, 1, m)  # (n, 0, pixel), carried as above
    red[0, t] = 0
    while p < end:
        red[0, t] += gy[at[0], o, at[2]]
        p += REDUCE_THREADS
        at = digits_add(at, step, 1, m)
    _tree_sum(red, t, 1)
    if t == 0:
        part[cuda.blockIdx.z, o] = red[0, 0]


# ----------------------------------------------------------------------------- im2col


@jit
def _im2col(x, n0, cols, win):
    """cols[row, i*oh*ow + p] = column_entry(x, win, row, (n0 + i)*oh*ow + p) for every row:
    samples n0 + i of x unfolded through the window ``win`` (kernels/cuda/index.py). Grid:
    (pixels, rows, samples i)."""
    p, i, m = cuda.grid(1), cuda.blockIdx.z, win[11] * win[12]
    if p < m:
        for row in range(cuda.blockIdx.y, cols.shape[0], cuda.gridDim.y):
            cols[row, i * m + p] = column_entry(x, win, row, (n0 + i) * m + p)


@jit
def _col2im(cols, gx, n0, sh, sw, ph, pw, dh, dw, kh, kw, oh, ow):
    """gx[n0 + i, c] = the adjoint of _im2col, as a gather: each input element sums the
    column entries that read it. Grid: (pixels, channels, samples i)."""
    h, wd = gx.shape[2], gx.shape[3]
    p, i, m = cuda.grid(1), cuda.blockIdx.z, oh * ow
    if p < h * wd:
        ih, iw = p // wd, p % wd
        for c in range(cuda.blockIdx.y, gx.shape[1], cuda.gridDim.y):
            s = gx.dtype.type(0)
            for a in range(kh):
                # the output row that reads ih through tap a: the (at most one) output whose
                # tap a lands in the one-row window [ih, ih + 1)
                r0, r1 = out_range(a, sh, ph + ih, dh, 1, oh)
                if r0 < r1:
                    for bb in range(kw):
                        q0, q1 = out_range(bb, sw, pw + iw, dw, 1, ow)
                        if q0 < q1:
                            s += cols[(c * kh + a) * kw + bb, i * m + r0 * ow + q0]
            gx[n0 + i, c, ih, iw] = s


@jit
def _planes_to_columns(y, n0, out):
    """out[o, i*m + p] = y[n0 + i, o, p]: planes of y (N, C, m) as one (C, nb*m) matrix.
    Grid: (pixels, channels, samples i)."""
    p, i, m = cuda.grid(1), cuda.blockIdx.z, y.shape[2]
    if p < m:
        for o in range(cuda.blockIdx.y, y.shape[1], cuda.gridDim.y):
            out[o, i * m + p] = y[n0 + i, o, p]


@jit
def _add_channel_bias(y, b, m):
    """y[n, c, p] += b[c], y flat."""
    e = cuda.grid(1)
    if e < y.size:
        y[e] += b[(e // m) % b.size]


# ----------------------------------------------------------------------------- launchers


def _tiling(hd, wd, kh, kw, sh, sw, dh, dw, spg):
    """Direct correlation tile (th, tw, cc, tiles_w) over an hd x wd plane: up to
    P_T*DIRECT_THREADS positions, rows of at most 64, halved until the input patch fits
    PATCH; None when even a single output's receptive field (or the filter slice) does
    not fit."""
    if C_T * kh * kw > FILTER:
        return None
    tw = min(wd, 64)
    th = min(hd, max(1, P_T * DIRECT_THREADS // tw))

    def plane(th, tw):
        return ((th - 1) * sh + (kh - 1) * dh + 1) * ((tw - 1) * sw + (kw - 1) * dw + 1)

    while plane(th, tw) > PATCH and th * tw > 1:
        if th > 1:
            th = (th + 1) // 2
        else:
            tw = (tw + 1) // 2
    if plane(th, tw) > PATCH:
        return None
    cc = min(spg, PATCH // plane(th, tw), FILTER // (C_T * kh * kw))
    return th, tw, cc, blocks(wd, tw)


@functools.lru_cache(maxsize=4096)  # every call of a layer asks again: host time per launch counts
def _correlation(geom, pass_):
    """The direct correlations of a forward or input-gradient pass (``correlations``): (them,
    the tiling, channel blocks), or None when a receptive field does not fit the shared
    patch, or there are more channel blocks than a grid's y dimension holds. The forward
    correlates x (c channels) into y; the input-gradient correlates gy (co channels) into
    each phase of gx, one tiling for all: the largest phase plane and sub-kernel."""
    plan = correlations(geom, pass_)
    (sh, sw, _, _, dh, dw, *_), _ = plan[0]
    hd, wd = max(p[1][0] for p in plan), max(p[1][1] for p in plan)
    kh, kw = max(p[0][6] for p in plan), max(p[0][7] for p in plan)
    spg, dpg = (geom.cig, geom.cog) if pass_ == "forward" else (geom.cog, geom.cig)
    tiling = _tiling(hd, wd, kh, kw, sh, sw, dh, dw, spg)
    channel_blocks = geom.g * blocks(dpg, C_T)
    return None if tiling is None or channel_blocks > MAX_GRID else (plan, tiling, channel_blocks)


def _direct_supports(geom, pass_):
    return pass_ == "backward_weight" or _correlation(geom, pass_) is not None


def _correlate_launch(src, w, b, dst, geom, pass_, epilogue=None):
    """Run _correlate for the forward (x correlated with w at the layer's stride and padding)
    or the input-gradient (gy correlated with the flipped kernel at stride 1, one launch per
    phase of gx with that phase's taps: one launch at stride 1), with the forward's
    ``epilogue`` = (ep, relu) or none."""
    plan, (th, tw, cc, _), channel_blocks = _correlation(geom, pass_)
    ep, relu = no_epilogue(dst.dtype) if epilogue is None else epilogue
    bias = flat(w) if b is None else b
    for scalars, (uh, uw) in plan:
        grid = (blocks(uh, th) * blocks(uw, tw), channel_blocks, min(src.shape[0], MAX_GRID))
        launch_grid(_correlate, grid, DIRECT_THREADS, src, w, bias, dst, *scalars, geom.g, th, tw, cc, blocks(uw, tw),
                    int(pass_ != "forward"), int(b is not None), ep, int(relu))


def _forward_direct(x, w, b, y, geom, epilogue=None):
    _correlate_launch(x, w, b, y, geom, "forward", epilogue)


def _backward_input_direct(gy, w, gx, geom):
    _correlate_launch(gy, w, None, gx, geom, "backward_input")


def _backward_weight_direct(x, gy, gw, geom):
    _reduce(_weight_partials, gw, (geom.co * geom.cig, blocks(geom.kh * geom.kw, KT)), geom.n * geom.oh * geom.ow,
            x, gy, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g, geom.kh, geom.kw)


def _reduce_splits(nblocks, total):
    """Slices of the positions per output, so a reduction has about MIN_BLOCKS blocks:
    (splits, per_split)."""
    want = blocks(MIN_BLOCKS, nblocks) if nblocks < MIN_BLOCKS else 1
    splits = max(1, min(want, total // (REDUCE_THREADS * MIN_PER_THREAD), MAX_GRID))
    per = max(1, blocks(total, splits))
    return blocks(total, per) if total else 1, per


def _reduce(kernel, out, grid_xy, total, *args):
    """Run a partial-sum kernel with grid (grid_xy, splits) writing ``out`` (flat): straight
    into ``out`` when one slice suffices, else into partial rows added in slice order."""
    splits, per = _reduce_splits(grid_xy[0] * grid_xy[1], total)
    size = out.size
    part = out.reshape(1, size) if splits == 1 else workspace("conv-partials", splits * size, out.dtype).reshape(
        splits, size)
    launch_grid(kernel, (*grid_xy, splits), REDUCE_THREADS, *args, part, per)
    if splits > 1:
        launch(_sum_partials, size, part, flat(out), 0, 0)


def _chunks(n, rows, m, dtype, bound=0):
    """The im2col passes over a batch: (n0, nc, cols) for samples [n0, n0 + nc) with their
    column buffer cols (rows, nc*m); a pass holds at most COLUMN_ELEMENTS elements of
    max(rows, bound) rows (at least one sample)."""
    nb = max(1, min(n, MAX_GRID, COLUMN_ELEMENTS // max(1, rows * m, bound * m)))
    buf = workspace("conv-columns", rows * nb * m, dtype)
    for n0 in range(0, n, nb):
        nc = min(nb, n - n0)
        yield n0, nc, buf[:rows * nc * m].reshape(rows, nc * m)


def _fold_grid(m, rows, nc):
    """Grid of the unfold/fold kernels: (pixels, rows looped over, samples)."""
    return blocks(m, BLOCK), min(rows, ROW_BLOCKS), nc


def _window(geom):
    """The unfold/fold kernels' window scalars: stride, leading padding, dilation, kernel."""
    return geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.kh, geom.kw


def _forward_im2col(x, w, b, y, geom, epilogue=None):
    n, c, co, cog, m = geom.n, geom.c, geom.co, geom.cog, geom.oh * geom.ow
    k = geom.cig * geom.kh * geom.kw
    for n0, nc, cols in _chunks(n, c * geom.kh * geom.kw, m, x.dtype):
        launch_grid(_im2col, _fold_grid(m, c * geom.kh * geom.kw, nc), BLOCK, x, n0, cols, CI.window(geom, "forward"))
        # y[n0:n0+nc, group g] = epilogue(w_g @ cols_g (+ b)), through y's planes, every g in one launch
        gemm(cog, nc * m, k, flat(w), view(k), flat(cols), view(nc * m),
             flat(y), view(m, off=n0 * co * m, panel=m, panel_stride=co * m),
             bias=b, vbias=(0, 1, 0), groups=geom.g, gs=(cog * k, k * nc * m, cog * m, cog), epilogue=epilogue)


def _backward_input_im2col(gy, w, gx, geom):
    n, c, co, cog, m = geom.n, geom.c, geom.co, geom.cog, geom.oh * geom.ow
    k = geom.cig * geom.kh * geom.kw
    for n0, nc, cols in _chunks(n, c * geom.kh * geom.kw, m, gy.dtype):
        # cols_g = w_g^T @ gy[n0:n0+nc, group g], every g in one launch
        gemm(k, nc * m, cog, flat(w), view(k, trans=True),
             flat(gy), view(m, off=n0 * co * m, panel=m, panel_stride=co * m),
             flat(cols), view(nc * m), groups=geom.g, gs=(cog * k, cog * m, k * nc * m, 0))
        launch_grid(_col2im, _fold_grid(geom.h * geom.w, c, nc), BLOCK, cols, gx, n0, *_window(geom),
                    geom.oh, geom.ow)


def _backward_weight_im2col(x, gy, gw, geom):
    n, c, co, cog, m = geom.n, geom.c, geom.co, geom.cog, geom.oh * geom.ow
    k = geom.cig * geom.kh * geom.kw
    for n0, nc, cols in _chunks(n, c * geom.kh * geom.kw, m, x.dtype, bound=co):
        gyc = workspace("conv-gy-columns", co * nc * m, x.dtype).reshape(co, nc * m)
        launch_grid(_im2col, _fold_grid(m, c * geom.kh * geom.kw, nc), BLOCK, x, n0, cols, CI.window(geom, "forward"))
        launch_grid(_planes_to_columns, _fold_grid(m, co, nc), BLOCK, gy.reshape(n, co, m), n0, gyc)
        # gw_g (=, then +=) gy_g @ cols_g^T, every g in one launch
        gemm(cog, k, nc * m, flat(gyc), view(nc * m), flat(cols), view(nc * m, trans=True),
             flat(gw), view(k), accumulate=n0 > 0, groups=geom.g, gs=(cog * nc * m, k * nc * m, cog * k, 0))


def auto_algo(geom, pass_):
    """'auto': direct when a group has at most 32 output channels (the GEMM's tiles are 128
    rows: a smaller M wastes most of each) or each output reads fewer than 16 inputs
    (depthwise); im2col otherwise. The same rule for the three passes of a layer (where
    direct's shared patch cannot hold a receptive field, the table falls back to im2col).

    implicit_gemm is not in the rule yet: it runs im2col's products without the column
    buffer, so it should win where im2col runs now, but every staged element costs it the
    tap and bounds arithmetic that im2col's unfold pays once per column entry (then the
    GEMM streams the columns), and no GPU has timed the two. On a
    real GPU 'auto' is the tuner's choice anyway (``CudaTuner``: every algorithm timed per
    shape, dtype and pass); this rule is what runs without it (``CNN_NUMBA_AUTOTUNE=0``),
    and bench/gpu_sweep.py's record decides whether it should name implicit_gemm, and
    depthwise for depthwise layers (which the tuner times against direct and im2col)."""
    return "direct" if geom.cog <= 32 or geom.cig * geom.kh * geom.kw < 16 else "im2col"


# Direct first: where its correlation does not fit, a named 'direct' falls back to im2col.
TABLE = ConvTable([
    ConvAlgo("direct", _forward_direct, _backward_input_direct, _backward_weight_direct, supports=_direct_supports),
    ConvAlgo("im2col", _forward_im2col, _backward_input_im2col, _backward_weight_im2col),
    ConvAlgo("implicit_gemm", CI.forward, CI.backward_input, CI.backward_weight, supports=CI.supports),
    ConvAlgo("depthwise", CD.forward, CD.backward_input, None, supports=CD.supports),
], auto_algo, tuner=CudaTuner())

register("conv2d_algorithms", "cuda")(lambda: TABLE)


@register("conv2d_forward", "cuda")
def forward(x, w, b, geom, algo, epilogue=None):
    """y (N, CO, OH, OW) = conv2d(x, w) + b (b may be None); with ``epilogue=(ep, relu)``
    (``conv2d_epilogue``), relu((y - ep[0]) * ep[1] + ep[2]) per channel as it is stored."""
    return TABLE.run(algo, "forward", geom, x, w, b, empty(geom.y_shape, x.dtype), epilogue=epilogue)


@register("conv2d_epilogue", "cuda")
def conv2d_epilogue(dtype, bn=None, relu=False):
    """``forward``'s ``epilogue=(ep, relu)``: ep (3, CO) on the device, the rows (mean, scale,
    shift) of eval-mode batch_norm from ``bn = (running_mean, running_var, weight, bias, eps)``
    (device arrays, weight and bias may be None), the values the batch-norm forward computes
    (nn.py's batch_norm_epilogue); (3, 0) without ``bn``."""
    if bn is None:
        return no_epilogue(dtype)[0], bool(relu)
    return batch_norm_epilogue(*bn, dtype), bool(relu)


@register("conv2d_backward_input", "cuda")
def backward_input(gy, w, geom, algo):
    """gx (N, C, H, W) from gy (N, CO, OH, OW); also conv_transpose2d's forward."""
    return TABLE.run(algo, "backward_input", geom, gy, w, empty(geom.x_shape, gy.dtype))


@register("conv2d_backward_weight", "cuda")
def backward_weight(x, gy, geom, algo):
    """gw (CO, C/G, KH, KW); also conv_transpose2d's weight-gradient with x and gy swapped.
    An empty batch goes to the direct reduction, which writes its zeros."""
    TABLE.check(algo)
    gw = empty(geom.w_shape, x.dtype)
    if not geom.n:
        TABLE.by_name["direct"].run("backward_weight", geom, x, gy, gw)
        return gw
    return TABLE.run(algo, "backward_weight", geom, x, gy, gw)


@register("conv2d_backward_bias", "cuda")
def backward_bias(gy):
    n, co = gy.shape[:2]
    gb = empty((co,), gy.dtype)
    m = int(np.prod(gy.shape[2:]))
    _reduce(_bias_partials, gb, (co, 1), n * m, gy.reshape(n, co, m))
    return gb


@register("add_channel_bias", "cuda")
def add_channel_bias(y, b):
    """y += b per channel, in place; returns y."""
    launch(_add_channel_bias, y.size, flat(y), b, int(np.prod(y.shape[2:])))
    return y
