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
import numpy as np
import scipy

import cnn_numba
from cnn_numba.cli import main

LABELS = ["cnn_numba", "python", "numba", "numpy", "scipy", "threading layer", "threads", "kernels from threads",
          "tbb", "numpy BLAS", "kernel BLAS", "cuda"]


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
