"""The delivery layer (docs/wire.md section 3.6) as a sans-IO core.

One :class:`DeliveryConnection` per session carries both directions of the
SEQ messages: fragmented best effort, reliable and reliable-ordered.  It owns
sequence numbers, fragmentation, reassembly, duplicate suppression,
acknowledgements, loss detection, RTT estimation, retransmission timers and
NewReno congestion control.  It never touches a socket, a clock or a random
source: the engine passes ``now`` (monotonic seconds) into every call, asks
:meth:`DeliveryConnection.next_deadline` when to call
:meth:`DeliveryConnection.handle_timer`, and does all encoding, coalescing and
encryption itself.

How the engine drives it
------------------------

Sending (per session)::

    handle = conn.send(protocol, payload, reliable=..., ordered=..., now=now)
    # or, for a reliable message nobody awaits (no handle, no MessageDelivered event):
    queued = conn.send_nowait(protocol, payload, ordered, fragment_size, now)
    # whenever the session is flushed (after input, after send, after a timer):
    fragments = conn.poll_transmit(now, max_fragments, max_bytes)
    # encode each Fragment as INIT/CONTINUATION with its flags, request_id, seq and,
    # when FLAG_FRAGMENT is set, frag_index/frag_count; coalesce into packets; then
    # for EVERY DATA packet of the session (also those without fragments):
    conn.on_packet_sent(counter, fragments_in_that_packet, packet_size, now)

Receiving, for each DATA packet that opened (after the replay check)::

    events = conn.on_ack(*delivery_ack_fields, now)           # per DELIVERY_ACK frame
    delivered = conn.on_fragment(counter, protocol, flags, request_id, seq,
                                 frag_index, frag_count, payload, now)   # per SEQ message
    # (or conn.receive(...), the same without a list and a Delivered in the common case)
    conn.on_packet_received(counter, now, acknowledge=...)    # once, after all frames

then ``conn.ack_frame_due(now)`` says an ack must go out now (alone if need be);
``conn.ack_pending`` says one should ride along if a packet goes out anyway; in
both cases ``conn.build_ack(now)`` gives the DELIVERY_ACK fields.  Timers:
``conn.handle_timer(now)`` at ``conn.next_deadline()``, then the same ack and
poll_transmit checks.  When the session ends, ``conn.close()`` fails what is
outstanding and returns the session's reassembly memory to the host budget.

Reliability rests on one rule: a packet is acknowledged only if every reliable
fragment in it was either accepted or is a duplicate of one accepted before.
:meth:`~DeliveryConnection.on_fragment` vetoes the acknowledgement of its
packet when it drops a reliable fragment for memory or window reasons, and the
engine does the same (``acknowledge=False``) when it drops a reliable frame
itself (unknown alias); the sender then retransmits, and duplicates are
suppressed by sequence number.

Counters (:attr:`DeliveryConnection.counters`):

================  ==============================================================
retransmissions   fragments handed out again after their packet was lost
lost_packets      in-flight packets declared lost (threshold or timeout)
spurious          packets acknowledged after they were declared lost (reordering, late acks)
undone            congestion reductions undone: every packet they declared lost was spurious
timeouts          retransmission timer expiries
probes            tail probes sent (no acknowledgement for a PTO, before the timeout)
failed            messages failed (PeerUnreachableError, or close())
acks_received     DELIVERY_ACK frames processed
acks_sent         DELIVERY_ACK frames built
bad_ack           DELIVERY_ACK with ranges below counter 0 (those are ignored), or with
                  fields no decoded frame holds (ignored whole)
ack_unsent        DELIVERY_ACK for a counter never sent: ignored
duplicates        fragment or message already received: dropped, acknowledged
bad_fragment      fragment inconsistent with its message or the limits: dropped
reassembly_full   fragment beyond a memory bound: dropped (reliable: unacknowledged)
seq_window        ordered seq beyond the window: dropped unacknowledged
window_slides     unordered window moved up by a seq beyond it (see below)
expired           best-effort reassembly abandoned after its timeout
================  ==============================================================

Interpretations of wire.md 3.6 (reported upstream)
--------------------------------------------------

* Fragmented best effort shares the unordered sequence space with reliable
  messages, so a lost best-effort message is a permanent gap: a window "above
  the lowest missing seq" would stop for good 4096 messages later.  Here the
  *sender* never hands out a seq at or beyond (its oldest unacknowledged
  reliable seq in that space) + SEQ_WINDOW.  A seq ``s`` beyond the receiver's
  unordered window therefore proves every reliable seq up to ``s - SEQ_WINDOW``
  was received, and the window slides up to it instead of dropping ``s``.
  Ordered spaces have no permanent gaps and keep the wire's rule: beyond the
  window is dropped unacknowledged (``seq_window``).
* Reassembly memory is reserved for the whole message when its first fragment
  arrives, so an admitted message can always complete, and the last
  ``_HEAD_ROOM`` bytes of each bound are kept for the message an ordered space
  waits for: out-of-order messages held for ordering cannot starve the one that
  releases them.
* A packet that completes a fragmented reliable message is acknowledged at once
  rather than up to MAX_ACK_DELAY later (wire.md sets only the latest time): its
  sender may be awaiting exactly that acknowledgement (``Reliable(wait=True)``),
  and on a fast path the delay would be most of the transfer's time.
* A tail probe precedes the retransmission timeout (wire.md 3.6): with nothing
  acknowledged for a PTO (RFC 9002 6.2, no MIN_RTO floor) after the last reliable
  send or acknowledgement, one packet may go beyond the window: queued fragments,
  or the newest in-flight packet's again.  On a fast path the floor of 200 ms
  otherwise stalls the flow every time the one ack of a small window is lost.
* On a retransmission timeout every in-flight packet is deemed lost (RFC 6298
  5.4-5.6 with SACK), the window drops to ``MIN_WINDOW`` and the timer backs
  off.  The timeouts counted are the consecutive ones (the backoff resets on any
  new acknowledgement, as pto_count does in RFC 9002 6.2.1): after
  ``MAX_RETRANSMISSIONS`` of them with nothing acknowledged the peer is
  unreachable and every outstanding reliable message fails.  Counting per message
  instead would fail a long message that is still making progress under heavy
  loss.  A failed message may still have been delivered once; it is never
  delivered twice.
* Packets declared lost are remembered for 3 RTO: a late acknowledgement
  (reordering) still completes their fragments (``spurious``), so a queued
  retransmission of them is skipped.
* Loss detection adapts to reordering (wire.md 3.6; RFC 9002 6.1 allows it, and
  QUIC stacks and TCP RACK do it): a packet declared lost by a threshold and
  acknowledged later raises the packet threshold to the reordering it showed
  (the largest counter acknowledged before it, minus it, plus one) and the time
  threshold 1 + 2**-k RTT (k from 3 down to 0) until that packet would have been
  in time.  Both only rise, for the session's life: a path that reordered once
  will again, and the retransmission timer still bounds a real loss.
* Congestion episodes can be undone: the window, slow-start threshold and
  recovery point from before an episode's reduction are kept with the counters it
  declared lost (a timeout within the recovery of an episode joins it).  When the
  last of those counters is acknowledged late, no packet was lost: the window and
  threshold return to at least what they were (RFC 4015's response).  Without
  this, jitter of a fraction of the RTT keeps the window at MIN_WINDOW.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple, TypeVar

try:
    import cython  # type: ignore[import-untyped]
except ImportError:  # running uncompiled without Cython installed: the decorators do nothing
    from types import SimpleNamespace

    def _keep(_flag: bool) -> object:
        return lambda function: function

    cython = SimpleNamespace(cclass=lambda cls: cls, no_gc=lambda cls: cls,
                             boundscheck=_keep, wraparound=_keep)

from msgnet.errors import ClosedError, MessageTooLargeError, PeerUnreachableError, UsageError
from msgnet.limits import (
    FLAG_FRAGMENT,
    FLAG_ORDERED,
    FLAG_RELIABLE,
    FLAG_REQUEST,
    FLAG_RESPONSE,
    FLAG_SEQ,
    MAX_ACK_RANGES,
    MAX_DATAGRAM,
    MAX_DATAGRAM_CEILING,
    MAX_FRAGMENTS,
    MAX_MESSAGE_PAYLOAD,
)

# --- constants ---------------------------------------------------------------------------
# Delivery limits named by docs/wire.md 3.6 (defined in msgnet.limits with the others).
from msgnet.limits import (
    INITIAL_RTO,
    INITIAL_WINDOW,
    MAX_ACK_DELAY,
    MAX_BEST_EFFORT_FRAGMENTS,
    MAX_BEST_EFFORT_REASSEMBLIES,
    MAX_OUTSTANDING_PER_SESSION,
    MAX_REASSEMBLY_PER_SESSION,
    MAX_REASSEMBLY_TOTAL,
    MAX_RETRANSMISSIONS,
    MAX_RTO,
    MIN_RTO,
    MIN_WINDOW,
    REPLAY_WINDOW,
    SEQ_WINDOW,
)

try:
    from msgnet._buffer import finish as _finish_buffer
    from msgnet._buffer import new_buffer as _new_buffer
    from msgnet._buffer import write as _write_buffer
except ImportError:  # built without extensions: a bytearray, and one more copy at the end

    def _new_buffer(capacity: int) -> bytes:
        return bytearray(capacity)  # type: ignore[return-value]  # filled in place, like it

    def _write_buffer(buffer: bytes, offset: int, data: Buffer) -> None:
        buffer[offset:offset + len(data)] = data  # type: ignore[index]

    def _finish_buffer(buffer: bytes, size: int) -> bytes:
        return bytes(memoryview(buffer)[:size])


PACKET_THRESHOLD = 3
"""RFC 9002 kPacketThreshold: lost when this many later packets were acknowledged (the
initial value; it grows with the reordering observed, see _adapt_thresholds)."""
MAX_PACKET_THRESHOLD = REPLAY_WINDOW
"""The packet threshold never grows beyond the receiver's replay window: a packet
overtaken by more than that is dropped as a replay anyway."""
TIME_THRESHOLD = 9 / 8
"""RFC 9002 kTimeThreshold: lost when older than this many RTTs and a later one was acked
(the initial value: 1 + 2**-REORDER_SHIFT)."""
REORDER_SHIFT = 3
"""The time threshold is 1 + 2**-shift RTTs; the shift starts here (9/8) and goes down to
0 (2 RTTs) as spurious losses show later arrivals (RFC 9002 6.1.2 allows adaptive
thresholds)."""
GRANULARITY = 0.001
"""RFC 9002 kGranularity: the smallest timer interval worth scheduling."""
INITIAL_RTT = 0.333
"""RFC 9002 kInitialRtt: the loss delay's RTT before the first sample."""
BEST_EFFORT_TIMEOUT = 2.0
"""A best-effort reassembly is abandoned after max(this, 3 RTO) (wire.md 3.6)."""

_FRAGMENT_OVERHEAD = 16
"""Estimated frame header bytes of one fragment, to charge handed-out fragments to the
window until on_packet_sent reports the real packet size."""
_PER_FRAGMENT_COST = 48
"""Reassembly memory charged per fragment beyond its payload, though its bytes go straight
into the message's one buffer: keeps floods of tiny fragments, each a unit of work, honest."""
_PER_MESSAGE_COST = 256
"""Reassembly memory charged per message (its bookkeeping objects)."""
_SENT_MESSAGE_COST = 320
"""Sender memory charged per message beyond its payload (wire.md 3.6): its objects (one
Fragment for a message of one fragment), unacked entry and queue slot, measured at 162 bytes
on CPython 3.11 (see tests/test_delivery.py; 274 when every message had an OutgoingMessage
and a Fragment)."""
_HEAD_ROOM = (
    MAX_MESSAGE_PAYLOAD + MAX_DATAGRAM_CEILING + MAX_FRAGMENTS * _PER_FRAGMENT_COST
    + _PER_MESSAGE_COST
)
"""Charge of the largest message: the part of every memory bound that only the message an
ordered space waits for may use, so held later messages cannot deadlock it."""

_KIND = FLAG_REQUEST | FLAG_RESPONSE
_INF = math.inf

Buffer = bytes | bytearray | memoryview

__all__ = [
    "AckFields",
    "Delivered",
    "DeliveryConnection",
    "DeliveryEvent",
    "Fragment",
    "MessageDelivered",
    "MessageFailed",
    "OutgoingMessage",
    "ReassemblyBudget",
]


# --- values exchanged with the engine ----------------------------------------------------


class Delivered(NamedTuple):
    """A whole received message, ready for the application (exactly once)."""

    protocol: str
    flags: int
    request_id: int
    payload: bytes


class AckFields(NamedTuple):
    """The fields of a DELIVERY_ACK frame (wire.md 3.5), ready for the frame codec."""

    largest: int
    ack_delay_us: int
    first_range: int
    ranges: tuple[tuple[int, int], ...]


class MessageDelivered(NamedTuple):
    """Every fragment of a reliable message was acknowledged by the peer."""

    message: OutgoingMessage


class MessageFailed(NamedTuple):
    """A message will not be confirmed: ``error`` is PeerUnreachableError (or close()'s)."""

    message: OutgoingMessage
    error: Exception


DeliveryEvent = MessageDelivered | MessageFailed

_new = tuple.__new__
"""Makes the NamedTuples above per message without their Python-level __new__ (a frame each)."""


@cython.no_gc  # never in a reference cycle (see Fragment): freed by refcounting alone
@cython.cclass
class OutgoingMessage:
    """The handle :meth:`DeliveryConnection.send` returns.

    ``done`` turns True when the message is finished: for a reliable message when
    every fragment was acknowledged (``error`` None, a :class:`MessageDelivered`
    event) or when it failed (``error`` set, a :class:`MessageFailed` event); for
    fragmented best effort when its last fragment was handed out by poll_transmit
    (nothing is ever confirmed, so no event).  ``queued_at`` is the ``now`` given to
    send(), for the engine's latency accounting and send timeouts.  ``notify`` is False
    for messages sent by send_nowait: nobody awaits them, so they make no
    MessageDelivered event (failures still do).  Made by the core (_outgoing_message),
    never by the application.
    """

    protocol: str
    seq: int
    flags: int
    request_id: int
    size: int
    frag_count: int
    queued_at: float
    done: bool
    error: Exception | None
    notify: bool
    _unacked: int

    __slots__ = (
        "protocol",
        "seq",
        "flags",
        "request_id",
        "size",
        "frag_count",
        "queued_at",
        "done",
        "error",
        "notify",
        "_unacked",
    )

    @property
    def reliable(self) -> bool:
        return bool(self.flags & FLAG_RELIABLE)

    @property
    def ordered(self) -> bool:
        return bool(self.flags & FLAG_ORDERED)

    def __repr__(self) -> str:
        state = "failed" if self.error else "done" if self.done else "pending"
        return (
            f"<OutgoingMessage {self.protocol!r} seq={self.seq} flags=0x{self.flags:02x} "
            f"size={self.size} fragments={self.frag_count} {state}>"
        )


@cython.no_gc
@cython.cclass
class Fragment(OutgoingMessage):
    """One fragment to send: the wire fields of one INIT/CONTINUATION message.

    The object itself is the token the core tracks: the engine hands back the same
    objects to :meth:`DeliveryConnection.on_packet_sent`, and a lost fragment comes
    out of poll_transmit again, unchanged (same seq and frag_index).  Its bytes are
    ``_length`` bytes of the message's payload from ``_offset`` (``chunk``: the payload
    itself for a message of one fragment, else a memoryview of the part): the engine
    writes them from there, so no object per fragment holds the slice.  Without
    FLAG_FRAGMENT, frag_index/frag_count are 0/1 and are not written.  Made by the core
    (_fragment, _single).

    A message of one fragment, nearly every small message, is its own fragment: one
    object per message instead of two (``message`` is then the fragment itself, and
    the fields an OutgoingMessage adds are its own).  A fragment of a larger message
    refers to that message, and those fields go unused.

    The fragment, not its message, refers to the sequence space: space -> message
    (``unacked``) is then the only link between them and no cycle holds either
    object (a whole message is its own fragment without referring to itself), so
    compiled, neither is tracked by the garbage collector (``no_gc``): a session may
    hold a hundred thousand queued messages, and every full collection would
    otherwise walk them all.
    """

    _message: OutgoingMessage | None
    frag_index: int
    _payload: bytes
    _offset: int
    _length: int
    acked: bool
    queued: bool
    _space: _OutSpace
    cost: int

    __slots__ = ("_message", "frag_index", "_payload", "_offset", "_length", "acked", "queued",
                 "_space", "cost")

    @property
    def message(self) -> OutgoingMessage:
        """The message this is a fragment of (itself for a message of one fragment)."""
        return _message_of(self)

    @property
    def chunk(self) -> bytes | memoryview:
        """The fragment's bytes: the payload itself when it is all of it, else a view."""
        if self._offset == 0 and self._length == len(self._payload):
            return self._payload
        return memoryview(self._payload)[self._offset:self._offset + self._length]

    def __repr__(self) -> str:
        if self._message is None:
            return OutgoingMessage.__repr__(self)
        return (
            f"<Fragment {self.protocol!r} seq={self.seq} {self.frag_index}/{self.frag_count} "
            f"flags=0x{self.flags:02x} {self._length} B>"
        )


def _message_of(fragment: Fragment) -> OutgoingMessage:
    """The message ``fragment`` belongs to: itself unless it is one of several."""
    if fragment._message is None:
        return fragment
    return fragment._message


def _outgoing_message(
    protocol: str, seq: int, flags: int, request_id: int, size: int, frag_count: int,
    queued_at: float, notify: bool,
) -> OutgoingMessage:
    """A new OutgoingMessage of several fragments. Made by __new__ and stores rather than
    an __init__: compiled, these are C struct writes instead of a call that parses eight
    arguments per message."""
    new = OutgoingMessage.__new__(OutgoingMessage)
    new.protocol = protocol
    new.seq = seq
    new.flags = flags
    new.request_id = request_id
    new.size = size
    new.frag_count = frag_count
    new.queued_at = queued_at
    new.done = False
    new.error = None
    new.notify = notify
    new._unacked = frag_count  # reliable: fragments not yet acknowledged
    return new


def _fragment(
    message: OutgoingMessage | None, protocol: str, flags: int, request_id: int, seq: int,
    frag_index: int, frag_count: int, payload: bytes, offset: int, space: _OutSpace,
    size: int,
) -> Fragment:
    """A new Fragment of ``message`` (None: of a message it is itself, _single) made as
    _outgoing_message makes messages, for the same reason: ``size`` bytes of the message's
    ``payload`` from ``offset``. ``cost`` is what it takes of the congestion window."""
    new = Fragment.__new__(Fragment)
    new._message = message
    new.protocol = protocol
    new.flags = flags
    new.request_id = request_id
    new.seq = seq
    new.frag_index = frag_index
    new.frag_count = frag_count
    new._payload = payload
    new._offset = offset
    new._length = size
    new.acked = False  # a fragment may be acknowledged by a packet declared lost
    new.queued = False  # in the retransmission queue (once, whatever sent it again)
    new._space = space
    new.cost = size + _FRAGMENT_OVERHEAD
    new.size = 0  # the message's fields: unused unless _single sets them (class docstring)
    new.queued_at = 0.0
    new.done = False
    new.error = None
    new.notify = False
    new._unacked = 0
    return new


def _single(
    protocol: str, seq: int, flags: int, request_id: int, payload: bytes, queued_at: float,
    notify: bool, space: _OutSpace,
) -> Fragment:
    """A new message of one fragment, which is its own fragment (see Fragment): _fragment's,
    with the message's fields set."""
    size = len(payload)
    new = _fragment(None, protocol, flags, request_id, seq, 0, 1, payload, 0, space, size)
    new.size = size
    new.queued_at = queued_at
    new.notify = notify
    new._unacked = 1
    return new


class ReassemblyBudget:
    """Reassembly memory shared by every connection of one host (MAX_REASSEMBLY_TOTAL).

    ``used`` is the bytes currently reserved by all connections together; a
    connection returns its share in close().
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int = MAX_REASSEMBLY_TOTAL) -> None:
        if limit < 0:
            raise UsageError(f"limit must be >= 0, got {limit}")
        self.limit = limit
        self.used = 0

    def __repr__(self) -> str:
        return f"<ReassemblyBudget {self.used}/{self.limit} bytes>"


# --- internal state ----------------------------------------------------------------------

_T = TypeVar("_T")


def _drop_consumed(items: list[_T | None], head: int) -> int:
    """Where the live slots of ``items`` begin once those before ``head`` are consumed:
    the list is emptied when nothing is left, and compacted once the consumed slots are
    half of it, so it stays about as long as what it holds (_Unacked, _FragmentQueue)."""
    if head == len(items):
        items.clear()
        return 0
    if head >= 64 and head * 2 >= len(items):
        del items[:head]
        return 0
    return head


class _Unacked:
    """One space's reliable messages not yet done, by seq.

    Seqs are handed out in order and mostly finish in order, so this is a list of slots
    from ``base`` on, None where a message is done or its seq went to best effort: adding
    is an append, and ``base`` is the oldest unfinished seq whenever ``count`` is not 0.
    A dict keyed by seq would cost an int object and a hash twice per message. Finished
    slots at the head are skipped as they finish (_drop_consumed), so it spans the seqs
    from the oldest unfinished to the newest.
    """

    __slots__ = ("_items", "_start", "base", "count")

    def __init__(self) -> None:
        self._items: list[OutgoingMessage | None] = []
        self._start = 0  # the slot of seq base
        self.base = 0
        self.count = 0

    def add(self, seq: int, message: OutgoingMessage) -> None:
        """Track ``message`` under ``seq``, above every seq added before."""
        items = self._items
        if not self.count:
            items.clear()
            self._start = 0
            self.base = seq
        else:
            gap = seq - self.base - (len(items) - self._start)
            if gap > 0:
                items.extend([None] * gap)  # seqs that went to best effort
        items.append(message)
        self.count += 1

    @cython.boundscheck(False)  # every index is checked against len(items) first
    @cython.wraparound(False)
    def remove(self, seq: int) -> None:
        """Stop tracking ``seq`` (nothing if it is not tracked)."""
        items = self._items
        start = self._start
        i = start + (seq - self.base)
        if i < start or i >= len(items) or items[i] is None:
            return
        items[i] = None
        self.count -= 1
        if i != start:
            return
        end = len(items)
        while start < end and items[start] is None:
            start += 1
        self.base += start - self._start
        self._start = _drop_consumed(items, start)

    def messages(self) -> list[OutgoingMessage]:
        """The messages tracked, oldest first."""
        return [m for m in self._items[self._start:] if m is not None]


class _OutSpace:
    """One sending sequence space (protocol, ORDERED bit)."""

    __slots__ = ("next_seq", "unacked", "closed")

    def __init__(self) -> None:
        self.next_seq = 0
        self.unacked = _Unacked()  # reliable messages not yet done
        self.closed = False  # ordered space after a failure (wire.md 3.6)


class _InSpace:
    """One receiving sequence space.

    ``base`` is the lowest seq not yet received (unordered) or delivered (ordered).
    Unordered spaces keep ``bits``: bit i set = seq base+i received (bit 0 is never
    set).  Ordered spaces keep ``ready``: complete messages waiting for base.
    """

    __slots__ = ("base", "bits", "partial", "ready")

    def __init__(self) -> None:
        self.base = 0
        self.bits = 0
        self.partial: dict[int, _Reassembly] = {}
        self.ready: dict[int, Delivered] = {}


class _Reassembly:
    """One message being reassembled; ``charge`` bytes are reserved for it.

    Fragments are copied to their place in ``buffer`` as they arrive (msgnet._buffer), so the
    complete message needs no final join. The buffer is made with the first full-sized
    fragment: until then the unit is unknown, and a last fragment that came first waits in
    ``last``.
    """

    __slots__ = ("space", "seq", "flags", "request_id", "count", "received", "missing", "full",
                 "last_size", "last", "buffer", "charge", "expires")

    def __init__(
        self, space: _InSpace, seq: int, flags: int, request_id: int, count: int, full: int,
        charge: int,
    ) -> None:
        self.space = space
        self.seq = seq
        self.flags = flags
        self.request_id = request_id
        self.count = count
        self.received = bytearray(count)  # 1 per fragment in
        self.missing = count
        self.full = full  # size of every fragment but the last; 0 until one is seen
        self.last_size = 0  # the last fragment's, once it is in
        self.last: bytes | None = None
        self.buffer: bytes | None = None
        self.charge = charge
        self.expires = _INF

    def add(self, index: int, payload: Buffer) -> None:
        """Copy fragment ``index`` in (its size checked by the caller)."""
        full = self.full
        count = self.count
        self.received[index] = 1
        self.missing -= 1
        if index == count - 1:
            self.last_size = len(payload)
        if not full:  # the last fragment alone so far; the payload may be a view: copy it
            self.last = bytes(payload)
            return
        buffer = self.buffer
        if buffer is None:
            buffer = self.buffer = _new_buffer((count - 1) * full + (self.last_size or full))
            if self.last is not None:
                _write_buffer(buffer, (count - 1) * full, self.last)
                self.last = None
        _write_buffer(buffer, index * full, payload)

    def message(self) -> bytes:
        """The whole message, once nothing is missing (and only once: the buffer is given
        away)."""
        buffer = self.buffer
        self.buffer = None
        if buffer is None:  # a message of one fragment: the last is all of it
            return self.last  # type: ignore[return-value]
        return _finish_buffer(buffer, (self.count - 1) * self.full + self.last_size)


@cython.no_gc  # holds fragments, which refer to nothing that leads back: no cycle
@cython.cclass
class _SentPacket:
    """A sent packet that carried reliable fragments (the only kind tracked): when it was
    sent, its size, its fragments, and whether it was declared lost by the packet or time
    threshold. Made by _sent_packet. Compiled, the garbage collector does not track it (one
    per packet in flight: thousands in a large window, each walked by every full
    collection otherwise)."""

    __slots__ = ("time", "size", "fragments", "by_threshold")

    time: float
    size: int
    fragments: list[Fragment]
    by_threshold: bool


def _sent_packet(time: float, size: int, fragments: list[Fragment]) -> _SentPacket:
    """A new _SentPacket, once per packet sent: made without an __init__ call, which costs
    as much again where this is compiled (a Python-level call)."""
    packet = _SentPacket.__new__(_SentPacket)
    packet.time = time
    packet.size = size
    packet.fragments = fragments
    packet.by_threshold = False
    return packet


class _FragmentQueue:
    """First in, first out: a list and the index of its head.

    What a deque does, as calls the compiled core makes in C (delivery.pxd) where a
    deque's append and popleft are a Python method call each, twice per message.
    Popped slots are cleared at once and dropped as _drop_consumed says, so memory stays
    proportional to what is queued.
    """

    __slots__ = ("_items", "_head")

    def __init__(self) -> None:
        self._items: list[Fragment | None] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def __iter__(self) -> Iterator[Fragment]:
        return iter(self._items[self._head:])  # type: ignore[arg-type]

    def push(self, fragment: Fragment) -> None:
        self._items.append(fragment)

    @cython.boundscheck(False)  # head < end = len(items), which nothing here changes
    @cython.wraparound(False)
    def take(self, out: list[Fragment], budget: float, limit: int) -> int:
        """Move fragments from the head to ``out`` while their costs stay within ``budget``
        bytes (the last may cross it) and ``out`` is shorter than ``limit``; returns their
        total cost. Fragments of failed messages are dropped; one beyond its space's
        window stops the move (_within_window). poll_transmit's loop, in one call rather
        than a peek and a pop per fragment."""
        items = self._items
        head = self._head
        end = len(items)
        taken = 0
        while head < end and taken < budget and len(out) < limit:
            fragment: Fragment = items[head]  # type: ignore[assignment]  # (from head on: set)
            if _message_of(fragment).error is None:
                if not _within_window(fragment._space, fragment.seq):
                    break
                taken += fragment.cost
                out.append(fragment)
            items[head] = None
            head += 1
        self._head = _drop_consumed(items, head)
        return taken

    def peek(self) -> Fragment:
        """The oldest fragment (the queue must not be empty)."""
        return self._items[self._head]  # type: ignore[return-value]

    def pop(self) -> Fragment:
        """Remove and return the oldest fragment (the queue must not be empty)."""
        items = self._items
        head = self._head
        fragment = items[head]
        items[head] = None
        self._head = _drop_consumed(items, head + 1)
        return fragment  # type: ignore[return-value]

    def clear(self) -> None:
        self._items.clear()
        self._head = 0


def _charge_for(count: int, unit: int) -> int:
    """Reassembly memory reserved for ``count`` fragments of ``unit`` bytes."""
    return count * (unit + _PER_FRAGMENT_COST) + _PER_MESSAGE_COST


def _within_window(space: _OutSpace, seq: int) -> bool:
    """Whether ``seq`` may go out: below the oldest unacked reliable seq + SEQ_WINDOW.

    This is what lets the receiver slide its unordered window (module docstring).
    """
    unacked = space.unacked
    return seq - (unacked.base if unacked.count else space.next_seq) < SEQ_WINDOW


def _valid_ranges(ranges: tuple[tuple[int, int], ...]) -> bool:
    """Whether a DELIVERY_ACK's (gap, length) ranges are what a decoded frame can hold."""
    return len(ranges) <= MAX_ACK_RANGES and all(gap >= 0 and length >= 0
                                                 for gap, length in ranges)


# --- the connection ----------------------------------------------------------------------


class DeliveryConnection:
    """Delivery state of one session, both directions (see the module docstring).

    ``fragment_size`` is the largest payload room of one fragment in a packet (sends may
    ask for less); ``max_datagram`` the session's datagram size, the congestion window's
    unit (set_datagram_size raises it when PMTU discovery found more);
    ``max_message`` the largest reliable message accepted by send (hard cap
    MAX_MESSAGE_PAYLOAD); ``budget`` the host's shared reassembly budget (a
    private one if None).
    """

    __slots__ = (
        "_fragment_size", "_max_message", "_budget", "_closed", "counters", "_out_unordered",
        "_out_ordered", "_queue", "_retransmit", "_be_queue", "_sent", "_lost", "_largest_sent",
        "_largest_acked", "_bytes_in_flight", "_handed_out", "_has_rtt", "_srtt", "_rttvar",
        "_min_rtt", "_latest_rtt", "_rto_value", "_backoff", "_rto_base", "_loss_time", "_mss",
        "_min_cwnd", "_cwnd", "_ssthresh", "_recovery_end", "_cwnd_limited", "_pace_tokens",
        "_pace_time", "_pace_at", "_in_unordered", "_in_ordered", "_be_partials", "_held",
        "_veto", "_eliciting", "_ranges", "_largest_received_at", "_unacked_eliciting",
        "_ack_at", "_packet_threshold", "_reorder_shift", "_undo", "_episode", "_ack_now",
        "_probe_base", "_probed", "_probe_budget", "_outstanding", "_last_protocol",
        "_last_ordered", "_last_space",
    )

    def __init__(
        self,
        *,
        fragment_size: int,
        max_datagram: int = MAX_DATAGRAM,
        max_message: int = MAX_MESSAGE_PAYLOAD,
        budget: ReassemblyBudget | None = None,
    ) -> None:
        if not (0 < fragment_size < MAX_DATAGRAM_CEILING
                and 0 < max_datagram <= MAX_DATAGRAM_CEILING):
            raise UsageError(
                f"need 0 < fragment_size < {MAX_DATAGRAM_CEILING} and 0 < max_datagram <= "
                f"{MAX_DATAGRAM_CEILING}, got {fragment_size} and {max_datagram}"
            )
        if not 0 <= max_message <= MAX_MESSAGE_PAYLOAD:
            raise UsageError(f"max_message must be in 0..{MAX_MESSAGE_PAYLOAD}, got {max_message}")
        if -(-max_message // fragment_size) > MAX_FRAGMENTS:
            raise UsageError(
                f"fragment_size {fragment_size} needs more than {MAX_FRAGMENTS} fragments "
                f"for a {max_message}-byte message"
            )
        self._fragment_size = fragment_size
        self._max_message = max_message
        self._budget = budget if budget is not None else ReassemblyBudget()
        self._closed = False
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "retransmissions", "lost_packets", "spurious", "timeouts", "failed",
                "acks_received", "acks_sent", "bad_ack", "ack_unsent", "duplicates",
                "bad_fragment", "reassembly_full", "seq_window", "window_slides", "expired",
                "undone", "probes",
            ),
            0,
        )

        # Sending.
        self._out_unordered: dict[str, _OutSpace] = {}
        self._out_ordered: dict[str, _OutSpace] = {}
        # The space _enqueue used last, and its key: senders pass the same protocol str
        # message after message, so most sends skip the dict lookup (spaces are never
        # removed, so the entry never goes stale).
        self._last_protocol: str | None = None
        self._last_ordered = False
        self._last_space = _OutSpace()  # (unused while _last_protocol is None)
        self._queue = _FragmentQueue()  # new reliable fragments, in send order
        self._retransmit: deque[Fragment] = deque()  # lost reliable fragments
        self._be_queue = _FragmentQueue()  # best-effort fragments
        self._sent: dict[int, _SentPacket] = {}  # in flight, by counter (ascending)
        self._lost: dict[int, _SentPacket] = {}  # declared lost, kept 3 RTO for late acks
        self._largest_sent = -1
        self._largest_acked = -1
        self._bytes_in_flight = 0
        self._handed_out = 0  # window bytes of fragments polled but not yet reported sent

        # RTT (RFC 6298 / RFC 9002 5) and the retransmission timer.
        self._has_rtt = False
        self._srtt = INITIAL_RTT
        self._rttvar = INITIAL_RTT / 2
        self._min_rtt = _INF
        self._latest_rtt = 0.0
        self._rto_value = INITIAL_RTO  # without backoff
        self._backoff = 0  # consecutive timeouts without an acknowledgement
        self._rto_base = 0.0  # the timer runs from here (last send into an idle pipe or ack)
        self._loss_time = 0.0  # time-threshold loss check due (0: none)
        # Tail probe (RFC 9002 6.2's PTO, before the floored retransmission timeout).
        self._probe_base = 0.0  # the probe timer runs from here (last reliable send or ack)
        self._probed = False  # a probe went out and nothing new was acknowledged since
        self._probe_budget = 0  # bytes the next poll_transmit may send beyond the window
        # Loss detection thresholds, raised by spurious losses (reordering the path showed).
        self._packet_threshold = PACKET_THRESHOLD
        self._reorder_shift = REORDER_SHIFT

        # NewReno (RFC 9002 7), in bytes.
        self._mss = max_datagram
        self._min_cwnd = MIN_WINDOW * max_datagram
        self._cwnd = float(INITIAL_WINDOW * max_datagram)
        self._ssthresh = _INF
        # Recovery (no growth, no second halving) covers the packets that were already
        # sent when a loss was detected: counters, unlike times, are never ambiguous when
        # the engine sends in the same loop iteration (same ``now``) as it detects.
        self._recovery_end = -1
        self._cwnd_limited = False  # grow only while the window is what limits sending
        # Undo of a spurious congestion event: (cwnd, ssthresh, recovery_end) from before the
        # current episode's reduction, and the counters declared lost in the episode that
        # were not acknowledged since.  All of them acknowledged late = no loss: undo.
        self._undo: tuple[float, float, int] | None = None
        self._episode: set[int] = set()

        # Best-effort pacing: a token bucket refilled at cwnd / srtt.
        self._pace_tokens = self._cwnd
        self._pace_time = 0.0
        self._pace_at = 0.0  # when the bucket allows the next fragment (0: not waiting)

        # Receiving.
        self._in_unordered: dict[str, _InSpace] = {}
        self._in_ordered: dict[str, _InSpace] = {}
        self._be_partials: dict[_Reassembly, None] = {}  # best effort, oldest first
        self._held = 0  # reassembly bytes reserved by this connection
        self._outstanding = 0  # bytes of messages sent and not yet done (back-pressure)
        self._veto = -1  # counter whose acknowledgement on_fragment refused
        self._eliciting = -1  # counter of the packet with a reliable fragment last seen
        self._ack_now = -1  # counter of the packet that completed a fragmented reliable message

        # Acknowledgements to send.
        self._ranges: list[list[int]] = []  # received counters, [lo, hi] ascending
        self._largest_received_at = 0.0
        self._unacked_eliciting = 0
        self._ack_at = _INF

    # -- introspection ------------------------------------------------------------------

    @property
    def srtt(self) -> float | None:
        """Smoothed RTT in seconds, None before the first sample."""
        return self._srtt if self._has_rtt else None

    @property
    def rttvar(self) -> float | None:
        return self._rttvar if self._has_rtt else None

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt if self._has_rtt else None

    @property
    def latest_rtt(self) -> float | None:
        return self._latest_rtt if self._has_rtt else None

    @property
    def rto(self) -> float:
        """The retransmission timeout now in force, backoff included."""
        return min(MAX_RTO, self._rto_value * (1 << self._backoff))

    @property
    def cwnd(self) -> int:
        """Congestion window in bytes."""
        return int(self._cwnd)

    @property
    def ssthresh(self) -> float:
        return self._ssthresh

    @property
    def packet_threshold(self) -> int:
        """Later packets acknowledged before an older one counts as lost (RFC 9002 6.1.1)."""
        return self._packet_threshold

    @property
    def time_threshold(self) -> float:
        """RTTs after which an older packet counts as lost once a later one was acknowledged."""
        return 1 + 1 / (1 << self._reorder_shift)

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes_in_flight

    @property
    def outstanding_bytes(self) -> int:
        """Bytes of the messages accepted by send() and not yet done, each its payload plus
        its bookkeeping (wire.md 3.6): what the engine bounds to push back on a sender that
        outruns the path."""
        return self._outstanding

    @property
    def packets_in_flight(self) -> int:
        return len(self._sent)

    @property
    def reassembly_bytes(self) -> int:
        """Receive memory this connection has reserved (counted in the host budget)."""
        return self._held

    @property
    def transmit_pending(self) -> bool:
        """Fragments are waiting (poll_transmit may still return none: window, pacing)."""
        return bool(self._retransmit or len(self._queue) or len(self._be_queue))

    @property
    def ack_pending(self) -> bool:
        """An ack-eliciting packet is unacknowledged: put an ack in any packet that goes out."""
        return self._unacked_eliciting > 0

    # -- sending ------------------------------------------------------------------------

    def send(
        self,
        protocol: str,
        payload: Buffer,
        *,
        reliable: bool,
        ordered: bool,
        flags_extra: int = 0,
        request_id: int = 0,
        now: float,
        fragment_size: int | None = None,
    ) -> OutgoingMessage:
        """Queue one SEQ message and return its handle.

        ``flags_extra`` may carry FLAG_REQUEST or FLAG_RESPONSE (with ``request_id``).
        ``fragment_size`` (at most the connection's) leaves room for a longer frame header,
        e.g. an INIT naming a long protocol id. Raises MessageTooLargeError beyond
        MAX_BEST_EFFORT_FRAGMENTS fragments (best effort), ``max_message`` bytes or
        MAX_FRAGMENTS fragments (reliable), PeerUnreachableError on an
        ordered space closed by a failed message, ClosedError after close().
        """
        if self._closed:
            raise ClosedError("delivery connection is closed")
        if flags_extra or request_id:
            if flags_extra & ~_KIND or flags_extra == _KIND:
                raise UsageError("flags_extra may be FLAG_REQUEST or FLAG_RESPONSE (not both)")
            if not 0 <= request_id < 1 << 63:
                raise UsageError(f"request_id must be in 0..2**63-1, got {request_id}")
            if not flags_extra:
                raise UsageError("a request_id goes with FLAG_REQUEST or FLAG_RESPONSE")
        if type(payload) is not bytes:
            payload = bytes(payload)
        fs = self._fragment_size if fragment_size is None else fragment_size
        count = self._fragment_count(len(payload), reliable, ordered, fs)
        return self._enqueue(protocol, payload, reliable, ordered, flags_extra, request_id,
                             count, fs, now, True)

    def set_datagram_size(self, max_datagram: int) -> None:
        """The path carries ``max_datagram``-byte datagrams now (PMTU discovery, docs/wire.md
        5.1): the window's segment size for growth and its floor follow; the window itself,
        in bytes, stays."""
        if not 0 < max_datagram <= MAX_DATAGRAM_CEILING:
            raise UsageError(f"max_datagram must be in 1..{MAX_DATAGRAM_CEILING}")
        self._mss = max_datagram
        self._min_cwnd = MIN_WINDOW * max_datagram
        if self._cwnd < self._min_cwnd:
            self._cwnd = float(self._min_cwnd)

    def send_nowait(self, protocol: str, payload: Buffer, ordered: bool, fragment_size: int,
                    now: float) -> bool:
        """send() of a reliable message nobody awaits, the per-message hot path: positional
        arguments, no handle, and no MessageDelivered event (failures still make theirs).

        False, with nothing queued, while outstanding_bytes is MAX_OUTSTANDING_PER_SESSION
        or more (wire.md 3.6, sender memory): the caller then waits for room.  Raises what
        send() raises.
        """
        if self._outstanding >= MAX_OUTSTANDING_PER_SESSION:
            return False
        data = payload if type(payload) is bytes else bytes(payload)
        count = self._fragment_count(len(data), True, ordered, fragment_size)
        self._enqueue(protocol, data, True, ordered, 0, 0, count, fragment_size, now, False)
        return True

    def _fragment_count(self, size: int, reliable: bool, ordered: bool, fs: int) -> int:
        """How many fragments of ``fs`` bytes a message needs; raises what send() documents."""
        if self._closed:
            raise ClosedError("delivery connection is closed")
        if not 0 < fs <= self._fragment_size:
            raise UsageError(f"fragment_size must be in 1..{self._fragment_size}, got {fs}")
        count = 1 if size <= fs else -(-size // fs)
        if reliable:
            if size > self._max_message:
                raise MessageTooLargeError(
                    f"reliable message of {size} bytes exceeds {self._max_message}"
                )
            if count > MAX_FRAGMENTS:
                raise MessageTooLargeError(
                    f"reliable message of {size} bytes needs {count} fragments of {fs}, "
                    f"more than {MAX_FRAGMENTS}"
                )
        elif ordered:
            raise UsageError("ordered delivery requires reliable")
        elif count > MAX_BEST_EFFORT_FRAGMENTS:
            raise MessageTooLargeError(
                f"best-effort message of {size} bytes needs {count} fragments of {fs}, "
                f"more than {MAX_BEST_EFFORT_FRAGMENTS}"
            )
        return count

    def _enqueue(
        self, protocol: str, payload: bytes, reliable: bool, ordered: bool, flags_extra: int,
        request_id: int, count: int, fs: int, now: float, notify: bool,
    ) -> OutgoingMessage:
        """send() once the arguments are checked: a seq, the handle and its fragments."""
        if protocol is self._last_protocol and ordered == self._last_ordered:
            space = self._last_space
        else:
            spaces = self._out_ordered if ordered else self._out_unordered
            found = spaces.get(protocol)
            space = spaces[protocol] = _OutSpace() if found is None else found
            self._last_protocol = protocol
            self._last_ordered = ordered
            self._last_space = space
        if space.closed:
            raise PeerUnreachableError(
                f"ordered delivery on {protocol!r} stopped after a failed message"
            )
        seq = space.next_seq
        space.next_seq = seq + 1
        flags = FLAG_SEQ | flags_extra
        if reliable:
            flags |= (FLAG_RELIABLE | FLAG_ORDERED) if ordered else FLAG_RELIABLE
        if count > 1:
            flags |= FLAG_FRAGMENT
        size = len(payload)
        self._outstanding += size + _SENT_MESSAGE_COST
        queue = self._queue if reliable else self._be_queue
        message: OutgoingMessage
        if count == 1:
            message = single = _single(protocol, seq, flags, request_id, payload, now, notify,
                                       space)
            queue.push(single)
        else:
            message = _outgoing_message(protocol, seq, flags, request_id, size, count, now,
                                        notify)
            for i in range(count):
                queue.push(_fragment(message, protocol, flags, request_id, seq, i, count,
                                     payload, i * fs, space, min(fs, size - i * fs)))
        if reliable:
            space.unacked.add(seq, message)
        return message

    def poll_transmit(self, now: float, max_fragments: int,
                      max_bytes: float = _INF) -> list[Fragment]:
        """Up to ``max_fragments`` fragments to send now, retransmissions first, whose costs
        stay within ``max_bytes`` (the last may cross it, as it may the window).

        Reliable fragments stop at the congestion window, best effort at the pacing
        rate.  Every fragment returned must be reported in on_packet_sent (they are
        charged to the window until then).  A sender that sends in bursts bounds them
        in bytes, not fragments: a burst of small messages then fills its packets.
        """
        out: list[Fragment] = []
        window = self._cwnd - self._bytes_in_flight - self._handed_out + self._probe_budget
        self._probe_budget = 0
        budget = min(window, max_bytes)
        taken = 0  # the costs of out
        retransmit = self._retransmit
        queue = self._queue
        while taken < budget and len(out) < max_fragments and retransmit:
            fragment = retransmit.popleft()
            fragment.queued = False
            if fragment.acked or _message_of(fragment).error is not None:
                continue
            self.counters["retransmissions"] += 1
            taken += fragment.cost
            out.append(fragment)
        if taken < budget and len(out) < max_fragments:
            taken += queue.take(out, budget - taken, max_fragments)
        self._handed_out += taken
        if taken >= window:
            self._cwnd_limited = True
        elif not (retransmit or len(queue)):
            self._cwnd_limited = False
        if len(self._be_queue) and len(out) < max_fragments and taken < max_bytes:
            self._poll_best_effort(now, max_fragments, max_bytes - taken, out)
        return out

    def _poll_best_effort(self, now: float, max_fragments: int, max_bytes: float,
                          out: list[Fragment]) -> None:
        """Best-effort fragments, paced at cwnd / srtt once an RTT sample exists."""
        queue = self._be_queue
        paced = self._has_rtt
        rate = self._cwnd / max(self._srtt, GRANULARITY)
        if paced:
            tokens = min(self._cwnd, self._pace_tokens + (now - self._pace_time) * rate)
            self._pace_time = now
        else:
            tokens = _INF
        while len(queue) and len(out) < max_fragments and tokens > 0 and max_bytes > 0:
            fragment = queue.peek()
            message = _message_of(fragment)
            if not _within_window(fragment._space, fragment.seq):
                break
            queue.pop()
            out.append(fragment)
            tokens -= fragment.cost
            max_bytes -= fragment.cost
            if fragment.frag_index == fragment.frag_count - 1:
                message.done = True
                self._outstanding -= message.size + _SENT_MESSAGE_COST
        if paced:
            self._pace_tokens = tokens
            self._pace_at = now + max(-tokens / rate, GRANULARITY) if tokens <= 0 else 0.0

    def on_packet_sent(
        self, counter: int, fragments: list[Fragment], size: int, now: float
    ) -> None:
        """Report DATA packet ``counter`` (every one, fragments or not) of ``size`` bytes.

        Packets with reliable fragments are in flight and ack-eliciting; the core
        keeps ``fragments`` (do not reuse the list).
        """
        if counter <= self._largest_sent:
            raise UsageError(f"packet counters must increase: {counter} after {self._largest_sent}")
        self._largest_sent = counter
        if not fragments:
            return
        handed = 0
        mixed = False
        for fragment in fragments:
            if fragment.flags & FLAG_RELIABLE:
                handed += fragment.cost
            else:
                mixed = True
        if not handed:
            return
        if mixed:
            fragments = [f for f in fragments if f.flags & FLAG_RELIABLE]
        self._handed_out -= handed
        if not self._sent:
            self._rto_base = now  # RFC 6298 5.1: start the timer if it is not running
        self._probe_base = now
        self._sent[counter] = _sent_packet(now, size, fragments)
        self._bytes_in_flight += size

    # -- acknowledgements in ------------------------------------------------------------

    def on_ack(
        self,
        largest: int,
        ack_delay_us: int,
        first_range: int,
        ranges: tuple[tuple[int, int], ...],
        now: float,
    ) -> list[DeliveryEvent]:
        """Process one DELIVERY_ACK; the reliable messages it completes.

        Malformed acks and acks of counters never sent are ignored and counted.
        """
        counters = self.counters
        if largest > self._largest_sent:
            counters["ack_unsent"] += 1
            return []
        if first_range < 0 or ack_delay_us < 0 or not _valid_ranges(ranges):
            # what no decoded frame can hold: a caller's bug
            counters["bad_ack"] += 1
            return []
        low = largest - first_range
        spans = [(low, largest)]
        for gap, length in ranges:
            high = low - gap - 2
            low = high - length
            spans.append((low, high))
        if low < 0:  # wire.md 3.5: ranges that would go below counter 0 are ignored
            counters["bad_ack"] += 1
            spans = [span for span in spans if span[0] >= 0]
            if not spans:
                return []
        counters["acks_received"] += 1
        previous = self._largest_acked
        if largest > previous:
            self._largest_acked = largest
        events: list[DeliveryEvent] = []
        acked = bool(self._lost) and self._ack_lost(spans, previous, now, events)
        sent = self._sent
        newest: _SentPacket | None = None
        oldest = next(iter(sent)) if sent else largest + 1
        ssthresh = self._ssthresh
        grow = self._cwnd_limited
        for low, high in spans:
            if high < oldest:
                break
            if low < oldest:
                low = oldest
            # A range wider than what is in flight: walk the packets, not the counters.
            keys = (
                [c for c in sent if low <= c <= high] if high - low >= len(sent)
                else range(low, high + 1)
            )
            for counter in keys:
                packet = sent.pop(counter, None)
                if packet is None:
                    continue
                acked = True
                if counter == largest:
                    newest = packet
                self._bytes_in_flight -= packet.size
                if grow and counter > self._recovery_end:
                    if self._cwnd < ssthresh:
                        self._cwnd += packet.size  # slow start
                    else:
                        self._cwnd += self._mss * packet.size / self._cwnd
                self._ack_fragments(packet.fragments, events)
        if not acked:
            return events
        if self._cwnd > MAX_REASSEMBLY_PER_SESSION:
            # More than the peer may buffer for us is never useful in flight.
            self._cwnd = float(MAX_REASSEMBLY_PER_SESSION)
        if newest is not None:
            self._update_rtt(now - newest.time, min(ack_delay_us * 1e-6, MAX_ACK_DELAY))
        self._backoff = 0
        self._rto_base = now  # RFC 6298 5.3: restart the timer on new acknowledgements
        self._probe_base = now
        self._probed = False
        self._detect_losses(now)
        return events

    def _ack_fragments(self, fragments: list[Fragment], events: list[DeliveryEvent]) -> None:
        """Count acknowledged fragments; a message is delivered with its last one."""
        for fragment in fragments:
            if fragment.acked:
                continue
            fragment.acked = True
            message = _message_of(fragment)
            if message.error is not None:
                continue
            message._unacked -= 1
            if not message._unacked:
                message.done = True
                self._outstanding -= message.size + _SENT_MESSAGE_COST
                fragment._space.unacked.remove(message.seq)
                if message.notify:
                    events.append(_new(MessageDelivered, (message,)))

    def _ack_lost(self, spans: list[tuple[int, int]], previous: int, now: float,
                  events: list[DeliveryEvent]) -> bool:
        """Late acknowledgements of packets declared lost: their fragments are delivered
        (a queued retransmission is then skipped), the loss thresholds learn the reordering,
        and a congestion episode whose every loss was spurious is undone.  Forgets packets
        older than 3 RTO.  ``previous`` is the largest counter acknowledged before this ack."""
        lost = self._lost
        horizon = now - 3 * self._rto_value
        while lost:
            oldest = next(iter(lost))
            if lost[oldest].time >= horizon:
                break
            del lost[oldest]
        if not lost:
            return False
        # Both ascend: one merge instead of every lost counter against every span.
        late = []
        ascending = spans[::-1]
        i, count = 0, len(ascending)
        for counter in lost:
            while i < count and ascending[i][1] < counter:
                i += 1
            if i == count:
                break
            if ascending[i][0] <= counter:
                late.append(counter)
        if not late:
            return False
        episode = self._episode
        for counter in late:
            packet = lost.pop(counter)
            self._ack_fragments(packet.fragments, events)
            if packet.by_threshold:
                self._adapt_thresholds(counter, packet.time, previous, now)
            episode.discard(counter)
        self.counters["spurious"] += len(late)
        if self._undo is not None and not episode:
            self._undo_congestion()
        return True

    def _adapt_thresholds(self, counter: int, sent: float, previous: int, now: float) -> None:
        """A packet declared lost by a threshold arrived after all: raise the thresholds so
        that it would not have been (the adaptive reordering thresholds of RFC 9002 6.1,
        as QUIC implementations and TCP RACK do)."""
        distance = previous - counter + 1
        if distance > self._packet_threshold:
            self._packet_threshold = min(distance, MAX_PACKET_THRESHOLD)
        needed = now - sent
        rtt = max(self._srtt, self._latest_rtt)
        shift = self._reorder_shift
        while shift and rtt + rtt / (1 << shift) < needed:
            shift -= 1
        self._reorder_shift = shift

    def _undo_congestion(self) -> None:
        """Every packet the current episode declared lost was acknowledged after all: the
        reduction was spurious (reordering, delay spikes); restore the window as it was
        (RFC 4015's response; TCP's undo)."""
        cwnd, ssthresh, recovery_end = self._undo  # type: ignore[misc]
        self._undo = None
        self._cwnd = max(self._cwnd, cwnd)
        self._ssthresh = max(self._ssthresh, ssthresh)
        self._recovery_end = recovery_end
        self.counters["undone"] += 1

    def _update_rtt(self, latest: float, ack_delay: float) -> None:
        """RFC 9002 5.3 (the RFC 6298 gains), then RTO per wire.md 3.6."""
        self._latest_rtt = latest
        if not self._has_rtt:
            self._has_rtt = True
            self._min_rtt = self._srtt = latest
            self._rttvar = latest / 2
        else:
            if latest < self._min_rtt:
                self._min_rtt = latest
            # The peer's ack delay is subtracted unless that would go below min_rtt.
            adjusted = latest - ack_delay if latest >= self._min_rtt + ack_delay else latest
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - adjusted)
            self._srtt = 0.875 * self._srtt + 0.125 * adjusted
        rto = self._srtt + max(4 * self._rttvar, GRANULARITY) + MAX_ACK_DELAY
        self._rto_value = min(MAX_RTO, max(MIN_RTO, rto))

    def _detect_losses(self, now: float) -> None:
        """RFC 9002 6.1: packet and time thresholds below the largest acknowledged."""
        self._loss_time = 0.0
        largest = self._largest_acked
        threshold = self._packet_threshold
        rtt = max(self._srtt, self._latest_rtt)
        delay = max(rtt + rtt / (1 << self._reorder_shift), GRANULARITY)
        lost: list[int] = []
        # Counters ascend with send times: the first packet not lost ends the scan.
        for counter, packet in self._sent.items():
            if counter > largest:
                break
            due = packet.time + delay  # computed as the deadline is, so it always fires
            if due <= now or largest - counter >= threshold:
                lost.append(counter)
            else:
                self._loss_time = due
                break
        if lost:
            self._declare_lost(lost)

    def _declare_lost(self, counters: list[int]) -> None:
        """Re-queue the lost packets' fragments; NewReno halves once per round trip."""
        sent = self._sent
        lost = self._lost
        for counter in counters:
            packet = lost[counter] = sent.pop(counter)
            packet.by_threshold = True
            self._bytes_in_flight -= packet.size
            self._requeue(packet.fragments)
        self.counters["lost_packets"] += len(counters)
        if counters[-1] > self._recovery_end:  # a new congestion episode
            self._undo = (self._cwnd, self._ssthresh, self._recovery_end)
            self._episode = set(counters)
            self._recovery_end = self._largest_sent
            self._cwnd = self._ssthresh = max(self._cwnd / 2, self._min_cwnd)
        elif self._undo is not None:
            self._episode.update(counters)

    # -- timers -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When handle_timer is due (then check ack_frame_due too), or None."""
        deadline = _INF
        if self._sent:
            deadline = min(self._rto_base + self.rto, self._probe_deadline())
            if self._loss_time and self._loss_time < deadline:
                deadline = self._loss_time
        if self._unacked_eliciting and self._ack_at < deadline:
            deadline = self._ack_at
        if self._pace_at and len(self._be_queue) and self._pace_at < deadline:
            deadline = self._pace_at
        if self._be_partials:
            expires = next(iter(self._be_partials)).expires
            if expires < deadline:
                deadline = expires
        return None if deadline == _INF else deadline

    def handle_timer(self, now: float) -> list[DeliveryEvent]:
        """Run what is due: loss detection, the retransmission timeout, reassembly expiry."""
        events: list[DeliveryEvent] = []
        if self._sent:
            if self._loss_time and now >= self._loss_time:
                self._detect_losses(now)
            elif now >= self._rto_base + self.rto:
                self._on_timeout(now, events)
            elif now >= self._probe_deadline():
                self._probe()
        if self._be_partials:
            self._expire(now)
        return events

    def _probe_deadline(self) -> float:
        """When the tail probe is due: a PTO (RFC 9002 6.2: SRTT + max(4 RTTVAR, 1 ms) +
        max_ack_delay, no MIN_RTO floor, no backoff) after the last reliable send or new
        acknowledgement, once per such event, with an RTT sample; infinity otherwise."""
        if self._probed or not self._has_rtt:
            return _INF
        pto = self._srtt + max(4 * self._rttvar, GRANULARITY) + MAX_ACK_DELAY
        return self._probe_base + pto

    def _probe(self) -> None:
        """Nothing acknowledged for a PTO: send one packet beyond the window to elicit an
        acknowledgement (the packets or their acks may be lost, and nothing later would
        reveal it before the retransmission timeout).  New fragments if any are queued,
        else the newest in-flight packet's again.  Neither the window, the backoff nor the
        timeout count changes: acknowledgements of the probe let the thresholds find what
        was lost, and the NewReno response follows from them (RFC 8985 7, RFC 9002 6.2)."""
        self._probed = True
        self.counters["probes"] += 1
        if not (self._retransmit or len(self._queue)):
            self._requeue(self._sent[next(reversed(self._sent))].fragments)
        self._probe_budget = self._mss

    def _requeue(self, fragments: list[Fragment]) -> None:
        """Queue for retransmission what is neither acknowledged, failed nor queued already
        (a fragment may be in flight in several packets: a probe, a lost one)."""
        retransmit = self._retransmit
        for fragment in fragments:
            if not fragment.acked and not fragment.queued and _message_of(fragment).error is None:
                fragment.queued = True
                retransmit.append(fragment)

    def _on_timeout(self, now: float, events: list[DeliveryEvent]) -> None:
        """Retransmission timeout: every in-flight packet is lost, the window collapses."""
        self.counters["timeouts"] += 1
        lost = self._sent
        self._sent = {}
        if self._undo is None or self._largest_acked > self._recovery_end:
            # Not within the recovery of an undoable episode: this one starts here.
            self._undo = (self._cwnd, self._ssthresh, self._recovery_end)
            self._episode = set()
        self._episode.update(lost)
        self._bytes_in_flight = 0
        self._loss_time = 0.0
        self._lost.update(lost)
        for packet in lost.values():
            self._requeue(packet.fragments)
        self.counters["lost_packets"] += len(lost)
        self._ssthresh = max(self._cwnd / 2, self._min_cwnd)
        self._cwnd = float(self._min_cwnd)
        self._recovery_end = self._largest_sent
        self._rto_base = self._probe_base = now
        self._probed = False
        self._backoff += 1
        if self._backoff >= MAX_RETRANSMISSIONS:
            self._backoff = 0
            self._fail_all(PeerUnreachableError(
                f"no acknowledgement after {MAX_RETRANSMISSIONS} retransmission timeouts"
            ), events)

    def _fail(self, message: OutgoingMessage, space: _OutSpace, error: Exception,
              events: list[DeliveryEvent]) -> None:
        """Finish ``message`` (of ``space``) with ``error``; a failure closes its ordered
        space."""
        if message.done:
            return
        message.done = True
        self._outstanding -= message.size + _SENT_MESSAGE_COST
        message.error = error
        self.counters["failed"] += 1
        events.append(_new(MessageFailed, (message, error)))
        space.unacked.remove(message.seq)
        if message.flags & FLAG_ORDERED and not space.closed:
            space.closed = True  # the peer can never deliver past this seq
            for other in space.unacked.messages():
                self._fail(other, space, error, events)

    def _fail_all(self, error: Exception, events: list[DeliveryEvent]) -> None:
        """Fail every outstanding reliable message (their fragments are dropped)."""
        for spaces in (self._out_unordered, self._out_ordered):
            for space in spaces.values():
                for message in space.unacked.messages():
                    self._fail(message, space, error, events)
        self._queue.clear()
        self._retransmit.clear()
        self._lost.clear()
        self._undo = None
        self._episode.clear()

    def close(self, error: Exception | None = None) -> list[DeliveryEvent]:
        """End the session: fail what is outstanding, return reassembly memory.

        Every message not done fails with ``error`` (ClosedError by default),
        best effort not yet fully handed out included.
        """
        if self._closed:
            return []
        self._closed = True
        error = error if error is not None else ClosedError("session closed")
        events: list[DeliveryEvent] = []
        self._fail_all(error, events)
        for fragment in self._be_queue:
            self._fail(_message_of(fragment), fragment._space, error, events)
        self._be_queue.clear()
        self._sent.clear()
        self._bytes_in_flight = self._handed_out = 0
        self._budget.used -= self._held
        self._held = 0
        self._in_unordered.clear()
        self._in_ordered.clear()
        self._be_partials.clear()
        return events

    # -- receiving ----------------------------------------------------------------------

    def on_fragment(
        self,
        counter: int,
        protocol: str,
        flags: int,
        request_id: int,
        seq: int,
        frag_index: int,
        frag_count: int,
        payload: Buffer,
        now: float,
    ) -> list[Delivered]:
        """One received SEQ message (a fragment, or whole with frag_index/count 0/1).

        Returns the messages now deliverable: this one if complete, and for ordered
        spaces those it releases.  Fields are as the frame codec validated them
        (flag combinations, frag_index < frag_count <= MAX_FRAGMENTS); consistency
        across fragments and the memory bounds are checked here.  Call
        on_packet_received(counter) after the packet's last frame.
        """
        got = self.receive(counter, protocol, flags, request_id, seq, frag_index, frag_count,
                           payload, now)
        if got is None:
            return []
        if type(got) is bytes:
            return [_new(Delivered, (protocol, flags, request_id, got))]
        return got  # type: ignore[return-value]

    def receive(
        self,
        counter: int,
        protocol: str,
        flags: int,
        request_id: int,
        seq: int,
        frag_index: int,
        frag_count: int,
        payload: Buffer,
        now: float,
    ) -> bytes | list[Delivered] | None:
        """on_fragment without a list and a Delivered per message, for the engine's hot
        path: None when nothing is deliverable; the payload when this message alone is
        (deliver it with the protocol, flags and request_id given here); else the
        Delivered list on_fragment returns (an ordered message and those it releases)."""
        if self._closed:
            return None
        if flags & FLAG_RELIABLE:
            self._eliciting = counter
        if flags & FLAG_ORDERED:
            return self._on_ordered(counter, protocol, flags, request_id, seq, frag_index,
                                    frag_count, payload, now)
        space = self._in_unordered.get(protocol)
        if space is None:
            space = self._in_unordered[protocol] = _InSpace()
        if seq == space.base and frag_count == 1 and not space.bits and not space.partial:
            space.base = seq + 1  # the common case: the next message, whole
            return payload if type(payload) is bytes else bytes(payload)
        offset = seq - space.base
        if offset < 0 or space.bits >> offset & 1:
            self.counters["duplicates"] += 1
            return None
        if offset >= SEQ_WINDOW:
            self._slide(space, seq - SEQ_WINDOW + 1)
        if frag_count == 1:
            if seq in space.partial:
                self.counters["bad_fragment"] += 1
                return None
            data = payload if type(payload) is bytes else bytes(payload)
        else:
            whole = self._reassemble(space, counter, flags, request_id, seq, frag_index,
                                     frag_count, payload, now, False)
            if whole is None:
                return None
            data = whole
        self._mark_received(space, seq)
        return data

    def _on_ordered(
        self, counter: int, protocol: str, flags: int, request_id: int, seq: int,
        frag_index: int, frag_count: int, payload: Buffer, now: float,
    ) -> bytes | list[Delivered] | None:
        """receive() in an ordered space."""
        space = self._in_ordered.get(protocol)
        if space is None:
            space = self._in_ordered[protocol] = _InSpace()
        base = space.base
        offset = seq - base
        if offset < 0 or seq in space.ready:
            self.counters["duplicates"] += 1
            return None
        if not flags & FLAG_RELIABLE:
            self.counters["bad_fragment"] += 1
            return None
        if offset >= SEQ_WINDOW:
            self.counters["seq_window"] += 1
            self._veto = counter
            return None
        if frag_count == 1:
            if seq in space.partial:
                self.counters["bad_fragment"] += 1
                return None
            data = payload if type(payload) is bytes else bytes(payload)
        else:
            whole = self._reassemble(space, counter, flags, request_id, seq, frag_index,
                                     frag_count, payload, now, offset == 0)
            if whole is None:
                return None
            data = whole
        ready = space.ready
        if not offset and not ready:
            space.base = seq + 1  # the common case: the next message, nothing held
            return data
        message = _new(Delivered, (protocol, flags, request_id, data))
        if offset:
            charge = len(data) + _PER_MESSAGE_COST
            if frag_count > 1:
                self._held += charge  # its reassembly just released more than this
                self._budget.used += charge
            elif not self._try_charge(charge, False):
                self._veto = counter
                return None
            ready[seq] = message
            return None
        out = [message]
        base += 1
        while ready:
            waiting = ready.pop(base, None)
            if waiting is None:
                break
            out.append(waiting)
            self._release(len(waiting.payload) + _PER_MESSAGE_COST)
            base += 1
        space.base = base
        return out

    def _reassemble(
        self, space: _InSpace, counter: int, flags: int, request_id: int, seq: int,
        index: int, count: int, payload: Buffer, now: float, head: bool,
    ) -> bytes | None:
        """Add one fragment of a multi-fragment message; the message once complete.

        Memory for the whole message is reserved with its first fragment.  Every
        fragment but the last must have the same size; the last one at most that.
        """
        reliable = flags & FLAG_RELIABLE
        size = len(payload)
        last = index == count - 1
        partial = space.partial.get(seq)
        if partial is None:
            limit = MAX_FRAGMENTS if reliable else MAX_BEST_EFFORT_FRAGMENTS
            if (not 0 <= index < count <= limit or size == 0
                    or (not last and (count - 1) * size >= MAX_MESSAGE_PAYLOAD)):
                self.counters["bad_fragment"] += 1
                return None
            if not reliable and len(self._be_partials) >= MAX_BEST_EFFORT_REASSEMBLIES:
                self.counters["reassembly_full"] += 1
                return None
            if last:  # the full size is unknown: guess ours, within what the total allows
                unit = max(size, min(self._fragment_size,
                                     (MAX_MESSAGE_PAYLOAD - size) // (count - 1)))
            else:
                unit = size
            charge = _charge_for(count, unit)
            if not self._try_charge(charge, head):
                if reliable:
                    self._veto = counter
                return None
            partial = _Reassembly(space, seq, flags, request_id, count, 0 if last else size,
                                  charge)
            space.partial[seq] = partial
            if not reliable:
                partial.expires = now + max(BEST_EFFORT_TIMEOUT, 3 * self._rto_value)
                self._be_partials[partial] = None
        else:
            if (count != partial.count or flags != partial.flags
                    or request_id != partial.request_id or not 0 <= index < count):
                self.counters["bad_fragment"] += 1
                return None
            if partial.received[index]:
                self.counters["duplicates"] += 1
                return None
            full = partial.full
            if last:
                if size == 0 or (full and size > full):
                    self.counters["bad_fragment"] += 1
                    return None
            elif not full:  # the first full-sized fragment after the last: size known now
                if size < partial.last_size or (count - 1) * size >= MAX_MESSAGE_PAYLOAD:
                    self.counters["bad_fragment"] += 1
                    return None
                charge = _charge_for(count, size)
                if charge > partial.charge:
                    if not self._try_charge(charge - partial.charge, head):
                        if reliable:
                            self._veto = counter
                        return None
                else:
                    self._release(partial.charge - charge)
                partial.charge = charge
                partial.full = size
            elif size != full:
                self.counters["bad_fragment"] += 1
                return None
        partial.add(index, payload)
        if partial.missing:
            return None
        del space.partial[seq]
        self._release(partial.charge)
        if reliable:
            self._ack_now = counter  # its sender may be waiting for this ack: no delay
        else:
            del self._be_partials[partial]
        return partial.message()

    def _try_charge(self, charge: int, head: bool) -> bool:
        """Reserve receive memory within both bounds (the head room only for ``head``)."""
        room = 0 if head else _HEAD_ROOM
        budget = self._budget
        if (self._held + charge > MAX_REASSEMBLY_PER_SESSION - room
                or budget.used + charge > budget.limit - room):
            self.counters["reassembly_full"] += 1
            return False
        self._held += charge
        budget.used += charge
        return True

    def _release(self, charge: int) -> None:
        self._held -= charge
        self._budget.used -= charge

    def _mark_received(self, space: _InSpace, seq: int) -> None:
        """Set seq's bit in an unordered window; move base past a received run."""
        offset = seq - space.base
        if offset:
            space.bits |= 1 << offset
            return
        bits = space.bits >> 1
        base = seq + 1
        if bits & 1:
            run = (~bits & (bits + 1)).bit_length() - 1  # trailing one bits
            bits >>= run
            base += run
        space.bits = bits
        space.base = base

    def _slide(self, space: _InSpace, base: int) -> None:
        """Move an unordered window up to ``base`` (safe: see the module docstring)."""
        self.counters["window_slides"] += 1
        bits = space.bits >> (base - space.base)
        for seq in [s for s in space.partial if s < base]:
            self._drop(space.partial.pop(seq))
        if bits & 1:
            run = (~bits & (bits + 1)).bit_length() - 1
            bits >>= run
            base += run
        space.bits = bits
        space.base = base

    def _drop(self, partial: _Reassembly) -> None:
        self._release(partial.charge)
        self._be_partials.pop(partial, None)

    def _expire(self, now: float) -> None:
        """Abandon best-effort reassemblies past their timeout; they stay undelivered."""
        partials = self._be_partials
        while partials:
            partial = next(iter(partials))
            if partial.expires > now:
                break
            del partials[partial]
            space = partial.space
            del space.partial[partial.seq]
            self._release(partial.charge)
            self._mark_received(space, partial.seq)  # late fragments are duplicates now
            self.counters["expired"] += 1

    # -- acknowledgements out -----------------------------------------------------------

    def on_packet_received(self, counter: int, now: float, acknowledge: bool = True) -> None:
        """Record DATA packet ``counter`` after all its frames were processed.

        Every opened packet is reported.  It will be acknowledged unless
        on_fragment vetoed it or the engine passes ``acknowledge=False`` because it
        dropped a reliable frame of it itself (so that the peer retransmits).
        """
        if not acknowledge or counter == self._veto:
            return
        ranges = self._ranges
        if not ranges:
            ranges.append([counter, counter])
            in_order = True
        elif counter == ranges[-1][1] + 1:
            ranges[-1][1] = counter
            in_order = True
        elif self._add_range(counter):
            in_order = False
        else:
            return  # already recorded
        if counter == ranges[-1][1]:
            self._largest_received_at = now
        if counter == self._eliciting:
            self._unacked_eliciting += 1
            if not in_order or counter == self._ack_now:
                # RFC 9000 13.2.1: a gap or a late packet, ack at once; and the last
                # fragment of a large message, which its sender may be awaiting.
                self._ack_at = now
            elif self._unacked_eliciting == 1:
                self._ack_at = now + MAX_ACK_DELAY

    def _add_range(self, counter: int) -> bool:
        """Insert ``counter`` out of order; False if it was recorded already.

        At most MAX_ACK_RANGES + 1 ranges are kept, the newest: an older counter
        falls out and its packet, if still unacknowledged, is retransmitted.
        """
        ranges = self._ranges
        i = len(ranges)
        while i and ranges[i - 1][0] > counter:
            i -= 1
        below = ranges[i - 1] if i else None
        if below is not None and counter <= below[1]:
            return False
        above = ranges[i] if i < len(ranges) else None
        joins_below = below is not None and below[1] + 1 == counter
        joins_above = above is not None and above[0] - 1 == counter
        if joins_below and joins_above:
            below[1] = above[1]  # type: ignore[index]
            del ranges[i]
        elif joins_below:
            below[1] = counter  # type: ignore[index]
        elif joins_above:
            above[0] = counter  # type: ignore[index]
        else:
            ranges.insert(i, [counter, counter])
            if len(ranges) > MAX_ACK_RANGES + 1:
                del ranges[0]
        return True

    def ack_frame_due(self, now: float) -> bool:
        """An ack must go out now: a second ack-eliciting packet, a gap, or MAX_ACK_DELAY."""
        return self._unacked_eliciting >= 2 or (
            self._unacked_eliciting > 0 and now >= self._ack_at
        )

    def build_ack(self, now: float) -> AckFields | None:
        """DELIVERY_ACK fields for the received counters (newest ranges), None if none."""
        ranges = self._ranges
        if not ranges:
            return None
        low, largest = ranges[-1]
        gaps = []
        for i in range(len(ranges) - 2, -1, -1):
            below_low, below_high = ranges[i]
            gaps.append((low - below_high - 2, below_high - below_low))
            low = below_low
        self._unacked_eliciting = 0
        self._ack_at = _INF
        self.counters["acks_sent"] += 1
        delay_us = int((now - self._largest_received_at) * 1e6)
        return AckFields(largest, max(delay_us, 0), largest - ranges[-1][0], tuple(gaps))
