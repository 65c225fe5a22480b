"""``nn.utils`` with PyTorch's names: ``fuse_conv_bn_eval``.

The fusion that runs by itself in eval mode (nn/module.py, kernels/conv.py's epilogue) keeps
the batch norm as a separate affine step after the conv, bit for bit the unfused layers.
``fuse_conv_bn_eval`` instead folds it into the conv's weight and bias once, as PyTorch's
``torch.nn.utils.fusion.fuse_conv_bn_eval``: one layer, no epilogue needed, but its outputs
are rounded differently (within the float tolerance of the unfused ones, not equal):

    s  = weight_bn / sqrt(running_var + eps)        per output channel
    w' = w * s                                       (CO, CI/G, KH, KW), scaled per row
    b' = (b - running_mean) * s + bias_bn            (b = 0 without a conv bias)

computed in float64 from the layers' values and rounded once to their dtype.
"""
from __future__ import annotations

import copy

import numpy as np

from .init import _assign
from .layers import BatchNorm2d, Conv2d, _param


def fuse_conv_bn_eval(conv: Conv2d, bn: BatchNorm2d) -> Conv2d:
    """A new Conv2d (a deep copy of ``conv``, always with a bias) equal to ``bn(conv(x))`` in
    eval mode; ``conv`` and ``bn`` are left as they were. Both must be in eval mode, and
    ``bn`` must keep running statistics of ``conv.out_channels`` channels."""
    if conv.training or bn.training:
        raise ValueError("fuse_conv_bn_eval: conv and bn must both be in eval mode (call .eval() first)")
    if bn.running_mean is None or bn.num_features != conv.out_channels:
        raise ValueError(f"fuse_conv_bn_eval: bn must keep running statistics of {conv.out_channels} channels, "
                         f"got num_features={bn.num_features}, track_running_stats={bn.running_mean is not None}")
    host = lambda t: None if t is None else t.numpy().astype(np.float64)  # noqa: E731
    w, b = host(conv.weight), host(conv.bias)
    mean, var, gamma, beta = (host(t) for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias))
    s = (1.0 if gamma is None else gamma) / np.sqrt(var + bn.eps)
    fused_b = ((0.0 if b is None else b) - mean) * s + (0.0 if beta is None else beta)
    fused = copy.deepcopy(conv)
    if fused.bias is None:
        fused.bias = _param((conv.out_channels,), conv.weight.device, conv.weight.dtype)
    _assign(fused.weight, w * s.reshape(-1, 1, 1, 1))  # rounded to the layer's dtype, on its device
    _assign(fused.bias, fused_b)
    return fused


__all__ = ["fuse_conv_bn_eval"]
