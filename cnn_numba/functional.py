"""Differentiable ops with PyTorch's names, argument order and defaults.

Each op is a small ``Function``: ``forward`` on device arrays, then ``backward``
right under it. Kernels come from the backend by (name, device); nothing here
assumes the CPU. Arguments are checked in Python (shapes.py) before any kernel
runs. Conv dualities used below (docs/convolution.md):

    conv_transpose2d forward         = conv2d backward_input
    conv_transpose2d backward_input  = conv2d forward
    conv_transpose2d backward_weight = conv2d backward_weight(x=gy, gy=x)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import shapes
from . import tensor as _autograd
from .backend import has_kernel, kernel
from .tensor import Function, Tensor, _host_array

# ----------------------------------------------------------------------------- inputs

def _tensor(x, name: str, like: Tensor | None = None) -> Tensor:
    """Tensors pass through; arrays, lists and scalars become constant tensors
    (scalars take the dtype of ``like``)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple, int, float, np.number)):
        scalar = isinstance(x, (int, float, np.number)) or isinstance(x, np.ndarray) and x.ndim == 0
        try:
            arr = _host_array(x, like.dtype if like is not None and scalar else None, name)
        except TypeError as e:  # a ragged list is _host_array's ValueError naming ``name``, as PyTorch's
            raise TypeError(f"{name}: {e}") from None
        return Tensor(arr, device=like.device if like is not None else "cpu")
    raise TypeError(f"{name} must be a Tensor or a numpy array, got {type(x).__name__}")


def _image(x, name: str = "input") -> Tensor:
    x = _tensor(x, name)
    shapes.check_float(name, x)
    shapes.check_ndim(name, x, 4, "(N, C, H, W)")
    return x


def _conv_args(x, weight, bias, groups, algo):
    if (isinstance(x, Tensor) and isinstance(weight, Tensor) and (bias is None or isinstance(bias, Tensor))
            and type(groups) is int and groups > 0 and algo == "auto"):
        # The common call (a layer's own tensors), checked in a few comparisons; anything
        # else, or anything wrong, takes the full checks below, which name what is wrong.
        xd, wd, dt = x.data, weight.data, x.data.dtype
        if (dt in shapes.FLOAT_DTYPES and wd.dtype == dt and xd.ndim == 4 and wd.ndim == 4
                and (bias is None or bias.data.dtype == dt)):
            return x, weight, bias, groups
    x, weight = _image(x), _tensor(weight, "weight")
    shapes.check_float("weight", weight)
    shapes.check_ndim("weight", weight, 4, "(C_out, C_in/groups, kH, kW)")
    if bias is not None:
        bias = _tensor(bias, "bias")
        shapes.check_float("bias", bias)
    shapes.check_same_dtype(input=x, weight=weight, bias=bias)
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    kernel("conv2d_algorithms", x.device)().check(algo)
    return x, weight, bias, int(groups)


def _check_bias(bias, channels, weight):
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must have shape ({channels},) for weight of shape {weight.shape}, got {bias.shape}")


def _indices(t: Tensor, bound: int, name: str, what: str, device: str) -> Tensor:
    """Integer tensor ``t`` checked to lie in ``[0, bound)`` (on its own device: only a count
    comes back), as int64 on ``device``. Labels that ``checked_labels`` made skip the check."""
    if getattr(t, "_checked", None) == (bound, t._vc[0]) and t.device == device:
        return t
    if kernel("count_outside", t.device)(t.data, 0, bound):
        host = t.numpy()
        raise ValueError(f"{name} must lie in [0, {bound}) for {what}, got range [{host.min()}, {host.max()}]")
    if t.dtype != np.int64 or t.device != device:
        t = Tensor(t.numpy().astype(np.int64), device=device)
    return t


def _label_array(labels, classes: int) -> np.ndarray:
    """Class indices ``labels`` (N,) as a host int64 array, checked to lie in [0, classes)."""
    host = np.asarray(labels.numpy() if isinstance(labels, Tensor) else labels)
    if host.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices, got dtype {host.dtype}")
    if host.size and (host.min() < 0 or host.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got range [{host.min()}, {host.max()}]")
    return host.astype(np.int64, copy=False)


def _mark_checked(t: Tensor, classes: int) -> Tensor:
    """Mark int64 labels ``t`` as known to lie in [0, classes): cross_entropy then takes them
    without checking them on the device, a check that reads its count back (a wait for the
    device, and a read no CUDA graph can capture). An in-place write through the Tensor API
    drops the mark (it bumps the version); whoever writes the memory directly checks first."""
    t._checked = (classes, t._vc[0])
    return t


def _checked_labels(labels, classes: int, device: str) -> Tensor:
    """Host labels checked on the host, uploaded once, marked (see _mark_checked)."""
    return _mark_checked(Tensor(_label_array(labels, classes), device=device), classes)


def _inputs(*tensors):
    """The tensors that take part in the graph (``None`` bias dropped)."""
    return tuple(t for t in tensors if t is not None)


# ----------------------------------------------------------------------------- convolution

class Conv2d(Function):
    def forward(self, x, w, b=None, *, geom, algo):
        self.x, self.w, self.has_bias = x, w, b is not None
        self.geom, self.algo = geom, algo
        return kernel("conv2d_forward", self.device)(x, w, b, geom, algo)

    def backward(self, gy):
        x, w, dev, geom, algo = self.x, self.w, self.device, self.geom, self.algo
        gx = kernel("conv2d_backward_input", dev)(gy, w, geom, algo) if self.needs_grad[0] else None
        gw = kernel("conv2d_backward_weight", dev)(x, gy, geom, algo) if self.needs_grad[1] else None
        gb = kernel("conv2d_backward_bias", dev)(gy) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algo="auto") -> Tensor:
    """2-D cross-correlation. input (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW).
    ``algo``: 'auto' or one of the device's algorithms (kernels/conv_algos.py)."""
    x, w, b, g = _conv_args(input, weight, bias, groups, algo)
    geom = shapes.conv2d_geom(x.shape, w.shape, stride, padding, dilation, g)
    _check_bias(b, geom.co, w)
    return Conv2d.apply(*_inputs(x, w, b), geom=geom, algo=algo)


class Conv2dEpilogue(Function):
    """conv2d with the device's epilogue applied as each output is stored (kernels/conv.py).
    Forward only: conv2d_bn_relu runs it only where no graph is recorded."""

    def forward(self, x, w, b=None, *, geom, algo, epilogue):
        return kernel("conv2d_forward", self.device)(x, w, b, geom, algo, epilogue=epilogue)

    def backward(self, gy):
        raise RuntimeError("Conv2dEpilogue has no backward (conv2d_bn_relu records the unfused ops)")


def _records(*tensors) -> bool:
    """Whether an op on ``tensors`` (None skipped) would record a graph: Function.apply's rule."""
    return _autograd.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fuses(fused_kernel: str, device: str, *tensors) -> bool:
    """Whether a fused forward-only op runs (conv2d_bn_relu, linear_relu): the device has its
    kernel, nothing records a graph through ``tensors``, and onnx.export is not tracing (it
    needs the ops one by one)."""
    return _autograd._trace.recorder is None and has_kernel(fused_kernel, device) and not _records(*tensors)


def _bn_tensors(bn, x, co):
    """(running_mean, running_var, weight, bias, eps) as tensors (weight and bias may be None),
    or None unless each is (co,) on x's device with x's dtype (batch_norm then says why)."""
    named = [t if t is None or isinstance(t, Tensor) else _tensor(t, name)
             for t, name in zip(bn[:4], ("running_mean", "running_var", "weight", "bias"))]
    if named[0] is None or named[1] is None:
        return None
    shape, dtype, device = (co,), x.data.dtype, x.device
    for t in named:
        if t is not None and (t.data.shape != shape or t.data.dtype != dtype or t.device != device):
            return None
    return (*named, float(bn[4]))


def conv2d_bn_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, bn=None,
                   with_relu=False, algo="auto") -> Tensor:
    """``relu(batch_norm(conv2d(input, weight, bias, ...), *bn, training=False))``, with bn =
    (running_mean, running_var, weight, bias, eps) (weight and bias may be None) or None for no
    batch norm, and the relu only ``with_relu``: eval-mode Conv2d -> BatchNorm2d -> ReLU.

    One pass over the output, batch norm and relu applied as the conv stores each value, where
    no graph is recorded (no_grad, or no input requiring grad), the device has the epilogue
    (the CPU and CUDA both do) and onnx.export is not tracing; the ops one by one otherwise.
    Either way the same arithmetic: the outputs agree bit for bit (tests/test_fusion.py,
    tests/test_cuda_conv.py)."""
    x, w, b, g = _conv_args(input, weight, bias, groups, algo)
    stats = None if bn is None else _bn_tensors(bn, x, w.shape[0])
    if (bn is not None and stats is None) or not _fuses("conv2d_epilogue", x.device, x, w, b,
                                                         *(stats[2:4] if stats else ())):
        y = conv2d(x, w, b, stride, padding, dilation, groups, algo=algo)
        if bn is not None:
            y = batch_norm(y, bn[0], bn[1], bn[2], bn[3], False, 0.0, bn[4])
        return relu(y) if with_relu else y
    geom = shapes.conv2d_geom(x.shape, w.shape, stride, padding, dilation, g)
    _check_bias(b, geom.co, w)
    arrays = None if stats is None else tuple(None if t is None else t.data for t in stats[:4]) + (stats[4],)
    epilogue = kernel("conv2d_epilogue", x.device)(x.dtype, arrays, with_relu)
    return Conv2dEpilogue.apply(*_inputs(x, w, b), geom=geom, algo=algo, epilogue=epilogue)


class ConvTranspose2d(Function):
    """conv2d's adjoint: ``geom`` is that conv2d's geometry, whose input this op outputs."""

    def forward(self, x, w, b=None, *, geom, algo):
        self.x, self.w, self.has_bias = x, w, b is not None
        self.geom, self.algo = geom, algo
        y = kernel("conv2d_backward_input", self.device)(x, w, geom, algo)
        return kernel("add_channel_bias", self.device)(y, b) if b is not None else y

    def backward(self, gy):
        x, w, dev, geom, algo = self.x, self.w, self.device, self.geom, self.algo
        gx = kernel("conv2d_forward", dev)(gy, w, None, geom, algo) if self.needs_grad[0] else None
        gw = kernel("conv2d_backward_weight", dev)(gy, x, geom, algo) if self.needs_grad[1] else None
        gb = kernel("conv2d_backward_bias", dev)(gy) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                     *, algo="auto") -> Tensor:
    """Transposed convolution, the adjoint of conv2d. weight (C_in, C_out/groups, kH, kW)."""
    x, w, b, g = _conv_args(input, weight, bias, groups, algo)
    geom = shapes.conv_transpose2d_geom(x.shape, w.shape, stride, padding, output_padding, g, dilation)
    _check_bias(b, geom.c, w)
    return ConvTranspose2d.apply(*_inputs(x, w, b), geom=geom, algo=algo)


# ----------------------------------------------------------------------------- pooling

def _pool_input(input, what: str) -> Tensor:
    """A pool's (N, C, H, W) input: N may be 0, C, H, W not (as PyTorch: a window over no
    pixels has no max and no mean)."""
    x = _image(input)
    if 0 in x.shape[1:]:
        raise ValueError(f"{what}: input of shape {tuple(x.shape)} is empty in C, H or W; only N may be 0")
    return x


def _pool_args(x, kernel_size, stride, padding, dilation, ceil_mode, what):
    """Resolve a pooling op's hyper-parameters and its output size (remembered per input
    shape and arguments: ``_pool_sizes``)."""
    return _pool_sizes(x.shape, kernel_size, stride, padding, dilation, ceil_mode, what)


@shapes._memoised
def _pool_sizes(shape, kernel_size, stride, padding, dilation, ceil_mode, what):
    """``(k, s, p, d, out_hw)`` of a pooling op on an input of ``shape``."""
    k = shapes.positive_pair(kernel_size, "kernel_size")
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else shapes.positive_pair(stride, "stride")
    p = shapes.nonnegative_pair(padding, "padding")
    d = shapes.positive_pair(dilation, "dilation")
    for pi, ki in zip(p, k):
        if pi > ki // 2:  # PyTorch's limit; a larger pad makes windows of padding only
            raise ValueError(f"{what}: padding={padding} must be at most half of the kernel_size={kernel_size} "
                             f"(dilation={dilation}); input shape {shape}")
    out_hw = tuple(shapes.pool_output_size(i, ki, si, pi, di, bool(ceil_mode))
                   for i, ki, si, pi, di in zip(shape[2:], k, s, p, d))
    shapes.check_output_size(out_hw, shape, f"{what} with kernel_size={kernel_size}, padding={padding}")
    return k, s, p, d, out_hw


class MaxPool2d(Function):
    def forward(self, x, *, out_hw, window, stride, pad, dilation):
        self.args = (window, stride, pad, dilation)
        y, self.idx = kernel("max_pool2d_forward", self.device)(x, out_hw, *self.args)
        self.in_hw = x.shape[2:]
        return y, self.idx

    def backward(self, gy):
        return (kernel("max_pool2d_backward", self.device)(gy, self.idx, self.in_hw, *self.args),)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling; with ``return_indices`` also the argmax ``h*W + w`` per output (int64)."""
    x = _pool_input(input, "max_pool2d")
    k, s, p, d, out_hw = _pool_args(x, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")
    y, idx = MaxPool2d.apply(x, out_hw=out_hw, window=k, stride=s, pad=p, dilation=d)
    return (y, idx) if return_indices else y


class MaxUnpool2d(Function):
    def forward(self, x, idx, *, out_hw):
        self.idx = idx
        return kernel("scatter_planes", self.device)(x, idx, out_hw, False)

    def backward(self, gy):
        return kernel("gather_planes", self.device)(gy, self.idx), None


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Place each value at its argmax index; zeros elsewhere. Inverse of max_pool2d's selection."""
    x = _pool_input(input, "max_unpool2d")
    idx = _tensor(indices, "indices")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices must be an integer tensor, got dtype {idx.dtype}")
    if idx.shape != x.shape:
        raise ValueError(f"indices of shape {idx.shape} must match input of shape {x.shape}")
    k = shapes.positive_pair(kernel_size, "kernel_size")
    s = k if stride is None else shapes.positive_pair(stride, "stride")
    p = shapes.nonnegative_pair(padding, "padding")
    default = tuple((i - 1) * si - 2 * pi + ki for i, si, pi, ki in zip(x.shape[2:], s, p, k))
    if output_size is None:
        out_hw = default
    else:
        # PyTorch: a sequence of ints (TypeError otherwise) of length 2 or 4 (ValueError).
        if not isinstance(output_size, Sequence) or isinstance(output_size, str):
            raise TypeError(f"output_size must be a sequence of 2 or 4 ints, got {output_size!r}")
        if len(output_size) not in (2, 4):
            raise ValueError(f"output_size must have 2 or 4 entries, got {output_size!r}")
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in output_size):
            raise TypeError(f"output_size must hold ints, got {output_size!r}")
        out_hw = tuple(int(v) for v in output_size[-2:])
        for o, dflt, si in zip(out_hw, default, s):
            if not dflt - si < o < dflt + si:
                raise ValueError(f"output_size={tuple(output_size)} is not within ({dflt - si}, {dflt + si}) for input {x.shape}")
    shapes.check_output_size(out_hw, x.shape, "max_unpool2d")
    idx = _indices(idx, out_hw[0] * out_hw[1], "indices", f"output size {out_hw}", x.device)
    return MaxUnpool2d.apply(x, idx, out_hw=out_hw)


class AvgPool2d(Function):
    def forward(self, x, *, out_hw, window, stride, pad, count_include_pad, divisor_override):
        self.in_hw = x.shape[2:]
        self.args = (window, stride, pad, count_include_pad, divisor_override)
        return kernel("avg_pool2d_forward", self.device)(x, out_hw, *self.args)

    def backward(self, gy):
        return (kernel("avg_pool2d_backward", self.device)(gy, self.in_hw, *self.args),)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None) -> Tensor:
    x = _pool_input(input, "avg_pool2d")
    k, s, p, _, out_hw = _pool_args(x, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d")
    # PyTorch: an int (a bool or float is a TypeError), not 0; a negative divisor is allowed.
    if divisor_override is not None:
        if isinstance(divisor_override, (bool, np.bool_)) or not isinstance(divisor_override, (int, np.integer)):
            raise TypeError(f"divisor_override must be an int or None, got {divisor_override!r}")
        if divisor_override == 0:
            raise ValueError("divisor_override must not be zero")
    return AvgPool2d.apply(x, out_hw=out_hw, window=k, stride=s, pad=p, count_include_pad=bool(count_include_pad),
                           divisor_override=int(divisor_override or 0))


class AdaptiveAvgPool2d(Function):
    def forward(self, x, *, out_hw):
        self.in_hw = x.shape[2:]
        return kernel("adaptive_avg_pool2d_forward", self.device)(x, out_hw)

    def backward(self, gy):
        return (kernel("adaptive_avg_pool2d_backward", self.device)(gy, self.in_hw),)


def adaptive_avg_pool2d(input, output_size) -> Tensor:
    """Average over windows ``[floor(i*H/O), ceil((i+1)*H/O))``; output_size 1 is global average pooling."""
    x = _pool_input(input, "adaptive_avg_pool2d")
    if isinstance(output_size, (list, tuple)) and len(output_size) == 2:
        output_size = tuple(x.shape[2 + i] if v is None else v for i, v in enumerate(output_size))
    out_hw = shapes.positive_pair(output_size, "output_size")
    return AdaptiveAvgPool2d.apply(x, out_hw=out_hw)


# ----------------------------------------------------------------------------- devices

class ToDevice(Function):
    def forward(self, a, *, device):
        self.out_device = device
        return kernel("from_host", device)(kernel("to_host", self.device)(a))

    def backward(self, gy):
        return (kernel("from_host", self.device)(kernel("to_host", self.out_device)(gy)),)


def to_device(input, device) -> Tensor:
    """``input`` copied to ``device`` (Tensor.to); the gradient is copied back."""
    from .backend import check_device
    return ToDevice.apply(_tensor(input, "input"), device=check_device(device))


# ----------------------------------------------------------------------------- elementwise

class ReLU(Function):
    def forward(self, x):
        self.y = kernel("relu_forward", self.device)(x)
        return self.y

    def backward(self, gy):
        return (kernel("relu_backward", self.device)(self.y, gy),)


def relu(input) -> Tensor:
    x = _tensor(input, "input")
    shapes.check_float("input", x)
    return ReLU.apply(x)


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return kernel("add", self.device)(a, b)

    def backward(self, gy):
        sum_to = kernel("sum_to", self.device)
        return tuple(sum_to(gy, s) if need else None for s, need in zip(self.shapes, self.needs_grad))


class AddReLU(Function):
    """relu(a + b) in one pass (the device's ``add_relu_forward``); the gradient, gy masked
    where the output is 0, goes to both: relu's backward, then add's, bit for bit."""

    def forward(self, a, b):
        self.y = kernel("add_relu_forward", self.device)(a, b)
        return self.y

    def backward(self, gy):
        g = kernel("relu_backward", self.device)(self.y, gy)
        return tuple(g if need else None for need in self.needs_grad)


def add_relu(input, other) -> Tensor:
    """``relu(input + other)``: a residual block's join. One pass where the device has the fused
    kernel (the CPU), the operands have one shape and dtype, and onnx.export is not tracing;
    add then relu otherwise. The same numbers either way, forward and backward, bit for bit
    (tests/test_fusion.py)."""
    a, b = _pair_operands(input, other)
    if (a.shape != b.shape or a.dtype != b.dtype or _autograd._trace.recorder is not None
            or not has_kernel("add_relu_forward", a.device)):
        return relu(add(a, b))
    shapes.check_float("input", a)
    return AddReLU.apply(a, b)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b = a, b
        return kernel("mul", self.device)(a, b)

    def backward(self, gy):
        mul, sum_to = kernel("mul", self.device), kernel("sum_to", self.device)
        ga = sum_to(mul(gy, self.b), self.a.shape) if self.needs_grad[0] else None
        gb = sum_to(mul(gy, self.a), self.b.shape) if self.needs_grad[1] else None
        return ga, gb


class Sum(Function):
    def forward(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        return kernel("sum", self.device)(a)

    def backward(self, gy):
        ones = kernel("full", self.device)(self.shape, 1.0, self.dtype)
        return (kernel("mul", self.device)(ones, gy),)


class Reshape(Function):
    view = True  # the output is a view of the input: one version counter for both

    def forward(self, a, *, shape):
        self.in_shape = a.shape
        return kernel("reshape", self.device)(a, shape)

    def backward(self, gy):
        return (kernel("reshape", self.device)(gy, self.in_shape),)


def _pair_operands(a, b):
    if isinstance(a, Tensor):
        return a, _tensor(b, "other", like=a)
    b = _tensor(b, "other")
    return _tensor(a, "input", like=b), b


def add(a, b) -> Tensor:
    return Add.apply(*_pair_operands(a, b))


def mul(a, b) -> Tensor:
    return Mul.apply(*_pair_operands(a, b))


def sub(a, b) -> Tensor:
    a, b = _pair_operands(a, b)
    return add(a, mul(b, -1.0))


def sum(input) -> Tensor:  # noqa: A001 - PyTorch's name
    return Sum.apply(_tensor(input, "input"))


def mean(input) -> Tensor:
    x = _tensor(input, "input")
    return mul(sum(x), 1.0 / max(x.size, 1))


def reshape(input, shape) -> Tensor:
    x = _tensor(input, "input")
    shape = tuple(int(s) for s in shape)
    if min(shape, default=0) < -1:  # numpy would take any negative size as -1; PyTorch refuses
        raise ValueError(f"cannot reshape tensor of shape {x.shape} into {shape}: invalid size {min(shape)}")
    if min(shape, default=0) < 0 or math.prod(shape) != math.prod(x.shape):  # else plainly valid
        try:
            np.empty(x.shape, np.bool_).reshape(shape)  # numpy's rules (-1 included) on no data
        except ValueError:
            raise ValueError(f"cannot reshape tensor of shape {x.shape} into {shape}") from None
    return Reshape.apply(x, shape=shape)


# ----------------------------------------------------------------------------- layers: linear, activations, normalisation, losses
#
# Primitives with a backward: linear, sigmoid, tanh, batch_norm, cross_entropy (fused
# log-softmax), cat, permute. Compositions of primitives (no backward of their own):
# dropout (a product with a constant mask), mse_loss, flatten (reshape),
# channel_shuffle (reshape, permute, reshape).

from . import random as _random  # noqa: E402  (the generator behind dropout masks)


def _float(x, name: str, like: Tensor | None = None) -> Tensor:
    x = _tensor(x, name, like)
    shapes.check_float(name, x)
    return x


class Linear(Function):
    def forward(self, x, w, b=None):
        self.x, self.w, self.has_bias = x, w, b is not None
        return kernel("linear_forward", self.device)(x, w, b)

    def backward(self, gy):
        dev = self.device
        gx = kernel("linear_backward_input", dev)(gy, self.w) if self.needs_grad[0] else None
        gw = kernel("linear_backward_weight", dev)(gy, self.x) if self.needs_grad[1] else None
        gb = kernel("sum_to", dev)(gy, self.w.shape[:1]) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


def _linear_args(input, weight, bias):
    x, w = _float(input, "input"), _float(weight, "weight")
    b = None if bias is None else _float(bias, "bias")
    shapes.check_same_dtype(input=x, weight=w, bias=b)
    shapes.check_ndim("weight", w, 2, "(out_features, in_features)")
    if x.ndim == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input of shape {x.shape} does not end in in_features={w.shape[1]} (weight {w.shape})")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},) for weight of shape {w.shape}, got {b.shape}")
    return x, w, b


def linear(input, weight, bias=None) -> Tensor:
    """y = input @ weight.T + bias. input (*, in_features), weight (out_features, in_features)."""
    return Linear.apply(*_inputs(*_linear_args(input, weight, bias)))


class LinearReLU(Function):
    """relu(linear) in one pass (the device's ``linear_relu_forward``). Forward only: linear_relu
    runs it only where no graph is recorded."""

    def forward(self, x, w, b=None):
        return kernel("linear_relu_forward", self.device)(x, w, b)

    def backward(self, gy):
        raise RuntimeError("LinearReLU has no backward (linear_relu records the unfused ops)")


def linear_relu(input, weight, bias=None) -> Tensor:
    """``relu(linear(input, weight, bias))``: eval-mode Linear -> ReLU. One pass, the relu
    applied as each output is stored, where no graph is recorded, the device has the fused
    kernel (the CPU) and onnx.export is not tracing; the two ops otherwise. The same numbers
    either way, bit for bit (tests/test_fusion.py)."""
    x, w, b = _linear_args(input, weight, bias)
    if not _fuses("linear_relu_forward", x.device, x, w, b):
        return relu(Linear.apply(*_inputs(x, w, b)))
    return LinearReLU.apply(*_inputs(x, w, b))


class Sigmoid(Function):
    def forward(self, x):
        self.y = kernel("sigmoid_forward", self.device)(x)
        return self.y

    def backward(self, gy):
        return (kernel("sigmoid_backward", self.device)(self.y, gy),)  # gy * y * (1 - y)


def sigmoid(input) -> Tensor:
    return Sigmoid.apply(_float(input, "input"))


class Tanh(Function):
    def forward(self, x):
        self.y = kernel("tanh_forward", self.device)(x)
        return self.y

    def backward(self, gy):
        return (kernel("tanh_backward", self.device)(self.y, gy),)  # gy * (1 - y^2)


def tanh(input) -> Tensor:
    return Tanh.apply(_float(input, "input"))


def dropout(input, p: float = 0.5, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).
    The mask comes from cnn_numba's generator (``cnn_numba.manual_seed``), drawn on the host
    and copied to the input's device, so a seed gives the same mask on every device."""
    x = _float(input, "input")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    keep = _random.default_generator().random(x.shape) >= p
    mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p)) if p < 1.0 else np.zeros(x.shape, x.dtype)
    return mul(x, Tensor(mask, device=x.device))


def _affine(x, wb, has_wb, dev):
    """The scale and shift (C,) of a batch norm: the given ones (``wb``, in order), else 1 and 0."""
    c, wb = x.shape[1], iter(wb)
    w = next(wb) if has_wb[0] else kernel("full", dev)((c,), 1.0, x.dtype)
    b = next(wb) if has_wb[1] else kernel("full", dev)((c,), 0.0, x.dtype)
    return w, b


class BatchNorm(Function):
    """batch_norm; with ``relu`` (CPU only, functional.batch_norm_relu) relu(batch_norm(x)) in
    one pass each way: the output kept for relu's mask, which the backward applies to gy as it
    reads it."""

    def forward(self, x, *wb, has_wb, running, training, momentum, eps, relu):
        dev, c = self.device, x.shape[1]
        w, b = _affine(x, wb, has_wb, dev)
        if training:
            mean, var = kernel("batch_norm_stats", dev)(x)
            if running[0] is not None:
                m = x.size // c
                kernel("batch_norm_update_stats", dev)(running[0], running[1], mean, var, momentum, m)
        else:  # backward reads the mean: a copy (C values), since a later training pass updates it in place
            mean, var = kernel("copy", dev)(running[0]), running[1]
        fused = {"relu": True} if relu else {}  # (CUDA's kernel has no relu)
        y, invstd = kernel("batch_norm_forward", dev)(x, mean, var, w, b, eps, **fused)
        self.x, self.mean, self.invstd, self.w, self.has_wb, self.training = x, mean, invstd, w, has_wb, training
        self.relu_out = y if relu else None  # relu's mask, for the backward
        return y

    def backward(self, gy):
        fused = {} if self.relu_out is None else {"y": self.relu_out}
        gx, gw, gb = kernel("batch_norm_backward", self.device)(gy, self.x, self.mean, self.invstd, self.w,
                                                                self.training, **fused)
        return (gx,) + tuple(g for g, has in zip((gw, gb), self.has_wb) if has)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5) -> Tensor:
    """Normalise each channel of input (N, C, *) over (N, *): with the batch's statistics when
    training (then running_mean/var, if given, are updated in place with ``momentum``, the variance
    unbiased), with the running statistics otherwise; then scale by weight and shift by bias (C,)."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, False)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-5) -> Tensor:
    """``relu(batch_norm(...))`` with batch_norm's arguments, bit for bit: on the CPU one pass
    each way (the cut applied as the batch norm stores, relu's mask as its backward reads gy),
    elsewhere the two ops. nn.Sequential and the residual blocks run BatchNorm2d -> ReLU
    through it (nn/module.py)."""
    fused = _tensor(input, "input").device == "cpu" and _autograd._trace.recorder is None
    y = _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, fused)
    return y if fused else relu(y)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, with_relu):
    """batch_norm, or with ``with_relu`` (the CPU's kernels only) relu(batch_norm) as one op."""
    x, w, b, running = _batch_norm_args(input, running_mean, running_var, weight, bias, training)
    if training and x.size // max(x.shape[1], 1) <= 1:
        raise ValueError(f"batch_norm: expected more than 1 value per channel when training, got input of shape {x.shape}")
    return BatchNorm.apply(*_inputs(x, w, b), has_wb=(w is not None, b is not None), running=running,
                           training=bool(training), momentum=float(momentum), eps=float(eps), relu=with_relu)


def _batch_norm_args(input, running_mean, running_var, weight, bias, training):
    """batch_norm's checks: (input, weight or None, bias or None, (running arrays or Nones))."""
    x = _float(input, "input")
    if x.ndim < 2:
        raise ValueError(f"batch_norm: input must be (N, C) or (N, C, ...), got shape {x.shape}")
    c = x.shape[1]
    named = dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    for name, t in named.items():
        if t is not None:
            named[name] = t = _float(t, name)
            if t.shape != (c,):
                raise ValueError(f"batch_norm: {name} must have shape ({c},) for input of shape {x.shape}, got {t.shape}")
    shapes.check_same_dtype(input=x, **named)
    rm, rv = named["running_mean"], named["running_var"]
    if (rm is None) != (rv is None):
        raise ValueError("batch_norm: give both running_mean and running_var, or neither")
    if not training and rm is None:
        raise ValueError("batch_norm: running_mean and running_var are needed when not training")
    return x, named["weight"], named["bias"], (None, None) if rm is None else (rm.data, rv.data)


REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


class CrossEntropy(Function):
    def forward(self, z, t, *, reduction, label_smoothing):
        dev, n = self.device, z.shape[0]
        loss, self.lse = kernel("cross_entropy_forward", dev)(z, t, label_smoothing)
        self.z, self.t, self.eps, self.reduction = z, t, label_smoothing, reduction
        if reduction == "none":
            return loss
        total = kernel("sum", dev)(loss)
        return total if reduction == "sum" else kernel("mul", dev)(total, z.dtype.type(1.0 / n if n else np.nan))

    def backward(self, gy):
        dev, (n, _) = self.device, self.z.shape
        if self.reduction == "none":
            gl = gy
        else:  # every row receives gy (sum) or gy/N (mean)
            scale = 1.0 if self.reduction == "sum" else 1.0 / max(n, 1)
            gl = kernel("mul", dev)(kernel("full", dev)((n,), scale, gy.dtype), gy)
        return kernel("cross_entropy_backward", dev)(self.z, self.t, self.lse, gl, self.eps), None


def cross_entropy(input, target, *, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of logits input (N, K) against class indices target (N,), fused:
    the gradient is softmax(input) - q with q = (1 - label_smoothing) onehot(target) +
    label_smoothing/K, divided by N for the mean."""
    z = _float(input, "input")
    t = _tensor(target, "target")  # host labels stay on the host until checked
    shapes.check_ndim("input", z, 2, "(N, K) logits")
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype {t.dtype}")
    if t.shape != z.shape[:1]:
        raise ValueError(f"target of shape {t.shape} must be ({z.shape[0]},) for input of shape {z.shape}")
    _check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    t = _indices(t, z.shape[1], "target", f"input of shape {z.shape}", z.device)
    return CrossEntropy.apply(z, t, reduction=reduction, label_smoothing=float(label_smoothing))


def mse_loss(input, target, *, reduction: str = "mean") -> Tensor:
    """Mean (or sum, or elementwise) squared error; shapes must match."""
    x = _float(input, "input")
    t = _float(target, "target", like=x)
    if x.shape != t.shape:
        raise ValueError(f"mse_loss: input of shape {x.shape} and target of shape {t.shape} differ")
    shapes.check_same_dtype(input=x, target=t)
    _check_reduction(reduction)
    d = sub(x, t)
    sq = mul(d, d)
    return sq if reduction == "none" else sum(sq) if reduction == "sum" else mean(sq)


def _dim(dim, ndim, name="dim") -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


def flatten(input, start_dim: int = 1, end_dim: int = -1) -> Tensor:
    """Merge dims start_dim..end_dim into one (a reshape)."""
    x = _tensor(input, "input")
    if x.ndim == 0:
        return reshape(x, (1,))
    s, e = _dim(start_dim, x.ndim, "start_dim"), _dim(end_dim, x.ndim, "end_dim")
    if s > e:
        raise ValueError(f"flatten: start_dim={start_dim} comes after end_dim={end_dim} for shape {x.shape}")
    return reshape(x, x.shape[:s] + (math.prod(x.shape[s:e + 1]),) + x.shape[e + 1:])


class Cat(Function):
    def forward(self, *arrays, dim):
        self.sizes, self.dim = [a.shape[dim] for a in arrays], dim
        return kernel("cat", self.device)(arrays, dim)

    def backward(self, gy):
        return tuple(kernel("split", self.device)(gy, self.sizes, self.dim))


def cat(tensors, dim: int = 1) -> Tensor:
    """Concatenate along dim (default 1: channels, as for Inception branches)."""
    ts = [_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if not ts:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    first = ts[0]
    d = _dim(dim, max(first.ndim, 1))
    for i, t in enumerate(ts):
        if t.ndim != first.ndim or t.shape[:d] + t.shape[d + 1:] != first.shape[:d] + first.shape[d + 1:]:
            raise ValueError(f"cat along dim {dim}: tensors[{i}] of shape {t.shape} does not match "
                             f"tensors[0] of shape {first.shape} outside that dim")
    shapes.check_same_dtype(**{f"tensors[{i}]": t for i, t in enumerate(ts)})
    return Cat.apply(*ts, dim=d)


class Permute(Function):
    def forward(self, a, *, dims):
        self.inverse = tuple(np.argsort(dims))
        return kernel("permute", self.device)(a, dims)

    def backward(self, gy):
        return (kernel("permute", self.device)(gy, self.inverse),)


def permute(input, dims) -> Tensor:
    x = _tensor(input, "input")
    dims = tuple(_dim(int(d), x.ndim) for d in dims)
    if sorted(dims) != list(range(x.ndim)):
        raise ValueError(f"permute: dims {dims} is not a permutation of the {x.ndim} dims of shape {x.shape}")
    return Permute.apply(x, dims=dims)


def channel_shuffle(input, groups: int) -> Tensor:
    """ShuffleNet's shuffle of input (N, C, *): view channels as (groups, C/groups), transpose, flatten."""
    x = _tensor(input, "input")
    if x.ndim < 3:
        raise ValueError(f"channel_shuffle: input must be (N, C, *) with at least 3 dims, got shape {x.shape}")
    n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
    if not isinstance(groups, (int, np.integer)) or groups <= 0 or c % groups:
        raise ValueError(f"channel_shuffle: groups={groups!r} must be a positive int dividing C={c} (input {x.shape})")
    y = reshape(x, (n, groups, c // groups) + rest)
    y = permute(y, (0, 2, 1) + tuple(range(3, 3 + len(rest))))
    return reshape(y, x.shape)
