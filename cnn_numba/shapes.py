"""Hyper-parameter normalisation and output sizes: the one place for this arithmetic.

Every public op resolves its arguments here, in Python, before any kernel runs, so a
bad argument is a ``ValueError``/``TypeError`` naming the argument and the shapes.

Sizes per spatial dimension (docs/convolution.md), with ``k`` kernel, ``s`` stride,
``p0``/``p1`` padding before/after, ``d`` dilation, ``op`` output_padding:

    conv2d            o = floor((i + p0 + p1 - d*(k-1) - 1) / s) + 1
    conv_transpose2d  o = (i-1)*s - 2p + d*(k-1) + op + 1
    pooling           like conv2d; ceil instead of floor with ceil_mode, dropping a
                      last window that would start in the right padding (PyTorch's rule)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def pair(value, name: str) -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 2) -> (3, 2)``; anything else is a TypeError/ValueError."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    if isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def positive_pair(value, name: str) -> tuple[int, int]:
    v = pair(value, name)
    if min(v) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return v


def nonnegative_pair(value, name: str) -> tuple[int, int]:
    v = pair(value, name)
    if min(v) < 0:
        raise ValueError(f"{name} must be non-negative, got {value!r}")
    return v


def conv_padding(padding, kernel_size, stride, dilation) -> tuple[int, int, int, int]:
    """Resolve conv2d's ``padding`` to ``(top, bottom, left, right)``.

    ``'same'`` pads ``d*(k-1)`` in total per dimension, the odd pixel going to the
    bottom/right as PyTorch does; it needs stride 1. ``'valid'`` is no padding.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = nonnegative_pair(padding, "padding")
    return ph, ph, pw, pw


def conv_output_size(i: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (i + p0 + p1 - d * (k - 1) - 1) // s + 1


def conv_transpose_output_size(i: int, k: int, s: int, p: int, d: int, op: int) -> int:
    return (i - 1) * s - 2 * p + d * (k - 1) + op + 1


def pool_output_size(i: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = i + 2 * p - d * (k - 1) - 1
    o = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (o - 1) * s >= i + p:
        o -= 1  # the last window would start inside the right padding
    return o


def check_output_size(out_hw, in_shape, what: str) -> None:
    if min(out_hw) <= 0:
        raise ValueError(
            f"{what}: input of shape {tuple(in_shape)} gives a non-positive output size "
            f"{tuple(out_hw)}; the input is too small for the kernel, dilation and padding"
        )


def check_float(name: str, arr) -> None:
    if np.dtype(arr.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {arr.dtype} (shape {tuple(arr.shape)})")


def check_ndim(name: str, arr, ndim: int, layout: str) -> None:
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(arr.shape)}")


def check_same_dtype(**arrays) -> None:
    items = [(k, v) for k, v in arrays.items() if v is not None]
    dtypes = {np.dtype(v.dtype) for _, v in items}
    if len(dtypes) > 1:
        desc = ", ".join(f"{k}: {v.dtype}" for k, v in items)
        raise TypeError(f"dtypes differ ({desc}); cast them to one of float32/float64")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "pair", "positive_pair", "nonnegative_pair", "conv_padding", "conv_output_size",
    "conv_transpose_output_size", "pool_output_size", "check_output_size", "check_float",
    "check_ndim", "check_same_dtype", "ceil_div",
]
