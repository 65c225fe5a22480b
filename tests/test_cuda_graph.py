"""A training step captured once and replayed (cnn_numba.cuda.graphed_step, issue 11 item 4):
on a GPU a CUDA graph, under the simulator the captured launches replayed as a list; the
rules are the same, so these tests hold for both. A replayed step must equal the eager step
bit for bit, with the learning rate and Adam's bias corrections moving between steps (they
live in device memory, not in the graph), batch norm's count going up, and nothing read back.
Tiny shapes: under the simulator every CUDA thread is a Python thread."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import CUDA_SIMULATED, needs_cuda

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba import nn, optim

pytestmark = needs_cuda

B, CLASSES = 2, 3


def _model(momentum=0.1, dropout=False):
    layers = [nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, momentum=momentum), nn.ReLU(), nn.MaxPool2d(2),
              nn.Flatten()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(2 * 2 * 2, CLASSES)]
    return nn.Sequential(*layers)


def _pair(make_opt, **kw):
    """Two identical models on "cuda" with an optimizer and a per-step scheduler each."""
    cn.manual_seed(0)
    a = _model(**kw).to("cuda")
    b = _model(**kw).to("cuda")
    b.load_state_dict(a.state_dict())
    out = []
    for m in (a, b):
        opt = make_opt(m.parameters())
        out.append((m, opt, optim.StepLR(opt, step_size=1, gamma=0.5)))
    return out


def _batches(n, rng, batch=B):
    return [(rng.standard_normal((batch, 1, 4, 4)).astype(np.float32), rng.integers(0, CLASSES, batch))
            for _ in range(n)]


def _eager(model, opt, x, y):
    loss = F.cross_entropy(model(cn.tensor(x, device="cuda")), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def _state(model, opt):
    return ({k: v.copy() for k, v in model.state_dict().items()},
            [p.grad.numpy().copy() for p in model.parameters()])


def _same(a, b):
    (sa, ga), (sb, gb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k, strict=True)
    for u, v in zip(ga, gb):
        np.testing.assert_array_equal(u, v, strict=True)


OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: optim.Adam(ps, lr=0.01, weight_decay=1e-3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_replayed_step_equals_eager_step(name):
    """Five steps, the lr halved after each (a scheduler on the host): losses, weights,
    gradients, batch-norm statistics and num_batches_tracked equal the eager run's, bit for bit;
    the step was captured once and replayed, not run eagerly."""
    rng = np.random.default_rng(0)
    (m1, o1, s1), (m2, o2, s2) = _pair(OPTIMIZERS[name])
    step = cn.cuda.graphed_step(m2, F.cross_entropy, o2, *_batches(1, rng)[0])
    for x, y in _batches(5, rng):
        l1 = _eager(m1, o1, x, y)
        l2 = step(x, y)
        assert l1.item() == l2.item()
        _same(_state(m1, o1), _state(m2, o2))
        s1.step()
        s2.step()
    assert step.kind == ("launch list" if CUDA_SIMULATED else "CUDA graph") and step.failed is None
    assert int(m2[1].num_batches_tracked.item()) == 5
    if name == "adam":
        assert all(s["step"] == 5 for s in o2.state.values())


def test_replays_read_nothing_back(monkeypatch):
    """Between the capture and the end, a replayed step makes no device-to-host copy."""
    from numba import cuda
    rng = np.random.default_rng(1)
    (_, _, _), (m, o, _) = _pair(OPTIMIZERS["sgd"])
    step = cn.cuda.graphed_step(m, F.cross_entropy, o, *_batches(1, rng)[0])
    batches = _batches(4, rng)
    step(*batches[0])
    step(*batches[1])  # captured here
    cls = type(cuda.to_device(np.zeros(1)))
    made = []
    inner = cls.copy_to_host
    monkeypatch.setattr(cls, "copy_to_host", lambda self, *a, **k: made.append(self.shape) or inner(self, *a, **k))
    for x, y in batches[2:]:
        step(x, y)
    assert made == []


def test_other_shapes_run_eagerly_and_state_reloads_recapture():
    """A short last batch runs eagerly between replays; load_state_dict (new arrays) makes the
    next call capture again. Every step still equals the eager run."""
    rng = np.random.default_rng(2)
    (m1, o1, _), (m2, o2, _) = _pair(OPTIMIZERS["sgd"])
    step = cn.cuda.graphed_step(m2, F.cross_entropy, o2, *_batches(1, rng)[0])
    plan = _batches(3, rng) + _batches(1, rng, batch=1) + _batches(2, rng)
    for i, (x, y) in enumerate(plan):
        if i == 4:
            state = {k: v * 0.5 if v.dtype.kind == "f" else v for k, v in m1.state_dict().items()}
            m1.load_state_dict(state)
            m2.load_state_dict(state)
            first = step.capture
        assert _eager(m1, o1, x, y).item() == step(x, y).item()
        _same(_state(m1, o1), _state(m2, o2))
    assert step.capture is not first


@pytest.mark.parametrize("why", ["dropout", "cumulative batch norm"])
def test_uncapturable_step_trains_eagerly_with_one_line(why, capsys):
    """Dropout draws its masks on the host; a batch norm with momentum=None needs 1/count on the
    host. The step says so in one line and trains eagerly, equal to the eager run."""
    kw = dict(dropout=True) if why == "dropout" else dict(momentum=None)
    rng = np.random.default_rng(3)
    (m1, o1, _), (m2, o2, _) = _pair(OPTIMIZERS["adam"], **kw)
    step = cn.cuda.graphed_step(m2, F.cross_entropy, o2, *_batches(1, rng)[0])
    for k, (x, y) in enumerate(_batches(4, rng)):
        cn.manual_seed(k)
        l1 = _eager(m1, o1, x, y)
        cn.manual_seed(k)
        assert l1.item() == step(x, y).item()
        _same(_state(m1, o1), _state(m2, o2))
    lines = [s for s in capsys.readouterr().err.splitlines() if "CUDA graph" in s]
    assert len(lines) == 1 and "runs eagerly" in lines[0]
    assert step.failed and step.capture is None
    assert all(s["step"] == 4 for s in o2.state.values())  # the failed capture moved no step count


@pytest.mark.parametrize("at", ["capture", "replay"])
def test_bad_labels_raise_before_the_step_changes_anything(at):
    """Labels outside [0, classes) raise a ValueError before the capture or the replay: the
    optimiser's step counts and the weights are as before, and the next good batch trains."""
    rng = np.random.default_rng(4)
    (_, _, _), (m, o, _) = _pair(OPTIMIZERS["adam"])
    x, y = _batches(1, rng)[0]
    step = cn.cuda.graphed_step(m, F.cross_entropy, o, x, y)
    step(x, y)  # eager
    if at == "replay":
        step(x, y)  # captured
    before = _state(m, o)[0], [s["step"] for s in o.state.values()]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        step(x, np.array([0, 3]))
    after = _state(m, o)[0], [s["step"] for s in o.state.values()]
    assert before[1] == after[1]
    for k in before[0]:
        np.testing.assert_array_equal(before[0][k], after[0][k], strict=True)
    step(x, y)
    assert all(s["step"] == before[1][0] + 1 for s in o.state.values()) and step.kind is not None


def test_graphed_step_needs_cuda_parameters():
    m = _model()
    with pytest.raises(ValueError, match="not on 'cuda'"):
        cn.cuda.graphed_step(m, F.cross_entropy, optim.SGD(m.parameters(), lr=0.1), *_batches(1, np.random.default_rng(0))[0])


def test_train_epoch_with_and_without_the_graph():
    """train_epoch on "cuda" (the CLI's loop) gives the same metrics and weights whether its
    full batches replay a graph or run eagerly (--no-cuda-graph); a short last batch included,
    and the step kept across two epochs."""
    from cnn_numba import gpu, train
    rng = np.random.default_rng(6)
    batches = _batches(3, rng) + _batches(1, rng, batch=1)
    out = []
    for graph in (False, True):
        (m, o, _), _ = _pair(OPTIMIZERS["adam"])
        step = gpu.GraphedStep(m, train._loss, o, enabled=graph)
        metrics = [train.train_epoch(m, o, batches, e, 2, "cuda", False, step=step) for e in (1, 2)]
        out.append(([{k: r[k] for k in ("train_loss", "train_acc")} for r in metrics], _state(m, o), step.kind))
    (a, sa, ka), (b, sb, kb) = out
    assert ka is None and kb is not None
    assert a == b
    _same(sa, sb)


def test_gpu_tuner_times_nothing_while_a_step_is_captured(monkeypatch, tmp_path):
    """A capture runs no kernel, so the conv tuner (kernels/autotune.CudaTuner) must not time
    one then: an undecided shape gets the rule (None), a decided one its choice, and the clock
    is never called."""
    from cnn_numba.backend import kernel
    from cnn_numba.kernels import autotune
    from cnn_numba.kernels.cuda.graph import LaunchList
    from cnn_numba.shapes import conv2d_geom

    table = kernel("conv2d_algorithms", "cuda")()
    tuner = table.tuner
    monkeypatch.setenv(autotune.FILE_ENV, str(tmp_path / "autotune.json"))
    monkeypatch.setattr(tuner, "_enabled", lambda: True)
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    timed = []
    monkeypatch.setattr(tuner, "clock", lambda name, run: timed.append(name) or 1e-3)
    tuner.clear()
    x = cn.tensor(np.zeros((2, 3, 5, 5), np.float32), device="cuda")
    w = cn.tensor(np.zeros((4, 3, 3, 3), np.float32), device="cuda")
    y = kernel("full", "cuda")((2, 4, 5, 5), 0.0, np.float32)
    geom = conv2d_geom(x.shape, w.shape, 1, 1, 1, 1)
    try:
        arrays = (x.data, w.data, None, y)
        with LaunchList():
            assert tuner.choose(table, geom, "forward", arrays) is None
        assert timed == []
        chosen = tuner.choose(table, geom, "forward", arrays)  # outside: timed and remembered
        assert timed and chosen in table.names
        timed.clear()
        with LaunchList():
            assert tuner.choose(table, geom, "forward", arrays) == chosen
        assert timed == []
    finally:
        tuner.clear()


@pytest.mark.skipif(CUDA_SIMULATED, reason="full models: a real GPU (the simulator runs each CUDA thread as a Python thread)")
@pytest.mark.parametrize("name,batch", [("lenet5", 64), ("resnet20", 128)])
def test_graph_replays_equal_eager_steps_on_models(name, batch):
    """Issue 11's exactness item on a GPU: 20 steps of LeNet-5 (batch 64) and resnet20 (batch
    128) with the lr changed between steps equal the eager steps bit for bit, replayed from a
    real CUDA graph."""
    from cnn_numba import models
    runs = []
    for graphed in (False, True):
        cn.manual_seed(0)
        model = getattr(models, name)().to("cuda")
        opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = optim.StepLR(opt, step_size=3, gamma=0.7)
        step = cn.cuda.graphed_step(model, F.cross_entropy, opt, enabled=graphed)
        data = np.random.default_rng(5)
        losses = []
        for _ in range(20):
            x = data.standard_normal((batch, 1, 28, 28)).astype(np.float32)
            losses.append(step(x, data.integers(0, 10, batch)).item())
            sched.step()
        runs.append((losses, {k: v.copy() for k, v in model.state_dict().items()}, step.kind))
    (l1, s1, k1), (l2, s2, k2) = runs
    assert k1 is None and k2 == "CUDA graph"
    assert l1 == l2
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k], err_msg=k, strict=True)
