"""The kernels' on-disk cache works from a read-only install.

Numba tries its cache locators in order: NUMBA_CACHE_DIR (unset here), then the
source tree's ``__pycache__`` (not writable here), then the user-wide cache directory
``$XDG_CACHE_HOME/numba`` (or ``~/.cache/numba``). So with a read-only copy of the
package, compiled kernels must land under the temporary cache home, and a second
process must load them instead of compiling again.

Root ignores permission bits, so ``chmod`` alone cannot make the tree read-only for
root: as root the subprocess runs under ``unshare --user`` (a new user namespace
holds no capabilities over the host's files, so the owner's missing write bit binds).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import cnn_numba

SCRIPT = textwrap.dedent(r'''
    import os, sys
    import numpy as np
    import cnn_numba
    import cnn_numba.functional as F
    from cnn_numba.kernels import conv_stride1

    pkg = os.path.dirname(os.path.abspath(cnn_numba.__file__))
    assert pkg.startswith(os.environ["EXPECT_PACKAGE_UNDER"]), f"imported the wrong cnn_numba: {pkg}"
    try:  # the premise: this process cannot write into the package
        open(os.path.join(pkg, "kernels", "write-probe"), "w").close()
    except OSError:
        pass
    else:
        sys.exit("the package copy is writable: the test premise does not hold")

    y = F.conv2d(np.ones((1, 2, 4, 4), np.float32), np.ones((3, 2, 3, 3), np.float32), padding=1,
                 algo="direct")
    edge = np.array([2, 3, 3, 2], np.float32)  # taps inside the 4x4 input per row/column, times 2 channels
    assert np.array_equal(y.numpy()[0, 0], 2 * np.outer(edge, edge)), y.numpy()[0, 0]
    stats = conv_stride1.conv2d_forward_flat.stats  # direct at stride 1 runs the flat kernel
    print("cache_path", stats.cache_path)
    print("hits", sum(stats.cache_hits.values()), "misses", sum(stats.cache_misses.values()))
''')


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode:
        pytest.skip("running as root without a working 'unshare --user': root ignores a read-only chmod")
    return [unshare, "--user"]


@pytest.mark.slow
def test_cache_falls_back_to_user_dir_when_source_is_read_only(tmp_path):
    src = Path(cnn_numba.__file__).resolve().parent
    site = tmp_path / "site"
    shutil.copytree(src, site / "cnn_numba", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    home, xdg = tmp_path / "home", tmp_path / "xdg-cache"
    home.mkdir()
    xdg.mkdir()
    script = tmp_path / "run_conv.py"
    script.write_text(SCRIPT)

    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(xdg), PYTHONPATH=str(site), EXPECT_PACKAGE_UNDER=str(site))
    cmd = _prefix() + [sys.executable, str(script)]

    _make_read_only(site)
    try:
        runs = [subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
                for _ in range(2)]
    finally:
        _make_writable(site)  # so pytest can clean tmp_path up

    for i, proc in enumerate(runs):
        assert proc.returncode == 0, f"run {i}:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
    assert not list(site.rglob("*.nbi")), "cache files were written into the read-only source tree"
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.nbi"))
    assert written, f"no *.nbi file under {tmp_path}; first run said:\n{runs[0].stdout}"
    assert all(str(p).startswith(("xdg-cache", "home")) for p in written), written
    assert str(xdg / "numba") in runs[0].stdout, runs[0].stdout     # the locator Numba chose
    # the second process loads the kernel from that cache instead of compiling it again
    assert "hits 1 misses 0" in runs[1].stdout, runs[1].stdout


EDIT_SCRIPT = textwrap.dedent(r'''
    import numpy as np
    from cnn_numba.kernels import pool

    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    y, _ = pool.max_pool2d(x, (3, 3), (1, 1), (1, 1), (0, 0), (1, 1))  # 1x1 window: y = x
    # 9 outputs of 9 taps: under POOL_PARALLEL_READS, so the serial twin runs (and caches)
    stats = [pool.max_pool2d_forward.stats, pool.max_pool2d_forward_serial.stats]
    print("y", y.ravel().tolist())
    print("hits", sum(sum(s.cache_hits.values()) for s in stats),
          "misses", sum(sum(s.cache_misses.values()) for s in stats))
''')


def test_editing_an_inlined_helper_recompiles_the_kernels_that_use_it(tmp_path):
    """max_pool2d_forward (pool.py; here its serial twin) inlines ``tap`` from index.py. Numba's own stamp is
    pool.py's alone, so after editing ``tap`` it would load the old machine code."""
    src = Path(cnn_numba.__file__).resolve().parent
    site = tmp_path / "site"
    shutil.copytree(src, site / "cnn_numba", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    script = tmp_path / "run_pool.py"
    script.write_text(EDIT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(site), NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def run():
        proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}"
        return proc.stdout

    x = list(range(9))
    assert run() == f"y {[float(v) for v in x]}\nhits 0 misses 1\n"
    assert run() == f"y {[float(v) for v in x]}\nhits 1 misses 0\n"  # still cached across processes

    index = site / "cnn_numba" / "kernels" / "index.py"
    text = index.read_text()
    assert text.count("return o * s - p + t * d\n") == 1
    index.write_text(text.replace("return o * s - p + t * d\n", "return o * s - p + t * d + 1\n"))
    # every output now reads the input one row and one column further on; past the edge, -inf
    shifted = [4.0, 5.0, -np.inf, 7.0, 8.0, -np.inf, -np.inf, -np.inf, -np.inf]
    assert run() == f"y {shifted}\nhits 0 misses 1\n"


# ----------------------------------------------------------------------------- warm-up

def _kernel_state():
    """Per CPU kernel dispatcher: (compiled signatures, cache hits, cache misses)."""
    from cnn_numba import warmup
    return {id(d): (len(d.overloads), sum(d.stats.cache_hits.values()), sum(d.stats.cache_misses.values()))
            for m in warmup.kernel_modules() for d in vars(m).values() if hasattr(d, "overloads")}


def _with_dropout():
    from cnn_numba import nn
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4 * 4 * 4, 10))


@pytest.mark.parametrize("name", ["lenet5", "with-dropout"])
def test_dry_step_runs_no_kernel_and_changes_nothing(name):
    """Nothing compiles, runs or moves: weights, optimiser state, the random generator
    (dropout draws from it; an exact resume replays it)."""
    from numba.core import event

    from cnn_numba import random, train, warmup
    model = train.build_model("lenet5") if name == "lenet5" else _with_dropout()
    opt = train.make_optimizer("adam", model.parameters(), 1e-3)
    weights = {k: v.copy() for k, v in model.state_dict().items()}
    rng = random.default_generator().bit_generator.state
    before = _kernel_state()
    with event.install_recorder("numba:compile") as compiles:
        items = warmup.training_step_signatures(model, opt, 64)
    assert not compiles.buffer, "the dry step compiled something"
    assert _kernel_state() == before, "the dry step ran or loaded a kernel"
    assert all(np.array_equal(v, weights[k]) for k, v in model.state_dict().items())
    assert opt.state == {} and all(p.grad is None for p in model.parameters())
    assert random.default_generator().bit_generator.state == rng
    names = {d.py_func.__name__ for d, _ in items}
    # the step: convs, max pool (2x2 windows: that kernel) and its backward, relu, cross-entropy, adam
    assert {"relu_forward_kernel", "relu_backward_kernel", "max_pool2d_forward_2x2", "scatter_planes",
            "cross_entropy_forward", "cross_entropy_backward", "adam_step", "conv2d_backward_bias"} <= names
    assert len(items) == len({(id(d), s) for d, s in items}), "a signature recorded twice"


def test_warm_up_compiles_exactly_what_the_step_then_uses():
    """After compiling the recorded signatures, a real training step (and an eval forward)
    compiles nothing and loads nothing: the recorded signatures are the step's own."""
    from cnn_numba import functional as F
    from cnn_numba import train, warmup
    from cnn_numba.tensor import no_grad, tensor
    model = train.build_model("lenet5")
    opt = train.make_optimizer("sgd", model.parameters(), 0.05)
    warmup.compile_items(warmup.training_step_signatures(model, opt, 8), workers=0)
    before = _kernel_state()
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    loss = F.cross_entropy(model(tensor(x)), tensor(np.arange(8) % 10))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    with no_grad():
        model(tensor(x))
    assert _kernel_state() == before
    assert warmup.missing(warmup.training_step_signatures(model, opt, 8)) == []


WORKER_SCRIPT = textwrap.dedent(r'''
    import sys
    import numpy as np
    from cnn_numba import warmup
    from cnn_numba.kernels import elementwise as E

    if sys.argv[1] == "spawn":
        warmup._can_fork = lambda: False
    warmup.plan = lambda items, workers, spawn: [items[:1], items[1:]]  # one here, one in the child
    a = np.ones(3, np.float32)
    with warmup.recording() as items:
        E.relu_forward(a)
        E.relu_backward(a, a)
    todo = warmup.missing(items)
    print("missing", sorted(d.py_func.__name__ for d, _ in todo))
    warmup.compile_items(todo, workers=1, progress=lambda done, total: print("progress", done, total))
    print("compiled here", sorted(d.py_func.__name__ for d, s in items if s in d.overloads))
''')


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_worker_processes_fill_the_disk_cache(tmp_path, start):
    script = tmp_path / "warm.py"
    script.write_text(WORKER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    root = str(Path(cnn_numba.__file__).resolve().parent.parent)
    env.update(PYTHONPATH=root, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, str(script), start], env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = runs[0].stdout.splitlines(), runs[1].stdout.splitlines()
    assert first[0] == "missing ['relu_backward_kernel', 'relu_forward_kernel']"
    assert sorted(first[1:3]) == ["progress 1 2", "progress 2 2"]
    # one kernel compiled in this process, the other in the child, which only wrote the cache
    assert len(first[3].split(",")) == 1, first
    assert second[0] == "missing []", second  # the child's kernel too was found in the cache


def test_warmup_command_reports_a_warm_cache(capsys):
    from cnn_numba import cli
    assert cli.main(["warmup", "--model", "lenet5", "--workers", "0"]) == 0
    assert cli.main(["warmup", "--model", "lenet5", "--workers", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "kernels for lenet5 already compiled"


def test_cached_cuda_kernels_are_stamped_with_every_kernel_source(tmp_path):
    """numba-cuda has its own caching module: the stamped locators go there too (decorating
    needs no GPU; under the simulator nothing is cached, so this runs without it)."""
    script = textwrap.dedent(r'''
        from numba.cuda.dispatcher import CUDACache, CUDADispatcher
        from cnn_numba.kernels import sourcecache
        from cnn_numba.kernels.cuda import elementwise
        caches = [d._cache for d in vars(elementwise).values()
                  if isinstance(d, CUDADispatcher) and isinstance(d._cache, CUDACache)]
        assert caches, "no cached CUDA kernel"
        for c in caches:
            locator = c._impl.locator
            assert isinstance(locator, sourcecache._KernelSourcesStamp), type(locator)
            assert locator.get_source_stamp() == ("cnn_numba.kernels", sourcecache.sources_digest())
        print("ok", len(caches))
    ''')
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(Path(cnn_numba.__file__).resolve().parent.parent), NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode and "CudaSupportError" in proc.stderr:
        pytest.skip("numba-cuda cannot load here")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok ")


def test_dry_step_leaves_the_process_fit_to_fork(tmp_path):
    """The launchers ask numba.get_num_threads(), which starts the thread pool; after that
    forking is unsafe and the warm-up would spawn children instead (~0.5 s of import each)."""
    script = textwrap.dedent(r'''
        from numba.np.ufunc import parallel
        from cnn_numba import train, warmup
        model = train.build_model("lenet5")
        warmup.training_step_signatures(model, train.make_optimizer("sgd", model.parameters(), 0.05), 64)
        print(parallel._is_initialized, warmup._can_fork())
    ''')
    env = dict(os.environ, PYTHONPATH=str(Path(cnn_numba.__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["False", "True" if sys.platform.startswith("linux") else "False"]
