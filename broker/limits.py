"""Size limits shared by the codec, the blob chunker and the Mosquitto config (docs/design.md §5).

Tensors travel in messages of at most 8 MiB; larger payloads (model weights) are split into blob
chunks small enough that a chunk *with its envelope* still fits one message.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""Largest encoded message ``broker.codec.decode`` accepts by default (8 MiB)."""
ENVELOPE_OVERHEAD_BYTES = 64 * 1024
"""Headroom reserved for the envelope around a blob chunk's data."""
BLOB_CHUNK_BYTES = MAX_MESSAGE_BYTES - ENVELOPE_OVERHEAD_BYTES
"""Largest blob chunk (data bytes): 8 MiB − 64 KiB, so an encoded ``blob_chunk`` stays ≤ 8 MiB."""
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 64 * 1024
"""Mosquitto ``max_packet_size``: one full message plus room for the topic and MQTT properties."""
MAX_TENSOR_DIMS = 8
"""Most dimensions a tensor on the wire may have."""
