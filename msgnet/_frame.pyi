"""Types of the compiled frame codec (msgnet/_frame.pyx); _frame_py has the same API."""

from collections.abc import Iterable
from typing import Final, final

from typing_extensions import Buffer

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

MAX_PROTOCOL_LENGTH: Final[int]
MAX_PROTOCOL_INT: Final[int]
MAX_FRAMES_PER_PACKET: Final[int]
MAX_FRAGMENTS: Final[int]
MAX_ACK_RANGES: Final[int]
MAX_PING_DATA: Final[int]
MAX_CLOSE_REASON: Final[int]
MAX_MESSAGE_PAYLOAD: Final[int]
MAX_VARINT_BYTES: Final[int]
MAX_VARINT: Final[int]

FRAME_PADDING: Final[int]
FRAME_INIT: Final[int]
FRAME_ACK: Final[int]
FRAME_CONTINUATION: Final[int]
FRAME_RESET: Final[int]
FRAME_BOUND: Final[int]
FRAME_DELIVERY_ACK: Final[int]
FRAME_PING: Final[int]
FRAME_PONG: Final[int]
FRAME_CLOSE: Final[int]
FRAME_SKIPPABLE_MIN: Final[int]
FRAME_SKIPPABLE_MAX: Final[int]

FLAG_REQUEST: Final[int]
FLAG_RESPONSE: Final[int]
FLAG_SEQ: Final[int]
FLAG_RELIABLE: Final[int]
FLAG_ORDERED: Final[int]
FLAG_FRAGMENT: Final[int]
FLAG_RESERVED: Final[int]

class Frame:
    """Any frame (at run time an ABC the frame classes are registered with)."""

@final
class Init(Frame):
    def __init__(
        self,
        transport_id: int,
        protocol: str,
        protocol_int: int,
        payload: Buffer,
        flags: int = 0,
        request_id: int | None = None,
        seq: int | None = None,
        frag_index: int | None = None,
        frag_count: int | None = None,
    ) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def transport_id(self) -> int: ...
    @property
    def protocol(self) -> str: ...
    @property
    def protocol_int(self) -> int: ...
    @property
    def payload(self) -> memoryview: ...
    @property
    def flags(self) -> int: ...
    @property
    def request_id(self) -> int | None: ...
    @property
    def seq(self) -> int | None: ...
    @property
    def frag_index(self) -> int | None: ...
    @property
    def frag_count(self) -> int | None: ...

@final
class Continuation(Frame):
    def __init__(
        self,
        protocol_int: int,
        payload: Buffer,
        flags: int = 0,
        request_id: int | None = None,
        seq: int | None = None,
        frag_index: int | None = None,
        frag_count: int | None = None,
    ) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def protocol_int(self) -> int: ...
    @property
    def payload(self) -> memoryview: ...
    @property
    def flags(self) -> int: ...
    @property
    def request_id(self) -> int | None: ...
    @property
    def seq(self) -> int | None: ...
    @property
    def frag_index(self) -> int | None: ...
    @property
    def frag_count(self) -> int | None: ...

@final
class Ack(Frame):
    def __init__(self, transport_id: int) -> None: ...
    @property
    def transport_id(self) -> int: ...

@final
class Reset(Frame):
    def __init__(self, protocol_int: int, code: int) -> None: ...
    @property
    def protocol_int(self) -> int: ...
    @property
    def code(self) -> int: ...

@final
class Bound(Frame):
    def __init__(self, protocol_int: int) -> None: ...
    @property
    def protocol_int(self) -> int: ...

@final
class DeliveryAck(Frame):
    def __init__(
        self,
        largest: int,
        ack_delay_us: int,
        first_range: int,
        ranges: Iterable[tuple[int, int]],
    ) -> None: ...
    @property
    def largest(self) -> int: ...
    @property
    def ack_delay_us(self) -> int: ...
    @property
    def first_range(self) -> int: ...
    @property
    def ranges(self) -> tuple[tuple[int, int], ...]: ...

@final
class Ping(Frame):
    def __init__(self, data: Buffer) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def data(self) -> memoryview: ...

@final
class Pong(Frame):
    def __init__(self, data: Buffer) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def data(self) -> memoryview: ...

@final
class Close(Frame):
    def __init__(self, code: int, reason: str) -> None: ...
    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...

def encode_varint(value: int) -> bytes: ...
def decode_varint(data: Buffer, offset: int = 0) -> tuple[int, int]: ...
def decode_frame(data: Buffer, offset: int = 0) -> tuple[Frame | None, int]: ...
def decode_packet(data: Buffer) -> list[Frame]: ...
def encode_frame(frame: Frame) -> bytes: ...
def encode_packet(frames: Iterable[Frame], padding: int = 0) -> bytes: ...
def encode_continuation(
    protocol_int: int,
    payload: Buffer,
    flags: int = 0,
    request_id: int = 0,
    seq: int = 0,
    frag_index: int = 0,
    frag_count: int = 0,
) -> bytes: ...
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
) -> bytes: ...
