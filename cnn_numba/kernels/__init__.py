"""Numba kernels. Importing this package registers the CPU launchers with the backend."""
from . import conv, elementwise, nn, pool  # noqa: F401
