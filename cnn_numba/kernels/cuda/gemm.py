"""Shared-memory tiled matrix product with register blocking, and the linear ops on it.

    C (M, N)  (=, or += with ``accumulate``)  A (M, K) @ B (K, N)  (+ bias)

and, as each value is stored, the conv epilogue (eval-mode batch norm, then relu:
elementwise.py's ``epilogue``, the batch-norm kernel's own expression), so a convolution
followed by its batch norm and relu writes its output once.

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

Groups. One launch can run G products of the same shape whose operands lie a fixed
stride apart (a grouped convolution's): grid.y runs over each group's M tiles in turn.

Split-K. When M and N give too few tiles to fill the GPU (a weight-gradient: small
output, long reduction) the K range is cut into ``splits`` slices, grid.z; slice z
writes its own partial C and ``_sum_partials`` adds them in slice order afterwards, so
the result is deterministic (no atomics). A product with a bias never splits; one with an
epilogue splits as the same product without it would, the epilogue then applied to the
sums (``_sum_partials_epilogue``): a conv fused with its batch norm sums its products in
the order of the plain conv, whose bits the unfused batch norm starts from.

Tile shapes. The kernels are built per ``Tile`` (BM, BN, BK, TM, TN) by ``kernel(kind,
tile)``, a factory whose closures see the tile's sizes as compile-time constants (shared
and local array shapes must be): one kernel body for every tile and for the three kinds of
product below, cached per (kind, tile) in this process and on disk like every kernel (the
closure's constants are part of Numba's cache key). ``DEFAULT`` is what runs; ``CANDIDATES``
are the tiles bench/gpu_sweep.py times on a GPU, one of which may replace DEFAULT when the
sweep has said so. Each kernel is also a module attribute, ``_<kind>_<tile name>``
(``_gemm_128x128x8_8x8``), so tests/cuda_typecheck.py finds it by name.

Vectors (issue 12's "float4 loads where aligned"). A tile with ``vec`` (name ``..._v4``)
stages the operands that are views (``vec_operands``: both of gemm's, the conv kinds'
weight; not conv_weight's A, whose K is panelled, nor a gathered B) in runs: thread t's
elements are RUN = 4 consecutive ones of the staging order, RUN*(t + u*THREADS) + w, which
lie at consecutive addresses along the stored matrix's inner index (K for a row-major A
or a transposed B, x otherwise). A run inside the matrix, within one panel and starting
16-byte aligned is fetched by one 128-bit load (kernels/cuda/vector.py's ``load4``,
``ld.global.nc.v4.f32``, two ``.v2.f64`` in float64); the alignment is checked per run on
the element's address, so the array's base, the view's offset, ld and panel stride all
count and a misaligned view takes the scalar path only where it is misaligned. Other runs
go element by element: the same values in the same products in the same order, so a vec
tile's C is its scalar twin's bit for bit. A run along x is stored to shared memory by one
128-bit store (the vec tiles' shared arrays are 16-byte aligned, rows a multiple of 16
bytes), one along K down a column of the k-major tile: in float32 both as bank-conflict
free as the scalar order for every vec candidate (BK = 16 along K 2-way, as before).
PTX for sm_90 (bench/ptx_check.py): each vec kernel has its vector loads (one per run a
thread stages), ``_gemm_128x128x8_8x8_v4`` 116 registers against the scalar tile's 124,
no spills, no .f64 in float32; static 64-bit divisions go from 7 to 25, in the set-up
(the columns left in a panel) and the element-wise fallback's per-column panel split, off
the vector path. Whether vec is faster awaits bench/gpu_sweep.py on a GPU: CANDIDATES
hold vec twins, DEFAULT stays scalar until then.

Kinds. ``gemm``: both operands through views. ``conv``: B is no stored matrix but the
im2col matrix of an image, each element gathered as it is staged (``column_entry``,
kernels/cuda/index.py; vb is then its window, b the 4-D image): the implicit-GEMM
convolution of kernels/cuda/conv_implicit.py. ``conv_weight``: B is the transpose of that
matrix (K runs over the pixels) and A may cut K into panels (A is then gy's planes): the
convolution's weight-gradient. A thread stages B's elements along one column (or, for
conv_weight, one pixel) at rows a fixed step apart, so it splits its column and first row
once and carries the splits along (``digits_add``): no division per element.

Under the simulator (every thread a Python thread) the default tile is 16x16 with 4x4 per
thread (and a vec twin among the candidates); kernel code is identical, vector.py's
helpers plain Python there.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numba import cuda

from ...backend import register
from .elementwise import channel, epilogue, no_epilogue
from .index import column_origin, column_row, column_value, digits_add
from .launch import SIMULATOR, blocks, empty, flat, jit, launch, launch_grid
from .vector import RUN, SHARED_ALIGN, aligned, load4, store4

PAD = 4  # shared rows are BM + PAD (BN + PAD) long
SHARED_LIMIT = 48 << 10  # bytes of static shared memory a kernel may declare


@dataclass(frozen=True)
class Tile:
    """A block tile: BM x BN outputs per block, K in steps of BK, TM x TN per thread;
    ``vec``: operands that are views staged in runs of RUN by 128-bit loads (see Vectors)."""
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int
    vec: bool = False

    def __post_init__(self):
        # every thread stages whole columns of both tiles (see _gemm's x-minor offsets)
        assert self.threads % self.bn == 0 and self.threads % self.bm == 0 and self.threads % self.bk == 0, self
        assert not self.vec or self.whole_runs, self

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    @property
    def whole_runs(self) -> bool:
        """Whether it can be vectorised: RUN divides the tile's sides and each thread's share of
        both tiles."""
        return all(v % RUN == 0 for v in (self.bm, self.bn, self.bk, self.bm * self.bk // self.threads,
                                          self.bk * self.bn // self.threads))

    def fits(self, dtype) -> bool:
        """Whether the two double-buffered tiles of ``dtype`` fit SHARED_LIMIT (128x128x16
        holds 33 KiB of float32, 66 KiB of float64: ptxas refuses that one)."""
        return 2 * self.bk * (self.bm + self.bn + 2 * PAD) * np.dtype(dtype).itemsize <= SHARED_LIMIT

    @property
    def name(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}_{self.tm}x{self.tn}" + ("_v4" if self.vec else "")

    @classmethod
    def parse(cls, name: str) -> Tile:
        """The tile ``name`` spells (``128x128x8_8x8``, ``128x128x8_8x8_v4``)."""
        block, thread, *vec = name.split("_")
        assert vec in ([], ["v4"]), name
        return cls(*map(int, block.split("x")), *map(int, thread.split("x")), vec=bool(vec))


if SIMULATOR:
    DEFAULT = Tile(16, 16, 8, 4, 4)
    CANDIDATES = (DEFAULT, Tile(8, 16, 8, 2, 4), Tile(8, 32, 8, 2, 4), replace(DEFAULT, vec=True))
    MIN_TILES = 4      # fewer output tiles than this: split K
    MIN_SPLIT_K = 8    # ... into slices of at least this many
else:
    DEFAULT = Tile(128, 128, 8, 8, 8)
    # bench/gpu_sweep.py times each of these; smaller M tiles are for the convolutions
    # whose groups have 16-64 output channels (the GEMM's M).
    CANDIDATES = (DEFAULT, Tile(128, 128, 16, 8, 8), Tile(128, 64, 8, 8, 8), Tile(64, 128, 8, 8, 8),
                  Tile(64, 64, 8, 4, 4), Tile(64, 64, 8, 8, 4), Tile(32, 128, 8, 4, 8), Tile(16, 128, 8, 2, 8))
    # ... and the vectorised twins of those that can be (not timed yet)
    CANDIDATES += tuple(replace(t, vec=True) for t in CANDIDATES if t.whole_runs)
    MIN_TILES = 264    # two waves of an H100's 132 SMs
    MIN_SPLIT_K = 256

# ----------------------------------------------------------------------------- kernels


@cuda.jit(device=True, inline=True)
def _tile_coords(e, k_minor, width, bk):
    """(p, x) of element ``e`` of a bk x width tile in staging order: ``k_minor`` when the
    operand is stored with K innermost (row-major A, transposed B), else x-minor; either
    way consecutive threads load consecutive addresses."""
    if k_minor:
        return e % bk, e // bk
    return e // width, e % width


@cuda.jit(device=True, inline=True)
def _inner(v, q):
    """Offset of inner index ``q`` of a view: its panel, then its place in the panel."""
    return (q // v[3]) * v[4] + q % v[3]


@cuda.jit(device=True, inline=True)
def _fetch(arr, v, k_minor, k_panel, width, count, t, threads, bk, x0, k0, xn, kn, inner, regs):
    """Thread t's ``count`` elements of the operand tile at (x0, k0) into ``regs``, 0
    outside (xn, kn). ``inner`` is the offset of its x column when x is the inner index
    (then fixed for the whole K walk, see the kernel); ``k_panel`` when K is the inner
    index and cut into panels (conv_weight's A)."""
    kin = 0
    if k_minor and k_panel:  # every element of the thread is at p = t % bk: one split per step
        kin = _inner(v, k0 + t % bk)
    for u in range(count):
        p, x = _tile_coords(t + u * threads, k_minor, width, bk)
        regs[u] = 0
        if x0 + x < xn and k0 + p < kn:
            if not k_minor:
                regs[u] = arr[v[0] + (k0 + p) * v[1] + inner]
            elif k_panel:
                regs[u] = arr[v[0] + (x0 + x) * v[1] + kin]
            else:
                regs[u] = arr[v[0] + (x0 + x) * v[1] + k0 + p]


@cuda.jit(device=True, inline=True)
def _gather(src, win, count, live, col, row, rd, step, sd, end, regs):
    """_fetch for a B that is the im2col matrix of ``src`` through ``win`` (or its
    transpose), gathered: a thread's ``count`` elements share one column (split ``col``,
    ``live`` when inside the matrix) and lie at rows row, row + step, ... (split ``rd``, the
    step's split ``sd``), 0 from ``end`` on. Returns the row after them and its split.

    Not transposed (x-minor order) the column is the thread's x and the rows run along K:
    the row returned is the next K step's first. Transposed (k-minor) the column is the
    thread's pixel, on K, and the rows its x's."""
    for u in range(count):
        regs[u] = 0
        if live and row < end:
            regs[u] = column_value(src, win, rd, col)
        row += step
        rd = digits_add(rd, sd, win[9], win[10])
    return row, rd


@cuda.jit(device=True, inline=True)
def _stage(regs, tile, k_minor, width, count, t, threads, bk):
    """Registers -> the shared tile ``tile[p, x]`` (the inverse of _fetch's order)."""
    for u in range(count):
        p, x = _tile_coords(t + u * threads, k_minor, width, bk)
        tile[p, x] = regs[u]


@cuda.jit(device=True, inline=True)
def _fetch_runs(arr, v, k_minor, width, count, t, threads, bk, x0, k0, xn, kn, inner, left, regs):
    """_fetch in runs: thread t's run u is elements RUN*(t + u*threads) + w, w < RUN, of the
    staging order (_tile_coords), RUN consecutive addresses along the stored matrix's inner
    index (K for ``k_minor``, else x) -- one 128-bit load (``load4``) where the run lies
    inside (xn, kn), within one panel (``left``: the columns from the thread's first to
    its panel's end) and starts 16-byte aligned; else element by element as _fetch, same
    values. ``inner``: the offset of the thread's first column when x is the inner index.
    No panelled K (conv_weight's A stays on _fetch)."""
    for u in range(count // RUN):
        p, x = _tile_coords(RUN * (t + u * threads), k_minor, width, bk)
        j = u * RUN
        if k_minor:  # A[x0 + x, k0 + p + w]
            i = v[0] + (x0 + x) * v[1] + k0 + p
            whole = x0 + x < xn and k0 + p + RUN <= kn
        else:        # S[k0 + p, x0 + x + w]
            i = v[0] + (k0 + p) * v[1] + inner
            whole = k0 + p < kn and x0 + x + RUN <= xn and left >= RUN
        if whole and aligned(arr, i):
            regs[j], regs[j + 1], regs[j + 2], regs[j + 3] = load4(arr, i)
        else:
            for w in range(RUN):
                regs[j + w] = 0
                if k_minor:
                    if x0 + x < xn and k0 + p + w < kn:
                        regs[j + w] = arr[i + w]
                elif k0 + p < kn and x0 + x + w < xn:  # past its panel's end, column w is in another
                    regs[j + w] = arr[i + w if w < left else i - inner + _inner(v, x0 + x + w)]


@cuda.jit(device=True, inline=True)
def _stage_runs(regs, tile, k_minor, width, count, t, threads, bk):
    """_stage for _fetch_runs's order: a run along x is one 128-bit shared store (tile rows
    are a multiple of 16 bytes, x of RUN), one along K goes down a column of the k-major tile."""
    for u in range(count // RUN):
        p, x = _tile_coords(RUN * (t + u * threads), k_minor, width, bk)
        j = u * RUN
        if k_minor:
            for w in range(RUN):
                tile[p + w, x] = regs[j + w]
        else:
            store4(tile, p, x, (regs[j], regs[j + 1], regs[j + 2], regs[j + 3]))


# kind -> (A's K cut into panels, B gathered: 0 a view, 1 the im2col matrix, 2 its transpose)
KINDS = {"gemm": (0, 0), "conv": (0, 1), "conv_weight": (1, 2)}
_kernels: dict = {}


def vec_operands(kind: str, tile: Tile):
    """(A's, B's): whether the ``kind`` kernel of ``tile`` stages that operand in runs
    (_fetch_runs): a vectorised tile's operands that are views, but a K cut into panels
    (conv_weight's A: its runs would need a split per step and element) -- the conv kinds'
    weight and both of gemm's."""
    a_panel, b_gather = KINDS[kind]
    return bool(tile.vec and not a_panel), bool(tile.vec and not b_gather)


def kernel(kind: str, tile: Tile):
    """The product kernel of ``kind`` for ``tile``, built once per process."""
    key = (kind, tile)
    if key not in _kernels:
        _kernels[key] = _build(kind, tile)
    return _kernels[key]


def __getattr__(name):
    """``_<kind>_<tile name>``: that kernel (for tests/cuda_typecheck.py's lookup by name)."""
    for kind in KINDS:
        if name.startswith(f"_{kind}_") and name[len(kind) + 2:][:1].isdigit():
            return kernel(kind, Tile.parse(name[len(kind) + 2:]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(kind: str, tile: Tile):
    A_PANEL, B_GATHER = KINDS[kind]
    BM, BN, BK, TM, TN = tile.bm, tile.bn, tile.bk, tile.tm, tile.tn
    A_ROW, B_ROW = BM + PAD, BN + PAD  # shared row lengths (a shared shape must be plain constants)
    THREADS = tile.threads
    TX = BN // TN                   # threads along a tile row
    LOAD_A = BM * BK // THREADS     # elements of each tile one thread stages per step
    LOAD_B = BK * BN // THREADS
    B_COLUMNS = B_GATHER == 1       # B gathered a column per thread (x-minor) ...
    B_PIXELS = B_GATHER == 2        # ... or a pixel per thread (k-minor): see _gather
    RS, XS = THREADS // BN, THREADS // BK  # the rows between a thread's elements in x-, k-minor order
    A_VEC, B_VEC = vec_operands(kind, tile)  # operands staged in runs (_fetch_runs)
    A_FIRST, B_FIRST = (RUN if A_VEC else 1), (RUN if B_VEC else 1)  # thread t's first x-minor column: FIRST*t
    ALIGN = SHARED_ALIGN if A_VEC or B_VEC else None  # for 128-bit shared stores (scalar staging: as before)

    def product(a, va, b, vb, c, vc, c_split, bias, vbias, ep, relu, m, n, k, k_per_split, accumulate, gs):
        """One BM x BN tile of C over the K slice ``blockIdx.z`` (see the module docstring).

        vbias = (has_bias, off, row_step, col_step): C[i, j] gets bias[o], o = off + i*row_step +
        j*col_step; then ``epilogue`` with ep's column o (ep (3, *) or (3, 0), see
        elementwise.py) and ``relu``, on the value stored (after ``accumulate``'s add).
        Slice z writes C's view shifted by z*c_split. grid.y runs over the M tiles of each
        of the product's groups in turn: group g's A, B (its view's offset or its window's
        first channel), C and bias lie g*gs[0], g*gs[1], g*gs[2], g*gs[3] further on.
        """
        As = cuda.shared.array((2, BK, A_ROW), a.dtype, alignment=ALIGN)  # As[buffer, p, i] = A[i0 + i, k0 + p]
        Bs = cuda.shared.array((2, BK, B_ROW), a.dtype, alignment=ALIGN)  # Bs[buffer, p, j] = B[k0 + p, j0 + j]
        acc = cuda.local.array((TM, TN), a.dtype)
        ra = cuda.local.array(LOAD_A, a.dtype)
        rb = cuda.local.array(LOAD_B, a.dtype)
        ar = cuda.local.array(TM, a.dtype)
        br = cuda.local.array(TN, a.dtype)
        # The mask is a no-op that shows the compiler t >= 0, so it drops Python's
        # negative-index wraparound from every shared-memory access below.
        t = cuda.threadIdx.x & (THREADS - 1)
        tx, ty = t % TX, t // TX
        mb = (m + BM - 1) // BM
        gz = cuda.blockIdx.y // mb
        i0, j0 = (cuda.blockIdx.y % mb) * BM, cuda.blockIdx.x * BN
        va = (va[0] + gz * gs[0], va[1], va[2], va[3], va[4])
        vb = (vb[0] + gz * gs[1],) + vb[1:]
        kb = cuda.blockIdx.z * k_per_split
        ke = min(k, kb + k_per_split)
        a_kmin = not va[2]
        # An x-minor load touches one x (vectorised, one run) per thread (THREADS is a multiple
        # of BM and BN), so its offset (through the panels) is computed once, not per step;
        # and, vectorised, the columns left in its panel.
        xa = i0 + A_FIRST * t % BM
        inner_a = 0 if a_kmin else _inner(va, xa)
        left_a = va[3] - xa % va[3] if A_VEC else 0
        # A gathered B's splits are made once and carried along by digits_add: its column
        # (and first row) for B_COLUMNS; its rows (fixed) and pixel (moving by BK) for B_PIXELS.
        if B_COLUMNS:
            live = j0 + t % BN < n
            col = column_origin(vb, j0 + t % BN)
            kr = kb + t // BN
            krd, rsd = column_row(kr, vb[9], vb[10]), column_row(RS, vb[9], vb[10])
        elif B_PIXELS:
            xr = j0 + t // BK
            xrd, xsd = column_row(xr, vb[9], vb[10]), column_row(XS, vb[9], vb[10])
            kp = kb + t % BK
            kpd, bkd = column_origin(vb, kp), column_origin(vb, BK)
        xb = j0 + B_FIRST * t % BN
        if B_GATHER:
            b_kmin, inner_b = B_PIXELS, 0
        else:
            b_kmin = vb[2] != 0
            inner_b = 0 if b_kmin else _inner(vb, xb)
        left_b = vb[3] - xb % vb[3] if B_VEC else 0

        for ii in range(TM):
            for jj in range(TN):
                acc[ii, jj] = 0
        steps = (ke - kb + BK - 1) // BK
        for s in range(steps + 1):
            cur = s % 2
            if s < steps:  # issue the global loads of step s; they land while step s-1 computes
                k0 = kb + s * BK
                if A_VEC:
                    _fetch_runs(a, va, a_kmin, BM, LOAD_A, t, THREADS, BK, i0, k0, m, ke, inner_a, left_a, ra)
                else:
                    _fetch(a, va, a_kmin, A_PANEL, BM, LOAD_A, t, THREADS, BK, i0, k0, m, ke, inner_a, ra)
                if B_COLUMNS:
                    kr, krd = _gather(b, vb, LOAD_B, live, col, kr, krd, RS, rsd, ke, rb)
                elif B_PIXELS:
                    _gather(b, vb, LOAD_B, kp < ke, kpd, xr, xrd, XS, xsd, n, rb)
                    kp += BK
                    kpd = digits_add(kpd, bkd, vb[11], vb[12])
                elif B_VEC:
                    _fetch_runs(b, vb, b_kmin, BN, LOAD_B, t, THREADS, BK, j0, k0, n, ke, inner_b, left_b, rb)
                else:
                    _fetch(b, vb, b_kmin, 0, BN, LOAD_B, t, THREADS, BK, j0, k0, n, ke, inner_b, rb)
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
                if A_VEC:
                    _stage_runs(ra, As[cur], a_kmin, BM, LOAD_A, t, THREADS, BK)
                else:
                    _stage(ra, As[cur], a_kmin, BM, LOAD_A, t, THREADS, BK)
                if B_VEC:
                    _stage_runs(rb, Bs[cur], b_kmin, BN, LOAD_B, t, THREADS, BK)
                else:
                    _stage(rb, Bs[cur], b_kmin, BN, LOAD_B, t, THREADS, BK)
            cuda.syncthreads()

        coff = vc[0] + gz * gs[2] + cuda.blockIdx.z * c_split
        for jj in range(TN):
            j = j0 + tx + jj * (BN // TN)
            if j < n:
                col = coff + _inner(vc, j)
                for ii in range(TM):
                    i = i0 + ty + ii * (BM // TM)
                    if i < m:
                        v = acc[ii, jj]
                        o = _vector_at(vbias, gs[3], gz, i, j)
                        if vbias[0]:
                            v += bias[o]
                        if accumulate:
                            v += c[col + i * vc[1]]
                        c[col + i * vc[1]] = epilogue(v, channel(ep, o), relu)

    product.__name__ = product.__qualname__ = f"_{kind}_{tile.name}"
    return jit(product)


@cuda.jit(device=True, inline=True)
def _vector_at(vbias, group_step, gz, i, j):
    """Where C[i, j] of group gz reads the bias and the epilogue's columns (``product``'s vbias)."""
    return vbias[1] + gz * group_step + i * vbias[2] + j * vbias[3]


@cuda.jit(device=True, inline=True)
def _partial_sum(part, out, off, j, accumulate):
    """sum_z part[z, j] in z order (deterministic), + out[off + j] with ``accumulate``."""
    s = part[0, j]
    for z in range(1, part.shape[0]):
        s += part[z, j]
    if accumulate:
        s += out[off + j]
    return s


@jit
def _sum_partials(part, out, off, accumulate):
    """out[off + j] (= or +=) sum_z part[z, j]."""
    j = cuda.grid(1)
    if j < part.shape[1]:
        out[off + j] = _partial_sum(part, out, off, j, accumulate)


@jit
def _sum_partials_epilogue(part, out, off, accumulate, vbias, group_step, m, n, ep, relu):
    """_sum_partials, then the epilogue (ep, relu) as the product's store applies it: element j
    is C[i, q] of group gz, j = (gz*m + i)*n + q (the groups' (m, n) blocks one after another)."""
    j = cuda.grid(1)
    if j < part.shape[1]:
        o = _vector_at(vbias, group_step, j // (m * n), j // n % m, j % n)
        out[off + j] = epilogue(_partial_sum(part, out, off, j, accumulate), channel(ep, o), relu)


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


def _splits(m, n, k, tile, groups=1):
    """How many K slices: enough tiles for the GPU, slices of at least MIN_SPLIT_K."""
    tiles = blocks(m, tile.bm) * blocks(n, tile.bn) * groups
    if tiles == 0 or tiles >= MIN_TILES:
        return 1
    return max(1, min(blocks(MIN_TILES, tiles), k // MIN_SPLIT_K))


def gemm(m, n, k, a, va, b, vb, c, vc, accumulate=False, bias=None, vbias=(0, 0, 0), tile=None, groups=1,
         gs=(0, 0, 0, 0), epilogue=None):
    """C (=, or += with ``accumulate``) op(A) @ op(B) (+ bias), M x N x K, on flat device
    arrays read through views (``view``). ``bias`` adds bias[off + i*row_step + j*col_step]
    with ``vbias`` = (off, row_step, col_step). ``tile``: DEFAULT unless given. ``groups``
    such products in one launch, group g's A, B, C and bias offset by g*gs. ``epilogue`` =
    (ep, relu) (kernels/cuda/conv.py's ``conv2d_epilogue``) is applied to each value stored,
    ep's columns indexed as the bias."""
    assert va[3] == NO_PANEL or va[2], "a row-major A's inner index is K: no panels"
    assert vb[3] == NO_PANEL or not vb[2], "a transposed B's inner index is K: no panels"
    product("gemm", tile or DEFAULT, m, n, k, a, va, b, vb, c, vc, accumulate, bias, vbias, groups, gs, epilogue)


def product(kind, tile, m, n, k, a, va, b, vb, c, vc, accumulate=False, bias=None, vbias=(0, 0, 0), groups=1,
            gs=(0, 0, 0, 0), epilogue=None):
    """The product of ``kind`` (see the module docstring), M x N x K, by ``tile``'s kernel,
    for ``groups`` products at once, group g's operands and outputs offset by g*gs (A, B, C,
    bias; see the kernel), with ``epilogue`` (as ``gemm``'s) on each value stored; split over
    K (partials summed in slice order, then the epilogue) when they give too few tiles, the
    groups' C follow each other and there is no bias."""
    assert not vc[2], "C is written row-major"
    if not tile.fits(c.dtype):
        raise ValueError(f"tile {tile.name} needs more than {SHARED_LIMIT} bytes of shared {c.dtype}")
    splits = _splits(m, n, k, tile, groups)
    size = groups * m * n
    ep, relu = no_epilogue(c.dtype) if epilogue is None else epilogue
    if splits > 1 and bias is None and vc[1] == n and vc[3] >= n and (groups == 1 or gs[2] == m * n):
        # K slices into a partial buffer (splits, groups*m*n), then their sum into C, in order.
        # The epilogue goes on the sums, so C's values are the plain product's with or without it.
        per = blocks(blocks(k, splits), tile.bk) * tile.bk
        splits = blocks(k, per)
        part = workspace("gemm-split", splits * size, c.dtype).reshape(splits, size)
        plain = no_epilogue(c.dtype)
        _launch(kind, tile, m, n, k, per, splits, a, va, b, vb, flat(part), view(n), size, False, None, vbias,
                *plain, groups, gs)
        if epilogue is None:
            launch(_sum_partials, size, part, c, vc[0], int(accumulate))
        else:
            launch(_sum_partials_epilogue, size, part, c, vc[0], int(accumulate), tuple(int(v) for v in (0,) + vbias),
                   int(gs[3]), m, n, ep, int(relu))
    else:
        _launch(kind, tile, m, n, k, max(k, 1), 1, a, va, b, vb, c, vc, 0, accumulate, bias, vbias, ep, relu,
                groups, gs)


def _launch(kind, tile, m, n, k, per, splits, a, va, b, vb, c, vc, c_split, accumulate, bias, vbias, ep, relu,
            groups, gs):
    has_bias = (int(bias is not None),) + tuple(int(v) for v in vbias)
    launch_grid(kernel(kind, tile), (blocks(n, tile.bn), blocks(m, tile.bm) * groups, splits), tile.threads,
                a, va, b, vb, c, vc, c_split, c if bias is None else bias, has_bias, ep, int(relu), m, n, k, per,
                int(accumulate), tuple(int(v) for v in gs))


def matmul(a, b, out, trans_a=False, trans_b=False, accumulate=False, tile=None):
    """out (M, N) (=, or +=) op(a) @ op(b) for 2-D C-contiguous device arrays, where op
    transposes with the flag: a (M, K) or (K, M), b (K, N) or (N, K)."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    gemm(m, n, k, flat(a), view(a.shape[1], trans=trans_a), flat(b), view(b.shape[1], trans=trans_b),
         flat(out), view(n), accumulate, tile=tile)
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
