"""Training-step speed, cnn_numba beside PyTorch: same model, batch size, threads and data.

    python bench/train_speed.py [--steps 60] [--save]
    python bench/train_speed.py --device cuda [--save]     # on a GPU, beside PyTorch + cuDNN

Models: the modern LeNet-5 at batch 64 and resnet8 (He et al.'s CIFAR design, 16/32/64
channels, BatchNorm) at batch 128 (on the GPU: LeNet-5 at 64 and resnet20 at 128, the
issue's targets), all on 1x28x28 inputs, SGD with momentum, softmax cross-entropy. On the
GPU both sides keep data, parameters and optimiser state on the device, PyTorch runs with
TF32 off (float32 like ours), and each timed stretch ends with a device synchronisation.
On the GPU each library also runs its whole step replayed as a CUDA graph (sides
"cnn_numba-graph": cnn_numba.cuda.graphed_step, fed device images and host labels, as the
trainer's loop; "torch-graph": PyTorch's whole-network torch.cuda.graph capture, the honest
upper anchor). Each side runs ``--warmup`` steps (compilation, allocator warm-up), then
``--steps`` timed steps (forward, loss, backward, update) on fixed random batches; the
epoch time is the per-step time x the 938 (LeNet) or 469 (resnet8) steps of a 60,000-image
MNIST epoch. Random inputs time the same work as real images. PyTorch runs first, in its
own subprocess, so neither library's idle OpenMP workers spin against the other's.
Peak memory: the maximum resident set size of the cnn_numba subprocess (ru_maxrss).
"""
from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {"cpu": {"lenet5": 64, "resnet8": 128}, "cuda": {"lenet5": 64, "resnet20": 128}}
BLOCKS_PER_STAGE = {"resnet8": 1, "resnet14": 2, "resnet20": 3}
EPOCH_IMAGES = 60000


def torch_model(name):
    import torch.nn as tnn

    if name == "lenet5":
        return tnn.Sequential(
            tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
            tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10))

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False), tnn.BatchNorm2d(cout)
            self.c2, self.b2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout)
            self.short = (tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else tnn.Identity())

        def forward(self, x):
            y = self.b2(self.c2(self.b1(self.c1(x)).relu()))
            return (y + self.short(x)).relu()

    blocks, cin = [], 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(BLOCKS_PER_STAGE[name]):
            blocks.append(Block(cin, cout, 2 if stage and not i else 1))
            cin = cout
    return tnn.Sequential(tnn.Conv2d(1, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU(), *blocks,
                          tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(64, 10))


def child(side: str, name: str, warmup: int, steps: int, device: str) -> None:
    """Time one model on one side; print a JSON line."""
    import numpy as np

    batch = CASES[device][name]
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, batch, 1, 28, 28)).astype(np.float32)
    ys = rng.integers(0, 10, (4, batch))
    if side == "torch":
        import numba
        import torch

        torch.set_num_threads(numba.config.NUMBA_NUM_THREADS)  # (get_num_threads would start Numba's pool)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        dev = "cuda" if device == "cuda" else "cpu"
        model = torch_model(name).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()
        xs_t, ys_t = torch.from_numpy(xs).to(dev), torch.from_numpy(ys).to(dev)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step(i):
            opt.zero_grad()
            loss = loss_fn(model(xs_t[i % 4]), ys_t[i % 4])
            loss.backward()
            opt.step()

        if side == "torch-graph":  # PyTorch's whole-network capture (its CUDA-graphs docs)
            static_x, static_y = xs_t[0].clone(), ys_t[0].clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for i in range(3):
                    step(i)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                loss_fn(model(static_x), static_y).backward()
                opt.step()

            def step(i):  # noqa: F811
                static_x.copy_(xs_t[i % 4])
                static_y.copy_(ys_t[i % 4])
                graph.replay()
    else:
        import cnn_numba as cn
        from cnn_numba import models, nn, optim

        cn.manual_seed(0)
        model = getattr(models, name)().to(device)
        opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        xs_t = [cn.tensor(x, device=device) for x in xs]
        ys_t = [cn.tensor(y, device=device) for y in ys]
        if device == "cuda":
            from numba import cuda
            sync = cuda.synchronize
        else:
            sync = lambda: None  # noqa: E731

        def step(i):
            opt.zero_grad()
            loss = loss_fn(model(xs_t[i % 4]), ys_t[i % 4])
            loss.backward()
            opt.step()

        if side == "cnn_numba-graph":  # images already on the device, labels from the host (checked there)
            graphed = cn.cuda.graphed_step(model, loss_fn, opt)

            def step(i):  # noqa: F811
                graphed(xs_t[i % 4], ys[i % 4])

    for i in range(warmup):
        step(i)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    per_step = (time.perf_counter() - t) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "model": name, "batch": batch, "ms_per_step": per_step * 1e3,
                      "epoch_s": per_step * -(-EPOCH_IMAGES // batch), "peak_mb": peak_mb}))


def gpu_name() -> str:
    from numba import cuda
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--save", action="store_true", help="write bench/results/train[-cuda]-<date>.md")
    ap.add_argument("--json", type=Path, help="also write {model: {side: ms per step}} here")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, args.warmup, args.steps, args.device)
        return 0
    cases = CASES[args.device]
    try:
        import torch
        usable = args.device == "cpu" or torch.cuda.is_available()
    except ImportError:
        usable = False
    sides = ("torch", "cnn_numba") if usable else ("cnn_numba",)
    if args.device == "cuda":  # each also with its whole step replayed as a CUDA graph
        sides = tuple(v for side in sides for v in (side, side + "-graph"))
    res = {}
    for side in sides:
        for name in cases:
            out = subprocess.run([sys.executable, __file__, "--child", side, name, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--device", args.device],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{side} {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[side, name] = r
            print(f"{side:<15} {name:<8} batch {r['batch']:>3}: {r['ms_per_step']:8.2f} ms/step, "
                  f"epoch {r['epoch_s']:7.1f} s, peak RSS {r['peak_mb']:.0f} MB", file=sys.stderr)
    import shapes  # the bench's shared module (after the children: it imports torch and the kernels)

    where = gpu_name() if args.device == "cuda" else "CPU"
    lines = [f"# Training speed on {where}, {datetime.date.today().isoformat()}, commit {shapes.commit()}", "",
             f"`python bench/train_speed.py --device {args.device} --steps {args.steps}`: {args.steps} timed "
             f"steps after {args.warmup} warm-up steps; epoch = 60,000 images.", "",
             "| model | batch | cnn_numba ms/step | torch ms/step | ratio | cnn_numba epoch s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if args.device == "cuda":
        lines[-2:] = ["| model | batch | cnn_numba graph ms/step | cnn_numba eager | torch eager | torch graph | "
                      "graph / torch eager | graph / torch graph |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in cases:
            ms = {side: res[side, name]["ms_per_step"] for side in sides if (side, name) in res}
            cell = lambda side: f"{ms[side]:.2f}" if side in ms else "—"  # noqa: E731
            ratio = lambda a, b: f"{ms[a] / ms[b]:.2f}" if a in ms and b in ms else "—"  # noqa: E731
            lines.append(f"| {name} | {CASES['cuda'][name]} | {cell('cnn_numba-graph')} | {cell('cnn_numba')} | "
                         f"{cell('torch')} | {cell('torch-graph')} | {ratio('cnn_numba-graph', 'torch')} | "
                         f"{ratio('cnn_numba-graph', 'torch-graph')} |")
    for name in cases if args.device == "cpu" else ():
        ours, theirs = res.get(("cnn_numba", name)), res.get(("torch", name))
        if ours is None:
            lines.append(f"| {name} | {CASES[args.device][name]} | failed | — | — | — | — |")
            continue
        ratio = f"{ours['ms_per_step'] / theirs['ms_per_step']:.2f}" if theirs else "—"
        tms = f"{theirs['ms_per_step']:.2f}" if theirs else "—"
        lines.append(f"| {name} | {ours['batch']} | {ours['ms_per_step']:.2f} | {tms} | {ratio} | "
                     f"{ours['epoch_s']:.1f} | {ours['peak_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.json:
        figures = {name: {side: res[side, name]["ms_per_step"] for side in sides if (side, name) in res}
                   for name in cases}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        kind = "train-cuda" if args.device == "cuda" else "train"
        path = shapes.new_record(RESULTS, kind)
        path.write_text(text)
        print(f"saved {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
