# cython: auto_pickle=False
"""The UDP hot path (DESIGN.md §2): datagram -> header -> session -> open -> frames -> handler,
and back: frames coalesced per session -> sealed -> sendmmsg (or, for a session on a stream
path, written to its TCP connection: docs/wire.md §5-6).

The engine reads its socket itself because uvloop's ``datagram_received`` path costs about 2 us
per datagram before any work (a bytes copy, an address tuple, two GIL round trips, a generic
call), while a ``recvmmsg`` batch read from a ``loop.add_reader`` callback costs about 0.85 us on
uvloop and stock asyncio alike (STYLE.md §2). ``create_datagram_endpoint`` remains the portable
fallback and feeds the same C function.

Network input never raises into the event loop: bad packets are dropped and counted
(``counters()``), and handler or delegate exceptions go to ``loop.call_exception_handler``.
"""

cimport cython
from cpython.buffer cimport (PyBUF_READ, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                            PyObject_GetBuffer)
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE, _PyBytes_Resize)
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_FromString
from libc.errno cimport EINTR, EINVAL, EIO, ENOPROTOOPT, EOPNOTSUPP, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, memset

from msgnet._frame cimport (
    C_MAX_FRAMES_PER_PACKET,
    C_MAX_PROTOCOL_LENGTH,
    ERR_UNKNOWN_FRAME_TYPE,
    FLAG_FRAGMENT,
    FLAG_ORDERED,
    FLAG_RELIABLE,
    FLAG_REQUEST,
    FLAG_RESPONSE,
    FLAG_SEQ,
    FRAME_ACK,
    FRAME_BOUND,
    FRAME_CLOSE,
    FRAME_CONTINUATION,
    FRAME_DELIVERY_ACK,
    FRAME_INIT,
    FRAME_PING,
    FRAME_PONG,
    FRAME_RESET,
    READ_END,
    READ_OK,
    FrameView,
    delivery_ack_ranges,
    message_header_size,
    read_frame,
    varint_size,
    write_continuation,
    write_init,
    write_small,
)
from msgnet.core.delivery cimport DeliveryConnection, Fragment
from msgnet._packet cimport (
    AEAD_TAG_SIZE,
    DATA_HEADER_SIZE,
    DATA_OVERHEAD,
    DROP_AUTH_FAILED,
    DROP_COUNTER_EXHAUSTED,
    DROP_PLAINTEXT_REFUSED,
    DROP_REPLAY,
    DROP_TRUNCATED,
    DROP_WRONG_SESSION,
    OPEN_OK,
    PACKET_DATA,
    PACKET_INITIATION,
    PACKET_PLAIN_DATA,
    PACKET_VERSION_UNSUPPORTED,
    PieceCipher,
    SessionCrypto,
    _load_u32_be,
    _load_u64_be,
    seal_pieces,
)

import asyncio
import os
import socket
import sys

from msgnet import limits
from msgnet.errors import ClosedError, MessageTooLargeError, UsageError

__all__ = ["Message", "SendRoute", "Session", "UdpEngine", "PMTU_IDLE", "PMTU_SEARCHING",
           "PMTU_DONE", "COUNTER_NAMES", "HAVE_RECVMMSG", "HAVE_GSO",
           "STREAM_OK", "STREAM_REPLAY", "STREAM_BAD", "STREAM_UNKNOWN"]

# Session.pmtu_state: where the session's PMTU search is (docs/wire.md 5.1).
PMTU_IDLE = 0        # not searched: it has sent nothing larger than MAX_DATAGRAM carries
PMTU_SEARCHING = 1   # probes are out (the network's search, msgnet.network)
PMTU_DONE = 2        # searched: datagram_size is what the path carries

# What UdpEngine.feed_stream made of a packet from a stream connection.
STREAM_OK = 1        # authenticated for a session here, and processed
STREAM_REPLAY = 0    # a copy of a packet that already arrived (by another path): dropped
STREAM_BAD = -1      # failed its checks (truncated, forged ...): dropped
STREAM_UNKNOWN = 2   # not DATA for a session with keys here: a handshake or unknown-session packet

# Indexed by the CNT_* enum of _engine.pxd.
COUNTER_NAMES = (
    "packets_in",
    "bytes_in",
    "packets_out",
    "bytes_out",
    "messages_in",
    "messages_out",
    "init_frames_in",
    "continuation_frames_in",
    "truncated",
    "not_msgnet",
    "unknown_packet_type",
    "unknown_session",
    "replay",
    "auth_failed",
    "counter_exhausted",
    "plaintext_refused",
    "bad_frame",
    "unknown_frame",
    "unknown_alias",
    "no_handler",
    "too_many_aliases",
    "oversize",
    "handler_error",
    "reply_dropped",
    "send_errors",
)
assert len(COUNTER_NAMES) == CNT_COUNT
assert C_BASE_PAYLOAD == limits.MAX_DATAGRAM - limits.DATA_OVERHEAD
assert C_FRAGMENT_INIT_OVERHEAD == limits.FRAGMENT_INIT_OVERHEAD
assert C_MAX_BEST_EFFORT_FRAGMENTS == limits.MAX_BEST_EFFORT_FRAGMENTS

HAVE_RECVMMSG = bool(MSGNET_HAVE_MMSG)
# UDP generic segmentation offload (Linux 4.18+): one sendmmsg message carries a run of
# equal-size datagrams to one address, and the kernel cuts them apart late. Measured on
# loopback: 0.7 us of kernel time per 1 KiB datagram instead of 3.4 us. Turned off for the
# engine at the first send the kernel refuses (old kernel, a device without checksum offload,
# a datagram larger than the path MTU).
HAVE_GSO = bool(MSGNET_HAVE_GSO)
# Don't Fragment on every datagram of a socket whose host probes the path MTU (docs/wire.md
# 5.1): Linux's IP_MTU_DISCOVER / IPV6_MTU_DISCOVER = IP(V6)_PMTUDISC_PROBE, which the socket
# module does not name. IP never fragments a datagram then, so a probe that arrives proves the
# path carries its size, and one larger than the interface's MTU is refused at once.
_IP_MTU_DISCOVER = 10
_IPV6_MTU_DISCOVER = 23
_PMTUDISC_PROBE = 3


def _set_dont_fragment(sock) -> bool:
    """Set DF on sock's datagrams (IPv4, and IPv6 on an IPv6 socket); False where the platform
    has no such option (then probes may be fragmented by IP: PMTU discovery is off)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_PROBE)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_PROBE)
    except OSError:
        return False
    return True
# UDP generic receive offload (Linux 5.0+), the other half: datagrams of one flow that arrive
# together (on loopback, a GSO send stays whole) come up in one read with their segment size,
# so the kernel's per-datagram receive work is paid once per run. Asked for with a socket
# option when the engine starts; a kernel without it just refuses the option.

cdef enum:
    _PACKET_TYPE_MAX = 0x0F
    _RESET_NO_HANDLER = 1
    _RESET_UNKNOWN_ALIAS = 2
    _RESET_TOO_MANY_ALIASES = 3

cdef double _RETAIN_SENT_TIME = limits.RETAIN_SENT_TIME
cdef uint8_t _ZERO_TAG[16]   # the "tag" retained for PLAIN_DATA packets, which have none



# ---------------------------------------------------------------------------
# C helpers
# ---------------------------------------------------------------------------

cdef inline int _drop_counter(int reason) noexcept nogil:
    """The counter of an open_into drop reason."""
    if reason == DROP_REPLAY:
        return CNT_REPLAY
    if reason == DROP_AUTH_FAILED:
        return CNT_AUTH_FAILED
    if reason == DROP_COUNTER_EXHAUSTED:
        return CNT_COUNTER_EXHAUSTED
    if reason == DROP_PLAINTEXT_REFUSED:
        return CNT_PLAINTEXT_REFUSED
    if reason == DROP_WRONG_SESSION:
        return CNT_UNKNOWN_SESSION
    return CNT_TRUNCATED  # DROP_TRUNCATED; DROP_OUT_OF_ROOM cannot happen (cap = n - 13)


cdef extern from *:
    """#define msgnet_view_no_owner(v) ((v)->obj = NULL)
    #define msgnet_view_owned(v) ((v)->obj != NULL)"""
    void msgnet_view_no_owner(Py_buffer* view) noexcept
    bint msgnet_view_owned(Py_buffer* view) noexcept


cdef inline int _get_payload(object payload, Py_buffer* view) except -1:
    """PyObject_GetBuffer, but a bytes payload (the common case) without the buffer protocol's
    calls (~70 instructions a message); PyBuffer_Release is a no-op on such a view."""
    if PyBytes_CheckExact(payload):
        view.buf = PyBytes_AS_STRING(payload)
        view.len = PyBytes_GET_SIZE(payload)
        msgnet_view_no_owner(view)
        return 0
    return PyObject_GetBuffer(payload, view, PyBUF_SIMPLE)


cdef inline bint _same_addr(const sockaddr* a, const SockAddr* b) noexcept nogil:
    cdef const sockaddr_in* a4
    cdef const sockaddr_in6* a6
    if a.sa_family != b.sa.sa_family:
        return False
    if a.sa_family == AF_INET:
        a4 = <const sockaddr_in*>a
        return a4.sin_port == b.v4.sin_port and a4.sin_addr.s_addr == b.v4.sin_addr.s_addr
    a6 = <const sockaddr_in6*>a
    return (a6.sin6_port == b.v6.sin6_port and a6.sin6_scope_id == b.v6.sin6_scope_id
            and memcmp(&a6.sin6_addr, &b.v6.sin6_addr, 16) == 0)


cdef object _sockaddr_to_py(const sockaddr* sa):
    """The address as the socket module spells it: (host, port), or for IPv6
    (host, port, flowinfo, scope_id)."""
    cdef char host[64]
    cdef const sockaddr_in* sin
    cdef const sockaddr_in6* sin6
    if sa.sa_family == AF_INET:
        sin = <const sockaddr_in*>sa
        inet_ntop(AF_INET, &sin.sin_addr, host, sizeof(host))
        return (PyUnicode_FromString(host), ntohs(sin.sin_port))
    if sa.sa_family == AF_INET6:
        sin6 = <const sockaddr_in6*>sa
        inet_ntop(AF_INET6, &sin6.sin6_addr, host, sizeof(host))
        return (PyUnicode_FromString(host), ntohs(sin6.sin6_port), ntohl(sin6.sin6_flowinfo),
                sin6.sin6_scope_id)
    return None


cdef bint _write_sealed_by_method(object stream, bytes packet, Session session,
                                  uint64_t counter, bytes payload, PieceCipher pieces,
                                  bint payload_follows) except -1:
    """The stream writer until msgnet._stream registers its own: the Python method call."""
    return stream.write_sealed(packet, session, counter, payload, pieces, payload_follows)


cdef StreamWriter _stream_writer = _write_sealed_by_method


cdef int register_stream_writer(StreamWriter writer) except -1:
    """How _seal_to_stream hands a sealed packet to its connection (see _engine.pxd)."""
    global _stream_writer
    _stream_writer = writer
    return 0


cdef uint64_t _request_id(object request_id) except? 0:
    """A request or response's id as the wire's varint takes it, or UsageError. In C: the
    Python comparisons with 2**63 this replaces cost about 250 ns per request and reply."""
    cdef uint64_t rid = 1ULL << 63
    if isinstance(request_id, int):
        try:
            rid = request_id
        except OverflowError:
            pass  # negative, or too large for 64 bits
    if rid >= 1ULL << 63:
        raise UsageError("a request or response needs a request_id in 0..2**63-1")
    return rid


cdef PyObject* _new_payload(Py_ssize_t room) except NULL:
    """A new bytes object of room bytes to write a payload's frames into (its one reference
    is the caller's)."""
    cdef object payload = PyBytes_FromStringAndSize(NULL, room)
    Py_INCREF(payload)
    return <PyObject*>payload


cdef int _cut_payload(PyObject** payload, Py_ssize_t used, list payloads) except -1:
    """Cut *payload to its used bytes and move it to payloads; *payload is NULL after."""
    cdef PyObject* done = payload[0]
    payload[0] = NULL
    _PyBytes_Resize(&done, used)  # raises, done freed, if it fails
    payloads.append(<object>done)
    Py_DECREF(<object>done)
    return 0


cdef Py_ssize_t _best_effort_limit(Session s, int alias) except -1:
    """limits.max_best_effort_payload for the protocol of s's alias: a best-effort message
    larger than a base datagram carries goes in one datagram of a larger path only within
    the bound that fragments give it on every path (docs/wire.md 5.1)."""
    return C_MAX_BEST_EFFORT_FRAGMENTS * (C_BASE_PAYLOAD - C_FRAGMENT_INIT_OVERHEAD
                                          - PyBytes_GET_SIZE(s._out_encoded[alias]))


cdef str _too_large(Py_ssize_t size, int max_datagram):
    return (f"a {size}-byte message does not go in one {max_datagram}-byte datagram, or is "
            "more than best effort carries in one (the delivery layer fragments it, within "
            "its bound: MessageHost.send_message)")


cdef Py_ssize_t _whole_frames(const uint8_t* p, Py_ssize_t n, Py_ssize_t budget) noexcept:
    """Length of the longest run of whole frames at the start of p[0:n] within budget bytes
    and MAX_FRAMES_PER_PACKET frames."""
    cdef FrameView fv
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t end = 0
    cdef int frames = 0
    while (frames < C_MAX_FRAMES_PER_PACKET and read_frame(p, n, &pos, &fv) == READ_OK
           and pos <= budget):
        end = pos
        frames += 1
    return end


# ---------------------------------------------------------------------------
# Message
# ---------------------------------------------------------------------------

@cython.freelist(64)
cdef class Message:
    """One received message, handed to the protocol's handler.

    ``data`` is the message's own bytes (never a view of the engine's receive ring), so a
    handler may keep it. ``from_peer`` is the PeerID the session's handshake proved.
    """

    def __init__(self):
        raise TypeError("messages are created by the engine")

    @property
    def is_request(self) -> bool:
        return self.flags & FLAG_REQUEST != 0

    def reply(self, data) -> None:
        """Queue a RESPONSE with this request's id on the same protocol and session.

        The reply has the request's guarantee: reliable requests get reliable replies, and a
        reply larger than one packet goes through the delivery layer (fragmented). Never
        blocks: when the session's queue is full, or the session is gone, the reply is dropped
        and counted (``reply_dropped``); the requester times out.
        """
        if not self.flags & FLAG_REQUEST:
            raise UsageError("reply() answers a request; this message is not one")
        cdef Session s = self.session
        cdef UdpEngine engine = s.engine
        if s._closed or engine._closed:
            engine._counters[CNT_REPLY_DROPPED] += 1
            return
        if not self.flags & FLAG_RELIABLE:
            try:
                if not engine._send(s, self.protocol, data, FLAG_RESPONSE, self.request_id):
                    engine._counters[CNT_REPLY_DROPPED] += 1
                return
            except MessageTooLargeError:
                pass  # more than one packet: the delivery layer fragments it
        engine._delegate.send_reply(s, self.protocol, data, self.request_id,
                                    bool(self.flags & FLAG_RELIABLE),
                                    bool(self.flags & FLAG_ORDERED))

    def __repr__(self):
        rid = "" if self.request_id is None else f" request_id={self.request_id}"
        return (f"<Message {self.protocol!r} from {self.from_peer} {len(self.data)} bytes "
                f"flags=0x{self.flags:02x}{rid}>")


# ---------------------------------------------------------------------------
# Session
# ---------------------------------------------------------------------------

cdef class Session:
    """One secure session with one peer: keys, protocol aliases in both directions, the send
    queue of plaintext payloads, and the last sent packets (for SESSION_UNKNOWN recovery).

    Created by ``UdpEngine.new_session``; the engine reads and writes it from C.
    """

    def __init__(self):
        raise TypeError("sessions are created by UdpEngine.new_session")

    def __dealloc__(self):
        self._release_retained()
        if self._cur != NULL:
            if self.engine is not None:
                self.engine._give_buffer(self._cur, self._cap)
            else:  # the cycle collector cleared engine first
                PyMem_Free(self._cur)
            self._cur = NULL

    @property
    def address(self):
        """The peer's (host, port), or (host, port, flowinfo, scope_id) for IPv6; None before
        the keys are installed."""
        return self._get_address()

    @property
    def sends_on_stream(self) -> bool:
        """Whether its packets go on its stream connection (see UdpEngine.set_path), so
        messages need no acknowledgements, retransmissions or fragments of msgnet's own."""
        return self.stream is not None and (not self._udp or not self._salen
                                            or self.engine.sock is None)

    @property
    def duplicated(self) -> bool:
        """Whether every packet goes on both its paths (first contact, before the ACK)."""
        return self._duplicate

    @property
    def retained_count(self) -> int:
        """How many sent packets are kept for SESSION_UNKNOWN recovery (docs/wire.md §2.5):
        at most RETAIN_SENT_PACKETS, none older than RETAIN_SENT_TIME once purged."""
        return self._ret_count

    @property
    def queued_bytes(self) -> int:
        """Plaintext bytes waiting to be sealed and sent."""
        return self._queued_bytes + self._cur_len

    @property
    def protocols_in(self) -> dict:
        """The peer's aliases we learnt from INIT: {alias: protocol}."""
        return dict(self._in_protocols) if self._in_protocols is not None else {}

    @property
    def protocols_out(self) -> dict:
        """Our aliases: {protocol: alias}."""
        return dict(self._out_aliases) if self._out_aliases is not None else {}

    def is_bound(self, str protocol not None) -> bool:
        """Whether the peer confirmed our alias for protocol (we then send CONTINUATION)."""
        if self._out_aliases is None:
            return False
        alias = self._out_aliases.get(protocol)
        return alias is not None and self._is_bound(alias)

    def retained_since(self, uint64_t counter, bytes tag not None):
        """The plaintext payloads of the retained packets from ``counter`` on, if (counter, tag)
        is a packet this session sent less than RETAIN_SENT_TIME ago; else None.

        This is how a SESSION_UNKNOWN is authenticated (only a party that saw the packet knows
        its tag) and how the frames the peer lost are recovered (docs/wire.md §2.5). The
        delivery layer's packets are retained without their payloads (it retransmits their
        messages itself): they authenticate, and add nothing to the list.
        """
        cdef int k, j
        cdef Retained* r
        cdef Retained* kept
        if len(tag) != AEAD_TAG_SIZE:
            return None
        self._purge_retained(self.engine._loop_time())
        for k in range(self._ret_count):
            r = &self._ret[(self._ret_head + k) % self._ret_cap]
            if (r.counter == counter
                    and memcmp(r.tag, PyBytes_AS_STRING(tag), AEAD_TAG_SIZE) == 0):
                payloads = []
                for j in range(k, self._ret_count):
                    kept = &self._ret[(self._ret_head + j) % self._ret_cap]
                    if kept.payload != NULL:
                        payloads.append(<bytes>kept.payload)
                return payloads
        return None

    def __repr__(self):
        state = "established" if self.established else "handshaking"
        return (f"<Session {self.peer_id} local={self.local_index:#010x} "
                f"remote={self.remote_index:#010x} {state} {self.address}>")

    cdef object _get_address(self):
        if self._address is None and self._salen:
            self._address = _sockaddr_to_py(&self._sa.sa)
        return self._address

    cdef int _alias(self, str protocol) except -1:
        """Our alias for protocol, numbering a new one (from 0) the first time."""
        if protocol is self._last_protocol:
            return self._last_alias
        if self._out_aliases is None:
            self._out_aliases = {}
            self._out_protocols = []
            self._out_encoded = []
        alias = self._out_aliases.get(protocol)
        if alias is not None:
            self._last_protocol = protocol
            self._last_alias = alias
            return alias
        try:
            encoded = protocol.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"protocol {protocol!r} is not valid UTF-8") from None
        if not 0 < len(encoded) <= C_MAX_PROTOCOL_LENGTH:
            raise UsageError(f"protocol id must be 1 to {C_MAX_PROTOCOL_LENGTH} bytes of UTF-8")
        alias = len(self._out_protocols)
        if alias >= C_MAX_ALIASES:
            raise UsageError(f"more than {C_MAX_ALIASES} protocols on one session")
        self._out_aliases[protocol] = alias
        self._out_protocols.append(protocol)
        self._out_encoded.append(encoded)
        return alias

    cdef object _in_protocol(self, uint64_t alias):
        """The protocol the peer bound alias to, or None."""
        if alias == self._last_in_alias and self._last_in_protocol is not None:
            return self._last_in_protocol
        if self._in_protocols is None:
            return None
        protocol = self._in_protocols.get(alias)
        if protocol is not None:
            self._last_in_alias = alias
            self._last_in_protocol = <str>protocol
        return protocol

    cdef uint8_t* _reserve(self, Py_ssize_t size, bint force) except? NULL:
        """Room for a size-byte frame at the end of the open payload (opening one if none is),
        closing it into the queue first if the frame does not fit. NULL if that would grow a
        full queue (unless force).
        """
        if self._cur != NULL and (self._cur_len + size > self._cap
                                  or self._cur_frames >= C_MAX_FRAMES_PER_PACKET):
            if not force and self._queue_full():
                return NULL
            self._close_payload()
        if self._cur == NULL:
            self._cur = self.engine._take_buffer(self._cap)
            self._cur_len = 0
            self._cur_frames = 0
        self._cur_frames += 1  # every caller writes one frame here
        return self._cur + self._cur_len

    cdef bytes _take_cur(self):
        """The open payload's frames as a bytes object of their length (None if there are
        none); the buffer goes back to the engine's pool."""
        cdef bytes payload = None
        if self._cur == NULL:
            return None
        if self._cur_len:
            payload = PyBytes_FromStringAndSize(<const char*>self._cur, self._cur_len)
        self.engine._give_buffer(self._cur, self._cap)
        self._cur = NULL
        self._cur_len = 0
        return payload

    cdef int _close_payload(self) except -1:
        cdef bytes payload = self._take_cur()
        if payload is not None:
            if self._queue is None:
                self._queue = []
            self._queue.append(payload)
            self._queued_bytes += PyBytes_GET_SIZE(payload)
        return 0

    cdef bytes _pop_payload(self):
        cdef bytes payload = self._queue[self._queue_head]
        self._queue[self._queue_head] = None
        self._queue_head += 1
        if self._queue_head == len(self._queue):
            self._queue = None
            self._queue_head = 0
        elif self._queue_head >= 64 and 2 * self._queue_head > len(self._queue):
            del self._queue[:self._queue_head]
            self._queue_head = 0
        self._queued_bytes -= PyBytes_GET_SIZE(payload)
        return payload

    cdef int _wake_drained(self, object error) except -1:
        """Resolve wait_drained() futures once the queue is below half (or fail them)."""
        if not self._drain_waiters:
            return 0
        if error is None and not self._below_half():
            return 0
        waiters = self._drain_waiters
        self._drain_waiters = None
        for future in waiters:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        return 0

    cdef int _retain(self, uint64_t counter, const uint8_t* tag, bytes payload,
                     double now) except -1:
        """Keep packet counter's tag, and its payload unless that is None (docs/wire.md 2.5)."""
        cdef Retained* r
        cdef Retained* grown
        cdef int cap, k
        if self._ret_count == self._ret_cap:
            if self._ret_cap < C_RETAIN_PACKETS:
                # Grow (4, 8 ... 64 entries): a session that sends now and then keeps a few.
                cap = 4 if self._ret_cap == 0 else min(2 * self._ret_cap, C_RETAIN_PACKETS)
                grown = <Retained*>PyMem_Malloc(cap * sizeof(Retained))
                if grown == NULL:
                    raise MemoryError()
                for k in range(self._ret_count):
                    grown[k] = self._ret[(self._ret_head + k) % self._ret_cap]
                if self._ret == NULL:
                    self.engine._retaining.append(self)
                PyMem_Free(self._ret)
                self._ret = grown
                self._ret_cap = cap
                self._ret_head = 0
            else:  # full: the oldest makes room
                r = &self._ret[self._ret_head]
                Py_XDECREF(r.payload)
                r.payload = NULL
                self._ret_head = (self._ret_head + 1) % self._ret_cap
                self._ret_count -= 1
        r = &self._ret[(self._ret_head + self._ret_count) % self._ret_cap]
        r.counter = counter
        r.time = now
        memcpy(r.tag, tag, AEAD_TAG_SIZE)
        if payload is None:
            r.payload = NULL
        else:
            Py_INCREF(payload)
            r.payload = <PyObject*>payload
        self._ret_count += 1
        return 0

    cdef bint _purge_retained(self, double now) noexcept:
        """Forget retained packets sent RETAIN_SENT_TIME ago or earlier (no SESSION_UNKNOWN
        may name them any more); free the ring once empty. True if the ring is gone."""
        cdef Retained* r
        while self._ret_count:
            r = &self._ret[self._ret_head]
            if now - r.time < _RETAIN_SENT_TIME:
                return False
            Py_XDECREF(r.payload)
            r.payload = NULL
            self._ret_head = (self._ret_head + 1) % self._ret_cap
            self._ret_count -= 1
        self._release_retained()
        return True

    cdef void _release_retained(self) noexcept:
        cdef int k
        if self._ret == NULL:
            return
        for k in range(self._ret_count):
            Py_XDECREF(self._ret[(self._ret_head + k) % self._ret_cap].payload)
        PyMem_Free(self._ret)
        self._ret = NULL
        self._ret_cap = self._ret_head = self._ret_count = 0

    cdef int _set_address(self, object addr, int family) except -1:
        """Store addr (numeric host) as the C sockaddr; the address property then reads it
        back in its canonical Python form."""
        cdef sockaddr_in* sin = &self._sa.v4
        cdef sockaddr_in6* sin6 = &self._sa.v6
        cdef bytes host
        cdef int port
        try:
            host = addr[0].encode("ascii")
            port = addr[1]
        except (TypeError, IndexError, AttributeError, UnicodeError, OverflowError):
            raise UsageError(f"bad address {addr!r}: want (host, port)") from None
        if not 0 <= port <= 0xFFFF:
            raise UsageError(f"bad port in {addr!r}")
        memset(&self._sa, 0, sizeof(self._sa))
        self._salen = 0
        self._address = None
        if family == AF_INET:
            if inet_pton(AF_INET, host, &sin.sin_addr) != 1:
                raise UsageError(f"{addr!r} is not a numeric IPv4 address")
            sin.sin_family = AF_INET
            sin.sin_port = htons(<uint16_t>port)
            self._salen = sizeof(sockaddr_in)
        else:
            if inet_pton(AF_INET6, host, &sin6.sin6_addr) != 1:
                # An IPv4 address on a dual-stack socket: its IPv4-mapped form ::ffff:a.b.c.d.
                if inet_pton(AF_INET, host, &sin6.sin6_addr.s6_addr[12]) != 1:
                    raise UsageError(f"{addr!r} is not a numeric IP address")
                sin6.sin6_addr.s6_addr[10] = 0xFF
                sin6.sin6_addr.s6_addr[11] = 0xFF
            sin6.sin6_family = AF_INET6
            sin6.sin6_port = htons(<uint16_t>port)
            if len(addr) >= 4:
                sin6.sin6_flowinfo = htonl(addr[2])
                sin6.sin6_scope_id = addr[3]
            self._salen = sizeof(sockaddr_in6)
        return 0


# ---------------------------------------------------------------------------
# The create_datagram_endpoint fallback
# ---------------------------------------------------------------------------

cdef class _EndpointProtocol:
    """Hands each datagram of a create_datagram_endpoint transport to the engine's C path."""

    cdef UdpEngine engine

    def connection_made(self, transport):
        self.engine._transport = transport

    def datagram_received(self, bytes data, addr):
        self.engine._feed(data, addr)

    def error_received(self, exc):
        """ICMP errors on an unconnected socket say nothing the sessions act on."""

    def connection_lost(self, exc):
        self.engine._transport = None

    def pause_writing(self):
        """The transport buffers; the sessions' bounded queues are the back-pressure."""

    def resume_writing(self):
        """See pause_writing."""


# ---------------------------------------------------------------------------
# The network's send route
# ---------------------------------------------------------------------------

cdef class PeerPath:
    """How the network reaches one peer (docs/wire.md §5): its UDP address, our TCP connection
    to it, which of them its sessions send on, and what tells a silent UDP path from a quiet
    peer. The network's (msgnet.network), a C class so that SendRoute reads expect_since per
    request without a Python attribute lookup."""

    def __init__(self):
        self.udp = None          # the peer's UDP address, when known
        self.stream = None       # our StreamConnection to it
        self.mode = "udp"        # "udp", "tcp", or "both" until the ACK
        self.transports = ()     # its transport ids (its handshake payload)
        self.started = 0.0       # when the current first contact completed
        self.expect_since = 0.0  # awaiting a UDP packet since (0: not)
        self.stream_rx = 0.0     # last authenticated packet on the stream
        self.dialing = None      # an asyncio.Task: a TCP connect in progress
        self.move_since = 0.0    # the peer talks on another connection

    def open_stream(self):
        stream = self.stream
        return stream if stream is not None and not stream.closed else None


cdef class SendRoute:
    """Which session a MessageNetwork's messages to a peer go on, found by C calls: the
    per-message send paths (MessageNetwork.send_message_nowait, the request table) start
    here. It remembers the peer sent to last (a peer's messages come in runs) and otherwise
    looks the peer up in the network's sessions, most recently used last, as the network
    would (fan-out changes peer on every message). The Python-level lookup it replaces cost
    about a tenth of a request/response round trip.

    ``enabled`` is False while the network remembers a protocol refusal (the route checks
    none) or is closed: then only the network's own path sends. The network clears the
    remembered peer whenever a peer's sending session or path may change.
    """

    def __init__(self, loop_time, sessions, dict paths not None):
        self._time = loop_time    # loop.time, bound once
        self._sessions = sessions  # the network's OrderedDict: peer -> sending Session
        self._paths = paths        # the network's dict: peer -> PeerPath
        self.enabled = True

    cdef Session _lookup(self, peer_id):
        cdef PyObject* found
        cdef Session s
        if peer_id is self._peer_id:
            return self._session
        if not self.enabled or peer_id is None:
            return None
        found = PyDict_GetItem(self._sessions, peer_id)  # (an OrderedDict is a dict)
        if found == NULL:
            return None
        s = <Session>found
        self._sessions.move_to_end(peer_id)
        self._peer_id = peer_id
        self._session = s
        found = PyDict_GetItem(self._paths, peer_id)
        self._path = <object>found if found != NULL else None
        return s

    cpdef Session session_of(self, peer_id):
        """The peer's sending session (and now the remembered one), or None: no session, or
        the route is not enabled."""
        return self._lookup(peer_id)

    cpdef clear(self):
        """Forget the remembered peer (its session or path may have changed)."""
        self._peer_id = None
        self._session = None
        self._path = None

    cpdef double now(self) except? -1.0:
        """loop.time(), read once per receive batch: inside one of the engine of the session
        sent to last (a request sent from a reply's callback), the time it read for the batch,
        which is what uvloop's loop.time() answers then too (it reads its clock once per loop
        iteration). Cheaper than a loop.time() call; request timeouts run from it."""
        cdef UdpEngine engine = self._session.engine if self._session is not None else None
        if engine is not None and engine._in_batch:
            return engine._now
        return self._time()

    cpdef int send(self, peer_id, str protocol, data, int flags=0, request_id=0) except -2:
        """Queue a message for peer_id: 1 if queued, 0 if the session's queue is full
        (back-pressure), -1 if the route has no session for it (then the caller takes the
        network's general path: dialling, refusals). Raises what UdpEngine.send_message
        raises.

        A request marks the peer's UDP path as awaiting a reply: the reply is what shows the
        path still works (MessageNetwork's path checks)."""
        cdef PeerPath path
        cdef Session s = self._lookup(peer_id)
        if s is None or protocol is None:
            return -1
        if flags & FLAG_REQUEST:
            path = self._path
            if path is not None and not path.expect_since and path.mode == "udp":
                path.expect_since = self._time()
        return s.engine._send(s, protocol, data, flags, request_id)


# ---------------------------------------------------------------------------
# UdpEngine
# ---------------------------------------------------------------------------

cdef class UdpEngine:
    """Owns one bound UDP socket: receives, opens and dispatches datagrams; coalesces, seals and
    sends the sessions' frames. See the module docstring for why it reads the socket itself.

    ``delegate`` gets what is off the hot path: ``handle_control(data, addr)``,
    ``handle_response(session, request_id, data)``, ``handle_reset(session, protocol, code)``,
    ``handle_pong(session, data)``, ``handle_ack(session, transport_id)``,
    ``handle_close(session, code, reason)``,
    ``handle_delivery_ack(session, largest, ack_delay_us, first_range, ranges)`` (the frame's
    fields, decoded: DeliveryConnection.on_ack's arguments), and, if it has it,
    ``handle_udp_packet(session)`` for a datagram that authenticated for a session sending on
    a stream. SEQ frames go to ``handle_fragment`` if the delegate has it, until it
    sets ``session.delivery`` (a DeliveryConnection): then to that connection's ``receive``.

    Sessions may also send on a TCP connection (``set_path``): flush then writes each sealed
    packet to the connection, length-prefixed, instead of sendmmsg, and ``feed_stream`` runs
    packets that arrived on one through the same receive path. An engine made with sock=None
    reads no socket and has only such sessions (a host without UDP).
    ``handlers`` maps protocol -> callable(Message); the owner mutates it, the engine looks up
    each message's protocol in it.
    """

    def __cinit__(self):
        self._rx_buf = NULL
        self._rx_hdrs = NULL
        self._rx_iov = NULL
        self._rx_addrs = NULL
        self._rx_cmsg = NULL
        self._tx_buf = NULL
        self._tx_hdrs = NULL
        self._tx_iov = NULL
        self._tx_units = NULL
        self._tx_unit_len = NULL
        self._tx_cmsg = NULL

    def __init__(self, sock, loop, delegate, dict handlers not None, *,
                 int max_datagram=limits.MAX_DATAGRAM, int batch=64, int max_rounds=8,
                 use_recvmmsg=None, int max_queue_payloads=256, use_gso=None,
                 use_gro=None):
        cdef int i
        if not limits.MAX_DATAGRAM <= max_datagram <= C_DATAGRAM_CEILING:
            raise UsageError(f"max_datagram must be {limits.MAX_DATAGRAM} to "
                             f"{C_DATAGRAM_CEILING}")
        if not 1 <= batch <= 1024 or max_rounds < 1 or max_queue_payloads < 1:
            raise UsageError("batch must be 1 to 1024; max_rounds and max_queue_payloads >= 1")
        if sock is None:  # a stream-only engine: it reads no socket (a host without UDP)
            use_recvmmsg = use_gso = False
        elif sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET,
                                                                    socket.AF_INET6):
            raise UsageError("the engine needs an IPv4 or IPv6 UDP socket, or None")
        if use_recvmmsg is None:
            use_recvmmsg = HAVE_RECVMMSG
        elif use_recvmmsg and not HAVE_RECVMMSG:
            raise UsageError("recvmmsg is not available on this platform")
        if use_gso is None:
            use_gso = HAVE_GSO
        elif use_gso and not HAVE_GSO:
            raise UsageError("UDP GSO is not available on this platform")
        if not use_recvmmsg:
            use_gro = False  # the endpoint path reads one datagram at a time
        elif use_gro is None or use_gro:
            try:
                sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
            except OSError:
                if use_gro:
                    raise UsageError("UDP GRO is not available on this platform") from None
                use_gro = False
            else:
                use_gro = True
        if sock is not None:
            sock.setblocking(False)
        # Sessions may probe for larger datagrams only where IP will not fragment them.
        self.probes_path = (sock is not None and max_datagram > limits.MAX_DATAGRAM
                            and _set_dont_fragment(sock))
        self.sock = sock
        self.loop = loop
        self.sessions = {}
        self.transport_id = 1
        self.max_datagram = max_datagram
        self.use_recvmmsg = use_recvmmsg
        self._delegate = delegate
        self._handlers = handlers
        self._fd = sock.fileno() if sock is not None else -1
        self._family = AF_INET6 if sock is not None and sock.family == socket.AF_INET6 else AF_INET
        self._batch = batch
        self._max_rounds = max_rounds
        self._max_queue = max_queue_payloads
        self._on_control = delegate.handle_control
        self._on_response = delegate.handle_response
        self._on_reset = delegate.handle_reset
        self._on_pong = delegate.handle_pong
        self._on_ack = delegate.handle_ack
        self._on_close = delegate.handle_close
        self._on_delivery_ack = delegate.handle_delivery_ack
        self._on_fragment = getattr(delegate, "handle_fragment", None)
        self._on_packet_received = getattr(delegate, "handle_packet_received", None)
        self._on_confirmed = getattr(delegate, "handle_confirmed", None)
        self._on_udp_packet = getattr(delegate, "handle_udp_packet", None)
        self._loop_time = loop.time
        self._flush_cb = self._run_flush
        self._dirty = []
        self._retaining = []
        self._tx_owner = [None] * batch

        self._gso = use_gso
        self._tx_buf = <uint8_t*>PyMem_Malloc(batch * max_datagram)
        self._tx_hdrs = <mmsghdr*>PyMem_Malloc(batch * sizeof(mmsghdr))
        self._tx_iov = <iovec*>PyMem_Malloc(batch * sizeof(iovec))
        self._tx_units = <mmsghdr*>PyMem_Malloc(batch * sizeof(mmsghdr))
        self._tx_unit_len = <int*>PyMem_Malloc(batch * sizeof(int))
        self._tx_cmsg = <char*>PyMem_Malloc(batch * MSGNET_GSO_CMSG_SPACE)
        self._gro = use_gro
        self._rx_batch = min(batch, C_GRO_BATCH) if use_gro else batch
        self._rx_slot = C_GRO_SLOT if use_gro else C_RX_SLOT
        if use_recvmmsg:
            self._rx_buf = <uint8_t*>PyMem_Malloc(self._rx_batch * self._rx_slot)
            self._rx_hdrs = <mmsghdr*>PyMem_Malloc(self._rx_batch * sizeof(mmsghdr))
            self._rx_iov = <iovec*>PyMem_Malloc(self._rx_batch * sizeof(iovec))
            self._rx_addrs = <sockaddr_storage*>PyMem_Malloc(
                self._rx_batch * sizeof(sockaddr_storage))
            self._rx_cmsg = <char*>PyMem_Malloc(self._rx_batch * MSGNET_GRO_CMSG_SPACE)
            if (self._rx_buf == NULL or self._rx_hdrs == NULL or self._rx_iov == NULL
                    or self._rx_addrs == NULL or self._rx_cmsg == NULL):
                raise MemoryError()
        if (self._tx_buf == NULL or self._tx_hdrs == NULL or self._tx_iov == NULL
                or self._tx_units == NULL or self._tx_unit_len == NULL or self._tx_cmsg == NULL):
            raise MemoryError()
        memset(self._tx_hdrs, 0, batch * sizeof(mmsghdr))
        memset(self._tx_units, 0, batch * sizeof(mmsghdr))
        for i in range(batch):
            self._tx_iov[i].iov_base = self._tx_buf + i * max_datagram
            self._tx_hdrs[i].msg_hdr.msg_iov = &self._tx_iov[i]
            self._tx_hdrs[i].msg_hdr.msg_iovlen = 1
        if use_recvmmsg:
            memset(self._rx_hdrs, 0, self._rx_batch * sizeof(mmsghdr))
            for i in range(self._rx_batch):
                self._rx_iov[i].iov_base = self._rx_buf + i * self._rx_slot
                self._rx_iov[i].iov_len = self._rx_slot
                self._rx_hdrs[i].msg_hdr.msg_iov = &self._rx_iov[i]
                self._rx_hdrs[i].msg_hdr.msg_iovlen = 1
                self._rx_hdrs[i].msg_hdr.msg_name = &self._rx_addrs[i]
                if use_gro:
                    self._rx_hdrs[i].msg_hdr.msg_control = self._rx_cmsg + i * MSGNET_GRO_CMSG_SPACE
            self._rx_filled = self._rx_batch  # (their lengths are set before the first read)

    def __dealloc__(self):
        cdef int i
        for i in range(self._pool_len):
            PyMem_Free(self._pool[i])
        for i in range(self._stream_pool_len):
            PyMem_Free(self._stream_pool[i])
        PyMem_Free(self._rx_buf)
        PyMem_Free(self._rx_hdrs)
        PyMem_Free(self._rx_iov)
        PyMem_Free(self._rx_addrs)
        PyMem_Free(self._rx_cmsg)
        PyMem_Free(self._tx_buf)
        PyMem_Free(self._tx_hdrs)
        PyMem_Free(self._tx_iov)
        PyMem_Free(self._tx_units)
        PyMem_Free(self._tx_unit_len)
        PyMem_Free(self._tx_cmsg)

    cdef uint8_t* _take_buffer(self, Py_ssize_t size) except NULL:
        """A payload buffer of size bytes: from a pool when that is a datagram's payload at the
        base size (MAX_DATAGRAM - 29: every session's until PMTU discovery raises it) or a
        stream session's (C_STREAM_COALESCE), else a new one. (Buffers of the exact size: a
        loop iteration that writes to many sessions holds one per session.)"""
        cdef uint8_t* buf
        if self._pool_len and size == C_BASE_PAYLOAD:
            self._pool_len -= 1
            return self._pool[self._pool_len]
        if self._stream_pool_len and size == C_STREAM_COALESCE:
            self._stream_pool_len -= 1
            return self._stream_pool[self._stream_pool_len]
        buf = <uint8_t*>PyMem_Malloc(size)
        if buf == NULL:
            raise MemoryError()
        return buf

    cdef void _give_buffer(self, uint8_t* buf, Py_ssize_t size) noexcept:
        if size == C_BASE_PAYLOAD and self._pool_len < C_BUFFER_POOL:
            self._pool[self._pool_len] = buf
            self._pool_len += 1
        elif size == C_STREAM_COALESCE and self._stream_pool_len < C_STREAM_BUFFER_POOL:
            self._stream_pool[self._stream_pool_len] = buf
            self._stream_pool_len += 1
        else:
            PyMem_Free(buf)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self):
        """Start receiving. Returns a future done once the engine reads the socket: at once on
        the recvmmsg path, after create_datagram_endpoint on the fallback (awaiting it is
        optional; datagrams wait in the socket meanwhile)."""
        if self._closed:
            raise ClosedError("engine is closed")
        if self._reading:
            raise UsageError("engine already started")
        self._reading = True
        if self.use_recvmmsg or self.sock is None:
            if self.sock is not None:
                self.loop.add_reader(self._fd, self._on_readable)
            started = self.loop.create_future()
            started.set_result(None)
            return started
        return asyncio.ensure_future(self._open_endpoint(), loop=self.loop)

    async def _open_endpoint(self):
        # The transport gets its own descriptor (a dup): it closes it on its own schedule
        # (uvloop: after close() returns), so the owner closing sock at once cannot race it
        # into closing a reused descriptor number.
        protocol = _EndpointProtocol()
        protocol.engine = self
        transport, _ = await self.loop.create_datagram_endpoint(lambda: protocol,
                                                                sock=self.sock.dup())
        if self._closed:
            transport.close()

    def close(self):
        """Stop reading and writing; fail wait_drained() futures. The socket's owner closes it
        (the fallback path's transport closes its own duplicate descriptor)."""
        if self._closed:
            return
        self._closed = True
        if self._reading and self.use_recvmmsg:
            self.loop.remove_reader(self._fd)
        if self._writer_armed:
            self.loop.remove_writer(self._fd)
            self._writer_armed = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        error = ClosedError("engine closed")
        for s in self.sessions.values():
            (<Session>s)._wake_drained(error)

    # -- sessions --------------------------------------------------------------------------

    def set_response_handler(self, handler not None):
        """Call handler(session, request_id, data) for RESPONSE frames instead of the
        delegate's handle_response: the host's request table, without a hop between."""
        self._on_response = handler

    def new_session(self, peer_id, uint64_t local_index, bint initiator) -> Session:
        """A session bound to this engine (not yet registered: see add_session)."""
        if not 0 < local_index <= 0xFFFFFFFF:
            raise UsageError("local_index must be a non-zero u32")
        cdef Session s = Session.__new__(Session)
        s.engine = self
        s.peer_id = peer_id
        s.local_index = <uint32_t>local_index
        s.initiator = initiator
        s.created = self._loop_time()
        s.datagram_size = limits.MAX_DATAGRAM  # until PMTU discovery raises it
        s._cap = limits.MAX_DATAGRAM - DATA_OVERHEAD
        s._max_queue = self._max_queue
        s._udp = True
        s._transport_id = <uint16_t>self.transport_id
        return s

    def add_session(self, Session session not None):
        """Route DATA whose receiver index is session.local_index to session."""
        if session.engine is not self:
            raise UsageError("session belongs to another engine")
        other = self.sessions.get(session.local_index)
        if other is not None and other is not session:
            raise UsageError(f"local index {session.local_index:#010x} is in use")
        self.sessions[session.local_index] = session

    def remove_session(self, Session session not None):
        """Forget session: its packets become unknown, its queue is dropped, its
        wait_drained() futures fail with ClosedError. Safe for unregistered sessions."""
        if self.sessions.get(session.local_index) is session:
            del self.sessions[session.local_index]
        if self._last_rx is session:
            self._last_rx = None
        session._closed = True
        session._queue = None
        session._queue_head = 0
        session._queued_bytes = 0
        if session._cur != NULL:
            self._give_buffer(session._cur, session._cap)
            session._cur = NULL
        session._cur_len = 0
        session.stream = None
        session.rx_stream = None
        session._release_retained()
        session._wake_drained(ClosedError("session closed"))

    def install_keys(self, Session session not None, uint32_t remote_index,
                     SessionCrypto crypto not None, addr):
        """Mark session established with these keys and the peer's UDP address addr (numeric
        host; None when the handshake came by a stream alone), then send what it queued while
        handshaking, on the session's path (set_path)."""
        if crypto.local_index != session.local_index or crypto.remote_index != remote_index:
            raise UsageError("crypto's indices do not match the session")
        if addr is not None:
            session._set_address(addr, self._family)
        session.remote_index = remote_index
        session.crypto = crypto
        session.established = True
        self.flush_session(session, False)

    # -- receiving -------------------------------------------------------------------------

    def _on_readable(self):
        """The add_reader callback: read, then send what the handlers queued (replies, BOUND)
        at once, coalesced per session, instead of an event-loop iteration later."""
        cdef int read = 0
        self._in_batch = True
        self._sent_early = False
        try:
            read = self._read_batches()
        finally:
            self._in_batch = False
            if self._dirty and not self._closed:
                # A batch that read datagrams read the clock just before: no need to again.
                self._flush_all(self._now if read else self._loop_time())
            elif self._tx_count and not self._closed:
                self._drain_tx()  # packets sealed during the batch (send_payload)

    cdef int _read_batches(self) except -1:
        """At most max_rounds recvmmsg batches, so a flood cannot starve the rest of the loop.
        Returns the number of datagrams read.

        The GIL stays held around recvmmsg and sendmmsg, as uvloop holds it for its own sends:
        on a non-blocking socket they return in microseconds, releasing and re-taking the GIL
        costs about 400 instructions per call, and with another thread running Python, taking
        it back could stall the event loop for up to the switch interval (5 ms)."""
        cdef int rounds, i, n, err = 0, total = 0
        cdef int batch = self._rx_batch
        cdef mmsghdr* hdr
        for rounds in range(self._max_rounds):
            # The kernel rewrote the address and control lengths of the slots it filled last
            # time, and only those: a lone datagram per wake-up resets one slot, not the batch.
            for i in range(self._rx_filled):
                self._rx_hdrs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                if self._gro:
                    self._rx_hdrs[i].msg_hdr.msg_controllen = MSGNET_GRO_CMSG_SPACE
            self._rx_filled = 0
            n = recvmmsg(self._fd, self._rx_hdrs, batch, MSG_DONTWAIT, NULL)
            if n > 0:
                self._rx_filled = n
            if n < 0:
                err = errno
                if err == EINTR:
                    continue
                if not MSGNET_WOULD_BLOCK(err):
                    self._report("msgnet: recvmmsg failed", OSError(err, os.strerror(err)),
                                 None)
                return total
            total += n
            self._now = self._loop_time()
            for i in range(n):
                hdr = &self._rx_hdrs[i]
                if self._read(self._rx_buf + i * self._rx_slot, hdr.msg_len,
                              hdr.msg_hdr.msg_flags & MSG_TRUNC,
                              msgnet_gro_size(&hdr.msg_hdr) if self._gro else 0,
                              <sockaddr*>&self._rx_addrs[i]) < 0:
                    return total  # the engine closed
            if n < batch:
                return total
        return total

    cdef int _read(self, uint8_t* buf, Py_ssize_t n, bint truncated, Py_ssize_t segment,
                   const sockaddr* sa) except -2:
        """One read of n bytes from sa: a datagram, or with GRO a run of datagrams of segment
        bytes each (the last possibly shorter). Each is opened in place. -1 once the engine
        closed (a handler may close it)."""
        cdef Py_ssize_t at = 0
        cdef Py_ssize_t size
        if segment <= 0 or segment >= n:
            segment = n
        while True:  # at least once: an empty datagram is counted (truncated) too
            size = min(segment, n - at)
            if size > C_DATAGRAM_CEILING or truncated:
                self._counters[CNT_PACKETS_IN] += 1
                self._counters[CNT_BYTES_IN] += size
                self._counters[CNT_OVERSIZE] += 1
            else:
                self._datagram(buf + at, size, buf + at + DATA_HEADER_SIZE, sa, None, None)
            if self._closed:
                return -1
            at += size
            if at >= n:
                return 0

    def feed_datagram(self, bytes data not None, addr):
        """Process data as a datagram from addr that arrived now: DATA that a pending
        handshake held until its keys were installed."""
        self._feed(data, addr)

    def feed_stream(self, packet, conn) -> int:
        """Process one packet that arrived on the stream connection conn (docs/wire.md §6): the
        datagram receive path (session by receiver_index, AEAD, replay window) without UDP
        roaming. The packet is opened in place, so it must be a writable buffer (the
        connection's receive buffer, valid only during this call).

        Returns STREAM_OK when it authenticated for a session here (session.rx_stream is then
        conn), STREAM_REPLAY for a copy of a packet that already came (by another path),
        STREAM_BAD when it failed its checks, STREAM_UNKNOWN when it is not DATA for a session
        with keys here (the caller treats it as a handshake or unknown-session packet)."""
        cdef Py_buffer view
        cdef uint8_t* pkt
        cdef Py_ssize_t n
        cdef Session s
        PyObject_GetBuffer(packet, &view, PyBUF_WRITABLE)
        try:
            pkt = <uint8_t*>view.buf
            n = view.len
            if n < DATA_HEADER_SIZE or (pkt[0] != PACKET_DATA and pkt[0] != PACKET_PLAIN_DATA):
                return STREAM_UNKNOWN
            s = self._session_for(_load_u32_be(pkt + 1))
            if s is None or s.crypto is None:
                return STREAM_UNKNOWN
            return self._feed_stream(s, pkt, n, conn, None)
        finally:
            PyBuffer_Release(&view)

    cdef int _feed_stream(self, Session s, uint8_t* pkt, Py_ssize_t n, object conn,
                          PieceCipher opened) except -3:
        """feed_stream once the packet's session is known (s has keys; pkt[0:n] is a DATA or
        PLAIN_DATA packet of at least DATA_HEADER_SIZE bytes, opened in place): the entry
        point of msgnet._stream, which parses the connection's stream in C. ``opened``: the
        packet's ciphertext was opened as it arrived (msgnet._stream.PIECE); its tag is
        checked here."""
        cdef Py_ssize_t plen = 0
        cdef int rc
        self._counters[CNT_PACKETS_IN] += 1
        self._counters[CNT_BYTES_IN] += n
        self._now = self._loop_time()
        if opened is None:
            rc = s.crypto.open_into(pkt, n, pkt + DATA_HEADER_SIZE, n - DATA_HEADER_SIZE, &plen)
        else:
            plen = n - DATA_OVERHEAD
            rc = opened.finish(pkt + DATA_HEADER_SIZE + plen)
            if rc != OPEN_OK:  # no unauthenticated plaintext left behind (as open_into)
                memset(pkt + DATA_HEADER_SIZE, 0, plen)
        if rc != OPEN_OK:
            self._counters[_drop_counter(rc)] += 1
            return C_STREAM_REPLAY if rc == DROP_REPLAY else C_STREAM_BAD
        if s.last_received == 0 and s.initiator:
            s.last_received = self._now
            self._confirmed(s)
        s.last_received = self._now
        s.rx_stream = conn
        self._frames(s, pkt + DATA_HEADER_SIZE, plen, <int64_t>_load_u64_be(pkt + 5))
        return C_STREAM_OK

    cdef int _feed(self, bytes data, object addr) except -1:
        """The endpoint path: the same C function as recvmmsg, decrypting into a stack buffer
        (data is immutable, and a handler may feed another datagram re-entrantly)."""
        cdef uint8_t out[C_RX_SLOT]
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        self._now = self._loop_time()
        if n > C_DATAGRAM_CEILING:
            self._counters[CNT_PACKETS_IN] += 1
            self._counters[CNT_BYTES_IN] += n
            self._counters[CNT_OVERSIZE] += 1
            return 0
        return self._datagram(<const uint8_t*>PyBytes_AS_STRING(data), n, out, NULL, addr,
                              data)

    cdef Session _session_for(self, uint32_t index):
        """The session whose local index is index, or None: the one the last DATA packet
        was for if it is that (a peer's packets come in runs), else from the sessions dict,
        whose lookup with a new int key costs as much as the rest of routing a packet.
        remove_session forgets it."""
        cdef Session s = self._last_rx
        if s is not None and s.local_index == index:
            return s
        found = self.sessions.get(index)
        if found is None:
            return None
        s = <Session>found
        self._last_rx = s
        return s

    cdef int _datagram(self, const uint8_t* pkt, Py_ssize_t n, uint8_t* out,
                       const sockaddr* sa, object pyaddr, bytes data) except -1:
        """One datagram pkt[0:n] from sa (recvmmsg) or pyaddr (endpoint). A DATA payload is
        opened into out (pkt + 13 decrypts in place); data is the packet as bytes if the
        caller has it."""
        cdef uint8_t t
        cdef int rc
        cdef Py_ssize_t plen = 0
        cdef Session s
        self._counters[CNT_PACKETS_IN] += 1
        self._counters[CNT_BYTES_IN] += n
        if n == 0:
            self._counters[CNT_TRUNCATED] += 1
            return 0
        t = pkt[0]
        if t == PACKET_DATA or t == PACKET_PLAIN_DATA:
            if n < (DATA_OVERHEAD if t == PACKET_DATA else DATA_HEADER_SIZE):
                self._counters[CNT_TRUNCATED] += 1
                return 0
            s = self._session_for(_load_u32_be(pkt + 1))
            if s is None:
                self._counters[CNT_UNKNOWN_SESSION] += 1
                return self._control(pkt, n, sa, pyaddr, data)
            if s.crypto is None:  # still handshaking: the network may hold it as early data
                return self._control(pkt, n, sa, pyaddr, data)
            rc = s.crypto.open_into(pkt, n, out, n - DATA_HEADER_SIZE, &plen)
            if rc != OPEN_OK:
                self._counters[_drop_counter(rc)] += 1
                return 0
            if s.last_received == 0 and s.initiator:
                s.last_received = self._now
                self._confirmed(s)  # the first packet from the responder: the session is up
            s.last_received = self._now
            s.last_datagram = self._now
            if s.rx_stream is not None:
                s.rx_stream = None
            # Authenticated: only now may the source address move the session (roaming).
            if sa != NULL:
                if not _same_addr(sa, &s._sa):
                    s._set_address(_sockaddr_to_py(sa), self._family)
            elif pyaddr != s._get_address():
                s._set_address(pyaddr, self._family)
            if not s._udp and self._on_udp_packet is not None:
                try:  # the network decides whether to move the session back to UDP
                    self._on_udp_packet(s)
                except Exception as exc:
                    self._report("msgnet: delegate.handle_udp_packet raised", exc, s)
            return self._frames(s, out, plen, <int64_t>_load_u64_be(pkt + 5))
        if t < PACKET_INITIATION or t > _PACKET_TYPE_MAX:
            self._counters[CNT_NOT_MSGNET] += 1
        elif t > PACKET_VERSION_UNSUPPORTED:
            self._counters[CNT_UNKNOWN_PACKET_TYPE] += 1
        else:
            self._control(pkt, n, sa, pyaddr, data)
        return 0

    cdef int _confirmed(self, Session s) except -1:
        if self._on_confirmed is None:
            return 0
        try:
            self._on_confirmed(s)
        except Exception as exc:
            self._report("msgnet: delegate.handle_confirmed raised", exc, s)
        return 0

    cdef int _control(self, const uint8_t* pkt, Py_ssize_t n, const sockaddr* sa,
                      object pyaddr, bytes data) except -1:
        """The rare path: hand the packet and its source to the delegate."""
        if data is None:
            data = PyBytes_FromStringAndSize(<const char*>pkt, n)
        if pyaddr is None:
            pyaddr = _sockaddr_to_py(sa)
        try:
            self._on_control(data, pyaddr)
        except Exception as exc:
            self._report("msgnet: delegate.handle_control raised", exc, None)
        return 0

    def process_payload(self, Session session not None, payload, addr):
        """Run the frames of an already decrypted payload (those a FINISH carried) from addr."""
        cdef Py_buffer view
        if addr is not None and addr != session._get_address():
            session._set_address(addr, self._family)
        self._now = self._loop_time()
        session.last_received = self._now
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        try:
            self._frames(session, <const uint8_t*>view.buf, view.len, -1)
        finally:
            PyBuffer_Release(&view)

    cdef int _frames(self, Session s, const uint8_t* p, Py_ssize_t n,
                     int64_t counter) except -1:
        """The frames of one opened payload, in order. A malformed frame drops the rest of the
        packet and keeps what came before it (docs/wire.md §3.1). counter is the DATA packet's
        (-1 for the frames of a FINISH): the delivery layer acknowledges packets by it."""
        cdef bint sequenced = False    # the packet carried delivery-layer (SEQ) frames
        cdef bint acknowledge = True   # ... and none of its reliable frames had to be dropped
        cdef FrameView fv
        cdef Py_ssize_t pos = 0
        cdef int rc, i
        cdef int frames = 0
        cdef int bound_count = 0
        cdef uint16_t bound[C_MAX_FRAMES_PER_PACKET]  # aliases answered BOUND in this packet
        cdef str protocol
        if n > 0:
            s.last_frames = self._now
        while not s._closed:
            rc = read_frame(p, n, &pos, &fv)
            if rc == READ_END:
                break
            if rc < 0:
                self._counters[CNT_UNKNOWN_FRAME if rc == ERR_UNKNOWN_FRAME_TYPE
                               else CNT_BAD_FRAME] += 1
                break
            if MSGNET_DEBUG and pos > n:
                raise AssertionError("read_frame read past the payload")
            frames += 1
            if frames > C_MAX_FRAMES_PER_PACKET:
                self._counters[CNT_BAD_FRAME] += 1
                break
            if fv.type == FRAME_CONTINUATION:
                self._counters[CNT_CONTINUATION_FRAMES_IN] += 1
                known = s._in_protocol(fv.protocol_int)
                if known is None:  # its INIT was lost, or the peer's view of BOUND is stale
                    self._counters[CNT_UNKNOWN_ALIAS] += 1
                    self._queue_reply(s, FRAME_RESET, fv.protocol_int, _RESET_UNKNOWN_ALIAS)
                    if fv.flags & FLAG_RELIABLE:
                        acknowledge = False  # the sender must send it again, as INIT
                elif self._route(s, fv.protocol_int, <str>known, &fv, counter):
                    sequenced = True
            elif fv.type == FRAME_INIT:
                self._counters[CNT_INIT_FRAMES_IN] += 1
                # Interned, as the network interns its handlers' protocols: the handler's dict
                # lookup per message then matches by identity, without comparing the strings.
                protocol = sys.intern(
                    PyUnicode_DecodeUTF8(<const char*>fv.protocol, fv.protocol_len, NULL))
                if s._in_protocols is None:
                    s._in_protocols = {}
                known = s._in_protocols.get(fv.protocol_int)
                if known is None:
                    # Responses are bound without a handler: they go to the delegate.
                    if not fv.flags & FLAG_RESPONSE and protocol not in self._handlers:
                        self._counters[CNT_NO_HANDLER] += 1
                        self._queue_reply(s, FRAME_RESET, fv.protocol_int, _RESET_NO_HANDLER)
                        continue
                    if len(s._in_protocols) >= C_MAX_ALIASES:
                        self._counters[CNT_TOO_MANY_ALIASES] += 1
                        self._queue_reply(s, FRAME_RESET, fv.protocol_int,
                                          _RESET_TOO_MANY_ALIASES)
                        continue
                    s._in_protocols[fv.protocol_int] = protocol
                elif <str>known != protocol:  # re-binding an alias is malformed
                    self._counters[CNT_BAD_FRAME] += 1
                    break
                for i in range(bound_count):
                    if bound[i] == fv.protocol_int:
                        break
                else:
                    bound[bound_count] = <uint16_t>fv.protocol_int
                    bound_count += 1
                    self._queue_reply(s, FRAME_BOUND, fv.protocol_int, 0)
                if self._route(s, fv.protocol_int, protocol, &fv, counter):
                    sequenced = True
            else:
                self._control_frame(s, &fv)
        if sequenced:
            try:
                self._on_packet_received(s, counter, acknowledge)
            except Exception as exc:
                self._report("msgnet: delegate.handle_packet_received raised", exc, s)
        return 0

    cdef bint _route(self, Session s, uint64_t alias, str protocol, FrameView* fv,
                     int64_t counter) except -1:
        """A message frame: SEQ ones to the delivery layer (True), others delivered now."""
        if not fv.flags & FLAG_SEQ or self._on_fragment is None:
            self._message(s, alias, protocol, fv)
            return False
        if counter < 0:  # only DATA packets can be acknowledged: never sent in a FINISH
            self._counters[CNT_BAD_FRAME] += 1
            return False
        cdef DeliveryConnection conn = s.delivery
        cdef int frag_count = fv.frag_count if fv.flags & FLAG_FRAGMENT else 1
        if frag_count > 1:
            # A view of the receive buffer, not a copy: the core copies a fragment straight
            # to its place in the message (core/delivery.py _Reassembly) and keeps no view.
            # Released below, so one kept by mistake fails loudly rather than read a later
            # datagram.
            payload = PyMemoryView_FromMemory(<char*>fv.payload, fv.payload_len, PyBUF_READ)
        else:
            payload = PyBytes_FromStringAndSize(<const char*>fv.payload, fv.payload_len)
        try:
            if conn is None:  # the session's first: the delegate sets its delivery state up
                self._on_fragment(s, counter, protocol, fv.flags, fv.request_id, fv.seq,
                                  fv.frag_index, frag_count, payload)
                return True
            # The delivery core directly (what handle_fragment would do, minus a Python frame
            # per message): what is now deliverable, exactly once and in order.
            got = conn.receive(counter, protocol, fv.flags, fv.request_id, fv.seq,
                               fv.frag_index, frag_count, payload, self._now)
        except Exception as exc:
            self._report("msgnet: the delivery layer raised on a SEQ frame", exc, s)
            return True
        finally:
            if frag_count > 1:
                (<memoryview>payload).release()
        if got is None:
            return True
        if type(got) is bytes:  # this message, whole: the common case
            self._dispatch(s, alias, protocol, fv.flags, fv.request_id, <bytes>got)
            return True
        for message in <list?>got:  # Delivered tuples: an ordered run
            item = <tuple>message  # a tuple subclass (NamedTuple)
            self._deliver(s, <str?>item[0], item[1], item[2], <bytes?>item[3])
        return True

    cdef int _message(self, Session s, uint64_t alias, str protocol, FrameView* fv) except -1:
        """Deliver one message: a RESPONSE to the delegate, anything else to the handler."""
        return self._dispatch(s, alias, protocol, fv.flags, fv.request_id,
                              PyBytes_FromStringAndSize(<const char*>fv.payload, fv.payload_len))

    def deliver(self, Session session not None, str protocol not None, int flags,
                uint64_t request_id, bytes data not None):
        """Deliver a message the delivery layer completed (reassembled, in order, once)."""
        self._deliver(session, protocol, flags, request_id, data)

    cdef int _deliver(self, Session s, str protocol, int flags, uint64_t request_id,
                      bytes data) except -1:
        cdef uint64_t alias = 0
        if not flags & FLAG_RESPONSE and protocol not in self._handlers:
            # Rare (the handler went away): find the peer's alias to RESET it.
            for key, value in (s._in_protocols or {}).items():
                if value == protocol:
                    alias = key
                    break
        return self._dispatch(s, alias, protocol, flags, request_id, data)

    cdef int _dispatch(self, Session s, uint64_t alias, str protocol, int flags,
                       uint64_t request_id, bytes data) except -1:
        cdef Message msg
        self._counters[CNT_MESSAGES_IN] += 1
        if flags & FLAG_RESPONSE:
            try:
                self._on_response(s, request_id, data)
            except Exception as exc:
                self._report("msgnet: delegate.handle_response raised", exc, s)
            return 0
        handler = self._handlers.get(protocol)
        if handler is None:
            self._counters[CNT_NO_HANDLER] += 1
            self._queue_reply(s, FRAME_RESET, alias, _RESET_NO_HANDLER)
            return 0
        msg = Message.__new__(Message)
        msg.data = data
        msg.from_peer = s.peer_id
        msg.protocol = protocol
        msg.request_id = request_id if flags & FLAG_REQUEST else None
        msg.flags = flags
        msg.session = s
        try:
            handler(msg)
        except Exception as exc:
            self._counters[CNT_HANDLER_ERROR] += 1
            self._report(f"msgnet: message handler for {protocol!r} raised", exc, s)
        return 0

    cdef int _control_frame(self, Session s, FrameView* fv) except -1:
        """BOUND, RESET, PING, PONG, ACK, CLOSE, DELIVERY_ACK: the alias tables, or the
        delegate."""
        cdef uint8_t t = fv.type
        cdef uint64_t first_range = 0
        cdef uint64_t aliases = len(s._out_protocols) if s._out_protocols is not None else 0
        protocol = None
        try:
            if t == FRAME_BOUND:
                if fv.protocol_int < aliases:
                    s._set_bound(fv.protocol_int, True)
            elif t == FRAME_RESET:
                if fv.protocol_int < aliases:
                    protocol = s._out_protocols[fv.protocol_int]
                    if fv.code == _RESET_UNKNOWN_ALIAS:
                        s._set_bound(fv.protocol_int, False)  # back to INIT
                self._on_reset(s, protocol, fv.code)
            elif t == FRAME_PING:
                self._queue_pong(s, fv.payload, fv.payload_len)
            elif t == FRAME_PONG:
                self._on_pong(s, PyBytes_FromStringAndSize(<const char*>fv.payload,
                                                           fv.payload_len))
            elif t == FRAME_ACK:
                self._on_ack(s, fv.transport_id)
            elif t == FRAME_CLOSE:
                self._on_close(s, fv.code, PyUnicode_DecodeUTF8(<const char*>fv.payload,
                                                                fv.payload_len, NULL))
            elif t == FRAME_DELIVERY_ACK:
                ranges = delivery_ack_ranges(fv, &first_range)  # (read_frame validated them)
                self._on_delivery_ack(s, fv.seq, fv.code, first_range, ranges)
        except Exception as exc:
            self._report(f"msgnet: delegate raised on frame type 0x{t:02x}", exc, s)
        return 0

    # -- sending ---------------------------------------------------------------------------

    def send_message(self, Session session not None, str protocol not None, payload,
                     int flags=0, request_id=0, bint force=False) -> bool:
        """Queue one message; False when the session's queue is full (await wait_drained).

        The message goes out as INIT until the peer answers BOUND for our alias, then as
        CONTINUATION, coalesced with the session's other frames and sent at the end of the loop
        iteration. It must fit one packet: MessageTooLargeError otherwise (fragmentation is the
        delivery layer's, which also owns the SEQ/RELIABLE/ORDERED/FRAGMENT flags).
        ``force`` queues it even on a full queue: for messages whose number is bounded
        otherwise (a stream resume sends again at most what the connection kept).
        """
        return self._send(session, protocol, payload, flags, request_id, force)

    cdef bint _send(self, Session s, str protocol, object payload, int flags,
                    object request_id, bint force=False) except -1:
        cdef Py_buffer view
        cdef uint64_t rid = 0
        cdef int alias
        cdef bint init
        cdef bytes encoded = None
        cdef bytes alone = None
        cdef Py_ssize_t body, size, written
        cdef uint8_t* at
        if flags & ~(FLAG_REQUEST | FLAG_RESPONSE) or flags == FLAG_REQUEST | FLAG_RESPONSE:
            raise UsageError("flags may be REQUEST or RESPONSE (not both); sequencing and "
                             "fragments belong to the delivery layer")
        if flags:
            rid = _request_id(request_id)
        elif request_id:
            raise UsageError("request_id is only sent with REQUEST or RESPONSE")
        if s._closed or self._closed:
            raise ClosedError("session or engine is closed")
        alias = s._alias(protocol)
        init = not s._is_bound(alias)
        _get_payload(payload, &view)
        try:
            body = varint_size(alias) + message_header_size(flags, rid, 0, 0, 0) + view.len
            if init:
                encoded = s._out_encoded[alias]
                body += 2 + varint_size(PyBytes_GET_SIZE(encoded)) + PyBytes_GET_SIZE(encoded)
            size = 1 + varint_size(body) + body
            if size <= s._cap and (size <= C_BASE_PAYLOAD or not s._udp
                                   or view.len <= _best_effort_limit(s, alias)):
                at = s._reserve(size, force)
                if at == NULL:
                    return False
            elif s.stream is not None and size <= C_STREAM_PAYLOAD:
                # Too large to coalesce, and the session has a stream: a payload of its own,
                # one stream packet (messages are not fragmented on a stream).
                if s._queue_full() and not force:
                    return False
                s._close_payload()
                alone = PyBytes_FromStringAndSize(NULL, size)
                at = <uint8_t*>PyBytes_AS_STRING(alone)
            else:
                raise MessageTooLargeError(_too_large(view.len, s.datagram_size))
            if init:
                written = write_init(at, size, s._transport_id,
                                     <const uint8_t*>PyBytes_AS_STRING(encoded),
                                     PyBytes_GET_SIZE(encoded), alias, flags, rid, 0, 0, 0,
                                     <const uint8_t*>view.buf, view.len)
            else:
                written = write_continuation(at, size, alias, flags, rid, 0, 0, 0,
                                             <const uint8_t*>view.buf, view.len)
            if MSGNET_DEBUG and written != size:
                raise AssertionError("frame size mismatch")
            if alone is None:
                s._cur_len += written
            else:
                if s._queue is None:
                    s._queue = []
                s._queue.append(alone)
                s._queued_bytes += size
        finally:
            PyBuffer_Release(&view)
        self._counters[CNT_MESSAGES_OUT] += 1
        self._mark_dirty(s, flags != 0)
        return True

    def send_control(self, Session session not None, frame) -> None:
        """Queue one pre-encoded control frame (PING, ACK, CLOSE ...). Control frames are small
        and the network's own: they are queued even when the queue is full."""
        cdef Py_buffer view
        cdef uint8_t* at
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        try:
            if not 0 < view.len <= session._cap:
                raise UsageError("a control frame must be 1 byte to one payload long")
            if session._closed or self._closed:
                raise ClosedError("session or engine is closed")
            at = session._reserve(view.len, True)
            memcpy(at, view.buf, view.len)
            session._cur_len += view.len
        finally:
            PyBuffer_Release(&view)
        self._mark_dirty(session)

    def pack_message_frames(self, Session session not None, list fragments not None,
                            bytes head not None, Py_ssize_t room):
        """The delivery layer's Fragments as message frames, INIT until the peer BOUND the
        protocol's alias, else CONTINUATION, packed in order into payloads of at most room
        bytes, the first after head (say an ack frame; b"" for none). Returns the payloads and,
        for each, the list of the fragments it carries: the delivery layer seals them itself
        (send_payload), so it learns which packet carried which fragments. One call per pump,
        not per frame; the fragments' fields are read as C struct members (delivery.pxd), not
        attributes."""
        cdef Py_ssize_t used = PyBytes_GET_SIZE(head)
        cdef Py_ssize_t first = 0  # the index of the payload's first fragment
        cdef Py_ssize_t i
        cdef Py_ssize_t size
        cdef bint fragmented
        cdef PyObject* payload = NULL  # the payload being filled, room bytes until it is done
        cdef Fragment f
        cdef list payloads = []
        cdef list carried = []
        if session._closed or self._closed:
            raise ClosedError("session or engine is closed")
        if used > room:
            raise UsageError("head must fit in room")
        if room <= 0:
            room = 1
        # Frames are written straight into each payload's bytes object, which is then cut to
        # its length (realloc shrinks in place): no staging buffer, one copy of the data less.
        payload = _new_payload(room)
        try:
            memcpy(PyBytes_AS_STRING(<object>payload), PyBytes_AS_STRING(head), used)
            for i in range(len(fragments)):
                f = <Fragment?>fragments[i]
                if f._payload is None:
                    raise UsageError("a Fragment the delivery layer did not make")
                fragmented = f.flags & FLAG_FRAGMENT
                while True:
                    size = self._message_frame(
                        session, f.protocol,
                        <const uint8_t*>PyBytes_AS_STRING(f._payload) + f._offset, f._length,
                        f.flags, f.request_id, f.seq,
                        f.frag_index if fragmented else 0, f.frag_count if fragmented else 0,
                        <uint8_t*>PyBytes_AS_STRING(<object>payload) + used, room - used)
                    if size <= room - used or not used:
                        break
                    _cut_payload(&payload, used, payloads)
                    carried.append(fragments[first:i])
                    first = i
                    used = 0
                    payload = _new_payload(room)
                if size > room:
                    raise MessageTooLargeError(_too_large(f._length, self.max_datagram))
                used += size
            if used:
                _cut_payload(&payload, used, payloads)
                carried.append(fragments if first == 0 else fragments[first:])
        finally:
            Py_XDECREF(payload)
        return payloads, carried

    cdef Py_ssize_t _message_frame(self, Session s, str protocol, const uint8_t* data,
                                   Py_ssize_t length, int flags, uint64_t request_id,
                                   uint64_t seq, uint64_t frag_index, uint64_t frag_count,
                                   uint8_t* at, Py_ssize_t cap) except -1:
        """Write one message frame of data[:length] at ``at`` if it fits in cap bytes; its
        size either way. The writers size the frame themselves: it is sized here only when
        it does not fit."""
        cdef int alias = s._alias(protocol)
        cdef bytes encoded = None if s._is_bound(alias) else s._out_encoded[alias]
        cdef Py_ssize_t body, size
        if encoded is not None:
            size = write_init(at, cap, s._transport_id,
                              <const uint8_t*>PyBytes_AS_STRING(encoded),
                              PyBytes_GET_SIZE(encoded), alias, flags, request_id, seq,
                              frag_index, frag_count, data, length)
        else:
            size = write_continuation(at, cap, alias, flags, request_id, seq, frag_index,
                                      frag_count, data, length)
        if size < 0:  # it does not fit: how much room it needs
            body = (varint_size(alias) + length
                    + message_header_size(flags, request_id, seq, frag_index, frag_count))
            if encoded is not None:
                body += 2 + varint_size(PyBytes_GET_SIZE(encoded)) + PyBytes_GET_SIZE(encoded)
            return 1 + varint_size(body) + body
        self._counters[CNT_MESSAGES_OUT] += 1
        return size

    cpdef int64_t send_payload(self, Session session, bytes payload,
                               bint drain=True) except -2:
        """Seal payload (whole frames) as one DATA packet of its own now and return its counter.

        drain=False leaves the packet in the send ring for drain_sealed (or the ring filling
        up, or the end of a receive batch) to send with others in one sendmmsg.

        For the delivery layer, which must know which packet carried which fragments. A packet
        the socket (or a back-pressured stream) cannot take is dropped and counted
        (send_errors) like a lost datagram: the delivery layer retransmits what it carried.
        A C call from the delivery manager (qos.pxd), once per packet it sends."""
        if session is None or payload is None:
            raise TypeError("send_payload needs a session and a bytes payload")
        cdef SessionCrypto crypto = session.crypto
        cdef uint64_t counter
        cdef int64_t sealed
        cdef double now = self._loop_time()
        if session._closed or self._closed or crypto is None:
            raise ClosedError("session is not established or is closed")
        if self._to_stream(session, PyBytes_GET_SIZE(payload)):
            if PyBytes_GET_SIZE(payload) > C_STREAM_PAYLOAD:
                raise MessageTooLargeError(_too_large(PyBytes_GET_SIZE(payload),
                                                      self.max_datagram))
            sealed = self._seal_to_stream(session, payload, now, False)
            if sealed < 0:
                raise ClosedError("session send counter exhausted")
            return sealed
        if PyBytes_GET_SIZE(payload) > session.datagram_size - DATA_OVERHEAD:
            raise MessageTooLargeError(_too_large(PyBytes_GET_SIZE(payload),
                                                  session.datagram_size))
        counter = crypto.send_counter
        if self._tx_count == self._batch and not self._drain_tx():
            crypto.send_counter += 1  # the packet is lost: its counter must not be reused
            self._counters[CNT_SEND_ERRORS] += 1
            return counter
        if self._seal_to_ring(session, payload, now, True, False) < 0:
            raise ClosedError("session send counter exhausted")
        if drain and not self._in_batch:
            self._drain_tx()
        return counter

    def drain_sealed(self):
        """Send the packets sealed into the send ring (send_payload(drain=False)) now; inside a
        receive batch they go at its end anyway."""
        if not self._in_batch and not self._closed:
            self._drain_tx()

    cdef int _queue_reply(self, Session s, uint8_t frame_type, uint64_t a,
                          uint64_t b) except -1:
        """Queue BOUND(a) or RESET(a, b); dropped and counted (reply_dropped) if the queue is
        full: the peer's input must not grow our queue without bound."""
        cdef Py_ssize_t size = 2 + varint_size(a) + (1 if frame_type == FRAME_RESET else 0)
        cdef uint8_t* at = s._reserve(size, False)
        if at == NULL:
            self._counters[CNT_REPLY_DROPPED] += 1
            return 0
        s._cur_len += write_small(at, size, frame_type, a, b)
        return self._mark_dirty(s)

    cdef int _queue_pong(self, Session s, const uint8_t* data, Py_ssize_t n) except -1:
        """Queue PONG echoing a PING's data (at most 32 bytes: a one-byte length)."""
        cdef uint8_t* at = s._reserve(2 + n, False)
        if at == NULL:
            self._counters[CNT_REPLY_DROPPED] += 1
            return 0
        at[0] = FRAME_PONG
        at[1] = <uint8_t>n
        memcpy(at + 2, data, n)
        s._cur_len += 2 + n
        return self._mark_dirty(s)

    cdef int _mark_dirty(self, Session s, bint urgent=False) except -1:
        """Remember s has frames to send; they go out coalesced with the session's other frames
        of this loop iteration, in as few packets as fit: at the end of the receive batch
        inside one, else by a flush scheduled for the end of the iteration.

        An urgent frame (a request or a reply: someone awaits it) goes out at once instead of
        an iteration later when nothing else is waiting to be sent, and nothing was sent that
        way since the last flush or receive batch: a lone request or reply does not wait, and
        a burst costs at most one packet more than full coalescing.
        """
        if self._in_batch or self._writer_armed or self._closed:
            pass
        elif self._flush_handle is None:
            if (urgent and not self._sent_early and s.established and not s._dirty
                    and self._seal_session(s, self._loop_time(), False) and self._drain_tx()):
                self._sent_early = True
                return 0
            self._flush_handle = self.loop.call_soon(self._flush_cb)
        if not s._dirty:
            s._dirty = True
            self._dirty.append(s)
        return 0

    def _run_flush(self):
        self._flush_handle = None
        self._sent_early = False
        self._flush_all(self._loop_time())

    def flush(self):
        """Seal and send every established session's queued payloads now."""
        self._flush_all(self._loop_time())

    def flush_session(self, Session session not None, bint force):
        """Send session's queue now; force sends one DATA packet even if nothing is queued
        (the responder's handshake confirmation)."""
        if not self._drain_tx() or not self._seal_session(session, self._loop_time(), force):
            self._mark_dirty(session)
            return
        self._drain_tx()

    cdef int _flush_all(self, double now) except -1:
        cdef Py_ssize_t i, j
        cdef list dirty
        cdef Session s
        if self._closed or not self._drain_tx():
            return 0
        dirty = self._dirty
        self._dirty = []
        for i in range(len(dirty)):
            s = dirty[i]
            s._dirty = False
            if not self._seal_session(s, now, False):  # blocked: the writer resumes
                for j in range(i, len(dirty)):
                    self._mark_dirty(dirty[j])
                return 0
        self._drain_tx()
        return 0

    cdef bint _seal_session(self, Session s, double now, bint force) except -1:
        """Seal s's queued payloads onto its path: into the send ring (sending whenever it
        fills) or onto its stream. False if the UDP socket would block (the rest stays
        queued); a back-pressured stream also keeps the rest queued, and the network flushes
        again when the connection drains. Sessions without keys keep their queue: the first
        frames ride in the handshake (take_payload) or follow install_keys."""
        cdef bytes payload
        cdef Py_ssize_t n
        if s._closed or not s.established:
            return True
        if s._ret_count:
            s._purge_retained(now)
        while True:
            if self._tx_count == self._batch and not self._drain_tx():
                return False
            if s._queue_len():
                n = PyBytes_GET_SIZE(s._queue[s._queue_head])
            elif s._cur_len:
                n = s._cur_len
            elif force:
                n = 0
            else:
                break
            if self._to_stream(s, n):
                if not s.stream.writable:
                    break  # back-pressure: the network flushes again once it drains
            elif s.stream is None and (not s._udp or not s._salen or self.sock is None):
                break  # no path now: the queue waits for the network to give the session one
            if s._queue_len():
                payload = s._pop_payload()
            elif s._cur_len:
                payload = s._take_cur()  # the common case: no queue, one packet
            else:
                payload = b""
            force = False
            if self._to_stream(s, n):
                self._seal_to_stream(s, payload, now)
                continue
            if n > s.datagram_size - DATA_OVERHEAD:  # its stream went away: cannot be sent
                self._counters[CNT_SEND_ERRORS] += 1
                continue
            self._seal_to_ring(s, payload, now)
        s._wake_drained(None)
        return True

    cdef int64_t _seal_to_ring(self, Session s, bytes payload, double now,
                               bint retain=True, bint keep=True) except -2:
        """Seal payload as one DATA packet into the next free slot of the send ring (the caller
        made room) and, with retain, keep its tag and, with keep, its payload (SESSION_UNKNOWN
        recovery) and during first contact send it on the session's stream too; its counter,
        or -1 if the session's counter is exhausted (counted)."""
        cdef SessionCrypto crypto = s.crypto
        cdef uint8_t* slot = self._tx_buf + self._tx_count * self.max_datagram
        cdef uint64_t counter = crypto.send_counter
        cdef const uint8_t* tag
        cdef Py_ssize_t length = crypto.seal_into(<const uint8_t*>PyBytes_AS_STRING(payload),
                                                  PyBytes_GET_SIZE(payload), slot,
                                                  self.max_datagram)
        if length < 0:
            self._counters[CNT_COUNTER_EXHAUSTED if length == -1 else CNT_SEND_ERRORS] += 1
            return -1
        if crypto.plaintext:
            tag = _ZERO_TAG
        else:
            tag = slot + length - AEAD_TAG_SIZE
        if retain:
            s._retain(counter, tag, payload if keep else None, now)
        s.last_sent = now
        self._tx_iov[self._tx_count].iov_len = length
        self._tx_hdrs[self._tx_count].msg_hdr.msg_name = &s._sa
        self._tx_hdrs[self._tx_count].msg_hdr.msg_namelen = s._salen
        self._tx_owner[self._tx_count] = s
        self._tx_count += 1
        if retain and s._duplicate and s.stream.writable:  # first contact: on both paths
            if s.stream.write_packet(PyBytes_FromStringAndSize(<const char*>slot, length)):
                self._counters[CNT_PACKETS_OUT] += 1
                self._counters[CNT_BYTES_OUT] += length
        return <int64_t>counter

    cdef bint _to_stream(self, Session s, Py_ssize_t n) noexcept:
        """Whether an n-byte payload of s goes on its stream rather than by UDP."""
        return s.stream is not None and (not s._udp or not s._salen or self.sock is None
                                         or n > s.datagram_size - DATA_OVERHEAD)

    cdef int64_t _seal_to_stream(self, Session s, bytes payload, double now,
                                 bint keep=True) except -2:
        """Seal payload as one packet written to s.stream; its counter, or -1 if the session's
        counter is exhausted. A packet the connection refuses (it closed) is counted as
        send_errors, like a lost datagram. keep=False retains its tag only (the delivery
        layer's packets: docs/wire.md 2.5).

        The packet is sealed behind its stream ``length:varint`` prefix in one bytes object,
        which the connection (msgnet._stream.StreamCore.write_sealed) writes as it is; a large
        payload is sealed as it is written instead (msgnet._stream.PIECE), or in plaintext
        written as it is after the packet's header, and the bytes object holds the prefix and
        header only."""
        cdef SessionCrypto crypto = s.crypto
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t size = n + (DATA_HEADER_SIZE if crypto.plaintext else DATA_OVERHEAD)
        cdef Py_ssize_t head = varint_size(<uint64_t>size)
        cdef uint8_t header[DATA_HEADER_SIZE]
        cdef uint64_t counter = crypto.send_counter
        cdef PieceCipher pieces = None
        cdef bint follows = crypto.plaintext and n >= C_PIECES_FROM
        cdef bytes packet
        cdef uint8_t* out
        cdef const uint8_t* tag
        cdef Py_ssize_t length, k
        cdef uint64_t left = <uint64_t>size
        if n >= C_PIECES_FROM:
            pieces = seal_pieces(crypto, header, n)  # None: sealed whole (plaintext, backend)
        packet = PyBytes_FromStringAndSize(
            NULL, head + (DATA_HEADER_SIZE if pieces is not None or follows else size))
        out = <uint8_t*>PyBytes_AS_STRING(packet)
        for k in range(head - 1):
            out[k] = <uint8_t>(left & 0x7F | 0x80)
            left >>= 7
        out[head - 1] = <uint8_t>left
        out += head
        if pieces is not None:
            memcpy(out, header, DATA_HEADER_SIZE)
            length = size
        elif follows:  # the header alone (an empty payload), counted as the whole packet
            length = crypto.seal_into(<const uint8_t*>PyBytes_AS_STRING(payload), 0, out,
                                      DATA_HEADER_SIZE)
            if length >= 0:
                length = size
        else:
            length = crypto.seal_into(<const uint8_t*>PyBytes_AS_STRING(payload), n, out, size)
        if length < 0:
            self._counters[CNT_COUNTER_EXHAUSTED if length == -1 else CNT_SEND_ERRORS] += 1
            return -1
        # Retaining a lone large message for SESSION_UNKNOWN would pin up to 64 MiB per session
        # for RETAIN_SENT_TIME; coalesced packets are kept as on UDP.
        if n <= C_STREAM_COALESCE:
            tag = _ZERO_TAG
            if not crypto.plaintext:
                tag = out + length - AEAD_TAG_SIZE
            s._retain(counter, tag, payload if keep else None, now)
        s.last_sent = now
        if _stream_writer(s.stream, packet, s, counter, payload, pieces, follows):
            self._counters[CNT_PACKETS_OUT] += 1
            self._counters[CNT_BYTES_OUT] += length
        else:
            self._counters[CNT_SEND_ERRORS] += 1
        return <int64_t>counter

    def set_path(self, Session session not None, stream, bint udp, bint duplicate=False,
                 int transport_id=-1):
        """Choose where session's packets go (docs/wire.md §5): by UDP to its address when
        udp, on the stream connection stream (a msgnet.tcp.StreamConnection) otherwise. With
        both, payloads too large for a datagram take the stream, and duplicate sends every
        packet on both paths with the same counter (first contact, until the peer's ACK).
        transport_id is what INIT frames name from now on (-1: unchanged).

        On the stream alone, frames coalesce into packets of up to 64 KiB. Back to UDP
        alone, the queue is cut into datagram payloads (a frame too large for one is dropped
        and counted as send_errors)."""
        cdef Py_ssize_t cap
        if not udp and stream is None:
            raise UsageError("a session needs a UDP or a stream path")
        cap = session.datagram_size - DATA_OVERHEAD if udp else C_STREAM_COALESCE
        if cap != session._cap:
            session._close_payload()
            session._cap = cap
        session.stream = stream
        session._udp = udp
        session._duplicate = duplicate and udp and stream is not None
        if transport_id >= 0:
            session._transport_id = <uint16_t>transport_id
        if stream is None and session._queued_bytes:
            self._repack(session)
        if session.established and not session._closed and (session._queue_len()
                                                             or session._cur_len):
            self._mark_dirty(session)

    def set_datagram_size(self, Session session not None, int size):
        """The largest datagram session sends from now on: what PMTU discovery found the path
        carries (docs/wire.md 5.1), MAX_DATAGRAM to the engine's max_datagram. Payloads already
        queued keep their size."""
        if not limits.MAX_DATAGRAM <= size <= self.max_datagram:
            raise UsageError(f"a datagram size is {limits.MAX_DATAGRAM} to {self.max_datagram}, "
                             f"not {size}")
        session.datagram_size = size
        if session._udp and session._cap != size - DATA_OVERHEAD:
            session._close_payload()
            session._cap = size - DATA_OVERHEAD

    def send_probe(self, Session session not None, bytes payload not None) -> int:
        """Seal payload (a PMTU probe: PING and PADDING, docs/wire.md 5.1) as one DATA packet
        and send it now, by UDP alone: never on a stream, never retained for SESSION_UNKNOWN
        recovery, whatever the session's datagram size (up to max_datagram). Its counter; -1
        when the session has no UDP path; -2 when the socket would block with the send ring
        full (the probe is not sent: as good as lost). A probe the socket refuses (larger
        than the interface carries, with DF) is dropped and counted (send_errors), as a lost
        one."""
        cdef int64_t counter
        if session._closed or self._closed or session.crypto is None or not session.established:
            raise ClosedError("session is not established or is closed")
        if not 0 < PyBytes_GET_SIZE(payload) <= self.max_datagram - DATA_OVERHEAD:
            raise UsageError(f"a probe's payload is 1 to {self.max_datagram - DATA_OVERHEAD} "
                             f"bytes")
        if not session._udp or not session._salen or self.sock is None:
            return -1
        if self._tx_count == self._batch and not self._drain_tx():
            return -2
        counter = self._seal_to_ring(session, payload, self._loop_time(), False)
        if counter < 0:
            raise ClosedError("session send counter exhausted")
        if not self._in_batch:
            self._drain_tx()
        return counter

    cdef int _repack(self, Session s) except -1:
        """Cut queued payloads larger than a datagram's into runs of whole frames that fit
        one; a single frame larger than that is dropped (send_errors)."""
        cdef Py_ssize_t cap = s.datagram_size - DATA_OVERHEAD
        cdef Py_ssize_t pos, take, n, skip
        cdef const uint8_t* p
        cdef FrameView fv
        cdef bytes payload
        cdef list out = []
        for payload in s._queue[s._queue_head:]:
            n = PyBytes_GET_SIZE(payload)
            p = <const uint8_t*>PyBytes_AS_STRING(payload)
            pos = 0
            while pos < n:
                take = _whole_frames(p + pos, n - pos, cap)
                if take:
                    out.append(payload[pos:pos + take])
                    pos += take
                    continue
                self._counters[CNT_SEND_ERRORS] += 1
                skip = 0
                if read_frame(p + pos, n - pos, &skip, &fv) != READ_OK:
                    break
                pos += skip
        s._queue = out or None
        s._queue_head = 0
        s._queued_bytes = sum([PyBytes_GET_SIZE(x) for x in out])
        return 0

    cdef int _group_units(self) noexcept:
        """Fill _tx_units with the messages that send the packets from _tx_head on: with GSO,
        each run of packets to one session whose sizes are equal (the last may be shorter)
        becomes one message; otherwise each packet is one. Returns the number of messages."""
        cdef int i = self._tx_head
        cdef int units = 0
        cdef int k
        cdef size_t size, total
        cdef msghdr* first
        cdef msghdr* unit
        while i < self._tx_count:
            first = &self._tx_hdrs[i].msg_hdr
            size = self._tx_iov[i].iov_len
            total = size
            k = 1
            while (i + k < self._tx_count and k < C_GSO_SEGMENTS
                   and self._tx_hdrs[i + k].msg_hdr.msg_name == first.msg_name
                   and self._tx_iov[i + k].iov_len <= size
                   and total + self._tx_iov[i + k].iov_len <= C_GSO_BYTES):
                total += self._tx_iov[i + k].iov_len
                k += 1
                if self._tx_iov[i + k - 1].iov_len < size:
                    break  # only the last datagram of a GSO send may be shorter
            unit = &self._tx_units[units].msg_hdr
            unit.msg_name = first.msg_name
            unit.msg_namelen = first.msg_namelen
            unit.msg_iov = &self._tx_iov[i]
            unit.msg_iovlen = k
            if k > 1:
                msgnet_set_gso(unit, self._tx_cmsg + units * MSGNET_GSO_CMSG_SPACE,
                               <uint16_t>size)
            else:
                unit.msg_control = NULL
                unit.msg_controllen = 0
            self._tx_unit_len[units] = k
            units += 1
            i += k
        return units

    cdef bint _drain_tx(self) except -1:
        """Send the sealed packets of the send ring. False (and the writer armed) if the
        socket would block; unsendable packets are dropped and counted (send_errors)."""
        cdef int head, sent, i, units, k
        cdef int err = 0
        cdef bint grouped
        cdef mmsghdr* hdrs
        cdef Session owner
        while self._tx_head < self._tx_count:
            head = self._tx_head
            if self._transport is None and MSGNET_HAVE_MMSG:
                # A lone packet (a request or reply) is its own message: nothing to group.
                grouped = self._gso and self._tx_count - head > 1
                if grouped:
                    units = self._group_units()
                    hdrs = self._tx_units
                else:
                    units = self._tx_count - head
                    hdrs = &self._tx_hdrs[head]
                sent = sendmmsg(self._fd, hdrs, units, 0)  # GIL held: _read_batches says why
                if sent < 0:
                    err = errno
                    if err == EINTR:
                        continue
                    if MSGNET_WOULD_BLOCK(err):
                        self._arm_writer()
                        return False
                    if (grouped and self._tx_unit_len[0] > 1
                            and (err == EIO or err == EINVAL or err == ENOPROTOOPT
                                 or err == EOPNOTSUPP)):
                        self._gso = False  # the kernel or the device refuses GSO: send plainly
                        continue
                    self._counters[CNT_SEND_ERRORS] += 1
                    self._tx_head += 1  # this packet cannot go (no route ...): skip it
                    continue
                for i in range(sent):
                    k = self._tx_unit_len[i] if grouped else 1
                    while k:
                        self._counters[CNT_PACKETS_OUT] += 1
                        self._counters[CNT_BYTES_OUT] += self._tx_iov[self._tx_head].iov_len
                        self._tx_head += 1
                        k -= 1
            else:
                owner = self._tx_owner[head]
                packet = PyBytes_FromStringAndSize(<const char*>self._tx_iov[head].iov_base,
                                                   self._tx_iov[head].iov_len)
                try:
                    if self._transport is not None:
                        self._transport.sendto(packet, owner.address)
                    else:
                        self.sock.sendto(packet, owner.address)
                except BlockingIOError:
                    self._arm_writer()
                    return False
                except OSError:
                    self._counters[CNT_SEND_ERRORS] += 1
                else:
                    self._counters[CNT_PACKETS_OUT] += 1
                    self._counters[CNT_BYTES_OUT] += PyBytes_GET_SIZE(packet)
                self._tx_head += 1
        for i in range(self._tx_count):
            self._tx_owner[i] = None
        self._tx_head = 0
        self._tx_count = 0
        return True

    cdef int _arm_writer(self) except -1:
        if not self._writer_armed:
            self.loop.add_writer(self._fd, self._on_writable)
            self._writer_armed = True
        return 0

    def _on_writable(self):
        self.loop.remove_writer(self._fd)
        self._writer_armed = False
        self._flush_all(self._loop_time())

    def take_payload(self, Session session not None, Py_ssize_t budget) -> bytes:
        """Pop whole frames, at most budget bytes, from the front of session's queue: the first
        messages to a new peer ride in the handshake's FINISH."""
        cdef Py_ssize_t take, length
        cdef uint8_t* front
        cdef bytes queued
        out = bytearray()
        while len(out) < budget:
            if session._queue_len():
                queued = session._queue[session._queue_head]
                front = <uint8_t*>PyBytes_AS_STRING(queued)
                length = PyBytes_GET_SIZE(queued)
            elif session._cur_len:
                queued = None
                front = session._cur
                length = session._cur_len
            else:
                break
            take = _whole_frames(front, length, budget - len(out))
            if take == 0:
                break
            out += front[:take]
            if queued is None:
                memmove(front, front + take, length - take)
                session._cur_len -= take
                if session._cur_len == 0:
                    self._give_buffer(session._cur, session._cap)
                    session._cur = NULL
            elif take == length:
                session._pop_payload()
            else:
                session._queue[session._queue_head] = queued[take:]
                session._queued_bytes -= take
            if take < length:
                break
        session._wake_drained(None)
        return bytes(out)

    def sendto(self, data, addr) -> None:
        """Send one raw packet now (handshake packets). Failures are counted (send_errors),
        not raised: the handshake retransmits."""
        if self.sock is None:  # a stream-only engine
            self._counters[CNT_SEND_ERRORS] += 1
            return
        try:
            if self._transport is not None:
                self._transport.sendto(data, addr)
            else:
                self.sock.sendto(data, addr)
        except OSError:
            self._counters[CNT_SEND_ERRORS] += 1
        else:
            self._counters[CNT_PACKETS_OUT] += 1
            self._counters[CNT_BYTES_OUT] += len(data)

    def wait_drained(self, Session session not None):
        """A future resolved once session's queue is below half full (ClosedError if the session
        or engine closes first): what a sender awaits after send_message returned False."""
        future = self.loop.create_future()
        if session._closed or self._closed:
            future.set_exception(ClosedError("session is closed"))
        elif session._below_half():
            future.set_result(None)
        else:
            if session._drain_waiters is None:
                session._drain_waiters = []
            session._drain_waiters.append(future)
        return future

    def purge_retained(self):
        """Forget retained packets older than RETAIN_SENT_TIME and free the retention ring of
        every session left with none: what keeps a session that fell idle small. The network
        calls it once a second; it visits only the sessions that sent lately."""
        cdef double now = self._loop_time()
        cdef list keep = []
        cdef Session s
        for s in self._retaining:
            if s._ret != NULL and not s._purge_retained(now):
                keep.append(s)
        self._retaining = keep

    # -- introspection ---------------------------------------------------------------------

    def counters(self) -> dict:
        """Every counter by its docs/wire.md name."""
        cdef int i
        return {COUNTER_NAMES[i]: self._counters[i] for i in range(CNT_COUNT)}

    cdef int _report(self, str message, object exc, Session s) except -1:
        context = {"message": message, "exception": exc}
        if s is not None:
            context["session"] = s
        self.loop.call_exception_handler(context)
        return 0

    @property
    def use_gro(self) -> bool:
        """Whether reads take runs of datagrams coalesced by UDP GRO."""
        return self._gro

    @property
    def use_gso(self) -> bool:
        """Whether sends group same-size datagrams with UDP GSO (off after a refusal)."""
        return self._gso

    def __repr__(self):
        mode = "recvmmsg" if self.use_recvmmsg else "endpoint"
        return f"<UdpEngine fd={self._fd} {mode} sessions={len(self.sessions)}>"
