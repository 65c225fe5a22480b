"""Numba's on-disk cache, keyed on every kernel source file instead of one.

Numba stamps a cached kernel with its own file only. Our kernels compile in code from
other files: the ``inline="always"`` index helpers (index.py), the BLAS binding
(blas.py), the optimiser updates (nn.py), plain ``@njit`` helpers called across
modules. Edit one of those and the kernels that use it would load stale machine code
from the cache. So for a function defined under ``cnn_numba/kernels/`` the stamp is a
SHA-256 over the paths and contents of all ``kernels/**/*.py``: any edit there
recompiles every kernel once, and nothing else changes (same cache directories, same
file names, same fallback from NUMBA_CACHE_DIR to ``__pycache__`` to the user-wide
cache directory when the install is read-only).

How: each of Numba's file-backed locators gets a subclass that accepts only kernel
files and returns that stamp; ``install`` puts the subclasses first in the locator list
of numba's ``CacheImpl`` (CPU) or numba-cuda's (CUDA, installed by kernels/cuda on its
import so a CPU-only run never imports numba.cuda). For any other file the subclasses
decline and Numba's own locators run as before. The digest is computed once per process
(~20 files, well under a millisecond of hashing).
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

KERNELS = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """SHA-256 of every kernel source (relative path and bytes), in path order."""
    h = hashlib.sha256()
    for path in sorted(KERNELS.rglob("*.py")):
        h.update(path.relative_to(KERNELS).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def is_kernel_file(py_file: str) -> bool:
    """True for a real .py file under cnn_numba/kernels/ (not one inside a zip)."""
    try:
        path = Path(py_file).resolve()
    except (OSError, RuntimeError):
        return False
    return path.suffix == ".py" and path.is_file() and KERNELS in path.parents


class _KernelSourcesStamp:
    """Mixin before a Numba source-file locator: kernel files only, stamped by all kernels."""

    def get_source_stamp(self):
        return "cnn_numba.kernels", sources_digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not is_kernel_file(py_file):
            return None
        return super().from_function(py_func, py_file)


def _wrap(locator_classes, names) -> list:
    """Stamped subclasses of the locators named, in the order Numba tries them."""
    by_name = {c.__name__: c for c in locator_classes}
    return [type(f"Kernel{by_name[n].__name__.lstrip('_')}", (_KernelSourcesStamp, by_name[n]),
                 {"__module__": __name__})
            for n in names if n in by_name]


def install(caching) -> None:
    """Put the stamped locators first in ``caching.CacheImpl`` (numba.core.caching or
    numba.cuda.core.caching); idempotent."""
    impl = caching.CacheImpl
    if any(issubclass(c, _KernelSourcesStamp) for c in impl._locator_classes):
        return
    # NUMBA_CACHE_DIR, then __pycache__ beside the source, then the user-wide directory
    names = [f"{p}{n}CacheLocator" for n in ("UserProvided", "InTree", "UserWide") for p in ("", "_")]
    impl._locator_classes = _wrap(impl._locator_classes, names) + list(impl._locator_classes)


def install_cpu() -> None:
    from numba.core import caching
    install(caching)


def install_cuda() -> None:
    from numba.cuda.core import caching
    install(caching)
