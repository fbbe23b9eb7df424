"""Model weights as content-addressed blobs: chunking, verified reassembly, safe (de)serialisation, cache.

A blob is addressed by the sha256 (lowercase hex) of its whole content and split into chunks of at
most ``BLOB_CHUNK_BYTES`` (8 MiB − 64 KiB, so each encoded ``blob_chunk`` message stays within the
8 MiB message limit). Reassembly checks count, indices and the final hash; any inconsistency is a
``WireError``. A state dict travels as a msgpack map ``{"format": "harmony-state/1", "tensors": {name:
tensor}}``, each tensor the codec's raw ext type (``broker.codec``: dtype, shape, little-endian bytes):
no pickle, and nothing that depends on the torch version of either side (a board runs the torch
that runs on its CPU, the server another). ``BlobCache`` keeps blobs by hash so an agent fetches
weights only when the hash in ``round_start`` changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgpack
import torch

from broker.codec import TENSOR_EXT_CODE, decode_tensor, encode_tensor
from broker.errors import WireError
from broker.limits import BLOB_CHUNK_BYTES
from broker.schemas import BlobChunk
from broker.topics import validate_sha256

log = logging.getLogger(__name__)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex sha256 of ``data``: the blob's address."""
    return hashlib.sha256(data).hexdigest()


def split_blob(data: bytes | bytearray | memoryview, chunk_bytes: int = BLOB_CHUNK_BYTES) -> list[BlobChunk]:
    """Split ``data`` into ``blob_chunk`` messages of at most ``chunk_bytes`` each (one chunk if empty)."""
    if not 1 <= chunk_bytes <= BLOB_CHUNK_BYTES:
        raise WireError("chunk_bytes", f"expected 1 … {BLOB_CHUNK_BYTES} bytes per chunk, got {chunk_bytes}")
    view = memoryview(data).cast("B")
    sha = sha256_hex(view)
    count = max(1, -(-len(view) // chunk_bytes))
    return [
        BlobChunk(sha256=sha, index=i, count=count, data=bytes(view[i * chunk_bytes:(i + 1) * chunk_bytes]))
        for i in range(count)
    ]


class BlobAssembler:
    """Collects the chunks of one blob as they arrive (any order) and returns the verified bytes.

    ``add`` returns ``None`` until the last chunk, then the whole blob. A chunk for another hash,
    a different ``count``, an index seen before, or a final hash mismatch raise ``WireError``.
    """

    def __init__(self, sha256: str) -> None:
        self.sha256 = validate_sha256(sha256)
        self.count: int | None = None
        self._parts: dict[int, bytes] = {}

    @property
    def received(self) -> int:
        return len(self._parts)

    def missing(self) -> list[int]:
        """Indices still to come (empty before the first chunk tells the count)."""
        return [] if self.count is None else [i for i in range(self.count) if i not in self._parts]

    def add(self, chunk: BlobChunk) -> bytes | None:
        if chunk.sha256 != self.sha256:
            raise WireError("sha256", f"chunk of blob {chunk.sha256} given to the assembler of {self.sha256}")
        if self.count is None:
            self.count = chunk.count
        elif chunk.count != self.count:
            raise WireError("count", f"chunk {chunk.index} says {chunk.count} chunks, earlier ones said {self.count}")
        if not 0 <= chunk.index < self.count:
            raise WireError("index", f"expected a chunk index in [0, {self.count}), got {chunk.index}")
        if chunk.index in self._parts:
            raise WireError("index", f"duplicate chunk {chunk.index} of blob {self.sha256}")
        self._parts[chunk.index] = chunk.data
        if len(self._parts) < self.count:
            return None
        data = b"".join(self._parts[i] for i in range(self.count))
        actual = sha256_hex(data)
        if actual != self.sha256:
            raise WireError("sha256", f"reassembled blob hashes to {actual}, expected {self.sha256}")
        return data


def reassemble(chunks: Iterable[BlobChunk], sha256: str | None = None) -> bytes:
    """Join a complete set of chunks and verify the hash; ``WireError`` on a missing/duplicate chunk or bad hash."""
    chunks = list(chunks)
    if not chunks:
        raise WireError("index", "no chunks to reassemble")
    assembler = BlobAssembler(sha256 if sha256 is not None else chunks[0].sha256)
    result: bytes | None = None
    for chunk in chunks:
        result = assembler.add(chunk)
    if result is None:
        raise WireError("index", f"missing chunk(s) {assembler.missing()} of blob {assembler.sha256}")
    return result


STATE_FORMAT = "harmony-state/1"
"""The ``format`` of a state-dict blob (:func:`state_dict_to_bytes`)."""


def state_dict_to_bytes(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state dict: names and raw tensors (contiguous, on the CPU) in a msgpack map, in order."""
    tensors = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise WireError(f"state.{name}", f"expected str → tensor entries, got {type(value).__name__}")
        # weights are sent as they are (a diverged model's NaN included): the receiver decides
        tensors[name] = msgpack.ExtType(TENSOR_EXT_CODE, encode_tensor(value, field=f"state.{name}",
                                                                       allow_nonfinite=True))
    return msgpack.packb({"format": STATE_FORMAT, "tensors": tensors}, use_bin_type=True)


def bytes_to_state_dict(data: bytes | bytearray | memoryview) -> dict[str, torch.Tensor]:
    """The state dict of :func:`state_dict_to_bytes` (CPU tensors that own their memory); ``WireError`` if
    ``data`` is not one."""
    try:
        doc = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types (ExtraData, FormatError, ValueError, …)
        raise WireError("blob", f"not a {STATE_FORMAT} state dict ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or not isinstance(doc.get("tensors"), dict):
        raise WireError("blob", f"expected a {STATE_FORMAT} map of parameter names to tensors")
    state = {}
    for name, value in doc["tensors"].items():
        if not isinstance(name, str) or not isinstance(value, msgpack.ExtType) or value.code != TENSOR_EXT_CODE:
            raise WireError("blob", f"expected a mapping of parameter names to tensors, got {name!r}")
        state[name] = decode_tensor(value.data, field=f"blob.{name}", allow_nonfinite=True)
    return state


STATS_KEY = "__stats__"
"""The entry of a session upload that carries the session's training statistics (five float64)."""


COMPUTE_KEY = "__compute_s__"
"""The optional entry of a session upload with the seconds the device computed (one float64)."""


def session_upload_bytes(state: Mapping[str, torch.Tensor], stats: list[float],
                         compute_s: float | None = None) -> bytes:
    """A device's end-of-session upload: its trained client state plus the session's statistics
    (``harmony.algorithms.StepStats.vector``) and the seconds it spent computing, as one state-dict blob."""
    upload = dict(state)
    upload[STATS_KEY] = torch.tensor(stats, dtype=torch.float64)
    if compute_s is not None:
        upload[COMPUTE_KEY] = torch.tensor([compute_s], dtype=torch.float64)
    return state_dict_to_bytes(upload)


def read_session_upload(data: bytes | bytearray | memoryview
                        ) -> tuple[dict[str, torch.Tensor], list[float], float | None]:
    """The inverse of :func:`session_upload_bytes`: (client state, statistics, compute seconds or None)."""
    state = bytes_to_state_dict(data)
    stats = state.pop(STATS_KEY, None)
    if stats is None or stats.dtype != torch.float64 or stats.shape != (5,):
        raise WireError("body.data", f"a session upload needs a float64 [{STATS_KEY}] entry of 5 statistics")
    compute = state.pop(COMPUTE_KEY, None)
    if compute is not None and (compute.dtype != torch.float64 or compute.shape != (1,)
                                or not math.isfinite(compute.item()) or compute.item() < 0):
        raise WireError("body.data", f"a session upload's [{COMPUTE_KEY}] entry must be one float64 >= 0")
    return state, stats.tolist(), None if compute is None else float(compute.item())


class BlobCache:
    """Blobs by sha256, in a directory (``{sha256}.blob`` files, written atomically) or in memory.

    The in-memory cache keeps the ``max_entries`` most recently used blobs. Reads from a directory
    re-verify the hash and drop a corrupt file. Thread-safe.
    """

    def __init__(self, directory: str | Path | None = None, *, max_entries: int = 8) -> None:
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _path(self, sha256: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{validate_sha256(sha256)}.blob"

    def __contains__(self, sha256: object) -> bool:
        if not isinstance(sha256, str):
            return False
        validate_sha256(sha256)
        with self._lock:
            if self.directory is None:
                return sha256 in self._memory
            return self._path(sha256).exists()

    def needs_fetch(self, sha256: str) -> bool:
        """True when the blob is not cached (the hash changed since the last fetch)."""
        return sha256 not in self

    def get(self, sha256: str) -> bytes | None:
        """The cached bytes, or ``None`` if absent (or a cached file failed its hash check)."""
        validate_sha256(sha256)
        with self._lock:
            if self.directory is None:
                data = self._memory.get(sha256)
                if data is not None:
                    self._memory.move_to_end(sha256)
                return data
            path = self._path(sha256)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            if sha256_hex(data) != sha256:
                log.warning("blob cache file %s is corrupt; removing it", path)
                path.unlink(missing_ok=True)
                return None
            return data

    def put(self, data: bytes | bytearray | memoryview, sha256: str | None = None) -> str:
        """Store ``data``; if ``sha256`` is given it must match (``WireError`` otherwise). Returns the hash."""
        data = bytes(data)
        actual = sha256_hex(data)
        if sha256 is not None and validate_sha256(sha256) != actual:
            raise WireError("sha256", f"data hashes to {actual}, expected {sha256}")
        with self._lock:
            if self.directory is None:
                self._memory[actual] = data
                self._memory.move_to_end(actual)
                while len(self._memory) > self.max_entries:
                    self._memory.popitem(last=False)
                return actual
            path = self._path(actual)
            if not path.exists():
                fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".blob")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        return actual
