"""Two ends of a reliable transfer, one process each, for tests and benchmarks that cross a
real (impaired) link: the netns test (tests/test_netns_delivery.py) and benchmarks/reliable.py.

    python -m msgnet._testing.transfer receive --host 10.0.0.2 [--delay 0.01 --jitter 0.02
                                               --duplicate 0.01 --seed 11]
    python -m msgnet._testing.transfer send --host 10.0.0.2 --port P --peer ID
                                            [--messages N --size S --rate R --blob first|last|none]

The receiver prints one JSON line ``{"peer": ..., "port": ...}`` once listening (the port
of its impairment relay when it has one, else its own). It then stays up, relay included,
until a line arrives on stdin, and answers it with one JSON report line: messages received
(distinct and in total), the blobs' SHA-256, goodput and delivery latencies. Staying up
matters: a receiver that leaves the moment its handler holds everything takes with it the
acknowledgements of the last packets, and the sender's last messages then fail with
PeerUnreachableError after MAX_RETRANSMISSIONS timeouts although they were delivered.

The sender sends ``--messages`` reliable messages of ``--size`` bytes on ``/n/1`` (each
carries its index and send time: CLOCK_MONOTONIC is one clock for every network namespace
of the machine), as fast as the API takes them or at ``--rate`` per second, and a 1 MiB
reliable message on ``/blob/1`` before or after them, awaited with ``Reliable(wait=True)``.
It then waits until every reliable message is acknowledged or failed and prints one JSON
line: the blob's SHA-256, the seconds taken and the delivery counters (``failed`` must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import struct
import sys
import time
from typing import Any

import msgnet
from msgnet._testing.relay import Impairment, Relay

MESSAGES = "/n/1"
BLOB = "/blob/1"
BLOB_SIZE = 1 << 20
_HEADER = struct.Struct("!Id")  # index, send time (CLOCK_MONOTONIC seconds)


def _emit(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def receive(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    seen: set[int] = set()
    latencies: list[float] = []
    blobs: list[str] = []
    state = {"total": 0, "bytes": 0, "first": 0.0, "last": 0.0}

    def arrived(size: int) -> None:
        now = time.monotonic()
        if not state["first"]:
            state["first"] = now
        state["last"] = now
        state["bytes"] += size

    def on_message(message: msgnet.Message) -> None:
        index, sent = _HEADER.unpack_from(message.data)
        state["total"] += 1
        seen.add(index)
        latencies.append(time.monotonic() - sent)
        arrived(len(message.data))

    def on_blob(message: msgnet.Message) -> None:
        blobs.append(hashlib.sha256(message.data).hexdigest())
        arrived(len(message.data))

    async with msgnet.MessageHost(listen=[f"/ip4/{args.host}/udp/0"]) as host:
        host.set_message_handler(MESSAGES, on_message)
        host.set_message_handler(BLOB, on_blob)
        port = host.network.sockets()[0].sockname[1]
        relay = None
        if args.delay or args.jitter or args.duplicate:
            relay = await Relay.start((args.host, port), Impairment(
                delay=args.delay, jitter=args.jitter, duplicate=args.duplicate, seed=args.seed),
                host=args.host)
            port = relay.address[1]
        _emit({"peer": str(host.peer_id), "port": port})
        try:
            # Up until told otherwise (or stdin closes): see the module docstring.
            await loop.run_in_executor(None, sys.stdin.readline)
        finally:
            lat = sorted(latencies)
            span = state["last"] - state["first"]
            _emit({
                "messages": len(seen), "deliveries": state["total"], "blobs": blobs,
                "bytes": state["bytes"], "seconds": span,
                "goodput_Bps": state["bytes"] / span if span > 0 else 0.0,
                "latency_p50_ms": _percentile(lat, 0.50) * 1e3,
                "latency_p99_ms": _percentile(lat, 0.99) * 1e3,
                "latency_max_ms": (lat[-1] if lat else 0.0) * 1e3,
                "duplicates": host.metrics().get("duplicates", 0),
            })
            if relay is not None:
                relay.close()


async def send(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    async with msgnet.MessageHost(listen=["/ip4/0.0.0.0/udp/0"]) as host:
        peer = host.add_peer(f"/ip4/{args.host}/udp/{args.port}/p2p/{args.peer}")
        await host.connect(peer, timeout=20)
        blob = os.urandom(BLOB_SIZE)
        filler = bytes(max(0, args.size - _HEADER.size))
        started = time.perf_counter()

        async def send_blob() -> None:
            await host.send_message(peer, BLOB, blob, qos=msgnet.Reliable(wait=True))

        if args.blob == "first":
            await send_blob()
        interval = 1.0 / args.rate if args.rate else 0.0
        next_at = loop.time()
        for i in range(args.messages):
            data = _HEADER.pack(i, time.monotonic()) + filler
            await host.send_message(peer, MESSAGES, data, qos=msgnet.Reliable())
            if interval:
                next_at += interval
                delay = next_at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % 200 == 199:
                await asyncio.sleep(0)
        if args.blob == "last":
            await send_blob()
        # Every reliable message acknowledged (or failed): nothing queued or in flight.
        conn = host.network.delivery.connection(host.network.sessions(peer)[0])
        while conn is not None and (conn.packets_in_flight or conn.transmit_pending):
            await asyncio.sleep(0.01)
        metrics = host.metrics()
        _emit({
            "sha256": hashlib.sha256(blob).hexdigest() if args.blob != "none" else None,
            "seconds": time.perf_counter() - started,
            **{name: metrics.get(name, 0) for name in (
                "retransmissions", "lost_packets", "spurious", "undone", "timeouts", "failed")},
        })


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("receive")
    r.add_argument("--host", required=True)
    r.add_argument("--delay", type=float, default=0.0)
    r.add_argument("--jitter", type=float, default=0.0)
    r.add_argument("--duplicate", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=11)
    s = sub.add_parser("send")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--peer", required=True)
    s.add_argument("--messages", type=int, default=10_000)
    s.add_argument("--size", type=int, default=_HEADER.size)
    s.add_argument("--rate", type=float, default=0.0, help="messages per second (0: no pacing)")
    s.add_argument("--blob", choices=("first", "last", "none"), default="last")
    args = parser.parse_args(argv)
    if args.mode == "send" and args.size < _HEADER.size:
        parser.error(f"--size must be at least {_HEADER.size}")
    msgnet.run(receive(args) if args.mode == "receive" else send(args))


if __name__ == "__main__":
    main()
