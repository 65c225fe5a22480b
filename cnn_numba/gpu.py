"""CUDA-specific training helpers: a whole training step replayed as one CUDA graph.

    import cnn_numba as cn, cnn_numba.functional as F
    step = cn.cuda.graphed_step(model, F.cross_entropy, optimizer, example_x, example_y)
    for x, y in loader:                 # host batches, shaped like the examples
        loss = step(x, y)               # zero_grad, forward, loss, backward, optimizer.step
        scheduler.step()                # the lr lives in device memory: replays see it

A training step on a GPU is a few dozen to a few hundred small kernels; launched one by one
from Python, the host is the bottleneck (about ten microseconds each). ``graphed_step``
captures the step's launches once and replays them as one graph launch per batch, after
copying the batch into the step's static input buffers. What the host decides per step
(the learning rate, Adam's bias corrections, anything a scheduler moves) is rewritten in
device memory before each replay, so a replay computes what the eager step would, bit for
bit. The first call of a shape runs eagerly (it compiles the kernels and creates the
optimiser's state); the second captures; batches of another shape (a short last batch) run
eagerly. A step that cannot be captured (dropout draws its masks on the host, a batch norm
with ``momentum=None`` needs its count on the host, a loss that reads the device) trains
eagerly after one printed line saying why. A step is captured again where the model's
parameters or buffers were replaced (``load_state_dict``) or its train/eval mode changed.

Under Numba's CUDA simulator (no graphs) the captured launches are kept as a list and
replayed in order: the same rules, so the same tests.
"""
from __future__ import annotations

import sys

import numpy as np

from . import functional as F
from . import random as _random
from .backend import check_device, kernel
from .tensor import Tensor, tensor


def graphed_step(model, loss_fn, optimizer, example_x=None, example_y=None, *,
                 enabled: bool = True) -> "GraphedStep":
    """A callable ``step(x, y) -> loss`` running ``optimizer.zero_grad(); loss = loss_fn(model(x), y);
    loss.backward(); optimizer.step()``, replayed as one CUDA graph for batches with the shapes
    and dtypes of ``example_x`` and ``example_y`` (without them, of the first batch; see the
    module docstring); ``enabled=False`` always runs it eagerly. The returned loss,
    ``step.output`` (the model's output) and ``step.labels`` (y on the device) are the step's
    own buffers: read them before the next call."""
    return GraphedStep(model, loss_fn, optimizer, example_x, example_y, enabled=enabled)


def _host(a) -> np.ndarray | Tensor:
    return a if isinstance(a, Tensor) else np.asarray(a)


def _spec(a) -> tuple:
    """(shape, dtype) of a batch as the step holds it: integer labels as int64."""
    a = _host(a)
    dtype = np.dtype(a.dtype)
    return tuple(a.shape), np.dtype(np.int64) if dtype.kind in "iu" else dtype


class GraphedStep:
    """See ``graphed_step``. ``kind``: what replays the step ("CUDA graph", or "launch list"
    under the simulator), None until captured; ``failed``: why capture failed, or None."""

    def __init__(self, model, loss_fn, optimizer, example_x=None, example_y=None, *, enabled: bool = True):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.device = params[0].device if params else "cpu"
        if check_device(self.device) != "cuda":
            raise ValueError(f"graphed_step: the optimizer's parameters are on {self.device!r}, not on 'cuda'")
        self.x_spec = self.y_spec = None
        if example_x is not None and example_y is not None:
            self.x_spec, self.y_spec = _spec(example_x), _spec(example_y)
        self.enabled = enabled
        self.failed = None
        self.capture = self.output = self.loss = self.labels = None
        self.warm = False
        self.classes = None      # labels' bound (integer y and a 2-D output), checked on the host per step
        self._inputs = None      # (static x, static y, their Staged uploads)

    @property
    def kind(self):
        return None if self.capture is None else self.capture.kind

    # ---- the step
    def __call__(self, x, y) -> Tensor:
        x, y = _host(x), _host(y)
        if self.x_spec is None:
            self.x_spec, self.y_spec = _spec(x), _spec(y)
        graphable = self.enabled and self.failed is None and (_spec(x), _spec(y)) == (self.x_spec, self.y_spec)
        if not graphable or not self.warm:
            self.warm = self.warm or graphable
            return self._eager(x, y)
        y = self._checked(y)  # bad labels raise here, before the step changes anything
        if self.capture is None or self._stale():
            if not self._capture():
                return self._eager(x, y)
        else:
            from .kernels.cuda.graph import GraphChanged
            try:
                self._refresh()
            except GraphChanged:
                if not self._capture():
                    return self._eager(x, y)
        self._upload(x, y)
        return self._replay()

    def _refresh(self) -> None:
        """The optimiser's host side, launches off: it rewrites the step's scalars."""
        from .kernels.cuda.graph import Refresh
        self._restore_grads()
        with Refresh(self.capture):
            self.optimizer.step()

    def _replay(self) -> Tensor:
        self.capture.replay()
        self._restore_grads()
        for t in self._written:  # a replay updates them in place: new versions, as an eager step makes
            t._vc[0] += 1
        self.loss, self.output, self.labels = self._static
        return self.loss

    def _eager(self, x, y) -> Tensor:
        """The step launched op by op. Host labels go up once, before the forward is queued
        (an upload waits for queued work), and are range-checked on the host once the output
        says how many classes there are, so the loss does not check them on the device."""
        xt = (x if isinstance(x, Tensor) else tensor(x)).to(self.device)
        host = None if isinstance(y, Tensor) else y
        yt = y.to(self.device) if host is None else tensor(host.astype(np.int64) if host.dtype.kind in "iu" else host,
                                                           device=self.device)
        out = self.model(xt)
        if yt.dtype.kind in "iu" and out.ndim == 2:
            self.classes = out.shape[1]  # what later batches' labels are checked against
            if host is not None:
                F._label_array(host, out.shape[1])
                F._mark_checked(yt, out.shape[1])
        loss = self.loss_fn(out, yt)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.loss, self.output, self.labels = loss, out, yt
        return loss

    # ---- capture
    def _tracked(self) -> list:
        """The arrays a captured step reads and writes in place: the model's, the optimiser's."""
        arrays = [t.data for t in self.model.parameters()] + [t.data for t in self.model.buffers() if t is not None]
        for state in self.optimizer.state.values():
            arrays += [v for v in state.values() if hasattr(v, "shape")]
        return arrays

    def _stale(self) -> bool:
        now = self._tracked()
        return (self.model.training != self._training or len(now) != len(self._arrays)
                or any(a is not b for a, b in zip(now, self._arrays)))

    def _capture(self) -> bool:
        from .kernels.cuda.graph import LaunchList, load, new_capture
        from .kernels.cuda.launch import SIMULATOR, empty
        if self._inputs is None:
            from .kernels.cuda.graph import Staged
            (xs, xd), (ys, yd) = self.x_spec, self.y_spec
            self._inputs = (Tensor._wrap(empty(xs, xd), self.device, False, None),
                            Tensor._wrap(empty(ys, yd), self.device, False, None), Staged(xs, xd), Staged(ys, yd))
        # What a failed capture must leave as it found it: the optimiser's host values (step
        # counts) and the random stream (a dropout mask drawn before the capture gave up).
        saved = {p: dict(s) for p, s in self.optimizer.state.items()}
        rng = _random.default_generator().bit_generator.state

        def restore():
            for p, s in saved.items():
                self.optimizer.state[p].clear()
                self.optimizer.state[p].update(s)
            _random.default_generator().bit_generator.state = rng

        try:
            # A dry run first, into a launch list, its host effects undone: whatever is not
            # capturable fails here, before a CUDA capture is open, and on a GPU every kernel the
            # graph will hold (the optimisers' table-reading updates are new) is compiled and
            # loaded outside the capture.
            dry = self._record(LaunchList())
            restore()
            if not SIMULATOR:
                for kernel, _, _, args in dry.calls:
                    load(kernel, args)
            del dry
            capture = self._record(new_capture())
        except Exception as e:  # noqa: BLE001  (any failure: the step still trains, eagerly)
            restore()
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            self.capture = None
            print(f"cnn_numba: the training step could not be captured as a CUDA graph; it runs eagerly "
                  f"({self.failed})", file=sys.stderr)
            return False
        self.capture = capture
        self.grads = [(p, p.grad) for g in self.optimizer.param_groups for p in g["params"]]
        self._training, self._arrays = self.model.training, self._tracked()
        self._written = [t for t in [*self.model.parameters(), *self.model.buffers()] if t is not None]
        return True

    def _record(self, capture):
        """The step's launches into ``capture`` (nothing runs): zero_grad, forward, loss,
        backward, optimizer.step, on the static inputs; its outputs kept as the step's."""
        sx, sy = self._inputs[:2]
        for dtype in {p.dtype for g in self.optimizer.param_groups for p in g["params"]}:
            capture.scalars.prepare(dtype)
        with capture:
            self.optimizer.zero_grad()
            out = self.model(sx)
            if self.y_spec[1].kind in "iu" and out.ndim == 2:
                self.classes = out.shape[1]
                F._mark_checked(sy, self.classes)
            loss = self.loss_fn(out, sy)
            loss.backward()
            self.optimizer.step()
        self._static = (loss, out, sy)
        return capture

    def _restore_grads(self) -> None:
        """After a replay each parameter's .grad is the captured step's gradient buffer."""
        for p, g in self.grads:
            p.grad = g

    def _checked(self, y):
        """Class-index labels checked against the output's classes (host labels on the host;
        labels already on the device there, one count read back); other targets as given."""
        if self.classes is None:
            return y
        if isinstance(y, Tensor) and y.device != "cpu":
            F._indices(y, self.classes, "labels", f"{self.classes} classes", self.device)
            return y
        return F._label_array(y.numpy() if isinstance(y, Tensor) else y, self.classes)

    def _upload(self, x, y) -> None:
        sx, sy, stage_x, stage_y = self._inputs
        for host, static, stage in ((x, sx, stage_x), (y, sy, stage_y)):
            if isinstance(host, Tensor):
                if host.device != "cpu":
                    kernel("copy_into", self.device)(host.data, static.data)
                    continue
                host = host.numpy()
            stage.put(host, static.data)
