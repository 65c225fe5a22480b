"""First-call (compile) time of every CPU kernel: cold cache, then warm cache.

    python bench/compile_time.py

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


def run_child(env) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=ROOT,
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
    else:
        main()
