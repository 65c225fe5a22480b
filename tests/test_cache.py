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
    from cnn_numba.kernels import conv

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
    stats = conv.conv2d_forward_flat.stats  # direct at stride 1 runs the flat kernel
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
    stats = pool.max_pool2d_forward.stats
    print("y", y.ravel().tolist())
    print("hits", sum(stats.cache_hits.values()), "misses", sum(stats.cache_misses.values()))
''')


def test_editing_an_inlined_helper_recompiles_the_kernels_that_use_it(tmp_path):
    """max_pool2d_forward (pool.py) inlines ``tap`` from index.py. Numba's own stamp is
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
