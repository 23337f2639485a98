# C-level declarations of the UDP engine (msgnet/_engine.pyx): the socket API it calls
# directly, and the fields of Message, Session and UdpEngine.

from cpython.ref cimport PyObject
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from msgnet._frame cimport FrameView
from msgnet.core.delivery cimport DeliveryConnection
from msgnet._packet cimport PieceCipher, SessionCrypto

cdef extern from *:
    """
    #include <errno.h>
    #include <sys/socket.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>

    /* EAGAIN and EWOULDBLOCK are equal on Linux: no switch on them. */
    #define MSGNET_WOULD_BLOCK(e) ((e) == EAGAIN || (e) == EWOULDBLOCK)

    #ifndef MSGNET_DEBUG
    #define MSGNET_DEBUG 0
    #endif

    /* recvmmsg/sendmmsg are Linux (glibc defines them under _GNU_SOURCE, which
       pyconfig.h sets). Elsewhere the engine uses the create_datagram_endpoint
       path; these stubs only keep the module compiling. */
    #if defined(__linux__)
    #define MSGNET_HAVE_MMSG 1
    #include <string.h>
    #include <netinet/udp.h>
    #ifndef SOL_UDP
    #define SOL_UDP 17
    #endif
    #ifndef UDP_SEGMENT
    #define UDP_SEGMENT 103   /* Linux 4.18 */
    #endif
    #ifndef UDP_GRO
    #define UDP_GRO 104       /* Linux 5.0 */
    #endif
    #define MSGNET_HAVE_GSO 1
    #define MSGNET_GSO_CMSG_SPACE CMSG_SPACE(sizeof(uint16_t))
    #define MSGNET_GRO_CMSG_SPACE CMSG_SPACE(sizeof(int))
    /* The segment size of a read that UDP GRO coalesced from several datagrams of the same
       flow (each of that size, the last one possibly shorter), or 0 for a single datagram. */
    static inline int msgnet_gro_size(struct msghdr *h) {
        struct cmsghdr *c;
        int size = 0;
        for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
            if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO) {
                memcpy(&size, CMSG_DATA(c), sizeof(size));
                return size > 0 ? size : 0;
            }
        }
        return 0;
    }
    /* Ask the kernel to cut h's payload into datagrams of size bytes (UDP GSO): one pass
       down the stack for up to 64 datagrams to the same address. cmsg is this message's
       MSGNET_GSO_CMSG_SPACE bytes of control buffer. */
    static inline void msgnet_set_gso(struct msghdr *h, char *cmsg, uint16_t size) {
        struct cmsghdr *c;
        h->msg_control = cmsg;
        h->msg_controllen = MSGNET_GSO_CMSG_SPACE;
        c = CMSG_FIRSTHDR(h);
        c->cmsg_level = SOL_UDP;
        c->cmsg_type = UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        memcpy(CMSG_DATA(c), &size, sizeof(size));
    }
    #else
    #define MSGNET_HAVE_MMSG 0
    #define MSGNET_HAVE_GSO 0
    #define MSGNET_GSO_CMSG_SPACE 32
    #define MSGNET_GRO_CMSG_SPACE 32
    #define UDP_GRO 104
    static inline void msgnet_set_gso(struct msghdr *h, char *cmsg, uint16_t size)
    { (void)h; (void)cmsg; (void)size; }
    static inline int msgnet_gro_size(struct msghdr *h) { (void)h; return 0; }
    struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; };
    static inline int recvmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags, void *t)
    { (void)fd; (void)v; (void)n; (void)flags; (void)t; errno = ENOSYS; return -1; }
    static inline int sendmmsg(int fd, struct mmsghdr *v, unsigned int n, int flags)
    { (void)fd; (void)v; (void)n; (void)flags; errno = ENOSYS; return -1; }
    #endif
    """
    const int MSGNET_DEBUG
    const int MSGNET_HAVE_MMSG
    const int MSGNET_HAVE_GSO
    const size_t MSGNET_GSO_CMSG_SPACE
    const size_t MSGNET_GRO_CMSG_SPACE
    const int UDP_GRO
    bint MSGNET_WOULD_BLOCK(int err) nogil

    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    ctypedef uint32_t in_addr_t

    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct in_addr:
        in_addr_t s_addr
    struct in6_addr:
        uint8_t s6_addr[16]
    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    enum:
        AF_INET
        AF_INET6
        MSG_DONTWAIT
        MSG_TRUNC

    void msgnet_set_gso(msghdr* h, char* cmsg, uint16_t size) nogil
    int msgnet_gro_size(msghdr* h) nogil
    int recvmmsg(int fd, mmsghdr* msgvec, unsigned int vlen, int flags, void* timeout) nogil
    int sendmmsg(int fd, mmsghdr* msgvec, unsigned int vlen, int flags) nogil
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)


# Engine counters: an index into UdpEngine._counters; COUNTER_NAMES in _engine.pyx names them
# (the drop names are those of docs/wire.md).
cdef enum:
    CNT_PACKETS_IN
    CNT_BYTES_IN
    CNT_PACKETS_OUT
    CNT_BYTES_OUT
    CNT_MESSAGES_IN
    CNT_MESSAGES_OUT
    CNT_INIT_FRAMES_IN
    CNT_CONTINUATION_FRAMES_IN
    CNT_TRUNCATED
    CNT_NOT_MSGNET
    CNT_UNKNOWN_PACKET_TYPE
    CNT_UNKNOWN_SESSION
    CNT_REPLAY
    CNT_AUTH_FAILED
    CNT_COUNTER_EXHAUSTED
    CNT_PLAINTEXT_REFUSED
    CNT_BAD_FRAME
    CNT_UNKNOWN_FRAME
    CNT_UNKNOWN_ALIAS
    CNT_NO_HANDLER
    CNT_TOO_MANY_ALIASES
    CNT_OVERSIZE
    CNT_HANDLER_ERROR
    CNT_REPLY_DROPPED
    CNT_SEND_ERRORS
    CNT_COUNT

cdef enum:
    C_MAX_ALIASES = 256                # MAX_ALIASES_PER_SESSION
    C_BOUND_WORDS = 4                  # C_MAX_ALIASES / 64: one bit per alias
    C_BUFFER_POOL = 64                 # free payload buffers an engine keeps for reuse
    C_STREAM_BUFFER_POOL = 4           # ... of a stream session's size (C_STREAM_COALESCE)
    C_GSO_SEGMENTS = 64                # UDP_MAX_SEGMENTS: datagrams in one GSO send
    C_GSO_BYTES = 65000                # under the 65507-byte UDP payload limit of one send
    C_RETAIN_PACKETS = 64              # RETAIN_SENT_PACKETS
    C_DATAGRAM_CEILING = 65000         # MAX_DATAGRAM_CEILING
    C_BASE_PAYLOAD = 1200 - 29         # MAX_DATAGRAM - DATA_OVERHEAD: pooled payload buffers
    C_FRAGMENT_INIT_OVERHEAD = 34      # FRAGMENT_INIT_OVERHEAD
    C_MAX_BEST_EFFORT_FRAGMENTS = 16   # MAX_BEST_EFFORT_FRAGMENTS
    C_RX_SLOT = C_DATAGRAM_CEILING + 1 # one byte more: a datagram that fills it is oversize
    # With UDP GRO, one read may hold up to 64 KiB of coalesced datagrams: fewer, larger
    # receive slots (1 MiB in all, paged in as used).
    C_GRO_SLOT = 65536
    C_GRO_BATCH = 16
    # Stream paths (docs/wire.md §6): frames coalesce into payloads of up to C_STREAM_COALESCE
    # bytes; a message larger than that goes alone in a payload of up to C_STREAM_PAYLOAD
    # (MAX_STREAM_PACKET - DATA_OVERHEAD), so nothing is fragmented on a stream.
    C_STREAM_COALESCE = 65536 - 29
    C_STREAM_PAYLOAD = 1048576 + 4096 - 29
    # A stream payload of at least C_PIECES_FROM bytes is sealed and written, and opened as
    # it arrives, C_PIECE bytes at a time (msgnet._stream.PIECE).
    C_PIECE = 65536
    C_PIECES_FROM = 4 * 65536
    # A session's queue holds at most this many bytes of closed payloads (besides the payload
    # count bound): what keeps a queue of stream-sized payloads bounded.
    C_MAX_QUEUED_BYTES = 4194304

# What UdpEngine._feed_stream made of a stream packet (STREAM_* in _engine.pyx).
cdef enum:
    C_STREAM_BAD = -1
    C_STREAM_REPLAY = 0
    C_STREAM_OK = 1


cdef class UdpEngine


# A peer's address as sendmmsg and the receive-side comparison want it: 28 bytes, where a
# sockaddr_storage would be 128 in every session.
cdef union SockAddr:
    sockaddr sa
    sockaddr_in v4
    sockaddr_in6 v6


# One sent packet kept for SESSION_UNKNOWN recovery (docs/wire.md §2.5).
cdef struct Retained:
    uint64_t counter
    double time
    PyObject* payload      # owned reference to the plaintext payload (bytes)
    uint8_t tag[16]


cdef class Message:
    cdef readonly bytes data
    cdef readonly object from_peer
    cdef readonly str protocol
    cdef readonly object request_id
    cdef readonly int flags
    cdef readonly Session session


# Per-session state is allocated when first needed and released when idle, so that an idle
# session costs a few hundred bytes (the idle-session memory target): the alias tables on the
# first message each way, the open payload's buffer on the first frame (from the engine's pool,
# given back when the payload is sealed or queued), the retention ring on the first packet sent
# (freed once its packets are older than RETAIN_SENT_TIME).
cdef class Session:
    cdef readonly object peer_id
    cdef readonly uint32_t local_index
    cdef readonly uint32_t remote_index
    cdef readonly bint established
    cdef readonly bint initiator
    cdef readonly double created
    cdef readonly double last_received
    cdef readonly double last_sent
    cdef readonly double last_frames    # when the last packet with frames arrived (not a keep-alive)
    cdef readonly SessionCrypto crypto
    # The largest UDP datagram this session sends: MAX_DATAGRAM until PMTU discovery raises
    # it (docs/wire.md 5.1; UdpEngine.set_datagram_size), and whether the network searched.
    cdef readonly int datagram_size
    cdef public int pmtu_state          # PMTU_* in _engine.pyx: not searched, searching, done

    cdef readonly UdpEngine engine  # the engine this session belongs to
    cdef bint _closed
    # The remote address as a C sockaddr; its Python tuple (the address property) is built
    # when asked for.
    cdef SockAddr _sa
    cdef socklen_t _salen
    cdef object _address

    # Inbound aliases (the peer's numbering): alias int -> protocol str. None until the first.
    # An alias is bound once and never changes: the last one looked up and its protocol are
    # kept (a peer's packets come in runs on one protocol), which skips the dict lookup with a
    # new int key.
    cdef dict _in_protocols
    cdef uint64_t _last_in_alias
    cdef str _last_in_protocol
    # Outbound aliases (ours, numbered from 0): protocol str -> alias int; per alias the
    # protocol and its UTF-8 bytes (all three None until the first); a bit per alias set once
    # the peer answered BOUND.
    cdef dict _out_aliases
    cdef list _out_protocols
    cdef list _out_encoded
    cdef uint64_t _out_bound[C_BOUND_WORDS]
    # The protocol object _alias answered last and its alias: senders pass the same str
    # object message after message, so most frames skip the dict lookup.
    cdef object _last_protocol
    cdef int _last_alias

    # Send queue: frames are written into the open payload _cur[0:_cur_len] (a buffer of _cap
    # bytes, NULL when none is open); closing it copies the frames into an exact-size bytes
    # (what is sealed and retained) and returns the buffer to the engine's pool. Closed
    # payloads wait in _queue (from _queue_head on) when a flush has more than one to send.
    cdef uint8_t* _cur
    cdef Py_ssize_t _cur_len
    cdef int _cur_frames               # frames in the open payload (MAX_FRAMES_PER_PACKET)
    cdef Py_ssize_t _cap
    cdef list _queue
    cdef Py_ssize_t _queue_head
    cdef Py_ssize_t _queued_bytes
    cdef Py_ssize_t _max_queue
    cdef bint _dirty
    cdef list _drain_waiters

    # The last sealed packets (at most C_RETAIN_PACKETS, none older than RETAIN_SENT_TIME), for
    # SESSION_UNKNOWN recovery: a ring of _ret_cap entries (grown on demand, NULL when empty)
    # whose oldest is at _ret_head.
    cdef Retained* _ret
    cdef int _ret_cap
    cdef int _ret_head
    cdef int _ret_count

    # Paths (docs/wire.md §5), chosen by the network: packets go to the UDP address above when
    # _udp, else on the stream connection `stream`; with both, payloads too large for a
    # datagram take the stream, and _duplicate (first contact) sends every packet on both.
    cdef readonly object stream
    cdef bint _udp
    cdef bint _duplicate
    cdef uint16_t _transport_id        # what INIT frames name (the path's transport)
    cdef readonly double last_datagram # when the last authenticated datagram arrived
    cdef readonly object rx_stream     # the connection the packet being processed came on
    # The session's delivery-layer state, set by the delivery manager: the engine hands it
    # SEQ frames itself, a C call (delivery.pxd) instead of a delegate call.
    cdef public DeliveryConnection delivery

    cdef inline Py_ssize_t _queue_len(self) noexcept:
        return 0 if self._queue is None else len(self._queue) - self._queue_head

    cdef inline bint _queue_full(self) noexcept:
        return (self._queue_len() >= self._max_queue
                or self._queued_bytes >= C_MAX_QUEUED_BYTES)

    cdef inline bint _below_half(self) noexcept:
        """Room again for senders waiting on back-pressure."""
        return (2 * self._queue_len() < self._max_queue
                and 2 * self._queued_bytes < C_MAX_QUEUED_BYTES)

    cdef inline bint _is_bound(self, uint64_t alias) noexcept:
        return (self._out_bound[alias >> 6] >> (alias & 63)) & 1

    cdef inline void _set_bound(self, uint64_t alias, bint bound) noexcept:
        if bound:
            self._out_bound[alias >> 6] |= (<uint64_t>1) << (alias & 63)
        else:
            self._out_bound[alias >> 6] &= ~((<uint64_t>1) << (alias & 63))

    cdef object _get_address(self)
    cdef int _alias(self, str protocol) except -1
    cdef object _in_protocol(self, uint64_t alias)
    cdef uint8_t* _reserve(self, Py_ssize_t size, bint force) except? NULL
    cdef bytes _take_cur(self)
    cdef int _close_payload(self) except -1
    cdef bytes _pop_payload(self)
    cdef int _wake_drained(self, object error) except -1
    cdef int _retain(self, uint64_t counter, const uint8_t* tag, bytes payload,
                     double now) except -1
    cdef bint _purge_retained(self, double now) noexcept
    cdef void _release_retained(self) noexcept
    cdef int _set_address(self, object addr, int family) except -1


cdef class UdpEngine:
    cdef readonly object sock
    cdef readonly object loop
    cdef readonly dict sessions
    cdef Session _last_rx          # the session the last DATA packet was for (_session_for)
    cdef public int transport_id
    cdef readonly int max_datagram
    cdef readonly bint use_recvmmsg
    cdef readonly bint probes_path    # DF is set: sessions may probe for larger datagrams

    cdef object _delegate
    cdef dict _handlers
    cdef int _fd
    cdef int _family
    cdef int _batch
    cdef int _max_rounds
    cdef Py_ssize_t _max_queue
    cdef bint _reading
    cdef bint _closed
    cdef object _transport
    cdef double _now

    # Delegate methods and loop callbacks, bound once.
    cdef object _on_control
    cdef object _on_response
    cdef object _on_reset
    cdef object _on_pong
    cdef object _on_ack
    cdef object _on_close
    cdef object _on_delivery_ack
    cdef object _on_fragment         # delivery layer: SEQ frames (None: deliver plainly)
    cdef object _on_packet_received
    cdef object _on_confirmed
    cdef object _on_udp_packet       # a datagram authenticated for a session sending on a stream
    cdef object _loop_time
    cdef object _flush_cb

    # Receive ring: _rx_batch slots of _rx_slot bytes with their headers and source addresses,
    # and (with UDP GRO) a control buffer each for the segment size.
    cdef uint8_t* _rx_buf
    cdef mmsghdr* _rx_hdrs
    cdef iovec* _rx_iov
    cdef sockaddr_storage* _rx_addrs
    cdef char* _rx_cmsg
    cdef bint _gro
    cdef int _rx_batch
    cdef int _rx_filled            # slots the last recvmmsg filled: their lengths to reset
    cdef Py_ssize_t _rx_slot

    # Send ring: _batch sealed packets of at most max_datagram bytes; slots _tx_head.._tx_count
    # are sealed and not yet sent. _tx_owner holds each slot's Session (its address).
    # _tx_hdrs[i] addresses packet i alone; with GSO, _tx_units groups runs of same-size
    # packets to one session into one message each (_tx_unit_len packets, control in
    # _tx_cmsg).
    cdef uint8_t* _tx_buf
    cdef mmsghdr* _tx_hdrs
    cdef iovec* _tx_iov
    cdef list _tx_owner
    cdef bint _gso
    cdef mmsghdr* _tx_units
    cdef int* _tx_unit_len
    cdef char* _tx_cmsg
    cdef int _tx_head
    cdef int _tx_count

    cdef list _dirty
    cdef object _flush_handle
    cdef bint _writer_armed
    cdef bint _in_batch            # inside _on_readable: its end flushes, no call_soon needed
    cdef bint _sent_early          # an urgent frame went out unflushed since the last flush
    cdef list _retaining           # sessions whose retention ring is allocated
    # Free payload buffers (max_datagram - 29 bytes each): the open payload of a session is
    # one of these while it fills, so idle sessions hold none and busy ones do not malloc.
    cdef uint8_t* _pool[C_BUFFER_POOL]
    cdef int _pool_len
    # The same for stream sessions' payloads (C_STREAM_COALESCE bytes each): a malloc and free
    # of 64 KiB per packet cost more than the rest of a small message's send.
    cdef uint8_t* _stream_pool[C_STREAM_BUFFER_POOL]
    cdef int _stream_pool_len

    cdef uint64_t _counters[CNT_COUNT]

    cdef int _feed(self, bytes data, object addr) except -1
    cdef Session _session_for(self, uint32_t index)
    cdef int _datagram(self, const uint8_t* pkt, Py_ssize_t n, uint8_t* out,
                       const sockaddr* sa, object pyaddr, bytes data) except -1
    cdef int _control(self, const uint8_t* pkt, Py_ssize_t n, const sockaddr* sa,
                      object pyaddr, bytes data) except -1
    cdef int _frames(self, Session s, const uint8_t* p, Py_ssize_t n,
                     int64_t counter) except -1
    cdef int _confirmed(self, Session s) except -1
    cdef int64_t _seal_to_ring(self, Session s, bytes payload, double now,
                               bint retain=*, bint keep=*) except -2
    cpdef int64_t send_payload(self, Session session, bytes payload, bint drain=*) except -2
    cdef bint _route(self, Session s, uint64_t alias, str protocol, FrameView* fv,
                     int64_t counter) except -1
    cdef int _dispatch(self, Session s, uint64_t alias, str protocol, int flags,
                       uint64_t request_id, bytes data) except -1
    cdef int _message(self, Session s, uint64_t alias, str protocol, FrameView* fv) except -1
    cdef int _deliver(self, Session s, str protocol, int flags, uint64_t request_id,
                      bytes data) except -1
    cdef int _control_frame(self, Session s, FrameView* fv) except -1
    cdef Py_ssize_t _message_frame(self, Session s, str protocol, const uint8_t* data,
                                   Py_ssize_t length, int flags, uint64_t request_id,
                                   uint64_t seq, uint64_t frag_index, uint64_t frag_count,
                                   uint8_t* at, Py_ssize_t cap) except -1
    cdef int _queue_reply(self, Session s, uint8_t frame_type, uint64_t a, uint64_t b) except -1
    cdef int _queue_pong(self, Session s, const uint8_t* data, Py_ssize_t n) except -1
    cdef bint _send(self, Session s, str protocol, object payload, int flags,
                    object request_id, bint force=*) except -1
    cdef uint8_t* _take_buffer(self, Py_ssize_t size) except NULL
    cdef void _give_buffer(self, uint8_t* buf, Py_ssize_t size) noexcept
    cdef bint _to_stream(self, Session s, Py_ssize_t n) noexcept
    cdef int64_t _seal_to_stream(self, Session s, bytes payload, double now,
                                 bint keep=*) except -2
    cdef int _feed_stream(self, Session s, uint8_t* pkt, Py_ssize_t n, object conn,
                          PieceCipher opened) except -3
    cdef int _repack(self, Session s) except -1
    cdef int _mark_dirty(self, Session s, bint urgent=*) except -1
    cdef int _read_batches(self) except -1
    cdef int _read(self, uint8_t* buf, Py_ssize_t n, bint truncated, Py_ssize_t segment,
                   const sockaddr* sa) except -2
    cdef int _flush_all(self, double now) except -1
    cdef bint _seal_session(self, Session s, double now, bint force) except -1
    cdef bint _drain_tx(self) except -1
    cdef int _group_units(self) noexcept
    cdef int _arm_writer(self) except -1
    cdef int _report(self, str message, object exc, Session s) except -1



# How the network reaches one peer (_engine.pyx): its attributes are the network's.
cdef class PeerPath:
    cdef public object udp
    cdef public object stream
    cdef public str mode
    cdef public object transports
    cdef public double started
    cdef public double expect_since
    cdef public double stream_rx
    cdef public object dialing
    cdef public double move_since


# Which session a network's messages to a peer go on (_engine.pyx).
cdef class SendRoute:
    cdef public bint enabled
    cdef object _peer_id
    cdef Session _session
    cdef PeerPath _path
    cdef object _time
    cdef object _sessions
    cdef dict _paths

    cdef Session _lookup(self, peer_id)
    cpdef Session session_of(self, peer_id)
    cpdef clear(self)
    cpdef double now(self) except? -1.0
    cpdef int send(self, peer_id, str protocol, data, int flags=*, request_id=*) except -2

# The stream connection's write path (msgnet._stream.StreamCore.write_sealed) as a C function,
# which _stream registers when it is imported: _stream cimports this module, so the engine
# cannot name StreamCore itself, and a Python method call per packet costs more than the rest
# of a small packet's write.
ctypedef bint (*StreamWriter)(object stream, bytes packet, Session session, uint64_t counter,
                              bytes payload, PieceCipher pieces, bint payload_follows) except -1
cdef int register_stream_writer(StreamWriter writer) except -1
