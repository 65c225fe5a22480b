"""bench/gpu_check.py, the one command a session with a lent GPU runs (issues 11 and 12): its
orchestration, checked here with each step's command faked (the real steps need a GPU). The
exact arguments of the prepared GPU-session command (bench/README.md, "On a GPU") parse, every
step gets its own timeout, and the record's figures come from the steps' JSON, including a
sweep that its timeout cut short (it rewrites its JSON after every case: what it measured
counts) and a stale JSON of an earlier run that day (which must not)."""
from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"

def _session_args() -> list[str]:
    """The arguments of the GPU session's command in bench/README.md ("On a GPU"), but --out."""
    text = (BENCH / "README.md").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("python bench/gpu_check.py") and "--order" in ln)
    args = shlex.split(line.split(";")[0])[2:]
    i = args.index("--out")
    return args[:i] + args[i + 2:]


ARGS = _session_args()


def _sweep_cut_short():
    """What gpu_sweep.py's JSON holds when its timeout stops it during the second layer."""
    def row(layer, p, kind, algo, device, wall, **kw):
        return {"layer": layer, "pass": p, "kind": kind, "algo": algo, "device_ms_min": device,
                "wall_ms_min": wall, **kw}
    conv = [row("big3x3", "fwd", "algo", "direct", 2.0, 3.0), row("big3x3", "fwd", "algo", "implicit_gemm", 1.0, 1.5),
            row("big3x3", "fwd", "tile", "implicit_gemm", 0.9, 1.4, tile="128x128x8_8x8"),
            row("big3x3", "fwd", "cudnn", "cudnn", 0.5, 0.5),
            row("big3x3", "gx", "algo", "direct", 4.0, 4.0), row("big3x3", "gx", "cudnn", "cudnn", 1.0, 2.0),
            row("resnet_s1", "fwd", "algo", "direct", 1.0, 1.0)]  # cut before its cuDNN row
    n = 4096
    gemm = [{"n": n, "kind": "cublas", "device_ms_min": 3.0},
            {"n": n, "kind": "tile", "tile": "128x128x8_8x8", "device_ms_min": 2 * n ** 3 / 40e12 * 1e3}]
    return {"device": {"fp32_peak_tflops": 80.0}, "conv": conv, "gemm": gemm}


def test_gpu_session_command_records_every_step(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    import gpu_check

    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path)
    today = datetime.date.today().isoformat()
    (tmp_path / f"gpu-speed-{today}.json").write_text(json.dumps({"lenet5": {"torch": 1e9}}))  # stale
    calls = []

    def fake_run(cmd, timeout, env=None):
        calls.append((cmd, timeout))
        if "pytest" in cmd:
            return 0, "12 passed", 1.0
        if "train" in cmd:  # the CLI's epoch, its log written as train does
            log = Path(cmd[cmd.index("--log") + 1])
            gpu = "cuda" in cmd
            log.write_text(json.dumps({"test": {"accuracy": 0.9 if gpu else 0.905},
                                       "epochs": [{"train_time_s": 2.0 if gpu else 20.0}]}))
            return 0, "test accuracy: 90%", 3.0
        part, script = Path(cmd[cmd.index("--json") + 1]), Path(cmd[1]).name
        if script == "gpu_host.py":
            part.write_text(json.dumps({"launch_us": 4.5, "syncs_per_step": 0}))
        elif script == "train_speed.py":
            part.write_text(json.dumps({m: {"cnn_numba-graph": 2.0, "cnn_numba": 3.0, "torch": 4.0, "torch-graph": 1.0}
                                        for m in ("lenet5", "resnet20")}))
        elif script == "gpu_sweep.py":
            part.write_text(json.dumps(_sweep_cut_short()))
            return 124, f"timed out after {timeout} s", float(timeout)
        return 0, "done", 1.0

    monkeypatch.setattr(gpu_check, "run", fake_run)
    assert gpu_check.main(ARGS + ["--out", str(tmp_path / "gpu-check.md")]) == 0

    steps = ["pytest" if "pytest" in cmd else next((Path(a).name for a in cmd if a.endswith(".py")), cmd[2])
             for cmd, _ in calls]
    order = ARGS[ARGS.index("--order") + 1].split(",")
    limits = dict(kv.split("=") for kv in ARGS[ARGS.index("--timeouts") + 1].split(","))
    assert set(order) == {"host", "tests", "speed", "sweep", "train"} and set(limits) == set(order)
    script = {"host": ["gpu_host.py"], "tests": ["pytest"], "speed": ["train_speed.py"], "sweep": ["gpu_sweep.py"],
              "train": ["cnn_numba", "cnn_numba"]}  # train: an epoch on the GPU, one on the CPU
    assert steps == [name for step in order for name in script[step]]
    assert [t for _, t in calls] == [int(limits[step]) // (2 if step == "train" else 1)  # the epochs share it
                                     for step in order for _ in script[step]]
    pytest_args = ARGS[ARGS.index("--pytest-args") + 1].split()
    tests, speed = (calls[steps.index(name)][0] for name in ("pytest", "train_speed.py"))
    assert tests[-len(pytest_args):] == pytest_args
    assert speed[speed.index("--steps") + 1] == ARGS[ARGS.index("--steps") + 1]

    fig = json.loads((tmp_path / f"gpu-{today}.json").read_text())
    assert fig["gpu"] == "Numba CUDA simulator" and fig["launch_us"] == 4.5 and fig["syncs_per_step"] == 0
    assert fig["lenet5_step_ratio"] == pytest.approx(0.5) and fig["resnet20_step_ratio_vs_torch_graph"] == 2.0
    # the cut sweep: big3x3's two passes (fwd 1.0 / 0.5, gx 4.0 / 1.0), not resnet_s1 (no cuDNN row)
    assert fig["conv_device_geomean_vs_cudnn"] == pytest.approx(8 ** 0.5)
    assert fig["conv_device_worst_vs_cudnn"] == pytest.approx(4.0)
    assert fig["conv_wall_geomean_vs_cudnn"] == pytest.approx((1.5 / 0.5 * 4.0 / 2.0) ** 0.5)
    assert fig["gemm_fraction_of_peak"] == pytest.approx(0.5)
    assert fig["epoch_speedup_vs_cpu2"] == pytest.approx(10.0)
    md = (tmp_path / "gpu-check.md").read_text()
    assert md == (tmp_path / f"gpu-check-{today}.md").read_text()
    assert f"exit 124, {limits['sweep']} s (its JSON as far as it got)" in md and "within the 1-point tolerance" in md
