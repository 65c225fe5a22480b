"""First-call (compile) time of every CPU kernel: cold cache, then warm cache; and the
cold start of training: two LeNet-5 steps at batch 64 from an empty cache.

    python bench/compile_time.py            # both tables
    python bench/compile_time.py --lenet5   # only the LeNet-5 cold start

LeNet-5 cold start: each row a fresh process and a fresh empty NUMBA_CACHE_DIR (the warm
rows reuse the cache the row before filled), timing import to the end of the second step
of the default training run (sgd, momentum 0.9, batch 64; random data, so no dataset is
needed). "serial" lets the steps compile as they go; "warm-up" first runs
cnn_numba.warmup (what ``train`` does on a cold cache: the kernels compiled in this
process and one fewer child processes than CPUs). CPU is user+sys, of the process and of
its children (the warm-up's workers): on a shared machine it is the steadier figure; the
wall time is what a user waits. The per-kernel table lists each compiled function's own
compile time (its helpers' compiles subtracted) in the serial cold run, from Numba's
``numba:compile`` events.

Runs two child processes sharing a fresh temporary NUMBA_CACHE_DIR. The first compiles
every kernel (cold); the second finds them all in the cache (cached: type inference is
skipped, the machine code is loaded). Each child times the first call of each launcher on
tiny float32 inputs, in the order listed, so a helper shared by several kernels (im2col,
col2im, the index helpers) counts towards the first kernel that calls it. Before the kernels
each child compiles a two-line parallel function that is never cached: its time is Numba's
own start-up (LLVM, the threading layer), paid once per process whatever the cache holds.
Only float32 C-contiguous signatures are compiled; float64 would compile a second set.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child() -> None:
    """Time each first call in this process; print {name: ms} as JSON on the last line."""
    times = {}

    def first_call(name, fn):
        t = time.perf_counter()
        fn()
        times[name] = (time.perf_counter() - t) * 1e3

    t = time.perf_counter()
    import numpy as np
    from numba import njit, prange
    times["import numpy, numba"] = (time.perf_counter() - t) * 1e3

    @njit(parallel=True)
    def spin(a):
        for i in prange(a.size):
            a[i] += 1.0

    first_call("numba start-up (uncached probe)", lambda: spin(np.zeros(8)))

    t = time.perf_counter()
    from cnn_numba.kernels import conv as K
    from cnn_numba.kernels import conv_algos as A
    from cnn_numba.kernels import pool as P
    from cnn_numba.shapes import conv2d_geom
    times["import cnn_numba kernels"] = (time.perf_counter() - t) * 1e3

    f32 = np.float32
    rng = np.random.default_rng(0)
    # conv: N=2, C=4 -> CO=6, groups 2, 3x3, stride 2, pad 1 on 9x9 -> 5x5
    x = rng.standard_normal((2, 4, 9, 9)).astype(f32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(f32)
    gy = rng.standard_normal((2, 6, 5, 5)).astype(f32)
    geom = conv2d_geom(x.shape, w.shape, stride=2, padding=1, dilation=1, groups=2)
    for algo in A.TABLE.names:
        first_call(f"conv2d fwd {algo}", lambda: A.forward(x, w, None, geom, algo))
        first_call(f"conv2d gx {algo}", lambda: A.backward_input(gy, w, geom, algo))
        first_call(f"conv2d gw {algo}", lambda: A.backward_weight(x, gy, geom, algo))
    first_call("conv2d gb", lambda: K.backward_bias(gy))
    # stride 1, the layers of LeNet and ResNet: direct runs the flat kernels, im2col the
    # shifted products (its input-gradient is the general one, compiled above)
    x1 = rng.standard_normal((2, 4, 12, 12)).astype(f32)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(f32)
    gy1 = rng.standard_normal((2, 8, 12, 12)).astype(f32)
    geom1 = conv2d_geom(x1.shape, w1.shape, stride=1, padding=1, dilation=1, groups=1)
    for algo in A.TABLE.names:
        first_call(f"conv2d fwd {algo}, stride 1", lambda: A.forward(x1, w1, None, geom1, algo))
        first_call(f"conv2d gx {algo}, stride 1", lambda: A.backward_input(gy1, w1, geom1, algo))
        first_call(f"conv2d gw {algo}, stride 1", lambda: A.backward_weight(x1, gy1, geom1, algo))

    # pooling: 3x3 stride 2 pad 1 on 9x9 -> 5x5
    px = rng.standard_normal((2, 3, 9, 9)).astype(f32)
    pg = rng.standard_normal((2, 3, 5, 5)).astype(f32)
    win = ((3, 3), (2, 2), (1, 1))
    idx = None

    def max_fwd():
        nonlocal idx
        idx = P.max_pool2d(px, (5, 5), *win, (1, 1))[1]

    first_call("max_pool2d fwd", max_fwd)
    first_call("max_pool2d bwd (scatter, +=)", lambda: P.scatter(pg, idx, (9, 9), True))
    first_call("max_unpool2d fwd (scatter, =)", lambda: P.scatter(pg, idx, (9, 9), False))
    first_call("max_unpool2d bwd (gather)", lambda: P.gather(px, idx))
    first_call("avg_pool2d fwd", lambda: P.avg_pool2d(px, (5, 5), *win, True, 0))
    first_call("avg_pool2d bwd", lambda: P.avg_pool2d_grad(pg, (9, 9), *win, True, 0))
    first_call("adaptive_avg_pool2d fwd", lambda: P.adaptive_avg_pool2d(px, (4, 4)))
    first_call("adaptive_avg_pool2d bwd", lambda: P.adaptive_avg_pool2d_grad(pg, (9, 9)))
    print(json.dumps(times))


def lenet5_child(warm_up: bool) -> None:
    """Two LeNet-5 training steps from import on; print timings and compile events as JSON."""
    t0, c0 = time.perf_counter(), time.process_time()
    from numba.core import event

    events, stack = [], []

    class Compiles(event.Listener):
        def on_start(self, ev):
            stack.append([time.process_time(), 0.0])

        def on_end(self, ev):
            start, inner = stack.pop()
            cpu = time.process_time() - start
            if stack:
                stack[-1][1] += cpu
            d = ev.data["dispatcher"]
            events.append((f"{d.py_func.__module__.rsplit('.', 1)[-1]}.{d.py_func.__qualname__}",
                           ", ".join(str(a) for a in ev.data["args"]), cpu - inner))

    event.register("numba:compile", Compiles())
    import numpy as np
    from cnn_numba import functional as F
    from cnn_numba import train as T
    from cnn_numba import warmup
    from cnn_numba.tensor import tensor

    model = T.build_model("lenet5")
    opt = T.make_optimizer("sgd", model.parameters(), 0.05)
    out = {"import_s": time.perf_counter() - t0}
    if warm_up:
        t = time.perf_counter()
        out["kernels_compiled_by_warmup"] = warmup.warm_up_training(model, opt, 64, "lenet5", stream=sys.stderr)
        out["warmup_s"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    for step in (1, 2):
        t = time.perf_counter()
        x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 64)
        model.train()
        loss = F.cross_entropy(model(tensor(x)), tensor(y))
        loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out[f"step{step}_s"] = time.perf_counter() - t
    children = os.times()
    out.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
               children_cpu_s=children.children_user + children.children_system, compiles=events)
    print(json.dumps(out))


def lenet5_table() -> None:
    rows = []
    for label, warm_up, fresh in (("cold, serial", False, True), ("warm (cached)", False, False),
                                  ("cold, warm-up", True, True), ("warm, warm-up (nothing to do)", True, False)):
        if fresh:
            cache = tempfile.mkdtemp(prefix="cnn_numba_cache_")
            caches.append(cache)
        env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        rows.append((label, run_child(env, ["--lenet5-child"] + (["--warm-up"] if warm_up else []))))
    print("\nLeNet-5, two training steps at batch 64, from import (fresh process; cold = empty cache)\n")
    print("| run | wall s | CPU s (process + children) | import s | warm-up s | step 1 s | step 2 s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r['wall_s']:.1f} | {r['cpu_s'] + r['children_cpu_s']:.1f} "
              f"({r['cpu_s']:.1f} + {r['children_cpu_s']:.1f}) | {r['import_s']:.2f} | "
              f"{r.get('warmup_s', 0):.1f} | {r['step1_s']:.2f} | {r['step2_s']:.3f} |")
    serial = rows[0][1]["compiles"]
    print("\nCompile CPU time per function and signature, serial cold run (helpers' own compiles "
          "subtracted; numba internals under 0.05 s left out)\n")
    print("| function | CPU s | argument types |")
    print("|---|---:|---|")
    for name, args, cpu in sorted(serial, key=lambda e: -e[2]):
        if cpu >= 0.05 or name.startswith(("conv.", "pool.", "nn.", "elementwise.", "blas.", "index.")):
            print(f"| {name} | {cpu:.2f} | {args[:120]} |")
    print(f"| **all {len(serial)} compiles** | **{sum(e[2] for e in serial):.1f}** | |")


caches: list = []


def run_child(env, args=("--child",)) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if res.returncode:
        sys.exit(f"child failed ({res.returncode}):\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    cache = tempfile.mkdtemp(prefix="cnn_numba_cache_")
    try:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        t = time.perf_counter()
        cold = run_child(env)
        t_cold = time.perf_counter() - t
        t = time.perf_counter()
        warm = run_child(env)
        t_warm = time.perf_counter() - t
        files = sum(len(fs) for _, _, fs in os.walk(cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    kernels = [k for k in cold if not k.startswith(("import", "numba start-up"))]
    print("| first call | cold ms | cached ms |")
    print("|---|---:|---:|")
    for k in cold:
        print(f"| {k} | {cold[k]:.0f} | {warm[k]:.0f} |")
    print(f"| **all kernels** | **{sum(cold[k] for k in kernels):.0f}** | **{sum(warm[k] for k in kernels):.0f}** |")
    print(f"\nWhole child process (interpreter start to exit): cold {t_cold:.1f} s, cached {t_warm:.1f} s; "
          f"{files} cache files written.")


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    elif sys.argv[1:2] == ["--lenet5-child"]:
        lenet5_child(warm_up="--warm-up" in sys.argv)
    else:
        try:
            if sys.argv[1:] != ["--lenet5"]:
                main()
            lenet5_table()
        finally:
            for c in caches:
                shutil.rmtree(c, ignore_errors=True)
