"""Specialisations of conv2d's two algorithms (kernels/conv.py): the same layouts, symbols
and contract, faster where they apply.

    direct, flat       each tap is one long vectorised loop over a padded plane; at stride
                       s > 1 over the input's s*s polyphase planes, and the input-gradient
                       is the "adjoint" flat pass over gy, one stride-1 correlation per
                       phase of gx (docs/convolution.md); any stride
    im2col, stride 1   "shifted" products: only the kw column shifts are unfolded, the
                       kh row shifts are windows of one BLAS product (forward and
                       weight-gradient; the input-gradient is the forward of gy with the
                       flipped kernel)

Both hold padded planes of about (oh*sh + dh*(kh-1)) x (ow*sw + dw*(kw-1)) elements per
channel and thread, which grow with the dilation squared while the work does not;
``supports_flat`` and ``supports_shifted`` turn them down where that plane would be far
larger than the input and output planes (SCRATCH_RATIO), and the general kernels run
instead.
"""
import functools

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from . import PARALLEL, get_num_threads
from .blas import gemm
from .conv import (FASTMATH, KERNEL, _reduce_slots, backward_weight_direct, backward_weight_im2col, biased_run, channel,
                   epilogue_args, no_epilogue, store_run)
from .index import copy_run, out_range, tap
from .simd import (LANES, copy_row, vdeinterleave, vector_length, vfma, vload, vload_masked, vsplat, vstore,
                   vstore_masked, vsum)


# ----------------------------------------------------------------------------- direct, flat
#
# With stride 1 a tap (a, bb) reads the padded input plane shifted by a constant, so
# if the output is computed on rows as wide as the padded plane (wp = ow + dw*(kw-1))
# the whole plane is one run: acc.flat[j] += w * xp.flat[a*dh*wp + bb*dw + j] for
# j < (oh-1)*wp + ow, a single long vectorised loop per tap instead of oh short ones.
# The extra dw*(kw-1) columns per row are computed and dropped. Small planes of
# consecutive samples sit end to end, so one run covers several (up to FLAT_RUN
# elements; LeNet's 14x14 planes go five to a run, 1.3-1.5x faster than one). Tasks
# are (run of samples, group) pairs dealt to per-thread slots, each with its own
# padded planes.
#
# The taps of all input channels of the group are listed flat, as cig*kh*kw (channel, tap)
# pairs, and a group's output channels go in blocks (BLOCK, then QUAD, then one at a time;
# depthwise layers have one channel per group). Where vector registers hold 16 float32
# (AVX-512), a block's accumulators stay in registers for 32 outputs of the run at a time
# while every pair is added (_pairs8/4/1; the weight-gradient's dot products likewise,
# _dots8/4/1; docs/convolution.md). Elsewhere each pass over the run does three pairs for
# four channels ("a quad", _taps4/_sums4): it loads three shifted inputs and four
# accumulators and does twelve FMAs; one pair per pass would store an accumulator per FMA,
# and the stores, not the FMA units, would set the pace (2.3x slower on ResNet's
# 16-channel 3x3 layer). There the pairs are padded with zero-weight pairs to a multiple of
# three, which read a run of zeros: never the input, where 0 * inf would turn an inf output
# into NaN. (Padding each channel's kh*kw taps instead would waste a third of the passes of
# a 2x2 kernel, two thirds of a 1x1's, and of the input-gradient's phases at stride 2 below,
# whose taps number 1, 2, 4.)
#
# Stride s > 1: polyphase planes (docs/convolution.md). Per axis, with xpad the input
# padded by p, split xpad into s phase planes X_r[u] = xpad[s*u + r], r < s. Output o's
# tap a reads xpad[s*o + a*d] = X_{(a*d) % s}[o + (a*d)//s]: a constant shift into one
# phase plane, so the strided forward and weight-gradient are the flat kernels above on
# the phase planes (each channel's planes laid out (phase, sample, hp, wp), hp = oh +
# dh*(kh-1)//sh, wp likewise), with kh*kw taps a channel and no zero taps beyond the
# rounding of the group's pairs to three.
#
# The input-gradient (conv_transpose2d's forward) runs the same kernel the other way
# round, "adjoint": gx[i] = sum over (o, a) with s*o - p + a*d = i of gy[o] * w[a].
# Split gx into phases i = s*u + r: then o = u + (r + p - a*d)/s, a whole number only
# for r = (a*d - p) mod s, so tap a serves one output phase r alone, reading gy at the
# constant shift (r + p - a*d)/s. Each output phase is a stride-1 correlation of gy
# (padded by P, the least that makes every shift >= 0) with its own taps: for k = 3,
# s = 2, p = 1, d = 1 phase 0 has tap 1 (shift 0), phase 1 taps 0 and 2 (shifts 1, 0);
# for k = 4 two taps per phase. So one loaded gy plane serves s*s passes, one per
# output phase of gx, each over its own (channel, tap) pairs, and each writes its
# accumulators straight into gx[..., r::sh, q::sw]. At stride 1 that is the flat
# forward of gy with the flipped kernel and the full padding d*(k-1) - p (or, where that
# is negative, a crop: P = 0 and every shift > 0).
#
# Shared padding. A phase plane (either kind) is, per axis, ``extent`` = u + max shift
# long (u outputs, the accumulator rows), its data in [lo, hi) and zeros around. In a run
# buffer its rows are not ``extent`` but ``pitch`` apart, and each sample's plane starts
# ``pitch`` rows after the previous one's: output (v, q) accumulates at v*wq + q (hq*wq
# a sample further on) and tap shift (a, b) still reads one constant offset a*wq + b. Per
# axis, output v's tap reads position v + a of its row, which lies in [0, extent); with
# data at [lo, hi) of every row (sample), that read is right if it lands in its own row's
# data or in zeros, which holds when the row before ends its data before the read window
# starts, pitch >= hi - min a, and the next row's data starts after it ends,
# pitch >= u + max a - lo; rows do not collide, pitch >= hi - lo and pitch >= u. So the
# zeros between two rows' data need only be max(leading, trailing padding) long, not their
# sum: at stride 1, w + max(pl, pr) instead of w + pl + pr (ResNet's 8x8 k3 p1 planes:
# 9x9 = 81 positions per 64 outputs instead of 10x10 = 100; LeNet's input-gradient, 10x10
# gy padded by 4 for 14x14 gx: 14x14 instead of 18x18; an unpadded forward gains nothing).
# _axis_plan takes pitch >= hi (not hi - min a): each row's data stays within its row of
# the buffer, so pad_phases writes each sample into a view (hp rows of wq) as before; the
# views of consecutive samples overlap in their shared zero rows. Gap outputs (between
# rows and samples) are computed and dropped as before; their taps may now read data, so
# the weight-gradient's gy holds zeros there and _exact_if_nan catches 0 * inf.

TAPS = 3   # (channel, tap) pairs per pass: the weight-gradient's blocks, the in-memory passes
QUAD = 4   # output channels in the next block size after BLOCK
# Output channels per block of a pass: eight where a vector register holds 16 float32
# (AVX-512's 32 registers hold the forward's 16 accumulators, the weight-gradient's 24),
# four with 8-lane registers (AVX2 has 16: eight channels spilled accumulators).
BLOCK = 8 if LANES == 16 else QUAD
# Where registers hold 8 float32 (AVX2), the register-blocked loops below measured slower
# than the passes they replaced (resnet_s1 forward 1.75 against 1.14-1.27 ms, compiled for
# Haswell on this VM: four channels keep too few independent multiply-add chains in flight
# to hide their latency, eight spill), so there the passes stay: three pairs per pass over
# the run, the accumulators in memory, the loop vectorised by LLVM (``_taps4``, ``_sums4``).
REGISTER_BLOCKED = LANES == 16
FLAT_RUN = 1024  # elements per run, at most, when samples are batched into one


@njit(**KERNEL)
def pad_phases(x, c0, xp, ph, pw, sh, sw, used=-1):
    """xp (cg, sh*sw, hp, wp) = the sh*sw phase planes of x[c0:c0+cg] shifted by (ph, pw)
    into zeros: xp[ci, r*sw + q, u, v] = x[c0 + ci, sh*u + r - ph, sw*v + q - pw]; x (C, H, W).
    At stride 1, one plane: x padded. A negative ph/pw crops. ``used``: a mask of the phases
    to write (bit r*sw + q), -1 for all (``phases_read``: a 1x1 stride-2 kernel reads one).

    Writes the interior only: callers zero xp once (a buffer reused with the same sizes
    keeps its zero border, and a phase never written stays zeros)."""
    h, wd = x.shape[1], x.shape[2]
    hp, wp = xp.shape[2], xp.shape[3]
    if sw == 2 and pw >= 0 and (used == -1 or used == (1 << (sh * sw)) - 1):  # every phase
        _pad_phase_pairs(x, c0, xp, ph, pw, sh)
        return
    for f in range(sh * sw):
        if used != -1 and not (used >> f) & 1:
            continue
        r, q = f // sw, f % sw
        u0, u1 = out_range(r, sh, ph, 1, h, hp)  # the phase rows and columns inside x
        v0, v1 = out_range(q, sw, pw, 1, wd, wp)
        for ci in range(xp.shape[0]):
            for u in range(u0, u1):
                _phase_columns(x[c0 + ci, tap(u, sh, ph, r, 1)], xp[ci, f, u], v0, v1, sw, pw, q)


@njit(cache=True, inline="always")
def _phase_columns(row, dst, v0, v1, sw, pw, q):
    """dst[v] = row[sw*v - pw + q] for v0 <= v < v1: one row of column phase q."""
    j0 = tap(v0, sw, pw, q, 1)
    if sw == 1:
        copy_row(row, j0, dst, v0, v1 - v0)
    else:
        for v in range(v0, v1):
            dst[v] = row[j0 + (v - v0) * sw]


def _split_columns(row, pw, d0, d1):
    """Row ``row`` of x into its two column phases at stride 2 and leading padding pw >= 0:
    element j to column (j + pw) // 2 of phase plane row ``(d0, d1)[(j + pw) % 2]``, none past
    its end (columns that no tap reads). Compiled (the overload below)."""
    for j in range(row.size):
        c = j + pw
        d = d0 if c % 2 == 0 else d1
        if c // 2 < d.size:
            d[c // 2] = row[j]


@overload(_split_columns, inline="always")
def _split_columns_impl(row, pw, d0, d1):
    """A contiguous float row goes in chunks of 2*LANES elements: two vector loads (masked
    only past the row's end), one vdeinterleave, and a masked store of each phase's columns.
    Per sample of resnet_down's 16x32x32 input this made its weight-gradient 30-35% faster
    (2026-12-02, batch 64 and 128, 1 and 2 threads, x aligned or not): the loop it replaces
    (the interior pairs element by element, LLVM-vectorised, and each phase's edge columns)
    took 11-14 us per sample inside the kernel. Masked loads throughout were slower still
    where x came from L3 (batch 128: 1.3-1.7x the old loop): only the row's last chunk
    is masked here. Other rows (a strided view of x): the loop above."""
    if not (isinstance(row, types.Array) and row.layout == "C" and isinstance(row.dtype, types.Float)):
        return _split_columns

    def impl(row, pw, d0, d1):
        wd, wp = row.size, d0.size
        de, do = (d0, d1) if pw % 2 == 0 else (d1, d0)  # the phases of the even and odd elements
        for j in range(0, wd, 2 * LANES):
            cnt = min(2 * LANES, wd - j)
            if cnt == 2 * LANES:
                a, b = vload(row, j), vload(row, j + LANES)
            else:
                a, b = vload_masked(row, j, min(LANES, cnt)), vload_masked(row, j + LANES, max(0, cnt - LANES))
            even, odd = vdeinterleave(a, b)
            ke, ko = (j + pw) // 2, (j + pw + 1) // 2  # the chunk's first column in each phase
            vstore_masked(de, ke, even, max(0, min((cnt + 1) // 2, wp - ke)))
            vstore_masked(do, ko, odd, max(0, min(cnt // 2, wp - ko)))
    return impl


@njit(cache=True)
def _pad_phase_pairs(x, c0, xp, ph, pw, sh):
    """pad_phases at column stride 2, pw >= 0: both column phases of a row at once
    (``_split_columns``), where a strided gather per phase took 13 us per sample of
    resnet_down's 16x32x32 input, 40% of its forward on one thread."""
    h = x.shape[1]
    hp = xp.shape[2]
    for r in range(sh):
        u0, u1 = out_range(r, sh, ph, 1, h, hp)
        for ci in range(xp.shape[0]):
            for u in range(u0, u1):
                _split_columns(x[c0 + ci, tap(u, sh, ph, r, 1)], pw, xp[ci, r * 2, u], xp[ci, r * 2 + 1, u])


@njit(cache=True)
def _axis_plan(k, s, p, d, size, size_in, adjoint):
    """One axis of a flat pass (see above): ``(out_phase, in_phase, shift, lead, u, extent,
    pitch)``, per tap a < k the output phase it serves, the input phase it reads and its
    shift there, then the loaded planes' leading padding, the accumulator rows (u), the
    planes' rows (extent: the padded plane) and the rows they take in a run buffer, where
    the padding is shared (pitch <= extent; see above). ``size`` is the pass's output size:
    oh for the forward, h (gx's) for the adjoint; ``size_in`` the loaded input's: h, or oh."""
    out_phase, in_phase, shift = np.zeros(k, np.int64), np.zeros(k, np.int64), np.empty(k, np.int64)
    for a in range(k):
        if adjoint:
            out_phase[a] = (a * d - p) % s
            shift[a] = (out_phase[a] + p - a * d) // s
        else:
            in_phase[a], shift[a] = (a * d) % s, (a * d) // s
    lead, u, s_in = p, size, s
    if adjoint:
        lead, u, s_in = max(0, -shift.min()), -(-size // s), 1
        shift += lead
    extent = u + shift.max()
    pitch = u  # each output its own position
    for r in range(s_in):
        # Phase r's rows hold the padded positions s_in*v + r, its data those in
        # [lead, lead + size_in): rows [lo, hi), pad_phases' (out_range's) bounds, written
        # out because _plane_fits runs this function as Python.
        lo = max(0, -((r - lead) // s_in))
        hi = min(extent, max(lo, -((r - lead - size_in) // s_in)))
        pitch = max(pitch, hi)
        for a in range(k):
            if in_phase[a] == r and hi > lo:
                pitch = max(pitch, shift[a] + u - lo)
    return out_phase, in_phase, shift, lead, u, extent, pitch


@njit(cache=True)
def even_runs(n, nb, slots):
    """``nb`` samples per run, lowered so that the runs over ``n`` samples number a multiple of
    ``slots`` where the batch allows, all about as long (a run's outputs do not depend on the
    runs: same results). One thread's time for one run (2026-12-01, float32, us): 64->64 7x7
    (9x9 padded) 12 samples 393, 8 292, 4 171, 3 139, 2 108, 1 92; so on 2 idle cores
    resnet8's third stage at b16 takes 292 (runs 8+8) instead of 393 (12+4), at b3 108
    instead of 139; LeNet-5's conv2 at b16 (14x14) 2x26 (4 runs of 4) instead of 2x39 (5+5,
    5+1). Both threads measured (shared cores): the b16 layer 309 against 600 when the other
    core was free, 450 against 400 when it was busy."""
    if slots > 1:
        runs = min(n, -(-(-(-n // nb)) // slots) * slots)
        nb = -(-n // runs)
    return nb


@njit(cache=True)
def _flat_plan(n, cig, size_h, size_w, in_h, in_w, kh, kw, sh, sw, ph, pw, dh, dw, adjoint, slots):
    """Sizes of a direct pass over ``n`` samples of ``cig`` channels (see above),
    ``(lead, phases_in, phases_out, (hq, wq), (uh, uw), nb, counts, taps, sources, (hp, rows))``:
      lead          the leading padding (rows, columns) of the loaded planes
      phases_in     (sh, sw) for the forward (the planes it loads), (1, 1) for the adjoint
      phases_out    (1, 1) for the forward, (sh, sw) for the adjoint (gx's phases)
      hq, wq        the pitches of a run buffer's phase planes: rows wq wide (the output
                    runs lie on rows that wide too), a sample every hq rows
      uh, uw        an output phase's accumulator plane (its output is at most that)
      nb            samples per run: small planes of consecutive samples sit end to end, so
                    one pass covers several (the outputs between them are computed and
                    dropped), in runs of up to FLAT_RUN elements, which keep the four
                    accumulator rows in L1; with ``slots`` > 1, as many runs as a multiple of
                    slots allows (up to one per sample), all about as long (see below)
      counts        (phases_out,) the (channel, tap) pairs that each output phase sums
      taps          (phases_out, width) its pairs, first, as ci*kh*kw + a*kw + bb (the flat
                    weight's column), then -1 for padding pairs up to a width that is a
                    multiple of TAPS
      sources       (phases_out, width) where each real pair reads in a run buffer
                    (cig, phases_in, rows, wq), flat; the padding pairs read just past it,
                    where the kernels keep a run of zeros
      hp            one phase plane's rows (each sample's, from row s*hq)
      rows          a run buffer's rows per channel and phase
    The forward's pairs are in the flat weight's order (taps[0, j] = j for j < cig*kh*kw)."""
    oph, iph, shh, lh, uh, hp, hq = _axis_plan(kh, sh, ph, dh, size_h, in_h, adjoint)
    opw, ipw, shw, lw, uw, wp, wq = _axis_plan(kw, sw, pw, dw, size_w, in_w, adjoint)
    phases_in, phases_out = ((1, 1), (sh, sw)) if adjoint else ((sh, sw), (1, 1))
    nb = even_runs(n, max(1, min(n, FLAT_RUN // (hq * wq))), slots)
    # a run buffer's rows per phase plane: the last sample's plane is hp rows, and its
    # last row's taps reach wp - wq columns past them (see above)
    rows = (nb - 1) * hq + hp - (-(wp - wq) // wq)
    phase_run = rows * wq  # one phase plane of a run buffer's channel
    counts = np.zeros(phases_out[0] * phases_out[1], np.int64)
    for t in range(kh * kw):
        counts[oph[t // kw] * phases_out[1] + opw[t % kw]] += cig
    width = -(-counts.max() // TAPS) * TAPS
    taps = np.full((counts.size, width), -1, np.int64)
    sources = np.full((counts.size, width), cig * phases_in[0] * phases_in[1] * phase_run, np.int64)
    counts[:] = 0
    for ci in range(cig):
        for t in range(kh * kw):
            a, bb = t // kw, t % kw
            f = oph[a] * phases_out[1] + opw[bb]
            taps[f, counts[f]] = ci * kh * kw + t
            sources[f, counts[f]] = ((ci * phases_in[0] + iph[a]) * phases_in[1] + ipw[bb]) * phase_run \
                + shh[a] * wq + shw[bb]
            counts[f] += 1
    return (lh, lw), phases_in, phases_out, (hq, wq), (uh, uw), nb, counts, taps, sources, (hp, rows)


@njit(**KERNEL)
def to_wide_rows(planes, wide, wp):
    """wide[c, r*wp:r*wp + ow] = planes[c, r]: planes (C, OH, OW) onto rows wp wide (the
    flat runs' layout); the other columns of ``wide`` are left as they are. In masked vector
    copies (simd.copy_row): 1.4-1.8 us per sample of resnet_s1's 16x32x32 gy, 3.6-5.3 as an
    LLVM-vectorised loop over each row (copy_run), 6% of its weight-gradient."""
    oh, ow = planes.shape[1], planes.shape[2]
    for c in range(planes.shape[0]):
        dst = wide[c]
        for r in range(oh):
            copy_row(planes[c, r], 0, dst, r * wp, ow)


@njit(cache=True)
def _row_buffer(slots, rows, length, dtype):
    """Zeroed (slots, rows, length) rows that each start on a cache line (Numba aligns an
    array to 32 bytes; the row length is rounded up to whole vector pairs, whole lines).
    Unaligned rows make half the accumulators' vector loads and stores straddle two lines:
    8% slower forward."""
    return np.zeros((slots, rows, vector_length(length)), dtype)


@njit(**KERNEL)
def _load_run(x, i0, m, c0, xp, lead, phases, run, hq, hp, used):
    """Pad the m samples from i0 (channels c0 onwards) into the run buffer xp (cig, phases,
    rows, wq), split into phase planes (those in the mask ``used``: pad_phases), sample s's hp
    rows from row s*hq; the length of their flat output run (``run`` per sample, the last
    one's only). The samples' planes overlap in their shared padding, which pad_phases leaves
    as it is (see above)."""
    for s in range(m):
        pad_phases(x[i0 + s], c0, xp[:, :, s * hq:s * hq + hp], lead[0], lead[1], phases[0], phases[1], used)
    return (m - 1) * hq * xp.shape[3] + run


@njit(cache=True)
def phases_read(kh, kw, sh, sw, dh, dw):
    """The mask (bit r*sw + q) of the input phases that a forward's taps read: tap (a, bb)
    reads phase ((a*dh) % sh, (bb*dw) % sw) (see above). All of them for a 3x3 kernel at
    stride 2; for a 1x1 one, phase 0 alone, so a shortcut loads a quarter of its input."""
    rows = _axis_plan(kh, sh, 0, dh, 1, 1, False)[1]  # each tap's input phase (sizes do not matter)
    cols = _axis_plan(kw, sw, 0, dw, 1, 1, False)[1]
    used = 0
    for a in range(kh):
        for bb in range(kw):
            used |= 1 << (rows[a] * sw + cols[bb])
    return used


@njit(cache=True, inline="always")
def _block(left, blocked):
    """Output channels in the next block of a pass, ``left`` channels to go: BLOCK (where
    ``blocked``, the register-blocked loops), QUAD or 1."""
    return BLOCK if blocked and left >= BLOCK else QUAD if left >= QUAD else 1


@njit(cache=True, inline="always")
def _register_blocked(a):
    """Whether the passes over array ``a``'s dtype run register-blocked: REGISTER_BLOCKED, for
    float32. A Vec of 16 float64 takes two zmm registers, and the blocks spilled: float64
    weight-gradients ran 1.3-1.8x slower than the in-memory passes (ResNet's 3x3 layers)."""
    return REGISTER_BLOCKED and a.itemsize == 4


# The forward's inner loops: one block of output channels (8, 4 or 1) over a run, each
# output's accumulators in vector registers (kernels/simd.py) for all of the output phase's
# (channel, tap) pairs, two vectors of outputs at a time: per pair, two vector loads of the
# shifted input and a multiply-add per accumulator. The accumulators start at the channels'
# biases and add their pairs in order, one fused multiply-add each, as the earlier three-taps-
# per-pass loops did (bit for bit the same sums); they are stored once per vector pair, not
# once per three taps. Measured (2026-12-01, one core of the 2-core Zen 5 VM, float32, 16
# channels' 3x3 taps over a 1,024-element run): 140 GFLOP/s for those loops, 202 for four
# channels here, 256 for eight. ``length`` is rounded up to whole vector pairs: the buffers
# have the room (``vector_length``), and the outputs past ``length`` are never stored.

@njit(cache=True)
def _pairs8(w, bias, src, sources, count, acc, length):
    """acc[u, :length] = bias[u] + sum_k w[u, k] * src[sources[k]:][:length], u < 8."""
    for j in range(0, vector_length(length), 2 * LANES):
        c0 = d0 = vsplat(bias[0], src)
        c1 = d1 = vsplat(bias[1], src)
        c2 = d2 = vsplat(bias[2], src)
        c3 = d3 = vsplat(bias[3], src)
        c4 = d4 = vsplat(bias[4], src)
        c5 = d5 = vsplat(bias[5], src)
        c6 = d6 = vsplat(bias[6], src)
        c7 = d7 = vsplat(bias[7], src)
        for k in range(count):
            i = sources[k] + j
            x, z = vload(src, i), vload(src, i + LANES)
            c0, d0 = _fma2(c0, d0, w[0, k], x, z)
            c1, d1 = _fma2(c1, d1, w[1, k], x, z)
            c2, d2 = _fma2(c2, d2, w[2, k], x, z)
            c3, d3 = _fma2(c3, d3, w[3, k], x, z)
            c4, d4 = _fma2(c4, d4, w[4, k], x, z)
            c5, d5 = _fma2(c5, d5, w[5, k], x, z)
            c6, d6 = _fma2(c6, d6, w[6, k], x, z)
            c7, d7 = _fma2(c7, d7, w[7, k], x, z)
        _store_pair(acc[0], j, c0, d0)
        _store_pair(acc[1], j, c1, d1)
        _store_pair(acc[2], j, c2, d2)
        _store_pair(acc[3], j, c3, d3)
        _store_pair(acc[4], j, c4, d4)
        _store_pair(acc[5], j, c5, d5)
        _store_pair(acc[6], j, c6, d6)
        _store_pair(acc[7], j, c7, d7)


@njit(cache=True)
def _pairs4(w, bias, src, sources, count, acc, length):
    """_pairs8 for four channels."""
    for j in range(0, vector_length(length), 2 * LANES):
        c0 = d0 = vsplat(bias[0], src)
        c1 = d1 = vsplat(bias[1], src)
        c2 = d2 = vsplat(bias[2], src)
        c3 = d3 = vsplat(bias[3], src)
        for k in range(count):
            i = sources[k] + j
            x, z = vload(src, i), vload(src, i + LANES)
            c0, d0 = _fma2(c0, d0, w[0, k], x, z)
            c1, d1 = _fma2(c1, d1, w[1, k], x, z)
            c2, d2 = _fma2(c2, d2, w[2, k], x, z)
            c3, d3 = _fma2(c3, d3, w[3, k], x, z)
        _store_pair(acc[0], j, c0, d0)
        _store_pair(acc[1], j, c1, d1)
        _store_pair(acc[2], j, c2, d2)
        _store_pair(acc[3], j, c3, d3)


@njit(cache=True)
def _pairs1(w, bias, src, sources, count, acc, length):
    """_pairs8 for one channel (depthwise layers have one per group)."""
    for j in range(0, vector_length(length), 2 * LANES):
        c = d = vsplat(bias[0], src)
        for k in range(count):
            i = sources[k] + j
            c, d = vfma(c, w[0, k], vload(src, i)), vfma(d, w[0, k], vload(src, i + LANES))
        _store_pair(acc[0], j, c, d)


@njit(cache=True, fastmath=FASTMATH)
def _taps4(w, bias, src, sources, count, acc, length):
    """_pairs4 as passes (REGISTER_BLOCKED off): per pass three pairs, k to k + 2, for four
    channels, twelve multiply-adds per four accumulator loads and stores (pairs past
    ``count`` have weight 0 and read zeros). The weights are read into scalars before each
    pass: LLVM cannot prove that the stores into acc leave w alone."""
    a0, a1, a2, a3 = acc[0, :length], acc[1, :length], acc[2, :length], acc[3, :length]
    for u in range(QUAD):
        acc[u, :length] = bias[u]
    for k in range(0, count, TAPS):
        s0, s1, s2 = src[sources[k]:], src[sources[k + 1]:], src[sources[k + 2]:]
        w00, w01, w02, w10, w11, w12 = w[0, k], w[0, k + 1], w[0, k + 2], w[1, k], w[1, k + 1], w[1, k + 2]
        w20, w21, w22, w30, w31, w32 = w[2, k], w[2, k + 1], w[2, k + 2], w[3, k], w[3, k + 1], w[3, k + 2]
        for j in range(length):
            x0, x1, x2 = s0[j], s1[j], s2[j]
            a0[j] = ((a0[j] + w00 * x0) + w01 * x1) + w02 * x2
            a1[j] = ((a1[j] + w10 * x0) + w11 * x1) + w12 * x2
            a2[j] = ((a2[j] + w20 * x0) + w21 * x1) + w22 * x2
            a3[j] = ((a3[j] + w30 * x0) + w31 * x1) + w32 * x2


@njit(cache=True, fastmath=FASTMATH)
def _taps1(w, bias, src, sources, count, acc, length):
    """_taps4 for one channel."""
    a = acc[0, :length]
    a[:] = bias[0]
    for k in range(0, count, TAPS):
        s0, s1, s2 = src[sources[k]:], src[sources[k + 1]:], src[sources[k + 2]:]
        w0, w1, w2 = w[0, k], w[0, k + 1], w[0, k + 2]
        for j in range(length):
            a[j] = ((a[j] + w0 * s0[j]) + w1 * s1[j]) + w2 * s2[j]


@njit(cache=True, inline="always")
def _fma2(c, d, w, x, z):
    """A channel's two output vectors plus its weight w times the two input vectors."""
    return vfma(c, w, x), vfma(d, w, z)


@njit(cache=True, inline="always")
def _store_pair(row, j, c, d):
    vstore(row, j, c)
    vstore(row, j + LANES, d)


@njit(cache=True, inline="always")
def _phase_size(size, s, r):
    """Elements i < size with i % s == r: the rows (or columns) of output phase r."""
    return (size - r + s - 1) // s


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_flat(x, w, b, y, ep, relu, sh, sw, ph, pw, dh, dw, g, adjoint, slots):
    """The flat forward (see above): y = epilogue(conv2d(x, w) + b) at stride (sh, sw), any
    leading padding ph/pw >= 0 (kernels/conv.py's epilogue: ep, relu); or, ``adjoint``, y =
    the input-gradient of the conv2d with that stride, padding and dilation, from x = its gy,
    w = its weight with each group's channels transposed (C, CO/G, KH, KW;
    ``transpose_groups``), b = 0 and no epilogue."""
    n = x.shape[0]
    co, cig, kh, kw = w.shape
    cog = co // g
    lead, phases_in, phases_out, (hq, wq), (uh, uw), nb, counts, taps, sources, (hp, buf_rows) = _flat_plan(
        n, cig, y.shape[2], y.shape[3], x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw, dh, dw, adjoint, slots)
    plane, nin = hq * wq, phases_in[0] * phases_in[1]
    used = -1 if adjoint else phases_read(kh, kw, sh, sw, dh, dw)
    run = (uh - 1) * wq + uw  # one sample's output run
    blocks = -(-n // nb)
    # Fewer (run, group) tasks than slots (a batch of 1): each group's output channels split
    # into ``parts`` of ``chunk`` (whole quads), a task each, so that every thread has work.
    parts = max(1, min(-(-slots // (blocks * g)), -(-cog // QUAD)))
    chunk = -(-(-(-cog // QUAD)) // parts) * QUAD
    wt = np.zeros((counts.size, co, taps.shape[1]), w.dtype)  # each output phase's pairs
    wf = w.reshape(co, cig * kh * kw)
    for f in range(counts.size):  # rows in order (64->64 3x3: 15 us a call column by column)
        for o in range(co):
            if adjoint:
                for j in range(counts[f]):
                    wt[f, o, j] = wf[o, taps[f, j]]
            else:  # the forward's pairs are wf's own columns (_flat_plan)
                copy_run(wf[o, :counts[f]], wt[f, o])
    # A run buffer, then zeros (what _taps4's padding pairs read) and room for the last vectors.
    size, pad = cig * nin * buf_rows * wq, vector_length(nb * plane)
    xp_buf = np.zeros((slots, size + pad + 2 * LANES), x.dtype)  # padding stays 0 (pad_phases)
    blocked = _register_blocked(x)
    if sources.max() + vector_length((nb - 1) * plane + run) > xp_buf.shape[1]:  # the longest run's reach
        raise IndexError("conv2d_forward_flat: a vector read would pass the end of its run buffer")
    acc_buf = _row_buffer(slots, BLOCK, nb * plane, x.dtype)
    for tid in prange(slots):
        src, acc = xp_buf[tid], acc_buf[tid]
        xp = src[:size].reshape(cig, nin, buf_rows, wq)
        for t in range(tid, blocks * g * parts, slots):
            i0, gi = (t // (g * parts)) * nb, (t // parts) % g
            o0 = gi * cog + (t % parts) * chunk  # this task's channels: [o0, o1)
            o1 = min(o0 + chunk, (gi + 1) * cog)
            m = min(nb, n - i0)  # samples in this run
            length = _load_run(x, i0, m, gi * cig, xp, lead, phases_in, run, hq, hp, used)
            for f in range(counts.size):
                r, q = f // phases_out[1], f % phases_out[1]
                rows, cols = _phase_size(y.shape[2], phases_out[0], r), _phase_size(y.shape[3], phases_out[1], q)
                if rows * cols == 0:
                    continue
                o = o0
                while o < o1:
                    nu = _block(o1 - o, blocked)
                    if nu == 8:
                        _pairs8(wt[f, o:o + nu], b[o:o + nu], src, sources[f], counts[f], acc, length)
                    elif nu == QUAD and blocked:
                        _pairs4(wt[f, o:o + nu], b[o:o + nu], src, sources[f], counts[f], acc, length)
                    elif nu == QUAD:
                        _taps4(wt[f, o:o + nu], b[o:o + nu], src, sources[f], counts[f], acc, length)
                    elif blocked:
                        _pairs1(wt[f, o:o + nu], b[o:o + nu], src, sources[f], counts[f], acc, length)
                    else:
                        _taps1(wt[f, o:o + nu], b[o:o + nu], src, sources[f], counts[f], acc, length)
                    for u in range(nu):
                        chan = channel(ep, o + u)
                        for s in range(m):
                            for row in range(rows):
                                j = s * plane + row * wq
                                store_run(acc[u, j:j + cols], y[i0 + s, o + u, r + phases_out[0] * row], q,
                                          phases_out[1], chan, relu)
                    o += nu


# The weight-gradient's inner loops: three (channel, tap) pairs for a block of output
# channels (8, 4 or 1), each of the 3 x 8 dot products over a run in a vector register
# (kernels/simd.py), summed across its lanes at the end: per vector of a run, three loads of
# the shifted input, one of gy per channel, and a multiply-add per dot product. (Before, as
# LLVM-vectorised scalar loops over four channels: resnet_s1's weight-gradient 1.23 ms.)

@njit(cache=True)
def _dots8(src, sources, k, gyw, out, length):
    """out[u, i] += sum_j gyw[u, j] * src[sources[k + i] + j] for u < 8, i < 3, j < length
    (rounded up to whole vectors: gyw is 0 past length)."""
    s0, s1, s2 = sources[k], sources[k + 1], sources[k + 2]
    z = vsplat(0.0, src)
    a0 = b0 = c0 = a1 = b1 = c1 = a2 = b2 = c2 = a3 = b3 = c3 = z
    a4 = b4 = c4 = a5 = b5 = c5 = a6 = b6 = c6 = a7 = b7 = c7 = z
    for j in range(0, vector_length(length), LANES):
        x0, x1, x2 = vload(src, s0 + j), vload(src, s1 + j), vload(src, s2 + j)
        a0, b0, c0 = _dot3(a0, b0, c0, vload(gyw[0], j), x0, x1, x2)
        a1, b1, c1 = _dot3(a1, b1, c1, vload(gyw[1], j), x0, x1, x2)
        a2, b2, c2 = _dot3(a2, b2, c2, vload(gyw[2], j), x0, x1, x2)
        a3, b3, c3 = _dot3(a3, b3, c3, vload(gyw[3], j), x0, x1, x2)
        a4, b4, c4 = _dot3(a4, b4, c4, vload(gyw[4], j), x0, x1, x2)
        a5, b5, c5 = _dot3(a5, b5, c5, vload(gyw[5], j), x0, x1, x2)
        a6, b6, c6 = _dot3(a6, b6, c6, vload(gyw[6], j), x0, x1, x2)
        a7, b7, c7 = _dot3(a7, b7, c7, vload(gyw[7], j), x0, x1, x2)
    _add_sums(out[0], a0, b0, c0)
    _add_sums(out[1], a1, b1, c1)
    _add_sums(out[2], a2, b2, c2)
    _add_sums(out[3], a3, b3, c3)
    _add_sums(out[4], a4, b4, c4)
    _add_sums(out[5], a5, b5, c5)
    _add_sums(out[6], a6, b6, c6)
    _add_sums(out[7], a7, b7, c7)


@njit(cache=True)
def _dots4(src, sources, k, gyw, out, length):
    """_dots8 for four channels."""
    s0, s1, s2 = sources[k], sources[k + 1], sources[k + 2]
    z = vsplat(0.0, src)
    a0 = b0 = c0 = a1 = b1 = c1 = a2 = b2 = c2 = a3 = b3 = c3 = z
    for j in range(0, vector_length(length), LANES):
        x0, x1, x2 = vload(src, s0 + j), vload(src, s1 + j), vload(src, s2 + j)
        a0, b0, c0 = _dot3(a0, b0, c0, vload(gyw[0], j), x0, x1, x2)
        a1, b1, c1 = _dot3(a1, b1, c1, vload(gyw[1], j), x0, x1, x2)
        a2, b2, c2 = _dot3(a2, b2, c2, vload(gyw[2], j), x0, x1, x2)
        a3, b3, c3 = _dot3(a3, b3, c3, vload(gyw[3], j), x0, x1, x2)
    _add_sums(out[0], a0, b0, c0)
    _add_sums(out[1], a1, b1, c1)
    _add_sums(out[2], a2, b2, c2)
    _add_sums(out[3], a3, b3, c3)


@njit(cache=True)
def _dots1(src, sources, k, gyw, out, length):
    """_dots8 for one channel."""
    s0, s1, s2 = sources[k], sources[k + 1], sources[k + 2]
    a = b = c = vsplat(0.0, src)
    for j in range(0, vector_length(length), LANES):
        h = vload(gyw[0], j)
        a, b, c = vfma(a, h, vload(src, s0 + j)), vfma(b, h, vload(src, s1 + j)), vfma(c, h, vload(src, s2 + j))
    _add_sums(out[0], a, b, c)


@njit(cache=True, fastmath=FASTMATH)
def _sums4(src, sources, k, gyw, out, length):
    """_dots4 as LLVM-vectorised scalar sums (REGISTER_BLOCKED off): twelve dot products
    sharing one pass over three shifted input runs and four gy runs."""
    s0, s1, s2 = src[sources[k]:], src[sources[k + 1]:], src[sources[k + 2]:]
    g0, g1, g2, g3 = gyw[0], gyw[1], gyw[2], gyw[3]
    z = src.dtype.type(0)
    t00 = t01 = t02 = t10 = t11 = t12 = t20 = t21 = t22 = t30 = t31 = t32 = z
    for j in range(length):
        x0, x1, x2 = s0[j], s1[j], s2[j]
        h0, h1, h2, h3 = g0[j], g1[j], g2[j], g3[j]
        t00, t01, t02 = t00 + h0 * x0, t01 + h0 * x1, t02 + h0 * x2
        t10, t11, t12 = t10 + h1 * x0, t11 + h1 * x1, t12 + h1 * x2
        t20, t21, t22 = t20 + h2 * x0, t21 + h2 * x1, t22 + h2 * x2
        t30, t31, t32 = t30 + h3 * x0, t31 + h3 * x1, t32 + h3 * x2
    sums = ((t00, t01, t02), (t10, t11, t12), (t20, t21, t22), (t30, t31, t32))
    for u in range(QUAD):
        for i in range(TAPS):
            out[u, i] += sums[u][i]


@njit(cache=True, fastmath=FASTMATH)
def _sums1(src, sources, k, gyw, out, length):
    """_sums4 for one channel."""
    s0, s1, s2, h = src[sources[k]:], src[sources[k + 1]:], src[sources[k + 2]:], gyw[0]
    t0 = t1 = t2 = src.dtype.type(0)
    for j in range(length):
        t0, t1, t2 = t0 + h[j] * s0[j], t1 + h[j] * s1[j], t2 + h[j] * s2[j]
    out[0, 0] += t0
    out[0, 1] += t1
    out[0, 2] += t2


@njit(cache=True, inline="always")
def _dot3(a, b, c, h, x0, x1, x2):
    """Three running dot products of gy's vector h with three input vectors."""
    return vfma(a, h, x0), vfma(b, h, x1), vfma(c, h, x2)


@njit(cache=True, inline="always")
def _add_sums(row, a, b, c):
    row[0] += vsum(a)
    row[1] += vsum(b)
    row[2] += vsum(c)


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_flat(x, gy, gw, sh, sw, ph, pw, dh, dw, g, slots):
    """The flat weight-gradient at stride (sh, sw): a long dot product per tap, twelve (three
    taps by four output channels) per pass over the input's phase planes, in per-slot partial
    sums; samples batched into runs as in the forward (gy is 0 between them)."""
    n = x.shape[0]
    co, cig, kh, kw = gw.shape
    oh, ow = gy.shape[2], gy.shape[3]
    cog = co // g
    # Runs not rebalanced over the slots (1): that would regroup these sums, so change their
    # rounding; the weight-gradient keeps the grouping (and results) it had.
    lead, phases, _, (hq, wq), _, nb, counts, _, sources, (hp, buf_rows) = _flat_plan(
        n, cig, oh, ow, x.shape[2], x.shape[3], kh, kw, sh, sw, ph, pw, dh, dw, False, 1)
    plane, nin = hq * wq, phases[0] * phases[1]
    used = phases_read(kh, kw, sh, sw, dh, dw)
    width, pairs = sources.shape[1], sources[0]  # one output phase, pairs in gw's order
    blocks = -(-n // nb)
    size = cig * nin * buf_rows * wq  # a run buffer, then zeros: what the padding pairs read
    pad = vector_length(nb * plane)
    xp_buf = np.zeros((slots, size + pad + LANES), x.dtype)  # padding stays 0 (pad_phases)
    if pairs.max() + pad > xp_buf.shape[1]:  # the longest run's reach
        raise IndexError("conv2d_backward_weight_flat: a vector read would pass the end of its run buffer")
    gyw_buf = _row_buffer(slots, BLOCK, nb * plane, x.dtype)  # gy on wide rows; the rest stays 0
    blocked = _register_blocked(x)
    partial = np.zeros((slots, co, width), x.dtype)
    for tid in prange(slots):
        src, gyw, part = xp_buf[tid], gyw_buf[tid], partial[tid]
        xp = src[:size].reshape(cig, nin, buf_rows, wq)
        for t in range(tid, blocks * g, slots):
            i0, gi = (t // g) * nb, t % g
            m = min(nb, n - i0)  # samples in this run
            length = _load_run(x, i0, m, gi * cig, xp, lead, phases, (oh - 1) * wq + ow, hq, hp, used)
            o, o1 = gi * cog, (gi + 1) * cog
            while o < o1:
                nu = _block(o1 - o, blocked)
                for s in range(m):
                    to_wide_rows(gy[i0 + s, o:o + nu], gyw[:, s * plane:(s + 1) * plane], wq)
                gyw[:nu, length:] = 0  # a shorter last run: what an earlier run left there
                for k in range(0, width, TAPS):
                    if nu == 8:
                        _dots8(src, pairs, k, gyw, part[o:o + nu, k:k + TAPS], length)
                    elif nu == QUAD and blocked:
                        _dots4(src, pairs, k, gyw, part[o:o + nu, k:k + TAPS], length)
                    elif nu == QUAD:
                        _sums4(src, pairs, k, gyw, part[o:o + nu, k:k + TAPS], length)
                    elif blocked:
                        _dots1(src, pairs, k, gyw, part[o:o + nu, k:k + TAPS], length)
                    else:
                        _sums1(src, pairs, k, gyw, part[o:o + nu, k:k + TAPS], length)
                o += nu
    _reduce_slots(partial, gw.reshape(co, cig * kh * kw))


def transpose_groups(w, g):
    """w (CO, CI/G, KH, KW) -> (CI, CO/G, KH, KW), each group's channels transposed: the weight
    of the adjoint flat pass that computes conv2d's input-gradient (its tap offsets hold the
    180-degree rotation; docs/convolution.md)."""
    co, cig, kh, kw = w.shape
    wt = w.reshape(g, co // g, cig, kh, kw).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(wt).reshape(g * cig, co // g, kh, kw)


def flip_kernel(w, g):
    """w (CO, CI/G, KH, KW) -> (CI, CO/G, KH, KW), group by group, rotated 180 degrees: the
    weight of the stride-1 forward that computes conv2d's input-gradient from gy padded by
    ``ConvGeom.full_padding`` (the flat kernels keep the rotation in their tap offsets
    instead, ``transpose_groups``)."""
    return np.ascontiguousarray(transpose_groups(w, g)[..., ::-1, ::-1])


# ----------------------------------------------------------------------------- im2col, stride 1
#
# At stride 1 the unfolded columns of tap (a, bb) are the padded plane read from offset
# a*dh*wp + bb*dw on "wide" rows (the flat runs of the direct kernels above). So the
# kw column shifts are copied once, shifted[ci*kw + bb, j] = xp[ci].flat[bb*dw + j], and
# the kh row shifts cost nothing: tap row a's columns are ``shifted`` read from column
# a*dh*wp on, a window a BLAS product takes through its leading dimension. A pass is then
# kh products with K = cig*kw, accumulated (beta = 1) on wide output rows, and the
# unfolded copy is kw times the input instead of kh*kw times. Weights are rearranged to
# w3 (kh, CO, CI/G*kw): w3[a, o, ci*kw + bb] = w[o, ci, a, bb].

@njit(**KERNEL)
def shift_columns(xp, shifted, kw, dw):
    """shifted[ci*kw + bb, :] = xp[ci].flat[bb*dw:][:L], L = shifted's row length."""
    cig, length = xp.shape[0], shifted.shape[1]
    for ci in range(cig):
        src = xp[ci].reshape(xp.shape[1] * xp.shape[2])
        for bb in range(kw):
            copy_run(src[bb * dw:bb * dw + length], shifted[ci * kw + bb])


@njit(cache=True)
def _shift_plan(c, w3_shape, g, oh, ow, dh, dw):
    """Sizes of a stride-1 im2col pass with weights w3 (kh, co, k = cig*kw):
    ``(kh, co, k, cig, cog, kw, hp, wp, run, L)``, with the padded plane (hp, wp), the flat
    output run, and L the shifted rows' length, the longest that every tap row's window
    (a*dh*wp + run <= L) and every shift fit."""
    kh, co, k = w3_shape
    cig, cog = c // g, co // g
    kw = k // cig
    hp, wp = _axis_plan(kh, 1, 0, dh, oh, 0, False)[5], _axis_plan(kw, 1, 0, dw, ow, 0, False)[5]
    return kh, co, k, cig, cog, kw, hp, wp, (oh - 1) * wp + ow, hp * wp - (kw - 1) * dw


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_forward_shifted(x, w3, b, y, ep, relu, ph, pw, dh, dw, g, slots):
    """Stride-1 forward as kh products per (sample, group): y_g = epilogue(sum_a w3[a]_g @ shifted(a)
    + b_g)."""
    n, oh, ow = x.shape[0], y.shape[2], y.shape[3]
    kh, co, k, cig, cog, kw, hp, wp, run, length = _shift_plan(x.shape[1], w3.shape, g, oh, ow, dh, dw)
    xp_buf = np.zeros((slots, cig, 1, hp, wp), x.dtype)  # one phase; borders stay 0 (pad_phases)
    sh_buf = np.empty((slots, k, length), x.dtype)
    out_buf = np.empty((slots, cog, oh * wp), x.dtype)
    wf = w3.reshape(kh * co * k)
    for tid in prange(slots):
        xp, shifted, out = xp_buf[tid], sh_buf[tid], out_buf[tid]
        sf, of = shifted.reshape(k * length), out.reshape(cog * oh * wp)
        for t in range(tid, n * g, slots):
            i, gi = t // g, t % g
            pad_phases(x[i], gi * cig, xp, ph, pw, 1, 1)
            shift_columns(xp.reshape(cig, hp, wp), shifted, kw, dw)
            for a in range(kh):
                gemm(False, False, cog, run, k, wf, (a * co + gi * cog) * k, k, sf, a * dh * wp, length,
                     0.0 if a == 0 else 1.0, of, 0, oh * wp)
            for o in range(cog):
                chan = channel(ep, gi * cog + o)
                for r in range(oh):
                    biased_run(out[o, r * wp:r * wp + ow], b[gi * cog + o], y[i, gi * cog + o, r], chan, relu)


@njit(parallel=PARALLEL, **KERNEL)
def conv2d_backward_weight_shifted(x, gy, gw3, ph, pw, dh, dw, g, slots):
    """Stride-1 weight-gradient: gw3[a]_g += gy_g (wide rows) @ shifted(a)^T per sample,
    in per-slot partial sums."""
    n, oh, ow = x.shape[0], gy.shape[2], gy.shape[3]
    kh, co, k, cig, cog, kw, hp, wp, run, length = _shift_plan(x.shape[1], gw3.shape, g, oh, ow, dh, dw)
    xp_buf = np.zeros((slots, cig, 1, hp, wp), x.dtype)  # one phase; borders stay 0 (pad_phases)
    sh_buf = np.empty((slots, k, length), x.dtype)
    gyw_buf = np.zeros((slots, cog, oh * wp), x.dtype)  # gy on wide rows; the extra columns stay 0
    partial = np.zeros((slots, kh * co * k), x.dtype)
    for tid in prange(slots):
        xp, shifted, gyw, part = xp_buf[tid], sh_buf[tid], gyw_buf[tid], partial[tid]
        sf, gf = shifted.reshape(k * length), gyw.reshape(cog * oh * wp)
        for t in range(tid, n * g, slots):
            i, gi = t // g, t % g
            pad_phases(x[i], gi * cig, xp, ph, pw, 1, 1)
            shift_columns(xp.reshape(cig, hp, wp), shifted, kw, dw)
            to_wide_rows(gy[i, gi * cog:(gi + 1) * cog], gyw, wp)
            for a in range(kh):
                gemm(False, True, cog, k, run, gf, 0, oh * wp, sf, a * dh * wp, length,
                     1.0, part, (a * co + gi * cog) * k, k)
    _reduce_slots(partial.reshape(slots, 1, kh * co * k), gw3.reshape(1, kh * co * k))


# ----------------------------------------------------------------------------- launchers

# The flat and shifted kernels run where their planes (all phases of one channel and sample)
# are at most SCRATCH_RATIO times the input and output planes together, plus SCRATCH_SLACK
# elements for small planes (a 1x1 input padded by 1 for a 3x3 kernel). A 1x1 input with
# dilation=10000, padding=10000 and a 3x3 kernel (a 1x1 output) would need planes of 20001^2
# elements per channel and thread (4.3 GB, 17 s); the general kernels' scratch is
# proportional to the output.
SCRATCH_RATIO = 4
SCRATCH_SLACK = 4096


@functools.lru_cache(maxsize=4096)  # asked at every call of a layer
def _plane_fits(geom, pass_) -> bool:
    """Whether the planes of ``pass_`` are within the bound: the forward and weight-gradient
    load sh*sw phase planes of the input (one padded plane at stride 1); the input-gradient's
    adjoint pass one plane of gy (_flat_plan)."""
    adjoint = pass_ == "backward_input"
    sizes = (geom.h, geom.w) if adjoint else (geom.oh, geom.ow)
    sizes_in = (geom.oh, geom.ow) if adjoint else (geom.h, geom.w)
    # The Python function, not the compiled one: kernels called from Python are only
    # recorded, not run, while cnn_numba.warmup records a step.
    hp, wq = (_axis_plan.py_func(k, s, p, d, size, size_in, adjoint)[i] * (1 if adjoint else s)
              for k, s, p, d, size, size_in, i in zip((geom.kh, geom.kw), geom.stride, (geom.ph, geom.pw),
                                                      geom.dilation, sizes, sizes_in, (5, 6)))
    plane = hp * wq  # a sample alone in a run buffer (nb = 1): hp rows (all phases) wq wide
    return plane <= SCRATCH_RATIO * (geom.h * geom.w + geom.oh * geom.ow) + SCRATCH_SLACK


def supports_flat(geom, pass_) -> bool:
    """Any stride, within the plane bound."""
    return _plane_fits(geom, pass_)


def supports_shifted(geom, pass_) -> bool:
    """Stride 1 and the plane bound; for the input-gradient (the flipped forward, whose
    products have C_in/G rows) also at least 8 input channels per group and a kernel of more
    than one tap. With fewer rows OpenBLAS's AVX2 kernels are slow on them (LeNet-5's layers,
    1 and 6 channels: 1.44 and 1.49 ms against the general input-gradient's 0.27 and 0.40;
    with AVX-512 0.28 and 0.31), and a 1x1 kernel has no shifts to save."""
    if geom.stride != (1, 1) or not _plane_fits(geom, pass_):
        return False
    return pass_ != "backward_input" or (geom.cig >= 2 * QUAD and geom.kh * geom.kw > 1)


def forward_flat(x, w, b, y, geom, epilogue=None):
    conv2d_forward_flat(x, w, b, y, *epilogue_args(epilogue, y.dtype), geom.sh, geom.sw, geom.ph, geom.pw,
                        geom.dh, geom.dw, geom.g, False, get_num_threads())


def backward_input_flat(gy, w, gx, geom):
    """gx = the adjoint flat pass over gy (one stride-1 correlation per phase of gx)."""
    conv2d_forward_flat(gy, transpose_groups(w, geom.g), np.zeros(geom.c, gx.dtype), gx, *no_epilogue(gx.dtype),
                        geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g, True, get_num_threads())


def backward_weight_flat(x, gy, gw, geom):
    conv2d_backward_weight_flat(x, gy, gw, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.g,
                                get_num_threads())
    _exact_if_nan(x, gy, gw, geom, backward_weight_direct)


def _taps_first(w):
    """w (CO, CI/G, KH, KW) -> w3 (KH, CO, CI/G*KW), the stride-1 im2col products' layout."""
    co, cig, kh, kw = w.shape
    return np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(kh, co, cig * kw)


def forward_shifted(x, w, b, y, geom, epilogue=None):
    conv2d_forward_shifted(x, _taps_first(w), b, y, *epilogue_args(epilogue, y.dtype), geom.ph, geom.pw, geom.dh,
                           geom.dw, geom.g, get_num_threads())


def backward_input_shifted(gy, w, gx, geom):
    """gx = the stride-1 forward of gy with the flipped kernel (C, CO/G, KH, KW) and the full
    padding (a negative one crops: pad_phases)."""
    fh, fw = geom.full_padding
    conv2d_forward_shifted(gy, _taps_first(flip_kernel(w, geom.g)), np.zeros(geom.c, gx.dtype), gx,
                           *no_epilogue(gx.dtype), fh, fw, geom.dh, geom.dw, geom.g, get_num_threads())


def backward_weight_shifted(x, gy, gw, geom):
    gw3 = np.empty((geom.kh, geom.co, geom.cig * geom.kw), gw.dtype)
    conv2d_backward_weight_shifted(x, gy, gw3, geom.ph, geom.pw, geom.dh, geom.dw, geom.g, get_num_threads())
    gw[:] = gw3.reshape(geom.kh, geom.co, geom.cig, geom.kw).transpose(1, 2, 0, 3)
    _exact_if_nan(x, gy, gw, geom, backward_weight_im2col)


def _exact_if_nan(x, gy, gw, geom, general) -> None:
    """Redo a flat or shifted weight-gradient with the ``general`` kernel when it holds a NaN.

    The flat and shifted kernels sum over wide rows, whose gap columns pair zeros of gy with
    input pixels that the true sum never reads: an inf there makes a NaN that PyTorch does
    not have. Only a non-finite input can do that, and a NaN in gw (a small array) shows it,
    so finite inputs pay one scan of gw; the general kernel reads exact windows only."""
    if np.isnan(gw).any():
        gw[...] = 0
        general(x, gy, gw, geom)
