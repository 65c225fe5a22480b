"""Quickstart: a convolution forward and backward, checked against SciPy and finite differences.

    python examples/quickstart.py
"""
import time

import numpy as np
from scipy.signal import correlate2d

import cnn_numba as cn
import cnn_numba.functional as F

rng = np.random.default_rng(0)
x = cn.tensor(rng.standard_normal((2, 3, 28, 28)).astype(np.float32), requires_grad=True)  # (N, C, H, W)
w = cn.tensor(0.1 * rng.standard_normal((8, 3, 5, 5)).astype(np.float32), requires_grad=True)  # (C_out, C_in, kH, kW)
b = cn.tensor(np.zeros(8, np.float32), requires_grad=True)

t0 = time.perf_counter()
y = F.conv2d(x, w, b, padding=2)                 # (2, 8, 28, 28)
z = F.max_pool2d(F.relu(y), 2)                   # (2, 8, 14, 14)
loss = (z * z).sum()
loss.backward()
print(f"conv2d -> relu -> max_pool2d -> loss {loss.item():.4f}  (first call, incl. compile: {time.perf_counter() - t0:.2f} s)")

# Forward against SciPy: y[n, o] = sum_c correlate2d(x[n, c], w[o, c]) + b[o] (zero padding 2).
xs, ws = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
ref = sum(correlate2d(np.pad(xs[1, c], 2), ws[4, c], mode="valid") for c in range(3))
print(f"forward  vs scipy.signal.correlate2d: max |diff| = {np.abs(y.numpy()[1, 4] - ref).max():.2e}")

# Weight-gradient against central finite differences (float64).
x64, w64 = x.numpy().astype(np.float64), w.numpy().astype(np.float64)


def loss64(wv):
    out = F.max_pool2d(F.relu(F.conv2d(x64, wv, np.zeros(8), padding=2)), 2).numpy()
    return float((out * out).sum())


i, eps = (3, 1, 2, 2), 1e-6
wp, wm = w64.copy(), w64.copy()
wp[i] += eps
wm[i] -= eps
fd = (loss64(wp) - loss64(wm)) / (2 * eps)
print(f"backward dL/dw{list(i)}: autograd {w.grad.numpy()[i]:.5f}, finite difference {fd:.5f}")
