"""GPU sweep (issue 12): every CUDA conv algorithm and every candidate GEMM tile, timed once
on a real GPU, every timing recorded, so the tile defaults and 'auto''s rule are picked from
one run's record rather than by trial on the device.

    python bench/gpu_sweep.py                       # writes bench/results/gpu-sweep-<date>.json
    python bench/gpu_sweep.py --shapes big3x3 --reps 5 --json /tmp/sweep.json
    python bench/gpu_sweep.py --tiny                # tiny shapes, e.g. under NUMBA_ENABLE_CUDASIM=1

What is timed, float32:

    conv      the conv layers of the benchmark table (bench/shapes.py, those bench/gpu_report.py
              reports), each pass (fwd, gx, gw):
                algo   every algorithm of the CUDA table with its default tiles, through the
                       registered launchers (what ``algo=`` runs; ``runs`` names the entry
                       that ran, where a name gave way to another; an entry timed once
                       per case: a name that gives way to one timed already copies its
                       row, ``same_as`` naming it, e.g. 'depthwise' on every other layer)
                tile   implicit_gemm with each of gemm.CANDIDATES (conv_implicit's launchers)
                cudnn  PyTorch's, where a CUDA PyTorch is installed (TF32 off, benchmark on)
    gemm      the GEMM_N^3 product (4096^3) with each candidate tile, and cuBLAS (TF32 off)

in two rounds: the scalar tiles for every layer and the GEMM, then the vectorised (``_v4``)
tiles for every layer and the GEMM; their kernels had not run on a GPU when they were
added, and a fault in one (a misaligned vector access) would end every later launch of
the process, so they go last.

Each case: one untimed call (compiles, or loads Numba's cache), then ``--reps`` calls, each
timed by CUDA events (device ms) and by the host's clock up to the events' completion (wall
ms); the record keeps the minimum and the median of each, and the largest relative
difference from the case's reference output (the table's first algorithm that ran, or
cuBLAS's product / the tile DEFAULT's), so a wrong configuration shows. A case that raises or
runs past ``--timeout`` seconds (checked by an interval timer, which cannot interrupt a
compile in progress but stops the rest) is recorded with its error and the sweep goes on;
the JSON is rewritten after every case, so a sweep killed by its caller's timeout keeps
what it measured.

Under Numba's CUDA simulator only ``--tiny`` makes sense (every thread a Python thread);
the timings there mean nothing, the record's shape and the differences do (tests run it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shapes as S  # noqa: E402
from gpu_report import GEMM_N, RESULTS, device_facts, rel_err, torch_cuda  # noqa: E402

TINY_SHAPES = [
    S.ConvShape("tiny", 2, 3, 6, 5, 5, 3, 1, 1),
    S.ConvShape("tiny_grouped_strided", 1, 4, 5, 6, 6, 3, 2, 1, 1, 2),
    S.ConvShape("tiny_transposed", 1, 4, 3, 3, 2, 2, 2, 0, transposed=True),
    S.ConvShape("tiny_depthwise", 2, 4, 5, 6, 4, 3, 2, 1, 1, 4),
]
TINY_GEMM_N = 20


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def measure(fn, reps: int, timeout: float) -> dict:
    """Time ``fn`` (see the module docstring): {device_ms_min, device_ms_median, wall_ms_min,
    wall_ms_median, reps, out} or {error}."""
    from cnn_numba.kernels.autotune import cuda_event_clock

    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        out = fn()
        device, wall = [], []
        for _ in range(reps):
            t = time.perf_counter()
            device.append(cuda_event_clock("", fn))
            wall.append(time.perf_counter() - t)
        return {"device_ms_min": 1e3 * min(device), "device_ms_median": 1e3 * statistics.median(device),
                "wall_ms_min": 1e3 * min(wall), "wall_ms_median": 1e3 * statistics.median(wall), "reps": reps,
                "out": out}
    except Timeout:
        return {"error": f"timed out after {timeout} s"}
    except Exception as e:  # noqa: BLE001 (one case's failure must not stop the sweep)
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def implicit_pass(shape, pass_: str, dev: dict, tile):
    """``pass_`` of ``shape`` by conv_implicit's launchers with ``tile``: a zero-argument
    callable returning its output. A transposed layer runs conv2d's adjoint pass (bench/shapes.py)."""
    from numba import cuda

    from cnn_numba.kernels.cuda import conv_implicit as CI

    geom, conv_pass = shape.geom, shape.conv_pass(pass_)
    x, gy = (dev["gy"], dev["x"]) if shape.transposed else (dev["x"], dev["gy"])  # conv2d's x and gy
    w = dev["w"]
    if conv_pass == "forward":
        y = cuda.device_array(geom.y_shape, np.float32)
        return lambda: (CI.forward(x, w, None, y, geom, tile=tile), y)[1]
    if conv_pass == "backward_input":
        gx = cuda.device_array(geom.x_shape, np.float32)
        return lambda: (CI.backward_input(gy, w, gx, geom, tile=tile), gx)[1]
    gw = cuda.device_array(geom.w_shape, np.float32)
    return lambda: (CI.backward_weight(x, gy, gw, geom, tile=tile), gw)[1]


class Record:
    """The JSON record, rewritten after every case."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, {**head, "conv": [], "gemm": []}

    def add(self, section: str, row: dict, ref=None) -> dict:
        out = row.pop("out", None)
        if out is not None and ref is not None:
            row["max_rel_diff"] = rel_err(out, ref)
        self.data[section].append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), file=sys.stderr, flush=True)
        return out


def _tiles(vec: bool) -> list:
    """The candidate tiles of one of the two rounds: the scalar ones (DEFAULT first), or the
    vectorised ones (``vec``). The vectorised round runs last, after every scalar case of the
    conv layers and the GEMM: its kernels have not run on a GPU yet, and a fault there (a
    misaligned vector access) ends every later launch of the process."""
    from cnn_numba.kernels.cuda import gemm

    return [t for t in [gemm.DEFAULT] + [t for t in gemm.CANDIDATES if t != gemm.DEFAULT] if t.vec == vec]


def sweep_conv(record: Record, shapes, reps: int, timeout: float, torch, vec: bool = False) -> None:
    """Per layer and pass: every algorithm of the table, implicit_gemm with every scalar tile
    and cuDNN; with ``vec``, implicit_gemm with every vectorised tile alone (against the table's
    first algorithm, run once untimed)."""
    from numba import cuda

    from cnn_numba.backend import kernel
    from cnn_numba.kernels.cuda import gemm

    table = kernel("conv2d_algorithms", "cuda")()
    for shape in shapes:
        host = S.conv_arrays(shape)
        dev = {k: cuda.to_device(v) for k, v in host.items()}
        for p in S.CONV_PASSES:
            base = {"layer": shape.name, "describe": shape.describe(), "pass": p, "gflop": shape.flops / 1e9}
            ref, timed = None, {}
            for algo in table.names if not vec else ():
                runs = table.pick(algo, shape.geom, shape.conv_pass(p)).name
                if runs in timed:  # a name the table gives to an entry timed already: its row again, untimed
                    record.add("conv", {**base, "kind": "algo", "algo": algo, "runs": runs, "same_as": timed[runs][0],
                                        **timed[runs][1]})
                    continue
                res = measure(S.numba_conv_pass(shape, p, algo, dev, "cuda"), reps, timeout)
                out = record.add("conv", {**base, "kind": "algo", "algo": algo, "runs": runs, **res}, ref)
                timed[runs] = algo, {k: v for k, v in res.items() if k != "out"}
                ref = out if ref is None else ref
            if vec:
                ref = S.numba_conv_pass(shape, p, table.names[0], dev, "cuda")()
            kind = "conv_weight" if shape.conv_pass(p) == "backward_weight" else "conv"
            for tile in _tiles(vec):
                if tile.vec and not any(gemm.vec_operands(kind, tile)):
                    continue  # the same kernel as its scalar twin (conv_weight's operands stay scalar)
                res = measure(implicit_pass(shape, p, dev, tile), reps, timeout)
                record.add("conv", {**base, "kind": "tile", "algo": "implicit_gemm", "tile": tile.name, **res}, ref)
            if torch is not None and not vec:
                res = measure(S.torch_conv_pass(shape, p, host, "cuda"), reps, timeout)
                record.add("conv", {**base, "kind": "cudnn", "algo": "cudnn", **res}, ref)


def sweep_gemm(record: Record, n: int, reps: int, timeout: float, torch, vec: bool = False) -> None:
    """The n^3 GEMM: cuBLAS (the reference) and every scalar tile; with ``vec``, every
    vectorised tile (against the DEFAULT tile's product, run once untimed)."""
    from numba import cuda

    from cnn_numba.kernels.cuda import gemm

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    da, db = cuda.to_device(a), cuda.to_device(b)
    ref = None
    if vec:
        ref = cuda.device_array((n, n), np.float32)
        gemm.matmul(da, db, ref)
    elif torch is not None:
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        ref = record.add("gemm", {"n": n, "kind": "cublas", **measure(lambda: ta @ tb, reps, timeout)})
    for tile in _tiles(vec):
        dc = cuda.device_array((n, n), np.float32)
        res = measure(lambda: gemm.matmul(da, db, dc, tile=tile), reps, timeout)  # noqa: B023 (called at once)
        out = record.add("gemm", {"n": n, "kind": "tile", "tile": tile.name, **res}, ref)
        ref = out if ref is None else ref


def summary(data: dict) -> list[str]:
    """Markdown: per layer and pass the device ms (min) of each algorithm, the fastest tile
    of implicit_gemm and cuDNN; per GEMM tile its TFLOP/s. Failed cases show as 'x'."""
    def ms(row):
        if row is not None and "same_as" in row:
            return f"= {row['same_as']}"
        return "x" if row is None or "error" in row else f"{row['device_ms_min']:.3f}"

    algos = list(dict.fromkeys(r["algo"] for r in data["conv"] if r["kind"] == "algo"))
    lines = ["| layer | pass | " + " | ".join(f"{a} ms" for a in algos) + " | best tile | its ms | cuDNN ms |",
             "|---|---|" + "---:|" * len(algos) + "---|---:|---:|"]
    cases = dict.fromkeys((r["layer"], r["pass"]) for r in data["conv"])
    for layer, p in cases:
        rows = [r for r in data["conv"] if (r["layer"], r["pass"]) == (layer, p)]
        by_algo = {r["algo"]: r for r in rows if r["kind"] == "algo"}
        tiles = [r for r in rows if r["kind"] == "tile" and "error" not in r]
        best = min(tiles, key=lambda r: r["device_ms_min"], default=None)
        cudnn = next((r for r in rows if r["kind"] == "cudnn"), None)
        lines.append(f"| {layer} | {p} | " + " | ".join(ms(by_algo.get(a)) for a in algos)
                     + f" | {best['tile'] if best else 'x'} | {ms(best)} | {ms(cudnn) if cudnn else '-'} |")
    for r in data["gemm"]:
        flops = 2 * r["n"] ** 3
        rate = "x" if "error" in r else f"{flops / (r['device_ms_min'] / 1e3) / 1e12:.1f} TFLOP/s"
        lines.append(f"GEMM {r['n']}^3 {r.get('tile', r['kind'])}: {ms(r)} ms, {rate}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated conv layer names of bench/shapes.py, or of TINY_SHAPES "
                    "with --tiny (default: all)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and GEMM (the simulator)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--json", type=Path, help="default: bench/results/gpu-sweep-<date>.json")
    args = ap.parse_args(argv)
    from cnn_numba.kernels.cuda import gemm

    today = datetime.date.today().isoformat()
    by_name = {s.name: s for s in TINY_SHAPES} if args.tiny else S.CONV_BY_NAME
    shapes = [by_name[n] for n in args.shapes.split(",")] if args.shapes else list(by_name.values())
    facts, torch = device_facts(), torch_cuda()
    record = Record(args.json or RESULTS / f"gpu-sweep-{today}.json", {
        "date": today, "commit": S.commit(), "device": facts, "tiny": args.tiny, "reps": args.reps,
        "torch": None if torch is None else f"{torch.__version__} cuDNN {torch.backends.cudnn.version()}",
        "default_tile": gemm.DEFAULT.name, "candidates": [t.name for t in gemm.CANDIDATES]})
    t0 = time.perf_counter()
    for vec in (False, True):  # the untried vectorised kernels last (_tiles)
        sweep_conv(record, shapes, args.reps, args.timeout, torch, vec)
        if not args.no_gemm:
            sweep_gemm(record, TINY_GEMM_N if args.tiny else GEMM_N, args.reps, args.timeout, torch, vec)
    rows = record.data["conv"] + record.data["gemm"]
    failed = [r for r in rows if "error" in r]
    print("\n".join(summary(record.data)))
    print(f"{len(rows)} cases in {time.perf_counter() - t0:.0f} s, {len(failed)} failed; wrote {record.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
