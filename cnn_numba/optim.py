"""Optimisers and learning-rate schedulers with PyTorch's names, arguments and update rules.

An optimiser holds ``param_groups`` (dicts: "params" plus hyper-parameters) and per-parameter
``state``; ``step()`` checks every gradient against its parameter (shape, dtype, device), then
updates each parameter that has a gradient, in place, under ``no_grad``, through the device's
"sgd_step"/"adam_step" kernels (kernels/nn.py has the formulas), and bumps its version counter.

Schedulers set ``group["lr"]`` from the closed form of their schedule at ``last_epoch``
(``base_lr`` = the group's ``initial_lr``):

    StepLR             base_lr * gamma ** (t // step_size)
    ExponentialLR      base_lr * gamma ** t
    CosineAnnealingLR  eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T_max)) / 2
    LinearLR           base_lr * (start + (end - start) * min(t, total_iters) / total_iters)   (warm-up)
    LambdaLR           base_lr * lr_lambda(t)
    SequentialLR       the schedule of schedulers[i] between milestones, t restarting at 0 at each
    OneCycleLR         per batch: up from max_lr/div_factor to max_lr, then down to almost 0

Closed forms make two schedulers driving one optimiser at once overwrite each other
(PyTorch's chainable forms multiply); chain them in time with SequentialLR instead.
"""
from __future__ import annotations

import abc
import bisect
import math

import numpy as np

from .backend import kernel
from .tensor import Tensor, no_grad


# ----------------------------------------------------------------------------- optimisers

class Optimizer(abc.ABC):
    def __init__(self, params, defaults: dict):
        self.defaults = defaults
        self.state: dict[Tensor, dict] = {}
        self.param_groups: list[dict] = []
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for group in params if isinstance(params[0], dict) else [{"params": params}]:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        for p in group["params"]:
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise ValueError(f"optimizer can only optimize tensors that require grad, got {p!r:.80}")
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in known for p in group["params"]):
            raise ValueError("some parameters appear in more than one parameter group")
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if set_to_none or p.grad is None:
                    p.grad = None
                else:
                    p.grad = Tensor._wrap(kernel("full", p.device)(p.shape, 0.0, p.dtype), p.device, False, None)

    def step(self, closure=None):
        """One update of every parameter with a gradient; ``closure`` re-evaluates the loss first."""
        loss = closure() if closure is not None else None
        numbered = enumerate((p, g) for g in self.param_groups for p in g["params"])  # state_dict's numbering
        todo = [(i, p, group) for i, (p, group) in numbered if p.grad is not None]
        for i, p, _ in todo:  # every gradient checked before any parameter moves
            _check_grad(i, p)
        with no_grad():
            for _, p, group in todo:
                self._update(p, p.grad.data, group, self.state.setdefault(p, {}))
                p._vc[0] += 1  # an in-place update: graphs that saved p now refuse to backward
        return loss

    @abc.abstractmethod
    def _update(self, p: Tensor, g, group: dict, state: dict) -> None:
        """Update parameter ``p`` in place from its gradient ``g``: each optimiser's rule."""

    @staticmethod
    def _zeros(p: Tensor):
        return kernel("full", p.device)(p.shape, 0.0, p.dtype)

    # ---- state
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """PyTorch's layout: {"state": {index: {name: value}}, "param_groups": [{..., "params": [index]}]},
        parameters numbered in group order; arrays are host numpy copies."""
        index = {id(p): i for i, p in enumerate(self._params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[id(p)]: {k: _to_host(v, p) for k, v in s.items()} for p, s in self.state.items()
                 if id(p) in index}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("loaded state dict has parameter groups that don't match the sizes of the "
                             f"optimizer's groups ({[len(g['params']) for g in groups]} vs "
                             f"{[len(g['params']) for g in self.param_groups]})")
        by_index = {}
        for saved, own in zip(groups, self.param_groups):
            by_index.update(zip(saved["params"], own["params"]))
            own.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for i, s in state_dict["state"].items():
            p = by_index[int(i)]
            for k, v in s.items():
                if isinstance(v, np.ndarray) and v.shape != p.shape:
                    raise ValueError(f"optimizer state {k!r} of shape {v.shape} for a parameter of shape {p.shape}")
            self.state[p] = {k: _to_device(v, p) for k, v in s.items()}

    def __repr__(self):
        lines = [f"Parameter Group {i}\n" + "\n".join(f"    {k}: {v}" for k, v in sorted(g.items()) if k != "params")
                 for i, g in enumerate(self.param_groups)]
        return f"{type(self).__name__} (\n" + "\n".join(lines) + "\n)"


def _to_host(v, p: Tensor):
    return np.array(kernel("to_host", p.device)(v), copy=True) if hasattr(v, "shape") else v


def _to_device(v, p: Tensor):
    if isinstance(v, Tensor):
        v = v.numpy()
    if isinstance(v, np.ndarray) and v.ndim:
        return kernel("from_host", p.device)(np.array(v, dtype=p.dtype, copy=True))
    return v.item() if isinstance(v, (np.ndarray, np.generic)) else v


def _check_grad(i: int, p: Tensor) -> None:
    """``p.grad`` must be a Tensor of p's shape, dtype and device: the step kernels index both as one."""
    g = p.grad
    if isinstance(g, Tensor) and g.data.shape == p.data.shape and g.data.dtype == p.data.dtype and g.device == p.device:
        return
    where = f"parameter {i} (shape {p.shape}, dtype {p.dtype}, device {p.device!r})"
    if not isinstance(g, Tensor):
        raise TypeError(f"optimizer: the .grad of {where} is a {type(g).__name__}, not a Tensor")
    raise ValueError(f"optimizer: the .grad of {where} has shape {g.shape}, dtype {g.dtype}, device {g.device!r}")


def _check(name, value, low=0.0, high=None):
    if not (low <= value and (high is None or value < high)):
        raise ValueError(f"invalid {name}: {value}")


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov momentum and L2 weight decay:
    d = g + wd*p; buf = d on the first step, then momentum*buf + (1 - dampening)*d;
    d = d + momentum*buf (Nesterov) or buf; p -= lr*d."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):
        _check("learning rate", lr)
        _check("momentum value", momentum)
        _check("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    def _update(self, p, g, group, state):
        buf = state.get("momentum_buffer")
        first = buf is None
        if group["momentum"] != 0 and first:
            buf = state["momentum_buffer"] = self._zeros(p)
        kernel("sgd_step", p.device)(p.data, g, buf if group["momentum"] != 0 else None, group["lr"],
                                     group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
                                     first, group["maximize"])


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; weight_decay adds wd*p to the gradient (L2)."""
    _decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, *, maximize: bool = False):
        _check("learning rate", lr)
        _check("epsilon value", eps)
        _check("beta parameter at index 0", betas[0], 0.0, 1.0)
        _check("beta parameter at index 1", betas[1], 0.0, 1.0)
        _check("weight_decay value", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))

    def _update(self, p, g, group, state):
        if not state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = self._zeros(p), self._zeros(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = self._zeros(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        kernel("adam_step", p.device)(p.data, g, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
                                      group["lr"], beta1, beta2, group["eps"], group["weight_decay"], self._decoupled,
                                      group["amsgrad"], group["maximize"], state["step"])


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr*wd before the Adam step."""
    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)


# ----------------------------------------------------------------------------- schedulers

# What schedulers write into an optimizer's param groups (PyTorch's names), beside the
# optimizer's own hyper-parameters: a checkpoint of a scheduled run holds them.
SCHEDULER_GROUP_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"})


class LRScheduler(abc.ABC):
    """Base class: subclasses define ``get_lr()``, every group's lr at t = ``last_epoch``;
    ``step()`` advances t and sets them. Constructing one sets the lrs for t = 0."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        for i, g in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                g.setdefault("initial_lr", g["lr"])
            elif "initial_lr" not in g:
                raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] when resuming an optimizer")
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    @abc.abstractmethod
    def get_lr(self) -> list[float]:
        """The lr of every parameter group at t = ``last_epoch``."""

    def step(self) -> None:
        self.last_epoch += 1
        self._last_lr = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, self._last_lr):
            g["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)


class _ClosedForm(LRScheduler):
    """Schedulers whose lr is a formula ``_lr(base_lr, t)`` of each group's initial lr."""

    @abc.abstractmethod
    def _lr(self, base_lr: float, t: int) -> float:
        """The lr at step t of a group that started at base_lr."""

    def get_lr(self) -> list[float]:
        return [self._lr(b, self.last_epoch) for b in self.base_lrs]


class StepLR(_ClosedForm):
    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def _lr(self, base_lr, t):
        return base_lr * self.gamma ** (t // self.step_size)


class ExponentialLR(_ClosedForm):
    def __init__(self, optimizer, gamma: float, last_epoch: int = -1):
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _lr(self, base_lr, t):
        return base_lr * self.gamma ** t


class CosineAnnealingLR(_ClosedForm):
    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def _lr(self, base_lr, t):
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * t / self.T_max)) / 2


class LinearLR(_ClosedForm):
    """Linear warm-up: the factor goes from start_factor to end_factor over total_iters steps."""

    def __init__(self, optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5,
                 last_epoch: int = -1):
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError(f"start_factor must be in (0, 1] and end_factor in [0, 1], got {start_factor}, {end_factor}")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def _lr(self, base_lr, t):
        frac = min(t, self.total_iters) / self.total_iters if self.total_iters > 0 else 1.0
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * frac)


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(t); one function, or one per parameter group. The functions
    are not part of ``state_dict()``."""

    def __init__(self, optimizer, lr_lambda, last_epoch: int = -1):
        n = len(optimizer.param_groups)
        self.lr_lambdas = list(lr_lambda) if isinstance(lr_lambda, (list, tuple)) else [lr_lambda] * n
        if len(self.lr_lambdas) != n:
            raise ValueError(f"expected {n} lr_lambdas, got {len(self.lr_lambdas)}")
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [b * f(self.last_epoch) for b, f in zip(self.base_lrs, self.lr_lambdas)]

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != "lr_lambdas"}


class SequentialLR(LRScheduler):
    """schedulers[i] drives the lr from milestones[i-1] on, its own t restarting at 0 there
    (e.g. LinearLR warm-up for 5 steps, then CosineAnnealingLR)."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch: int = -1):
        if len(milestones) != len(schedulers) - 1 or list(milestones) != sorted(milestones):
            raise ValueError(f"expected {len(schedulers) - 1} increasing milestones, got {milestones}")
        for s in schedulers:
            if s.optimizer is not optimizer:
                raise ValueError("SequentialLR: every scheduler must drive the optimizer given to SequentialLR")
        self._schedulers, self._milestones = list(schedulers), list(milestones)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        i = bisect.bisect_right(self._milestones, self.last_epoch)
        s = self._schedulers[i]
        s.last_epoch = self.last_epoch - (self._milestones[i - 1] if i else 0)
        s._last_lr = s.get_lr()
        return s._last_lr

    def state_dict(self):
        sd = {k: v for k, v in super().state_dict().items() if k != "_schedulers"}
        sd["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        for s, sd in zip(self._schedulers, state_dict.pop("_schedulers")):
            s.load_state_dict(sd)
        super().load_state_dict(state_dict)


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith and Topin 2017), PyTorch's OneCycleLR, stepped after every batch.
    The lr rises from ``initial_lr = max_lr / div_factor`` to ``max_lr`` over the first
    ``pct_start * total_steps - 1`` steps, then falls to ``min_lr = initial_lr / final_div_factor``
    at step ``total_steps - 1`` (``three_phase``: back to initial_lr first, then to min_lr). The
    momentum (SGD's ``momentum``, Adam's ``betas[0]``) moves the other way between max_momentum
    and base_momentum. Each phase anneals by ``"cos"`` (start + end)/2 + (start - end)/2 cos(pi p)
    or ``"linear"``, p the fraction of the phase done. The bounds live in the param groups
    (initial_lr, max_lr, min_lr, max_momentum, base_momentum), so a resumed optimiser carries them."""

    def __init__(self, optimizer, max_lr, total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum=0.85, max_momentum=0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False, last_epoch: int = -1):
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")
            total_steps = epochs * steps_per_epoch
        if not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
        if not 0 <= pct_start <= 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
        groups = optimizer.param_groups
        self.total_steps, self.cycle_momentum = total_steps, cycle_momentum
        self._anneal = self._cos if anneal_strategy == "cos" else self._linear
        up = float(pct_start * total_steps) - 1
        # (last step of the phase, lr from, lr to, momentum from, momentum to)
        self._phases = ([(up, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                         (2 * up, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                         (total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
                        if three_phase else
                        [(up, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                         (total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")])
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
            self._use_beta1 = "betas" in optimizer.defaults
        if last_epoch == -1:
            for g, top, low, high in zip(groups, _per_group(max_lr, groups, "max_lr"),
                                         _per_group(base_momentum, groups, "base_momentum"),
                                         _per_group(max_momentum, groups, "max_momentum")):
                g.update(initial_lr=top / div_factor, max_lr=top, min_lr=top / div_factor / final_div_factor)
                if cycle_momentum:
                    g.update(max_momentum=high, base_momentum=low)
                    self._set_momentum(g, high)
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _cos(start, end, pct):
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

    @staticmethod
    def _linear(start, end, pct):
        return (end - start) * pct + start

    def _set_momentum(self, group, value):
        if self._use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def get_lr(self):
        t = self.last_epoch
        if t > self.total_steps:
            raise ValueError(f"Tried to step {t} times. The specified number of total steps is {self.total_steps}")
        lrs = []
        for g in self.optimizer.param_groups:
            start = 0.0
            for i, (end, lr_a, lr_b, m_a, m_b) in enumerate(self._phases):
                if t <= end or i == len(self._phases) - 1:
                    pct = (t - start) / (end - start)
                    lrs.append(self._anneal(g[lr_a], g[lr_b], pct))
                    if self.cycle_momentum:
                        self._set_momentum(g, self._anneal(g[m_a], g[m_b], pct))
                    break
                start = end
        return lrs

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k != "_anneal"}


def _per_group(value, groups, name):
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ValueError(f"expected {len(groups)} values for {name}, got {len(value)}")
        return list(value)
    return [value] * len(groups)


__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW", "LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR",
    "LinearLR", "LambdaLR", "SequentialLR", "OneCycleLR",
]
