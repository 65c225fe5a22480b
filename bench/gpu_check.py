"""Everything a session with a lent GPU should run, in one command, recorded in one file.

    python bench/gpu_check.py [--data-dir DIR] [--skip tests,train,report,speed]

1. the whole test suite on the real GPU (tests/conftest.py uses the simulator only where
   no NVIDIA driver exists, so here every CUDA test runs on the device, at its full shapes);
2. a short LeNet-5 training run (Fashion-MNIST when ``--data-dir`` holds it, else the
   offline MNIST sample) on the GPU and on the CPU with the same seed: the test
   accuracies must agree within a point;
3. bench/gpu_report.py (conv layers vs cuDNN, the GEMM vs the FP32 peak);
4. bench/train_speed.py --device cuda (LeNet-5 b64, resnet20 b128 vs PyTorch).

Writes bench/results/gpu-check-<date>.md with the GPU's name, the date and the commit,
and prints it. Steps that fail are recorded as failed; the script goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STEPS = ("tests", "train", "report", "speed")


def run(cmd: list[str], timeout: int, env=None) -> tuple[int, str, float]:
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, out = 124, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    return code, out, time.perf_counter() - t


def tail(text: str, n: int) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def train(device: str, dataset: str, log: Path, data_dir: str | None) -> dict:
    cmd = [sys.executable, "-m", "cnn_numba", "train", "--device", device, "--dataset", dataset, "--epochs", "1",
           "--seed", "0", "--no-progress", "--log", str(log)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    code, out, secs = run(cmd, 900)
    res = {"device": device, "code": code, "seconds": secs, "last": tail(out, 1)}
    if code == 0 and log.exists():
        res["test_acc"] = json.loads(log.read_text())["test"]["accuracy"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="cnn_numba data directory (e.g. one holding fashion-mnist/)")
    ap.add_argument("--skip", default="", help=f"comma-separated steps to skip, of {STEPS}")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_report import commit, device_facts

    facts, today = device_facts(), datetime.date.today().isoformat()
    lines = [f"# GPU check, {facts['name']}, {today}, commit {commit()}", "",
             f"`python bench/gpu_check.py`: {facts['name']}, compute capability {facts['cc'][0]}.{facts['cc'][1]}, "
             f"{facts['sms']} SMs.", ""]

    if "tests" not in skip:
        code, out, secs = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], 1800)
        lines += ["## Test suite on the GPU", "", f"exit {code}, {secs:.0f} s:", "", "```", tail(out, 15), "```", ""]

    if "train" not in skip:
        fashion = args.data_dir and (Path(args.data_dir) / "fashion-mnist").is_dir()
        dataset = "fashion-mnist" if fashion else "mnist"
        runs = [train(dev, dataset, RESULTS / f"gpu-check-train-{dev}.json", args.data_dir) for dev in ("cuda", "cpu")]
        lines += [f"## LeNet-5, one epoch of {dataset}, seed 0", "", "| device | exit | seconds | test accuracy |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['device']} | {r['code']} | {r['seconds']:.1f} | {r.get('test_acc', float('nan')):.4f} |"
                  for r in runs]
        accs = [r.get("test_acc") for r in runs]
        if None not in accs:
            lines += ["", f"GPU - CPU accuracy: {100 * (accs[0] - accs[1]):+.2f} points "
                          f"({'within' if abs(accs[0] - accs[1]) <= 0.01 else 'OUTSIDE'} the 1-point tolerance)"]
        lines += [""] + [f"    {r['device']}: {r['last']}" for r in runs if r["code"]] + [""]

    for step, script in (("report", ["bench/gpu_report.py"]), ("speed", ["bench/train_speed.py", "--device", "cuda"])):
        if step not in skip:
            code, out, secs = run([sys.executable, *script], 1200)
            lines += [f"## {' '.join(script)}", "", f"exit {code}, {secs:.0f} s", "", tail(out, 40), ""]

    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"gpu-check-{today}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
