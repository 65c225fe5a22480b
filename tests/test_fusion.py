"""Eval-mode fusion of conv2d -> batch_norm -> relu (kernels/conv.py's epilogue,
functional.conv2d_bn_relu, nn/module.py's conv_chain and Sequential): outputs bit for bit
those of the three ops one by one, close to the float64 references, for every forward
launcher of the CPU table; the models' eval outputs unchanged; and the fusion runs exactly
where nothing records or observes the intermediate outputs."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba import models, nn
from cnn_numba.backend import kernel
from cnn_numba.kernels.conv import no_epilogue
from cnn_numba.kernels.conv_algos import TABLE
from cnn_numba.nn import module as M
from cnn_numba.shapes import conv2d_geom
import reference as R
from conftest import DTYPES, random

# Every forward launcher of the CPU table: each entry's own, and its specialisation's.
LAUNCHERS = [(a.name, a) for a in TABLE.algos] + [(a.special.name, a.special) for a in TABLE.algos if a.special]

# (x shape, w shape, stride, padding, dilation, groups): plain, groups, stride 2, depthwise
# (stride 1 and 2), a 1x1, dilation, and the large dilation on which the flat and shifted
# kernels give way to the general ones; 33 output channels at stride 2 (the blocked kernel's
# 32-channel blocks, one partial).
CASES = [
    ((2, 4, 9, 9), (6, 4, 3, 3), 1, 1, 1, 1),
    ((2, 4, 10, 8), (6, 2, 3, 3), 1, 1, 1, 2),
    ((3, 3, 11, 11), (8, 3, 3, 3), 2, 1, 1, 1),
    ((2, 8, 12, 12), (8, 1, 3, 3), 1, 1, 1, 8),
    ((2, 8, 13, 13), (8, 1, 3, 3), 2, 1, 1, 8),
    ((2, 5, 7, 7), (7, 5, 1, 1), 1, 0, 1, 1),
    ((1, 3, 9, 9), (4, 3, 3, 3), 1, 2, 2, 1),
    ((1, 2, 1, 1), (3, 2, 3, 3), 1, 300, 300, 1),
    ((2, 4, 9, 9), (33, 4, 3, 3), 2, 1, 1, 1),
]


def _bn_stats(rng, c, dtype, affine=True):
    """Running statistics and (affine) weight and bias (C,) of a trained-looking batch norm,
    with negative weights so that relu cuts both ways."""
    mean = (0.5 * rng.standard_normal(c)).astype(dtype)
    var = rng.uniform(0.2, 3.0, c).astype(dtype)
    w = rng.standard_normal(c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    return mean, var, w, b


def _bn_relu(y, stats, relu):
    """batch_norm (eval) and relu of the conv output y, one by one through the public functions."""
    y = cn.Tensor(y)
    if stats is not None:
        y = F.batch_norm(y, *stats[:4], training=False, eps=1e-5)
    return (F.relu(y) if relu else y).numpy()


def _unfused(x, w, b, geom_args, stats, relu, algo):
    """conv2d, batch_norm (eval), relu, one by one through the public functions."""
    return _bn_relu(F.conv2d(x, w, b, *geom_args, algo=algo).numpy(), stats, relu)


def _same_bits(a, b):
    """Equal element for element, NaN to NaN and the sign of zeros included."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True) and np.array_equal(
        np.signbit(a), np.signbit(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("name", [n for n, _ in LAUNCHERS])
def test_every_launcher_fused_equals_unfused(name, case, dtype, rng):
    """Each forward launcher with the batch-norm + relu epilogue gives the unfused ops' bits
    (with and without a conv bias), and the float64 reference within the package's tolerance."""
    entry = dict(LAUNCHERS)[name]
    xs, ws, s, p, d, g = CASES[case]
    geom = conv2d_geom(xs, ws, s, p, d, g)
    if not entry.supports(geom, "forward") or entry.forward is None:
        pytest.skip(f"{name} does not run this geometry")
    x, w = random(rng, xs, dtype), random(rng, ws, dtype)
    stats = _bn_stats(rng, ws[0], dtype)

    def launch(b, epilogue):
        y = np.empty(geom.y_shape, dtype)
        entry.forward(x, w, np.zeros(ws[0], dtype) if b is None else b, y, geom, **epilogue)
        return y

    for b in (None, random(rng, (ws[0],), dtype)):
        conv = launch(b, {})  # this launcher's plain conv: the unfused ops start from it
        for relu in (False, True):
            y = launch(b, dict(epilogue=kernel("conv2d_epilogue", "cpu")(dtype, (*stats, 1e-5), relu)))
            want = _bn_relu(conv, stats, relu)
            assert _same_bits(y, want), (name, b is None, relu, np.abs(y - want).max())
            ref = R.batch_norm_eval(R.conv2d(x, w, b, s, p, d, g), *stats)
            R.assert_close(y, R.relu(ref) if relu else ref, dtype, f"{name} relu={relu}")
        # relu alone, no batch norm: the plain conv's bits, the negatives cut
        assert _same_bits(launch(b, dict(epilogue=(no_epilogue(dtype)[0], True))), _bn_relu(conv, None, True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", list(TABLE.names) + ["auto"])
@pytest.mark.parametrize("bn,relu", [("affine", True), ("affine", False), ("plain", True), (None, True)])
def test_conv2d_bn_relu_function(algo, bn, relu, dtype, rng):
    """functional.conv2d_bn_relu under no_grad: the fused op runs, the bits are the unfused
    ops'; with a graph recorded it is the unfused ops (and differentiable)."""
    x, w, b = random(rng, (2, 4, 9, 9), dtype), random(rng, (6, 4, 3, 3), dtype), random(rng, (6,), dtype)
    stats = None if bn is None else _bn_stats(rng, 6, dtype, affine=bn == "affine")
    args = None if stats is None else (*stats, 1e-5)
    want = _unfused(x, w, b, (1, 1, 1, 1), stats, relu, algo)
    with cn.no_grad():
        got = F.conv2d_bn_relu(x, w, b, 1, 1, bn=args, with_relu=relu, algo=algo)
    assert _same_bits(got.numpy(), want)
    assert got._ctx is None and not got.requires_grad
    wt = cn.Tensor(w, requires_grad=True)
    y = F.conv2d_bn_relu(x, wt, b, 1, 1, bn=args, with_relu=relu, algo=algo)
    assert y.requires_grad and type(y._ctx).__name__ in ("ReLU", "BatchNorm")
    assert _same_bits(y.numpy(), want)
    y.sum().backward()
    assert wt.grad is not None


def non_finite_inputs(rng, xs, co):
    """float32 x of shape ``xs`` (N >= 2, C = 3, H and W >= 6) holding inf, NaN and -inf; w
    (co >= 4, 3, 3, 3) and batch-norm statistics (tests/test_cuda_conv.py uses them too)."""
    x = random(rng, xs, np.float32)
    x[0, 0, 2, 2], x[1, 2, 5, 1], x[0, 1, xs[2] - 1, xs[3] - 1] = np.inf, np.nan, -np.inf
    w = random(rng, (co, 3, 3, 3), np.float32)
    w[3] = 0  # channel 3: conv output +-0 (and NaN where it reads an inf)
    stats = list(_bn_stats(rng, co, np.float32))
    stats[0][3], stats[3][3] = 0, -0.0  # (0 - 0) * scale + -0.0 = +-0
    return x, w, stats


def test_non_finite_and_signed_zero_outputs(rng):
    """inf and NaN inputs, and -0.0 outputs, come out of the fused pass as out of the three ops."""
    x, w, stats = non_finite_inputs(rng, (2, 3, 8, 8), 4)
    for algo in TABLE.names:
        for relu in (False, True):
            want = _unfused(x, w, None, (1, 1, 1, 1), stats, relu, algo)
            with cn.no_grad():
                got = F.conv2d_bn_relu(x, w, None, 1, 1, bn=(*stats, 1e-5), with_relu=relu, algo=algo).numpy()
            assert _same_bits(got, want), (algo, relu)
            assert np.isnan(got).any()


# ----------------------------------------------------------------------------- modules and models

@pytest.fixture
def spy(monkeypatch):
    """The number of fused conv launches (calls of Conv2dEpilogue's forward) so far."""
    calls = []
    inner = F.Conv2dEpilogue.forward

    def forward(self, *args, **kwargs):
        calls.append(kwargs["epilogue"][1])
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(F.Conv2dEpilogue, "forward", forward)
    return calls


def _randomise_bn(model, rng):
    """Running statistics and affine parameters away from their 0/1 initial values."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.data[:] = 0.3 * rng.standard_normal(c)
            m.running_var.data[:] = rng.uniform(0.3, 2.0, c)
            m.weight.data[:] = rng.standard_normal(c)
            m.bias.data[:] = rng.standard_normal(c)
    return model


# model, input shape, fused launches per forward (resnet8: stem + 2 per block + 2 projections;
# mobilenet_small: stem + 2 per unit; lenet5: conv1 and conv2 with their ReLUs;
# inception_small: stem + 6 per Inception module, each branch's convs with their ReLUs)
MODELS = [("resnet8", (4, 1, 16, 16), 9), ("mobilenet_small", (4, 1, 16, 16), 7), ("lenet5", (4, 1, 28, 28), 2),
          ("inception_small", (2, 1, 12, 12), 13)]


@pytest.mark.parametrize("name,shape,fused", MODELS)
def test_models_eval_fused_equals_unfused(name, shape, fused, spy, monkeypatch, rng):
    """Eval outputs under no_grad (fused) are bit for bit those of the unfused modules: with
    fusion off, and with a graph recorded (the training path's forward in eval mode)."""
    cn.manual_seed(0)
    model = _randomise_bn(models.MODELS[name](), rng).eval()
    x = random(rng, shape, np.float32)
    with cn.no_grad():
        got = model(x).numpy()
    assert len(spy) == fused
    recorded = model(x)
    assert recorded.requires_grad and len(spy) == fused  # grad recorded: not fused
    monkeypatch.setattr(M, "FUSE", False)
    with cn.no_grad():
        off = model(x).numpy()
    assert len(spy) == fused
    assert _same_bits(got, recorded.numpy()) and _same_bits(got, off)
    if name == "resnet8":  # float64 too
        model.double()
        monkeypatch.setattr(M, "FUSE", True)
        with cn.no_grad():
            got = model(x.astype(np.float64)).numpy()
        assert _same_bits(got, model(x.astype(np.float64)).detach().numpy()) and len(spy) == 2 * fused


def test_bottleneck_fuses_its_three_convs(spy, rng):
    block = _randomise_bn(nn.Bottleneck(8, 4, stride=2), rng).eval()
    x = random(rng, (2, 8, 9, 9), np.float32)
    with cn.no_grad():
        got = block(x).numpy()
    assert spy == [False, True, True, False]  # the projection conv+bn first, conv1+bn+relu, conv2+bn+relu, conv3+bn
    assert _same_bits(got, block(x).numpy())


def test_not_fused_in_training_mode_or_with_a_graph(spy, rng):
    model = _randomise_bn(models.resnet8(), rng)
    x = random(rng, (2, 1, 12, 12), np.float32)
    with cn.no_grad():
        model(x)  # training mode: batch statistics
    assert spy == []
    model.eval()
    model(x)  # parameters require grad: the graph is recorded
    assert spy == []
    model.requires_grad_(False)
    y = model(x)  # nothing requires grad: nothing recorded, so fused even with grad mode on
    assert len(spy) == 9 and not y.requires_grad
    model.train()
    model.requires_grad_(False)
    with cn.no_grad():
        model(x)
    assert len(spy) == 9


def test_not_fused_where_observed(spy, rng):
    """summary() and onnx.export wrap modules' forward as an instance attribute; a module so
    wrapped (or of a subclass) is not fused, and sees its own output."""
    model = _randomise_bn(models.resnet8(), rng).eval()
    x = random(rng, (2, 1, 12, 12), np.float32)
    cn.summary(model, (1, 12, 12), verbose=False)
    assert spy == []
    seen = []
    bn1 = model.bn1
    inner = bn1.forward
    object.__setattr__(bn1, "forward", lambda t: seen.append(t.shape) or inner(t))
    with cn.no_grad():
        a = model(x).numpy()
    assert seen == [(2, 16, 12, 12)] and len(spy) == 8  # the stem ran unfused, the rest fused
    bn1.__dict__.pop("forward")
    with cn.no_grad():
        assert _same_bits(model(x).numpy(), a) and len(spy) == 17


def test_subclasses_and_unfusable_runs_are_left_alone(spy, rng):
    class LoggingReLU(nn.ReLU):
        def forward(self, x):
            return F.relu(x)

    seq = nn.Sequential(OrderedDict([
        ("c3", nn.ConnectionTableConv2d(6, 16, 5, nn.LENET5_C3_TABLE)), ("r3", nn.ReLU()),  # subclass conv
        ("conv", nn.Conv2d(16, 4, 3)), ("act", LoggingReLU()),                              # subclass relu
        ("conv2", nn.Conv2d(4, 4, 1)), ("bn", nn.BatchNorm2d(4, track_running_stats=False)),  # batch statistics
        ("conv3", nn.Conv2d(4, 4, 1)), ("bn3", nn.BatchNorm2d(4)), ("relu3", nn.ReLU()),
    ])).eval()
    x = random(rng, (2, 6, 14, 14), np.float32)
    with cn.no_grad():
        got = seq(x).numpy()
    assert spy == [True]  # conv3 -> bn3 -> relu3 only
    assert _same_bits(got, seq(x).numpy())


def test_errors_are_those_of_the_unfused_modules(rng):
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with cn.no_grad(), pytest.raises(ValueError, match="running_mean must have shape"):
        seq(random(rng, (1, 3, 6, 6), np.float32))
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with cn.no_grad(), pytest.raises(ValueError, match="expected 4-D|must be 4-D|\\(N, C, H, W\\)"):
        seq(random(rng, (3, 6, 6), np.float32))


# ----------------------------------------------------------------------------- nn.utils.fuse_conv_bn_eval

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,affine,groups,stride", [(True, True, 1, 1), (False, True, 2, 2), (False, False, 1, 1)])
def test_fuse_conv_bn_eval(bias, affine, groups, stride, dtype, rng):
    """PyTorch's explicit folding: one conv equal to conv -> bn (eval) within the float tolerance
    of the float64 reference; the layers themselves unchanged."""
    conv = nn.Conv2d(4, 6, 3, stride, 1, groups=groups, bias=bias, dtype=dtype).eval()
    bn = nn.BatchNorm2d(6, affine=affine, dtype=dtype).eval()
    mean, var, w, b = _bn_stats(rng, 6, dtype, affine)
    bn.running_mean.data[:], bn.running_var.data[:] = mean, var
    if affine:
        bn.weight.data[:], bn.bias.data[:] = w, b
    before = [p.numpy().copy() for p in (*conv.parameters(), *bn.parameters())]
    fused = nn.utils.fuse_conv_bn_eval(conv, bn)
    assert [n for n, _ in fused.named_parameters()] == ["weight", "bias"] and fused.bias.dtype == dtype
    x = random(rng, (2, 4, 9, 9), dtype)
    with cn.no_grad():
        got = fused(x).numpy()
    ref = R.batch_norm_eval(R.conv2d(x, conv.weight.numpy(), None if conv.bias is None else conv.bias.numpy(),
                                     stride, 1, 1, groups), mean, var, w, b)
    R.assert_close(got, ref, dtype, "fused conv")
    assert all(np.array_equal(a, p.numpy()) for a, p in zip(before, (*conv.parameters(), *bn.parameters())))
    with pytest.raises(ValueError, match="eval mode"):
        nn.utils.fuse_conv_bn_eval(conv.train(), bn)


def test_environment_variable_turns_the_fusion_off(tmp_path):
    """CNN_NUMBA_FUSE=0, read at import: nn.module.FUSE is False in that process."""
    code = "import cnn_numba.nn.module as M; print(M.FUSE)"
    for value, want in (("0", "False"), ("1", "True")):
        env = dict(os.environ, CNN_NUMBA_FUSE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.stdout.strip() == want, out.stderr[-2000:]


# ----------------------------------------------------------------------------- batch norm -> relu, training too

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (64, 16, 8, 8), (3, 5, 1, 1)], ids=str)
def test_batch_norm_relu_equals_the_two_ops(shape, training, dtype, rng):
    """F.batch_norm_relu: output, every gradient and the running statistics bit for bit those of
    relu(batch_norm(...)), with NaN, inf and exact zeros among the inputs (relu's mask at 0);
    and close to the float64 reference."""
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[::29], flat[7::31], flat[3::17] = np.nan, np.inf, 0.0
    c = shape[1]
    w, b, gy = random(rng, (c,), dtype), random(rng, (c,), dtype), random(rng, shape, dtype)
    stats = random(rng, (c,), dtype), np.abs(random(rng, (c,), dtype)) + 0.5
    out = []
    for fused in (False, True):
        xt, wt, bt = (cn.tensor(a, requires_grad=True) for a in (x, w, b))
        rm, rv = cn.tensor(stats[0].copy()), cn.tensor(stats[1].copy())
        args = (xt, rm, rv, wt, bt, training, 0.1, 1e-5)
        y = F.batch_norm_relu(*args) if fused else F.relu(F.batch_norm(*args))
        y.backward(cn.tensor(gy))
        out.append((y.numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy(), rm.numpy(), rv.numpy()))
    for a, f in zip(*out):
        np.testing.assert_array_equal(f, a)
    finite = rng.standard_normal(shape).astype(dtype)
    ref = np.maximum(R.batch_norm_eval(finite, *stats, w, b, 1e-5), 0) if not training else None
    if ref is not None:
        R.assert_close(F.batch_norm_relu(finite, cn.tensor(stats[0]), cn.tensor(stats[1]), w, b).numpy(), ref, dtype)


def test_resnet8_training_step_fuses_batch_norm_relu_bit_for_bit(monkeypatch, rng):
    """A resnet8 training step with bn -> relu fused (Sequential's stem, BasicBlock's bn1 ->
    relu) and with the fusion off: the same loss, gradients and running statistics; the fused
    op ran (4 times: the stem and each block's first batch norm)."""
    x, t = random(rng, (8, 1, 12, 12), np.float32), rng.integers(0, 10, 8)
    calls = []
    fused_op = F.batch_norm_relu
    monkeypatch.setattr(F, "batch_norm_relu", lambda *a, **k: (calls.append(1), fused_op(*a, **k))[1])
    results = []
    for fuse in (False, True):
        monkeypatch.setattr(M, "FUSE", fuse)
        cn.manual_seed(3)
        model = models.resnet8()
        loss = F.cross_entropy(model(cn.tensor(x)), t)
        loss.backward()
        results.append([loss.numpy()] + [p.grad.numpy() for p in model.parameters()]
                       + [b.numpy() for _, b in model.named_buffers()])
    assert len(calls) == 4
    for a, f in zip(*results):
        np.testing.assert_array_equal(f, a)


def test_batch_norm_relu_not_fused_where_observed(monkeypatch, rng):
    """A ReLU or BatchNorm2d with a forward set on the instance (how summary() watches a layer)
    runs on its own."""
    calls = []
    fused_op = F.batch_norm_relu
    monkeypatch.setattr(F, "batch_norm_relu", lambda *a, **k: (calls.append(1), fused_op(*a, **k))[1])
    seq = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    x = random(rng, (2, 3, 4, 4), np.float32)
    seq(x)
    assert len(calls) == 1
    relu = seq[1]
    seen = []
    relu.forward = lambda t, _f=type(relu).forward: (seen.append(1), _f(relu, t))[1]
    seq(x)
    assert len(calls) == 1 and seen == [1]


def test_batch_norm_relu_not_fused_for_sync_batch_norm(monkeypatch, rng):
    """distributed.convert_sync_batchnorm replaces a batch norm's op on the instance (statistics
    over all ranks): that layer runs its own op, not the fused one, whose statistics are local."""
    from cnn_numba import distributed
    calls = []
    fused_op = F.batch_norm_relu
    monkeypatch.setattr(F, "batch_norm_relu", lambda *a, **k: (calls.append(1), fused_op(*a, **k))[1])
    model = distributed.convert_sync_batchnorm(models.resnet8())
    F.cross_entropy(model(cn.tensor(random(rng, (4, 1, 12, 12), np.float32))), np.arange(4)).backward()
    assert calls == []


# ----------------------------------------------------------------------------- linear -> relu

@pytest.fixture
def linear_spy(monkeypatch):
    """The number of fused linear launches (calls of LinearReLU's forward) so far."""
    calls = []
    inner = F.LinearReLU.forward

    def forward(self, *args):
        calls.append(args[0].shape)
        return inner(self, *args)

    monkeypatch.setattr(F.LinearReLU, "forward", forward)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 400, 120), (3, 84, 10), (256, 400, 120), (4, 2, 5, 7)], ids=str)
def test_linear_relu_equals_the_two_ops(shape, dtype, linear_spy, rng):
    """Bit for bit relu(linear) with NaN, inf and signed zeros among the outputs, on the serial
    small product (under ROWS_PARALLEL_MACS multiply-adds) and the BLAS one (batch 256), with
    and without a bias and for an input of more than two dims; close to the float64 reference."""
    *rows, k, n = shape
    x, w, b = random(rng, (*rows, k), dtype), random(rng, (n, k), dtype), random(rng, (n,), dtype)
    x.reshape(-1, k)[0, :2] = [np.nan, 0.0]
    w[1, :] = 0.0
    b[1] = -0.0  # output column 1: zero products and a -0.0 bias (relu keeps a zero's sign)
    w[2, 0] = np.inf
    for bias in (b, None):
        with cn.no_grad():
            got = F.linear_relu(x, w, bias).numpy()
            want = F.relu(F.linear(x, w, bias)).numpy()
        assert _same_bits(got, want)
        with np.errstate(invalid="ignore"):
            ref = np.maximum(x.astype(np.float64) @ w.astype(np.float64).T + (0 if bias is None else bias), 0)
        fin = np.isfinite(ref)
        assert np.allclose(got[fin], ref[fin], rtol=1e-4, atol=1e-4)
    assert len(linear_spy) == 2
    xt = cn.tensor(x, requires_grad=True)
    y = F.linear_relu(xt, w, b)  # a graph is recorded: the two ops, with their backward
    assert y.requires_grad and len(linear_spy) == 2
    assert _same_bits(y.detach().numpy(), F.relu(F.linear(x, w, b)).numpy())


def test_lenet5_fuses_its_linear_relus(linear_spy, monkeypatch, rng):
    """Sequential runs Linear -> ReLU as one op in eval mode where nothing records: LeNet-5's
    two hidden layers; not in training mode, not with a graph, not with fusion off."""
    model = models.lenet5()
    x = random(rng, (3, 1, 28, 28), np.float32)
    with cn.no_grad():
        model(x)
    assert linear_spy == []
    model.eval()
    recorded = model(x)
    assert linear_spy == []
    with cn.no_grad():
        got = model(x).numpy()
    assert linear_spy == [(3, 400), (3, 120)]
    monkeypatch.setattr(M, "FUSE", False)
    with cn.no_grad():
        off = model(x).numpy()
    assert len(linear_spy) == 2
    assert _same_bits(got, off) and _same_bits(got, recorded.detach().numpy())


# ----------------------------------------------------------------------------- add -> relu

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16, 7, 7), (3, 7, 100, 101)], ids=str)
def test_add_relu_equals_the_two_ops(shape, dtype, rng):
    """relu(a + b) in one pass, serial (small) and in parallel chunks (over
    ADD_RELU_PARALLEL_ELEMENTS, the last chunk partial): forward and both gradients bit for bit
    those of add then relu, with NaN, inf and signed zeros among the sums."""
    a, b = random(rng, shape, dtype), random(rng, shape, dtype)
    a.flat[:6] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0]
    b.flat[:6] = [1.0, -np.inf, 1.0, -0.0, -0.0, -1.0]
    gy = random(rng, shape, dtype)
    got = []
    for op in (F.add_relu, lambda p, q: F.relu(p + q)):
        at, bt = cn.tensor(a, requires_grad=True), cn.tensor(b, requires_grad=True)
        y = op(at, bt)
        y.backward(gy)
        got.append((y.numpy(), at.grad.numpy(), bt.grad.numpy()))
    for f, u in zip(*got):
        assert _same_bits(f, u)
    with np.errstate(invalid="ignore"):
        R.assert_close(got[0][0], R.relu(a.astype(np.float64) + b), dtype)


def test_add_relu_falls_back_to_the_two_ops(rng):
    """Broadcast operands (and mixed dtypes) take add then relu: the same result."""
    a, b = random(rng, (2, 3, 4, 4)), random(rng, (3, 1, 1))
    np.testing.assert_array_equal(F.add_relu(a, b).numpy(), np.maximum(a + b, 0))
    c = random(rng, (2, 3, 4, 4), np.float32)
    np.testing.assert_array_equal(F.add_relu(a, c).numpy(), F.relu(cn.tensor(a) + cn.tensor(c)).numpy())


def test_residual_blocks_join_with_add_relu(monkeypatch, rng):
    """resnet8's three blocks end in one add_relu each, in eval and training mode, not where
    the block's last ReLU is observed."""
    calls = []
    inner = F.AddReLU.forward
    monkeypatch.setattr(F.AddReLU, "forward", lambda self, *a: (calls.append(1), inner(self, *a))[1])
    model = models.resnet8()
    x = cn.tensor(random(rng, (2, 1, 12, 12), np.float32))
    model(x).sum().backward()
    assert len(calls) == 3
    model.eval()
    with cn.no_grad():
        model(x)
    assert len(calls) == 6
    relu = model.layer1[0].relu2
    relu.forward = lambda t, _f=type(relu).forward: _f(relu, t)
    with cn.no_grad():
        model(x)
    assert len(calls) == 8
