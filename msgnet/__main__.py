"""The ``msgnet`` command.

``msgnet demo`` starts a small local network and exercises it; ``msgnet id``
creates or shows an identity.  Logs go to stderr, results to stdout; exit
code 0 means everything worked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Sequence

from . import run
from .host import MessageHost
from .identity import KeyPair

ECHO = "/msgnet/demo/echo/1.0.0"
GOSSIP = "/msgnet/demo/note/1.0.0"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msgnet", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run a local multi-node demo and print a summary")
    demo.add_argument("--nodes", type=int, default=8, help="hosts to start (default 8)")
    demo.add_argument("--rounds", type=int, default=20,
                      help="requests each host sends to every other host (default 20)")
    demo.add_argument("--plaintext", action="store_true",
                      help="measurement mode: no encryption (identities still proven)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")

    ident = commands.add_parser("id", help="show the PeerID of a key file (created if missing)")
    ident.add_argument("--key", required=True, help="path of the Ed25519 key file")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        if args.nodes < 2 or args.rounds < 1:
            parser.error("demo needs --nodes >= 2 and --rounds >= 1")
        summary = run(_demo(args.nodes, args.rounds, args.plaintext))
        _print_summary(summary, as_json=args.json)
        return EXIT_OK if summary["failed"] == 0 else EXIT_FAILED
    if args.command == "id":
        return _show_id(args.key)
    return EXIT_USAGE  # pragma: no cover - argparse enforces the choices


def _show_id(path: str) -> int:
    try:
        keypair = KeyPair.load(path)
    except FileNotFoundError:
        keypair = KeyPair.generate()
        keypair.save(path)
        print(f"created {path}", file=sys.stderr)
    print(keypair.peer_id)
    return EXIT_OK


async def _demo(nodes: int, rounds: int, plaintext: bool) -> dict:
    """Every host requests an echo from every other host ``rounds`` times."""
    hosts = [MessageHost(plaintext=plaintext) for _ in range(nodes)]
    started = time.perf_counter()
    try:
        for host in hosts:
            await host.start()
            host.set_message_handler(ECHO, lambda msg: msg.reply(msg.data))
        for host in hosts:
            for other in hosts:
                if other is not host:
                    host.add_peer(other.addrs[0])
        print(f"started {nodes} hosts on 127.0.0.1", file=sys.stderr)

        latencies: list[float] = []
        failures: list[str] = []

        async def ask(host: MessageHost, other: MessageHost, i: int) -> None:
            payload = f"{host.peer_id}->{other.peer_id}#{i}".encode()
            t0 = time.perf_counter()
            try:
                reply = await host.request(other.peer_id, ECHO, payload, timeout=5.0)
            except Exception as exc:  # reported in the summary, not raised
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            if reply != payload:
                failures.append("echo mismatch")
                return
            latencies.append(time.perf_counter() - t0)

        for i in range(rounds):
            await asyncio.gather(*(ask(h, o, i) for h in hosts for o in hosts if o is not h))
            print(f"\rround {i + 1}/{rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        elapsed = time.perf_counter() - started
        metrics = [h.metrics() for h in hosts]
    finally:
        for host in hosts:
            await host.close()

    def total(name: str) -> int:
        return sum(m.get(name, 0) for m in metrics)

    ms = sorted(x * 1000 for x in latencies)
    return {
        "nodes": nodes,
        "requests": len(latencies) + len(failures),
        "ok": len(latencies),
        "failed": len(failures),
        "first_failures": failures[:5],
        "latency_ms_median": round(statistics.median(ms), 3) if ms else None,
        "latency_ms_p99": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3) if ms else None,
        "handshakes": total("handshakes_completed"),
        "messages_in": total("messages_in"),
        "packets_out": total("packets_out"),
        "bytes_out": total("bytes_out"),
        "dropped": sum(v for m in metrics for k, v in m.items() if k.startswith("drop_")),
        "seconds": round(elapsed, 3),
    }


def _print_summary(summary: dict, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    width = max(len(k) for k in summary)
    print("msgnet demo summary")
    for key, value in summary.items():
        if key == "first_failures" and not value:
            continue
        print(f"  {key.ljust(width)}  {value}")
    print("  result".ljust(width + 4), " OK" if summary["failed"] == 0 else " FAILED")


if __name__ == "__main__":
    sys.exit(main())
