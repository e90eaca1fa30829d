"""``TensorChunk`` messages of ``ExpertService.Fetch`` without copying their payload twice.

A 1 MiB chunk built and serialized by protobuf is copied three times on the store (slice,
message, serialization) and twice more on the decoder (parse, ``.data``): at gRPC's loopback
rates that halves throughput. So the store serializes each message itself - protobuf encodes
the small fields, the ``data`` field (6, bytes) is appended by hand, which is valid protobuf
(a message is the concatenation of its fields) - and the decoder reads the fields straight
from the received bytes, copying ``data`` once, into the tensor being assembled. Clients that
use the generated stubs read the same messages as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from protos import expert_service_pb2 as pb2

DATA_FIELD = 6  # TensorChunk.data
LENGTH_DELIMITED = 2
VARINT = 0


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


DATA_TAG = varint(DATA_FIELD << 3 | LENGTH_DELIMITED)


def encode_chunks(info: pb2.TensorInfo, data: memoryview, chunk_bytes: int) -> Iterator[bytes]:
    """A tensor's Fetch messages, serialized; ``info`` rides on the first (offset 0)."""
    for offset in range(0, max(len(data), 1), chunk_bytes):
        piece = data[offset : offset + chunk_bytes]
        head = pb2.TensorChunk(
            info=info if offset == 0 else None, layer=info.layer, expert=info.expert, name=info.name, offset=offset
        ).SerializeToString()
        yield b"".join((head, DATA_TAG, varint(len(piece)), piece))


@dataclass
class Chunk:
    expert: int
    name: str
    offset: int
    data: memoryview  # a view of the received message: copy it before the message goes
    info: pb2.TensorInfo | None  # on the first chunk of a tensor


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def decode_chunk(message: bytes) -> Chunk:
    """A serialized ``TensorChunk`` -> its fields; ``data`` is a view, not a copy."""
    buf = memoryview(message)
    fields: dict[int, int | memoryview] = {}
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            fields[number], pos = read_varint(buf, pos)
        elif wire == LENGTH_DELIMITED:
            size, pos = read_varint(buf, pos)
            fields[number] = buf[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"malformed TensorChunk: field {number} has wire type {wire}, expected 0 or 2")
    info = pb2.TensorInfo.FromString(bytes(fields[1])) if 1 in fields else None
    return Chunk(
        expert=int(fields.get(3, 0)), name=bytes(fields.get(4, b"")).decode(), offset=int(fields.get(5, 0)),
        data=fields.get(DATA_FIELD, memoryview(b"")), info=info,
    )
