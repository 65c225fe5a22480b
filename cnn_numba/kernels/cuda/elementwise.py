"""Array plumbing and elementwise ops on the device, the CUDA side of
kernels/elementwise.py plus cat/split/permute.

Every kernel is one thread per output element and a gather: an output reads the
inputs it depends on, so no two threads write one place and the result does not
depend on scheduling. Index arithmetic for broadcasting and permuting goes through
``_offset``: an output's flat index, decomposed over the output shape, dotted with
one operand's element strides (0 along broadcast dimensions).

The reductions (``sum`` of a whole array, ``sum_to`` for broadcasting's gradient)
accumulate in float64 in a fixed order, so a loss or a bias gradient is the same on
every run.

The conv epilogue lives here too, next to relu: ``epilogue`` applies eval-mode batch norm
and relu to one value as a kernel stores it, ``channel`` reads its per-channel values from
ep (3, C) (rows mean, scale, shift; (3, 0) for none), as the CPU's kernels/conv.py does; the
batch-norm forward and the convolutions' stores share it (see ``epilogue``).
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float64

from ...backend import register
from .. import elementwise as _cpu
from .launch import (BLOCK, device_function, empty, flat, is_device_array, jit, launch, launch_grid,
                     refuse_in_capture, scalar)
from .reduce import block_reduce

CUDA = "cuda"


# ----------------------------------------------------------------------------- host <-> device

@register("to_host", CUDA)
def to_host(a):
    refuse_in_capture(f"a read of a device array of shape {tuple(a.shape)}")
    return a.copy_to_host()


@register("from_host", CUDA)
def from_host(a):
    if is_device_array(a):
        return a
    refuse_in_capture(f"an upload of a host array of shape {np.shape(a)}")
    return cuda.to_device(np.asarray(a, order="C"))


@jit
def _fill(out, value):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = value


@register("full", CUDA)
def full(shape, value, dtype):
    out = empty(shape, dtype)
    launch(_fill, out.size, flat(out), scalar(value, dtype))
    return out


@jit
def _copy(src, dst):
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] = src[i]


def pointwise(kernel, first, *rest):
    """A fresh array like ``first`` written by ``kernel(first, *rest, out)``, one thread per
    element: arrays go flat, Python numbers as scalars of first's dtype."""
    out = empty(first.shape, first.dtype)
    args = (flat(a) if is_device_array(a) else scalar(a, first.dtype) for a in rest)
    launch(kernel, out.size, flat(first), *args, flat(out))
    return out


@register("copy", CUDA)
def copy(a):
    return pointwise(_copy, a)


@register("copy_into", CUDA)
def copy_into(src, dst):
    """dst[...] = src (same shape and dtype): by a kernel from device memory, so a captured step
    can write in place; an upload from a host array."""
    if not is_device_array(src):
        refuse_in_capture(f"an upload of a host array of shape {np.shape(src)}")
        dst.copy_to_device(np.ascontiguousarray(src))
        return
    launch(_copy, dst.size, flat(src), flat(dst))


@register("reshape", CUDA)
def reshape(a, shape):
    return a.reshape(tuple(shape)) if tuple(shape) != tuple(a.shape) else a


# ----------------------------------------------------------------------------- broadcasting

@cuda.jit(device=True)
def _offset(i, shape, strides):
    """Element offset, in an operand with element ``strides``, of the output's flat index ``i``."""
    off = 0
    for d in range(len(shape) - 1, -1, -1):
        off += (i % shape[d]) * strides[d]
        i //= shape[d]
    return off


def _broadcast_strides(shape, out_shape):
    """Element strides of a C-contiguous array of ``shape`` read as ``out_shape`` (numpy's rules)."""
    shape, strides, step = tuple(shape), [0] * len(out_shape), 1
    for d in range(1, len(shape) + 1):
        size = shape[-d]
        strides[-d] = step if size != 1 else 0
        step *= size
    return tuple(strides)


@jit
def _add_same(a, b, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] + b[i]


@jit
def _mul_same(a, b, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] * b[i]


@jit
def _add_scalar(a, s, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] + s


@jit
def _mul_scalar(a, s, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] * s


@jit
def _add_broadcast(a, sa, b, sb, out, shape):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[_offset(i, shape, sa)] + b[_offset(i, shape, sb)]


@jit
def _mul_broadcast(a, sa, b, sb, out, shape):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[_offset(i, shape, sa)] * b[_offset(i, shape, sb)]


_BINARY = {"add": (_add_same, _add_scalar, _add_broadcast), "mul": (_mul_same, _mul_scalar, _mul_broadcast)}


def _binary(op, a, b):
    """``a op b`` with numpy broadcasting; either side may be a host scalar."""
    same, with_scalar, broadcast = _BINARY[op]
    if not is_device_array(a):  # both ops commute
        a, b = b, a
    if not is_device_array(b):
        if np.ndim(b):
            raise TypeError(f"{op}: host array of shape {np.shape(b)} with a device array; move it to the device first")
        return pointwise(with_scalar, a, b)
    dtype = np.result_type(a.dtype, b.dtype)
    if a.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"{op}: device arrays of dtypes {a.dtype} and {b.dtype}; cast one first")
    if tuple(a.shape) == tuple(b.shape):
        return pointwise(same, a, b)
    shape = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    out = empty(shape, dtype)
    launch(broadcast, out.size, flat(a), _broadcast_strides(a.shape, shape), flat(b),
           _broadcast_strides(b.shape, shape), flat(out), tuple(shape) or (1,))
    return out


@register("add", CUDA)
def add(a, b):
    return _binary("add", a, b)


@register("mul", CUDA)
def mul(a, b):
    return _binary("mul", a, b)


# ----------------------------------------------------------------------------- reductions

@jit
def _sum_to(a, out, out_shape, out_strides, red_shape, red_strides, count):
    """out[o] = sum of a over the reduced dimensions, o's own coordinates fixed.
    ``out_shape``/``out_strides`` walk the kept dimensions of a (size 1 where reduced),
    ``red_shape``/``red_strides`` the reduced ones (size 1 where kept)."""
    o = cuda.grid(1)
    if o < out.size:
        base = _offset(o, out_shape, out_strides)
        acc = float64(0.0)
        for r in range(count):
            acc += a[base + _offset(r, red_shape, red_strides)]
        out[o] = acc


@register("sum_to", CUDA)
def sum_to(a, shape):
    """Sum ``a`` down to ``shape``: the gradient of broadcasting (see the CPU twin)."""
    shape = tuple(shape)
    if shape == tuple(a.shape):
        return a
    full_shape = (1,) * (a.ndim - len(shape)) + shape
    strides = _broadcast_strides(a.shape, a.shape)
    kept = tuple(s if s == t else 1 for s, t in zip(a.shape, full_shape))
    reduced = tuple(s if s != t else 1 for s, t in zip(a.shape, full_shape))
    out = empty(shape, a.dtype)
    count = int(np.prod(reduced))
    launch(_sum_to, out.size, flat(a), flat(out), kept, strides, reduced, strides, count)
    return out


REDUCE_BLOCK = BLOCK  # threads of the single block that sums a whole array


@jit
def _sum_all(a, out):
    """One block: each thread sums a strided slice, then the block's tree."""
    part = cuda.shared.array(REDUCE_BLOCK, float64)
    acc = float64(0.0)
    for i in range(cuda.threadIdx.x, a.size, REDUCE_BLOCK):
        acc += a[i]
    acc = block_reduce(part, acc, False)
    if cuda.threadIdx.x == 0:
        out[0] = acc


@register("sum", CUDA)
def total(a):
    out = empty((), a.dtype)
    launch_grid(_sum_all, 1, REDUCE_BLOCK, flat(a), flat(out))
    return out


@jit
def _outside(a, lo, hi, flags):
    i = cuda.grid(1)
    if i < a.size:
        flags[i] = 1.0 if a[i] < lo or a[i] >= hi else 0.0


@register("count_outside", CUDA)
def count_outside(a, lo, hi):
    """How many elements lie outside ``[lo, hi)``: one scalar comes back, not the array."""
    flags = empty((a.size,), np.float64)
    refuse_in_capture("a range check that reads its count back")
    launch(_outside, a.size, flat(a), lo, hi, flags)
    return int(total(flags).copy_to_host())


@jit
def _hits(z, t, flags):
    """flags[i] = 1 where row i's first maximum (NaN counts as the maximum, as numpy's argmax) is t[i]."""
    i = cuda.grid(1)
    if i < t.size:
        best, arg = z[i, 0], 0
        for k in range(1, z.shape[1]):
            v = z[i, k]
            if best == best and (v > best or v != v):
                best, arg = v, k
        flags[i] = 1.0 if arg == t[i] else 0.0


@register("count_correct", CUDA)
def count_correct(z, t, on_device: bool = False):
    """Correct predictions of logits z (N, K) for labels t (N,), counted on the device: an int,
    or with ``on_device`` the 0-d float64 device array that holds it (nothing read back)."""
    if not on_device:
        refuse_in_capture("a correct count read back")
    flags = empty((t.size,), np.float64)
    launch(_hits, t.size, z, t, flags)
    count = total(flags)
    return count if on_device else int(count.copy_to_host())


# ----------------------------------------------------------------------------- relu, the conv epilogue

relu_value = device_function(_cpu.relu_value)  # the CPU's rule: 0 below 0, NaN kept (PyTorch's)


@cuda.jit(device=True, inline=True)
def channel(ep, o):
    """``epilogue``'s per-channel values for channel o from ep (3, C) = rows (mean, scale,
    shift), or (3, 0) for none: (affine, mean, scale, shift), as kernels/conv.py's ``channel``."""
    z = ep.dtype.type(0)
    if ep.shape[1] == 0:
        return False, z, z, z
    return True, ep[0, o], ep[1, o], ep[2, o]


@cuda.jit(device=True, inline=True)
def epilogue(v, chan, relu):
    """``(v - mean) * scale + shift`` where ``chan`` = (affine, mean, scale, shift) is affine,
    then relu_value where ``relu``: kernels/conv.py's ``epilogue``, operation for operation.

    The one copy of eval-mode batch norm's arithmetic on the device: the batch-norm forward
    (kernels/cuda/nn.py) and the convolutions' stores (gemm.py's product, conv.py's direct
    kernel) all call it, so a conv with this epilogue and the unfused conv -> batch_norm ->
    relu compile the same expression. (NVVM contracts the multiply-add into one FMA, unlike
    the CPU's kernels: CUDA's results then differ from the CPU's in the last bit, but the
    fused and unfused CUDA paths contract alike.)"""
    affine, mu, scale, shift = chan
    if affine:
        v = (v - mu) * scale + shift
    return relu_value(v) if relu else v


_no_epilogue: dict = {}


def no_epilogue(dtype):
    """``(ep, relu)`` of a plain conv: ep (3, 0) (one device array per dtype, kept), no relu."""
    dtype = np.dtype(dtype)
    if dtype not in _no_epilogue:
        _no_epilogue[dtype] = empty((3, 0), dtype)
    return _no_epilogue[dtype], False


@jit
def _relu_forward(x, y):
    i = cuda.grid(1)
    if i < y.size:
        y[i] = relu_value(x[i])


@jit
def _relu_backward(y, gy, gx):
    i = cuda.grid(1)
    if i < gx.size:
        gx[i] = 0 if y[i] <= 0 else gy[i]


@register("relu_forward", CUDA)
def relu_forward(x):
    return pointwise(_relu_forward, x)


@register("relu_backward", CUDA)
def relu_backward(y, gy):
    return pointwise(_relu_backward, y, gy)


# ----------------------------------------------------------------------------- cat, split, permute

@cuda.jit(device=True)
def _slab_offset(i, part, whole, start, inner):
    """Offset in the concatenated array of element ``i`` of one part: both viewed as
    (outer, size along dim, inner), the part occupying ``[start, start + part)`` of ``whole``."""
    row = part * inner
    return (i // row) * whole * inner + start * inner + i % row


@jit
def _to_slab(src, dst, part, whole, start, inner):
    i = cuda.grid(1)
    if i < src.size:
        dst[_slab_offset(i, part, whole, start, inner)] = src[i]


@jit
def _from_slab(src, dst, part, whole, start, inner):
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] = src[_slab_offset(i, part, whole, start, inner)]


def _slabs(shape, dim, sizes):
    inner = int(np.prod(shape[dim + 1:]))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    return inner, starts


@register("cat", CUDA)
def cat(arrays, dim):
    """Each part copied into its slab of the result; parts cover disjoint slabs."""
    sizes = [a.shape[dim] for a in arrays]
    first = arrays[0]
    out = empty(first.shape[:dim] + (sum(sizes),) + first.shape[dim + 1:], first.dtype)
    inner, starts = _slabs(out.shape, dim, sizes)
    for a, size, start in zip(arrays, sizes, starts):
        launch(_to_slab, a.size, flat(a), flat(out), size, out.shape[dim], int(start), inner)
    return out


@register("split", CUDA)
def split(a, sizes, dim):
    inner, starts = _slabs(a.shape, dim, sizes)
    parts = []
    for size, start in zip(sizes, starts):
        part = empty(a.shape[:dim] + (size,) + a.shape[dim + 1:], a.dtype)
        launch(_from_slab, part.size, flat(a), flat(part), size, a.shape[dim], int(start), inner)
        parts.append(part)
    return parts


@jit
def _permute(src, strides, dst, shape):
    i = cuda.grid(1)
    if i < dst.size:
        dst[i] = src[_offset(i, shape, strides)]


@register("permute", CUDA)
def permute(a, dims):
    """dst[i_0..i_k] = src at coordinate i_j along dimension dims[j]: src's strides, permuted."""
    out_shape = tuple(a.shape[d] for d in dims)
    src_strides = _broadcast_strides(a.shape, a.shape)
    out = empty(out_shape, a.dtype)
    launch(_permute, out.size, flat(a), tuple(src_strides[d] for d in dims), flat(out), out_shape or (1,))
    return out
