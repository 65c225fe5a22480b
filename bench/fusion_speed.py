"""Eval inference with the conv -> batch norm -> ReLU fusion on and off (nn.module.FUSE),
interleaved in one process: LeNet-5 and resnet8 at batch 1, 16 and 256 under no_grad, the
fastest of ``--rounds`` stretches per variant, microseconds per call and the ratio
fused/unfused (docs/convolution.md, "Fused epilogue"). The outputs are checked equal bit for bit.

    python bench/fusion_speed.py [--rounds 7]
"""
import argparse
import time

import numpy as np

import cnn_numba as cn
from cnn_numba import models
from cnn_numba.nn import module


def stretch(model, x, fuse: bool, n: int) -> float:
    """Microseconds per forward over ``n`` calls."""
    module.FUSE = fuse
    t = time.perf_counter()
    with cn.no_grad():
        for _ in range(n):
            model(x)
    return (time.perf_counter() - t) / n * 1e6


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    fuse = module.FUSE
    try:
        for name in ("lenet5", "resnet8"):
            cn.manual_seed(0)
            model = getattr(models, name)().eval()
            for b in (1, 16, 256):
                x = cn.tensor(np.random.default_rng(0).random((b, 1, 28, 28)).astype(np.float32))
                outs = []
                for on in (True, False):
                    module.FUSE = on
                    with cn.no_grad():
                        outs.append(model(x).numpy())
                assert np.array_equal(outs[0], outs[1]), "fused and unfused outputs differ"
                n = max(3, 2000 // b) if name == "lenet5" else max(2, 200 // b)
                best = {True: float("inf"), False: float("inf")}
                for _ in range(args.rounds):
                    for on in (True, False):
                        best[on] = min(best[on], stretch(model, x, on, n))
                print(f"{name} b{b}: fused {best[True]:.0f} us, unfused {best[False]:.0f} us, "
                      f"ratio {best[True] / best[False]:.3f}", flush=True)
    finally:
        module.FUSE = fuse


if __name__ == "__main__":
    main()
