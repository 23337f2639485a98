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

Reading uses :class:`asyncio.BufferedProtocol`: the transport reads straight into the
connection's buffer, and each packet reaches the delegate as a ``memoryview`` of that buffer,
without a copy. The buffer grows only as bytes actually arrive (doubling, up to the packet
being read), so a peer that merely *announces* a 1 MiB packet costs us no more than a peer
that sends a few bytes.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from . import limits
from .errors import ClosedError, PeerUnreachableError, UsageError

__all__ = [
    "READ_BUFFER",
    "StreamAddress",
    "StreamConnection",
    "StreamDelegate",
    "StreamListener",
    "StreamSettings",
    "TcpStreams",
    "encode_stream_header",
]

READ_BUFFER = 64 * 1024
"""Initial receive buffer per connection, and the size it shrinks back to when empty."""
_MIN_READ = 4096  # below this much free room, the buffer is compacted or grown before a read
# Bytes of the longest valid length prefix: any longer varint is malformed or too large, so it
# is refused as soon as that many bytes arrive without its end.
_MAX_HEADER = (limits.MAX_STREAM_PACKET.bit_length() + 6) // 7
_ONE_BYTE_HEADERS = tuple(bytes((n,)) for n in range(128))


def encode_stream_header(length: int) -> bytes:
    """The ``length:varint`` that precedes a packet of ``length`` bytes on a stream."""
    if length < 128:
        return _ONE_BYTE_HEADERS[length]
    out = bytearray()
    while length >= 0x80:
        out.append(length & 0x7F | 0x80)
        length >>= 7
    out.append(length)
    return bytes(out)


class StreamDelegate(Protocol):
    """What a connection calls, synchronously, from the event loop.

    Exceptions raised here are reported to the loop's exception handler, never into the
    transport: a bug in the delegate must not tear down other connections.
    """

    def stream_opened(self, conn: StreamConnection) -> None:
        """``conn`` is established and admitted (inbound or outbound)."""

    def stream_packet(self, conn: StreamConnection, packet: memoryview) -> None:
        """One whole packet. The view is into the connection's receive buffer and valid
        only during this call: copy it (``bytes(packet)``) to keep it."""

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


class StreamConnection(asyncio.BufferedProtocol):
    """One TCP connection carrying ``length:varint | packet`` both ways.

    Created by :class:`TcpStreams` (``listen`` or ``connect``). ``remote`` and ``local`` are
    the ends' ``(host, port)`` (IPv6: the 4-tuple); ``outbound`` says who dialled;
    ``transport_id`` is the owner's number for the listener (or dialler) it belongs to.
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
        self._on_packet = self._delegate.stream_packet
        # Traffic totals, folded into the streams' counters when the connection ends: a
        # shared dict updated per packet costs more than the packet's framing.
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self._loop = streams.loop
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(READ_BUFFER)
        self._start = 0  # first unread byte of _buf
        self._end = 0  # end of the bytes received into _buf
        self._header = 0  # length of the pending packet's prefix, 0 until it is parsed
        self._need = 0  # bytes from _start the pending packet takes, 0 until known
        self._packet_started = 0.0  # loop time of the pending packet's first byte, 0: none
        self._last_active = 0.0
        self._active = False  # traffic since _last_active: the timer moves it (lazily)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._paused = False
        self._waiters: list[asyncio.Future[None]] = []
        self._admitted = False
        self._reason: str | None = None  # set once: the connection is unusable from then
        # Done once connection_made ran: uvloop may return from create_connection before.
        self._made: asyncio.Future[None] = self._loop.create_future()

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing: it sends and delivers nothing."""
        return self._reason is not None

    @property
    def close_reason(self) -> str | None:
        return self._reason

    @property
    def writable(self) -> bool:
        """Open and not back-pressured: ``write_packet`` will accept a packet."""
        return self._reason is None and not self._paused and self._transport is not None

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
        buffer below ``high_water`` plus one batch."""
        transport = self._transport
        if self._reason is not None or self._paused or transport is None:
            self._counters["stream_write_refused"] += 1
            return False
        n = len(packet)
        if not 0 < n <= limits.MAX_STREAM_PACKET:
            raise UsageError(f"a stream packet is 1 to {limits.MAX_STREAM_PACKET} bytes, "
                             f"not {n}")
        header = _ONE_BYTE_HEADERS[n] if n < 128 else encode_stream_header(n)
        if n <= _MIN_READ:  # small: one copy is cheaper than another buffer entry
            transport.write(header + packet)
        else:
            transport.writelines((header, packet))
        self.packets_out += 1
        self.bytes_out += len(header) + n
        self._active = True
        return True

    def write_packets(self, packets: Iterable[bytes | bytearray | memoryview]) -> bool:
        """Queue several packets in one transport write (one ``writev`` on uvloop)."""
        if not self.writable:
            self._counters["stream_write_refused"] += 1
            return False
        assert self._transport is not None
        pieces: list[Any] = []
        count = size = 0
        for packet in packets:
            n = len(packet)
            if not 0 < n <= limits.MAX_STREAM_PACKET:
                raise UsageError(f"a stream packet is 1 to {limits.MAX_STREAM_PACKET} bytes, "
                                 f"not {n}")
            header = encode_stream_header(n)
            if n <= _MIN_READ:  # small: one copy is cheaper than another buffer entry
                pieces.append(header + packet)
            else:
                pieces.append(header)
                pieces.append(packet)
            count += 1
            size += len(header) + n
        if len(pieces) == 1:
            self._transport.write(pieces[0])
        else:
            self._transport.writelines(pieces)
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

    # -- asyncio.BufferedProtocol -------------------------------------------------------------

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
        self._counters["stream_connections_out" if self.outbound
                       else "stream_connections_in"] += 1
        self._last_active = self._loop.time()
        self._arm(self._last_active + self._settings.idle_timeout)
        self._call(self._delegate.stream_opened)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("stream_closed_by_peer" if exc is None else "stream_reset")
        self._transport = None

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

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > READ_BUFFER:  # release what a large packet needed
                self._buf = bytearray(READ_BUFFER)
        if self._need and self._start + self._need <= len(self._buf):
            pass  # the pending packet completes within the buffer where it is
        elif self._need or len(self._buf) - self._end < _MIN_READ:
            self._make_room()
        return memoryview(self._buf)[self._end:]

    def _make_room(self) -> None:
        """Move the pending bytes to the front, in a buffer grown (at most doubling what was
        received) toward the pending packet's size.

        A new buffer is allocated rather than resizing in place: a bytearray cannot be
        resized while a view of it (from get_buffer, or held past its call) is alive.
        """
        pending = self._end - self._start
        size = READ_BUFFER
        if self._need > READ_BUFFER:
            size = min(self._need, max(READ_BUFFER, 2 * pending))
        if size == len(self._buf):
            self._buf[:pending] = self._buf[self._start:self._end]
        else:
            fresh = bytearray(size)
            fresh[:pending] = memoryview(self._buf)[self._start:self._end]
            self._buf = fresh
        self._start, self._end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        if self._reason is not None:
            return
        was_empty = self._start == self._end
        self._end += nbytes
        self.bytes_in += nbytes
        self._active = True
        delivered = self._deliver()
        if self._start == self._end:
            self._packet_started = 0.0
        elif (delivered or was_empty) and self._reason is None:
            # A new packet began in this read: it has packet_timeout to complete.
            now = self._packet_started = self._loop.time()
            self._arm(now + self._settings.packet_timeout)

    def _deliver(self) -> bool:
        """Hand every whole packet in the buffer to the delegate; False if there was none.

        Closes the connection (``bad_stream``) on a malformed length prefix.
        """
        buf = self._buf
        view: memoryview | None = None
        delivered = False
        while self._start < self._end and self._reason is None:
            start = self._start
            if not self._need:
                first = buf[start]
                if 0 < first < 0x80:  # a one-byte length: the common case, inlined
                    self._header = 1
                    self._need = 1 + first
                else:
                    length = self._parse_header(buf, start, self._end)
                    if length <= 0:
                        if length < 0:
                            self.abort("bad_stream")
                        break
            if self._end - start < self._need:
                break
            stop = start + self._need
            if view is None:
                view = memoryview(buf)
            packet = view[start + self._header:stop]
            self._start = stop
            self._header = self._need = 0
            self.packets_in += 1
            delivered = True
            try:
                self._on_packet(self, packet)
            except Exception as exc:
                self._report("stream_packet", exc)
        return delivered

    def _parse_header(self, buf: bytearray, start: int, end: int) -> int:
        """Parse the length prefix at ``start``: the length (setting _header and _need), 0 if
        more bytes are needed, -1 if it is malformed (docs/wire.md §6, notation)."""
        length = shift = 0
        pos = start
        stop = min(end, start + _MAX_HEADER)
        while pos < stop:
            byte = buf[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                if byte == 0 and pos - start > 1:  # non-minimal
                    return -1
                if not 0 < length <= limits.MAX_STREAM_PACKET:
                    return -1
                self._header = pos - start
                self._need = self._header + length
                return length
            shift += 7
        return -1 if pos - start == _MAX_HEADER else 0

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
