"""CUDA twins of the scalar index helpers in kernels/index.py: the same Python
functions compiled for the device, so CPU and GPU kernels share one copy of the
window arithmetic (``i = o*s - p + t*d`` and what follows from it); and, built on them,
the one element of an im2col matrix that the CUDA column kernels and the implicit GEMM
(which never stores the matrix) both read through ``column_entry``."""
from numba import cuda

from .. import index as _cpu
from .launch import device_function

tap = device_function(_cpu.tap)
out_range = device_function(_cpu.out_range)
pool_window = device_function(_cpu.pool_window)
adaptive_window = device_function(_cpu.adaptive_window)
column_row = device_function(_cpu.column_row)


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
    ``column_entry``): its sample and output position."""
    m = win[11] * win[12]
    return col // m, (col % m) // win[12], col % win[12]


@cuda.jit(device=True, inline=True)
def column_value(src, win, row, n, r, q):
    """``column_entry`` at row ``row`` of the column whose origin (``column_origin``) is
    (n, r, q): a thread that stages one column for many rows splits it once."""
    c0, sh, sw, ph, pw, dh, dw, uh, uw, kh, kw, hd, wd = win
    c, a, bb = column_row(row, kh, kw)
    i, j = tap(r, sh, ph, a, dh), tap(q, sw, pw, bb, dw)
    v = src.dtype.type(0)
    if sampled(i, uh, src.shape[2]) and sampled(j, uw, src.shape[3]):
        v = src[n, c0 + c, sample(i, uh), sample(j, uw)]
    return v


@cuda.jit(device=True, inline=True)
def column_entry(src, win, row, col):
    """cols[row, col] of the im2col matrix of ``src`` (N, C, H, W) read through a window

        win = (c0, sh, sw, ph, pw, dh, dw, uh, uw, kh, kw, hd, wd):

    rows (c, a, b) as ``column_row``, columns the flattened (n, r, q) of an hd x wd output
    plane, and the entry up(src)[n, c0 + c, tap(r, a), tap(q, b)], 0 in the padding, where
    up(src) is src upsampled by (uh, uw): a sample every uh rows and uw columns, zeros
    between (the input-gradient's view of gy, see kernels/cuda/conv.py)."""
    n, r, q = column_origin(win, col)
    return column_value(src, win, row, n, r, q)
