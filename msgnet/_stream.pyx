# cython: auto_pickle=False
"""The stream transport's hot path (docs/wire.md §6): length prefixes parsed in C, DATA packets
handed to the session's engine at C level, sealed packets written with their prefix in one
transport write.

:class:`StreamCore` is the compiled base of :class:`msgnet.tcp.StreamConnection` (the asyncio
glue: connecting, limits, timers, closing). Per read it costs uvloop two calls
(``get_buffer``, which returns the core itself, and ``buffer_updated``) and no Python object per
packet: the receive buffer is C memory that the core exports through the buffer protocol, a
DATA packet of a known session goes straight to ``UdpEngine._feed_stream`` (AEAD open, replay
window, frames, handlers), and the engines the packets touched send what the handlers queued
(replies, BOUND, PONG) at the end of the read, as the UDP receive batch does, instead of an
event-loop iteration later. Everything else (handshakes, unknown sessions, a packet that proves
the peer moved to this connection) goes to the delegate's Python methods.

Sending: the engine seals a stream packet into a bytes object that already holds its
``length:varint`` prefix and calls :meth:`StreamCore.write_sealed`, one ``transport.write``
with no copy. A large packet (``PIECES_FROM``) is sealed and written ``PIECE`` bytes at a time
instead, and the receiving core opens it as its pieces arrive, checking the tag at the end: the
two ends then encrypt and decrypt at the same time (a 1 MiB request over loopback: 1.8 -> 0.85
ms). In plaintext mode such a packet is its header then the payload object itself, written as
it is (1.58 -> 0.5 ms: no copy, and no fresh 1 MiB buffer to fault in). A packet goes straight
to the socket while the transport holds nothing (StreamCore._write). The core also keeps what
reliable delivery on a stream needs (docs/wire.md §6.1): the packets of sessions that sent
reliable messages, until the peer's PONG to a PING written after them proves they arrived.
"""

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_WRITE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.long cimport PyLong_FromUnsignedLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL

from msgnet._frame cimport (
    FRAME_CONTINUATION,
    FRAME_INIT,
    FRAME_PING,
    READ_END,
    READ_OK,
    FrameView,
    read_frame,
)
from msgnet._engine cimport (
    C_PIECE,
    C_PIECES_FROM,
    Session,
    UdpEngine,
    register_stream_writer,
)
from msgnet._packet cimport (
    AEAD_TAG_SIZE,
    C_REPLAY_WINDOW,
    DATA_HEADER_SIZE,
    DATA_OVERHEAD,
    OPEN_OK,
    PACKET_DATA,
    PACKET_PLAIN_DATA,
    PieceCipher,
    ReplayWindow,
    SessionCrypto,
    _load_u32_be,
    open_pieces,
)

from msgnet import limits
from msgnet._engine import STREAM_BAD, STREAM_OK

__all__ = ["MAX_HEADER", "MIN_READ", "PIECE", "PIECES_FROM", "READ_BUFFER", "Retention",
           "SHRINK_AFTER", "StreamCore", "WAIT_PING_MARK", "encode_stream_header",
           "resume_report"]

READ_BUFFER = 64 * 1024
"""Initial receive buffer per connection, and the size it shrinks back to when empty."""
SHRINK_AFTER = 16
"""A buffer grown for a packet larger than READ_BUFFER is kept (at most one packet's size,
what receiving that packet cost anyway) until this many smaller packets in a row arrived:
a peer sending large messages back to back then costs no allocation, copy and page faults
per message (callgrind/py-spy: 28% of a 1 MiB request's CPU went to regrowing the buffer)."""
MIN_READ = 4096
"""Below this much free room, the buffer is compacted or grown before a read."""
PIECE = C_PIECE
"""A DATA packet whose payload is at least PIECES_FROM bytes is sealed and written PIECE bytes at
a time, and opened as its bytes arrive (msgnet._packet.PieceCipher): the peer decrypts one piece
while the sender encrypts the next, where a whole-packet seal and open would add up (a 1 MiB
message: ~0.4 ms each way). Nothing of the packet is delivered before its tag verified."""
PIECES_FROM = C_PIECES_FROM

cdef Py_ssize_t _READ_BUFFER = READ_BUFFER
cdef Py_ssize_t _MIN_READ = MIN_READ
cdef int _SHRINK_AFTER = SHRINK_AFTER
cdef uint64_t _MAX_PACKET = limits.MAX_STREAM_PACKET
# Bytes of the longest valid length prefix: any longer varint is malformed or too large, so it
# is refused as soon as that many bytes arrive without its end.
cdef int _MAX_HEADER = (limits.MAX_STREAM_PACKET.bit_length() + 6) // 7
MAX_HEADER = _MAX_HEADER
cdef Py_ssize_t _RETAIN_PACKETS = limits.STREAM_RETAIN_PACKETS
cdef Py_ssize_t _RETAIN_BYTES = limits.STREAM_RETAIN_BYTES
cdef int _OK = STREAM_OK
cdef int _BAD = STREAM_BAD

cdef char* _FORMAT_B = "B"


def encode_stream_header(Py_ssize_t length) -> bytes:
    """The ``length:varint`` that precedes a packet of ``length`` bytes on a stream."""
    cdef uint8_t out[10]
    cdef int k = 0
    if length < 0:
        raise ValueError("negative length")
    while length >= 0x80:
        out[k] = <uint8_t>(length & 0x7F | 0x80)
        length >>= 7
        k += 1
    out[k] = <uint8_t>length
    return (<char*>out)[:k + 1]


cdef class Retention


WAIT_PING_MARK = b"\xa5msgnet/wait"
"""The PING data of a Reliable(wait=True) send begins so (docs/wire.md §6.1): + 8 random bytes."""
cdef bytes _WAIT_MARK = WAIT_PING_MARK


cdef bint _carries_messages(const uint8_t* p, Py_ssize_t n) noexcept:
    """Whether a payload of ours holds an INIT or CONTINUATION frame, or a waiting send's PING:
    only those matter to a resume (docs/wire.md §6.1), so a packet of other control frames
    alone (PONG, BOUND...) is not kept. True if the frames do not parse (never for our own)."""
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t mark = PyBytes_GET_SIZE(_WAIT_MARK)
    cdef FrameView fv
    cdef int rc
    while True:
        rc = read_frame(p, n, &pos, &fv)
        if rc == READ_END:
            return False
        if rc != READ_OK or fv.type == FRAME_INIT or fv.type == FRAME_CONTINUATION:
            return True
        if (fv.type == FRAME_PING and fv.payload_len >= mark
                and memcmp(fv.payload, PyBytes_AS_STRING(_WAIT_MARK), mark) == 0):
            return True


cdef class StreamCore:
    """Receive buffer, packet splitting and the write path of one stream connection.

    Attributes the glue shares with the core: ``_reason`` (None while open), ``_transport``,
    ``_paused``, ``_active`` (traffic since the idle timer last looked), ``_packet_started``,
    the traffic totals, and ``rx_time`` (loop time of the last packet that authenticated for
    a session on this connection).
    """

    cdef uint8_t* _buf
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _start          # first unread byte
    cdef Py_ssize_t _end            # end of the received bytes
    cdef Py_ssize_t _header         # length of the pending packet's prefix, 0 until parsed
    cdef Py_ssize_t _need           # bytes from _start the pending packet takes, 0 until known
    cdef int _exports               # live buffer-protocol exports of the free room
    cdef int _small_packets         # packets of at most READ_BUFFER since the last larger one
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]

    cdef public object _reason
    cdef public object _transport
    cdef public bint _transport_may_hold  # transport.write was called since it was last empty
    cdef object _bound_transport        # the transport these two are bound methods of:
    cdef object _is_closing
    cdef object _write_buffer_size
    # The transport's socket, for writes that go to it directly (_write); -1: never.
    cdef public int _fd
    cdef public bint _paused
    cdef public bint _active
    cdef public double _packet_started
    cdef public double rx_time
    cdef public Py_ssize_t packets_in
    cdef public Py_ssize_t bytes_in
    cdef public Py_ssize_t packets_out
    cdef public Py_ssize_t bytes_out
    cdef readonly Py_ssize_t piecewise_in   # packets opened as they arrived (PIECES_FROM)
    cdef readonly Py_ssize_t piecewise_out  # packets sealed as they were written

    cdef object _sessions           # local index -> Session, or None (no fast path)
    cdef object _on_packet          # delegate.stream_packet: the slow path
    cdef object _on_authenticated   # delegate.stream_authenticated, or None
    cdef object _on_bad             # delegate.stream_bad_packet, or None
    cdef object _counters           # the owner's Counter (stream_write_refused)
    cdef object _loop_time
    cdef object _call_soon
    cdef double _packet_timeout
    cdef uint32_t _last_index       # the session of the previous DATA packet (cache)
    cdef Session _last_session
    # A large pending DATA packet opened as it arrives (PIECES_FROM): its cipher, its session,
    # and how many of its ciphertext bytes are open (-1: it is opened whole when complete).
    cdef PieceCipher _opening
    cdef Session _opening_session
    cdef Py_ssize_t _opened

    # Reliable delivery (docs/wire.md §6.1): the packets of retaining sessions written here
    # and not yet acknowledged, as (counter, payload) in write order.
    cdef Retention _retention       # shared by the host's connections, or None
    cdef dict _kept                 # Session -> list of (counter, payload)
    cdef readonly Py_ssize_t retained_packets
    cdef readonly Py_ssize_t retained_bytes
    cdef bint _retain_full

    def __cinit__(self, *args, **kwargs):
        self._buf = <uint8_t*>PyMem_Malloc(_READ_BUFFER)
        if self._buf == NULL:
            raise MemoryError()
        self._cap = _READ_BUFFER
        self._strides[0] = 1
        self._fd = -1

    def __dealloc__(self):
        PyMem_Free(self._buf)
        self._buf = NULL

    cpdef _setup_core(self, delegate, counters, loop, double packet_timeout, sessions,
                      Retention retention):
        """Bind the core to its owner (called once, by the glue's __init__)."""
        self._retention = retention
        self._on_packet = delegate.stream_packet
        self._on_authenticated = getattr(delegate, "stream_authenticated", None)
        self._on_bad = getattr(delegate, "stream_bad_packet", None)
        self._sessions = sessions
        self._counters = counters
        self._loop_time = loop.time
        self._call_soon = loop.call_soon
        self._packet_timeout = packet_timeout

    @property
    def writable(self) -> bool:
        """Open, not back-pressured, and with room for retained packets: the engine seals
        packets for it."""
        return (self._reason is None and not self._paused and self._transport is not None
                and not self._retain_full)

    # -- the receive buffer ----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received and not yet delivered (a partial packet)."""
        return self._end - self._start

    @property
    def buffer_size(self) -> int:
        """The receive buffer's current allocation."""
        return self._cap

    def __len__(self):
        """The free room that the next read may fill (what get_buffer offers)."""
        return self._cap - self._end

    def __getbuffer__(self, Py_buffer* view, int flags):
        self._shape[0] = self._cap - self._end
        view.buf = <char*>(self._buf + self._end)
        view.obj = self
        view.len = self._cap - self._end
        view.readonly = 0
        view.itemsize = 1
        view.format = _FORMAT_B if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        view.shape = self._shape
        view.strides = self._strides
        view.suboffsets = NULL
        view.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self._exports -= 1

    def get_buffer(self, sizehint):
        """asyncio.BufferedProtocol: the core itself, exporting its free room."""
        if self._start == self._end:
            self._start = self._end = 0
            if self._cap > _READ_BUFFER and self._small_packets >= _SHRINK_AFTER:
                self._resize(_READ_BUFFER, 0)  # large packets stopped: release their room
        if self._need and self._start + self._need <= self._cap:
            pass  # the pending packet completes within the buffer where it is
        elif self._need or self._cap - self._end < _MIN_READ:
            self._make_room()
        return self

    cdef int _resize(self, Py_ssize_t size, Py_ssize_t pending) except -1:
        """A buffer of size bytes holding the pending bytes at its front."""
        cdef uint8_t* fresh
        if self._exports:
            raise BufferError("the stream buffer is exported: it cannot move")
        fresh = <uint8_t*>PyMem_Malloc(size)
        if fresh == NULL:
            raise MemoryError()
        if pending:
            memmove(fresh, self._buf + self._start, pending)
        PyMem_Free(self._buf)
        self._buf = fresh
        self._cap = size
        return 0

    cdef int _make_room(self) except -1:
        """Move the pending bytes to the front, in a buffer grown (at most doubling what was
        received) toward the pending packet's size: a peer that merely announces a large
        packet costs no more memory than the bytes it sent."""
        cdef Py_ssize_t pending = self._end - self._start
        cdef Py_ssize_t size = _READ_BUFFER
        if self._need > _READ_BUFFER:
            size = min(self._need, max(_READ_BUFFER, 2 * pending))
        if size == self._cap:
            if self._start:
                memmove(self._buf, self._buf + self._start, pending)
        else:
            self._resize(size, pending)
        self._start = 0
        self._end = pending
        return 0

    def buffer_updated(self, Py_ssize_t nbytes):
        """asyncio.BufferedProtocol: nbytes arrived; deliver every whole packet."""
        cdef bint was_empty
        cdef bint delivered
        cdef double now
        if self._reason is not None:
            return
        if not 0 < nbytes <= self._cap - self._end:
            raise ValueError("buffer_updated beyond the buffer")
        was_empty = self._start == self._end
        self._end += nbytes
        self.bytes_in += nbytes
        self._active = True
        delivered = self._deliver()
        if self._start == self._end:
            self._packet_started = 0.0
        elif (delivered or was_empty) and self._reason is None:
            # A new packet began in this read: it has packet_timeout to complete.
            now = self._loop_time()
            self._packet_started = now
            self._arm(now + self._packet_timeout)

    cdef Py_ssize_t _parse_header(self) except -2:
        """The pending packet's length prefix: its length (setting _header and _need), 0 if
        more bytes are needed, -1 if it is malformed (docs/wire.md §6, notation)."""
        cdef const uint8_t* p = self._buf + self._start
        cdef Py_ssize_t avail = self._end - self._start
        cdef uint64_t length = 0
        cdef int shift = 0
        cdef Py_ssize_t i = 0
        cdef uint8_t byte
        while i < avail and i < _MAX_HEADER:
            byte = p[i]
            i += 1
            length |= (<uint64_t>(byte & 0x7F)) << shift
            if byte < 0x80:
                if byte == 0 and i > 1:  # non-minimal
                    return -1
                if length == 0 or length > _MAX_PACKET:
                    return -1
                self._header = i
                self._need = i + <Py_ssize_t>length
                return <Py_ssize_t>length
            shift += 7
        return -1 if i == _MAX_HEADER else 0

    cdef bint _deliver(self) except -1:
        """Hand every whole packet in the buffer on; False if there was none. Closes the
        connection (bad_stream) on a malformed length prefix."""
        cdef bint delivered = False
        cdef Py_ssize_t start, n
        cdef uint8_t first
        cdef uint8_t* pkt
        cdef UdpEngine engine
        cdef UdpEngine first_engine = None
        cdef list engines = None
        cdef PieceCipher opening
        try:
            while self._start < self._end and self._reason is None:
                start = self._start
                if not self._need:
                    first = self._buf[start]
                    if 0 < first < 0x80:  # a one-byte length: the common case
                        self._header = 1
                        self._need = 1 + first
                    else:
                        n = self._parse_header()
                        if n <= 0:
                            if n < 0:
                                self.abort("bad_stream")
                            break
                n = self._need - self._header
                if self._end - start < self._need:
                    if n >= C_PIECES_FROM + DATA_OVERHEAD and self._opened >= 0:
                        self._open_arrived(self._buf + start + self._header, n,
                                           self._end - start - self._header)
                    break
                pkt = self._buf + start + self._header
                if n > _READ_BUFFER:
                    self._small_packets = 0
                elif self._small_packets < _SHRINK_AFTER:
                    self._small_packets += 1
                self._start = start + self._need
                self._header = self._need = 0
                self.packets_in += 1
                delivered = True
                opening = self._opening
                if opening is not None:
                    self.piecewise_in += 1
                    try:
                        self._open_arrived(pkt, n, n)  # the rest, tag excepted
                    finally:
                        self._opening = None
                self._opened = 0
                engine = self._packet(pkt, n, opening)
                if engine is not None and engine is not first_engine:
                    if first_engine is None:
                        first_engine = engine
                    elif engines is None:
                        engines = [engine]
                    elif engine not in engines:
                        engines.append(engine)
        finally:
            if first_engine is not None:
                self._end_batch(first_engine)
                if engines is not None:
                    for engine in engines:
                        self._end_batch(engine)
        return delivered

    cdef Session _session_of(self, const uint8_t* pkt, Py_ssize_t n):
        """The session with keys a DATA packet of n bytes is for, or None (the slow path)."""
        cdef uint32_t index
        cdef PyObject* found
        cdef Session s = None
        if (self._sessions is not None and n >= DATA_HEADER_SIZE
                and (pkt[0] == PACKET_DATA or pkt[0] == PACKET_PLAIN_DATA)):
            index = _load_u32_be(pkt + 1)
            if (self._last_session is not None and index == self._last_index
                    and not self._last_session._closed):
                s = self._last_session
            else:
                found = PyDict_GetItem(self._sessions, PyLong_FromUnsignedLong(index))
                if found != NULL and (<Session>found).crypto is not None:
                    s = <Session>found
                    self._last_session = s
                    self._last_index = index
        return s if s is not None and s.crypto is not None else None

    cdef int _open_arrived(self, uint8_t* pkt, Py_ssize_t n, Py_ssize_t avail) except -1:
        """Open what arrived (avail bytes) of the pending DATA packet pkt[0:n], at least PIECE
        bytes at a time until it is all there (the tag excepted). The first call begins it,
        or marks the packet to be opened whole (_opened = -1) if it cannot be opened so."""
        cdef Py_ssize_t ready
        cdef Session s
        if self._opening is None:
            if avail < DATA_HEADER_SIZE:
                return 0
            s = self._session_of(pkt, n)
            self._opening = None if s is None else open_pieces(s.crypto, pkt)
            if self._opening is None:
                self._opened = -1
                return 0
            self._opening_session = s
            self._opened = 0
        ready = min(avail, n - AEAD_TAG_SIZE) - DATA_HEADER_SIZE - self._opened
        if ready >= C_PIECE or (avail == n and ready > 0):
            pkt += DATA_HEADER_SIZE + self._opened
            self._opening.update(pkt, ready, pkt)
            self._opened += ready
        return 0

    cdef UdpEngine _packet(self, uint8_t* pkt, Py_ssize_t n, PieceCipher opened):
        """One whole packet: DATA for a session with keys goes to its engine here (the engine
        is returned when this read began a receive batch on it); anything else to the
        delegate. ``opened``: its ciphertext is open already (_open_arrived), the tag not yet
        checked. Never raises: errors go to the loop's exception handler."""
        cdef Session s
        cdef UdpEngine engine
        cdef UdpEngine batch = None
        cdef int status
        if opened is not None:
            s = self._opening_session
            self._opening_session = None
            if s._closed or s.crypto is None:
                return None  # (its keys are gone: it would be dropped as unknown_session)
        else:
            s = self._session_of(pkt, n)
        if s is None:
            self._slow(pkt, n)
            return None
        engine = s.engine
        if not engine._in_batch:
            engine._in_batch = True
            engine._sent_early = False
            batch = engine
        try:
            status = engine._feed_stream(s, pkt, n, self, opened)
            if status == _OK:
                self.rx_time = s.last_received
                if (s.stream is not self or s._udp) and self._on_authenticated is not None:
                    self._on_authenticated(s, self)  # first contact, or the peer moved here
            elif status == _BAD and self._on_bad is not None:
                self._on_bad(self)
        except Exception as exc:
            self._report("stream_packet", exc)
        return batch

    cdef int _slow(self, uint8_t* pkt, Py_ssize_t n) except -1:
        """The delegate's stream_packet, with a view of the packet valid during the call."""
        view = PyMemoryView_FromMemory(<char*>pkt, n, PyBUF_WRITE)
        try:
            self._on_packet(self, view)
        except Exception as exc:
            self._report("stream_packet", exc)
        finally:
            try:
                view.release()
            except BufferError:  # the delegate kept a view of it: it stays valid, unused
                pass
        return 0

    cdef int _end_batch(self, UdpEngine engine) except -1:
        """Send what the read made engine queue, coalesced per session (its receive batch)."""
        engine._in_batch = False
        try:
            if engine._dirty and not engine._closed:
                engine._flush_all(engine._now)  # the batch's time (_feed_stream's)
            elif engine._tx_count and not engine._closed:
                engine._drain_tx()
        except Exception as exc:
            self._report("flush", exc)
        return 0

    # -- sending ---------------------------------------------------------------------------

    def write_sealed(self, bytes packet, Session session, uint64_t counter, bytes payload,
                     PieceCipher pieces=None, bint payload_follows=False) -> bool:
        """_write_sealed, for Python callers (the engine calls it in C: _engine.pxd,
        StreamWriter)."""
        return self._write_sealed(packet, session, counter, payload, pieces, payload_follows)

    cdef bint _write_sealed(self, bytes packet, Session session, uint64_t counter,
                            bytes payload, PieceCipher pieces,
                            bint payload_follows) except -1:
        """Write one sealed packet that already carries its length prefix (the engine's stream
        send path). False (counted as stream_write_refused) when closed or back-pressured.
        A retaining session's packets are kept until acknowledged (docs/wire.md §6.1).

        With ``pieces`` the packet holds its prefix and header only: its payload is sealed
        here PIECE bytes at a time, each written as soon as it is sealed. With
        ``payload_follows`` (a large plaintext packet) it holds them only too, and the
        payload object itself is written after it: no copy of the payload in user space,
        and no fresh buffer of its size (whose pages the kernel would fault in)."""
        cdef list kept
        cdef list ping
        cdef Retention retention = self._retention
        transport = self._transport
        if self._reason is not None or self._paused or transport is None:
            self._counters["stream_write_refused"] += 1
            return False
        self.packets_out += 1
        if payload_follows:
            self._write(transport, packet)
            self._write(transport, payload)
            self.bytes_out += PyBytes_GET_SIZE(packet) + PyBytes_GET_SIZE(payload)
        elif pieces is None:
            self._write(transport, packet)
            self.bytes_out += PyBytes_GET_SIZE(packet)
        else:
            self._write_pieces(transport, packet, payload, pieces)
            self.piecewise_out += 1
            self.bytes_out += PyBytes_GET_SIZE(packet) + PyBytes_GET_SIZE(payload) + AEAD_TAG_SIZE
        self._active = True
        if retention is not None and retention.sessions and session in retention.sessions:
            if self._kept is None:
                self._kept = {}
            kept = self._kept.get(session)
            if _carries_messages(<const uint8_t*>PyBytes_AS_STRING(payload),
                                 PyBytes_GET_SIZE(payload)):
                if kept is None:
                    kept = self._kept[session] = []
                kept.append((counter, payload))
                self.retained_packets += 1
                self.retained_bytes += PyBytes_GET_SIZE(payload)
            ping = retention.pings.get(session)
            if ping is not None and ping[1] is None and ping[0] in payload:
                ping[1] = self          # the PING went out here: its PONG covers these
                ping[2] = 0 if kept is None else len(kept)
            if (not self._retain_full and (self.retained_packets >= _RETAIN_PACKETS
                                           or self.retained_bytes >= _RETAIN_BYTES)):
                self._retain_full = True
                if retention.on_full is not None:  # the PING that frees room must go out
                    self._call_soon(retention.on_full, self)
        return True

    cdef int _write(self, transport, bytes data) except -1:
        """transport.write(data), but straight to the socket, with one non-blocking send(),
        while the transport holds nothing (its buffer and the event loop's write queue are
        empty, so nothing can be overtaken) and is not closing (so the descriptor is still
        its own): what uvloop would do at once too, without its write request and
        bookkeeping (about a thousand instructions per packet). What the socket does not
        take, and any error, goes to transport.write, which queues or reports it as ever.

        The transport's buffer is asked about only after a transport.write (here or by the
        glue: _transport_may_hold), and its two methods are bound once per transport: the
        two method calls per packet cost ~800 instructions of a round trip's ~29k."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef ssize_t sent
        if self._fd >= 0:
            if transport is not self._bound_transport:
                self._bound_transport = transport
                self._is_closing = transport.is_closing
                self._write_buffer_size = transport.get_write_buffer_size
                self._transport_may_hold = True
            if self._transport_may_hold and not self._write_buffer_size():
                self._transport_may_hold = False
            if not self._transport_may_hold and not self._is_closing():
                sent = send(self._fd, PyBytes_AS_STRING(data), <size_t>n,
                            MSG_DONTWAIT | MSG_NOSIGNAL)
                if sent == n:
                    return 0
                if sent > 0:
                    self._transport_may_hold = True
                    transport.write(memoryview(data)[sent:])
                    return 0
        self._transport_may_hold = True
        transport.write(data)
        return 0

    cdef int _write_pieces(self, transport, bytes head, bytes payload,
                           PieceCipher pieces) except -1:
        """Seal payload after head (the packet's prefix and header) PIECE bytes at a time,
        writing each piece as soon as it is sealed, in a bytes object of its own: no buffer
        of the whole packet (a fresh 1 MiB costs page faults), none that a pending write
        still holds."""
        cdef const uint8_t* src = <const uint8_t*>PyBytes_AS_STRING(payload)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef Py_ssize_t lead = PyBytes_GET_SIZE(head)
        cdef Py_ssize_t done = 0, k, size
        cdef bytes piece
        cdef uint8_t* out
        while True:
            k = min(<Py_ssize_t>C_PIECE, n - done)
            size = lead + k + (AEAD_TAG_SIZE if done + k == n else 0)
            piece = PyBytes_FromStringAndSize(NULL, size)
            out = <uint8_t*>PyBytes_AS_STRING(piece)
            if lead:
                memcpy(out, PyBytes_AS_STRING(head), lead)
            pieces.update(src + done, k, out + lead)
            done += k
            if done == n:
                pieces.finish(out + lead + k)
                self._write(transport, piece)
                return 0
            self._write(transport, piece)
            lead = 0

    # -- reliable delivery (docs/wire.md §6.1) ------------------------------------------------

    @property
    def retain_full(self) -> bool:
        """The retained packets reached their bound: no DATA is sealed for this connection
        until a PONG releases some (the connection is not :attr:`writable` meanwhile)."""
        return self._retain_full

    def retained(self, Session session not None) -> list:
        """session's unacknowledged packets here, as (counter, payload) in write order."""
        if self._kept is None:
            return []
        return list(self._kept.get(session) or ())

    def kept_count(self, Session session not None) -> int:
        """How many of session's packets written here await acknowledgement."""
        if self._kept is None:
            return 0
        kept = self._kept.get(session)
        return 0 if kept is None else len(kept)

    def retained_sessions(self) -> list:
        """The sessions with unacknowledged packets here."""
        return [s for s, kept in self._kept.items() if kept] if self._kept is not None else []

    def release(self, Session session not None, Py_ssize_t count) -> int:
        """The first count packets kept for session arrived: forget them. Returns how many
        were released."""
        cdef list kept
        cdef Py_ssize_t k
        if self._kept is None:
            return 0
        kept = self._kept.get(session)
        if not kept:
            return 0
        count = min(count, len(kept))
        for k in range(count):
            self.retained_bytes -= PyBytes_GET_SIZE(kept[k][1])
        self.retained_packets -= count
        del kept[:count]
        if not kept:
            del self._kept[session]
        if (self._retain_full and self.retained_packets < _RETAIN_PACKETS
                and self.retained_bytes < _RETAIN_BYTES):
            self._retain_full = False
        return count

    def forget(self, Session session not None) -> list:
        """Stop keeping session's packets here; returns them, as (counter, payload)."""
        if self._kept is None:
            return []
        kept = self._kept.get(session)
        if not kept:
            return []
        self.release(session, 0)
        self._kept.pop(session, None)
        self.retained_packets -= len(kept)
        for _, payload in kept:
            self.retained_bytes -= len(payload)
        if (self._retain_full and self.retained_packets < _RETAIN_PACKETS
                and self.retained_bytes < _RETAIN_BYTES):
            self._retain_full = False
        return kept


cdef class Retention:
    """What the connections of one host share for reliable delivery on streams
    (docs/wire.md §6.1): the sessions whose stream packets are kept, and per session the PING
    that will acknowledge them: [marker, connection it went out on (None: not yet written),
    how many of that connection's kept packets it covers, when it was queued]."""

    cdef public set sessions
    cdef public dict pings
    cdef public object on_full      # called (soon) with a connection whose retention is full

    def __cinit__(self):
        self.sessions = set()
        self.pings = {}


cdef bint _write_to_stream(object stream, bytes packet, Session session, uint64_t counter,
                        bytes payload, PieceCipher pieces, bint payload_follows) except -1:
    """The engine's stream writer (_engine.pxd, StreamWriter): write_sealed by a C call."""
    if isinstance(stream, StreamCore):
        return (<StreamCore>stream)._write_sealed(packet, session, counter, payload, pieces,
                                                  payload_follows)
    return stream.write_sealed(packet, session, counter, payload, pieces, payload_follows)


register_stream_writer(_write_to_stream)


def resume_report(SessionCrypto crypto not None, uint64_t up_to):
    """For a stream resume (docs/wire.md §6.1): which of the counters up_to, up_to - 1, ...
    the replay window has seen, as (count, bitmap) where bit i (LSB first) of the bitmap is
    counter up_to - i and count is how many counters the window can tell about (0..1024);
    then refuse every counter up to up_to from now on, so that a packet still on its way
    from a dead connection is dropped as a replay."""
    cdef ReplayWindow window = crypto.window
    cdef uint64_t highest = window.highest          # highest counter seen + 1 (0: none)
    cdef uint64_t low, c
    cdef Py_ssize_t count, i
    cdef bytearray bits
    # The window knows about counters above highest - REPLAY_WINDOW - 1 (older ones are
    # refused as replays whether or not they came); above highest - 1 nothing came yet.
    if highest > C_REPLAY_WINDOW:
        low = highest - C_REPLAY_WINDOW
    else:
        low = 0
    # (up_to comes from the peer: any u64, so no arithmetic here may wrap around.)
    if up_to < low:
        count = 0
    elif up_to - low >= <uint64_t>(C_REPLAY_WINDOW - 1):
        count = C_REPLAY_WINDOW
    else:
        count = <Py_ssize_t>(up_to - low) + 1
    bits = bytearray((count + 7) // 8)
    for i in range(count):
        c = up_to - <uint64_t>i
        if c < highest and not window.check(c):
            bits[i >> 3] |= 1 << (i & 7)
    # Refuse from now on: mark every counter within the window's reach up to up_to as seen.
    for i in range(count - 1, -1, -1):
        window.update(up_to - <uint64_t>i)
    return count, bytes(bits)
