"""Numba kernels. Importing this package registers the CPU launchers with the backend."""
from numba import get_num_threads as _numba_threads
from numba.core.cpu_options import ParallelOptions
from numba.np.ufunc import parallel as _parallel

from .sourcecache import install_cpu

install_cpu()  # before any @njit(cache=True) is decorated: the stamp covers every kernel file

# What ``parallel=`` means for every parallel CPU kernel: its explicit ``prange`` loop and
# nothing else. With ``parallel=True`` Numba also turns array expressions (np.zeros of a
# scratch buffer, .sum of per-thread partials) into parallel loops, each compiled as one
# more gufunc: the stride-1 forward had four, and compiled in 12.8 s. An instance, not a
# dict: Numba empties a dict option at the first compile, so a second signature (float64
# after float32) would get the defaults back.
PARALLEL = ParallelOptions(dict(prange=True, comprehension=False, reduction=False, inplace_binop=False,
                                setitem=False, numpy=False, stencil=False, fusion=False))


def get_num_threads() -> int:
    """numba.get_num_threads(), for the launchers, which ask at every call: once the thread
    pool is up, its thread-local count read directly (0.1 us), not through Numba's per-call
    initialisation check under two locks (0.55 us); Numba's own function otherwise (it starts
    the pool; cnn_numba.warmup swaps this name out while it records, as it does Numba's)."""
    if getattr(_parallel, "_is_initialized", False):
        n = _parallel._get_num_threads()
        if n > 0:
            return n
    return _numba_threads()


def serial_twin(kernel):
    """A serial compilation of parallel ``kernel``'s source (its ``prange`` run as ``range``),
    for inputs too small to pay for the thread pool's fork and join (~1.2 us a launch with
    TBB on 2 cores, against 0.3 us for a whole batch norm of 64 elements). One source, two
    machine codes, chosen by the launcher.

    A copy of the Python function under its own qualified name: Numba's on-disk cache keys
    a kernel on its qualified name and line, not on its options, so the twin would
    otherwise load (or overwrite) the parallel code."""
    import types

    from numba import njit
    from numba.core.caching import NullCache

    f = kernel.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__, twin.__module__, twin.__doc__ = f.__qualname__ + "_serial", f.__module__, f.__doc__
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    return njit(cache=not isinstance(kernel._cache, NullCache), **options)(twin)


from . import conv, conv_algos, elementwise, nn, pool  # noqa: E402,F401
