"""CUDA layer kernels: sigmoid/tanh, batch normalisation, fused softmax cross-entropy and
the optimiser steps, registered under device "cuda" with the signatures, dtypes and return
values of the CPU launchers in kernels/nn.py (whose docstring has the layouts and formulas).

How the work is spread over threads:
    sigmoid, tanh, batch_norm_forward,      one thread per element
    cross_entropy_backward
    batch_norm_stats, batch_norm_backward   one block per channel: its REDUCE threads share
                                            the channel's m = N*L values (``_walk``), then
                                            meet in a shared-memory tree
    cross_entropy_forward                   one warp-sized block per row: max, then the sums
                                            of exp(z - max) and of z
    sgd_step, adam_step                     one thread per parameter element, running the
                                            CPU's per-element update compiled for the device

Reductions accumulate in float64, like the CPU, and combine the threads' partial sums in a
fixed tree order: the same input gives the same bits on every run (no atomics). Per-element
arithmetic stays in the array's dtype: Python scalars are cast with ``scalar`` first.
Arrays are C-contiguous device arrays; (N, C, *) tensors are indexed flat as (N, C, L).
"""
import math

from numba import cuda, float64

from ...backend import register
from .. import nn as _cpu
from .elementwise import epilogue, pointwise
from .graph import step_scalars
from .launch import SIMULATOR, device_function, empty, flat, jit, launch, launch_grid, scalar
from .reduce import block_reduce

CUDA = "cuda"
# Threads of a per-channel block and of a per-row block (one warp), powers of two. The
# simulator pays for every thread at every barrier of a tree, so it gets smaller blocks.
REDUCE = 8 if SIMULATOR else 256
ROW = 8 if SIMULATOR else 32


@device_function
def _walk(t, n, l):
    """How thread t of a REDUCE-thread block covers one channel of an (N, C, L) array: rows
    i0, i0 + di, ... < n and, in each, columns j0, j0 + dj, ... < l. A row of L >= REDUCE values
    is spread over the whole block; shorter rows go to REDUCE // L groups of L threads, one column
    each. Consecutive threads read consecutive columns, and no thread divides per element."""
    dj = min(l, REDUCE)
    di = REDUCE // dj
    i0 = t // dj
    return (i0 if i0 < di else n), di, t % dj, dj


# ----------------------------------------------------------------------------- sigmoid, tanh

@jit
def _sigmoid_forward(x, half, y):
    """y = 1/(1 + exp(-x)) = 1/2 + tanh(x/2)/2: no overflow for large |x| (the CPU's formula)."""
    i = cuda.grid(1)
    if i < y.size:
        y[i] = half + half * math.tanh(half * x[i])


@jit
def _sigmoid_backward(y, gy, one, gx):
    i = cuda.grid(1)
    if i < gx.size:
        gx[i] = gy[i] * y[i] * (one - y[i])


@jit
def _tanh_forward(x, y):
    i = cuda.grid(1)
    if i < y.size:
        y[i] = math.tanh(x[i])


@jit
def _tanh_backward(y, gy, one, gx):
    i = cuda.grid(1)
    if i < gx.size:
        gx[i] = gy[i] * (one - y[i] * y[i])


def _like(a):
    return empty(a.shape, a.dtype)


register("sigmoid_forward", CUDA)(lambda x: pointwise(_sigmoid_forward, x, 0.5))
register("sigmoid_backward", CUDA)(lambda y, gy: pointwise(_sigmoid_backward, y, gy, 1))
register("tanh_forward", CUDA)(lambda x: pointwise(_tanh_forward, x))
register("tanh_backward", CUDA)(lambda y, gy: pointwise(_tanh_backward, y, gy, 1))


# ----------------------------------------------------------------------------- batch normalisation

@jit
def _bn_stats(x, n, c, l, mean, var):
    """Block ch: mean[ch] and biased var[ch] over the channel's m = n*l values; two passes for accuracy."""
    buf = cuda.shared.array(REDUCE, float64)
    ch, t = cuda.blockIdx.x, cuda.threadIdx.x
    i0, di, j0, dj = _walk(t, n, l)
    m = n * l
    s = 0.0
    for i in range(i0, n, di):
        row = (i * c + ch) * l
        for k in range(row + j0, row + l, dj):
            s += x[k]
    mu = block_reduce(buf, s, False) / m
    ss = 0.0
    for i in range(i0, n, di):
        row = (i * c + ch) * l
        for k in range(row + j0, row + l, dj):
            d = x[k] - mu
            ss += d * d
    v = block_reduce(buf, ss, False) / m
    if t == 0:
        mean[ch] = mu
        var[ch] = v


@jit
def _bn_update_stats(running_mean, running_var, mean, var, keep, momentum, unbiased_momentum):
    ch = cuda.grid(1)
    if ch < mean.size:
        running_mean[ch] = keep * running_mean[ch] + momentum * mean[ch]
        running_var[ch] = keep * running_var[ch] + unbiased_momentum * var[ch]


@cuda.jit(device=True, inline=True)
def _invstd(var, eps):
    """1/sqrt(var + eps) in float64 (eps is a float64), like the CPU's _invstd_into; the
    caller's store rounds it to the array's dtype."""
    return 1.0 / math.sqrt(var + eps)


@jit
def _bn_invstd(var, eps, invstd):
    ch = cuda.grid(1)
    if ch < var.size:
        invstd[ch] = _invstd(var[ch], eps)


@jit
def _bn_forward(x, c, l, mean, invstd, w, b, y):
    """y = (x - mean) * (invstd * w) + b per channel: the conv epilogue's expression (one copy,
    elementwise.epilogue), so a conv fused with its eval-mode batch norm gives these bits."""
    i = cuda.grid(1)
    if i < y.size:
        ch = i // l % c
        y[i] = epilogue(x[i], (True, mean[ch], invstd[ch] * w[ch], b[ch]), False)


@jit
def _bn_epilogue(mean, var, w, b, eps, has_w, has_b, ep):
    """ep (3, C) = the rows (mean, invstd * w, b), invstd as _bn_invstd stores it and the
    product in ep's dtype, as _bn_forward's ``invstd[ch] * w[ch]``; w taken as 1 and b as 0
    where absent (``has_w``, ``has_b``): the CPU's _epilogue_rows."""
    ch = cuda.grid(1)
    if ch < var.size:
        ep[0, ch] = mean[ch]
        ep[1, ch] = _invstd(var[ch], eps)
        if has_w:
            ep[1, ch] = ep[1, ch] * w[ch]
        ep[2, ch] = b[ch] if has_b else 0


@jit
def _bn_backward(gy, x, n, c, l, mean, invstd, w, training, gx, gw, gb):
    """Block ch: the sums of gy and gy*(x - mean) over the channel, then its gx (module docstring
    of kernels/nn.py)."""
    buf = cuda.shared.array(REDUCE, float64)
    ch, t = cuda.blockIdx.x, cuda.threadIdx.x
    i0, di, j0, dj = _walk(t, n, l)
    m = n * l
    mu, istd = mean[ch], invstd[ch]
    sg = 0.0
    sgx = 0.0  # sum(gy * (x - mean)); times invstd it is sum(gy * xhat)
    for i in range(i0, n, di):
        row = (i * c + ch) * l
        for k in range(row + j0, row + l, dj):
            g = gy[k]
            sg += g
            sgx += g * (x[k] - mu)
    sg = block_reduce(buf, sg, False)
    sgx = block_reduce(buf, sgx, False)
    if t == 0:
        gw[ch] = sgx * istd
        gb[ch] = sg
    scale = w[ch] * istd
    a = sg / m if training else 0.0
    bx = sgx * istd * istd / m if training else 0.0  # xhat * sum(gy*xhat)/m = (x - mean) * bx
    for i in range(i0, n, di):
        row = (i * c + ch) * l
        for k in range(row + j0, row + l, dj):
            gx[k] = scale * (gy[k] - a - (x[k] - mu) * bx) if training else scale * gy[k]


def _ncl(x):
    """(N, C, L) of x (N, C, *) viewed as (N, C, L); L is 1 when x is empty."""
    n, c = x.shape[:2]
    return n, c, (x.size // (n * c) if x.size else 1)


@register("batch_norm_stats", CUDA)
def batch_norm_stats(x):
    """(mean, biased var), each (C,) in x's dtype."""
    n, c, l = _ncl(x)
    mean, var = empty((c,), x.dtype), empty((c,), x.dtype)
    launch_grid(_bn_stats, c, REDUCE, flat(x), n, c, l, mean, var)
    return mean, var


@register("batch_norm_update_stats", CUDA)
def batch_norm_update_stats(running_mean, running_var, mean, var, momentum, m):
    """In place: running = (1 - momentum) running + momentum batch, the variance unbiased (m/(m-1))."""
    dt = running_mean.dtype
    launch(_bn_update_stats, mean.size, running_mean, running_var, mean, var, scalar(1 - momentum, dt),
           scalar(momentum, dt), scalar(momentum * m / (m - 1), dt))


@register("batch_norm_forward", CUDA)
def batch_norm_forward(x, mean, var, w, b, eps):
    """(y, invstd); y has x's shape."""
    _, c, l = _ncl(x)
    invstd, y = empty((c,), x.dtype), _like(x)
    launch(_bn_invstd, c, var, float(eps), invstd)
    launch(_bn_forward, x.size, flat(x), c, l, mean, invstd, w, b, flat(y))
    return y, invstd


def batch_norm_epilogue(mean, var, w, b, eps, dtype):
    """ep (3, C) in ``dtype``: the rows (mean, scale, shift) of eval-mode batch_norm from its
    running statistics, weight and bias (device arrays; either of the last two may be None),
    for conv2d's fused epilogue (kernels/cuda/conv.py's ``conv2d_epilogue``): the values
    batch_norm_forward computes per channel, so the fused conv gives its bits."""
    c = var.shape[0]
    ep = empty((3, c), dtype)
    launch(_bn_epilogue, c, mean, var, var if w is None else w, var if b is None else b, float(eps),
           w is not None, b is not None, ep)
    return ep


@register("batch_norm_backward", CUDA)
def batch_norm_backward(gy, x, mean, invstd, w, training):
    """(gx, gw, gb)."""
    n, c, l = _ncl(x)
    gx, gw, gb = _like(x), empty((c,), x.dtype), empty((c,), x.dtype)
    launch_grid(_bn_backward, c, REDUCE, flat(gy), flat(x), n, c, l, mean, invstd, w, bool(training),
                flat(gx), gw, gb)
    return gx, gw, gb


# ----------------------------------------------------------------------------- cross-entropy

@jit
def _ce_forward(z, t, eps, loss, lse):
    """Block i: lse[i] = log sum_k exp(z[i, k]) and loss[i] (kernels/nn.py cross_entropy_forward)."""
    buf = cuda.shared.array(ROW, float64)
    i, tid = cuda.blockIdx.x, cuda.threadIdx.x
    k = z.shape[1]
    mx = -math.inf
    for j in range(tid, k, ROW):
        mx = max(mx, z[i, j])
    mx = block_reduce(buf, mx, True)
    s = 0.0
    zs = 0.0
    for j in range(tid, k, ROW):
        s += math.exp(z[i, j] - mx)
        zs += z[i, j]
    s = block_reduce(buf, s, False)
    zs = block_reduce(buf, zs, False)
    if tid == 0:
        lz = mx + math.log(s)
        lse[i] = lz
        loss[i] = (1.0 - eps) * (lz - z[i, t[i]]) + eps * (lz - zs / k)


@jit
def _ce_backward(z, t, lse, gl, off, hit, gz):
    """gz[i, k] = gl[i] * (exp(z[i, k] - lse[i]) - q[i, k]), q = off + hit * onehot(t)."""
    e = cuda.grid(1)
    n, k = z.shape
    if e < n * k:
        i, j = e // k, e % k
        gz[i, j] = gl[i] * (math.exp(z[i, j] - lse[i]) - off)
        if j == t[i]:
            gz[i, j] -= gl[i] * hit


@register("cross_entropy_forward", CUDA)
def cross_entropy_forward(z, t, eps):
    """(loss (N,), lse (N,))."""
    loss, lse = empty(z.shape[:1], z.dtype), empty(z.shape[:1], z.dtype)
    launch_grid(_ce_forward, z.shape[0], ROW, z, t, float(eps), loss, lse)
    return loss, lse


@register("cross_entropy_backward", CUDA)
def cross_entropy_backward(z, t, lse, gl, eps):
    gz = _like(z)
    k = z.shape[1]
    launch(_ce_backward, z.size, z, t, lse, flat(gl), scalar(eps / max(k, 1), z.dtype), scalar(1 - eps, z.dtype), gz)
    return gz


# ----------------------------------------------------------------------------- optimiser steps

_sgd_update = device_function(_cpu.sgd_update)
_adam_update = device_function(_cpu.adam_update)


# Kernels take their arguments one by one: numba-cuda's dispatcher does not type ``*args``.
@jit
def _sgd_step(p, g, buf, lr, momentum, damped, weight_decay, nesterov, first, maximize):
    i = cuda.grid(1)
    if i < p.size:
        _sgd_update(i, p, g, buf, lr, momentum, damped, weight_decay, nesterov, first, maximize)


@jit
def _adam_step(p, g, m, v, vmax, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
               one_minus_beta1, one_minus_beta2, shrink, step_size, bc2_sqrt):
    i = cuda.grid(1)
    if i < p.size:
        _adam_update(i, p, g, m, v, vmax, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                     one_minus_beta1, one_minus_beta2, shrink, step_size, bc2_sqrt)


# The same updates in a captured step (kernels/cuda/graph.py): their per-step scalars come from
# row ``r`` of a device table, in the order of the eager kernels' arguments, flags as 0 or 1.
@jit
def _sgd_step_at(p, g, buf, s, r):
    i = cuda.grid(1)
    if i < p.size:
        _sgd_update(i, p, g, buf, s[r, 0], s[r, 1], s[r, 2], s[r, 3], s[r, 4] != 0, s[r, 5] != 0, s[r, 6] != 0)


@jit
def _adam_step_at(p, g, m, v, vmax, s, r):
    i = cuda.grid(1)
    if i < p.size:
        _adam_update(i, p, g, m, v, vmax, s[r, 0], s[r, 1], s[r, 2], s[r, 3], s[r, 4] != 0, s[r, 5] != 0,
                     s[r, 6] != 0, s[r, 7], s[r, 8], s[r, 9], s[r, 10], s[r, 11])


def _scalars(dtype, *values):
    return tuple(scalar(v, dtype) for v in values)


@register("sgd_step", CUDA)
def sgd_step(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first, maximize):
    """Updates p (and buf, when momentum != 0) in place. Without momentum buf may be None: p
    stands in for it, never read nor written."""
    values = (lr, momentum, 1 - dampening, weight_decay, bool(nesterov), bool(first), bool(maximize))
    captured = step_scalars(values, p.dtype, (p, g, buf))
    p, g = flat(p), flat(g)
    buf = p if buf is None else flat(buf)
    if captured is not None:
        launch(_sgd_step_at, p.size, p, g, buf, *captured)
        return
    launch(_sgd_step, p.size, p, g, buf, *_scalars(p.dtype, *values[:4]), *values[4:])


@register("adam_step", CUDA)
def adam_step(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, step):
    """Updates p, m, v (and vmax under amsgrad) in place. Without amsgrad vmax may be None: v
    stands in for it, never written."""
    coefficients = _cpu.adam_coefficients(float(lr), float(beta1), float(beta2), float(weight_decay), step)
    flags = (bool(decoupled), bool(amsgrad), bool(maximize))
    captured = step_scalars((beta1, beta2, eps, weight_decay, *flags, *coefficients), p.dtype, (p, g, m, v, vmax))
    p, g, m, v = flat(p), flat(g), flat(m), flat(v)
    vmax = v if vmax is None else flat(vmax)
    if captured is not None:
        launch(_adam_step_at, p.size, p, g, m, v, vmax, *captured)
        return
    launch(_adam_step, p.size, p, g, m, v, vmax, *_scalars(p.dtype, beta1, beta2, eps, weight_decay),
           *flags, *_scalars(p.dtype, *coefficients))
