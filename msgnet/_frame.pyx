# cython: auto_pickle=False, binding=False
"""Frame codec (docs/wire.md section 3): a C layer for the engine, a Python API on top.

The C functions (declared in ``_frame.pxd``) parse straight from a pointer into a
``FrameView`` and never touch Python objects. The Python API wraps them: decoding
allocates one frame object per frame, whose payload is a zero-copy view of the
input, and every malformed input raises :class:`msgnet.errors.FrameError` naming
the problem and its byte offset. ``_frame_py`` is the pure-Python twin of this
module and the spec oracle it is tested against.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_Clear, PyErr_Occurred
from cpython.long cimport PyLong_Check
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from abc import ABCMeta

from msgnet.errors import FrameError, MessageTooLargeError, UsageError


cdef extern from "Python.h":
    # Declared here without Cython's automatic error check: _uint() turns the
    # OverflowError into a UsageError itself.
    unsigned long long _as_u64 "PyLong_AsUnsignedLongLong"(object value) noexcept


__all__ = [
    "Frame",
    "Init",
    "Continuation",
    "Ack",
    "Reset",
    "Bound",
    "DeliveryAck",
    "Ping",
    "Pong",
    "Close",
    "encode_varint",
    "decode_varint",
    "decode_frame",
    "decode_packet",
    "encode_frame",
    "encode_packet",
    "encode_continuation",
    "encode_init",
    "MAX_PROTOCOL_LENGTH",
    "MAX_PROTOCOL_INT",
    "MAX_FRAMES_PER_PACKET",
    "MAX_FRAGMENTS",
    "MAX_ACK_RANGES",
    "MAX_PING_DATA",
    "MAX_CLOSE_REASON",
    "MAX_MESSAGE_PAYLOAD",
    "MAX_VARINT_BYTES",
    "MAX_VARINT",
    "FRAME_PADDING",
    "FRAME_INIT",
    "FRAME_ACK",
    "FRAME_CONTINUATION",
    "FRAME_RESET",
    "FRAME_BOUND",
    "FRAME_DELIVERY_ACK",
    "FRAME_PING",
    "FRAME_PONG",
    "FRAME_CLOSE",
    "FRAME_SKIPPABLE_MIN",
    "FRAME_SKIPPABLE_MAX",
    "FLAG_REQUEST",
    "FLAG_RESPONSE",
    "FLAG_SEQ",
    "FLAG_RELIABLE",
    "FLAG_ORDERED",
    "FLAG_FRAGMENT",
    "FLAG_RESERVED",
]

MAX_PROTOCOL_LENGTH = C_MAX_PROTOCOL_LENGTH
MAX_PROTOCOL_INT = C_MAX_PROTOCOL_INT
MAX_FRAMES_PER_PACKET = C_MAX_FRAMES_PER_PACKET
MAX_FRAGMENTS = C_MAX_FRAGMENTS
MAX_ACK_RANGES = C_MAX_ACK_RANGES
MAX_PING_DATA = C_MAX_PING_DATA
MAX_CLOSE_REASON = C_MAX_CLOSE_REASON
MAX_MESSAGE_PAYLOAD = C_MAX_MESSAGE_PAYLOAD
MAX_VARINT_BYTES = C_MAX_VARINT_BYTES
MAX_VARINT = (1 << 63) - 1

# The pxd's C enums shadow these names inside this module: publish their values to Python.
globals().update(
    FRAME_PADDING=FRAME_PADDING,
    FRAME_INIT=FRAME_INIT,
    FRAME_ACK=FRAME_ACK,
    FRAME_CONTINUATION=FRAME_CONTINUATION,
    FRAME_RESET=FRAME_RESET,
    FRAME_BOUND=FRAME_BOUND,
    FRAME_DELIVERY_ACK=FRAME_DELIVERY_ACK,
    FRAME_PING=FRAME_PING,
    FRAME_PONG=FRAME_PONG,
    FRAME_CLOSE=FRAME_CLOSE,
    FRAME_SKIPPABLE_MIN=FRAME_SKIPPABLE_MIN,
    FRAME_SKIPPABLE_MAX=FRAME_SKIPPABLE_MAX,
    FLAG_REQUEST=FLAG_REQUEST,
    FLAG_RESPONSE=FLAG_RESPONSE,
    FLAG_SEQ=FLAG_SEQ,
    FLAG_RELIABLE=FLAG_RELIABLE,
    FLAG_ORDERED=FLAG_ORDERED,
    FLAG_FRAGMENT=FLAG_FRAGMENT,
    FLAG_RESERVED=FLAG_RESERVED,
)

cdef enum:
    _FLAG_KIND = FLAG_REQUEST | FLAG_RESPONSE

cdef uint64_t _MAX_VARINT = (<uint64_t>1 << 63) - 1


# ---------------------------------------------------------------------------
# C layer: varints, UTF-8, frame parsing and writing (no Python objects)
# ---------------------------------------------------------------------------

cdef int read_varint(const uint8_t* buf, Py_ssize_t length, Py_ssize_t* pos,
                     uint64_t* out) noexcept nogil:
    cdef Py_ssize_t p = pos[0]
    cdef Py_ssize_t i
    cdef uint8_t b
    cdef uint64_t value
    if p >= length:
        return ERR_VARINT_TRUNCATED
    b = buf[p]
    if b < 0x80:  # one byte: the common case (lengths, aliases, flags-sized values)
        out[0] = b
        pos[0] = p + 1
        return READ_OK
    value = b & 0x7F
    for i in range(1, C_MAX_VARINT_BYTES):
        if p + i >= length:
            return ERR_VARINT_TRUNCATED
        b = buf[p + i]
        value |= (<uint64_t>(b & 0x7F)) << (7 * i)
        if b < 0x80:
            if b == 0:
                return ERR_VARINT_NON_MINIMAL
            out[0] = value
            pos[0] = p + i + 1
            return READ_OK
    # The 9th byte still had its continuation bit: longer than 9 bytes (>= 2**63).
    return ERR_VARINT_TOO_LONG


cdef inline int _varint(const uint8_t* buf, Py_ssize_t length, Py_ssize_t* pos,
                        uint64_t* out) noexcept nogil:
    """read_varint with its one-byte case inlined: most lengths and aliases are one byte."""
    cdef Py_ssize_t p = pos[0]
    if p < length and buf[p] < 0x80:
        out[0] = buf[p]
        pos[0] = p + 1
        return READ_OK
    return read_varint(buf, length, pos, out)


cdef int varint_size(uint64_t value) noexcept nogil:
    cdef int n = 1
    while value >= 0x80:
        value >>= 7
        n += 1
    return n


cdef int write_varint(uint8_t* buf, uint64_t value) noexcept nogil:
    cdef int n = 0
    while value >= 0x80:
        buf[n] = <uint8_t>(value | 0x80)
        value >>= 7
        n += 1
    buf[n] = <uint8_t>value
    return n + 1


cdef Py_ssize_t _utf8_error_at(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Start of the first invalid UTF-8 sequence in s[:n], or -1 if all valid.

    Strict like Python's decoder (RFC 3629): no overlongs, no surrogates, nothing
    above U+10FFFF, no truncated sequence.
    """
    cdef Py_ssize_t i = 0
    cdef int need, k
    cdef uint8_t c, lo, hi
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            need = 1
        elif 0xE0 <= c <= 0xEF:
            need = 2
            if c == 0xE0:
                lo = 0xA0  # below is an overlong 3-byte form
            elif c == 0xED:
                hi = 0x9F  # above are UTF-16 surrogates
        elif 0xF0 <= c <= 0xF4:
            need = 3
            if c == 0xF0:
                lo = 0x90  # below is an overlong 4-byte form
            elif c == 0xF4:
                hi = 0x8F  # above is beyond U+10FFFF
        else:
            return i
        if n - i <= need or not (lo <= s[i + 1] <= hi):
            return i
        for k in range(2, need + 1):
            if not (0x80 <= s[i + k] <= 0xBF):
                return i
        i += need + 1
    return -1


cdef inline int _read_alias(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* p,
                            uint64_t* out) noexcept nogil:
    """Read a protocol_int varint (an alias, below 2**16) at p, bounded by end."""
    cdef Py_ssize_t start = p[0]
    cdef int rc = _varint(buf, end, p, out)
    if rc == READ_OK and out[0] > C_MAX_PROTOCOL_INT:
        p[0] = start
        return ERR_PROTOCOL_INT_RANGE
    return rc


cdef int _read_message(const uint8_t* buf, Py_ssize_t end, Py_ssize_t* p,
                       FrameView* out) noexcept nogil:
    """Read ``flags | optional fields | payload:rest`` (wire.md 3.2) ending at end."""
    cdef uint8_t f
    cdef Py_ssize_t frag_at
    cdef int rc
    if p[0] >= end:
        return ERR_FRAME_TRUNCATED
    f = buf[p[0]]
    if f & FLAG_RESERVED:
        return ERR_RESERVED_FLAGS
    if ((f & _FLAG_KIND) == _FLAG_KIND
            or (f & FLAG_RELIABLE and not f & FLAG_SEQ)
            or (f & FLAG_ORDERED and not f & FLAG_RELIABLE)
            or (f & FLAG_FRAGMENT and not f & FLAG_SEQ)):
        return ERR_FLAG_COMBINATION
    out.flags = f
    p[0] += 1
    if f & _FLAG_KIND:
        rc = _varint(buf, end, p, &out.request_id)
        if rc != READ_OK:
            return rc
    if f & FLAG_SEQ:
        rc = _varint(buf, end, p, &out.seq)
        if rc != READ_OK:
            return rc
    if f & FLAG_FRAGMENT:
        frag_at = p[0]
        rc = _varint(buf, end, p, &out.frag_index)
        if rc != READ_OK:
            return rc
        rc = _varint(buf, end, p, &out.frag_count)
        if rc != READ_OK:
            return rc
        if (out.frag_count == 0 or out.frag_count > C_MAX_FRAGMENTS
                or out.frag_index >= out.frag_count):
            p[0] = frag_at
            return ERR_FRAGMENT_FIELDS
    if end - p[0] > C_MAX_MESSAGE_PAYLOAD:
        return ERR_PAYLOAD_TOO_LARGE
    out.payload = buf + p[0]
    out.payload_len = end - p[0]
    p[0] = end
    return READ_OK


cdef int _read_body(uint8_t t, const uint8_t* buf, Py_ssize_t end, Py_ssize_t* p,
                    FrameView* out) noexcept nogil:
    """Parse the body of a known frame type at p..end; on error p is the offending field."""
    cdef Py_ssize_t start, bad
    cdef uint64_t n, value
    cdef int rc
    if t == FRAME_CONTINUATION:
        rc = _read_alias(buf, end, p, &out.protocol_int)
        if rc != READ_OK:
            return rc
        return _read_message(buf, end, p, out)
    if t == FRAME_INIT:
        if end - p[0] < 2:
            return ERR_FRAME_TRUNCATED
        out.transport_id = (buf[p[0]] << 8) | buf[p[0] + 1]
        p[0] += 2
        start = p[0]
        rc = _varint(buf, end, p, &n)
        if rc != READ_OK:
            return rc
        if n == 0 or n > C_MAX_PROTOCOL_LENGTH:
            p[0] = start
            return ERR_PROTOCOL_EMPTY if n == 0 else ERR_PROTOCOL_TOO_LONG
        if <uint64_t>(end - p[0]) < n:
            return ERR_FRAME_TRUNCATED
        bad = _utf8_error_at(buf + p[0], <Py_ssize_t>n)
        if bad >= 0:
            p[0] += bad
            return ERR_PROTOCOL_UTF8
        out.protocol = buf + p[0]
        out.protocol_len = <Py_ssize_t>n
        p[0] += <Py_ssize_t>n
        rc = _read_alias(buf, end, p, &out.protocol_int)
        if rc != READ_OK:
            return rc
        return _read_message(buf, end, p, out)
    if t == FRAME_ACK:
        if end - p[0] < 2:
            return ERR_FRAME_TRUNCATED
        out.transport_id = (buf[p[0]] << 8) | buf[p[0] + 1]
        p[0] += 2
    elif t == FRAME_RESET:
        rc = _read_alias(buf, end, p, &out.protocol_int)
        if rc != READ_OK:
            return rc
        if p[0] >= end:
            return ERR_FRAME_TRUNCATED
        out.code = buf[p[0]]
        p[0] += 1
    elif t == FRAME_BOUND:
        rc = _read_alias(buf, end, p, &out.protocol_int)
        if rc != READ_OK:
            return rc
    elif t == FRAME_DELIVERY_ACK:
        rc = _varint(buf, end, p, &out.seq)
        if rc == READ_OK:
            rc = _varint(buf, end, p, &out.code)
        if rc != READ_OK:
            return rc
        start = p[0]
        rc = _varint(buf, end, p, &n)
        if rc != READ_OK:
            return rc
        if n > C_MAX_ACK_RANGES:
            p[0] = start
            return ERR_TOO_MANY_RANGES
        n = 2 * n + 1  # first_range, then (gap, range) pairs
        while n:
            rc = _varint(buf, end, p, &value)
            if rc != READ_OK:
                return rc
            n -= 1
        out.payload = buf + start
        out.payload_len = p[0] - start
    elif t == FRAME_PING or t == FRAME_PONG:
        if end - p[0] > C_MAX_PING_DATA:
            return ERR_PING_TOO_LONG
        out.payload = buf + p[0]
        out.payload_len = end - p[0]
        p[0] = end
    else:  # FRAME_CLOSE
        rc = _varint(buf, end, p, &out.code)
        if rc != READ_OK:
            return rc
        if end - p[0] > C_MAX_CLOSE_REASON:
            return ERR_REASON_TOO_LONG
        bad = _utf8_error_at(buf + p[0], end - p[0])
        if bad >= 0:
            p[0] += bad
            return ERR_REASON_UTF8
        out.payload = buf + p[0]
        out.payload_len = end - p[0]
        p[0] = end
    if p[0] != end:
        return ERR_BODY_LENGTH
    return READ_OK


cdef int read_frame(const uint8_t* buf, Py_ssize_t length, Py_ssize_t* pos,
                    FrameView* out) noexcept nogil:
    cdef Py_ssize_t p = pos[0]
    cdef Py_ssize_t q, end
    cdef uint64_t body_len
    cdef uint8_t t
    cdef int rc
    while True:
        while p < length and buf[p] == FRAME_PADDING:
            p += 1
        if p >= length:
            pos[0] = p
            return READ_END
        t = buf[p]
        if t >= 0x80:
            pos[0] = p
            return ERR_INVALID_FRAME_TYPE
        if FRAME_CLOSE < t < FRAME_SKIPPABLE_MIN:
            pos[0] = p
            return ERR_UNKNOWN_FRAME_TYPE
        q = p + 1
        rc = _varint(buf, length, &q, &body_len)
        if rc != READ_OK:
            pos[0] = q
            return rc
        if body_len > <uint64_t>(length - q):
            pos[0] = p + 1
            return ERR_LENGTH_EXCEEDS_PACKET
        end = q + <Py_ssize_t>body_len
        if t < FRAME_SKIPPABLE_MIN:
            break
        p = end  # skippable unknown frame (0x40-0x7F)
    memset(out, 0, sizeof(FrameView))
    out.type = t
    rc = _read_body(t, buf, end, &q, out)
    pos[0] = q
    return rc


cdef const char* frame_error_text(int code) noexcept nogil:
    if code == ERR_VARINT_TRUNCATED:
        return "truncated varint"
    if code == ERR_VARINT_NON_MINIMAL:
        return "non-minimal varint"
    if code == ERR_VARINT_TOO_LONG:
        return "varint longer than 9 bytes"
    if code == ERR_FRAME_TRUNCATED:
        return "truncated frame body"
    if code == ERR_LENGTH_EXCEEDS_PACKET:
        return "frame length exceeds packet"
    if code == ERR_UNKNOWN_FRAME_TYPE:
        return "unknown frame type"
    if code == ERR_INVALID_FRAME_TYPE:
        return "invalid frame type"
    if code == ERR_BODY_LENGTH:
        return "trailing bytes in frame body"
    if code == ERR_PROTOCOL_EMPTY:
        return "empty protocol id"
    if code == ERR_PROTOCOL_TOO_LONG:
        return "protocol id longer than 256 bytes"
    if code == ERR_PROTOCOL_UTF8:
        return "protocol id is not valid UTF-8"
    if code == ERR_PROTOCOL_INT_RANGE:
        return "protocol_int above 65535"
    if code == ERR_RESERVED_FLAGS:
        return "reserved flag bits set"
    if code == ERR_FLAG_COMBINATION:
        return "invalid flag combination"
    if code == ERR_FRAGMENT_FIELDS:
        return "invalid fragment fields"
    if code == ERR_PAYLOAD_TOO_LARGE:
        return "payload larger than 1048576 bytes"
    if code == ERR_TOO_MANY_RANGES:
        return "more than 64 ack ranges"
    if code == ERR_PING_TOO_LONG:
        return "ping data longer than 32 bytes"
    if code == ERR_REASON_TOO_LONG:
        return "close reason longer than 128 bytes"
    if code == ERR_TOO_MANY_FRAMES:
        return "more than 256 frames in packet"
    if code == ERR_REASON_UTF8:
        return "close reason is not valid UTF-8"
    return "malformed frame"


cdef Py_ssize_t message_header_size(uint8_t flags, uint64_t request_id, uint64_t seq,
                                    uint64_t frag_index, uint64_t frag_count) noexcept nogil:
    cdef Py_ssize_t n = 1
    if flags & _FLAG_KIND:
        n += varint_size(request_id)
    if flags & FLAG_SEQ:
        n += varint_size(seq)
    if flags & FLAG_FRAGMENT:
        n += varint_size(frag_index) + varint_size(frag_count)
    return n


cdef inline Py_ssize_t _framed_size(Py_ssize_t body) noexcept nogil:
    """Size of ``type | length | body``."""
    return 1 + varint_size(<uint64_t>body) + body


cdef inline Py_ssize_t _write_message(uint8_t* buf, uint8_t flags, uint64_t request_id,
                                      uint64_t seq, uint64_t frag_index, uint64_t frag_count,
                                      const uint8_t* payload, Py_ssize_t payload_len) noexcept nogil:
    cdef Py_ssize_t n = 1
    buf[0] = flags
    if flags & _FLAG_KIND:
        n += write_varint(buf + n, request_id)
    if flags & FLAG_SEQ:
        n += write_varint(buf + n, seq)
    if flags & FLAG_FRAGMENT:
        n += write_varint(buf + n, frag_index)
        n += write_varint(buf + n, frag_count)
    if payload_len:
        memcpy(buf + n, payload, payload_len)
    return n + payload_len


cdef Py_ssize_t write_continuation(uint8_t* buf, Py_ssize_t cap, uint64_t protocol_int,
                                   uint8_t flags, uint64_t request_id, uint64_t seq,
                                   uint64_t frag_index, uint64_t frag_count,
                                   const uint8_t* payload, Py_ssize_t payload_len) noexcept nogil:
    cdef Py_ssize_t body = (varint_size(protocol_int)
                            + message_header_size(flags, request_id, seq, frag_index, frag_count)
                            + payload_len)
    cdef Py_ssize_t n = _framed_size(body)
    if n > cap:
        return -1
    buf[0] = FRAME_CONTINUATION
    buf += 1 + write_varint(buf + 1, <uint64_t>body)
    buf += write_varint(buf, protocol_int)
    _write_message(buf, flags, request_id, seq, frag_index, frag_count, payload, payload_len)
    return n


cdef Py_ssize_t write_init(uint8_t* buf, Py_ssize_t cap, uint16_t transport_id,
                           const uint8_t* protocol, Py_ssize_t protocol_len,
                           uint64_t protocol_int, uint8_t flags, uint64_t request_id,
                           uint64_t seq, uint64_t frag_index, uint64_t frag_count,
                           const uint8_t* payload, Py_ssize_t payload_len) noexcept nogil:
    cdef Py_ssize_t body = (2 + varint_size(<uint64_t>protocol_len) + protocol_len
                            + varint_size(protocol_int)
                            + message_header_size(flags, request_id, seq, frag_index, frag_count)
                            + payload_len)
    cdef Py_ssize_t n = _framed_size(body)
    if n > cap:
        return -1
    buf[0] = FRAME_INIT
    buf += 1 + write_varint(buf + 1, <uint64_t>body)
    buf[0] = transport_id >> 8
    buf[1] = transport_id & 0xFF
    buf += 2 + write_varint(buf + 2, <uint64_t>protocol_len)
    memcpy(buf, protocol, protocol_len)
    buf += protocol_len
    buf += write_varint(buf, protocol_int)
    _write_message(buf, flags, request_id, seq, frag_index, frag_count, payload, payload_len)
    return n


cdef Py_ssize_t write_small(uint8_t* buf, Py_ssize_t cap, uint8_t frame_type,
                            uint64_t a, uint64_t b) noexcept nogil:
    cdef Py_ssize_t body
    if frame_type == FRAME_ACK:
        body = 2
    elif frame_type == FRAME_BOUND:
        body = varint_size(a)
    elif frame_type == FRAME_RESET:
        body = varint_size(a) + 1
    else:
        return -1
    if 2 + body > cap:  # bodies are < 128 bytes: a one-byte length
        return -1
    buf[0] = frame_type
    buf[1] = <uint8_t>body
    if frame_type == FRAME_ACK:
        buf[2] = <uint8_t>(a >> 8)
        buf[3] = <uint8_t>a
    else:
        write_varint(buf + 2, a)
        if frame_type == FRAME_RESET:
            buf[1 + body] = <uint8_t>b
    return 2 + body


cdef bint _same_bytes(const uint8_t* a, const uint8_t* b, Py_ssize_t n) noexcept nogil:
    return n == 0 or memcmp(a, b, n) == 0


cdef bint _fv_equal(const FrameView* a, const FrameView* b) noexcept nogil:
    """Field-by-field equality; fields a frame type does not have are 0 on both sides."""
    return (a.type == b.type and a.flags == b.flags and a.transport_id == b.transport_id
            and a.protocol_int == b.protocol_int and a.request_id == b.request_id
            and a.seq == b.seq and a.frag_index == b.frag_index
            and a.frag_count == b.frag_count and a.code == b.code
            and a.protocol_len == b.protocol_len and a.payload_len == b.payload_len
            and _same_bytes(a.protocol, b.protocol, a.protocol_len)
            and _same_bytes(a.payload, b.payload, a.payload_len))


cdef Py_ssize_t _body_size(const FrameView* fv) noexcept nogil:
    cdef uint8_t t = fv.type
    if t == FRAME_CONTINUATION or t == FRAME_INIT:
        return (varint_size(fv.protocol_int)
                + message_header_size(fv.flags, fv.request_id, fv.seq, fv.frag_index,
                                      fv.frag_count)
                + fv.payload_len
                + (2 + varint_size(<uint64_t>fv.protocol_len) + fv.protocol_len
                   if t == FRAME_INIT else 0))
    if t == FRAME_ACK:
        return 2
    if t == FRAME_RESET:
        return varint_size(fv.protocol_int) + 1
    if t == FRAME_BOUND:
        return varint_size(fv.protocol_int)
    if t == FRAME_DELIVERY_ACK:
        return varint_size(fv.seq) + varint_size(fv.code) + fv.payload_len
    if t == FRAME_CLOSE:
        return varint_size(fv.code) + fv.payload_len
    return fv.payload_len  # PING, PONG


cdef Py_ssize_t _write_frame(uint8_t* buf, Py_ssize_t cap, const FrameView* fv) noexcept nogil:
    """Encode a (valid) FrameView; the bytes written, or -1 if cap is too small."""
    cdef uint8_t t = fv.type
    cdef Py_ssize_t body = _body_size(fv)
    cdef Py_ssize_t n = _framed_size(body)
    if n > cap:
        return -1
    if t == FRAME_CONTINUATION:
        return write_continuation(buf, cap, fv.protocol_int, fv.flags, fv.request_id, fv.seq,
                                  fv.frag_index, fv.frag_count, fv.payload, fv.payload_len)
    if t == FRAME_INIT:
        return write_init(buf, cap, fv.transport_id, fv.protocol, fv.protocol_len,
                          fv.protocol_int, fv.flags, fv.request_id, fv.seq, fv.frag_index,
                          fv.frag_count, fv.payload, fv.payload_len)
    if t == FRAME_ACK:
        return write_small(buf, cap, t, fv.transport_id, 0)
    if t == FRAME_RESET or t == FRAME_BOUND:
        return write_small(buf, cap, t, fv.protocol_int, fv.code)
    buf[0] = t
    buf += 1 + write_varint(buf + 1, <uint64_t>body)
    if t == FRAME_DELIVERY_ACK:
        buf += write_varint(buf, fv.seq)
    if t == FRAME_DELIVERY_ACK or t == FRAME_CLOSE:
        buf += write_varint(buf, fv.code)
    if fv.payload_len:
        memcpy(buf, fv.payload, fv.payload_len)
    return n


# ---------------------------------------------------------------------------
# Python API: argument checks and errors
# ---------------------------------------------------------------------------

cdef object _frame_error(int code, Py_ssize_t offset):
    """FrameError naming the problem and where it is (also as ``offset``)."""
    err = FrameError(f"{frame_error_text(code).decode('ascii')} at offset {offset}")
    err.offset = offset
    return err


cdef uint64_t _uint(object value, uint64_t limit, str name) except? 0xFFFFFFFFFFFFFFFF:
    """value as a C integer in 0..limit; anything else is the caller's mistake."""
    cdef unsigned long long v
    if not PyLong_Check(value):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    v = _as_u64(value)
    if v == <unsigned long long>-1 and PyErr_Occurred():
        PyErr_Clear()  # negative or >= 2**64
        v = limit + 1
    if v > limit:
        raise UsageError(f"{name} must be in 0..{limit}, got {value!r}")
    return v


cdef int _check_flags(uint8_t flags, uint64_t frag_index, uint64_t frag_count) except -1:
    """Raise UsageError for what wire.md 3.2 calls malformed."""
    if flags & FLAG_RESERVED:
        raise UsageError(f"reserved flag bits set: 0x{flags:02x}")
    if (flags & _FLAG_KIND) == _FLAG_KIND:
        raise UsageError("FLAG_REQUEST and FLAG_RESPONSE are exclusive")
    if flags & FLAG_RELIABLE and not flags & FLAG_SEQ:
        raise UsageError("FLAG_RELIABLE requires a seq")
    if flags & FLAG_ORDERED and not flags & FLAG_RELIABLE:
        raise UsageError("FLAG_ORDERED requires FLAG_RELIABLE")
    if flags & FLAG_FRAGMENT:
        if not flags & FLAG_SEQ:
            raise UsageError("fragments require a seq")
        if frag_count == 0 or frag_count > C_MAX_FRAGMENTS or frag_index >= frag_count:
            raise UsageError(f"need 0 <= frag_index < frag_count <= {C_MAX_FRAGMENTS}, "
                             f"got {frag_index}/{frag_count}")
    return 0


cdef int _check_absent(uint8_t flags, uint8_t bit, uint64_t value, str name) except -1:
    """The fast encoders write what flags say: a value whose flag is off is a mistake."""
    if value and not flags & bit:
        raise UsageError(f"{name} given but its flag is not set in flags=0x{flags:02x}")
    return 0


cdef inline int _check_payload_size(Py_ssize_t n) except -1:
    if n > C_MAX_MESSAGE_PAYLOAD:
        raise MessageTooLargeError(
            f"payload of {n} bytes exceeds MAX_MESSAGE_PAYLOAD ({C_MAX_MESSAGE_PAYLOAD})")
    return 0


cdef const uint8_t* _utf8(str text, Py_ssize_t min_len, Py_ssize_t max_len, str name,
                         Py_ssize_t* n) except NULL:
    """text's UTF-8 (cached inside the str, so no copy), its length checked."""
    cdef const char* p
    try:
        p = PyUnicode_AsUTF8AndSize(text, n)
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not encodable as UTF-8") from None
    if not min_len <= n[0] <= max_len:
        raise UsageError(f"{name} must be {min_len}..{max_len} bytes of UTF-8, got {n[0]}")
    return <const uint8_t*>p


cdef int _hold(Py_buffer* view, object data, const uint8_t** ptr, Py_ssize_t* n) except -1:
    """Export data's buffer into view (an empty one: see _reset) and point ptr/n at it."""
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    ptr[0] = <const uint8_t*>view.buf
    n[0] = view.len
    return 0


cdef int _reset(FrameView* fv, Py_buffer* view, uint8_t frame_type) except -1:
    """Start a constructor from a clean FrameView (frames may be re-initialised)."""
    PyBuffer_Release(view)
    memset(fv, 0, sizeof(FrameView))
    fv.type = frame_type
    return 0


cdef int _set_message(FrameView* fv, Py_buffer* view, object protocol_int, object payload,
                      object flags, object request_id, object seq, object frag_index,
                      object frag_count) except -1:
    """Check the INIT/CONTINUATION constructor arguments; a given field sets its flag."""
    cdef uint8_t f = <uint8_t>_uint(flags, 0xFF, "flags")
    fv.protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")
    if (request_id is None) != (not f & _FLAG_KIND):
        raise UsageError("a request_id goes with FLAG_REQUEST or FLAG_RESPONSE in flags")
    if request_id is not None:
        fv.request_id = _uint(request_id, _MAX_VARINT, "request_id")
    if seq is not None:
        f |= FLAG_SEQ
        fv.seq = _uint(seq, _MAX_VARINT, "seq")
    elif f & FLAG_SEQ:
        raise UsageError("FLAG_SEQ needs a seq")
    if (frag_index is None) != (frag_count is None):
        raise UsageError("frag_index and frag_count go together")
    if frag_index is not None:
        f |= FLAG_FRAGMENT
        fv.frag_index = _uint(frag_index, _MAX_VARINT, "frag_index")
        fv.frag_count = _uint(frag_count, _MAX_VARINT, "frag_count")
    elif f & FLAG_FRAGMENT:
        raise UsageError("FLAG_FRAGMENT needs frag_index and frag_count")
    _check_flags(f, fv.frag_index, fv.frag_count)
    fv.flags = f
    _hold(view, payload, &fv.payload, &fv.payload_len)
    return _check_payload_size(fv.payload_len)


cdef str _bytes_repr(const uint8_t* ptr, Py_ssize_t n):
    if n <= 32:
        return repr(PyBytes_FromStringAndSize(<const char*>ptr, n))
    return f"<{n} bytes>"


cdef str _message_repr(const FrameView* fv):
    cdef str s = (f"protocol_int={fv.protocol_int}, "
                  f"payload={_bytes_repr(fv.payload, fv.payload_len)}, flags=0x{fv.flags:02x}")
    if fv.flags & _FLAG_KIND:
        s += f", request_id={fv.request_id}"
    if fv.flags & FLAG_SEQ:
        s += f", seq={fv.seq}"
    if fv.flags & FLAG_FRAGMENT:
        s += f", frag_index={fv.frag_index}, frag_count={fv.frag_count}"
    return s


cdef str _decode_utf8(const uint8_t* ptr, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char*>ptr, n, NULL)


# ---------------------------------------------------------------------------
# Frame classes
#
# Each holds its fields in a FrameView (the same struct read_frame fills) and a
# buffer export of the memory the view's pointers point into: the decoded
# input, or the payload given to the constructor. Payloads come out as
# memoryviews of the frame itself (it exports them), so they are zero-copy and
# keep the input alive. Cython allows a freelist only on classes without a
# cdef base, hence no shared base class: Frame is an ABC they are registered with.
# ---------------------------------------------------------------------------

class Frame(metaclass=ABCMeta):
    """Any frame: every frame type of this module is a (virtual) subclass."""

    __slots__ = ()


@cython.final
@cython.freelist(16)
@cython.no_gc  # its only object field is a str
cdef class Init:
    """INIT: a message that also binds ``protocol`` to the alias ``protocol_int``."""

    cdef FrameView _fv
    cdef Py_buffer _view
    cdef object _protocol  # the str, made on first access when decoded

    def __init__(self, transport_id, str protocol not None, protocol_int, payload, flags=0,
                 request_id=None, seq=None, frag_index=None, frag_count=None):
        _reset(&self._fv, &self._view, FRAME_INIT)
        self._fv.transport_id = <uint16_t>_uint(transport_id, 0xFFFF, "transport_id")
        self._fv.protocol = _utf8(protocol, 1, C_MAX_PROTOCOL_LENGTH, "protocol",
                                  &self._fv.protocol_len)
        self._protocol = protocol
        _set_message(&self._fv, &self._view, protocol_int, payload, flags, request_id, seq,
                     frag_index, frag_count)

    def __dealloc__(self):
        PyBuffer_Release(&self._view)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void*>self._fv.payload, self._fv.payload_len, 1, flags)

    @property
    def transport_id(self):
        return self._fv.transport_id

    @property
    def protocol(self):
        if self._protocol is None:
            self._protocol = _decode_utf8(self._fv.protocol, self._fv.protocol_len)
        return self._protocol

    @property
    def protocol_int(self):
        return self._fv.protocol_int

    @property
    def payload(self):
        """Read-only zero-copy memoryview."""
        return PyMemoryView_FromObject(self)

    @property
    def flags(self):
        return self._fv.flags

    @property
    def request_id(self):
        return self._fv.request_id if self._fv.flags & _FLAG_KIND else None

    @property
    def seq(self):
        return self._fv.seq if self._fv.flags & FLAG_SEQ else None

    @property
    def frag_index(self):
        return self._fv.frag_index if self._fv.flags & FLAG_FRAGMENT else None

    @property
    def frag_count(self):
        return self._fv.frag_count if self._fv.flags & FLAG_FRAGMENT else None

    def __eq__(self, other):
        if type(other) is not Init:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Init>other)._fv)

    def __repr__(self):
        return (f"Init(transport_id={self._fv.transport_id}, protocol={self.protocol!r}, "
                f"{_message_repr(&self._fv)})")


@cython.final
@cython.freelist(16)
cdef class Continuation:
    """CONTINUATION: a message on an alias the receiver has bound (BOUND received)."""

    cdef FrameView _fv
    cdef Py_buffer _view

    def __init__(self, protocol_int, payload, flags=0, request_id=None, seq=None,
                 frag_index=None, frag_count=None):
        _reset(&self._fv, &self._view, FRAME_CONTINUATION)
        _set_message(&self._fv, &self._view, protocol_int, payload, flags, request_id, seq,
                     frag_index, frag_count)

    def __dealloc__(self):
        PyBuffer_Release(&self._view)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void*>self._fv.payload, self._fv.payload_len, 1, flags)

    @property
    def protocol_int(self):
        return self._fv.protocol_int

    @property
    def payload(self):
        """Read-only zero-copy memoryview."""
        return PyMemoryView_FromObject(self)

    @property
    def flags(self):
        return self._fv.flags

    @property
    def request_id(self):
        return self._fv.request_id if self._fv.flags & _FLAG_KIND else None

    @property
    def seq(self):
        return self._fv.seq if self._fv.flags & FLAG_SEQ else None

    @property
    def frag_index(self):
        return self._fv.frag_index if self._fv.flags & FLAG_FRAGMENT else None

    @property
    def frag_count(self):
        return self._fv.frag_count if self._fv.flags & FLAG_FRAGMENT else None

    def __eq__(self, other):
        if type(other) is not Continuation:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Continuation>other)._fv)

    def __repr__(self):
        return f"Continuation({_message_repr(&self._fv)})"


@cython.final
@cython.freelist(16)
cdef class Ack:
    """ACK: the sender prefers to receive on its transport ``transport_id`` (wire.md 5)."""

    cdef FrameView _fv

    def __init__(self, transport_id):
        self._fv.type = FRAME_ACK
        self._fv.transport_id = <uint16_t>_uint(transport_id, 0xFFFF, "transport_id")

    @property
    def transport_id(self):
        return self._fv.transport_id

    def __eq__(self, other):
        if type(other) is not Ack:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Ack>other)._fv)

    def __repr__(self):
        return f"Ack(transport_id={self._fv.transport_id})"


@cython.final
@cython.freelist(16)
cdef class Reset:
    """RESET: the receiver refuses alias ``protocol_int`` (codes in wire.md 3.3)."""

    cdef FrameView _fv

    def __init__(self, protocol_int, code):
        self._fv.type = FRAME_RESET
        self._fv.protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")
        self._fv.code = _uint(code, 0xFF, "code")

    @property
    def protocol_int(self):
        return self._fv.protocol_int

    @property
    def code(self):
        return self._fv.code

    def __eq__(self, other):
        if type(other) is not Reset:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Reset>other)._fv)

    def __repr__(self):
        return f"Reset(protocol_int={self._fv.protocol_int}, code={self._fv.code})"


@cython.final
@cython.freelist(16)
cdef class Bound:
    """BOUND: the receiver recorded alias ``protocol_int``; CONTINUATION may follow."""

    cdef FrameView _fv

    def __init__(self, protocol_int):
        self._fv.type = FRAME_BOUND
        self._fv.protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")

    @property
    def protocol_int(self):
        return self._fv.protocol_int

    def __eq__(self, other):
        if type(other) is not Bound:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Bound>other)._fv)

    def __repr__(self):
        return f"Bound(protocol_int={self._fv.protocol_int})"


cdef tuple delivery_ack_ranges(const FrameView* fv, uint64_t* first_range):
    cdef Py_ssize_t p = 0
    cdef uint64_t count = 0, gap = 0, length = 0
    read_varint(fv.payload, fv.payload_len, &p, &count)
    read_varint(fv.payload, fv.payload_len, &p, first_range)
    if not count:
        return ()
    out = []
    while count:
        read_varint(fv.payload, fv.payload_len, &p, &gap)
        read_varint(fv.payload, fv.payload_len, &p, &length)
        out.append((gap, length))
        count -= 1
    return tuple(out)


@cython.final
@cython.freelist(16)
cdef class DeliveryAck:
    """DELIVERY_ACK: QUIC-style ranges of acknowledged seqs (wire.md 3.5).

    The ranges stay in wire form (``range_count | first_range | (gap | range)*``,
    minimal varints, so equal ranges are equal bytes) until they are read.
    """

    cdef FrameView _fv  # seq = largest, code = ack_delay_us, payload = the ranges
    cdef Py_buffer _view

    def __init__(self, largest, ack_delay_us, first_range, ranges):
        cdef uint8_t buf[(2 * C_MAX_ACK_RANGES + 2) * C_MAX_VARINT_BYTES]
        cdef Py_ssize_t n
        _reset(&self._fv, &self._view, FRAME_DELIVERY_ACK)
        self._fv.seq = _uint(largest, _MAX_VARINT, "largest")
        self._fv.code = _uint(ack_delay_us, _MAX_VARINT, "ack_delay_us")
        pairs = tuple(ranges)
        if len(pairs) > C_MAX_ACK_RANGES:
            raise UsageError(f"at most {C_MAX_ACK_RANGES} ranges, got {len(pairs)}")
        n = write_varint(buf, len(pairs))
        n += write_varint(buf + n, _uint(first_range, _MAX_VARINT, "first_range"))
        for gap, length in pairs:
            n += write_varint(buf + n, _uint(gap, _MAX_VARINT, "gap"))
            n += write_varint(buf + n, _uint(length, _MAX_VARINT, "range"))
        _hold(&self._view, PyBytes_FromStringAndSize(<const char*>buf, n),
              &self._fv.payload, &self._fv.payload_len)

    def __dealloc__(self):
        PyBuffer_Release(&self._view)

    @property
    def largest(self):
        return self._fv.seq

    @property
    def ack_delay_us(self):
        return self._fv.code

    @property
    def first_range(self):
        cdef uint64_t first = 0
        delivery_ack_ranges(&self._fv, &first)
        return first

    @property
    def ranges(self):
        """The (gap, range) pairs after first_range, going down."""
        cdef uint64_t first = 0
        return delivery_ack_ranges(&self._fv, &first)

    def __eq__(self, other):
        if type(other) is not DeliveryAck:
            return NotImplemented
        return _fv_equal(&self._fv, &(<DeliveryAck>other)._fv)

    def __repr__(self):
        return (f"DeliveryAck(largest={self._fv.seq}, ack_delay_us={self._fv.code}, "
                f"first_range={self.first_range}, ranges={self.ranges!r})")


@cython.final
@cython.freelist(16)
cdef class Ping:
    """PING: a keep-alive or RTT probe; the peer answers with a PONG of the same data."""

    cdef FrameView _fv
    cdef Py_buffer _view

    def __init__(self, data):
        _reset(&self._fv, &self._view, FRAME_PING)
        _hold(&self._view, data, &self._fv.payload, &self._fv.payload_len)
        if self._fv.payload_len > C_MAX_PING_DATA:
            raise UsageError(f"data must be at most {C_MAX_PING_DATA} bytes")

    def __dealloc__(self):
        PyBuffer_Release(&self._view)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void*>self._fv.payload, self._fv.payload_len, 1, flags)

    @property
    def data(self):
        """Read-only zero-copy memoryview."""
        return PyMemoryView_FromObject(self)

    def __eq__(self, other):
        if type(other) is not Ping:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Ping>other)._fv)

    def __repr__(self):
        return f"Ping(data={_bytes_repr(self._fv.payload, self._fv.payload_len)})"


@cython.final
@cython.freelist(16)
cdef class Pong:
    """PONG: the answer to a PING, echoing its data."""

    cdef FrameView _fv
    cdef Py_buffer _view

    def __init__(self, data):
        _reset(&self._fv, &self._view, FRAME_PONG)
        _hold(&self._view, data, &self._fv.payload, &self._fv.payload_len)
        if self._fv.payload_len > C_MAX_PING_DATA:
            raise UsageError(f"data must be at most {C_MAX_PING_DATA} bytes")

    def __dealloc__(self):
        PyBuffer_Release(&self._view)

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void*>self._fv.payload, self._fv.payload_len, 1, flags)

    @property
    def data(self):
        """Read-only zero-copy memoryview."""
        return PyMemoryView_FromObject(self)

    def __eq__(self, other):
        if type(other) is not Pong:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Pong>other)._fv)

    def __repr__(self):
        return f"Pong(data={_bytes_repr(self._fv.payload, self._fv.payload_len)})"


@cython.final
@cython.freelist(16)
@cython.no_gc  # its only object field is a str
cdef class Close:
    """CLOSE: the sender tears the session down (codes in wire.md 3.5)."""

    cdef FrameView _fv  # payload = the reason's UTF-8
    cdef Py_buffer _view
    cdef object _reason  # the str, made on first access when decoded

    def __init__(self, code, str reason not None):
        _reset(&self._fv, &self._view, FRAME_CLOSE)
        self._fv.code = _uint(code, _MAX_VARINT, "code")
        self._fv.payload = _utf8(reason, 0, C_MAX_CLOSE_REASON, "reason",
                                 &self._fv.payload_len)
        self._reason = reason

    def __dealloc__(self):
        PyBuffer_Release(&self._view)

    @property
    def code(self):
        return self._fv.code

    @property
    def reason(self):
        if self._reason is None:
            self._reason = _decode_utf8(self._fv.payload, self._fv.payload_len)
        return self._reason

    def __eq__(self, other):
        if type(other) is not Close:
            return NotImplemented
        return _fv_equal(&self._fv, &(<Close>other)._fv)

    def __repr__(self):
        return f"Close(code={self._fv.code}, reason={self.reason!r})"


for _cls in (Init, Continuation, Ack, Reset, Bound, DeliveryAck, Ping, Pong, Close):
    Frame.register(_cls)
del _cls


cdef const FrameView* _view_of(object frame) except NULL:
    """The FrameView inside any frame object."""
    cdef type t = type(frame)
    if t is Continuation:
        return &(<Continuation>frame)._fv
    if t is Init:
        return &(<Init>frame)._fv
    if t is Ack:
        return &(<Ack>frame)._fv
    if t is Bound:
        return &(<Bound>frame)._fv
    if t is Reset:
        return &(<Reset>frame)._fv
    if t is DeliveryAck:
        return &(<DeliveryAck>frame)._fv
    if t is Ping:
        return &(<Ping>frame)._fv
    if t is Pong:
        return &(<Pong>frame)._fv
    if t is Close:
        return &(<Close>frame)._fv
    raise TypeError(f"not a frame: {t.__name__}")


# ---------------------------------------------------------------------------
# Python API: decoding
# ---------------------------------------------------------------------------

cdef inline int _bind(FrameView* mine, Py_buffer* view, const FrameView* fv, object data,
                      const uint8_t* base, Py_ssize_t n) except -1:
    """Copy fv into a new frame, which takes its own export of the input.

    Its pointers are rebased from the caller's export at ``base`` onto the new
    one (the same memory for any sane exporter, and bytes never move).
    """
    cdef const uint8_t* own = base
    if PyBytes_CheckExact(data):  # what bytes' own getbuffer does, minus the dispatch
        PyBuffer_FillInfo(view, data, <void*>base, n, 1, PyBUF_SIMPLE)
    else:
        PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
        if view.len != n:
            raise BufferError("input buffer changed size during decoding")
        own = <const uint8_t*>view.buf
    mine[0] = fv[0]
    mine.payload = own + (fv.payload - base)
    if fv.protocol != NULL:
        mine.protocol = own + (fv.protocol - base)
    return 0


cdef object _make_frame(const FrameView* fv, object data, const uint8_t* base, Py_ssize_t n):
    """The frame object for a FrameView parsed from data."""
    cdef uint8_t t = fv.type
    cdef Continuation cont
    cdef Init init
    cdef Ping ping
    cdef Pong pong
    cdef Close close
    cdef DeliveryAck dack
    cdef Ack ack
    cdef Reset reset
    cdef Bound bound
    if t == FRAME_CONTINUATION:
        cont = Continuation.__new__(Continuation)
        _bind(&cont._fv, &cont._view, fv, data, base, n)
        return cont
    if t == FRAME_INIT:
        init = Init.__new__(Init)
        _bind(&init._fv, &init._view, fv, data, base, n)
        return init
    if t == FRAME_ACK:
        ack = Ack.__new__(Ack)
        ack._fv = fv[0]
        return ack
    if t == FRAME_BOUND:
        bound = Bound.__new__(Bound)
        bound._fv = fv[0]
        return bound
    if t == FRAME_RESET:
        reset = Reset.__new__(Reset)
        reset._fv = fv[0]
        return reset
    if t == FRAME_DELIVERY_ACK:
        dack = DeliveryAck.__new__(DeliveryAck)
        _bind(&dack._fv, &dack._view, fv, data, base, n)
        return dack
    if t == FRAME_PING:
        ping = Ping.__new__(Ping)
        _bind(&ping._fv, &ping._view, fv, data, base, n)
        return ping
    if t == FRAME_PONG:
        pong = Pong.__new__(Pong)
        _bind(&pong._fv, &pong._view, fv, data, base, n)
        return pong
    close = Close.__new__(Close)
    _bind(&close._fv, &close._view, fv, data, base, n)
    return close


cdef inline int _check_offset(Py_ssize_t offset, Py_ssize_t n) except -1:
    if offset < 0 or offset > n:
        raise UsageError(f"offset {offset} outside the input (0..{n})")
    return 0


cdef inline tuple _decode_one(object data, const uint8_t* buf, Py_ssize_t n, Py_ssize_t offset):
    cdef FrameView fv
    cdef int rc
    _check_offset(offset, n)
    rc = read_frame(buf, n, &offset, &fv)
    if rc == READ_OK:
        return _make_frame(&fv, data, buf, n), offset
    if rc == READ_END:
        return None, offset
    raise _frame_error(rc, offset)


def decode_frame(data, Py_ssize_t offset=0):
    """Decode the frame at ``data[offset:]`` into ``(frame, offset after it)``.

    PADDING and skippable unknown frames are passed over; at the end of the
    data the frame is None. Payloads are zero-copy views of ``data``.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _decode_one(data, <const uint8_t*>PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data), offset)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _decode_one(data, <const uint8_t*>view.buf, view.len, offset)
    finally:
        PyBuffer_Release(&view)


cdef list _decode_all(object data, const uint8_t* buf, Py_ssize_t n):
    cdef FrameView fv
    cdef Py_ssize_t pos = 0, start
    cdef int rc
    cdef list frames = []
    while True:
        start = pos
        rc = read_frame(buf, n, &pos, &fv)
        if rc == READ_END:
            return frames
        if rc == READ_OK and len(frames) == C_MAX_FRAMES_PER_PACKET:
            rc = ERR_TOO_MANY_FRAMES
            pos = start
        if rc != READ_OK:
            err = _frame_error(rc, pos)
            err.frames = frames
            raise err
        frames.append(_make_frame(&fv, data, buf, n))


def decode_packet(data):
    """All frames of a packet payload (PADDING and skippable unknown frames dropped).

    A malformed frame raises FrameError whose ``frames`` attribute holds the
    valid frames before it: wire.md 3.1 has the receiver keep those.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _decode_all(data, <const uint8_t*>PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _decode_all(data, <const uint8_t*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def decode_varint(data, Py_ssize_t offset=0):
    """Decode the varint at ``data[offset:]`` into ``(value, offset after it)``."""
    cdef Py_buffer view
    cdef uint64_t value
    cdef int rc
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _check_offset(offset, view.len)
        rc = read_varint(<const uint8_t*>view.buf, view.len, &offset, &value)
    finally:
        PyBuffer_Release(&view)
    if rc != READ_OK:
        raise _frame_error(rc, offset)
    return value, offset


# ---------------------------------------------------------------------------
# Python API: encoding
# ---------------------------------------------------------------------------

def encode_varint(value):
    """The minimal varint for ``0 <= value < 2**63``."""
    cdef uint8_t buf[C_MAX_VARINT_BYTES]
    cdef int n = write_varint(buf, _uint(value, _MAX_VARINT, "value"))
    return PyBytes_FromStringAndSize(<const char*>buf, n)


def encode_frame(frame):
    """The wire bytes of one frame."""
    cdef const FrameView* fv = _view_of(frame)
    cdef Py_ssize_t n = _framed_size(_body_size(fv))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    _write_frame(<uint8_t*>PyBytes_AS_STRING(out), n, fv)
    return out


def encode_packet(frames, Py_ssize_t padding=0):
    """A packet payload: the frames in order, then ``padding`` PADDING bytes."""
    cdef tuple items = tuple(frames)
    cdef Py_ssize_t total = padding, pos = 0
    cdef bytes out
    cdef uint8_t* buf
    if padding < 0:
        raise UsageError(f"padding must be >= 0, got {padding}")
    if len(items) > C_MAX_FRAMES_PER_PACKET:
        raise UsageError(f"at most {C_MAX_FRAMES_PER_PACKET} frames per packet, got {len(items)}")
    for frame in items:
        total += _framed_size(_body_size(_view_of(frame)))
    out = PyBytes_FromStringAndSize(NULL, total)
    buf = <uint8_t*>PyBytes_AS_STRING(out)
    for frame in items:
        pos += _write_frame(buf + pos, total - pos, _view_of(frame))
    memset(buf + pos, 0, padding)
    return out


cdef bytes _encode_message(uint8_t frame_type, uint16_t transport_id,
                           const uint8_t* protocol, Py_ssize_t protocol_len, object protocol_int,
                           object payload, object flags, object request_id, object seq,
                           object frag_index, object frag_count):
    """Check the fast encoders' arguments and write one INIT or CONTINUATION."""
    cdef FrameView fv
    cdef Py_buffer view
    cdef bint is_bytes = PyBytes_CheckExact(payload)
    cdef Py_ssize_t n
    cdef bytes out
    fv.type = frame_type
    fv.transport_id = transport_id
    fv.protocol = protocol
    fv.protocol_len = protocol_len
    fv.protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")
    fv.flags = <uint8_t>_uint(flags, 0xFF, "flags")
    fv.request_id = _uint(request_id, _MAX_VARINT, "request_id")
    fv.seq = _uint(seq, _MAX_VARINT, "seq")
    fv.frag_index = _uint(frag_index, _MAX_VARINT, "frag_index")
    fv.frag_count = _uint(frag_count, _MAX_VARINT, "frag_count")
    _check_flags(fv.flags, fv.frag_index, fv.frag_count)
    _check_absent(fv.flags, _FLAG_KIND, fv.request_id, "request_id")
    _check_absent(fv.flags, FLAG_SEQ, fv.seq, "seq")
    _check_absent(fv.flags, FLAG_FRAGMENT, fv.frag_index | fv.frag_count, "frag_index/frag_count")
    if is_bytes:  # no buffer export needed: bytes are immutable and we hold a reference
        fv.payload = <const uint8_t*>PyBytes_AS_STRING(payload)
        fv.payload_len = PyBytes_GET_SIZE(payload)
    else:
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        fv.payload = <const uint8_t*>view.buf
        fv.payload_len = view.len
    try:
        _check_payload_size(fv.payload_len)
        n = _framed_size(_body_size(&fv))
        out = PyBytes_FromStringAndSize(NULL, n)
        _write_frame(<uint8_t*>PyBytes_AS_STRING(out), n, &fv)
        return out
    finally:
        if not is_bytes:
            PyBuffer_Release(&view)


def encode_continuation(protocol_int, payload, flags=0, request_id=0, seq=0,
                        frag_index=0, frag_count=0):
    """CONTINUATION wire bytes without a frame object (the send fast path).

    ``flags`` says which optional fields are written (the Continuation
    constructor derives it from the fields given instead); a non-zero field
    whose flag is off is a UsageError.
    """
    return _encode_message(FRAME_CONTINUATION, 0, NULL, 0, protocol_int, payload, flags,
                           request_id, seq, frag_index, frag_count)


def encode_init(transport_id, str protocol not None, protocol_int, payload, flags=0,
                request_id=0, seq=0, frag_index=0, frag_count=0):
    """INIT wire bytes without a frame object; ``flags`` as in encode_continuation()."""
    cdef Py_ssize_t n
    cdef uint16_t tid = <uint16_t>_uint(transport_id, 0xFFFF, "transport_id")
    cdef const uint8_t* proto = _utf8(protocol, 1, C_MAX_PROTOCOL_LENGTH, "protocol", &n)
    return _encode_message(FRAME_INIT, tid, proto, n, protocol_int, payload, flags,
                           request_id, seq, frag_index, frag_count)
