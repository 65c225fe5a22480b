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


# The file names Numba asks the loader for (numba/np/ufunc/parallel.py,
# _check_tbb_version_compatible), and where a pip or conda install puts them relative to
# the environment's root: pip's tbb wheel installs libtbb.so.12 as <prefix>/lib (the wheel's
# data files) and tbb12.dll as <prefix>\Library\bin, conda's tbb package the same.
_TBB_FILES = {"linux": ("lib", "libtbb.so.12"), "win32": (os.path.join("Library", "bin"), "tbb12.dll"),
              "darwin": ("lib", "libtbb.12.dylib")}


def _environment_tbb() -> str | None:
    """The path of this environment's TBB runtime, or None: <sys.prefix>/lib first, then
    wherever the ``tbb`` distribution's files say (``pip install --user``, ``--prefix``)."""
    import sys

    where = _TBB_FILES.get("linux" if sys.platform.startswith("linux") else sys.platform)
    if where is None:
        return None
    folder, name = where
    path = os.path.join(sys.prefix, folder, name)
    if os.path.isfile(path):
        return path
    from importlib import metadata
    try:
        files = metadata.distribution("tbb").files or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            path = str(f.locate())
            return path if os.path.isfile(path) else None
    return None


def _load_environment_tbb() -> None:
    """Load the TBB runtime that pip installed into this environment, so that Numba can use it.

    pip puts libtbb.so.12 in <venv>/lib, which the dynamic loader does not search: Numba's
    tbbpool extension (linked against libtbb.so.12 by name) fails to import and Numba quietly
    falls back to another threading layer (numba issues #6108, #7148; the known workaround is
    LD_LIBRARY_PATH=<venv>/lib, which must be set before Python starts). Loading the file by
    its path first makes both ways Numba finds it, ``ctypes.CDLL("libtbb.so.12")`` for its
    version check and the extension's link, resolve to the loaded copy: the loader matches a
    loaded library by its soname (Windows: by module name). RTLD_GLOBAL so that its symbols
    also serve libraries loaded later. It also wins over an older system libtbb.so.12, which
    Numba would reject (numba issue #9740). Skipped when the user chose another layer, when a
    libtbb is already in the process (a second copy would run two TBB schedulers), and once
    Numba has picked its layer.
    """
    import ctypes

    from numba.np.ufunc import parallel

    layer = os.environ.get("NUMBA_THREADING_LAYER", "default").lower()
    if getattr(parallel, "_is_initialized", False) or layer in ("omp", "workqueue"):
        return
    path = _environment_tbb()
    if path is None:
        return
    name = os.path.basename(path)
    if hasattr(os, "RTLD_NOLOAD"):
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD)
            return  # already loaded, e.g. by another package
        except OSError:
            pass
    try:
        ctypes.CDLL(path, mode=getattr(os, "RTLD_GLOBAL", 0))
    except OSError:  # a broken or foreign-architecture file: Numba falls back as before
        pass


def _prefer_light_threading_layer() -> None:
    """Prefer TBB, then OpenMP, then Numba's own workqueue for the parallel kernels.

    A training step launches dozens of small parallel loops with Python work between them, so
    the per-launch cost decides. On an otherwise idle 2-core machine, each layer in its own
    process (NUMBA_THREADING_LAYER), two interleaved rounds, min/median of 5 timings:
                                     tbb              omp              workqueue
        max pool 1x6x28x28, per call 15.6-23.7 us     13.1-13.5 us     81.5-84.7 us
        LeNet-5 inference, batch 1   178-188 us       160-164 us       801-839 us
        LeNet-5 training, batch 64   4.1-5.0 ms       3.9-4.2 ms       7.8-8.0 ms
    OpenMP's workers spin after each loop: that makes its launches cheap while a core is free,
    and costly when other jobs share the cores (with a load average of 6-11 on 2 cores its
    LeNet-5 step took 286-550 ms against workqueue's 14-270 ms). Where that matters, set
    NUMBA_THREADING_LAYER=workqueue or OMP_WAIT_POLICY=passive. TBB (a dependency on x86-64
    Linux and Windows, made loadable from a virtualenv by _load_environment_tbb) comes first: it
    is nearly as cheap and neither spins nor minds being shared. workqueue does not allow two
    Python threads in parallel kernels at once: backend.kernel serialises CPU launches when it
    is the layer. NUMBA_THREADING_LAYER or NUMBA_THREADING_LAYER_PRIORITY set by the user win.
    """
    import numba

    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return
    numba.config.THREADING_LAYER_PRIORITY = ["tbb", "omp", "workqueue"]


_load_environment_tbb()
_prefer_light_threading_layer()

from . import hostmem  # noqa: E402

hostmem.keep_freed_memory()  # a training step's arrays reuse freed memory (hostmem's docstring)

from . import kernels  # noqa: F401  (registers the CPU kernels with the backend)
from . import functional
from .tensor import (Function, Tensor, enable_grad, from_cuda_array, is_grad_enabled, no_grad, set_grad_enabled,
                     tensor)
from . import gpu as cuda, models, nn, optim
from .random import manual_seed
from .summary import summary
from .sysinfo import show_config

# ``cnn_numba.cuda`` is gpu.py. No module file can carry that name: numba-cuda's import hook
# takes any module whose name contains "numba.cuda" for Numba's own and recurses on it. A
# module found in sys.modules is never looked for, so ``import cnn_numba.cuda`` works too.
import sys as _sys  # noqa: E402
_sys.modules[__name__ + ".cuda"] = cuda

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "from_cuda_array", "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled",
           "Function", "functional", "nn", "optim", "models", "cuda", "manual_seed", "summary", "show_config",
           "cuda_is_available", "__version__"]


def cuda_is_available() -> bool:
    """Whether ``device="cuda"`` works here: numba-cuda installed and a GPU (or Numba's
    CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``) present."""
    from .backend import check_device
    try:
        check_device("cuda")
    except RuntimeError:
        return False
    return True
