"""Layer kernels: linear, sigmoid/tanh, batch normalisation, fused softmax
cross-entropy, array plumbing for cat/permute, and the optimiser steps.

Layouts and symbols:
    linear          x (*, IN), w (OUT, IN), b (OUT,), y (*, OUT); the leading dims are
                    flattened to n rows for the weight-gradient
    batch_norm      x viewed as (N, C, L) with L = H*W for images and 1 for (N, C);
                    per-channel statistics over m = N*L values: mean (C,), var (C,) the
                    biased variance, invstd (C,) = 1/sqrt(var + eps); w/b (C,) gamma/beta;
                    xhat = (x - mean) * invstd
    cross_entropy   z (N, K) logits, t (N,) int64 class indices, lse (N,) log-sum-exp of
                    each row, eps label smoothing: target q = (1 - eps) onehot(t) + eps/K,
                    loss[i] = sum_k q[i,k] (lse[i] - z[i,k]), gl (N,) per-row upstream gradient
    optimiser       p, g and state buffers (momentum, exp_avg, ...): one parameter each,
                    flat views

Contract: every kernel writes (=) fresh outputs that its launcher allocates, except
the ones whose job is to update state in place: the optimiser steps (p and its
buffers) and ``batch_norm_update_stats`` (the running statistics). Reductions
accumulate in float64 whatever the dtype.

Backward formulas (derived once here):
    batch_norm (training)  gx = w*invstd * (gy - sum(gy)/m - xhat * sum(gy*xhat)/m)
    batch_norm (eval)      gx = w*invstd * gy          (mean and invstd are constants)
    both                   gw = sum(gy*xhat),  gb = sum(gy)   (sums over N and L)
    cross_entropy          gz = gl * (softmax(z) - q),  softmax(z) = exp(z - lse)
"""
import math

import numpy as np
from numba import njit, prange

from ..backend import register
from . import PARALLEL, get_num_threads, serial_twin
from .blas import gemm
from .elementwise import relu_forward_kernel, relu_grad, relu_value
from .index import axpy, dot

CPU = "cpu"
KERNEL = dict(cache=True)  # no fastmath: NaN must propagate, and these are memory-bound
# Reductions may reassociate (and fuse multiply-adds), which lets LLVM vectorise the sums
# (a serial float64 add chain ran at a quarter of the memory speed); no 'nnan'/'ninf', so a
# NaN still propagates. The order is fixed by the compiled code: results repeat run to run.
REDUCTION = dict(cache=True, fastmath={"reassoc", "contract"})


# ----------------------------------------------------------------------------- batch normalisation

@njit(parallel=PARALLEL, **REDUCTION)
def batch_norm_stats(x, mean, var):
    """mean[c] and biased var[c] over (N, L) of x (N, C, L); two passes for accuracy."""
    n, c, l = x.shape
    m = n * l
    for ch in prange(c):
        s = 0.0
        for i in range(n):
            for j in range(l):
                s += x[i, ch, j]
        mu = s / m
        ss = 0.0
        for i in range(n):
            for j in range(l):
                d = x[i, ch, j] - mu
                ss += d * d
        mean[ch] = mu
        var[ch] = ss / m


@njit(cache=True)
def _invstd_into(var, eps, invstd):
    """invstd[ch] = 1/sqrt(var[ch] + eps), computed in float64 and rounded to invstd's dtype:
    the batch norm's one formula (its forward, and conv2d's fused epilogue through
    batch_norm_epilogue)."""
    for ch in range(var.size):
        invstd[ch] = 1.0 / math.sqrt(np.float64(var[ch]) + eps)


@njit(parallel=PARALLEL, **KERNEL)
def batch_norm_forward(x, mean, var, w, b, eps, y, invstd, relu):
    """invstd = 1/sqrt(var + eps), computed in float64 and stored in x's dtype; then
    y = (x - mean) * invstd * w + b, per channel; with ``relu``, then relu_forward_kernel's
    cut (0 below 0, NaN kept) in the same pass: batch_norm -> relu bit for bit."""
    n, c, l = x.shape
    _invstd_into(var, eps, invstd)
    for p in prange(n * c):
        i, ch = p // c, p % c
        mu, scale, shift = mean[ch], invstd[ch] * w[ch], b[ch]
        for j in range(l):
            v = (x[i, ch, j] - mu) * scale + shift
            y[i, ch, j] = relu_value(v) if relu else v


batch_norm_forward_serial = serial_twin(batch_norm_forward)


@njit(cache=True, inline="always")
def _masked(gy, y, relu, i, ch, j):
    """gy[i, ch, j], or with ``relu`` its gradient through y = relu(..) (relu_grad)."""
    g = gy[i, ch, j]
    return relu_grad(y[i, ch, j], g) if relu else g


@njit(parallel=PARALLEL, **REDUCTION)
def batch_norm_backward(gy, x, mean, invstd, w, gx, gw, gb, training, y, relu):
    """gx, gw, gb of batch_norm_forward (formulas in the module docstring); with ``relu``, of
    relu(batch_norm(x)) = y: gy masked where y <= 0 as it is read, relu's backward and batch
    norm's in one pass (y is not read otherwise: pass gy)."""
    n, c, l = x.shape
    m = n * l
    for ch in prange(c):
        mu, istd = mean[ch], invstd[ch]
        sg = 0.0
        sgx = 0.0  # sum(gy * (x - mean)); times invstd it is sum(gy * xhat)
        for i in range(n):
            for j in range(l):
                g = _masked(gy, y, relu, i, ch, j)
                sg += g
                sgx += g * (x[i, ch, j] - mu)
        gw[ch] = sgx * istd
        gb[ch] = sg
        k = w[ch] * istd
        if training:
            a = sg / m
            bx = sgx * istd * istd / m  # xhat * sum(gy*xhat)/m = (x - mean) * bx
            for i in range(n):
                for j in range(l):
                    gx[i, ch, j] = k * (_masked(gy, y, relu, i, ch, j) - a - (x[i, ch, j] - mu) * bx)
        else:
            for i in range(n):
                for j in range(l):
                    gx[i, ch, j] = k * _masked(gy, y, relu, i, ch, j)


# ----------------------------------------------------------------------------- cross-entropy

@njit(**KERNEL)
def cross_entropy_forward(z, t, eps, loss, lse):
    """loss[i] = (1-eps) (lse[i] - z[i, t[i]]) + eps (lse[i] - mean_k z[i, k]); lse saved."""
    n, k = z.shape
    for i in range(n):
        mx = -np.inf
        for j in range(k):
            mx = max(mx, z[i, j])
        s = 0.0
        zs = 0.0
        for j in range(k):
            s += math.exp(z[i, j] - mx)
            zs += z[i, j]
        l = mx + math.log(s)
        lse[i] = l
        loss[i] = (1.0 - eps) * (l - z[i, t[i]]) + eps * (l - zs / k)


@njit(**KERNEL)
def cross_entropy_backward(z, t, lse, gl, eps, gz):
    """gz[i, k] = gl[i] * (exp(z[i, k] - lse[i]) - q[i, k])."""
    n, k = z.shape
    off = eps / k
    for i in range(n):
        for j in range(k):
            gz[i, j] = gl[i] * (math.exp(z[i, j] - lse[i]) - off)
        gz[i, t[i]] -= gl[i] * (1.0 - eps)


# ----------------------------------------------------------------------------- optimiser steps
# One element's update is a function of its own, shared with the CUDA kernels (compiled there as
# a device function, one thread per element). Every scalar that needs arithmetic on the
# hyper-parameters (1 - dampening, the bias corrections, ...) is computed once per step by the
# launcher and passed in, so a float32 step on the GPU computes in float32.

@njit(**KERNEL)
def sgd_update(i, p, g, buf, lr, momentum, damped, weight_decay, nesterov, first, maximize):
    """Element i of PyTorch's SGD: d = g + wd*p; buf = d (first step) or momentum*buf + damped*d
    with damped = 1 - dampening; d = d + momentum*buf (Nesterov) or buf; p -= lr*d.
    buf is untouched when momentum is 0."""
    d = -g[i] if maximize else g[i]
    if weight_decay != 0.0:
        d += weight_decay * p[i]
    if momentum != 0.0:
        bi = d if first else momentum * buf[i] + damped * d
        buf[i] = bi
        d = d + momentum * bi if nesterov else bi
    p[i] -= lr * d


def adam_coefficients(lr, beta1, beta2, weight_decay, step):
    """The per-step scalars of adam_update: (1 - beta1, 1 - beta2, AdamW's shrink 1 - lr*wd,
    step size lr/(1 - beta1^t), sqrt(1 - beta2^t))."""
    return (1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step),
            math.sqrt(1.0 - beta2 ** step))


@njit(**KERNEL)
def adam_update(i, p, g, m, v, vmax, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                one_minus_beta1, one_minus_beta2, shrink, step_size, bc2_sqrt):
    """Element i of PyTorch's Adam (L2 weight decay added to g) and AdamW (decoupled: p *= shrink):
    m, v moving averages of g and g^2; p -= step_size * m / (sqrt(v)/bc2_sqrt + eps), with v
    replaced by its running maximum vmax under amsgrad (scalars from adam_coefficients)."""
    gi = -g[i] if maximize else g[i]
    if weight_decay != 0.0:
        if decoupled:
            p[i] *= shrink
        else:
            gi += weight_decay * p[i]
    m[i] = beta1 * m[i] + one_minus_beta1 * gi
    v[i] = beta2 * v[i] + one_minus_beta2 * gi * gi
    vv = v[i]
    if amsgrad:
        vmax[i] = max(vmax[i], vv)
        vv = vmax[i]
    p[i] -= step_size * m[i] / (math.sqrt(vv) / bc2_sqrt + eps)


@njit(**KERNEL)
def sgd_step(p, *hyper):
    """sgd_update on every element (arguments after p as for sgd_update)."""
    for i in range(p.size):
        sgd_update(i, p, *hyper)


@njit(**KERNEL)
def adam_step(p, *hyper):
    """adam_update on every element (arguments after p as for adam_update)."""
    for i in range(p.size):
        adam_update(i, p, *hyper)


__all__ = [
    "batch_norm_stats", "batch_norm_forward", "batch_norm_forward_serial", "batch_norm_backward",
    "cross_entropy_forward", "cross_entropy_backward", "sgd_update", "adam_coefficients", "adam_update",
    "sgd_step", "adam_step",
]



# ----------------------------------------------------------------------------- linear

# Below this many multiply-adds a product is one serial Numba kernel (small_product): a
# parallel launch, or even one BLAS call from Numba, costs more.
ROWS_PARALLEL_MACS = 1 << 18


@njit(parallel=PARALLEL, **KERNEL)
def rows_product(trans_a, trans_b, m, n, k, a, b, c, chunks):
    """c (m, n) = op(a) @ op(b) on flat C-ordered arrays, in ``chunks`` blocks of c's rows, each
    one single-threaded BLAS call (kernels/blas.py): a gather over rows of the output, so no two
    blocks write one element. op(a) (m, k) is a stored (m, k), or (k, m) with ``trans_a``; op(b)
    (k, n) is b stored (k, n), or (n, k) with ``trans_b``.

    Why not numpy's ``@``: numpy's BLAS runs its own thread per core, whose workers spin after
    each product against Numba's for the same cores (LeNet-5's training step: 4.1 ms with it,
    2.8 ms with OPENBLAS_NUM_THREADS=1, on 2 cores)."""
    lda = m if trans_a else k
    ldb = k if trans_b else n
    step = (m + chunks - 1) // chunks
    for t in prange(chunks):
        r0 = t * step
        r1 = min(m, r0 + step)
        if r0 < r1:
            gemm(trans_a, trans_b, r1 - r0, n, k, a, r0 if trans_a else r0 * k, lda, b, 0, ldb, 0.0, c, r0 * n, n)


@njit(**REDUCTION)
def small_product(a, b, trans_b, bias, relu, c):
    """c (m, n) = a (m, k) @ op(b) + bias (n,), serial, for products under ROWS_PARALLEL_MACS:
    op(b) is b stored (n, k) with ``trans_b`` (a dot product of two rows per output), else b
    stored (k, n) (c's rows as sums of b's rows); with ``relu``, each row then cut as
    relu_forward_kernel cuts. SciPy's BLAS called from Numba takes 17 us for LeNet-5's
    1x400 by 400x120 product at batch 1, this 1.3 us."""
    m, n, k = c.shape[0], c.shape[1], a.shape[1]
    for i in range(m):
        row = c[i]
        if trans_b:
            for j in range(n):
                row[j] = dot(a[i], 0, 1, b[j], 0, 1, k, bias[j])
        else:
            for j in range(n):
                row[j] = bias[j]
            for kk in range(k):
                axpy(a[i, kk], b[kk], 0, 1, row, 0, 1, n)
        if relu:
            for j in range(n):
                row[j] = relu_value(row[j])


def _product(a, trans_a: bool, b, trans_b: bool, m: int, n: int, k: int, bias=None, relu=False):
    """op(a) @ op(b) (+ bias), then relu_value where ``relu``, (m, n), a fresh array of a's
    dtype: small_product under ROWS_PARALLEL_MACS, else rows_product."""
    c = np.empty((m, n), a.dtype)
    a, b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    if 0 < m * n * k < ROWS_PARALLEL_MACS:
        small_product(a.reshape(k, m).T if trans_a else a.reshape(m, k), b.reshape(n, k) if trans_b else b.reshape(k, n),
                      trans_b, np.zeros(n, c.dtype) if bias is None else bias, relu, c)
        return c
    if k == 0:
        c[...] = 0
    else:
        rows_product(trans_a, trans_b, m, n, k, a, b, c.reshape(-1), max(1, min(get_num_threads(), m // 8)))
    if bias is not None:
        c += bias
    if relu:
        relu_forward_kernel(c.reshape(-1), c.reshape(-1))
    return c


def _rows(a) -> int:
    """Rows of a (*, features) array: the product of its leading dims."""
    return math.prod(a.shape[:-1])


# ----------------------------------------------------------------------------- launchers

@register("linear_forward", CPU)
def linear_forward(x, w, b, relu=False):
    """y (*, OUT) = x @ w.T + b; with ``relu``, relu(y) in the same pass, bit for bit
    relu_forward's (functional.linear_relu)."""
    out_f, in_f = w.shape
    return _product(x, False, w, True, _rows(x), out_f, in_f, b, relu).reshape(*x.shape[:-1], out_f)


register("linear_relu_forward", CPU)(lambda x, w, b: linear_forward(x, w, b, relu=True))


@register("linear_backward_input", CPU)
def linear_backward_input(gy, w):
    """gx (*, IN) = gy @ w."""
    out_f, in_f = w.shape
    return _product(gy, False, w, False, _rows(gy), in_f, out_f).reshape(*gy.shape[:-1], in_f)


@register("linear_backward_weight", CPU)
def linear_backward_weight(gy, x):
    """gw (OUT, IN) = sum over rows of gy^T x."""
    out_f, in_f = gy.shape[-1], x.shape[-1]
    return _product(gy, True, x, False, out_f, in_f, _rows(x))


# sigmoid through tanh: no overflow for large |x|, and numpy keeps the dtype
register("sigmoid_forward", CPU)(lambda x: 0.5 * (1 + np.tanh(0.5 * x)))
register("sigmoid_backward", CPU)(lambda y, gy: gy * y * (1 - y))
register("tanh_forward", CPU)(np.tanh)
register("tanh_backward", CPU)(lambda y, gy: gy * (1 - y * y))

register("cat", CPU)(lambda arrays, dim: np.concatenate(arrays, axis=dim))
register("permute", CPU)(lambda a, dims: np.ascontiguousarray(a.transpose(dims)))


@register("split", CPU)
def split(a, sizes, dim):
    """The pieces of ``a`` along ``dim`` (cat's backward)."""
    return [np.ascontiguousarray(s) for s in np.split(a, np.cumsum(sizes)[:-1], axis=dim)]


def _ncl(a):
    """(N, C, *) -> (N, C, L), a view of a C-contiguous array (L = 1 for (N, C); any N, 0 too)."""
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], math.prod(a.shape[2:]))


@register("batch_norm_stats", CPU)
def batch_norm_stats_cpu(x):
    """(mean, biased var), each (C,) in x's dtype."""
    c = x.shape[1]
    mean, var = np.empty(c, x.dtype), np.empty(c, x.dtype)
    batch_norm_stats(_ncl(x), mean, var)
    return mean, var


@njit(cache=True)
def _epilogue_rows(mean, var, w, b, eps, has_w, has_b, ep):
    """ep (3, C) = the rows (mean, invstd * w, b) of eval-mode batch_norm, invstd as
    _invstd_into computes it and the product in ep's dtype, as batch_norm_forward's
    ``invstd[ch] * w[ch]``; w taken as 1 and b as 0 where absent (``has_w``, ``has_b``)."""
    _invstd_into(var, eps, ep[1])
    for ch in range(var.size):
        ep[0, ch] = mean[ch]
        if has_w:
            ep[1, ch] = ep[1, ch] * w[ch]
        ep[2, ch] = b[ch] if has_b else 0


def batch_norm_epilogue(mean, var, w, b, eps, dtype):
    """(3, C) in ``dtype``: the rows (mean, scale, shift) of eval-mode batch_norm from its
    running statistics, weight and bias (either may be None), for conv2d's fused epilogue
    (kernels/conv.py, functional.conv2d_bn_relu). One compiled call (~0.5 us; numpy's stack
    of the three rows took 3.2 us, paid by every conv of a network at inference)."""
    ep = np.empty((3, var.shape[0]), dtype)
    _epilogue_rows(mean, var, var if w is None else w, var if b is None else b, float(eps), w is not None,
                   b is not None, ep)
    return ep


# Below this many elements the forward runs on one thread: it takes ~0.05 ns an element
# there (vectorised) and a parallel launch costs ~1.2 us (TBB, 2 cores), so on 2 idle cores
# the parallel one pays from ~50k elements on. Measured (2026-12-01, 2 shared cores, fastest
# of 21, serial/parallel us, C channels of HxW at b1): 4x4x4 0.33/1.53, 16x7x7 0.39/1.53,
# 16x28x28 0.98/2.17, 64x28x28 (50,176) 2.48/3.64, 256x28x28 13.2/15.7 (the other core busy).
BN_PARALLEL_ELEMENTS = 1 << 16


@register("batch_norm_forward", CPU)
def batch_norm_forward_cpu(x, mean, var, w, b, eps, relu=False):
    """(y, invstd); y has x's shape; ``relu``: y = relu(batch_norm(x)) in the same pass."""
    invstd = np.empty(var.shape, x.dtype)  # _invstd_into's formula, as batch_norm_epilogue's
    y = np.empty(x.shape, x.dtype)
    forward = batch_norm_forward if x.size >= BN_PARALLEL_ELEMENTS else batch_norm_forward_serial
    forward(_ncl(x), mean, var, w, b, float(eps), _ncl(y), invstd, bool(relu))
    return y, invstd


@register("batch_norm_backward", CPU)
def batch_norm_backward_cpu(gy, x, mean, invstd, w, training, y=None):
    """(gx, gw, gb); with ``y`` (the forward's output with relu), of relu(batch_norm(x))."""
    gx = np.empty(x.shape, x.dtype)
    gw, gb = np.empty(x.shape[1], x.dtype), np.empty(x.shape[1], x.dtype)
    batch_norm_backward(_ncl(gy), _ncl(x), mean, invstd, w, _ncl(gx), gw, gb, bool(training),
                        _ncl(gy if y is None else y), y is not None)
    return gx, gw, gb


@register("batch_norm_update_stats", CPU)
def batch_norm_update_stats(running_mean, running_var, mean, var, momentum, m):
    """In place: running = (1 - momentum) running + momentum batch, the variance unbiased (m/(m-1))."""
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += (momentum * m / (m - 1)) * var


@register("cross_entropy_forward", CPU)
def cross_entropy_forward_cpu(z, t, eps):
    """(loss (N,), lse (N,))."""
    loss, lse = np.empty(z.shape[0], z.dtype), np.empty(z.shape[0], z.dtype)
    cross_entropy_forward(np.ascontiguousarray(z), t, float(eps), loss, lse)
    return loss, lse


@register("cross_entropy_backward", CPU)
def cross_entropy_backward_cpu(z, t, lse, gl, eps):
    gz = np.empty(z.shape, z.dtype)
    cross_entropy_backward(np.ascontiguousarray(z), t, lse, np.ascontiguousarray(gl), float(eps), gz)
    return gz


def _flat(a):
    """A flat view (never a copy: the step updates it in place)."""
    if not a.flags.c_contiguous:
        raise ValueError("optimiser state must be C-contiguous to be updated in place")
    return a.reshape(-1)


@register("sgd_step", CPU)
def sgd_step_cpu(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first, maximize):
    """Updates p (and buf, when momentum != 0) in place; buf may be None without momentum."""
    buf = np.empty(0, p.dtype) if buf is None else _flat(buf)
    sgd_step(_flat(p), np.ascontiguousarray(g).reshape(-1), buf, float(lr), float(momentum), 1.0 - dampening,
             float(weight_decay), bool(nesterov), bool(first), bool(maximize))


@register("adam_step", CPU)
def adam_step_cpu(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, step):
    """Updates p, m, v (and vmax under amsgrad) in place; vmax may be None otherwise."""
    vmax = np.empty(0, p.dtype) if vmax is None else _flat(vmax)
    adam_step(_flat(p), np.ascontiguousarray(g).reshape(-1), _flat(m), _flat(v), vmax, float(beta1), float(beta2),
              float(eps), float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
              *adam_coefficients(float(lr), float(beta1), float(beta2), float(weight_decay), step))
