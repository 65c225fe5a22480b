"""Per-launch cost of Numba's threading layers through the public API: a LeNet-5 SGD step at
batch 64, a 1x6x28x28 max pool, LeNet-5 inference at batch 1; min/median of 5 timings.

    for L in tbb omp workqueue; do NUMBA_THREADING_LAYER=$L python bench/threading_layers.py; done

cnn_numba/__init__.py's layer priority (tbb, omp, workqueue) comes from these figures.
"""
import sys, time, numpy as np, cnn_numba as cn, numba
import cnn_numba.functional as F
from cnn_numba import models, optim, nn
cn.manual_seed(0)
m = models.lenet5(); opt = optim.SGD(m.parameters(), lr=0.01, momentum=0.9); lf = nn.CrossEntropyLoss()
x = cn.tensor(np.random.rand(64, 1, 28, 28).astype(np.float32)); y = np.arange(64) % 10
def step():
    opt.zero_grad(); l = lf(m(x), y); l.backward(); opt.step()
for _ in range(10): step()
best = []
for r in range(5):
    t = time.perf_counter()
    for _ in range(40): step()
    best.append((time.perf_counter() - t) / 40 * 1e3)
p = cn.tensor(np.random.rand(1, 6, 28, 28).astype(np.float32))
F.max_pool2d(p, 2)
pt = []
for r in range(5):
    t = time.perf_counter()
    for _ in range(2000): F.max_pool2d(p, 2)
    pt.append((time.perf_counter() - t) / 2000 * 1e6)
with cn.no_grad():
    xi = cn.tensor(np.random.rand(1, 1, 28, 28).astype(np.float32)); m.eval(); m(xi)
    it = []
    for r in range(5):
        t = time.perf_counter()
        for _ in range(500): m(xi)
        it.append((time.perf_counter() - t) / 500 * 1e6)
print(f"{numba.threading_layer():9s} step ms min/med {min(best):.2f}/{sorted(best)[2]:.2f}  maxpool us {min(pt):.1f}/{sorted(pt)[2]:.1f}  infer b1 us {min(it):.0f}/{sorted(it)[2]:.0f}")
