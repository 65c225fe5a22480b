"""ONNX import: an ONNX graph as a cnn_numba Module that runs its nodes with cnn_numba's ops.

Reading is defensive: the file is parsed as protobuf (no code in it runs; external data is
refused), every tensor's element count is checked against a bound and against the bytes that
hold it before numpy sees it, nodes are ordered by their inputs (a cycle is an error), and every
node is checked before anything runs, so an unsupported graph fails once, listing every node.

Values while running: float tensors are cnn_numba Tensors; integer tensors (shapes, axes,
indices) and Constant nodes are host numpy arrays. Float initializers become Parameters
(BatchNormalization's mean and variance become buffers), so the imported model fine-tunes.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import re
from pathlib import Path

import numpy as np

from .. import functional as F
from .. import shapes
from ..backend import kernel
from ..nn.module import Module, Parameter
from ..tensor import Function, Tensor
from ._export import _onnx

MAX_ELEMENTS = 1 << 28        # per tensor: 1 GiB of float32; a larger claim is a corrupt or hostile file
MAX_FILE_BYTES = 1 << 31      # protobuf's own limit
MIN_IMPORT_OPSET = 11         # Pad, Clip, Resize took inputs from 11 on


class _Softmax(Function):
    """softmax / log_softmax along ``axis``, on the host (a model's last op: small)."""

    def forward(self, x, *, axis, log):
        host = np.asarray(kernel("to_host", self.device)(x))
        z = host - host.max(axis, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis, keepdims=True)
        self.y, self.axis, self.log = (z - np.log(s) if log else e / s).astype(host.dtype), axis, log
        return kernel("from_host", self.device)(np.ascontiguousarray(self.y))

    def backward(self, gy):
        g, y, ax = np.asarray(kernel("to_host", self.device)(gy)), self.y, self.axis
        gx = g - np.exp(y) * g.sum(ax, keepdims=True) if self.log else y * (g - (g * y).sum(ax, keepdims=True))
        return (kernel("from_host", self.device)(np.ascontiguousarray(gx.astype(y.dtype))),)


# ----------------------------------------------------------------------------- reading and checking

_ELEM = {1: np.float32, 11: np.float64, 7: np.int64, 6: np.int32, 9: np.bool_, 10: np.float16}
_FIELD = {1: "float_data", 11: "double_data", 7: "int64_data", 6: "int32_data", 9: "int32_data", 10: "int32_data"}


def _tensor_array(t, where: str) -> np.ndarray:
    """A TensorProto as numpy, after checking its claimed size against a bound and its data."""
    numpy_helper = _onnx().numpy_helper
    if t.data_location == 1:
        raise ValueError(f"{where}: tensor {t.name!r} keeps its data in an external file, which load() does not read")
    if t.data_type not in _ELEM:
        raise ValueError(f"{where}: tensor {t.name!r} has unsupported element type {t.data_type}")
    dims = list(t.dims)
    if any(d < 0 for d in dims):
        raise ValueError(f"{where}: tensor {t.name!r} has a negative dimension {dims}")
    count = math.prod(dims)
    if count > MAX_ELEMENTS:
        raise ValueError(f"{where}: tensor {t.name!r} claims {count} elements (shape {dims}), more than the "
                         f"{MAX_ELEMENTS} allowed")
    size = np.dtype(_ELEM[t.data_type]).itemsize
    have = len(t.raw_data) // size if t.raw_data else len(getattr(t, _FIELD[t.data_type]))
    if t.raw_data and len(t.raw_data) != count * size or have != count:
        raise ValueError(f"{where}: tensor {t.name!r} of shape {dims} holds {have} elements, expected {count}")
    return np.array(numpy_helper.to_array(t))


def _read(path) -> object:
    onnx = _onnx()
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: {size} bytes, larger than an ONNX protobuf can be")
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise ValueError(f"{path}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError and friends: truncated or not protobuf
        kind = " (a zip archive: an .npz checkpoint?)" if data[:2] == b"PK" else ""
        raise ValueError(f"{path}: not an ONNX model{kind}: protobuf does not parse "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated'})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise ValueError(f"{path}: not an ONNX model (no graph, IR version or opset: wrong file or truncated)")
    return model


def _attrs(node) -> dict:
    helper = _onnx().helper
    out = {}
    for a in node.attribute:
        if a.type == 4:  # TENSOR
            out[a.name] = _tensor_array(a.t, f"node {node.name or node.op_type}")
        elif a.type in (1, 2, 3, 6, 7, 8):  # FLOAT, INT, STRING, FLOATS, INTS, STRINGS
            v = helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else [s.decode() if isinstance(s, bytes) else s
                                                                     for s in v] if isinstance(v, list) else v
        else:
            out[a.name] = None  # graphs and sparse tensors: the node check refuses them
    return out


# ----------------------------------------------------------------------------- ops
#
# Each runner gets (module, attrs, args) with args Tensors (float values) or numpy arrays
# (constants, shapes) or None (an absent optional input), and returns a tuple of outputs.

def _pads(a, in_hw, k, s, d) -> tuple[int, int, int, int]:
    """ONNX pads/auto_pad as (top, left, bottom, right)."""
    auto = a.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((-(-i // si) - 1) * si + di * (ki - 1) + 1 - i, 0) for i, ki, si, di in zip(in_hw, k, s, d)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        return tuple(small + big) if auto == "SAME_UPPER" else tuple(big + small)
    if auto == "VALID":
        return 0, 0, 0, 0
    return tuple(a.get("pads", [0, 0, 0, 0]))


def _conv(m, a, args):
    x, w, b = (args + [None])[:3]
    k = tuple(w.shape[2:])
    s, d, g = tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1])), a.get("group", 1)
    t, l, bo, r = _pads(a, x.shape[2:], k, s, d)
    w, b = m.tensor(w, x), None if b is None else m.tensor(b, x)
    if (t, l) == (bo, r):
        return (F.conv2d(x, w, b, s, (t, l), d, g),)
    geom = shapes.conv2d_geom(x.shape, w.shape, s, 0, d, g)
    oh, ow = (shapes.conv_output_size(i, ki, si, p0, p1, di)
              for i, ki, si, p0, p1, di in zip(x.shape[2:], k, s, (t, l), (bo, r), d))
    shapes.check_output_size((oh, ow), x.shape, f"Conv with pads {(t, l, bo, r)}")
    geom = dataclasses.replace(geom, ph=t, pw=l, ph_end=bo, pw_end=r, oh=oh, ow=ow)
    return (F.Conv2d.apply(*(v for v in (x, w, b) if v is not None), geom=geom, algo="auto"),)


def _conv_transpose(m, a, args):
    x, w, b = (args + [None])[:3]
    k = tuple(w.shape[2:])
    s, d, g = tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1])), a.get("group", 1)
    op = tuple(a.get("output_padding", [0, 0]))
    t, l, bo, r = a.get("pads", [0, 0, 0, 0])
    w, b = m.tensor(w, x), None if b is None else m.tensor(b, x)
    if (t, l) == (bo, r) and all(o < si or o < di for o, si, di in zip(op, s, d)):
        return (F.conv_transpose2d(x, w, b, s, (t, l), op, g, d),)
    # The conv2d whose adjoint this is: leading pads (t, l), trailing pads minus output_padding.
    geom = shapes.conv_transpose2d_geom(x.shape, w.shape, s, 0, 0, g, d)
    h, wd = ((i - 1) * si + di * (ki - 1) + 1 - p0 - p1 + o
             for i, ki, si, di, p0, p1, o in zip(x.shape[2:], k, s, d, (t, l), (bo, r), op))
    shapes.check_output_size((h, wd), x.shape, f"ConvTranspose with pads {(t, l, bo, r)}")
    geom = dataclasses.replace(geom, h=h, w=wd, ph=t, pw=l, ph_end=bo - op[0], pw_end=r - op[1])
    return (F.ConvTranspose2d.apply(*(v for v in (x, w, b) if v is not None), geom=geom, algo="auto"),)


def _pool_args(a, x):
    k = tuple(a["kernel_shape"])
    s, d = tuple(a.get("strides", [1, 1])), tuple(a.get("dilations", [1, 1]))
    t, l, bo, r = _pads(a, x.shape[2:], k, s, d)
    if (t, l) != (bo, r):
        raise ValueError(f"pooling with asymmetric pads {(t, l, bo, r)} is not supported")
    return k, s, (t, l), d, bool(a.get("ceil_mode", 0))


def _plane_base(shape, hw):
    n, c = shape[:2]
    return (np.arange(n * c, dtype=np.int64) * hw).reshape(n, c, 1, 1)


def _max_pool(m, a, args):
    x = args[0]
    k, s, p, d, ceil = _pool_args(a, x)
    if not a["indices_used"]:  # (set by OnnxModule) most graphs never read the second output
        return (F.max_pool2d(x, k, s, p, d, ceil),)
    y, idx = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    h, w = x.shape[2:]
    return y, idx.numpy() + _plane_base(x.shape, h * w)  # ONNX's indices: flat over N, C, H, W


def _max_unpool(m, a, args):
    x, idx, out_shape = (args + [None])[:3]
    k, s = tuple(a["kernel_shape"]), tuple(a.get("strides", [1, 1]))
    t, l, bo, r = a.get("pads", [0, 0, 0, 0])
    if out_shape is None:
        out_hw = tuple((i - 1) * si + ki - p0 - p1 for i, si, ki, p0, p1 in zip(x.shape[2:], s, k, (t, l), (bo, r)))
    else:
        out_hw = tuple(int(v) for v in np.asarray(out_shape)[-2:])
    local = np.asarray(idx) - _plane_base(x.shape, out_hw[0] * out_hw[1])
    return (F.max_unpool2d(x, Tensor(local, device=x.device), k, s, (t, l), output_size=out_hw),)


def _avg_pool(m, a, args):
    x = args[0]
    k, s, p, _, ceil = _pool_args(a, x)
    return (F.avg_pool2d(x, k, s, p, ceil, bool(a.get("count_include_pad", 0))),)


def _batch_norm(m, a, args):
    x, w, b, mean, var = args
    if isinstance(mean, np.ndarray) or isinstance(var, np.ndarray):
        mean, var = m.tensor(mean, x), m.tensor(var, x)
    return (F.batch_norm(x, mean, var, m.tensor(w, x), m.tensor(b, x), m.training,
                         1.0 - a.get("momentum", 0.9), a.get("epsilon", 1e-5)),)


def _gemm(m, a, args):
    x, w, c = (args + [None])[:3]
    x, w = m.tensor(x), m.tensor(w, x)
    if a.get("transA", 0):
        x = F.permute(x, (1, 0))
    if not a.get("transB", 0):
        w = F.permute(w, (1, 0))
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    y = F.linear(x, w * alpha if alpha != 1.0 else w)
    if c is not None:
        c = m.tensor(c, y)
        y = y + (c * beta if beta != 1.0 else c)
    return (y,)


def _matmul(m, a, args):
    x, w = m.tensor(args[0]), args[1]
    if w.ndim != 2:
        raise ValueError(f"MatMul with a {w.ndim}-D right operand is not supported (2-D: a linear layer)")
    return (F.linear(x, F.permute(m.tensor(w, x), (1, 0))),)


def _arith(op):
    def run(m, a, args):
        x, y = args
        if isinstance(x, np.ndarray) and isinstance(y, np.ndarray):  # constant folding (shapes)
            return (np.asarray({"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Mod": np.mod,
                                "Div": np.floor_divide if x.dtype.kind in "iu" else np.divide}[op](x, y)),)
        if op == "Mod":
            raise ValueError("Mod of float tensors is not supported")
        like = x if isinstance(x, Tensor) else y
        x, y = m.tensor(x, like), (y if op != "Div" else None)
        if op == "Div":
            return (F.mul(x, m.tensor(1.0 / args[1].astype(np.float64), like)),)
        y = m.tensor(y, like)
        return ({"Add": F.add, "Sub": F.sub, "Mul": F.mul}[op](x, y),)
    return run


def _reshape_to(x, shape):
    if isinstance(x, np.ndarray):
        return x.reshape(shape)
    return F.reshape(x, shape)


def _reshape(m, a, args):
    x, shape = args
    shape = [int(v) for v in np.asarray(shape)]
    if not a.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return (_reshape_to(x, tuple(np.empty(x.shape, np.bool_).reshape(shape).shape)),)


def _flatten(m, a, args):
    x = args[0]
    axis = a.get("axis", 1) % max(len(x.shape), 1) if a.get("axis", 1) < 0 else a.get("axis", 1)
    return (_reshape_to(x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))),)


def _axes(a, args, ndim):
    axes = a.get("axes") if len(args) < 2 or args[1] is None else [int(v) for v in np.asarray(args[1])]
    return None if axes is None else sorted(v % ndim for v in axes)


def _squeeze(m, a, args):
    x = args[0]
    axes = _axes(a, args, len(x.shape))
    axes = [i for i, s in enumerate(x.shape) if s == 1] if axes is None else axes
    if any(x.shape[i] != 1 for i in axes):
        raise ValueError(f"Squeeze of axes {axes} of shape {tuple(x.shape)}: not all have size 1")
    return (_reshape_to(x, tuple(s for i, s in enumerate(x.shape) if i not in axes)),)


def _unsqueeze(m, a, args):
    x = args[0]
    raw = a.get("axes") if len(args) < 2 or args[1] is None else np.asarray(args[1]).reshape(-1)
    shape, axes = list(x.shape), sorted(int(v) % (len(x.shape) + len(raw)) for v in raw)
    for i in axes:
        shape.insert(i, 1)
    return (_reshape_to(x, tuple(shape)),)


def _reduce(mean):
    def run(m, a, args):
        x = args[0]
        nd = len(x.shape)
        axes = _axes(a, args, nd)
        if axes is None or not axes:
            axes = list(range(nd)) if not (axes == [] and a.get("noop_with_empty_axes", 0)) else []
        kept = [i for i in range(nd) if i not in axes]
        out = [1 if i in axes else s for i, s in enumerate(x.shape)] if a.get("keepdims", 1) else \
            [x.shape[i] for i in kept]
        if isinstance(x, np.ndarray):
            return (np.asarray((np.mean if mean else np.sum)(x, tuple(axes))).reshape(out),)
        if not axes:
            return (x,)
        # the reduced axes last, flattened, then one linear layer of ones (1/k for the mean): (rest, k) -> (rest, 1)
        k = math.prod(x.shape[i] for i in axes)
        y = F.permute(x, kept + axes) if kept + axes != list(range(nd)) else x
        y = F.reshape(y, (math.prod(x.shape[i] for i in kept), k))
        w = m.tensor(np.full((1, k), 1.0 / k if mean else 1.0), x)
        return (F.reshape(F.linear(y, w), tuple(out)),)
    return run


def _concat(m, a, args):
    if all(isinstance(v, np.ndarray) for v in args):
        return (np.concatenate(args, a["axis"]),)
    like = next(v for v in args if isinstance(v, Tensor))
    return (F.cat([m.tensor(v, like) for v in args], a["axis"] % len(like.shape)),)


def _transpose(m, a, args):
    x = args[0]
    perm = a.get("perm", list(range(len(x.shape)))[::-1])
    return (np.transpose(x, perm) if isinstance(x, np.ndarray) else F.permute(x, perm),)


def _pad(m, a, args):
    x = args[0]
    pads = [int(v) for v in np.asarray(args[1] if len(args) > 1 and args[1] is not None else a["pads"])]
    value = float(np.asarray(args[2]).reshape(-1)[0]) if len(args) > 2 and args[2] is not None \
        else float(a.get("value", 0.0))
    nd = len(x.shape)
    axes = list(range(nd)) if len(args) < 4 or args[3] is None else [int(v) % nd for v in np.asarray(args[3])]
    if min(pads) < 0:
        raise ValueError(f"Pad with negative pads {pads} (a crop) is not supported")
    for ax, before, after in zip(axes, pads[:len(axes)], pads[len(axes):]):
        parts = []
        for size in (before, after):
            shape = list(x.shape)
            shape[ax] = size
            parts.append(Tensor(np.full(shape, value, x.dtype), device=x.device) if size else None)
        x = F.cat([p for p in (parts[0], x, parts[1]) if p is not None], ax) if before or after else x
    return (x,)


def _clip(m, a, args):
    x = args[0]
    lo = a.get("min") if len(args) < 2 or args[1] is None else float(np.asarray(args[1]))
    hi = a.get("max") if len(args) < 3 or args[2] is None else float(np.asarray(args[2]))
    # clip(x, lo, hi) = lo + relu(x - lo) - relu(x - hi) for lo <= hi (ReLU6: lo = 0, hi = 6);
    # without lo, x - relu(x - hi)
    y = x if lo is None else F.relu(x) if lo == 0.0 else F.relu(x - lo) + lo
    return (y if hi is None else y - F.relu(x - hi),)


def _softmax(log):
    def run(m, a, args):
        x = args[0]
        axis = a.get("axis", -1 if m.opset >= 13 else 1) % len(x.shape)
        if m.opset < 13 and axis != len(x.shape) - 1:
            raise ValueError(f"Softmax before opset 13 over axes {axis}.. of a {len(x.shape)}-D input is not supported")
        return (_Softmax.apply(x, axis=axis, log=log),)
    return run


def _constant(m, a, args):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            v = a[key]
            return (np.asarray(v, np.float32 if "float" in key else np.int64 if "int" in key else None),)
    raise ValueError("Constant without a value")


def _shape(m, a, args):
    return (np.array(args[0].shape, np.int64)[a.get("start", 0):a.get("end")],)


def _gather(m, a, args):
    return (np.asarray(np.take(np.asarray(args[0]), np.asarray(args[1]), axis=a.get("axis", 0))),)


def _slice(m, a, args):
    data, starts, ends = (np.asarray(v) for v in args[:3])
    axes = np.asarray(args[3]) if len(args) > 3 and args[3] is not None else np.arange(len(starts))
    steps = np.asarray(args[4]) if len(args) > 4 and args[4] is not None else np.ones(len(starts), np.int64)
    index = [slice(None)] * data.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[int(ax)] = slice(int(s), int(e), int(st))
    return (data[tuple(index)],)


def _cast(m, a, args):
    x, to = args[0], _ELEM.get(a["to"])
    if isinstance(x, np.ndarray):
        return (x.astype(to),)
    if to is None or np.dtype(to) != x.dtype:
        raise ValueError(f"Cast of a {x.dtype} tensor to element type {a['to']} is not supported")
    return (x,)


def _identity(m, a, args):
    return (args[0],)


def _unary(fn):
    return lambda m, a, args: (fn(args[0]),)


OPS = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _max_pool, "MaxUnpool": _max_unpool,
    "AveragePool": _avg_pool, "GlobalAveragePool": lambda m, a, args: (F.adaptive_avg_pool2d(args[0], 1),),
    "BatchNormalization": _batch_norm, "Gemm": _gemm, "MatMul": _matmul,
    "Relu": _unary(F.relu), "Sigmoid": _unary(F.sigmoid), "Tanh": _unary(F.tanh),
    "Add": _arith("Add"), "Sub": _arith("Sub"), "Mul": _arith("Mul"), "Div": _arith("Div"),
    "Mod": _arith("Mod"),
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat,
    "Transpose": _transpose, "Pad": _pad, "Clip": _clip, "Softmax": _softmax(False), "LogSoftmax": _softmax(True),
    "Identity": _identity, "Dropout": _identity, "Constant": _constant,
    "ReduceSum": _reduce(False), "ReduceMean": _reduce(True),
    "Shape": _shape, "Gather": _gather, "Slice": _slice, "Cast": _cast,
}
HOST_ONLY = {"Shape", "Gather", "Slice"}
# (least, most) inputs per op; ops not listed take one
ARITY = {"Conv": (2, 3), "ConvTranspose": (2, 3), "MaxUnpool": (2, 3), "BatchNormalization": (5, 5), "Gemm": (2, 3),
         "MatMul": (2, 2), "Add": (2, 2), "Sub": (2, 2), "Mul": (2, 2), "Div": (2, 2), "Mod": (2, 2),
         "Reshape": (2, 2), "Squeeze": (1, 2), "Unsqueeze": (1, 2), "Concat": (1, 1 << 16), "Pad": (1, 4),
         "Clip": (1, 3), "ReduceSum": (1, 2), "ReduceMean": (1, 2), "Constant": (0, 0), "Gather": (2, 2),
         "Slice": (3, 5), "Dropout": (1, 3)}  # shape arithmetic: their data inputs must be host constants


def _check_node(node, a, host: set, shapes_of: dict) -> str | None:
    """Why ``node`` cannot run here, or None. ``host``: names of values known before running
    (constants, shapes); ``shapes_of``: shapes of initializers and Constant nodes."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"domain {node.domain!r} is not ONNX's default"
    if op not in OPS:
        return "unknown or unsupported op"
    if any(v is None for v in a.values()):
        return "graph or sparse-tensor attributes"
    ins = list(node.input)
    least, most = ARITY.get(op, (1, 1))
    if not least <= len(ins) <= most or any(not i for i in ins[:least]):
        return f"{len(ins)} inputs (expected {least}" + (f" to {most})" if most > least else ")")
    if not node.output or not node.output[0]:
        return "no output"
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "MaxUnpool"):
        k = a.get("kernel_shape") or shapes_of.get(ins[1], [0, 0, 0, 0])[2:]
        if len(k) != 2:
            return f"a {len(k)}-D kernel (only 2-D)"
    if op == "ConvTranspose" and (a.get("output_shape") or a.get("auto_pad", "NOTSET") != "NOTSET"):
        return "output_shape/auto_pad (give pads and output_padding)"
    if op == "MaxPool" and a.get("storage_order", 0):
        return "storage_order=1"
    if op in ("MaxPool", "AveragePool") and a.get("auto_pad", "NOTSET") == "NOTSET":
        pads = a.get("pads", [0, 0, 0, 0])
        if pads[:2] != pads[2:]:
            return f"asymmetric pads {pads}"
    if op == "Cast" and node.input[0] not in host and _ELEM.get(a.get("to")) not in (np.float32, np.float64):
        return f"a cast of a tensor to element type {a.get('to')} (float/double only)"
    if op == "Mod" and a.get("fmod", 0):
        return "fmod=1"
    if op == "BatchNormalization" and (a.get("training_mode", 0) or len(node.output) > 1):
        return "training_mode / running-statistics outputs"
    if op == "Dropout" and len(node.output) > 1 and node.output[1]:
        return "the mask output"
    if op == "Pad" and a.get("mode", "constant") != "constant":
        return f"mode {a['mode']!r} (only 'constant')"
    if op in ("Reshape", "Pad", "Clip", "Squeeze", "Unsqueeze", "ReduceSum", "ReduceMean") and any(i not in host for i in ins[1:] if i):
        return "shape/pads/bounds computed from the input (only constants)"
    if op == "Div" and ins[1] not in host:
        return "a divisor that is not a constant"
    if op in HOST_ONLY and ins[0] not in host and op != "Shape":
        return "data that is not a constant"
    if op == "Constant" and not any(k.startswith("value") and k in a for k in
                                    ("value", "value_float", "value_floats", "value_int", "value_ints")):
        return "a Constant of a kind other than a tensor, float(s) or int(s)"
    return None


def _safe(name: str, taken: set) -> str:
    base = re.sub(r"\W", "_", name) or "t"
    base = "t_" + base if base[0].isdigit() else base
    out, k = base, 1
    while out in taken:
        k += 1
        out = f"{base}_{k}"
    taken.add(out)
    return out


class OnnxModule(Module):
    """An imported ONNX graph. Float initializers are Parameters, batch-norm statistics buffers
    (attribute names: the ONNX names with non-identifier characters replaced by ``_``;
    ``onnx_names`` maps them back). ``forward(*inputs)`` runs the nodes in order."""

    def __init__(self, model, where: str):
        super().__init__()
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        newest = _onnx().defs.onnx_opset_version()
        problems = []
        if not MIN_IMPORT_OPSET <= self.opset <= newest:
            problems.append(f"opset {self.opset} (supported: {MIN_IMPORT_OPSET} to {newest})")
        inits = {}
        for t in graph.initializer:
            inits[t.name] = _tensor_array(t, where)
        shapes_of = {k: list(v.shape) for k, v in inits.items()}
        nodes = [(n, _attrs(n)) for n in graph.node]
        for n, a in nodes:
            if n.op_type == "Constant" and "value" in a:
                shapes_of[n.output[0]] = list(np.shape(a["value"]))
        self.input_names = [i.name for i in graph.input if i.name not in inits]
        for i in graph.input:
            if i.name in inits:
                continue
            dims = i.type.tensor_type.shape.dim
            free = [k for k, d in enumerate(dims) if k and not d.HasField("dim_value")]
            if free:
                problems.append(f"input {i.name!r}: dynamic dims {free} (only dim 0, the batch, may be)")
            if i.type.tensor_type.elem_type not in (1, 11):
                problems.append(f"input {i.name!r}: element type {i.type.tensor_type.elem_type} (float/double only)")
        if not self.input_names:
            problems.append("no graph input")
        self.output_names = [o.name for o in graph.output]

        order = self._order(nodes, set(self.input_names) | set(inits), where)
        defined = set(self.input_names) | set(inits) | {o for n, _ in nodes for o in n.output}
        problems += [f"output {o!r}: nothing defines it" for o in self.output_names if o not in defined]
        bn_stats = {n.input[k] for n, _ in order if n.op_type == "BatchNormalization" for k in (3, 4)}
        host = {k for k, v in inits.items() if v.dtype.kind != "f"}
        for n, a in order:
            why = _check_node(n, a, host, shapes_of)
            if why:
                problems.append(f"{n.op_type} {n.name or n.output[0]!r}: {why}")
            ins = [i for i in n.input if i]
            if n.op_type in ("Constant", "Shape") or (ins and all(i in host for i in ins)):
                host.update(n.output)
        if problems:
            raise ValueError(f"{where}: cannot import: " + "; ".join(problems))

        taken = set(dir(self)) | {"training", "opset"}
        self.onnx_names, self._tensors, self._consts = {}, [], {}
        for name, arr in inits.items():
            if arr.dtype.kind != "f":
                self._consts[name] = arr
                continue
            attr = _safe(name, taken)
            self.onnx_names[attr] = name
            t = Tensor(np.array(arr, order="C"))  # (np.ascontiguousarray makes 0-d arrays 1-d)
            if name in bn_stats:
                self.register_buffer(attr, t)
            else:
                self.register_parameter(attr, Parameter(t))
            self._tensors.append((name, attr))
        for n, a in order:
            if n.op_type == "MaxPool":
                a["indices_used"] = len(n.output) > 1 and bool(n.output[1])
        self._steps = [(OPS[n.op_type], a, list(n.input), list(n.output), n) for n, a in order]

    @staticmethod
    def _order(nodes, known: set, where: str):
        """Nodes in an order where each runs after its inputs exist (Kahn's algorithm, the file's
        order among the ready ones); a cycle or a value nothing defines is a ValueError."""
        produced = {o for n, _ in nodes for o in n.output if o}
        users: dict[str, list[int]] = {}
        waiting = []
        for k, (n, _) in enumerate(nodes):
            need = {i for i in n.input if i and i not in known}
            for i in need:
                if i not in produced:
                    raise ValueError(f"{where}: node {n.op_type} {n.name!r} reads {i!r}, which nothing defines")
                users.setdefault(i, []).append(k)
            waiting.append(len(need))
        ready = [k for k, w in enumerate(waiting) if w == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            k = heapq.heappop(ready)
            order.append(nodes[k])
            for o in nodes[k][0].output:
                for u in users.get(o, ()):
                    waiting[u] -= 1
                    if waiting[u] == 0:
                        heapq.heappush(ready, u)
        if len(order) != len(nodes):
            stuck = [n.name or n.op_type for (n, _), w in zip(nodes, waiting) if w > 0]
            raise ValueError(f"{where}: the graph has a cycle (nodes {', '.join(stuck[:5])} wait on each other)")
        return order

    def tensor(self, v, like: Tensor | None = None) -> Tensor:
        """A float value as a Tensor of ``like``'s dtype and device (constants are host arrays)."""
        if isinstance(v, Tensor) or v is None:
            return v
        dtype = like.dtype if like is not None else np.float32
        return Tensor(np.array(v, dtype, order="C"), device=like.device if like is not None else "cpu")

    def forward(self, *inputs):
        if len(inputs) != len(self.input_names):
            raise ValueError(f"this ONNX model takes {len(self.input_names)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        env = dict(self._consts)
        env.update((name, getattr(self, attr)) for name, attr in self._tensors)
        for name, x in zip(self.input_names, inputs):
            env[name] = x if isinstance(x, Tensor) else Tensor(np.asarray(x, np.float32))
        device = next((v.device for v in env.values() if isinstance(v, Tensor)), "cpu")
        for run, a, ins, outs, node in self._steps:
            try:
                got = run(self, a, [env[i] if i else None for i in ins])
            except (ValueError, TypeError) as e:
                raise type(e)(f"ONNX node {node.op_type} {node.name or outs[0]!r}: {e}") from None
            env.update((o, v) for o, v in zip(outs, got) if o)
        res = tuple(env[o] if isinstance(env[o], Tensor) else Tensor(np.asarray(env[o]), device=device)
                    for o in self.output_names)
        return res[0] if len(res) == 1 else res


def load(path) -> OnnxModule:
    """The ONNX model at ``path`` as a Module (see OnnxModule). Raises a one-line ValueError for a
    file that is not ONNX, is truncated, claims absurd tensor sizes, has a cycle, or holds nodes
    this importer does not support (all of them listed)."""
    return OnnxModule(_read(path), str(path))
