"""The TCP stream transport's connection layer (docs/wire.md §6).

On a stream, msgnet packets travel as ``length:varint | packet``: the packets are the
datagrams of §2, byte for byte, with the same handshake and session security (no second
security layer runs on the connection). This module only frames and polices the byte
stream; it knows nothing of sessions. What a connection receives goes, one whole packet at
a time, to a :class:`StreamDelegate` (the network), which runs it through the same receive
path as a UDP datagram.

The stream is remote input, so every way it can hurt us is bounded and counted:

=======================  ===============================================================
bad_stream               a length of 0 or above ``MAX_STREAM_PACKET``, a non-minimal or
                         over-long varint, or the delegate's verdict (``abort``): closed
stream_packet_timeout    no whole packet within ``STREAM_PACKET_TIMEOUT`` of its first byte
stream_idle              nothing sent or received for ``STREAM_IDLE_TIMEOUT``
too_many_connections     over ``MAX_STREAM_CONNECTIONS_PER_IP`` (inbound, per address) or
                         ``MAX_STREAM_CONNECTIONS`` (in total): refused at once
stream_closed_by_peer    the peer closed its side (EOF)
stream_reset             the connection failed (reset, unreachable, ...)
stream_closed            closed here on purpose (``close()``, shutdown)
stream_write_refused     ``write_packet`` on a closed or back-pressured connection
stream_dial_failed       an outbound connection could not be opened
=======================  ===============================================================

plus the totals ``stream_connections_in``, ``stream_connections_out``,
``stream_packets_in``, ``stream_bytes_in``, ``stream_packets_out`` and
``stream_bytes_out``. An IPv6 /64 counts as one address for the per-address limit, as it
does for the handshake's rate limits: one subscriber gets a whole /64, so counting single
IPv6 addresses would bound nothing.

Reading uses :class:`asyncio.BufferedProtocol` with a compiled core
(:mod:`msgnet._stream`): the transport reads straight into the connection's C buffer, length
prefixes are parsed in C, and a DATA packet of a known session (:attr:`TcpStreams.sessions`)
goes to its engine without a Python object per packet; other packets reach the delegate as a
``memoryview`` of the buffer, without a copy. The buffer grows only as bytes actually arrive
(doubling, up to the packet being read), so a peer that merely *announces* a 1 MiB packet
costs us no more than a peer that sends a few bytes.

:class:`StreamRecovery` (for the network) makes reliable messages on a stream survive a
connection that dies (docs/wire.md §6.1): the connections keep what they wrote for sessions
that send reliable messages until a PONG proves it arrived, and after a failure the peer is
asked which packets it opened and the rest are sent again by the next path.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from . import limits
from ._frame import Continuation, Init, Ping, decode_packet, encode_frame
from ._stream import (
    MIN_READ,
    READ_BUFFER,
    Retention,
    StreamCore,
    WAIT_PING_MARK,
    encode_stream_header,
    resume_report,
)
from .errors import ClosedError, PeerUnreachableError, UsageError

if TYPE_CHECKING:
    from ._engine import Message, Session

__all__ = [
    "READ_BUFFER",
    "RESUMED_PROTOCOL",
    "RESUME_PROTOCOL",
    "StreamAddress",
    "StreamConnection",
    "StreamDelegate",
    "StreamListener",
    "StreamRecovery",
    "StreamSettings",
    "TcpStreams",
    "encode_stream_header",
]


class StreamDelegate(Protocol):
    """What a connection calls, synchronously, from the event loop.

    Exceptions raised here are reported to the loop's exception handler, never into the
    transport: a bug in the delegate must not tear down other connections.
    """

    def stream_opened(self, conn: StreamConnection) -> None:
        """``conn`` is established and admitted (inbound or outbound)."""

    def stream_packet(self, conn: StreamConnection, packet: memoryview) -> None:
        """One whole packet. The view is into the connection's receive buffer and valid
        only during this call: copy it (``bytes(packet)``) to keep it.

        With :attr:`TcpStreams.sessions` set, DATA packets of the sessions in it never come
        here: the connection runs them through the session's engine itself and calls the
        two optional methods below when something is to be decided."""

    # Optional (looked up once per connection):
    #
    # def stream_authenticated(self, session: Session, conn: StreamConnection) -> None:
    #     """A packet authenticated for ``session`` on ``conn``, and the session does not
    #     send on ``conn`` alone (first contact, or the peer moved to ``conn``)."""
    #
    # def stream_bad_packet(self, conn: StreamConnection) -> None:
    #     """A DATA packet for a known session failed its checks on ``conn``."""

    def stream_writable(self, conn: StreamConnection) -> None:
        """``conn``'s write buffer drained below the low-water mark after back-pressure."""

    def stream_closed(self, conn: StreamConnection, reason: str) -> None:
        """``conn`` became unusable (called once): ``reason`` is its counter name."""


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """The limits of docs/wire.md §6, adjustable so tests can use short timeouts.

    ``low_water`` is where back-pressure lifts (a quarter of ``high_water`` unless given);
    ``connect_timeout`` bounds an outbound TCP connect.
    """

    packet_timeout: float = limits.STREAM_PACKET_TIMEOUT
    idle_timeout: float = limits.STREAM_IDLE_TIMEOUT
    max_connections_per_ip: int = limits.MAX_STREAM_CONNECTIONS_PER_IP
    max_connections: int = limits.MAX_STREAM_CONNECTIONS
    high_water: int = limits.STREAM_HIGH_WATER
    low_water: int | None = None
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if min(self.packet_timeout, self.idle_timeout, self.connect_timeout) <= 0:
            raise UsageError("stream timeouts must be positive")
        if self.max_connections_per_ip < 1 or self.max_connections < 1:
            raise UsageError("connection limits must be at least 1")
        if self.high_water < 1:
            raise UsageError("high_water must be at least 1 byte")
        if self.low_water is not None and not 0 <= self.low_water <= self.high_water:
            raise UsageError("low_water must be within 0..high_water")

    @property
    def low(self) -> int:
        return self.high_water // 4 if self.low_water is None else self.low_water


@functools.lru_cache(maxsize=4096)
def _address_key(host: str) -> bytes:
    """What the per-address limit counts by: an IPv4 address, or an IPv6 /64."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    packed = ip.packed
    return packed[:8] if len(packed) == 16 else packed


def _canonical_peer(peername: Any) -> tuple[Any, ...]:
    """The remote as UDP sessions spell it; IPv4-mapped IPv6 (dual-stack) becomes IPv4."""
    if isinstance(peername, tuple) and len(peername) == 4:
        ip = ipaddress.ip_address(peername[0].partition("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return (str(ip.ipv4_mapped), peername[1])
    return tuple(peername)


class StreamAddress(tuple[Any, ...]):
    """A connection's remote ``(host, port)`` that also names the connection.

    The handshake core keys rate limits and cookies by ``address[0]`` and ``address[1]`` and
    hands the address back with its replies; a reply addressed to a StreamAddress goes back
    on ``conn``, so the sans-IO core needs to know nothing of streams.
    """

    conn: StreamConnection

    def __new__(cls, conn: StreamConnection) -> StreamAddress:
        self = super().__new__(cls, conn.remote[:2])
        self.conn = conn
        return self

    def __repr__(self) -> str:
        return f"StreamAddress({self[0]!r}, {self[1]!r})"


class StreamConnection(StreamCore, asyncio.BufferedProtocol):
    """One TCP connection carrying ``length:varint | packet`` both ways.

    Created by :class:`TcpStreams` (``listen`` or ``connect``). ``remote`` and ``local`` are
    the ends' ``(host, port)`` (IPv6: the 4-tuple); ``outbound`` says who dialled;
    ``transport_id`` is the owner's number for the listener (or dialler) it belongs to.
    Reading and the engine's write path are compiled (:class:`msgnet._stream.StreamCore`);
    this class is the asyncio glue around them.
    """

    def __init__(self, streams: TcpStreams, outbound: bool, transport_id: int = 0) -> None:
        self.outbound = outbound
        self.transport_id = transport_id
        self.remote: tuple[Any, ...] = ()
        self.local: tuple[Any, ...] = ()
        self.address_key = b""
        self.address: StreamAddress | None = None  # set once connected
        self._streams = streams
        self._delegate = streams.delegate
        self._settings = streams.settings
        self._counters = streams._counters
        self._loop = streams.loop
        # Traffic totals (packets_in ...) live in the core and are folded into the streams'
        # counters when the connection ends: a shared dict updated per packet costs more
        # than the packet's framing.
        self._setup_core(self._delegate, self._counters, self._loop,
                         self._settings.packet_timeout, streams.sessions, streams.retention)
        self._last_active = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiters: list[asyncio.Future[None]] = []
        self._admitted = False
        # Done once connection_made ran: uvloop may return from create_connection before.
        self._made: asyncio.Future[None] = self._loop.create_future()

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing: it sends and delivers nothing."""
        return self._reason is not None

    @property
    def close_reason(self) -> str | None:
        return cast("str | None", self._reason)

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def __repr__(self) -> str:
        direction = "to" if self.outbound else "from"
        state = self._reason or ("paused" if self._paused else "open")
        return f"<StreamConnection {direction} {self.remote} {state}>"

    # -- sending ---------------------------------------------------------------------------

    def write_packet(self, packet: bytes | bytearray | memoryview) -> bool:
        """Queue one packet with its length prefix. False (counted as
        ``stream_write_refused``) when the connection is closed or back-pressured: a caller
        checks :attr:`writable` or awaits :meth:`wait_writable` first, which keeps the write
        buffer below ``high_water`` plus one batch. (Sessions' DATA packets take the
        compiled path, ``write_sealed``; this one carries handshakes and tests.)"""
        return self.write_packets((packet,))

    def write_packets(self, packets: Iterable[bytes | bytearray | memoryview]) -> bool:
        """Queue several packets in one transport write (one ``writev`` on uvloop)."""
        transport = self._transport
        if self._reason is not None or self._paused or transport is None:
            self._counters["stream_write_refused"] += 1
            return False
        pieces: list[Any] = []
        count = size = 0
        for packet in packets:
            n = len(packet)
            if not 0 < n <= limits.MAX_STREAM_PACKET:
                raise UsageError(f"a stream packet is 1 to {limits.MAX_STREAM_PACKET} bytes, "
                                 f"not {n}")
            header = encode_stream_header(n)
            if n <= MIN_READ:  # small: one copy is cheaper than another buffer entry
                pieces.append(header + packet)
            else:
                pieces.append(header)
                pieces.append(packet)
            count += 1
            size += len(header) + n
        self._transport_may_hold = True  # StreamCore._write asks the transport again
        if len(pieces) == 1:
            transport.write(pieces[0])
        else:
            transport.writelines(pieces)
        self.packets_out += count
        self.bytes_out += size
        self._active = True
        return True

    def wait_writable(self) -> asyncio.Future[None]:
        """A future done once :attr:`writable` (at once if it is); ClosedError if the
        connection closes first."""
        future: asyncio.Future[None] = self._loop.create_future()
        if self._reason is not None:
            future.set_exception(ClosedError(f"stream connection closed ({self._reason})"))
        elif not self._paused:
            future.set_result(None)
        else:
            self._waiters.append(future)
        return future

    # -- closing ---------------------------------------------------------------------------

    def close(self, reason: str = "stream_closed") -> None:
        """Close after the queued writes go out; ``reason`` is counted and reported."""
        if self._finish(reason) and self._transport is not None:
            self._transport.close()

    def abort(self, reason: str = "bad_stream") -> None:
        """Close now, discarding queued writes: for a peer that broke the rules."""
        if self._finish(reason) and self._transport is not None:
            self._transport.abort()

    def _finish(self, reason: str) -> bool:
        """Mark the connection unusable, once: count, release, tell waiters and delegate."""
        if self._reason is not None:
            return False
        self._reason = reason
        counters = self._counters
        counters[reason] += 1
        counters["stream_packets_in"] += self.packets_in
        counters["stream_bytes_in"] += self.bytes_in
        counters["stream_packets_out"] += self.packets_out
        counters["stream_bytes_out"] += self.bytes_out
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_exception(ClosedError(f"stream connection closed ({reason})"))
        if self._admitted:
            self._admitted = False
            self._streams._release(self)
            self._call(self._delegate.stream_closed, reason)
        return True

    # -- asyncio.BufferedProtocol (get_buffer and buffer_updated are StreamCore's) -----------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's are virtual
        self._made.set_result(None)
        try:
            self.remote = _canonical_peer(transport.get_extra_info("peername"))
            self.local = _canonical_peer(transport.get_extra_info("sockname"))
            self.address_key = _address_key(self.remote[0])
            self.address = StreamAddress(self)
        except (TypeError, ValueError, IndexError):  # not an IP socket: nothing to count by
            self.abort("stream_reset")
            return
        if not self._streams._admit(self):
            self._reason = "too_many_connections"
            self._counters["too_many_connections"] += 1
            transport.abort()
            return
        self._admitted = True
        transport.set_write_buffer_limits(high=self._settings.high_water,
                                          low=self._settings.low)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not every platform allows it
                pass
            self._fd = sock.fileno()  # DATA packets may go to it directly (StreamCore._write)
        self._counters["stream_connections_out" if self.outbound
                       else "stream_connections_in"] += 1
        self._last_active = self.rx_time = self._loop.time()
        self._arm(self._last_active + self._settings.idle_timeout)
        self._call(self._delegate.stream_opened)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("stream_closed_by_peer" if exc is None else "stream_reset")
        self._transport = None
        self._fd = -1

    def eof_received(self) -> bool:
        """The peer is done sending: close our side too (a msgnet stream is not half-open)."""
        return False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._reason is not None:
            return
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
        self._call(self._delegate.stream_writable)

    # -- timers ----------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        """Make sure the timer fires by ``when`` (an earlier timer re-checks and re-arms)."""
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """Deadlines are checked lazily: activity only moves timestamps, never the timer."""
        self._timer = None
        if self._reason is not None:
            return
        now = self._loop.time()
        if self._active:
            self._active = False
            self._last_active = now
        settings = self._settings
        if self._packet_started and now - self._packet_started >= settings.packet_timeout:
            self.abort("stream_packet_timeout")
            return
        if now - self._last_active >= settings.idle_timeout:
            self.close("stream_idle")
            return
        # While traffic flows the timer comes back every eighth of the idle timeout, so an
        # idle connection closes at most that late.
        when = self._last_active + (settings.idle_timeout / 8 if self._last_active == now
                                    else settings.idle_timeout)
        if self._packet_started:
            when = min(when, self._packet_started + settings.packet_timeout)
        self._arm(when)

    def _call(self, method: Any, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception as exc:
            self._report(method.__name__, exc)

    def _report(self, what: str, exc: BaseException) -> None:
        self._loop.call_exception_handler({
            "message": f"msgnet: stream delegate {what} raised",
            "exception": exc,
            "protocol": self,
        })


class StreamListener:
    """A listening TCP socket whose connections belong to a :class:`TcpStreams`."""

    def __init__(self, server: asyncio.AbstractServer) -> None:
        self._server = server

    @property
    def sockname(self) -> tuple[Any, ...]:
        """The bound address (port 0 resolved)."""
        sockets = getattr(self._server, "sockets", None) or ()
        if not sockets:
            raise ClosedError("listener is closed")
        return tuple(sockets[0].getsockname())

    def close(self) -> None:
        """Stop accepting; established connections stay open."""
        self._server.close()


class TcpStreams:
    """The TCP side of one host: its listeners, its connections, their limits and counters.

    ``delegate`` receives every connection's packets and events. Inbound connections are
    refused beyond ``max_connections_per_ip`` per address and ``max_connections`` in
    total; outbound ones count toward the total.
    """

    def __init__(self, delegate: StreamDelegate, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 settings: StreamSettings | None = None) -> None:
        self.delegate = delegate
        self.loop = loop or asyncio.get_running_loop()
        self.settings = settings or StreamSettings()
        # Sessions by local index (the network's): DATA packets for these are run through
        # their engine by the connection itself. Set before the first connection.
        self.sessions: dict[int, Any] | None = None
        # Which sessions' stream packets are kept until acknowledged (docs/wire.md §6.1).
        self.retention = Retention()
        self._counters: Counter[str] = Counter()
        self._connections: set[StreamConnection] = set()
        self._per_address: Counter[bytes] = Counter()
        self._listeners: list[StreamListener] = []
        self._closed = False

    @property
    def counters(self) -> Counter[str]:
        """Every counter (see the module docstring), open connections' traffic included."""
        total = Counter(self._counters)
        for conn in self._connections:
            total["stream_packets_in"] += conn.packets_in
            total["stream_bytes_in"] += conn.bytes_in
            total["stream_packets_out"] += conn.packets_out
            total["stream_bytes_out"] += conn.bytes_out
        return +total

    def connections(self) -> list[StreamConnection]:
        """The admitted connections that are still open."""
        return list(self._connections)

    async def listen(self, host: str, port: int, transport_id: int = 0) -> StreamListener:
        """Accept connections on ``(host, port)``; port 0 picks a free one. Accepted
        connections carry ``transport_id``."""
        self._check_open()
        try:
            server = await self.loop.create_server(
                lambda: StreamConnection(self, False, transport_id), host, port,
                reuse_address=True)
        except OSError as exc:
            raise UsageError(f"cannot listen on TCP {host} port {port}: {exc}") from exc
        listener = StreamListener(server)
        self._listeners.append(listener)
        return listener

    async def connect(self, host: str, port: int, transport_id: int = 0) -> StreamConnection:
        """Open a connection to ``(host, port)``, carrying ``transport_id``.

        Raises PeerUnreachableError if it cannot be opened within ``connect_timeout`` or
        the connection limit is reached, ClosedError if this object closes meanwhile.
        """
        self._check_open()
        if len(self._connections) >= self.settings.max_connections:
            self._counters["too_many_connections"] += 1
            raise PeerUnreachableError(
                f"{self.settings.max_connections} stream connections open: not dialling more")
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: StreamConnection(self, True, transport_id),
                                            host, port),
                self.settings.connect_timeout)
        except OSError as exc:  # TimeoutError included
            self._counters["stream_dial_failed"] += 1
            raise PeerUnreachableError(f"cannot connect to TCP {host} port {port}: "
                                       f"{exc or 'timeout'}") from exc
        assert isinstance(conn, StreamConnection)
        await conn._made
        if self._closed:
            conn.close()
            raise ClosedError("stream transport closed")
        if conn.closed:  # refused by the limits between our check and the connect
            raise PeerUnreachableError(f"connection to {host} port {port} refused here: "
                                       f"{conn.close_reason}")
        return conn

    def close(self) -> None:
        """Stop listening and close every connection (``stream_closed``)."""
        if self._closed:
            return
        self._closed = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for conn in list(self._connections):
            conn.close()

    def _admit(self, conn: StreamConnection) -> bool:
        if self._closed or len(self._connections) >= self.settings.max_connections:
            return False
        if not conn.outbound:
            if self._per_address[conn.address_key] >= self.settings.max_connections_per_ip:
                return False
            self._per_address[conn.address_key] += 1
        self._connections.add(conn)
        return True

    def _release(self, conn: StreamConnection) -> None:
        self._connections.discard(conn)
        if not conn.outbound:
            left = self._per_address[conn.address_key] - 1
            if left > 0:
                self._per_address[conn.address_key] = left
            else:
                del self._per_address[conn.address_key]

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("stream transport closed")


# -- reliable messages on streams (docs/wire.md §6.1) ----------------------------------------

RESUME_PROTOCOL = "/msgnet/stream-resume/1"
"""A sender whose connection died asks which of its packets arrived (docs/wire.md §6.1)."""
RESUMED_PROTOCOL = "/msgnet/stream-resumed/1"
"""The receiver's answer: which arrived; the others will never be accepted any more."""
_RESUME = struct.Struct(">IQ")      # receiver_index, up_to
_RESUMED = struct.Struct(">IQH")    # receiver_index, up_to, count; then the bitmap
_PING_MARK = b"\xa5msgnet/ack"       # PING data: this prefix and 8 random bytes


class StreamRecovery:
    """Reliable messages on stream paths (docs/wire.md §6.1), for the network.

    TCP acknowledges and retransmits, so a reliable message on a stream is sent once, as it
    is; but bytes written to a connection that then dies may never reach the peer. So the
    packets of a session that sent reliable messages on a stream are kept (by the connection
    that wrote them, :class:`msgnet._stream.StreamCore`) until a PONG answers a PING written
    after them on that connection. When a connection dies with packets kept, the sender asks
    the peer (``RESUME_PROTOCOL``, a reliable message on the session's next path) which of
    them it opened; the peer answers (``RESUMED_PROTOCOL``) and from then on refuses the rest,
    and the sender sends the messages of the rest again, as new reliable messages: each
    arrives exactly once, whatever path carries it.

    A ``Reliable(wait=True)`` send on a stream completes on the PONG of a PING of its own
    written after the message (:meth:`wait`); when the connection dies first, it completes
    once the messages sent again in its place are acknowledged, or at once if the peer
    reports the PING's packet opened.

    ``send_reliable(peer_id, protocol, data, flags, request_id, wait)`` sends a reliable
    message now (on a stream it calls :meth:`retain` and :meth:`sent` around the engine's
    send); with ``wait`` it returns a future of the message's acknowledgement, or None when
    the message went on a stream (a PING written after it acknowledges it).
    ``count(name)`` counts; ``sessions`` maps local index to live sessions.
    """

    def __init__(self, streams: TcpStreams,
                 send_reliable: Callable[[Any, str, bytes, int, int, bool, bool],
                                         asyncio.Future[None] | None],
                 count: Callable[[str], None], sessions: dict[int, Session]) -> None:
        self.retention = streams.retention
        self._streams = streams
        self._send_reliable = send_reliable
        self._count = count
        self._sessions = sessions
        # (peer, its receiver index) -> (session, packets awaiting the RESUMED answer)
        self._resuming: dict[tuple[Any, int], tuple[Session, list[tuple[int, bytes]]]] = {}
        # Sessions whose resume is under way -> what must go after the messages sent again:
        # the payloads that were queued for the dead connection, then the ordered messages
        # sent meanwhile, as (protocol, data, flags, request_id, wait, future). While a
        # session is in it, an ordered message to it must wait (hold), or it would overtake
        # the messages the resume sends again: senders test ``session in held``, a dict
        # lookup where a method call would cost a reliable send a tenth of its time.
        self.held: dict[Session, list[Any]] = {}
        # Waiting sends: their PING data -> (peer, the future their acknowledgement completes).
        self.waits: dict[bytes, tuple[Any, asyncio.Future[None]]] = {}
        self.retention.on_full = self._connection_full

    def handlers(self) -> dict[str, Callable[[Message], None]]:
        """The message handlers the network registers for the two reserved protocols."""
        return {RESUME_PROTOCOL: self._on_resume, RESUMED_PROTOCOL: self._on_resumed}

    # -- the sending side --------------------------------------------------------------------

    def retain(self, session: Session) -> None:
        """A reliable message is about to be queued for ``session`` on its stream: keep the
        session's stream packets from now on (before it is queued: a request or reply may be
        written at once)."""
        self.retention.sessions.add(session)

    def sent(self, session: Session) -> None:
        """A reliable message was queued for ``session`` on its stream: unless a PING is
        already awaiting its PONG, one follows it in the same packet."""
        if session not in self.retention.pings:
            self._ping(session, alone=False)

    def _ping(self, session: Session, alone: bool) -> None:
        """A PING whose PONG will acknowledge what the session wrote to its stream before it:
        queued after what the session has queued, or (``alone``) sealed now, covering what
        was already written."""
        marker = _PING_MARK + os.urandom(8)
        self.retention.pings[session] = [marker, None, 0, self._streams.loop.time()]
        frame = encode_frame(Ping(marker))
        try:
            if alone:
                session.engine.send_payload(session, frame)
            else:
                session.engine.send_control(session, frame)
        except (ClosedError, UsageError):
            self.retention.pings.pop(session, None)
            return
        self._count("stream_acks_requested")

    def _connection_full(self, conn: StreamConnection) -> None:
        """conn's retention reached its bound: the sessions whose PING did not go out on it
        yet send one now, alone, so that a PONG can free room (docs/wire.md §6.1)."""
        if conn.closed or not conn.retain_full:
            return
        pings = self.retention.pings
        for session in conn.retained_sessions():
            ping = pings.get(session)
            if (ping is None or ping[1] is None) and session.stream is conn \
                    and session.sends_on_stream:
                self._ping(session, alone=True)

    def hold(self, session: Session, protocol: str, data: bytes, flags: int, request_id: int,
             wait: bool) -> asyncio.Future[asyncio.Future[None] | None]:
        """Send an ordered reliable message once ``session``'s resume is settled, after the
        messages it sends again. The future resolves when the message is sent: to the
        future of its acknowledgement (``wait``, by the delivery layer), or None."""
        future: asyncio.Future[asyncio.Future[None] | None] = \
            self._streams.loop.create_future()
        self.held[session].append((protocol, data, flags, request_id, wait, future))
        return future

    def _release(self, session: Session) -> None:
        """``session``'s resume is settled (answered, or abandoned with the session): send
        what waited for it, in order."""
        for item in self.held.pop(session, ()):
            if isinstance(item, bytes):
                self._send_again(session, [item], "stream_requeued_messages")
                continue
            protocol, data, flags, request_id, wait, future = item
            if not future.done():  # (its sender gave up waiting: it was never sent)
                future.set_result(self._send_reliable(session.peer_id, protocol, data, flags,
                                                      request_id, wait, True))

    def wait(self, session: Session) -> tuple[bytes, asyncio.Future[None]]:
        """A reliable message was just queued for ``session`` on its stream by a send that
        waits: queue a PING of its own after it; returns the PING's data (to :meth:`unwait`
        once done) and the future its acknowledgement completes."""
        marker = WAIT_PING_MARK + os.urandom(8)
        future: asyncio.Future[None] = self._streams.loop.create_future()
        self.waits[marker] = (session.peer_id, future)
        try:
            session.engine.send_control(session, encode_frame(Ping(marker)))
        except BaseException:
            del self.waits[marker]
            raise
        return marker, future

    def unwait(self, marker: bytes) -> None:
        self.waits.pop(marker, None)

    def _settle_wait(self, session: Session, marker: bytes,
                     acks: list[asyncio.Future[None]] | None) -> None:
        """The packet with a waiting send's PING was opened by the peer (``acks`` None), or
        lost and the messages before it sent again: complete the wait when ``acks`` (theirs,
        on UDP) are all done, or by a new PING after them (on a stream)."""
        entry = self.waits.get(marker)
        if entry is None or entry[1].done():
            return
        future = entry[1]
        if acks is None:
            future.set_result(None)
        elif session.sends_on_stream:
            try:
                session.engine.send_control(session, encode_frame(Ping(marker)))
            except (ClosedError, UsageError) as exc:
                future.set_exception(PeerUnreachableError(f"could not confirm: {exc}"))
        else:
            _complete_when_all(acks, future)

    def pong_received(self, session: Session, data: bytes) -> bool:
        """A PONG: True if it answers one of our PINGs, releasing what an acknowledgement
        PING covers or completing a waiting send."""
        pings = self.retention.pings
        ping = pings.get(session)
        if ping is None or ping[0] != data:
            if self.waits:
                entry = self.waits.get(data)
                if entry is not None and entry[0] == session.peer_id:
                    if not entry[1].done():
                        entry[1].set_result(None)
                    return True
            return False
        del pings[session]
        conn = ping[1]
        if conn is not None and not conn.closed:
            full = conn.retain_full
            conn.release(session, ping[2])
            if full and conn.writable:  # room again: send what waited for it
                delegate = self._streams.delegate
                delegate.stream_writable(conn)
        stream = session.stream
        if (stream is not None and not stream.closed and stream.kept_count(session)
                and session.sends_on_stream and session not in pings):
            self._ping(session, alone=True)  # for what was written after that PING
        return True

    def take_queued(self, conn: StreamConnection) -> list[tuple[Session, bytes]]:
        """``conn`` died: before its sessions move to their next path, take out what the
        retaining ones queued for it and never wrote (whole frames). Moved to UDP as it is, it
        would go without the delivery layer, and a message too large for a datagram would be
        dropped; :meth:`stream_closed` sends its messages again as reliable ones instead."""
        queued = []
        for session in list(self.retention.sessions):
            if session.stream is conn and session.queued_bytes:
                try:
                    payload = session.engine.take_payload(session, 1 << 40)
                except ClosedError:
                    continue
                if payload:
                    queued.append((session, payload))
        return queued

    def stream_closed(self, conn: StreamConnection,
                      queued: list[tuple[Session, bytes]] | None = None) -> None:
        """``conn`` died: ask the peer of every session with packets kept on it which of them
        it opened (the session has moved to its next path by now), and send again what
        :meth:`take_queued` took out."""
        pings = self.retention.pings
        for session in conn.retained_sessions():
            kept = conn.forget(session)
            ping = pings.get(session)
            if ping is not None and ping[1] is conn:
                del pings[session]
            if not kept:
                continue
            key = (session.peer_id, session.remote_index)
            entry = self._resuming.get(key)
            if entry is None:
                entry = self._resuming[key] = (session, [])
            entry[1].extend(kept)
            self.held.setdefault(session, [])
            up_to = max(counter for counter, _ in entry[1])
            self._count("stream_resumes_sent")
            self._send_reliable(session.peer_id, RESUME_PROTOCOL,
                                _RESUME.pack(session.remote_index, up_to), 0, 0, False, False)
        for session, payload in queued or ():
            held = self.held.get(session)
            if held is not None:
                held.append(payload)  # after the messages the resume sends again
            else:
                self._send_again(session, [payload], "stream_requeued_messages")

    def _send_again(self, session: Session, payloads: list[bytes], counter: str) -> None:
        """Send the messages of our ``payloads``, lost with a connection, again as new
        reliable messages; the waiting sends whose PING was among them now wait for these.
        They go ordered (a stronger promise than unordered): those that were keep their
        order on UDP too, among themselves and before those that waited for them."""
        acks: list[asyncio.Future[None]] = []
        for payload in payloads:
            for protocol, flags, request_id, data in messages_in_payloads(session, [payload]):
                self._count(counter)
                ack = self._send_reliable(session.peer_id, protocol, data, flags, request_id,
                                          bool(self.waits), True)
                if ack is not None:
                    acks.append(ack)
            if self.waits:
                for marker in wait_markers(payload):
                    self._settle_wait(session, marker, list(acks))

    def tick(self, now: float) -> None:
        """Once a second: forget sessions that ended, ask again for acknowledgements whose
        PONG did not come within STREAM_ACK_TIMEOUT (or whose PING never went out)."""
        retention = self.retention
        sessions = self._sessions
        live = [s for s in retention.sessions if sessions.get(s.local_index) is s]
        if len(live) != len(retention.sessions):
            retention.sessions = set(live)
            for session in list(retention.pings):
                if session not in retention.sessions:
                    del retention.pings[session]
            for conn in self._streams.connections():
                for session in conn.retained_sessions():
                    if session not in retention.sessions:
                        self._count("stream_retained_dropped")
                        conn.forget(session)
        for key, (session, _) in list(self._resuming.items()):
            if sessions.get(session.local_index) is not session:
                del self._resuming[key]  # the session ended: its peer forgot it too
                self._count("stream_resumes_abandoned")
                self._release(session)   # (by the peer's next session, if any)
        for session in live:
            ping = retention.pings.get(session)
            if ping is not None and now - ping[3] < limits.STREAM_ACK_TIMEOUT:
                continue
            stream = session.stream
            if (stream is not None and not stream.closed and stream.kept_count(session)
                    and session.sends_on_stream):
                self._ping(session, alone=True)

    # -- the reserved protocols -------------------------------------------------------------

    def _on_resume(self, message: Message) -> None:
        """The peer's connection died: report which of its packets we opened (and refuse
        the others from now on)."""
        try:
            index, up_to = _RESUME.unpack(message.data)
        except struct.error:
            self._count("bad_stream_resume")
            return
        session = self._sessions.get(index)
        self._count("stream_resumes_received")
        if (session is None or session.peer_id != message.from_peer
                or session.crypto is None):
            count, bits = 0, b""  # not a session of ours with this peer (any more)
        else:
            count, bits = resume_report(session.crypto, up_to)
        self._send_reliable(message.from_peer, RESUMED_PROTOCOL,
                            _RESUMED.pack(index, up_to, count) + bits, 0, 0, False, False)

    def _on_resumed(self, message: Message) -> None:
        """The peer's report: send again the messages of the packets it did not open."""
        data = message.data
        try:
            index, up_to, count = _RESUMED.unpack_from(data)
        except struct.error:
            self._count("bad_stream_resume")
            return
        bits = data[_RESUMED.size:]
        if count > limits.REPLAY_WINDOW or len(bits) != (count + 7) // 8:
            self._count("bad_stream_resume")
            return
        key = (message.from_peer, index)
        entry = self._resuming.get(key)
        if entry is None:
            return  # answered already (a later RESUME covered it), or the session ended
        session, kept = entry
        rest = [e for e in kept if e[0] > up_to]
        if rest:
            self._resuming[key] = (session, rest)
        else:
            del self._resuming[key]
        lost: list[bytes] = []
        for counter, payload in kept:
            if counter > up_to:
                continue
            i = up_to - counter
            if i < count:
                if bits[i >> 3] >> (i & 7) & 1:  # it arrived
                    if self.waits:
                        for marker in wait_markers(payload):
                            self._settle_wait(session, marker, None)
                    continue
            else:
                self._count("stream_resend_uncertain")  # beyond what the peer could tell
            lost.append(payload)
        self._send_again(session, lost, "stream_resent_messages")
        if not rest:
            self._release(session)


def wait_markers(payload: bytes) -> list[bytes]:
    """The data of the waiting sends' PINGs in one of our sent payloads."""
    pings = [bytes(frame.data) for frame in decode_packet(payload) if isinstance(frame, Ping)]
    return [data for data in pings if data.startswith(WAIT_PING_MARK)]


def _complete_when_all(acks: list[asyncio.Future[None]], future: asyncio.Future[None]) -> None:
    """Complete ``future`` once every one of ``acks`` is done: with the first failure, if any."""
    left = len(acks)
    if not left:
        future.set_result(None)
        return

    def done(ack: asyncio.Future[None]) -> None:
        nonlocal left
        left -= 1
        if future.done():
            return
        if ack.cancelled():
            future.set_exception(PeerUnreachableError("the message sent again was cancelled"))
        elif ack.exception() is not None:
            future.set_exception(ack.exception())  # type: ignore[arg-type]
        elif left == 0:
            future.set_result(None)

    for ack in acks:
        ack.add_done_callback(done)


def messages_in_payloads(session: Session, payloads: list[bytes]) -> list[tuple[str, int, int, bytes]]:
    """The messages in our own sent payloads, as (protocol, flags, request_id, payload):
    what is re-sent when the packets are lost with their path or their session. Aliases die
    with the session, so frames cannot be re-sent as they are.

    Frames of the delivery layer (SEQ) are left out: it retransmits them itself (or fails
    them with the session). Control frames (PING, BOUND, ...) belong to the moment they were
    sent and are not repeated.
    """
    protocols = {alias: protocol for protocol, alias in session.protocols_out.items()}
    out = []
    for payload in payloads:
        for frame in decode_packet(payload):
            if isinstance(frame, Init):
                protocol = frame.protocol
            elif isinstance(frame, Continuation):
                known = protocols.get(frame.protocol_int)
                if known is None:
                    continue
                protocol = known
            else:
                continue
            if frame.flags & limits.FLAG_SEQ:
                continue
            out.append((protocol, frame.flags & (limits.FLAG_REQUEST | limits.FLAG_RESPONSE),
                        frame.request_id or 0, bytes(frame.payload)))
    return out
