"""The one launcher layer every CUDA kernel goes through.

It computes grid sizes, allocates device outputs and refuses host arrays: Numba
copies a numpy array passed to a kernel to the device and back on every launch,
silently, which would turn a resident training step into PCIe traffic. So a
launcher passes only device arrays and scalars (cast to the array's dtype, so a
float32 kernel never computes in float64).

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is
imported; CI has no GPU) every thread is a Python thread: blocks are kept small
there so tests on tiny shapes stay fast. Kernel code is identical in both.

Cached kernels are stamped with every kernel source (kernels/sourcecache.py), so editing
a helper they compile in (kernels/index.py, the optimiser updates in kernels/nn.py)
recompiles them.
"""
from __future__ import annotations

import numpy as np
from numba import config, cuda

from ..sourcecache import install_cuda
from . import lean

SIMULATOR = bool(config.ENABLE_CUDASIM)
LEAN = lean.ENABLED and not SIMULATOR  # resolved overloads, packed arguments (lean.py); a GPU only
if not SIMULATOR:
    install_cuda()  # before any cached @cuda.jit below is decorated

# Threads per block of one-thread-per-item launches (a multiple of the warp, 32).
BLOCK = 32 if SIMULATOR else 256


def jit(fn=None, **options):
    """``cuda.jit`` with the project's options: kernels are cached on disk like the
    CPU ones (the simulator has no cache)."""
    options.setdefault("cache", not SIMULATOR)
    if fn is None:
        return lambda f: cuda.jit(**options)(f)
    return cuda.jit(**options)(fn)


def device_function(fn):
    """The CUDA twin of a scalar helper written for the CPU (kernels/index.py): the
    same Python source compiled as a ``@cuda.jit(device=True)`` function, so the
    index arithmetic exists once."""
    return cuda.jit(device=True)(getattr(fn, "py_func", fn))


# The capture in progress (kernels/cuda/graph.py), or None: while one is, launches go into it
# (a CUDA graph under construction, or the simulator's list) instead of running, or nowhere
# (``drops``: the optimiser's host code rerun before a replay).
capture = None

# Called as ``record(kernel, args)`` before every launch when set. The tests set it under the
# simulator, which runs kernels as Python and so never types them: tests/cuda_typecheck.py
# then compiles every launched signature the way a real GPU would (typing and lowering).
record = None


def _check(kernel, args) -> None:
    if record is not None:
        record(kernel, args)
    for i, a in enumerate(args):
        if isinstance(a, np.ndarray):
            raise TypeError(f"CUDA launcher got a host numpy array (argument {i}, shape {a.shape}); "
                            "it would be copied to the device on every launch. Move it with cuda.to_device first.")


def launch(kernel, n: int, *args) -> None:
    """One thread per item, ``n`` items, in blocks of ``BLOCK``."""
    if n <= 0 or (capture is not None and capture.drops):
        return
    _check(kernel, args)
    _run(kernel, (n + BLOCK - 1) // BLOCK, BLOCK, args)


def launch_grid(kernel, grid, block, *args) -> None:
    """An explicit grid (tiled kernels). Empty grids launch nothing."""
    grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
    if min(grid) <= 0 or (capture is not None and capture.drops):
        return
    _check(kernel, args)
    _run(kernel, grid, block, args)


def _run(kernel, grid, block, args) -> None:
    if capture is not None:
        capture.add(kernel, grid, block, args)
    elif LEAN:
        lean.launch(kernel, grid, block, args)
    else:
        kernel[grid, block](*args)


def refuse_in_capture(what: str) -> None:
    """Raise where ``what`` (a copy between host and device, a read) would run while a step is
    being captured: it would not be in the graph, so replays would skip it or bake its result in."""
    if capture is not None:
        from .graph import NotCapturable
        raise NotCapturable(f"{what} during a CUDA-graph capture")


def blocks(n: int, per_block: int) -> int:
    """Blocks of ``per_block`` items covering ``n``."""
    return (n + per_block - 1) // per_block


def empty(shape, dtype):
    return cuda.device_array(tuple(int(s) for s in shape), np.dtype(dtype))


def flat(a):
    """A 1-D view of a C-contiguous device array (0-d arrays included)."""
    return a.reshape(a.size) if a.ndim != 1 else a


def scalar(value, dtype):
    """A Python number as a scalar of ``dtype``, so kernels stay in that precision."""
    return np.dtype(dtype).type(value)


def is_device_array(a) -> bool:
    return cuda.is_cuda_array(a) if not SIMULATOR else hasattr(a, "copy_to_host")


def as_device_array(obj):
    """A Numba device array viewing ``obj``'s memory (its ``__cuda_array_interface__``).
    The simulator has no device memory: there only its own arrays qualify."""
    if SIMULATOR:
        if not hasattr(obj, "copy_to_host"):
            raise TypeError(f"{type(obj).__name__} is not a CUDA array (simulator: Numba device arrays only)")
        return obj
    if not cuda.is_cuda_array(obj):
        raise TypeError(f"{type(obj).__name__} does not expose __cuda_array_interface__")
    return cuda.as_cuda_array(obj)
