"""End-to-end throughput and latency: msgnet against raw uvloop, pyzmq and aioquic, one run.

Each scenario runs a receiver and a sender in two processes pinned to different cores
(where the machine has two), on 127.0.0.1, with 64-byte payloads unless the name says
otherwise, secure mode unless it says plaintext. Every loop is bounded by count and time.
Scenarios named ``-tcp`` run msgnet's TCP transport (policy tcp-only) and compare it with
raw asyncio TCP on uvloop carrying the same ``length:varint | payload`` frames (an
asyncio.Protocol per end, one write per message): their ``raw-uvloop`` row is that baseline.
Sessions use AES-256-GCM where this machine offers it (docs/wire.md 2.2):
``rr1/msgnet-chacha`` is msgnet with it turned off (``MSGNET_AES_GCM=0``: ChaCha20-Poly1305
on the default backend) in the same run, to show what the cipher is worth. The msgnet
ping-pong clients ``await host.request()``; the ``-callback`` rows drive the same requests
by ``host.request_callback`` instead, each reply's callback sending the next, as the raw
baseline's client does from datagram_received (no task wake-up per round trip).
``rr1/raw-uvloop-awaited`` is the raw client in the awaited shape (a task awaiting a future
per round trip): what asyncio's task wake-up alone costs, beside ``rr1/msgnet``.

    python -m benchmarks.e2e [--quick] [--repeat N] [--json FILE]

Prints medians over the repetitions and ratios against the raw uvloop baseline measured
in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

PAYLOAD_64 = b"x" * 64
PAYLOAD_1K = b"y" * 1024
PROTOCOL = "/bench/1.0.0"
IDLE_STOP = 0.5          # a receiver stops after this long without a message
MAX_SECONDS = 10.0       # hard bound on every scenario


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:
        os.sched_setaffinity(0, {core % os.cpu_count()})


def _uvloop_run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


# --------------------------------------------------------------------------- one-way

class _Counter:
    """Counts received messages; records first and last arrival times."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.get_running_loop().create_future()

    def hit(self, _msg: Any = None) -> None:
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
        self.count += 1
        self.last = now
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)

    async def wait(self) -> dict[str, float]:
        deadline = time.perf_counter() + MAX_SECONDS
        while not self.done.done() and time.perf_counter() < deadline:
            seen = self.count
            await asyncio.sleep(IDLE_STOP)
            if self.count == seen and seen > 0:
                break
        span = max(self.last - self.first, 1e-9)
        return {"received": self.count, "rate": (self.count - 1) / span if self.count > 1 else 0}


def _raw_oneway_receiver(conn: Any, core: int, count: int) -> None:
    _pin(core)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counter = _Counter(count)

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                counter.hit()

        transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        conn.send(transport.get_extra_info("sockname"))
        conn.send(await counter.wait())
        transport.close()

    _uvloop_run(main())


def _raw_oneway_sender(conn: Any, core: int, count: int, payload: bytes) -> None:
    _pin(core)
    addr = conn.recv()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                           remote_addr=tuple(addr))
        deadline = time.perf_counter() + MAX_SECONDS
        for i in range(count):
            transport.sendto(payload)
            if i % 64 == 63:
                await asyncio.sleep(0)
                if time.perf_counter() > deadline:
                    break
        await asyncio.sleep(0.05)
        transport.close()

    _uvloop_run(main())


def _host_options(tcp: bool) -> dict[str, Any]:
    """msgnet over TCP alone, or (the default host) over UDP."""
    if not tcp:
        return {}
    return {"listen": ["/ip4/127.0.0.1/tcp/0"], "transport_policy": "tcp-only"}


def _msgnet_oneway_receiver(conn: Any, core: int, count: int, plaintext: bool,
                            tcp: bool = False) -> None:
    _pin(core)
    import msgnet

    async def main() -> None:
        counter = _Counter(count)
        async with msgnet.MessageHost(plaintext=plaintext, **_host_options(tcp)) as host:
            host.set_message_handler(PROTOCOL, counter.hit)
            conn.send(str(host.addrs[0]))
            conn.send(await counter.wait())

    msgnet.run(main())


def _msgnet_oneway_sender(conn: Any, core: int, count: int, payload: bytes,
                          plaintext: bool, tcp: bool = False) -> None:
    _pin(core)
    import msgnet

    addr = conn.recv()

    async def main() -> None:
        async with msgnet.MessageHost(plaintext=plaintext, **_host_options(tcp)) as host:
            peer = host.add_peer(addr)
            await host.connect(peer)
            send = host.send_message
            deadline = time.perf_counter() + MAX_SECONDS
            for i in range(count):
                await send(peer, PROTOCOL, payload)
                if i % 1024 == 1023:
                    await asyncio.sleep(0)
                    if time.perf_counter() > deadline:
                        break
            await asyncio.sleep(0.2)

    msgnet.run(main())


def _zmq_oneway_receiver(conn: Any, core: int, count: int) -> None:
    _pin(core)
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    received, first, last = 0, 0.0, 0.0
    sock.RCVTIMEO = int(MAX_SECONDS * 1000)
    try:
        while received < count:
            sock.recv_multipart()
            last = time.perf_counter()
            if received == 0:
                first = last
            received += 1
    except zmq.Again:
        pass
    conn.send({"received": received, "rate": (received - 1) / max(last - first, 1e-9)})
    sock.close(0)
    ctx.term()


def _zmq_oneway_sender(conn: Any, core: int, count: int, payload: bytes) -> None:
    _pin(core)
    import zmq

    port = conn.recv()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(count):
        sock.send(payload)
    time.sleep(0.5)
    sock.close(0)
    ctx.term()


# --------------------------------------------------------------------------- request/response

async def _rate_window(state: dict[str, Any], seconds: float,
                       on_start: Callable[[], None] | None = None) -> float:
    """Round trips per second of a ping-pong client counting state["done"]: after 0.3 s of
    warm-up, over ``seconds``; then sets state["stop"]."""
    await asyncio.sleep(0.3)
    if on_start is not None:
        on_start()
    start, before = time.perf_counter(), state["done"]
    await asyncio.sleep(seconds)
    elapsed, done = time.perf_counter() - start, state["done"] - before
    state["stop"] = True
    return done / elapsed


def _raw_echo_server(conn: Any, core: int) -> None:
    _pin(core)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.transport.sendto(data, addr)

        transport, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        conn.send(transport.get_extra_info("sockname"))
        await loop.run_in_executor(None, conn.recv)
        transport.close()

    _uvloop_run(main())


def _raw_pingpong_client(conn: Any, core: int, in_flight: int, seconds: float) -> None:
    _pin(core)
    addr = conn.recv()

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        state = {"done": 0, "stop": False}

        class Client(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                state["done"] += 1
                if not state["stop"]:
                    self.transport.sendto(data)

        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=tuple(addr))
        for _ in range(in_flight):
            transport.sendto(PAYLOAD_64)
        rate = await _rate_window(state, seconds)
        transport.close()
        return {"rate": rate}

    conn.send(_uvloop_run(main()))


def _raw_awaited_pingpong_client(conn: Any, core: int, seconds: float) -> None:
    """The raw client with msgnet's awaited client's shape: a task awaits a future per round
    trip (set by datagram_received) and sends the next request itself. What asyncio's task
    wake-up costs a round trip, without msgnet: the reference for ``rr1/msgnet``."""
    _pin(core)
    addr = conn.recv()

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        state: dict[str, Any] = {"done": 0, "stop": False, "reply": None}

        class Client(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                reply = state["reply"]
                if reply is not None and not reply.done():
                    reply.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=tuple(addr))

        async def worker() -> None:
            while not state["stop"]:
                reply = state["reply"] = loop.create_future()
                transport.sendto(PAYLOAD_64)
                await reply  # (no timeout per round trip: the cheapest awaited client)
                state["done"] += 1

        task = asyncio.create_task(worker())
        rate = await _rate_window(state, seconds)
        try:
            await asyncio.wait_for(task, 5)  # a lost datagram would leave it waiting
        except TimeoutError:
            pass
        transport.close()
        return {"rate": rate}

    conn.send(_uvloop_run(main()))


def _msgnet_echo_server(conn: Any, core: int, plaintext: bool, tcp: bool = False) -> None:
    _pin(core)
    import msgnet

    async def main() -> None:
        async with msgnet.MessageHost(plaintext=plaintext, **_host_options(tcp)) as host:
            host.set_message_handler(PROTOCOL, lambda m: m.reply(m.data))
            conn.send(str(host.addrs[0]))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    msgnet.run(main())


def _msgnet_pingpong_client(conn: Any, core: int, in_flight: int, seconds: float,
                            plaintext: bool, tcp: bool = False, callback: bool = False) -> None:
    """``await host.request`` in a loop per request in flight; with ``callback``, the
    callback-driven form (``request_callback``, each reply's callback sending the next), as
    the raw baseline's client is driven by datagram_received."""
    _pin(core)
    import msgnet

    addr = conn.recv()

    async def main() -> dict[str, float]:
        async with msgnet.MessageHost(plaintext=plaintext, **_host_options(tcp)) as host:
            peer = host.add_peer(addr)
            await host.connect(peer)
            latencies: list[float] = []
            state = {"done": 0, "stop": False}
            if callback:
                return await _callback_pingpong(host, peer, in_flight, seconds, state)

            async def worker() -> None:
                while not state["stop"]:
                    t0 = time.perf_counter()
                    await host.request(peer, PROTOCOL, PAYLOAD_64, timeout=5)
                    latencies.append(time.perf_counter() - t0)
                    state["done"] += 1

            tasks = [asyncio.create_task(worker()) for _ in range(in_flight)]
            rate = await _rate_window(state, seconds, latencies.clear)
            await asyncio.gather(*tasks)
            lat = sorted(latencies)
            return {"rate": rate,
                    "p50_us": lat[len(lat) // 2] * 1e6 if lat else 0,
                    "p99_us": lat[int(len(lat) * 0.99)] * 1e6 if lat else 0}

    conn.send(msgnet.run(main()))


async def _callback_pingpong(host: Any, peer: Any, in_flight: int, seconds: float,
                             state: dict[str, Any]) -> dict[str, float]:
    """The request_callback client of _msgnet_pingpong_client: a failed request stops it."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    outstanding = [in_flight]

    def on_reply(pending: Any) -> None:
        if pending.exception() is not None:
            state["stop"] = True
            if not finished.done():
                finished.set_exception(pending.exception())
            return
        state["done"] += 1
        if not state["stop"]:
            host.request_callback(peer, PROTOCOL, PAYLOAD_64, on_reply, timeout=5)
            return
        outstanding[0] -= 1
        if not outstanding[0] and not finished.done():
            finished.set_result(None)

    for _ in range(in_flight):
        host.request_callback(peer, PROTOCOL, PAYLOAD_64, on_reply, timeout=5)
    rate = await _rate_window(state, seconds)
    await asyncio.wait_for(finished, 10)
    return {"rate": rate}


def _zmq_echo_server(conn: Any, core: int) -> None:
    _pin(core)
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    conn.send(sock.bind_to_random_port("tcp://127.0.0.1"))
    sock.RCVTIMEO = 200
    while not conn.poll():
        try:
            sock.send_multipart(sock.recv_multipart())
        except zmq.Again:
            pass
    sock.close(0)
    ctx.term()


def _zmq_pingpong_client(conn: Any, core: int, in_flight: int, seconds: float) -> None:
    _pin(core)
    import zmq

    port = conn.recv()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(in_flight):
        sock.send(PAYLOAD_64)
    for _ in range(1000):
        sock.recv()
        sock.send(PAYLOAD_64)
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        sock.recv()
        sock.send(PAYLOAD_64)
        done += 1
    conn.send({"rate": done / (time.perf_counter() - start)})
    sock.close(0)
    ctx.term()


# --------------------------------------------------------------------------- raw TCP

def _frame(payload: bytes) -> bytes:
    """``length:varint | payload``, as msgnet's stream transport frames its packets."""
    n, out = len(payload), bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


class _FrameReader(asyncio.Protocol):
    """Splits ``length:varint | payload`` frames and calls ``on_frame`` with each payload."""

    def __init__(self, on_frame: Callable[[bytes], None]) -> None:
        self.on_frame = on_frame
        self.buf = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        while pos < end:
            n = shift = 0
            i = pos
            while i < end:
                byte = buf[i]
                i += 1
                n |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                break  # the length is not complete yet
            if end - i < n:
                break
            self.on_frame(buf[i:i + n])
            pos = i + n
        self.buf = buf[pos:]


def _raw_tcp_oneway_receiver(conn: Any, core: int, count: int) -> None:
    _pin(core)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        counter = _Counter(count)
        server = await loop.create_server(lambda: _FrameReader(counter.hit), "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname())
        conn.send(await counter.wait())
        server.close()

    _uvloop_run(main())


def _raw_tcp_oneway_sender(conn: Any, core: int, count: int, payload: bytes) -> None:
    _pin(core)
    addr = conn.recv()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, *addr)
        frame = _frame(payload)
        deadline = time.perf_counter() + MAX_SECONDS
        for i in range(count):
            transport.write(frame)
            if i % 1024 == 1023:
                await asyncio.sleep(0)
                while transport.get_write_buffer_size() > 1 << 20:  # back-pressure
                    await asyncio.sleep(0.001)
                if time.perf_counter() > deadline:
                    break
        await asyncio.sleep(0.2)
        transport.close()

    _uvloop_run(main())


def _raw_tcp_echo_server(conn: Any, core: int) -> None:
    _pin(core)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def echo() -> _FrameReader:
            reader = _FrameReader(lambda payload: reader.transport.write(_frame(payload)))
            return reader

        server = await loop.create_server(echo, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname())
        await loop.run_in_executor(None, conn.recv)
        server.close()

    _uvloop_run(main())


def _raw_tcp_pingpong_client(conn: Any, core: int, in_flight: int, seconds: float) -> None:
    _pin(core)
    addr = conn.recv()

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        state = {"done": 0, "stop": False}
        frame = _frame(PAYLOAD_64)

        def on_reply(_payload: bytes) -> None:
            state["done"] += 1
            if not state["stop"]:
                client.transport.write(frame)

        transport, client = await loop.create_connection(lambda: _FrameReader(on_reply), *addr)
        for _ in range(in_flight):
            transport.write(frame)
        rate = await _rate_window(state, seconds)
        transport.close()
        return {"rate": rate}

    conn.send(_uvloop_run(main()))


# --------------------------------------------------------------------------- aioquic

AIOQUIC_BATCH = 256      # DATAGRAM frames a sender queues between transmits (~15 packets)
AIOQUIC_BACKLOG = 4096   # DATAGRAM frames a sender lets wait inside aioquic before it waits


def _aioquic_configuration(is_client: bool) -> Any:
    """QUIC with DATAGRAM frames (RFC 9221) on; a server gets a fresh self-signed ECDSA
    P-256 certificate, made in memory (aioquic takes the objects, so no files)."""
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(is_client=is_client, alpn_protocols=["bench"],
                               max_datagram_frame_size=65536)
    if is_client:
        import ssl

        config.verify_mode = ssl.CERT_NONE
        return config
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    config.certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                          .public_key(key.public_key())
                          .serial_number(x509.random_serial_number())
                          .not_valid_before(now - datetime.timedelta(minutes=5))
                          .not_valid_after(now + datetime.timedelta(days=1))
                          .sign(key, hashes.SHA256()))
    config.private_key = key
    return config


async def _aioquic_serve(on_datagram: Callable[[Any, bytes], None]) -> tuple[Any, Any]:
    """A QUIC server on 127.0.0.1 calling ``on_datagram(protocol, data)`` per DATAGRAM
    frame; returns the server and its address."""
    from aioquic.asyncio import QuicConnectionProtocol, serve
    from aioquic.quic.events import DatagramFrameReceived

    class Proto(QuicConnectionProtocol):
        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, DatagramFrameReceived):
                on_datagram(self, event.data)
            else:
                super().quic_event_received(event)

    server = await serve("127.0.0.1", 0, configuration=_aioquic_configuration(False),
                         create_protocol=Proto)
    transport = server._transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return server, transport.get_extra_info("sockname")


def _aioquic_oneway_receiver(conn: Any, core: int, count: int) -> None:
    """Counts DatagramFrameReceived events; timed from the first to the last, as the raw
    receiver is, so the handshake (before the first DATAGRAM) is outside the interval."""
    _pin(core)

    async def main() -> None:
        counter = _Counter(count)
        server, addr = await _aioquic_serve(lambda _proto, _data: counter.hit())
        conn.send(addr)
        conn.send(await counter.wait())
        server.close()

    _uvloop_run(main())


def _aioquic_oneway_sender(conn: Any, core: int, count: int, payload: bytes) -> None:
    """Queues DATAGRAM frames in batches of AIOQUIC_BATCH (about the pacer's 16-packet burst,
    and full packets: ~17 frames of 64 bytes fit one), transmits after each and yields to
    the loop, so ACKs, congestion control and pacing run; while more than AIOQUIC_BACKLOG
    frames wait inside aioquic (congestion window or pacer full) it only yields. DATAGRAM
    frames are unreliable and never retransmitted: the receiver counts what arrives."""
    _pin(core)
    host, port = conn.recv()[:2]

    async def main() -> None:
        from aioquic.asyncio import connect

        async with connect(host, port, configuration=_aioquic_configuration(True)) as client:
            quic = client._quic
            pending = quic._datagrams_pending  # aioquic has no public view of this queue
            deadline = time.perf_counter() + MAX_SECONDS
            for i in range(count):
                quic.send_datagram_frame(payload)
                if i % AIOQUIC_BATCH == AIOQUIC_BATCH - 1:
                    client.transmit()
                    await asyncio.sleep(0)
                    while len(pending) > AIOQUIC_BACKLOG and time.perf_counter() < deadline:
                        await asyncio.sleep(0)
                    if time.perf_counter() > deadline:
                        break
            client.transmit()
            while pending and time.perf_counter() < deadline:
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.2)

    _uvloop_run(main())


def _aioquic_echo_server(conn: Any, core: int) -> None:
    _pin(core)

    async def main() -> None:
        # The protocol transmits after handling each received UDP datagram.
        server, addr = await _aioquic_serve(
            lambda proto, data: proto._quic.send_datagram_frame(data))
        conn.send(addr)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        server.close()

    _uvloop_run(main())


def _aioquic_pingpong_client(conn: Any, core: int, in_flight: int, seconds: float) -> None:
    """Echoes over DATAGRAM frames, ``in_flight`` outstanding; a lost frame is replaced
    when nothing has come back for 50 ms (loopback rarely loses one)."""
    _pin(core)
    host, port = conn.recv()[:2]

    async def main() -> dict[str, float]:
        from aioquic.asyncio import QuicConnectionProtocol, connect
        from aioquic.quic.events import DatagramFrameReceived

        state = {"done": 0, "stop": False}

        class Client(QuicConnectionProtocol):
            def quic_event_received(self, event: Any) -> None:
                if isinstance(event, DatagramFrameReceived):
                    state["done"] += 1
                    if not state["stop"]:
                        self._quic.send_datagram_frame(event.data)
                else:
                    super().quic_event_received(event)

        async with connect(host, port, configuration=_aioquic_configuration(True),
                           create_protocol=Client) as client:
            async def watchdog() -> None:
                seen = -1
                while not state["stop"]:
                    await asyncio.sleep(0.05)
                    if state["done"] == seen and not state["stop"]:
                        client._quic.send_datagram_frame(PAYLOAD_64)
                        client.transmit()
                    seen = state["done"]

            for _ in range(in_flight):
                client._quic.send_datagram_frame(PAYLOAD_64)
            client.transmit()
            guard = asyncio.create_task(watchdog())
            rate = await _rate_window(state, seconds)
            guard.cancel()
        return {"rate": rate}

    conn.send(_uvloop_run(main()))


# --------------------------------------------------------------------------- drivers

def _pair(receiver: Callable[..., None], rargs: tuple, sender: Callable[..., None],
          sargs: tuple, *, server_result: bool) -> dict[str, float]:
    """Run receiver (core 1) and sender (core 0); the receiver's address goes to the sender."""
    ctx = mp.get_context("spawn")
    r_parent, r_child = ctx.Pipe()
    s_parent, s_child = ctx.Pipe()
    rp = ctx.Process(target=receiver, args=(r_child, 1, *rargs))
    sp = ctx.Process(target=sender, args=(s_child, 0, *sargs))
    rp.start()
    try:
        if not r_parent.poll(30):
            raise RuntimeError(f"{receiver.__name__} did not start")
        s_parent.send(r_parent.recv())
        sp.start()
        if server_result:
            if not r_parent.poll(MAX_SECONDS + 30):
                raise RuntimeError(f"{receiver.__name__} gave no result")
            result = r_parent.recv()
        else:
            if not s_parent.poll(MAX_SECONDS + 30):
                raise RuntimeError(f"{sender.__name__} gave no result")
            result = s_parent.recv()
            r_parent.send("stop")
        sp.join(30)
        rp.join(30)
        return result
    finally:
        for p in (sp, rp):
            if p.is_alive():
                p.kill()


def _first_contact_ms(samples: int) -> list[float]:
    """Time from send_message to the handler on a peer never contacted before (in-process)."""
    import msgnet

    async def main() -> list[float]:
        results = []
        async with msgnet.MessageHost() as server:
            arrived = asyncio.get_running_loop().create_future

            state: dict[str, Any] = {}
            server.set_message_handler(PROTOCOL, lambda m: state["fut"].set_result(
                time.perf_counter()))
            for _ in range(samples):
                async with msgnet.MessageHost() as client:
                    state["fut"] = arrived()
                    peer = client.add_peer(server.addrs[0])
                    t0 = time.perf_counter()
                    await client.send_message(peer, PROTOCOL, PAYLOAD_64)
                    t1 = await asyncio.wait_for(state["fut"], 5)
                    results.append((t1 - t0) * 1000)
        return results

    return msgnet.run(main())


def _rss_bytes() -> int:
    """Resident set size now: every page the process touched, whoever allocated it (Python,
    pymalloc arenas, and C libraries such as cryptography's Rust/OpenSSL, which tracemalloc
    does not see)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _idle_session_memory_child(conn: Any, count: int) -> None:
    """In a fresh process: RSS growth from ``count`` established sessions, each registered
    exactly as a handshake's SessionEstablished registers it (with its own peer id and keys,
    counted; the event itself is transient, as it is after a handshake). Measured right after
    the confirmations went out, so each session still retains its confirmation packet (freed
    RETAIN_SENT_TIME later, which RSS would not show)."""
    import msgnet
    from msgnet import _packet
    from msgnet.core.handshake import SessionEstablished
    from msgnet.identity import PeerID

    async def main() -> dict[str, float]:
        async with msgnet.MessageHost() as host:
            network = host.network
            gc.collect()
            before = _rss_bytes()
            # Each confirmation is one real sendmmsg to the discard port: the sessions
            # carry what a real confirmation leaves behind.
            for i in range(count):
                network._responder_established(SessionEstablished(
                    peer_id=PeerID.from_public_key(os.urandom(32)), local_index=i + 1,
                    remote_index=i + 1, send_key=os.urandom(32), recv_key=os.urandom(32),
                    plaintext=False, aes_gcm=_packet.AES_GCM, address=("127.0.0.1", 9),
                    initiator=False,
                    frames=b"", early_data=[], rtt=None, remote_transports=(1,)))
            await asyncio.sleep(0)
            gc.collect()
            after = _rss_bytes()
            assert len(network._by_index) >= count
            return {"MiB": (after - before) / (1 << 20),
                    "bytes_per_session": (after - before) / count}

    conn.send(msgnet.run(main()))


def _idle_session_memory(count: int) -> dict[str, float]:
    """MiB of RSS that ``count`` established idle sessions cost a host (own process)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_idle_session_memory_child, args=(child, count))
    proc.start()
    try:
        if not parent.poll(MAX_SECONDS + 60):
            raise RuntimeError("the memory measurement gave no result")
        return parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def _with_env(name: str, value: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``run`` with its (spawned) processes importing msgnet under ``name=value``."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        return run()
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and repetitions")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds of every scenario (default 3; 1 with --quick)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--only", help="comma-separated scenario prefixes to run")
    args = parser.parse_args(argv)
    count = 50_000 if args.quick else 200_000
    seconds = 1.0 if args.quick else 2.0
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)

    import msgnet
    from msgnet import _engine, _packet

    print(f"msgnet {msgnet.__version__}: AEAD backend {getattr(_packet, 'AEAD_BACKEND', '?')}, "
          f"AES-256-GCM offered {getattr(_packet, 'AES_GCM', False)}, "
          f"UDP GSO {getattr(_engine, 'HAVE_GSO', False)}, recvmmsg {_engine.HAVE_RECVMMSG}",
          file=sys.stderr)
    rows: dict[str, list[dict[str, float]]] = {}
    scenarios: list[tuple[str, Callable[[], dict[str, float]]]] = []

    def measure(name: str, fn: Callable[[], dict[str, float]]) -> None:
        if not args.only or any(name.startswith(p) for p in args.only.split(",")):
            scenarios.append((name, fn))

    one = _raw_oneway_receiver, _raw_oneway_sender
    measure("oneway64/raw-uvloop", lambda: _pair(one[0], (count,), one[1], (count, PAYLOAD_64),
                                                 server_result=True))
    msg = _msgnet_oneway_receiver, _msgnet_oneway_sender
    measure("oneway64/msgnet", lambda: _pair(msg[0], (count, False), msg[1],
                                             (count, PAYLOAD_64, False), server_result=True))
    measure("oneway64/msgnet-plaintext", lambda: _pair(msg[0], (count, True), msg[1],
                                                       (count, PAYLOAD_64, True),
                                                       server_result=True))
    if _have("zmq"):
        measure("oneway64/pyzmq", lambda: _pair(_zmq_oneway_receiver, (count,),
                                                _zmq_oneway_sender, (count, PAYLOAD_64),
                                                server_result=True))
    if _have("aioquic"):
        measure("oneway64/aioquic", lambda: _pair(_aioquic_oneway_receiver, (count,),
                                                  _aioquic_oneway_sender, (count, PAYLOAD_64),
                                                  server_result=True))
    tcp_one = _raw_tcp_oneway_receiver, _raw_tcp_oneway_sender
    measure("oneway64-tcp/raw-uvloop", lambda: _pair(tcp_one[0], (count,), tcp_one[1],
                                                     (count, PAYLOAD_64), server_result=True))
    measure("oneway64-tcp/msgnet", lambda: _pair(msg[0], (count, False, True), msg[1],
                                                 (count, PAYLOAD_64, False, True),
                                                 server_result=True))
    measure("oneway1k/raw-uvloop", lambda: _pair(one[0], (count,), one[1], (count, PAYLOAD_1K),
                                                 server_result=True))
    measure("oneway1k/msgnet", lambda: _pair(msg[0], (count, False), msg[1],
                                             (count, PAYLOAD_1K, False), server_result=True))
    for k in (1, 32):
        measure(f"rr{k}/raw-uvloop", lambda k=k: _pair(_raw_echo_server, (),
                                                      _raw_pingpong_client, (k, seconds),
                                                      server_result=False))
        measure(f"rr{k}/msgnet", lambda k=k: _pair(_msgnet_echo_server, (False,),
                                                  _msgnet_pingpong_client, (k, seconds, False),
                                                  server_result=False))
        if k == 1:  # the client driven by callbacks, as the raw baseline's is
            measure("rr1/raw-uvloop-awaited", lambda: _pair(
                _raw_echo_server, (), _raw_awaited_pingpong_client, (seconds,),
                server_result=False))
            measure("rr1/msgnet-callback", lambda: _pair(
                _msgnet_echo_server, (False,), _msgnet_pingpong_client,
                (1, seconds, False, False, True), server_result=False))
        if k == 1 and getattr(_packet, "AES_GCM", False):
            # ChaCha20-Poly1305 against the AES-256-GCM of the row above, same run.
            measure("rr1/msgnet-chacha", lambda: _with_env("MSGNET_AES_GCM", "0", lambda: _pair(
                _msgnet_echo_server, (False,), _msgnet_pingpong_client, (1, seconds, False),
                server_result=False)))
        if _have("zmq"):
            measure(f"rr{k}/pyzmq", lambda k=k: _pair(_zmq_echo_server, (),
                                                     _zmq_pingpong_client, (k, seconds),
                                                     server_result=False))
        if k == 1 and _have("aioquic"):
            measure("rr1/aioquic", lambda: _pair(_aioquic_echo_server, (),
                                                 _aioquic_pingpong_client, (1, seconds),
                                                 server_result=False))
    measure("rr1-tcp/raw-uvloop", lambda: _pair(_raw_tcp_echo_server, (),
                                                _raw_tcp_pingpong_client, (1, seconds),
                                                server_result=False))
    measure("rr1-tcp/msgnet", lambda: _pair(_msgnet_echo_server, (False, True),
                                            _msgnet_pingpong_client, (1, seconds, False, True),
                                            server_result=False))
    measure("rr1-tcp/msgnet-callback", lambda: _pair(
        _msgnet_echo_server, (False, True), _msgnet_pingpong_client,
        (1, seconds, False, True, True), server_result=False))
    # Rounds of every scenario, so a baseline and its msgnet run are minutes apart at most:
    # the machine's load drifts, and each round's ratio compares runs under the same load.
    for _ in range(repeat):
        for name, fn in scenarios:
            result = fn()
            rows.setdefault(name, []).append(result)
            print(f"  {name}: {result}", file=sys.stderr)
    if not args.only or "first" in args.only:
        samples = _first_contact_ms(30 if args.quick else 100)
        rows["first-contact/msgnet"] = [{"median_ms": statistics.median(samples),
                                         "p99_ms": sorted(samples)[int(len(samples) * 0.99)]}]
    if not args.only or "memory" in args.only:
        rows["memory-10k-idle-sessions/msgnet"] = [_idle_session_memory(10_000)]

    summary = _summarise(rows)
    _print(summary)
    if args.json:
        info = {"python": sys.version.split()[0], "machine": platform.machine(),
                "cpus": os.cpu_count(), "msgnet": msgnet.__version__,
                "has_extensions": True, "aead_backend": getattr(_packet, "AEAD_BACKEND", None),
                "udp_gso": getattr(_engine, "HAVE_GSO", False), "results": summary}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


def _summarise(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    summary = {}
    for name, results in rows.items():
        keys = results[0].keys()
        summary[name] = {k: statistics.median(r[k] for r in results) for k in keys}
    for name, values in summary.items():
        scenario = name.split("/")[0]
        base = summary.get(f"{scenario}/raw-uvloop")
        if base and "rate" in values and base.get("rate"):
            values["ratio_vs_raw_uvloop"] = values["rate"] / base["rate"]
            # The median of each round's own ratio: steadier than the ratio of medians when
            # the load drifts between rounds.
            pairs = zip(rows[name], rows[f"{scenario}/raw-uvloop"])
            values["paired_ratio"] = statistics.median(
                r["rate"] / b["rate"] for r, b in pairs if b["rate"])
    awaited, base_rows = summary.get("rr1/msgnet"), rows.get("rr1/raw-uvloop-awaited")
    if awaited and base_rows and summary["rr1/raw-uvloop-awaited"].get("rate"):
        # The awaited client against the raw client of the same shape.
        awaited["ratio_vs_raw_awaited"] = (awaited["rate"]
                                           / summary["rr1/raw-uvloop-awaited"]["rate"])
        awaited["paired_vs_raw_awaited"] = statistics.median(
            r["rate"] / b["rate"] for r, b in zip(rows["rr1/msgnet"], base_rows) if b["rate"])
    return summary


def _print(summary: dict[str, dict[str, float]]) -> None:
    print(f"{'scenario':40} {'median':>14} {'ratio vs raw uvloop':>20} {'paired':>8}")
    for name, values in summary.items():
        if "rate" in values:
            main_value = f"{values['rate']:,.0f}/s"
        elif "median_ms" in values:
            main_value = f"{values['median_ms']:.3f} ms"
        else:
            main_value = f"{values.get('MiB', 0):.2f} MiB"
        ratio = values.get("ratio_vs_raw_uvloop")
        extra = "" if ratio is None else f"{ratio:.2f}x"
        paired = values.get("paired_ratio")
        extra2 = "" if paired is None else f"{paired:.2f}x"
        print(f"{name:40} {main_value:>14} {extra:>20} {extra2:>8}")
    awaited = summary.get("rr1/msgnet", {})
    if "ratio_vs_raw_awaited" in awaited:
        print(f"rr1/msgnet vs rr1/raw-uvloop-awaited: {awaited['ratio_vs_raw_awaited']:.2f}x"
              f" (paired {awaited['paired_vs_raw_awaited']:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
