"""resnet8's conv layers, forward only, by each CPU algorithm through the public API
(``F.conv2d(..., algo=name)``) beside PyTorch's, at the batch sizes given (default 16 and
256): best of 5 timed stretches, microseconds per call. An algorithm that does not support a
layer runs its fallback (kernels/conv_algos.py), so its column then repeats another's.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/layer_algos.py [batch ...]
"""
import sys
import time

import numba
import numpy as np
import torch

import cnn_numba as cn
from cnn_numba import functional as F
from cnn_numba.kernels.conv_algos import TABLE

torch.set_num_threads(numba.get_num_threads())
LAYERS = [  # c_in, c_out, input side, kernel, stride, padding
    (1, 16, 28, 3, 1, 1), (16, 16, 28, 3, 1, 1), (16, 32, 28, 3, 2, 1), (16, 32, 28, 1, 2, 0),
    (32, 32, 14, 3, 1, 1), (32, 64, 14, 3, 2, 1), (32, 64, 14, 1, 2, 0), (64, 64, 7, 3, 1, 1)]


def best_us(f, n):
    f()
    f()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main(batches):
    rng = np.random.default_rng(0)
    print("batch layer " + " ".join(f"{a:>9}" for a in TABLE.names) + "   pytorch")
    for b in batches:
        n = max(3, 2000 // b)
        for cin, cout, hw, k, s, p in LAYERS:
            x = rng.standard_normal((b, cin, hw, hw)).astype(np.float32)
            w = (0.1 * rng.standard_normal((cout, cin, k, k))).astype(np.float32)
            xc, wc, xt, wt = cn.tensor(x), cn.tensor(w), torch.from_numpy(x), torch.from_numpy(w)
            row = []
            with cn.no_grad():
                for algo in TABLE.names:
                    row.append(best_us(lambda: F.conv2d(xc, wc, None, s, p, algo=algo), n))
            with torch.no_grad():
                theirs = best_us(lambda: torch.nn.functional.conv2d(xt, wt, None, s, p), n)
            name = f"{cin}->{cout} {hw}x{hw} k{k} s{s}"
            print(f"{b:5d} {name:20s} " + " ".join(f"{t:9.0f}" for t in row) + f" {theirs:9.0f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16, 256])
