"""Blob chunking, verified reassembly, weights-only state dicts, and the blob cache."""

from __future__ import annotations

import io
import os
import random
import struct
from pathlib import Path

import msgpack
import pytest
import torch

from broker.blobs import (
    BlobAssembler,
    BlobCache,
    bytes_to_state_dict,
    reassemble,
    sha256_hex,
    split_blob,
    state_dict_to_bytes,
)
from broker.codec import decode, encode, make_envelope
from broker.errors import WireError
from broker.limits import BLOB_CHUNK_BYTES, MAX_MESSAGE_BYTES


@pytest.fixture(scope="module")
def big_blob() -> bytes:
    return random.Random(17).randbytes(17 * 1024 * 1024)  # seeded: every run tampers the same bytes


def test_split_and_reassemble_17_mib(big_blob: bytes) -> None:
    chunks = split_blob(big_blob)
    assert len(chunks) == 3 and all(len(c.data) <= BLOB_CHUNK_BYTES <= MAX_MESSAGE_BYTES for c in chunks)
    assert {c.sha256 for c in chunks} == {sha256_hex(big_blob)} and [c.count for c in chunks] == [3, 3, 3]
    # every chunk travels as one message within the 8 MiB limit
    wire = [encode(make_envelope(c, dev="", seq=i)) for i, c in enumerate(chunks)]
    assert max(len(w) for w in wire) <= MAX_MESSAGE_BYTES
    received = [decode(w).body for w in wire]
    random.Random(0).shuffle(received)
    assert reassemble(received) == big_blob


def test_reassembly_errors(big_blob: bytes) -> None:
    chunks = split_blob(big_blob[: 3 * 1024 * 1024], chunk_bytes=1024 * 1024)
    with pytest.raises(WireError, match=r"^index: missing chunk\(s\) \[1\]"):
        reassemble([chunks[0], chunks[2]])
    with pytest.raises(WireError, match="^index: duplicate chunk 0"):
        reassemble([chunks[0], chunks[0], chunks[1], chunks[2]])
    with pytest.raises(WireError, match="^sha256: reassembled blob hashes to"):
        flipped = bytes([chunks[2].data[0] ^ 0xFF]) + chunks[2].data[1:]  # always a different byte
        tampered = [chunks[0], chunks[1], type(chunks[2])(chunks[2].sha256, 2, 3, flipped)]
        reassemble(tampered)
    with pytest.raises(WireError, match="^sha256: chunk of blob"):
        reassemble(chunks, sha256="00" * 32)
    assembler = BlobAssembler(chunks[0].sha256)
    assembler.add(chunks[0])
    with pytest.raises(WireError, match="^count"):
        assembler.add(type(chunks[1])(chunks[1].sha256, 1, 4, chunks[1].data))
    assert assembler.missing() == [1, 2]
    with pytest.raises(WireError, match="^chunk_bytes"):
        split_blob(b"x", chunk_bytes=MAX_MESSAGE_BYTES)


def test_empty_blob_is_one_chunk() -> None:
    chunks = split_blob(b"")
    assert len(chunks) == 1 and reassemble(chunks) == b""


def test_state_dict_round_trip_is_weights_only() -> None:
    state = {"conv.weight": torch.randn(8, 3, 3, 3).to(memory_format=torch.channels_last),
             "bn.num_batches_tracked": torch.tensor(7), "fc.bias": torch.randn(10).half()}
    back = bytes_to_state_dict(state_dict_to_bytes(state))
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)


class Payload:
    def __reduce__(self) -> tuple[object, ...]:
        return (os.getpid, ())


def test_state_dict_bytes_are_msgpack_and_raw_tensors_not_a_torch_format() -> None:
    """The bytes are fixed by the documented layout alone (no torch.save, no pickle): a board on another
    torch version reads them the same."""
    state = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(3)}
    data = state_dict_to_bytes(state)
    w = bytes([2, 1]) + (2).to_bytes(4, "little") + struct.pack("<2f", 1.0, -2.0)
    n = bytes([5, 0]) + struct.pack("<q", 3)
    assert data == msgpack.packb({"format": "harmony-state/1", "tensors": {
        "w": msgpack.ExtType(84, w), "n": msgpack.ExtType(84, n)}}, use_bin_type=True)


def test_torch_pickles_and_garbage_are_refused() -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1), "evil": Payload()}, buffer)
    with pytest.raises(WireError, match="^blob: "):
        bytes_to_state_dict(buffer.getvalue())
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)  # even a plain torch state dict: not this format
    with pytest.raises(WireError, match="^blob: "):
        bytes_to_state_dict(buffer.getvalue())
    with pytest.raises(WireError, match="^blob"):
        bytes_to_state_dict(b"garbage")
    with pytest.raises(WireError, match="^blob: expected a harmony-state/1 map"):
        bytes_to_state_dict(msgpack.packb([1, 2]))
    with pytest.raises(WireError, match="^blob: expected a mapping of parameter names to tensors"):
        bytes_to_state_dict(msgpack.packb({"format": "harmony-state/1", "tensors": {"w": [1.0]}}))
    with pytest.raises(WireError, match="^blob.w"):
        bad = msgpack.ExtType(84, b"\x02")  # a truncated tensor header
        bytes_to_state_dict(msgpack.packb({"format": "harmony-state/1", "tensors": {"w": bad}}))


def test_memory_cache_fetches_only_changed_hashes() -> None:
    cache = BlobCache(max_entries=2)
    a, b, c = b"weights-a", b"weights-b", b"weights-c"
    sha_a = cache.put(a)
    assert sha_a == sha256_hex(a) and not cache.needs_fetch(sha_a) and cache.get(sha_a) == a
    assert cache.needs_fetch(sha256_hex(b))
    cache.put(b)
    cache.get(sha_a)  # a is now the most recently used
    cache.put(c)
    assert sha_a in cache and sha256_hex(b) not in cache and sha256_hex(c) in cache
    with pytest.raises(WireError, match="^sha256: data hashes to"):
        cache.put(b"x", sha256=sha_a)


def test_directory_cache_survives_and_drops_corrupt_files(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path / "blobs")
    sha = cache.put(b"model bytes")
    assert BlobCache(tmp_path / "blobs").get(sha) == b"model bytes"
    (tmp_path / "blobs" / f"{sha}.blob").write_bytes(b"tampered")
    assert cache.get(sha) is None and cache.needs_fetch(sha)
    assert not list((tmp_path / "blobs").glob(".tmp-*"))
