"""Bytes moved per training step, op by op, cnn_numba beside PyTorch (issue 16, part 4).

    python bench/bytes_moved.py                  # LeNet-5 at batch 64, resnet8 at batch 128
    python bench/bytes_moved.py --model resnet8

What is counted, on both sides the same way: every array an op reads and every array it
writes, once per call, at the level where each library dispatches its kernels: cnn_numba's
backend launchers (``kernel(name, "cpu")``: conv2d_forward, batch_norm_backward, sgd_update,
...; a launcher's own nested launches are not counted again) and PyTorch's ATen operators
(a ``TorchDispatchMode``: aten.convolution, aten.native_batch_norm_backward, ...). It is a
floor on the memory traffic of a step, the passes over whole tensors that the op sequence
implies: a kernel's scratch, and re-reads of inputs that do not stay in cache, add to it on
either side. Fusion lowers it (a conv that applies batch norm and relu as it stores does
not read its output back twice); this measures by how much.

One step is counted after two warm-up steps (compilation; the optimiser's momentum
buffers appear at the first step): forward, cross-entropy loss, backward, SGD with
momentum, on random 1x28x28 inputs, as bench/train_speed.py times it. cnn_numba is
counted twice, with its fusions (the default) and with ``CNN_NUMBA_FUSE=0`` semantics
(``nn.module.FUSE = False``: in training, batch norm -> relu as two ops).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_speed import torch_model  # noqa: E402

BATCH = {"lenet5": 64, "resnet8": 128}


def _arrays(value) -> list:
    """The numpy arrays in ``value`` (an array, or tuples/lists of them)."""
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _arrays(v)]
    return []


def _traffic(inputs: list, outputs: list, same) -> int:
    """Bytes of the ``inputs`` (read) and of the ``outputs`` (written) that are not inputs
    handed back or views of them (``same(out, inp)``). A call that hands back only inputs
    or views of them moves nothing (a view; a gradient passed through unchanged); one that
    writes into an input in place (an optimiser's update) counts that input's read only,
    on both sides."""
    fresh = [o for o in outputs if not any(same(o, a) for a in inputs)]
    if outputs and not fresh:
        return 0
    return sum(_size(a) for a in inputs) + sum(_size(o) for o in fresh)


def _size(a) -> int:
    return a.nbytes if isinstance(a, np.ndarray) else a.numel() * a.element_size()


def count_cnn_numba(name: str, fuse: bool) -> Counter:
    """{launcher: bytes read + written} over one training step."""
    import cnn_numba as cn
    from cnn_numba import backend, models, nn, optim
    from cnn_numba.nn import module

    module.FUSE = fuse
    cn.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = BATCH[name]
    x = cn.tensor(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = cn.tensor(rng.integers(0, 10, batch))
    model = getattr(models, name)()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    step()
    step()
    counts: Counter = Counter()
    depth = [0]
    originals = dict(backend._KERNELS)

    def counted(key, fn):
        def launch(*args, **kwargs):
            depth[0] += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                counts[key[0]] += _traffic(_arrays(list(args) + list(kwargs.values())), _arrays(out),
                                           np.may_share_memory)
            return out
        return launch

    try:
        for key, fn in originals.items():
            if key[1] == "cpu":
                backend._KERNELS[key] = counted(key, fn)
        backend._SERIALISED.clear()  # (workqueue's locked copies) rebuilt from the counted ones
        backend._SERIALISED.update({k[0]: backend._serialised(f) for k, f in backend._KERNELS.items()
                                    if k[1] == "cpu"})
        step()
    finally:
        backend._KERNELS.update(originals)
        backend._SERIALISED.update({k[0]: backend._serialised(f) for k, f in originals.items() if k[1] == "cpu"})
        module.FUSE = True
    return counts


def count_torch(name: str) -> Counter:
    """{aten op: bytes read + written} over one training step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = BATCH[name]
    x = torch.from_numpy(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch))
    model = torch_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()

    counts: Counter = Counter()

    def tensors(tree):
        return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]

    def same(a, b):
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:  # (detach, t, view: no data moves)
                counts[str(func.overloadpacket.__name__)] += _traffic(tensors((args, kwargs)), tensors(out), same)
            return out

    step()
    step()
    with Count():
        step()
    return counts


def report(name: str, top: int) -> str:
    fused, unfused, theirs = count_cnn_numba(name, True), count_cnn_numba(name, False), count_torch(name)
    mb = 1 / 2 ** 20
    total = {k: sum(c.values()) * mb for k, c in (("fused", fused), ("unfused", unfused), ("torch", theirs))}
    lines = [f"### {name} at batch {BATCH[name]}: one training step", "",
             "| | MB read + written |", "|---|---:|",
             f"| cnn_numba (fusions on, the default) | {total['fused']:.1f} |",
             f"| cnn_numba, CNN_NUMBA_FUSE=0 | {total['unfused']:.1f} |",
             f"| PyTorch {__import__('torch').__version__} (ATen ops) | {total['torch']:.1f} |",
             "", f"cnn_numba / PyTorch: **{total['fused'] / total['torch']:.2f}** "
             f"(unfused {total['unfused'] / total['torch']:.2f}).", "",
             "| cnn_numba launcher | MB | PyTorch ATen op | MB |", "|---|---:|---|---:|"]
    ours, their = fused.most_common(top), theirs.most_common(top)
    for i in range(top):
        a = ours[i] if i < len(ours) else ("", 0)
        b = their[i] if i < len(their) else ("", 0)
        lines.append(f"| {a[0]} | {a[1] * mb:.1f} | {b[0]} | {b[1] * mb:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(BATCH), action="append", help="default: both")
    ap.add_argument("--top", type=int, default=8, help="largest ops listed per side")
    args = ap.parse_args(argv)
    for name in args.model or sorted(BATCH):
        print(report(name, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
