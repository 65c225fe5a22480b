"""CUDA backend: every op as a ``@cuda.jit`` kernel (numba-cuda), registered under
device ``"cuda"``. Imported on the first use of ``device="cuda"`` (backend.py), so a
CPU-only user never imports numba.cuda.

    launch.py       grid sizes, allocation, the no-host-array rule
    memory.py       the caching device allocator (installed before the first context)
    index.py        the CPU's scalar index helpers compiled for the device
    elementwise.py  copies, broadcasting add/mul, reductions, relu and the conv epilogue,
                    cat/split, permute
    gemm.py         shared-memory tiled matrix product with register blocking
    conv.py         direct and im2col convolution, forward and both gradients
    pool.py         max (argmax), unpool, average and adaptive pooling
    nn.py           batch norm, softmax cross-entropy, sigmoid/tanh, optimiser steps
"""
from . import conv, elementwise, gemm, nn, pool  # noqa: F401  (registration)
