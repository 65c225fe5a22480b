"""Downloading MNIST and Fashion-MNIST into a local cache, verified by SHA-256.

Each file is tried on each mirror in turn. A download streams into a temporary file in the
destination folder and is renamed (``os.replace``, atomic on one filesystem) onto its final
name only once its SHA-256 matched, so an interrupted, truncated or tampered download never
leaves a file that looks complete. Mirrors and checksums are arguments, so the tests can
point everything at a server on 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.request
from pathlib import Path

from ..fileio import atomic_write

DATA_DIR_ENV = "CNN_NUMBA_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/cnn_numba")

# (images, labels) file names of each split; the same for both datasets.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

# SHA-256 of the .gz files as served, from tensorflow/datasets' url_checksums/mnist.txt and
# fashion_mnist.txt (which also give the sizes: MNIST 9912422, 28881, 1648877, 4542 bytes).
# The MNIST mirrors serve the same bytes: torchvision checks each file from all of them
# against one MD5 (f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...).
SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}


class DownloadError(OSError):
    """No mirror delivered a file with the expected SHA-256; the message lists each try."""


def data_root(data_dir=None) -> Path:
    """The cache root: ``data_dir`` if given, else ``$CNN_NUMBA_DATA``, else ~/.cache/cnn_numba."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(root).expanduser()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_url(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; rename it onto ``dest`` if whole
    and matching ``sha256``, else delete it and raise."""

    def write(out):
        digest, size = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=timeout) as response:
            # Said only once a server answered, so an offline machine falling back stays quiet.
            print(f"cnn_numba: downloading {url}", file=sys.stderr)
            length = response.headers.get("Content-Length")
            while chunk := response.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        # http.client may return a short body without complaint when the peer closes early.
        if length is not None and size != int(length):
            raise ValueError(f"connection closed after {size} of {length} bytes")
        if digest.hexdigest() != sha256:
            raise ValueError(f"SHA-256 mismatch: got {digest.hexdigest()}, expected {sha256}")

    atomic_write(dest, write)


def fetch_file(filename: str, folder, mirrors, sha256: str, timeout: float = 10.0) -> Path:
    """``folder/filename``, downloaded from the first of ``mirrors`` (base URLs) that serves it
    with the right SHA-256; a file already there with that SHA-256 is kept without a request.
    Raises ``DownloadError`` listing every URL tried and why it failed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / filename
    if dest.is_file() and sha256_of(dest) == sha256:
        return dest
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            _fetch_url(url, dest, sha256, timeout)
            return dest
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, resets
            errors.append(f"  {url}: {e}")
    raise DownloadError(f"could not download {filename} into {folder}:\n" + "\n".join(errors))


def download(dataset: str = "mnist", data_dir=None, splits=("train", "test"),
             mirrors=None, checksums=None, timeout: float = 10.0) -> list[Path]:
    """Download the .gz files of ``splits`` of ``dataset`` ("mnist" or "fashion-mnist") into
    ``data_root(data_dir)/dataset``; returns their paths (images, labels per split).

    ``mirrors`` (base URLs, tried in order) and ``checksums`` ({file name: SHA-256}) default
    to ``MIRRORS[dataset]`` and ``SHA256[dataset]``. ``timeout`` bounds each socket operation
    (connect, each read) in seconds, not the whole file.
    """
    if dataset not in MIRRORS:
        raise ValueError(f"dataset must be one of {sorted(MIRRORS)}, got {dataset!r}")
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if not set(splits) <= set(FILES):
        raise ValueError(f"splits must be among {sorted(FILES)}, got {splits!r}")
    mirrors = MIRRORS[dataset] if mirrors is None else mirrors
    checksums = SHA256[dataset] if checksums is None else checksums
    folder = data_root(data_dir) / dataset
    return [fetch_file(name, folder, mirrors, checksums[name], timeout)
            for split in splits for name in FILES[split]]
