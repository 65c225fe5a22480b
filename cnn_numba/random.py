"""The one random number generator of cnn_numba: weight initialisation (nn.init) and
dropout masks draw from it, so ``manual_seed(s)`` makes a run reproducible.

Masks and initial weights are drawn on the host and copied to the tensor's device,
so a seed gives the same numbers on every device.
"""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Re-seed the generator in place (objects holding it see the new stream) and return it."""
    _generator.bit_generator.state = np.random.PCG64(seed).state
    return _generator


def default_generator() -> np.random.Generator:
    return _generator


__all__ = ["manual_seed", "default_generator"]
