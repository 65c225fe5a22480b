"""ONNX export by tracing: one forward pass records (Function, inputs, params, outputs) for every
op through ``tensor._trace``; each Function maps to ONNX nodes below.

Names: the graph input is ``input``, outputs ``output`` (``output_1``, ... for more); parameters
and buffers keep their ``state_dict`` names; nodes are named ``<module path>/<op>_<k>``.
Dynamic batch: dim 0 of the input is the symbol ``N``; every value derived from it carries N at
dim 0 (``self.batched``), so a reshape keeps dim 0 as ``0`` ("copy") and ops that would mix the
batch with other dims (a reshape or permute moving it, a sum over it) refuse with a message.
"""
from __future__ import annotations

import numpy as np

from .. import shapes
from ..backend import kernel
from ..tensor import Tensor, _trace, no_grad

DEFAULT_OPSET = 17
MIN_OPSET = 13  # ReduceSum's axes as an input, Squeeze/Unsqueeze/Split as today


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError("cnn_numba.onnx needs the onnx package: pip install 'cnn_numba[onnx]' "
                          "(or pip install onnx)") from None
    return onnx


class ExportError(ValueError):
    """An op or a use of the batch dimension that has no ONNX form."""


class _Tracer:
    def __init__(self, model, x: Tensor, dynamic_batch: bool):
        onnx = _onnx()
        self.helper, self.numpy_helper = onnx.helper, onnx.numpy_helper
        self.x, self.n, self.dynamic = x, x.shape[0], dynamic_batch
        self.names: dict[int, str] = {id(x): "input"}   # id(Tensor) -> ONNX value name
        self.keep: list = [x]                             # tensors whose ids are in use
        self.batched: set[str] = {"input"}
        self.lazy: dict[int, tuple] = {}                  # id(indices Tensor) -> (MaxPool node, in_hw)
        self.nodes, self.inits, self.counter = [], [], 0
        self.stack: list[str] = []
        self.param_names = {id(t): k for k, t in model.named_parameters()}  # other buffers: Constant nodes
        self.array_names = {id(t.data): k for k, t in model.named_buffers()}
        self.init_names: set[str] = set()

    # ---- names and values
    def where(self) -> str:
        return self.stack[-1] if self.stack else "model"

    def fresh(self, what: str) -> str:
        self.counter += 1
        return f"{self.where()}/{what}_{self.counter}"

    def node(self, op: str, inputs, n_out: int = 1, **attrs):
        name = self.fresh(op)
        outs = [f"{name}:{i}" for i in range(n_out)]
        node = self.helper.make_node(op, list(inputs), outs, name=name, **attrs)
        self.nodes.append(node)
        return (outs[0] if n_out == 1 else outs), node

    def const(self, arr, what: str = "const") -> str:
        """A Constant node holding ``arr`` (masks, scalars, shapes: not trainable)."""
        name = self.fresh(what)
        value = self.numpy_helper.from_array(np.asarray(arr), name=name)
        self.nodes.append(self.helper.make_node("Constant", [], [name], name=name + "/Constant", value=value))
        return name

    def initializer(self, name: str, arr) -> str:
        if name not in self.init_names:
            self.init_names.add(name)
            self.inits.append(self.numpy_helper.from_array(np.array(arr, order="C"), name=name))
        return name

    def value(self, t: Tensor) -> str:
        """The ONNX name of tensor ``t``: traced, a parameter/buffer (initializer), or a constant."""
        key = id(t)
        if key in self.names:
            return self.names[key]
        if key in self.lazy:
            node, in_hw = self.lazy[key]
            raw = self.pool_indices(node)
            name, _ = self.node("Mod", [raw, self.const(np.array(in_hw[0] * in_hw[1], np.int64), "plane")])
            self.batched.add(name)
        elif key in self.param_names:
            name = self.initializer(self.param_names[key], t.numpy())
        else:
            name = self.const(t.numpy())
        self.names[key] = name
        self.keep.append(t)
        return name

    def array_value(self, arr, device: str) -> str:
        """An array a Function received as a parameter (batch norm's running statistics)."""
        if id(arr) in self.array_names:
            return self.initializer(self.array_names[id(arr)], np.asarray(kernel("to_host", device)(arr)))
        return self.const(np.array(kernel("to_host", device)(arr)))

    def pool_indices(self, node) -> str:
        """MaxPool's second output (flat NCHW indices), added when first needed."""
        if len(node.output) == 1:
            node.output.append(node.name + ":indices")
        return node.output[1]

    def fail(self, what: str):
        raise ExportError(f"cannot export to ONNX: {what} (in module {self.where()})")

    # ---- the hook Function.apply calls
    def record(self, ctx, inputs, params, result):
        op = type(ctx).__name__
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            self.fail(f"op {op} has no ONNX form")
        # (max_unpool2d reads its pool's flat indices itself, not our per-plane ones)
        ins = None if op == "MaxUnpool2d" else [self.value(t) for t in inputs]
        outs = result if isinstance(result, tuple) else (result,)
        name = handler(ctx, inputs, ins, params, outs)
        self.names[id(outs[0])] = name
        self.keep.extend(outs)
        if any(self.names.get(id(t)) in self.batched for t in inputs):
            self.batched.add(name)

    def is_batched(self, name: str) -> bool:
        return self.dynamic and name in self.batched

    # ---- ops (each returns the ONNX name of the Function's first output)
    def op_Conv2d(self, ctx, inputs, ins, p, outs):
        g = p["geom"]
        y, _ = self.node("Conv", ins, kernel_shape=[g.kh, g.kw], strides=[g.sh, g.sw], dilations=[g.dh, g.dw],
                         pads=[g.ph, g.pw, g.ph_end, g.pw_end], group=g.g)
        return y

    def op_ConvTranspose2d(self, ctx, inputs, ins, p, outs):
        g = p["geom"]  # the conv2d whose adjoint this is: its x is our output (h, w), its y our input (oh, ow)
        pads, out_pad = [g.ph, g.pw, max(g.ph_end, 0), max(g.pw_end, 0)], []
        for o, i, k, s, d, p0, p1 in ((g.h, g.oh, g.kh, g.sh, g.dh, g.ph, pads[2]),
                                      (g.w, g.ow, g.kw, g.sw, g.dw, g.pw, pads[3])):
            out_pad.append(o - ((i - 1) * s + d * (k - 1) + 1 - p0 - p1))  # ONNX's size formula, solved
        y, _ = self.node("ConvTranspose", ins, kernel_shape=[g.kh, g.kw], strides=[g.sh, g.sw],
                         dilations=[g.dh, g.dw], pads=pads, output_padding=out_pad, group=g.g)
        return y

    def op_MaxPool2d(self, ctx, inputs, ins, p, outs):
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p["window"], p["stride"], p["pad"], p["dilation"]
        h, w = inputs[0].shape[2:]
        floor = (shapes.pool_output_size(h, kh, sh, ph, dh, False), shapes.pool_output_size(w, kw, sw, pw, dw, False))
        y, node = self.node("MaxPool", ins, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                            dilations=[dh, dw], ceil_mode=int(tuple(p["out_hw"]) != floor))
        self.lazy[id(outs[1])] = (node, (h, w))
        self.keep.append(outs[1])
        return y

    def op_MaxUnpool2d(self, ctx, inputs, ins, p, outs):
        x, idx = inputs
        if id(idx) not in self.lazy:
            self.fail("max_unpool2d's indices must come from a max_pool2d in the same forward pass")
        node, (h, w) = self.lazy[id(idx)]
        oh, ow = p["out_hw"]
        raw, xname = self.pool_indices(node), self.value(x)
        full = raw
        if (h, w) != (oh, ow):  # plane index from (h, w) planes re-based onto (oh, ow) planes
            plane_in = self.const(np.array(h * w, np.int64), "plane")
            planes, _ = self.node("Div", [raw, plane_in])
            within, _ = self.node("Mod", [raw, plane_in])
            base, _ = self.node("Mul", [planes, self.const(np.array(oh * ow, np.int64), "plane")])
            full, _ = self.node("Add", [base, within])
        shape, _ = self.node("Shape", [xname])
        nc, _ = self.node("Slice", [shape, self.const(np.array([0], np.int64)), self.const(np.array([2], np.int64))])
        out_shape, _ = self.node("Concat", [nc, self.const(np.array([oh, ow], np.int64))], axis=0)
        attrs = {k: v for k, v in zip(("kernel_shape", "strides", "pads"), self.attrs_of(node))}
        y, _ = self.node("MaxUnpool", [xname, full, out_shape], **attrs)
        return y

    @staticmethod
    def attrs_of(node):
        got = {a.name: list(a.ints) for a in node.attribute}
        return got["kernel_shape"], got["strides"], got["pads"]

    def op_AvgPool2d(self, ctx, inputs, ins, p, outs):
        (kh, kw), (sh, sw), (ph, pw) = p["window"], p["stride"], p["pad"]
        x = inputs[0]
        (h, w), (oh, ow) = x.shape[2:], p["out_hw"]
        if p["divisor_override"]:
            # window sums / divisor: a depthwise conv with ones (padding is zeros, as in the sum);
            # ceil_mode's last partial window is one more row/column of zero padding at the end.
            c = x.shape[1]
            ones = self.const(np.ones((c, 1, kh, kw), x.dtype), "ones")
            end = [(oh - 1) * sh + kh - h - ph, (ow - 1) * sw + kw - w - pw]
            s, _ = self.node("Conv", [ins[0], ones], kernel_shape=[kh, kw], strides=[sh, sw],
                             pads=[ph, pw, max(end[0], 0), max(end[1], 0)], group=c)
            y, _ = self.node("Mul", [s, self.const(np.array(1.0 / p["divisor_override"], x.dtype))])
            return y
        floor = (shapes.pool_output_size(h, kh, sh, ph, 1, False), shapes.pool_output_size(w, kw, sw, pw, 1, False))
        y, _ = self.node("AveragePool", ins, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                         ceil_mode=int(tuple(p["out_hw"]) != floor), count_include_pad=int(p["count_include_pad"]))
        return y

    def op_AdaptiveAvgPool2d(self, ctx, inputs, ins, p, outs):
        (h, w), (oh, ow) = inputs[0].shape[2:], p["out_hw"]
        if (oh, ow) == (1, 1):
            return self.node("GlobalAveragePool", ins)[0]
        if h % oh or w % ow:
            self.fail(f"adaptive_avg_pool2d from {(h, w)} to {(oh, ow)} (sizes that do not divide have "
                      "windows of unequal size, which ONNX's AveragePool cannot express)")
        k = [h // oh, w // ow]
        return self.node("AveragePool", ins, kernel_shape=k, strides=k)[0]

    def op_ToDevice(self, ctx, inputs, ins, p, outs):
        return self.node("Identity", ins)[0]

    def op_ReLU(self, ctx, inputs, ins, p, outs):
        return self.node("Relu", ins)[0]

    def op_Sigmoid(self, ctx, inputs, ins, p, outs):
        return self.node("Sigmoid", ins)[0]

    def op_Tanh(self, ctx, inputs, ins, p, outs):
        return self.node("Tanh", ins)[0]

    def _broadcast(self, op, inputs, ins):
        """Add/Mul; a constant operand as long as the output with the example's batch size at
        dim 0 would pin the batch."""
        if any(self.is_batched(i) for i in ins):
            ndim = max(t.ndim for t in inputs)
            for t, name in zip(inputs, ins):
                if name not in self.batched and t.ndim == ndim and t.shape[0] != 1:
                    self.fail(f"{op} of a batch with a constant of shape {t.shape} that has the batch size "
                              "built in; export with dynamic_batch=False")
        return self.node(op, ins)[0]

    def op_Add(self, ctx, inputs, ins, p, outs):
        return self._broadcast("Add", inputs, ins)

    def op_Mul(self, ctx, inputs, ins, p, outs):
        return self._broadcast("Mul", inputs, ins)

    def op_Sum(self, ctx, inputs, ins, p, outs):
        if self.is_batched(ins[0]):
            self.fail("a sum over the batch dimension; export with dynamic_batch=False")
        y, _ = self.node("ReduceSum", ins, keepdims=0)
        if outs[0].ndim:
            y, _ = self.node("Reshape", [y, self.const(np.array(outs[0].shape, np.int64), "shape")])
        return y

    def op_Reshape(self, ctx, inputs, ins, p, outs):
        shape = list(p["shape"])
        if self.is_batched(ins[0]):
            if not shape or shape[0] != inputs[0].shape[0]:
                self.fail(f"a reshape from {inputs[0].shape} to {tuple(shape)} changes the batch dimension; "
                          "export with dynamic_batch=False")
            shape[0] = 0  # ONNX: copy the input's dim 0
        return self.node("Reshape", [ins[0], self.const(np.array(shape, np.int64), "shape")])[0]

    def op_Cat(self, ctx, inputs, ins, p, outs):
        if p["dim"] == 0 and any(self.is_batched(i) for i in ins):
            self.fail("a concatenation along the batch dimension; export with dynamic_batch=False")
        return self.node("Concat", ins, axis=p["dim"])[0]

    def op_Permute(self, ctx, inputs, ins, p, outs):
        if self.is_batched(ins[0]) and p["dims"][0] != 0:
            self.fail(f"a permute {p['dims']} that moves the batch dimension; export with dynamic_batch=False")
        return self.node("Transpose", ins, perm=list(p["dims"]))[0]

    def op_Linear(self, ctx, inputs, ins, p, outs):
        if inputs[0].ndim == 2:
            return self.node("Gemm", ins, transB=1)[0]
        wt, _ = self.node("Transpose", [ins[1]], perm=[1, 0])
        y, _ = self.node("MatMul", [ins[0], wt])
        return self.node("Add", [y, ins[2]])[0] if len(ins) == 3 else y

    def op_BatchNorm(self, ctx, inputs, ins, p, outs):
        if p["training"]:
            self.fail("batch_norm with batch statistics (training=True, or no running statistics)")
        x, c, dt = inputs[0], inputs[0].shape[1], inputs[0].dtype
        wb = iter(ins[1:])
        w = next(wb) if p["has_wb"][0] else self.const(np.ones(c, dt), "ones")
        b = next(wb) if p["has_wb"][1] else self.const(np.zeros(c, dt), "zeros")
        mean, var = (self.array_value(a, x.device) for a in p["running"])
        return self.node("BatchNormalization", [ins[0], w, b, mean, var], epsilon=p["eps"],
                         momentum=1.0 - p["momentum"])[0]


def _module_scopes(model, stack: list):
    """Wrap each module's forward so ops know which module they run in; returns an undo."""
    wrapped = []
    for name, m in model.named_modules():
        fwd = m.forward

        def scoped(*args, _fwd=fwd, _name=f"{name or 'model'} ({type(m).__name__})", **kwargs):
            stack.append(_name)
            try:
                return _fwd(*args, **kwargs)
            finally:
                stack.pop()
        object.__setattr__(m, "forward", scoped)
        wrapped.append(m)

    def undo():
        for m in wrapped:
            m.__dict__.pop("forward", None)
    return undo


def export(model, example_input, path, opset: int | None = None, dynamic_batch: bool = True, *,
           metadata: dict | None = None):
    """Write ``model`` as an ONNX file at ``path`` (also returns the ModelProto), traced from one
    forward pass on ``example_input`` (a Tensor or array (N, ...)) in eval mode under no_grad;
    the model's training mode is restored afterwards. ``dynamic_batch``: dim 0 of the input and
    outputs is the symbol N. ``opset`` defaults to 17; 13 up to the installed onnx's newest.
    ``metadata``: string pairs stored in the model's metadata_props."""
    onnx = _onnx()
    newest = onnx.defs.onnx_opset_version()
    opset = DEFAULT_OPSET if opset is None else opset
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {newest}], got {opset!r}")
    x = example_input if isinstance(example_input, Tensor) else Tensor(np.asarray(example_input))
    x = Tensor._wrap(x.data, x.device, False, None)  # a fresh identity: the graph's input
    if x.ndim == 0 or x.shape[0] < 1:
        raise ValueError(f"example_input must have a batch dimension of at least 1, got shape {x.shape}")
    tracer = _Tracer(model, x, dynamic_batch)
    modes = [(m, m.training) for m in model.modules()]
    undo = _module_scopes(model, tracer.stack)
    model.eval()
    if _trace.recorder is not None:
        raise RuntimeError("export: another export is tracing in this thread")
    _trace.recorder = tracer.record
    try:
        with no_grad():
            out = model(x)
    finally:
        _trace.recorder = None
        undo()
        for m, mode in modes:
            object.__setattr__(m, "training", mode)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    if not all(isinstance(o, Tensor) for o in outs):
        raise TypeError(f"export: the model must return a Tensor or a tuple of Tensors, got {type(out).__name__}")
    h = tracer.helper
    elem = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float64): onnx.TensorProto.DOUBLE}
    if x.dtype not in elem:
        raise TypeError(f"export: example_input must be float32 or float64, got {x.dtype}")

    def shape_of(t, name):
        dims = list(t.shape)
        if dynamic_batch and name in tracer.batched and dims:
            dims[0] = "N"
        return dims

    graph_outputs = []
    for i, o in enumerate(outs):
        src = tracer.value(o)
        name = "output" if i == 0 else f"output_{i}"
        tracer.nodes.append(h.make_node("Identity", [src], [name], name=f"{name}/Identity"))
        if src in tracer.batched:
            tracer.batched.add(name)
        graph_outputs.append(h.make_tensor_value_info(name, elem.get(o.dtype, onnx.TensorProto.INT64),
                                                      shape_of(o, name)))
    graph = h.make_graph(tracer.nodes, getattr(model, "name", type(model).__name__),
                         [h.make_tensor_value_info("input", elem[x.dtype], shape_of(x, "input"))],
                         graph_outputs, initializer=tracer.inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="cnn_numba")
    h.set_model_props(proto, {str(k): str(v) for k, v in (metadata or {}).items()})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return proto
