"""Compile CUDA kernel signatures as a real GPU's first launch would, without a GPU.

    python tests/cuda_typecheck.py LAUNCHED.json

Numba's CUDA simulator runs a kernel as plain Python, one thread after another, so it
never types the kernel: a branch that is dead for the arguments at hand (say, indexing a
placeholder array that is never read) passes there and fails the real compile. This
script types and lowers each signature with numba-cuda's compiler, stopping before PTX, so
it needs neither a GPU nor NVVM; and it packs an example of each signature's arguments the
way cnn_numba's lean launches do (kernels/cuda/lean.py) and the way numba-cuda does, and
fails where the two differ. LAUNCHED.json holds ``[module, kernel name, argument
descriptors]`` entries as tests/conftest.py records them under the simulator (``describe``).

Prints one block per failing signature and exits 1 if any failed, 0 if all compiled, and 2
if this numba-cuda cannot compile without a driver (nothing could be checked).
"""
from __future__ import annotations

import ctypes
import importlib
import json
import sys
import types as pytypes

import numpy as np

CC = (9, 0)  # the compute capability compiled for: any will do for typing


def describe(arg):
    """A JSON-able descriptor of one kernel argument (simulator device arrays wrap a numpy array)."""
    arg = getattr(arg, "_ary", arg)
    if isinstance(arg, np.ndarray):
        layout = "C" if arg.flags.c_contiguous else ("F" if arg.flags.f_contiguous else "A")
        return ["array", arg.dtype.str, arg.ndim, layout]
    if isinstance(arg, tuple):
        return ["tuple", [describe(a) for a in arg]]
    return ["scalar", np.asarray(arg).dtype.str]


def numba_type(desc):
    from numba import types
    from numba.np.numpy_support import from_dtype

    kind = desc[0]
    if kind == "array":
        return types.Array(from_dtype(np.dtype(desc[1])), desc[2], desc[3])
    if kind == "tuple":
        return types.BaseTuple.from_types([numba_type(d) for d in desc[1]])
    return from_dtype(np.dtype(desc[1]))


def signature(descs):
    """The argument types, one per argument, as the dispatcher types a launch (it packs no
    ``*args``: a kernel with them fails here as on the GPU)."""
    return tuple(numba_type(d) for d in descs)


# NVVM's 64-bit data layout. Where NVVM is not installed (pip's numba-cuda comes without
# it), a stand-in answers the two things lowering asks NVVM (this layout, and the IR
# version it stamps on each module): the check stops at LLVM IR, which NVVM never sees.
NVVM_DATA_LAYOUT = ("e-p:64:64:64-i1:8:8-i8:8:8-i16:16:16-i32:32:32-i64:64:64-i128:128:128-f32:32:32-f64:64:64-"
                    "v16:16:16-v32:32:32-v64:64:64-v128:128:128-n16:32:64")


def _without_nvvm_if_missing() -> None:
    from numba.cuda.cudadrv import nvvm

    try:
        nvvm.NVVM()
    except Exception:
        stand_in = pytypes.SimpleNamespace(data_layout=NVVM_DATA_LAYOUT, get_ir_version=lambda: (2, 0, 3, 1))
        nvvm.NVVM = lambda: stand_in


class _FakeMemory:
    """Device memory at a made-up address: enough for a DeviceNDArray to be built and packed."""

    def __init__(self, address):
        self.device_ctypes_pointer = self.handle = ctypes.c_void_p(address)

    def own(self):
        return self


def example(desc, k: int):
    """An argument matching ``desc``: a DeviceNDArray (not C-contiguous where the layout says
    so) at a made-up address, a scalar of the dtype, or a tuple of them."""
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    kind = desc[0]
    if kind == "array":
        dtype, ndim, layout = np.dtype(desc[1]), desc[2], desc[3]
        shape = tuple(range(2, 2 + ndim))
        strides = np.empty(shape, dtype).strides if layout == "C" else tuple(
            s * 2 for s in np.empty(shape, dtype).strides)
        return DeviceNDArray(shape, strides, dtype, gpu_data=_FakeMemory(4096 * (k + 1)))
    if kind == "tuple":
        return tuple(example(d, k + i) for i, d in enumerate(desc[1]))
    return np.dtype(desc[1]).type(k + 1)


def lean_packing_differs(argtypes, descs) -> str | None:
    """Where cnn_numba's lean launch (kernels/cuda/lean.py) would pack these arguments unlike
    numba-cuda's own launch, the two lists; None where they agree."""
    from numba.cuda.dispatcher import _Kernel

    from cnn_numba.kernels.cuda import lean

    class NumbaPacking:
        extensions = []
        _prepare_args = _Kernel._prepare_args

    args = [example(d, k) for k, d in enumerate(descs)]
    ours = lean.pack_all([lean.packer(t) for t in argtypes], args)
    numbas = []
    for t, v in zip(argtypes, args):
        NumbaPacking()._prepare_args(t, v, 0, [], numbas)
    return None if lean.same_packing(ours, numbas) else f"lean {ours}\nnumba {numbas}"


def main(path: str) -> int:
    from numba import types
    from numba.cuda import compiler, dispatcher
    from numba.cuda.cudadrv.error import CudaSupportError

    # Device functions ask the current device for its compute capability while they
    # compile; without a GPU there is none, so answer for it.
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=CC)
    _without_nvvm_if_missing()
    failed = 0
    entries = json.loads(open(path).read())
    for module, name, descs in entries:
        kernel = getattr(importlib.import_module(module), name, None)
        if kernel is None:
            failed += 1
            print(f"FAIL {module}.{name}: not a module-level kernel, so it cannot be looked up\n")
            continue
        py_func = kernel.py_func
        try:
            compiler.compile_cuda(py_func, types.void, signature(json.loads(descs)), cc=CC)
        except CudaSupportError as e:
            print(f"cannot compile without a driver here: {e}")
            return 2
        except Exception as e:  # a typing or lowering error: what the GPU would raise
            failed += 1
            print(f"FAIL {module}.{name}{tuple(map(str, signature(json.loads(descs))))}:\n"
                  f"{type(e).__name__}: {str(e)[-2500:]}\n")
            continue
        differs = lean_packing_differs(signature(json.loads(descs)), json.loads(descs))
        if differs:
            failed += 1
            print(f"FAIL {module}.{name}: lean launch packing differs from numba-cuda's\n{differs}\n")
    print(f"{len(entries)} launched signatures, {failed} failed to compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
