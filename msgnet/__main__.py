"""The ``msgnet`` command: a local DHT demo, a long-running DHT node and small tools.

    msgnet demo [--nodes 30] [--processes 3] [--json]
    msgnet node --listen MULTIADDR... [--bootstrap MULTIADDR...] --key FILE [--metrics-port N]
    msgnet id --key FILE
    msgnet ping ADDR [--count N] [--json]
    msgnet dht put|get|provide|providers KEY [VALUE] --bootstrap ADDR [--json]

Results go to stdout (``--json`` where scripts read them), progress and logs
to stderr.  Exit codes: 0 success, 1 the operation failed (or the demo saw
a failure), 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from . import run
from ._cluster import ClusterProcess
from .addr import parse_multiaddr
from .errors import MsgnetError, UsageError
from .host import MessageHost
from .identity import KeyPair
from .protocols import ping as ping_protocol
from .protocols.dagcbor import CID, DagCborError
from .protocols.kad import (
    KadDHT,
    NotFoundError,
    PublicKeyValidator,
    format_key,
    parse_key,
    sign_record,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

log = logging.getLogger("msgnet.cli")

MAX_HTTP_REQUEST = 8192
HTTP_TIMEOUT = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            if args.nodes < 2 or not 1 <= args.processes <= args.nodes:
                parser.error("demo needs --nodes >= 2 and 1 <= --processes <= --nodes")
            summary = run(_demo(args.nodes, args.processes, args.plaintext))
            _print_summary(summary, as_json=args.json)
            return EXIT_OK if summary["failed"] == 0 else EXIT_FAILED
        if args.command == "id":
            return _show_id(args.key)
        if args.command == "node":
            return run(_node(args))
        if args.command == "ping":
            return run(_ping(args))
        if args.command == "dht":
            if args.action == "put" and args.value is None:
                parser.error("dht put needs KEY and VALUE")
            return run(_dht(args))
    except UsageError as exc:
        print(f"msgnet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE  # pragma: no cover - argparse enforces the choices


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msgnet", description=__doc__.splitlines()[0],
        epilog="exit codes: 0 success, 1 operation failed, 2 usage error")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="run a local multi-process DHT network and print a summary",
        description="Start a DHT network on 127.0.0.1 across several processes, bootstrap "
                    "it, then put, get (from other nodes), provide, find providers and "
                    "ping; print a summary table. Exits 1 if any operation failed.")
    demo.add_argument("--nodes", type=int, default=30, help="DHT nodes in all (default 30)")
    demo.add_argument("--processes", type=int, default=3,
                      help="worker processes sharing the nodes (default 3)")
    demo.add_argument("--plaintext", action="store_true",
                      help="measurement mode: no encryption (identities still proven)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")

    node = commands.add_parser(
        "node", help="run a long-lived DHT node",
        description="Run a DHT node until SIGINT/SIGTERM. Prints its address(es) on "
                    "stdout, one per line, once listening.")
    node.add_argument("--listen", nargs="+", action="extend", metavar="MULTIADDR",
                      help="listen addresses (default /ip4/127.0.0.1/udp/0)")
    node.add_argument("--bootstrap", nargs="+", action="extend", default=[],
                      metavar="MULTIADDR", help="peers to join through (with /p2p/)")
    node.add_argument("--key", required=True, help="Ed25519 key file (created if missing)")
    node.add_argument("--metrics-port", type=int, metavar="N",
                      help="serve Prometheus metrics on http://127.0.0.1:N/metrics")

    ident = commands.add_parser("id", help="show the PeerID of a key file (created if missing)")
    ident.add_argument("--key", required=True, help="path of the Ed25519 key file")

    ping = commands.add_parser("ping", help="measure round trips to a node",
                               description="Send pings (/msgnet/ping/1.0.0) to a node and "
                                           "print the round-trip times.")
    ping.add_argument("addr", metavar="ADDR", help="the node's multiaddr, with /p2p/")
    ping.add_argument("-c", "--count", type=int, default=5, help="pings to send (default 5)")
    ping.add_argument("--timeout", type=float, default=2.0, help="seconds per ping")
    ping.add_argument("--json", action="store_true", help="print the results as JSON")

    dht = commands.add_parser(
        "dht", help="put, get or find providers in a DHT",
        description="One DHT operation through a bootstrap node (this process joins as a "
                    "client). put stores a record signed by --key under "
                    "/pk/<peer-id>/KEY and prints that full key; get takes such a key. "
                    "provide/providers take a CID, or any text (named by its CIDv1).")
    dht.add_argument("action", choices=["put", "get", "provide", "providers"])
    dht.add_argument("key", metavar="KEY")
    dht.add_argument("value", metavar="VALUE", nargs="?", help="the value to put")
    dht.add_argument("--bootstrap", nargs="+", action="extend", required=True,
                     metavar="ADDR", help="DHT node(s) to join through (with /p2p/)")
    dht.add_argument("--key", dest="key_file", metavar="FILE",
                     help="identity that signs puts and provides (default: a new one)")
    dht.add_argument("--timeout", type=float, default=30.0, help="seconds for the operation")
    dht.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


# --- id ---------------------------------------------------------------------------------------


def _load_or_create_key(path: str) -> KeyPair:
    try:
        return KeyPair.load(path)
    except FileNotFoundError:
        keypair = KeyPair.generate()
        keypair.save(path)
        print(f"created {path}", file=sys.stderr)
        return keypair


def _show_id(path: str) -> int:
    print(_load_or_create_key(path).peer_id)
    return EXIT_OK


# --- demo ---------------------------------------------------------------------------------------


class _Tally:
    """Successes, failures and latencies of one kind of operation."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.failures: list[str] = []

    async def track(self, work: Awaitable[Any], check: Callable[[Any], str | None]) -> None:
        try:
            result = await work
        except Exception as exc:  # noqa: BLE001 - a failed operation is a result here
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        problem = check(result)
        if problem:
            self.failures.append(problem)
        else:
            self.latencies.append(result["seconds"])

    def row(self) -> dict[str, Any]:
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "ok": len(ms),
            "failed": len(self.failures),
            "median_ms": round(statistics.median(ms), 3) if ms else None,
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3) if ms else None,
        }


async def _demo(nodes: int, processes: int, plaintext: bool) -> dict[str, Any]:
    """Start the network, exercise every DHT operation across processes, and tally."""
    started = time.perf_counter()
    sizes = [nodes // processes + (i < nodes % processes) for i in range(processes)]
    _progress(f"starting {nodes} nodes in {processes} processes on 127.0.0.1")
    workers: list[ClusterProcess] = []
    try:
        workers.append(await ClusterProcess.spawn(sizes[0], plaintext=plaintext))
        seed = [workers[0].addrs[0]]
        workers += await asyncio.gather(*(ClusterProcess.spawn(n, bootstrap=seed,
                                                               plaintext=plaintext)
                                          for n in sizes[1:]))
        boot_seconds = time.perf_counter() - started
        _progress(f"bootstrapped in {boot_seconds:.2f} s")
        everyone = [(w, i) for w in workers for i in range(len(w.nodes))]
        rng = random.Random(7)

        def elsewhere(worker: ClusterProcess) -> list[tuple[ClusterProcess, int]]:
            """Nodes in other processes (or others at all, with one process)."""
            others = [(w, i) for w, i in everyone if w is not worker]
            return others or everyone

        tallies = {name: _Tally() for name in ("put", "get", "provide", "find providers",
                                               "request/response")}
        puts: list[tuple[ClusterProcess, dict[str, Any], str]] = []

        async def put(worker: ClusterProcess, node: int) -> dict[str, Any]:
            value = f"hello from node {node} of pid {worker.process.pid}"
            result = await worker.call("put", node=node, name=f"demo-{node}", value=value)
            puts.append((worker, result, value))
            return result

        await asyncio.gather(*(tallies["put"].track(
            put(w, i), lambda r: None if r["stored"] > 0 else "stored on no peer")
            for w, i in everyone))
        _progress(f"put {len(puts)} signed records")

        gets = []
        for worker, result, value in puts:
            for reader, node in rng.sample(elsewhere(worker), min(5, len(everyone) - 1)):
                gets.append(tallies["get"].track(
                    reader.call("get", node=node, key=result["key"]),
                    _expect("value", value, "wrong value")))
        await asyncio.gather(*gets)
        _progress(f"got {len(gets)} records from other nodes")

        providers = rng.sample(everyone, min(10, len(everyone)))
        cids = {str(CID.of(f"demo content {i}".encode())): (w, n)
                for i, (w, n) in enumerate(providers)}
        await asyncio.gather(*(tallies["provide"].track(
            w.call("provide", node=n, cid=cid),
            lambda r: None if r["accepted"] > 0 else "no peer accepted the provider record")
            for cid, (w, n) in cids.items()))
        lookups = []
        for cid, (worker, node) in cids.items():
            expected = worker.nodes[node]["peer"]
            for reader, other in rng.sample(elsewhere(worker), min(3, len(everyone) - 1)):
                lookups.append(tallies["find providers"].track(
                    reader.call("providers", node=other, cid=cid),
                    _expect("providers", expected, "provider missing", within=True)))
        await asyncio.gather(*lookups)
        _progress(f"announced {len(cids)} providers, {len(lookups)} provider lookups")

        pings = []
        for worker, node in everyone:
            for target, index in rng.sample(elsewhere(worker), min(5, len(everyone) - 1)):
                pings.append(tallies["request/response"].track(
                    worker.call("ping", node=node, addr=target.addrs[index]), lambda r: None))
        await asyncio.gather(*pings)
        _progress(f"{len(pings)} request/response round trips")

        stats = await asyncio.gather(*(w.call("stats") for w in workers))
    finally:
        await asyncio.gather(*(w.close() for w in workers))
    host: Counter[str] = Counter()
    kad: Counter[str] = Counter()
    for part in stats:
        host.update(part["host"])
        kad.update(part["kad"])
    operations = {name: tally.row() for name, tally in tallies.items()}
    return {
        "nodes": nodes,
        "processes": processes,
        "bootstrap_seconds": round(boot_seconds, 3),
        "operations": operations,
        "failed": sum(row["failed"] for row in operations.values()),
        "first_failures": [f for t in tallies.values() for f in t.failures][:5],
        "messages_in": host["messages_in"],
        "messages_out": host["messages_out"],
        "packets_out": host["packets_out"],
        "bytes_out": host["bytes_out"],
        "handshakes": host["handshakes_completed"],
        "dht_requests_served": kad["requests_in"],
        "dht_malformed_dropped": kad["dropped_malformed_requests"]
        + kad["dropped_malformed_replies"],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _expect(field: str, wanted: Any, problem: str, *, within: bool = False
            ) -> Callable[[dict[str, Any]], str | None]:
    """A check of one result field: equal to ``wanted`` (or containing it)."""

    def check(result: dict[str, Any]) -> str | None:
        got = result[field]
        return None if (wanted in got if within else got == wanted) else problem

    return check


def _progress(text: str) -> None:
    print(f"msgnet demo: {text}", file=sys.stderr, flush=True)


def _print_summary(summary: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"msgnet demo: {summary['nodes']} nodes in {summary['processes']} processes, "
          f"bootstrapped in {summary['bootstrap_seconds']} s")
    print(f"  {'operation':<18} {'ok':>5} {'failed':>6} {'median ms':>10} {'p99 ms':>10}")
    for name, row in summary["operations"].items():
        median = "-" if row["median_ms"] is None else f"{row['median_ms']:.2f}"
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.2f}"
        print(f"  {name:<18} {row['ok']:>5} {row['failed']:>6} {median:>10} {p99:>10}")
    print(f"  messages in/out    {summary['messages_in']} / {summary['messages_out']}")
    print(f"  packets, bytes out {summary['packets_out']}, {summary['bytes_out']}")
    print(f"  handshakes         {summary['handshakes']}")
    print(f"  DHT requests       {summary['dht_requests_served']} served, "
          f"{summary['dht_malformed_dropped']} malformed dropped")
    for failure in summary["first_failures"]:
        print(f"  failure: {failure}")
    print(f"  total time         {summary['seconds']} s")
    print("  result             " + ("OK" if summary["failed"] == 0 else "FAILED"))


# --- node -----------------------------------------------------------------------------------------


async def _node(args: argparse.Namespace) -> int:
    """A DHT node (and ping responder) until SIGINT or SIGTERM."""
    keypair = _load_or_create_key(args.key)
    host = MessageHost(keypair, listen=args.listen or ["/ip4/127.0.0.1/udp/0"])
    await host.start()
    dht = KadDHT(host)
    metrics_server: asyncio.Server | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        ping_protocol.serve(host)
        await dht.start()
        for addr in host.addrs:
            print(addr, flush=True)
            if _is_unspecified(parse_multiaddr(addr).host):
                log.warning("listening on %s: other nodes are told this address, which they "
                            "cannot dial; listen on a specific address", addr)
        if args.metrics_port is not None:
            metrics_server = await _serve_metrics(args.metrics_port, host, dht)
            print(f"metrics on http://127.0.0.1:{args.metrics_port}/metrics",
                  file=sys.stderr, flush=True)
        if args.bootstrap:
            bootstrap = loop.create_task(_bootstrap_node(dht, args.bootstrap))
        await stop.wait()
        print("shutting down", file=sys.stderr, flush=True)
        if args.bootstrap:
            bootstrap.cancel()
    finally:
        if metrics_server is not None:
            metrics_server.close()
            await metrics_server.wait_closed()
        await dht.close()
        await host.close()
    return EXIT_OK


async def _bootstrap_node(dht: KadDHT, addrs: list[str]) -> None:
    """Join; a node whose bootstrap peers are down keeps running and answers others."""
    try:
        peers = await dht.bootstrap(addrs)
    except MsgnetError as exc:
        log.warning("bootstrap failed: %s", exc)
        return
    print(f"bootstrapped: {peers} peers in the routing table", file=sys.stderr, flush=True)


async def _serve_metrics(port: int, host: MessageHost, dht: KadDHT) -> asyncio.Server:
    """A minimal HTTP/1.0 responder: GET /metrics -> Prometheus text, anything else 404."""

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_TIMEOUT)
            request_line = head.split(b"\r\n", 1)[0].split()
            if len(request_line) >= 2 and request_line[:2] == [b"GET", b"/metrics"]:
                body = (host.metrics_text() + dht.metrics_text()).encode()
                status = b"200 OK"
                kind = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, kind = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: " + kind
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that cannot send a request head gets nothing
        finally:
            writer.close()

    return await asyncio.start_server(respond, "127.0.0.1", port, limit=MAX_HTTP_REQUEST)


# --- ping -----------------------------------------------------------------------------------------


async def _ping(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    async with MessageHost(listen=[_listen_for([args.addr])]) as host:
        peer = host.add_peer(args.addr)
        rtts: list[float | None] = []
        for seq in range(1, args.count + 1):
            try:
                rtt = await ping_protocol.ping(host, peer, timeout=args.timeout)
            except MsgnetError as exc:
                rtts.append(None)
                if not args.json:
                    print(f"seq={seq} failed: {exc}")
                continue
            rtts.append(rtt)
            if not args.json:
                note = " (includes the handshake)" if seq == 1 else ""
                print(f"seq={seq} time={rtt * 1000:.3f} ms{note}", flush=True)
    ok = [r for r in rtts if r is not None]
    steady = [r for r in rtts[1:] if r is not None] or ok
    summary = {
        "peer": str(peer), "sent": len(rtts), "received": len(ok),
        "rtt_ms": [None if r is None else round(r * 1000, 3) for r in rtts],
        "min_ms": round(min(steady) * 1000, 3) if steady else None,
        "median_ms": round(statistics.median(steady) * 1000, 3) if steady else None,
        "max_ms": round(max(steady) * 1000, 3) if steady else None,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['received']}/{summary['sent']} replies; without the first "
              f"(handshake): min {summary['min_ms']} ms, median {summary['median_ms']} ms, "
              f"max {summary['max_ms']} ms")
    return EXIT_OK if ok else EXIT_FAILED


def _listen_for(addrs: Sequence[str]) -> str:
    """Listen on loopback when every peer is local, else on all interfaces of that family."""
    endpoints = [parse_multiaddr(a) for a in addrs]
    if any(e.family in ("ip6", "dns6") for e in endpoints):
        return "/ip6/::1/udp/0" if all(_is_loopback(e.host) for e in endpoints) else (
            "/ip6/::/udp/0")
    return "/ip4/127.0.0.1/udp/0" if all(_is_loopback(e.host) for e in endpoints) else (
        "/ip4/0.0.0.0/udp/0")


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- dht ------------------------------------------------------------------------------------------


async def _dht(args: argparse.Namespace) -> int:
    keypair = _load_or_create_key(args.key_file) if args.key_file else KeyPair.generate()
    async with MessageHost(keypair, listen=[_listen_for(args.bootstrap)]) as host, \
            KadDHT(host, server=False) as dht:
        try:
            return await asyncio.wait_for(_dht_action(args, keypair, dht), args.timeout)
        except TimeoutError:
            print(f"msgnet dht {args.action}: no result within {args.timeout} s",
                  file=sys.stderr)
            return EXIT_FAILED


async def _dht_action(args: argparse.Namespace, keypair: KeyPair, dht: KadDHT) -> int:
    peers = await dht.bootstrap(args.bootstrap)
    if peers == 0:
        print("msgnet dht: no DHT peer answered the bootstrap", file=sys.stderr)
        return EXIT_FAILED
    started = time.perf_counter()
    result: dict[str, Any]
    if args.action == "put":
        key, record = sign_record(keypair, args.key, args.value.encode())
        stored = await dht.put_value(key, record)
        result = {"key": format_key(key), "stored": stored}
        text = f"{result['key']}\nstored on {stored} peers"
        ok = stored > 0
    elif args.action == "get":
        key = parse_key(args.key)
        try:
            envelope = await dht.get_value(key)
        except NotFoundError:
            print(f"msgnet dht get: {args.key} not found", file=sys.stderr)
            return EXIT_FAILED
        value, seq = envelope, None
        if key.startswith(b"/pk/"):
            signed = PublicKeyValidator().decode(key, envelope)
            value, seq = signed.value, signed.seq
        result = {"key": format_key(key), "value": value.decode(errors="replace"), "seq": seq}
        text, ok = result["value"], True
    elif args.action == "provide":
        cid = _cid_of(args.key)
        accepted = await dht.provide(cid)
        result = {"cid": str(cid), "provider": str(keypair.peer_id), "accepted": accepted}
        text, ok = f"{cid}\nprovider record accepted by {accepted} peers", accepted > 0
    else:
        cid = _cid_of(args.key)
        found = await dht.find_providers(cid)
        result = {"cid": str(cid), "providers": [
            {"peer": str(p.peer_id), "addrs": [str(m) for m in p.multiaddrs()]} for p in found]}
        text = "\n".join(f"{p['peer']} {' '.join(p['addrs'])}" for p in result["providers"])
        ok = bool(found)
        if not ok:
            print(f"msgnet dht providers: none found for {cid}", file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - started, 6)
    if args.json:
        print(json.dumps(result))
    elif text:
        print(text)
    return EXIT_OK if ok else EXIT_FAILED


def _cid_of(text: str) -> CID:
    """A CID given as text, or the CIDv1 (raw, sha2-256) of any other text."""
    try:
        return CID.from_string(text)
    except DagCborError:
        return CID.of(text.encode())


if __name__ == "__main__":
    sys.exit(main())
