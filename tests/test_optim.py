"""Optimisers and learning-rate schedulers against hand-computed updates and numpy references
of PyTorch's documented update rules (torch cross-checks only when torch is installed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import cnn_numba as cn
from cnn_numba import nn, optim


def param(values, dtype=np.float64):
    return nn.Parameter(np.array(values, dtype=dtype))


def set_grad(p, g):
    p.grad = cn.tensor(np.asarray(g, p.dtype))


def run_steps(opt_cls, p0, grads, dtype=np.float64, **kw):
    """Apply opt_cls to one parameter starting at p0, with the given gradient at each step."""
    p = param(p0, dtype)
    opt = opt_cls([p], **kw)
    for g in grads:
        set_grad(p, g)
        opt.step()
    return p.numpy()


# ----------------------------------------------------------------------------- references


def sgd_reference(p, grads, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    p, buf = np.array(p, np.float64), None
    for g in grads:
        d = (-g if maximize else g) + weight_decay * p
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
        p = p - lr * d
    return p


def adam_reference(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                   decoupled=False):
    """Kingma & Ba with bias-corrected moments; AdamW shrinks p by (1 - lr*wd) first."""
    p = np.array(p, np.float64)
    m = v = vmax = np.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, 1):
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v)
        m_hat = m / (1 - b1 ** t)
        v_hat = (vmax if amsgrad else v) / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.fixture
def grads():
    r = np.random.default_rng(0)
    return [r.standard_normal((3, 2)) for _ in range(5)]


P0 = np.array([[0.5, -1.0], [2.0, 0.0], [-0.3, 1.5]])


# ----------------------------------------------------------------------------- SGD


def test_sgd_hand_computed():
    # p = 1, g = 0.5 twice, lr 0.1, momentum 0.9: buf 0.5 -> p 0.95; buf 0.9*0.5 + 0.5 = 0.95 -> p 0.855
    assert run_steps(optim.SGD, [1.0], [[0.5], [0.5]], lr=0.1, momentum=0.9) == pytest.approx([0.855], rel=1e-12)
    # plus weight decay 0.1: d1 = 0.6 -> p 0.94; d2 = 0.5 + 0.094 = 0.594, buf 0.54 + 0.594 = 1.134 -> p 0.8266
    assert run_steps(optim.SGD, [1.0], [[0.5], [0.5]], lr=0.1, momentum=0.9,
                     weight_decay=0.1) == pytest.approx([0.8266], rel=1e-12)
    # Nesterov: d1 = 0.5 + 0.9*0.5 = 0.95 -> p 0.905
    assert run_steps(optim.SGD, [1.0], [[0.5]], lr=0.1, momentum=0.9, nesterov=True) == pytest.approx([0.905])


@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(lr=0.02, momentum=0.5, weight_decay=0.1, maximize=True),
])
def test_sgd_matches_reference(grads, kw):
    np.testing.assert_allclose(run_steps(optim.SGD, P0, grads, **kw), sgd_reference(P0, grads, **kw), rtol=1e-12)


def test_sgd_float32():
    got = run_steps(optim.SGD, P0, grads := [np.full((3, 2), 0.25)] * 3, dtype=np.float32, lr=0.1, momentum=0.9)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, sgd_reference(P0, grads, lr=0.1, momentum=0.9), rtol=1e-6)


def test_sgd_argument_errors():
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([param([1.0])], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        optim.SGD([param([1.0])], lr=-1)
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)


# ----------------------------------------------------------------------------- Adam, AdamW


def test_adam_first_step_is_lr_sized():
    # m_hat = g, v_hat = g^2 after one step: p moves by lr * g/(|g| + eps), about lr against the gradient
    got = run_steps(optim.Adam, [1.0, 1.0, 1.0], [[3.0, -0.01, 0.0]], lr=0.1)
    np.testing.assert_allclose(got, [1.0 - 0.1 * 3 / (3 + 1e-8), 1.0 + 0.1 * 0.01 / (0.01 + 1e-8), 1.0], rtol=1e-12)


@pytest.mark.parametrize("cls, kw", [
    (optim.Adam, dict(lr=0.01)),
    (optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (optim.Adam, dict(lr=0.01, amsgrad=True)),
    (optim.AdamW, dict(lr=0.01)),
    (optim.AdamW, dict(lr=0.01, weight_decay=0.5, amsgrad=True)),
])
def test_adam_matches_reference(grads, cls, kw):
    ref_kw = dict(kw, decoupled=cls is optim.AdamW)
    if cls is optim.AdamW:
        ref_kw.setdefault("weight_decay", 1e-2)          # AdamW's default
    # a gradient that shrinks makes amsgrad's running max differ from v
    grads = [g * 0.5 ** i for i, g in enumerate(grads)]
    np.testing.assert_allclose(run_steps(cls, P0, grads, **kw), adam_reference(P0, grads, **ref_kw), rtol=1e-12)


def test_adam_float32(grads):
    got = run_steps(optim.AdamW, P0, grads, dtype=np.float32, lr=0.01, weight_decay=0.1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, adam_reference(P0, grads, lr=0.01, weight_decay=0.1, decoupled=True), rtol=1e-5)


def test_adamw_decay_differs_from_adam_l2(grads):
    a = run_steps(optim.Adam, P0, grads, lr=0.01, weight_decay=0.5)
    w = run_steps(optim.AdamW, P0, grads, lr=0.01, weight_decay=0.5)
    assert not np.allclose(a, w)


def test_optimisers_match_torch(grads):
    torch = pytest.importorskip("torch")
    cases = [(optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
             (optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
             (optim.AdamW, torch.optim.AdamW, dict(lr=0.01))]
    for ours_cls, torch_cls, kw in cases:
        tp = torch.tensor(P0, requires_grad=True)
        topt = torch_cls([tp], **kw)
        for g in grads:
            tp.grad = torch.tensor(g)
            topt.step()
        np.testing.assert_allclose(run_steps(ours_cls, P0, grads, **kw), tp.detach().numpy(), rtol=1e-12,
                                   err_msg=ours_cls.__name__)


# ----------------------------------------------------------------------------- optimiser mechanics


def test_step_on_a_real_loss_skips_parameters_without_grad():
    w, frozen = param([1.0, -2.0]), param([5.0])
    opt = optim.SGD([w, frozen], lr=0.25)
    loss = (w * w).sum()                                   # gradient 2w
    loss.backward()
    opt.step()
    np.testing.assert_allclose(w.numpy(), [0.5, -1.0])
    np.testing.assert_allclose(frozen.numpy(), [5.0])
    opt.zero_grad()
    assert w.grad is None
    (w * w).sum().backward()
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(w.grad.numpy(), [0.0, 0.0])


def test_param_groups_and_closure():
    a, b = param([1.0]), param([1.0])
    opt = optim.SGD([{"params": [a]}, {"params": b, "lr": 0.5}], lr=0.1, momentum=0.0)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.5

    def closure():
        opt.zero_grad()
        loss = (a * 2.0).sum() + (b * 2.0).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(4.0)
    np.testing.assert_allclose([a.numpy()[0], b.numpy()[0]], [0.8, 0.0])
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})


@pytest.mark.parametrize("cls, kw", [(optim.SGD, dict(lr=0.1, momentum=0.9)), (optim.Adam, dict(lr=0.1, amsgrad=True)),
                                     (optim.AdamW, dict(lr=0.1))])
def test_optimizer_state_dict_resumes_exactly(grads, cls, kw):
    p = param(P0)
    opt = cls([p], **kw)
    for g in grads[:2]:
        set_grad(p, g)
        opt.step()
    saved_p, saved = p.numpy().copy(), opt.state_dict()
    for g in grads[2:]:
        set_grad(p, g)
        opt.step()
    assert saved["param_groups"][0]["params"] == [0]
    for v in saved["state"][0].values():          # a copy: later steps did not change it
        if isinstance(v, np.ndarray):
            assert not np.shares_memory(v, p.data)
    q = param(saved_p)
    resumed = cls([q], lr=123.0)                  # hyper-parameters come back from the state dict
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == kw["lr"]
    for g in grads[2:]:
        set_grad(q, g)
        resumed.step()
    np.testing.assert_array_equal(q.numpy(), p.numpy())


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_step_checks_every_grad_before_updating(cls):
    """A (3,) grad on a (1000,) parameter used to read past the end of the gradient; now nothing moves."""
    ok, big = param([1.0, 2.0]), param(np.ones(1000))
    opt = cls([ok, big], lr=0.1, momentum=0.9) if cls is optim.SGD else cls([ok, big], lr=0.1)
    set_grad(ok, [1.0, 1.0])
    for bad, err, pattern in [
            (cn.tensor(np.ones(3)), ValueError, r"parameter 1 \(shape \(1000,\).*has shape \(3,\)"),
            (cn.tensor(np.ones(1)), ValueError, r"parameter 1 \(shape \(1000,\).*has shape \(1,\)"),
            (cn.tensor(np.ones(1000, np.float32)), ValueError, r"parameter 1 .*float64.*dtype float32"),
            (np.ones(1000), TypeError, r"parameter 1 .* is a ndarray, not a Tensor")]:
        big.grad = bad
        with pytest.raises(err, match=pattern):
            opt.step()
        np.testing.assert_array_equal(ok.numpy(), [1.0, 2.0])          # the good parameter did not move either
        np.testing.assert_array_equal(big.numpy(), np.ones(1000))
        assert ok._version == big._version == 0 and not opt.state
    set_grad(big, np.ones(1000))
    opt.step()
    assert ok._version == big._version == 1 and ok.numpy()[0] < 1.0


def test_optimizer_load_state_dict_mismatch():
    opt = optim.SGD([param([1.0]), param([2.0])], lr=0.1)
    other = optim.SGD([param([1.0])], lr=0.1)
    with pytest.raises(ValueError, match="don't match"):
        other.load_state_dict(opt.state_dict())


def test_sgd_trains_a_linear_model():
    cn.manual_seed(1)
    r = np.random.default_rng(1)
    x = r.standard_normal((32, 3))
    y = x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3
    model = nn.Linear(3, 1, dtype=np.float64)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for _ in range(150):
        opt.zero_grad()
        loss = nn.MSELoss()(model(cn.tensor(x)), cn.tensor(y))
        loss.backward()
        opt.step()
    np.testing.assert_allclose(model.weight.numpy(), [[1.0, -2.0, 0.5]], atol=1e-3)
    np.testing.assert_allclose(model.bias.numpy(), [0.3], atol=1e-3)


# ----------------------------------------------------------------------------- schedulers


def lrs(make_scheduler, steps, lr=1.0):
    opt = optim.SGD([param([0.0])], lr=lr)
    sched = make_scheduler(opt)
    out = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [out[-1]]
    return out


def test_step_lr():
    assert lrs(lambda o: optim.StepLR(o, step_size=2, gamma=0.5), 6) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25, 0.25, 0.125])


def test_cosine_annealing_lr():
    c = (1 + math.cos(math.pi / 4)) / 2
    assert lrs(lambda o: optim.CosineAnnealingLR(o, T_max=4, eta_min=0.1), 6, lr=1.1) == pytest.approx(
        [1.1, 0.1 + c, 0.6, 0.1 + (1 - c), 0.1, 0.1 + (1 - c), 0.6])


def test_linear_warmup_lambda_and_exponential():
    assert lrs(lambda o: optim.LinearLR(o, start_factor=0.25, total_iters=3), 5, lr=2.0) == pytest.approx(
        [0.5, 1.0, 1.5, 2.0, 2.0, 2.0])
    assert lrs(lambda o: optim.LambdaLR(o, lambda t: 1 / (t + 1)), 3) == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert lrs(lambda o: optim.ExponentialLR(o, gamma=0.5), 3) == pytest.approx([1, 0.5, 0.25, 0.125])


def test_sequential_lr_warmup_then_step():
    def make(o):
        warm = optim.LinearLR(o, start_factor=0.5, total_iters=2)
        decay = optim.StepLR(o, step_size=2, gamma=0.1)
        return optim.SequentialLR(o, [warm, decay], milestones=[2])

    assert lrs(make, 6) == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.1, 0.1, 0.01])


def test_scheduler_per_group_base_lrs():
    opt = optim.SGD([{"params": [param([0.0])]}, {"params": [param([0.0])], "lr": 0.2}], lr=1.0)
    sched = optim.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.5, 0.1])


def test_scheduler_state_dict_round_trip():
    def make(o):
        warm = optim.LinearLR(o, start_factor=0.1, total_iters=3)
        return optim.SequentialLR(o, [warm, optim.CosineAnnealingLR(o, T_max=5)], milestones=[3])

    opt = optim.SGD([param([0.0])], lr=1.0)
    sched = make(opt)
    for _ in range(4):
        sched.step()
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    expected = []
    for _ in range(3):
        sched.step()
        expected.append(sched.get_last_lr()[0])
    opt2 = optim.SGD([param([0.0])], lr=1.0)
    opt2.load_state_dict(saved_opt)
    sched2 = make(opt2)
    sched2.load_state_dict(saved)
    got = []
    for _ in range(3):
        sched2.step()
        got.append(opt2.param_groups[0]["lr"])
    assert got == pytest.approx(expected)
    assert "optimizer" not in saved


def test_schedulers_match_torch():
    torch = pytest.importorskip("torch")

    def torch_lrs(make, steps):
        o = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        s = make(o, torch.optim.lr_scheduler)
        out = [o.param_groups[0]["lr"]]
        for _ in range(steps):
            o.step()
            s.step()
            out.append(o.param_groups[0]["lr"])
        return out

    cases = [lambda o, m: m.StepLR(o, 3, 0.3),
             lambda o, m: m.CosineAnnealingLR(o, T_max=7, eta_min=0.01),
             lambda o, m: m.LinearLR(o, start_factor=0.2, total_iters=4),
             lambda o, m: m.SequentialLR(o, [m.LinearLR(o, 0.1, total_iters=3), m.CosineAnnealingLR(o, 8)], [3])]
    for make in cases:
        np.testing.assert_allclose(lrs(lambda o: make(o, optim), 12), torch_lrs(make, 12), rtol=1e-9, atol=1e-12)


def test_one_cycle_lr_and_momentum_match_torch():
    """Both phases (and three_phase), cos and linear, SGD's momentum and Adam's beta1, per group."""
    torch = pytest.importorskip("torch")

    def history(make_opt, make_sched, steps, get_momentum):
        o = make_opt()
        s = make_sched(o)
        out = [(o.param_groups[0]["lr"], get_momentum(o.param_groups[1]), o.param_groups[1]["lr"])]
        for _ in range(steps):
            o.step()
            s.step()
            out.append((o.param_groups[0]["lr"], get_momentum(o.param_groups[1]), o.param_groups[1]["lr"]))
        return np.array(out)

    beta1, momentum = (lambda g: g["betas"][0]), (lambda g: g["momentum"])
    cases = [("SGD", dict(momentum=0.9), momentum, dict(max_lr=[0.5, 0.2], total_steps=11)),
             ("Adam", {}, beta1, dict(max_lr=0.01, epochs=3, steps_per_epoch=4, pct_start=0.25,
                                      anneal_strategy="linear", div_factor=10, final_div_factor=100)),
             ("AdamW", {}, beta1, dict(max_lr=0.02, total_steps=13, three_phase=True, base_momentum=0.8))]
    for name, kw, get_m, skw in cases:
        steps = skw.get("total_steps") or skw["epochs"] * skw["steps_per_epoch"]
        ours = history(lambda: getattr(optim, name)([{"params": [param([0.0])]}, {"params": [param([0.0])]}],
                                                    lr=1.0, **kw),
                       lambda o: optim.OneCycleLR(o, **skw), steps, get_m)
        theirs = history(lambda: getattr(torch.optim, name)([{"params": [torch.zeros(1, requires_grad=True)]},
                                                             {"params": [torch.zeros(1, requires_grad=True)]}],
                                                            lr=1.0, **kw),
                         lambda o: torch.optim.lr_scheduler.OneCycleLR(o, **skw), steps, get_m)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-15, err_msg=name)


def test_one_cycle_lr_resumes_from_the_optimizer_state_and_checks_its_arguments():
    opt = optim.Adam([param([0.0])], lr=1.0)
    sched = optim.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(4):
        sched.step()
    expected = [sched.step() or (opt.param_groups[0]["lr"], *opt.param_groups[0]["betas"]) for _ in range(6)]
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        sched.step()

    resumed = optim.Adam([param([0.0])], lr=1.0)
    fresh = optim.OneCycleLR(optim.Adam([param([0.0])], lr=1.0), max_lr=0.1, total_steps=10)
    for _ in range(4):
        fresh.step()
    resumed.load_state_dict(fresh.optimizer.state_dict())  # holds initial_lr, max_lr, min_lr, momenta
    again = optim.OneCycleLR(resumed, max_lr=0.1, total_steps=10, last_epoch=4)
    got = [(resumed.param_groups[0]["lr"], *resumed.param_groups[0]["betas"])]
    got += [again.step() or (resumed.param_groups[0]["lr"], *resumed.param_groups[0]["betas"]) for _ in range(5)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)

    with pytest.raises(KeyError, match="initial_lr"):
        optim.OneCycleLR(optim.SGD([param([0.0])], lr=1.0), max_lr=0.1, total_steps=10, last_epoch=3)
    with pytest.raises(ValueError, match="momentum or beta1"):
        class Plain(optim.Optimizer):
            def _update(self, p, g, group, state):
                pass
        optim.OneCycleLR(Plain([param([0.0])], {"lr": 1.0}), max_lr=0.1, total_steps=10)
    for bad in (dict(total_steps=0), dict(total_steps=5, pct_start=1.5), dict(total_steps=5, anneal_strategy="x"),
                dict(epochs=2)):
        with pytest.raises(ValueError):
            optim.OneCycleLR(optim.SGD([param([0.0])], lr=1.0), max_lr=0.1, **bad)
