"""Layers and losses: thin modules over cnn_numba.functional, with PyTorch's constructor
arguments and default initialisation (conv and linear weights kaiming_uniform_(a=sqrt(5)),
biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))). Every layer takes ``device=`` and ``dtype=``
(float32 by default)."""
from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from .. import shapes
from ..backend import capturing as _capturing, check_device, kernel
from ..tensor import Tensor
from . import init
from .module import FUSION_ROLES, Module, Parameter, _device_array


def _zeros(shape, device, dtype) -> Tensor:
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    device = check_device(device or "cpu")
    return Tensor._wrap(_device_array(np.zeros(shape, dtype), device), device, False, None)


def _param(shape, device, dtype) -> Parameter:
    return Parameter(_zeros(shape, device, dtype))


def _reset_fan_in(weight: Parameter, bias: Parameter | None) -> None:
    """PyTorch's default for conv and linear layers."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        init.uniform_(bias, -bound, bound)


def _check_sizes(**sizes) -> None:
    """Layer sizes are ints >= 0 (0 makes an empty layer, as in PyTorch), named when not."""
    for name, v in sizes.items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {v!r}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")


def _check_groups(in_channels, out_channels, groups):
    if not isinstance(groups, (int, np.integer)) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")


def _check_input_dims(layer, x, ndims, layout):
    if x.ndim not in ndims:
        raise ValueError(f"{type(layer).__name__}: expected {' or '.join(f'{d}-D' for d in ndims)} input {layout}, "
                         f"got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- linear and convolution

class Linear(Module):
    """y = x @ weight.T + bias; weight (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        _check_sizes(in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), device, dtype)
        self.register_parameter("bias", _param((out_features,), device, dtype) if bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        _reset_fan_in(self.weight, self.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def _fused_forward(self, x):
        """``relu(self(x))`` in one pass (Sequential decides when)."""
        return F.linear_relu(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    """weight (out_channels, in_channels/groups, kH, kW); ``algo`` picks the conv kernels."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, algo="auto"):
        super().__init__()
        _check_sizes(in_channels=in_channels, out_channels=out_channels)
        _check_groups(in_channels, out_channels, groups)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode={padding_mode!r} is not supported; only 'zeros' is")
        self.in_channels, self.out_channels, self.groups, self.algo = in_channels, out_channels, groups, algo
        self.kernel_size = shapes.positive_pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = _param((out_channels, in_channels // groups) + self.kernel_size, device, dtype)
        self.register_parameter("bias", _param((out_channels,), device, dtype) if bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        _reset_fan_in(self.weight, self.bias)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                        algo=self.algo)

    def _fused_forward(self, x, bn=None, relu=None):
        """``relu(bn(self(x)))`` in one conv pass (nn/module.py's conv_chain decides when):
        bn an eval-mode BatchNorm2d or None, relu a ReLU or None."""
        stats = None if bn is None else (bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        return F.conv2d_bn_relu(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                                bn=stats, with_relu=relu is not None, algo=self.algo)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")


class ConvTranspose2d(Module):
    """weight (in_channels, out_channels/groups, kH, kW). ``forward(x, output_size)`` picks the
    output_padding that gives that size, as in PyTorch."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *, algo="auto"):
        super().__init__()
        _check_sizes(in_channels=in_channels, out_channels=out_channels)
        _check_groups(in_channels, out_channels, groups)
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode={padding_mode!r} is not supported; only 'zeros' is")
        self.in_channels, self.out_channels, self.groups, self.algo = in_channels, out_channels, groups, algo
        self.kernel_size = shapes.positive_pair(kernel_size, "kernel_size")
        self.stride, self.padding, self.output_padding, self.dilation = stride, padding, output_padding, dilation
        self.weight = _param((in_channels, out_channels // groups) + self.kernel_size, device, dtype)
        self.register_parameter("bias", _param((out_channels,), device, dtype) if bias else None)
        self.reset_parameters()

    def reset_parameters(self):
        _reset_fan_in(self.weight, self.bias)

    def forward(self, x, output_size=None):
        output_padding = self.output_padding
        if output_size is not None:
            s, p, d = (shapes.pair(v, n) for v, n in ((self.stride, "stride"), (self.padding, "padding"),
                                                       (self.dilation, "dilation")))
            out_hw = tuple(int(v) for v in tuple(output_size)[-2:])
            output_padding = tuple(o - shapes.conv_transpose_output_size(i, k, si, pi, di, 0)
                                   for o, i, k, si, pi, di in zip(out_hw, x.shape[2:], self.kernel_size, s, p, d))
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation, algo=self.algo)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, groups={self.groups}")


# ----------------------------------------------------------------------------- pooling

class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.return_indices, self.ceil_mode = return_indices, ceil_mode

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                            self.return_indices)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class MaxUnpool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x, indices, output_size=None):
        return F.max_unpool2d(x, indices, self.kernel_size, self.stride, self.padding, output_size)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.ceil_mode = kernel_size, stride, padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                            self.divisor_override)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


# ----------------------------------------------------------------------------- normalisation

class _BatchNorm(Module):
    _dims: tuple[int, ...] = ()
    _layout = ""
    _batch_norm = staticmethod(F.batch_norm)  # distributed.SyncBatchNorm's: statistics over all ranks

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None):
        super().__init__()
        _check_sizes(num_features=num_features)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = _param((num_features,), device, dtype)
            self.bias = _param((num_features,), device, dtype)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", _zeros((num_features,), device, dtype))
            self.register_buffer("running_var", _zeros((num_features,), device, dtype))
            self.register_buffer("num_batches_tracked", _zeros((), device, np.int64))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        self.reset_parameters()

    def reset_running_stats(self):
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            init.zeros_(self.num_batches_tracked)
            self._remember_count(0)

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            init.zeros_(self.bias)

    def forward(self, x):
        return self._normalise(x, self._batch_norm)

    def _relu_forward(self, x):
        """``relu(self(x))`` as one op (F.batch_norm_relu: one pass each way, bit for bit the
        two); nn/module.py decides when."""
        return self._normalise(x, F.batch_norm_relu)

    def _normalise(self, x, op):
        _check_input_dims(self, x, self._dims, self._layout)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            count = self._count_batch()
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / count
        # Batch statistics when training, or always when no running statistics are kept.
        use_batch = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        return op(x, self.running_mean if track else None, self.running_var if track else None,
                  self.weight, self.bias, use_batch, factor, self.eps)

    def _count_batch(self) -> int:
        """num_batches_tracked + 1, written into the buffer where it lives (on a GPU a fill
        kernel: nothing is read back, so a training step does not wait for the device here).
        The count is remembered with the buffer's version; the buffer is read only where it
        was written since by something else (load_state_dict, init, copy_, fill_ each count as
        a version; moving it to another device or dtype does not change its value)."""
        t = self.num_batches_tracked
        if t.device != "cpu" and _capturing():
            return self._count_captured_batch()
        seen = self.__dict__.get("_tracked")
        if seen is not None and seen[0] is t and seen[1] == t._vc[0]:
            count = seen[2] + 1
        else:
            count = int(t.item()) + 1
        t.fill_(count)
        self._remember_count(count)
        return count

    def _count_captured_batch(self) -> int:
        """In a step captured as a CUDA graph (kernels/cuda/graph.py) the count goes up on the
        device, once per replay; the host forgets it and reads it again when next needed. A
        cumulative average (momentum=None) needs 1/count on the host every step: not capturable."""
        if self.momentum is None:
            from ..kernels.cuda.graph import NotCapturable
            raise NotCapturable(f"{type(self).__name__}(momentum=None) computes 1/num_batches_tracked on the host")
        t = self.num_batches_tracked
        t._write(kernel("add", t.device)(t.data, 1))
        object.__setattr__(self, "_tracked", None)
        return 0

    def _remember_count(self, count: int) -> None:
        """Note that num_batches_tracked, at its current version, holds ``count``."""
        t = self.num_batches_tracked
        object.__setattr__(self, "_tracked", (t, t._vc[0], count))

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm2d(_BatchNorm):
    """Per-channel normalisation of (N, C, H, W) over (N, H, W)."""
    _dims, _layout = (4,), "(N, C, H, W)"


class BatchNorm1d(_BatchNorm):
    """Per-feature normalisation of (N, C) over N, or of (N, C, L) over (N, L)."""
    _dims, _layout = (2, 3), "(N, C) or (N, C, L)"


# ----------------------------------------------------------------------------- activations and reshaping

class ReLU(Module):
    def __init__(self, inplace: bool = False):  # inplace is accepted for compatibility; ops never alias
        super().__init__()

    def forward(self, x):
        return F.relu(x)


class Sigmoid(Module):
    def forward(self, x):
        return F.sigmoid(x)


class Tanh(Module):
    def forward(self, x):
        return F.tanh(x)


class Dropout(Module):
    """Inverted dropout while training; the identity in eval mode."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return F.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class ChannelShuffle(Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        return F.channel_shuffle(x, self.groups)

    def extra_repr(self):
        return f"groups={self.groups}"


# Eval-mode fusion of Conv2d -> BatchNorm2d -> ReLU runs (nn/module.py): these exact classes.
FUSION_ROLES.update({Conv2d: "conv", BatchNorm2d: "bn", ReLU: "relu", Linear: "linear"})


# ----------------------------------------------------------------------------- losses

class CrossEntropyLoss(Module):
    """Fused log-softmax cross-entropy of logits (N, K) against class indices (N,)."""

    def __init__(self, *, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.reduction, self.label_smoothing = reduction, label_smoothing

    def forward(self, input, target):
        return F.cross_entropy(input, target, reduction=self.reduction, label_smoothing=self.label_smoothing)


class MSELoss(Module):
    def __init__(self, *, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)
