"""Baseline for bench_frame.py: the frame codec a competent Python developer would write.

The same layouts as docs/wire.md section 3, with ``struct`` for fixed fields, a
varint loop, ``__slots__`` objects and memoryview payload slices, plus the bounds
and flag checks such code usually has. No C, no cleverness: the yardstick that
msgnet._frame's speed is measured against.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

U16 = struct.Struct(">H")
FLAG_REQUEST, FLAG_RESPONSE, FLAG_SEQ = 0x01, 0x02, 0x04
FLAG_RELIABLE, FLAG_ORDERED, FLAG_FRAGMENT = 0x08, 0x10, 0x20


class DecodeError(ValueError):
    pass


def read_varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 56:
            raise DecodeError(f"bad varint at {pos}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def write_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Message:
    __slots__ = ("protocol_int", "payload", "flags", "request_id", "seq", "frag_index",
                 "frag_count")

    def __init__(self, protocol_int: int, payload: bytes | memoryview, flags: int = 0,
                 request_id: int | None = None, seq: int | None = None,
                 frag_index: int | None = None, frag_count: int | None = None) -> None:
        self.protocol_int = protocol_int
        self.payload = payload
        self.flags = flags
        self.request_id = request_id
        self.seq = seq
        self.frag_index = frag_index
        self.frag_count = frag_count


class Init(Message):
    __slots__ = ("transport_id", "protocol")

    def __init__(self, transport_id: int, protocol: str, protocol_int: int,
                 payload: bytes | memoryview, flags: int = 0, **fields: int) -> None:
        super().__init__(protocol_int, payload, flags, **fields)
        self.transport_id = transport_id
        self.protocol = protocol


class Continuation(Message):
    __slots__ = ()


class Ack:
    __slots__ = ("transport_id",)

    def __init__(self, transport_id: int) -> None:
        self.transport_id = transport_id


class Reset:
    __slots__ = ("protocol_int", "code")

    def __init__(self, protocol_int: int, code: int) -> None:
        self.protocol_int = protocol_int
        self.code = code


class Bound:
    __slots__ = ("protocol_int",)

    def __init__(self, protocol_int: int) -> None:
        self.protocol_int = protocol_int


class DeliveryAck:
    __slots__ = ("largest", "ack_delay_us", "first_range", "ranges")

    def __init__(self, largest: int, ack_delay_us: int, first_range: int,
                 ranges: tuple[tuple[int, int], ...]) -> None:
        self.largest = largest
        self.ack_delay_us = ack_delay_us
        self.first_range = first_range
        self.ranges = ranges


class Ping:
    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data


class Pong(Ping):
    __slots__ = ()


class Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


Frame = Message | Ack | Reset | Bound | DeliveryAck | Ping | Close


def _read_message(data: memoryview, pos: int, end: int) -> dict:
    if pos >= end:
        raise DecodeError("truncated message")
    flags = data[pos]
    pos += 1
    if flags & 0xC0 or flags & 3 == 3:
        raise DecodeError("bad flags")
    fields: dict = {"flags": flags}
    if flags & 3:
        fields["request_id"], pos = read_varint(data, pos, end)
    if flags & FLAG_SEQ:
        fields["seq"], pos = read_varint(data, pos, end)
    if flags & FLAG_FRAGMENT:
        fields["frag_index"], pos = read_varint(data, pos, end)
        fields["frag_count"], pos = read_varint(data, pos, end)
    fields["payload"] = data[pos:end]
    return fields


def decode_frame(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Frame | None, int]:
    view = memoryview(data)
    size = len(view)
    while offset < size and view[offset] == 0:
        offset += 1
    if offset >= size:
        return None, offset
    frame_type = view[offset]
    length, pos = read_varint(view, offset + 1, size)
    end = pos + length
    if end > size:
        raise DecodeError("frame longer than packet")
    if frame_type == 0x03:
        protocol_int, pos = read_varint(view, pos, end)
        return Continuation(protocol_int, **_read_message(view, pos, end)), end
    if frame_type == 0x01:
        (transport_id,) = U16.unpack_from(view, pos)
        plen, pos = read_varint(view, pos + 2, end)
        protocol = str(view[pos : pos + plen], "utf-8")
        protocol_int, pos = read_varint(view, pos + plen, end)
        return Init(transport_id, protocol, protocol_int, **_read_message(view, pos, end)), end
    if frame_type == 0x02:
        return Ack(U16.unpack_from(view, pos)[0]), end
    if frame_type == 0x04:
        protocol_int, pos = read_varint(view, pos, end)
        return Reset(protocol_int, view[pos]), end
    if frame_type == 0x05:
        return Bound(read_varint(view, pos, end)[0]), end
    if frame_type == 0x06:
        largest, pos = read_varint(view, pos, end)
        delay, pos = read_varint(view, pos, end)
        count, pos = read_varint(view, pos, end)
        first, pos = read_varint(view, pos, end)
        ranges = []
        for _ in range(count):
            gap, pos = read_varint(view, pos, end)
            length, pos = read_varint(view, pos, end)
            ranges.append((gap, length))
        return DeliveryAck(largest, delay, first, tuple(ranges)), end
    if frame_type == 0x07:
        return Ping(view[pos:end]), end
    if frame_type == 0x08:
        return Pong(view[pos:end]), end
    if frame_type == 0x09:
        code, pos = read_varint(view, pos, end)
        return Close(code, str(view[pos:end], "utf-8")), end
    if 0x40 <= frame_type <= 0x7F:
        return decode_frame(view, end)
    raise DecodeError(f"bad frame type {frame_type:#x}")


def decode_packet(data: bytes | bytearray | memoryview) -> list[Frame]:
    frames: list[Frame] = []
    offset = 0
    while True:
        frame, offset = decode_frame(data, offset)
        if frame is None:
            return frames
        frames.append(frame)


def _framed(frame_type: int, body: bytes) -> bytes:
    return bytes((frame_type,)) + write_varint(len(body)) + body


def _message(flags: int, request_id: int, seq: int, frag_index: int, frag_count: int,
             payload: bytes | memoryview) -> bytes:
    parts = [bytes((flags,))]
    if flags & 3:
        parts.append(write_varint(request_id))
    if flags & FLAG_SEQ:
        parts.append(write_varint(seq))
    if flags & FLAG_FRAGMENT:
        parts.append(write_varint(frag_index))
        parts.append(write_varint(frag_count))
    parts.append(bytes(payload))
    return b"".join(parts)


def encode_continuation(protocol_int: int, payload: bytes | memoryview, flags: int = 0,
                        request_id: int = 0, seq: int = 0, frag_index: int = 0,
                        frag_count: int = 0) -> bytes:
    return _framed(0x03, write_varint(protocol_int)
                   + _message(flags, request_id, seq, frag_index, frag_count, payload))


def encode_init(transport_id: int, protocol: str, protocol_int: int,
                payload: bytes | memoryview, flags: int = 0, request_id: int = 0, seq: int = 0,
                frag_index: int = 0, frag_count: int = 0) -> bytes:
    raw = protocol.encode("utf-8")
    return _framed(0x01, U16.pack(transport_id) + write_varint(len(raw)) + raw
                   + write_varint(protocol_int)
                   + _message(flags, request_id, seq, frag_index, frag_count, payload))


def encode_frame(frame: Frame) -> bytes:
    if isinstance(frame, Message):
        fields = (frame.flags, frame.request_id or 0, frame.seq or 0, frame.frag_index or 0,
                  frame.frag_count or 0)
        if isinstance(frame, Init):
            return encode_init(frame.transport_id, frame.protocol, frame.protocol_int,
                               frame.payload, *fields)
        return encode_continuation(frame.protocol_int, frame.payload, *fields)
    if isinstance(frame, Ack):
        return _framed(0x02, U16.pack(frame.transport_id))
    if isinstance(frame, Reset):
        return _framed(0x04, write_varint(frame.protocol_int) + bytes((frame.code,)))
    if isinstance(frame, Bound):
        return _framed(0x05, write_varint(frame.protocol_int))
    if isinstance(frame, DeliveryAck):
        parts = [write_varint(frame.largest), write_varint(frame.ack_delay_us),
                 write_varint(len(frame.ranges)), write_varint(frame.first_range)]
        for gap, length in frame.ranges:
            parts.append(write_varint(gap) + write_varint(length))
        return _framed(0x06, b"".join(parts))
    if isinstance(frame, Ping):
        return _framed(0x08 if isinstance(frame, Pong) else 0x07, bytes(frame.data))
    if isinstance(frame, Close):
        return _framed(0x09, write_varint(frame.code) + frame.reason.encode("utf-8"))
    raise TypeError(type(frame).__name__)


def encode_packet(frames: Iterable[Frame], padding: int = 0) -> bytes:
    return b"".join(map(encode_frame, frames)) + bytes(padding)
