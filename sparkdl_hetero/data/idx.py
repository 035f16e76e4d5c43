"""IDX files (MNIST, Fashion-MNIST), gzip-compressed or not."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

# IDX type codes -> big-endian NumPy dtypes
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{os.fspath(path)}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (decompressed first when it is gzip data, whatever its name).

    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int, 0x0D float,
    0x0E double), the number of dimensions, then each dimension as a big-endian uint32. The result has the
    file's shape and its type in native byte order. Raises ``ValueError`` naming the file on a bad header or
    a data size that does not match the dimensions.
    """
    name = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{name}: not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES:
        raise ValueError(f"{name}: not an IDX file: magic number {raw[:4].hex()} (expected 0000 then a type code "
                         f"in {', '.join(f'{c:02x}' for c in IDX_TYPES)} then the number of dimensions)")
    dtype, ndim = IDX_TYPES[raw[2]], raw[3]
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise ValueError(f"{name}: IDX dimensions {dims} of {dtype.itemsize}-byte values need {expected} data bytes, "
                         f"found {actual} ({'truncated' if actual < expected else 'trailing data'})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
