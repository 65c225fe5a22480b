"""Lean kernel launches on a GPU: each kernel's compiled overload resolved once per signature,
its arguments packed without re-typing them (issue 11, item 3).

A numba-cuda launch ``kernel[grid, block](*args)`` types every argument, looks the overload
up, wraps each array in an argument hint, builds a launch configuration and then packs the
arguments: tens of microseconds of Python per launch, and a training step is a few hundred
launches. Here the first launch of a signature goes through Numba (it compiles and loads the
kernel), and leaves a ``Plan``: the loaded function and one packer per argument, made from
the overload's own argument types. Later launches of that signature key on the arguments'
cached Numba types, pack, and call cuda.core's ``launch`` with a launch configuration
cached per (grid, block).

A plan's packing is checked once against Numba's own (``_Kernel._prepare_args``) on the
launch that makes it; if they differ (a numba-cuda whose argument layout changed) that
signature stays on Numba's path, with one warning. ``CNN_NUMBA_LEAN_LAUNCH=0`` turns the
whole path off. tests/cuda_typecheck.py checks ``pack`` against Numba for every signature
the test suite launches, without a GPU.
"""
from __future__ import annotations

import ctypes
import os
import warnings

import numpy as np
from numba.core import types
from numba.np import numpy_support

ENABLED = os.environ.get("CNN_NUMBA_LEAN_LAUNCH", "1") != "0"

_MISSING = object()
_plans: dict = {}     # (kernel, argument keys...) -> Plan, or None: Numba's path for that signature
_configs: dict = {}   # (grid, block) -> cuda.core LaunchConfig
_core = None          # (cuda.core's launch, the default stream as it takes it), bound on first use


_SCALARS = frozenset({int, float, bool, np.float32, np.float64, np.int64, np.int32, np.uint32, np.uint64,
                      np.bool_})


def arg_key(a):
    """What decides an argument's Numba type, cheaply: a scalar's Python type, a tuple's
    element keys, a device array's own cached Numba type."""
    t = type(a)
    if t in _SCALARS:
        return t
    if t is tuple:
        return tuple(map(arg_key, a))
    return a._numba_type_


def _array(out, a) -> None:
    """An array argument as Numba lays it out: meminfo, parent, size, itemsize, data, shape, strides."""
    s = a._strided_memory_view_shim
    out += (0, 0, s.size, s.dtype.itemsize, s.ptr)
    out += s.shape
    layout = s._layout
    out += layout.strides_in_bytes or numpy_support.strides_from_shape(
        shape=s.shape, itemsize=s.dtype.itemsize, c_contiguous=layout.is_contiguous_c,
        f_contiguous=layout.is_contiguous_f)


def packer(ty):
    """``pack(out, value)`` appending one argument of Numba type ``ty`` to the launch's list."""
    if isinstance(ty, types.Array):
        return _array
    if isinstance(ty, types.BaseTuple):
        parts = [packer(t) for t in ty]

        def tuple_(out, value):
            for p, v in zip(parts, value):
                p(out, v)
        return tuple_
    if ty == types.boolean:
        return lambda out, v: out.append(v)
    if ty == types.float32:
        return lambda out, v: out.append(ctypes.c_float(v))
    if ty == types.float64:
        return lambda out, v: out.append(ctypes.c_double(v))
    if isinstance(ty, types.Integer):
        c = getattr(ctypes, f"c_{ty}")
        return lambda out, v: out.append(c(v))
    raise NotImplementedError(f"no lean packing for a {ty} argument")


def pack_all(packers, args) -> list:
    out = []
    for p, a in zip(packers, args):
        p(out, a)
    return out


def same_packing(ours: list, numbas: list) -> bool:
    """Equal argument lists (ctypes scalars compared by type and value)."""
    def norm(v):
        return (type(v), v.value) if isinstance(v, ctypes._SimpleCData) else (type(v), v)
    return len(ours) == len(numbas) and all(norm(a) == norm(b) for a, b in zip(ours, numbas))


class Plan:
    __slots__ = ("function", "packers")

    def __init__(self, function, packers):
        self.function, self.packers = function, packers


def _make_plan(kernel, args):
    """After Numba's own launch of ``args``: the plan for their signature, or None."""
    argtypes = tuple(kernel.typeof_pyval(a) for a in args)
    overload = kernel.overloads.get(argtypes)
    if overload is None or overload.debug or overload.cooperative or overload.extensions:
        return None
    try:
        packers = [packer(t) for t in overload.argument_types]
        ours = pack_all(packers, args)
        numbas = []
        for t, v in zip(overload.argument_types, args):
            overload._prepare_args(t, v, 0, [], numbas)
    except NotImplementedError:
        return None
    if not same_packing(ours, numbas):
        warnings.warn(f"cnn_numba: kernel {kernel.py_func.__name__} packs its arguments unlike this numba-cuda; "
                      "it keeps Numba's own launch", RuntimeWarning, stacklevel=3)
        return None
    return Plan(overload._codelibrary.get_cufunc().kernel, packers)


def launch(kernel, grid, block, args) -> None:
    """``kernel[grid, block](*args)`` on the default stream, through a plan when there is one."""
    global _core
    key = (kernel, *map(arg_key, args))
    plan = _plans.get(key, _MISSING)
    if plan is None:
        kernel[grid, block](*args)
        return
    if plan is _MISSING:
        kernel[grid, block](*args)  # compiles and loads; its packing is the reference
        try:
            _plans[key] = _make_plan(kernel, args)
        except Exception as e:  # noqa: BLE001  (a numba-cuda whose internals moved: its own path)
            _plans[key] = None
            warnings.warn(f"cnn_numba: no lean launch for kernel {kernel.py_func.__name__} ({type(e).__name__}: "
                          f"{e}); it keeps Numba's own launch", RuntimeWarning, stacklevel=2)
        return
    config = _configs.get((grid, block))
    if config is None:
        from cuda.core import LaunchConfig, launch as core_launch
        from numba.cuda.cudadrv import driver
        _core = _core or (core_launch, driver._to_core_stream(0))
        config = _configs[grid, block] = LaunchConfig(grid=grid, block=block, shmem_size=0)
    _core[0](_core[1], config, plan.function, *pack_all(plan.packers, args))
