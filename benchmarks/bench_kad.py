"""Kademlia on msgnet against its baselines, in one run.

    python -m benchmarks.bench_kad [--quick] [--json] [--skip-libp2p] [--skip-large]

1. codec: strict DAG-CBOR on cbor2 (msgnet.protocols.dagcbor) vs the pure-Python
   ``dag-cbor`` package, on three typical DHT messages (why msgnet uses cbor2);
2. msgnet Kad with 20 nodes vs bmuller ``kademlia`` (asyncio, rpcudp) with 20
   nodes, same loop, same k=20/alpha=3: put ops/s, get ops/s from a node that
   does not hold the value, put and get latency medians, with the ratios
   against the targets (put >= 5x, get >= 2x, median lookup latency <= 0.5x);
3. py-libp2p's Kad-DHT (``libp2p``, trio) with 10 hosts: put/get median latency,
   in a subprocess with a time limit (it is trio-based: no shared loop);
4. msgnet with 200 nodes in 4 processes: bootstrap time, lookup latency
   median/p99 and memory per node.

It is a plain script (``benchmarks/__main__`` imports bench_*.py through pytest,
so nothing runs at import time and the baselines are imported lazily).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

NODES = 20
CONCURRENCY = 8


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# --- 1. codec ---------------------------------------------------------------------------------


def bench_codec(rounds: int) -> dict[str, Any]:
    """Encode/decode time per message: cbor2 made strict vs the pure-Python dag-cbor."""
    import timeit

    import dag_cbor

    from msgnet.protocols import dagcbor

    addr = bytes.fromhex("047f00000191020fa1a503260024080112") + os.urandom(32)
    messages = {
        "FIND_NODE request": {"type": 4, "key": os.urandom(38), "addrs": [addr]},
        "FIND_NODE reply, 20 peers": {"type": 4, "page": 0, "pages": 1, "providers": [],
                                      "closer": [addr] * 20},
        "GET_VALUE reply, 900 B": {"type": 1, "page": 0, "pages": 1, "closer": [],
                                   "providers": [], "value": os.urandom(900)},
    }
    out: dict[str, Any] = {}
    for name, message in messages.items():
        data = dagcbor.encode(message)
        assert data == dag_cbor.encode(message) and dag_cbor.decode(data) == message
        row: dict[str, Any] = {"bytes": len(data)}
        for lib, encode, decode in (("cbor2", dagcbor.encode, dagcbor.decode),
                                    ("dag-cbor", dag_cbor.encode, dag_cbor.decode)):
            row[f"{lib} encode us"] = round(min(timeit.repeat(
                lambda: encode(message), number=rounds, repeat=5)) / rounds * 1e6, 2)
            row[f"{lib} decode us"] = round(min(timeit.repeat(
                lambda: decode(data), number=rounds, repeat=5)) / rounds * 1e6, 2)
        row["encode speedup"] = round(row["dag-cbor encode us"] / row["cbor2 encode us"], 1)
        row["decode speedup"] = round(row["dag-cbor decode us"] / row["cbor2 decode us"], 1)
        out[name] = row
    return out


# --- 2. msgnet vs bmuller, 20 nodes ----------------------------------------------------------


async def _measure(ops: int, run_op: Callable[[int], Awaitable[None]]
                   ) -> tuple[float, list[float]]:
    """(ops/s with CONCURRENCY in flight, per-op latencies measured one at a time)."""
    latencies = []
    for i in range(ops):
        start = time.perf_counter()
        await run_op(i)
        latencies.append(time.perf_counter() - start)
    queue = iter(range(ops, 2 * ops))

    async def worker() -> None:
        for i in queue:
            await run_op(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ops / (time.perf_counter() - start), latencies


async def bench_msgnet(ops: int) -> dict[str, Any]:
    from msgnet import MessageHost
    from msgnet.identity import KeyPair
    from msgnet.protocols.kad import KadDHT, sign_record

    keys = [KeyPair.generate() for _ in range(NODES)]
    hosts = [MessageHost(k) for k in keys]
    getter_host = MessageHost()
    dhts: list[KadDHT] = []
    try:
        for host in (*hosts, getter_host):
            await host.start()
        dhts = [KadDHT(h) for h in hosts]
        getter = KadDHT(getter_host, server=False)  # holds nothing: every get is remote
        for dht in (*dhts, getter):
            await dht.start()
        boot = [str(hosts[0].addrs[0])]
        for dht in (*dhts[1:], getter):
            await dht.bootstrap(boot)
        put_keys: list[bytes] = []

        async def put(i: int) -> None:
            node = i % NODES
            key, record = sign_record(keys[node], f"bench-{i}", b"value-%d" % i)
            if await dhts[node].put_value(key, record) == 0:
                raise RuntimeError("put stored nowhere")
            put_keys.append(key)

        async def get(i: int) -> None:
            await getter.get_value(put_keys[i % len(put_keys)])

        put_rate, put_lat = await _measure(ops, put)
        get_rate, get_lat = await _measure(ops, get)
        return {"put_ops_s": round(put_rate, 1), "get_ops_s": round(get_rate, 1),
                "put_median_ms": _ms(statistics.median(put_lat)),
                "get_median_ms": _ms(statistics.median(get_lat)),
                "get_p99_ms": _ms(_percentile(get_lat, 0.99))}
    finally:
        for dht in dhts:
            await dht.close()
        for host in (*hosts, getter_host):
            await host.close()


async def bench_bmuller(ops: int, base_port: int = 23400) -> dict[str, Any]:
    import logging

    from kademlia.network import Server
    from kademlia.storage import ForgetfulStorage

    logging.getLogger("kademlia").setLevel(logging.CRITICAL)
    logging.getLogger("rpcudp").setLevel(logging.CRITICAL)

    class NoStorage(ForgetfulStorage):
        """The getter keeps nothing, so its gets are network lookups (as msgnet's client)."""

        def __setitem__(self, key: bytes, value: Any) -> None:
            pass

    servers = [Server(ksize=20, alpha=3) for _ in range(NODES)]
    getter = Server(ksize=20, alpha=3, storage=NoStorage())
    try:
        for i, server in enumerate((*servers, getter)):
            await server.listen(base_port + i, interface="127.0.0.1")
        for server in (*servers[1:], getter):
            await server.bootstrap([("127.0.0.1", base_port)])
        put_keys: list[str] = []

        async def put(i: int) -> None:
            key = f"bench-{i}"
            if not await servers[i % NODES].set(key, b"value-%d" % i):
                raise RuntimeError("bmuller set failed")
            put_keys.append(key)

        async def get(i: int) -> None:
            if await getter.get(put_keys[i % len(put_keys)]) is None:
                raise RuntimeError("bmuller get found nothing")

        put_rate, put_lat = await _measure(ops, put)
        get_rate, get_lat = await _measure(ops, get)
        return {"put_ops_s": round(put_rate, 1), "get_ops_s": round(get_rate, 1),
                "put_median_ms": _ms(statistics.median(put_lat)),
                "get_median_ms": _ms(statistics.median(get_lat)),
                "get_p99_ms": _ms(_percentile(get_lat, 0.99))}
    finally:
        for server in (*servers, getter):
            server.stop()


def compare(msgnet: dict[str, Any], bmuller: dict[str, Any]) -> dict[str, Any]:
    put = msgnet["put_ops_s"] / bmuller["put_ops_s"]
    get = msgnet["get_ops_s"] / bmuller["get_ops_s"]
    put_lat = msgnet["put_median_ms"] / bmuller["put_median_ms"]
    get_lat = msgnet["get_median_ms"] / bmuller["get_median_ms"]
    return {
        "put ops/s ratio (target >= 5)": [round(put, 2), put >= 5],
        "get ops/s ratio (target >= 2)": [round(get, 2), get >= 2],
        "put median latency ratio (set latency)": [round(put_lat, 3), None],
        "get median latency ratio (target <= 0.5)": [round(get_lat, 3), get_lat <= 0.5],
    }
