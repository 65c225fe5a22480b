"""cnn_numba: a convolutional-network engine whose kernels are Numba-compiled.

    import cnn_numba as cn
    import cnn_numba.functional as F
    x = cn.tensor(images, requires_grad=True)          # (N, C, H, W), float32
    y = F.conv2d(x, w, b, stride=1, padding="same")
    y.sum().backward()                                  # x.grad, w.grad, b.grad
"""
import os

import numpy  # noqa: F401  (loads numpy's own BLAS first, with the user's thread settings)


def _single_threaded_kernel_blas() -> None:
    """Load SciPy's OpenBLAS, the BLAS that Numba's ``np.dot`` calls, single-threaded.

    The im2col kernels call it from inside Numba's parallel loops, one product per
    thread; a multi-threaded BLAS there would be a second thread pool fighting Numba's
    for the same cores. The variable is set only while that library loads, so numpy's
    BLAS and subprocesses keep the user's settings; a user's OPENBLAS_NUM_THREADS wins.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ:
        import scipy.linalg.cython_blas  # noqa: F401
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


_single_threaded_kernel_blas()


def _prefer_light_threading_layer() -> None:
    """Prefer TBB, then Numba's own workqueue, to OpenMP for the parallel kernels.

    A training step launches dozens of small parallel loops with Python work between
    them, so the per-launch cost decides: with Numba's OpenMP layer each launch cost
    about 1.5 ms on a 2-core machine (a LeNet-5 step: 68 ms with OpenMP, 30 ms with
    workqueue, in an early version), and TBB (a dependency on x86-64 Linux and Windows)
    beat workqueue again by 20-30% (LeNet-5 10-15 ms vs 16-19 ms a step). Only the order
    of preference changes: NUMBA_THREADING_LAYER or NUMBA_THREADING_LAYER_PRIORITY set by
    the user win. (workqueue, the fallback, does not allow two Python threads to run
    parallel kernels at once.)
    """
    import numba

    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "workqueue", "omp"]


_prefer_light_threading_layer()

from . import kernels  # noqa: F401  (registers the CPU kernels with the backend)
from . import functional
from .tensor import (Function, Tensor, enable_grad, from_cuda_array, is_grad_enabled, no_grad, set_grad_enabled,
                     tensor)
from . import models, nn, optim
from .random import manual_seed
from .summary import summary

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "from_cuda_array", "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled",
           "Function", "functional", "nn", "optim", "models", "manual_seed", "summary", "cuda_is_available",
           "__version__"]


def cuda_is_available() -> bool:
    """Whether ``device="cuda"`` works here: numba-cuda installed and a GPU (or Numba's
    CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``) present."""
    from .backend import check_device
    try:
        check_device("cuda")
    except RuntimeError:
        return False
    return True
