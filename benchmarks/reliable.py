"""Reliable delivery, side by side with its baselines in one run (issue 5).

    python -m benchmarks.reliable [--quick] [--repeat N] [--only a,b,c,sim] [--json FILE]
                                  [--core PATH]

a. ``bulk1M``: a reliable 1 MiB message over loopback between two msgnet hosts in separate
   processes (pinned to different cores, benchmarks/e2e.py's ``_pair``), sent with
   ``Reliable(wait=True)``: the time from the send to the peer's acknowledgement of the
   last fragment, one message after the other. Baseline: the same bytes over a plain
   asyncio TCP connection on uvloop, each 1 MiB answered by a one-byte confirmation from
   the receiving application (``raw-uvloop-tcp``). Also msgnet in plaintext mode, and
   msgnet's stream path (hosts on TCP only; a reliable request answered with one byte, as
   the baseline is: ``tcp-reply``), also in plaintext mode (``tcp-reply-plaintext``: what
   the AEAD costs on that path). Target: msgnet >= 0.5x the TCP transfer's MB/s. The msgnet
   hosts have their defaults, so their sessions find by PMTU discovery that loopback carries
   65000-byte datagrams (docs/wire.md 5.1; the warm-up transfers include the search).
   Reported beside it: ``msgnet-reliable-9000`` and ``msgnet-reliable-1200``, both hosts
   configured with that ``max_datagram`` (what a jumbo-frame path, or a path of 1200-byte
   datagrams with no discovery, gets), and the same in plaintext mode. And ``floor-aesgcm-udp``,
   the least any secure UDP transfer costs in Python: no event loop and no protocol, blocking
   sockets, each 65000-byte datagram sealed straight from the 1 MiB with cryptography's
   AES-256-GCM (a 13-byte header as associated data, its counter the nonce) and opened
   straight into the receiver's 1 MiB buffer, no copy either side, one byte back per MiB.
   msgnet's rows show their ratio to it too (``vs floor``): what its protocol costs beyond
   the cipher and the kernel.
b. ``oneway64``: 64-byte messages one way, msgnet ``Reliable()`` (and ordered) against
   msgnet's own best effort, same receiver (e2e's), rate from first to last arrival.
   Target: reliable >= 0.7x best effort. ``fanout64``: the same, each message to the next
   of three peers in turn (pubsub's pattern; the three hosts share the receiving process):
   reported, no target.
c. ``netns``: two hosts in network namespaces joined by a veth pair, 10% of UDP datagrams
   dropped each way by iptables, and, in the second setting, 20 +- 10 ms of delay each way
   and 1% duplication from the seeded relay (tests/netns.py, msgnet/_testing/transfer.py).
   Reliable 64-byte messages as fast as the API takes them then a 1 MiB message (goodput;
   the latency then includes the queue), and the same messages paced at 200/s (delivery
   latency p50/p99). Reported, no target. Needs root (skipped with the reason otherwise).
sim. The sans-IO core alone (msgnet/_testing/lossy.py, fake clock, seeded): reliable
   64-byte messages per simulated second and 1 MiB goodput at 10% loss and 20 +- 10 ms each
   way. Deterministic; ``--core PATH`` runs it on another copy of msgnet/core/delivery.py
   (``git show HEAD:msgnet/core/delivery.py > /tmp/head.py``) for before/after figures.

Scenarios run in rounds (every scenario once per round), so a baseline and the msgnet run
compared with it are measured minutes apart at most; ``paired`` is the median of the rounds'
own ratios, steadier than the ratio of medians when the machine's load drifts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from benchmarks.e2e import (
    MAX_SECONDS,
    PAYLOAD_64,
    _host_options,
    _msgnet_oneway_receiver,
    _pair,
    _pin,
)
from msgnet.limits import MAX_DATAGRAM

BULK = 1 << 20
JUMBO = 9000  # max_datagram of the jumbo-frame rows
BULK_PROTOCOL = "/bench/bulk/1"
ONEWAY_PROTOCOL = "/bench/1.0.0"  # what e2e's receiver counts
ROOT = Path(__file__).resolve().parents[1]


def _uvloop_run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


# --------------------------------------------------------------------------- a. 1 MiB transfers

def _tcp_bulk_receiver(conn: Any, core: int) -> None:
    """Counts bytes; answers one byte per whole MiB received."""
    _pin(core)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Sink(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport
                self.count = 0

            def data_received(self, data: bytes) -> None:
                self.count += len(data)
                while self.count >= BULK:
                    self.count -= BULK
                    self.transport.write(b"!")

        server = await loop.create_server(Sink, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname())
        await loop.run_in_executor(None, conn.recv)
        server.close()

    _uvloop_run(main())


def _tcp_bulk_sender(conn: Any, core: int, rounds: int) -> None:
    _pin(core)
    addr = conn.recv()

    async def main() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        acks: asyncio.Queue[None] = asyncio.Queue()

        class Source(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                for _ in range(len(data)):
                    acks.put_nowait(None)

        transport, _ = await loop.create_connection(Source, *addr)
        blob = os.urandom(BULK)
        times = []
        for _ in range(rounds + 2):  # two warm-up transfers
            t0 = time.perf_counter()
            transport.write(blob)
            await acks.get()
            times.append(time.perf_counter() - t0)
        transport.close()
        return _bulk_result(times[2:])

    conn.send(_uvloop_run(main()))


_FLOOR_KEY = bytes(32)
_FLOOR_HEADER = 13  # msgnet's DATA header: the associated data, the nonce its last 12 bytes
_FLOOR_TAG = 16
_FLOOR_DATAGRAM = 65000
_FLOOR_STOP = b"x"  # the sender's last datagram: the receiver returns


def _floor_receiver(conn: Any, core: int) -> None:
    """Opens each datagram into its place in a 1 MiB buffer; one byte back per MiB. A lost
    datagram (none on loopback with these buffers) fails the row by the sender's timeout."""
    _pin(core)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(_FLOOR_KEY)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(MAX_SECONDS)
        conn.send(sock.getsockname())
        packet = memoryview(bytearray(_FLOOR_DATAGRAM))
        message = memoryview(bytearray(BULK))
        got = 0
        while True:
            n, peer = sock.recvfrom_into(packet)
            if packet[:n] == _FLOOR_STOP:
                return
            size = n - _FLOOR_HEADER - _FLOOR_TAG
            header = bytes(packet[:_FLOOR_HEADER])
            aead.decrypt_into(header[1:], packet[_FLOOR_HEADER:n], header,
                              message[got:got + size])
            got += size
            if got >= BULK:
                got = 0
                sock.sendto(b"!", peer)


def _floor_sender(conn: Any, core: int, rounds: int) -> None:
    """Seals 1 MiB as 65000-byte datagrams, one send each, then waits for the byte back."""
    _pin(core)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    addr = conn.recv()
    aead = AESGCM(_FLOOR_KEY)
    blob = memoryview(os.urandom(BULK))
    packet = memoryview(bytearray(_FLOOR_DATAGRAM))
    room = _FLOOR_DATAGRAM - _FLOOR_HEADER - _FLOOR_TAG
    counter = 0
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.connect(addr)
        sock.settimeout(MAX_SECONDS)
        for _ in range(rounds + 2):  # two warm-up transfers, as the others have
            t0 = time.perf_counter()
            offset = 0
            while offset < BULK:
                take = min(room, BULK - offset)
                counter += 1
                header = counter.to_bytes(_FLOOR_HEADER, "big")
                packet[:_FLOOR_HEADER] = header
                end = _FLOOR_HEADER + take + _FLOOR_TAG
                aead.encrypt_into(header[1:], blob[offset:offset + take], header,
                                  packet[_FLOOR_HEADER:end])
                sock.send(packet[:end])
                offset += take
            sock.recv(1)
            times.append(time.perf_counter() - t0)
        sock.send(_FLOOR_STOP)
    conn.send(_bulk_result(times[2:]))


def _bulk_result(times: list[float]) -> dict[str, float]:
    median = statistics.median(times)
    return {"rate": BULK / median / 1e6, "median_ms": median * 1e3}


def _host_datagram(max_datagram: int | None) -> dict[str, int]:
    """MessageHost's max_datagram option: its default unless one is given."""
    return {} if max_datagram is None else {"max_datagram": max_datagram}


def _msgnet_bulk_receiver(conn: Any, core: int, plaintext: bool,
                          max_datagram: int | None = None) -> None:
    _pin(core)
    import msgnet

    async def main() -> None:
        async with msgnet.MessageHost(plaintext=plaintext,
                                      **_host_datagram(max_datagram)) as host:
            host.set_message_handler(BULK_PROTOCOL, lambda m: None)
            conn.send(str(host.addrs[0]))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    msgnet.run(main())


def _msgnet_bulk_sender(conn: Any, core: int, rounds: int, plaintext: bool,
                        max_datagram: int | None = None) -> None:
    _pin(core)
    import msgnet

    addr = conn.recv()

    async def main() -> dict[str, float]:
        async with msgnet.MessageHost(plaintext=plaintext,
                                      **_host_datagram(max_datagram)) as host:
            peer = host.add_peer(addr)
            await host.connect(peer)
            blob = os.urandom(BULK)
            qos = msgnet.Reliable(wait=True, timeout=MAX_SECONDS)
            times = []
            for _ in range(rounds + 2):  # two warm-up transfers (RTT estimate, window)
                t0 = time.perf_counter()
                await host.send_message(peer, BULK_PROTOCOL, blob, qos=qos)
                times.append(time.perf_counter() - t0)
            result = _bulk_result(times[2:])
            result.update(_delivery_counters(host))
            return result

    conn.send(msgnet.run(main()))


def _msgnet_bulk(transfers: int, plaintext: bool,
                 max_datagram: int | None = None) -> Callable[[], dict[str, float]]:
    """A bulk1M row: msgnet hosts over UDP, at their default datagram ceiling or this one."""
    return lambda: _pair(_msgnet_bulk_receiver, (plaintext, max_datagram), _msgnet_bulk_sender,
                         (transfers, plaintext, max_datagram), server_result=False)


def _msgnet_stream_receiver(conn: Any, core: int, plaintext: bool) -> None:
    """msgnet on its TCP transport alone: answers each 1 MiB request with one byte."""
    _pin(core)
    import msgnet

    async def main() -> None:
        async with msgnet.MessageHost(plaintext=plaintext, **_host_options(True)) as host:
            host.set_message_handler(BULK_PROTOCOL, lambda m: m.reply(b"!"))
            conn.send(str(host.addrs[0]))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    msgnet.run(main())


def _msgnet_stream_sender(conn: Any, core: int, rounds: int, plaintext: bool) -> None:
    """The stream path for a large reliable message (wire.md 5-6): over TCP a 1 MiB message
    is one packet, and TCP acknowledges it, so msgnet's own acknowledgement is not what says
    it arrived: the peer's one-byte reply is, as in the raw TCP baseline."""
    _pin(core)
    import msgnet

    addr = conn.recv()

    async def main() -> dict[str, float]:
        async with msgnet.MessageHost(plaintext=plaintext, **_host_options(True)) as host:
            peer = host.add_peer(addr)
            await host.connect(peer)
            blob = os.urandom(BULK)
            times = []
            for _ in range(rounds + 2):
                t0 = time.perf_counter()
                await host.request(peer, BULK_PROTOCOL, blob, timeout=MAX_SECONDS,
                                   qos=msgnet.Reliable())
                times.append(time.perf_counter() - t0)
            return _bulk_result(times[2:])

    conn.send(msgnet.run(main()))


def _delivery_counters(host: Any) -> dict[str, float]:
    metrics = host.metrics()
    return {name: metrics.get(name, 0) for name in ("retransmissions", "lost_packets",
                                                     "timeouts")}


# --------------------------------------------------------------------------- b. 64 B one way

async def _acknowledged(host: Any, peer: Any, deadline: float) -> None:
    """Until the peer acknowledged everything sent to it (or the deadline): a sender that
    left earlier would cut the stream its receiver counts."""
    delivery = host.network.delivery.connection(host.network.sessions(peer)[0])
    while delivery is not None and (delivery.packets_in_flight or delivery.transmit_pending):
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.01)


def _msgnet_reliable_oneway_sender(conn: Any, core: int, count: int, payload: bytes,
                                   plaintext: bool, ordered: bool) -> None:
    """e2e's one-way sender with ``Reliable()``; then stays until everything is acknowledged,
    so the receiver sees the whole stream."""
    _pin(core)
    import msgnet

    addr = conn.recv()

    async def main() -> None:
        async with msgnet.MessageHost(plaintext=plaintext) as host:
            peer = host.add_peer(addr)
            await host.connect(peer)
            send = host.send_message
            qos = msgnet.Reliable(ordered=ordered)
            deadline = time.perf_counter() + MAX_SECONDS
            for i in range(count):
                await send(peer, ONEWAY_PROTOCOL, payload, qos=qos)
                if i % 1024 == 1023:
                    await asyncio.sleep(0)
                    if time.perf_counter() > deadline:
                        break
            await _acknowledged(host, peer, deadline + MAX_SECONDS)
            await asyncio.sleep(0.2)

    msgnet.run(main())


def _msgnet_best_effort_oneway_sender(conn: Any, core: int, count: int, payload: bytes,
                                      plaintext: bool) -> None:
    from benchmarks.e2e import _msgnet_oneway_sender

    _msgnet_oneway_sender(conn, core, count, payload, plaintext)



FANOUT_PEERS = 3


def _msgnet_fanout_receiver(conn: Any, core: int, count: int) -> None:
    """FANOUT_PEERS hosts in one process, counting together; their addresses go out as one
    space-separated string."""
    _pin(core)
    import msgnet
    from benchmarks.e2e import _Counter

    async def main() -> None:
        counter = _Counter(count)
        async with AsyncExitStack() as stack:
            hosts = [await stack.enter_async_context(msgnet.MessageHost())
                     for _ in range(FANOUT_PEERS)]
            for host in hosts:
                host.set_message_handler(ONEWAY_PROTOCOL, counter.hit)
            conn.send(" ".join(str(host.addrs[0]) for host in hosts))
            conn.send(await counter.wait())

    msgnet.run(main())


def _msgnet_fanout_sender(conn: Any, core: int, count: int, payload: bytes,
                          reliable: bool) -> None:
    """Message i to peer i mod FANOUT_PEERS; reliable ones stay until acknowledged."""
    _pin(core)
    import msgnet

    addrs = conn.recv().split()

    async def main() -> None:
        async with msgnet.MessageHost() as host:
            peers = [host.add_peer(addr) for addr in addrs]
            for peer in peers:
                await host.connect(peer)
            send = host.send_message
            qos = msgnet.Reliable() if reliable else msgnet.BEST_EFFORT
            deadline = time.perf_counter() + MAX_SECONDS
            for i in range(count):
                await send(peers[i % len(peers)], ONEWAY_PROTOCOL, payload, qos=qos)
                if i % 1024 == 1023:
                    await asyncio.sleep(0)
                    if time.perf_counter() > deadline:
                        break
            for peer in peers if reliable else ():
                await _acknowledged(host, peer, deadline + MAX_SECONDS)
            await asyncio.sleep(0.2)

    msgnet.run(main())


# --------------------------------------------------------------------------- c. netns

def _netns(quick: bool) -> dict[str, dict[str, float]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from netns import namespace_pair, netns_unavailable  # type: ignore[import-not-found]

    reason = netns_unavailable()
    if reason is not None:
        print(f"netns: skipped: {reason}", file=sys.stderr)
        return {}
    count = "3000" if quick else "10000"
    paced = "600" if quick else "2000"
    relay = ["--delay", "0.01", "--jitter", "0.02", "--duplicate", "0.01", "--seed", "11"]
    out: dict[str, dict[str, float]] = {}
    for path, receiver in (("10%-loss", []), ("10%-loss+20+-10ms", relay)):
        for name, sender in (
            ("bulk", ["--messages", count, "--size", "64", "--blob", "last"]),
            ("paced200", ["--messages", paced, "--size", "64", "--rate", "200",
                          "--blob", "none"]),
        ):
            with namespace_pair() as pair:
                pair.drop_udp(0.1)
                sent, got = pair.transfer(receiver, sender)
            if got["deliveries"] != got["messages"] or sent["failed"]:
                raise RuntimeError(f"netns {path} {name}: {sent} {got}")
            row = {"goodput_KBps": got["goodput_Bps"] / 1e3,
                   "latency_p50_ms": got["latency_p50_ms"],
                   "latency_p99_ms": got["latency_p99_ms"], "seconds": sent["seconds"],
                   "retransmissions": sent["retransmissions"], "spurious": sent["spurious"],
                   "timeouts": sent["timeouts"]}
            out[f"netns-{path}/{name}"] = row
            print(f"  netns-{path}/{name}: {row}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- sim

SIM_SEEDS = range(1, 8)


def _sim(core_path: str | None) -> dict[str, dict[str, float]]:
    from msgnet._testing import lossy

    if core_path:  # another copy of the core, e.g. HEAD's, for before/after figures
        import importlib.util

        import msgnet.core.delivery as current

        spec = importlib.util.spec_from_file_location("_delivery_under_test", core_path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name in ("MessageDelivered", "MessageFailed", "Delivered", "AckFields"):
            setattr(module, name, getattr(current, name))
        lossy.DeliveryConnection = module.DeliveryConnection  # type: ignore[misc]
    path = lossy.Impairment(loss=0.1, delay=0.01, jitter=0.02)

    def small(seed: int) -> tuple[float, float]:
        """A sender that keeps 2000 messages unacknowledged: 5 s warm-up, then 60 s."""
        h = lossy.DeliveryHarness(path, seed=seed)
        a = h.a.conn
        sent = 0

        def run(seconds: float) -> None:
            nonlocal sent
            end = h.clock.now + seconds
            while h.clock.now < end:
                while sent - len(h.b.delivered) < 2000:
                    a.send("/s", PAYLOAD_64, reliable=True, ordered=False, now=h.clock.now)
                    sent += 1
                h.run_for(0.05)

        run(5.0)
        start_count, start_time = len(h.b.delivered), h.clock.now
        run(60.0)
        rate = (len(h.b.delivered) - start_count) / (h.clock.now - start_time)
        return rate, a.counters["spurious"] / max(1, a.counters["lost_packets"])

    def blob(seed: int) -> tuple[float, float]:
        h = lossy.DeliveryHarness(path, seed=seed)
        a = h.a.conn
        big = a.send("/b", bytes(BULK), reliable=True, ordered=False, now=0.0)
        if not h.run(lambda: big.done, timeout=3600) or big.error is not None:
            raise RuntimeError("the simulated 1 MiB transfer failed")
        return BULK / h.clock.now / 1e3, a.counters["spurious"] / max(1, a.counters["lost_packets"])

    out = {}
    for name, fn, unit in (("sim-10%-loss+20+-10ms/64B", small, "msgs_per_sim_s"),
                           ("sim-10%-loss+20+-10ms/1MiB", blob, "KB_per_sim_s")):
        results = [fn(seed) for seed in SIM_SEEDS]
        out[name] = {unit: statistics.median(r[0] for r in results),
                     "min": min(r[0] for r in results), "max": max(r[0] for r in results),
                     "spurious_share": statistics.median(r[1] for r in results)}
        print(f"  {name}: {out[name]}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and rounds")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds of a and b (default 3; 1 with --quick)")
    parser.add_argument("--only", help="comma-separated parts: a, b, c, sim")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--core", help="sim only: another delivery.py to run the sim on")
    args = parser.parse_args(argv)
    parts = set(args.only.split(",")) if args.only else {"a", "b", "c", "sim"}
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    transfers = 5 if args.quick else 10
    count = 50_000 if args.quick else 200_000

    import msgnet
    from msgnet import _engine, _packet

    print(f"msgnet {msgnet.__version__}: AEAD backend {getattr(_packet, 'AEAD_BACKEND', '?')}, "
          f"AES-256-GCM offered {getattr(_packet, 'AES_GCM', False)}, "
          f"recvmmsg {_engine.HAVE_RECVMMSG}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs", file=sys.stderr)
    scenarios: list[tuple[str, Callable[[], dict[str, float]]]] = []
    if "a" in parts:
        scenarios += [
            ("bulk1M/raw-uvloop-tcp", lambda: _pair(
                _tcp_bulk_receiver, (), _tcp_bulk_sender, (transfers,), server_result=False)),
            ("bulk1M/floor-aesgcm-udp", lambda: _pair(
                _floor_receiver, (), _floor_sender, (transfers,), server_result=False)),
            ("bulk1M/msgnet-reliable", _msgnet_bulk(transfers, False)),
            ("bulk1M/msgnet-reliable-plaintext", _msgnet_bulk(transfers, True)),
            ("bulk1M/msgnet-reliable-9000", _msgnet_bulk(transfers, False, JUMBO)),
            ("bulk1M/msgnet-reliable-9000-plaintext", _msgnet_bulk(transfers, True, JUMBO)),
            ("bulk1M/msgnet-reliable-1200", _msgnet_bulk(transfers, False, MAX_DATAGRAM)),
            ("bulk1M/msgnet-reliable-1200-plaintext",
             _msgnet_bulk(transfers, True, MAX_DATAGRAM)),
            ("bulk1M/msgnet-reliable-tcp-reply", lambda: _pair(
                _msgnet_stream_receiver, (False,), _msgnet_stream_sender, (transfers, False),
                server_result=False)),
            ("bulk1M/msgnet-reliable-tcp-reply-plaintext", lambda: _pair(
                _msgnet_stream_receiver, (True,), _msgnet_stream_sender, (transfers, True),
                server_result=False)),
        ]
    if "b" in parts:
        scenarios += [
            ("oneway64/msgnet-best-effort", lambda: _pair(
                _msgnet_oneway_receiver, (count, False), _msgnet_best_effort_oneway_sender,
                (count, PAYLOAD_64, False), server_result=True)),
            ("oneway64/msgnet-reliable", lambda: _pair(
                _msgnet_oneway_receiver, (count, False), _msgnet_reliable_oneway_sender,
                (count, PAYLOAD_64, False, False), server_result=True)),
            ("oneway64/msgnet-reliable-ordered", lambda: _pair(
                _msgnet_oneway_receiver, (count, False), _msgnet_reliable_oneway_sender,
                (count, PAYLOAD_64, False, True), server_result=True)),
            ("fanout64/msgnet-best-effort", lambda: _pair(
                _msgnet_fanout_receiver, (count,), _msgnet_fanout_sender,
                (count, PAYLOAD_64, False), server_result=True)),
            ("fanout64/msgnet-reliable", lambda: _pair(
                _msgnet_fanout_receiver, (count,), _msgnet_fanout_sender,
                (count, PAYLOAD_64, True), server_result=True)),
        ]
    rows: dict[str, list[dict[str, float]]] = {}
    for _ in range(repeat):
        for name, fn in scenarios:
            result = fn()
            rows.setdefault(name, []).append(result)
            print(f"  {name}: {result}", file=sys.stderr)
    summary = _summarise(rows)
    if "c" in parts:
        summary.update(_netns(args.quick))
    if "sim" in parts:
        summary.update(_sim(args.core))
    _print(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": platform.python_version(), "cpus": os.cpu_count(),
                       "msgnet": msgnet.__version__, "results": summary}, f, indent=2)
    return 0


BASELINES = {
    "bulk1M/floor-aesgcm-udp": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-plaintext": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-9000": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-9000-plaintext": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-1200": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-1200-plaintext": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-tcp-reply": "bulk1M/raw-uvloop-tcp",
    "bulk1M/msgnet-reliable-tcp-reply-plaintext": "bulk1M/raw-uvloop-tcp",
    "oneway64/msgnet-reliable": "oneway64/msgnet-best-effort",
    "oneway64/msgnet-reliable-ordered": "oneway64/msgnet-best-effort",
    "fanout64/msgnet-reliable": "fanout64/msgnet-best-effort",
}
EXTRA_RATIOS = [  # (row, its other reference): shown in the row's notes
    ("bulk1M/msgnet-reliable", "bulk1M/msgnet-reliable-plaintext"),
    ("bulk1M/msgnet-reliable", "bulk1M/floor-aesgcm-udp"),
    ("bulk1M/msgnet-reliable-9000", "bulk1M/floor-aesgcm-udp"),
    ("bulk1M/msgnet-reliable-1200", "bulk1M/floor-aesgcm-udp"),
    ("bulk1M/msgnet-reliable-tcp-reply", "bulk1M/floor-aesgcm-udp"),
]


def _summarise(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    summary = {name: {k: statistics.median(r[k] for r in results) for k in results[0]}
               for name, results in rows.items()}
    for name, base in list(BASELINES.items()) + EXTRA_RATIOS:
        if name not in rows or base not in rows:
            continue
        key = ("vs_plaintext" if base.endswith("plaintext")
               else "vs_floor" if base.endswith("floor-aesgcm-udp") else "vs_baseline")
        summary[name][key] = summary[name]["rate"] / summary[base]["rate"]
        summary[name][f"{key}_paired"] = statistics.median(
            r["rate"] / b["rate"] for r, b in zip(rows[name], rows[base]) if b["rate"])
    return summary


def _print(summary: dict[str, dict[str, float]]) -> None:
    print(f"{'scenario':40} {'median':>16} {'vs baseline':>12} {'paired':>8}  notes")
    for name, v in summary.items():
        if "rate" in v:
            unit = "MB/s" if name.startswith("bulk") else "/s"
            value = f"{v['rate']:,.1f} {unit}" if unit == "MB/s" else f"{v['rate']:,.0f}/s"
        elif "goodput_KBps" in v:
            value = f"{v['goodput_KBps']:,.1f} KB/s"
        elif "msgs_per_sim_s" in v:
            value = f"{v['msgs_per_sim_s']:,.0f}/sim-s"
        else:
            value = f"{v.get('KB_per_sim_s', 0):,.1f} KB/sim-s"
        ratio = f"{v['vs_baseline']:.2f}x" if "vs_baseline" in v else ""
        paired = f"{v['vs_baseline_paired']:.2f}x" if "vs_baseline_paired" in v else ""
        notes = []
        for key, what in (("vs_plaintext", "plaintext"), ("vs_floor", "floor")):
            if key in v:
                notes.append(f"{v[key]:.2f}x {what} (paired {v[f'{key}_paired']:.2f}x)")
        if "latency_p99_ms" in v:
            notes.append(f"latency p50 {v['latency_p50_ms']:.0f} ms, "
                         f"p99 {v['latency_p99_ms']:.0f} ms")
        if "median_ms" in v:
            notes.append(f"{v['median_ms']:.1f} ms per MiB")
        if "spurious_share" in v:
            notes.append(f"spurious {v['spurious_share']:.0%} of losses")
        print(f"{name:40} {value:>16} {ratio:>12} {paired:>8}  {'; '.join(notes)}")


if __name__ == "__main__":
    sys.exit(main())
