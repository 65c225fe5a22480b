"""Device dispatch: every op looks its kernels up by (name, device).

Kernel modules register their launchers here (``@register("conv2d_forward", "cpu")``);
the autograd and the functional layer only ever call ``kernel(name, device)``, so a
new device is a new set of registrations, not edits across the code base.
A launcher takes and returns arrays of its device (numpy on "cpu").
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable

import numba

DEVICES = ("cpu", "cuda")
_KERNELS: dict[tuple[str, str], Callable] = {}


def capturing() -> bool:
    """Whether a CUDA step is being captured as a graph (kernels/cuda/graph.py) right now."""
    import sys
    launch = sys.modules.get("cnn_numba.kernels.cuda.launch")
    return launch is not None and getattr(launch.capture, "capturing", False)


def check_device(device) -> str:
    device = str(device)
    base = device.split(":")[0]
    if base not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if base == "cuda":
        _load_cuda()
    return base


# Numba's workqueue threading layer aborts the process ("Concurrent access has been detected")
# when two Python threads run parallel kernels at once; TBB and OpenMP allow it. Under
# workqueue every CPU launcher is called with this lock held (a re-entrant one: a launcher may
# look up another). The layer is known once Numba has started its threads; until then the lock
# is taken too, so that the first calls cannot race.
_LAUNCH_LOCK = threading.RLock()
_SERIALISED: dict[str, Callable] = {}
_serialise: bool | None = None  # None until Numba has picked its threading layer


def _serialised(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def launch(*args, **kwargs):
        with _LAUNCH_LOCK:
            return fn(*args, **kwargs)
    return launch


def _workqueue() -> bool:
    global _serialise
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return True
    _serialise = layer == "workqueue"
    return _serialise


def register(name: str, device: str = "cpu"):
    def deco(fn: Callable) -> Callable:
        _KERNELS[(name, device)] = fn
        if device == "cpu":
            _SERIALISED[name] = _serialised(fn)
        return fn
    return deco


def kernel(name: str, device: str) -> Callable:
    try:
        fn = _KERNELS[(name, device)]
    except KeyError:
        raise RuntimeError(f"op {name!r} has no kernel for device {device!r}") from None
    if device == "cpu" and (_serialise or (_serialise is None and _workqueue())):
        return _SERIALISED[name]
    return fn


def has_kernel(name: str, device: str) -> bool:
    """Whether ``device`` has a kernel for op ``name`` (optional ops, such as conv2d's fused
    epilogue, which only the CPU has)."""
    return (name, device) in _KERNELS


_cuda_loaded = False


def _load_cuda() -> None:
    """Import the CUDA kernels on first use; a clear error when CUDA is unavailable."""
    global _cuda_loaded
    if _cuda_loaded:
        return
    import importlib.util
    if importlib.util.find_spec("numba_cuda") is None:  # numba's own numba.cuda is deprecated
        raise RuntimeError("device='cuda' needs NVIDIA's numba-cuda package: pip install 'cnn_numba[cuda]'")
    from numba import cuda

    from .kernels.cuda.memory import install
    install()  # the caching allocator, before the first CUDA context exists
    if "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ:
        # The fixed-order reductions launch small grids on purpose; Numba would warn at each.
        numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    if not cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA GPU or driver is available "
                           "(NUMBA_ENABLE_CUDASIM=1 runs the CUDA kernels on Numba's simulator instead)")
    from .kernels import cuda as _registers_cuda_kernels  # noqa: F401
    _cuda_loaded = True
