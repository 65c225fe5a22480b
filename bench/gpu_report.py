"""GPU report: every conv layer of the benchmark table (forward + both gradients) beside
PyTorch + cuDNN, and the tiled matrix product against the GPU's FP32 peak.

    python bench/gpu_report.py                 # print the markdown report
    python bench/gpu_report.py --save          # ... and write bench/results/gpu-<date>.md
    python bench/gpu_report.py --shapes big3x3,resnet_s1 --reps 10

Both sides compute float32: PyTorch runs with TF32 off (``torch.backends.cudnn.allow_tf32``
and ``torch.backends.cuda.matmul.allow_tf32`` False) and ``cudnn.benchmark`` on, so cuDNN
uses its fastest algorithm for each shape. Every case is called once untimed (Numba
compiles or loads its cache, cuDNN autotunes, outputs are checked against PyTorch's), then
``--reps`` times, each call closed by a device synchronisation; the median is kept.

FP32 peak = SMs x FP32 lanes per SM x 2 (a fused multiply-add) x the SM clock that the
driver reports (its maximum), with 128 lanes per SM on compute capability 8.6, 8.9 and 9.x
(e.g. H100 SXM: 132 SMs x 128 x 2 x 1.98 GHz = 66.9 TFLOP/s) and 64 on 7.x and 8.0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as S  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHECK_RTOL = 1e-3
GEMM_N = 4096
LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64}  # everything newer: 128


def device_facts() -> dict:
    from numba import config, cuda

    from cnn_numba.kernels.cuda.memory import install

    install()  # cnn_numba's caching allocator, before this call creates the CUDA context

    dev = cuda.get_current_device()
    if config.ENABLE_CUDASIM:  # a smoke test of the scripts
        return {"name": "Numba CUDA simulator", "cc": (0, 0), "sms": 1, "clock_ghz": 1.0, "fp32_peak_tflops": 1.0}
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = tuple(dev.compute_capability)
    sms, clock_khz = dev.MULTIPROCESSOR_COUNT, dev.CLOCK_RATE
    lanes = LANES_PER_SM.get(cc, 128)
    return {"name": name, "cc": cc, "sms": sms, "clock_ghz": clock_khz / 1e6,
            "fp32_peak_tflops": sms * lanes * 2 * clock_khz * 1e3 / 1e12}


def timed(fn, sync, reps: int):
    """(median seconds over ``reps`` synchronised calls, output of the untimed first call)."""
    out = fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def torch_cuda():
    """torch configured for a float32 comparison, or None without a CUDA build of PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch


def rel_err(out, ref) -> float:
    out, ref = S.as_numpy(out), S.as_numpy(ref)
    if out.shape != ref.shape:
        return math.inf
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def cuda_algos() -> tuple[str, ...]:
    """The CUDA table's algorithm names (kernels/cuda/conv.py), which differ from the CPU's."""
    from cnn_numba.backend import check_device, kernel
    check_device("cuda")
    return tuple(kernel("conv2d_algorithms", "cuda")().names)


def conv_rows(shapes, reps: int, torch) -> tuple[list[str], list[float]]:
    from numba import cuda

    rows, ratios = [], []
    for shape in shapes:
        host = S.conv_arrays(shape)
        dev = {k: cuda.to_device(v) for k, v in host.items()}
        for p in S.CONV_PASSES:
            ours = {algo: timed(S.numba_conv_pass(shape, p, algo, dev, "cuda"), cuda.synchronize, reps)
                    for algo in ("auto",) + cuda_algos()}
            theirs = None
            if torch is not None:
                theirs = timed(S.torch_conv_pass(shape, p, host, "cuda"), torch.cuda.synchronize, reps)
                bad = [a for a, (_, out) in ours.items() if rel_err(out, theirs[1]) > CHECK_RTOL]
            t_auto = ours["auto"][0]
            ratio = t_auto / theirs[0] if theirs else None
            if ratio:
                ratios.append(ratio)
            cudnn = f"{theirs[0] * 1e3:.3f} | {ratio:.2f}" if theirs else "— | —"
            check = f"✗ {', '.join(bad)} differ > {CHECK_RTOL}" if theirs and bad else ("ok" if theirs else "—")
            rows.append(f"| {shape.name} | {p} | {t_auto * 1e3:.3f} | "
                        + "".join(f"{ours[a][0] * 1e3:.3f} | " for a in cuda_algos()) + f"{cudnn} | "
                        f"{shape.flops / t_auto / 1e9:.0f} | {check} |")
            print(rows[-1], file=sys.stderr)
    return rows, ratios


def gemm_line(reps: int, torch, peak_tflops: float) -> tuple[str, float]:
    """(the report's GEMM line, our TFLOP/s as a fraction of the FP32 peak)."""
    from numba import cuda

    from cnn_numba.kernels.cuda import gemm

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((GEMM_N, GEMM_N), dtype=np.float32) for _ in range(2))
    da, db = cuda.to_device(a), cuda.to_device(b)
    dc = cuda.device_array((GEMM_N, GEMM_N), np.float32)
    t, _ = timed(lambda: gemm.matmul(da, db, dc), cuda.synchronize, reps)
    out = dc.copy_to_host()
    tflops = 2 * GEMM_N ** 3 / t / 1e12
    line = (f"GEMM {GEMM_N}^3 float32: {t * 1e3:.2f} ms = {tflops:.1f} TFLOP/s = "
            f"{100 * tflops / peak_tflops:.0f}% of the {peak_tflops:.1f} TFLOP/s FP32 peak")
    if torch is not None:
        ta, tb = torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda()
        tt, ref = timed(lambda: ta @ tb, torch.cuda.synchronize, reps)
        err = rel_err(out, ref)
        line += f"; cuBLAS (TF32 off) {2 * GEMM_N ** 3 / tt / 1e12:.1f} TFLOP/s; max rel. difference {err:.1e}"
    return line, tflops / peak_tflops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated conv shape names (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the summary figures here")
    args = ap.parse_args(argv)
    shapes = [S.CONV_BY_NAME[n] for n in args.shapes.split(",")] if args.shapes else S.CONV_SHAPES
    facts, torch = device_facts(), torch_cuda()
    rows, ratios = conv_rows(shapes, args.reps, torch)
    gemm, gemm_fraction = gemm_line(args.reps, torch, facts["fp32_peak_tflops"])
    today = datetime.date.today().isoformat()
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None
    lines = [f"# GPU report, {facts['name']}, {today}, commit {S.commit()}", "",
             f"{facts['name']} (compute capability {facts['cc'][0]}.{facts['cc'][1]}, {facts['sms']} SMs, "
             f"{facts['clock_ghz']:.2f} GHz, FP32 peak {facts['fp32_peak_tflops']:.1f} TFLOP/s); "
             f"torch {torch.__version__ + ' + cuDNN ' + str(torch.backends.cudnn.version()) if torch else 'absent'}, "
             f"TF32 off. `python bench/gpu_report.py --reps {args.reps}`, median of {args.reps} synchronised calls.",
             "", "| layer | pass | auto ms | " + "".join(f"{a} ms | " for a in cuda_algos())
             + "cuDNN ms | auto / cuDNN | GFLOP/s (auto) | vs cuDNN |",
             "|---|---|---:|" + "---:|" * len(cuda_algos()) + "---:|---:|---:|---|", *rows, "",
             f"Geometric mean of auto / cuDNN over {len(ratios)} passes: "
             + (f"**{geo:.2f}** (target <= 3.0)" if geo else "— (no CUDA PyTorch)"), "", gemm, ""]
    text = "\n".join(lines)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"conv_wall_geomean_vs_cudnn": geo, "gemm_fraction_of_peak": gemm_fraction,
                                         "conv_passes": len(ratios)}, indent=1) + "\n")
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"gpu-{today}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
