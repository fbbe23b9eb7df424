"""IDX reader: round trips through files written here, and clear errors on malformed ones."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from harmony.data.idx import read_idx, write_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_uint8_round_trip_raw_and_gz(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = tmp_path / name
    write_idx(path, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    loaded = read_idx(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (7, 5, 3)
    np.testing.assert_array_equal(loaded, images)
    assert loaded.flags.writeable


@pytest.mark.parametrize("compress", [False, True])
def test_int32_round_trip_is_big_endian_on_disk(tmp_path: Path, compress: bool) -> None:
    values = np.array([[-2, 1], [70000, 2**31 - 1]], dtype=np.int32)
    path = tmp_path / "values.idx"
    write_idx(path, values, compress=compress)
    raw = gzip.decompress(path.read_bytes()) if compress else path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    assert raw[12:16] == (-2).to_bytes(4, "big", signed=True)
    loaded = read_idx(path)
    assert loaded.dtype == np.dtype("int32") and loaded.dtype.isnative
    np.testing.assert_array_equal(loaded, values)


def test_hand_written_labels_file(tmp_path: Path) -> None:
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 9, 0, 4]))
    np.testing.assert_array_equal(read_idx(path), [9, 0, 4])


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (bytes([1, 0, 0x08, 1, 0, 0, 0, 1, 5]), "two zero bytes"),
        (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "unknown IDX dtype code 0x07"),
        (bytes([0, 0, 0x08, 0]), "0 dimensions"),
        (bytes([0, 0, 0x08, 2, 0, 0, 0, 1]), "truncated IDX header"),
        (bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 5, 6]), "payload is 2 bytes"),
        (bytes([0, 0]), "not an IDX file"),
    ],
)
def test_malformed_header_names_the_file(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "broken-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(blob))
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent-idx1-ubyte")
