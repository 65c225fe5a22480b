"""Tensor and a define-by-run autograd.

Each differentiable op is a ``Function`` (functional.py): ``forward`` computes on raw
device arrays and saves what ``backward`` needs; ``apply`` wraps the result in a
Tensor that remembers its Function. ``Tensor.backward`` walks the graph once in
reverse topological order, summing the gradients of tensors used more than once.
Gradient contract: a leaf's ``.grad`` accumulates (+=) across backward calls, as in
PyTorch; non-leaf gradients are not kept.

Autograd state is PyTorch's: grad mode is per thread (``no_grad``, ``enable_grad``,
``set_grad_enabled``); every tensor has a version counter (``_version``) that in-place
updates bump (optimiser steps, ``zero_``, ``fill_``, ``copy_``), shared with its views
(``detach``, ``reshape``); a Function records the versions of the tensors it saved
(inputs or its output) and its backward raises if one has changed since. Backward frees
each Function's saved arrays and parent links as it passes (``retain_graph=True`` keeps
them), so a step's activations die with the step.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

from .backend import check_device, kernel


# ----------------------------------------------------------------------------- grad mode

class _GradModeState(threading.local):
    enabled = True  # each thread starts with grad mode on, as in PyTorch


_grad_mode = _GradModeState()


class _TraceState(threading.local):
    recorder = None  # onnx.export's tracer: called as recorder(ctx, inputs, params, result) after every op


_trace = _TraceState()


def is_grad_enabled() -> bool:
    """Whether ops record a graph in this thread."""
    return _grad_mode.enabled


class _GradMode:
    """Grad mode ``mode`` inside a ``with`` block, or around every call of a decorated function;
    the thread's previous mode comes back on exit, exception or not."""

    def __init__(self, mode: bool):
        self.mode = bool(mode)

    def __enter__(self):
        self.prev, _grad_mode.enabled = _grad_mode.enabled, self.mode

    def __exit__(self, *exc):
        _grad_mode.enabled = self.prev

    def __call__(self, fn):
        mode = self.mode

        @functools.wraps(fn)
        def run(*args, **kwargs):
            with _GradMode(mode):  # a fresh context per call: calls may nest or run in threads
                return fn(*args, **kwargs)
        return run


class no_grad(_GradMode):
    """Ops inside record no graph (inference, parameter updates). ``with no_grad():`` or ``@no_grad()``."""

    def __init__(self):
        super().__init__(False)


class enable_grad(_GradMode):
    """Ops inside record a graph, even within ``no_grad``."""

    def __init__(self):
        super().__init__(True)


class set_grad_enabled(_GradMode):
    """Sets this thread's grad mode at once; as a context manager the previous mode comes back
    on exit, as a decorator the function runs in ``mode`` (decorating changes nothing)."""

    def __init__(self, mode: bool):
        super().__init__(mode)
        self.prev, _grad_mode.enabled = _grad_mode.enabled, self.mode

    def __enter__(self):
        pass  # (the mode was set by the constructor)

    def __call__(self, fn):
        _grad_mode.enabled = self.prev
        return super().__call__(fn)


# ----------------------------------------------------------------------------- Function

_FREED = ("Trying to backward through the graph a second time (or directly access saved tensors after they have "
          "already been freed). Saved intermediate values of the graph are freed when you call .backward(). "
          "Specify retain_graph=True if you need to backward through the graph a second time.")


class Function:
    """One differentiable op: subclasses define ``forward(*arrays, **params)`` and
    ``backward(gy) -> one gradient (or None) per input``; ``self.needs_grad[i]`` says
    whether input i wants one. ``forward`` may return a tuple whose first item is the
    differentiable output and the rest auxiliary results (e.g. argmax indices).
    What ``forward`` keeps as attributes is "saved": if an input's array or the output array
    is one of them, an in-place change of that tensor after the forward makes backward raise.
    A Function whose output shares its input's memory sets ``view = True``."""

    view = False

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
        record = _grad_mode.enabled and any(ctx.needs_grad)
        device, first = ctx.out_device, out[0] if isinstance(out, tuple) else out
        y = Tensor._wrap(first, device, record, ctx if record else None, inputs[0]._vc if cls.view else None)
        if record:  # versions now; backward finds out which tensors were saved only if one changed
            ctx._versions, ctx._out = [t._vc[0] for t in inputs], (y._vc, y._vc[0], id(first))
        if isinstance(out, tuple):
            y = (y,) + tuple(Tensor._wrap(o, device, False, None) for o in out[1:])
        if _trace.recorder is not None:
            _trace.recorder(ctx, inputs, params, y)
        return y

    def _check_versions(self) -> None:
        """Raise PyTorch's error if an input or the output changed in place since the forward and
        this Function saved its array (an attribute that is that array)."""
        changed = [(f"input {i} (shape {p.shape})", p._vc[0], v, id(p.data))
                   for i, (p, v) in enumerate(zip(self.parents, self._versions)) if p._vc[0] != v]
        vc, then, array = self._out
        if vc[0] != then:
            changed.append(("its output", vc[0], then, array))
        saved = {id(v) for v in vars(self).values()}
        for what, now, then, array in changed:
            if array in saved:
                raise RuntimeError(f"one of the variables needed for gradient computation has been modified by an "
                                   f"inplace operation: [{type(self).__name__}] {what} is at version {now}; "
                                   f"expected version {then} instead. Hint: an optimizer step, zero_, fill_ or "
                                   "copy_ ran on it between the forward and backward()")

    def _backward(self, gy, retain_graph: bool) -> list:
        """(parent, gradient) for each parent that wants one: the saved tensors' versions checked
        first, each gradient checked against its parent; then the saved state freed unless
        ``retain_graph``."""
        parents = self.parents
        if self._out[0][0] != self._out[1] or [p._vc[0] for p in parents] != self._versions:
            self._check_versions()
        out = [(p, g) for p, g, need in zip(parents, self.backward(gy), self.needs_grad) if need and g is not None]
        for p, g in out:
            if g.shape != p.data.shape or g.dtype != p.data.dtype:
                raise RuntimeError(f"Function {type(self).__name__} returned an invalid gradient at index "
                                   f"{parents.index(p)}: got shape {tuple(g.shape)} and dtype {g.dtype}, "
                                   f"expected shape {p.shape} and dtype {p.dtype}")
        if not retain_graph:
            self.__dict__.clear()
            self.parents = None  # the mark of a freed graph (see Tensor._topological_order)
        return out


class Tensor:
    """An n-d array on a device, with an optional gradient. Layout NCHW for images."""

    # _checked (set only by functional.checked_labels): (bound, version) of integer labels known
    # to lie in [0, bound) at that version, so a loss need not check them on the device again.
    __slots__ = ("data", "device", "requires_grad", "grad", "_ctx", "_vc", "_checked", "__weakref__")
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
        self._vc = [0]

    @classmethod
    def _wrap(cls, data, device, requires_grad, ctx, vc=None):
        """A tensor around ``data``; ``vc`` is the version counter of the tensor it is a view of."""
        t = cls.__new__(cls)
        t.data, t.device, t.requires_grad, t.grad, t._ctx = data, device, requires_grad, None, ctx
        t._vc = [0] if vc is None else vc
        return t

    # ---- array facts
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)  # a numpy dtype (host and CUDA device arrays alike)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: int(np.prod(self.data.shape)))
    is_leaf = property(lambda self: self._ctx is None)
    _version = property(lambda self: self._vc[0], doc="in-place updates so far (shared with views)")

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
        """The same memory (and version counter), outside the graph."""
        return Tensor._wrap(self.data, self.device, False, None, self._vc)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = flag
        return self

    # ---- in-place updates (each bumps the version counter)
    def fill_(self, value) -> "Tensor":
        return self._write(kernel("full", self.device)(self.shape, value, self.dtype))

    def zero_(self) -> "Tensor":
        return self.fill_(0)

    def copy_(self, src) -> "Tensor":
        """Copy ``src`` (a Tensor or array, broadcast to this shape, cast to this dtype) into this tensor."""
        src = src if isinstance(src, Tensor) else Tensor(np.asarray(src), device=self.device)
        if src.shape == self.shape and src.dtype == self.dtype and src.device == self.device:
            return self._write(src.data)
        try:
            host = np.broadcast_to(src.numpy(), self.shape)
        except ValueError:
            raise ValueError(f"copy_: source of shape {src.shape} cannot be broadcast to {self.shape}") from None
        return self._write(kernel("from_host", self.device)(np.array(host, self.dtype, order="C")))

    def _write(self, arr) -> "Tensor":
        """Copy ``arr`` (this tensor's device, shape and dtype) into this tensor's memory."""
        if self.requires_grad and _grad_mode.enabled:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation."
                               if self.is_leaf else "in-place operations on a tensor that is part of a graph "
                               "are not differentiable here; use it under no_grad() or on .detach()")
        if isinstance(self.data, np.ndarray):
            np.copyto(self.data, arr)
        else:  # a kernel, not a driver copy: a CUDA graph can capture it
            kernel("copy_into", self.device)(arr, self.data)
        self._vc[0] += 1
        return self

    # ---- autograd
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) . grad into every leaf's ``.grad``; the graph is freed on the
        way unless ``retain_graph``."""
        grads = {id(self): self._seed(grad)}
        for t in reversed(self._topological_order()):
            g = grads.pop(id(t), None)
            if g is None:
                continue
            if t._ctx is None:
                t._accumulate(g)
                continue
            for parent, gp in t._ctx._backward(g, retain_graph):
                old = grads.get(id(parent))  # (kernels by the parent's device: a device copy changes it)
                grads[id(parent)] = gp if old is None else kernel("add", parent.device)(old, gp)

    def _seed(self, grad):
        """backward()'s starting gradient as an array of this tensor's device, shape and dtype.
        A Tensor must match all three; arrays and lists are cast to this dtype."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without grad needs a one-element tensor, got shape {self.shape}")
            return kernel("full", self.device)(self.shape, 1.0, self.dtype)
        if isinstance(grad, Tensor):
            if grad.dtype != self.dtype:
                raise TypeError(f"backward(): grad of dtype {grad.dtype} for a tensor of dtype {self.dtype}")
            if grad.device != self.device:
                raise ValueError(f"backward(): grad on device {grad.device!r} for a tensor on {self.device!r}")
            arr = grad.data
        else:
            arr = kernel("from_host", self.device)(np.asarray(grad, self.dtype))
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"backward(): grad of shape {tuple(arr.shape)} for a tensor of shape {self.shape}")
        return arr

    def _accumulate(self, g) -> None:
        """A leaf's ``.grad`` += g (g already checked against this tensor); a copy the first time,
        so no two leaves share memory."""
        if self.grad is None:
            self.grad = Tensor._wrap(kernel("copy", self.device)(g), self.device, False, None)
            return
        old = self.grad
        if not isinstance(old, Tensor) or old.shape != self.shape or old.dtype != self.dtype or old.device != self.device:
            raise ValueError(f"cannot accumulate into .grad ({_describe(old)}) of a tensor of shape {self.shape}, "
                             f"dtype {self.dtype} on {self.device!r}")
        self.grad = Tensor._wrap(kernel("add", self.device)(old.data, g), self.device, False, None)

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
                if t._ctx.parents is None:
                    raise RuntimeError(_FREED)
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


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"shape {t.shape}, dtype {t.dtype} on {t.device!r}"
    return f"a {type(t).__name__}"


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
