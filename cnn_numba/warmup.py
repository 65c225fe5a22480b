"""Compile the CPU kernels a training run needs before it starts, in parallel processes.

    python -m cnn_numba warmup --model lenet5        # also what `train` does on a cold cache

From an empty Numba cache the first LeNet-5 step compiles 11 kernels (46 functions with
their helpers), one after the other, for ~14.5 s of CPU. Here the work is split instead:

1. Which kernels, with which signatures: a *dry step*. A copy of the model and optimiser
   runs one training step (forward, loss, backward, optimiser step) and one eval forward on
   zeros at the run's batch size, with every Numba dispatcher of ``cnn_numba.kernels``
   swapped for a recorder that notes ``(dispatcher, argument types)`` and returns without
   running. The Python launchers around the kernels do run (allocations, layouts, the
   algorithm choice), so the signatures are exactly those the real step will ask for; no
   kernel compiles or runs, so it takes milliseconds. Kernels that other kernels call
   (helpers, the parallel loops' bodies) compile as part of their caller.
2. Which of those are missing: neither compiled in this process nor in the on-disk cache
   (the cache index is read, nothing is loaded).
3. Compile them: the longest first, spread over this process and ``workers`` child
   processes (one fewer than the CPUs), each calling ``dispatcher.compile(signature)``,
   which writes the on-disk cache. This process keeps its share in memory; the children's
   share loads from the cache at the first real call (milliseconds each).

The dispatcher and cache internals used here (``Dispatcher.typeof_pyval``, ``overloads``,
``_cache._index_key``, ``_cache._cache_file._load_index``) are Numba's; if a later Numba
changes them, ``missing`` reports everything as missing and the warm-up still compiles
correctly, only without skipping cached kernels.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os
import pickle
import pkgutil
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np

def kernel_modules() -> list:
    """The CPU kernel modules (every module of cnn_numba.kernels but the CUDA package)."""
    from . import kernels
    names = [m.name for m in pkgutil.iter_modules(kernels.__path__) if not m.ispkg]
    return [importlib.import_module(f"{kernels.__name__}.{n}") for n in sorted(names)]


def _dispatchers(module) -> dict:
    from numba.core.dispatcher import Dispatcher
    return {name: v for name, v in vars(module).items() if isinstance(v, Dispatcher)}


_recorded: dict | None = None  # (id, signature) -> (dispatcher, signature) while recording
_recording_classes: dict = {}


def _signature(dispatcher, args, kwargs) -> tuple:
    """The argument types a call compiles for, folded as Numba's dispatcher folds them:
    keywords into place, ``*args`` into one tuple, a missing argument as its default."""
    from numba.core import types
    pysig = dispatcher._compiler.pysig
    bound = pysig.bind(*args, **kwargs).arguments
    return tuple(dispatcher.typeof_pyval(bound[name]) if name in bound else types.Omitted(p.default)
                 for name, p in pysig.parameters.items())


def _recording_class(cls):
    """A subclass of the dispatcher class ``cls`` whose call records instead of running.
    Swapped in as an instance's ``__class__``, so every reference to the dispatcher (module
    globals, tables of kernels) records, and Numba's compile-time view of the globals is
    untouched."""
    if cls not in _recording_classes:
        def __call__(self, *args, **kwargs):
            _recorded.setdefault((id(self), sig := _signature(self, args, kwargs)), (self, sig))
        _recording_classes[cls] = type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})
    return _recording_classes[cls]


@contextlib.contextmanager
def recording():
    """Within the block, kernel calls from Python are recorded instead of run; yields the
    list that gets the distinct ``(dispatcher, signature)`` pairs, in call order. It acts on
    the dispatchers themselves: no other thread may run kernels meanwhile."""
    import numba
    global _recorded
    if _recorded is not None:
        raise RuntimeError("warm-up recording is not reentrant")
    modules = kernel_modules()
    dispatchers = {id(d): d for m in modules for d in _dispatchers(m).values()}
    classes = {i: type(d) for i, d in dispatchers.items()}
    # numba.get_num_threads() starts the thread pool, after which forking is unsafe
    # (_can_fork): the launchers read the count Numba would start with instead.
    from .kernels import get_num_threads as fast_count
    counting = {m: m.get_num_threads for m in modules
                if getattr(m, "get_num_threads", None) in (numba.get_num_threads, fast_count)}
    _recorded = {}
    found: list = []
    try:
        for d in dispatchers.values():
            d.__class__ = _recording_class(type(d))
        for m in counting:
            m.get_num_threads = _configured_threads
        yield found
    finally:
        for i, d in dispatchers.items():
            d.__class__ = classes[i]
        for m, count in counting.items():
            m.get_num_threads = count
        found.extend(_recorded.values())
        _recorded = None


def _configured_threads() -> int:
    from numba import config
    return config.NUMBA_NUM_THREADS


def training_step_signatures(model, optimizer, batch_size: int, num_classes: int | None = None) -> list:
    """The kernel signatures of one training step and one eval forward of ``model`` at
    ``batch_size``, from a dry step on copies (the model, the optimiser and the random
    generator are left as they were)."""
    from . import functional as F
    from .backend import kernel
    from .tensor import no_grad, tensor

    from .random import default_generator

    model_c, opt_c = copy.deepcopy((model, optimizer))
    device = getattr(next(iter(model.parameters()), None), "device", "cpu")
    shape = tuple(28 if v is None else v for v in getattr(model, "input_shape", (1, 28, 28)))  # MNIST
    x = np.zeros((batch_size, *shape), np.float32)
    y = np.zeros(batch_size, np.int64)
    rng = default_generator().bit_generator.state  # dropout draws from it; a resumed run replays it
    try:
        with recording() as found, np.errstate(all="ignore"):
            model_c.train()
            logits = model_c(tensor(x, device=device))
            loss = F.cross_entropy(logits, tensor(y, device=device))
            opt_c.zero_grad()
            loss.backward()
            opt_c.step()
            kernel("count_correct", device)(logits.data, y)
            model_c.eval()
            with no_grad():
                model_c(tensor(x, device=device))
    finally:
        default_generator().bit_generator.state = rng
    return found


def _cached(dispatcher, sig) -> bool:
    """Whether ``sig`` is compiled in this process or indexed in the on-disk cache (a kernel
    without ``cache=True`` counts as cached: a warm-up could not keep it for the run)."""
    from numba.core.caching import NullCache
    if tuple(sig) in dispatcher.overloads or isinstance(dispatcher._cache, NullCache):
        return True
    try:
        cache = dispatcher._cache
        key = cache._index_key(sig, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:  # Numba's internals changed: compile it
        return False


def missing(items: list) -> list:
    return [(d, s) for d, s in items if not _cached(d, s)]


def _cost(dispatcher, _seen=None) -> int:
    """A rough compile cost, in bytes of bytecode: the function's and those of the Numba
    functions it calls (inlined or linked), plus 500 for a parallel kernel (its loop body
    compiles again as a gufunc, with the threading glue). Measured on LeNet-5's kernels it
    tracks compile time at about 1 ms per unit; it only orders and spreads the work."""
    from numba.core.dispatcher import Dispatcher
    seen = set() if _seen is None else _seen
    if id(dispatcher) in seen:
        return 0
    seen.add(id(dispatcher))
    fn = dispatcher.py_func
    cost = len(fn.__code__.co_code) + (500 if dispatcher.targetoptions.get("parallel") else 0)
    for name in fn.__code__.co_names:
        g = fn.__globals__.get(name)
        if isinstance(g, Dispatcher):
            cost += _cost(g, seen)
    return cost


def _address(dispatcher) -> tuple[str, str] | None:
    """(module, global name) that finds the dispatcher in a fresh process, or None."""
    fn = dispatcher.py_func
    module = sys.modules.get(fn.__module__)
    if module is not None and getattr(module, fn.__name__, None) is dispatcher:
        return fn.__module__, fn.__name__
    return None


def plan(items: list, workers: int, spawn: bool = False) -> list[list]:
    """Longest first onto the least loaded of ``workers + 1`` shares; share 0 is this
    process's. A spawned child starts later (a fresh interpreter imports numba and the
    kernels: about 600 units), and gets only what it can import by name."""
    shares: list[list] = [[] for _ in range(workers + 1)]
    load = [0] + [600 if spawn else 0] * workers
    for d, sig in sorted(items, key=lambda it: -_cost(it[0])):
        i = 0 if spawn and _address(d) is None else min(range(len(load)), key=load.__getitem__)
        shares[i].append((d, sig))
        load[i] += _cost(d)
    return shares


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        cpus = os.cpu_count() or 1
    return max(0, cpus - 1)


def _can_fork() -> bool:
    """Fork (Linux) while no thread but this one runs: before Numba's threading layer starts
    (no parallel kernel has run yet), forking is safe, and the child starts with numba and the
    kernels imported (a fresh interpreter spends ~0.5 s of CPU importing them). macOS's system
    libraries are not fork-safe, so it spawns there, as multiprocessing does."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return False
    from numba.np.ufunc import parallel
    return not parallel._is_initialized


def _forked(share: list) -> tuple[int, object]:
    """A forked child compiling ``share``; (pid, its pipe: one b"ok" line per kernel)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: compile, report, leave without running the parent's exit handlers
        os.close(r)
        code = 0
        try:
            for d, sig in share:
                d.compile(sig)
                os.write(w, b"ok\n")
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    return pid, os.fdopen(r, "rb")


def _spawned(share: list) -> tuple[subprocess.Popen, object]:
    """A fresh interpreter compiling ``share`` (given by module and name); (process, its stdout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=root + (os.pathsep + path if path else ""))
    proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env)
    proc.stdin.write(pickle.dumps([(*_address(d), sig) for d, sig in share]))
    proc.stdin.close()
    return proc, proc.stdout


def _wait(child) -> int:
    if isinstance(child, int):
        return os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    return child.wait()


def compile_items(items: list, workers: int | None = None,
                  progress: Callable[[int, int], None] = lambda done, total: None) -> None:
    """Compile each (dispatcher, signature), spread over this process and ``workers`` child
    processes (default one fewer than the CPUs); ``progress(done, total)`` after each."""
    workers = default_workers() if workers is None else max(0, workers)
    fork = _can_fork()
    shares = plan(items, min(workers, max(0, len(items) - 1)), spawn=not fork)
    total, done = len(items), [0]
    lock = threading.Lock()

    def one_done():
        with lock:
            done[0] += 1
            progress(done[0], total)

    children = [(*(_forked if fork else _spawned)(share), share) for share in shares[1:] if share]
    readers = []
    for _, pipe, _ in children:  # threads only after the last fork
        readers.append(threading.Thread(target=lambda p=pipe: [one_done() for line in p if line.strip() == b"ok"],
                                        daemon=True))
        readers[-1].start()
    for d, sig in shares[0]:
        d.compile(sig)
        one_done()
    for (child, pipe, share), reader in zip(children, readers):
        code = _wait(child)
        reader.join()
        pipe.close()
        if code:  # compile here what the child did not: the run must not depend on it
            for d, sig in share:
                d.compile(sig)


def _worker() -> None:
    """Spawned child: compile the pickled (module, name, signature) items from stdin."""
    items = pickle.loads(sys.stdin.buffer.read())
    for module, name, sig in items:
        getattr(importlib.import_module(module), name).compile(sig)
        print("ok", flush=True)


class Progress:
    """``compiling kernels for lenet5 (first run only) ... k/N`` on stderr: rewritten in
    place on a terminal; else a line at the start, one every ``every`` seconds, one at the end."""

    def __init__(self, label: str, stream=None, every: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.head = f"compiling kernels for {label} (first run only) ..."
        self.start = self.last = time.perf_counter()
        self.every = every

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.tty:
            self.stream.write(f"\r{self.head} {done}/{total}")
            self.stream.flush()
        elif done == 0 or now - self.last >= self.every:
            print(f"{self.head} {done}/{total}", file=self.stream, flush=True)
            self.last = now

    def close(self, total: int) -> None:
        took = f"{total}/{total} in {time.perf_counter() - self.start:.1f} s"
        print(f"\r{self.head} {took}" if self.tty else f"{self.head} {took}", file=self.stream, flush=True)


def warm_up_training(model, optimizer, batch_size: int, label: str, workers: int | None = None,
                     stream=None) -> int:
    """Compile what a training run of ``model`` needs and is not cached, with progress on
    ``stream`` (stderr); silent when nothing is missing. Returns how many kernels compiled."""
    try:
        todo = missing(training_step_signatures(model, optimizer, batch_size))
    except Exception:  # a model the dry step cannot run: its kernels compile at their first call
        return 0
    if todo:
        progress = Progress(label, stream)
        progress(0, len(todo))
        compile_items(todo, workers, progress)
        progress.close(len(todo))
    return len(todo)


if __name__ == "__main__":
    _worker()
