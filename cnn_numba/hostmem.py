"""Keep freed host memory in the process: glibc's malloc set for a training loop's arrays.

A training step allocates and frees the same large arrays every step: activations, their
gradients, kernel scratch (resnet8 at batch 128: 6.4 MB each, a few hundred per step). glibc
serves a block over its mmap threshold with a fresh mmap and unmaps it on free, and trims
the top of its heap once more than the trim threshold is free there; either way the next
step's array is fresh pages, and the kernel zeroes every 4 KB page on first touch (a page
fault each) and takes the mapping lock on each map and unmap, which serialises the threads.
Measured on the 2-core VM, resnet8 steps at batch 128 (``bench/train_speed.py``): 75-77 ms
with glibc's defaults, 48-49 ms with the settings below, peak RSS 303 MB either way (the
same working set, no longer handed back to the kernel between steps).

So at import, on Linux with glibc, ``mallopt`` fixes the mmap threshold at its largest
value (32 MB: larger blocks are still mapped and unmapped) and the trim threshold at 1 GB
of free heap top. Freed memory then stays with the process for its next arrays, as
PyTorch's caching allocator keeps CUDA memory; RSS stays at the step's peak. The settings
are process-wide: ``CNN_NUMBA_MALLOC=0`` (read at import) leaves glibc's defaults, as do
other C libraries (musl) and other systems. ``status()`` says which applies
(``show_config`` prints it).
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV = "CNN_NUMBA_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30

_status = "not set"


def keep_freed_memory() -> str:
    """Apply the settings above unless ``CNN_NUMBA_MALLOC=0`` or the C library is not glibc;
    returns (and remembers for ``status``) what was done."""
    global _status
    if os.environ.get(ENV, "1") == "0":
        _status = f"glibc defaults ({ENV}=0)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        _status = "the C library's defaults (not glibc)"
    else:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        except (OSError, AttributeError):
            ok = False
        _status = (f"freed memory kept (glibc mmap threshold {MMAP_THRESHOLD >> 20} MB, trim threshold "
                   f"{TRIM_THRESHOLD >> 30} GB; {ENV}=0 for the defaults)" if ok else "glibc defaults (mallopt refused)")
    return _status


def status() -> str:
    """What ``keep_freed_memory`` did at import."""
    return _status
