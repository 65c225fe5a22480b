"""CUDA twins of the scalar index helpers in kernels/index.py: the same Python
functions compiled for the device, so CPU and GPU kernels share one copy of the
window arithmetic (``i = o*s - p + t*d`` and what follows from it)."""
from .. import index as _cpu
from .launch import device_function

tap = device_function(_cpu.tap)
out_range = device_function(_cpu.out_range)
pool_window = device_function(_cpu.pool_window)
adaptive_window = device_function(_cpu.adaptive_window)
