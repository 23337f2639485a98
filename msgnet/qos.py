"""Delivery guarantees per send, and the glue between sessions and the delivery core.

Every send chooses its guarantee (docs/wire.md §3.6):

- :data:`BEST_EFFORT` (the default): one datagram or nothing; a message larger than one
  datagram is fragmented (at most 16 fragments) and arrives whole or not at all.
- :class:`Reliable`: delivered exactly once unless the peer is declared unreachable;
  ``Reliable(ordered=True)`` also keeps send order per protocol; ``wait=True`` makes
  ``send_message`` return only once the peer acknowledged every fragment.

:class:`DeliveryManager` keeps one sans-IO :class:`~msgnet.core.delivery.DeliveryConnection`
per session that has used the delivery layer, feeds it from the engine's hooks and a timer,
and turns its events into completed or failed futures.  Sessions that only ever carry
single-datagram best-effort messages never create one, so they pay nothing for it.

The per-message paths skip this glue where it adds nothing: the connection is also
``session.delivery``, so the engine hands it received SEQ frames itself
(DeliveryConnection.receive) and delivers what it returns; a reliable send nobody waits
for is one call into this module (:meth:`DeliveryManager.send_reliable_nowait`) and one
positional call into the core (DeliveryConnection.send_nowait), which then makes no
MessageDelivered event. Compiled, this module is typed by qos.pxd: the per-message and
per-packet methods reach the session, engine and core by C calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import limits
from ._engine import PMTU_IDLE, PMTU_SEARCHING
from ._frame import DeliveryAck, encode_frame
from .core.delivery import (
    DeliveryConnection,
    Fragment,
    MessageDelivered,
    MessageFailed,
    OutgoingMessage,
    ReassemblyBudget,
)
from .errors import MessageTooLargeError, MsgnetError, UsageError

if TYPE_CHECKING:
    from ._engine import SendRoute, Session, UdpEngine

__all__ = ["BEST_EFFORT", "BestEffort", "QoS", "Reliable", "DeliveryManager"]

# A pump sends what the window lets out in bursts of about _BURST_BYTES of fragments, one
# sendmmsg each: 56 packets of 1200 bytes, 8 of 9000, one of 65000. Bounded in bytes, not
# fragments, so that a burst of small messages fills its packets (only its last is short).
_BURST_BYTES = 64 * 1024
_BURST_FRAGMENTS = _BURST_BYTES  # (no bound of its own: a fragment costs more than a byte)
_DATA_OVERHEAD = limits.DATA_OVERHEAD  # (a C constant where compiled: read once per packet)
_PMTU_IDLE = PMTU_IDLE  # C constants where compiled, as _DATA_OVERHEAD
_PMTU_SEARCHING = PMTU_SEARCHING


@dataclass(frozen=True, slots=True)
class BestEffort:
    """At most once; never retransmitted."""


@dataclass(frozen=True, slots=True)
class Reliable:
    """Exactly once (``ordered``: in send order per protocol), retransmitted until acknowledged.

    ``wait``: ``send_message`` returns when the peer has acknowledged the message (or raises
    ``PeerUnreachableError`` when it fails), instead of when it is queued; ``timeout`` bounds
    that wait (``RequestTimeoutError``; the message may still be delivered later).
    """

    ordered: bool = False
    wait: bool = False
    timeout: float | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError("Reliable timeout must be positive")


QoS = BestEffort | Reliable
BEST_EFFORT = BestEffort()


def fragment_size(max_datagram: int, protocol: str) -> int:
    """Payload room of one fragment on ``protocol``, sent as INIT in the worst case."""
    return max_datagram - _fragment_overhead(protocol)


def _fragment_overhead(protocol: str) -> int:
    """What a datagram holds besides a fragment's payload on ``protocol``: the packet's header
    and tag, and the frame's header as INIT (the worst case)."""
    return limits.DATA_OVERHEAD + limits.FRAGMENT_INIT_OVERHEAD + len(protocol.encode())


class DeliveryManager:
    """Per-session delivery cores, driven by engine hooks and one timer per active session.

    Fragments are cut to the session's datagram size (Session.datagram_size), which PMTU
    discovery may raise (docs/wire.md 5.1): ``on_large(session)``, when given, is called for
    a message larger than a session that has not searched yet can carry in one datagram."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_datagram: int,
                 max_message: int = limits.MAX_MESSAGE_PAYLOAD,
                 on_large: Callable[[Session], None] | None = None) -> None:
        self._loop = loop
        self._max_datagram = max_datagram  # the largest any session's datagram may become
        self._max_message = max_message
        self._on_large = on_large
        self._budget = ReassemblyBudget()
        self._conns: dict[Session, tuple[DeliveryConnection, UdpEngine]] = {}
        # One timer per session with delivery state: (handle, its deadline).
        self._timers: dict[Session, tuple[asyncio.Handle, float]] = {}
        self._waiters: dict[OutgoingMessage, asyncio.Future[None]] = {}
        self._overheads: dict[str, int] = {}  # per protocol (_overhead_for)
        # The protocol send_reliable_nowait asked _overhead_for last, and its overhead:
        # senders pass the same str object message after message.
        self._overhead_protocol: str | None = None
        self._overhead_last = 0
        # Sessions to pump once the loop iteration's sends, acks and receptions are in: every
        # message, ack and window opening of one iteration shares packets (DESIGN §2: the
        # engine coalesces its best-effort frames per iteration the same way).
        self._pending: dict[Session, None] = {}
        self._scheduled: Session | None = None  # the session last added to _pending
        # Senders waiting for a session's outstanding bytes to fall (back-pressure).
        self._room_waiters: dict[Session, list[asyncio.Future[None]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._now = 0.0  # the clock when schedule() last ran: this iteration's if pending
        self._route: SendRoute | None = None  # bind_route
        self._held: dict[Session, Any] = {}

    # -- sending ---------------------------------------------------------------------

    def send(self, session: Session, engine: UdpEngine, protocol: str, data: bytes, qos: QoS,
             flags_extra: int = 0, request_id: int = 0) -> asyncio.Future[None] | None:
        """Queue a message that needs the delivery layer; returns a future when waiting."""
        reliable = type(qos) is Reliable or isinstance(qos, Reliable)
        ordered = reliable and qos.ordered  # type: ignore[union-attr]
        handle = self._send(session, engine, protocol, data, reliable, ordered, flags_extra,
                            request_id)
        future = None
        if reliable and qos.wait:  # type: ignore[union-attr]
            future = self._loop.create_future()
            future.add_done_callback(_retrieve)  # a caller that timed out no longer awaits it
            self._waiters[handle] = future
        return future

    def send_reliable_nowait(self, session: Session, engine: UdpEngine, protocol: str,
                             data: bytes, ordered: bool) -> bool:
        """send() of ``Reliable(ordered=ordered)`` that nobody waits for, the per-message path
        (MessageNetwork.send_reliable_nowait): one positional call into the core, no handle,
        no MessageDelivered event. False, with nothing queued, when the session sends on a
        stream (no delivery layer there) or its outstanding bytes are at
        MAX_OUTSTANDING_PER_SESSION: the caller then awaits send_message. Raises what send()
        raises.

        Compiled (qos.pxd), each step is a C call: the clock is read once per loop
        iteration (schedule), not per message."""
        if session.stream is not None and session.sends_on_stream:
            return False  # (no stream, the common case: a pointer comparison)
        conn = session.delivery
        if conn is None:
            conn = self._conn(session, engine)
        if protocol is self._overhead_protocol:
            room = session.datagram_size - self._overhead_last
        else:
            overhead = self._overhead_for(protocol)
            self._overhead_protocol = protocol
            self._overhead_last = overhead
            room = session.datagram_size - overhead
        self._search_if_large(session, data, room)
        if session is not self._scheduled and session not in self._pending:
            self.schedule(session)
        return conn.send_nowait(protocol, data, ordered, room, self._now)

    def bind_route(self, route: SendRoute, held: dict[Session, Any]) -> None:
        """The network's SendRoute and the sessions its stream recovery holds (their ordered
        messages wait for a resume): what send_routed finds sessions with."""
        self._route = route
        self._held = held

    def send_routed(self, peer_id: Any, protocol: str, data: bytes, ordered: bool) -> int:
        """send_reliable_nowait to the session the bound route has for peer_id, in one C
        call: 1 if queued; 0 if not (full, on a stream, or ordered while the stream recovery
        holds the session): then await send_message; -1 if the route has no session for the
        peer or none is bound (the network's general path)."""
        if self._route is None:
            return -1
        session = self._route.session_of(peer_id)
        if session is None:
            return -1
        if ordered and session in self._held:
            return 0
        return 1 if self.send_reliable_nowait(session, session.engine, protocol, data,
                                              ordered) else 0

    def _send(self, session: Session, engine: UdpEngine, protocol: str, data: bytes,
              reliable: bool, ordered: bool, flags_extra: int,
              request_id: int) -> OutgoingMessage:
        overhead = self._overhead_for(protocol)
        if not reliable and len(data) > limits.max_best_effort_payload(len(protocol.encode())):
            # The same bound on every path (docs/wire.md 5.1), whatever this one carries (the
            # engine applies it to single datagrams).
            raise MessageTooLargeError(
                f"best-effort message of {len(data)} bytes needs more than "
                f"{limits.MAX_BEST_EFFORT_FRAGMENTS} fragments of a {limits.MAX_DATAGRAM}-byte "
                "datagram")
        room = session.datagram_size - overhead
        self._search_if_large(session, data, room)
        entry = self._conns.get(session)
        conn = entry[0] if entry is not None else self._conn(session, engine)
        handle = conn.send(protocol, data, reliable=reliable, ordered=ordered,
                           flags_extra=flags_extra, request_id=request_id,
                           now=self._loop.time(), fragment_size=room)
        if session not in self._pending:
            self.schedule(session)
        return handle

    def _overhead_for(self, protocol: str) -> int:
        """Per protocol: a fragment sent as INIT (the alias not yet bound) must fit a
        datagram, of the base size at least."""
        overhead = self._overheads.get(protocol)
        if overhead is None:
            overhead = _fragment_overhead(protocol)
            if overhead >= limits.MAX_DATAGRAM:
                raise UsageError(f"protocol id {protocol!r} leaves no room in a datagram")
            if len(self._overheads) < 4096:
                self._overheads[protocol] = overhead
        return overhead  # type: ignore[no-any-return]

    def _search_if_large(self, session: Session, data: bytes, room: int) -> None:
        """A message larger than ``room`` (one datagram's fragment room), before the session
        searched for larger datagrams: start the search (on_large)."""
        if session.pmtu_state != _PMTU_IDLE or len(data) <= room:
            return
        session.pmtu_state = _PMTU_SEARCHING  # asked once, whatever on_large does
        if self._on_large is not None:
            self._on_large(session)

    def set_datagram_size(self, session: Session, size: int) -> None:
        """PMTU discovery found the session's path carries ``size``-byte datagrams: the
        messages queued from now on are cut to it (docs/wire.md 5.1)."""
        session.engine.set_datagram_size(session, size)
        entry = self._conns.get(session)
        if entry is not None:
            entry[0].set_datagram_size(size)

    def room_waiter(self, session: Session) -> asyncio.Future[None] | None:
        """None while session holds less than MAX_OUTSTANDING_PER_SESSION bytes of unfinished
        messages (docs/wire.md §3.6), the common case; else a future that completes when
        acknowledgements bring it under half of that, or the session ends (then the caller
        looks up the peer's session again)."""
        entry = self._conns.get(session)
        if entry is None or entry[0].outstanding_bytes < limits.MAX_OUTSTANDING_PER_SESSION:
            return None
        future = self._loop.create_future()
        self._room_waiters.setdefault(session, []).append(future)
        return future

    def _wake_room(self, session: Session, conn: DeliveryConnection | None) -> None:
        if conn is not None and conn.outstanding_bytes > limits.MAX_OUTSTANDING_PER_SESSION // 2:
            return
        for future in self._room_waiters.pop(session, ()):
            if not future.done():
                future.set_result(None)

    def _conn(self, session: Session, engine: UdpEngine) -> DeliveryConnection:
        entry = self._conns.get(session)
        if entry is None:
            conn = DeliveryConnection(
                fragment_size=fragment_size(self._max_datagram, ""),
                max_datagram=session.datagram_size,
                max_message=self._max_message,
                budget=self._budget,
            )
            entry = self._conns[session] = (conn, engine)
            session.delivery = conn  # the engine hands it received SEQ frames itself
        return entry[0]

    def schedule(self, session: Session) -> None:
        """Pump ``session`` at the end of this loop iteration (see __init__)."""
        self._pending[session] = None
        self._scheduled = session
        self._now = self._loop.time()
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        pending, self._pending = self._pending, {}
        self._scheduled = None
        for session in pending:
            entry = self._conns.get(session)
            if entry is not None:
                self._pump(session, entry[0], entry[1])

    def _pump(self, session: Session, conn: DeliveryConnection, engine: UdpEngine) -> None:
        """Send what the core lets out now, as packets of their own: an ack, then fragments.

        Sequenced frames do not share packets with the engine's best-effort traffic, so each
        packet the core hears about (on_packet_sent) is one it built, and acknowledgements
        name only packets that carried delivery-layer frames.
        """
        if not session.established or (session.initiator and not session.last_received):
            return  # until the responder confirmed the session; session_established() pumps
        now = self._loop.time()
        ack = None
        if conn.ack_pending or conn.ack_frame_due(now):
            ack = _ack_frame(conn, now)
        room = session.datagram_size - _DATA_OVERHEAD
        # Fragments go out a burst at a time (one sendmmsg each), so the peer decrypts the
        # first burst while this side seals the next: one window sealed whole before the
        # first send would leave the peer idle for all of it.
        unsent = 0  # bytes sealed since the last sendmmsg
        while conn.transmit_pending:
            fragments = conn.poll_transmit(now, _BURST_FRAGMENTS, _BURST_BYTES)
            if not fragments:
                break
            payloads, carried = engine.pack_message_frames(session, fragments, ack or b"",
                                                           room)
            ack = None
            for i in range(len(payloads)):
                self._send_packet(session, conn, engine, payloads[i], carried[i], now)
                unsent += len(payloads[i])
            if unsent >= _BURST_BYTES:
                engine.drain_sealed()
                unsent = 0
        if ack is not None:
            self._send_packet(session, conn, engine, ack, [], now)
        engine.drain_sealed()
        self._arm(session, conn)
        if self._room_waiters and session in self._room_waiters:
            self._wake_room(session, conn)

    def _send_packet(self, session: Session, conn: DeliveryConnection, engine: UdpEngine,
                     payload: bytes, carried: list[Fragment], now: float) -> None:
        counter = engine.send_payload(session, payload, False)
        conn.on_packet_sent(counter, carried, len(payload) + _DATA_OVERHEAD, now)

    def session_established(self, session: Session) -> None:
        """The session is up (responder: keys in; initiator: confirmed): send what waited."""
        entry = self._conns.get(session)
        if entry is not None:
            self._pump(session, entry[0], entry[1])

    # -- engine hooks ----------------------------------------------------------------

    def fragment_received(self, session: Session, counter: int, protocol: str, flags: int,
                          request_id: int, seq: int, frag_index: int, frag_count: int,
                          data: bytes) -> None:
        """The engine's handle_fragment hook (the network passes it on as it is): only for
        a session's first SEQ frame, before session.delivery is set; later ones go from the
        engine to the core directly."""
        entry = self._conns.get(session)
        engine = session.engine
        conn = entry[0] if entry is not None else self._conn(session, engine)
        delivered = conn.on_fragment(counter, protocol, flags, request_id, seq, frag_index,
                                     frag_count, data, self._loop.time())
        if delivered:
            deliver = engine.deliver
            for message in delivered:
                deliver(session, message.protocol, message.flags, message.request_id,
                        message.payload)

    def packet_received(self, session: Session, counter: int, acknowledge: bool) -> None:
        entry = self._conns.get(session)
        if entry is None:
            return
        conn = entry[0]
        now = self._loop.time()
        conn.on_packet_received(counter, now, acknowledge)
        if conn.ack_frame_due(now):
            # Out once this iteration's datagrams are in: one ack for all of them, with
            # any fragments (RFC 9000 13.2.1 lets an ack wait for the batch).
            self.schedule(session)
        elif session not in self._pending:
            self._arm(session, conn)

    def ack_received(self, session: Session, largest: int, ack_delay_us: int,
                     first_range: int, ranges: tuple[tuple[int, int], ...]) -> None:
        """A DELIVERY_ACK's fields, as the engine decoded them (wire.md 3.5)."""
        entry = self._conns.get(session)
        if entry is None:
            return  # nothing in flight: an ack for nothing is harmless
        conn = entry[0]
        events = conn.on_ack(largest, ack_delay_us, first_range, ranges, self._loop.time())
        self._settle(events)
        # What the window lets out now, at once: this runs inside the engine's receive batch,
        # whose end sends every packet sealed meanwhile in one sendmmsg (GSO where it can).
        self._pump(session, conn, entry[1])

    def close_session(self, session: Session, error: BaseException) -> None:
        self._pending.pop(session, None)
        if self._scheduled is session:
            self._scheduled = None
        entry = self._conns.pop(session, None)
        if entry is not None:
            session.delivery = None
        timer = self._timers.pop(session, None)
        if timer is not None:
            timer[0].cancel()
        if entry is not None:
            self._settle(entry[0].close(error))  # type: ignore[arg-type]
        self._wake_room(session, None)  # the send that waited fails on the closed session

    def close(self, error: BaseException) -> None:
        """The host is closing: acknowledge what arrived (the peer would otherwise wait
        MAX_RETRANSMISSIONS timeouts and fail messages we did receive), then fail what is
        outstanding."""
        now = self._loop.time()
        for session, (conn, engine) in list(self._conns.items()):
            if conn.ack_pending and session.established:
                ack = _ack_frame(conn, now)
                if ack is not None:
                    try:
                        self._send_packet(session, conn, engine, ack, [], now)
                        engine.drain_sealed()
                    except MsgnetError:
                        pass  # the session went first: nothing to acknowledge on
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for session in list(self._conns):
            self.close_session(session, error)

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {"reassembly_bytes": self._budget.used}
        for conn, _ in self._conns.values():
            for name, value in conn.counters.items():
                total[name] = total.get(name, 0) + value
        return total

    def connection(self, session: Session) -> DeliveryConnection | None:
        entry = self._conns.get(session)
        return entry[0] if entry is not None else None

    # -- timers and events -------------------------------------------------------------

    def _arm(self, session: Session, conn: DeliveryConnection) -> None:
        """Have _on_timer run by the core's next deadline. A timer already due no later is
        kept, even when nothing is due any more: it wakes early, finds nothing to do and
        re-arms (_on_timer pumps). Moving it on every acknowledgement cost a cancel and a
        call_at each, about 8,000 instructions a pump; an early wake-up happens at most
        once per deadline it outlived."""
        deadline = conn.next_deadline()
        entry = self._timers.get(session)
        if entry is not None:
            if deadline is None or entry[1] <= deadline:
                return
            entry[0].cancel()
        if deadline is not None:
            handle = self._loop.call_at(deadline, self._on_timer, session)
            self._timers[session] = (handle, deadline)

    def _on_timer(self, session: Session) -> None:
        self._timers.pop(session, None)
        entry = self._conns.get(session)
        if entry is None:
            return
        conn, engine = entry
        now = self._loop.time()
        self._settle(conn.handle_timer(now))
        self._pump(session, conn, engine)

    def _settle(self, events: list[Any]) -> None:
        if not self._waiters:
            return  # events only complete futures: the common case has none
        for event in events:
            if isinstance(event, MessageDelivered):
                future = self._waiters.pop(event.message, None)
                if future is not None and not future.done():
                    future.set_result(None)
            elif isinstance(event, MessageFailed):
                future = self._waiters.pop(event.message, None)
                if future is not None and not future.done():
                    future.set_exception(event.error)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _ack_frame(conn: DeliveryConnection, now: float) -> bytes | None:
    fields = conn.build_ack(now)
    if fields is None:
        return None
    return encode_frame(DeliveryAck(*fields))
