"""conv_transpose2d forward and gradients against the float64 scatter reference."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba as cn
import cnn_numba.functional as F
import reference as R
from conftest import ALGOS, DTYPES, NAMED_ALGOS, assert_matches_reference, forward_backward, random

# (x shape, w shape (C_in, C_out/groups, kH, kW), bias?, keyword arguments)
CASES = [
    ((1, 1, 1, 1), (1, 1, 1, 1), True, {}),
    ((2, 2, 3, 3), (2, 3, 3, 3), True, dict(stride=2, padding=1, output_padding=1)),
    ((1, 3, 4, 5), (3, 2, 3, 2), True, dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2))),
    ((2, 4, 3, 3), (4, 3, 2, 2), False, dict(groups=2, stride=2)),
    ((1, 3, 4, 4), (3, 1, 3, 3), True, dict(groups=3, padding=1)),                   # depthwise
    ((2, 2, 3, 2), (2, 2, 1, 3), False, dict(groups=2, stride=(1, 2))),              # multiplier 2
    ((1, 2, 3, 4), (2, 2, 3, 3), True, dict(dilation=2, padding=1)),
    ((1, 2, 3, 3), (2, 1, 2, 2), True, dict(dilation=3, output_padding=2)),          # op < dilation, op >= stride
    ((2, 1, 3, 3), (1, 2, 2, 2), True, dict(stride=3, output_padding=2)),            # stride > kernel
    ((1, 2, 2, 2), (2, 1, 3, 3), True, dict(stride=2, padding=2)),                   # crops to one pixel
    ((1, 2, 1, 1), (2, 3, 4, 3), True, {}),                                          # 1x1 input
    ((1, 2, 4, 3), (2, 2, 4, 4), True, dict(stride=2, padding=(1, 2), dilation=(1, 2), output_padding=(1, 1))),
    ((2, 3, 5, 4), (3, 2, 3, 1), True, dict(stride=(1, 2), padding=(2, 0))),
]
IDS = [f"case{i}" for i in range(len(CASES))]


def _inputs(rng, case, dtype):
    xs, ws, bias, kw = case
    b = random(rng, (ws[1] * kw.get("groups", 1),), dtype) if bias else None
    return random(rng, xs, dtype), random(rng, ws, dtype), b, kw


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_is_the_adjoint_of_conv2d(rng, case):
    """<conv_transpose2d(x, w), y> == <x, conv2d(y, w)>: the two references agree as adjoints."""
    x, w, _, kw = _inputs(rng, case, np.float64)
    z = R.conv_transpose2d(x, w, **kw)
    y = rng.standard_normal(z.shape)
    conv_kw = {k: v for k, v in kw.items() if k != "output_padding"}
    cy = R.conv2d(y, w, **conv_kw)  # output_padding may leave extra rows/columns at the end: crop them
    assert cy.shape[:2] == x.shape[:2] and cy.shape[2] >= x.shape[2] and cy.shape[3] >= x.shape[3]
    cy = cy[:, :, :x.shape[2], :x.shape[3]]
    assert np.isclose(np.sum(z * y), np.sum(x * cy), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_grads_match_finite_differences(rng, case):
    x, w, b, kw = _inputs(rng, case, np.float64)
    gy = rng.standard_normal(R.conv_transpose2d(x, w, b, **kw).shape)
    gx, gw, gb = R.conv_transpose2d_grads(x, w, gy, **kw)
    R.assert_close(gx, R.numerical_grad(lambda v: R.conv_transpose2d(v, w, b, **kw), x, gy), np.float32, "gx")
    R.assert_close(gw, R.numerical_grad(lambda v: R.conv_transpose2d(x, v, b, **kw), w, gy), np.float32, "gw")
    if b is not None:
        R.assert_close(gb, R.numerical_grad(lambda v: R.conv_transpose2d(x, w, v, **kw), b, gy), np.float32)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    x, w, b, kw = _inputs(rng, case, np.float64)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv_transpose2d(tx, tw, tb, **kw)
    gy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(gy))
    R.assert_close(ty.detach().numpy(), R.conv_transpose2d(x, w, b, **kw))
    gx, gw, gb = R.conv_transpose2d_grads(x, w, gy, **kw)
    R.assert_close(tx.grad.numpy(), gx)
    R.assert_close(tw.grad.numpy(), gw)
    if b is not None:
        R.assert_close(tb.grad.numpy(), gb)


# ----------------------------------------------------------------------------- the package


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_transpose2d_forward_and_grads(rng, case, dtype, algo, device):
    x, w, b, kw = _inputs(rng, case, dtype)
    out, (gx, gw, gb), gy = forward_backward(F.conv_transpose2d, (x, w, b), algo=algo, device=device, **kw)
    assert out.dtype == dtype
    R.assert_close(out, R.conv_transpose2d(x, w, b, **kw), dtype, "y")
    rgx, rgw, rgb = R.conv_transpose2d_grads(x, w, gy, **kw)
    R.assert_close(gx, rgx, dtype, "gx")
    R.assert_close(gw, rgw, dtype, "gw")
    if b is not None:
        R.assert_close(gb, rgb, dtype, "gb")


@pytest.mark.parametrize("algo", NAMED_ALGOS)
@pytest.mark.parametrize("case", [CASES[i] for i in (2, 5, 7, 11)], ids=lambda c: str(c[3]))
def test_conv_transpose2d_grads_match_finite_differences(rng, case, algo):
    x, w, b, kw = _inputs(rng, case, np.float64)
    _, (gx, gw, gb), gy = forward_backward(F.conv_transpose2d, (x, w, b), algo=algo, **kw)

    def fwd(xx, ww, bb):
        with cn.no_grad():
            return F.conv_transpose2d(xx, ww, bb, algo=algo, **kw).numpy()

    R.assert_close(gx, R.numerical_grad(lambda v: fwd(v, w, b), x, gy), np.float32, "gx")
    R.assert_close(gw, R.numerical_grad(lambda v: fwd(x, v, b), w, gy), np.float32, "gw")
    if b is not None:
        R.assert_close(gb, R.numerical_grad(lambda v: fwd(x, w, v), b, gy), np.float32, "gb")


# conv_transpose2d at stride > 1 through the flat kernels (kernels/conv_stride1.py): its
# forward is their adjoint pass (one stride-1 correlation per phase of the output), its
# input-gradient their polyphase forward. output_padding (a trailing crop of the conv2d),
# strides 2 and 3, dilation, odd and even kernels, groups.
STRIDED_CASES = [
    ((2, 8, 5, 6), (8, 4, 4, 4), dict(stride=2, padding=1)),                       # the benchmark's layer
    ((2, 4, 4, 5), (4, 3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 3, 4, 3), (3, 2, 3, 3), dict(stride=3, padding=(0, 2), output_padding=(2, 1))),
    ((2, 4, 3, 4), (4, 1, 3, 3), dict(stride=2, dilation=2, padding=2, output_padding=1, groups=4)),
    ((1, 4, 4, 4), (4, 3, 5, 4), dict(stride=(2, 3), padding=(4, 1), groups=2)),
    ((1, 2, 3, 3), (2, 2, 2, 2), dict(stride=3, output_padding=2)),                 # outputs no tap reaches
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", STRIDED_CASES, ids=[str(c[2]) for c in STRIDED_CASES])
def test_strided_direct_runs_the_flat_kernels(rng, case, dtype):
    from cnn_numba.kernels.conv_algos import FLAT, TABLE
    from cnn_numba.shapes import conv_transpose2d_geom
    xs, ws, kw = case
    geom = conv_transpose2d_geom(xs, ws, kw["stride"], kw.get("padding", 0), kw.get("output_padding", 0),
                                 kw.get("groups", 1), kw.get("dilation", 1))
    for p in ("forward", "backward_input", "backward_weight"):
        assert TABLE.pick("direct", geom, p).special is FLAT and FLAT.supports(geom, p), p
    x, w = random(rng, xs, dtype), random(rng, ws, dtype)
    b = random(rng, (ws[1] * kw.get("groups", 1),), dtype)
    assert_matches_reference(F.conv_transpose2d, R.conv_transpose2d, R.conv_transpose2d_grads, (x, w, b), dtype,
                             "direct", **kw)


def test_algorithms_agree(rng):
    x, w, b, kw = _inputs(rng, CASES[11], np.float32)
    (o1, g1, _), *rest = (forward_backward(F.conv_transpose2d, (x, w, b), algo=a, seed=3, **kw)
                          for a in NAMED_ALGOS)
    for o2, g2, _ in rest:
        R.assert_close(o1, o2, np.float32)
        for a, bb in zip(g1, g2):
            R.assert_close(a, bb, np.float32)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_conv_transpose2d_batch_zero(rng, dtype, algo):
    x = np.zeros((0, 4, 3, 2), dtype)
    w, b = random(rng, (4, 3, 3, 3), dtype), random(rng, (6,), dtype)
    out, (gx, gw, gb), _ = forward_backward(F.conv_transpose2d, (x, w, b), algo=algo, groups=2, stride=2,
                                            output_padding=1)
    assert out.shape == (0, 6, 8, 6) and out.dtype == dtype
    assert gx.shape == x.shape
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    np.testing.assert_array_equal(gb, np.zeros_like(b))


def test_conv_transpose2d_restores_the_size_conv2d_reduced(rng):
    """stride 2, k 3, p 1: conv2d maps 7 -> 4 and 8 -> 4; output_padding picks which comes back."""
    w = rng.standard_normal((2, 2, 3, 3))
    for size, op in ((7, 0), (8, 1)):
        x = rng.standard_normal((1, 2, size, size))
        y = F.conv2d(x, w, stride=2, padding=1)
        assert y.shape[2:] == (4, 4)
        z = F.conv_transpose2d(y, w, stride=2, padding=1, output_padding=op)
        assert z.shape == x.shape


@pytest.mark.parametrize("algo", ALGOS)
def test_conv_transpose2d_accepts_non_contiguous_and_read_only_arrays(rng, algo):
    x = rng.standard_normal((2, 4, 6, 5))[:, ::2, ::-2, :]
    x.flags.writeable = False
    w = rng.standard_normal((3, 2, 2, 2)).transpose(1, 0, 3, 2)  # (2, 3, 2, 2) with permuted strides
    w.flags.writeable = False
    y = F.conv_transpose2d(x, w, stride=2, output_padding=1, algo=algo)
    R.assert_close(y.numpy(), R.conv_transpose2d(x, w, stride=2, output_padding=1))
