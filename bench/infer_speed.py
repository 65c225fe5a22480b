"""Inference latency, eval mode under no_grad, cnn_numba beside PyTorch on the same threads:
LeNet-5 and resnet8 at batch 1, 16 and 256 (microseconds per call, the best of 7 timed
stretches each, cnn_numba's and PyTorch's stretches alternating, so that a slow spell of a
shared machine falls on both).

    python bench/infer_speed.py
"""
import time, numpy as np, torch, cnn_numba as cn, numba
from cnn_numba import models
torch.set_num_threads(numba.get_num_threads())
from train_speed import torch_model
def interleaved(fs, n, stretches=7):
    """The best time per call of each of ``fs``, over ``stretches`` rounds of n calls each."""
    for f in fs:
        f(); f()
    best = [float("inf")] * len(fs)
    for _ in range(stretches):
        for i, f in enumerate(fs):
            t = time.perf_counter()
            for _ in range(n): f()
            best[i] = min(best[i], (time.perf_counter() - t) / n)
    return [b * 1e6 for b in best]
for name in ("lenet5", "resnet8"):
    m = getattr(models, name)(); m.eval()
    tmod = torch_model(name); tmod.eval()
    for b in (1, 16, 256):
        x = np.random.rand(b, 1, 28, 28).astype(np.float32)
        xc = cn.tensor(x); xt = torch.from_numpy(x)
        def ours():
            with cn.no_grad(): m(xc)
        def theirs():
            with torch.no_grad(): tmod(xt)
        n = max(3, int(2000 / b)) if name == "lenet5" else max(3, int(200 / b))
        a, c = interleaved((ours, theirs), n)
        print(f"{name} b{b}: cnn_numba {a:.0f} us, torch {c:.0f} us, ratio {a/c:.2f}")
