"""Complete msgnet handshakes per second on one core, both sides in memory (msgnet.core.handshake).

One round is a whole INITIATION -> RESPONSE -> FINISH exchange through two
Handshakers, with packet parsing, the libp2p payload (protobuf, Ed25519
verify of the peer's static-key signature), index bookkeeping and confirm():
what a host pays per new session on top of the bare Noise XX of
bench_noise.py.  Signing our own static key happens once per Handshaker,
outside the timing.  handshakes/s = the "ops" column.

Run: PYTHONPATH=. python -m pytest benchmarks/bench_handshake.py
"""

from __future__ import annotations

import itertools
from typing import Any

from msgnet.core.handshake import Handshaker, SessionEstablished
from msgnet.identity import KeyPair
from msgnet.limits import HANDSHAKES_PER_SECOND

DIALER = ("192.0.2.1", 4001)
LISTENER = ("198.51.100.2", 4001)


class _Pair:
    """A dialer and a listener; each round is one fresh handshake between them."""

    def __init__(self) -> None:
        self.dialer = Handshaker(KeyPair.generate())
        self.listener = Handshaker(KeyPair.generate())
        self.indices = itertools.count(1)
        self.now = 0.0

    def handshake(self) -> SessionEstablished:
        # Advance the clock past the per-IP rate limit: one source dials here back to back.
        self.now += 1.0 / HANDSHAKES_PER_SECOND
        now, index = self.now, next(self.indices)
        [(initiation, _)] = self.dialer.initiate(
            LISTENER, now, local_index=index, peer_id=self.listener.peer_id
        )
        response = self.listener.handle_packet(
            initiation, DIALER, now, allocate_index=self.indices.__next__
        )
        finish = self.dialer.handle_packet(
            response.datagrams[0][0], LISTENER, now, allocate_index=self.indices.__next__
        )
        done = self.listener.handle_packet(
            finish.datagrams[0][0], DIALER, now, allocate_index=self.indices.__next__
        )
        self.dialer.confirm(index)
        self.listener.handle_timer(now)  # expire the FINISH memory, as a host's timer would
        [session] = done.events
        assert isinstance(session, SessionEstablished)
        return session


def test_bench_msgnet_handshake(benchmark: Any) -> None:
    pair = _Pair()
    session = benchmark(pair.handshake)
    assert isinstance(session, SessionEstablished)
    assert pair.dialer.counters == {} and pair.listener.counters == {}
