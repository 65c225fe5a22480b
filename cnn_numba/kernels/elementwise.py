"""Elementwise ops, reductions and array plumbing.

On the CPU most are numpy one-liners, which compile nothing. ReLU is a Numba loop:
numpy's ``where``/``maximum`` with a scalar run 5-25x slower than one fused pass
(measured on a LeNet-5 activation, 300k float32). Serial: a parallel launch costs
more than the pass. The residual blocks' relu(a + b) is one pass too, parallel over
chunks on large arrays (a ResNet activation at batch 256 is millions of elements, and one
core alone does not use the memory bandwidth). All are registered under the names a device
backend provides, so the autograd never calls numpy directly.
"""
import numpy as np
from numba import njit, prange

from ..backend import register
from . import PARALLEL, serial_twin

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


# relu(a + b) runs on one thread below this many elements (a parallel launch costs ~1.2 us,
# the pass ~0.1 ns an element), in chunks of ADD_RELU_CHUNK elements per thread above it.
ADD_RELU_PARALLEL_ELEMENTS = 1 << 16
ADD_RELU_CHUNK = 1 << 14


@njit(parallel=PARALLEL, cache=True)
def add_relu_kernel(a, b, y):
    """y = relu_value(a + b) (1-d, one size), in chunks over the threads:
    relu(add(a, b)) bit for bit, in one pass instead of two."""
    n = y.size
    for c in prange(-(-n // ADD_RELU_CHUNK)):
        lo = c * ADD_RELU_CHUNK
        ya, aa, ba = y[lo:lo + ADD_RELU_CHUNK], a[lo:lo + ADD_RELU_CHUNK], b[lo:lo + ADD_RELU_CHUNK]
        for i in range(ya.size):
            ya[i] = relu_value(aa[i] + ba[i])


add_relu_kernel_serial = serial_twin(add_relu_kernel)


@register("add_relu_forward", CPU)
def add_relu_forward(a, b):
    """relu(a + b), a new array, for a and b of one shape and dtype."""
    y = np.empty(a.shape, a.dtype)
    run = add_relu_kernel if y.size >= ADD_RELU_PARALLEL_ELEMENTS else add_relu_kernel_serial
    run(np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1), y.reshape(-1))
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
