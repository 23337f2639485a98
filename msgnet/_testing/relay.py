"""A userspace UDP relay between two endpoints that drops, delays, duplicates and
reorders datagrams under a seeded random policy.

This kernel has no ``tc netem``; tests put this relay between two hosts on
loopback (or inside network namespaces) to impair a real path reproducibly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

Address = tuple[str, int]
#: decides per datagram: (data, direction "a->b" or "b->a") -> drop it?
DropRule = Callable[[bytes, str], bool]


@dataclass
class Impairment:
    loss: float = 0.0           # probability a datagram is dropped
    duplicate: float = 0.0      # probability it is sent twice
    delay: float = 0.0          # base one-way delay, seconds
    jitter: float = 0.0         # uniform extra delay in [0, jitter): reorders datagrams
    seed: int = 1
    drop_rule: DropRule | None = None
    counters: dict[str, int] = field(default_factory=dict)


class Relay(asyncio.DatagramProtocol):
    """Forwards datagrams between the first sender (side a) and ``target`` (side b)."""

    def __init__(self, target: Address, impairment: Impairment) -> None:
        self.target = target
        self.impairment = impairment
        self.side_a: Address | None = None
        self._random = random.Random(impairment.seed)
        self._transport: asyncio.DatagramTransport | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def start(cls, target: Address, impairment: Impairment | None = None,
                    host: str = "127.0.0.1") -> Relay:
        loop = asyncio.get_running_loop()
        relay = cls(target, impairment or Impairment())
        await loop.create_datagram_endpoint(lambda: relay, local_addr=(host, 0))
        return relay

    @property
    def address(self) -> Address:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")[:2]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        if addr[:2] == tuple(self.target[:2]):
            direction, dest = "b->a", self.side_a
        else:
            if self.side_a is None:
                self.side_a = addr
            direction, dest = "a->b", self.target
        if dest is None:
            return
        imp = self.impairment
        self._count(direction)
        if (imp.drop_rule is not None and imp.drop_rule(data, direction)) or \
                self._random.random() < imp.loss:
            self._count("dropped")
            return
        copies = 2 if self._random.random() < imp.duplicate else 1
        for _ in range(copies):
            wait = imp.delay + self._random.random() * imp.jitter
            if wait <= 0:
                self._send(data, dest)
            else:
                self._loop.call_later(wait, self._send, data, dest)

    def _send(self, data: bytes, dest: Address) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, dest)

    def _count(self, name: str) -> None:
        counters = self.impairment.counters
        counters[name] = counters.get(name, 0) + 1

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
