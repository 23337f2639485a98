"""Frame codec (docs/wire.md section 3): the Cython codec, its pure-Python twin, and the text.

Golden vectors are written out by hand from the wire.md layouts, so they check the
code against the text; the twins are checked against each other (round trips,
parity on valid and mutated packets); every malformed case of section 3 must be a
FrameError naming the problem and its offset; payloads must be zero-copy.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgnet import _frame, _frame_py, limits
from msgnet.errors import FrameError, MessageTooLargeError, UsageError

_spec = importlib.util.spec_from_file_location(
    "fuzz_frame", Path(__file__).resolve().parents[1] / "scripts" / "fuzz_frame.py"
)
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)
describe, outcome = fuzz.describe, fuzz.outcome

CODECS = [pytest.param(_frame, id="cython"), pytest.param(_frame_py, id="pure")]
with_codecs = pytest.mark.parametrize("codec", CODECS)
hypothesis_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

REQ, RESP, SEQ = limits.FLAG_REQUEST, limits.FLAG_RESPONSE, limits.FLAG_SEQ
RELIABLE, ORDERED = limits.FLAG_RELIABLE, limits.FLAG_ORDERED
MIB = limits.MAX_MESSAGE_PAYLOAD


def build(codec: ModuleType, spec: tuple[str, tuple, dict]) -> Any:
    """The frame a (class name, args, kwargs) spec describes, from either codec."""
    name, args, kwargs = spec
    return getattr(codec, name)(*args, **kwargs)


# --- module surface ---------------------------------------------------------------


@with_codecs
def test_constants_mirror_limits(codec: ModuleType) -> None:
    for name in codec.__all__:
        if name.isupper() and hasattr(limits, name):
            assert getattr(codec, name) == getattr(limits, name), name
    assert codec.MAX_VARINT == 2**63 - 1


def test_twins_export_the_same_api() -> None:
    assert _frame.__all__ == _frame_py.__all__
    for name in _frame.__all__:
        assert hasattr(_frame, name) and hasattr(_frame_py, name), name


@with_codecs
def test_every_frame_type_is_a_frame(codec: ModuleType) -> None:
    for name in fuzz.FIELDS:
        assert issubclass(getattr(codec, name), codec.Frame)


# --- golden vectors, hand-encoded from the wire.md 3.1 table -----------------------

GOLDEN = [
    # INIT: 01 | len 11 | transport_id 0102 | protocol_length 02 "/a" | protocol_int 05 |
    #       flags 01 (REQUEST) | request_id 300 = ac02 | payload "hi"
    ("init", ("Init", (0x0102, "/a", 5, b"hi"), {"flags": REQ, "request_id": 300}),
     "010b" "0102" "02" "2f61" "05" "01" "ac02" "6869"),
    # INIT as in scripts/make_vectors.py: no flags, "/msgnet/echo/1", payload "hello"
    ("init-plain", ("Init", (1, "/msgnet/echo/1", 0, b"hello"), {}),
     "0118" "0001" "0e" "2f6d73676e65742f6563686f2f31" "00" "00" "68656c6c6f"),
    # ACK: 02 | len 2 | transport_id beef
    ("ack", ("Ack", (0xBEEF,), {}), "0202" "beef"),
    # CONTINUATION: 03 | len 7 | protocol_int 200 = c801 | flags 3c (SEQ RELIABLE ORDERED
    #               FRAGMENT) | seq 1 | frag_index 2 | frag_count 3 | payload ff
    ("continuation", ("Continuation", (200, b"\xff"),
                      {"flags": RELIABLE | ORDERED, "seq": 1, "frag_index": 2, "frag_count": 3}),
     "0307" "c801" "3c" "01" "02" "03" "ff"),
    # CONTINUATION: 03 | len 3 | protocol_int 0 | flags 02 (RESPONSE) | request_id 127 | no payload
    ("response", ("Continuation", (0, b""), {"flags": RESP, "request_id": 127}),
     "0303" "00" "02" "7f"),
    # CONTINUATION with a 200-byte payload: body 202 bytes, length varint ca01
    ("continuation-200", ("Continuation", (1, bytes(200)), {}), "03ca01" "01" "00" + "00" * 200),
    # RESET: 04 | len 2 | protocol_int 7 | code 2
    ("reset", ("Reset", (7, 2), {}), "0402" "07" "02"),
    # BOUND: 05 | len 3 | protocol_int 65535 = ffff03
    ("bound", ("Bound", (65535,), {}), "0503" "ffff03"),
    # DELIVERY_ACK: 06 | len 7 | largest 1000 = e807 | ack_delay_us 25 | range_count 1 |
    #               first_range 4 | gap 2 | range 3
    ("delivery-ack", ("DeliveryAck", (1000, 25, 4, ((2, 3),)), {}),
     "0607" "e807" "19" "01" "04" "02" "03"),
    # PING: 07 | len 4 | data 01020304
    ("ping", ("Ping", (b"\x01\x02\x03\x04",), {}), "0704" "01020304"),
    # PONG: 08 | len 0
    ("pong", ("Pong", (b"",), {}), "0800"),
    # CLOSE: 09 | len 4 | code 2 | reason "bye"
    ("close", ("Close", (2, "bye"), {}), "0904" "02" "627965"),
]


@with_codecs
@pytest.mark.parametrize(("spec", "wire"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_golden_vector(codec: ModuleType, spec: tuple, wire: str) -> None:
    frame = build(codec, spec)
    raw = bytes.fromhex(wire)
    assert codec.encode_frame(frame) == raw
    assert codec.decode_frame(raw) == (frame, len(raw))
    assert codec.decode_packet(raw) == [frame]


@with_codecs
def test_golden_packet_with_padding_and_skippable_frame(codec: ModuleType) -> None:
    # ACK(1) | BOUND(2) | 3 PADDING bytes
    assert codec.encode_packet([codec.Ack(1), codec.Bound(2)], padding=3) == bytes.fromhex(
        "02020001" "050102" "000000"
    )
    # PADDING, a skippable 0x40 frame, ACK(1), a skippable 0x7f frame, PADDING
    raw = bytes.fromhex("0000" "4002aabb" "02020001" "7f00" "00")
    assert codec.decode_packet(raw) == [codec.Ack(1)]
    assert codec.decode_frame(raw) == (codec.Ack(1), 10)
    assert codec.decode_frame(raw, 10) == (None, len(raw))


@with_codecs
@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00" * 100, bytes.fromhex("4000")])
def test_packet_without_frames(codec: ModuleType, raw: bytes) -> None:
    assert codec.decode_packet(raw) == []
    assert codec.decode_frame(raw) == (None, len(raw))


@with_codecs
def test_fast_encoders_match_golden(codec: ModuleType) -> None:
    assert codec.encode_continuation(
        200, b"\xff", SEQ | RELIABLE | ORDERED | limits.FLAG_FRAGMENT, seq=1, frag_index=2,
        frag_count=3,
    ) == bytes.fromhex("0307c8013c010203ff")
    assert codec.encode_init(0x0102, "/a", 5, b"hi", REQ, request_id=300) == bytes.fromhex(
        "010b" "0102" "02" "2f61" "05" "01" "ac02" "6869"
    )


# --- limits at their edges are valid --------------------------------------------

EDGES = [
    ("protocol of 256 bytes", ("Init", (0, "é" * 128, 0, b""), {})),
    ("alias 65535", ("Continuation", (65535, b""), {})),
    ("largest values", ("Continuation", (0, b""), {"flags": REQ, "request_id": 2**63 - 1,
                                                   "seq": 2**63 - 1})),
    ("1024 fragments", ("Continuation", (0, b""), {"seq": 0, "frag_index": 1023,
                                                    "frag_count": 1024})),
    ("payload of MAX_MESSAGE_PAYLOAD", ("Continuation", (0, bytes(MIB)), {})),
    ("64 ack ranges", ("DeliveryAck", (2**63 - 1, 0, 0, [(1, 2)] * 64), {})),
    ("ping of 32 bytes", ("Ping", (bytes(32),), {})),
    ("close reason of 128 bytes", ("Close", (2**63 - 1, "€" * 42 + "xx"), {})),
]


@with_codecs
@pytest.mark.parametrize("spec", [e[1] for e in EDGES], ids=[e[0] for e in EDGES])
def test_limits_at_the_edge_round_trip(codec: ModuleType, spec: tuple) -> None:
    frame = build(codec, spec)
    raw = codec.encode_frame(frame)
    assert codec.decode_frame(raw) == (frame, len(raw))


@with_codecs
def test_256_frames_with_padding_and_skippable_frames_are_fine(codec: ModuleType) -> None:
    raw = (bytes.fromhex("050100" "4000" "00") * 256) + bytes.fromhex("4100")
    assert codec.decode_packet(raw) == [codec.Bound(0)] * 256


# --- every malformed case of wire.md section 3 ------------------------------------

MALFORMED = [
    # 3.1 frame types and lengths
    ("unknown type 0x0a", "0a00", "unknown frame type at offset 0"),
    ("unknown type 0x3f", "3f00", "unknown frame type at offset 0"),
    ("invalid type 0x80", "80", "invalid frame type at offset 0"),
    ("invalid type 0xff", "ff0100", "invalid frame type at offset 0"),
    ("unknown type after a valid frame", "0202beef" "0b00", "unknown frame type at offset 4"),
    ("no length", "03", "truncated varint at offset 1"),
    ("truncated length", "0380", "truncated varint at offset 1"),
    ("non-minimal length", "038000", "non-minimal varint at offset 1"),
    ("length of 10 bytes", "03" + "ff" * 9 + "01", "varint longer than 9 bytes at offset 1"),
    ("length beyond the packet", "0305000000", "frame length exceeds packet at offset 1"),
    ("skippable length beyond the packet", "4005aabb", "frame length exceeds packet at offset 1"),
    # 3.2 messages (CONTINUATION: type 0, length 1, protocol_int 2, flags 3)
    ("no flags byte", "0301" "00", "truncated frame body at offset 3"),
    ("REQUEST and RESPONSE", "0303" "00" "03" "01", "invalid flag combination at offset 3"),
    ("RELIABLE without SEQ", "0302" "00" "08", "invalid flag combination at offset 3"),
    ("ORDERED without RELIABLE", "0303" "00" "14" "01", "invalid flag combination at offset 3"),
    ("FRAGMENT without SEQ", "0304" "00" "20" "0001", "invalid flag combination at offset 3"),
    ("reserved bit 0x40", "0302" "00" "40", "reserved flag bits set at offset 3"),
    ("reserved bit 0x80", "0302" "00" "80", "reserved flag bits set at offset 3"),
    ("request_id non-minimal", "0304" "00" "01" "8000", "non-minimal varint at offset 4"),
    # the varint would continue into the PADDING after the frame: bounded by the body
    ("request_id cut by the body", "0303" "00" "01" "80" "0000", "truncated varint at offset 4"),
    ("seq of 10 bytes", "030c" "00" "04" + "ff" * 9 + "01",
     "varint longer than 9 bytes at offset 4"),
    ("frag_count 0", "0305" "00" "24" "01" "00" "00", "invalid fragment fields at offset 5"),
    ("frag_count 1025", "0306" "00" "24" "01" "00" "8108", "invalid fragment fields at offset 5"),
    ("frag_index == frag_count", "0305" "00" "24" "01" "02" "02",
     "invalid fragment fields at offset 5"),
    ("payload above MAX_MESSAGE_PAYLOAD",
     "03" + _frame.encode_varint(MIB + 3).hex() + "00" "00" + "00" * (MIB + 1),
     "payload larger than 1048576 bytes at offset 6"),
    # INIT: type 0, length 1, transport_id 2-3, protocol_length 4, protocol 5..
    ("INIT without transport_id", "0101" "00", "truncated frame body at offset 2"),
    ("empty protocol", "0105" "0001" "00" "00" "00", "empty protocol id at offset 4"),
    ("protocol of 257 bytes", "0104" "0001" "8102",
     "protocol id longer than 256 bytes at offset 4"),
    ("protocol beyond the body", "0105" "0001" "05" "2f61", "truncated frame body at offset 5"),
    ("protocol overlong UTF-8", "0107" "0001" "02" "c080" "00" "00",
     "protocol id is not valid UTF-8 at offset 5"),
    ("protocol UTF-16 surrogate", "0109" "0001" "04" "2feda080" "00" "00",
     "protocol id is not valid UTF-8 at offset 6"),
    ("protocol above U+10FFFF", "010a" "0001" "05" "2ff4908080" "00" "00",
     "protocol id is not valid UTF-8 at offset 6"),
    ("protocol truncated UTF-8", "0108" "0001" "03" "2fe282" "00" "00",
     "protocol id is not valid UTF-8 at offset 6"),
    ("protocol lone continuation byte", "0106" "0001" "01" "80" "00" "00",
     "protocol id is not valid UTF-8 at offset 5"),
    ("protocol_int 65536", "0108" "0001" "01" "61" "808004" "00",
     "protocol_int above 65535 at offset 6"),
    # other frames
    ("ACK body of 1 byte", "020100", "truncated frame body at offset 2"),
    ("ACK body of 3 bytes", "0203beef00", "trailing bytes in frame body at offset 4"),
    ("RESET without code", "040107", "truncated frame body at offset 3"),
    ("RESET with trailing byte", "0403070200", "trailing bytes in frame body at offset 4"),
    ("RESET protocol_int 65536", "0404" "808004" "01", "protocol_int above 65535 at offset 2"),
    ("BOUND empty", "0500", "truncated varint at offset 2"),
    ("BOUND non-minimal", "05028000", "non-minimal varint at offset 2"),
    ("BOUND with trailing byte", "05020700", "trailing bytes in frame body at offset 3"),
    ("CONTINUATION protocol_int 65536", "0304" "808004" "00",
     "protocol_int above 65535 at offset 2"),
    ("DELIVERY_ACK with 65 ranges", "0604" "00" "00" "41" "00",
     "more than 64 ack ranges at offset 4"),
    ("DELIVERY_ACK range missing", "0605" "00" "00" "01" "00" "00", "truncated varint at offset 7"),
    ("DELIVERY_ACK trailing byte", "0605" "00" "00" "00" "00" "00",
     "trailing bytes in frame body at offset 6"),
    ("PING of 33 bytes", "0721" + "00" * 33, "ping data longer than 32 bytes at offset 2"),
    ("PONG of 33 bytes", "0821" + "00" * 33, "ping data longer than 32 bytes at offset 2"),
    ("CLOSE without code", "0900", "truncated varint at offset 2"),
    ("CLOSE reason of 129 bytes", "098201" "00" + "61" * 129,
     "close reason longer than 128 bytes at offset 4"),
    ("CLOSE reason not UTF-8", "0903" "00" "61" "ff",
     "close reason is not valid UTF-8 at offset 4"),
    ("257 frames", "050100" * 257, "more than 256 frames in packet at offset 768"),
]


@with_codecs
@pytest.mark.parametrize(("wire", "message"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed(codec: ModuleType, wire: str, message: str) -> None:
    raw = bytes.fromhex(wire)
    with pytest.raises(FrameError) as info:
        codec.decode_packet(raw)
    assert str(info.value) == message
    assert info.value.offset == int(message.rsplit(" ", 1)[1])


@with_codecs
def test_frames_before_a_malformed_one_are_kept(codec: ModuleType) -> None:
    with pytest.raises(FrameError) as info:
        codec.decode_packet(bytes.fromhex("0202beef" "050101" "0b00"))
    assert info.value.frames == [codec.Ack(0xBEEF), codec.Bound(1)]
    with pytest.raises(FrameError) as info:
        codec.decode_packet(bytes.fromhex("050100" * 257))
    assert info.value.frames == [codec.Bound(0)] * 256


@with_codecs
@pytest.mark.parametrize("wire", [m[1] for m in MALFORMED[:-1]], ids=[m[0] for m in MALFORMED[:-1]])
def test_malformed_frame_fails_decode_frame_too(codec: ModuleType, wire: str) -> None:
    raw = bytes.fromhex(wire)
    with pytest.raises(FrameError):
        pos = 0
        while True:
            frame, pos = codec.decode_frame(raw, pos)
            if frame is None:
                break


# --- API misuse ---------------------------------------------------------------------

MISUSE = [
    ("empty protocol", "Init", (0, "", 0, b""), {}),
    ("protocol too long", "Init", (0, "x" * 257, 0, b""), {}),
    ("protocol not encodable", "Init", (0, "\ud800", 0, b""), {}),
    ("transport_id too big", "Init", (65536, "/p", 0, b""), {}),
    ("alias too big", "Continuation", (65536, b""), {}),
    ("negative alias", "Continuation", (-1, b""), {}),
    ("REQUEST and RESPONSE", "Continuation", (0, b""), {"flags": REQ | RESP, "request_id": 1}),
    ("REQUEST without request_id", "Continuation", (0, b""), {"flags": REQ}),
    ("request_id without kind", "Continuation", (0, b""), {"request_id": 1}),
    ("RELIABLE without seq", "Continuation", (0, b""), {"flags": RELIABLE}),
    ("ORDERED without RELIABLE", "Continuation", (0, b""), {"flags": ORDERED, "seq": 1}),
    ("SEQ flag without seq", "Continuation", (0, b""), {"flags": SEQ}),
    ("FRAGMENT flag without fields", "Continuation", (0, b""), {"flags": limits.FLAG_FRAGMENT,
                                                                 "seq": 1}),
    ("fragment without seq", "Continuation", (0, b""), {"frag_index": 0, "frag_count": 1}),
    ("frag_index alone", "Continuation", (0, b""), {"seq": 0, "frag_index": 0}),
    ("frag_count 0", "Continuation", (0, b""), {"seq": 0, "frag_index": 0, "frag_count": 0}),
    ("frag_count 1025", "Continuation", (0, b""), {"seq": 0, "frag_index": 0, "frag_count": 1025}),
    ("frag_index past count", "Continuation", (0, b""), {"seq": 0, "frag_index": 2,
                                                         "frag_count": 2}),
    ("reserved flag", "Continuation", (0, b""), {"flags": 0x40}),
    ("flags above a byte", "Continuation", (0, b""), {"flags": 0x100}),
    ("seq of 2**63", "Continuation", (0, b""), {"seq": 2**63}),
    ("ACK transport_id too big", "Ack", (65536,), {}),
    ("RESET code too big", "Reset", (0, 256), {}),
    ("BOUND alias too big", "Bound", (65536,), {}),
    ("65 ack ranges", "DeliveryAck", (0, 0, 0, [(0, 0)] * 65), {}),
    ("negative gap", "DeliveryAck", (0, 0, 0, [(-1, 0)]), {}),
    ("PING of 33 bytes", "Ping", (bytes(33),), {}),
    ("PONG of 33 bytes", "Pong", (bytes(33),), {}),
    ("CLOSE reason of 129 bytes", "Close", (0, "x" * 129), {}),
    ("CLOSE code of 2**63", "Close", (2**63, ""), {}),
]


@with_codecs
@pytest.mark.parametrize(("name", "args", "kwargs"), [m[1:] for m in MISUSE],
                         ids=[m[0] for m in MISUSE])
def test_constructor_misuse_is_usage_error(codec: ModuleType, name: str, args: tuple,
                                           kwargs: dict) -> None:
    with pytest.raises(UsageError):
        getattr(codec, name)(*args, **kwargs)


@with_codecs
def test_oversized_payload_is_message_too_large(codec: ModuleType) -> None:
    with pytest.raises(MessageTooLargeError):
        codec.Continuation(0, bytes(MIB + 1))
    with pytest.raises(MessageTooLargeError):
        codec.encode_continuation(0, bytes(MIB + 1))
    with pytest.raises(MessageTooLargeError):
        codec.encode_init(1, "/p", 0, bytearray(MIB + 1))


@with_codecs
@pytest.mark.parametrize("kwargs", [
    {"flags": 0, "seq": 5},
    {"flags": 0, "request_id": 5},
    {"flags": SEQ, "frag_count": 2},
    {"flags": REQ | RESP, "request_id": 1},
    {"flags": RELIABLE},
    {"flags": SEQ | limits.FLAG_FRAGMENT, "frag_index": 0, "frag_count": 0},
    {"flags": 256},
    {"seq": -1},
])
def test_fast_encoder_misuse_is_usage_error(codec: ModuleType, kwargs: dict) -> None:
    with pytest.raises(UsageError):
        codec.encode_continuation(1, b"x", **kwargs)
    with pytest.raises(UsageError):
        codec.encode_init(1, "/p", 1, b"x", **kwargs)


@with_codecs
def test_other_misuse(codec: ModuleType) -> None:
    with pytest.raises(UsageError):
        codec.encode_packet([codec.Bound(0)] * 257)
    with pytest.raises(UsageError):
        codec.encode_packet([], padding=-1)
    with pytest.raises(UsageError):
        codec.decode_frame(b"\x00", 2)
    with pytest.raises(TypeError):
        codec.encode_frame(b"not a frame")
    with pytest.raises(TypeError):
        codec.Continuation(0, "text is not bytes")
    with pytest.raises(TypeError):
        codec.Continuation(0.0, b"")


# --- zero copy ------------------------------------------------------------------


@with_codecs
def test_payload_is_a_view_of_a_bytearray_input(codec: ModuleType) -> None:
    data = bytearray(codec.encode_continuation(1, b"hello"))
    frame, _ = codec.decode_frame(data)
    payload = frame.payload
    assert isinstance(payload, memoryview) and payload.readonly
    data[-5:] = b"HELLO"
    assert bytes(payload) == b"HELLO" and bytes(frame.payload) == b"HELLO"


@with_codecs
def test_frame_keeps_the_input_from_moving(codec: ModuleType) -> None:
    data = bytearray(codec.encode_frame(codec.Ping(b"abc")))
    frame, _ = codec.decode_frame(data)
    with pytest.raises(BufferError):
        data.extend(bytes(4096))  # would move the memory the frame points into
    del data
    assert bytes(frame.data) == b"abc"
    data = bytearray(codec.encode_frame(codec.Ping(b"abc")))
    codec.decode_packet(data)
    data.extend(b"\x00")  # no frame alive: no export left behind


@with_codecs
def test_payload_of_a_memoryview_slice(codec: ModuleType) -> None:
    raw = codec.encode_packet([codec.Ack(1), codec.Continuation(2, b"payload")])
    backing = bytearray(b"\xee" * 3 + raw + b"\xff")
    frames = codec.decode_packet(memoryview(backing)[3 : 3 + len(raw)])
    assert bytes(frames[1].payload) == b"payload"
    backing[-2] = ord("D")
    assert bytes(frames[1].payload) == b"payloaD"


def test_cython_payload_points_into_bytes_input() -> None:
    raw = _frame.encode_continuation(1, b"x" * 64)
    frame, _ = _frame.decode_frame(raw)
    view = frame.payload
    assert view.obj is frame  # the frame exports its slice of raw, which it holds
    assert bytes(view) == raw[-64:]


def test_cython_decoding_allocates_only_the_frames() -> None:
    raw = _frame.encode_packet([_frame.Continuation(1, b"x" * 64, seq=i) for i in range(64)])
    _frame.decode_packet(raw)
    before = sys.getallocatedblocks()
    frames = _frame.decode_packet(raw)
    grown = sys.getallocatedblocks() - before
    assert len(frames) == 64
    assert grown <= 64 + 4, grown  # the frames and the list, nothing per frame beside


# --- repr ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [g[1] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_twins_repr_alike(spec: tuple) -> None:
    assert repr(build(_frame, spec)) == repr(build(_frame_py, spec))
    assert repr(build(_frame, spec)).startswith(spec[0] + "(")


# --- properties: round trips and parity ----------------------------------------------

u63 = st.one_of(st.integers(0, 300), st.integers(0, 2**63 - 1))
alias = st.integers(0, 65535)
payloads = st.one_of(st.binary(max_size=80), st.binary(min_size=100, max_size=2000))


@st.composite
def message_fields(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from([0, REQ, RESP]))
    fields: dict[str, Any] = {"flags": kind}
    if kind:
        fields["request_id"] = draw(u63)
    if draw(st.booleans()):
        fields["seq"] = draw(u63)
        fields["flags"] |= draw(st.sampled_from([0, RELIABLE, RELIABLE | ORDERED]))
        if draw(st.booleans()):
            fields["frag_count"] = draw(st.integers(1, limits.MAX_FRAGMENTS))
            fields["frag_index"] = draw(st.integers(0, fields["frag_count"] - 1))
    return fields


ranges = st.lists(st.tuples(u63, u63), max_size=limits.MAX_ACK_RANGES)
message_specs = st.one_of(
    st.tuples(st.just("Init"),
              st.tuples(st.integers(0, 65535), st.text(min_size=1, max_size=64), alias, payloads),
              message_fields()),
    st.tuples(st.just("Continuation"), st.tuples(alias, payloads), message_fields()),
)
specs = st.one_of(
    message_specs,
    st.tuples(st.just("Ack"), st.tuples(st.integers(0, 65535)), st.just({})),
    st.tuples(st.just("Reset"), st.tuples(alias, st.integers(0, 255)), st.just({})),
    st.tuples(st.just("Bound"), st.tuples(alias), st.just({})),
    st.tuples(st.just("DeliveryAck"), st.tuples(u63, u63, u63, ranges), st.just({})),
    st.tuples(st.just("Ping"), st.tuples(st.binary(max_size=32)), st.just({})),
    st.tuples(st.just("Pong"), st.tuples(st.binary(max_size=32)), st.just({})),
    st.tuples(st.just("Close"), st.tuples(u63, st.text(max_size=32)), st.just({})),
)


@hypothesis_settings
@given(spec=specs)
def test_every_frame_round_trips_alike(spec: tuple) -> None:
    wire = _frame.encode_frame(build(_frame, spec))
    assert _frame_py.encode_frame(build(_frame_py, spec)) == wire
    for codec in (_frame, _frame_py):
        frame = build(codec, spec)
        for data in (wire, bytearray(wire), memoryview(b"\x00" + wire)[1:]):
            decoded, end = codec.decode_frame(data)
            assert decoded == frame and end == len(wire)
            assert codec.encode_frame(decoded) == wire


@hypothesis_settings
@given(spec=message_specs)
def test_fast_encoders_match_frame_encoding(spec: tuple) -> None:
    for codec in (_frame, _frame_py):
        frame = build(codec, spec)
        fields = {k: getattr(frame, k) or 0
                  for k in ("flags", "request_id", "seq", "frag_index", "frag_count")}
        if spec[0] == "Init":
            fast = codec.encode_init(frame.transport_id, frame.protocol, frame.protocol_int,
                                     frame.payload, **fields)
        else:
            fast = codec.encode_continuation(frame.protocol_int, frame.payload, **fields)
        assert fast == codec.encode_frame(frame)


@hypothesis_settings
@given(frame_specs=st.lists(specs, max_size=40), padding=st.integers(0, 64))
def test_packets_round_trip_alike(frame_specs: list, padding: int) -> None:
    wire = _frame.encode_packet([build(_frame, s) for s in frame_specs], padding)
    assert _frame_py.encode_packet([build(_frame_py, s) for s in frame_specs], padding) == wire
    for codec in (_frame, _frame_py):
        assert codec.decode_packet(wire) == [build(codec, s) for s in frame_specs]
    assert outcome(_frame, wire) == outcome(_frame_py, wire)


@hypothesis_settings
@given(frame_specs=st.lists(specs, min_size=1, max_size=8), data=st.data())
def test_twins_agree_on_mutated_packets(frame_specs: list, data: st.DataObject) -> None:
    wire = bytearray(_frame.encode_packet([build(_frame, s) for s in frame_specs]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(wire) - 1))
        how = data.draw(st.sampled_from(["flip", "truncate", "set", "insert"]))
        if how == "flip":
            wire[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "truncate":
            del wire[at:]
        elif how == "set":
            wire[at] = data.draw(st.sampled_from([0x00, 0x01, 0x3F, 0x40, 0x7F, 0x80, 0xFF]))
        else:
            wire[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        if not wire:
            break
    assert outcome(_frame, bytes(wire)) == outcome(_frame_py, bytes(wire))


@hypothesis_settings
@given(raw=st.binary(max_size=64))
def test_twins_agree_on_random_bytes(raw: bytes) -> None:
    assert outcome(_frame, raw) == outcome(_frame_py, raw)


def test_twins_agree_on_fuzzed_packets() -> None:
    """The fuzz script's mutations, every input checked against the pure oracle."""
    result = fuzz.run(20_000, seed=2024, oracle_every=1)
    assert result["ok"] > 1000 and result["error"] > 1000


def test_mutation_fuzz_only_yields_frames_or_frame_error() -> None:
    """200,000 mutated inputs through the Cython decoder (scripts/fuzz_frame.py runs longer)."""
    result = fuzz.run(200_000, seed=7)
    assert sum(result.values()) == 200_000
    assert result["ok"] > 10_000 and result["error"] > 10_000
