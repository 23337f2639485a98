"""Cost of the delivery core (msgnet.core.delivery) per reliable message, both ends in memory.

Through the lossless in-memory harness (msgnet/_testing/lossy.py, zero delay):
one round sends a batch of reliable messages from one end and runs until every
one is acknowledged, so it pays send, poll_transmit, packetising and
on_packet_sent on the sender, on_fragment and on_packet_received on the
receiver, build_ack there and on_ack back (with the MessageDelivered events).
The harness's own packet sizing and pipe are included: an upper bound on what
the core adds to the engine.  ``per_message_us`` in the extra info is the
median round divided by the batch.

* 64-byte messages, unordered and ordered (the target: a small fraction of the
  engine's per-message cost for best effort, so reliable runs near its rate).
* the same with the least glue an engine can have (16 fragments a packet, acks
  handed straight back, no sizing or pipe): the core's own share.
* one 1 MiB reliable message (fragmentation, reassembly, ~900 fragments).

Run: PYTHONPATH=. python -m pytest benchmarks/bench_delivery.py --benchmark-only -q
"""

from __future__ import annotations

from typing import Any

import pytest

from msgnet._testing.lossy import DeliveryHarness, Impairment, fragment_room
from msgnet.core.delivery import DeliveryConnection
from msgnet.limits import MAX_MESSAGE_PAYLOAD

BATCH = 1000
LOSSLESS = Impairment(delay=0.0)


def _deliver(h: DeliveryHarness, sizes: list[int], ordered: bool) -> None:
    send = h.a.conn.send
    now = h.clock.now
    for size in sizes:
        send("/bench", bytes(size), reliable=True, ordered=ordered, now=now)
    events = h.a.events  # one MessageDelivered per message
    if not h.run(lambda: len(events) == len(sizes), timeout=60):
        raise AssertionError("batch not acknowledged")
    h.a.events.clear()
    h.b.delivered.clear()


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_reliable_64_bytes(benchmark: Any, ordered: bool) -> None:
    h = DeliveryHarness(LOSSLESS)
    benchmark.group = "delivery core: reliable 64 B messages"
    benchmark.pedantic(_deliver, args=(h, [64] * BATCH, ordered), rounds=30, warmup_rounds=2)
    benchmark.extra_info["per_message_us"] = benchmark.stats.stats.median / BATCH * 1e6
    assert h.b.conn.counters["duplicates"] == 0 and h.a.conn.counters["retransmissions"] == 0


class _BareGlue:
    """Two connections joined directly, as tightly as an engine could join them."""

    def __init__(self) -> None:
        self.a = DeliveryConnection(fragment_size=fragment_room(1200))
        self.b = DeliveryConnection(fragment_size=fragment_room(1200))
        self.counter = 0

    def acknowledge(self, now: float) -> int:
        ack = self.b.build_ack(now)
        assert ack is not None
        return len(self.a.on_ack(*ack, now))

    def deliver(self, count: int, ordered: bool) -> None:
        a, b, now = self.a, self.b, 0.0
        payload = bytes(64)
        for _ in range(count):
            a.send("/bench", payload, reliable=True, ordered=ordered, now=now)
        delivered = confirmed = 0
        while fragments := a.poll_transmit(now, 16):
            counter = self.counter
            self.counter += 1
            a.on_packet_sent(counter, fragments, 1200, now)
            for f in fragments:
                delivered += len(b.on_fragment(counter, f.protocol, f.flags, f.request_id, f.seq,
                                               f.frag_index, f.frag_count, f.chunk, now))
            b.on_packet_received(counter, now)
            if b.ack_frame_due(now):
                confirmed += self.acknowledge(now)
        if b.ack_pending:
            confirmed += self.acknowledge(now)
        assert delivered == confirmed == count


@pytest.mark.parametrize("ordered", [False, True], ids=["unordered", "ordered"])
def test_reliable_64_bytes_core_only(benchmark: Any, ordered: bool) -> None:
    glue = _BareGlue()
    benchmark.group = "delivery core: reliable 64 B messages, bare glue"
    benchmark.pedantic(glue.deliver, args=(BATCH, ordered), rounds=30, warmup_rounds=2)
    benchmark.extra_info["per_message_us"] = benchmark.stats.stats.median / BATCH * 1e6


def test_reliable_one_mebibyte(benchmark: Any) -> None:
    h = DeliveryHarness(LOSSLESS)
    benchmark.group = "delivery core: one reliable 1 MiB message"
    benchmark.pedantic(_deliver, args=(h, [MAX_MESSAGE_PAYLOAD], False), rounds=10,
                       warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["MB_per_s"] = MAX_MESSAGE_PAYLOAD / median / 1e6
    assert h.b.conn.reassembly_bytes == 0
