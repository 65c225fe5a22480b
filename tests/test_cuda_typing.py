"""Every CUDA kernel signature the tests launched compiles as it would on a real GPU.

Numba's CUDA simulator (CI has no GPU) runs kernels as Python and never types them, so a
kernel can pass every simulated test and fail its first real launch with a TypingError.
conftest.py records each launch's signature under the simulator; the test here, moved to
the end of the run, types and lowers them all with numba-cuda's compiler (tests/cuda_typecheck.py,
in a subprocess without the simulator; no GPU or NVVM needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CUDA_SIMULATED, LAUNCHED

HERE = Path(__file__).resolve().parent
needs_simulator = pytest.mark.skipif(not CUDA_SIMULATED, reason="on a real GPU every launch compiles anyway")


def _env_without_simulator() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
    return env


def _run_without_simulator(snippet: str):
    """Run ``snippet`` (tests/ is its argv[1]) in a process with numba-cuda's real driver
    layer (no GPU needed for what the snippets do); it must succeed."""
    done = subprocess.run([sys.executable, "-c", snippet, str(HERE)], env=_env_without_simulator(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def typecheck(entries, tmp_path):
    path = tmp_path / "launched.json"
    path.write_text(json.dumps(sorted(entries)))
    if os.environ.get("CNN_NUMBA_LAUNCHED_JSON"):  # kept for bench/ptx_check.py --launched
        Path(os.environ["CNN_NUMBA_LAUNCHED_JSON"]).write_text(path.read_text())
    done = subprocess.run([sys.executable, str(HERE / "cuda_typecheck.py"), str(path)], env=_env_without_simulator(),
                          capture_output=True, text=True, timeout=900)
    if done.returncode == 2:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    return done.returncode, done.stdout + done.stderr


def _correlate_entry(bias_ndim):
    """The direct conv kernel's float32 signature, its bias placeholder of ``bias_ndim`` dims."""
    a4 = ["array", "<f4", 4, "C"]
    # then 23 ints: stride, padding, dilation, taps, first taps, tap steps, dst's phases and this
    # launch's phase (2 each), groups, the tile (4), flip, has_bias; then the epilogue: ep (3, CO)
    # and the relu flag
    args = [a4, a4, ["array", "<f4", bias_ndim, "C"], a4] + [["scalar", "<i8"]] * 23 + [
        ["array", "<f4", 2, "C"], ["scalar", "<i8"]]
    return ("cnn_numba.kernels.cuda.conv", "_correlate", json.dumps(args))


@needs_simulator
def test_typecheck_catches_what_the_simulator_cannot(tmp_path):
    # A 4-d placeholder for the unused bias ran on the simulator and failed on the H200:
    # ``acc[c, u] = b[d0 + c]`` types as storing a 3-d array into one element.
    code, out = typecheck([_correlate_entry(4)], tmp_path)
    assert code == 1 and "TypingError" in out and "_correlate" in out, out
    code, out = typecheck([_correlate_entry(1)], tmp_path)
    assert code == 0, out


@needs_simulator
@pytest.mark.after_all
def test_every_launched_kernel_compiles_for_a_real_gpu(tmp_path):
    if not LAUNCHED:
        pytest.skip("no CUDA kernel was launched before this test in this run")
    code, out = typecheck(LAUNCHED, tmp_path)
    assert code == 0, out


def test_lean_launch_packs_as_numba_does(tmp_path):
    """kernels/cuda/lean.py packs each argument as numba-cuda's launch does: arrays (C-contiguous
    or strided), scalars of each dtype, nested tuples; and the comparison notices a difference
    (here a float32 packed as a double)."""
    snippet = """
import json, sys
sys.path.insert(0, sys.argv[1])
import cuda_typecheck as T
from cnn_numba.kernels.cuda import lean
descs = [["array", "<f4", 4, "C"], ["array", "<f8", 2, "A"], ["array", "<i8", 1, "C"], ["scalar", "<f4"],
         ["scalar", "<f8"], ["scalar", "<i8"], ["scalar", "|b1"], ["tuple", [["scalar", "<i8"], ["scalar", "<i8"]]],
         ["tuple", [["array", "<f4", 1, "C"], ["tuple", [["scalar", "<i4"]]]]]]
good = T.lean_packing_differs(T.signature(descs), descs)
import ctypes
from numba.core import types
inner = lean.packer
lean.packer = lambda t: (lambda out, v: out.append(ctypes.c_double(v))) if t == types.float32 else inner(t)
bad = T.lean_packing_differs(T.signature(descs), descs)
print(json.dumps([good, bad]))
"""
    done = _run_without_simulator(snippet)
    good, bad = json.loads(done.stdout.strip().splitlines()[-1])
    assert good is None
    assert bad and "c_double" in bad


def test_lean_launch_plans_once_then_launches_packed(tmp_path):
    """kernels/cuda/lean.launch with a stand-in kernel and cuda.core launch: the first call of
    a signature goes through Numba's launch and makes a plan; later calls of that signature
    skip Numba and hand cuda.core the packed arguments; another signature gets its own plan;
    a kernel whose overload cannot be planned (internals missing) stays on Numba's path with a
    warning instead of failing."""
    snippet = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import numpy as np
import cuda_typecheck as T
from numba.cuda.dispatcher import _Kernel
from cnn_numba.kernels.cuda import lean

log = []

class Overload:
    debug = cooperative = False
    extensions = []
    _prepare_args = _Kernel._prepare_args
    def __init__(self, types):
        self.argument_types = types
        self._codelibrary = type("L", (), {"get_cufunc": lambda s: type("F", (), {"kernel": "fn"})()})()

class Kernel:
    py_func = type("P", (), {"__name__": "k"})
    def __init__(self, broken=False):
        self.overloads, self.broken = {}, broken
    def typeof_pyval(self, a):
        from numba.core.typing.typeof import typeof, Purpose
        return typeof(a, Purpose.argument)
    def __getitem__(self, config):
        def run(*args):
            types = tuple(self.typeof_pyval(a) for a in args)
            self.overloads[types] = ov = Overload(types)
            if self.broken:
                del ov._codelibrary  # as if numba-cuda had moved it
            log.append(("numba", config))
        return run

lean._core = (lambda stream, config, fn, *args: log.append(("lean", config, fn, len(args))), "stream")
lean._configs[(4, 32)] = "cfg"
a = T.example(["array", "<f4", 2, "C"], 0)
k = Kernel()
for v in (np.float32(1), np.float32(2), 3):
    lean.launch(k, 4, 32, (a, v))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    b = Kernel(broken=True)
    lean.launch(b, 4, 32, (a, 1.5))
    lean.launch(b, 4, 32, (a, 1.5))
print(json.dumps([log, [str(x.message) for x in w]]))
"""
    done = _run_without_simulator(snippet)
    log, warned = json.loads(done.stdout.strip().splitlines()[-1])
    # float32 twice (Numba, then lean: the 2-D array's 9 words + the scalar), an int: Numba again
    assert log[:3] == [["numba", [4, 32]], ["lean", "cfg", "fn", 10], ["numba", [4, 32]]]
    assert log[3:] == [["numba", [4, 32]], ["numba", [4, 32]]]  # the unplannable kernel, both times Numba's
    assert len(warned) == 1 and "keeps Numba's own launch" in warned[0]
