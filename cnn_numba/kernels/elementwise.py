"""Elementwise ops, reductions and array plumbing.

On the CPU most are numpy one-liners, which compile nothing. ReLU is a Numba loop:
numpy's ``where``/``maximum`` with a scalar run 5-25x slower than one fused pass
(measured on a LeNet-5 activation, 300k float32). Serial: a parallel launch costs
more than the pass. All are registered under the names a device backend provides,
so the autograd never calls numpy directly.
"""
import numpy as np
from numba import njit

from ..backend import register

CPU = "cpu"

register("to_host", CPU)(lambda a: a)
register("from_host", CPU)(lambda a: np.asarray(a, order="C"))
register("full", CPU)(lambda shape, value, dtype: np.full(shape, value, dtype))
register("copy", CPU)(np.copy)
register("add", CPU)(np.add)
register("mul", CPU)(np.multiply)
register("reshape", CPU)(lambda a, shape: a.reshape(shape))


@register("sum_to", CPU)
def sum_to(a, shape):
    """Sum ``a`` down to ``shape``: the gradient of numpy broadcasting."""
    shape = tuple(shape)
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape) if s == 1 and a.shape[i + lead] != 1)
    return np.ascontiguousarray(a.sum(axis=axes, keepdims=True).reshape(shape)) if axes else a


@register("sum", CPU)
def total(a):
    return np.asarray(a.sum(dtype=a.dtype), dtype=a.dtype)


# The kernels take 1-d views (the launchers flatten), so each compiles once per dtype
# rather than once per dtype and ndim.

@njit(cache=True, inline="always")
def relu_value(v):
    """max(v, 0) with NaN kept (as PyTorch): the one ReLU rule of the CPU kernels (these, the
    batch norm's and the conv epilogue's fused ones)."""
    return 0 if v < 0 else v


@njit(cache=True, inline="always")
def relu_grad(y, g):
    """The gradient ``g`` through y = relu(x): 0 where y <= 0, PyTorch's mask, which lets a
    NaN input pass its gradient."""
    return 0 if y <= 0 else g


@njit(cache=True)
def relu_forward_kernel(x, y):
    """y = relu_value(x)."""
    for i in range(x.size):
        y[i] = relu_value(x[i])


@njit(cache=True)
def relu_backward_kernel(y, gy, gx):
    """gx = relu_grad(y, gy), y = relu(x)."""
    for i in range(y.size):
        gx[i] = relu_grad(y[i], gy[i])


@register("relu_forward", CPU)
def relu_forward(x):
    y = np.empty(x.shape, x.dtype)
    relu_forward_kernel(np.ascontiguousarray(x).reshape(-1), y.reshape(-1))
    return y


@register("relu_backward", CPU)
def relu_backward(y, gy):
    gx = np.empty(gy.shape, gy.dtype)
    relu_backward_kernel(np.ascontiguousarray(y).reshape(-1), np.ascontiguousarray(gy).reshape(-1), gx.reshape(-1))
    return gx


@register("count_outside", CPU)
def count_outside(a, lo, hi):
    """How many elements of an integer array lie outside ``[lo, hi)`` (index validation)."""
    return int(np.count_nonzero((a < lo) | (a >= hi)))


@register("count_correct", CPU)
def count_correct(z, t):
    """How many rows of logits z (N, K) have their first maximum at the label t (N,)."""
    return int(np.count_nonzero(z.argmax(1) == t)) if z.size else 0
