"""cnn_numba.distributed on 2 ranks over loopback (``mpiexec -n 2`` subprocesses of this Python),
checked against numpy; and the trainer under MPI against one process.

Skipped with the reason when mpi4py or mpiexec is missing (pip install 'cnn_numba[distributed]').
Every launch has a bounded timeout, so a hang fails the test instead of stalling the suite.
"""
from __future__ import annotations

import importlib.util
import json
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


def run_script(tmp_path, body: str, n: int = 2, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(body))
    proc = mpirun(n, [str(script)], timeout, cwd=tmp_path, env=env)
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
        out["local"] = np.array(dist.local_size())
        out["threads"] = np.array(dist.set_threads_per_rank())  # NUMBA_NUM_THREADS=4 over 2 local ranks
        dist.barrier()
        np.savez(f"rank{r}.npz", **out)
    """, env={"NUMBA_NUM_THREADS": "4"})
    inputs = [np.random.default_rng(r).standard_normal((5, 3)) for r in range(2)]
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npz")
        assert got["size"] == 2 and got["rejected"] and got["local"] == 2 and got["threads"] == 2
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


# ----------------------------------------------------------------------------- the trainer

RUN_TIMEOUT = 300  # seconds per launch: compiles come from Numba's cache, but the machine is shared


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from test_train import fixture_digits, write_dataset  # the same small data folder as test_train.py
    return write_dataset(tmp_path_factory.mktemp("data"), *fixture_digits())


def train_args(data_dir, folder, *extra) -> list[str]:
    return ["-m", "cnn_numba", "train", "--data-dir", str(data_dir), "--checkpoint", str(folder), "--no-progress",
            *map(str, extra)]


def one_process(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM" and k not in dist.LAUNCH_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), NUMBA_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)


def weights(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k.startswith(("model/", "optimizer/"))}


def assert_same_run(a, b, rtol):
    """Each weight of checkpoint a within rtol of b's, relative to b's largest magnitude; the
    optimiser state (a running sum of gradients, whose summation order differs) within 10 rtol."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wb:
        scale = max(np.abs(wb[k]).max(), np.finfo(np.float32).tiny)
        tol = rtol if k.startswith("model/") else 10 * rtol
        assert np.abs(wa[k] - wb[k]).max() <= tol * scale, (k, np.abs(wa[k] - wb[k]).max() / scale)


# 393 images, global batch 64: 7 steps per epoch, the last of 9 images (shares 5 and 4), so the
# share weighting b_r N / B matters; 3 epochs = 21 steps.
LENET = ["--model", "lenet5", "--limit", 393, "--batch-size", 64, "--val-fraction", 0]


@pytest.fixture(scope="module")
def lenet_one_process(data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    proc = one_process(train_args(data_dir, folder, *LENET, "--epochs", 3))
    assert proc.returncode == 0, proc.stderr
    return folder


@needs_mpi
def test_two_ranks_train_like_one_process(data_dir, tmp_path, lenet_one_process):
    proc = one_process(train_args(data_dir, tmp_path, *LENET, "--epochs", 3, "--nproc", 2))  # starts mpiexec
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("test accuracy:") == 1 and "2 ranks x 1 threads" in proc.stdout  # rank 0 alone prints
    assert_same_run(tmp_path / "epoch_003.npz", lenet_one_process / "epoch_003.npz", rtol=1e-5)
    log = json.loads((tmp_path / "log.json").read_text())
    one = json.loads((lenet_one_process / "log.json").read_text())
    assert log["world_size"] == 2 and one["world_size"] == 1
    assert log["test"]["accuracy"] == one["test"]["accuracy"]  # the test split shared out, counts summed
    np.testing.assert_allclose([e["train_loss"] for e in log["epochs"]], [e["train_loss"] for e in one["epochs"]],
                               rtol=1e-5)


@needs_mpi
def test_resume_with_another_world_size(data_dir, tmp_path, lenet_one_process):
    # The default schedule (1cycle) spans --epochs: the 2-rank run is planned for 3 epochs and
    # cut after 2 by removing its last checkpoint, as if it had been stopped there.
    proc = mpirun(2, train_args(data_dir, tmp_path, *LENET, "--epochs", 3), RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "epoch_003.npz").unlink()
    proc = one_process(train_args(data_dir, tmp_path, "--resume", "--epochs", 3))
    assert proc.returncode == 0, proc.stderr
    assert_same_run(tmp_path / "epoch_003.npz", lenet_one_process / "epoch_003.npz", rtol=1e-5)


@needs_mpi
def test_sync_bn_equals_one_process(data_dir, tmp_path, monkeypatch):
    # Winograd off (kernels/conv_winograd.enabled): its rounding depends on how the batch is
    # blocked, and this step turns 3e-6 of noise on resnet8's 64-channel conv into 5e-3 of
    # a batch-norm bias, far above the 1e-5 that checks the statistics here.
    monkeypatch.setenv("CNN_NUMBA_WINOGRAD", "0")
    # One step of 32 images: 2 ranks of 16 against one process of 32. Over several steps the
    # float32 rounding of sums taken in another order (the ranks' kernels see 16 samples:
    # vectorised bodies and remainders split elsewhere, 'auto' may pick other algorithms)
    # grows like any training trajectory's: after 4 steps it reached 1.8e-3 of a batch-norm
    # bias's magnitude, whose gradient is a sum that nearly cancels. After one step (measured
    # 2026-12-01): sync within 4.8e-7 of each weight's largest magnitude (6.2e-7 for the
    # momentum buffers), per-rank statistics 0.017 (median) to 0.41 away.
    resnet = ["--model", "resnet8", "--limit", 32, "--batch-size", 32, "--val-fraction", 0, "--epochs", 1]
    runs = {"one": one_process(train_args(data_dir, tmp_path / "one", *resnet)),
            "sync": mpirun(2, train_args(data_dir, tmp_path / "sync", *resnet, "--sync-bn"), RUN_TIMEOUT),
            "local": mpirun(2, train_args(data_dir, tmp_path / "local", *resnet), RUN_TIMEOUT)}
    for name, proc in runs.items():
        assert proc.returncode == 0, (name, proc.stdout + proc.stderr)
    assert_same_run(tmp_path / "sync" / "epoch_001.npz", tmp_path / "one" / "epoch_001.npz", rtol=1e-5)
    # per-rank statistics (the default) normalise each half-batch by its own mean: another run
    with pytest.raises(AssertionError):
        assert_same_run(tmp_path / "local" / "epoch_001.npz", tmp_path / "one" / "epoch_001.npz", rtol=1e-5)


@needs_mpi
@pytest.mark.parametrize("options, message", [
    (["--model", "no-such-model"], "rank 0: unknown model 'no-such-model'"),
    # 65 images in batches of 64: the last batch's 1 image leaves rank 1 nothing to normalise
    (["--model", "resnet8", "--limit", 65, "--sync-bn"], "rank 0: --sync-bn with 2 ranks needs at least 2 images"),
])
def test_error_of_every_rank_is_printed_once(data_dir, tmp_path, options, message):
    proc = mpirun(2, train_args(data_dir, tmp_path, "--val-fraction", 0, *options), 120)
    assert proc.returncode == 2
    assert proc.stderr.count(f"cnn-numba: error: {message}") == 1, proc.stderr


KILLER = """
    import os, signal, sys, threading, time
    from pathlib import Path
    from cnn_numba import cli, distributed as dist, train as T
    dist.init()
    mode, folder = sys.argv[1], Path(sys.argv[2])

    def kill_after_first_checkpoint():
        while not (folder / "epoch_001.npz").exists():
            time.sleep(0.02)
        (folder / "killed_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)

    def fail(model, epoch):
        if epoch == 2:
            raise RuntimeError("injected failure")

    if dist.rank() == 1 and mode == "kill":
        threading.Thread(target=kill_after_first_checkpoint, daemon=True).start()
    if dist.rank() == 1 and mode == "raise":
        T._check_finite = fail
    sys.exit(cli.main(sys.argv[3:]))
"""


@needs_mpi
@pytest.mark.parametrize("mode", ["kill", "raise"])
def test_failed_rank_stops_every_rank(data_dir, tmp_path, mode):
    import time
    from cnn_numba import train as T
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    folder = tmp_path / "run"
    folder.mkdir()
    args = train_args(data_dir, folder, "--model", "lenet5", "--limit", 256, "--val-fraction", 0, "--epochs", 1000)
    proc = mpirun(2, [str(tmp_path / "killer.py"), mode, str(folder), *args[2:]], RUN_TIMEOUT)
    ended = time.time()
    assert proc.returncode != 0, proc.stdout + proc.stderr
    if mode == "kill":
        assert ended - float((folder / "killed_at").read_text()) < 30
        assert "BAD TERMINATION" in proc.stdout + proc.stderr  # the launcher names the killed process
    else:
        assert proc.stderr.count("cnn-numba: error: rank 1 of 2 failed (RuntimeError: injected failure)") == 1, \
            proc.stdout + proc.stderr
    # checkpoints under real names are whole (an abort mid-write leaves at most a hidden .tmp file)
    saved = sorted(folder.glob("epoch_*.npz"))
    assert saved
    for path in saved:
        T.load_checkpoint(path)


SIM_WORKER = """
    import numpy as np
    from cnn_numba import distributed as dist, nn, tensor
    from cnn_numba import random
    import cnn_numba.functional as F
    dist.init()
    r = dist.rank()
    dist.select_gpu()
    random.manual_seed(100 + r)  # rank 1's weights differ until the wrapper broadcasts rank 0's
    model = dist.convert_sync_batchnorm(
        nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to("cuda"))
    ddp = dist.DistributedDataParallel(model)
    x = np.random.default_rng(r).standard_normal((4, 7)).astype(np.float32)
    loss = F.cross_entropy(ddp(tensor(x, device="cuda")), tensor(np.array([0, 1, 2, r]), device="cuda"))
    loss.backward()
    ddp.reduce_gradients()
    np.savez(f"rank{r}.npz", **{"grad/" + k: p.grad.numpy() for k, p in model.named_parameters()},
             **{"state/" + k: v for k, v in model.state_dict().items()})
"""


@needs_mpi
@pytest.mark.skipif(importlib.util.find_spec("numba.cuda") is None, reason="needs numba-cuda (its simulator)")
def test_cuda_ranks_under_simulator_equal_one_process_on_the_global_batch(tmp_path):
    # Gradients and sync-bn sums staged through the host from the (simulated) GPU: the 2 ranks'
    # averaged gradient equals one CPU process's on both shares at once, and the running statistics
    # are the global batch's.
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(SIM_WORKER))
    proc = mpirun(2, [str(script)], 300, cwd=tmp_path, env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from cnn_numba import nn, random, tensor
    import cnn_numba.functional as F
    random.manual_seed(100)
    model = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    x = np.concatenate([np.random.default_rng(r).standard_normal((4, 7)).astype(np.float32) for r in range(2)])
    F.cross_entropy(model(tensor(x)), np.array([0, 1, 2, 0, 0, 1, 2, 1])).backward()
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npz")
        for k, p in model.named_parameters():
            np.testing.assert_allclose(got[f"grad/{k}"], p.grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
        for k in ("1.running_mean", "1.running_var"):
            np.testing.assert_allclose(got[f"state/{k}"], model.state_dict()[k], rtol=1e-5, atol=1e-7, err_msg=k)


@needs_mpi
def test_ctrl_c_stops_every_rank(data_dir, tmp_path):
    import signal
    import time
    args = train_args(data_dir, tmp_path, "--model", "lenet5", "--limit", 256, "--val-fraction", 0, "--epochs", 1000)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), NUMBA_NUM_THREADS="1")
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + RUN_TIMEOUT
        while not (tmp_path / "epoch_001.npz").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends mpiexec; it forwards it to the ranks
        sent = time.time()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.time() - sent < 30
    assert proc.returncode == 130, out + err
    assert err.count("cnn-numba: interrupted") == 1, err


EPOCHS_WORKER = """
    import sys
    import numpy as np
    from cnn_numba import distributed as dist, nn, optim, random
    from cnn_numba.data import DataLoader
    from cnn_numba.train import train_epoch
    dist.init()

    class Float64(dist.ShardedLoader if dist.world_size() > 1 else DataLoader):
        def _to_float(self, x):
            return super()._to_float(x).astype(np.float64)

    rng = np.random.default_rng(5)
    images, labels = rng.integers(0, 256, (45, 8, 8), dtype=np.uint8), rng.integers(0, 10, 45)
    random.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).double()
    ddp = dist.DistributedDataParallel(model) if dist.world_size() > 1 else None
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = Float64(images, labels, 16, seed=3)  # batches 16, 16, 13: shares 8/8, 8/8, 7/6
    records = [train_epoch(ddp or model, optimizer, loader, e, 2, "cpu", False, ddp=ddp) for e in (1, 2)]
    if dist.is_main():
        np.savez(sys.argv[1], loss=[r["train_loss"] for r in records], acc=[r["train_acc"] for r in records],
                 **{k: v for k, v in model.state_dict().items()})
"""


@needs_mpi
def test_train_epoch_float64_two_ranks_equal_one_process(tmp_path):
    # Uneven shares of every third batch: without the b_r N / B weighting the weights differ by 1.6e-4.
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(EPOCHS_WORKER))
    for n, name in ((1, "one.npz"), (2, "two.npz")):
        proc = mpirun(n, [str(script), str(tmp_path / name)], RUN_TIMEOUT, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for k in one.files:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-12, atol=1e-14, err_msg=k)
