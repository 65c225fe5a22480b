"""Atomic file writes (a crash or an interrupted download never leaves half a file behind), and
.npz reading that checks each array's header before allocating it."""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import numpy.lib.format as npy


def atomic_write(path, write: Callable) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it onto ``path``.

    If ``write`` raises (a failed download, a checksum mismatch), the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_npz(path) -> dict:
    """{key: array} of an ``np.savez`` file, every member's .npy header checked before its data
    is read: no pickled objects, and the size the header claims (shape x item size) must be the
    size the zip records for the member, so a header claiming 10**12 floats is an error, not
    an 8 TB allocation. Raises ``ValueError`` naming the member (``zipfile.BadZipFile``,
    ``OSError`` for an unreadable file)."""
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            key = info.filename.removesuffix(".npy")
            if key == info.filename or key in arrays:
                raise ValueError(f"member {info.filename!r} is not a distinct .npy array")
            with archive.open(info) as f:
                version = npy.read_magic(f)
                if version not in _HEADER_READERS:
                    raise ValueError(f"{key}: unsupported .npy format version {version}")
                shape, fortran, dtype = _HEADER_READERS[version](f)
                if dtype.hasobject:
                    raise ValueError(f"{key}: dtype {dtype} holds Python objects")
                claimed, stored = math.prod(shape) * dtype.itemsize, info.file_size - f.tell()
                if claimed != stored:
                    raise ValueError(f"{key}: the header claims shape {shape} of {dtype} ({claimed} bytes), "
                                     f"the file holds {stored} bytes")
                data = f.read(claimed)
            if len(data) != claimed:
                raise ValueError(f"{key}: {len(data)} of {claimed} bytes")
            arrays[key] = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").copy()
    return arrays


_HEADER_READERS = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
