"""Every kernel under NUMBA_BOUNDSCHECK=1 on awkward small shapes, in one subprocess.

Bounds checking is a compile-time setting, so it needs a fresh process and a fresh cache
directory (a cached kernel compiled without checks would be reused otherwise). One
subprocess, float64 only, so the compile cost is paid once.

Numba (0.68) does not raise for an out-of-bounds access inside a ``prange`` body of a
``parallel=True`` function, even with NUMBA_BOUNDSCHECK=1 (the parfor's gufunc drops
the exception). The subprocess therefore compiles the kernels serially: it wraps
``numba.njit`` to force ``parallel=False`` before cnn_numba is imported, so ``prange``
is a plain ``range`` and every index is checked; a canary kernel proves the checks are
live. The parallel builds are what the rest of the suite tests. Negative indices wrap
around in Numba as in Python, so bounds checking cannot catch those.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(r'''
    import sys
    import numpy as np
    import numba
    from numba import config, prange
    assert config.BOUNDSCHECK, "NUMBA_BOUNDSCHECK did not reach numba"

    _njit = numba.njit

    def serial_njit(*args, **kw):
        kw["parallel"] = False
        return _njit(*args, **kw)

    numba.njit = serial_njit

    @numba.njit(parallel=True)
    def canary(a):
        for i in prange(a.shape[0]):
            a[i + 1] = 1.0

    try:
        canary(np.zeros(4))
    except IndexError:
        pass
    else:
        sys.exit("bounds checking is not active: the canary wrote past the end of its array")

    import cnn_numba as cn
    from cnn_numba.kernels import conv as conv_kernels
    assert not conv_kernels.conv2d_forward_direct.targetoptions.get("parallel"), "kernels still parallel"
    import cnn_numba.functional as F
    import reference as R
    from cnn_numba.kernels.conv_algos import TABLE

    rng = np.random.default_rng(7)
    checked = 0

    def run(op, inputs, **kw):
        tensors = [None if a is None else cn.tensor(a, requires_grad=np.asarray(a).dtype.kind == "f")
                   for a in inputs]
        res = op(*tensors, **kw)
        out = res[0] if isinstance(res, tuple) else res
        gy = rng.standard_normal(out.shape)
        out.backward(gy)
        return out.numpy(), [None if t is None or t.grad is None else t.grad.numpy() for t in tensors], gy

    def close(got, ref, what):
        global checked
        R.assert_close(got, ref, np.float64, what)
        checked += 1

    # conv2d: (x, w, bias?, kwargs)
    CONV = [
        ((1, 1, 1, 1), (1, 1, 1, 1), True, {}),
        ((2, 3, 1, 1), (2, 3, 3, 3), True, dict(padding=1)),
        ((1, 2, 3, 4), (3, 2, 5, 4), True, dict(padding=(1, 0))),
        ((2, 2, 7, 8), (3, 2, 2, 2), False, dict(stride=3)),
        ((2, 2, 5, 4), (2, 2, 4, 2), True, dict(padding="same")),
        ((1, 2, 6, 5), (2, 2, 2, 4), False, dict(padding="same", dilation=(3, 1))),
        ((1, 3, 9, 8), (2, 3, 3, 2), True, dict(stride=(2, 3), dilation=(2, 3), padding=(1, 1))),
        ((2, 3, 5, 6), (6, 1, 3, 3), True, dict(groups=3, stride=2)),
        ((1, 1, 2, 3), (2, 1, 2, 2), True, dict(padding=3)),
        ((1, 2, 3, 3), (1, 2, 1, 1), True, dict(stride=5)),
        ((0, 2, 4, 4), (2, 2, 3, 3), True, dict(padding=1)),
        ((5, 2, 30, 30), (4, 1, 3, 3), True, dict(groups=2, padding=1)),   # several im2col chunks
        ((2, 16, 5, 7), (17, 16, 3, 3), True, dict(padding=1)),            # Winograd runs (>= 16 channels)
        ((2, 3, 9, 9), (33, 3, 3, 3), True, dict(stride=2, padding=1)),    # blocked: a partial channel block
        ((1, 33, 4, 5), (32, 33, 3, 3), False, dict(padding=3)),           # blocked gx: the load crops
    ]
    for algo in (*TABLE.names, "auto"):
        for xs, ws, bias, kw in CONV:
            x, w = rng.standard_normal(xs), rng.standard_normal(ws)
            b = rng.standard_normal(ws[0]) if bias else None
            out, (gx, gw, gb), gy = run(F.conv2d, (x, w, b), algo=algo, **kw)
            close(out, R.conv2d(x, w, b, **kw), f"conv2d {algo} {kw}")
            rgx, rgw, rgb = R.conv2d_grads(x, w, gy, **kw)
            close(gx, rgx, "gx")
            close(gw, rgw, "gw")
            if bias:
                close(gb, rgb, "gb")
            # the same conv with an eval-mode batch norm and relu in its store (kernels/conv.py's epilogue)
            stats = (rng.standard_normal(ws[0]), rng.uniform(0.5, 2.0, ws[0]), rng.standard_normal(ws[0]),
                     rng.standard_normal(ws[0]))
            with cn.no_grad():
                fused = F.conv2d_bn_relu(x, w, b, bn=(*stats, 1e-5), with_relu=True, algo=algo, **kw)
            close(fused.numpy(), R.relu(R.batch_norm_eval(R.conv2d(x, w, b, **kw), *stats)), f"fused {algo} {kw}")

    # float32 through the direct kernels: where vector registers hold 16 float32 (AVX-512)
    # their flat loops are register-blocked (kernels/simd.py, whose vector loads and stores
    # are checked too under NUMBA_BOUNDSCHECK), which float64 never is
    for algo in ("direct", "blocked"):  # the blocked kernel's vector loads and stores likewise
        for xs, ws, bias, kw in CONV:
            x, w = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)
            b = rng.standard_normal(ws[0]).astype(np.float32) if bias else None
            out, (gx, gw, gb), gy = run(F.conv2d, (x, w, b), algo=algo, **kw)
            R.assert_close(out, R.conv2d(x, w, b, **kw), np.float32, f"float32 conv2d {kw}")
            rgx, rgw, _ = R.conv2d_grads(x, w, gy, **kw)
            R.assert_close(gx, rgx, np.float32, "float32 gx")
            R.assert_close(gw, rgw, np.float32, "float32 gw")
            checked += 3

    # batch norm -> relu as one op (F.batch_norm_relu), training and eval, against the two ops
    for shape in ((3, 4, 5, 5), (2, 3, 1, 1)):
        for training in (True, False):
            x, w, b = rng.standard_normal(shape), rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
            stats = rng.standard_normal(shape[1]), rng.uniform(0.5, 2.0, shape[1])
            gy = rng.standard_normal(shape)
            got = []
            for op in (F.batch_norm_relu, lambda *a: F.relu(F.batch_norm(*a))):
                xt, wt, bt = (cn.tensor(a, requires_grad=True) for a in (x, w, b))
                y = op(xt, cn.tensor(stats[0].copy()), cn.tensor(stats[1].copy()), wt, bt, training)
                y.backward(gy)
                got.append((y.numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()))
            for a, f in zip(*got):
                close(f, a, f"batch_norm_relu {shape} training={training}")

    TRANSPOSED = [
        ((1, 1, 1, 1), (1, 1, 1, 1), True, {}),
        ((2, 2, 3, 3), (2, 3, 3, 3), True, dict(stride=2, padding=1, output_padding=1)),
        ((1, 3, 4, 5), (3, 2, 3, 2), True, dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2))),
        ((2, 4, 3, 3), (4, 3, 2, 2), False, dict(groups=2, stride=2)),
        ((1, 2, 3, 3), (2, 1, 2, 2), True, dict(dilation=3, output_padding=2)),
        ((2, 1, 3, 3), (1, 2, 2, 2), True, dict(stride=3, output_padding=2)),
        ((1, 2, 2, 2), (2, 1, 3, 3), True, dict(stride=2, padding=2)),
        ((0, 2, 3, 3), (2, 1, 3, 3), True, dict(stride=2)),
    ]
    for algo in TABLE.names:
        for xs, ws, bias, kw in TRANSPOSED:
            x, w = rng.standard_normal(xs), rng.standard_normal(ws)
            b = rng.standard_normal(ws[1] * kw.get("groups", 1)) if bias else None
            out, (gx, gw, gb), gy = run(F.conv_transpose2d, (x, w, b), algo=algo, **kw)
            close(out, R.conv_transpose2d(x, w, b, **kw), f"conv_transpose2d {algo} {kw}")
            rgx, rgw, rgb = R.conv_transpose2d_grads(x, w, gy, **kw)
            close(gx, rgx, "gx")
            close(gw, rgw, "gw")
            if bias:
                close(gb, rgb, "gb")

    MAX = [
        ((1, 1, 1, 1), dict(kernel_size=1)),
        ((2, 2, 5, 5), dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
        ((1, 1, 8, 8), dict(kernel_size=3, stride=3, ceil_mode=True)),
        ((1, 2, 7, 4), dict(kernel_size=3, stride=(3, 2), padding=(1, 0), dilation=2, ceil_mode=True)),
        ((1, 2, 9, 7), dict(kernel_size=(3, 2), stride=2, padding=1, dilation=(3, 2), ceil_mode=True)),
        ((2, 2, 4, 3), dict(kernel_size=(4, 3))),
        ((2, 3, 5, 7), dict(kernel_size=2)),  # the 2x2 stride-2 kernel, odd sizes
        ((0, 2, 4, 4), dict(kernel_size=2)),
    ]
    for xs, kw in MAX:
        x = rng.integers(-2, 3, xs).astype(np.float64)
        if x.size:
            x.reshape(-1)[::5] = np.nan
        out, (gx,), gy = run(F.max_pool2d, (x,), **kw)
        ref, idx = R.max_pool2d(x, **kw)
        close(out, ref, f"max_pool2d {kw}")
        close(gx, R.max_pool2d_grad(gy, idx, xs), "gx")
        close(F.max_pool2d(x, return_indices=True, **kw)[1].numpy(), idx, "indices")

    for xs, k, s, p, osz in [((1, 2, 4, 6), 2, None, 0, None), ((2, 2, 5, 7), 2, None, 0, (5, 7)),
                             ((1, 1, 6, 6), 3, 3, 1, (6, 6)), ((0, 1, 4, 4), 2, None, 0, None)]:
        x = rng.standard_normal(xs)
        pooled, idx = R.max_pool2d(x, k, s, p)
        out, (gx, _), gy = run(F.max_unpool2d, (pooled, idx), kernel_size=k, stride=s, padding=p, output_size=osz)
        close(out, R.max_unpool2d(pooled, idx, k, s, p, osz), "max_unpool2d")
        close(gx, R.max_unpool2d_grad(gy, idx), "gx")

    AVG = [
        ((1, 1, 1, 1), dict(kernel_size=1)),
        ((2, 2, 5, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
        ((2, 2, 5, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
        ((1, 1, 8, 8), dict(kernel_size=3, stride=3, ceil_mode=True, divisor_override=2)),
        ((1, 2, 6, 5), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True)),
        ((0, 2, 4, 4), dict(kernel_size=2)),
    ]
    for xs, kw in AVG:
        x = rng.standard_normal(xs)
        out, (gx,), gy = run(F.avg_pool2d, (x,), **kw)
        close(out, R.avg_pool2d(x, **kw), f"avg_pool2d {kw}")
        close(gx, R.avg_pool2d_grad(gy, xs, **kw), "gx")

    for xs, osz in [((1, 1, 1, 1), 1), ((1, 2, 7, 5), (2, 4)), ((1, 1, 3, 5), (5, 7)), ((0, 1, 3, 3), 2)]:
        x = rng.standard_normal(xs)
        out, (gx,), gy = run(F.adaptive_avg_pool2d, (x,), output_size=osz)
        close(out, R.adaptive_avg_pool2d(x, osz), f"adaptive_avg_pool2d {osz}")
        close(gx, R.adaptive_avg_pool2d_grad(gy, xs), "gx")

    x = rng.standard_normal((2, 3, 4, 5))
    out, (gx,), gy = run(F.relu, (x,))
    close(out, R.relu(x), "relu")
    close(gx, R.relu_grad(x, gy), "relu gx")
    print("checked", checked)
''')


@pytest.mark.slow
def test_every_kernel_under_boundscheck(tmp_path):
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["NUMBA_BOUNDSCHECK"] = "1"
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tests_dir), env.get("PYTHONPATH")) if p)
    script = tmp_path / "boundscheck_run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
    assert "checked" in proc.stdout
