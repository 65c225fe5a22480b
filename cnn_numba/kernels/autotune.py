"""Per-shape autotuning of conv2d's 'auto' (on unless ``CNN_NUMBA_AUTOTUNE=0``): the CPU's
(``Tuner``) and, by the same logic and table file, a real GPU's (``CudaTuner``, at the end).

With tuning on (``CNN_NUMBA_AUTOTUNE`` is read at the first conv call of the process), the
first 'auto' call of a (geometry, dtype, pass) runs every algorithm of the table on that
call's own arrays: one untimed call each (it compiles the kernels or loads them from Numba's
cache), then up to ``REPEATS`` timed rounds, the fastest call of each counting. The quickest
algorithm (the rule's, unless another is ``MARGIN`` faster) is kept for the process and
written to a small JSON table on disk, keyed by the machine (CPU model, Numba's thread
count, the kernel set of the BLAS the products call, the kernels' GENERATION, and the
algorithms that were candidates: ``CNN_NUMBA_WINOGRAD=0`` leaves Winograd out), so
the next process skips the timing and makes the same choice: results differ between
algorithms by float rounding only, and a run resumed later must compute what it computed
before. Without tuning, or before a choice exists, 'auto' is the table's rule
(``conv_algos.auto_algo``).

What it costs: the kernels of every algorithm compile once per machine (Numba's cache keeps
them), and the first call of each layer shape times them. LeNet-5's cold start
(bench/compile_time.py --lenet5, 2 shared cores, 2026-12-01): 86 compiles for 22.5 s of CPU
against 69 for 17.2 s untuned, serially; the warm-up's dry step (cnn_numba/warmup.py), in
which the kernels only record, runs every algorithm's launcher for a shape it will time, so
``train`` compiles them all in its parallel warm-up and the first step's timing then takes
~0.04 s. Not tuned: layers under ``MIN_MACS`` multiply-adds (the rule's choice is as good as
any there, and the timing would be noise), and empty batches.

The table: ``CNN_NUMBA_AUTOTUNE_FILE``, else ``cnn_numba_autotune.json`` in Numba's cache
directory where ``NUMBA_CACHE_DIR`` sets one, else ``~/.cache/cnn_numba/autotune.json``.

    {"format": "cnn_numba autotune 1",
     "machines": {"<CPU model> | <threads> threads | BLAS <kernels> | kernels <GENERATION>
                   | algos <names>":
                  {"forward float32 n,c,h,w,co,kh,kw,oh,ow,sh,sw,ph,pw,ph_end,pw_end,dh,dw,g": "im2col"}}}

A file that cannot be read or parsed is ignored with a warning (and replaced at the next
write); an entry naming an algorithm the table does not have is ignored.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import numba
import numpy as np

from ..fileio import atomic_write
from . import get_num_threads

ENV = "CNN_NUMBA_AUTOTUNE"
FILE_ENV = "CNN_NUMBA_AUTOTUNE_FILE"
FORMAT = "cnn_numba autotune 1"
REPEATS = 3
# Below this many multiply-adds per pass (n * co * oh * ow * c/g * kh * kw) a pass costs
# well under a millisecond and the rule's choice stands: LeNet-5's convs at batch 64 are
# 7.5M and 15M, at batch 1 0.1M and 0.2M.
MIN_MACS = 1_000_000
# Timing stops after the round that passes this many seconds (a large layer: one round).
BUDGET_S = 0.5
MARGIN = 0.05
# Passes whose arrays hold more than this are timed with cold caches (_cache_evictor); below,
# a network's activations stay in the caches between layers as they do between timed calls.
COLD_BYTES = 8 << 20
# Part of the machine key: a new generation (an algorithm rewritten, say) leaves the choices
# timed against the old kernels unread. 2: Winograd's products became BLAS calls. 3: the flat
# direct kernels hold their accumulators in vector registers (AVX-512). 4: rows are loaded
# into the padded planes with masked vector copies, strided flat passes load only the input
# phases they read (the direct kernels' loads 2-4x faster), and the blocked kernel joined.
# 5: the blocked kernel stores from registers (8-44% faster). 6: stride-2 flat passes split
# the input's rows into their column phases in vector chunks (strided weight-gradients 30-50%
# faster).
GENERATION = 6


def enabled() -> bool:
    """Whether tuning is on: unless ``CNN_NUMBA_AUTOTUNE=0``."""
    return os.environ.get(ENV, "1").strip() != "0"


def table_path() -> Path:
    if os.environ.get(FILE_ENV):
        return Path(os.environ[FILE_ENV])
    if numba.config.CACHE_DIR:
        return Path(numba.config.CACHE_DIR) / "cnn_numba_autotune.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnn_numba" / "autotune.json"


def cpu_model() -> str:
    """/proc/cpuinfo's first 'model name' (Linux), else platform.processor(), else the machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def shape_key(geom, dtype, pass_: str) -> str:
    """The on-disk key of a (geometry, dtype, pass): every ConvGeom field, in order."""
    return f"{pass_} {dtype.name} " + ",".join(str(v) for v in dataclasses.astuple(geom))


def _read(path: Path) -> dict:
    """The file's {machine: {key: name}}; {} (with a warning) if it is missing or bad."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"ignoring the autotune table {path}: {e}", RuntimeWarning, stacklevel=2)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"no 'format': {FORMAT!r}")
        machines = data.get("machines")
        if not isinstance(machines, dict) or not all(
                isinstance(m, dict) and all(isinstance(v, str) for v in m.values()) for m in machines.values()):
            raise ValueError("'machines' is not a mapping of machine to {shape: algorithm}")
        return machines
    except ValueError as e:  # json.JSONDecodeError included
        warnings.warn(f"ignoring the autotune table {path}: {e}", RuntimeWarning, stacklevel=2)
        return {}


def wall_clock(name: str, run) -> float:
    """Seconds that ``run()`` takes by the host's clock (the CPU tuner's ``clock``)."""
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


class Tuner:
    """A table's tuned choices: ``choose(table, geom, pass_, arrays)`` gives the name 'auto'
    runs, or None for the rule. One per table; choices made in this process stay fixed.

    A device's tuner (CudaTuner below) overrides the hooks: ``_enabled``, ``_setting`` (the
    context a choice holds for), ``machine`` (the on-disk key), ``_evictor``, and ``clock``,
    ``clock(name, run) -> seconds`` of one call of algorithm ``name``."""

    def __init__(self, clock=wall_clock):
        self.clock = clock
        self._chosen: dict = {}      # (geom, dtype, pass_, context) -> name
        self._disk: dict | None = None  # this machine's entries, read once per (path, machine)
        self._disk_for = None
        self._lock = threading.Lock()
        self._on: bool | None = None  # enabled(), read at the first call (a lookup costs ~1 us)

    def _enabled(self) -> bool:
        return enabled()

    def _setting(self) -> tuple[bool, object]:
        """(recording, context): whether the warm-up's dry step is recording (its kernels
        only record, and numba.get_num_threads() would start the thread pool before the
        warm-up forks), and the thread count the choice holds for."""
        from .. import warmup
        recording = warmup._recorded is not None
        return recording, warmup._configured_threads() if recording else get_num_threads()

    def _evictor(self, arrays):
        return _cache_evictor(sum(a.nbytes for a in arrays))

    def machine(self, threads: int, table) -> str:
        """The table's key for this machine: CPU, threads, BLAS kernels (OpenBLAS's AVX-512 or
        AVX2 set moves im2col's and Winograd's products by 2x), GENERATION, and the names of
        ``table``'s algorithms that are timed now: a choice made while one was switched off
        (``CNN_NUMBA_WINOGRAD=0``) never compared it, and must not stand once it is back."""
        algos = ",".join(a.name for a in table.algos if a.tuned())
        return f"{_CPU_MODEL} | {threads} threads | BLAS {_blas_core()} | kernels {GENERATION} | algos {algos}"

    def _disk_entries(self, machine: str) -> dict:
        path = table_path()
        if self._disk_for != (path, machine):
            self._disk, self._disk_for = dict(_read(path).get(machine, {})), (path, machine)
        return self._disk

    def choose(self, table, geom, pass_: str, arrays) -> str | None:
        if self._on is None:
            self._on = self._enabled()
        if not self._on or not geom.n:
            return None
        # While recording, a known choice is used, the rule otherwise.
        recording, context = self._setting()
        dtype = arrays[-1].dtype
        pkey = (geom, dtype, pass_, context)
        name = self._chosen.get(pkey)
        if name is not None:
            return name
        with self._lock:
            machine, key = self.machine(context, table), shape_key(geom, dtype, pass_)
            name = self._disk_entries(machine).get(key)
            if name in table.by_name and table.by_name[name].tuned() and table.by_name[name].supports(geom, pass_):
                self._chosen[pkey] = name
                return name
            small = geom.n * geom.co * geom.oh * geom.ow * geom.cig * geom.kh * geom.kw < MIN_MACS
            if recording:
                if not small:  # the real step will time them all: compile them all now
                    for entry in _candidates(table, geom, pass_):
                        entry.run(pass_, geom, *arrays)
                return None
            if small:
                name = table.policy(geom, pass_)
            else:
                name = self._time(table, geom, pass_, arrays)
                self._save(machine, key, name)
            self._chosen[pkey] = name
            return name

    def _time(self, table, geom, pass_, arrays) -> str:
        """The fastest of the table's algorithms on ``arrays`` (each writes the output): the
        least of up to ``REPEATS`` calls each, interleaved so that a slow stretch of a shared
        machine hits every algorithm alike; the rule's choice stays unless another is
        ``MARGIN`` faster (a noisy timing should not move results for nothing)."""
        entries = _candidates(table, geom, pass_)
        for entry in entries:
            entry.run(pass_, geom, *arrays)  # compiles (or loads) its kernels; not timed
        best = dict.fromkeys((e.name for e in entries), float("inf"))
        evict = self._evictor(arrays)
        start = time.perf_counter()
        for _ in range(REPEATS):
            for entry in entries:
                if evict is not None:
                    evict.fill(0)
                elapsed = self.clock(entry.name, lambda: entry.run(pass_, geom, *arrays))  # noqa: B023 (called at once)
                best[entry.name] = min(best[entry.name], elapsed)
            if time.perf_counter() - start > BUDGET_S:
                break
        fastest, rule = min(best, key=best.get), table.policy(geom, pass_)
        return rule if rule in best and best[fastest] > (1 - MARGIN) * best[rule] else fastest

    def _save(self, machine: str, key: str, name: str) -> None:
        """Add the entry to the file, merged with what other processes wrote meanwhile."""
        path = table_path()
        machines = _read(path)
        machines.setdefault(machine, {})[key] = name
        data = json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True).encode()
        try:
            atomic_write(path, lambda f: f.write(data))
        except OSError as e:
            warnings.warn(f"could not write the autotune table {path}: {e}", RuntimeWarning, stacklevel=2)
        self._disk, self._disk_for = dict(machines[machine]), (path, machine)

    def clear(self) -> None:
        """Forget this process's choices and the file's cached entries, and read
        ``CNN_NUMBA_AUTOTUNE`` again at the next call (tests)."""
        with self._lock:
            self._chosen.clear()
            self._disk = self._disk_for = self._on = None


def _cache_evictor(nbytes: int):
    """None, or an array to write over before each timed call where a pass's arrays
    (``nbytes``) exceed COLD_BYTES: a network's next layer finds those cold (written by
    earlier ops, evicted by other layers' data), while calls repeated on the same arrays find
    them in the last-level cache; warm timings favoured the algorithms that re-read their
    input most (resnet8's 1x1 stride-2 shortcut at batch 256: im2col 1.25 ms warm, 2.16 cold;
    the blocked kernel 1.38 and 1.93). Twice the last-level cache (sysinfo)."""
    if nbytes <= COLD_BYTES:
        return None
    return np.empty(2 * _last_level_cache() // 4, np.float32)


@functools.cache
def _last_level_cache() -> int:
    from ..sysinfo import last_level_cache_bytes
    return last_level_cache_bytes()


def _candidates(table, geom, pass_: str) -> list:
    """The table's algorithms the tuner times for ``pass_`` of ``geom``."""
    return [a for a in table.algos if a.tuned() and a.supports(geom, pass_)]


@functools.cache
def _blas_core() -> str:
    """sysinfo.kernel_blas_core(), read once (the BLAS picks its kernels when it loads)."""
    from ..sysinfo import kernel_blas_core
    return kernel_blas_core()


_CPU_MODEL = cpu_model()


# ----------------------------------------------------------------------------- CUDA

# Part of a GPU's machine key, as GENERATION is of the CPU's. 1: direct, im2col and
# implicit_gemm (issue 12).
CUDA_GENERATION = 1


def cuda_event_clock(name: str, run) -> float:
    """Seconds of device time that ``run()`` queues, between two CUDA events (the GPU
    tuner's ``clock``; host time spent launching is not counted)."""
    from numba import cuda

    start, end = cuda.event(), cuda.event()
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3  # milliseconds


class CudaTuner(Tuner):
    """The CUDA table's tuner: the CPU tuner's choice, keys and on-disk table, timed by CUDA
    events (device time) instead of the host's clock, keyed by the GPU (name, compute
    capability) and CUDA_GENERATION instead of the CPU, BLAS and threads, and with no cache
    eviction (a GPU's L2 is refilled by the next layer's kernels in microseconds). Off under
    Numba's CUDA simulator (every thread a Python thread: its timings say nothing), and with
    ``CNN_NUMBA_AUTOTUNE=0``."""

    def __init__(self, clock=cuda_event_clock):
        super().__init__(clock)

    def choose(self, table, geom, pass_: str, arrays) -> str | None:
        """While a step is captured as a CUDA graph nothing runs, so nothing can be timed: a
        choice made before is used, the rule otherwise (None)."""
        from ..backend import capturing
        if capturing():
            return self._chosen.get((geom, arrays[-1].dtype, pass_, self._setting()[1]))
        return super().choose(table, geom, pass_, arrays)

    def _enabled(self) -> bool:
        return enabled() and not numba.config.ENABLE_CUDASIM

    def _setting(self) -> tuple[bool, object]:
        from numba import cuda
        return False, getattr(cuda.get_current_device(), "id", 0)  # (the simulator's device has none)

    def _evictor(self, arrays):
        return None

    def machine(self, device_id, table) -> str:
        from numba import cuda
        dev = cuda.get_current_device()
        name = getattr(dev, "name", "Numba CUDA simulator")  # (the simulator's device has no name)
        name = name.decode() if isinstance(name, bytes) else str(name)
        algos = ",".join(a.name for a in table.algos if a.tuned())
        cc = ".".join(map(str, dev.compute_capability))
        return f"{name} | cc {cc} | cuda kernels {CUDA_GENERATION} | algos {algos}"
