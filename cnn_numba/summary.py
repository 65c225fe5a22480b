"""``summary(model, input_shape)``: a per-layer table of a model, from one forward pass.

The forward pass runs on zeros, in eval mode (batch-norm statistics and dropout untouched;
each module's mode is restored after), with every *instrumented* module's ``forward``
temporarily wrapped: modules with no children, and modules that own parameters directly.
Only modules that actually run get a row, once per call.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np

from . import shapes
from .nn.layers import AdaptiveAvgPool2d, ConvTranspose2d, Linear
from .nn.module import Module
from .tensor import Tensor

_autograd = sys.modules[Tensor.__module__]  # the module (``cnn_numba.tensor`` is the function)


@dataclass(frozen=True)
class _Field:
    """Receptive field of one feature map, per dimension (h, w), in input pixels: ``size`` of the
    input window one position sees, ``jump`` between neighbouring positions, ``start`` the
    centre of position 0's window (negative when it reaches into the padding)."""
    size: tuple
    jump: tuple
    start: tuple

    def merge(self, other: "_Field") -> "_Field":
        """Branches and residual sums: the larger field, dimension by dimension."""
        dims = [a if (a.size[i], a.jump[i]) >= (b.size[i], b.jump[i]) else b
                for i, (a, b) in enumerate([(self, other)] * 2)]
        return _Field(*(tuple(getattr(f, k)[i] for i, f in enumerate(dims)) for k in ("size", "jump", "start")))


_INPUT_FIELD = _Field((1, 1), (1, 1), (0.0, 0.0))


def _window(m: Module):
    """(kernel, stride, padding-before, dilation) pairs of a windowed layer, or None. Any module
    with ``kernel_size`` counts (conv, pooling, subsampling); stride None means the kernel."""
    if not hasattr(m, "kernel_size"):
        return None
    k = shapes.positive_pair(m.kernel_size, "kernel_size")
    s = k if getattr(m, "stride", None) is None else shapes.positive_pair(m.stride, "stride")
    d = shapes.positive_pair(getattr(m, "dilation", 1) or 1, "dilation")
    p = getattr(m, "padding", 0)
    if isinstance(p, str):  # 'same' / 'valid'
        top, _, left, _ = shapes.conv_padding(p, k, s, d)
        p = (top, left)
    return k, s, shapes.nonnegative_pair(p, "padding"), d


def _field_after(m: Module, f: _Field, x_shape: tuple, y_shape: tuple) -> _Field:
    """The receptive field after module m, whose input had field f.

        windowed layer   k_eff = d(k-1) + 1
                         size  = size + (k_eff - 1) * jump
                         start = start + ((k_eff - 1)/2 - p) * jump
                         jump  = jump * s
        transposed conv  jump  = jump / s; each output sees ceil(k_eff / s) inputs per dimension
        adaptive pool    its widest window, jump * i/o
        4-D in, 2-D out  (flatten, or a reduction) the whole map: a window of the map's size
        otherwise        unchanged (elementwise, normalisation, linear on features)
    """
    if len(x_shape) == 4 and len(y_shape) == 4 and isinstance(m, AdaptiveAvgPool2d):
        # windows [floor(j*i/o), ceil((j+1)*i/o)): the widest, and the mean step i/o
        k = tuple(max(-(-(j + 1) * i // o) - j * i // o for j in range(o)) for i, o in zip(x_shape[2:], y_shape[2:]))
        s = tuple(i // o if i % o == 0 else i / o for i, o in zip(x_shape[2:], y_shape[2:]))
        p, d = (0, 0), (1, 1)
    elif len(x_shape) == 4 and len(y_shape) == 4 and _window(m) is not None:
        k, s, p, d = _window(m)
        if isinstance(m, ConvTranspose2d):
            jump = tuple(j / si for j, si in zip(f.jump, s))
            taps = tuple(math.ceil((di * (ki - 1) + 1) / si) for ki, si, di in zip(k, s, d))
            return _Field(tuple(r + (t - 1) * j for r, t, j in zip(f.size, taps, f.jump)), jump, f.start)
    elif len(x_shape) == 4 and len(y_shape) < 4:
        k, s, p, d = tuple(x_shape[2:]), tuple(x_shape[2:]), (0, 0), (1, 1)
    else:
        return f
    ke = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
    return _Field(tuple(r + (e - 1) * j for r, e, j in zip(f.size, ke, f.jump)),
                  tuple(j * si for j, si in zip(f.jump, s)),
                  tuple(st + ((e - 1) / 2 - pi) * j for st, e, pi, j in zip(f.start, ke, p, f.jump)))


def _effective_size(m: Module, name: str, p) -> int:
    """Entries of parameter ``name`` that take part: a weight masked by a ``weight_mask`` buffer
    counts only its unmasked taps (ConnectionTableConv2d)."""
    mask = m._buffers.get("weight_mask") if name == "weight" else None
    return p.size if mask is None else int(np.count_nonzero(np.broadcast_to(mask.numpy() != 0, p.shape)))


def _own_parameters(m: Module) -> tuple[int, int]:
    """(trainable, all) parameters the module owns itself, masked weights excluded."""
    sizes = [(_effective_size(m, k, p), p.requires_grad) for k, p in m._parameters.items() if p is not None]
    return sum(n for n, t in sizes if t), sum(n for n, _ in sizes)


def _costs(m: Module, x_shape: tuple, y_shape: tuple) -> tuple[int, int]:
    """(multiply-adds, connections) of one call, for the whole batch.

        conv             MACs = taps * C_out * oh * ow       taps = K*K*C_in/g (unmasked ones only)
                         connections = (taps + 1 for a bias) per output, summed over outputs
        conv transpose   MACs = C_out/g * K*K per input pixel and channel; connections = MACs
                         (+ 1 per output for a bias)
        linear           MACs = in * out per row; connections = (in + 1 for a bias) * out per row
        subsampling      MACs = 1 per output (coefficient x window sum)
                         connections = (K*K + 1) per output
        pooling          MACs 0; connections = K*K per output (no weights, no bias)
        everything else  0 and 0 (elementwise maps, normalisation, reshapes)
    """
    outputs = int(np.prod(y_shape))
    has_bias = getattr(m, "bias", None) is not None
    if isinstance(m, Linear):
        return m.in_features * outputs, (m.in_features + has_bias) * outputs
    win = _window(m) if len(y_shape) == 4 else None
    if win is None:
        return 0, 0
    (kh, kw), c_out = win[0], y_shape[1]
    weight = m._parameters.get("weight")
    if weight is not None and weight.ndim == 4:
        taps = _effective_size(m, "weight", weight)          # over all output channels
        if isinstance(m, ConvTranspose2d):
            macs = taps * int(np.prod(x_shape)) // x_shape[1]
            return macs, macs + has_bias * outputs
        per_output = taps / c_out
        return int(round(per_output * outputs)), int(round((per_output + has_bias) * outputs))
    if weight is not None:  # subsampling: one coefficient and one bias per channel
        return outputs, (kh * kw + has_bias) * outputs
    return 0, kh * kw * outputs


def _field_of(t: Tensor, fields: dict, memo: dict):
    """The field of a tensor: recorded by a wrapped module, or else (a tensor made by a bare op
    such as ``out + identity`` or ``cat``) the merge of its parents' fields, found through the
    autograd graph. Parameters have no field."""
    key = id(t)
    if key in fields:
        return fields[key][1]
    if key in memo:
        return memo[key][1]
    out = None
    if t._ctx is not None:
        for parent in t._ctx.parents:
            f = _field_of(parent, fields, memo)
            if f is not None:
                out = f if out is None else out.merge(f)
    memo[key] = (t, out)  # the tensor is kept so that its id is not reused
    return out


def _fmt_pair(v):
    if v[0] == v[1]:
        v = v[:1]
    return "x".join(f"{x:g}" for x in v)


def summary(model: Module, input_shape, dtype=np.float32, *, verbose: bool = True):
    """Run ``model`` on zeros and tabulate every layer; print the table (unless ``verbose`` is
    False) and return ``(rows, totals)``.

    ``input_shape`` is (C, H, W) (a batch of one is added) or a full (N, C, H, W); other ranks
    are taken likewise, a batch of one added unless the shape is 4-D. ``dtype`` must match the
    model's parameters.

    Each row is a dict:
        name, type       dotted module name (as in ``named_modules``) and class name
        output_shape     the output's shape, batch included
        params           trainable parameters the module owns (a ConnectionTableConv2d's masked
                         weights are not parameters); counted on the module's first call only
        macs             multiply-adds of the call. conv: K*K*(C_in/g)*C_out*oh*ow per sample
                         (bias excluded); linear: in*out; subsampling: one per output;
                         pooling, activations, normalisation: 0
        connections      (weight taps + 1 for a bias) feeding each output, summed over outputs:
                         C1 of LeNet-5 (25+1)*6*28*28 = 122,304. Pooling: K*K per output.
                         Elementwise layers: 0
        rf, rf_jump      receptive field size and the jump (input pixels between neighbouring
                         output positions), per dimension (h, w), through kernel, stride and
                         dilation (padding moves the window, not its size: ``rf_start``, the
                         centre of position 0's window). Residual sums and concatenations take
                         the larger field. A 4-D to 2-D layer (flatten) covers the whole map.
    MACs and connections count the whole batch of the forward pass. ``totals`` has
    ``params`` (all parameters of the model, masked weights excluded, run or not), ``trainable_params``,
    ``macs``, ``connections`` (sums over rows), ``input_shape`` and ``output_shape``.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 4:
        shape = (1,) + shape
    params = list(model.parameters())
    device = params[0].device if params else "cpu"
    x = Tensor(np.zeros(shape, dtype), requires_grad=True, device=device)  # grad: the graph links merges

    rows, fields, counted = [], {id(x): (x, _INPUT_FIELD)}, set()
    memo: dict = {}

    def wrap(name, m):
        inner = m.forward  # the bound method of the class

        def forward(*args, **kwargs):
            y = inner(*args, **kwargs)
            first = next((a for a in args if isinstance(a, Tensor)), None)
            out = y[0] if isinstance(y, tuple) else y
            if not isinstance(out, Tensor):
                return y
            f_in = _field_of(first, fields, memo) if first is not None else None
            f_in = _INPUT_FIELD if f_in is None else f_in
            x_shape = first.shape if first is not None else ()
            f_out = _field_after(m, f_in, x_shape, out.shape)
            fields[id(out)] = (out, f_out)
            trainable = 0
            if id(m) not in counted:
                counted.add(id(m))
                trainable = _own_parameters(m)[0]
            macs, conns = _costs(m, x_shape, out.shape)
            rows.append(dict(name=name, type=type(m).__name__, output_shape=out.shape, params=trainable,
                             macs=macs, connections=conns, rf=f_out.size, rf_jump=f_out.jump,
                             rf_start=f_out.start))
            return y
        return forward

    modes = [(m, m.training) for m in model.modules()]
    wrapped, grad_enabled = [], _autograd.is_grad_enabled()
    try:
        model.eval()
        _autograd.set_grad_enabled(True)  # even under no_grad(): the graph is how merges are traced
        for name, m in model.named_modules():
            if next(m.children(), None) is None or any(p is not None for p in m._parameters.values()):
                object.__setattr__(m, "forward", wrap(name or type(m).__name__, m))  # an instance attribute
                wrapped.append(m)
        y = model(x)
    finally:
        _autograd.set_grad_enabled(grad_enabled)
        for m in wrapped:
            m.__dict__.pop("forward", None)
        for m, mode in modes:
            object.__setattr__(m, "training", mode)
    y = y[0] if isinstance(y, tuple) else y

    sizes = {}  # id(parameter) -> (entries, trainable): a tied parameter counts once
    for m in model.modules():
        for k, p in m._parameters.items():
            if p is not None:
                sizes.setdefault(id(p), (_effective_size(m, k, p), p.requires_grad))
    totals = dict(params=sum(n for n, _ in sizes.values()), trainable_params=sum(n for n, t in sizes.values() if t), macs=sum(r["macs"] for r in rows),
                  connections=sum(r["connections"] for r in rows), input_shape=shape, output_shape=y.shape)
    if verbose:
        print(format_summary(rows, totals))
    return rows, totals


def format_summary(rows, totals) -> str:
    """The table ``summary`` prints."""
    head = ("Layer (type)", "Output shape", "Params", "MACs", "Connections", "RF", "Jump")
    body = [(f"{r['name']} ({r['type']})", str(tuple(r["output_shape"])), f"{r['params']:,}", f"{r['macs']:,}",
             f"{r['connections']:,}", _fmt_pair(r["rf"]), _fmt_pair(r["rf_jump"])) for r in rows]
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]

    def fmt(line):
        return "  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(line, widths)))

    rule = "-" * len(fmt(head))
    lines = [rule, fmt(head), rule] + [fmt(line) for line in body] + [rule]
    lines += [f"Input shape: {tuple(totals['input_shape'])}   Output shape: {tuple(totals['output_shape'])}",
              f"Total params: {totals['params']:,}   Trainable params: {totals['trainable_params']:,}",
              f"Total MACs: {totals['macs']:,}   Total connections: {totals['connections']:,}", rule]
    return "\n".join(lines)


__all__ = ["summary", "format_summary"]
