"""The CUDA layer kernels (kernels/cuda/nn.py) through the public API on device "cuda":
sigmoid, tanh, batch_norm, cross_entropy and the SGD/Adam/AdamW steps.

Each op is checked against the independent float64 numpy references of tests/test_nn.py and
tests/test_optim.py (forward and hand-written gradients), and edge cases (empty batch, NaN)
against the same op on "cpu". Without a GPU the kernels run under Numba's CUDA simulator,
where every thread is a Python thread: shapes are tiny, but chosen so that the per-channel
and per-row reductions take each of their paths (rows shorter and longer than a block,
more rows than thread groups, more classes than the warp).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import DTYPES, forward_backward, needs_cuda
from test_nn import bn_reference, ce_reference, tol
from test_optim import adam_reference, sgd_reference

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba import nn, optim

pytestmark = needs_cuda

CUDA = "cuda"


def cuda_tensor(a):
    return cn.tensor(a, device=CUDA)


def shape_id(shape):
    return "x".join(map(str, shape))


def close_nan(got, ref, dtype):
    """Equal up to the dtype's tolerance, with NaN exactly where ref has NaN."""
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, **tol(dtype))


# ----------------------------------------------------------------------------- sigmoid, tanh

ACTIVATIONS = [
    (F.sigmoid, lambda v: 1 / (1 + np.exp(-v)), lambda v: np.exp(-v) / (1 + np.exp(-v)) ** 2),
    (F.tanh, np.tanh, lambda v: 1 / np.cosh(v) ** 2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, fwd, grad", ACTIVATIONS, ids=["sigmoid", "tanh"])
@pytest.mark.parametrize("shape", [(2, 3, 7), (0, 3)], ids=shape_id)
def test_activation_matches_reference(dtype, op, fwd, grad, shape):
    x = np.random.default_rng(2).standard_normal(shape) * 3
    y, (gx,), gy = forward_backward(op, [x.astype(dtype)], device=CUDA)
    assert y.dtype == dtype and gx.dtype == dtype and y.shape == shape and gx.shape == shape
    np.testing.assert_allclose(y, fwd(x), **tol(dtype))
    np.testing.assert_allclose(gx, gy * grad(x), **tol(dtype))


@pytest.mark.parametrize("op", [F.sigmoid, F.tanh])
def test_activation_saturates_and_propagates_nan(op):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0, np.inf, -np.inf, np.nan], np.float32)
    gy = np.ones_like(x)
    y, (gx,), _ = forward_backward(op, [x], gy=gy, device=CUDA)
    ry, (rgx,), _ = forward_backward(op, [x], gy=gy)
    close_nan(y, ry, np.float32)
    close_nan(gx, rgx, np.float32)
    assert np.all(np.isfinite(y[:-1])) and np.isnan(y[-1]) and np.isnan(gx[-1])


# ----------------------------------------------------------------------------- batch norm

# (N, C) and (N, C, *): rows of L = 1 and of L = 3 (not dividing the simulator's 8-thread block),
# more rows than the block has groups of L threads; rows of L = 36, longer than the simulator's
# block (and, in one case, L = 289, longer than a GPU's 256-thread block)
BN_SHAPES = [(20, 2), (4, 2, 3), (2, 2, 6, 6)]
AFFINE = {"wb": (True, True), "none": (False, False), "w": (True, False)}
BN_TRAINING = [(dtype, shape, affine) for dtype in DTYPES for shape in BN_SHAPES for affine in AFFINE]
BN_TRAINING.append((np.float32, (2, 2, 17, 17), "wb"))


def bn_inputs(shape, dtype, affine):
    r = np.random.default_rng(5)
    x = (r.standard_normal(shape) * 2 + 1).astype(dtype)
    w, b = r.standard_normal(shape[1]).astype(dtype), r.standard_normal(shape[1]).astype(dtype)
    return x, (w if affine[0] else None), (b if affine[1] else None)


@pytest.mark.parametrize("dtype, shape, affine", BN_TRAINING,
                         ids=[f"{d.__name__}-{shape_id(s)}-{a}" for d, s, a in BN_TRAINING])
def test_batch_norm_training_matches_reference(dtype, shape, affine):
    x, w, b = bn_inputs(shape, dtype, AFFINE[affine])
    c = shape[1]
    rm, rv = cuda_tensor(np.zeros(c, dtype)), cuda_tensor(np.ones(c, dtype))
    y, (gx, gw, gb), gy = forward_backward(
        lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5), [x, w, b],
        device=CUDA)
    ones, zeros = np.ones(c), np.zeros(c)
    ry, rgx, rgw, rgb, mean, var = bn_reference(x.astype(np.float64), ones if w is None else w.astype(np.float64),
                                                zeros if b is None else b.astype(np.float64), 1e-5,
                                                gy.astype(np.float64))
    assert y.dtype == dtype and gx.dtype == dtype
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    assert (gw is None) == (w is None) and (gb is None) == (b is None)
    for got, ref in [(y, ry), (gx, rgx), (gw, rgw), (gb, rgb)]:
        if got is not None:
            np.testing.assert_allclose(got, ref, **t)
    m = x.size // c
    np.testing.assert_allclose(rm.numpy(), 0.1 * mean, **t)                        # running stats, in place
    np.testing.assert_allclose(rv.numpy(), 0.9 + 0.1 * var * m / (m - 1), **t)     # unbiased variance


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (5, 3), (0, 3, 2, 2)], ids=shape_id)
@pytest.mark.parametrize("affine", ["wb", "none"])
def test_batch_norm_eval_uses_running_stats(dtype, shape, affine):
    r = np.random.default_rng(7)
    x, w, b = bn_inputs(shape, dtype, AFFINE[affine])
    rm_host, rv_host = r.standard_normal(3).astype(dtype), (r.random(3) + 0.5).astype(dtype)
    rm, rv = cuda_tensor(rm_host), cuda_tensor(rv_host)
    y, (gx, gw, gb), gy = forward_backward(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3),
                                           [x, w, b], device=CUDA)
    s = (1, 3) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    w64 = np.ones(3) if w is None else w.astype(np.float64)
    xhat = (x - rm_host.reshape(s)) / np.sqrt(rv_host.astype(np.float64).reshape(s) + 1e-3)
    assert y.shape == shape and gx.shape == shape
    np.testing.assert_allclose(y, xhat * w64.reshape(s) + (0 if b is None else b.reshape(s)), **tol(dtype))
    np.testing.assert_allclose(gx, gy * (w64 / np.sqrt(rv_host + 1e-3)).reshape(s), **tol(dtype))
    if w is not None:
        np.testing.assert_allclose(gw, (gy * xhat).sum(axes), **tol(dtype))           # zeros for an empty batch
        np.testing.assert_allclose(gb, gy.sum(axes), **tol(dtype))
    np.testing.assert_array_equal(rm.numpy(), rm_host)                                # eval leaves them alone
    np.testing.assert_array_equal(rv.numpy(), rv_host)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_nan_stays_in_its_channel_and_runs_are_identical(training):
    x = np.random.default_rng(8).standard_normal((3, 2, 2, 3)).astype(np.float32)
    x[1, 0, 1, 2] = np.nan
    rv = np.ones(2, np.float32)
    results = []
    for device in (CUDA, CUDA, "cpu"):
        def op(x, w, b):
            return F.batch_norm(x, cn.tensor(np.zeros(2, np.float32), device=device),
                                cn.tensor(rv, device=device), w, b, training=training)

        y, grads, _ = forward_backward(op, [x, np.full(2, 1.5, np.float32), np.full(2, 0.5, np.float32)],
                                       device=device)
        results.append([y] + grads)
    for got, again, ref in zip(*results):
        np.testing.assert_array_equal(got, again)                                   # deterministic
        close_nan(got, ref, np.float32)
    y = results[0][0]
    assert np.all(np.isfinite(y[:, 1])) and np.isnan(y[:, 0]).sum() == (y[:, 0].size if training else 1)


def test_batchnorm2d_module_on_cuda_tracks_like_cpu():
    r = np.random.default_rng(9)
    gpu, cpu = nn.BatchNorm2d(2, momentum=0.3).to(CUDA), nn.BatchNorm2d(2, momentum=0.3)
    for _ in range(2):
        x = (r.standard_normal((3, 2, 2, 2)) * 2 + 1).astype(np.float32)
        gpu(cuda_tensor(x)), cpu(cn.tensor(x))
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(gpu, name).numpy(), getattr(cpu, name).numpy(), rtol=1e-6, atol=1e-7)
    gpu.eval(), cpu.eval()
    np.testing.assert_allclose(gpu(cuda_tensor(x)).numpy(), cpu(cn.tensor(x)).numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- cross-entropy

def ce(reduction="mean", eps=0.0):
    return lambda z, t: F.cross_entropy(z, t, reduction=reduction, label_smoothing=eps)


def check_ce(z, t, dtype, reduction, eps):
    out, (gz, gt), gy = forward_backward(ce(reduction, eps), [z.astype(dtype), t], device=CUDA)
    loss, grad_rows = ce_reference(z, t, reduction, eps)
    assert out.dtype == dtype and out.shape == np.shape(loss) and gt is None and gz.dtype == dtype
    np.testing.assert_allclose(out, loss, **tol(dtype))
    gl = gy.astype(np.float64).reshape(-1, 1) if reduction == "none" else float(gy)
    np.testing.assert_allclose(gz, gl * grad_rows, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_reference(dtype, reduction, eps):
    z = np.random.default_rng(12).standard_normal((5, 4)) * 3
    check_ce(z, np.array([0, 3, 1, 3, 2]), dtype, reduction, eps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_more_classes_than_a_warp(dtype):
    r = np.random.default_rng(13)
    check_ce(r.standard_normal((2, 37)) * 4, np.array([36, 5]), dtype, "none", 0.2)


def test_cross_entropy_is_stable_and_propagates_nan():
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0], [0.0, np.nan, 1.0]], np.float32)
    t = np.array([0, 0, 2])
    rows, (gz, _), _ = forward_backward(ce("none", 0.1), [z, t], gy=np.ones(3, np.float32), device=CUDA)
    ref_rows, (ref_gz, _), _ = forward_backward(ce("none", 0.1), [z, t], gy=np.ones(3, np.float32))
    np.testing.assert_allclose(rows[:2], ce_reference(z[:2].astype(np.float64), t[:2], "none", 0.1)[0], rtol=1e-6)
    close_nan(rows, ref_rows, np.float32)
    close_nan(gz, ref_gz, np.float32)
    assert np.isnan(rows[2]) and np.all(np.isnan(gz[2])) and np.all(np.isfinite(gz[:2]))


@pytest.mark.parametrize("reduction, expected", [("none", np.zeros(0)), ("sum", 0.0), ("mean", np.nan)])
def test_cross_entropy_empty_batch(reduction, expected):
    out, (gz, _), _ = forward_backward(ce(reduction), [np.zeros((0, 4)), np.zeros(0, np.int64)], device=CUDA)
    np.testing.assert_array_equal(out, expected)
    assert gz.shape == (0, 4)


# ----------------------------------------------------------------------------- optimisers

P0 = np.array([[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]])

OPTIMISERS = [
    (optim.SGD, dict(lr=0.1)),
    (optim.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3)),
    (optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (optim.SGD, dict(lr=0.02, momentum=0.5, weight_decay=0.1, maximize=True)),
    (optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (optim.Adam, dict(lr=0.01, amsgrad=True, maximize=True)),
    (optim.AdamW, dict(lr=0.01, weight_decay=0.5, amsgrad=True)),
]


def optimiser_reference(cls, kw, grads):
    if cls is optim.SGD:
        return sgd_reference(P0, grads, **kw)
    kw = dict(kw, decoupled=cls is optim.AdamW)
    if kw.pop("maximize", False):        # PyTorch negates the gradient before anything else
        grads = [-g for g in grads]
    return adam_reference(P0, grads, **kw)


def run_steps(cls, kw, grads, dtype, device):
    p = nn.Parameter(cn.tensor(P0.astype(dtype), device=device))
    opt = cls([p], **kw)
    for g in grads:
        p.grad = cn.tensor(g.astype(dtype), device=device)
        opt.step()
    return p, opt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls, kw", OPTIMISERS,
                         ids=[f"{c.__name__}({','.join(f'{k}={v}' for k, v in kw.items())})" for c, kw in OPTIMISERS])
def test_optimiser_steps_match_reference_and_cpu(dtype, cls, kw):
    r = np.random.default_rng(0)
    grads = [r.standard_normal(P0.shape) * 0.5 ** i for i in range(3)]  # shrinking: amsgrad's max matters
    p, opt = run_steps(cls, kw, grads, dtype, CUDA)
    cpu_p, cpu_opt = run_steps(cls, kw, grads, dtype, "cpu")
    got = p.numpy()
    assert got.dtype == dtype and p.device == CUDA
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, optimiser_reference(cls, kw, grads), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(got, cpu_p.numpy(), rtol=rtol, atol=rtol)
    state, cpu_state = opt.state_dict()["state"][0], cpu_opt.state_dict()["state"][0]
    assert state.keys() == cpu_state.keys()
    for name, value in state.items():                                  # momentum buffer, moments, step
        np.testing.assert_allclose(value, cpu_state[name], rtol=rtol, atol=rtol, err_msg=name)


@pytest.mark.parametrize("cls, kw", [(optim.SGD, dict(lr=0.1, momentum=0.9)), (optim.AdamW, dict(lr=0.1))])
def test_optimiser_nan_gradient_stays_in_its_element(cls, kw):
    g = np.ones(P0.shape)
    g[1, 0] = np.nan
    p, _ = run_steps(cls, kw, [g, g], np.float32, CUDA)
    nan = np.isnan(p.numpy())
    assert nan[1, 0] and nan.sum() == 1
