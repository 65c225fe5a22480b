"""Everything a session with a lent GPU should run, in one command, recorded in one file.

    python bench/gpu_check.py [--data-dir DIR] [--skip tests,train,report,speed]
    python bench/gpu_check.py --order tests,report --pytest-args "-k cuda -n 8" --timeouts tests=150

1. the whole test suite on the real GPU (tests/conftest.py uses the simulator only where
   no NVIDIA driver exists, so here every CUDA test runs on the device, at its full shapes);
2. a short LeNet-5 training run (Fashion-MNIST when ``--data-dir`` holds it, else the
   offline MNIST sample) on the GPU and on the CPU with the same seed: the test
   accuracies must agree within a point;
3. bench/gpu_report.py (conv layers vs cuDNN, the GEMM vs the FP32 peak);
4. bench/train_speed.py --device cuda (LeNet-5 b64, resnet20 b128 vs PyTorch);
5. bench/gpu_host.py: launches and device-to-host reads per training step, host and device
   time per step, host microseconds per launch (written to gpu-host-<date>.json too);
6. bench/gpu_sweep.py: every CUDA conv algorithm and every candidate GEMM tile on the
   table's layers and the 4096^3 GEMM, device and wall time (gpu-sweep-<date>.json).

Writes bench/results/gpu-check-<date>.md with the GPU's name, the date and the commit,
and prints it, and bench/results/gpu-<date>.json with the issues' figures (``summary``:
steps per model with and without the CUDA graph beside PyTorch eager and graphed, the conv
and GEMM figures, launch microseconds, reads per step, the epoch against 2 CPU threads). Steps that fail are recorded as failed; the script goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STEPS = ("tests", "train", "report", "speed", "host", "sweep")


def run(cmd: list[str], timeout: int, env=None) -> tuple[int, str, float]:
    """(exit code, output, seconds): the output is stdout, or stdout + stderr when the command
    failed. At the timeout the whole process group is killed (pytest-xdist's workers too, which
    would otherwise hold the pipes open), and the code is 124."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code, err = 124, f"{err}\ntimed out after {timeout} s"
    return code, out if code == 0 else f"{out}\n{err}", time.perf_counter() - t


def _read_json(path: Path):
    """The JSON a step wrote, or None where it wrote none (or was killed halfway through a write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def train(device: str, dataset: str, log: Path, data_dir: str | None, limit: int, env=None) -> dict:
    """One epoch of LeNet-5 through the CLI: exit code, wall seconds, the epoch's own training
    seconds and the test accuracy (from the run's log)."""
    cmd = [sys.executable, "-m", "cnn_numba", "train", "--device", device, "--dataset", dataset, "--epochs", "1",
           "--seed", "0", "--no-progress", "--log", str(log)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    code, out, secs = run(cmd, limit, env)
    res = {"device": device, "code": code, "seconds": secs, "last": tail(out, 1)}
    if code == 0 and log.exists():
        done = json.loads(log.read_text())
        res["test_acc"] = done["test"]["accuracy"]
        res["epoch_s"] = done["epochs"][0]["train_time_s"]
    return res


def _device_ratios(sweep: dict | None, time: str = "device_ms_min") -> tuple:
    """(geometric mean, worst) over the sweep's layer passes of the fastest CUDA algorithm's
    device time (or ``time``: ``wall_ms_min``) over cuDNN's: what 'auto' gets once its tuner
    has timed them all. A sweep cut short by its timeout gives the layers it reached."""
    if not sweep:
        return None, None
    ratios = []
    for layer, p in dict.fromkeys((r["layer"], r["pass"]) for r in sweep.get("conv", [])):
        rows = [r for r in sweep["conv"] if (r["layer"], r["pass"]) == (layer, p) and "error" not in r]
        ours = [r[time] for r in rows if r["kind"] == "algo"]
        cudnn = [r[time] for r in rows if r["kind"] == "cudnn"]
        if ours and cudnn:
            ratios.append(min(ours) / cudnn[0])
    if not ratios:
        return None, None
    return math.exp(sum(map(math.log, ratios)) / len(ratios)), max(ratios)


def _gemm_fraction(sweep: dict | None):
    """The sweep's fastest GEMM tile (device time) as a fraction of the GPU's FP32 peak, where
    the report step (the default tile) did not run."""
    rows = [r for r in (sweep or {}).get("gemm", []) if r.get("kind") == "tile" and "error" not in r]
    peak = (sweep or {}).get("device", {}).get("fp32_peak_tflops")
    if not rows or not peak:
        return None
    return max(2 * r["n"] ** 3 / (r["device_ms_min"] / 1e3) / 1e12 for r in rows) / peak


def summary(gpu: str, commit: str, today: str, parts: dict) -> dict:
    """bench/results/gpu-<date>.json: the issues' figures, from the steps' own JSON files
    (``parts``: speed, report, host, train, sweep), None where a step did not run."""
    speed, report, host, train_ = (parts.get(k) or {} for k in ("speed", "report", "host", "train"))
    out = {"gpu": gpu, "commit": commit, "date": today}
    for model in ("lenet5", "resnet20"):
        ms = speed.get(model, {})
        ours, eager, theirs, graph = (ms.get(k) for k in ("cnn_numba-graph", "cnn_numba", "torch", "torch-graph"))
        out.update({f"{model}_step_ms": ours, f"{model}_step_eager_ms": eager, f"{model}_step_torch_ms": theirs,
                    f"{model}_step_torch_graph_ms": graph,
                    f"{model}_step_ratio": ours / theirs if ours and theirs else None,
                    f"{model}_step_ratio_vs_torch_graph": ours / graph if ours and graph else None})
    out["conv_device_geomean_vs_cudnn"], out["conv_device_worst_vs_cudnn"] = _device_ratios(parts.get("sweep"))
    out["conv_wall_geomean_vs_cudnn"] = report.get("conv_wall_geomean_vs_cudnn",
                                                   _device_ratios(parts.get("sweep"), "wall_ms_min")[0])
    out["gemm_fraction_of_peak"] = report.get("gemm_fraction_of_peak", _gemm_fraction(parts.get("sweep")))
    out["launch_us"] = host.get("launch_us")
    out["syncs_per_step"] = host.get("syncs_per_step")
    out.update({k: v for k, v in host.items() if k not in out})
    out.update(train_)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="cnn_numba data directory (e.g. one holding mnist/ or fashion-mnist/)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to skip, of {STEPS}")
    ap.add_argument("--order", default=",".join(STEPS), help="the steps in the order to run them")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-k cuda -n 8'")
    ap.add_argument("--timeouts", default="", help="seconds per step, e.g. tests=150,report=90 (default 1800)")
    ap.add_argument("--reps", type=int, default=20, help="gpu_report.py --reps")
    ap.add_argument("--steps", type=int, default=60, help="train_speed.py --steps")
    ap.add_argument("--out", type=Path, help="also write the record here (rewritten after every step)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    limits = {k: int(v) for k, v in (kv.split("=") for kv in filter(None, args.timeouts.split(",")))}
    # the scripts import cnn_numba from this checkout, installed or not
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from gpu_report import device_facts
    from shapes import commit

    facts, today = device_facts(), datetime.date.today().isoformat()
    lines = [f"# GPU check, {facts['name']}, {today}, commit {commit()}", "",
             f"`python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`: {facts['name']}, "
             f"compute capability {facts['cc'][0]}.{facts['cc'][1]}, {facts['sms']} SMs.", ""]
    record = [RESULTS / f"gpu-check-{today}.md"] + ([args.out] if args.out else [])

    parts = {}

    def save():
        for path in record:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
        figures = summary(facts["name"], commit(), today, parts)
        (RESULTS / f"gpu-{today}.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")

    for step in filter(lambda s: s not in skip, args.order.split(",")):
        limit = limits.get(step, 1800)
        if step == "tests":
            code, out, secs = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   *args.pytest_args.split()], limit)
            lines += ["## Test suite on the GPU", "", f"`pytest {args.pytest_args}`: exit {code}, {secs:.0f} s:", "",
                      "```", tail(out, 40), "```", ""]
        elif step == "train":
            fashion = args.data_dir and (Path(args.data_dir) / "fashion-mnist").is_dir()
            dataset = "fashion-mnist" if fashion else "mnist"
            # The CPU side on 2 threads: the comparison is with a 2-core machine.
            runs = [train(dev, dataset, RESULTS / f"gpu-check-train-{dev}.json", args.data_dir, limit // 2,
                          env={"NUMBA_NUM_THREADS": "2"} if dev == "cpu" else None)
                    for dev in ("cuda", "cpu")]
            gpu_run, cpu_run = runs
            if "epoch_s" in gpu_run and "epoch_s" in cpu_run:
                parts["train"] = {"epoch_cuda_s": gpu_run["epoch_s"], "epoch_cpu2_s": cpu_run["epoch_s"],
                                  "epoch_speedup_vs_cpu2": cpu_run["epoch_s"] / gpu_run["epoch_s"],
                                  "epoch_wall_cuda_s": gpu_run["seconds"], "epoch_wall_cpu2_s": cpu_run["seconds"],
                                  "test_acc_cuda": gpu_run["test_acc"], "test_acc_cpu": cpu_run["test_acc"]}
            lines += [f"## LeNet-5, one epoch of {dataset}, seed 0 (CPU: 2 threads)", "",
                      "| device | exit | wall s | epoch s | test accuracy |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['device']} | {r['code']} | {r['seconds']:.1f} | {r.get('epoch_s', float('nan')):.1f} | "
                      f"{r.get('test_acc', float('nan')):.4f} |" for r in runs]
            accs = [r.get("test_acc") for r in runs]
            if None not in accs:
                lines += ["", f"GPU - CPU accuracy: {100 * (accs[0] - accs[1]):+.2f} points "
                              f"({'within' if abs(accs[0] - accs[1]) <= 0.01 else 'OUTSIDE'} the 1-point tolerance)"]
            lines += [""] + [f"    {r['device']}: {r['last']}" for r in runs if r["code"]] + [""]
        else:
            part = RESULTS / f"gpu-{step}-{today}.json"
            script = (["bench/gpu_report.py", "--reps", str(args.reps)] if step == "report" else
                      ["bench/gpu_host.py"] if step == "host" else
                      ["bench/gpu_sweep.py"] if step == "sweep" else
                      ["bench/train_speed.py", "--device", "cuda", "--steps", str(args.steps)])
            part.unlink(missing_ok=True)  # an earlier run's of the same day
            code, out, secs = run([sys.executable, *script, "--json", str(part)], limit)
            got = _read_json(part)  # the sweep rewrites its JSON after every case: a timed-out one keeps it
            if got is not None:
                parts[step] = got
            kept = " (its JSON as far as it got)" if got is not None and code else ""
            lines += [f"## {' '.join(script)}", "", f"exit {code}, {secs:.0f} s{kept}", "", tail(out, 60), ""]
        save()
        print("\n".join(lines), flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
