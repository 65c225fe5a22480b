"""Layers of the reference models (models.py): LeNet-5's trainable subsampling, its partially
connected C3, LeCun's scaled tanh, residual blocks, depthwise- and spatially separable
convolutions, and the Inception module.

All of them are compositions of existing differentiable ops (conv2d, avg_pool2d, mul, add,
reshape, cat), so none needs a backward of its own. Shapes: N batch, C channels, H x W.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import functional as F
from .. import shapes
from . import init
from .layers import BatchNorm2d, Conv2d, MaxPool2d, ReLU, _check_sizes, _param
from ..tensor import Tensor
from .module import Module, Sequential, _device_array, add_relu, conv_chain

# ----------------------------------------------------------------------------- LeNet-5 (LeCun 1998)

# C3's connection table (LeCun et al. 1998, Table I): the S2 maps each C3 map sees. Six maps see
# three adjacent maps, six see four adjacent, three see four non-adjacent, one sees all six:
# 6*3 + 6*4 + 3*4 + 6 = 60 of the 96 possible (map, map) connections.
LENET5_C3_TABLE = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


class Subsampling2d(Module):
    """LeNet-5's S-layer without its squashing: each KxK window summed, times one trainable
    coefficient per channel, plus one trainable bias per channel. (N, C, H, W) -> (N, C, oh, ow).

    weight, bias (C,). Initialised to weight = 1/K^2, bias = 0, i.e. as average pooling, so the
    layer starts as the pooling the modern LeNet uses and learns its gain from there.
    """

    def __init__(self, num_channels: int, kernel_size=2, stride=None, device=None, dtype=None):
        super().__init__()
        _check_sizes(num_channels=num_channels)
        self.num_channels = num_channels
        self.kernel_size = shapes.positive_pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else shapes.positive_pair(stride, "stride")
        self.padding, self.dilation = 0, 1
        self.weight = _param((num_channels,), device, dtype)
        self.bias = _param((num_channels,), device, dtype)
        self.reset_parameters()

    def reset_parameters(self):
        init.constant_(self.weight, 1.0 / (self.kernel_size[0] * self.kernel_size[1]))
        init.zeros_(self.bias)

    def forward(self, x):
        c = self.num_channels
        s = F.avg_pool2d(x, self.kernel_size, self.stride, divisor_override=1)   # window sums
        return F.reshape(self.weight, (1, c, 1, 1)) * s + F.reshape(self.bias, (1, c, 1, 1))

    def extra_repr(self):
        return f"{self.num_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class ConnectionTableConv2d(Conv2d):
    """A Conv2d whose output channel ``o`` sees only the input channels ``table[o]``.

    The fixed 0/1 buffer ``weight_mask`` (C_out, C_in, 1, 1) multiplies the weight inside the
    graph, so the masked taps contribute nothing and receive a zero gradient; they are kept at
    zero, and ``summary`` does not count them as parameters. Each output channel's weights are
    initialised with its own fan-in (number of inputs it sees x kH x kW). No groups: the table
    is the grouping.
    """

    def __init__(self, in_channels, out_channels, kernel_size, table, stride=1, padding=0, dilation=1, bias=True,
                 device=None, dtype=None, *, algo="auto"):
        if len(table) != out_channels:
            raise ValueError(f"table has {len(table)} rows, expected one per output channel ({out_channels})")
        mask = np.zeros((out_channels, in_channels, 1, 1))
        for o, inputs in enumerate(table):
            if not inputs or any(not 0 <= i < in_channels for i in inputs):
                raise ValueError(f"table[{o}] = {inputs!r}: expected a non-empty list of input channels "
                                 f"in [0, {in_channels})")
            mask[o, list(inputs), 0, 0] = 1.0
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias,
                         device=device, dtype=dtype, algo=algo)
        self._table = tuple(tuple(int(i) for i in inputs) for inputs in table)
        self._mask_host = mask
        device = self.weight.device
        self.register_buffer("weight_mask", Tensor._wrap(_device_array(mask.astype(self.weight.dtype), device),
                                                         device, False, None), persistent=False)
        self.reset_parameters()

    @property
    def table(self):
        return self._table

    def reset_parameters(self):
        if "weight_mask" not in self._buffers:  # Conv2d.__init__ calls this before the mask exists
            return
        kh, kw = self.kernel_size
        w = np.zeros(self.weight.shape)
        b = np.zeros(self.out_channels)
        gen = init._gen(None)
        for o, inputs in enumerate(self._table):
            bound = 1.0 / np.sqrt(len(inputs) * kh * kw)      # PyTorch's default bound for this fan-in
            w[o, list(inputs)] = gen.uniform(-bound, bound, (len(inputs), kh, kw))
            b[o] = gen.uniform(-bound, bound)
        init._assign(self.weight, w)
        if self.bias is not None:
            init._assign(self.bias, b)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.weight_mask, self.bias, self.stride, self.padding, self.dilation,
                        algo=self.algo)

    def extra_repr(self):
        return super().extra_repr() + f", connections={int(self._mask_host.sum())}/{self._mask_host.size}"


class ScaledTanh(Module):
    """LeCun's squashing function ``A * tanh(S * x)``, A = 1.7159, S = 2/3 (f(1) = 1, f(-1) = -1)."""

    def __init__(self, amplitude: float = 1.7159, slope: float = 2.0 / 3.0):
        super().__init__()
        self.amplitude, self.slope = amplitude, slope

    def forward(self, x):
        return F.tanh(x * self.slope) * self.amplitude

    def extra_repr(self):
        return f"amplitude={self.amplitude}, slope={self.slope}"


# ----------------------------------------------------------------------------- residual blocks (He et al. 2015)

def _projection(in_planes, out_planes, stride, device, dtype):
    """1x1 strided conv + BN: the shortcut when a block changes the shape (option B)."""
    return Sequential(OrderedDict([
        ("0", Conv2d(in_planes, out_planes, 1, stride=stride, bias=False, device=device, dtype=dtype)),
        ("1", BatchNorm2d(out_planes, device=device, dtype=dtype)),
    ]))


class BasicBlock(Module):
    """Two 3x3 convs with BN; ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.
    The first conv carries the stride; the shortcut is the identity, or a 1x1 strided
    projection + BN when the stride or the channel count changes. Convs have no bias (BN
    follows): 2 * 9 * C^2 conv weights at C channels."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = Conv2d(in_planes, planes, 3, stride, 1, bias=False, device=device, dtype=dtype)
        self.bn1 = BatchNorm2d(planes, device=device, dtype=dtype)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(planes, out, 3, 1, 1, bias=False, device=device, dtype=dtype)
        self.bn2 = BatchNorm2d(out, device=device, dtype=dtype)
        reshape = stride != 1 or in_planes != out
        self.downsample = _projection(in_planes, out, stride, device, dtype) if reshape else None
        self.relu2 = ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_chain(x, self.conv1, self.bn1, self.relu1)
        out = conv_chain(out, self.conv2, self.bn2)
        return add_relu(out, identity, self.relu2)


class Bottleneck(Module):
    """1x1 reduce to ``planes``, 3x3 (carrying the stride), 1x1 expand to ``4 * planes``, each
    with BN; shortcut as in BasicBlock. 256 -> 64 -> 64 -> 256 has 69,632 conv weights."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = Conv2d(in_planes, planes, 1, bias=False, device=device, dtype=dtype)
        self.bn1 = BatchNorm2d(planes, device=device, dtype=dtype)
        self.relu1 = ReLU()
        self.conv2 = Conv2d(planes, planes, 3, stride, 1, bias=False, device=device, dtype=dtype)
        self.bn2 = BatchNorm2d(planes, device=device, dtype=dtype)
        self.relu2 = ReLU()
        self.conv3 = Conv2d(planes, out, 1, bias=False, device=device, dtype=dtype)
        self.bn3 = BatchNorm2d(out, device=device, dtype=dtype)
        reshape = stride != 1 or in_planes != out
        self.downsample = _projection(in_planes, out, stride, device, dtype) if reshape else None
        self.relu3 = ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_chain(x, self.conv1, self.bn1, self.relu1)
        out = conv_chain(out, self.conv2, self.bn2, self.relu2)
        out = conv_chain(out, self.conv3, self.bn3)
        return add_relu(out, identity, self.relu3)


# ----------------------------------------------------------------------------- factorised convolutions

class DepthwiseSeparableConv2d(Sequential):
    """MobileNet's unit: depthwise KxK (groups = in_channels, 'same' padding for odd K) + BN +
    ReLU, then pointwise 1x1 to out_channels + BN + ReLU. Conv weights K^2*C_in + C_in*C_out
    instead of K^2*C_in*C_out: a ratio of 1/C_out + 1/K^2."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, device=None, dtype=None):
        k = shapes.positive_pair(kernel_size, "kernel_size")
        kw = dict(device=device, dtype=dtype)
        super().__init__(OrderedDict([
            ("depthwise", Conv2d(in_channels, in_channels, k, stride, (k[0] // 2, k[1] // 2), groups=in_channels,
                                 bias=False, **kw)),
            ("bn1", BatchNorm2d(in_channels, **kw)), ("relu1", ReLU()),
            ("pointwise", Conv2d(in_channels, out_channels, 1, bias=False, **kw)),
            ("bn2", BatchNorm2d(out_channels, **kw)), ("relu2", ReLU()),
        ]))
        self.in_channels, self.out_channels, self.kernel_size, self.stride = in_channels, out_channels, k, stride


class SpatiallySeparableConv2d(Sequential):
    """A KxK convolution factorised as Kx1 (in -> mid) then 1xK (mid -> out), 'same' padding
    for odd K; the stride is applied per dimension by the conv along it. 2K weights per
    (channel, channel) pair instead of K^2 (with mid = out). No activation in between: with
    one channel it is exactly a rank-1 KxK kernel (Sobel = [1,2,1]^T x [1,0,-1])."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1, bias: bool = True,
                 mid_channels: int | None = None, device=None, dtype=None):
        k = shapes.positive_pair(kernel_size, "kernel_size")[0]
        sh, sw = shapes.positive_pair(stride, "stride")
        mid = out_channels if mid_channels is None else mid_channels
        kw = dict(device=device, dtype=dtype)
        super().__init__(OrderedDict([
            ("vertical", Conv2d(in_channels, mid, (k, 1), (sh, 1), (k // 2, 0), bias=bias, **kw)),
            ("horizontal", Conv2d(mid, out_channels, (1, k), (1, sw), (0, k // 2), bias=bias, **kw)),
        ]))
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k


# ----------------------------------------------------------------------------- Inception (Szegedy et al. 2014)

def _conv_relu(cin, cout, k, bias, kw):
    return [Conv2d(cin, cout, k, padding=k // 2, bias=bias, **kw), ReLU()]


class InceptionBlock(Module):
    """GoogLeNet's module: four branches on the same input, concatenated on channels.

        branch1  1x1 -> ch1x1
        branch2  1x1 -> ch3x3red, 3x3 -> ch3x3
        branch3  1x1 -> ch5x5red, 5x5 -> ch5x5
        branch4  3x3 max pool (stride 1, pad 1), 1x1 -> pool_proj

    each conv followed by ReLU; output (N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W).
    ``ch3x3red`` / ``ch5x5red`` = None drops that 1x1 reduction (the 3x3 / 5x5 conv reads the
    input directly), to measure what the reductions save.
    """

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)

        def reduced(red, out, k):
            layers = [] if red is None else _conv_relu(in_channels, red, 1, bias, kw)
            return Sequential(*layers, *_conv_relu(in_channels if red is None else red, out, k, bias, kw))

        self.branch1 = Sequential(*_conv_relu(in_channels, ch1x1, 1, bias, kw))
        self.branch2 = reduced(ch3x3red, ch3x3, 3)
        self.branch3 = reduced(ch5x5red, ch5x5, 5)
        self.branch4 = Sequential(MaxPool2d(3, 1, 1), *_conv_relu(in_channels, pool_proj, 1, bias, kw))
        self.in_channels, self.out_channels = in_channels, ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x):
        return F.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)

    def extra_repr(self):
        return f"{self.in_channels} -> {self.out_channels}"


__all__ = ["LENET5_C3_TABLE", "Subsampling2d", "ConnectionTableConv2d", "ScaledTanh", "BasicBlock", "Bottleneck",
           "DepthwiseSeparableConv2d", "SpatiallySeparableConv2d", "InceptionBlock"]
