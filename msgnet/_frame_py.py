"""Pure-Python frame codec: the spec oracle for ``_frame.pyx`` and its fallback.

Written straight from docs/wire.md section 3, favouring the text over speed:
the Cython codec is tested to agree with this module on valid and malformed
input alike (same frames, same FrameError messages). Same API as ``_frame``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

from msgnet.errors import FrameError, MessageTooLargeError, UsageError
from msgnet.limits import (
    FLAG_FRAGMENT,
    FLAG_ORDERED,
    FLAG_RELIABLE,
    FLAG_REQUEST,
    FLAG_RESERVED,
    FLAG_RESPONSE,
    FLAG_SEQ,
    FRAME_ACK,
    FRAME_BOUND,
    FRAME_CLOSE,
    FRAME_CONTINUATION,
    FRAME_DELIVERY_ACK,
    FRAME_INIT,
    FRAME_PADDING,
    FRAME_PING,
    FRAME_PONG,
    FRAME_RESET,
    FRAME_SKIPPABLE_MAX,
    FRAME_SKIPPABLE_MIN,
    MAX_ACK_RANGES,
    MAX_CLOSE_REASON,
    MAX_FRAGMENTS,
    MAX_FRAMES_PER_PACKET,
    MAX_MESSAGE_PAYLOAD,
    MAX_PING_DATA,
    MAX_PROTOCOL_INT,
    MAX_PROTOCOL_LENGTH,
    MAX_VARINT_BYTES,
)

__all__ = [
    "Frame",
    "Init",
    "Continuation",
    "Ack",
    "Reset",
    "Bound",
    "DeliveryAck",
    "Ping",
    "Pong",
    "Close",
    "encode_varint",
    "decode_varint",
    "decode_frame",
    "decode_packet",
    "encode_frame",
    "encode_packet",
    "encode_continuation",
    "encode_init",
    "MAX_PROTOCOL_LENGTH",
    "MAX_PROTOCOL_INT",
    "MAX_FRAMES_PER_PACKET",
    "MAX_FRAGMENTS",
    "MAX_ACK_RANGES",
    "MAX_PING_DATA",
    "MAX_CLOSE_REASON",
    "MAX_MESSAGE_PAYLOAD",
    "MAX_VARINT_BYTES",
    "MAX_VARINT",
    "FRAME_PADDING",
    "FRAME_INIT",
    "FRAME_ACK",
    "FRAME_CONTINUATION",
    "FRAME_RESET",
    "FRAME_BOUND",
    "FRAME_DELIVERY_ACK",
    "FRAME_PING",
    "FRAME_PONG",
    "FRAME_CLOSE",
    "FRAME_SKIPPABLE_MIN",
    "FRAME_SKIPPABLE_MAX",
    "FLAG_REQUEST",
    "FLAG_RESPONSE",
    "FLAG_SEQ",
    "FLAG_RELIABLE",
    "FLAG_ORDERED",
    "FLAG_FRAGMENT",
    "FLAG_RESERVED",
]

MAX_VARINT = (1 << 63) - 1
"""Largest varint value: 9 bytes of 7 bits."""

Buffer: TypeAlias = bytes | bytearray | memoryview
_KIND = FLAG_REQUEST | FLAG_RESPONSE


# --- errors and argument checks ----------------------------------------------


def _malformed(problem: str, offset: int) -> NoReturn:
    err = FrameError(f"{problem} at offset {offset}")
    err.offset = offset  # type: ignore[attr-defined]
    raise err


def _uint(value: int, limit: int, name: str) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise UsageError(f"{name} must be in 0..{limit}, got {value!r}")
    return value


def _bytes_view(data: Buffer) -> memoryview:
    """A flat read-only byte view of any C-contiguous buffer (no copy)."""
    return memoryview(data).cast("B").toreadonly()


def _utf8(text: str, min_len: int, max_len: int, name: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, not {type(text).__name__}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not encodable as UTF-8") from None
    if not min_len <= len(raw) <= max_len:
        raise UsageError(f"{name} must be {min_len}..{max_len} bytes of UTF-8, got {len(raw)}")
    return raw


def _check_flags(flags: int, frag_index: int, frag_count: int) -> None:
    """wire.md 3.2's malformed flag combinations, as the caller's mistake."""
    if flags & FLAG_RESERVED:
        raise UsageError(f"reserved flag bits set: 0x{flags:02x}")
    if flags & _KIND == _KIND:
        raise UsageError("FLAG_REQUEST and FLAG_RESPONSE are exclusive")
    if flags & FLAG_RELIABLE and not flags & FLAG_SEQ:
        raise UsageError("FLAG_RELIABLE requires a seq")
    if flags & FLAG_ORDERED and not flags & FLAG_RELIABLE:
        raise UsageError("FLAG_ORDERED requires FLAG_RELIABLE")
    if flags & FLAG_FRAGMENT:
        if not flags & FLAG_SEQ:
            raise UsageError("fragments require a seq")
        if not 0 <= frag_index < frag_count <= MAX_FRAGMENTS:
            raise UsageError(
                f"need 0 <= frag_index < frag_count <= {MAX_FRAGMENTS}, "
                f"got {frag_index}/{frag_count}"
            )


def _bytes_repr(data: memoryview) -> str:
    return repr(bytes(data)) if len(data) <= 32 else f"<{len(data)} bytes>"


# --- frames ------------------------------------------------------------------


class Frame:
    """Base of every frame type; encode with encode_frame()."""

    __slots__ = ()


class _Message(Frame):
    """Checks and repr shared by INIT and CONTINUATION (wire.md 3.2)."""

    __slots__ = ()
    protocol_int: int
    payload: memoryview
    flags: int
    request_id: int | None
    seq: int | None
    frag_index: int | None
    frag_count: int | None

    def _check_message(self) -> None:
        """Validate; a field that is given sets its flag."""
        flags = _uint(self.flags, 0xFF, "flags")
        _uint(self.protocol_int, MAX_PROTOCOL_INT, "protocol_int")
        if (self.request_id is None) != (not flags & _KIND):
            raise UsageError("a request_id goes with FLAG_REQUEST or FLAG_RESPONSE in flags")
        if self.request_id is not None:
            _uint(self.request_id, MAX_VARINT, "request_id")
        if self.seq is not None:
            flags |= FLAG_SEQ
            _uint(self.seq, MAX_VARINT, "seq")
        elif flags & FLAG_SEQ:
            raise UsageError("FLAG_SEQ needs a seq")
        if (self.frag_index is None) != (self.frag_count is None):
            raise UsageError("frag_index and frag_count go together")
        if self.frag_index is not None and self.frag_count is not None:
            flags |= FLAG_FRAGMENT
            _uint(self.frag_index, MAX_VARINT, "frag_index")
            _uint(self.frag_count, MAX_VARINT, "frag_count")
        elif flags & FLAG_FRAGMENT:
            raise UsageError("FLAG_FRAGMENT needs frag_index and frag_count")
        _check_flags(flags, self.frag_index or 0, self.frag_count or 0)
        payload = _bytes_view(self.payload)
        if len(payload) > MAX_MESSAGE_PAYLOAD:
            raise MessageTooLargeError(
                f"payload of {len(payload)} bytes exceeds MAX_MESSAGE_PAYLOAD "
                f"({MAX_MESSAGE_PAYLOAD})"
            )
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "payload", payload)

    def _fields_repr(self) -> str:
        s = (
            f"protocol_int={self.protocol_int}, payload={_bytes_repr(self.payload)}, "
            f"flags=0x{self.flags:02x}"
        )
        if self.request_id is not None:
            s += f", request_id={self.request_id}"
        if self.seq is not None:
            s += f", seq={self.seq}"
        if self.frag_index is not None:
            s += f", frag_index={self.frag_index}, frag_count={self.frag_count}"
        return s


@dataclass(frozen=True, slots=True, repr=False)
class Init(_Message):
    """INIT: a message that also binds ``protocol`` to the alias ``protocol_int``."""

    transport_id: int
    protocol: str
    protocol_int: int
    payload: memoryview
    flags: int = 0
    request_id: int | None = None
    seq: int | None = None
    frag_index: int | None = None
    frag_count: int | None = None

    def __post_init__(self) -> None:
        _uint(self.transport_id, 0xFFFF, "transport_id")
        _utf8(self.protocol, 1, MAX_PROTOCOL_LENGTH, "protocol")
        self._check_message()

    def __repr__(self) -> str:
        return (
            f"Init(transport_id={self.transport_id}, protocol={self.protocol!r}, "
            f"{self._fields_repr()})"
        )


@dataclass(frozen=True, slots=True, repr=False)
class Continuation(_Message):
    """CONTINUATION: a message on an alias the receiver has bound (BOUND received)."""

    protocol_int: int
    payload: memoryview
    flags: int = 0
    request_id: int | None = None
    seq: int | None = None
    frag_index: int | None = None
    frag_count: int | None = None

    def __post_init__(self) -> None:
        self._check_message()

    def __repr__(self) -> str:
        return f"Continuation({self._fields_repr()})"


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    """ACK: the sender prefers to receive on its transport ``transport_id`` (wire.md 5)."""

    transport_id: int

    def __post_init__(self) -> None:
        _uint(self.transport_id, 0xFFFF, "transport_id")


@dataclass(frozen=True, slots=True)
class Reset(Frame):
    """RESET: the receiver refuses alias ``protocol_int`` (codes in wire.md 3.3)."""

    protocol_int: int
    code: int

    def __post_init__(self) -> None:
        _uint(self.protocol_int, MAX_PROTOCOL_INT, "protocol_int")
        _uint(self.code, 0xFF, "code")


@dataclass(frozen=True, slots=True)
class Bound(Frame):
    """BOUND: the receiver recorded alias ``protocol_int``; CONTINUATION may follow."""

    protocol_int: int

    def __post_init__(self) -> None:
        _uint(self.protocol_int, MAX_PROTOCOL_INT, "protocol_int")


@dataclass(frozen=True, slots=True)
class DeliveryAck(Frame):
    """DELIVERY_ACK: QUIC-style ranges of acknowledged seqs (wire.md 3.5)."""

    largest: int
    ack_delay_us: int
    first_range: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        _uint(self.largest, MAX_VARINT, "largest")
        _uint(self.ack_delay_us, MAX_VARINT, "ack_delay_us")
        _uint(self.first_range, MAX_VARINT, "first_range")
        ranges = tuple((gap, length) for gap, length in self.ranges)
        if len(ranges) > MAX_ACK_RANGES:
            raise UsageError(f"at most {MAX_ACK_RANGES} ranges, got {len(ranges)}")
        for gap, length in ranges:
            _uint(gap, MAX_VARINT, "gap")
            _uint(length, MAX_VARINT, "range")
        object.__setattr__(self, "ranges", ranges)


class _Probe(Frame):
    __slots__ = ()
    data: memoryview

    def _check_data(self) -> None:
        data = _bytes_view(self.data)
        if len(data) > MAX_PING_DATA:
            raise UsageError(f"data must be at most {MAX_PING_DATA} bytes")
        object.__setattr__(self, "data", data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data={_bytes_repr(self.data)})"


@dataclass(frozen=True, slots=True, repr=False)
class Ping(_Probe):
    """PING: a keep-alive or RTT probe; the peer answers with a PONG of the same data."""

    data: memoryview

    def __post_init__(self) -> None:
        self._check_data()


@dataclass(frozen=True, slots=True, repr=False)
class Pong(_Probe):
    """PONG: the answer to a PING, echoing its data."""

    data: memoryview

    def __post_init__(self) -> None:
        self._check_data()


@dataclass(frozen=True, slots=True)
class Close(Frame):
    """CLOSE: the sender tears the session down (codes in wire.md 3.5)."""

    code: int
    reason: str

    def __post_init__(self) -> None:
        _uint(self.code, MAX_VARINT, "code")
        _utf8(self.reason, 0, MAX_CLOSE_REASON, "reason")


for _frame_class in (Init, Continuation, Ack, Reset, Bound, DeliveryAck, Ping, Pong, Close):
    _frame_class.__hash__ = None  # type: ignore[assignment]  # payloads may be mutable buffers
del _frame_class


# --- decoding ------------------------------------------------------------------


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at buf[pos:end] (wire.md: minimal, at most 9 bytes) and the offset after it."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= end:
            _malformed("truncated varint", pos)
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                _malformed("non-minimal varint", pos)
            return value, pos + i + 1
    _malformed("varint longer than 9 bytes", pos)


def _read_alias(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, after = _read_varint(buf, pos, end)
    if value > MAX_PROTOCOL_INT:
        _malformed("protocol_int above 65535", pos)
    return value, after


def _read_utf8(buf: memoryview, pos: int, end: int, what: str) -> str:
    try:
        return bytes(buf[pos:end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        _malformed(f"{what} is not valid UTF-8", pos + exc.start)


def _read_message(buf: memoryview, pos: int, end: int) -> dict[str, object]:
    """``flags | [request_id] | [seq] | [frag_index | frag_count] | payload:rest``."""
    if pos >= end:
        _malformed("truncated frame body", pos)
    flags = buf[pos]
    if flags & FLAG_RESERVED:
        _malformed("reserved flag bits set", pos)
    if (
        flags & _KIND == _KIND
        or (flags & FLAG_RELIABLE and not flags & FLAG_SEQ)
        or (flags & FLAG_ORDERED and not flags & FLAG_RELIABLE)
        or (flags & FLAG_FRAGMENT and not flags & FLAG_SEQ)
    ):
        _malformed("invalid flag combination", pos)
    pos += 1
    fields: dict[str, object] = {"flags": flags}
    if flags & _KIND:
        fields["request_id"], pos = _read_varint(buf, pos, end)
    if flags & FLAG_SEQ:
        fields["seq"], pos = _read_varint(buf, pos, end)
    if flags & FLAG_FRAGMENT:
        frag_at = pos
        frag_index, pos = _read_varint(buf, pos, end)
        frag_count, pos = _read_varint(buf, pos, end)
        if not 0 < frag_count <= MAX_FRAGMENTS or frag_index >= frag_count:
            _malformed("invalid fragment fields", frag_at)
        fields["frag_index"], fields["frag_count"] = frag_index, frag_count
    if end - pos > MAX_MESSAGE_PAYLOAD:
        _malformed("payload larger than 1048576 bytes", pos)
    fields["payload"] = buf[pos:end]
    return fields


def _check_end(pos: int, end: int) -> None:
    if pos != end:
        _malformed("trailing bytes in frame body", pos)


def _read_body(frame_type: int, buf: memoryview, pos: int, end: int) -> Frame:
    """The frame whose body is buf[pos:end], per the table in wire.md 3.1."""
    if frame_type == FRAME_CONTINUATION:
        protocol_int, pos = _read_alias(buf, pos, end)
        return Continuation(protocol_int, **_read_message(buf, pos, end))  # type: ignore[arg-type]
    if frame_type == FRAME_INIT:
        if end - pos < 2:
            _malformed("truncated frame body", pos)
        transport_id = int.from_bytes(buf[pos : pos + 2], "big")
        length_at = pos + 2
        length, pos = _read_varint(buf, length_at, end)
        if length == 0:
            _malformed("empty protocol id", length_at)
        if length > MAX_PROTOCOL_LENGTH:
            _malformed("protocol id longer than 256 bytes", length_at)
        if length > end - pos:
            _malformed("truncated frame body", pos)
        protocol = _read_utf8(buf, pos, pos + length, "protocol id")
        protocol_int, pos = _read_alias(buf, pos + length, end)
        return Init(
            transport_id, protocol, protocol_int, **_read_message(buf, pos, end)  # type: ignore[arg-type]
        )
    if frame_type == FRAME_ACK:
        if end - pos < 2:
            _malformed("truncated frame body", pos)
        _check_end(pos + 2, end)
        return Ack(int.from_bytes(buf[pos : pos + 2], "big"))
    if frame_type == FRAME_RESET:
        protocol_int, pos = _read_alias(buf, pos, end)
        if pos >= end:
            _malformed("truncated frame body", pos)
        _check_end(pos + 1, end)
        return Reset(protocol_int, buf[pos])
    if frame_type == FRAME_BOUND:
        protocol_int, pos = _read_alias(buf, pos, end)
        _check_end(pos, end)
        return Bound(protocol_int)
    if frame_type == FRAME_DELIVERY_ACK:
        largest, pos = _read_varint(buf, pos, end)
        ack_delay_us, pos = _read_varint(buf, pos, end)
        count_at = pos
        count, pos = _read_varint(buf, pos, end)
        if count > MAX_ACK_RANGES:
            _malformed("more than 64 ack ranges", count_at)
        first_range, pos = _read_varint(buf, pos, end)
        ranges = []
        for _ in range(count):
            gap, pos = _read_varint(buf, pos, end)
            length, pos = _read_varint(buf, pos, end)
            ranges.append((gap, length))
        _check_end(pos, end)
        return DeliveryAck(largest, ack_delay_us, first_range, tuple(ranges))
    if frame_type in (FRAME_PING, FRAME_PONG):
        if end - pos > MAX_PING_DATA:
            _malformed("ping data longer than 32 bytes", pos)
        return (Ping if frame_type == FRAME_PING else Pong)(buf[pos:end])
    # FRAME_CLOSE
    code, pos = _read_varint(buf, pos, end)
    if end - pos > MAX_CLOSE_REASON:
        _malformed("close reason longer than 128 bytes", pos)
    return Close(code, _read_utf8(buf, pos, end, "close reason"))


def _read_frame(buf: memoryview, pos: int) -> tuple[Frame | None, int]:
    """Next frame at pos, passing over PADDING and skippable unknown frames."""
    size = len(buf)
    while True:
        while pos < size and buf[pos] == FRAME_PADDING:
            pos += 1
        if pos >= size:
            return None, pos
        frame_type = buf[pos]
        if frame_type >= 0x80:
            _malformed("invalid frame type", pos)
        if FRAME_CLOSE < frame_type < FRAME_SKIPPABLE_MIN:
            _malformed("unknown frame type", pos)
        length, body = _read_varint(buf, pos + 1, size)
        if length > size - body:
            _malformed("frame length exceeds packet", pos + 1)
        end = body + length
        if frame_type <= FRAME_CLOSE:
            return _read_body(frame_type, buf, body, end), end
        pos = end  # skippable (0x40-0x7F)


def _check_offset(offset: int, size: int) -> None:
    if not 0 <= offset <= size:
        raise UsageError(f"offset {offset} outside the input (0..{size})")


def decode_frame(data: Buffer, offset: int = 0) -> tuple[Frame | None, int]:
    """Decode the frame at ``data[offset:]`` into ``(frame, offset after it)``.

    PADDING and skippable unknown frames are passed over; at the end of the
    data the frame is None. Payloads are zero-copy views of ``data``.
    """
    buf = _bytes_view(data)
    _check_offset(offset, len(buf))
    return _read_frame(buf, offset)


def decode_packet(data: Buffer) -> list[Frame]:
    """All frames of a packet payload (PADDING and skippable unknown frames dropped).

    A malformed frame raises FrameError whose ``frames`` attribute holds the
    valid frames before it: wire.md 3.1 has the receiver keep those.
    """
    buf = _bytes_view(data)
    frames: list[Frame] = []
    pos = 0
    while True:
        start = pos
        try:
            frame, pos = _read_frame(buf, pos)
            if frame is not None and len(frames) == MAX_FRAMES_PER_PACKET:
                _malformed("more than 256 frames in packet", start)
        except FrameError as exc:
            exc.frames = frames  # type: ignore[attr-defined,assignment]
            raise
        if frame is None:
            return frames
        frames.append(frame)


def decode_varint(data: Buffer, offset: int = 0) -> tuple[int, int]:
    """Decode the varint at ``data[offset:]`` into ``(value, offset after it)``."""
    buf = _bytes_view(data)
    _check_offset(offset, len(buf))
    return _read_varint(buf, offset, len(buf))


# --- encoding ------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """The minimal varint for ``0 <= value < 2**63``."""
    _uint(value, MAX_VARINT, "value")
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _framed(frame_type: int, body: bytes) -> bytes:
    """``type:u8 | length:varint | body``."""
    return bytes([frame_type]) + encode_varint(len(body)) + body


def _message(
    flags: int, request_id: int, seq: int, frag_index: int, frag_count: int, payload: Buffer
) -> bytes:
    out = bytearray([flags])
    if flags & _KIND:
        out += encode_varint(request_id)
    if flags & FLAG_SEQ:
        out += encode_varint(seq)
    if flags & FLAG_FRAGMENT:
        out += encode_varint(frag_index) + encode_varint(frag_count)
    return bytes(out) + bytes(payload)


def _init_body(transport_id: int, protocol: bytes, protocol_int: int, message: bytes) -> bytes:
    return (
        transport_id.to_bytes(2, "big")
        + encode_varint(len(protocol))
        + protocol
        + encode_varint(protocol_int)
        + message
    )


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of one frame."""
    if isinstance(frame, (Init, Continuation)):
        message = _message(
            frame.flags,
            frame.request_id or 0,
            frame.seq or 0,
            frame.frag_index or 0,
            frame.frag_count or 0,
            frame.payload,
        )
        if isinstance(frame, Continuation):
            return _framed(FRAME_CONTINUATION, encode_varint(frame.protocol_int) + message)
        protocol = frame.protocol.encode("utf-8")
        return _framed(
            FRAME_INIT, _init_body(frame.transport_id, protocol, frame.protocol_int, message)
        )
    if isinstance(frame, Ack):
        return _framed(FRAME_ACK, frame.transport_id.to_bytes(2, "big"))
    if isinstance(frame, Reset):
        return _framed(FRAME_RESET, encode_varint(frame.protocol_int) + bytes([frame.code]))
    if isinstance(frame, Bound):
        return _framed(FRAME_BOUND, encode_varint(frame.protocol_int))
    if isinstance(frame, DeliveryAck):
        body = b"".join(
            encode_varint(v)
            for v in (frame.largest, frame.ack_delay_us, len(frame.ranges), frame.first_range)
        )
        body += b"".join(encode_varint(gap) + encode_varint(n) for gap, n in frame.ranges)
        return _framed(FRAME_DELIVERY_ACK, body)
    if isinstance(frame, Ping):
        return _framed(FRAME_PING, bytes(frame.data))
    if isinstance(frame, Pong):
        return _framed(FRAME_PONG, bytes(frame.data))
    if isinstance(frame, Close):
        return _framed(FRAME_CLOSE, encode_varint(frame.code) + frame.reason.encode("utf-8"))
    raise TypeError(f"not a frame: {type(frame).__name__}")


def encode_packet(frames: Iterable[Frame], padding: int = 0) -> bytes:
    """A packet payload: the frames in order, then ``padding`` PADDING bytes."""
    items = tuple(frames)
    if padding < 0:
        raise UsageError(f"padding must be >= 0, got {padding}")
    if len(items) > MAX_FRAMES_PER_PACKET:
        raise UsageError(f"at most {MAX_FRAMES_PER_PACKET} frames per packet, got {len(items)}")
    return b"".join(encode_frame(frame) for frame in items) + bytes(padding)


def _fast_message(
    payload: Buffer, flags: int, request_id: int, seq: int, frag_index: int, frag_count: int
) -> bytes:
    """Check the fast encoders' arguments (``flags`` says what is written); the message."""
    _uint(flags, 0xFF, "flags")
    _uint(request_id, MAX_VARINT, "request_id")
    _uint(seq, MAX_VARINT, "seq")
    _uint(frag_index, MAX_VARINT, "frag_index")
    _uint(frag_count, MAX_VARINT, "frag_count")
    _check_flags(flags, frag_index, frag_count)
    for bit, value, name in (
        (_KIND, request_id, "request_id"),
        (FLAG_SEQ, seq, "seq"),
        (FLAG_FRAGMENT, frag_index | frag_count, "frag_index/frag_count"),
    ):
        if value and not flags & bit:
            raise UsageError(f"{name} given but its flag is not set in flags=0x{flags:02x}")
    data = _bytes_view(payload)
    if len(data) > MAX_MESSAGE_PAYLOAD:
        raise MessageTooLargeError(
            f"payload of {len(data)} bytes exceeds MAX_MESSAGE_PAYLOAD ({MAX_MESSAGE_PAYLOAD})"
        )
    return _message(flags, request_id, seq, frag_index, frag_count, data)


def encode_continuation(
    protocol_int: int,
    payload: Buffer,
    flags: int = 0,
    request_id: int = 0,
    seq: int = 0,
    frag_index: int = 0,
    frag_count: int = 0,
) -> bytes:
    """CONTINUATION wire bytes without a frame object (the send fast path).

    ``flags`` says which optional fields are written (the Continuation
    constructor derives it from the fields given instead); a non-zero field
    whose flag is off is a UsageError.
    """
    _uint(protocol_int, MAX_PROTOCOL_INT, "protocol_int")
    message = _fast_message(payload, flags, request_id, seq, frag_index, frag_count)
    return _framed(FRAME_CONTINUATION, encode_varint(protocol_int) + message)


def encode_init(
    transport_id: int,
    protocol: str,
    protocol_int: int,
    payload: Buffer,
    flags: int = 0,
    request_id: int = 0,
    seq: int = 0,
    frag_index: int = 0,
    frag_count: int = 0,
) -> bytes:
    """INIT wire bytes without a frame object; ``flags`` as in encode_continuation()."""
    _uint(transport_id, 0xFFFF, "transport_id")
    raw = _utf8(protocol, 1, MAX_PROTOCOL_LENGTH, "protocol")
    _uint(protocol_int, MAX_PROTOCOL_INT, "protocol_int")
    message = _fast_message(payload, flags, request_id, seq, frag_index, frag_count)
    return _framed(FRAME_INIT, _init_body(transport_id, raw, protocol_int, message))
