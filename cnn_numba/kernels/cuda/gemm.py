"""Shared-memory tiled matrix product with register blocking, and the linear ops on it.

    C (M, N)  (=, or += with ``accumulate``)  A (M, K) @ B (K, N)  (+ bias)

Operands are flat device arrays read through a *view*, the tuple

    (off, ld, trans, panel, panel_stride)

of a stored matrix S, S[o, q] at off + o*ld + (q // panel)*panel_stride + q % panel,
the operand being S (trans = 0) or S^T (trans = 1); so callers never materialise a
transpose or a sub-matrix. Panels cut S's inner index into runs of ``panel`` lying
``panel_stride`` apart; with NO_PANEL they vanish (an ordinary row-major matrix). The
convolutions use them to read or write the (N, C, OH*OW) planes of a group of channels
as one (C, N*OH*OW) matrix. They are honoured where the inner index is not K: B's and
C's columns, a transposed A's rows (the launcher asserts it); C is never transposed.

Tiling. A block of THREADS = (BM/TM)*(BN/TN) threads computes a BM x BN tile of C.
It walks K in steps of BK: the A and B tiles are staged in shared memory (A stored
k-major, ``As[k, i]``, so both are read along rows), double-buffered so one barrier per
step suffices, and the next step's global loads are issued into registers before the
current step's arithmetic. Thread (tx, ty) owns the TM x TN outputs at rows
``ty + ii*(BM/TM)`` and columns ``tx + jj*(BN/TN)``: a warp then reads two distinct A
values (broadcasts) and 16 consecutive B values per shared load, bank-conflict free,
and writes C in 16-wide coalesced runs. For each k a thread does TM*TN FMAs for
TM + TN shared loads. The shared rows are padded by PAD so the k-minor global loads
of a non-transposed A (or a transposed B) store without bank conflicts.

Split-K. When M and N give too few tiles to fill the GPU (a weight-gradient: small
output, long reduction) the K range is cut into ``splits`` slices, grid.z; slice z
writes its own partial C and ``_sum_partials`` adds them in slice order afterwards, so
the result is deterministic (no atomics).

Under the simulator (every thread a Python thread) the tile is 16x16 with 4x4 per
thread; kernel code is identical.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ...backend import register
from .launch import SIMULATOR, blocks, empty, flat, jit, launch, launch_grid

if SIMULATOR:
    BM, BN, BK, TM, TN = 16, 16, 8, 4, 4
    MIN_TILES = 4      # fewer output tiles than this: split K
    MIN_SPLIT_K = BK   # ... into slices of at least this many
else:
    BM, BN, BK, TM, TN = 128, 128, 8, 8, 8
    MIN_TILES = 264    # two waves of an H100's 132 SMs
    MIN_SPLIT_K = 256
PAD = 4
A_ROW, B_ROW = BM + PAD, BN + PAD  # shared row lengths (a shared shape must be plain constants)
THREADS = (BM // TM) * (BN // TN)
TX = BN // TN                   # threads along a tile row
LOAD_A = BM * BK // THREADS     # elements of each tile one thread stages per step
LOAD_B = BK * BN // THREADS
assert THREADS % BN == 0 and THREADS % BM == 0 and THREADS % BK == 0

# ----------------------------------------------------------------------------- kernels


@cuda.jit(device=True, inline=True)
def _tile_coords(e, k_minor, width):
    """(p, x) of element ``e`` of a BK x width tile in staging order: ``k_minor`` when the
    operand is stored with K innermost (row-major A, transposed B), else x-minor; either
    way consecutive threads load consecutive addresses."""
    if k_minor:
        return e % BK, e // BK
    return e // width, e % width


@cuda.jit(device=True, inline=True)
def _fetch(arr, v, k_minor, width, count, t, x0, k0, xn, kn, inner, regs):
    """Thread t's ``count`` elements of the operand tile at (x0, k0) into ``regs``, 0
    outside (xn, kn). ``inner`` is the offset of its x column when x is the inner index
    (then fixed for the whole K walk, see _gemm)."""
    for u in range(count):
        p, x = _tile_coords(t + u * THREADS, k_minor, width)
        regs[u] = 0
        if x0 + x < xn and k0 + p < kn:
            if k_minor:
                regs[u] = arr[v[0] + (x0 + x) * v[1] + k0 + p]
            else:
                regs[u] = arr[v[0] + (k0 + p) * v[1] + inner]


@cuda.jit(device=True, inline=True)
def _stage(regs, tile, k_minor, width, count, t):
    """Registers -> the shared tile ``tile[p, x]`` (the inverse of _fetch's order)."""
    for u in range(count):
        p, x = _tile_coords(t + u * THREADS, k_minor, width)
        tile[p, x] = regs[u]


@cuda.jit(device=True, inline=True)
def _inner(v, q):
    """Offset of inner index ``q`` of a view: its panel, then its place in the panel."""
    return (q // v[3]) * v[4] + q % v[3]


@jit
def _gemm(a, va, b, vb, c, vc, c_split, bias, vbias, m, n, k, k_per_split, accumulate):
    """One BM x BN tile of C over the K slice ``blockIdx.z`` (see the module docstring).

    vbias = (has_bias, off, row_step, col_step): C[i, j] gets bias[off + i*row_step + j*col_step].
    Slice z writes C's view shifted by z*c_split.
    """
    As = cuda.shared.array((2, BK, A_ROW), a.dtype)  # As[buffer, p, i] = A[i0 + i, k0 + p]
    Bs = cuda.shared.array((2, BK, B_ROW), a.dtype)  # Bs[buffer, p, j] = B[k0 + p, j0 + j]
    acc = cuda.local.array((TM, TN), a.dtype)
    ra = cuda.local.array(LOAD_A, a.dtype)
    rb = cuda.local.array(LOAD_B, a.dtype)
    ar = cuda.local.array(TM, a.dtype)
    br = cuda.local.array(TN, a.dtype)
    # The mask is a no-op that shows the compiler t >= 0, so it drops Python's
    # negative-index wraparound from every shared-memory access below.
    t = cuda.threadIdx.x & (THREADS - 1)
    tx, ty = t % TX, t // TX
    i0, j0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
    kb = cuda.blockIdx.z * k_per_split
    ke = min(k, kb + k_per_split)
    a_kmin, b_kmin = not va[2], vb[2]
    # An x-minor load touches one x per thread (THREADS is a multiple of BM and BN), so
    # its offset (through the panels, for B) is computed once, not per step.
    inner_a = 0 if a_kmin else _inner(va, i0 + t % BM)
    inner_b = 0 if b_kmin else _inner(vb, j0 + t % BN)

    for ii in range(TM):
        for jj in range(TN):
            acc[ii, jj] = 0
    steps = (ke - kb + BK - 1) // BK
    for s in range(steps + 1):
        cur = s % 2
        if s < steps:  # issue the global loads of step s; they land while step s-1 computes
            k0 = kb + s * BK
            _fetch(a, va, a_kmin, BM, LOAD_A, t, i0, k0, m, ke, inner_a, ra)
            _fetch(b, vb, b_kmin, BN, LOAD_B, t, j0, k0, n, ke, inner_b, rb)
        if s > 0:  # step s-1, staged in the other buffer
            prev = 1 - cur
            for p in range(BK):
                for ii in range(TM):
                    ar[ii] = As[prev, p, ty + ii * (BM // TM)]
                for jj in range(TN):
                    br[jj] = Bs[prev, p, tx + jj * (BN // TN)]
                for ii in range(TM):
                    for jj in range(TN):
                        acc[ii, jj] += ar[ii] * br[jj]
        if s < steps:  # into the buffer of step s-2, whose readers (iteration s-1) all passed the barrier
            _stage(ra, As[cur], a_kmin, BM, LOAD_A, t)
            _stage(rb, Bs[cur], b_kmin, BN, LOAD_B, t)
        cuda.syncthreads()

    coff = vc[0] + cuda.blockIdx.z * c_split
    for jj in range(TN):
        j = j0 + tx + jj * (BN // TN)
        if j < n:
            col = coff + _inner(vc, j)
            for ii in range(TM):
                i = i0 + ty + ii * (BM // TM)
                if i < m:
                    v = acc[ii, jj]
                    if vbias[0]:
                        v += bias[vbias[1] + i * vbias[2] + j * vbias[3]]
                    if accumulate:
                        v += c[col + i * vc[1]]
                    c[col + i * vc[1]] = v


@jit
def _sum_partials(part, out, off, accumulate):
    """out[off + j] (= or +=) sum_z part[z, j], summed in z order (deterministic)."""
    j = cuda.grid(1)
    if j < part.shape[1]:
        s = part[0, j]
        for z in range(1, part.shape[0]):
            s += part[z, j]
        if accumulate:
            s += out[off + j]
        out[off + j] = s


# ----------------------------------------------------------------------------- launchers

NO_PANEL = 1 << 62


def view(ld, off=0, trans=False, panel=NO_PANEL, panel_stride=0):
    """An operand (see the module docstring): the matrix S stored at ``off`` with rows
    ``ld`` apart and its inner index cut into panels, or S^T with ``trans``."""
    return (int(off), int(ld), int(trans), int(panel), int(panel_stride))


_workspaces: dict = {}


def workspace(name, size, dtype):
    """A flat device scratch buffer of at least ``size`` elements, kept between calls (no
    allocation per launch). Safe to reuse: every launch is ordered on the default stream.
    Each caller names its own so two live buffers never alias."""
    key = (name, np.dtype(dtype))
    buf = _workspaces.get(key)
    if buf is None or buf.size < size:
        buf = _workspaces[key] = empty((max(int(size), 1),), dtype)
    return buf[:size]


def _splits(m, n, k):
    """How many K slices: enough tiles for the GPU, slices of at least MIN_SPLIT_K."""
    tiles = blocks(m, BM) * blocks(n, BN)
    if tiles == 0 or tiles >= MIN_TILES:
        return 1
    return max(1, min(blocks(MIN_TILES, tiles), k // MIN_SPLIT_K))


def gemm(m, n, k, a, va, b, vb, c, vc, accumulate=False, bias=None, vbias=(0, 0, 0)):
    """C (=, or += with ``accumulate``) op(A) @ op(B) (+ bias), M x N x K, on flat device
    arrays read through views (``view``). ``bias`` adds bias[off + i*row_step + j*col_step]
    with ``vbias`` = (off, row_step, col_step)."""
    assert va[3] == NO_PANEL or va[2], "a row-major A's inner index is K: no panels"
    assert vb[3] == NO_PANEL or not vb[2], "a transposed B's inner index is K: no panels"
    assert not vc[2], "C is written row-major"
    splits = _splits(m, n, k)
    if splits > 1 and bias is None and vc[1] == n and vc[3] >= n:
        # K slices into a partial buffer (splits, m, n), then their sum into C, in order
        per = blocks(blocks(k, splits), BK) * BK
        splits = blocks(k, per)
        part = workspace("gemm-split", splits * m * n, c.dtype).reshape(splits, m * n)
        _launch_gemm(m, n, k, per, splits, a, va, b, vb, flat(part), view(n), m * n, False, None, vbias)
        launch(_sum_partials, m * n, part, c, vc[0], int(accumulate))
    else:
        _launch_gemm(m, n, k, max(k, 1), 1, a, va, b, vb, c, vc, 0, accumulate, bias, vbias)


def _launch_gemm(m, n, k, per, splits, a, va, b, vb, c, vc, c_split, accumulate, bias, vbias):
    has_bias = (int(bias is not None),) + tuple(int(v) for v in vbias)
    launch_grid(_gemm, (blocks(n, BN), blocks(m, BM), splits), THREADS,
                a, va, b, vb, c, vc, c_split, c if bias is None else bias, has_bias, m, n, k, per, int(accumulate))


def matmul(a, b, out, trans_a=False, trans_b=False, accumulate=False):
    """out (M, N) (=, or +=) op(a) @ op(b) for 2-D C-contiguous device arrays, where op
    transposes with the flag: a (M, K) or (K, M), b (K, N) or (N, K)."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    gemm(m, n, k, flat(a), view(a.shape[1], trans=trans_a), flat(b), view(b.shape[1], trans=trans_b),
         flat(out), view(n), accumulate)
    return out


# ----------------------------------------------------------------------------- linear

def _rows(a):
    """a (*, F) as (rows, F): the leading dimensions flattened."""
    *lead, f = a.shape  # (the simulator's shapes take no negative index)
    return a.reshape(int(np.prod(lead)), f)


@register("linear_forward", "cuda")
def linear_forward(x, w, b):
    """y (*, OUT) = x @ w.T + b."""
    out_f, in_f = w.shape
    y = empty(tuple(x.shape)[:-1] + (out_f,), x.dtype)
    gemm(_rows(y).shape[0], out_f, in_f, flat(x), view(in_f), flat(w), view(in_f, trans=True), flat(y), view(out_f),
         bias=b, vbias=(0, 0, 1))
    return y


@register("linear_backward_input", "cuda")
def linear_backward_input(gy, w):
    """gx (*, IN) = gy @ w."""
    gx = empty(tuple(gy.shape)[:-1] + (w.shape[1],), gy.dtype)
    matmul(_rows(gy), w, _rows(gx))
    return gx


@register("linear_backward_weight", "cuda")
def linear_backward_weight(gy, x):
    """gw (OUT, IN) = sum over rows of gy^T x."""
    gy2, x2 = _rows(gy), _rows(x)
    gw = empty((gy2.shape[1], x2.shape[1]), gy.dtype)
    return matmul(gy2, x2, gw, trans_a=True)
