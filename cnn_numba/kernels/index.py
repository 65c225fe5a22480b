"""Scalar index helpers shared by every kernel, CPU (``@njit``) and CUDA (``@cuda.jit``).

A window op maps output position ``o`` and kernel tap ``t`` to the input position

    i = o*s - p + t*d            (s stride, p leading padding, d dilation)

Everything below derives from that one line. Kernels never repeat it: they call
``tap`` for a single position and ``out_range`` for the run of outputs that read a
valid (non-padding) input through tap ``t``, which turns the bounds test into loop
limits. The same functions serve the adjoint direction (an input-gradient gathers
from the outputs ``o`` whose ``tap`` lands on it), which is why conv2d's
input-gradient and conv_transpose2d's forward are one kernel.

Plain ``numba.njit`` functions: Numba compiles them for the CPU when an ``@njit``
kernel calls them and for the GPU when a ``@cuda.jit`` kernel does.
"""
from numba import njit


@njit(cache=True, inline="always")
def tap(o, s, p, t, d):
    """Input coordinate read by output ``o`` through kernel tap ``t``."""
    return o * s - p + t * d


@njit(cache=True, inline="always")
def out_range(t, s, p, d, size_in, size_out):
    """Outputs ``[lo, hi)`` whose tap ``t`` reads inside ``[0, size_in)``.

    ``0 <= o*s - p + t*d < size_in``  <=>  ``ceil((p - t*d)/s) <= o <= floor((size_in-1+p-t*d)/s)``.
    """
    off = p - t * d
    lo = -((-off) // s) if off > 0 else 0
    last = size_in - 1 + off
    hi = last // s + 1 if last >= 0 else 0
    if hi > size_out:
        hi = size_out
    if hi < lo:
        hi = lo
    return lo, hi


@njit(cache=True, inline="always")
def digits(i, r1, r0):
    """The digits of i in the mixed radix (any, r1, r0): (i // (r1*r0), i // r0 % r1, i % r0),
    the form ``digits_add`` carries along."""
    return i // (r1 * r0), (i % (r1 * r0)) // r0, i % r0


@njit(cache=True, inline="always")
def column_row(row, kh, kw):
    """``(c, a, b)`` of row ``row`` of an im2col matrix, whose rows run over (channel,
    tap row, tap column) with the tap column fastest: its ``digits`` in the radix (any, kh, kw)."""
    return digits(row, kh, kw)


@njit(cache=True, inline="always")
def digits_add(d, s, r1, r0):
    """The digits of i + j in the mixed radix (any, r1, r0) from those of i (``d``) and j
    (``s``), each digit below its radix: a split such as ``column_row``'s carried along by a
    fixed step with no division (each digit carries at most one)."""
    d0, d1 = d[2] + s[2], d[1] + s[1]
    if d0 >= r0:
        d0 -= r0
        d1 += 1
    d2 = d[0] + s[0]
    if d1 >= r1:
        d1 -= r1
        d2 += 1
    return d2, d1, d0


@njit(cache=True, inline="always")
def phase_length(r, s, size):
    """How many of the positions [0, size) are r modulo s (r < s): ceil((size - r)/s)."""
    return max(0, (size - r + s - 1) // s)


@njit(cache=True, inline="always")
def phase_taps(r, k, s, p, d, size):
    """Phase ``r`` of one axis of a strided conv's input-gradient as a stride-1 correlation:
    ``(a0, step, taps, lead, dil, u)``.

    gx[i] = sum over (o, a) with tap(o, s, p, a, d) = i of gy[o] * w[a]. On the phase
    i = s*u + r (u < ``u``, ``phase_length``; ``size`` gx's length) o = u + (r + p - a*d)/s
    is whole only for the taps a with a*d = r + p (mod s): none unless gcd(d, s) divides
    r + p, else a0 (the least, < s), a0 + step, ... < k, ``taps`` of them, step = s/gcd(d, s).
    Tap j of them reads o = u + (r + p - a0*d)/s - j*dil, dil = d/gcd(d, s); numbered
    backwards (t = taps-1-j, the phase's sub-kernel flipped) that is o = tap(u, 1, lead, t,
    dil): a stride-1 correlation of gy with leading padding ``lead`` (any sign), the
    sub-kernel's ``taps`` and dilation ``dil``. At s = 1: the whole kernel, d, and the full
    padding d*(k-1) - p. (kernels/conv_stride1._axis_plan lists the same map per tap for the
    CPU's run buffers; tests/test_cuda_conv.py checks that the two agree.)"""
    a0 = -1
    for a in range(min(k, s)):
        if a0 < 0 and (r + p - a * d) % s == 0:
            a0 = a
    g, m = d, s  # gcd(d, s), Euclid's way
    while m:
        g, m = m, g % m
    step, dil = s // g, d // g
    u = phase_length(r, s, size)
    if a0 < 0:
        return 0, step, 0, 0, dil, u
    taps = (k - 1 - a0) // step + 1
    return a0, step, taps, dil * (taps - 1) - (r + p - a0 * d) // s, dil, u


@njit(cache=True, inline="always")
def pool_window(o, s, p, k, size_in):
    """Average-pool window of output ``o``: ``(start, end, size_with_padding)``.

    PyTorch's rule: the window is clipped to the padded input for the
    ``count_include_pad`` divisor, then to the real input for the sum.
    """
    start = o * s - p
    end = min(start + k, size_in + p)
    padded = end - start
    return max(start, 0), min(end, size_in), padded


@njit(cache=True, inline="always")
def adaptive_window(o, size_in, size_out):
    """Adaptive-pool window ``[floor(o*I/O), ceil((o+1)*I/O))``."""
    return (o * size_in) // size_out, -((-(o + 1) * size_in) // size_out)


@njit(cache=True, inline="always")
def axpy(alpha, src, s0, ss, dst, d0, ds, count):
    """``dst[d0 + j*ds] += alpha * src[s0 + j*ss]`` for ``j < count``.

    The inner loop of every convolution kernel; unit strides get their own loop so
    LLVM vectorises it.
    """
    if ss == 1 and ds == 1:
        a, b = src[s0:s0 + count], dst[d0:d0 + count]  # views indexed from 0: no wraparound test per element
        for j in range(count):
            b[j] += alpha * a[j]
    else:
        for j in range(count):
            dst[d0 + j * ds] += alpha * src[s0 + j * ss]


@njit(cache=True, inline="always")
def copy_run(src, dst):
    """``dst[j] = src[j]`` for ``j < src.size``; both 1-d.

    Kernels copy rows with this, not with a slice assignment: between two arrays Numba
    lowers that through its general broadcasting setitem, which measured 3x slower on
    1024-element rows and 2x on 32-element ones; this loop LLVM vectorises.
    """
    for j in range(src.size):
        dst[j] = src[j]


@njit(cache=True, inline="always")
def dot(a, a0, sa, b, b0, sb, count, acc):
    """``acc + sum_j a[a0 + j*sa] * b[b0 + j*sb]`` (unit strides vectorised)."""
    if sa == 1 and sb == 1:
        u, v = a[a0:a0 + count], b[b0:b0 + count]
        for j in range(count):
            acc += u[j] * v[j]
    else:
        for j in range(count):
            acc += a[a0 + j * sa] * b[b0 + j * sb]
    return acc
