"""Differentiable ops with PyTorch's names, argument order and defaults.

Each op is a small ``Function``: ``forward`` on device arrays, then ``backward``
right under it. Kernels come from the backend by (name, device); nothing here
assumes the CPU. Arguments are checked in Python (shapes.py) before any kernel
runs. Conv dualities used below (SPEC.md section 1):

    conv_transpose2d forward         = conv2d backward_input
    conv_transpose2d backward_input  = conv2d forward
    conv_transpose2d backward_weight = conv2d backward_weight(x=gy, gy=x)
"""
from __future__ import annotations

import numpy as np

from . import shapes
from .backend import kernel
from .tensor import Function, Tensor, _host_array

ALGOS = ("auto", "direct", "im2col")


# ----------------------------------------------------------------------------- inputs

def _tensor(x, name: str, like: Tensor | None = None) -> Tensor:
    """Tensors pass through; arrays, lists and scalars become constant tensors
    (scalars take the dtype of ``like``)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (np.ndarray, list, tuple, int, float, np.number)):
        dtype = like.dtype if like is not None and np.ndim(x) == 0 else None
        return Tensor(_host_array(x, dtype), device=like.device if like is not None else "cpu")
    raise TypeError(f"{name} must be a Tensor or a numpy array, got {type(x).__name__}")


def _image(x, name: str = "input") -> Tensor:
    x = _tensor(x, name)
    shapes.check_float(name, x)
    shapes.check_ndim(name, x, 4, "(N, C, H, W)")
    return x


def _conv_args(x, weight, bias, groups, algo):
    x, weight = _image(x), _tensor(weight, "weight")
    shapes.check_float("weight", weight)
    shapes.check_ndim("weight", weight, 4, "(C_out, C_in/groups, kH, kW)")
    if bias is not None:
        bias = _tensor(bias, "bias")
        shapes.check_float("bias", bias)
    shapes.check_same_dtype(input=x, weight=weight, bias=bias)
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    return x, weight, bias, int(groups)


def _check_bias(bias, channels, weight):
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias must have shape ({channels},) for weight of shape {weight.shape}, got {bias.shape}")


def _inputs(*tensors):
    """The tensors that take part in the graph (``None`` bias dropped)."""
    return tuple(t for t in tensors if t is not None)


# ----------------------------------------------------------------------------- convolution

class Conv2d(Function):
    def forward(self, x, w, b=None, *, stride, pad, dilation, groups, out_hw, algo):
        self.x, self.w, self.has_bias = x, w, b is not None
        self.args = (stride, pad, dilation, groups, algo)
        return kernel("conv2d_forward", self.device)(x, w, b, out_hw, *self.args)

    def backward(self, gy):
        x, w, dev = self.x, self.w, self.device
        gx = kernel("conv2d_backward_input", dev)(gy, w, x.shape[2:], *self.args) if self.needs_grad[0] else None
        gw = kernel("conv2d_backward_weight", dev)(x, gy, w.shape[2:], *self.args) if self.needs_grad[1] else None
        gb = kernel("conv2d_backward_bias", dev)(gy) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, algo="auto") -> Tensor:
    """2-D cross-correlation. input (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW)."""
    x, w, b, g = _conv_args(input, weight, bias, groups, algo)
    (n, c, h, wd), (co, cig, kh, kw) = x.shape, w.shape
    if c % g or co % g:
        raise ValueError(f"groups={g} must divide in_channels={c} and out_channels={co} (input {x.shape}, weight {w.shape})")
    if cig * g != c:
        raise ValueError(f"weight of shape {w.shape} with groups={g} expects {cig * g} input channels, input has shape {x.shape}")
    _check_bias(b, co, w)
    stride = shapes.positive_pair(stride, "stride")
    dilation = shapes.positive_pair(dilation, "dilation")
    pt, pb, pl, pr = shapes.conv_padding(padding, (kh, kw), stride, dilation)
    out_hw = (shapes.conv_output_size(h, kh, stride[0], pt, pb, dilation[0]),
              shapes.conv_output_size(wd, kw, stride[1], pl, pr, dilation[1]))
    shapes.check_output_size(out_hw, x.shape, f"conv2d with weight {w.shape}, padding={padding}, dilation={dilation}")
    return Conv2d.apply(*_inputs(x, w, b), stride=stride, pad=(pt, pl), dilation=dilation,
                        groups=g, out_hw=out_hw, algo=algo)


class ConvTranspose2d(Function):
    def forward(self, x, w, b=None, *, stride, pad, dilation, groups, out_hw, algo):
        self.x, self.w, self.has_bias = x, w, b is not None
        self.args = (stride, pad, dilation, groups, algo)
        y = kernel("conv2d_backward_input", self.device)(x, w, out_hw, *self.args)
        return kernel("add_channel_bias", self.device)(y, b) if b is not None else y

    def backward(self, gy):
        x, w, dev = self.x, self.w, self.device
        gx = kernel("conv2d_forward", dev)(gy, w, None, x.shape[2:], *self.args) if self.needs_grad[0] else None
        gw = kernel("conv2d_backward_weight", dev)(gy, x, w.shape[2:], *self.args) if self.needs_grad[1] else None
        gb = kernel("conv2d_backward_bias", dev)(gy) if self.has_bias and self.needs_grad[2] else None
        return gx, gw, gb


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                     *, algo="auto") -> Tensor:
    """Transposed convolution, the adjoint of conv2d. weight (C_in, C_out/groups, kH, kW)."""
    x, w, b, g = _conv_args(input, weight, bias, groups, algo)
    (n, c, h, wd), (ci, cog, kh, kw) = x.shape, w.shape
    if c % g:
        raise ValueError(f"groups={g} must divide in_channels={c} (input {x.shape})")
    if ci != c:
        raise ValueError(f"weight of shape {w.shape} expects {ci} input channels (dim 0), input has shape {x.shape}")
    _check_bias(b, cog * g, w)
    stride = shapes.positive_pair(stride, "stride")
    dilation = shapes.positive_pair(dilation, "dilation")
    pad = shapes.nonnegative_pair(padding, "padding")
    out_pad = shapes.nonnegative_pair(output_padding, "output_padding")
    for op, s, d in zip(out_pad, stride, dilation):
        if op >= s and op >= d:
            raise ValueError(f"output_padding={output_padding} must be smaller than either stride={stride} or dilation={dilation}")
    out_hw = tuple(shapes.conv_transpose_output_size(i, k, s, p, d, op)
                   for i, k, s, p, d, op in zip((h, wd), (kh, kw), stride, pad, dilation, out_pad))
    shapes.check_output_size(out_hw, x.shape, f"conv_transpose2d with weight {w.shape}, padding={padding}")
    return ConvTranspose2d.apply(*_inputs(x, w, b), stride=stride, pad=pad, dilation=dilation,
                                 groups=g, out_hw=out_hw, algo=algo)


# ----------------------------------------------------------------------------- pooling

def _pool_args(x, kernel_size, stride, padding, dilation, ceil_mode, what, max_pad):
    """Resolve a pooling op's hyper-parameters and its output size."""
    k = shapes.positive_pair(kernel_size, "kernel_size")
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else shapes.positive_pair(stride, "stride")
    p = shapes.nonnegative_pair(padding, "padding")
    d = shapes.positive_pair(dilation, "dilation")
    for pi, ki, di in zip(p, k, d):
        if pi > max_pad(ki, di):
            raise ValueError(f"{what}: padding={padding} must be at most half of the kernel_size={kernel_size} "
                             f"(dilation={dilation}); input shape {x.shape}")
    out_hw = tuple(shapes.pool_output_size(i, ki, si, pi, di, bool(ceil_mode))
                   for i, ki, si, pi, di in zip(x.shape[2:], k, s, p, d))
    shapes.check_output_size(out_hw, x.shape, f"{what} with kernel_size={kernel_size}, padding={padding}")
    return k, s, p, d, out_hw


class MaxPool2d(Function):
    def forward(self, x, *, out_hw, window, stride, pad, dilation):
        y, self.idx = kernel("max_pool2d_forward", self.device)(x, out_hw, window, stride, pad, dilation)
        self.in_hw = x.shape[2:]
        return y, self.idx

    def backward(self, gy):
        return (kernel("scatter_planes", self.device)(gy, self.idx, self.in_hw, True),)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling; with ``return_indices`` also the argmax ``h*W + w`` per output (int64)."""
    x = _image(input)
    k, s, p, d, out_hw = _pool_args(x, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d",
                                    lambda k, d: ((k - 1) * d + 1) // 2)
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
    x = _image(input)
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
        out_hw = tuple(int(v) for v in tuple(output_size)[-2:])
        if len(tuple(output_size)) not in (2, 4):
            raise ValueError(f"output_size must have 2 or 4 entries, got {output_size!r}")
        for o, dflt, si in zip(out_hw, default, s):
            if not dflt - si < o < dflt + si:
                raise ValueError(f"output_size={tuple(output_size)} is not within ({dflt - si}, {dflt + si}) for input {x.shape}")
    shapes.check_output_size(out_hw, x.shape, "max_unpool2d")
    idx_host = idx.numpy()
    if idx_host.size and (idx_host.min() < 0 or idx_host.max() >= out_hw[0] * out_hw[1]):
        raise ValueError(f"indices must lie in [0, {out_hw[0] * out_hw[1]}) for output size {out_hw}, "
                         f"got range [{idx_host.min()}, {idx_host.max()}]")
    if idx.dtype != np.int64:
        idx = Tensor(idx_host.astype(np.int64), device=x.device)
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
    x = _image(input)
    k, s, p, _, out_hw = _pool_args(x, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d",
                                    lambda k, d: k // 2)
    if divisor_override is not None and (not isinstance(divisor_override, (int, np.integer)) or divisor_override <= 0):
        raise ValueError(f"divisor_override must be a positive int or None, got {divisor_override!r}")
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
    x = _image(input)
    if isinstance(output_size, (list, tuple)) and len(output_size) == 2:
        output_size = tuple(x.shape[2 + i] if v is None else v for i, v in enumerate(output_size))
    out_hw = shapes.positive_pair(output_size, "output_size")
    return AdaptiveAvgPool2d.apply(x, out_hw=out_hw)


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
    try:
        np.empty(x.shape, np.bool_).reshape(shape)  # shape check on no data
    except ValueError:
        raise ValueError(f"cannot reshape tensor of shape {x.shape} into {shape}") from None
    return Reshape.apply(x, shape=shape)
