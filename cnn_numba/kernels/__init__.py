"""Numba kernels. Importing this package registers the CPU launchers with the backend."""
from numba.core.cpu_options import ParallelOptions

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

from . import conv, conv_algos, elementwise, nn, pool  # noqa: E402,F401
