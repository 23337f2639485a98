"""Types of the compiled stream core (msgnet/_stream.pyx)."""

import asyncio
from collections import Counter
from typing import Any, Final

from ._engine import Session
from ._packet import SessionCrypto

__all__ = ["MAX_HEADER", "MIN_READ", "PIECE", "PIECES_FROM", "READ_BUFFER", "Retention",
           "SHRINK_AFTER", "StreamCore", "WAIT_PING_MARK", "encode_stream_header",
           "resume_report"]

READ_BUFFER: Final[int]
PIECE: Final[int]
PIECES_FROM: Final[int]
WAIT_PING_MARK: Final[bytes]
MIN_READ: Final[int]
SHRINK_AFTER: Final[int]
MAX_HEADER: Final[int]

def encode_stream_header(length: int) -> bytes: ...
def resume_report(crypto: SessionCrypto, up_to: int) -> tuple[int, bytes]: ...

class Retention:
    sessions: set[Session]
    pings: dict[Session, list[Any]]
    on_full: Any

class StreamCore:
    """Compiled base of msgnet.tcp.StreamConnection (asyncio.BufferedProtocol's reading
    half, and the engine's write path)."""

    _reason: str | None
    _transport: asyncio.Transport | None
    _transport_may_hold: bool
    _paused: bool
    _active: bool
    _packet_started: float
    rx_time: float
    packets_in: int
    bytes_in: int
    packets_out: int
    bytes_out: int
    @property
    def retained_packets(self) -> int: ...
    @property
    def retained_bytes(self) -> int: ...
    @property
    def piecewise_in(self) -> int: ...
    @property
    def piecewise_out(self) -> int: ...
    def _setup_core(self, delegate: Any, counters: Counter[str],
                    loop: asyncio.AbstractEventLoop, packet_timeout: float,
                    sessions: dict[int, Session] | None, retention: Retention | None) -> None: ...
    @property
    def writable(self) -> bool: ...
    @property
    def buffered(self) -> int: ...
    @property
    def buffer_size(self) -> int: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int) -> memoryview: ...
    def get_buffer(self, sizehint: int) -> StreamCore: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def write_sealed(self, packet: bytes, session: Session | None, counter: int,
                     payload: bytes, pieces: object = None,
                     payload_follows: bool = False) -> bool: ...
    @property
    def retain_full(self) -> bool: ...
    def retained(self, session: Session) -> list[tuple[int, bytes]]: ...
    def kept_count(self, session: Session) -> int: ...
    def retained_sessions(self) -> list[Session]: ...
    def release(self, session: Session, count: int) -> int: ...
    def forget(self, session: Session) -> list[tuple[int, bytes]]: ...
