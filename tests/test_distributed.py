"""cnn_numba.distributed on 2 ranks over loopback (``mpiexec -n 2`` subprocesses of this Python),
checked against numpy; and the trainer under MPI against one process.

Skipped with the reason when mpi4py or mpiexec is missing (pip install 'cnn_numba[distributed]').
Every launch has a bounded timeout, so a hang fails the test instead of stalling the suite.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cnn_numba import distributed as dist

MPIEXEC = dist.find_mpiexec()
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="needs mpi4py and mpiexec: pip install 'cnn_numba[distributed]'")
ROOT = Path(__file__).resolve().parents[1]


def mpirun(n: int, args: list[str], timeout: float, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``mpiexec -n n python args...`` with this repository on PYTHONPATH and 1 Numba thread per rank."""
    base = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # conftest's, for CUDA tests
    env = {**base, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NUMBA_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def run_script(tmp_path, body: str, n: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    proc = mpirun(n, [str(script)], timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# ----------------------------------------------------------------------------- one process

def test_world_of_one_without_launcher(monkeypatch):
    for k in dist.LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    assert not dist.launched_by_mpi()
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    a = np.arange(6, dtype=np.float64)
    assert dist.all_reduce(a, "mean") is a and np.array_equal(a, np.arange(6))
    dist.barrier()


@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_all_reduce_rejects_bad_input(op):
    with pytest.raises(ValueError, match="C-contiguous"):
        dist.all_reduce(np.zeros((4, 4), np.float32)[:, ::2], op)
    with pytest.raises(TypeError, match="float16"):
        dist.all_reduce(np.zeros(3, np.float16), op)
    with pytest.raises(ValueError, match="op must be"):
        dist.all_reduce(np.zeros(3), "prod")
    with pytest.raises(TypeError, match="numpy array"):
        dist.all_reduce([1.0, 2.0], op)
    with pytest.raises(TypeError, match="int64"):
        dist.all_reduce(np.zeros(3, np.int64), "mean")


@pytest.mark.parametrize("n, size", [(10, 3), (2, 4), (64, 2), (0, 2), (7, 1)])
def test_shard_partitions_like_array_split(n, size):
    parts = [np.arange(n)[dist.shard(n, r, size)] for r in range(size)]
    expected = np.array_split(np.arange(n), size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected))


def test_buckets_cap_and_order():
    from cnn_numba import nn
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 10))  # 90,000 and 3,000 values
    params = list(model.parameters())
    buckets = dist.make_buckets(params, cap_mb=0.2)  # 0.2 MB = 52,428 float32
    flat = [p for b in buckets for p in b.params]
    assert [id(p) for p in flat] == [id(p) for p in reversed(params)]
    assert all(b.buffer.nbytes <= 0.2 * 2**20 or len(b.params) == 1 for b in buckets)
    assert [len(b.params) for b in buckets] == [3, 1]  # 300 + 3000 + 300 floats, then the 90,000 alone


# ----------------------------------------------------------------------------- two ranks

@needs_mpi
def test_collectives_against_numpy(tmp_path):
    run_script(tmp_path, """
        import numpy as np
        from cnn_numba import distributed as dist
        dist.init()
        r, n = dist.rank(), dist.world_size()
        out = {}
        for dtype in (np.float32, np.float64):
            for op in ("sum", "mean", "max"):
                a = np.random.default_rng(r).standard_normal((5, 3)).astype(dtype)
                out[f"{op}_{np.dtype(dtype).name}"] = dist.all_reduce(a, op).copy()
        # a strided view is refused on every rank alike (nothing was sent, so no rank waits)
        try:
            dist.all_reduce(np.zeros((4, 4))[:, ::2])
            out["rejected"] = np.array(False)
        except ValueError:
            out["rejected"] = np.array(True)
        b = np.full(4, r + 1.5, np.float32)
        out["bcast"] = dist.broadcast(b, root=1).copy()
        counts = np.array([r + 1, 10 * r], np.int64)
        out["counts"] = dist.all_reduce(counts).copy()
        out["size"] = np.array(n)
        dist.barrier()
        np.savez(f"rank{r}.npz", **out)
    """)
    inputs = [np.random.default_rng(r).standard_normal((5, 3)) for r in range(2)]
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert got["size"] == 2 and got["rejected"]
        for dtype, rtol in ((np.float32, 1e-6), (np.float64, 1e-15)):
            x = [a.astype(dtype) for a in inputs]
            name = np.dtype(dtype).name
            for op, ref in (("sum", x[0] + x[1]), ("mean", (x[0] + x[1]) / 2), ("max", np.maximum(x[0], x[1]))):
                assert got[f"{op}_{name}"].dtype == dtype
                np.testing.assert_allclose(got[f"{op}_{name}"], ref, rtol=rtol, atol=0)
        np.testing.assert_array_equal(got["bcast"], np.full(4, 2.5, np.float32))
        np.testing.assert_array_equal(got["counts"], [3, 10])


@needs_mpi
def test_ddp_broadcasts_weights_and_averages_gradients(tmp_path):
    # Each rank builds the model with a different seed: after wrapping, rank 1 holds rank 0's
    # weights; the reduced gradient is the mean of the ranks' gradients (float64 references below).
    run_script(tmp_path, """
        import numpy as np
        from cnn_numba import distributed as dist, nn, tensor
        from cnn_numba import random
        import cnn_numba.functional as F
        dist.init()
        r = dist.rank()
        random.manual_seed(100 + r)
        model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3)).double()
        before = {k: v.copy() for k, v in model.state_dict().items()}
        ddp = dist.DistributedDataParallel(model, bucket_cap_mb=1e-4)  # 104 bytes: several buckets
        after = {k: v.copy() for k, v in model.state_dict().items()}
        x = np.random.default_rng(r).standard_normal((4, 7))
        loss = F.cross_entropy(ddp(tensor(x)), np.array([0, 1, 2, r]))
        loss.backward()
        local = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        ddp.reduce_gradients()
        reduced = {k: p.grad.numpy().copy() for k, p in model.named_parameters()}
        np.savez(f"rank{r}.npz", **{f"before/{k}": v for k, v in before.items()},
                 **{f"after/{k}": v for k, v in after.items()}, **{f"local/{k}": v for k, v in local.items()},
                 **{f"reduced/{k}": v for k, v in reduced.items()}, buckets=len(ddp._ddp_buckets))
    """)
    z = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    names = [k[len("after/"):] for k in z[0] if k.startswith("after/")]
    assert int(z[0]["buckets"]) > 1
    assert not np.array_equal(z[0]["before/0.weight"], z[1]["before/0.weight"])
    for k in names:
        np.testing.assert_array_equal(z[1][f"after/{k}"], z[0][f"before/{k}"])
        np.testing.assert_array_equal(z[0][f"after/{k}"], z[0][f"before/{k}"])
    for k in (k for k in names if "weight" in k or "bias" in k):
        mean = (z[0][f"local/{k}"] + z[1][f"local/{k}"]) / 2
        assert not np.allclose(z[0][f"local/{k}"], z[1][f"local/{k}"])
        for r in range(2):
            np.testing.assert_allclose(z[r][f"reduced/{k}"], mean, rtol=1e-14, atol=1e-17)
