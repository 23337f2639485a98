"""CPU instructions per message, counted by callgrind: the speed ratios without the noise.

    python -m benchmarks.instructions [--count N] [--only NAME,NAME]

The rate benchmarks (benchmarks/e2e.py, benchmarks/reliable.py) are what the targets are
stated in, but on a shared machine one run's rates swing by half. Where a scenario is
CPU-bound on one side, the instructions that side executes per message predict its rate, and
callgrind counts them the same way every run. Each scenario runs in a process of its own
under ``valgrind --tool=callgrind``, counting only the measured part (``callgrind_control``
switches it on after a warm-up); the receiving hosts run natively in another process, so
they keep up and the sender's work is what is counted. Needs valgrind (Debian:
``apt-get install valgrind``).

- ``oneway64/*``: the sending host's instructions per 64-byte message, best effort,
  ``Reliable()`` and ordered, one peer, until every reliable message is acknowledged
  (acknowledgements in, packets out).
- ``fanout64/*``: the same, each message to the next of three peers (pubsub's pattern).
- ``received64/*``: the receiving host's instructions per message of a oneway64 stream
  (the sender runs natively, paced so that nothing is dropped), acknowledgements included.
- ``rr1/*``: one request and its reply, both hosts in the counted process, per round trip;
  the baseline is raw uvloop datagram endpoints echoing in one process the same way. A
  round trip's time is mostly the kernel's and the wake-ups', so this reports what msgnet
  adds, not a ratio. ``rr1/msgnet`` awaits ``host.request``; ``rr1/msgnet-callback`` drives
  the client by ``request_callback`` (each reply's callback sends the next request), as the
  raw client is driven by ``datagram_received`` (benchmarks/e2e.py's two msgnet rows).
  ``rr1-tcp/*``: the same over msgnet's TCP transport (tcp-only hosts),
  against raw uvloop TCP carrying ``length:varint | payload`` frames (benchmarks/e2e.py's
  baseline).

Kernel work (the syscalls themselves) is not counted; user-space work is what msgnet adds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

PAYLOAD = b"x" * 64
PROTOCOL = "/bench/1.0.0"
WARMUP = 2000
FANOUT_PEERS = 3
SCENARIOS = ["oneway64/best-effort", "oneway64/reliable", "oneway64/reliable-ordered",
             "fanout64/best-effort", "fanout64/reliable", "received64/best-effort",
             "received64/reliable", "rr1/raw-uvloop", "rr1/msgnet", "rr1/msgnet-callback",
             "rr1-tcp/raw-uvloop", "rr1-tcp/msgnet", "rr1-tcp/msgnet-callback"]
# Sender-bound scenarios: their rate ratio follows the instruction ratio.
RATIOS = [("oneway64/reliable", "oneway64/best-effort"),
          ("oneway64/reliable-ordered", "oneway64/best-effort"),
          ("fanout64/reliable", "fanout64/best-effort")]


def _count(on: bool) -> None:
    """Switch callgrind's counting for this process (a no-op outside valgrind)."""
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
                   capture_output=True, check=False)


# --------------------------------------------------------------------------- processes

def _receiver(hosts: int) -> None:
    """Hosts that accept PROTOCOL and drop it; their addresses on one line; until stdin
    closes."""
    import msgnet

    async def main() -> None:
        async with msgnet.MessageHost() as first:
            others = [msgnet.MessageHost() for _ in range(hosts - 1)]
            for host in others:
                await host.start()
            try:
                for host in [first, *others]:
                    host.set_message_handler(PROTOCOL, lambda m: None)
                print(" ".join(str(h.addrs[0]) for h in [first, *others]), flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
            finally:
                for host in others:
                    await host.close()

    msgnet.run(main())


def _sender(name: str, count: int) -> None:
    """The counted side of a oneway64 or fanout64 scenario."""
    import msgnet

    peers_wanted = FANOUT_PEERS if name.startswith("fanout") else 1
    receiver = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.instructions", "--receiver", str(peers_wanted)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None and receiver.stdin is not None
    addrs = receiver.stdout.readline().split()
    qos = _qos(name.split("/")[1])

    async def main() -> None:
        async with msgnet.MessageHost() as host:
            peers = [host.add_peer(addr) for addr in addrs]
            for peer in peers:
                await host.connect(peer)

            async def burst(n: int) -> None:
                send = host.send_message
                for i in range(n):
                    await send(peers[i % len(peers)], PROTOCOL, PAYLOAD, qos=qos)
                    if i % 1024 == 1023:
                        await asyncio.sleep(0)
                deadline = time.monotonic() + 60
                for peer in peers:  # the reliable ones acknowledged: their whole cost
                    delivery = host.network.delivery.connection(host.network.sessions(peer)[0])
                    while (delivery is not None and time.monotonic() < deadline
                           and (delivery.packets_in_flight or delivery.transmit_pending)):
                        await asyncio.sleep(0.001)
                await asyncio.sleep(0.05)

            await burst(WARMUP)
            _count(True)
            await burst(count)
            _count(False)

    try:
        msgnet.run(main())
    finally:
        receiver.stdin.close()
        receiver.wait(30)


def _qos(name: str) -> Any:
    import msgnet

    return {"best-effort": msgnet.BEST_EFFORT, "reliable": msgnet.Reliable(),
            "reliable-ordered": msgnet.Reliable(ordered=True)}[name]


def _native_sender(addr: str, count: int, qos_name: str) -> None:
    """The uncounted side of a received64 scenario: count messages, paced (a counted
    receiver is fifty times slower than a native one), then stays for the last acks."""
    import msgnet

    async def main() -> None:
        async with msgnet.MessageHost() as host:
            peer = host.add_peer(addr)
            await host.connect(peer)
            qos = _qos(qos_name)
            for i in range(count):
                await host.send_message(peer, PROTOCOL, PAYLOAD, qos=qos)
                if i % 64 == 63:
                    await asyncio.sleep(0.002)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    msgnet.run(main())


def _receiving(name: str, count: int) -> None:
    """The counted side of a received64 scenario: one host counting what arrives."""
    import msgnet

    async def main() -> None:
        async with msgnet.MessageHost() as host:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            seen = [0]

            def handler(_message: Any) -> None:
                seen[0] += 1
                if seen[0] == WARMUP:
                    _count(True)
                elif seen[0] == WARMUP + count:
                    _count(False)
                    done.set_result(None)

            host.set_message_handler(PROTOCOL, handler)
            sender = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.instructions", "--sender",
                 str(host.addrs[0]), str(WARMUP + count), name.split("/")[1]],
                stdin=subprocess.PIPE)
            try:
                await asyncio.wait_for(done, 600)
            finally:
                assert sender.stdin is not None
                sender.stdin.close()
                sender.wait(30)

    msgnet.run(main())


def _round_trips(name: str, count: int) -> None:
    """The counted process of an rr1 scenario: both ends in it, one request at a time."""
    if "/msgnet" in name:
        import msgnet

        options: dict[str, Any] = {}
        if name.startswith("rr1-tcp"):
            options = {"listen": ["/ip4/127.0.0.1/tcp/0"], "transport_policy": "tcp-only"}

        async def main() -> None:
            async with (msgnet.MessageHost(**options) as server,
                        msgnet.MessageHost(**options) as client):
                server.set_message_handler(PROTOCOL, lambda m: m.reply(m.data))
                peer = client.add_peer(server.addrs[0])
                await client.connect(peer)
                if name.endswith("-callback"):
                    await _callback_round_trips(client, peer, count)
                    return
                for i in range(WARMUP + count):
                    if i == WARMUP:
                        _count(True)
                    await client.request(peer, PROTOCOL, PAYLOAD, timeout=5)
                _count(False)

        msgnet.run(main())
        return

    import uvloop

    if name.startswith("rr1-tcp"):
        uvloop.run(_raw_tcp_round_trips(count))
        return

    async def raw() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.transport.sendto(data, addr)

        class Client(asyncio.DatagramProtocol):
            n = 0

            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                self.n += 1
                if self.n == WARMUP:
                    _count(True)
                if self.n < WARMUP + count:
                    self.transport.sendto(data)
                else:
                    _count(False)
                    done.set_result(None)

        server, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        client, _ = await loop.create_datagram_endpoint(
            Client, remote_addr=server.get_extra_info("sockname"))
        client.sendto(PAYLOAD)
        await done
        client.close()
        server.close()

    uvloop.run(raw())


async def _callback_round_trips(client: Any, peer: Any, count: int) -> None:
    """The request_callback client: each reply's callback sends the next request."""
    done = asyncio.get_running_loop().create_future()
    replies = 0

    def on_reply(pending: Any) -> None:
        nonlocal replies
        pending.result()
        replies += 1
        if replies == WARMUP:
            _count(True)
        if replies < WARMUP + count:
            client.request_callback(peer, PROTOCOL, PAYLOAD, on_reply, timeout=5)
        else:
            _count(False)
            done.set_result(None)

    client.request_callback(peer, PROTOCOL, PAYLOAD, on_reply, timeout=5)
    await done


async def _raw_tcp_round_trips(count: int) -> None:
    """rr1-tcp/raw-uvloop: e2e's raw TCP echo server and ping-pong client, in one process."""
    from benchmarks.e2e import _frame, _FrameReader

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    frame = _frame(PAYLOAD)
    state = {"n": 0}

    def echo() -> _FrameReader:
        reader = _FrameReader(lambda payload: reader.transport.write(_frame(payload)))
        return reader

    def on_reply(_payload: bytes) -> None:
        state["n"] += 1
        if state["n"] == WARMUP:
            _count(True)
        if state["n"] < WARMUP + count:
            client.transport.write(frame)
        else:
            _count(False)
            done.set_result(None)

    server = await loop.create_server(echo, "127.0.0.1", 0)
    transport, client = await loop.create_connection(
        lambda: _FrameReader(on_reply), *server.sockets[0].getsockname())
    transport.write(frame)
    await done
    transport.close()
    server.close()


# --------------------------------------------------------------------------- driver

def _measure(name: str, count: int) -> float:
    """Instructions per message (per round trip for rr1) of one scenario."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.instructions",
             "--child", name, str(count)],
            capture_output=True, check=True, timeout=1800)
        with open(out) as f:
            totals = [line for line in f if line.startswith("totals:")]
    if not totals:
        raise RuntimeError(f"{name}: callgrind wrote no totals")
    return int(totals[-1].split()[1]) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000,
                        help="messages (round trips for rr1) counted per scenario")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sender", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        _receiver(args.receiver)
        return 0
    if args.sender:
        _native_sender(args.sender[0], int(args.sender[1]), args.sender[2])
        return 0
    if args.child:
        name, count = args.child[0], int(args.child[1])
        run = {"rr1": _round_trips, "rr1-tcp": _round_trips,
               "received64": _receiving}.get(name.split("/")[0], _sender)
        run(name, count)
        return 0
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n] or SCENARIOS
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    counts: dict[str, float] = {}
    for name in names:
        counts[name] = _measure(name, max(args.count // 4, 1) if name.startswith("rr1")
                                else args.count)
        print(f"  {name}: {counts[name]:,.0f}", file=sys.stderr)
    print(f"{'scenario':32} {'instructions':>14}  per")
    for name, value in counts.items():
        unit = "round trip" if name.startswith("rr1") else "message"
        print(f"{name:32} {value:>14,.0f}  {unit}")
    for name, base in RATIOS:
        if name in counts and base in counts:
            print(f"{name} vs {base}: {counts[base] / counts[name]:.2f}x the rate at equal "
                  "instructions per second")
    for rr in ("rr1", "rr1-tcp"):
        for row in (f"{rr}/msgnet", f"{rr}/msgnet-callback"):
            if row in counts and f"{rr}/raw-uvloop" in counts:
                # Not a rate ratio: a round trip's time is mostly the kernel's and wake-ups'.
                print(f"{row} adds {counts[row] - counts[f'{rr}/raw-uvloop']:,.0f}"
                      " user-space instructions per round trip to raw uvloop's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
