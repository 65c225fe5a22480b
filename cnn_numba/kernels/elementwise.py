"""Elementwise ops, reductions and array plumbing.

On the CPU these are numpy one-liners: numpy's own loops are as fast as a Numba
loop for them, and compile nothing. They are registered under the same names a
device backend provides, so the autograd never calls numpy directly.
"""
import numpy as np

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


@register("relu_forward", CPU)
def relu_forward(x):
    return np.maximum(x, x.dtype.type(0))


@register("relu_backward", CPU)
def relu_backward(y, gy):
    """gx = 0 where y = relu(x) <= 0, else gy: PyTorch's mask, which lets a NaN input pass its gradient."""
    return np.where(y <= 0, gy.dtype.type(0), gy)
