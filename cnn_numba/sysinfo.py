"""What this installation runs on: ``cnn_numba.show_config()`` and ``python -m cnn_numba info``.

The facts a speed or install report needs, found the way the kernels find them: the
threading layer Numba actually picked (its thread pool is started to find out), threads,
the two BLAS libraries (numpy's, and SciPy's OpenBLAS that Numba's ``np.dot`` calls inside
the kernels) and CUDA's state.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _blas(module) -> str:
    """'name version' of the BLAS a numpy or scipy build links (their ``show_config``)."""
    try:
        blas = module.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except Exception:  # builds older than numpy 1.26 / scipy 1.11 have no dict form
        return "unknown"


def kernel_blas_core() -> str:
    """The kernel set SciPy's OpenBLAS (the kernels' BLAS) runs on this CPU, e.g. 'SkylakeX'
    (AVX-512) or 'Haswell' (AVX2), and ``OPENBLAS_CORETYPE`` where that variable chose it;
    'unknown' where the library or its symbol is not found."""
    import ctypes
    import glob

    import scipy
    forced = os.environ.get("OPENBLAS_CORETYPE")
    libs = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*"))):
        try:
            lib = ctypes.CDLL(path)  # the loaded copy: same path, same handle
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_corename", "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                core = fn().decode()
                return f"{core} (OPENBLAS_CORETYPE={forced})" if forced else core
    return "unknown"


def _blas_threads() -> dict[str, int] | None:
    """Threads of each loaded BLAS by the folder it lies in, e.g. numpy.libs and scipy.libs for
    the wheels' own copies (threadpoolctl, only where it is installed)."""
    if importlib.util.find_spec("threadpoolctl") is None:
        return None
    from threadpoolctl import threadpool_info
    return {os.path.basename(os.path.dirname(i["filepath"])): i["num_threads"] for i in threadpool_info()
            if i["user_api"] == "blas"}


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The size of the CPU's last-level cache (Linux sysfs: cpu0's highest cache level), or
    ``default`` where it cannot be read."""
    from pathlib import Path
    best = (0, default)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit() and level > best[0]:
            best = (level, int(digits) * scale)
    return best[1]


def _cuda() -> str:
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda not installed (pip install 'cnn_numba[cuda]')"
    import numba

    label = f"numba-cuda {_version('numba-cuda')}"
    if numba.config.ENABLE_CUDASIM:
        return f"{label}, Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    from numba import cuda
    try:
        if not cuda.is_available():
            return f"{label}, no CUDA GPU or driver found"
        return f"{label}, GPU: {cuda.get_current_device().name.decode()}"
    except Exception as e:  # a broken driver: say so rather than fail the report
        return f"{label}, CUDA unusable: {e}"


def config() -> dict[str, str]:
    """The facts ``show_config`` prints, as strings by label."""
    import numba
    import numpy
    import scipy

    import cnn_numba
    from . import _environment_tbb, hostmem

    threads = numba.get_num_threads()  # starts Numba's thread pool: the layer is chosen now
    layer = numba.threading_layer()
    chosen_by = ("NUMBA_THREADING_LAYER" if "NUMBA_THREADING_LAYER" in os.environ
                 else f"first of {list(numba.config.THREADING_LAYER_PRIORITY)} that loads")
    tbb = _environment_tbb()
    kernel_blas_threads = os.environ.get("OPENBLAS_NUM_THREADS", "1 (set while cnn_numba loads it)")
    info = {
        "cnn_numba": f"{cnn_numba.__version__} ({os.path.dirname(cnn_numba.__file__)})",
        "python": f"{platform.python_version()} ({sys.executable}), {platform.system()} {platform.machine()}",
        "numba": f"{numba.__version__} (llvmlite {_version('llvmlite')})",
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "threading layer": f"{layer} ({chosen_by})",
        "threads": f"{threads} of NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}",
        "kernels from threads": ("serialised: one Python thread in the CPU kernels at a time (workqueue)"
                                 if layer == "workqueue" else "concurrent"),
        "tbb": f"{_version('tbb')} ({tbb})" if tbb else f"{_version('tbb') or 'not installed'}",
        "numpy BLAS": _blas(numpy),
        "kernel BLAS": (f"{_blas(scipy)} (SciPy's, called by Numba's np.dot), threads: {kernel_blas_threads}, "
                        f"kernels: {kernel_blas_core()}"),
        "host memory": hostmem.status(),
        "conv autotune": _autotune(),
        "direct conv loops": _direct_loops(),
        "cuda": _cuda(),
    }
    counts = _blas_threads()
    if counts:
        info["BLAS threads"] = ", ".join(f"{name}: {n}" for name, n in counts.items())
    return info


def _autotune() -> str:
    """Whether the CPU's conv 'auto' is tuned, the table of its choices, and whether it may run
    Winograd."""
    from .kernels import autotune, conv_algos, conv_winograd
    if conv_winograd.enabled():
        wino = (f"; Winograd from {conv_algos.WINOGRAD_MIN_CHANNELS} channels per group "
                f"({conv_winograd.ENV}=0 turns it off)")
    else:
        wino = f"; no Winograd ({conv_winograd.ENV}=0)"
    if not autotune.enabled():
        return f"off ({autotune.ENV}=0): 'auto' is the rule" + wino
    path = autotune.table_path()
    return f"on ({autotune.ENV}=0 turns it off), choices in {path}" + ("" if path.exists() else " (none yet)") + wino


def _direct_loops() -> str:
    """How the flat direct conv kernels' inner loops run here (kernels/conv_stride1.py)."""
    from .kernels import conv_stride1, simd
    if conv_stride1.REGISTER_BLOCKED:
        return (f"float32 accumulators in {simd.LANES}-lane vector registers, {conv_stride1.BLOCK} channels a block "
                "(AVX-512); float64 in passes over memory")
    return f"passes over memory, LLVM-vectorised ({simd.LANES}-lane registers: no AVX-512 in Numba's target)"


def show_config(file=None) -> None:
    """Print versions, the threading layer in use, threads, BLAS and CUDA status."""
    info = config()
    width = max(map(len, info))
    for label, value in info.items():
        print(f"{label:<{width}}  {value}", file=file or sys.stdout)
