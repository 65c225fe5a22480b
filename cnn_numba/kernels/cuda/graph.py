"""Capturing a step's kernel launches once and replaying them: CUDA graphs.

Every kernel goes through launch.py; while ``launch.capture`` is set, a launch is added to
the capture instead of running. Two kinds:

    CudaGraph   a cuda.core GraphBuilder: the launches go into a stream being captured,
                and a replay is one graph launch (a real GPU);
    LaunchList  the launches as a Python list, a replay relaunching each in order (the
                simulator, which has no graphs). It keeps the same rules: nothing runs while
                capturing, and a replay repeats the captured arguments exactly.

What a replay cannot change is what the host passed at capture: a scalar argument is baked
in. The per-step scalars of the optimisers (the learning rate, Adam's bias corrections,
anything a scheduler moves) are therefore read from device memory in a captured step:
``step_scalars`` gives each update a row of a small table, and before every replay the
optimiser's host code runs again with launches switched off (``Refresh``), rewriting the
rows; the table goes up in one asynchronous copy when a row changed. Reads and uploads
inside a capture raise ``NotCapturable`` (launch.refuse_in_capture): a graph would skip them.

Memory: the capture keeps every array it launched with, so no block the graph touches is
handed to anything else while the graph lives (the caching allocator's private pool).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from . import launch as _launch
from .launch import SIMULATOR


class NotCapturable(RuntimeError):
    """A step does something a replayed graph would not repeat (a read back, an upload, a
    value computed on the host from device state)."""


class Staged:
    """Uploads of same-shaped host arrays to one device array, queued asynchronously: each
    goes through one of two pinned buffers, and a buffer is refilled only once its previous
    copy has run (its event), so the host may run a step ahead of the device."""

    def __init__(self, shape, dtype):
        self.buffers = [cuda.pinned_array(shape, dtype) for _ in range(2)]
        self.events = [cuda.event() if SIMULATOR else cuda.event(timing=False) for _ in range(2)]
        self.used = [False, False]
        self.turn = 0

    def put(self, host, dst) -> None:
        k, self.turn = self.turn, 1 - self.turn
        if self.used[k]:
            self.events[k].synchronize()
        np.copyto(self.buffers[k], host, casting="same_kind")
        stream = cuda.default_stream()
        dst.copy_to_device(self.buffers[k], stream=stream)
        self.events[k].record(stream)
        self.used[k] = True


class StepScalars:
    """Rows of per-step scalars, one per optimiser update in call order, one table per dtype
    (a row holds the values as that dtype: the kernels read exactly what the eager launch
    would pass). ``row`` during capture assigns the next row; during a refresh it walks the
    same rows again, checking that the same arrays are updated."""
    ROWS, WIDTH = 512, 16

    def __init__(self):
        self.tables = {}   # dtype -> [host table, device table, Staged, changed]
        self.rows = []     # (dtype, arrays) of each row, in call order
        self.last = []     # each row's values as last written
        self.cursor = 0

    def prepare(self, dtype) -> None:
        """Create ``dtype``'s table (before the capture: its upload must not be captured)."""
        dtype = np.dtype(dtype)
        if dtype not in self.tables:
            host = np.zeros((self.ROWS, self.WIDTH), dtype)
            self.tables[dtype] = [host, cuda.to_device(host), Staged(host.shape, dtype), False]

    def table(self, dtype):
        entry = self.tables.get(dtype)
        if entry is None:
            raise NotCapturable(f"an optimiser update in {dtype}, which the step was not prepared for")
        return entry

    def row(self, values: tuple, dtype, arrays: tuple, capturing: bool):
        """(device table, row) for the next update, its values written where they changed.
        ``arrays``: the update's arrays, as the optimiser passes them (the same objects every
        step while the graph stands; other ones mean it does something else now)."""
        i, self.cursor = self.cursor, self.cursor + 1
        if capturing:
            if i >= self.ROWS or len(values) > self.WIDTH:
                raise NotCapturable(f"more than {self.ROWS} optimiser updates in one step")
            self.rows.append((dtype, arrays))
            self.last.append(None)
        elif i >= len(self.rows) or self.rows[i][0] != dtype or any(
                a is not b for a, b in zip(self.rows[i][1], arrays)):
            raise GraphChanged("the optimiser updates other arrays than when the step was captured")
        entry = self.table(dtype)
        if values != self.last[i]:
            entry[0][i, :len(values)] = values
            entry[3] = True
            self.last[i] = values
        return entry[1], i

    def send(self) -> None:
        """Queue the changed tables' upload (before the replay that reads them)."""
        for entry in self.tables.values():
            if entry[3]:
                entry[2].put(entry[0], entry[1])
                entry[3] = False


class GraphChanged(RuntimeError):
    """A refresh found the step doing something else than at capture: capture again."""


class _Capture:
    """A step's launches, captured; ``replay`` runs them again."""
    drops = False

    def __init__(self):
        self.scalars = StepScalars()
        self.kept = []       # every launch's arguments, alive (and their memory unreused) while this lives
        self.launches = 0
        self.capturing = False

    def add(self, kernel, grid, block, args) -> None:
        self.kept.append(args)
        self.launches += 1

    def __enter__(self):
        if _launch.capture is not None:
            raise NotCapturable("a capture is already in progress")
        self.capturing = True
        _launch.capture = self
        return self

    def __exit__(self, *exc):
        _launch.capture = None
        self.capturing = False
        return False


class LaunchList(_Capture):
    kind = "launch list"

    def __init__(self):
        super().__init__()
        self.calls = []

    def add(self, kernel, grid, block, args) -> None:
        super().add(kernel, grid, block, args)
        self.calls.append((kernel, grid, block, args))

    def replay(self) -> None:
        self.scalars.send()
        for kernel, grid, block, args in self.calls:
            kernel[grid, block](*args)


class CudaGraph(_Capture):
    kind = "CUDA graph"

    def __init__(self):
        super().__init__()
        from cuda.core import Device
        self.device = Device()
        self.device.set_current()
        self.builder = self.device.create_graph_builder()
        self.graph = None

    def __enter__(self):
        super().__enter__()
        self.builder.begin_building("relaxed")
        return self

    def add(self, kernel, grid, block, args) -> None:
        super().add(kernel, grid, block, args)
        kernel[grid, block, self.builder](*args)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        try:
            built = self.builder.end_building()
            if exc[0] is None:
                self.graph = built.complete()
        except Exception:
            if exc[0] is None:
                raise
            # the step's own error says why; ending an invalidated capture only repeats it
        finally:
            self.builder.close()
        return False

    def replay(self) -> None:
        from cuda.core import LEGACY_DEFAULT_STREAM
        self.scalars.send()
        self.graph.launch(LEGACY_DEFAULT_STREAM)


class Refresh:
    """Stands in for a capture while the optimiser's host code runs again before a replay:
    launches are dropped, step scalars rewritten (``capture.scalars``)."""

    capturing = False
    drops = True

    def __init__(self, capture: _Capture):
        self.scalars = capture.scalars

    def __enter__(self):
        self.scalars.cursor = 0
        _launch.capture = self
        return self

    def __exit__(self, *exc):
        _launch.capture = None
        return False


def load(kernel, args) -> None:
    """Compile ``kernel`` for ``args`` and load it into the context, without launching it."""
    argtypes = tuple(kernel.typeof_pyval(a) for a in args)
    overload = kernel.overloads.get(argtypes) or kernel.compile(argtypes)
    overload._codelibrary.get_cufunc()


def new_capture() -> _Capture:
    """A CUDA graph on a GPU; the launch list under the simulator."""
    return LaunchList() if SIMULATOR else CudaGraph()


def step_scalars(values, dtype, arrays):
    """(table, row) holding ``values`` for the captured update of ``arrays``, or None when no
    capture is in progress (the caller passes the values as arguments then)."""
    c = _launch.capture
    if c is None:
        return None
    return c.scalars.row(values, dtype, arrays, c.capturing)
