"""Tensor and a define-by-run autograd.

Each differentiable op is a ``Function`` (functional.py): ``forward`` computes on raw
device arrays and saves what ``backward`` needs; ``apply`` wraps the result in a
Tensor that remembers its Function. ``Tensor.backward`` walks the graph once in
reverse topological order, summing the gradients of tensors used more than once.
Gradient contract: a leaf's ``.grad`` accumulates (+=) across backward calls, as in
PyTorch; non-leaf gradients are not kept.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .backend import check_device, kernel

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Ops inside record no graph (inference, parameter updates)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled() -> bool:
    return _grad_enabled


class Function:
    """One differentiable op: subclasses define ``forward(*arrays, **params)`` and
    ``backward(gy) -> one gradient (or None) per input``; ``self.needs_grad[i]`` says
    whether input i wants one. ``forward`` may return a tuple whose first item is the
    differentiable output and the rest auxiliary results (e.g. argmax indices)."""

    def __init__(self, device: str, parents: tuple["Tensor", ...]):
        self.device = device
        self.out_device = device  # where the outputs live (only a device copy changes it)
        self.parents = parents
        self.needs_grad = tuple(p.requires_grad for p in parents)

    @classmethod
    def apply(cls, *inputs: "Tensor", **params):
        device = inputs[0].device
        for t in inputs:
            if t.device != device:
                raise ValueError(f"{cls.__name__}: inputs on different devices ({t.device} and {device})")
        ctx = cls(device, inputs)
        out = ctx.forward(*(t.data for t in inputs), **params)
        record = _grad_enabled and any(ctx.needs_grad)
        device = ctx.out_device
        if isinstance(out, tuple):
            first = Tensor._wrap(out[0], device, record, ctx if record else None)
            return (first,) + tuple(Tensor._wrap(o, device, False, None) for o in out[1:])
        return Tensor._wrap(out, device, record, ctx if record else None)


class Tensor:
    """An n-d array on a device, with an optional gradient. Layout NCHW for images."""

    __slots__ = ("data", "device", "requires_grad", "grad", "_ctx", "__weakref__")
    __array_priority__ = 1000  # so numpy defers ``ndarray * Tensor`` to us

    def __init__(self, data, requires_grad: bool = False, device: str = "cpu", dtype=None):
        device = check_device(device)
        arr = _host_array(data, dtype)
        if requires_grad and arr.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {arr.dtype}")
        self.data = kernel("from_host", device)(arr)
        self.device = device
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._ctx = None

    @classmethod
    def _wrap(cls, data, device, requires_grad, ctx):
        t = cls.__new__(cls)
        t.data, t.device, t.requires_grad, t.grad, t._ctx = data, device, requires_grad, None, ctx
        return t

    # ---- array facts
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: np.dtype(self.data.dtype))
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(np.prod(self.data.shape)))
    is_leaf = property(lambda self: self._ctx is None)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        extra = ", requires_grad=True" if self.requires_grad else ""
        return f"tensor({np.array2string(self.numpy(), precision=4, threshold=20)}, dtype={self.dtype}, device={self.device!r}{extra})"

    def numpy(self) -> np.ndarray:
        if self.requires_grad:
            return kernel("to_host", self.device)(self.data).copy()
        return kernel("to_host", self.device)(self.data)

    def item(self) -> float:
        if self.size != 1:
            raise ValueError(f"item() needs a one-element tensor, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    # ---- devices
    def to(self, device) -> "Tensor":
        """This tensor on ``device`` ("cpu", "cuda"); itself if already there. Differentiable:
        the gradient travels back to this tensor's device."""
        device = check_device(device)
        return self if device == self.device else _F.to_device(self, device)

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self) -> "Tensor":
        return self.to("cuda")

    @property
    def __cuda_array_interface__(self) -> dict:
        """The CUDA Array Interface of a device tensor's memory (CuPy, PyTorch, Numba read it
        without a copy); absent on the CPU."""
        if self.device != "cuda":
            raise AttributeError("__cuda_array_interface__: tensor is on the CPU (use .to('cuda'))")
        return self.data.__cuda_array_interface__

    def detach(self) -> "Tensor":
        return Tensor._wrap(self.data, self.device, False, None)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = flag
        return self

    # ---- autograd
    def backward(self, grad=None) -> None:
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without grad needs a one-element tensor, got shape {self.shape}")
            grad = kernel("full", self.device)(self.shape, 1.0, self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else kernel("from_host", self.device)(np.asarray(grad, self.dtype))
            if tuple(grad.shape) != self.shape:
                raise ValueError(f"backward(): grad of shape {tuple(grad.shape)} for a tensor of shape {self.shape}")
        grads = {id(self): grad}
        for t in reversed(self._topological_order()):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            if t._ctx is None:
                acc = kernel("copy", t.device)(g) if t.grad is None else kernel("add", t.device)(t.grad.data, g)
                t.grad = Tensor._wrap(acc, t.device, False, None)
                continue
            for parent, gp, need in zip(t._ctx.parents, t._ctx.backward(g), t._ctx.needs_grad):
                if need and gp is not None:  # (kernels by the parent's device: a device copy changes it)
                    old = grads.get(id(parent))
                    grads[id(parent)] = gp if old is None else kernel("add", parent.device)(old, gp)

    def _topological_order(self) -> list["Tensor"]:
        order, seen, stack = [], set(), [(self, False)]
        while stack:  # iterative DFS: deep networks would overflow Python's recursion
            t, done = stack.pop()
            if done:
                order.append(t)
                continue
            if id(t) in seen:
                continue
            seen.add(id(t))
            stack.append((t, True))
            if t._ctx is not None:
                stack.extend((p, False) for p in t._ctx.parents if p.requires_grad)
        return order

    # ---- arithmetic (differentiable; functional.py defines the Functions)
    def __add__(self, other): return _F.add(self, other)
    def __radd__(self, other): return _F.add(other, self)
    def __sub__(self, other): return _F.sub(self, other)
    def __rsub__(self, other): return _F.sub(other, self)
    def __mul__(self, other): return _F.mul(self, other)
    def __rmul__(self, other): return _F.mul(other, self)
    def __neg__(self): return _F.mul(self, -1.0)
    def sum(self): return _F.sum(self)
    def mean(self): return _F.mean(self)
    def relu(self): return _F.relu(self)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _F.reshape(self, shape)


def from_cuda_array(obj, requires_grad: bool = False) -> Tensor:
    """A CUDA tensor sharing the memory of ``obj``, any object exposing
    ``__cuda_array_interface__`` (CuPy array, PyTorch CUDA tensor, Numba device array):
    no copy, so writes through either are seen by both. The memory must be C-contiguous
    float32/float64 (or integer, without gradients)."""
    check_device("cuda")
    from .kernels.cuda.launch import as_device_array
    arr = as_device_array(obj)
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "fiu":
        raise TypeError(f"from_cuda_array: dtype {dtype} is not supported (float32, float64 or integer)")
    if requires_grad and dtype.kind != "f":
        raise TypeError(f"only floating-point tensors can require gradients, got dtype {dtype}")
    if not arr.is_c_contiguous():
        raise ValueError(f"from_cuda_array: array of shape {tuple(arr.shape)} is not C-contiguous; "
                         "make a contiguous copy first (e.g. .contiguous() / cupy.ascontiguousarray)")
    return Tensor._wrap(arr, "cuda", bool(requires_grad), None)


def _host_array(data, dtype=None, name: str = "data") -> np.ndarray:
    """A C-contiguous, writable numpy array; float numpy arrays keep float32/float64, Python
    floats and float16 become float32 (PyTorch's default dtype)."""
    if isinstance(data, Tensor):
        data = data.numpy()
    try:
        arr = np.asarray(data, dtype=dtype)
    except ValueError as e:  # a ragged list: numpy's message names no argument
        raise ValueError(f"{name} must be a rectangular nested sequence of numbers ({e})") from None
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"tensor data must be numeric, got dtype {arr.dtype}")
    if dtype is None and arr.dtype.kind == "f" and (arr.dtype == np.float16 or not isinstance(data, np.ndarray)):
        arr = arr.astype(np.float32)
    arr = np.asarray(arr, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
    # Numba types a read-only array apart from a writable one, so each kernel would compile
    # a second time (13 s for the stride-1 forward) for an input no kernel writes anyway.
    return arr if arr.flags.writeable else arr.copy()


def tensor(data, requires_grad: bool = False, device: str = "cpu", dtype=None) -> Tensor:
    """A new Tensor holding a copy of ``data`` (see ``_host_array`` for dtypes)."""
    arr = _host_array(data, dtype)
    if arr is data or (isinstance(data, np.ndarray) and np.shares_memory(arr, data)):
        arr = arr.copy()
    return Tensor(arr, requires_grad=requires_grad, device=device)


from . import functional as _F  # noqa: E402  (functional imports Tensor)
