"""Batches for training: shuffle, augment, normalise.

    N = examples, B = batch size, H, W = image height and width (28 for MNIST)

Images come in as uint8 (N, H, W) or (N, 1, H, W) (floats are taken as already in [0, 1]);
batches go out as float32 x (B, 1, H, W) and int64 y (B,). All randomness of an epoch comes
from one generator seeded with (seed, epoch number), so two loaders built alike give the same
batches, epoch after epoch, whatever else used numpy's random state in between.
"""
from __future__ import annotations

import numpy as np

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def train_val_split(images, labels, val_fraction: float = 0.1, seed: int = 0):
    """Split (N, ...) arrays at random into (train_images, train_labels, val_images, val_labels).

    The validation part has round(N * val_fraction) examples; both parts must be non-empty.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    n_val = round(len(images) * val_fraction)
    if not 0 < n_val < len(images):
        raise ValueError(f"val_fraction={val_fraction} of {len(images)} examples leaves "
                         f"{n_val} for validation and {len(images) - n_val} for training")
    order = np.random.default_rng(seed).permutation(len(images))
    val, train = order[:n_val], order[n_val:]
    return images[train], labels[train], images[val], labels[val]


def random_shift(images: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Shift each image (N, H, W) by -pad..pad pixels along each axis, zeros filling in.

    The same as zero-padding by ``pad`` and cropping H x W at a random offset.
    """
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    top = rng.integers(0, 2 * pad + 1, n)
    left = rng.integers(0, 2 * pad + 1, n)
    rows = top[:, None] + np.arange(h)  # (N, H)
    cols = left[:, None] + np.arange(w)  # (N, W)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_hflip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image (N, H, W) left-right with probability 1/2. Wrong for digits (a
    mirrored 2 is no digit), so the loader keeps it off unless asked."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = out[flip, :, ::-1]
    return out


class DataLoader:
    """Iterate over (x float32 (B, 1, H, W), y int64 (B,)) batches of ``images``, ``labels``.

    shuffle: new order each epoch, from (seed, epoch).
    drop_last: drop a last batch smaller than ``batch_size`` instead of yielding it.
    normalize: True for MNIST's (mean, std), a (mean, std) pair, or False for [0, 1] only.
    augment: random shifts of up to ``pad`` pixels (zero-padding plus random crop), and left-right
        flips if ``hflip``.
    """

    def __init__(self, images, labels, batch_size: int = 64, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, normalize=True, augment: bool = False, *,
                 pad: int = 2, hflip: bool = False):
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3:
            raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1 or pad < 0:
            raise ValueError(f"need batch_size >= 1 and pad >= 0, got {batch_size}, {pad}")
        if normalize is True:
            normalize = (MNIST_MEAN, MNIST_STD)
        self.images, self.labels = images, np.asarray(labels).astype(np.int64)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last = drop_last
        self.normalize, self.augment, self.pad, self.hflip = normalize, augment, pad, hflip
        self.epoch = 0

    def __len__(self) -> int:
        n, b = len(self.images), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        return self._batches(rng)

    def _batches(self, rng: np.random.Generator):
        n = len(self.images)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]  # (B, H, W), still uint8: padding with 0 is black either way
            if self.augment:
                x = random_shift(x, self.pad, rng)
                if self.hflip:
                    x = random_hflip(x, rng)
            yield self._to_float(x)[:, None], self.labels[idx]

    def _to_float(self, x: np.ndarray) -> np.ndarray:
        scale = np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1)
        x = x.astype(np.float32) * scale  # [0, 1]
        if self.normalize:
            mean, std = self.normalize
            x = (x - np.float32(mean)) / np.float32(std)
        return x
