"""Hyper-parameter normalisation and output sizes: the one place for this arithmetic.

Every public op resolves its arguments here, in Python, before any kernel runs, so a
bad argument is a ``ValueError``/``TypeError`` naming the argument and the shapes. A conv
layer's arguments become one ``ConvGeom`` (``conv2d_geom``, ``conv_transpose2d_geom``),
which every conv launcher reads by field name.

Sizes per spatial dimension (docs/convolution.md), with ``k`` kernel, ``s`` stride,
``p0``/``p1`` padding before/after, ``d`` dilation, ``op`` output_padding:

    conv2d            o = floor((i + p0 + p1 - d*(k-1) - 1) / s) + 1
    conv_transpose2d  o = (i-1)*s - 2p + d*(k-1) + op + 1
    pooling           like conv2d; ceil instead of floor with ceil_mode, dropping a
                      last window that would start in the right padding (PyTorch's rule)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
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
    dtypes = [v.dtype for _, v in items]  # np.dtype objects compare equal across spellings
    if dtypes and dtypes.count(dtypes[0]) != len(dtypes):
        desc = ", ".join(f"{k}: {v.dtype}" for k, v in items)
        raise TypeError(f"dtypes differ ({desc}); cast them to one of float32/float64")


# ----------------------------------------------------------------------------- conv geometry

@dataclass(frozen=True)
class ConvGeom:
    """One conv2d layer's geometry: built once where the arguments are checked
    (``conv2d_geom``, ``conv_transpose2d_geom``) and read by name by every launcher.

        x (n, c, h, w)     w (co, c/g, kh, kw)     y (n, co, oh, ow)

    Stride (sh, sw); padding (ph, pw) leading, top and left, and (ph_end, pw_end) trailing,
    bottom and right, which only sets (oh, ow); dilation (dh, dw); g groups. A
    conv_transpose2d layer is the conv2d whose adjoint it is (docs/convolution.md): its input
    is that conv2d's y, its output that conv2d's x, and its output_padding a trailing
    padding of ``p - output_padding`` (a crop where negative), so the sizes above hold for
    both.
    """
    n: int
    c: int
    h: int
    w: int
    co: int
    kh: int
    kw: int
    oh: int
    ow: int
    sh: int
    sw: int
    ph: int
    pw: int
    ph_end: int
    pw_end: int
    dh: int
    dw: int
    g: int

    @property
    def cig(self) -> int:
        """Input channels per group: the weight's dim 1."""
        return self.c // self.g

    @property
    def cog(self) -> int:
        """Output channels per group."""
        return self.co // self.g

    @property
    def stride(self) -> tuple[int, int]:
        return self.sh, self.sw

    @property
    def dilation(self) -> tuple[int, int]:
        return self.dh, self.dw

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return self.n, self.c, self.h, self.w

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return self.co, self.cig, self.kh, self.kw

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return self.n, self.co, self.oh, self.ow

    @property
    def full_padding(self) -> tuple[int, int]:
        """Leading padding of the flipped stride-1 correlation that computes the input-gradient:
        gx[ih] = sum_a gy[ih + p - a*d] w[a] reads gy padded by d*(k-1) - p (docs/convolution.md).
        (Strided passes that split gx into its phases derive each phase's own: the CPU's flat
        kernels in kernels/conv_stride1._axis_plan, the CUDA kernels through
        kernels/index.phase_taps.)"""
        return self.dh * (self.kh - 1) - self.ph, self.dw * (self.kw - 1) - self.pw


def _conv_sizes(what, x_shape, w_shape, c, co):
    """The checks conv2d and conv_transpose2d share, on the conv2d they compute: kernel,
    channels, and a non-empty plane unless the batch is (PyTorch's rules)."""
    n, h, w, kh, kw = x_shape[0], x_shape[2], x_shape[3], w_shape[2], w_shape[3]
    shapes = f"input of shape {tuple(x_shape)}, weight of shape {tuple(w_shape)}"
    if min(kh, kw) <= 0:
        raise ValueError(f"{what}: the kernel size must be positive, got ({kh}, {kw}) ({shapes})")
    if min(c, co) <= 0:
        raise ValueError(f"{what}: in_channels={c} and out_channels={co} must be positive ({shapes})")
    if n and min(h, w) <= 0:
        raise ValueError(f"{what}: only an empty batch may have empty planes, got {shapes}")


_NOT_PLAIN = object()
_PLAIN_TYPES = frozenset((int, bool, str, type(None)))
_INT = frozenset((int,))


def _plain_key(value):
    """``value`` as part of a cache key, with its type, if it is a plain int, bool, str, None
    or tuple of ints; else _NOT_PLAIN. Exact types only, and typed: ``True == 1`` and
    ``np.int64(1) == 1`` hash alike, and each spelling must reach the checks on its own (a
    bool stride is a TypeError, a bool ceil_mode is fine)."""
    if type(value) in _PLAIN_TYPES:
        return type(value), value
    if type(value) is tuple and _INT.issuperset(map(type, value)):  # a C loop: no generator frames
        return value
    return _NOT_PLAIN


def _memoised(geom_fn):
    """``geom_fn`` with its result remembered per argument tuple: a layer called again with
    the same shapes and arguments skips the checks it passed before (a few microseconds per
    call). Keyword calls, arguments that are not plain (``_plain_key``), and calls that raise,
    are never remembered, so every error is raised every time."""
    cache: dict = {}

    @functools.wraps(geom_fn)
    def memoised(*args, **kwargs):
        key = tuple(map(_plain_key, args))
        if kwargs or _NOT_PLAIN in key:
            return geom_fn(*args, **kwargs)
        geom = cache.get(key)
        if geom is None:
            geom = geom_fn(*args)
            if len(cache) >= 4096:  # a bound for programs that sweep shapes
                cache.clear()
            cache[key] = geom
        return geom

    return memoised


@_memoised
def conv2d_geom(x_shape, w_shape, stride, padding, dilation, groups) -> ConvGeom:
    """conv2d's geometry for input ``x_shape`` (N, C, H, W) and weight ``w_shape``
    (C_out, C_in/groups, kH, kW); ValueError/TypeError naming the argument and the shapes."""
    (n, c, h, w), (co, cig, kh, kw), g = x_shape, w_shape, groups
    if c % g or co % g:
        raise ValueError(f"groups={g} must divide in_channels={c} and out_channels={co} "
                         f"(input {tuple(x_shape)}, weight {tuple(w_shape)})")
    if cig * g != c:
        raise ValueError(f"weight of shape {tuple(w_shape)} with groups={g} expects {cig * g} input channels, "
                         f"input has shape {tuple(x_shape)}")
    _conv_sizes("conv2d", x_shape, w_shape, c, co)
    sh, sw = positive_pair(stride, "stride")
    dh, dw = positive_pair(dilation, "dilation")
    pt, pb, pl, pr = conv_padding(padding, (kh, kw), (sh, sw), (dh, dw))
    oh, ow = conv_output_size(h, kh, sh, pt, pb, dh), conv_output_size(w, kw, sw, pl, pr, dw)
    check_output_size((oh, ow), x_shape,
                      f"conv2d with weight {tuple(w_shape)}, padding={padding}, dilation={(dh, dw)}")
    return ConvGeom(n, c, h, w, co, kh, kw, oh, ow, sh, sw, pt, pl, pb, pr, dh, dw, g)


@_memoised
def conv_transpose2d_geom(x_shape, w_shape, stride, padding, output_padding, groups, dilation) -> ConvGeom:
    """The geometry of the conv2d whose adjoint conv_transpose2d is, for input ``x_shape``
    (N, C_in, H, W) and weight ``w_shape`` (C_in, C_out/groups, kH, kW): that conv2d maps
    (N, C_out, OH, OW) to (N, C_in, H, W) with the same weight."""
    (n, c, h, w), (ci, cog, kh, kw), g = x_shape, w_shape, groups
    if c % g:
        raise ValueError(f"groups={g} must divide in_channels={c} (input {tuple(x_shape)})")
    if ci != c:
        raise ValueError(f"weight of shape {tuple(w_shape)} expects {ci} input channels (dim 0), "
                         f"input has shape {tuple(x_shape)}")
    _conv_sizes("conv_transpose2d", x_shape, w_shape, c, cog * g)
    sh, sw = positive_pair(stride, "stride")
    dh, dw = positive_pair(dilation, "dilation")
    ph, pw = nonnegative_pair(padding, "padding")
    oph, opw = nonnegative_pair(output_padding, "output_padding")
    for op, s, d in zip((oph, opw), (sh, sw), (dh, dw)):
        if op >= s and op >= d:
            raise ValueError(f"output_padding={output_padding} must be smaller than either stride={(sh, sw)} "
                             f"or dilation={(dh, dw)}")
    out_h = conv_transpose_output_size(h, kh, sh, ph, dh, oph)
    out_w = conv_transpose_output_size(w, kw, sw, pw, dw, opw)
    check_output_size((out_h, out_w), x_shape, f"conv_transpose2d with weight {tuple(w_shape)}, padding={padding}")
    return ConvGeom(n, cog * g, out_h, out_w, c, kh, kw, h, w, sh, sw, ph, pw, ph - oph, pw - opw, dh, dw, g)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "pair", "positive_pair", "nonnegative_pair", "conv_padding", "conv_output_size",
    "conv_transpose_output_size", "pool_output_size", "check_output_size", "check_float",
    "check_ndim", "check_same_dtype", "ceil_div", "ConvGeom", "conv2d_geom", "conv_transpose2d_geom",
]
