"""Module, Parameter and the containers, with PyTorch's behaviour.

Assigning a ``Parameter`` or a ``Module`` to an attribute registers it (in
``_parameters`` / ``_modules``, in assignment order); ``register_buffer`` adds
non-trainable state such as batch-norm running statistics. ``state_dict()`` holds the
parameters and buffers of the whole tree under dotted names, as host numpy copies,
so ``np.savez(path, **model.state_dict())`` saves a model and
``model.load_state_dict(np.load(path))`` restores it.
"""
from __future__ import annotations

import os
from collections import OrderedDict, namedtuple
from typing import Iterator

import numpy as np

from .. import functional as F
from ..backend import check_device, kernel
from ..tensor import Tensor


def _device_array(host: np.ndarray, device: str):
    """A host array copied to ``device`` with its shape, 0-d included."""
    return kernel("reshape", device)(kernel("from_host", device)(host), host.shape)


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable (requires_grad=True by default).
    From a Tensor it shares that tensor's data; from an array, the array's."""

    __slots__ = ()

    def __init__(self, data=None, requires_grad: bool = True):
        device = data.device if isinstance(data, Tensor) else "cpu"
        data = np.empty(0, np.float32) if data is None else data
        super().__init__(data, requires_grad=requires_grad, device=device)
        shape = tuple(np.shape(data) if not isinstance(data, Tensor) else data.shape)
        if self.shape != shape:  # from_host makes 0-d arrays 1-d
            self.data = kernel("reshape", device)(self.data, shape)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class of layers and models: subclasses set attributes in ``__init__`` (after
    ``super().__init__()``) and define ``forward``; calling the module calls ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- registration
    def _registries(self):
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        return d["_parameters"], d["_buffers"], d["_modules"]

    def __setattr__(self, name, value):
        params, buffers, modules = self._registries()
        if isinstance(value, (Parameter, Module)):
            for reg in (params, buffers, modules):
                reg.pop(name, None)
            self._register(params if isinstance(value, Parameter) else modules, name, value)
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} (Parameter or None expected)")
            self._register(params, name, None)
        elif name in buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r} (Tensor or None expected)")
            self._register(buffers, name, value)
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r} (Module or None expected)")
            self._register(modules, name, None)
        else:
            object.__setattr__(self, name, value)

    def _register(self, registry, name, value) -> None:
        """``registry[name] = value``, mirrored in the instance's ``__dict__``: ``m.weight``
        is then an ordinary attribute lookup (~30 ns) instead of a call of ``__getattr__``
        (~300 ns), which a forward at batch 1 pays for every parameter and buffer it reads.
        Every write to a registry goes through here, and ``__delattr__`` removes both."""
        registry[name] = value
        self.__dict__[name] = value

    def __getattr__(self, name):  # only reached when ordinary lookup fails
        d = self.__dict__
        for reg in ("_parameters", "_buffers", "_modules"):
            if reg in d and name in d[reg]:
                return d[reg][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for reg in self._registries():
            if name in reg:
                del reg[name]
                self.__dict__.pop(name, None)
                return
        object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot register {type(param).__name__} as parameter {name!r} (Parameter or None expected)")
        self._register(self._registries()[0], name, param)

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"cannot register {type(tensor).__name__} as buffer {name!r} (Tensor or None expected)")
        self._register(self._registries()[1], name, tensor)
        (self._non_persistent.discard if persistent else self._non_persistent.add)(name)

    def add_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module")
        self._register(self._registries()[2], name, module)

    # ---- traversal
    def named_modules(self, memo: set | None = None, prefix: str = "") -> Iterator[tuple[str, Module]]:
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m.named_modules(memo, f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, Module]]:
        return ((k, m) for k, m in self._modules.items() if m is not None)

    def children(self) -> Iterator[Module]:
        return (m for _, m in self.named_children())

    def _named_members(self, registry: str, prefix: str, recurse: bool):
        seen = set()
        owners = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for mp, m in owners:
            for k, v in getattr(m, registry).items():
                if v is not None and id(v) not in seen:  # a shared tensor is listed once
                    seen.add(id(v))
                    yield (f"{mp}.{k}" if mp else k), v

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        return self._named_members("_parameters", prefix, recurse)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        return self._named_members("_buffers", prefix, recurse)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        return (b for _, b in self.named_buffers(recurse=recurse))

    def apply(self, fn) -> Module:
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # ---- modes and gradients
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = Tensor._wrap(kernel("full", p.device)(p.shape, 0.0, p.dtype), p.device, False, None)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    # ---- dtype and device
    def to(self, *args, dtype=None, device=None) -> Module:
        """``to(np.float64)``, ``to("cpu")``, or keywords. Floating parameters and buffers (and
        gradients) change dtype; everything changes device. Parameters stay the same objects."""
        for a in args:
            if isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda"):
                device = a
            else:
                dtype = a
        dtype = None if dtype is None else np.dtype(dtype)
        device = None if device is None else check_device(device)

        def convert(t: Tensor | None):
            if t is None:
                return
            dt = dtype if dtype is not None and t.dtype.kind == "f" else t.dtype
            dev = device or t.device
            if dt == t.dtype and dev == t.device:
                return
            host = kernel("to_host", t.device)(t.data).astype(dt)
            t.data, t.device = _device_array(host, dev), dev
            convert(t.grad)

        for m in self.modules():
            for t in list(m._parameters.values()) + list(m._buffers.values()):
                convert(t)
        return self

    def double(self) -> Module:
        return self.to(dtype=np.float64)

    def float(self) -> Module:
        return self.to(dtype=np.float32)

    # ---- state
    def _state_tensors(self, prefix: str = "") -> OrderedDict:
        """name -> tensor for every parameter and persistent buffer; a shared module or tensor
        appears under each of its names (as in PyTorch)."""
        out = OrderedDict()
        for k, v in self._parameters.items():
            if v is not None:
                out[prefix + k] = v
        for k, v in self._buffers.items():
            if v is not None and k not in self._non_persistent:
                out[prefix + k] = v
        for k, m in self._modules.items():
            if m is not None:
                out.update(m._state_tensors(f"{prefix}{k}."))
        return out

    def state_dict(self) -> OrderedDict:
        """Dotted name -> host numpy copy of every parameter and persistent buffer."""
        return OrderedDict((k, np.array(kernel("to_host", t.device)(t.data), copy=True))
                           for k, t in self._state_tensors().items())

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy values (numpy arrays or Tensors) into the parameters and buffers, cast to their
        dtypes. A shape mismatch is always an error; missing or unexpected keys are one when
        ``strict``. The error lists every offending key with its shapes; nothing is loaded then."""
        own = self._state_tensors()
        values = {k: (v.numpy() if isinstance(v, Tensor) else np.asarray(v)) for k, v in dict(state_dict).items()}
        missing = [k for k in own if k not in values]
        unexpected = [k for k in values if k not in own]
        errors = [f"size mismatch for {k}: copying a param with shape {values[k].shape} from checkpoint, "
                  f"the shape in current model is {own[k].shape}"
                  for k in own if k in values and values[k].shape != own[k].shape]
        if strict:
            if unexpected:
                errors.insert(0, "Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected))
            if missing:
                errors.insert(0, "Missing key(s) in state_dict: " + ", ".join(
                    f'"{k}" (shape {own[k].shape})' for k in missing))
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors))
        for k, t in own.items():
            if k in values:
                t.data = _device_array(np.array(values[k], dtype=t.dtype, copy=True), t.device)
                t._vc[0] += 1  # new values: an in-place change (what saved them for backward can tell)
        return IncompatibleKeys(missing, unexpected)

    # ---- printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"({k}): " + repr(m).replace("\n", "\n  ") for k, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n  " + "\n  ".join(lines) + "\n)" if lines else ")")


# ----------------------------------------------------------------------------- eval-mode fusion
#
# In eval mode a Conv2d followed by a BatchNorm2d and/or a ReLU runs as one conv pass that
# applies the batch norm and relu as it stores each output (functional.conv2d_bn_relu, which
# itself runs the ops one by one where a graph is recorded or the device lacks the epilogue),
# and a Linear followed by a ReLU as one product (functional.linear_relu, likewise):
# Sequential finds such runs among its children, BasicBlock, Bottleneck and friends call
# ``conv_chain``. Only modules of exactly the library's classes take part (a subclass may
# change forward: ConnectionTableConv2d, SyncBatchNorm), all in eval mode, and none observed
# through an instance-level ``forward`` (how summary() and onnx.export watch each module's
# output). Bit for bit the outputs of the unfused modules (tests/test_fusion.py).
# ``CNN_NUMBA_FUSE=0`` in the environment, or ``FUSE = False`` here, turns it off.
FUSE = os.environ.get("CNN_NUMBA_FUSE", "1") != "0"
FUSION_ROLES: dict = {}  # class -> 'conv', 'bn', 'relu' or 'linear' (nn/layers.py fills it): exact classes only


def _replaced(m) -> bool:
    """Whether ``m``'s computation is replaced or watched on the instance: a ``forward`` set
    there (summary(), onnx.export) or a batch norm's ``_batch_norm`` op
    (distributed.convert_sync_batchnorm's all-ranks statistics)."""
    return "forward" in m.__dict__ or "_batch_norm" in m.__dict__


def _plain(m, role: str) -> bool:
    """``m`` is the library's layer of ``role`` (its class, not a subclass), in eval mode and
    not replaced or observed."""
    return FUSION_ROLES.get(type(m)) == role and not m.training and not _replaced(m)


def _plain_bn(bn) -> bool:
    """``bn`` can join a fused conv: _plain, with running statistics (eval mode uses them)."""
    return _plain(bn, "bn") and bn.running_mean is not None


def _fusable(conv, bn, relu) -> bool:
    """Whether conv [-> bn] [-> relu] (bn, relu None when absent) runs fused."""
    return (FUSE and (bn is not None or relu is not None) and _plain(conv, "conv")
            and (bn is None or _plain_bn(bn)) and (relu is None or _plain(relu, "relu")))


def _unobserved(m, role: str) -> bool:
    """``m`` is the library's layer of ``role``, not replaced or observed, in either mode."""
    return FUSION_ROLES.get(type(m)) == role and not _replaced(m)


def _bn_relu(bn, relu) -> bool:
    """Whether bn -> relu runs as one op (BatchNorm2d._relu_forward), training or not: the
    batch norm's pass cuts at 0 as it stores, its backward applies relu's mask as it reads gy
    (a resnet8 step at batch 128: relu's two passes over each activation were 3.8 of 58 ms).
    Not for a batch norm whose op is replaced on the instance (``_replaced``)."""
    return FUSE and _unobserved(bn, "bn") and _unobserved(relu, "relu")


def add_relu(a, b, relu):
    """``relu(a + b)`` by the ReLU module ``relu``: a residual block's join, one pass
    (functional.add_relu) where ``relu`` is the library's, unobserved, training or not."""
    if FUSE and _unobserved(relu, "relu"):
        return F.add_relu(a, b)
    return relu(a + b)


def conv_chain(x, conv, bn=None, relu=None):
    """``relu(bn(conv(x)))``, bn and relu optional (None): one fused pass where ``_fusable``;
    else the conv, then bn -> relu as one op where ``_bn_relu``; else the modules one by one."""
    if _fusable(conv, bn, relu):
        return conv._fused_forward(x, bn, relu)
    x = conv(x)
    if bn is not None and relu is not None and _bn_relu(bn, relu):
        return bn._relu_forward(x)
    for m in (bn, relu):
        if m is not None:
            x = m(x)
    return x


def _fused_run(mods, i):
    """(bn, relu, length) of the fusable run (``_fusable``) that starts with ``mods[i]``: a
    BatchNorm2d and/or ReLU right after a conv; length 0 where none. Each module is looked
    at once (at batch 1 the look costs about what the fusion saves)."""
    n = len(mods)
    if not _plain(mods[i], "conv"):
        return None, None, 0
    bn = mods[i + 1] if i + 1 < n and _plain_bn(mods[i + 1]) else None
    j = i + 1 + (bn is not None)
    relu = mods[j] if j < n and _plain(mods[j], "relu") else None
    length = j - i + (relu is not None)
    return bn, relu, (length if length > 1 else 0)


class Sequential(Module):
    """Modules applied in order; ``Sequential(a, b)`` names them "0", "1", and
    ``Sequential(OrderedDict(conv=a, relu=b))`` by the dict's keys."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            for k, m in modules[0].items():
                self.add_module(k, m)
        else:
            for i, m in enumerate(modules):
                self.add_module(str(i), m)

    def forward(self, x):
        mods = tuple(self._modules.values())
        n, i = len(mods), 0
        while i < n:  # a fused run (a conv's, a batch norm's, a linear's) moves i past its modules
            m = mods[i]
            role = FUSION_ROLES.get(type(m)) if FUSE else None
            if role == "conv":
                bn, relu, length = _fused_run(mods, i)
                if length:
                    x, i = m._fused_forward(x, bn, relu), i + length
                    continue
            elif role == "bn" and i + 1 < n and _bn_relu(m, mods[i + 1]):
                x, i = m._relu_forward(x), i + 2
                continue
            elif role == "linear" and i + 1 < n and _plain(m, "linear") and _plain(mods[i + 1], "relu"):
                x, i = m._fused_forward(x), i + 2
                continue
            x, i = m(x), i + 1
        return x

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(OrderedDict(list(self._modules.items())[i]))
        return list(self._modules.values())[i]

    def append(self, module: Module) -> Sequential:
        self.add_module(str(len(self)), module)
        return self


class ModuleList(Module):
    """A list of registered modules (no forward of its own)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> ModuleList:
        self.add_module(str(len(self)), module)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        return list(self._modules.values())[i]


class Identity(Module):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x
