"""Inference latency, eval mode under no_grad, cnn_numba beside PyTorch on the same threads:
LeNet-5 and resnet8 at batch 1, 16 and 256 (best of 5 timed stretches, microseconds per call).

    python bench/infer_speed.py
"""
import time, numpy as np, torch, cnn_numba as cn, numba
from cnn_numba import models
torch.set_num_threads(numba.get_num_threads())
from train_speed import torch_model
def tm(f, n):
    f(); f()
    best = 1e9
    for r in range(5):
        t = time.perf_counter()
        for _ in range(n): f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6
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
        a, c = tm(ours, n), tm(theirs, n)
        print(f"{name} b{b}: cnn_numba {a:.0f} us, torch {c:.0f} us, ratio {a/c:.2f}")
