"""Numba kernels. Importing this package registers the CPU launchers with the backend."""
from . import conv, elementwise, pool  # noqa: F401
