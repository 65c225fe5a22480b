"""IDX files, the format MNIST and Fashion-MNIST ship in: read (raw or gzip) and write.

An IDX file is a 4-byte big-endian magic number, the dimensions, then the array:

    bytes 0-1     0x0000
    byte  2       type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                  0x0D float32, 0x0E float64 (all big-endian)
    byte  3       number of dimensions D
    4*D bytes     each dimension, uint32 big-endian
    the rest      prod(dims) items in C order, nothing after them

So MNIST's images start 0x00000803 (uint8, 3-D: N x 28 x 28) and its labels 0x00000801
(uint8, 1-D: N). Every check below turns a bad file into a ``ValueError`` that names the
file: a truncated or padded file must never come back as a plausible-looking array.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib

import numpy as np

IMAGES_MAGIC = 0x00000803  # uint8, 3-D
LABELS_MAGIC = 0x00000801  # uint8, 1-D

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {(np.dtype(t).kind, np.dtype(t).itemsize): code for code, t in _DTYPES.items()}


def _read_bytes(path, sha256: str | None = None) -> bytes:
    """The file's content, gunzipped if it is gzip (told by its content, not its name), after
    checking the SHA-256 of the bytes on disk if ``sha256`` is given."""
    with open(path, "rb") as f:
        raw = f.read()
    if sha256 is not None and (got := hashlib.sha256(raw).hexdigest()) != sha256:
        raise ValueError(f"{os.fspath(path)}: SHA-256 {got} is not the {sha256} recorded when it was "
                         "saved: the file changed since; delete it (it is downloaded again)")
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # bad CRC, cut-off stream, bad deflate data
        raise ValueError(f"{os.fspath(path)}: corrupt or truncated gzip data ({e})") from None


def read_idx(path, magic: int | None = None, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian numpy array of the stored shape.

    ``magic``, if given, is the magic number the file must have, e.g. ``IMAGES_MAGIC``;
    ``sha256``, the SHA-256 the file's bytes must have (of the .gz file if it is one).
    Raises ``ValueError`` naming the file for a wrong magic number, a header cut short, or
    data shorter or longer than the dimensions say.
    """
    name = os.fspath(path)
    raw = _read_bytes(path, sha256)
    if len(raw) < 4:
        raise ValueError(f"{name}: {len(raw)} bytes, too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _DTYPES or ndim == 0:
        raise ValueError(f"{name}: not an IDX file (magic number 0x{found:08X})")
    if magic is not None and found != magic:
        raise ValueError(f"{name}: magic number 0x{found:08X}, expected 0x{magic:08X}")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(f"{name}: header cut short: {ndim} dimensions need {start} bytes, "
                         f"file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    dtype = np.dtype(_DTYPES[code])
    need, have = math.prod(dims) * dtype.itemsize, len(raw) - start
    if have != need:
        what = "truncated" if have < need else "trailing bytes"
        raise ValueError(f"{name}: {what}: shape {dims} of {dtype.name} needs {need} data bytes, "
                         f"file has {have}")
    # frombuffer gives a read-only big-endian view; astype copies into a writable native array.
    return np.frombuffer(raw, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path, array) -> None:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64; 1 to 255 dims) as IDX.

    Gzip-compressed when ``path`` ends in ``.gz`` (with mtime 0, so equal arrays give equal
    bytes, which keeps the tests' checksums stable).
    """
    a = np.asarray(array)
    code = _CODES.get((a.dtype.kind, a.dtype.itemsize))
    if code is None:
        raise TypeError(f"IDX cannot store dtype {a.dtype}")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {a.ndim}")
    data = struct.pack(f">BBBB{a.ndim}I", 0, 0, code, a.ndim, *a.shape)
    data += np.ascontiguousarray(a, dtype=a.dtype.newbyteorder(">")).tobytes()
    if os.fspath(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
