"""The TCP stream connection layer (msgnet/tcp.py, docs/wire.md §6) on its own.

Real 127.0.0.1 TCP sockets on asyncio and uvloop, with a delegate that records what the
connections deliver; framing across every chunk boundary is also checked exhaustively
through the BufferedProtocol interface with a fake transport. Misbehaving peers use raw
sockets, and timeouts are shortened through StreamSettings so the tests stay fast.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgnet import limits
from msgnet._frame import encode_varint
from msgnet._packet import SessionCrypto
from msgnet._stream import SHRINK_AFTER, resume_report
from msgnet._testing import wait_for
from msgnet.errors import ClosedError, PeerUnreachableError, UsageError
from msgnet.tcp import (
    READ_BUFFER,
    StreamConnection,
    StreamSettings,
    TcpStreams,
    encode_stream_header,
)

pytestmark = pytest.mark.timeout(60)

hypothesis_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Recorder:
    """A StreamDelegate that records every callback."""

    def __init__(self) -> None:
        self.opened: list[StreamConnection] = []
        self.packets: list[tuple[StreamConnection, bytes]] = []
        self.writable: list[StreamConnection] = []
        self.closed: list[tuple[StreamConnection, str]] = []

    def stream_opened(self, conn: StreamConnection) -> None:
        self.opened.append(conn)

    def stream_packet(self, conn: StreamConnection, packet: memoryview) -> None:
        self.packets.append((conn, bytes(packet)))

    def stream_writable(self, conn: StreamConnection) -> None:
        self.writable.append(conn)

    def stream_closed(self, conn: StreamConnection, reason: str) -> None:
        self.closed.append((conn, reason))

    def received(self, conn: StreamConnection | None = None) -> list[bytes]:
        return [p for c, p in self.packets if conn is None or c is conn]


def frame(*packets: bytes) -> bytes:
    return b"".join(encode_varint(len(p)) + p for p in packets)


async def server(**options: Any) -> tuple[TcpStreams, Recorder, int]:
    recorder = Recorder()
    streams = TcpStreams(recorder, settings=StreamSettings(**options))
    listener = await streams.listen("127.0.0.1", 0)
    return streams, recorder, listener.sockname[1]


async def raw_client(port: int, source: str = "127.0.0.1", rcvbuf: int | None = None
                     ) -> socket.socket:
    """A non-blocking client socket that nobody reads unless the test does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server closed the connection (EOF or reset), reading what it sent."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# --------------------------------------------------------------------------- framing


def test_header_is_the_wire_varint() -> None:
    for n in [1, 2, 127, 128, 255, 16383, 16384, 65535, limits.MAX_STREAM_PACKET]:
        assert encode_stream_header(n) == encode_varint(n)


def test_packets_both_ways_including_the_largest(run) -> None:
    sizes = [1, 127, 128, 5000, READ_BUFFER - 3, READ_BUFFER + 1, 300_000,
             limits.MAX_STREAM_PACKET]

    async def main() -> None:
        streams, recorder, port = await server()
        client_rec = Recorder()
        client = TcpStreams(client_rec)
        try:
            conn = await client.connect("127.0.0.1", port)
            packets = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
            assert conn.write_packet(packets[0])
            assert conn.write_packets(packets[1:])
            await wait_for(lambda: len(recorder.packets) == len(sizes))
            assert recorder.received() == packets
            (accepted,) = recorder.opened
            assert accepted.write_packets(reversed(packets))
            await wait_for(lambda: len(client_rec.packets) == len(sizes))
            assert client_rec.received() == packets[::-1]
            total = sum(len(p) + len(encode_varint(len(p))) for p in packets)
            for counters in (streams.counters, client.counters):
                assert counters["stream_packets_in"] == counters["stream_packets_out"] == len(sizes)
                assert counters["stream_bytes_in"] == counters["stream_bytes_out"] == total
            assert client.counters["stream_connections_out"] == 1
            assert streams.counters["stream_connections_in"] == 1
            with pytest.raises(UsageError):
                conn.write_packet(b"")
            with pytest.raises(UsageError):
                conn.write_packet(bytes(limits.MAX_STREAM_PACKET + 1))
        finally:
            client.close()
            streams.close()

    run(main())


class FakeTransport(asyncio.Transport):
    """Just enough of a transport for driving the protocol by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 4242), "sockname": ("127.0.0.1", 1)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closing = True


@contextmanager
def fed_connection() -> Iterator[tuple[StreamConnection, Recorder]]:
    """A listener-side connection on a fake transport, for feed(), and its delegate."""
    loop = asyncio.new_event_loop()
    try:
        recorder = Recorder()
        conn = StreamConnection(TcpStreams(recorder, loop=loop), outbound=False)
        conn.connection_made(FakeTransport())
        yield conn, recorder
        conn.close()
    finally:
        loop.close()


def feed(conn: StreamConnection, data: bytes, cuts: list[int]) -> None:
    """Deliver data through get_buffer/buffer_updated, split at the cut points, and also
    wherever get_buffer offers less room than the chunk."""
    bounds = sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
    pos = 0
    for bound in bounds:
        while pos < bound:
            buf = memoryview(conn.get_buffer(-1))
            assert len(buf) > 0
            n = min(len(buf), bound - pos)
            buf[:n] = data[pos:pos + n]
            del buf
            conn.buffer_updated(n)
            pos += n


packet_lists = st.lists(
    st.one_of(st.binary(min_size=1, max_size=200),
              st.integers(min_value=129, max_value=3 * READ_BUFFER).map(lambda n: b"\x5a" * n)),
    min_size=1, max_size=12)


@hypothesis_settings
@given(packets=packet_lists, cuts=st.lists(st.integers(min_value=0, max_value=400_000),
                                           max_size=40))
def test_framing_across_any_chunk_boundaries(packets: list[bytes], cuts: list[int]) -> None:
    with fed_connection() as (conn, recorder):
        data = frame(*packets)
        feed(conn, data, cuts + [len(data) * i // 7 for i in range(7)])
        assert recorder.received() == packets
        assert not conn.closed
        assert conn._streams.counters["stream_packets_in"] == len(packets)


@settings(hypothesis_settings, max_examples=15)
@given(packets=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=20),
       cuts=st.lists(st.integers(min_value=0, max_value=60_000), max_size=30))
def test_framing_across_chunks_over_a_real_socket(packets: list[bytes],
                                                  cuts: list[int]) -> None:
    async def main() -> None:
        streams, recorder, port = await server()
        sock = await raw_client(port)
        loop = asyncio.get_running_loop()
        try:
            data = frame(*packets)
            bounds = [0] + sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]
            for lo, hi in itertools.pairwise(bounds):
                await loop.sock_sendall(sock, data[lo:hi])
                await asyncio.sleep(0.001)  # separate TCP segments, separate reads
            await wait_for(lambda: len(recorder.packets) == len(packets))
            assert recorder.received() == packets
            assert not recorder.closed
        finally:
            sock.close()
            streams.close()

    uvloop.run(main())


# --------------------------------------------------------------------------- bad peers

BAD_STREAMS = {
    "zero length": b"\x00",
    "non-minimal varint": b"\x85\x00" + b"x" * 5,
    "non-minimal zero": b"\x80\x00",
    "huge length prefix": encode_varint(limits.MAX_STREAM_PACKET + 1),
    "length far above the limit": encode_varint(1 << 40),
    "over-long varint": b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    "garbage": bytes(range(0x80, 0x100)),
}


@pytest.mark.parametrize("bad", list(BAD_STREAMS.values()), ids=list(BAD_STREAMS))
def test_bad_stream_is_closed_and_others_are_unaffected(run, bad: bytes) -> None:
    async def main() -> None:
        streams, recorder, port = await server()
        loop = asyncio.get_running_loop()
        good = await raw_client(port)
        attacker = await raw_client(port)
        try:
            await loop.sock_sendall(good, frame(b"before"))
            # Whole packets ahead of the garbage are delivered; nothing after it is.
            await loop.sock_sendall(attacker, frame(b"fine") + bad)
            assert await closed_by_server(attacker)
            await wait_for(lambda: streams.counters["bad_stream"] == 1)
            await loop.sock_sendall(good, frame(b"after"))
            await wait_for(lambda: len(recorder.packets) == 3)
            by_good = [p for c, p in recorder.packets if c.remote[1] == good.getsockname()[1]]
            assert by_good == [b"before", b"after"]
            assert b"fine" in recorder.received()
            assert [reason for _, reason in recorder.closed] == ["bad_stream"]
            assert len(streams.connections()) == 1
        finally:
            good.close()
            attacker.close()
            streams.close()

    run(main())


def test_huge_prefix_is_refused_before_any_body_arrives(run) -> None:
    """The length is checked when the prefix completes: nothing is buffered for it."""
    async def main() -> None:
        streams, _, port = await server()
        loop = asyncio.get_running_loop()
        attacker = await raw_client(port)
        try:
            await loop.sock_sendall(attacker, encode_varint(limits.MAX_STREAM_PACKET + 1))
            assert await closed_by_server(attacker, timeout=2.0)
            assert streams.counters["bad_stream"] == 1
            assert streams.counters["stream_bytes_in"] == 3
        finally:
            attacker.close()
            streams.close()

    run(main())


def test_announced_large_packet_grows_the_buffer_only_with_received_bytes() -> None:
    with fed_connection() as (conn, _):
        feed(conn, encode_varint(limits.MAX_STREAM_PACKET) + b"x" * 1000, [])
        assert len(conn.get_buffer(-1)) + 1003 <= READ_BUFFER
        feed(conn, b"y" * (READ_BUFFER * 3), [])
        assert READ_BUFFER * 3 < conn.buffer_size <= 2 * (READ_BUFFER * 3 + 1003)


def test_buffer_grown_for_large_packets_is_kept_until_small_ones_follow() -> None:
    """Large packets back to back reuse the buffer the first one grew; SHRINK_AFTER small
    packets in a row give it back."""
    with fed_connection() as (conn, recorder):
        large = b"\x5a" * 300_000
        feed(conn, frame(large), [])
        grown = conn.buffer_size
        assert grown >= len(large)
        for _ in range(3):
            feed(conn, frame(large), [])
            assert conn.buffer_size == grown  # not released and regrown per packet
        for i in range(SHRINK_AFTER):
            assert conn.buffer_size == grown, i
            feed(conn, frame(b"\x5a" * 100), [])
        conn.get_buffer(-1)
        assert conn.buffer_size == READ_BUFFER
        assert recorder.received() == [large] * 4 + [b"\x5a" * 100] * SHRINK_AFTER


def test_slowloris_is_dropped_within_the_packet_timeout(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server(packet_timeout=0.3)
        loop = asyncio.get_running_loop()
        good = await raw_client(port)
        slow = await raw_client(port)
        try:
            started = loop.time()
            await loop.sock_sendall(slow, encode_varint(100))
            closed = asyncio.ensure_future(closed_by_server(slow, timeout=3.0))
            sent = 0
            while not closed.done() and sent < 99:
                await loop.sock_sendall(good, frame(b"tick"))  # the good peer keeps working
                with suppress(OSError):
                    await loop.sock_sendall(slow, b"s")
                sent += 1
                await asyncio.sleep(0.05)
            assert await closed
            elapsed = loop.time() - started
            assert 0.25 <= elapsed < 1.0, elapsed
            assert streams.counters["stream_packet_timeout"] == 1
            assert [reason for _, reason in recorder.closed] == ["stream_packet_timeout"]
            assert recorder.received() == [b"tick"] * len(recorder.packets)
            assert len(recorder.packets) >= 4
            assert len(streams.connections()) == 1
        finally:
            good.close()
            slow.close()
            streams.close()

    run(main())


def test_one_byte_per_second_is_dropped_at_the_packet_timeout(run) -> None:
    """The issue's trickle: one byte a second keeps the connection busy but never completes
    a packet; it is closed packet_timeout after its first byte (the bytes that follow do not
    extend it), while a good peer on the same listener is served throughout."""
    async def main() -> None:
        streams, recorder, port = await server(packet_timeout=2.0)
        loop = asyncio.get_running_loop()
        good = await raw_client(port)
        slow = await raw_client(port)
        try:
            started = loop.time()
            await loop.sock_sendall(slow, encode_varint(50))
            closed = asyncio.ensure_future(closed_by_server(slow, timeout=5.0))
            ticks = 0
            while not closed.done() and loop.time() - started < 4.0:
                with suppress(OSError):
                    await loop.sock_sendall(slow, b"s")
                for _ in range(10):  # ten packets a second from the good peer meanwhile
                    await loop.sock_sendall(good, frame(b"tick"))
                    ticks += 1
                    await asyncio.sleep(0.1)
            assert await closed
            assert 2.0 <= loop.time() - started < 3.2
            assert streams.counters["stream_packet_timeout"] == 1
            await wait_for(lambda: len(recorder.packets) == ticks)
            assert recorder.received() == [b"tick"] * ticks
            assert len(streams.connections()) == 1
        finally:
            good.close()
            slow.close()
            streams.close()

    run(main())


def test_default_limits_are_the_documented_ones() -> None:
    """docs/wire.md §6 and §6.1 name these values; the defaults must be them."""
    settings = StreamSettings()
    assert settings.packet_timeout == limits.STREAM_PACKET_TIMEOUT == 10.0
    assert settings.idle_timeout == limits.STREAM_IDLE_TIMEOUT == 180.0
    assert settings.max_connections_per_ip == limits.MAX_STREAM_CONNECTIONS_PER_IP == 16
    assert settings.max_connections == limits.MAX_STREAM_CONNECTIONS == 4096
    assert settings.high_water == limits.STREAM_HIGH_WATER == 1 << 20
    assert limits.MAX_STREAM_PACKET == (1 << 20) + 4096
    assert limits.STREAM_RETAIN_PACKETS == limits.REPLAY_WINDOW // 2
    assert limits.STREAM_RETAIN_BYTES == 8 << 20 and limits.STREAM_ACK_TIMEOUT == 1.0
    assert limits.STREAM_WAIT_TIMEOUT == 30.0 and limits.STREAM_MOVE_GRACE == 3.0


def test_resume_report_tells_what_arrived_and_refuses_the_rest() -> None:
    """docs/wire.md §6.1: the bitmap names the counters the replay window saw, from up_to
    down; afterwards every counter up to up_to is refused (a late copy is a replay)."""
    crypto = SessionCrypto(1, 2, bytes(32), bytes(32), False)
    window = crypto.window
    arrived = set(range(40)) | {45, 47}
    for counter in sorted(arrived):
        assert window.accept(counter)
    count, bits = resume_report(crypto, 50)
    assert count == 51 and len(bits) == 7
    seen = {50 - i for i in range(count) if bits[i >> 3] >> (i & 7) & 1}
    assert seen == arrived
    assert not any(window.would_accept(c) for c in range(51))  # all refused now
    assert window.would_accept(51)
    # Far ahead of what arrived: the window tells about its own reach only.
    crypto = SessionCrypto(1, 2, bytes(32), bytes(32), False)
    assert crypto.window.accept(5000)
    count, bits = resume_report(crypto, 6000)
    assert count == limits.REPLAY_WINDOW  # 4977..6000: the most a report covers
    assert {6000 - i for i in range(count) if bits[i >> 3] >> (i & 7) & 1} == {5000}
    assert not crypto.window.would_accept(5500) and crypto.window.would_accept(6001)
    count, bits = resume_report(crypto, 100)  # entirely below the window: nothing to tell
    assert count == 0 and bits == b""
    # up_to comes from the peer: the largest u64 must not wrap anything around.
    crypto = SessionCrypto(1, 2, bytes(32), bytes(32), False)
    count, bits = resume_report(crypto, (1 << 64) - 1)
    assert count == limits.REPLAY_WINDOW and not any(bits)


def test_whole_packets_spread_out_are_not_a_slowloris(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server(packet_timeout=0.2, idle_timeout=0.5)
        loop = asyncio.get_running_loop()
        sock = await raw_client(port)
        try:
            for i in range(8):  # 0.8 s in all: longer than either timeout
                await loop.sock_sendall(sock, frame(b"%d" % i))
                await asyncio.sleep(0.1)
            await wait_for(lambda: len(recorder.packets) == 8)
            assert not recorder.closed
        finally:
            sock.close()
            streams.close()

    run(main())


def test_idle_connection_is_closed(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server(idle_timeout=0.3)
        sock = await raw_client(port)
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            assert await closed_by_server(sock, timeout=3.0)
            assert 0.25 <= loop.time() - started < 1.5
            assert streams.counters["stream_idle"] == 1
            assert [reason for _, reason in recorder.closed] == ["stream_idle"]
            assert streams.connections() == []
        finally:
            sock.close()
            streams.close()

    run(main())


# --------------------------------------------------------------------------- limits


def test_connections_per_address_are_limited(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server(max_connections_per_ip=2)
        loop = asyncio.get_running_loop()
        socks = [await raw_client(port) for _ in range(2)]
        try:
            await wait_for(lambda: len(recorder.opened) == 2)
            refused = await raw_client(port)
            socks.append(refused)
            assert await closed_by_server(refused)
            assert streams.counters["too_many_connections"] == 1
            other = await raw_client(port, source="127.0.0.2")  # another address: welcome
            socks.append(other)
            await loop.sock_sendall(other, frame(b"hello"))
            await wait_for(lambda: recorder.received() == [b"hello"])
            socks[0].close()  # a slot frees up
            await wait_for(lambda: len(streams.connections()) == 2)
            again = await raw_client(port)
            socks.append(again)
            await loop.sock_sendall(again, frame(b"again"))
            await wait_for(lambda: recorder.received() == [b"hello", b"again"])
            assert streams.counters["too_many_connections"] == 1
            # A refused connection never reached the delegate.
            assert len(recorder.opened) == 4
        finally:
            for sock in socks:
                sock.close()
            streams.close()

    run(main())


def test_total_connections_are_limited_inbound_and_outbound(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server(max_connections=2)
        socks = [await raw_client(port, source=f"127.0.0.{i + 1}") for i in range(2)]
        try:
            await wait_for(lambda: len(recorder.opened) == 2)
            refused = await raw_client(port, source="127.0.0.3")
            socks.append(refused)
            assert await closed_by_server(refused)
            with pytest.raises(PeerUnreachableError):
                await streams.connect("127.0.0.1", port)  # outbound counts as well
            assert streams.counters["too_many_connections"] == 2
        finally:
            for sock in socks:
                sock.close()
            streams.close()

    run(main())


def test_dial_failure_is_peer_unreachable(run) -> None:
    async def main() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        streams = TcpStreams(Recorder())
        try:
            with pytest.raises(PeerUnreachableError):
                await streams.connect("127.0.0.1", port)
            assert streams.counters["stream_dial_failed"] == 1
        finally:
            streams.close()
        with pytest.raises(ClosedError):
            await streams.connect("127.0.0.1", port)

    run(main())


# --------------------------------------------------------------------------- back-pressure


def test_back_pressure_bounds_the_write_buffer(run) -> None:
    high = 64 * 1024
    packet = b"p" * 16_000

    async def main() -> None:
        streams, recorder, port = await server(high_water=high)
        loop = asyncio.get_running_loop()
        reader = await raw_client(port, rcvbuf=4096)  # does not read yet
        try:
            await wait_for(lambda: len(recorder.opened) == 1)
            (conn,) = recorder.opened
            written = 0
            while conn.writable:
                assert conn.write_packet(packet)
                written += 1
                assert written < 10_000, "the write buffer never filled"
                if written % 16 == 0:
                    await asyncio.sleep(0.001)  # let the kernel take what it will
            assert conn.write_buffer_size >= high
            assert conn.write_buffer_size <= high + len(packet) + 3
            assert not conn.write_packet(packet)  # refused, not buffered
            assert streams.counters["stream_write_refused"] == 1
            waiter = conn.wait_writable()
            await asyncio.sleep(0.05)
            assert not waiter.done() and recorder.writable == []

            expected = written * (len(packet) + len(encode_varint(len(packet))))
            received = 0
            while received < expected:
                chunk = await asyncio.wait_for(loop.sock_recv(reader, 1 << 20), 5.0)
                assert chunk
                received += len(chunk)
                if waiter.done():
                    break
            await asyncio.wait_for(waiter, 5.0)
            assert recorder.writable == [conn] and conn.writable
            assert conn.write_packet(b"more")
        finally:
            reader.close()
            streams.close()

    run(main())


def test_wait_writable_fails_when_the_connection_closes(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server(high_water=1)
        sock = await raw_client(port, rcvbuf=4096)
        try:
            await wait_for(lambda: len(recorder.opened) == 1)
            (conn,) = recorder.opened
            while conn.write_packet(b"z" * 60_000):
                await asyncio.sleep(0)
            waiter = conn.wait_writable()
            conn.close()
            with pytest.raises(ClosedError):
                await waiter
            with pytest.raises(ClosedError):
                await conn.wait_writable()
        finally:
            sock.close()
            streams.close()

    run(main())


# --------------------------------------------------------------------------- lifecycle


def test_close_reasons_are_counted_once(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server()
        client_rec = Recorder()
        client = TcpStreams(client_rec)
        try:
            first = await client.connect("127.0.0.1", port)
            second = await client.connect("127.0.0.1", port)
            await wait_for(lambda: len(recorder.opened) == 2)
            first.close()
            first.close()
            assert first.closed and not first.writable and not first.write_packet(b"x")
            await wait_for(lambda: len(recorder.closed) == 1)
            assert recorder.closed[0][1] == "stream_closed_by_peer"
            assert client_rec.closed == [(first, "stream_closed")]
            client.close()
            await wait_for(lambda: len(recorder.closed) == 2)
            assert client_rec.closed == [(first, "stream_closed"), (second, "stream_closed")]
            assert client.counters["stream_closed"] == 2
            assert streams.counters["stream_closed_by_peer"] == 2
            assert streams.connections() == [] and client.connections() == []
            with pytest.raises(ClosedError):
                await client.connect("127.0.0.1", port)
        finally:
            client.close()
            streams.close()

    run(main())


class Exploding(Recorder):
    def stream_packet(self, conn: StreamConnection, packet: memoryview) -> None:
        super().stream_packet(conn, packet)
        if bytes(packet) == b"boom":
            raise RuntimeError("delegate bug")


def test_delegate_errors_are_reported_not_fatal(run) -> None:
    async def main() -> None:
        recorder = Exploding()
        streams = TcpStreams(recorder)
        port = (await streams.listen("127.0.0.1", 0)).sockname[1]
        sock = await raw_client(port)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(sock, frame(b"boom", b"still here"))
            await wait_for(lambda: len(recorder.packets) == 2)
            assert recorder.received() == [b"boom", b"still here"]
            assert not recorder.closed
        finally:
            sock.close()
            streams.close()

    run(main())
    assert [type(e["exception"]) for e in run.errors] == [RuntimeError]
    run.errors.clear()


def test_listen_on_a_taken_port_is_a_usage_error(run) -> None:
    async def main() -> None:
        streams, _, port = await server()
        other = TcpStreams(Recorder())
        try:
            with pytest.raises(UsageError):
                await other.listen("127.0.0.1", port)
        finally:
            other.close()
            streams.close()

    run(main())


def test_settings_are_validated() -> None:
    for bad in ({"packet_timeout": 0}, {"max_connections": 0}, {"high_water": 0},
                {"high_water": 10, "low_water": 11}):
        with pytest.raises(UsageError):
            StreamSettings(**bad)
    assert StreamSettings().low == limits.STREAM_HIGH_WATER // 4


def test_stream_address_names_its_connection(run) -> None:
    async def main() -> None:
        streams, recorder, port = await server()
        client = TcpStreams(Recorder())
        try:
            conn = await client.connect("127.0.0.1", port)
            address = conn.address
            assert address is not None and address.conn is conn
            assert address == ("127.0.0.1", port) and address[0] == "127.0.0.1"
            assert hash(address) == hash(("127.0.0.1", port))
            await wait_for(lambda: len(recorder.opened) == 1)
            (accepted,) = recorder.opened
            assert accepted.address == accepted.remote[:2] == conn.local[:2]
        finally:
            client.close()
            streams.close()

    run(main())
