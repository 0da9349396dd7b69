"""IDX reader/writer: round trips and every kind of damage gives a clear IDXError."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from sqs.data.idx import IDXError, encode_idx, read_idx, write_idx


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, size=(300, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_uint8(tmp_path, images, gz):
    # The name never says ".gz": compression is detected from the content.
    path = write_idx(tmp_path / "train-images-idx3-ubyte", images, gzip=gz)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (300, 28, 28)
    np.testing.assert_array_equal(out, images)
    out[0, 0, 0] = 1  # writable


@pytest.mark.parametrize("dtype", ["i1", ">i2", "<i4", "f4", ">f8"])
def test_round_trip_other_dtypes(tmp_path, dtype):
    a = np.arange(-12, 12).reshape(2, 3, 4).astype(dtype)
    out = read_idx(write_idx(tmp_path / "x.idx", a))
    assert out.dtype.isnative and out.dtype == a.dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, a)


def test_header_is_big_endian(tmp_path):
    data = encode_idx(np.zeros((2, 3), dtype=np.int32))
    assert data[:4] == b"\x00\x00\x0c\x02" and struct.unpack(">2I", data[4:12]) == (2, 3)


def test_write_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="no IDX code"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _corrupt(tmp_path, data: bytes, gz: bool = False):
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _expect(path, *patterns):
    with pytest.raises(IDXError) as ei:
        read_idx(path)
    msg = str(ei.value)
    assert str(path) in msg and "To fix" in msg
    for p in patterns:
        assert p in msg, msg
    assert isinstance(ei.value, ValueError)
    return msg


@pytest.mark.parametrize("gz", [False, True])
def test_corrupt_magic(tmp_path, images, gz):
    data = bytearray(encode_idx(images))
    data[0] = 0x12
    _expect(_corrupt(tmp_path, bytes(data), gz), "bad magic number")


def test_unknown_dtype_code(tmp_path, images):
    data = bytearray(encode_idx(images))
    data[2] = 0x07
    _expect(_corrupt(tmp_path, bytes(data)), "unknown IDX dtype code 0x07")


def test_zero_dims_and_wrong_ndim(tmp_path, images):
    data = bytearray(encode_idx(images))
    data[3] = 0
    _expect(_corrupt(tmp_path, bytes(data)), "0 dimensions")
    # ndim 4 makes the reader take the first 4 data bytes as a fourth dimension: sizes no longer add up.
    data[3] = 4
    _expect(_corrupt(tmp_path, bytes(data)), "truncated data")
    # ndim 2 leaves 4 header bytes in the payload: trailing bytes.
    data[3] = 2
    _expect(_corrupt(tmp_path, bytes(data)), "trailing bytes")


def test_too_short(tmp_path):
    _expect(_corrupt(tmp_path, b"\x00\x00"), "too short")
    _expect(_corrupt(tmp_path, b"\x00\x00\x08\x03\x00\x00\x00\x01"), "truncated header")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, images, gz):
    data = encode_idx(images)[:-10]
    _expect(_corrupt(tmp_path, data, gz), "truncated data", "10 missing")


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path, images, gz):
    data = encode_idx(images) + b"\x00" * 3
    _expect(_corrupt(tmp_path, data, gz), "3 unexpected trailing bytes")


def test_truncated_gzip_stream(tmp_path, images):
    path = tmp_path / "x"
    path.write_bytes(gzip.compress(encode_idx(images))[:-20])
    _expect(path, "gzip stream is corrupt or truncated")


def test_missing_file_and_custom_fix(tmp_path):
    with pytest.raises(IDXError, match=r"file not found\. To fix: run `sqs data fetch mnist`"):
        read_idx(tmp_path / "nope", fix="run `sqs data fetch mnist`")
