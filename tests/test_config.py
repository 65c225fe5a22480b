"""``cnn_numba.show_config()`` and ``python -m cnn_numba info``: what they print is what runs."""
from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import pytest
import numpy as np
import scipy

import cnn_numba
from cnn_numba.cli import main

LABELS = ["cnn_numba", "python", "numba", "numpy", "scipy", "threading layer", "threads", "kernels from threads",
          "tbb", "numpy BLAS", "kernel BLAS", "host memory", "conv autotune", "direct conv loops", "cuda"]


def _parse(text: str) -> dict[str, str]:
    """The printed table back into {label: value}: a label, two or more spaces, the value."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.strip().splitlines())


def test_show_config_reports_what_runs():
    out = io.StringIO()
    cnn_numba.show_config(file=out)
    info = _parse(out.getvalue())
    assert list(info)[:len(LABELS)] == LABELS
    # The layer is chosen by then, and is the one Numba reports.
    assert info["threading layer"].split()[0] == numba.threading_layer()
    assert info["threads"].split()[0] == str(numba.get_num_threads())
    assert info["numba"].split()[0] == numba.__version__
    assert info["numpy"] == np.__version__ and info["scipy"] == scipy.__version__
    assert info["cnn_numba"].startswith(cnn_numba.__version__)
    assert info["conv autotune"].startswith("off")  # conftest.py turns it off for the tests
    from cnn_numba.kernels import conv_stride1
    assert info["direct conv loops"].startswith("float32 accumulators in 16-lane" if conv_stride1.REGISTER_BLOCKED
                                                else "passes over memory")
    assert info["kernels from threads"].startswith("serialised" if numba.threading_layer() == "workqueue"
                                                   else "concurrent")
    if importlib.util.find_spec("numba_cuda") is None:
        assert info["cuda"].startswith("numba-cuda not installed")
    else:
        assert ("simulator" in info["cuda"]) == bool(numba.config.ENABLE_CUDASIM)


def test_info_command(capsys):
    assert main(["info"]) == 0
    info = _parse(capsys.readouterr().out)
    assert info["threading layer"].split()[0] == numba.threading_layer()


def test_info_names_a_layer_the_user_forced():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    root = str(Path(cnn_numba.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["NUMBA_THREADING_LAYER"] = "workqueue"
    proc = subprocess.run([sys.executable, "-m", "cnn_numba", "info"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = _parse(proc.stdout)
    assert info["threading layer"] == "workqueue (NUMBA_THREADING_LAYER)"
    assert info["kernels from threads"].startswith("serialised")


_FAULTS = """
import resource, numpy as np, cnn_numba
for i in range(6):  # three 8 MB arrays made, touched and freed, as a training step's activations
    if i == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    arrays = [np.ones(2 << 20, np.float32) for _ in range(3)]
    del arrays
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, cnn_numba.hostmem.status())
"""


def test_freed_host_memory_is_reused_unless_turned_off():
    """cnn_numba/hostmem.py: with glibc, later steps' arrays reuse freed memory (no page faults:
    glibc's defaults trim the 24 MB freed at the heap's top and fault it back, ~6000 pages);
    CNN_NUMBA_MALLOC=0 keeps glibc's defaults."""
    if cnn_numba.hostmem.status().startswith("the C library"):
        pytest.skip("hostmem tunes glibc's malloc only; with another C library it sets nothing (its status says so)")
    runs = {}
    for value in ("1", "0"):
        env = dict(os.environ, CNN_NUMBA_MALLOC=value)
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        faults, status = out.stdout.split(" ", 1)
        runs[value] = int(faults), status
    assert runs["1"][0] < 500 and runs["1"][1].startswith("freed memory kept"), runs
    assert runs["0"][0] > 3000 and "CNN_NUMBA_MALLOC=0" in runs["0"][1], runs


def test_kernel_blas_core_names_the_kernels_and_the_variable_that_chose_them(monkeypatch):
    """SciPy's OpenBLAS reports the kernel set it picked (AVX-512's 'SkylakeX' or AVX2's
    'Haswell' on x86); show_config says so, and names OPENBLAS_CORETYPE where it is set."""
    from cnn_numba.sysinfo import kernel_blas_core

    if not sys.platform.startswith("linux"):
        pytest.skip("SciPy's wheels ship their own OpenBLAS on Linux; elsewhere the BLAS may be another")
    core = kernel_blas_core()
    assert core and core != "unknown"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    assert kernel_blas_core().endswith("(OPENBLAS_CORETYPE=Haswell)")
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert "OPENBLAS_CORETYPE" not in kernel_blas_core()
    out = io.StringIO()
    cnn_numba.show_config(file=out)
    assert f"kernels: {kernel_blas_core()}" in _parse(out.getvalue())["kernel BLAS"]


def test_show_config_says_whether_auto_runs_winograd(monkeypatch):
    for value, says in (("1", "Winograd from 64 channels per group (CNN_NUMBA_WINOGRAD=0 turns it off)"),
                        ("0", "no Winograd (CNN_NUMBA_WINOGRAD=0)")):
        monkeypatch.setenv("CNN_NUMBA_WINOGRAD", value)
        out = io.StringIO()
        cnn_numba.show_config(file=out)
        assert _parse(out.getvalue())["conv autotune"].endswith(says)
