"""CUDA twins of the scalar index helpers in kernels/index.py: the same Python
functions compiled for the device, so CPU and GPU kernels share one copy of the
window arithmetic (``i = o*s - p + t*d`` and what follows from it); and, built on them,
the one element of an im2col matrix that the CUDA column kernels and the implicit GEMM
(which never stores the matrix) both read through ``column_entry``; and, on the host, the
correlations (per phase of the output) that the two direct kernels launch, ``correlations``."""
import functools

from numba import cuda

from .. import index as _cpu
from .launch import device_function

tap = device_function(_cpu.tap)
out_range = device_function(_cpu.out_range)
pool_window = device_function(_cpu.pool_window)
adaptive_window = device_function(_cpu.adaptive_window)
column_row = device_function(_cpu.column_row)
digits = device_function(_cpu.digits)
digits_add = device_function(_cpu.digits_add)
phase_length = device_function(_cpu.phase_length)
phase_taps = device_function(_cpu.phase_taps)


@cuda.jit(device=True, inline=True)
def sampled(i, u, size):
    """Whether row (or column) i of a plane of ``size`` rows upsampled by u holds a sample
    (u = 1, every unstrided pass: no division)."""
    if u == 1:
        return 0 <= i < size
    return i >= 0 and i % u == 0 and i // u < size


@cuda.jit(device=True, inline=True)
def sample(i, u):
    """The sample at row (or column) i of a plane upsampled by u (where ``sampled``)."""
    return i if u == 1 else i // u


@cuda.jit(device=True, inline=True)
def column_origin(win, col):
    """(n, r, q) of column ``col`` of an im2col matrix read through ``win`` (see
    ``column_entry``): its sample and output position, the digits of col in the radix
    (any, hd, wd)."""
    return digits(col, win[11], win[12])


@cuda.jit(device=True, inline=True)
def column_value(src, win, row, col):
    """``column_entry`` with its row and column already split: ``row`` = (c, a, b) as
    ``column_row`` gives, ``col`` = (n, r, q) as ``column_origin`` gives. A thread that
    walks rows or columns by a fixed step carries their splits along (``digits_add``)."""
    c0, sh, sw, ph, pw, dh, dw, uh, uw, kh, kw, hd, wd = win
    i, j = tap(col[1], sh, ph, row[1], dh), tap(col[2], sw, pw, row[2], dw)
    v = src.dtype.type(0)
    if sampled(i, uh, src.shape[2]) and sampled(j, uw, src.shape[3]):
        v = src[col[0], c0 + row[0], sample(i, uh), sample(j, uw)]
    return v


@cuda.jit(device=True, inline=True)
def column_entry(src, win, row, col):
    """cols[row, col] of the im2col matrix of ``src`` (N, C, H, W) read through a window

        win = (c0, sh, sw, ph, pw, dh, dw, uh, uw, kh, kw, hd, wd):

    rows (c, a, b) as ``column_row``, columns the flattened (n, r, q) of an hd x wd output
    plane, and the entry up(src)[n, c0 + c, tap(r, a), tap(q, b)], 0 in the padding, where
    up(src) is src upsampled by (uh, uw): a sample every uh rows and uw columns, zeros
    between (the input-gradient's view of gy, see kernels/cuda/conv.py)."""
    return column_value(src, win, column_row(row, win[9], win[10]), column_origin(win, col))


@functools.lru_cache(maxsize=4096)  # asked at every launch of a layer: host time per launch counts
def correlations(geom, pass_: str) -> tuple:
    """The direct kernels' correlations for the forward or the input-gradient of ``geom``
    (host code): one per phase of the output, each ``(scalars, (uh, uw))``, the scalars

        (sh, sw, ph, pw, dh, dw, ka, kb, a0, sa, b0, sb, fh, fw, fr, fq)

    as kernels/cuda/conv.py's ``_correlate`` and conv_depthwise.py's ``_depthwise`` take
    them: output (fr + r*fh, fq + q*fw) for (r, q) in the phase's uh x uw plane sums the
    ka x kb taps (a, b) of the source at (tap(r, sh, ph, a, dh), tap(q, sw, pw, b, dw))
    times w's tap (a0 + a*sa, b0 + b*sb). The forward: the layer's stride, padding and
    dilation, the whole kernel, one phase (oh, ow). The input-gradient: gx's fh x fw phases
    (the layer's stride), each at stride 1 with only the taps that land on it, numbered
    backwards (``phase_taps``): no zeros of an upsampled gy multiplied."""
    if pass_ == "forward":
        rows = [(geom.kh, 0, 1, geom.ph, geom.dh, geom.oh)]
        cols = [(geom.kw, 0, 1, geom.pw, geom.dw, geom.ow)]
        sh, sw = geom.stride
    else:
        rows = [_flipped_phase(r, geom.kh, geom.sh, geom.ph, geom.dh, geom.h) for r in range(geom.sh)]
        cols = [_flipped_phase(q, geom.kw, geom.sw, geom.pw, geom.dw, geom.w) for q in range(geom.sw)]
        sh = sw = 1
    return tuple(((sh, sw, ph, pw, dh, dw, ka, kb, a0, sa, b0, sb, len(rows), len(cols), fr, fq), (uh, uw))
                 for fr, (ka, a0, sa, ph, dh, uh) in enumerate(rows)
                 for fq, (kb, b0, sb, pw, dw, uw) in enumerate(cols))


def _flipped_phase(r, k, s, p, d, size):
    """Phase r of one axis of the input-gradient (``phase_taps``) as (taps, first tap, tap step,
    leading padding, dilation, plane length), its taps of w numbered backwards."""
    a0, step, taps, lead, dil, u = _cpu.phase_taps.py_func(r, k, s, p, d, size)
    return taps, a0 + (taps - 1) * step, -step, lead, dil, u
