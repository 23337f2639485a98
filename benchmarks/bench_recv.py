"""Receive cost per datagram: the engine (recvmmsg, endpoint fallback) against a raw uvloop
DatagramProtocol that only counts datagrams (the baseline).

Pre-fill method (STYLE.md §7.6): a plain socket sends N sealed DATA packets, each carrying one
64-byte message, into the receiver's socket (SO_RCVBUF raised to hold them all) *before* the
receiver starts; what is timed is draining the socket and delivering every message to a trivial
handler. The sender's cost is not in the figure. Rows of one run are comparable; the machine's
load drifts between runs, so the variants are interleaved over the repetitions.

The PLAIN_DATA rows (measurement mode, docs/wire.md §2.6) take the AEAD out: they show the
engine's own cost, the DATA rows add cryptography's ChaCha20-Poly1305 open (a Python-level call
per packet, behind _packet's AEAD seam).

    PYTHONPATH=. python benchmarks/bench_recv.py [--datagrams 20000] [--repeat 7]
    PYTHONPATH=. python -m pytest benchmarks/bench_recv.py --benchmark-only -q
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import pytest
import uvloop

from msgnet import _packet
from msgnet._engine import UdpEngine
from msgnet._frame import encode_continuation, encode_init

DATAGRAMS = 20_000
PAYLOAD = bytes(range(64))
PROTOCOL = "/bench/recv/1"
RECEIVER_INDEX, SENDER_INDEX = 0x0B0B0B0B, 0x0A0A0A0A
KEY_TO_RECEIVER, KEY_TO_SENDER = bytes(range(32)), bytes(range(32, 64))
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RCVBUF = 256 << 20


@dataclass(frozen=True)
class Variant:
    name: str
    loop: str            # "uvloop" or "asyncio"
    engine: bool         # False: the raw DatagramProtocol baseline
    use_recvmmsg: bool = False
    plaintext: bool = False


BASELINE = Variant("raw uvloop DatagramProtocol", "uvloop", False)
VARIANTS = [
    Variant("engine, recvmmsg (uvloop)", "uvloop", True, True),
    Variant("engine, endpoint fallback (uvloop)", "uvloop", True, False),
    BASELINE,
    Variant("engine, recvmmsg (stock asyncio)", "asyncio", True, True),
    Variant("engine, recvmmsg, PLAIN_DATA (uvloop)", "uvloop", True, True, True),
    Variant("engine, endpoint, PLAIN_DATA (uvloop)", "uvloop", True, False, True),
]
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def sealed_packets(count: int, plaintext: bool = False) -> list[bytes]:
    """count DATA (or PLAIN_DATA) packets of one message each: INIT first, then CONTINUATION
    (the steady state, as if BOUND had come back)."""
    sender = _packet.SessionCrypto(SENDER_INDEX, RECEIVER_INDEX, KEY_TO_RECEIVER, KEY_TO_SENDER,
                                   plaintext)
    first = sender.seal(encode_init(1, PROTOCOL, 0, PAYLOAD))
    return [first] + [sender.seal(encode_continuation(0, PAYLOAD)) for _ in range(count - 1)]


def _receiver_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)  # root: past rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


class _Delegate:
    def handle_control(self, data, addr): pass
    def handle_response(self, session, request_id, data): pass
    def handle_reset(self, session, protocol, code): pass
    def handle_pong(self, session, data): pass
    def handle_ack(self, session, transport_id): pass
    def handle_close(self, session, code, reason): pass
    def handle_delivery_ack(self, session, largest, ack_delay_us, first_range, ranges): pass


class _Counter(asyncio.DatagramProtocol):
    """The baseline: counts datagrams, touches nothing."""

    def __init__(self, count: int, done: asyncio.Future[int]) -> None:
        self.left = count
        self.done = done

    def datagram_received(self, data, addr):
        self.left -= 1
        if not self.left:
            self.done.set_result(time.perf_counter_ns())


class PrefilledReceive:
    """One measurement: a loop, a receiver socket holding every packet, and the receiver."""

    def __init__(self, variant: Variant, packets: dict[bool, list[bytes]]) -> None:
        packets = packets[variant.plaintext]
        self.variant = variant
        self.count = len(packets)
        self.loop = LOOPS[variant.loop]()
        self.sock = _receiver_socket()
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sender.bind(("127.0.0.1", 0))
        self.engine = None
        self.transport = None
        if variant.engine:
            self.delivered = 0
            self.engine = UdpEngine(self.sock, self.loop, _Delegate(), {PROTOCOL: self._handler},
                                    use_recvmmsg=variant.use_recvmmsg)
            session = self.engine.new_session("sender", RECEIVER_INDEX, False)
            self.engine.add_session(session)
            crypto = _packet.SessionCrypto(RECEIVER_INDEX, SENDER_INDEX, KEY_TO_SENDER,
                                           KEY_TO_RECEIVER, variant.plaintext)
            self.engine.install_keys(session, SENDER_INDEX, crypto, self.sender.getsockname())
        address = self.sock.getsockname()
        for packet in packets:
            self.sender.sendto(packet, address)

    def _handler(self, msg) -> None:
        self.delivered += 1
        if self.delivered == self.count:
            self.done.set_result(time.perf_counter_ns())

    def drain(self) -> float:
        """Receive everything; ns per datagram."""
        return self.loop.run_until_complete(self._drain()) / self.count

    async def _drain(self) -> int:
        self.done = self.loop.create_future()
        start = time.perf_counter_ns()
        if self.engine is not None:
            self.engine.start()
        else:
            self.transport, _ = await self.loop.create_datagram_endpoint(
                lambda: _Counter(self.count, self.done), sock=self.sock)
        try:
            end = await asyncio.wait_for(self.done, 30)
        except asyncio.TimeoutError:
            raise RuntimeError("not every datagram arrived: the kernel dropped some (raise "
                               "SO_RCVBUF, or lower --datagrams)") from None
        return end - start

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.transport is not None:
            self.transport.close()
        self.loop.run_until_complete(asyncio.sleep(0.001))  # transports finish closing
        self.sock.close()
        self.sender.close()
        self.loop.close()


def measure(variant: Variant, packets: dict[bool, list[bytes]]) -> float:
    run = PrefilledReceive(variant, packets)
    try:
        return run.drain()
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datagrams", type=int, default=DATAGRAMS)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    packets = {plain: sealed_packets(args.datagrams, plain) for plain in (False, True)}
    samples: dict[Variant, list[float]] = {v: [] for v in VARIANTS}
    measure(VARIANTS[0], {False: packets[False][:1000]})  # warm-up: allocator, caches
    for _ in range(args.repeat):
        for variant in VARIANTS:
            samples[variant].append(measure(variant, packets))
    medians = {v: statistics.median(s) for v, s in samples.items()}
    base = medians[BASELINE]
    print(f"receive {args.datagrams} pre-filled datagrams ({len(packets[False][1])} B, one "
          f"{len(PAYLOAD)}-byte message each), median of {args.repeat}; "
          f"Python {sys.version.split()[0]}, uvloop {uvloop.__version__}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':<40} {'ns/datagram':>12} {'min':>8} {'max':>8} {'x baseline':>11}")
    for variant in VARIANTS:
        s = samples[variant]
        print(f"{variant.name:<40} {medians[variant]:>12.0f} {min(s):>8.0f} {max(s):>8.0f} "
              f"{medians[variant] / base:>11.2f}")
    return 0


# -- pytest-benchmark (python -m benchmarks): one round = drain BENCH_DATAGRAMS datagrams -----

BENCH_DATAGRAMS = 10_000


@pytest.fixture(scope="module")
def bench_packets():
    return {plain: sealed_packets(BENCH_DATAGRAMS, plain) for plain in (False, True)}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_recv(benchmark, variant, bench_packets):
    """Median round in ms / 10 = us per datagram."""
    benchmark.group = f"receive {BENCH_DATAGRAMS} pre-filled datagrams"
    benchmark.pedantic(PrefilledReceive.drain,
                       setup=lambda: ((PrefilledReceive(variant, bench_packets),), {}),
                       teardown=PrefilledReceive.close, rounds=5)


if __name__ == "__main__":
    sys.exit(main())
