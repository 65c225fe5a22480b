"""Shared fixtures and the one helper that runs a package op forward and backward.

Tests import the helpers with ``from conftest import ...`` (pytest puts tests/ on
sys.path, there being no tests/__init__.py).
"""
from __future__ import annotations

import numpy as np
import pytest

DTYPES = [np.float32, np.float64]
ALGOS = ["direct", "im2col", "auto"]


@pytest.fixture
def rng():
    return np.random.default_rng(20240531)


def forward_backward(op, inputs, gy=None, seed=0, **params):
    """Run ``op(*inputs, **params)`` with every float input requiring grad (integer
    inputs, e.g. pooling indices, become plain tensors; None stays None).

    Returns ``(out, grads, gy)``: ``out`` the output as numpy, ``grads`` one numpy
    gradient (or None) per input after ``out.backward(gy)``. ``gy`` defaults to a random
    array of out's shape and dtype. Ops returning (out, indices) are differentiated
    through ``out``.
    """
    import cnn_numba as cn

    tensors = [None if a is None else cn.tensor(a, requires_grad=np.asarray(a).dtype.kind == "f")
               for a in inputs]
    res = op(*tensors, **params)
    out = res[0] if isinstance(res, tuple) else res
    assert isinstance(out, cn.Tensor)
    if gy is None:
        gy = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
    out.backward(gy)
    grads = [None if t is None or t.grad is None else t.grad.numpy() for t in tensors]
    return out.numpy(), grads, gy


def random(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)
