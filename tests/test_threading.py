"""Numba's threading layer: TBB loads from the environment, and kernels called from several
Python threads give the right results under every layer, workqueue included (which, unguarded,
aborts the process). Each case runs in a subprocess: the layer is chosen once per process.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import cnn_numba

ROOT = str(Path(cnn_numba.__file__).resolve().parent.parent)

# Four Python threads start at once (before any kernel has run, so before Numba has picked its
# layer: the race-prone start) and each runs conv2d + max_pool2d 30 times on its own input;
# every result must equal the one computed again serially afterwards, and the max pool of the
# input must equal a numpy reference. (2, 3, 12, 12) float32 input, (4, 3, 3, 3) weight.
THREADS = r'''
import sys, threading
import numpy as np
import numba
import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba.sysinfo import config

rng = np.random.default_rng(0)
xs = [rng.standard_normal((2, 3, 12, 12)).astype(np.float32) for _ in range(4)]
w = cn.tensor(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))

def run(x):
    t = cn.tensor(x)
    return F.max_pool2d(F.conv2d(t, w, padding=1), 2).numpy(), F.max_pool2d(t, 2).numpy()

got = [[] for _ in xs]
def worker(i):
    for _ in range(30):
        got[i].append(run(xs[i]))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
for t in threads:
    t.start()
for t in threads:
    t.join()
for i, x in enumerate(xs):
    conv, pool = run(x)
    assert len(got[i]) == 30, len(got[i])
    for c, p in got[i]:
        assert np.array_equal(c, conv) and np.array_equal(p, pool)
    assert np.array_equal(pool, x.reshape(2, 3, 6, 2, 6, 2).max(axis=(3, 5)))
print("layer", numba.threading_layer(), "|", config()["kernels from threads"])
'''


def _run(code: str, **env_vars) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_kernels_from_several_threads(layer):
    proc = _run(THREADS, NUMBA_THREADING_LAYER=layer)
    if proc.returncode and "No threading layer could be loaded" in proc.stderr:
        pytest.skip(f"Numba's {layer} threading layer is not available here")
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert f"layer {layer} |" in proc.stdout
    assert ("serialised" if layer == "workqueue" else "concurrent") in proc.stdout


def _tbb_installed() -> bool:
    try:
        metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        return False
    return True


# pyproject.toml makes tbb a dependency where PyPI has wheels: x86-64 Linux and Windows.
TBB_PLATFORM = (sys.platform.startswith("linux") and platform.machine() == "x86_64") or \
    (sys.platform == "win32" and platform.machine() == "AMD64")


def test_default_layer_is_tbb_where_the_tbb_wheel_is_installed():
    """Where pip installed tbb (into a virtualenv: its libtbb.so.12 lies in <venv>/lib, off the
    loader's path), the layer Numba picks is TBB, with no LD_LIBRARY_PATH help."""
    if not _tbb_installed():
        if TBB_PLATFORM:
            pytest.fail("tbb is a dependency on this platform (pyproject.toml) but is not installed")
        pytest.skip(f"no tbb wheel for {sys.platform} {platform.machine()}: Numba uses another layer here")
    code = "import numba, cnn_numba; numba.get_num_threads(); print('layer', numba.threading_layer())"
    proc = _run(code, LD_LIBRARY_PATH="")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["layer", "tbb"], (proc.stdout, cnn_numba._environment_tbb())


def test_environment_tbb_is_the_installed_runtime():
    if not _tbb_installed():
        pytest.skip("tbb is not installed here")
    path = cnn_numba._environment_tbb()
    assert path is not None and os.path.isfile(path)
    names = {f.name for f in metadata.distribution("tbb").files or []}
    assert os.path.basename(path) in names
