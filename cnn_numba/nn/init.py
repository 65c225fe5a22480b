"""Weight initialisation, in place, with PyTorch's names and formulas.

Fans of a weight (out, in, *kernel): ``fan_in = in * prod(kernel)``, ``fan_out = out *
prod(kernel)`` (dim 1 is "in" whatever the layer: for ConvTranspose2d's (C_in, C_out/g, kH, kW)
weight PyTorch uses C_out/g, and so do we).

    kaiming_uniform_   U(-b, b),  b = gain * sqrt(3 / fan)
    kaiming_normal_    N(0, std), std = gain / sqrt(fan)          fan = fan_in or fan_out (mode)
    xavier_uniform_    U(-a, a),  a = gain * sqrt(6 / (fan_in + fan_out))
    xavier_normal_     N(0, std), std = gain * sqrt(2 / (fan_in + fan_out))

Numbers are drawn in float64 on the host from cnn_numba's generator (``manual_seed``), or
from ``generator`` when one is given, then cast to the tensor's dtype and device.
"""
from __future__ import annotations

import math

import numpy as np

from ..random import default_generator
from ..tensor import Tensor
from .module import _device_array


def _assign(tensor: Tensor, values) -> Tensor:
    tensor.data = _device_array(np.array(np.broadcast_to(values, tensor.shape), dtype=tensor.dtype), tensor.device)
    tensor._vc[0] += 1  # new values: an in-place change
    return tensor


def _gen(generator):
    return default_generator() if generator is None else generator


def calculate_gain(nonlinearity: str, param=None) -> float:
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
              "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def _calculate_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    if tensor.ndim < 2:
        raise ValueError(f"fan in and fan out need a tensor with at least 2 dims, got shape {tensor.shape}")
    receptive = int(np.prod(tensor.shape[2:]))
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _fan(tensor: Tensor, mode: str) -> int:
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0, generator=None) -> Tensor:
    return _assign(tensor, _gen(generator).uniform(a, b, tensor.shape))


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0, generator=None) -> Tensor:
    return _assign(tensor, _gen(generator).normal(mean, std, tensor.shape))


def constant_(tensor: Tensor, val: float) -> Tensor:
    return _assign(tensor, val)


def zeros_(tensor: Tensor) -> Tensor:
    return _assign(tensor, 0)


def ones_(tensor: Tensor) -> Tensor:
    return _assign(tensor, 1)


def kaiming_uniform_(tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                     generator=None) -> Tensor:
    if tensor.size == 0:  # nothing to draw (PyTorch: a no-op); the fans would divide by 0
        return tensor
    bound = calculate_gain(nonlinearity, a) * math.sqrt(3.0 / _fan(tensor, mode))
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor: Tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    generator=None) -> Tensor:
    if tensor.size == 0:  # nothing to draw (PyTorch: a no-op); the fans would divide by 0
        return tensor
    return normal_(tensor, 0.0, calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode)), generator)


def xavier_uniform_(tensor: Tensor, gain: float = 1.0, generator=None) -> Tensor:
    if tensor.size == 0:  # nothing to draw (PyTorch: a no-op); the fans would divide by 0
        return tensor
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator)


def xavier_normal_(tensor: Tensor, gain: float = 1.0, generator=None) -> Tensor:
    if tensor.size == 0:  # nothing to draw (PyTorch: a no-op); the fans would divide by 0
        return tensor
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


__all__ = [
    "calculate_gain", "uniform_", "normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
    "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
]
