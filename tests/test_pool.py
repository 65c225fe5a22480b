"""Pooling (max with indices, unpool, avg, adaptive avg) and relu against the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba as cn
import cnn_numba.functional as F
import reference as R
from conftest import DTYPES, forward_backward, random

# (x shape, max_pool2d keyword arguments)
MAX_CASES = [
    ((1, 1, 1, 1), dict(kernel_size=1)),
    ((2, 3, 5, 7), dict(kernel_size=2)),                                              # default stride, odd sizes
    ((1, 2, 6, 6), dict(kernel_size=3, stride=2, padding=1)),                         # overlapping
    ((2, 2, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),         # last window dropped
    ((1, 1, 8, 8), dict(kernel_size=3, stride=3, ceil_mode=True)),                    # overhang window
    ((1, 2, 7, 4), dict(kernel_size=3, stride=(3, 2), padding=(1, 0), dilation=2, ceil_mode=True)),
    ((1, 1, 6, 5), dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), dilation=(2, 1))),
    ((1, 2, 7, 7), dict(kernel_size=2, stride=3)),                                    # stride > kernel
    ((2, 2, 4, 3), dict(kernel_size=(4, 3))),                                         # kernel == input
    ((1, 1, 5, 6), dict(kernel_size=3, stride=1, padding=1)),                         # heavy overlap
    ((1, 2, 9, 7), dict(kernel_size=(3, 2), stride=(2, 2), padding=(1, 1), dilation=(3, 2), ceil_mode=True)),
]
MAX_IDS = [f"max{i}" for i in range(len(MAX_CASES))]


def _pool_data(rng, shape, kind, dtype):
    if kind == "distinct":
        return rng.standard_normal(shape).astype(dtype)
    x = rng.integers(-2, 3, shape).astype(dtype)          # many ties
    if kind == "nan":
        x[rng.random(shape) < 0.15] = np.nan               # sometimes two NaNs share a window
        x.reshape(-1)[0] = np.nan
    return x


# ----------------------------------------------------------------------------- max_pool2d


@pytest.mark.parametrize("case", MAX_CASES, ids=MAX_IDS)
def test_reference_max_pool_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    shape, kw = case
    for kind in ("distinct", "ties", "nan"):
        x = _pool_data(rng, shape, kind, np.float64)
        tx = torch.tensor(x, requires_grad=True)
        ty, ti = torch.nn.functional.max_pool2d(tx, return_indices=True, **kw)
        gy = rng.standard_normal(ty.shape)
        ty.backward(torch.tensor(gy))
        out, idx = R.max_pool2d(x, **kw)
        R.assert_close(ty.detach().numpy(), out)
        np.testing.assert_array_equal(ti.numpy(), idx)
        R.assert_close(tx.grad.numpy(), R.max_pool2d_grad(gy, idx, shape))


@pytest.mark.parametrize("kind", ["distinct", "ties", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", MAX_CASES, ids=MAX_IDS)
def test_max_pool2d_forward_indices_and_grad(rng, case, dtype, kind, device):
    shape, kw = case
    x = _pool_data(rng, shape, kind, dtype)
    ref, ref_idx = R.max_pool2d(x, **kw)
    out, idx = F.max_pool2d(cn.tensor(x, device=device), return_indices=True, **kw)
    assert isinstance(idx, cn.Tensor) and idx.dtype == np.int64
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    R.assert_close(out.numpy(), ref, dtype)
    got, (gx,), gy = forward_backward(F.max_pool2d, (x,), device=device, **kw)
    R.assert_close(got, ref, dtype)
    R.assert_close(gx, R.max_pool2d_grad(gy, ref_idx, shape), dtype, "gx")


@pytest.mark.parametrize("case", [MAX_CASES[i] for i in (2, 5, 6, 9)], ids=lambda c: str(c[1]))
def test_max_pool2d_grad_matches_finite_differences(rng, case):
    shape, kw = case
    x = rng.permutation(np.prod(shape)).reshape(shape) * 0.1  # distinct values, gaps >> eps
    _, (gx,), gy = forward_backward(F.max_pool2d, (x,), **kw)

    def fwd(v):
        with cn.no_grad():
            return F.max_pool2d(v, **kw).numpy()

    R.assert_close(gx, R.numerical_grad(fwd, x, gy), np.float32)


def test_max_pool2d_first_maximum_wins_and_padding_never_wins():
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 0.0, 3.0],
                    [-1.0, -2.0, -5.0]]]])
    out, idx = F.max_pool2d(x, 2, stride=1, return_indices=True)
    np.testing.assert_array_equal(out.numpy()[0, 0], [[3, 3], [3, 3]])
    np.testing.assert_array_equal(idx.numpy()[0, 0], [[1, 1], [3, 5]])
    # a negative plane with padding: the maximum is a real element, not the zero padding
    neg = -np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    out, idx = F.max_pool2d(neg, 3, stride=1, padding=1, return_indices=True)
    R.assert_close(out.numpy(), R.max_pool2d(neg, 3, stride=1, padding=1)[0])
    assert out.numpy().max() < 0
    # all -inf: the first real element of the window is reported, value -inf
    minf = np.full((1, 1, 2, 3), -np.inf)
    out, idx = F.max_pool2d(minf, 2, stride=1, padding=1, return_indices=True)
    ref, ref_idx = R.max_pool2d(minf, 2, stride=1, padding=1)
    np.testing.assert_array_equal(out.numpy(), ref)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)


def test_max_pool2d_nan_propagates_and_the_last_nan_wins():
    x = np.array([[[[1.0, np.nan], [np.nan, 5.0]]]], np.float32)
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    assert np.isnan(out.numpy()[0, 0, 0, 0]) and idx.numpy()[0, 0, 0, 0] == 2


def test_max_pool2d_backward_accumulates_overlapping_windows():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0  # the maximum of every 3x3 stride-1 window that contains it
    xt = cn.tensor(x, requires_grad=True)
    y = F.max_pool2d(xt, 3, stride=1, padding=1)
    y.sum().backward()
    assert xt.grad.numpy()[0, 0, 1, 2] == 9.0
    assert xt.grad.numpy().sum() == y.size


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_pools_batch_zero(dtype):
    x = np.zeros((0, 3, 5, 6), dtype)
    out, (gx,), _ = forward_backward(F.max_pool2d, (x,), kernel_size=2, padding=1, ceil_mode=True)
    assert out.shape == (0, 3, 3, 4) and gx.shape == x.shape
    o, i = F.max_pool2d(x, 2, return_indices=True)
    assert o.shape == (0, 3, 2, 3) and i.shape == (0, 3, 2, 3) and i.dtype == np.int64
    out, (gu, _), _ = forward_backward(F.max_unpool2d, (o.numpy(), i.numpy()), kernel_size=2, output_size=(5, 6))
    assert out.shape == (0, 3, 5, 6) and gu.shape == (0, 3, 2, 3)
    out, (gx,), _ = forward_backward(F.avg_pool2d, (x,), kernel_size=3, stride=2, padding=1)
    assert out.shape == (0, 3, 3, 3) and gx.shape == x.shape
    out, (gx,), _ = forward_backward(F.adaptive_avg_pool2d, (x,), output_size=(2, 4))
    assert out.shape == (0, 3, 2, 4) and gx.shape == x.shape
    out, (gx,), _ = forward_backward(F.relu, (x,))
    assert out.shape == x.shape and gx.shape == x.shape and out.dtype == dtype


def test_max_pool2d_non_contiguous_read_only(rng):
    x = rng.standard_normal((2, 4, 7, 9))[::-1, 1::2, :, ::2]
    x.flags.writeable = False
    out, idx = F.max_pool2d(x, 3, stride=2, padding=1, return_indices=True)
    ref, ref_idx = R.max_pool2d(x, 3, stride=2, padding=1)
    R.assert_close(out.numpy(), ref)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    R.assert_close(F.avg_pool2d(x, 2, padding=1).numpy(), R.avg_pool2d(x, 2, padding=1))
    R.assert_close(F.adaptive_avg_pool2d(x, 3).numpy(), R.adaptive_avg_pool2d(x, 3))


# ----------------------------------------------------------------------------- max_unpool2d

# (x shape, pooling kernel, stride, padding, output_size passed to unpool)
UNPOOL_CASES = [
    ((1, 2, 4, 6), 2, None, 0, None),
    ((2, 2, 5, 7), 2, None, 0, (5, 7)),          # odd input: the default size would drop a row
    ((1, 1, 6, 6), 3, 3, 1, (6, 6)),
    ((1, 3, 6, 4), (3, 2), (3, 2), 0, None),
    ((2, 1, 5, 5), 2, None, 0, (2, 1, 5, 5)),    # PyTorch also accepts the full (N, C, H, W)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", UNPOOL_CASES, ids=[f"unpool{i}" for i in range(len(UNPOOL_CASES))])
def test_max_unpool2d_forward_and_grad(rng, case, dtype):
    shape, k, s, p, osz = case
    x = rng.standard_normal(shape).astype(dtype)
    pooled, idx = R.max_pool2d(x, k, s, p)
    pooled = pooled.astype(dtype)
    ref = R.max_unpool2d(pooled, idx, k, s, p, osz)
    out, (gx, gi), gy = forward_backward(F.max_unpool2d, (pooled, idx), kernel_size=k, stride=s, padding=p,
                                         output_size=osz)
    assert out.dtype == dtype and gi is None
    R.assert_close(out, ref, dtype)
    R.assert_close(gx, R.max_unpool2d_grad(gy, idx), dtype, "gx")
    # the indices straight from the package's max_pool2d, as a Tensor
    o2, i2 = F.max_pool2d(x, k, s, p, return_indices=True)
    R.assert_close(F.max_unpool2d(o2, i2, k, s, p, output_size=osz).numpy(), ref, dtype)


def test_max_unpool2d_grad_matches_finite_differences(rng):
    x = rng.standard_normal((1, 2, 4, 6))
    pooled, idx = R.max_pool2d(x, 2)
    _, (gx, _), gy = forward_backward(F.max_unpool2d, (pooled, idx), kernel_size=2)

    def fwd(v):
        with cn.no_grad():
            return F.max_unpool2d(v, idx, 2).numpy()

    R.assert_close(gx, R.numerical_grad(fwd, pooled, gy), np.float32)


def test_max_unpool2d_rejects_out_of_range_indices():
    x = np.ones((1, 1, 2, 2))
    idx = np.array([[[[0, 1], [4, 16]]]], np.int64)  # 16 is outside the default 4x4 output
    with pytest.raises((ValueError, IndexError), match="indices"):
        F.max_unpool2d(x, idx, 2)
    with pytest.raises((ValueError, IndexError), match="indices"):
        F.max_unpool2d(x, -idx - 1, 2)


# ----------------------------------------------------------------------------- avg_pool2d

# (x shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CASES = [
    ((1, 1, 1, 1), 1, None, 0, False, True, None),
    ((2, 3, 5, 7), 2, None, 0, False, True, None),
    ((2, 2, 5, 7), 3, 2, 1, False, True, None),
    ((2, 2, 5, 7), 3, 2, 1, False, False, None),
    ((2, 2, 5, 7), 3, 2, 1, True, True, None),          # ceil: windows clipped at the padded edge
    ((2, 2, 5, 7), 3, 2, 1, True, False, None),
    ((1, 2, 5, 5), 2, 2, 1, True, True, None),          # last window dropped
    ((1, 2, 6, 5), (3, 2), (2, 1), (1, 1), True, True, 5),
    ((1, 2, 6, 5), (3, 2), (2, 1), (1, 0), False, False, 2),
    ((1, 1, 7, 7), 2, 3, 0, False, True, None),         # stride > kernel
    ((1, 1, 8, 8), 3, 3, 0, True, True, None),          # overhang without padding
    ((2, 1, 4, 3), (4, 3), None, 0, False, True, None), # kernel == input
    ((1, 1, 8, 5), 3, (3, 2), 1, True, False, 3),
    ((1, 2, 3, 3), 3, 1, 1, False, True, None),
    ((1, 1, 4, 5), 2, None, 0, False, True, -3),        # PyTorch takes any non-zero int divisor
]
AVG_IDS = [f"avg{i}" for i in range(len(AVG_CASES))]


def _avg_kw(case):
    _, k, s, p, cm, cip, dov = case
    return dict(kernel_size=k, stride=s, padding=p, ceil_mode=cm, count_include_pad=cip, divisor_override=dov)


@pytest.mark.parametrize("case", AVG_CASES, ids=AVG_IDS)
def test_reference_avg_pool_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    kw = _avg_kw(case)
    x = rng.standard_normal(case[0])
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.avg_pool2d(tx, **kw)
    gy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(gy))
    R.assert_close(ty.detach().numpy(), R.avg_pool2d(x, **kw))
    R.assert_close(tx.grad.numpy(), R.avg_pool2d_grad(gy, x.shape, **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", AVG_CASES, ids=AVG_IDS)
def test_avg_pool2d_forward_and_grad(rng, case, dtype, device):
    kw = _avg_kw(case)
    x = random(rng, case[0], dtype)
    out, (gx,), gy = forward_backward(F.avg_pool2d, (x,), device=device, **kw)
    assert out.dtype == dtype and gx.dtype == dtype
    R.assert_close(out, R.avg_pool2d(x, **kw), dtype, "y")
    R.assert_close(gx, R.avg_pool2d_grad(gy, x.shape, **kw), dtype, "gx")


@pytest.mark.parametrize("case", [AVG_CASES[i] for i in (4, 7, 12)], ids=["ceil", "divisor", "exclude-pad"])
def test_avg_pool2d_grad_matches_finite_differences(rng, case):
    kw = _avg_kw(case)
    x = rng.standard_normal(case[0])
    _, (gx,), gy = forward_backward(F.avg_pool2d, (x,), **kw)

    def fwd(v):
        with cn.no_grad():
            return F.avg_pool2d(v, **kw).numpy()

    R.assert_close(gx, R.numerical_grad(fwd, x, gy), np.float32)


# ----------------------------------------------------------------------------- adaptive_avg_pool2d

ADAPTIVE_CASES = [
    ((1, 1, 1, 1), 1),
    ((2, 3, 5, 7), 1),          # global average pooling
    ((1, 2, 7, 5), (2, 4)),     # windows overlap
    ((1, 2, 4, 4), (4, 4)),     # identity
    ((1, 1, 3, 5), (5, 7)),     # larger than the input
    ((2, 2, 10, 9), (3, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=[str(c[1]) for c in ADAPTIVE_CASES])
def test_adaptive_avg_pool2d_forward_and_grad(rng, case, dtype, device):
    shape, osz = case
    x = random(rng, shape, dtype)
    out, (gx,), gy = forward_backward(F.adaptive_avg_pool2d, (x,), output_size=osz, device=device)
    assert out.dtype == dtype
    R.assert_close(out, R.adaptive_avg_pool2d(x, osz), dtype, "y")
    R.assert_close(gx, R.adaptive_avg_pool2d_grad(gy, shape), dtype, "gx")


def test_adaptive_avg_pool2d_none_keeps_that_size(rng):
    x = rng.standard_normal((1, 2, 7, 5))
    R.assert_close(F.adaptive_avg_pool2d(x, (3, None)).numpy(), R.adaptive_avg_pool2d(x, (3, 5)))
    R.assert_close(F.adaptive_avg_pool2d(x, (None, 2)).numpy(), R.adaptive_avg_pool2d(x, (7, 2)))


@pytest.mark.parametrize("case", ADAPTIVE_CASES[1:], ids=[str(c[1]) for c in ADAPTIVE_CASES[1:]])
def test_reference_adaptive_matches_torch(rng, case):
    torch = pytest.importorskip("torch")
    shape, osz = case
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.adaptive_avg_pool2d(tx, osz)
    gy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(gy))
    R.assert_close(ty.detach().numpy(), R.adaptive_avg_pool2d(x, osz))
    R.assert_close(tx.grad.numpy(), R.adaptive_avg_pool2d_grad(gy, shape))


def test_adaptive_avg_pool2d_grad_matches_finite_differences(rng):
    x = rng.standard_normal((1, 2, 7, 5))
    _, (gx,), gy = forward_backward(F.adaptive_avg_pool2d, (x,), output_size=(3, 2))

    def fwd(v):
        with cn.no_grad():
            return F.adaptive_avg_pool2d(v, (3, 2)).numpy()

    R.assert_close(gx, R.numerical_grad(fwd, x, gy), np.float32)


# ----------------------------------------------------------------------------- relu


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_relu_forward_and_grad(rng, dtype):
    x = rng.integers(-2, 3, (2, 3, 4, 5)).astype(dtype) * 0.5  # exact zeros included: gradient 0 there
    out, (gx,), gy = forward_backward(F.relu, (x,))
    assert out.dtype == dtype
    R.assert_close(out, R.relu(x), dtype)
    R.assert_close(gx, R.relu_grad(x, gy), dtype)
    y = F.relu(np.array([np.nan, -np.inf, np.inf, -0.0], dtype))
    assert np.isnan(y.numpy()[0]) and list(y.numpy()[1:]) == [0, np.inf, 0]


def test_relu_grad_matches_finite_differences(rng):
    x = rng.standard_normal((1, 2, 3, 4))
    x[np.abs(x) < 1e-3] = 0.5  # stay away from the kink
    _, (gx,), gy = forward_backward(F.relu, (x,))

    def fwd(v):
        with cn.no_grad():
            return F.relu(v).numpy()

    R.assert_close(gx, R.numerical_grad(fwd, x, gy), np.float32)


def test_relu_at_nan_passes_the_gradient_like_pytorch():
    """PyTorch: relu(nan) = nan and its gradient is the incoming one (mask is ``x <= 0``, false for NaN)."""
    x = np.array([np.nan, -1.0, 0.0, 2.0])
    out, (gx,), _ = forward_backward(F.relu, (x,), gy=np.ones(4))
    assert np.isnan(out[0])
    np.testing.assert_array_equal(gx, R.relu_grad(x, np.ones(4)))  # [1, 0, 0, 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 5, 7), (3, 1, 2, 2)], ids=str)
def test_max_pool_2x2_fast_path_keeps_the_rules(rng, dtype, shape, monkeypatch):
    """kernels/pool.py's 2x2 stride-2 kernel: values and indices as the reference, with ties
    (the first wins), NaNs (the last wins), -inf and inf; odd sizes drop the last row or column.
    The fast kernel must be the one that ran."""
    from cnn_numba.kernels import pool
    calls = _count_launches(monkeypatch, pool, ["max_pool2d_forward_2x2", "max_pool2d_forward_2x2_serial"])
    x = rng.integers(-2, 3, size=shape).astype(dtype)  # many ties
    flat = x.reshape(-1)
    flat[::7] = np.nan
    flat[3::11] = -np.inf
    flat[5::13] = np.inf
    out, idx = F.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = R.max_pool2d(x, 2)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_array_equal(out.numpy(), ref.astype(dtype))
    assert sum(calls.values()) == 1


# ----------------------------------------------------------------------------- serial and parallel forwards

def _count_launches(monkeypatch, module, names):
    """Wrap the kernels ``names`` of ``module`` to count their calls; the counter."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        kern = getattr(module, name)

        def counted(*args, _k=kern, _n=name):
            calls[_n] += 1
            return _k(*args)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("path", ["serial", "parallel"])
def test_pool_forwards_match_reference_on_both_paths(rng, monkeypatch, path):
    """Every max, average and adaptive case through the serial twin (threshold out of reach)
    and the parallel kernel (threshold 0), each checked to have run, against the float64
    references; max pooling also on ties and NaNs, whose rules the serial twin must keep."""
    from cnn_numba.kernels import pool
    names = ["max_pool2d_forward", "avg_pool2d_forward", "adaptive_avg_pool2d_forward", "max_pool2d_forward_2x2"]
    kernels = names if path == "parallel" else [n + "_serial" for n in names]
    monkeypatch.setattr(pool, "POOL_PARALLEL_READS", 0 if path == "parallel" else 1 << 60)
    calls = _count_launches(monkeypatch, pool, kernels)
    with cn.no_grad():
        for dtype in DTYPES:
            for shape, kw in MAX_CASES:
                for kind in ("distinct", "ties", "nan"):
                    x = _pool_data(rng, shape, kind, dtype)
                    out, idx = F.max_pool2d(x, return_indices=True, **kw)
                    ref, ref_idx = R.max_pool2d(x, **kw)
                    np.testing.assert_array_equal(idx.numpy(), ref_idx)
                    R.assert_close(out.numpy(), ref, dtype)
            for case in AVG_CASES:
                x = random(rng, case[0], dtype)
                R.assert_close(F.avg_pool2d(x, **_avg_kw(case)).numpy(), R.avg_pool2d(x, **_avg_kw(case)), dtype)
            for shape, osz in ADAPTIVE_CASES:
                x = random(rng, shape, dtype)
                R.assert_close(F.adaptive_avg_pool2d(x, osz).numpy(), R.adaptive_avg_pool2d(x, osz), dtype)
    # max pooling: the 2x2 stride-2 kernel where its windows fit, the general one elsewhere
    assert calls[kernels[0]] + calls[kernels[3]] == 2 * 3 * len(MAX_CASES) and calls[kernels[3]] > 0
    assert calls[kernels[1]] == 2 * len(AVG_CASES) and calls[kernels[2]] == 2 * len(ADAPTIVE_CASES)


@pytest.mark.parametrize("stride, kernel_name", [((1, 1), "max_pool2d_forward"), ((2, 2), "max_pool2d_forward_2x2")])
def test_pool_forward_threshold_picks_by_window_reads(rng, monkeypatch, stride, kernel_name):
    """One read under POOL_PARALLEL_READS runs the serial twin, exactly that many the parallel
    kernel: 2x2 windows over (1, 2, 8, 8), 2 planes * 7x7 outputs * 4 taps = 392 reads at
    stride 1 (the general kernel), 2 * 4x4 * 4 = 128 at stride 2 (the 2x2 kernel)."""
    from cnn_numba.kernels import pool
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    out_hw = (7, 7) if stride == (1, 1) else (4, 4)
    reads = 2 * out_hw[0] * out_hw[1] * 4
    for threshold, ran in ((reads + 1, kernel_name + "_serial"), (reads, kernel_name)):
        monkeypatch.setattr(pool, "POOL_PARALLEL_READS", threshold)
        calls = _count_launches(monkeypatch, pool, [kernel_name, kernel_name + "_serial"])
        out, idx = pool.max_pool2d(x, out_hw, (2, 2), stride, (0, 0), (1, 1))
        ref, ref_idx = R.max_pool2d(x.astype(np.float64), 2, stride)
        np.testing.assert_array_equal(idx, ref_idx)
        R.assert_close(out, ref, np.float32)
        assert calls == {n: int(n == ran) for n in calls}
        monkeypatch.undo()
