"""Shared fixtures and the one helper that runs a package op forward and backward.

Tests import the helpers with ``from conftest import ...`` (pytest puts tests/ on
sys.path, there being no tests/__init__.py).
"""
from __future__ import annotations

import json
import os
import shutil

# CUDA kernels are tested on every machine: where no NVIDIA driver is present they run
# under Numba's CUDA simulator, which must be switched on before numba is imported.
# (CNN_NUMBA_TEST_CUDASIM=0 turns that off, e.g. to run the CPU tests alone.)
if ("NUMBA_ENABLE_CUDASIM" not in os.environ and os.environ.get("CNN_NUMBA_TEST_CUDASIM", "1") != "0"
        and not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi"))):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

# Conv autotuning (kernels/autotune.py) off, whatever the environment says: its choice of
# algorithm would move results by float rounding between runs that the exactness tests
# compare. tests/test_autotune.py switches it on per test.
os.environ["CNN_NUMBA_AUTOTUNE"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnn_numba.kernels.conv_algos import TABLE as _CONV_TABLE  # noqa: E402

DTYPES = [np.float32, np.float64]
NAMED_ALGOS = list(_CONV_TABLE.names)  # the CPU's conv algorithms (kernels/conv_algos.py)
ALGOS = NAMED_ALGOS + ["auto"]


@pytest.fixture
def rng():
    return np.random.default_rng(20240531)


def _cuda_state():
    """(available, simulated): whether device='cuda' works here, and whether it is Numba's simulator."""
    try:
        from numba import config, cuda
        return bool(cuda.is_available()), bool(config.ENABLE_CUDASIM)
    except Exception:  # numba-cuda missing or broken driver
        return False, False


CUDA_AVAILABLE, CUDA_SIMULATED = _cuda_state()
needs_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="numba-cuda or a CUDA device (or its simulator) is missing")
# Devices the op tests (the conv/pool grids of test_conv*.py and test_pool.py) run on: CUDA too on a
# real GPU. Under the simulator those grids would take an hour (each thread is a Python thread), so
# there the CUDA kernels get their own tiny-shape tests (test_cuda_*.py), which run everywhere.
# CNN_NUMBA_TEST_DEVICES=cpu,cuda forces the list (e.g. a few grid cases on the simulator with -k).
DEVICES = os.environ.get("CNN_NUMBA_TEST_DEVICES", "cpu,cuda" if CUDA_AVAILABLE and not CUDA_SIMULATED else "cpu").split(",")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def forward_backward(op, inputs, gy=None, seed=0, device="cpu", **params):
    """Run ``op(*inputs, **params)`` with every float input requiring grad (integer
    inputs, e.g. pooling indices, become plain tensors; None stays None).

    ``device`` puts every input there (outputs come back as numpy).
    Returns ``(out, grads, gy)``: ``out`` the output as numpy, ``grads`` one numpy
    gradient (or None) per input after ``out.backward(gy)``. ``gy`` defaults to a random
    array of out's shape and dtype. Ops returning (out, indices) are differentiated
    through ``out``.
    """
    import cnn_numba as cn

    tensors = [None if a is None else cn.tensor(a, requires_grad=np.asarray(a).dtype.kind == "f", device=device)
               for a in inputs]
    res = op(*tensors, **params)
    out = res[0] if isinstance(res, tuple) else res
    assert isinstance(out, cn.Tensor)
    if gy is None:
        gy = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(gy)
    grads = [None if t is None or t.grad is None else t.grad.numpy() for t in tensors]
    return out.numpy(), grads, gy


def assert_matches_reference(op, reference, reference_grads, inputs, dtype, algo, **params):
    """``op(*inputs, algo=algo, **params)`` and its gradients against the float64 references:
    y = reference(*inputs, **params), then gx, gw (and gb where a bias is given) from
    reference_grads(x, w, gy, **params)."""
    import reference as R

    out, grads, gy = forward_backward(op, inputs, algo=algo, **params)
    R.assert_close(out, reference(*inputs, **params), dtype, "y")
    for got, ref, what in zip(grads, reference_grads(*inputs[:2], gy, **params), ("gx", "gw", "gb")):
        if got is not None:
            R.assert_close(got, ref, dtype, what)


def random(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


# Under the simulator every CUDA launch's signature is recorded, and the last test of the run
# (test_cuda_typing.py) compiles them all as a real GPU would: the simulator never types a kernel.
LAUNCHED: set = set()


def _record_launch(kernel, args):
    from cuda_typecheck import describe

    fn = kernel.fn
    LAUNCHED.add((fn.__module__, fn.__qualname__, json.dumps([describe(a) for a in args])))


if CUDA_SIMULATED:
    from cnn_numba.kernels.cuda import launch as _launch

    _launch.record = _record_launch


def pytest_collection_modifyitems(items):
    """The typecheck of the recorded launches runs after every other test (a stable sort)."""
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)
