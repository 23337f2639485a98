"""Kademlia on msgnet against its baselines, in one run.

    python -m benchmarks.bench_kad [--quick] [--json] [--skip-libp2p] [--skip-large]

1. codec: strict DAG-CBOR on cbor2 (msgnet.protocols.dagcbor) vs the pure-Python
   ``dag-cbor`` package, on three typical DHT messages (why msgnet uses cbor2);
2. msgnet Kad with 20 nodes vs bmuller ``kademlia`` (asyncio, rpcudp) with 20
   nodes, same loop, same k=20/alpha=3: put ops/s, get ops/s from a node that
   does not hold the value, put and get latency medians, with the ratios
   against the targets (put >= 5x, get >= 2x, median lookup latency <= 0.5x);
   msgnet runs with content-addressed (/ipld/, hash-checked: the like-for-like
   of bmuller's unauthenticated values) and signed (/pk/) records, and beside
   the floor under any msgnet get (three parallel host requests, no DHT);
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
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

NODES = 20
CONCURRENCY = 8


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _per_call_us(call: Callable[[], Any], rounds: int) -> float:
    import timeit

    return round(min(timeit.repeat(call, number=rounds, repeat=5)) / rounds * 1e6, 2)


# --- 1. codec ---------------------------------------------------------------------------------


def bench_codec(rounds: int) -> dict[str, Any]:
    """Encode/decode time per message: cbor2 made strict vs the pure-Python dag-cbor."""
    import dag_cbor

    from msgnet.protocols import dagcbor

    addr = bytes.fromhex("047f00000191020fa1a503260024080112") + os.urandom(32)
    messages: dict[str, Any] = {
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
            row[f"{lib} encode us"] = _per_call_us(partial(encode, message), rounds)
            row[f"{lib} decode us"] = _per_call_us(partial(decode, data), rounds)
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


async def bench_msgnet(ops: int, records: str) -> dict[str, Any]:
    """``records``: "ipld" (content-addressed, checked by a hash, the like-for-like of
    bmuller's unauthenticated values) or "pk" (signed: every storing node verifies an
    Ed25519 signature)."""
    from msgnet import MessageHost
    from msgnet.identity import KeyPair
    from msgnet.protocols.kad import KadDHT, content_record, sign_record

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
            if records == "pk":
                key, record = sign_record(keys[node], f"bench-{i}", b"value-%d" % i)
            else:
                key, record = content_record(b"value-%d" % i)
            if await dhts[node].put_value(key, record) == 0:
                raise RuntimeError("put stored nowhere")
            put_keys.append(key)

        async def get(i: int) -> None:  # each key once: nothing is cached anywhere
            await getter.get_value(put_keys[i])

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
            if await getter.get(put_keys[i]) is None:
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


async def bench_floor(rounds: int) -> dict[str, Any]:
    """What a get costs below the DHT: alpha=3 parallel ``host.request`` round trips
    to three peers, each decoding a GET_VALUE request and encoding a reply (strict
    DAG-CBOR), with no lookup logic.  No get on msgnet can beat this."""
    from msgnet import MessageHost
    from msgnet.protocols import dagcbor
    from msgnet.protocols.kad import PROTOCOL

    hosts = [MessageHost() for _ in range(4)]
    try:
        for host in hosts:
            await host.start()
        reply = dagcbor.encode({"type": 1, "page": 0, "pages": 1, "closer": [],
                                "providers": [], "value": b"value-0"})

        def answer(message: Any) -> None:
            dagcbor.decode(message.data)
            message.reply(reply)

        for host in hosts[1:]:
            host.set_message_handler(PROTOCOL, answer)
            hosts[0].add_peer(host.addrs[0])
        request = dagcbor.encode({"type": 1, "key": b"/ipld/" + os.urandom(36)})

        async def one(peer: Any) -> None:
            dagcbor.decode(await hosts[0].request(peer, PROTOCOL, request))

        async def three() -> None:
            await asyncio.gather(*(one(h.peer_id) for h in hosts[1:]))

        latencies = []
        for i in range(rounds + 50):
            start = time.perf_counter()
            await three()
            if i >= 50:  # after the handshakes and warm-up
                latencies.append(time.perf_counter() - start)
        return {"3 parallel requests + codec, median ms": _ms(statistics.median(latencies))}
    finally:
        for host in hosts:
            await host.close()


def compare(msgnet: dict[str, Any], bmuller: dict[str, Any]) -> dict[str, Any]:
    """msgnet / bmuller: throughput ratios (higher is better), latency ratios (lower)."""
    put = msgnet["put_ops_s"] / bmuller["put_ops_s"]
    get = msgnet["get_ops_s"] / bmuller["get_ops_s"]
    get_lat = msgnet["get_median_ms"] / bmuller["get_median_ms"]
    return {
        "put ops/s (target >= 5x)": [round(put, 2), put >= 5],
        "get ops/s (target >= 2x)": [round(get, 2), get >= 2],
        "put (set) median latency": [round(msgnet["put_median_ms"] / bmuller["put_median_ms"],
                                           3), None],
        "get (lookup) median latency (target <= 0.5x)": [round(get_lat, 3), get_lat <= 0.5],
    }


# --- 3. py-libp2p -------------------------------------------------------------------------------

LIBP2P_HOSTS = 10
LIBP2P_TIMEOUT = 240.0


def bench_libp2p(ops: int) -> dict[str, Any]:
    """py-libp2p's Kad-DHT in a child process (trio cannot share our asyncio loop)."""
    argv = [sys.executable, "-m", "benchmarks.bench_kad", "--libp2p-child", str(ops)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=LIBP2P_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {LIBP2P_TIMEOUT} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def libp2p_child(ops: int) -> None:
    """10 py-libp2p hosts (TCP, Noise, yamux) with Kad-DHT servers, plus a client-mode
    getter; prints put and get medians as JSON."""
    import logging
    import secrets
    from contextlib import AsyncExitStack

    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.records.validator import Validator
    from libp2p.tools.anyio_service import background_trio_service
    from libp2p.tools.utils import info_from_p2p_addr
    from multiaddr import Multiaddr

    logging.disable(logging.CRITICAL)

    class AnyValue(Validator):  # type: ignore[misc]
        def validate(self, key: str, value: bytes) -> None:
            pass

        def select(self, key: str, values: list[bytes]) -> int:
            return 0

    async def main() -> None:
        started = time.perf_counter()
        hosts = [new_host(key_pair=create_new_key_pair(secrets.token_bytes(32)))
                 for _ in range(LIBP2P_HOSTS + 1)]
        async with AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(
                    host.run(listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")]))
            seed = info_from_p2p_addr(Multiaddr(
                f"{hosts[0].get_addrs()[0]}/p2p/{hosts[0].get_id().to_string()}"
                if "/p2p/" not in str(hosts[0].get_addrs()[0]) else str(hosts[0].get_addrs()[0])))
            for host in hosts[1:]:
                host.get_peerstore().add_addrs(seed.peer_id, seed.addrs, 3600)
                await host.connect(seed)
            dhts = [KadDHT(h, DHTMode.SERVER) for h in hosts[:-1]]
            dhts.append(KadDHT(hosts[-1], DHTMode.CLIENT))  # the getter
            for dht, host in zip(dhts, hosts):
                dht.register_validator("bench", AnyValue())
                for peer in host.get_peerstore().peer_ids():
                    if peer != host.get_id():
                        await dht.routing_table.add_peer(peer)
            for dht in dhts:
                await stack.enter_async_context(background_trio_service(dht))
            for dht in dhts:
                await dht.refresh_routing_table()
            setup = time.perf_counter() - started
            puts, gets = [], []
            for i in range(ops):
                begin = time.perf_counter()
                await dhts[i % LIBP2P_HOSTS].put_value(f"/bench/k{i}", b"value-%d" % i)
                puts.append(time.perf_counter() - begin)
            for i in range(ops):
                begin = time.perf_counter()
                if await dhts[-1].get_value(f"/bench/k{i}") != b"value-%d" % i:
                    raise RuntimeError("py-libp2p get returned the wrong value")
                gets.append(time.perf_counter() - begin)
            print(json.dumps({"hosts": LIBP2P_HOSTS, "setup_s": round(setup, 2),
                              "put_median_ms": _ms(statistics.median(puts)),
                              "get_median_ms": _ms(statistics.median(gets))}), flush=True)
            os._exit(0)  # the trio services take long to wind down; the numbers are out

    trio.run(main)


# --- 4. 200 msgnet nodes ---------------------------------------------------------------------------


async def bench_large(nodes: int, processes: int) -> dict[str, Any]:
    """Bootstrap time, lookup latency and memory per node of a ``nodes``-node network.

    Every node looks up a random key twice.  The first lookup mostly meets
    peers it has no session with yet, so it includes their Noise handshakes
    (as a lookup in a large network does); the second meets the same peers
    again and shows the cost of the lookup itself.
    """
    from msgnet._cluster import ClusterProcess

    per = nodes // processes
    started = time.perf_counter()
    workers = [await ClusterProcess.spawn(per, timeout=300)]
    try:
        workers += await asyncio.gather(*(ClusterProcess.spawn(
            per, bootstrap=[workers[0].addrs[0]], timeout=300) for _ in range(processes - 1)))
        boot = time.perf_counter() - started
        everyone = [(w, i) for w in workers for i in range(per)]
        gate = asyncio.Semaphore(processes)  # about one lookup in flight per process

        async def lookup(worker: ClusterProcess, node: int, key: str) -> dict[str, Any]:
            async with gate:
                return await worker.call("lookup", node=node, key=key)

        keys = [os.urandom(8).hex() for _ in everyone]
        rounds = []
        for _ in range(2):
            rounds.append(await asyncio.gather(*(lookup(w, i, key)
                                                 for (w, i), key in zip(everyone, keys))))
        stats = await asyncio.gather(*(w.call("stats") for w in workers))
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)
    cold, warm = ([r["seconds"] for r in results] for results in rounds)
    hops = [r["hops"] for results in rounds for r in results]
    node_bytes = [(w.ready["rss"] - w.ready["rss_empty"]) / per for w in workers]
    return {
        "nodes": per * processes,
        "processes": processes,
        "bootstrap_s": round(boot, 2),
        "lookup ms, new sessions, median/p99": [_ms(statistics.median(cold)),
                                                _ms(_percentile(cold, .99))],
        "lookup ms, sessions up, median/p99": [_ms(statistics.median(warm)),
                                               _ms(_percentile(warm, .99))],
        "hops median/max (bound ceil(log2 n)+3)": [statistics.median(hops), max(hops)],
        "queries per lookup median": statistics.median(
            r["queries"] for results in rounds for r in results),
        "memory per node KiB (RSS growth / nodes)": round(statistics.mean(node_bytes) / 1024),
        "process RSS MiB": [round(s["rss"] / 2**20, 1) for s in stats],
        "routing table size median": statistics.median(
            t for s in stats for t in s["table_sizes"]),
    }


# --- the run ---------------------------------------------------------------------------------------


async def _run_async(args: argparse.Namespace, report: dict[str, Any]) -> None:
    ops = 100 if args.quick else 300
    report["msgnet floor (host requests, no DHT)"] = await bench_floor(ops * 3)
    for records in ("ipld", "pk"):
        _log(f"msgnet, {NODES} nodes, /{records}/ records ...")
        report[f"msgnet /{records}/"] = await bench_msgnet(ops, records)
    _log(f"bmuller kademlia, {NODES} nodes ...")
    report["bmuller kademlia"] = await bench_bmuller(ops)
    report["ratios msgnet /ipld/ vs bmuller"] = compare(report["msgnet /ipld/"],
                                                       report["bmuller kademlia"])
    report["ratios msgnet /pk/ vs bmuller"] = compare(report["msgnet /pk/"],
                                                     report["bmuller kademlia"])
    if not args.skip_large:
        _log("msgnet, 200 nodes in 4 processes ...")
        report["msgnet 200 nodes"] = await bench_large(200, 4)


def _log(text: str) -> None:
    print(f"bench_kad: {text}", file=sys.stderr, flush=True)


def _print(report: dict[str, Any]) -> None:
    for section, rows in report.items():
        print(f"\n== {section}")
        for name, value in rows.items():
            print(f"  {name:<48} {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_kad",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--skip-libp2p", action="store_true")
    parser.add_argument("--skip-large", action="store_true", help="skip the 200-node run")
    parser.add_argument("--libp2p-child", type=int, metavar="OPS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.libp2p_child:
        libp2p_child(args.libp2p_child)
        return 0
    from msgnet import run

    report: dict[str, Any] = {"codec (per message)": bench_codec(500 if args.quick else 2000)}
    run(_run_async(args, report))
    if not args.skip_libp2p:
        _log(f"py-libp2p Kad-DHT, {LIBP2P_HOSTS} hosts ...")
        report["py-libp2p kad-dht"] = bench_libp2p(10 if args.quick else 30)
        libp2p = report["py-libp2p kad-dht"]
        if "error" not in libp2p:
            ours = report["msgnet /pk/"]
            report["ratios msgnet /pk/ vs py-libp2p (latency, lower is better)"] = {
                "put median": round(ours["put_median_ms"] / libp2p["put_median_ms"], 4),
                "get median": round(ours["get_median_ms"] / libp2p["get_median_ms"], 4),
            }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
