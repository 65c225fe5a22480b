"""The host side of a CUDA training step (issue 11, part 1): what the host does per step, and
what each launch costs it.

    python bench/gpu_host.py [--models lenet5,resnet20] [--batch 64,128] [--steps 20] [--json PATH]

Per model, one training step (forward, cross-entropy, backward, SGD) after warm-up steps:

    launches      kernel launches through cnn_numba's launcher (kernels/cuda/launch.py)
    reads         device-to-host copies (every read goes through a device array's
                  copy_to_host: .item(), .numpy(), the count kernels); each one waits for
                  the device to finish the work queued before it
    host ms       wall time of the Python that queues the step (no synchronisation inside)
    device ms     the step's device time, from CUDA events around it (a GPU only)

each also for the same step replayed as a CUDA graph (cnn_numba.cuda.graphed_step, fed host
batches: its launches from Python are none, its host time the batch's staging, the
optimiser's host code and one graph launch), and, per launch, host microseconds through cnn_numba's launcher and through a bare
numba-cuda launch of the same kernel (``kernel[grid, block](*args)``), the mean of
``--launches`` calls queued back to back.

On a GPU this is what bench/gpu_check.py runs as its "host" step, and ``--json`` writes the
figures (launch_us, syncs_per_step, launches_per_step, host/device ms per step). Without a GPU
it runs under Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), where only the counts mean
anything: keep the shapes tiny there (``--batch 2 --side 8``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _counting(made: dict):
    """Count launches (launch.record) and device-to-host copies (copy_to_host) into ``made``."""
    from numba import cuda

    from cnn_numba.kernels.cuda import launch

    cls = type(cuda.to_device(np.zeros(1)))
    inner = cls.copy_to_host

    def copy_to_host(self, *args, **kwargs):
        made["reads"] += 1
        return inner(self, *args, **kwargs)

    def record(kernel, args):
        made["launches"] += 1

    cls.copy_to_host = copy_to_host
    launch.record = record
    return lambda: (setattr(cls, "copy_to_host", inner), setattr(launch, "record", None))


def step_counts(name: str, model, batch: int, side: int, steps: int, classes: int = 10) -> dict:
    """Launches, reads and host/device time of one training step of ``model`` (on "cuda",
    taking (batch, 1, side, side) images into ``classes`` logits), reported as ``name``."""
    from numba import config, cuda

    import cnn_numba as cn
    import cnn_numba.functional as F
    from cnn_numba import optim

    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = cn.tensor(rng.standard_normal((batch, 1, side, side)).astype(np.float32), device="cuda")
    y = rng.integers(0, classes, batch)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    graphed = cn.cuda.graphed_step(model, F.cross_entropy, opt)
    x_host = x.numpy()
    out = {"model": name, "batch": batch}
    for kind, one in (("", step), ("graph_", lambda: graphed(x_host, y))):
        for _ in range(2):  # compiles, the batch norms' first count; the graph: warm-up, then capture
            one()
        made = {"launches": 0, "reads": 0}
        restore = _counting(made)
        try:
            one()
        finally:
            restore()
        out.update({f"{kind}launches": made["launches"], f"{kind}reads": made["reads"]})
        if not config.ENABLE_CUDASIM:
            cuda.synchronize()
            start, end = cuda.event(), cuda.event()
            host = []
            start.record()
            for _ in range(steps):
                t = time.perf_counter()
                one()
                host.append(time.perf_counter() - t)
            end.record()
            end.synchronize()
            out[f"{kind}host_ms"] = 1e3 * float(np.median(host))
            out[f"{kind}device_ms"] = cuda.event_elapsed_time(start, end) / steps
    out["graph_kind"] = graphed.kind
    if graphed.kind is not None:
        out.update(replay_parts(graphed, x_host, y, max(steps, 3)))
    return out


def replay_parts(graphed, x, y, steps: int) -> dict:
    """Host microseconds of a replayed step's parts, medians over ``steps``: the labels'
    check, the optimiser's host code rewriting the step's scalars (``refresh_us``), the
    batch's staging (``upload_us``) and the replay (the scalar table's upload and the graph
    launch, ``replay_us``): what the host spends per batch once the step is a graph."""
    parts = {"check_us": [], "refresh_us": [], "upload_us": [], "replay_us": []}
    for _ in range(steps):  # GraphedStep.__call__'s replay, part by part
        t0 = time.perf_counter()
        labels = graphed._checked(y)
        t1 = time.perf_counter()
        graphed._refresh()
        t2 = time.perf_counter()
        graphed._upload(x, labels)
        t3 = time.perf_counter()
        graphed._replay()
        t4 = time.perf_counter()
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[key].append(1e6 * dt)
    return {f"graph_{k}": float(np.median(v)) for k, v in parts.items()}


def launch_us(launches: int) -> dict:
    """Host microseconds per launch of a one-element fill kernel, queued back to back: through
    cnn_numba's launcher (its lean path, kernels/cuda/lean.py, on a GPU), through the launcher
    with the lean path off (Numba's own launch), and bare (``kernel[grid, block](*args)``)."""
    from numba import cuda

    from cnn_numba.kernels.cuda import elementwise as E
    from cnn_numba.kernels.cuda import launch as L

    out = cuda.device_array(1, np.float32)
    value = L.scalar(1.0, np.float32)
    res = {}
    lean = L.LEAN
    try:
        for name, use_lean, call in (("launcher", lean, lambda: L.launch(E._fill, 1, out, value)),
                                     ("launcher_numba", False, lambda: L.launch(E._fill, 1, out, value)),
                                     ("bare", lean, lambda: E._fill[1, L.BLOCK](out, value))):
            L.LEAN = use_lean
            call()
            call()  # the first makes the lean plan
            cuda.synchronize()
            t = time.perf_counter()
            for _ in range(launches):
                call()
            res[name] = 1e6 * (time.perf_counter() - t) / launches
            cuda.synchronize()
    finally:
        L.LEAN = lean
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--batch", default="64,128", help="one batch size per model")
    ap.add_argument("--side", type=int, default=28, help="input side (28: MNIST)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (a GPU only)")
    ap.add_argument("--launches", type=int, default=2000)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    import cnn_numba as cn
    from cnn_numba import models

    names = args.models.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for n, b in zip(names, batches + batches[-1:] * len(names)):
        cn.manual_seed(0)
        rows.append(step_counts(n, getattr(models, n)().to("cuda"), b, args.side, args.steps))
    per_launch = launch_us(args.launches)
    print("| model | batch | step | launches from Python | device-to-host reads | host ms | device ms |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        for kind, label in (("", "eager"), ("graph_", r["graph_kind"] or "eager (capture failed)")):
            print(f"| {r['model']} | {r['batch']} | {label} | {r[kind + 'launches']} | {r[kind + 'reads']} | "
                  f"{r.get(kind + 'host_ms', float('nan')):.2f} | {r.get(kind + 'device_ms', float('nan')):.2f} |")
    for r in rows:
        if "graph_replay_us" in r:
            print(f"\n{r['model']} replayed step, host us: labels {r['graph_check_us']:.0f}, optimiser refresh "
                  f"{r['graph_refresh_us']:.0f}, batch staging {r['graph_upload_us']:.0f}, "
                  f"scalars + graph launch {r['graph_replay_us']:.0f}")
    print(f"\nhost us per launch: cnn_numba's launcher {per_launch['launcher']:.1f} (lean path), "
          f"{per_launch['launcher_numba']:.1f} with the lean path off, bare numba-cuda {per_launch['bare']:.1f}")
    if args.json:
        record = {"launch_us": per_launch["launcher"], "launch_us_bare": per_launch["bare"],
                  "launch_us_numba_path": per_launch["launcher_numba"],
                  "syncs_per_step": max(max(r["reads"], r["graph_reads"]) for r in rows)}
        for r in rows:
            for kind in ("", "graph_"):
                for k in ("launches", "reads", "host_ms", "device_ms"):
                    if kind + k in r:
                        key = f"{r['model']}_{kind}{k}" + ("_per_step" if k in ("launches", "reads") else "")
                        record[key] = r[kind + k]
            record[f"{r['model']}_graph_kind"] = r["graph_kind"]
            for k in ("check_us", "refresh_us", "upload_us", "replay_us"):
                if f"graph_{k}" in r:
                    record[f"{r['model']}_graph_{k}"] = r[f"graph_{k}"]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
