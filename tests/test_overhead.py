"""The per-call caches that cut the Python time around the conv kernels (bench/op_overhead.py)
keep every check: a remembered ConvGeom or algorithm pick is reused only for exactly the
arguments that passed before, and every bad argument still raises, every time."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba.functional as F
from cnn_numba import shapes
from cnn_numba.kernels.conv_algos import TABLE

XS, WS = (2, 4, 9, 9), (6, 4, 3, 3)


def test_conv_geometry_is_remembered_for_the_same_arguments():
    g = shapes.conv2d_geom(XS, WS, 2, 1, 1, 1)
    assert shapes.conv2d_geom(XS, WS, 2, 1, 1, 1) is g
    assert (g.oh, g.ow, g.sh, g.ph) == (5, 5, 2, 1)
    # Equal-hashing spellings are checked afresh: np.int64 is accepted, a bool is not.
    assert shapes.conv2d_geom(XS, WS, np.int64(2), 1, 1, 1) == g
    assert shapes.conv2d_geom(XS, WS, stride=2, padding=1, dilation=1, groups=1) == g
    for stride in (True, (2, True)):
        with pytest.raises(TypeError, match="stride"):
            shapes.conv2d_geom(XS, WS, stride, 1, 1, 1)
    assert shapes.conv2d_geom(XS, WS, (2, 2), 1, 1, 1) == g  # a tuple is another key, the same geometry
    t = shapes.conv_transpose2d_geom(XS, (4, 3, 3, 3), 2, 1, 1, 1, 1)
    assert shapes.conv_transpose2d_geom(XS, (4, 3, 3, 3), 2, 1, 1, 1, 1) is t and (t.h, t.w) == (18, 18)


@pytest.mark.parametrize("call", range(2))  # the second call finds the first's entries cached
def test_errors_are_raised_every_time(call, rng):
    with pytest.raises(ValueError, match="groups=3"):
        shapes.conv2d_geom(XS, WS, 1, 0, 1, 3)
    with pytest.raises(ValueError, match="output_padding"):
        shapes.conv_transpose2d_geom(XS, (4, 3, 3, 3), 1, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        shapes.conv2d_geom(XS, WS, 2, "same", 1, 1)
    geom = shapes.conv2d_geom(XS, WS, 1, 1, 1, 1)
    assert TABLE.pick("auto", geom, "forward") is TABLE.pick("auto", geom, "forward")
    for algo in ("fft", ["auto"], None):
        with pytest.raises(ValueError, match="algo must be one of"):
            TABLE.pick(algo, geom, "forward")
    x = rng.standard_normal(XS).astype(np.float32)
    with pytest.raises(TypeError, match="dtypes differ"):
        F.conv2d(x, rng.standard_normal(WS), padding=1)
    y = F.conv2d(x, rng.standard_normal(WS).astype(np.float32), padding=1)
    assert y.shape == (2, 6, 9, 9)


def test_same_dtype_check():
    f32, f64 = np.zeros(2, np.float32), np.zeros(2)
    shapes.check_same_dtype(a=f32, b=f32.copy(), c=None)
    shapes.check_same_dtype()
    with pytest.raises(TypeError, match="a: float32, b: float64"):
        shapes.check_same_dtype(a=f32, b=f64, c=None)
