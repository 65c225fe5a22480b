"""Bad arguments raise ValueError/TypeError naming the argument (and the shapes), before any kernel runs."""
from __future__ import annotations

import re

import numpy as np
import pytest

import cnn_numba as cn
import cnn_numba.functional as F


@pytest.fixture(autouse=True)
def no_compute_kernels(monkeypatch):
    """Fail if an op reaches a compute kernel: validation must happen first.

    The functional layer finds kernels through ``cnn_numba.functional.kernel``; wrap it so
    that anything other than host transfers is an error during these tests.
    """
    import cnn_numba.functional as fmod

    real = getattr(fmod, "kernel", None)
    if real is None:  # pragma: no cover - the layout changed; the messages are still checked
        yield
        return

    def guarded(name, device):
        if name in ("from_host", "to_host", "conv2d_algorithms"):  # transfers; conv's table of names
            return real(name, device)
        raise AssertionError(f"kernel {name!r} was looked up before the arguments were rejected")

    monkeypatch.setattr(fmod, "kernel", guarded)
    yield


def x4(*shape, dtype=np.float32):
    return np.ones(shape, dtype)


def raises(exc, name, *shapes):
    """pytest.raises for ``exc`` whose message names ``name`` and contains every shape in ``shapes``."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc, match=name)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *args):
            handled = self.ctx.__exit__(*args)  # fails unless ``exc`` matching ``name`` was raised
            if handled:
                msg = str(self.info.value)
                for s in shapes:
                    assert str(tuple(s)) in msg, f"shape {tuple(s)} not in message: {msg!r}"
            return handled
    return Check()


# ----------------------------------------------------------------------------- conv2d


def test_conv2d_wrong_ndim():
    with raises(ValueError, "input", (3, 5, 5)):
        F.conv2d(x4(3, 5, 5), x4(2, 3, 3, 3))
    with raises(ValueError, "weight", (2, 3, 3)):
        F.conv2d(x4(1, 3, 5, 5), x4(2, 3, 3))


def test_conv2d_channel_mismatch():
    with raises(ValueError, "weight", (1, 3, 5, 5), (2, 2, 3, 3)):
        F.conv2d(x4(1, 3, 5, 5), x4(2, 2, 3, 3))
    with raises(ValueError, "weight", (1, 4, 5, 5), (2, 4, 3, 3)):
        F.conv2d(x4(1, 4, 5, 5), x4(2, 4, 3, 3), groups=2)   # grouped weight must have C_in/groups


def test_conv2d_groups_must_divide_channels():
    with raises(ValueError, "groups", (1, 4, 5, 5)):
        F.conv2d(x4(1, 4, 5, 5), x4(3, 1, 3, 3), groups=3)   # 3 does not divide C_in = 4
    with raises(ValueError, "groups", (3, 2, 3, 3)):
        F.conv2d(x4(1, 4, 5, 5), x4(3, 2, 3, 3), groups=2)   # 2 does not divide C_out = 3
    for g in (0, -1):
        with pytest.raises(ValueError, match="groups"):
            F.conv2d(x4(1, 4, 5, 5), x4(4, 4, 3, 3), groups=g)


def test_conv2d_non_positive_output_size():
    with raises(ValueError, "output size", (1, 1, 2, 2)):
        F.conv2d(x4(1, 1, 2, 2), x4(1, 1, 3, 3))
    with raises(ValueError, "output size", (1, 1, 4, 4)):
        F.conv2d(x4(1, 1, 4, 4), x4(1, 1, 2, 2), dilation=4)   # effective kernel 5 > 4


@pytest.mark.parametrize("kw, name", [
    (dict(stride=0), "stride"), (dict(stride=(1, 0)), "stride"), (dict(stride=-1), "stride"),
    (dict(dilation=0), "dilation"), (dict(dilation=(0, 1)), "dilation"),
    (dict(padding=-1), "padding"), (dict(padding=(0, -2)), "padding"), (dict(padding="full"), "padding"),
    (dict(padding="same", stride=2), "stride"), (dict(padding="same", stride=(1, 2)), "stride"),
    (dict(algo="fft"), "algo"), (dict(algo=None), "algo"),
])
def test_conv2d_bad_hyper_parameters(kw, name):
    with pytest.raises(ValueError, match=name):
        F.conv2d(x4(1, 2, 6, 6), x4(2, 2, 3, 3), **kw)


def test_conv2d_same_with_stride_names_padding_too():
    with pytest.raises(ValueError, match="same"):
        F.conv2d(x4(1, 2, 6, 6), x4(2, 2, 3, 3), padding="same", stride=2)


@pytest.mark.parametrize("dt", [np.int32, np.int64, np.uint8, np.bool_, object, np.complex128])
def test_conv2d_non_float_dtypes(dt):
    with pytest.raises(TypeError, match="input"):
        F.conv2d(np.ones((1, 1, 3, 3), dt), x4(1, 1, 2, 2))
    with pytest.raises(TypeError, match="weight"):
        F.conv2d(x4(1, 1, 3, 3), np.ones((1, 1, 2, 2), dt))
    with pytest.raises(TypeError, match="bias"):
        F.conv2d(x4(1, 1, 3, 3), x4(1, 1, 2, 2), np.ones(1, dt))


def test_conv2d_mixed_float_dtypes():
    with pytest.raises(TypeError, match="weight"):
        F.conv2d(x4(1, 1, 3, 3), x4(1, 1, 2, 2, dtype=np.float64))
    with pytest.raises(TypeError, match="bias"):
        F.conv2d(x4(1, 1, 3, 3), x4(1, 1, 2, 2), np.ones(1, np.float64))


def test_conv2d_bias_shape():
    with raises(ValueError, "bias", (3,)):
        F.conv2d(x4(1, 2, 4, 4), x4(2, 2, 3, 3), x4(3))
    with pytest.raises(ValueError, match="bias"):
        F.conv2d(x4(1, 2, 4, 4), x4(2, 2, 3, 3), x4(1, 2))


def test_conv2d_rejects_non_arrays():
    with pytest.raises(TypeError, match="input"):
        F.conv2d("not an array", x4(1, 1, 2, 2))
    with pytest.raises(TypeError, match="weight"):
        F.conv2d(x4(1, 1, 3, 3), {"w": 1})


# ----------------------------------------------------------------------------- conv_transpose2d


def test_conv_transpose2d_shape_errors():
    with raises(ValueError, "input", (2, 3, 3)):
        F.conv_transpose2d(x4(2, 3, 3), x4(2, 1, 3, 3))
    with raises(ValueError, "weight", (2, 1, 3)):
        F.conv_transpose2d(x4(1, 2, 3, 3), x4(2, 1, 3))
    with raises(ValueError, "weight", (1, 3, 4, 4), (2, 1, 3, 3)):
        F.conv_transpose2d(x4(1, 3, 4, 4), x4(2, 1, 3, 3))     # weight dim 0 must be C_in
    with raises(ValueError, "groups", (1, 3, 4, 4)):
        F.conv_transpose2d(x4(1, 3, 4, 4), x4(3, 1, 3, 3), groups=2)
    with raises(ValueError, "bias", (5,)):
        F.conv_transpose2d(x4(1, 4, 4, 4), x4(4, 2, 3, 3), x4(5), groups=2)  # C_out = 2 * 2 = 4


def test_conv_transpose2d_non_positive_output_size():
    with raises(ValueError, "output size", (1, 1, 1, 1)):
        F.conv_transpose2d(x4(1, 1, 1, 1), x4(1, 1, 1, 1), padding=1)


@pytest.mark.parametrize("kw, name", [
    (dict(stride=0), "stride"), (dict(dilation=(1, 0)), "dilation"),
    (dict(padding=-1), "padding"), (dict(output_padding=-1), "output_padding"),
    (dict(stride=2, output_padding=2), "output_padding"),                     # op >= stride and >= dilation
    (dict(stride=(2, 1), dilation=(1, 2), output_padding=(1, 2)), "output_padding"),
    (dict(dilation=2, output_padding=2), "output_padding"),
    (dict(padding="same"), "padding"),
    (dict(algo="fft"), "algo"),
])
def test_conv_transpose2d_bad_hyper_parameters(kw, name):
    with pytest.raises((ValueError, TypeError), match=name):
        F.conv_transpose2d(x4(1, 2, 4, 4), x4(2, 2, 3, 3), **kw)


def test_conv_transpose2d_dtypes():
    with pytest.raises(TypeError, match="input"):
        F.conv_transpose2d(np.ones((1, 2, 3, 3), np.int64), x4(2, 1, 2, 2))
    with pytest.raises(TypeError, match="weight"):
        F.conv_transpose2d(x4(1, 2, 3, 3), x4(2, 1, 2, 2, dtype=np.float64))


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_argument_errors(op):
    pool = F.max_pool2d if op == "max" else F.avg_pool2d
    with raises(ValueError, "input", (2, 5, 5)):
        pool(x4(2, 5, 5), 2)
    with pytest.raises(TypeError, match="input"):
        pool(np.ones((1, 1, 4, 4), np.int32), 2)
    for k in (0, (2, 0), -1):
        with pytest.raises(ValueError, match="kernel_size"):
            pool(x4(1, 1, 4, 4), k)
    with pytest.raises(ValueError, match="stride"):
        pool(x4(1, 1, 4, 4), 2, stride=0)
    with pytest.raises(ValueError, match="padding"):
        pool(x4(1, 1, 4, 4), 2, padding=-1)
    with pytest.raises(ValueError, match="padding"):
        pool(x4(1, 1, 6, 6), 3, padding=2)                       # more than half the kernel
    with pytest.raises(ValueError, match="padding"):
        pool(x4(1, 1, 6, 6), (3, 2), padding=(1, 2))
    with raises(ValueError, "output size", (1, 1, 1, 1)):
        pool(x4(1, 1, 1, 1), 2)


def test_max_pool_padding_limit_uses_the_kernel_size_like_pytorch():
    """PyTorch checks ``padding <= kernel_size // 2`` on the raw kernel, whatever the dilation;
    a dilated window with more padding than that can fall entirely in the padding."""
    with pytest.raises(ValueError, match="padding"):
        F.max_pool2d(x4(1, 1, 2, 2), 2, stride=1, padding=3, dilation=5)
    with pytest.raises(ValueError, match="padding"):
        F.max_pool2d(x4(1, 1, 8, 8), 2, padding=2, dilation=3)
    with pytest.raises(ValueError, match="dilation"):
        F.max_pool2d(x4(1, 1, 8, 8), 2, dilation=0)


def test_adaptive_and_unpool_errors():
    with pytest.raises(ValueError, match="output_size"):
        F.adaptive_avg_pool2d(x4(1, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="output_size"):
        F.adaptive_avg_pool2d(x4(1, 1, 4, 4), (2, -1))
    with raises(ValueError, "input", (4, 4)):
        F.adaptive_avg_pool2d(x4(4, 4), 2)
    with pytest.raises(TypeError, match="input"):
        F.adaptive_avg_pool2d(np.ones((1, 1, 4, 4), np.int64), 2)
    x, idx = x4(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int64)
    with raises(ValueError, "indices", (1, 1, 2, 3)):
        F.max_unpool2d(x, np.zeros((1, 1, 2, 3), np.int64), 2)
    with pytest.raises(TypeError, match="indices"):
        F.max_unpool2d(x, idx.astype(np.float32), 2)
    with pytest.raises(ValueError, match="output_size"):
        F.max_unpool2d(x, idx, 2, output_size=(9, 9))            # PyTorch: within (default - stride, default + stride)
    with pytest.raises(ValueError, match="kernel_size"):
        F.max_unpool2d(x, idx, 0)
    with pytest.raises(ValueError, match="stride"):
        F.max_unpool2d(x, idx, 2, stride=0)


@pytest.mark.parametrize("output_size, exc", [((None, None), TypeError), ("ab", TypeError), (6, TypeError),
                                               ((4.0, 4), TypeError), ((True, 4), TypeError), ((1, 2, 3), ValueError)])
def test_unpool_output_size_types_like_pytorch(output_size, exc):
    """PyTorch: a sequence of ints (TypeError otherwise) of 2 or 4 entries (ValueError)."""
    with pytest.raises(exc, match="output_size"):
        F.max_unpool2d(x4(1, 1, 2, 2), np.zeros((1, 1, 2, 2), np.int64), 2, output_size=output_size)


@pytest.mark.parametrize("divisor, exc", [(True, TypeError), (False, TypeError), (2.0, TypeError), ("2", TypeError),
                                          (0, ValueError), (np.int64(0), ValueError)])
def test_avg_pool_divisor_override_like_pytorch(divisor, exc):
    """An int (a bool is not one here, as in PyTorch), and not 0."""
    with pytest.raises(exc, match="divisor_override"):
        F.avg_pool2d(x4(1, 1, 4, 4), 2, divisor_override=divisor)


@pytest.mark.parametrize("pool, kw", [(F.max_pool2d, dict(kernel_size=2, padding=1)),
                                      (F.avg_pool2d, dict(kernel_size=3, stride=1, padding=1)),
                                      (F.adaptive_avg_pool2d, dict(output_size=1))])
@pytest.mark.parametrize("shape", [(1, 1, 0, 4), (1, 1, 4, 0), (1, 0, 4, 4)])
def test_pools_of_empty_planes_are_errors_like_pytorch(pool, kw, shape):
    """Padding made these windows of padding only (-inf from max, NaN from the mean); PyTorch
    accepts only an empty batch."""
    with raises(ValueError, "input", shape):
        pool(x4(*shape), **kw)
    with raises(ValueError, "input", shape):
        F.max_unpool2d(x4(*shape), np.zeros(shape, np.int64), 2)


def test_relu_rejects_integers():
    with pytest.raises(TypeError, match="input"):
        F.relu(np.ones((2, 2), np.int64))


# ----------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("make", [lambda v: cn.tensor(v), lambda v: F.relu(v),
                                  lambda v: F.add(cn.tensor(np.ones(2, np.float32)), v)],
                         ids=["tensor", "relu", "add"])
def test_ragged_lists_name_the_argument(make):
    with pytest.raises(ValueError, match=r"^(data|input|other) must be a rectangular nested sequence"):
        make([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("make, name", [
    (lambda: cn.nn.Conv2d(-1, 3, 3), "in_channels"), (lambda: cn.nn.Conv2d(3, -2, 3), "out_channels"),
    (lambda: cn.nn.ConvTranspose2d(-1, 3, 3), "in_channels"), (lambda: cn.nn.ConvTranspose2d(2, -3, 3), "out_channels"),
    (lambda: cn.nn.Linear(-1, 3), "in_features"), (lambda: cn.nn.Linear(3, -1), "out_features"),
    (lambda: cn.nn.BatchNorm2d(-4), "num_features"), (lambda: cn.nn.BatchNorm1d(-4), "num_features"),
    (lambda: cn.nn.extra.Subsampling2d(-2), "num_channels"),
])
def test_layer_sizes_are_named(make, name):
    with pytest.raises(ValueError, match=f"^{name} must be >= 0, got -"):
        make()


def test_layer_sizes_must_be_ints_and_may_be_zero():
    with pytest.raises(TypeError, match="in_channels must be an int, got 2.0"):
        cn.nn.Conv2d(2.0, 3, 3)
    with pytest.raises(TypeError, match="in_features must be an int, got True"):
        cn.nn.Linear(True, 3)
    assert cn.nn.Linear(0, 3).weight.shape == (3, 0)          # empty, as PyTorch makes it
    assert cn.nn.Conv2d(0, 3, 3).weight.shape == (3, 0, 3, 3)


def test_tensor_errors():
    with pytest.raises(TypeError):
        cn.tensor(np.ones(3, np.int64), requires_grad=True)        # only float tensors take gradients
    with pytest.raises(TypeError):
        cn.tensor(np.array(["a"]))
    with pytest.raises(ValueError, match="device"):
        cn.tensor([1.0], device="tpu")
    with pytest.raises(ValueError, match=re.escape("(2, 3)")):
        cn.tensor(np.ones((2, 3))).reshape(4, 2)
    for bad in [(3, -1, -1), (-2, 3), (7,)]:  # numpy alone would take -2 as -1; PyTorch refuses it
        with pytest.raises(ValueError, match=re.escape("cannot reshape tensor of shape (2, 3)")):
            cn.tensor(np.ones((2, 3))).reshape(*bad)

