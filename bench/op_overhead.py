"""The Python time around each kernel, per op, through the public API (issue 16, part 6).

    python bench/op_overhead.py                 # every op, PyTorch beside it where installed
    python bench/op_overhead.py --ops conv2d relu --repeats 9

Each op runs on tiny float32 inputs (a few dozen elements), where a kernel costs next to
nothing, so what is left is the API: argument checks, Tensor wrapping, the backend's
dispatch, the conv table's pick, the autograd's graph and version bookkeeping. Columns, in
microseconds per call, the least of ``--repeats`` batches (each batch long enough to take
~20 ms; wall clock, with the process's CPU time (user+sys) of the same batch beside it, the
steadier figure on a shared machine):

    fwd        op(*inputs) with inputs requiring grad (the graph is recorded, as in training)
    fwd+bwd    the same, then out.backward(gy) (grads reset to None each time)
    launcher   the forward's backend launcher on the raw arrays (kernel("..._forward", "cpu")):
               the kernel with its allocation and Numba's dispatch, none of the API
    api        fwd - launcher: the overhead this issue bounds (< 20 us)
    torch      PyTorch's fwd and fwd+bwd for the same op and shapes (torch.set_num_threads as
               Numba's)

Kernels compile (or load from the cache) in an untimed first call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import cnn_numba as cn  # noqa: E402
import cnn_numba.functional as F  # noqa: E402
from cnn_numba import shapes  # noqa: E402
from cnn_numba.backend import kernel  # noqa: E402

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # PyTorch is optional: its columns stay empty
    torch = None


def cases(rng):
    """name -> (inputs as numpy, cnn_numba op, torch op, launcher(arrays) or None)."""
    f = np.float32

    def a(*shape):
        return rng.standard_normal(shape).astype(f)

    conv_geom = shapes.conv2d_geom((1, 1, 8, 8), (2, 1, 3, 3), 1, 1, 1, 1)
    # Inputs that want no gradient are tensors made once, as a training step has them.
    target = cn.tensor(np.array([1, 3]))
    running = cn.tensor(np.zeros(4, f)), cn.tensor(np.ones(4, f))
    t_target = torch.tensor([1, 3]) if torch else None
    t_running = (torch.zeros(4), torch.ones(4)) if torch else None
    return {
        "conv2d": ([a(1, 1, 8, 8), a(2, 1, 3, 3), a(2)],
                   lambda x, w, b: F.conv2d(x, w, b, padding=1),
                   lambda x, w, b: TF.conv2d(x, w, b, padding=1),
                   lambda x, w, b: kernel("conv2d_forward", "cpu")(x, w, b, conv_geom, "auto")),
        "max_pool2d": ([a(1, 2, 8, 8)],
                       lambda x: F.max_pool2d(x, 2),
                       lambda x: TF.max_pool2d(x, 2),
                       lambda x: kernel("max_pool2d_forward", "cpu")(x, (4, 4), (2, 2), (2, 2), (0, 0), (1, 1))),
        "relu": ([a(2, 16)], F.relu, TF.relu if torch else None,
                 lambda x: kernel("relu_forward", "cpu")(x)),
        "linear": ([a(2, 16), a(8, 16), a(8)], F.linear, TF.linear if torch else None,
                   lambda x, w, b: kernel("linear_forward", "cpu")(x, w, b)),
        "add": ([a(2, 16), a(2, 16)], F.add, torch.add if torch else None,
                lambda x, y: kernel("add", "cpu")(x, y)),
        "cross_entropy": ([a(2, 10)],
                          lambda z: F.cross_entropy(z, target),
                          lambda z: TF.cross_entropy(z, t_target),
                          None),
        "batch_norm": ([a(2, 4, 4, 4), a(4), a(4)],
                       lambda x, w, b: F.batch_norm(x, *running, w, b, training=True),
                       lambda x, w, b: TF.batch_norm(x, *t_running, w, b, training=True),
                       None),
    }


def per_call(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per call of ``fn``: the least over ``repeats`` batches."""
    fn()
    n, t0 = 1, time.perf_counter()
    while time.perf_counter() - t0 < 0.02:  # a batch of ~20 ms
        fn()
        n += 1
    wall = cpu = float("inf")
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            fn()
        wall = min(wall, (time.perf_counter() - w0) / n * 1e6)
        cpu = min(cpu, (time.process_time() - c0) / n * 1e6)
    return wall, cpu


def steps(inputs, op, tensor, requires_grad):
    """fwd() and fwd_bwd() closures over the inputs as ``tensor``s."""
    ts = [tensor(x, requires_grad) for x in inputs]

    def fwd():
        return op(*ts)

    def fwd_bwd():
        for t in ts:
            t.grad = None
        out = op(*ts)
        out.backward(gy if out.ndim else None)

    out = op(*ts)
    gy = tensor(np.ones(out.shape, np.float32), False) if out.ndim else None
    return fwd, fwd_bwd


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", nargs="*", help="a subset of the ops")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    import numba

    table = cases(np.random.default_rng(0))
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    print(f"us per call (wall / CPU), least of {args.repeats} batches; {numba.get_num_threads()} threads, "
          f"threading layer {os.environ.get('NUMBA_THREADING_LAYER', 'default')}")
    header = ("op", "fwd", "fwd+bwd", "launcher", "api", "torch fwd", "torch fwd+bwd")
    print("| " + " | ".join(header) + " |\n|---" + "|---:" * (len(header) - 1) + "|")
    for name in args.ops or table:
        inputs, op, top, launcher = table[name]
        fwd, fwd_bwd = steps(inputs, op, lambda x, g: cn.tensor(x, requires_grad=g), True)
        f, fb = per_call(fwd, args.repeats), per_call(fwd_bwd, args.repeats)
        cells = [f"{f[0]:.1f} / {f[1]:.1f}", f"{fb[0]:.1f} / {fb[1]:.1f}"]
        if launcher is not None:
            k = per_call(lambda: launcher(*inputs), args.repeats)
            cells += [f"{k[0]:.1f} / {k[1]:.1f}", f"{f[0] - k[0]:.1f} / {f[1] - k[1]:.1f}"]
        else:
            cells += ["", ""]
        if torch is not None and top is not None:
            tf, tfb = steps(inputs, top, lambda x, g: torch.tensor(x, requires_grad=g), True)
            t, tb = per_call(tf, args.repeats), per_call(tfb, args.repeats)
            cells += [f"{t[0]:.1f} / {t[1]:.1f}", f"{tb[0]:.1f} / {tb[1]:.1f}"]
        else:
            cells += ["", ""]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
