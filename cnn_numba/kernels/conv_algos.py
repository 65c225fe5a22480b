"""conv2d's algorithm tables: which algorithms a device has, and which one runs.

A table lists ``ConvAlgo`` entries, each a name and its launchers for the three passes,

    forward          (x, w, b, y, geom)    y  = conv2d(x, w) + b
    backward_input   (gy, w, gx, geom)     gx = its input-gradient; conv_transpose2d's forward
    backward_weight  (x, gy, gw, geom)     gw = its weight-gradient

with ``geom`` the layer's ``shapes.ConvGeom`` and every output allocated by the caller and
written (=) by the launcher. The forward launchers (the CPU's and CUDA's) also take
``epilogue=(ep, relu)``, applied as each output is stored (kernels/conv.py,
kernels/cuda/conv.py): y = relu(batch_norm_eval(conv + b)) in one pass;
``ConvTable.run(..., epilogue=...)`` passes it on (each device's ``conv2d_epilogue``, the
CPU's at the end of this module, builds it). ``supports(geom, pass_)`` says where an entry can run; a
``special`` entry (the flat direct kernels, the stride-1 im2col ones) runs instead of its
parent wherever it supports the pass. ``algo="auto"`` is the table's ``policy``, a rule from the geometry to a name,
unless the table has a ``tuner`` (the CPU's, kernels/autotune.py, off with
``CNN_NUMBA_AUTOTUNE=0``) with a timed choice for the geometry, dtype and pass.
An explicitly named algorithm that does not support a pass gives way to the first entry in
table order that does (on CUDA, direct's shared-memory tiles to im2col), and so does a name
that another device's table has and this one lacks (the CPU's 'winograd' on CUDA): one
``algo`` serves a model on any device. The names every device knows are ``ConvTable.known``.

Every device's registered launchers (``conv2d_forward`` ... at the end of this module for
the CPU, kernels/cuda/conv.py for CUDA) go through ``ConvTable.pick``, and functional.py,
the tests and the benchmarks read the names from the tables, so an unknown name is the
same ValueError everywhere (listing the names known on any device), raised before any
kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backend import register
from . import conv as C
from . import conv_blocked as BL
from . import conv_stride1 as S
from . import conv_winograd as WG
from .autotune import Tuner
from .nn import batch_norm_epilogue

PASSES = ("forward", "backward_input", "backward_weight")


def _everywhere(geom, pass_) -> bool:
    return True


def _always() -> bool:
    return True


@dataclass(frozen=True)
class ConvAlgo:
    """One algorithm: its launchers per pass (see the module docstring), where it runs, and
    an optional specialisation tried first."""
    name: str
    forward: Callable | None
    backward_input: Callable | None
    backward_weight: Callable | None
    supports: Callable = _everywhere
    special: ConvAlgo | None = None
    tuned: Callable = _always  # () -> whether the autotuner (kernels/autotune.py) times it

    def run(self, pass_: str, geom, *arrays, **epilogue) -> None:
        """Pass ``pass_`` on ``arrays`` (inputs, then the output), by the specialisation where
        it supports the geometry; ``epilogue=`` (the forward's, when given) is passed on."""
        algo = self.special if self.special is not None and self.special.supports(geom, pass_) else self
        getattr(algo, pass_)(*arrays, geom, **epilogue)


class ConvTable:
    """A device's algorithms, in order of fallback, and its 'auto' policy.

    To add an algorithm: write its module (kernels, then launchers with the signatures in
    this module's docstring, and a ``supports(geom, pass_)`` if it does not cover every
    geometry), and add one ``ConvAlgo`` to the device's table. functional.py, the tests and
    the benchmarks pick its name up from the table; 'auto' chooses it once the policy names
    it. Every table's names join ``known``, the names any device accepts."""

    known: dict = {}  # every table's names, in order of creation (a dict as an ordered set)

    def __init__(self, algos, policy: Callable, tuner=None):
        self.algos = tuple(algos)
        self.by_name = {a.name: a for a in self.algos}
        self.names = tuple(self.by_name)
        ConvTable.known.update(dict.fromkeys(self.names))
        self.policy = policy  # (geom, pass_) -> the name 'auto' runs
        self.tuner = tuner    # None, or .choose(table, geom, pass_, arrays) -> a name or None
        self._picked: dict = {}

    def check(self, algo) -> None:
        """ValueError naming ``algo``, its value and the valid names (any device's), unless
        ``algo`` is one."""
        if not isinstance(algo, str) or (algo != "auto" and algo not in ConvTable.known):
            raise ValueError(f"algo must be one of {('auto',) + tuple(ConvTable.known)}, got {algo!r}")

    def pick(self, algo: str, geom, pass_: str) -> ConvAlgo:
        """The entry that runs ``pass_`` of ``geom`` for ``algo`` (a name or 'auto'),
        remembered per (algo, geom, pass_): the rule and ``supports`` are pure functions of
        the geometry, and a layer asks again at every call."""
        self.check(algo)
        key = (algo, geom, pass_)
        entry = self._picked.get(key)
        if entry is None:
            entry = self.by_name.get(self.policy(geom, pass_) if algo == "auto" else algo)
            if entry is None or not entry.supports(geom, pass_):
                entry = next(a for a in self.algos if a.supports(geom, pass_))
            if len(self._picked) >= 4096:  # a bound for programs that sweep shapes
                self._picked.clear()
            self._picked[key] = entry
        return entry

    def run(self, algo: str, pass_: str, geom, *arrays, **epilogue):
        """``pass_`` of ``geom`` by ``algo`` on ``arrays`` (inputs, then the output, which it
        returns); nothing runs for an empty batch. 'auto' runs the tuner's choice where
        it has one (its first call for a shape times every algorithm on ``arrays``, without
        the ``epilogue=`` keyword, which the chosen one then runs with)."""
        if algo == "auto" and self.tuner is not None:
            algo = self.tuner.choose(self, geom, pass_, arrays) or algo
        entry = self.pick(algo, geom, pass_)
        if geom.n:
            entry.run(pass_, geom, *arrays, **epilogue)
        return arrays[-1]


# ----------------------------------------------------------------------------- the CPU table

FLAT = ConvAlgo("direct, flat", S.forward_flat, S.backward_input_flat, S.backward_weight_flat,
                supports=S.supports_flat)
SHIFTED = ConvAlgo("im2col, stride 1", S.forward_shifted, S.backward_input_shifted, S.backward_weight_shifted,
                   supports=S.supports_shifted)

# 'auto' runs the stride-1 direct kernels on output planes of at least this many pixels
# whatever the width, and on smaller planes for layers up to this many inputs per output
# (a small plane with a long K is one good BLAS product). Measured 2026-12-01 (TABLE.run per
# pass, interleaved, direct ms / im2col ms, fwd gx gw): 128->128 28x28 b32 (K = 1152)
# 25.0/33.8 25.1/47.9 22.2/33.8; 64->64 7x7 b128 2.09/3.58 2.15/3.10 2.08/3.11 and b16
# 0.49/0.46 0.38/0.38 0.37/0.43; 256->256 8x8 b32 (K = 2304) 17.9/13.7 18.2/10.4 10.5/12.5.
FLAT_MIN_PLANE = 100
FLAT_MAX_K = 576
# At stride > 1 im2col's unfolding gathers every other pixel and its col2im scatters them
# back, while the flat kernels' polyphase planes keep the stride-1 inner loops, so 'auto'
# runs them where the kernel has at least TAPS taps. Measured (2026-12-01, 2 shared
# cores, float32, batch 64 (32 for 128->256 and the transposed layer), TABLE.run per pass,
# the two algorithms interleaved, fastest of 7; im2col time / direct time, fwd gx gw):
#   resnet_down 16->32 32x32 k3 s2                 1.95 1.89 1.88
#   ResNet-20's 32->64 16x16 k3 s2                 1.36 1.49 1.55
#   128->256 16x16 k3 s2 (K = 1152)                1.14 1.32 1.10
#   64->128 8x8 k3 s2 (a 4x4 output)               0.96 1.03 1.16
#   3->16 32x32 k3 s2                              1.72 1.29 1.93
#   depthwise 32 ch 28x28 k3 s2                    1.54 1.78 1.61
#   transposed 64->32 16x16 k4 s2 (fwd = gx here)  1.40 1.69 1.98
# The 1x1 stride-2 shortcuts (16->32 32x32, 32->64 16x16) stay im2col: 0.46-0.80 (the
# flat kernels load four phase planes to read one; im2col's columns are one BLAS product).
# And they want output planes of at least this many pixels: a 7x7
# output (32->64 14x14 k3 s2, resnet8's third stage) at b16 took 0.43/0.24 0.38/0.23
# 0.35/0.25 ms direct/im2col, at b128 1.68/1.79 1.62/1.93 1.44/1.90; a 4x4 one (64->128
# 8x8 s2, b64) 1.32/0.99 1.36/1.04 1.03/1.02.
STRIDED_MIN_PLANE = 64
# Winograd (3x3, stride 1) where both the input and output channels per group number at
# least this (and CNN_NUMBA_WINOGRAD is not 0): its products are then BLAS-sized. Measured
# 2026-12-01 (ms fwd/gx/gw, winograd against direct), AVX-512 OpenBLAS: 64->64 8x8 b64
# 0.92/0.96/0.77 against 1.05/1.09/1.13, 128->128 28x28 b32 12.0-15.5/15.0/12.9 against
# 21.0/20.4/21.5, 64->64 7x7 b128 1.62/1.63/1.48 against 2.71/2.83/2.47, 4x4 b64
# 0.37/0.31/0.34 against 0.64/0.51/0.47, 256->256 8x8 b32 6.1/7.2/9.8 against 8.5/9.1/10.7;
# but 32->32 16x16 b64 1.14/1.17/0.94 against 0.97/1.01/0.98 and 16->16 32x32 2.0/2.0/3.2
# against 1.0/1.3/1.4. With the AVX2 kernels (OPENBLAS_CORETYPE=Haswell) 64->64 8x8
# 1.07/1.10/1.05 against 1.05/1.07/1.24, 128->128 20.0/21.4/19.0 against 25.5/26.3/23.7.
WINOGRAD_MIN_CHANNELS = 64


def auto_algo(geom, pass_: str) -> str:
    """The CPU's 'auto' for ``pass_`` of ``geom``. Winograd where it runs, is enabled and the
    layer has at least WINOGRAD_MIN_CHANNELS input and output channels per group. Direct when each output reads fewer than
    16 inputs (depthwise). At stride 1 direct when the flat kernels pay: planes big enough or
    a layer narrow enough, at least TAPS taps (a 1x1 kernel would pad its one tap to three),
    and for the input-gradient, whose flat pass computes the C_in/G input channels four at a
    time, at least 8 of them; at stride > 1 direct where the kernel has TAPS taps, the
    output planes are at least STRIDED_MIN_PLANE and the flat kernels can run. im2col
    otherwise, and at stride 1 wherever the flat kernels cannot run (planes over the
    scratch bound). (Measured per shape and pass in
    bench/results/cpu-*.md, and for stride > 1 above.)"""
    k = geom.cig * geom.kh * geom.kw
    stride1 = geom.stride == (1, 1)
    if min(geom.cig, geom.cog) >= WINOGRAD_MIN_CHANNELS and WG.enabled() and WG.supports(geom, pass_):
        return "winograd"
    if stride1:
        flat = (geom.kh * geom.kw >= S.TAPS and (geom.oh * geom.ow >= FLAT_MIN_PLANE or k <= FLAT_MAX_K)
                and (pass_ != "backward_input" or geom.cig >= 2 * S.QUAD))
    else:
        flat = (geom.kh * geom.kw >= S.TAPS and geom.oh * geom.ow >= STRIDED_MIN_PLANE
                and FLAT.supports(geom, pass_))
    if k >= 16 and not flat:
        return "im2col"
    return "im2col" if stride1 and not FLAT.supports(geom, pass_) else "direct"


TABLE = ConvTable([
    ConvAlgo("direct", C.forward_direct, C.backward_input_direct, C.backward_weight_direct, special=FLAT),
    ConvAlgo("im2col", C.forward_im2col, C.backward_input_im2col, C.backward_weight_im2col, special=SHIFTED),
    ConvAlgo("winograd", WG.forward, WG.backward_input, WG.backward_weight, supports=WG.supports,
             tuned=WG.enabled),
    ConvAlgo("blocked", BL.forward, BL.backward_input, None, supports=BL.supports, tuned=BL.tuned),
], auto_algo, tuner=Tuner())

register("conv2d_algorithms", "cpu")(lambda: TABLE)


# ----------------------------------------------------------------------------- launchers

@register("conv2d_forward", "cpu")
def forward(x, w, b, geom, algo, epilogue=None):
    """y (N, CO, OH, OW) = conv2d(x, w) + b (b may be None); with ``epilogue=(ep, relu)``,
    relu((y - ep[0]) * ep[1] + ep[2]) per channel as it is stored (kernels/conv.py)."""
    b = np.zeros(geom.co, x.dtype) if b is None else b
    kw = {} if epilogue is None else {"epilogue": epilogue}
    return TABLE.run(algo, "forward", geom, x, w, b, np.empty(geom.y_shape, x.dtype), **kw)


@register("conv2d_epilogue", "cpu")
def epilogue(dtype, bn=None, relu=False):
    """``forward``'s ``epilogue=(ep, relu)``: ep (3, CO) the rows (mean, scale, shift) of
    eval-mode batch_norm from ``bn = (running_mean, running_var, weight, bias, eps)``
    (weight and bias arrays or None), computed as kernels/nn.py's batch_norm_forward does:
    scale = invstd * weight in ``dtype``, its kernel's ``invstd[ch] * w[ch]``; (3, 0) without
    ``bn``."""
    if bn is None:
        return C.no_epilogue(dtype)[0], bool(relu)
    return batch_norm_epilogue(*bn, dtype), bool(relu)


@register("conv2d_backward_input", "cpu")
def backward_input(gy, w, geom, algo):
    """gx (N, C, H, W) from gy (N, CO, OH, OW); also conv_transpose2d's forward."""
    return TABLE.run(algo, "backward_input", geom, gy, w, np.empty(geom.x_shape, gy.dtype))


@register("conv2d_backward_weight", "cpu")
def backward_weight(x, gy, geom, algo):
    """gw (CO, C/G, KH, KW); also conv_transpose2d's weight-gradient with x and gy swapped.
    Zeros for an empty batch."""
    return TABLE.run(algo, "backward_weight", geom, x, gy, np.zeros(geom.w_shape, x.dtype))
