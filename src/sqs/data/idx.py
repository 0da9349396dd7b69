"""Read and write IDX files (the MNIST / Fashion-MNIST container format), raw or gzipped.

IDX layout: a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 dimensions, then the array data in row-major order, big-endian.
Gzip compression is detected from the content (magic bytes ``1f 8b``), not the name.
"""

from __future__ import annotations

import gzip as _gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from sqs.io import UserError, atomic_write

__all__ = ["IDXError", "DTYPES", "read_idx", "read_idx_bytes", "parse_idx", "encode_idx", "write_idx"]

#: IDX dtype code -> numpy dtype (big-endian, as stored on disk).
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
_DEFAULT_FIX = "replace it with an intact copy of the original file (for MNIST / Fashion-MNIST: re-run `sqs data fetch <name>`)"


class IDXError(UserError, ValueError):
    """A file is not a valid IDX file. The message names the file, the problem and a fix."""


def _err(path, what: str, fix: str | None) -> IDXError:
    return IDXError(f"{path}: {what}. To fix: {fix or _DEFAULT_FIX}.")


def read_idx_bytes(path: str | os.PathLike, *, fix: str | None = None) -> bytes:
    """The IDX content of `path`, decompressed if the file is gzipped (detected by magic bytes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _err(path, "file not found", fix) from None
    except OSError as e:
        raise _err(path, f"cannot read file ({e.strerror or e})", fix) from e
    if data[:2] == _GZIP_MAGIC:
        try:
            data = _gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:  # BadGzipFile is an OSError
            raise _err(path, f"the gzip stream is corrupt or truncated ({e})", fix) from e
    return data


def parse_idx(data: bytes, path: str | os.PathLike = "<bytes>", *, fix: str | None = None) -> np.ndarray:
    """Decode IDX `data` (already decompressed) into a native-endian numpy array.

    `path` is only used in error messages. Raises IDXError on any structural problem.
    """
    n = len(data)
    if n < 4:
        raise _err(path, f"too short to be an IDX file ({n} bytes; the header alone needs at least 8)", fix)
    z0, z1, code, ndim = data[0], data[1], data[2], data[3]
    if z0 != 0 or z1 != 0:
        raise _err(
            path,
            f"bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero bytes, then a dtype code "
            "and the number of dimensions); this is not an IDX file, or it is corrupt or compressed with "
            "something other than gzip",
            fix,
        )
    if code not in DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in DTYPES)
        raise _err(path, f"unknown IDX dtype code 0x{code:02x} in the magic number (expected one of {known})", fix)
    if ndim == 0:
        raise _err(path, "the magic number declares 0 dimensions (expected at least 1)", fix)
    header = 4 + 4 * ndim
    if n < header:
        raise _err(path, f"truncated header: {ndim} dimensions need {header} header bytes, the file has {n}", fix)
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = DTYPES[code]
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    got = n - header
    dims = "x".join(map(str, shape))
    if got < expected:
        raise _err(
            path,
            f"truncated data: shape {dims} of {dtype.name} needs {expected} bytes after the header, "
            f"the file has {got} ({expected - got} missing)",
            fix,
        )
    if got > expected:
        raise _err(
            path,
            f"{got - expected} unexpected trailing bytes: shape {dims} of {dtype.name} needs exactly "
            f"{expected} bytes after the header, the file has {got}",
            fix,
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header, count=expected // dtype.itemsize)
    # Copy into a writable, native-endian array.
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx(path: str | os.PathLike, *, fix: str | None = None) -> np.ndarray:
    """Read a raw or gzipped IDX file into a native-endian numpy array.

    Every problem (not found, bad gzip, bad magic, unknown dtype code, truncated or
    over-long payload) raises IDXError naming the file; `fix` replaces the default
    "how to fix" advice in the message.
    """
    return parse_idx(read_idx_bytes(path, fix=fix), path, fix=fix)


def encode_idx(array) -> bytes:
    """The uncompressed IDX encoding of `array` (uint8, int8, int16, int32, float32 or float64)."""
    arr = np.asarray(array)
    code = _CODES.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"write_idx: dtype {arr.dtype} has no IDX code; convert the array to one of "
            "uint8, int8, int16, int32, float32, float64 first"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"write_idx: IDX arrays need 1..255 dimensions, got {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"write_idx: dimension too large for IDX (max 2**32-1): {arr.shape}")
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + np.ascontiguousarray(arr, dtype=DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike, array, gzip: bool = False) -> Path:
    """Write `array` as an IDX file at `path` (gzip-compressed if `gzip`), atomically."""
    data = encode_idx(array)
    if gzip:
        data = _gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write(path, lambda p: p.write_bytes(data))
