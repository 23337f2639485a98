"""Deterministic impairment for sans-IO delivery tests: fake time, a lossy pipe, two ends.

Nothing here sleeps or opens a socket, so thousands of messages across minutes
of simulated loss and backoff run in a fraction of a second and reproduce
exactly from a seed:

* :class:`FakeClock` is the only time there is; the harness jumps it to the
  next event (a packet arrival or a connection deadline).
* :class:`LossyPipe` is one direction of a path with seeded loss, duplication,
  reordering and delay jitter.
* :class:`DeliveryHarness` joins two :class:`~msgnet.core.delivery.DeliveryConnection`
  objects the way the engine does (:class:`Endpoint` stands in for the engine
  of one side): poll fragments, coalesce them into packets of at most
  ``max_packet`` bytes with increasing counters, report each packet, carry
  DELIVERY_ACK fields in the first packet of a flush, and on arrival feed
  on_ack / on_fragment / on_packet_received.  The pipe may duplicate packets:
  unlike the engine, the harness has no replay window, so the core's own
  duplicate suppression is what gets tested.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from msgnet.core.delivery import (
    AckFields,
    Delivered,
    DeliveryConnection,
    DeliveryEvent,
    Fragment,
    ReassemblyBudget,
)
from msgnet.limits import (
    DATA_OVERHEAD,
    FLAG_FRAGMENT,
    FLAG_REQUEST,
    FLAG_RESPONSE,
    MAX_DATAGRAM,
    MAX_MESSAGE_PAYLOAD,
)

__all__ = [
    "DeliveryHarness",
    "Endpoint",
    "FakeClock",
    "Impairment",
    "LossyPipe",
    "WireFragment",
    "WirePacket",
    "fragment_room",
]

T = TypeVar("T")

FRAGMENT_HEADROOM = 28
"""Largest CONTINUATION overhead around a fragment's payload: type, length (3), alias,
flags, request_id (9), seq (9), frag_index and frag_count (2 each)."""


def fragment_room(max_packet: int) -> int:
    """The fragment_size that always fits one fragment in a ``max_packet`` DATA packet."""
    return max_packet - DATA_OVERHEAD - FRAGMENT_HEADROOM


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _fragment_frame_size(fragment: Fragment) -> int:
    """Bytes of the fragment as a CONTINUATION frame with a one-byte alias."""
    flags = fragment.flags
    body = 2 + _varint_size(fragment.seq) + len(fragment.chunk)
    if flags & (FLAG_REQUEST | FLAG_RESPONSE):
        body += _varint_size(fragment.request_id)
    if flags & FLAG_FRAGMENT:
        body += _varint_size(fragment.frag_index) + _varint_size(fragment.frag_count)
    return 1 + _varint_size(body) + body


def _ack_frame_size(ack: AckFields) -> int:
    body = sum(map(_varint_size, (ack.largest, ack.ack_delay_us, len(ack.ranges),
                                  ack.first_range)))
    body += sum(_varint_size(gap) + _varint_size(length) for gap, length in ack.ranges)
    return 1 + _varint_size(body) + body


class FakeClock:
    """Simulated monotonic time in seconds; only ever moves forward."""

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds

    def __call__(self) -> float:
        return self.now


@dataclass
class Impairment:
    """What a pipe does to each packet, every draw from its seeded generator.

    ``loss`` and ``duplicate`` are probabilities; each copy takes ``delay`` plus a
    uniform jitter in [0, ``jitter``], and with probability ``reorder`` up to
    ``reorder_delay`` more, so later packets overtake it.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.005
    jitter: float = 0.0
    reorder_delay: float = 0.02


class LossyPipe(Generic[T]):
    """One direction of a path: items go in at a time and come out when they arrive.

    ``impairment`` may be swapped at any time (a peer that dies mid-test).
    ``counters`` counts sent, lost, duplicated, reordered and delivered items.
    """

    def __init__(self, impairment: Impairment, rng: random.Random) -> None:
        self.impairment = impairment
        self.counters: Counter[str] = Counter()
        self._rng = rng
        self._heap: list[tuple[float, int, T]] = []
        self._order = 0  # FIFO among equal arrival times

    def send(self, item: T, now: float) -> None:
        imp, rng = self.impairment, self._rng
        self.counters["sent"] += 1
        if imp.loss and rng.random() < imp.loss:
            self.counters["lost"] += 1
            return
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            self.counters["duplicated"] += 1
        for _ in range(copies):
            arrival = now + imp.delay
            if imp.jitter:
                arrival += rng.uniform(0.0, imp.jitter)
            if imp.reorder and rng.random() < imp.reorder:
                arrival += rng.uniform(0.0, imp.reorder_delay)
                self.counters["reordered"] += 1
            heapq.heappush(self._heap, (arrival, self._order, item))
            self._order += 1

    def next_arrival(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def receive(self, now: float) -> list[T]:
        """Every item that has arrived by ``now``, in arrival order."""
        heap = self._heap
        out = []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        self.counters["delivered"] += len(out)
        return out


class WireFragment(NamedTuple):
    """A fragment as it crosses the wire: its fields and a copy of its bytes."""

    protocol: str
    flags: int
    request_id: int
    seq: int
    frag_index: int
    frag_count: int
    payload: bytes


class WirePacket(NamedTuple):
    """One DATA packet: counter, an optional DELIVERY_ACK (first frame), fragments."""

    counter: int
    ack: AckFields | None
    fragments: tuple[WireFragment, ...]


class Endpoint:
    """One side's engine stand-in: packetises what its connection polls, feeds what arrives.

    ``delivered`` collects the messages handed to the application, ``events``
    the connection's MessageDelivered/MessageFailed events.
    """

    def __init__(self, conn: DeliveryConnection, max_packet: int, max_fragments: int) -> None:
        self.conn = conn
        self.max_packet = max_packet
        self.max_fragments = max_fragments
        self.delivered: list[Delivered] = []
        self.events: list[DeliveryEvent] = []
        self.next_counter = 0

    def transmit(self, now: float) -> list[WirePacket]:
        """Flush: everything the connection lets out now, plus an ack when one is owed."""
        conn = self.conn
        packets: list[WirePacket] = []
        while True:
            fragments = conn.poll_transmit(now, self.max_fragments)
            ack = None
            if conn.ack_frame_due(now) or (fragments and conn.ack_pending):
                ack = conn.build_ack(now)
            if not fragments and ack is None:
                return packets
            self._packetise(fragments, ack, now, packets)
            if len(fragments) < self.max_fragments:
                return packets

    def _packetise(
        self, fragments: list[Fragment], ack: AckFields | None, now: float,
        packets: list[WirePacket],
    ) -> None:
        size = DATA_OVERHEAD + (_ack_frame_size(ack) if ack is not None else 0)
        current: list[Fragment] = []
        for fragment in fragments:
            frame = _fragment_frame_size(fragment)
            if (current or ack is not None) and size + frame > self.max_packet:
                self._emit(current, ack, size, now, packets)
                ack, current, size = None, [], DATA_OVERHEAD
            current.append(fragment)
            size += frame
        if current or ack is not None:
            self._emit(current, ack, size, now, packets)

    def _emit(
        self, fragments: list[Fragment], ack: AckFields | None, size: int, now: float,
        packets: list[WirePacket],
    ) -> None:
        counter = self.next_counter
        self.next_counter += 1
        self.conn.on_packet_sent(counter, fragments, size, now)
        packets.append(WirePacket(counter, ack, tuple(
            WireFragment(f.protocol, f.flags, f.request_id, f.seq, f.frag_index, f.frag_count,
                         bytes(f.chunk))
            for f in fragments
        )))

    def receive(self, packet: WirePacket, now: float) -> None:
        """What the engine does with an opened DATA packet, frame by frame."""
        conn = self.conn
        if packet.ack is not None:
            self.events.extend(conn.on_ack(*packet.ack, now))
        for fragment in packet.fragments:
            self.delivered.extend(conn.on_fragment(packet.counter, *fragment, now))
        conn.on_packet_received(packet.counter, now)

    def on_timer(self, now: float) -> None:
        deadline = self.conn.next_deadline()
        if deadline is not None and deadline <= now:
            self.events.extend(self.conn.handle_timer(now))


class DeliveryHarness:
    """Two connected DeliveryConnections, ``a`` and ``b``, over two seeded lossy pipes.

    ``forward`` carries a->b with ``impairment``; ``backward`` b->a with
    ``reverse`` (the same impairment if None).  The application side is the
    tests': ``h.a.conn.send(...)`` then :meth:`run` or :meth:`run_for`.
    """

    MAX_IDLE_ROUNDS = 10_000
    """Rounds at one instant before the harness calls it a livelock (a core bug)."""

    def __init__(
        self,
        impairment: Impairment | None = None,
        *,
        reverse: Impairment | None = None,
        seed: int = 0,
        max_packet: int = MAX_DATAGRAM,
        max_fragments: int = 64,
        max_message: int = MAX_MESSAGE_PAYLOAD,
        budget: ReassemblyBudget | None = None,
    ) -> None:
        impairment = impairment if impairment is not None else Impairment()
        rng = random.Random(seed)
        self.clock = FakeClock()
        self.forward: LossyPipe[WirePacket] = LossyPipe(impairment, random.Random(rng.random()))
        self.backward: LossyPipe[WirePacket] = LossyPipe(
            reverse if reverse is not None else impairment, random.Random(rng.random())
        )
        ends = []
        for _ in range(2):
            conn = DeliveryConnection(
                fragment_size=fragment_room(max_packet), max_datagram=max_packet,
                max_message=max_message, budget=budget,
            )
            ends.append(Endpoint(conn, max_packet, max_fragments))
        self.a, self.b = ends

    def _round(self) -> None:
        """Everything due at the current instant: arrivals, timers, then flushes."""
        now = self.clock.now
        for packet in self.forward.receive(now):
            self.b.receive(packet, now)
        for packet in self.backward.receive(now):
            self.a.receive(packet, now)
        self.a.on_timer(now)
        self.b.on_timer(now)
        for packet in self.a.transmit(now):
            self.forward.send(packet, now)
        for packet in self.b.transmit(now):
            self.backward.send(packet, now)

    def _next_event(self) -> float | None:
        times = [
            t for t in (
                self.forward.next_arrival(), self.backward.next_arrival(),
                self.a.conn.next_deadline(), self.b.conn.next_deadline(),
            ) if t is not None
        ]
        return min(times) if times else None

    def run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Run until ``until()`` holds (True) or ``timeout`` simulated seconds pass (False)."""
        end = self.clock.now + timeout
        idle = 0
        while True:
            self._round()
            if until():
                return True
            when = self._next_event()
            if when is None or when > end:
                self.clock.now = max(self.clock.now, end)
                return False
            if when <= self.clock.now:
                idle += 1
                if idle > self.MAX_IDLE_ROUNDS:
                    raise RuntimeError(f"livelock at t={self.clock.now}: a deadline never clears")
            else:
                idle = 0
                self.clock.now = when

    def step(self) -> None:
        """One round at the current instant, as the engine pumps after every send: while
        the window is open each message leaves in a packet of its own."""
        self._round()

    def run_for(self, seconds: float) -> None:
        """Run every event in the next ``seconds``; the clock ends exactly there."""
        self.run(lambda: False, seconds)
        self._round()

    def settle(self, timeout: float = 600.0) -> bool:
        """Run until nothing is in flight, queued or awaiting acknowledgement on either side."""
        return self.run(self.idle, timeout)

    def idle(self) -> bool:
        return all(
            not end.conn.transmit_pending and not end.conn.packets_in_flight
            and not end.conn.ack_pending
            for end in (self.a, self.b)
        ) and self.forward.next_arrival() is None and self.backward.next_arrival() is None
