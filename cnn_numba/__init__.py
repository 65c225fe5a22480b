"""cnn_numba: a convolutional-network engine whose kernels are Numba-compiled.

    import cnn_numba as cn
    import cnn_numba.functional as F
    x = cn.tensor(images, requires_grad=True)          # (N, C, H, W), float32
    y = F.conv2d(x, w, b, stride=1, padding="same")
    y.sum().backward()                                  # x.grad, w.grad, b.grad
"""
import os

# Numba's OpenMP workers spin after each parallel loop by default, and on a small
# machine that spinning starves the BLAS threads of the im2col products that run
# between those loops (measured: 10x slower conv on 2 cores). Passive waiting
# costs nothing measurable. It must be set before the OpenMP runtime starts;
# setdefault leaves a user's own choice alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import kernels  # noqa: F401  (registers the CPU kernels with the backend)
from . import functional
from .tensor import Function, Tensor, is_grad_enabled, no_grad, tensor
from . import models, nn, optim
from .random import manual_seed
from .summary import summary

__version__ = "0.1.0"
__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "Function", "functional", "nn", "optim", "models",
           "manual_seed", "summary", "__version__"]
