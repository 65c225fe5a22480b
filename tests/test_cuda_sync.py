"""A training step on device "cuda" reads nothing back from the device (issue 11, part 2):
forward, loss, backward and the optimiser's update make no device-to-host copy, so the host
can queue the next step's work while the device still runs this one. Counted at the device
arrays' copy_to_host (every read goes through it: Tensor.numpy/.item, the count kernels),
under the simulator when there is no GPU (tiny shapes: each CUDA thread is a Python thread)."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_cuda

import cnn_numba as cn
import cnn_numba.functional as F
from cnn_numba import nn, optim

pytestmark = needs_cuda


@pytest.fixture
def reads(monkeypatch):
    """The device-to-host copies made so far (a list, one entry per copy)."""
    from numba import cuda
    cls = type(cuda.to_device(np.zeros(1)))
    made = []
    inner = cls.copy_to_host

    def copy_to_host(self, *args, **kwargs):
        made.append(self.shape)
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(cls, "copy_to_host", copy_to_host)
    return made


def _model(momentum):
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2, momentum=momentum), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).to("cuda")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_training_step_reads_nothing_back(momentum, reads):
    """Host labels are checked on the host (F.cross_entropy) and go up with the step; the batch
    norm counts its batches without reading num_batches_tracked back (nn.BatchNorm2d), also
    with momentum=None, whose factor 1/count it needs on the host. The count it writes is right,
    and after load_state_dict it is read once, then counted on."""
    rng = np.random.default_rng(0)
    model = _model(momentum)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = cn.tensor(rng.standard_normal((2, 1, 4, 4)).astype(np.float32), device="cuda")
    y = np.array([0, 2])

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # compiles
    reads.clear()
    step()
    step()
    assert reads == []
    bn = model[1]
    assert int(bn.num_batches_tracked.item()) == 3
    state = model.state_dict()
    state["1.num_batches_tracked"] = np.array(10)
    model.load_state_dict(state)
    reads.clear()
    step()
    assert len(reads) == 1  # the loaded count, read once
    reads.clear()
    step()
    assert reads == []
    assert int(bn.num_batches_tracked.item()) == 12


def test_device_labels_are_checked_with_one_read(reads):
    """Labels already on the device are range-checked there: one count comes back (the
    ValueError for a bad label must come before any kernel runs on them)."""
    z = cn.tensor(np.zeros((2, 3), np.float32), device="cuda", requires_grad=True)
    t = cn.tensor(np.array([0, 2]), device="cuda")
    F.cross_entropy(z, t)
    reads.clear()
    F.cross_entropy(z, t)
    assert len(reads) == 1
    with pytest.raises(ValueError, match="target must lie in"):
        F.cross_entropy(z, cn.tensor(np.array([0, 3]), device="cuda"))


def _epoch(monkeypatch, read_every, batches, seed=0):
    """A fresh tiny model trained one epoch on ``batches`` on device "cuda"; its metrics."""
    from cnn_numba import train
    monkeypatch.setattr(train, "READ_EVERY_S", read_every)
    cn.manual_seed(seed)
    model = _model(0.1)
    opt = optim.SGD(model.parameters(), lr=0.05)
    out = train.train_epoch(model, opt, batches, 1, 1, "cuda", False)
    return {k: v for k, v in out.items() if k in ("train_loss", "train_acc")}, model


def _batches(rng, steps=3, nan_at=None):
    out = []
    for s in range(steps):
        x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
        if s + 1 == nan_at:
            x[0, 0, 0, 0] = np.nan
        out.append((x, rng.integers(0, 3, 2)))
    return out


def test_train_epoch_reads_its_tally_once(monkeypatch, reads):
    """train_epoch on a GPU keeps each step's loss and correct count on the device and reads
    them back at the epoch's end (READ_EVERY_S apart before that): two copies for the whole
    epoch here, and the same loss and accuracy as reading after every step."""
    from cnn_numba import train
    rng = np.random.default_rng(1)
    batches = _batches(rng)
    _epoch(monkeypatch, 1e9, batches)  # compiles
    reads.clear()
    lazy, _ = _epoch(monkeypatch, 1e9, batches)
    assert len(reads) == 2  # the losses and the counts, once each
    reads.clear()
    eager, _ = _epoch(monkeypatch, 0.0, batches)
    assert len(reads) == 2 * len(batches)
    assert lazy == eager
    with pytest.raises(train.DivergedError, match="step 2 of 3"):
        _epoch(monkeypatch, 1e9, _batches(np.random.default_rng(1), nan_at=2))


def test_gpu_host_script_counts_a_step():
    """bench/gpu_host.py (the GPU session's host measurements) on a tiny model under the
    simulator: launches counted, no reads; the per-launch timing runs."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import gpu_host
    row = gpu_host.step_counts("tiny", _model(0.1), 2, 4, 1, classes=3)
    assert row["reads"] == 0 and row["launches"] > 10
    assert row["graph_reads"] == 0 and row["graph_launches"] == 0  # a replay: one graph, nothing from Python
    assert row["graph_kind"] == "launch list"
    assert all(row[f"graph_{k}_us"] > 0 for k in ("check", "refresh", "upload", "replay"))
    per = gpu_host.launch_us(3)
    assert per["launcher"] > 0 and per["bare"] > 0 and per["launcher_numba"] > 0
