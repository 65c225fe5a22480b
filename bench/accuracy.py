"""Reruns the training runs whose test accuracy README quotes, and checks each figure.

    python bench/accuracy.py                  # the runs of a few minutes each (the defaults)
    python bench/accuracy.py --all            # also the long ones (resnet20: about an hour)
    python bench/accuracy.py --only mnist-1epoch fashion-10epochs --save
    python bench/accuracy.py --list           # names, commands, quoted figures

Each run is README's command as printed (``python -m cnn_numba train ...``, seed included),
run by this interpreter with ``--no-progress --log``. A run passes when its test accuracy is at
least ``floor`` (the target the figure was quoted against) and within ``TOLERANCE`` points of
the figure README quotes: the same seed on the same machine repeats a run exactly, but another
CPU, thread count or BLAS changes float32 sums, and so the last digits of the accuracy.
``--save`` keeps each log as ``bench/results/<name>-<date>.json``. Exit status 1 when a run
fails the check. ``tests/test_readme.py`` checks that README quotes these figures beside these
commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TOLERANCE = 0.35  # percentage points


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    command: str        # as README prints it
    quoted: float       # test accuracy in %, as README quotes it
    floor: float        # the target it must reach anyway
    record: str         # the bench/results log the figure comes from
    long: bool = False  # only with --all


RUNS = [
    Run("mnist-1epoch", "python -m cnn_numba train --epochs 1", 98.62, 98.0,
        "mnist-1epoch-2026-12-01.json"),
    Run("mnist-1epoch-seed1", "python -m cnn_numba train --epochs 1 --seed 1", 98.53, 98.0,
        "mnist-1epoch-seed1-2026-12-01.json"),
    Run("fashion-10epochs", "python -m cnn_numba train --dataset fashion-mnist --epochs 10", 91.30, 90.5,
        "fashion-10epochs-2026-12-01.json"),
    Run("mnist-10epochs-augment", "python -m cnn_numba train --epochs 10 --optimizer adam --lr 0.001 "
        "--schedule cosine --augment", 99.26, 99.0, "mnist-10epochs-augment-2026-12-01.json"),
    Run("fashion-resnet20", "python -m cnn_numba train --model resnet20 --dataset fashion-mnist --epochs 15 "
        "--batch-size 128 --optimizer sgd --lr 0.1 --weight-decay 5e-4 --schedule cosine --augment",
        93.88, 93.5, "fashion-mnist-resnet20-sgd-cosine-augment-2026-11-28.json", long=True),
]


def run_one(run: Run, log: Path) -> float:
    argv = shlex.split(run.command)
    assert argv[:3] == ["python", "-m", "cnn_numba"], run.command
    cmd = [sys.executable, *argv[1:], "--no-progress", "--log", str(log)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return 100 * json.loads(log.read_text())["test"]["accuracy"]


def check(run: Run, got: float) -> str | None:
    """None if the run reproduces the quoted figure, else what is wrong."""
    if got < run.floor:
        return f"{got:.2f}% is below the target {run.floor}%"
    if abs(got - run.quoted) > TOLERANCE:
        return f"{got:.2f}% is more than {TOLERANCE} points from README's {run.quoted:.2f}%"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also the long runs")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=[r.name for r in RUNS])
    ap.add_argument("--list", action="store_true", help="print the runs and exit")
    ap.add_argument("--save", action="store_true", help="keep the logs in bench/results")
    args = ap.parse_args(argv)
    runs = [r for r in RUNS if (r.name in args.only if args.only else args.all or not r.long)]
    if args.list:
        for r in RUNS:
            print(f"{r.name:24} {r.quoted:.2f}% (>= {r.floor}%){'  [--all]' if r.long else ''}\n    {r.command}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            print(f"== {r.name}: {r.command}", flush=True)
            start = time.perf_counter()
            log = (RESULTS / f"{r.name}-{datetime.date.today()}.json") if args.save else Path(tmp) / f"{r.name}.json"
            got = run_one(r, log)
            problem = check(r, got)
            failed += problem is not None
            print(f"== {r.name}: {got:.2f}% (README: {r.quoted:.2f}%) in {time.perf_counter() - start:.0f} s: "
                  f"{problem or 'ok'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
