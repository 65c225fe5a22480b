"""Whole models: LeNet-5's size and shapes, a whole-model gradient check against finite
differences, a few SGD steps that lower the loss, reproducible initialisation, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

import cnn_numba as cn
from cnn_numba import models, nn, optim


def test_lenet5_parameter_count_and_shapes():
    cn.manual_seed(0)
    model = models.lenet5()
    # docs/networks.md: conv 156 + 2,416, fc 48,120 + 10,164 + 850
    assert sum(p.size for p in model.parameters()) == 61706
    counts = {k: v.size for k, v in model.state_dict().items()}
    assert counts == {"conv1.weight": 150, "conv1.bias": 6, "conv2.weight": 2400, "conv2.bias": 16,
                      "fc1.weight": 48000, "fc1.bias": 120, "fc2.weight": 10080, "fc2.bias": 84,
                      "fc3.weight": 840, "fc3.bias": 10}
    x = cn.tensor(np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32))
    for n in (3, 1):
        y = model(cn.tensor(x.numpy()[:n]))
        assert y.shape == (n, 10) and y.dtype == np.float32 and np.all(np.isfinite(y.numpy()))
    shapes, h = [], x
    for name, layer in model.named_children():
        h = layer(h)
        shapes.append((name, h.shape[1:]))
    assert dict(shapes)["pool1"] == (6, 14, 14) and dict(shapes)["conv2"] == (16, 10, 10)
    assert dict(shapes)["flatten"] == (400,)


def tiny_lenet(seed):
    """A LeNet-style float64 model that exercises every layer kind with parameters."""
    cn.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, groups=1), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 3),
    ).double()


def test_whole_model_gradient_matches_finite_differences():
    model = tiny_lenet(2)
    r = np.random.default_rng(3)
    x = cn.tensor(r.standard_normal((4, 1, 8, 8)), requires_grad=True)   # -> 8x8 -> 4x4 -> 2x2 -> 1x1
    target = np.array([0, 2, 1, 2])
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def loss_value():
        with cn.no_grad():
            return loss_fn(model(x), target).item()

    loss_fn(model(x), target).backward()
    eps = 1e-6
    checked = 0
    for name, p in list(model.named_parameters()) + [("input", x)]:
        flat = p.data.reshape(-1)                           # a view: perturbs p in place
        for i in r.choice(flat.size, size=min(3, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            up = loss_value()
            flat[i] = old - eps
            down = loss_value()
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            assert p.grad.numpy().reshape(-1)[i] == pytest.approx(numeric, rel=1e-5, abs=1e-8), f"{name}[{i}]"
            checked += 1
    assert checked == 3 * 11                              # 10 parameter tensors and the input


def test_sgd_steps_reduce_the_loss():
    cn.manual_seed(4)
    model = models.lenet5()
    r = np.random.default_rng(5)
    x = cn.tensor(r.random((8, 1, 28, 28), dtype=np.float32))
    y = r.integers(0, 10, 8)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.95 * losses[0], losses


def test_lenet5_initialisation_is_reproducible_and_checkpoints_round_trip(tmp_path):
    cn.manual_seed(6)
    a = models.lenet5()
    cn.manual_seed(6)
    b = models.lenet5()
    c = models.lenet5()
    x = cn.tensor(np.random.default_rng(7).random((2, 1, 28, 28), dtype=np.float32))
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())
    assert not np.allclose(a(x).numpy(), c(x).numpy())
    np.savez(tmp_path / "lenet.npz", **a.state_dict())
    c.load_state_dict(np.load(tmp_path / "lenet.npz"))
    np.testing.assert_array_equal(a(x).numpy(), c(x).numpy())


def test_lenet5_matches_torch():
    torch = pytest.importorskip("torch")
    cn.manual_seed(8)
    ours = models.lenet5()
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10))
    ref.load_state_dict({k: torch.tensor(v) for k, v in zip(ref.state_dict(), ours.state_dict().values())})
    r = np.random.default_rng(9)
    x, y = r.random((4, 1, 28, 28), dtype=np.float32), r.integers(0, 10, 4)
    loss = nn.CrossEntropyLoss()(ours(cn.tensor(x)), y)
    tloss = torch.nn.CrossEntropyLoss()(ref(torch.tensor(x)), torch.tensor(y))
    loss.backward(), tloss.backward()
    assert loss.item() == pytest.approx(tloss.item(), rel=1e-5)
    for (k, p), tp in zip(ours.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=k)
