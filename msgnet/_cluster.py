"""Many DHT nodes per process, driven over JSON lines: the local multi-process network.

``msgnet demo``, the multi-process tests and the benchmarks start a few
worker processes (``python -m msgnet._cluster --nodes N [--bootstrap ADDR]``)
that each run N hosts with a Kademlia DHT on 127.0.0.1.  A worker prints one
``{"event": "ready", ...}`` line once its nodes are up and bootstrapped, then
answers commands: one JSON object per stdin line ``{"id", "op", ...}``, one
reply per stdout line ``{"id", "ok", "result" | "error"}``; commands run
concurrently.  Logs go to stderr.

:class:`ClusterProcess` is the parent's side; killing one abruptly is how the
churn tests stop a quarter of the network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from . import run
from .host import MessageHost
from .identity import KeyPair
from .protocols import ping as ping_protocol
from .protocols.dagcbor import CID
from .protocols.kad import (
    KadConfig,
    KadDHT,
    PublicKeyValidator,
    format_key,
    parse_key,
    sign_record,
)

__all__ = ["ClusterProcess", "main"]

log = logging.getLogger("msgnet.cluster")

READY_TIMEOUT = 60.0
# Nodes of one worker bootstrap a few at a time: all at once would make the
# first lookups time out on a loaded machine, one by one is slow.
BOOTSTRAP_PARALLEL = 8


def rss_bytes() -> int:
    """Resident memory of this process (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class _Worker:
    """The nodes of one worker process and the commands they answer."""

    def __init__(self, count: int, config: KadConfig, plaintext: bool) -> None:
        self.count = count
        self.config = config
        self.plaintext = plaintext
        self.keys = [KeyPair.generate() for _ in range(count)]
        self.hosts: list[MessageHost] = []
        self.dhts: list[KadDHT] = []

    async def start(self, bootstrap: Sequence[str]) -> dict[str, Any]:
        rss_empty = rss_bytes()
        for key in self.keys:
            host = MessageHost(key, plaintext=self.plaintext)
            await host.start()
            ping_protocol.serve(host)
            self.hosts.append(host)
            dht = KadDHT(host, config=self.config)
            await dht.start()
            self.dhts.append(dht)
        started = time.perf_counter()
        seed = list(bootstrap) or [str(self.hosts[0].addrs[0])]
        joining = self.dhts if bootstrap else self.dhts[1:]
        gate = asyncio.Semaphore(BOOTSTRAP_PARALLEL)

        async def join(dht: KadDHT) -> None:
            async with gate:
                if not await dht.bootstrap(seed):
                    log.warning("node %s found no peer while bootstrapping", dht.host.peer_id)

        await asyncio.gather(*(join(d) for d in joining))
        return {
            "event": "ready",
            "nodes": [{"peer": str(h.peer_id), "addr": str(h.addrs[0])} for h in self.hosts],
            "bootstrap_seconds": round(time.perf_counter() - started, 3),
            "rss_empty": rss_empty,
            "rss": rss_bytes(),
        }

    async def close(self) -> None:
        for dht in self.dhts:
            await dht.close()
        for host in self.hosts:
            await host.close()

    # -- commands ------------------------------------------------------------------------------

    async def handle(self, op: str, args: dict[str, Any]) -> Any:
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown op {op!r}")
        return await handler(**args)

    async def op_put(self, node: int, name: str, value: str) -> dict[str, Any]:
        """A signed /pk/ record of node ``node``."""
        key, record = sign_record(self.keys[node], name, value.encode())
        started = time.perf_counter()
        stored = await self.dhts[node].put_value(key, record)
        return {"key": format_key(key), "stored": stored,
                "seconds": time.perf_counter() - started}

    async def op_get(self, node: int, key: str) -> dict[str, Any]:
        raw_key = parse_key(key)
        started = time.perf_counter()
        envelope = await self.dhts[node].get_value(raw_key)
        elapsed = time.perf_counter() - started
        value = envelope
        if raw_key.startswith(b"/pk/"):
            value = PublicKeyValidator().decode(raw_key, envelope).value
        return {"value": value.decode(errors="replace"), "seconds": elapsed}

    async def op_provide(self, node: int, cid: str) -> dict[str, Any]:
        started = time.perf_counter()
        accepted = await self.dhts[node].provide(CID.from_string(cid))
        return {"accepted": accepted, "seconds": time.perf_counter() - started}

    async def op_providers(self, node: int, cid: str) -> dict[str, Any]:
        started = time.perf_counter()
        found = await self.dhts[node].find_providers(CID.from_string(cid))
        return {"providers": [str(p.peer_id) for p in found],
                "seconds": time.perf_counter() - started}

    async def op_lookup(self, node: int, key: str) -> dict[str, Any]:
        result = await self.dhts[node].get_closest_peers(bytes.fromhex(key))
        return {"hops": result.hops, "queries": result.queries, "failures": result.failures,
                "closest": [str(p.peer_id) for p in result.closest], "seconds": result.seconds}

    async def op_ping(self, node: int, addr: str) -> dict[str, Any]:
        """One request/response round trip from node ``node`` to ``addr``."""
        host = self.hosts[node]
        peer = host.add_peer(addr)
        return {"seconds": await ping_protocol.ping(host, peer)}

    async def op_table(self, node: int) -> list[str]:
        return [str(p) for p in self.dhts[node].table.peers()]

    async def op_refresh(self) -> None:
        await asyncio.gather(*(d.refresh(force=True) for d in self.dhts))

    async def op_stats(self) -> dict[str, Any]:
        host: Counter[str] = Counter()
        kad: Counter[str] = Counter()
        for h, d in zip(self.hosts, self.dhts):
            host.update(h.metrics())
            kad.update(d.metrics())
        return {"host": dict(host), "kad": dict(kad), "rss": rss_bytes(),
                "table_sizes": [len(d.table) for d in self.dhts]}


async def _serve(worker: _Worker) -> None:
    """Answer stdin commands until "quit" or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()

    def emit(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def answer(command: dict[str, Any]) -> None:
        ident = command.pop("id", None)
        op = command.pop("op", "")
        try:
            emit({"id": ident, "ok": True, "result": await worker.handle(op, command)})
        except Exception as exc:  # noqa: BLE001 - reported to the parent, who decides
            emit({"id": ident, "ok": False, "error": f"{type(exc).__name__}: {exc}"})

    while line := await reader.readline():
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        task = loop.create_task(answer(command))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in tasks:
        task.cancel()


async def _worker_main(args: argparse.Namespace) -> None:
    worker = _Worker(args.nodes, KadConfig(**json.loads(args.config)), args.plaintext)
    try:
        ready = await worker.start(args.bootstrap)
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await _serve(worker)
    finally:
        await worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msgnet._cluster", description=__doc__)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--bootstrap", nargs="*", default=[])
    parser.add_argument("--config", default="{}", help="KadConfig fields as JSON")
    parser.add_argument("--plaintext", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends us with "quit" or a kill
    run(_worker_main(args))
    return 0


# --- the parent's side -------------------------------------------------------------------------


class ClusterProcess:
    """A worker process and its command channel."""

    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.ready = ready
        self.nodes: list[dict[str, str]] = ready["nodes"]
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def spawn(cls, nodes: int, *, bootstrap: Sequence[str] = (),
                    config: dict[str, Any] | None = None, plaintext: bool = False,
                    timeout: float = READY_TIMEOUT) -> ClusterProcess:
        """Start a worker with ``nodes`` nodes and wait until they are bootstrapped."""
        argv = [sys.executable, "-m", "msgnet._cluster", "--nodes", str(nodes),
                "--config", json.dumps(config or {})]
        if bootstrap:
            argv += ["--bootstrap", *bootstrap]
        if plaintext:
            argv.append("--plaintext")
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 20)
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
            if not line:
                raise RuntimeError(f"cluster worker exited with {await process.wait()}")
            return cls(process, json.loads(line))
        except BaseException:
            _kill(process)
            await process.wait()
            raise

    @property
    def addrs(self) -> list[str]:
        return [n["addr"] for n in self.nodes]

    async def call(self, op: str, timeout: float = 60.0, **args: Any) -> Any:
        """Run one command; raises RuntimeError with the worker's error message."""
        self._ids += 1
        ident = self._ids
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"id": ident, "op": op, **args}).encode() + b"\n")
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._waiting.pop(ident, None)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            reply = json.loads(line)
            future = self._waiting.get(reply.get("id"))
            if future is None or future.done():
                continue
            if reply["ok"]:
                future.set_result(reply.get("result"))
            else:
                future.set_exception(RuntimeError(reply["error"]))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("cluster worker exited"))

    def kill(self) -> None:
        """Stop abruptly (SIGKILL): the nodes vanish without a word to their peers."""
        _kill(self.process)

    async def close(self, timeout: float = 10.0) -> None:
        """Ask the worker to quit; kill it if it does not within ``timeout``."""
        if self.process.returncode is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write(b'{"op": "quit"}\n')
                await asyncio.wait_for(self.process.wait(), timeout)
            except (TimeoutError, OSError):
                _kill(self.process)
        await self.process.wait()
        self._reader.cancel()


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        try:
            process.kill()
        except ProcessLookupError:  # pragma: no cover - exited meanwhile
            pass


if __name__ == "__main__":
    sys.exit(main())
