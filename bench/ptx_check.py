"""Compile CUDA kernels to PTX and SASS without a GPU: register use, local memory, spills,
and float64 instructions in float32 kernels (issue 12).

    python bench/ptx_check.py                        # the conv and GEMM kernels, every tile
    python bench/ptx_check.py --launched L.json      # the signatures a test run launched
    python bench/ptx_check.py --json out.json --cc 9.0

It needs NVIDIA's NVVM, NVRTC and ptxas, which pip's numba-cuda does not bring; a scratch
virtualenv that sees the project's venv holds them (bench/README.md, "PTX without a GPU"):

    python -m venv /tmp/ptxvenv
    /tmp/ptxvenv/bin/pip install nvidia-nvvm nvidia-cuda-nvcc nvidia-cuda-nvrtc  # 13.x, as cuda-bindings
    echo "import site; site.addsitedir('$VENV/lib/python3.11/site-packages')" \
        > /tmp/ptxvenv/lib/python3.11/site-packages/zz_project.pth
    PYTHONPATH=$PWD /tmp/ptxvenv/bin/python bench/ptx_check.py

Signatures: by default a child process runs the table's layers of bench/gpu_sweep.py's tiny
shapes through every CUDA conv algorithm, and a small matmul, under Numba's CUDA simulator,
recording each launch's argument types (tests/cuda_typecheck.py's ``describe``); the tile
kernels (gemm.py's ``_<kind>_<tile>``) are then compiled for every real tile of
gemm.CANDIDATES that fits its dtype (``Tile.fits``), not the simulator's. ``--launched``
takes a file of the same entries instead (tests/test_cuda_typing.py writes the suite's to
$CNN_NUMBA_LAUNCHED_JSON).

Per kernel and signature: registers, stack frame bytes (local memory: a local array the
compiler could not keep in registers), spill stores and loads, the number of PTX
instructions on .f64 operands, and of 128-bit global loads (``ld.global[.nc].v4.f32`` /
``.v2.f64``). A float32 kernel (no float64 array argument) with any .f64 instruction is
reported: it computes in double precision somewhere (a Python float constant, a
float64 scalar), which runs at 1/64 of the FP32 rate on most GPUs. So is a vectorised tile
kernel (``_v4``) of a kind with an operand staged in runs (gemm.py's ``vec_operands``)
without a 128-bit load (NOVEC: the vector path compiled away or was never built). Exit
status 1 if any is reported, or a kernel spills; 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import types as pytypes
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

F64 = re.compile(r"^\s*(?!//)\S*\.f64\b", re.M)  # an instruction on .f64 operands (not a comment)
V128 = re.compile(r"\bld\.global(?:\.nc)?\.v(?:4\.f32|2\.f64)\b")  # a 128-bit global load


def record_signatures(path: Path) -> None:
    """Run the tiny conv layers and a matmul under the simulator, writing the launched
    (module, kernel, argument descriptors) entries to ``path`` (in this process: the
    simulator must be on before numba is imported, so the caller runs this in a child)."""
    import numpy as np
    from numba import cuda

    import gpu_sweep
    import shapes as S
    from cnn_numba.backend import kernel
    from cnn_numba.kernels.cuda import gemm, launch
    from cuda_typecheck import describe

    seen = set()
    launch.record = lambda k, args: seen.add((k.fn.__module__, k.fn.__qualname__,
                                              json.dumps([describe(a) for a in args])))
    table = kernel("conv2d_algorithms", "cuda")()
    for shape in gpu_sweep.TINY_SHAPES:
        dev = {k: cuda.to_device(v) for k, v in S.conv_arrays(shape).items()}
        for p in S.CONV_PASSES:
            for algo in table.names:
                S.numba_conv_pass(shape, p, algo, dev, "cuda")()
    for dtype in (np.float32, np.float64):
        a = cuda.to_device(np.ones((5, 7), dtype))
        gemm.matmul(a, a, cuda.device_array((5, 5), dtype), trans_b=True)
    path.write_text(json.dumps(sorted(seen)))


def tile_kind(module: str, name: str):
    """(kind, tile) of a gemm.py tile kernel ``_<kind>_<tile name>``, else None."""
    from cnn_numba.kernels.cuda import gemm

    if not module.endswith(".gemm"):
        return None
    for k in gemm.KINDS:
        if name.startswith(f"_{k}_") and name[len(k) + 2:][:1].isdigit():
            return k, gemm.Tile.parse(name[len(k) + 2:])
    return None


def expand_tiles(entries):
    """Each gemm.py tile kernel once per real candidate tile (the simulator launched its own)."""
    from cnn_numba.kernels.cuda import gemm

    out = []
    for module, name, descs in entries:
        kind = (tile_kind(module, name) or (None,))[0]
        dtype = next(d[1] for d in json.loads(descs) if d[0] == "array")
        names = [name] if kind is None else [f"_{kind}_{t.name}" for t in gemm.CANDIDATES if t.fits(dtype)]
        out += [(module, n, descs) for n in names]
    return sorted(set(out))


def ptxas_stats(ptx: str, ptxas: str, arch: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, f"-arch={arch}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode:
        return {"ptxas_error": text[-2000:]}

    def total(pattern):
        return sum(int(v) for v in re.findall(pattern, text))

    regs = [int(v) for v in re.findall(r"Used (\d+) registers", text)]
    return {"registers": max(regs, default=0), "stack_bytes": total(r"(\d+) bytes stack frame"),
            "spill_stores": total(r"(\d+) bytes spill stores"), "spill_loads": total(r"(\d+) bytes spill loads")}


def find_ptxas() -> str | None:
    for base in map(Path, sys.path):
        cand = base / "nvidia" / "cu13" / "bin" / "ptxas"
        if cand.is_file():
            return str(cand)
    return next((str(Path(p) / "ptxas") for p in os.environ.get("PATH", "").split(os.pathsep)
                 if (Path(p) / "ptxas").is_file()), None)


def check(entries, cc, ptxas):
    import importlib

    from numba import cuda
    from numba.cuda import dispatcher

    from cnn_numba.kernels.cuda import gemm
    from cuda_typecheck import signature

    # Device functions ask the current device for its compute capability while compiling.
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)
    rows = []
    for module, name, descs in entries:
        descs = json.loads(descs)
        row = {"kernel": f"{module.rsplit('.', 1)[-1]}.{name}",
               "dtypes": sorted({d[1] for d in descs if d[0] == "array"})}
        try:
            fn = getattr(importlib.import_module(module), name).py_func
            ptx, _ = cuda.compile_ptx(fn, signature(descs), cc=cc)
        except Exception as e:  # noqa: BLE001 (report it, go on)
            row["error"] = f"{type(e).__name__}: {str(e)[-500:]}"
            rows.append(row)
            continue
        row["f64_instructions"] = len(F64.findall(ptx))
        row["v128_loads"] = len(V128.findall(ptx))
        kt = tile_kind(module, name)
        row["expects_v128"] = bool(kt and any(gemm.vec_operands(*kt)))
        row["s64_divisions"] = len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx))
        if ptxas:
            row.update(ptxas_stats(ptx, ptxas, f"sm_{cc[0]}{cc[1]}"))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--launched", type=Path, help="launched signatures (default: record the conv and GEMM ones)")
    ap.add_argument("--cc", default="9.0", help="compute capability compiled for")
    ap.add_argument("--ptxas", help="ptxas binary (default: the scratch venv's nvidia/cu13/bin/ptxas, or PATH)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = ap.parse_args(argv)
    if args.record:
        record_signatures(args.record)
        return 0
    launched = args.launched
    if launched is None:
        launched = Path(tempfile.mkdtemp()) / "launched.json"
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
        subprocess.run([sys.executable, __file__, "--record", str(launched)], env=env, check=True)
    entries = expand_tiles(json.loads(launched.read_text()))
    cc = tuple(int(v) for v in args.cc.split("."))
    rows = check(entries, cc, args.ptxas or find_ptxas())
    bad = []
    for r in rows:
        f32 = "<f8" not in r["dtypes"]
        flag = ("ERROR" if "error" in r or "ptxas_error" in r else
                "F64" if f32 and r["f64_instructions"] else
                "NOVEC" if r["expects_v128"] and not r["v128_loads"] else
                "SPILL" if r.get("spill_stores") or r.get("spill_loads") else "")
        if flag:
            bad.append(r)
        print(f"{flag or 'ok':5} {r['kernel']:40} {'/'.join(r['dtypes']):8} regs {r.get('registers', '?'):>3} "
              f"stack {r.get('stack_bytes', '?'):>4} spills {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} "
              f"f64 {r.get('f64_instructions', '?'):>3} div64 {r.get('s64_divisions', '?'):>3} "
              f"v128 {r.get('v128_loads', '?'):>2}"
              + (f"  {r.get('error') or r.get('ptxas_error')}" if flag == "ERROR" else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{len(rows)} kernels compiled for sm_{cc[0]}{cc[1]}; {len(bad)} flagged")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
