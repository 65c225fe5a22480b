"""Layers, activations, normalisation and losses (functional and nn), Module mechanics, nn.init.

Every op is compared with a float64 numpy reference written below from the op's definition
(forward, and the gradient written out by hand), and its gradient with central finite
differences in float64. References never call cnn_numba; torch cross-checks run only when
torch is installed.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba import nn

DTYPES = [np.float32, np.float64]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if np.dtype(dtype) == np.float32 else dict(rtol=1e-10, atol=1e-10)


def run(op, arrays, gy=None, seed=1, **params):
    """op(*tensors, **params) with every float array requiring grad, then backward(gy).
    Returns (out, [grad per array], gy) as numpy."""
    ts = [cn.tensor(a, requires_grad=np.asarray(a).dtype.kind == "f") if a is not None else None for a in arrays]
    out = op(*ts, **params)
    if out.size == 1 and gy is None:  # a loss: backward() from 1
        gy = np.ones(out.shape, out.dtype)
        out.backward()
    else:
        if gy is None:
            gy = np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)
        out.backward(gy)
    return out.numpy(), [None if t is None or t.grad is None else t.grad.numpy() for t in ts], gy


def numeric_grads(op, arrays, gy, eps=1e-6, **params):
    """Central differences of sum(op(*arrays) * gy) for each float64 array (None for the others)."""
    def f():
        with cn.no_grad():
            return float(np.sum(op(*[cn.tensor(a) if a is not None else None for a in arrays], **params).numpy() * gy))

    grads = []
    for a in arrays:
        if a is None or np.asarray(a).dtype != np.float64:
            grads.append(None)
            continue
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + eps
            fp = f()
            a[idx] = old - eps
            fm = f()
            a[idx] = old
            g[idx] = (fp - fm) / (2 * eps)
        grads.append(g)
    return grads


def check_finite_differences(op, arrays, rtol=1e-6, atol=1e-7, **params):
    arrays = [None if a is None else np.array(a, dtype=np.float64) if np.asarray(a).dtype.kind == "f" else a
              for a in arrays]
    _, grads, gy = run(op, [None if a is None else a.copy() for a in arrays], **params)
    for i, (g, ng) in enumerate(zip(grads, numeric_grads(op, arrays, gy, **params))):
        if ng is not None:
            np.testing.assert_allclose(g, ng, rtol=rtol, atol=atol, err_msg=f"input {i}")


# ----------------------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(dtype, lead, bias):
    r = np.random.default_rng(0)
    x, w, b = r.standard_normal(lead + (7,)), r.standard_normal((4, 7)), r.standard_normal(4)
    args = [x.astype(dtype), w.astype(dtype)] + ([b.astype(dtype)] if bias else [])
    y, grads, gy = run(F.linear, args)
    assert y.dtype == dtype and y.shape == lead + (4,)
    gy = gy.astype(np.float64)
    # y[..., o] = sum_i x[..., i] w[o, i] + b[o]
    ref = np.einsum("...i,oi->...o", x, w) + (b if bias else 0)
    np.testing.assert_allclose(y, ref, **tol(dtype))
    np.testing.assert_allclose(grads[0], np.einsum("...o,oi->...i", gy, w), **tol(dtype))
    np.testing.assert_allclose(grads[1], np.einsum("no,ni->oi", gy.reshape(-1, 4), x.reshape(-1, 7)), **tol(dtype))
    if bias:
        np.testing.assert_allclose(grads[2], gy.reshape(-1, 4).sum(0), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, inp, out", [(203, 67, 33), (9, 300, 121), (0, 5, 3), (4, 0, 3)])
def test_linear_blocks_of_rows_and_empty_sizes(dtype, rows, inp, out):
    # The first two are large enough to be split into blocks of rows (one BLAS call each),
    # with a short last block; the others are an empty batch and zero in_features.
    r = np.random.default_rng(2)
    x, w, b = r.standard_normal((rows, inp)), r.standard_normal((out, inp)), r.standard_normal(out)
    y, (gx, gw, gb), gy = run(F.linear, [x.astype(dtype), w.astype(dtype), b.astype(dtype)])
    gy = gy.astype(np.float64)
    np.testing.assert_allclose(y, np.einsum("ni,oi->no", x, w) + b, **tol(dtype))
    np.testing.assert_allclose(gx, np.einsum("no,oi->ni", gy, w), **tol(dtype))
    np.testing.assert_allclose(gw, np.einsum("no,ni->oi", gy, x), **tol(dtype))
    np.testing.assert_allclose(gb, gy.sum(0), **tol(dtype))


def test_linear_finite_differences():
    r = np.random.default_rng(1)
    check_finite_differences(F.linear, [r.standard_normal((3, 5)), r.standard_normal((2, 5)), r.standard_normal(2)])


def test_linear_errors():
    with pytest.raises(ValueError, match="in_features=5"):
        F.linear(np.zeros((2, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="bias"):
        F.linear(np.zeros((2, 5)), np.zeros((3, 5)), np.zeros(4))
    with pytest.raises(TypeError, match="dtypes differ"):
        F.linear(np.zeros((2, 5), np.float32), np.zeros((3, 5)))


# ----------------------------------------------------------------------------- sigmoid, tanh


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_and_tanh_match_reference(dtype):
    x = np.random.default_rng(2).standard_normal((2, 3, 4)) * 3
    for op, fwd, grad in [
        (F.sigmoid, lambda v: 1 / (1 + np.exp(-v)), lambda v: np.exp(-v) / (1 + np.exp(-v)) ** 2),
        (F.tanh, np.tanh, lambda v: 1 / np.cosh(v) ** 2),
    ]:
        y, (gx,), gy = run(op, [x.astype(dtype)])
        assert y.dtype == dtype
        np.testing.assert_allclose(y, fwd(x), **tol(dtype))
        np.testing.assert_allclose(gx, gy * grad(x), **tol(dtype))
        check_finite_differences(op, [x])


def test_sigmoid_saturates_without_overflow():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], np.float32)
    with np.errstate(all="raise"):
        y, (gx,), _ = run(F.sigmoid, [x], gy=np.ones(5, np.float32))
    np.testing.assert_allclose(y, [0, 1 / (1 + math.exp(50)), 0.5, 1, 1], atol=1e-7)
    assert np.all(np.isfinite(gx)) and gx[2] == pytest.approx(0.25)


# ----------------------------------------------------------------------------- dropout


def test_dropout_is_inverted_and_seeded():
    x = np.ones((50, 40))
    cn.manual_seed(3)
    y, (gx,), gy = run(F.dropout, [x], gy=np.ones_like(x), p=0.3)
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.7)                       # survivors scaled by 1/(1-p)
    assert abs(1 - kept.mean() - 0.3) < 0.03                            # about p of them dropped
    np.testing.assert_allclose(gx, np.where(kept, 1 / 0.7, 0.0))        # gradient through the same mask
    cn.manual_seed(3)
    np.testing.assert_array_equal(F.dropout(cn.tensor(x), 0.3).numpy(), y)   # same seed, same mask
    assert not np.array_equal(F.dropout(cn.tensor(x), 0.3).numpy(), y)     # the stream moves on


def test_dropout_identity_cases_and_errors():
    x = cn.tensor(np.random.default_rng(4).standard_normal((3, 4)))
    np.testing.assert_array_equal(F.dropout(x, 0.5, training=False).numpy(), x.numpy())
    np.testing.assert_array_equal(F.dropout(x, 0.0).numpy(), x.numpy())
    np.testing.assert_array_equal(F.dropout(x, 1.0).numpy(), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, 1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(-0.1)
    d = nn.Dropout(0.5).eval()
    np.testing.assert_array_equal(d(x).numpy(), x.numpy())


# ----------------------------------------------------------------------------- batch norm


def bn_reference(x, w, b, eps, gy):
    """Training-mode batch norm over every axis but 1, and its gradients written out by hand."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    m = x.size // x.shape[1]
    mean, var = x.mean(axes), x.var(axes)
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(shape)) * invstd.reshape(shape)
    y = xhat * w.reshape(shape) + b.reshape(shape)
    gxhat = gy * w.reshape(shape)
    gx = invstd.reshape(shape) / m * (m * gxhat - gxhat.sum(axes).reshape(shape)
                                      - xhat * (gxhat * xhat).sum(axes).reshape(shape))
    return y, gx, (gy * xhat).sum(axes), gy.sum(axes), mean, var


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (6, 3), (3, 2, 7)])
def test_batch_norm_training_matches_reference(dtype, shape):
    r = np.random.default_rng(5)
    x = r.standard_normal(shape) * 2 + 1
    w, b = r.standard_normal(shape[1]), r.standard_normal(shape[1])
    rm, rv = np.zeros(shape[1], dtype), np.ones(shape[1], dtype)
    y, (gx, gw, gb), gy = run(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5),
                              [x.astype(dtype), w.astype(dtype), b.astype(dtype)])
    ry, rgx, rgw, rgb, mean, var = bn_reference(x, w, b, 1e-5, gy.astype(np.float64))
    assert y.dtype == dtype
    t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
    for got, ref in [(y, ry), (gx, rgx), (gw, rgw), (gb, rgb)]:
        np.testing.assert_allclose(got, ref, **t)
    m = x.size // shape[1]
    np.testing.assert_allclose(rm, 0.1 * mean, **t)                                   # running stats
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var * m / (m - 1), **t)                # unbiased variance


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_finite_differences(training):
    r = np.random.default_rng(6)
    x, w, b = r.standard_normal((3, 2, 3, 2)), r.standard_normal(2), r.standard_normal(2)
    rm, rv = r.standard_normal(2), r.random(2) + 0.5

    def op(x, w, b):
        return F.batch_norm(x, rm.copy(), rv.copy(), w, b, training=training)

    check_finite_differences(op, [x, w, b], rtol=1e-5, atol=1e-7)


def test_batch_norm_eval_uses_running_stats():
    r = np.random.default_rng(7)
    x, w, b = r.standard_normal((4, 3, 2, 2)), r.standard_normal(3), r.standard_normal(3)
    rm, rv = r.standard_normal(3), r.random(3) + 0.5
    y, (gx, gw, gb), gy = run(lambda x, w, b: F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-3), [x, w, b])
    s = (1, 3, 1, 1)
    xhat = (x - rm.reshape(s)) / np.sqrt(rv.reshape(s) + 1e-3)
    np.testing.assert_allclose(y, xhat * w.reshape(s) + b.reshape(s), rtol=1e-12)
    np.testing.assert_allclose(gx, gy * (w / np.sqrt(rv + 1e-3)).reshape(s), rtol=1e-12)
    np.testing.assert_allclose(gw, (gy * xhat).sum((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(gb, gy.sum((0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["serial", "parallel"])
def test_batch_norm_forward_both_paths_match_reference(monkeypatch, dtype, path):
    """The forward through its serial twin and its parallel kernel (BN_PARALLEL_ELEMENTS out
    of reach, then 0; each checked to have run), training and eval, images, (N, C), (N, C, L)
    and an empty batch, against float64 arithmetic; invstd is 1/sqrt(var + eps) rounded once
    to the dtype, as PyTorch saves it."""
    from cnn_numba.kernels import nn as K
    monkeypatch.setattr(K, "BN_PARALLEL_ELEMENTS", 0 if path == "parallel" else 1 << 60)
    name = "batch_norm_forward" + ("" if path == "parallel" else "_serial")
    calls = []
    kern = getattr(K, name)
    monkeypatch.setattr(K, name, lambda *a: calls.append(1) or kern(*a))
    r = np.random.default_rng(9)
    shapes = [(4, 3, 5, 6), (6, 3), (3, 2, 7), (0, 3, 2, 2)]
    for shape in shapes:
        x = (r.standard_normal(shape) * 2 + 1).astype(dtype)
        c, s = shape[1], (1, -1) + (1,) * (len(shape) - 2)
        w, b, rm, rv = (r.standard_normal(c).astype(dtype), r.standard_normal(c).astype(dtype),
                        r.standard_normal(c).astype(dtype), (r.random(c) + 0.5).astype(dtype))
        y, invstd = K.batch_norm_forward_cpu(x, rm, rv, w, b, 1e-3)
        assert y.dtype == dtype and invstd.dtype == dtype and y.shape == x.shape
        ref_inv = 1 / np.sqrt(rv.astype(np.float64) + 1e-3)
        np.testing.assert_array_equal(invstd, ref_inv.astype(dtype))
        ref = (x - rm.reshape(s)) * (ref_inv * w).reshape(s) + b.reshape(s)
        t = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(y, ref, **t)
        if shape[0] > 1:  # the functional op in training mode, on the same path
            with cn.no_grad():
                yt = F.batch_norm(x, None, None, w, b, training=True).numpy()
            ry = bn_reference(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), 1e-5,
                              np.zeros(shape))[0]
            t = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(yt, ry, **t)
    assert len(calls) == len(shapes) + 3


def test_batch_norm_forward_threshold_picks_by_elements(monkeypatch):
    """x of 24 elements: the serial twin under a threshold of 25, the parallel kernel at 24."""
    from cnn_numba.kernels import nn as K
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    for threshold, ran in ((25, "batch_norm_forward_serial"), (24, "batch_norm_forward")):
        monkeypatch.setattr(K, "BN_PARALLEL_ELEMENTS", threshold)
        calls = dict.fromkeys(("batch_norm_forward", "batch_norm_forward_serial"), 0)
        for n in calls:
            kern = getattr(K, n)
            monkeypatch.setattr(K, n, lambda *a, _k=kern, _n=n: calls.__setitem__(_n, calls[_n] + 1) or _k(*a))
        y, _ = K.batch_norm_forward_cpu(x, zeros, ones, ones, zeros, 0.0)
        np.testing.assert_array_equal(y, x)
        assert calls == {n: int(n == ran) for n in calls}
        monkeypatch.undo()


def test_batch_norm_eval_graph_survives_a_later_training_pass():
    # The eval graph's backward reads the mean it normalised with, not the running mean a
    # training pass updated in place afterwards (weight gradient = sum gy * xhat).
    r = np.random.default_rng(8)
    x, w, b = r.standard_normal((4, 3, 2, 2)), r.standard_normal(3), r.standard_normal(3)
    rm, rv = r.standard_normal(3), r.random(3) + 0.5
    s = (1, 3, 1, 1)
    xhat = (x - rm.reshape(s)) / np.sqrt(rv.reshape(s) + 1e-5)
    running = cn.tensor(rm.copy()), cn.tensor(rv.copy())
    wt = cn.tensor(w, requires_grad=True)
    y = F.batch_norm(x, *running, wt, b, training=False)
    F.batch_norm(r.standard_normal((4, 3, 2, 2)) + 5.0, *running, wt, b, training=True)
    assert not np.allclose(running[0].numpy(), rm)  # the training pass did move the running mean
    y.sum().backward()
    np.testing.assert_allclose(wt.grad.numpy(), xhat.sum((0, 2, 3)), rtol=1e-12)


def test_batchnorm2d_module_train_eval_and_running_stats():
    r = np.random.default_rng(8)
    bn = nn.BatchNorm2d(3, momentum=0.2, dtype=np.float64)
    assert [k for k, _ in bn.named_parameters()] == ["weight", "bias"]
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    rm, rv = np.zeros(3), np.ones(3)
    batches = [r.standard_normal((4, 3, 3, 3)) * 3 + 2 for _ in range(3)]
    for x in batches:
        y = bn(cn.tensor(x)).numpy()
        np.testing.assert_allclose(y.mean((0, 2, 3)), 0, atol=1e-12)           # normalised with batch stats
        rm = 0.8 * rm + 0.2 * x.mean((0, 2, 3))
        rv = 0.8 * rv + 0.2 * x.var((0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-12)
    assert int(bn.num_batches_tracked.numpy()) == 3
    bn.eval()
    x = batches[0]
    y_eval = bn(cn.tensor(x)).numpy()
    np.testing.assert_allclose(y_eval, (x - rm.reshape(1, 3, 1, 1)) / np.sqrt(rv.reshape(1, 3, 1, 1) + 1e-5),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-12)              # eval leaves them alone
    assert int(bn.num_batches_tracked.numpy()) == 3
    assert not np.allclose(y_eval, bn.train()(cn.tensor(x)).numpy())


def test_batchnorm_momentum_none_is_cumulative_average():
    r = np.random.default_rng(9)
    bn = nn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    xs = [r.standard_normal((5, 2)) + i for i in range(4)]
    for x in xs:
        bn(cn.tensor(x))
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean([x.mean(0) for x in xs], 0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean([x.var(0, ddof=1) for x in xs], 0), rtol=1e-12)


def test_batchnorm_without_affine_or_running_stats():
    x = np.random.default_rng(10).standard_normal((6, 4, 3)) * 5
    bn = nn.BatchNorm1d(4, affine=False, track_running_stats=False, dtype=np.float64)
    assert list(bn.parameters()) == [] and bn.state_dict() == {}
    bn.eval()                                            # no running stats: batch stats even in eval
    y = bn(cn.tensor(x)).numpy()
    np.testing.assert_allclose(y, (x - x.mean((0, 2), keepdims=True)) / np.sqrt(x.var((0, 2), keepdims=True) + 1e-5),
                               rtol=1e-10)


def test_batch_norm_errors():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(cn.tensor(np.zeros((1, 3), np.float32)))
    with pytest.raises(ValueError, match="4-D"):
        nn.BatchNorm2d(3)(cn.tensor(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="running_mean must have shape"):
        nn.BatchNorm2d(3)(cn.tensor(np.zeros((2, 4, 2, 2), np.float32)))
    with pytest.raises(ValueError, match="needed when not training"):
        F.batch_norm(np.zeros((2, 3)), None, None)


def test_batch_norm_matches_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(11)
    x = r.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 1
    gy = r.standard_normal(x.shape).astype(np.float32)
    ours, ref = nn.BatchNorm2d(3, momentum=0.3), torch.nn.BatchNorm2d(3, momentum=0.3)
    xt, tx = cn.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    ours(xt).backward(gy)
    ty = ref(tx)
    ty.backward(torch.tensor(gy))
    np.testing.assert_allclose(xt.grad.numpy(), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours.running_var.numpy(), ref.running_var.numpy(), rtol=1e-5)
    ours.eval(), ref.eval()
    np.testing.assert_allclose(ours(cn.tensor(x)).numpy(), ref(torch.tensor(x)).detach().numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- cross-entropy


def ce_reference(z, t, reduction, eps):
    """Loss from log-softmax with a smoothed target q, and d loss / d z = (softmax - q) [/ N]."""
    n, k = z.shape
    zmax = z.max(1, keepdims=True)
    logp = z - zmax - np.log(np.exp(z - zmax).sum(1, keepdims=True))
    q = np.full((n, k), eps / k)
    q[np.arange(n), t] += 1 - eps
    rows = -(q * logp).sum(1)
    grad_rows = np.exp(logp) - q
    if reduction == "none":
        return rows, grad_rows
    return (rows.sum(), grad_rows) if reduction == "sum" else (rows.mean(), grad_rows / n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_reference(dtype, reduction, eps):
    r = np.random.default_rng(12)
    z, t = r.standard_normal((5, 4)) * 3, np.array([0, 3, 1, 3, 2])
    out, (gz, gt), gy = run(lambda z, t: F.cross_entropy(z, t, reduction=reduction, label_smoothing=eps),
                            [z.astype(dtype), t])
    loss, grad_rows = ce_reference(z, t, reduction, eps)
    assert out.dtype == dtype and out.shape == np.shape(loss) and gt is None
    np.testing.assert_allclose(out, loss, **tol(dtype))
    gl = gy.astype(np.float64).reshape(-1, 1) if reduction == "none" else float(gy)
    np.testing.assert_allclose(gz, gl * grad_rows, **tol(dtype))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_finite_differences(reduction):
    r = np.random.default_rng(13)
    check_finite_differences(lambda z: F.cross_entropy(z, np.array([2, 0, 1]), reduction=reduction,
                                                       label_smoothing=0.2), [r.standard_normal((3, 3))])


def test_cross_entropy_literal_values():
    # uniform logits over K=4: loss = log 4 whatever the smoothing; gradient (1/4 - q)/N
    z = cn.tensor(np.zeros((2, 4)), requires_grad=True)
    loss = F.cross_entropy(z, np.array([1, 2]), label_smoothing=0.4)
    assert loss.item() == pytest.approx(math.log(4), rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(z.grad.numpy()[0], [0.075, -0.225, 0.075, 0.075], rtol=1e-12)  # (1/4 - q)/2, q = 0.1 + 0.6 onehot
    # confident and right: loss -> 0; confident and wrong: loss = margin
    z = np.array([[1000.0, 0.0, -1000.0], [0.0, 1000.0, 0.0]], np.float32)
    rows = F.cross_entropy(z, np.array([0, 0]), reduction="none").numpy()
    np.testing.assert_allclose(rows, [0.0, 1000.0], atol=1e-4)


def test_cross_entropy_errors():
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 4\)"):
        F.cross_entropy(z, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"target must lie"):
        F.cross_entropy(z, np.array([0, -1, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        F.cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="target of shape"):
        F.cross_entropy(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(z, np.array([0, 1, 2]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(z, np.array([0, 1, 2]), label_smoothing=1.5)


def test_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(14)
    z, t = r.standard_normal((6, 5)).astype(np.float32), r.integers(0, 5, 6)
    for reduction in ("mean", "sum"):
        zt, tz = cn.tensor(z, requires_grad=True), torch.tensor(z, requires_grad=True)
        ours = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.15)(zt, t)
        ref = torch.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.15)(tz, torch.tensor(t))
        ours.backward(), ref.backward()
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
        np.testing.assert_allclose(zt.grad.numpy(), tz.grad.numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- mse


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    r = np.random.default_rng(15)
    x, t = r.standard_normal((3, 4)), r.standard_normal((3, 4))
    out, (gx, gt), gy = run(lambda x, t: F.mse_loss(x, t, reduction=reduction), [x, t])
    d = x - t
    scale = {"mean": 1 / d.size, "sum": 1.0, "none": 1.0}[reduction]
    ref = {"mean": (d ** 2).mean(), "sum": (d ** 2).sum(), "none": d ** 2}[reduction]
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    np.testing.assert_allclose(gx, 2 * d * gy * scale, rtol=1e-12)
    np.testing.assert_allclose(gt, -2 * d * gy * scale, rtol=1e-12)
    assert nn.MSELoss(reduction=reduction)(cn.tensor(x), cn.tensor(t)).numpy() == pytest.approx(ref)
    check_finite_differences(lambda x, t: F.mse_loss(x, t, reduction=reduction), [x, t])
    with pytest.raises(ValueError, match="differ"):
        F.mse_loss(x, t[:2])


# ----------------------------------------------------------------------------- flatten, cat, channel shuffle


def test_flatten():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    y, (gx,), gy = run(F.flatten, [x])
    np.testing.assert_array_equal(y, x.reshape(2, 60))
    np.testing.assert_array_equal(gx, gy.reshape(x.shape))
    assert F.flatten(cn.tensor(x), 1, 2).shape == (2, 12, 5)
    assert F.flatten(cn.tensor(x), 0).shape == (120,)
    assert nn.Flatten()(cn.tensor(x)).shape == (2, 60)
    with pytest.raises(ValueError, match="start_dim"):
        F.flatten(cn.tensor(x), 3, 1)


@pytest.mark.parametrize("dim", [1, 0, -1])
def test_cat(dim):
    r = np.random.default_rng(16)
    base = [2, 3, 2, 2]
    parts = []
    for c in (1, 3, 2):
        shape = list(base)
        shape[dim] = c
        parts.append(r.standard_normal(shape))
    y, grads, gy = run(lambda *ts: F.cat(ts, dim=dim), parts)
    np.testing.assert_array_equal(y, np.concatenate(parts, axis=dim))
    offsets = np.cumsum([0] + [p.shape[dim] for p in parts])
    for g, lo, hi in zip(grads, offsets[:-1], offsets[1:]):
        np.testing.assert_array_equal(g, np.take(gy, np.arange(lo, hi), axis=dim))
    with pytest.raises(ValueError, match="does not match"):
        F.cat([np.zeros((2, 3, 2, 2)), np.zeros((2, 3, 3, 2))], dim=1)
    with pytest.raises(ValueError, match="non-empty"):
        F.cat([])


def test_channel_shuffle():
    r = np.random.default_rng(17)
    n, c, g = 2, 6, 3
    x = r.standard_normal((n, c, 2, 3))
    y, (gx,), gy = run(F.channel_shuffle, [x], groups=g)
    # group i, channel k of the group (input channel i*c/g + k) goes to output channel k*g + i
    ref, rgx = np.empty_like(x), np.empty_like(x)
    for i in range(g):
        for k in range(c // g):
            ref[:, k * g + i] = x[:, i * (c // g) + k]
            rgx[:, i * (c // g) + k] = gy[:, k * g + i]
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(gx, rgx)
    np.testing.assert_array_equal(nn.ChannelShuffle(g)(cn.tensor(x)).numpy(), ref)
    np.testing.assert_array_equal(F.channel_shuffle(cn.tensor(x), 1).numpy(), x)
    with pytest.raises(ValueError, match="dividing C=6"):
        F.channel_shuffle(cn.tensor(x), 4)


def test_permute():
    x = np.random.default_rng(26).standard_normal((2, 3, 4, 5))
    y, (gx,), gy = run(F.permute, [x], dims=(0, 3, 1, -2))
    np.testing.assert_array_equal(y, x.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(gx, gy.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match="not a permutation"):
        F.permute(cn.tensor(x), (0, 1, 1, 2))


def test_residual_add_through_modules():
    r = np.random.default_rng(18)
    lin = nn.Linear(4, 4, dtype=np.float64)
    x = cn.tensor(r.standard_normal((3, 4)), requires_grad=True)
    (lin(x) + x).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.ones((3, 4)) @ lin.weight.numpy() + 1, rtol=1e-12)


# ----------------------------------------------------------------------------- modules


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
        self.scale = 2.0                                  # a plain attribute, not registered

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x)))) * self.scale


def test_module_registration_and_traversal():
    m = Block()
    names = [k for k, _ in m.named_parameters()]
    assert names == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.1.weight", "head.1.bias"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in m.parameters())
    assert [k for k, _ in m.named_buffers()] == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    assert [k for k, _ in m.named_children()] == ["conv", "bn", "head"]
    assert len(list(m.modules())) == 6
    assert m.scale == 2.0 and "scale" not in m._parameters
    assert m.head[1].weight.shape == (5, 48) and len(m.head) == 2
    m.eval()
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    shared = nn.Linear(2, 2)
    seq = nn.Sequential(shared, shared)
    assert len(list(seq.parameters())) == 2                        # a shared module is listed once
    del m.conv
    assert "conv" not in dict(m.named_children())
    with pytest.raises(TypeError, match="parameter 'weight'"):
        shared.weight = cn.tensor(np.zeros((2, 2)))


def test_module_forward_backward_zero_grad_and_dtype():
    m = Block()
    x = cn.tensor(np.random.default_rng(19).standard_normal((2, 2, 4, 4)).astype(np.float32))
    out = m(x)
    assert out.shape == (2, 5) and out.dtype == np.float32
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in m.parameters())
    m.zero_grad(set_to_none=False)
    assert all(not p.grad.numpy().any() for p in m.parameters())
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    params = list(m.parameters())
    m.double()
    assert all(p.dtype == np.float64 for p in m.parameters()) and list(m.parameters())[0] is params[0]
    assert m.bn.num_batches_tracked.dtype == np.int64
    assert m(cn.tensor(x.numpy().astype(np.float64))).dtype == np.float64
    assert nn.Linear(3, 2, dtype=np.float64).weight.dtype == np.float64


def test_state_dict_round_trip(tmp_path):
    cn.manual_seed(20)
    a = Block()
    a(cn.tensor(np.random.default_rng(21).standard_normal((2, 2, 4, 4)).astype(np.float32)))  # moves running stats
    cn.manual_seed(22)
    b = Block()
    sd = a.state_dict()
    assert list(sd) == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                        "bn.num_batches_tracked", "head.1.weight", "head.1.bias"]
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    np.savez(tmp_path / "block.npz", **sd)
    result = b.load_state_dict(np.load(tmp_path / "block.npz"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(va, vb, err_msg=k)
    a.eval(), b.eval()
    x = cn.tensor(np.random.default_rng(23).standard_normal((3, 2, 4, 4)).astype(np.float32))
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    sd["conv.bias"][:] = 7                       # the state dict is a copy
    assert not np.any(a.conv.bias.numpy() == 7)


def test_load_state_dict_mismatch_names_keys_and_shapes():
    sd = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).state_dict()
    other = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    before = other.state_dict()
    with pytest.raises(RuntimeError) as err:
        other.load_state_dict(sd)
    msg = str(err.value)
    assert "size mismatch for 0.weight" in msg and "(4, 3)" in msg and "(5, 3)" in msg
    assert "size mismatch for 2.weight" in msg and "(2, 4)" in msg and "(2, 5)" in msg
    assert "0.bias" in msg
    for k, v in other.state_dict().items():             # nothing was loaded
        np.testing.assert_array_equal(v, before[k])
    target = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    extra = dict(sd, **{"9.weight": np.zeros(1)})
    del extra["2.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "2.bias"') as err:
        target.load_state_dict(extra)
    assert 'Unexpected key(s) in state_dict: "9.weight"' in str(err.value)
    result = target.load_state_dict(extra, strict=False)
    assert result.missing_keys == ["2.bias"] and result.unexpected_keys == ["9.weight"]
    np.testing.assert_array_equal(target[0].weight.numpy(), sd["0.weight"])


def test_layer_modules_call_their_functional_ops():
    r = np.random.default_rng(24)
    x = cn.tensor(r.standard_normal((2, 4, 7, 6)).astype(np.float32))
    conv = nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=1, groups=2)
    assert conv.weight.shape == (6, 2, 3, 2) and conv.bias.shape == (6,)
    np.testing.assert_array_equal(conv(x).numpy(), F.conv2d(x, conv.weight, conv.bias, 2, 1, 1, 2).numpy())
    assert nn.Conv2d(4, 6, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="groups=3"):
        nn.Conv2d(4, 6, 3, groups=3)
    tconv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert tconv.weight.shape == (4, 3, 3, 3)
    np.testing.assert_array_equal(tconv(x).numpy(), F.conv_transpose2d(x, tconv.weight, tconv.bias, 2, 1, 0, 2).numpy())
    assert tconv(x).shape == (2, 6, 13, 11)
    assert tconv(x, output_size=(14, 12)).shape == (2, 6, 14, 12)
    pool = nn.MaxPool2d(2, return_indices=True)
    y, idx = pool(x)
    ry, ridx = F.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(y.numpy(), ry.numpy())
    np.testing.assert_array_equal(idx.numpy(), ridx.numpy())
    u = nn.MaxUnpool2d(2)(y, idx, output_size=x.shape)
    np.testing.assert_array_equal(u.numpy(), F.max_unpool2d(y, idx, 2, output_size=x.shape).numpy())
    np.testing.assert_array_equal(nn.AvgPool2d(3, 2, 1, count_include_pad=False)(x).numpy(),
                                  F.avg_pool2d(x, 3, 2, 1, count_include_pad=False).numpy())
    np.testing.assert_array_equal(nn.AdaptiveAvgPool2d(1)(x).numpy(), F.adaptive_avg_pool2d(x, 1).numpy())
    np.testing.assert_array_equal(nn.ReLU(inplace=True)(x).numpy(), np.maximum(x.numpy(), 0))
    np.testing.assert_array_equal(nn.Sigmoid()(x).numpy(), F.sigmoid(x).numpy())
    np.testing.assert_array_equal(nn.Tanh()(x).numpy(), F.tanh(x).numpy())
    assert "Conv2d(4, 6" in repr(nn.Sequential(conv))


def test_deepcopy_gives_an_independent_model():
    import copy

    a = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    b = copy.deepcopy(a)
    init_w = a[0].weight.numpy().copy()
    nn.init.zeros_(b[0].weight)
    np.testing.assert_array_equal(a[0].weight.numpy(), init_w)
    assert [k for k, _ in b.named_parameters()] == [k for k, _ in a.named_parameters()]


# ----------------------------------------------------------------------------- init


def test_default_initialisation_bounds():
    cn.manual_seed(25)
    lin, conv, tconv = nn.Linear(50, 40), nn.Conv2d(6, 8, 5), nn.ConvTranspose2d(6, 8, 3)
    for layer, fan_in in [(lin, 50), (conv, 6 * 25), (tconv, 8 * 9)]:
        bound = 1 / math.sqrt(fan_in)       # kaiming_uniform_(a=sqrt(5)): sqrt(2/6) * sqrt(3/fan_in)
        w, b = layer.weight.numpy(), layer.bias.numpy()
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
        assert np.abs(b).max() <= bound
        assert abs(w.std() - bound / math.sqrt(3)) < 0.1 * bound   # U(-a, a) has std a/sqrt(3)
    bn = nn.BatchNorm2d(4)
    np.testing.assert_array_equal(bn.weight.numpy(), 1)
    np.testing.assert_array_equal(bn.bias.numpy(), 0)
    np.testing.assert_array_equal(bn.running_var.numpy(), 1)


def test_init_functions():
    t = nn.Parameter(np.zeros((200, 100, 3, 3), np.float32))
    fan_in, fan_out = 100 * 9, 200 * 9
    cn.manual_seed(26)
    nn.init.kaiming_normal_(t, mode="fan_out", nonlinearity="relu")
    assert t.dtype == np.float32 and abs(t.numpy().std() / math.sqrt(2 / fan_out) - 1) < 0.02
    nn.init.kaiming_uniform_(t, nonlinearity="relu")
    assert np.abs(t.numpy()).max() <= math.sqrt(6 / fan_in) * (1 + 1e-6)
    nn.init.xavier_uniform_(t, gain=2.0)
    a = 2.0 * math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(t.numpy()).max() <= a * (1 + 1e-6) and np.abs(t.numpy()).max() > 0.99 * a
    nn.init.xavier_normal_(t)
    assert abs(t.numpy().std() / math.sqrt(2 / (fan_in + fan_out)) - 1) < 0.02
    nn.init.zeros_(t)
    assert not t.numpy().any()
    nn.init.ones_(t)
    assert np.all(t.numpy() == 1)
    assert nn.init.calculate_gain("tanh") == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="at least 2 dims"):
        nn.init.xavier_uniform_(nn.Parameter(np.zeros(3)))


def test_manual_seed_makes_initialisation_reproducible():
    cn.manual_seed(27)
    a = nn.Conv2d(3, 4, 3).state_dict()
    cn.manual_seed(27)
    b = nn.Conv2d(3, 4, 3).state_dict()
    c = nn.Conv2d(3, 4, 3).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


def test_registered_members_are_plain_attributes_and_stay_in_step():
    """Parameters, buffers and child modules are mirrored in the instance's __dict__ (a fast
    lookup): assignment, re-registration, None, moving between registries and deletion keep
    the mirror and the registries in step."""
    m = nn.Conv2d(2, 3, 3)
    assert m.__dict__["weight"] is m._parameters["weight"] is m.weight
    p = nn.Parameter(np.ones((3, 2, 3, 3), np.float32))
    m.weight = p
    assert m.weight is p and m._parameters["weight"] is p
    m.bias = None
    assert m.bias is None and m._parameters["bias"] is None
    m.register_buffer("stat", cn.tensor(np.zeros(3)))
    assert m.stat is m._buffers["stat"]
    m.stat = None
    assert m.stat is None
    m.stat = nn.Parameter(np.zeros(3))  # a buffer's name now a parameter
    assert "stat" not in m._buffers and m.stat is m._parameters["stat"]
    child = nn.ReLU()
    m.add_module("act", child)
    assert m.act is child and dict(m.named_children())["act"] is child
    del m.act, m.stat
    assert "act" not in m._modules and "stat" not in m._parameters
    with pytest.raises(AttributeError):
        m.act
    with pytest.raises(AttributeError):
        m.stat
    assert [n for n, _ in m.named_parameters()] == ["weight"]  # bias is None


def test_batch_norm_counts_batches_through_every_change_of_its_counter(rng):
    """num_batches_tracked counts training forwards (remembered on the host, written to the
    buffer: nn/layers.py's _count_batch) and restarts from whatever reset_running_stats,
    init.zeros_, fill_, copy_ or load_state_dict put there; a dtype move keeps it. With
    momentum=None the running mean is the plain average of the batch means."""
    from cnn_numba.nn import init
    bn = nn.BatchNorm2d(2, momentum=None)
    xs = [rng.standard_normal((3, 2, 2, 2)).astype(np.float32) for _ in range(3)]
    for x in xs:
        bn(cn.tensor(x))
    assert int(bn.num_batches_tracked.item()) == 3
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean([x.mean(axis=(0, 2, 3)) for x in xs], axis=0),
                               rtol=1e-5, atol=1e-6)
    for reset, start in [(lambda: bn.reset_running_stats(), 0), (lambda: init.zeros_(bn.num_batches_tracked), 0),
                         (lambda: bn.num_batches_tracked.fill_(7), 7),
                         (lambda: bn.num_batches_tracked.copy_(np.array(4)), 4),
                         (lambda: bn.load_state_dict({**bn.state_dict(), "num_batches_tracked": np.array(9)}), 9),
                         (lambda: bn.to(np.float64), None)]:
        before = int(bn.num_batches_tracked.item())
        reset()
        start = before if start is None else start
        bn(cn.tensor(xs[0].astype(bn.running_mean.dtype)))
        assert int(bn.num_batches_tracked.item()) == start + 1
