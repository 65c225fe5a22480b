"""Benchmark shapes, and the one-pass callables that the pytest benchmarks and report.py both time.

Each conv shape is one conv2d layer (``transposed``: one conv_transpose2d layer). Its three
passes go straight to the kernel launchers, without Tensors or autograd:

    pass  conv2d layer                       conv_transpose2d layer (conv.py, "Dualities")
    fwd   K.forward(x, w)                    K.backward_input(x, w)
    gx    K.backward_input(gy, w)            K.forward(gy, w)
    gw    K.backward_weight(x, gy)           K.backward_weight(gy, x)

and through PyTorch as F.conv2d / F.conv_transpose2d for fwd and
``aten.convolution_backward`` with one output_mask entry set for gx and for gw, so that each
side computes exactly one gradient.

FLOPs = 2 * MACs, the same count for all three passes (each is the same contraction):
MACs = N * C_out * OH * OW * (C_in/g) * kH * kW for conv2d; for the transposed layer the
names swap sides, N * C_in * H * W * (C_out/g) * kH * kW.

Layouts as in the package: x (N, C, H, W), gy (N, C_out, OH, OW), w (C_out, C_in/g, k, k)
for conv2d and (C_in, C_out/g, k, k) for conv_transpose2d. All arrays are float32.
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

# PyTorch is optional: without it the numba side runs alone.
try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # the numba side runs alone
    torch = None

import numba
import numpy as np

from cnn_numba.kernels import pool as P
from cnn_numba.kernels.conv_algos import TABLE
from cnn_numba.shapes import (conv2d_geom, conv_output_size, conv_transpose2d_geom, conv_transpose_output_size,
                              pool_output_size)
from cnn_numba.sysinfo import kernel_blas_core

CONV_PASSES = ("fwd", "gx", "gw")
POOL_PASSES = ("fwd", "bwd")
ALGOS = TABLE.names  # the conv algorithms (kernels/conv_algos.py; CUDA's table has the same names)


def match_threads() -> int:
    """Give PyTorch as many threads as Numba's parallel loops use; returns that count. (Read
    from the configuration: get_num_threads would start Numba's thread pool, whose idle
    workers should not be running while PyTorch is timed.)"""
    n = numba.config.NUMBA_NUM_THREADS
    if torch is not None:
        torch.set_num_threads(n)
    return n


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ConvShape:
    name: str
    n: int
    c: int        # the layer's input channels
    h: int
    w: int
    co: int       # the layer's output channels
    k: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1
    transposed: bool = False

    @property
    def out_hw(self) -> tuple[int, int]:
        k, s, p, d = self.k, self.stride, self.pad, self.dilation
        if self.transposed:
            return tuple(conv_transpose_output_size(i, k, s, p, d, 0) for i in (self.h, self.w))
        return tuple(conv_output_size(i, k, s, p, p, d) for i in (self.h, self.w))

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        if self.transposed:
            return (self.c, self.co // self.groups, self.k, self.k)
        return (self.co, self.c // self.groups, self.k, self.k)

    @property
    def macs(self) -> int:
        kk = self.k * self.k
        if self.transposed:
            return self.n * self.c * self.h * self.w * (self.co // self.groups) * kk
        oh, ow = self.out_hw
        return self.n * self.co * oh * ow * (self.c // self.groups) * kk

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def geom(self):
        """The layer's ConvGeom: for a transposed layer, that of the conv2d whose adjoint it is."""
        s, p, d, g = self.stride, self.pad, self.dilation, self.groups
        x, w = (self.n, self.c, self.h, self.w), self.weight_shape
        if self.transposed:
            return conv_transpose2d_geom(x, w, s, p, 0, g, d)
        return conv2d_geom(x, w, s, p, d, g)

    def auto_algo(self, pass_: str) -> str:
        """What algo='auto' picks for one pass on the CPU: asked of the conv2d pass that it is
        (for a transposed layer, fwd is conv2d's input-gradient and gx its forward)."""
        return TABLE.policy(self.geom, self.conv_pass(pass_))

    def conv_pass(self, pass_: str) -> str:
        """The conv2d pass (a name of conv_algos.PASSES) that ``pass_`` of this layer runs."""
        conv_pass = {"fwd": "forward", "gx": "backward_input", "gw": "backward_weight"}[pass_]
        if self.transposed and pass_ != "gw":
            conv_pass = "forward" if pass_ == "gx" else "backward_input"
        return conv_pass

    def runs(self, algo: str, pass_: str) -> bool:
        """Whether ``algo`` runs ``pass_`` itself, rather than giving way to another entry."""
        return TABLE.pick(algo, self.geom, self.conv_pass(pass_)).name == algo

    def describe(self) -> str:
        oh, ow = self.out_hw
        parts = [f"k{self.k}", f"s{self.stride}", f"p{self.pad}"]
        if self.dilation != 1:
            parts.append(f"d{self.dilation}")
        if self.groups != 1:
            parts.append(f"g{self.groups}")
        kind = "convT" if self.transposed else "conv"
        return (f"{kind} {self.n}x{self.c}x{self.h}x{self.w} -> {self.co}x{oh}x{ow}, "
                + " ".join(parts))


@dataclass(frozen=True)
class PoolShape:
    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    stride: int
    pad: int = 0

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(pool_output_size(i, self.k, self.stride, self.pad, 1, False) for i in (self.h, self.w))

    def describe(self) -> str:
        oh, ow = self.out_hw
        return f"max_pool {self.n}x{self.c}x{self.h}x{self.w} -> {oh}x{ow}, k{self.k} s{self.stride} p{self.pad}"


CONV_SHAPES = [
    #          name           N   C_in H   W   C_out k  s  p  d  g
    ConvShape("lenet_c1",    64,   1, 28, 28,   6, 5, 1, 2),
    ConvShape("lenet_c3",    64,   6, 14, 14,  16, 5, 1, 0),
    ConvShape("resnet_s1",   64,  16, 32, 32,  16, 3, 1, 1),
    ConvShape("resnet_s2",   64,  32, 16, 16,  32, 3, 1, 1),
    ConvShape("resnet_s3",   64,  64,  8,  8,  64, 3, 1, 1),
    ConvShape("resnet_down", 64,  16, 32, 32,  32, 3, 2, 1),
    ConvShape("big3x3",      32, 128, 28, 28, 128, 3, 1, 1),
    ConvShape("dilated",     32,  64, 32, 32,  64, 3, 1, 2, 2),
    ConvShape("grouped",     32,  64, 32, 32,  64, 3, 1, 1, 1, 8),
    ConvShape("depthwise",   32,  64, 32, 32,  64, 3, 1, 1, 1, 64),
    ConvShape("pointwise",   32,  64, 32, 32, 128, 1, 1, 0),
    ConvShape("transposed",  32,  64, 16, 16,  32, 4, 2, 1, transposed=True),
]

POOL_SHAPES = [
    PoolShape("pool_k2s2",   64, 64, 32, 32, 2, 2),
    PoolShape("pool_k3s2p1", 32, 64, 56, 56, 3, 2, 1),
]

CONV_BY_NAME = {s.name: s for s in CONV_SHAPES}
POOL_BY_NAME = {s.name: s for s in POOL_SHAPES}


# ----------------------------------------------------------------------------- data

def conv_arrays(shape: ConvShape, seed: int = 0) -> dict[str, np.ndarray]:
    """x, w, gy of the layer, float32, unit-variance entries (w scaled by 1/sqrt(fan-in))."""
    rng = np.random.default_rng(seed)
    wshape = shape.weight_shape
    fan_in = wshape[1] * wshape[2] * wshape[3]
    return {
        "x": rng.standard_normal((shape.n, shape.c, shape.h, shape.w), dtype=np.float32),
        "w": rng.standard_normal(wshape, dtype=np.float32) / np.float32(np.sqrt(fan_in)),
        "gy": rng.standard_normal((shape.n, shape.co) + shape.out_hw, dtype=np.float32),
    }


def pool_arrays(shape: PoolShape, seed: int = 0) -> dict[str, np.ndarray]:
    """x, gy, and the argmax indices of x (max-pool backward needs them as input)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.n, shape.c, shape.h, shape.w), dtype=np.float32)
    gy = rng.standard_normal((shape.n, shape.c) + shape.out_hw, dtype=np.float32)
    _, idx = P.max_pool2d(x, shape.out_hw, (shape.k,) * 2, (shape.stride,) * 2, (shape.pad,) * 2, (1, 1))
    return {"x": x, "gy": gy, "idx": idx}


# ----------------------------------------------------------------------------- one pass, numba

def numba_conv_pass(shape: ConvShape, pass_: str, algo: str, a: dict, device: str = "cpu"):
    """A zero-argument callable running one pass of ``shape`` through the launchers of
    ``device`` (the arrays in ``a`` must live there)."""
    from cnn_numba.backend import check_device, kernel

    check_device(device)
    fwd, bwd_in, bwd_w = (kernel(f"conv2d_{n}", device) for n in ("forward", "backward_input", "backward_weight"))
    geom, x, w, gy = shape.geom, a["x"], a["w"], a["gy"]
    if shape.transposed:  # the layer is conv2d's adjoint: x plays conv2d's gy, gy plays its x
        return {
            "fwd": lambda: bwd_in(x, w, geom, algo),
            "gx": lambda: fwd(gy, w, None, geom, algo),
            "gw": lambda: bwd_w(gy, x, geom, algo),
        }[pass_]
    return {
        "fwd": lambda: fwd(x, w, None, geom, algo),
        "gx": lambda: bwd_in(gy, w, geom, algo),
        "gw": lambda: bwd_w(x, gy, geom, algo),
    }[pass_]


def numba_pool_pass(shape: PoolShape, pass_: str, a: dict):
    k, s, p = (shape.k,) * 2, (shape.stride,) * 2, (shape.pad,) * 2
    x, gy, idx = a["x"], a["gy"], a["idx"]
    return {
        "fwd": lambda: P.max_pool2d(x, shape.out_hw, k, s, p, (1, 1))[0],
        "bwd": lambda: P.scatter(gy, idx, (shape.h, shape.w), True),
    }[pass_]


# ----------------------------------------------------------------------------- one pass, torch

def torch_conv_pass(shape: ConvShape, pass_: str, a: dict, device: str = "cpu"):
    """The same pass through PyTorch (None when torch is not installed), on ``device``."""
    if torch is None:
        return None
    x, w, gy = (torch.from_numpy(a[k]).to(device) for k in ("x", "w", "gy"))
    s, p, d, g = [shape.stride] * 2, [shape.pad] * 2, [shape.dilation] * 2, shape.groups
    if pass_ == "fwd":
        if shape.transposed:
            return lambda: TF.conv_transpose2d(x, w, None, s, p, 0, g, d)
        return lambda: TF.conv2d(x, w, None, s, p, d, g)
    mask = [pass_ == "gx", pass_ == "gw", False]
    out = 0 if pass_ == "gx" else 1
    bwd = torch.ops.aten.convolution_backward
    return lambda: bwd(gy, x, w, None, s, p, d, shape.transposed, [0, 0], g, mask)[out]


def torch_pool_pass(shape: PoolShape, pass_: str, a: dict):
    if torch is None:
        return None
    x, gy, idx = (torch.from_numpy(a[k]) for k in ("x", "gy", "idx"))
    k, s, p = [shape.k] * 2, [shape.stride] * 2, [shape.pad] * 2
    if pass_ == "fwd":
        return lambda: TF.max_pool2d(x, k, s, p, return_indices=True)[0]
    bwd = torch.ops.aten.max_pool2d_with_indices_backward
    return lambda: bwd(gy, x, k, s, p, [1, 1], False, idx)


def as_numpy(out) -> np.ndarray:
    if torch is not None and isinstance(out, torch.Tensor):
        return out.cpu().numpy()
    return out.copy_to_host() if hasattr(out, "copy_to_host") else np.asarray(out)


# ----------------------------------------------------------------------------- machine

def cpu_info() -> dict:
    """CPU model and the SIMD flags that matter to float32 kernels, from /proc/cpuinfo (Linux)."""
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "simd": simd}


def versions() -> dict:
    import cnn_numba
    import scipy

    return {"cnn_numba": getattr(cnn_numba, "__version__", "?"), "numba": numba.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__,
            "torch": torch.__version__ if torch is not None else None}


def machine_line() -> str:
    c, v = cpu_info(), versions()
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "not started"
    torch_part = f"torch {v['torch']} ({torch.get_num_threads()} threads)" if torch is not None else "no torch"
    return (f"{c['cores']} cores, {c['cpu']}, flags: {' '.join(c['simd']) or 'no avx2'}; "
            f"numba {v['numba']} ({numba.get_num_threads()} threads, {layer} layer), "
            f"numpy {v['numpy']}, scipy {v['scipy']} (OpenBLAS kernels: {kernel_blas_core()}), {torch_part}")


ORDINALS = ("", "-second", "-third", "-fourth", "-fifth", "-sixth", "-seventh", "-eighth", "-ninth", "-tenth")


def new_record(folder: Path, kind: str) -> Path:
    """``folder/<kind>-<today>.md``, or the first of ``-second``, ``-third``, ... not taken:
    a run never overwrites an earlier record of the day."""
    today = datetime.date.today().isoformat()
    for ordinal in ORDINALS:
        path = folder / f"{kind}-{today}{ordinal}.md"
        if not path.exists():
            return path
    n = len(ORDINALS) + 1
    while (folder / f"{kind}-{today}-{n}.md").exists():
        n += 1
    return folder / f"{kind}-{today}-{n}.md"


def commit() -> str:
    """The checked-out commit, for reports (``$CNN_NUMBA_COMMIT`` where the tree is a copy
    without .git, as on a lent GPU machine)."""
    if os.environ.get("CNN_NUMBA_COMMIT"):
        return os.environ["CNN_NUMBA_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent)
    return done.stdout.strip() or "unknown"
