# cython: auto_pickle=False
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

FRAME_PADDING = 0x00
FRAME_INIT = 0x01
FRAME_ACK = 0x02
FRAME_CONTINUATION = 0x03
FRAME_RESET = 0x04
FRAME_BOUND = 0x05
FRAME_DELIVERY_ACK = 0x06
FRAME_PING = 0x07
FRAME_PONG = 0x08
FRAME_CLOSE = 0x09
FRAME_SKIPPABLE_MIN = 0x40
FRAME_SKIPPABLE_MAX = 0x7F

FLAG_REQUEST = 0x01
FLAG_RESPONSE = 0x02
FLAG_SEQ = 0x04
FLAG_RELIABLE = 0x08
FLAG_ORDERED = 0x10
FLAG_FRAGMENT = 0x20
FLAG_RESERVED = 0xC0

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
    cdef int rc = read_varint(buf, end, p, out)
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
        rc = read_varint(buf, end, p, &out.request_id)
        if rc != READ_OK:
            return rc
    if f & FLAG_SEQ:
        rc = read_varint(buf, end, p, &out.seq)
        if rc != READ_OK:
            return rc
    if f & FLAG_FRAGMENT:
        frag_at = p[0]
        rc = read_varint(buf, end, p, &out.frag_index)
        if rc != READ_OK:
            return rc
        rc = read_varint(buf, end, p, &out.frag_count)
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
        rc = read_varint(buf, end, p, &n)
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
        rc = read_varint(buf, end, p, &out.seq)
        if rc == READ_OK:
            rc = read_varint(buf, end, p, &out.code)
        if rc != READ_OK:
            return rc
        start = p[0]
        rc = read_varint(buf, end, p, &n)
        if rc != READ_OK:
            return rc
        if n > C_MAX_ACK_RANGES:
            p[0] = start
            return ERR_TOO_MANY_RANGES
        n = 2 * n + 1  # first_range, then (gap, range) pairs
        while n:
            rc = read_varint(buf, end, p, &value)
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
        rc = read_varint(buf, end, p, &out.code)
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
        rc = read_varint(buf, length, &q, &body_len)
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


cdef Py_ssize_t _write_blob(uint8_t* buf, Py_ssize_t cap, uint8_t frame_type, uint64_t head,
                            bint has_head, const uint8_t* data, Py_ssize_t data_len) noexcept nogil:
    """Write ``type | length | [head:varint] | data`` (PING, PONG, CLOSE, DELIVERY_ACK)."""
    cdef Py_ssize_t body = (varint_size(head) if has_head else 0) + data_len
    cdef Py_ssize_t n = _framed_size(body)
    if n > cap:
        return -1
    buf[0] = frame_type
    buf += 1 + write_varint(buf + 1, <uint64_t>body)
    if has_head:
        buf += write_varint(buf, head)
    if data_len:
        memcpy(buf, data, data_len)
    return n


# ---------------------------------------------------------------------------
# Python API: argument checks and errors
# ---------------------------------------------------------------------------

cdef object _frame_error(int code, Py_ssize_t offset):
    """FrameError naming the problem and where it is, with ``offset`` as attribute."""
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
        PyErr_Clear()
        v = limit + 1
    if v > limit:
        raise UsageError(f"{name} must be in 0..{limit}, got {value!r}")
    return v


cdef int _check_flags(uint8_t flags, uint64_t frag_index, uint64_t frag_count) except -1:
    """Raise UsageError for the flag combinations and fragment fields wire.md 3.2 forbids."""
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
            raise UsageError(
                f"need 0 <= frag_index < frag_count <= {C_MAX_FRAGMENTS}, "
                f"got {frag_index}/{frag_count}"
            )
    return 0


cdef int _check_absent(uint8_t flags, uint8_t bit, uint64_t value, str name) except -1:
    """The fast encoders take flags as given: a field value whose flag is off is a mistake."""
    if value and not flags & bit:
        raise UsageError(f"{name} given but its flag is not set in flags=0x{flags:02x}")
    return 0


cdef inline int _check_payload_size(Py_ssize_t n) except -1:
    if n > C_MAX_MESSAGE_PAYLOAD:
        raise MessageTooLargeError(
            f"payload of {n} bytes exceeds MAX_MESSAGE_PAYLOAD ({C_MAX_MESSAGE_PAYLOAD})"
        )
    return 0


cdef const uint8_t* _utf8(str text, Py_ssize_t min_len, Py_ssize_t max_len, str name,
                         Py_ssize_t* n) except NULL:
    """text's UTF-8 (cached by the str itself, so no copy), its length checked."""
    cdef const char* p
    try:
        p = PyUnicode_AsUTF8AndSize(text, n)
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not encodable as UTF-8") from None
    if not min_len <= n[0] <= max_len:
        raise UsageError(f"{name} must be {min_len}..{max_len} bytes of UTF-8, got {n[0]}")
    return <const uint8_t*>p


cdef inline str _bytes_repr(const uint8_t* ptr, Py_ssize_t n):
    if n <= 32:
        return repr(PyBytes_FromStringAndSize(<const char*>ptr, n))
    return f"<{n} bytes>"


# ---------------------------------------------------------------------------
# Frame classes
# ---------------------------------------------------------------------------

cdef class Frame:
    """Base of every frame type; encode with encode_frame()."""

    cdef Py_ssize_t _size(self) except -1:
        raise TypeError(f"{type(self).__name__} is not a concrete frame type")

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return -1


@cython.no_gc  # owners are bytes-like inputs and strs: they cannot point back at a frame
cdef class _Backed(Frame):
    """A frame whose variable part points into memory it keeps alive.

    For ``bytes`` the object itself is held (immutable, so the pointer is stable);
    for any other buffer a buffer export is held, so a bytearray cannot be
    resized (and its memory moved) while the frame lives.
    """

    cdef object _owner
    cdef Py_buffer _view
    cdef bint _has_view
    cdef const uint8_t* _ptr
    cdef Py_ssize_t _len

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)

    cdef int _hold(self, object data) except -1:
        """Point _ptr/_len at data (any C-contiguous buffer), keeping it alive."""
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False
        if PyBytes_CheckExact(data):
            self._owner = data
            self._ptr = <const uint8_t*>PyBytes_AS_STRING(data)
            self._len = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &self._view, PyBUF_SIMPLE)
            self._has_view = True
            self._owner = None
            self._ptr = <const uint8_t*>self._view.buf
            self._len = self._view.len
        return 0


@cython.no_gc
cdef class _Exported(_Backed):
    """Exports its bytes through the buffer protocol: ``memoryview(frame)`` is zero-copy."""

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void*>self._ptr, self._len, 1, flags)


@cython.no_gc
cdef class _Message(_Exported):
    """Fields shared by INIT and CONTINUATION (wire.md 3.2)."""

    cdef uint8_t _flags
    cdef uint64_t _protocol_int
    cdef uint64_t _request_id
    cdef uint64_t _seq
    cdef uint64_t _frag_index
    cdef uint64_t _frag_count

    cdef int _set_message(self, object protocol_int, object payload, object flags,
                          object request_id, object seq, object frag_index,
                          object frag_count) except -1:
        """Validate the constructor arguments; presence of a field sets its flag."""
        cdef uint8_t f = <uint8_t>_uint(flags, 0xFF, "flags")
        self._protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")
        if f & _FLAG_KIND and request_id is None:
            raise UsageError("FLAG_REQUEST/FLAG_RESPONSE need a request_id")
        if request_id is not None:
            if not f & _FLAG_KIND:
                raise UsageError("request_id needs FLAG_REQUEST or FLAG_RESPONSE in flags")
            self._request_id = _uint(request_id, _MAX_VARINT, "request_id")
        if seq is not None:
            f |= FLAG_SEQ
            self._seq = _uint(seq, _MAX_VARINT, "seq")
        elif f & FLAG_SEQ:
            raise UsageError("FLAG_SEQ needs a seq")
        if (frag_index is None) != (frag_count is None):
            raise UsageError("frag_index and frag_count go together")
        if frag_index is not None:
            f |= FLAG_FRAGMENT
            self._frag_index = _uint(frag_index, _MAX_VARINT, "frag_index")
            self._frag_count = _uint(frag_count, _MAX_VARINT, "frag_count")
        elif f & FLAG_FRAGMENT:
            raise UsageError("FLAG_FRAGMENT needs frag_index and frag_count")
        _check_flags(f, self._frag_index, self._frag_count)
        self._flags = f
        self._hold(payload)
        _check_payload_size(self._len)
        return 0

    cdef inline void _set_from(self, FrameView* fv, const uint8_t* base,
                               const uint8_t* mine) noexcept:
        self._flags = fv.flags
        self._protocol_int = fv.protocol_int
        self._request_id = fv.request_id
        self._seq = fv.seq
        self._frag_index = fv.frag_index
        self._frag_count = fv.frag_count
        self._ptr = mine + (fv.payload - base)
        self._len = fv.payload_len

    cdef bint _same_message(self, _Message o) noexcept:
        return (self._flags == o._flags and self._protocol_int == o._protocol_int
                and self._request_id == o._request_id and self._seq == o._seq
                and self._frag_index == o._frag_index and self._frag_count == o._frag_count
                and self._len == o._len and memcmp(self._ptr, o._ptr, self._len) == 0)

    cdef str _fields_repr(self):
        cdef str s = (f"protocol_int={self._protocol_int}, "
                      f"payload={_bytes_repr(self._ptr, self._len)}, flags=0x{self._flags:02x}")
        if self._flags & _FLAG_KIND:
            s += f", request_id={self._request_id}"
        if self._flags & FLAG_SEQ:
            s += f", seq={self._seq}"
        if self._flags & FLAG_FRAGMENT:
            s += f", frag_index={self._frag_index}, frag_count={self._frag_count}"
        return s

    @property
    def protocol_int(self):
        return self._protocol_int

    @property
    def payload(self):
        """The payload as a read-only zero-copy memoryview."""
        return PyMemoryView_FromObject(self)

    @property
    def flags(self):
        return self._flags

    @property
    def request_id(self):
        return self._request_id if self._flags & _FLAG_KIND else None

    @property
    def seq(self):
        return self._seq if self._flags & FLAG_SEQ else None

    @property
    def frag_index(self):
        return self._frag_index if self._flags & FLAG_FRAGMENT else None

    @property
    def frag_count(self):
        return self._frag_count if self._flags & FLAG_FRAGMENT else None


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class Init(_Message):
    """INIT: a message that also binds ``protocol`` to the alias ``protocol_int``."""

    cdef uint16_t _transport_id
    cdef const uint8_t* _protocol_ptr
    cdef Py_ssize_t _protocol_len
    cdef object _protocol  # the str, decoded on first access

    def __init__(self, transport_id, str protocol, protocol_int, payload, flags=0,
                 request_id=None, seq=None, frag_index=None, frag_count=None):
        self._transport_id = <uint16_t>_uint(transport_id, 0xFFFF, "transport_id")
        self._protocol_ptr = _utf8(protocol, 1, C_MAX_PROTOCOL_LENGTH, "protocol",
                                   &self._protocol_len)
        self._protocol = protocol
        self._set_message(protocol_int, payload, flags, request_id, seq, frag_index, frag_count)

    @property
    def transport_id(self):
        return self._transport_id

    @property
    def protocol(self):
        if self._protocol is None:
            self._protocol = PyUnicode_DecodeUTF8(<const char*>self._protocol_ptr,
                                                  self._protocol_len, NULL)
        return self._protocol

    cdef Py_ssize_t _size(self) except -1:
        return _framed_size(
            2 + varint_size(<uint64_t>self._protocol_len) + self._protocol_len
            + varint_size(self._protocol_int)
            + message_header_size(self._flags, self._request_id, self._seq,
                                  self._frag_index, self._frag_count)
            + self._len)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return write_init(buf, cap, self._transport_id, self._protocol_ptr, self._protocol_len,
                          self._protocol_int, self._flags, self._request_id, self._seq,
                          self._frag_index, self._frag_count, self._ptr, self._len)

    def __eq__(self, other):
        if type(other) is not Init:
            return NotImplemented
        cdef Init o = <Init>other
        return (self._transport_id == o._transport_id
                and self._protocol_len == o._protocol_len
                and memcmp(self._protocol_ptr, o._protocol_ptr, self._protocol_len) == 0
                and self._same_message(o))

    def __repr__(self):
        return (f"Init(transport_id={self._transport_id}, protocol={self.protocol!r}, "
                f"{self._fields_repr()})")


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class Continuation(_Message):
    """CONTINUATION: a message on a protocol the receiver has bound (BOUND received)."""

    def __init__(self, protocol_int, payload, flags=0, request_id=None, seq=None,
                 frag_index=None, frag_count=None):
        self._set_message(protocol_int, payload, flags, request_id, seq, frag_index, frag_count)

    cdef Py_ssize_t _size(self) except -1:
        return _framed_size(
            varint_size(self._protocol_int)
            + message_header_size(self._flags, self._request_id, self._seq,
                                  self._frag_index, self._frag_count)
            + self._len)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return write_continuation(buf, cap, self._protocol_int, self._flags, self._request_id,
                                  self._seq, self._frag_index, self._frag_count,
                                  self._ptr, self._len)

    def __eq__(self, other):
        if type(other) is not Continuation:
            return NotImplemented
        return self._same_message(<Continuation>other)

    def __repr__(self):
        return f"Continuation({self._fields_repr()})"


@cython.final
@cython.freelist(16)
cdef class Ack(Frame):
    """ACK: the sender prefers to receive on its transport ``transport_id`` (wire.md 5)."""

    cdef uint16_t _transport_id

    def __init__(self, transport_id):
        self._transport_id = <uint16_t>_uint(transport_id, 0xFFFF, "transport_id")

    @property
    def transport_id(self):
        return self._transport_id

    cdef Py_ssize_t _size(self) except -1:
        return 4

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return write_small(buf, cap, FRAME_ACK, self._transport_id, 0)

    def __eq__(self, other):
        if type(other) is not Ack:
            return NotImplemented
        return self._transport_id == (<Ack>other)._transport_id

    def __repr__(self):
        return f"Ack(transport_id={self._transport_id})"


@cython.final
@cython.freelist(16)
cdef class Reset(Frame):
    """RESET: the receiver refuses alias ``protocol_int`` (codes in wire.md 3.3)."""

    cdef uint64_t _protocol_int
    cdef uint8_t _code

    def __init__(self, protocol_int, code):
        self._protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")
        self._code = <uint8_t>_uint(code, 0xFF, "code")

    @property
    def protocol_int(self):
        return self._protocol_int

    @property
    def code(self):
        return self._code

    cdef Py_ssize_t _size(self) except -1:
        return 3 + varint_size(self._protocol_int)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return write_small(buf, cap, FRAME_RESET, self._protocol_int, self._code)

    def __eq__(self, other):
        if type(other) is not Reset:
            return NotImplemented
        return (self._protocol_int == (<Reset>other)._protocol_int
                and self._code == (<Reset>other)._code)

    def __repr__(self):
        return f"Reset(protocol_int={self._protocol_int}, code={self._code})"


@cython.final
@cython.freelist(16)
cdef class Bound(Frame):
    """BOUND: the receiver recorded alias ``protocol_int``; send CONTINUATION from now on."""

    cdef uint64_t _protocol_int

    def __init__(self, protocol_int):
        self._protocol_int = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")

    @property
    def protocol_int(self):
        return self._protocol_int

    cdef Py_ssize_t _size(self) except -1:
        return 2 + varint_size(self._protocol_int)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return write_small(buf, cap, FRAME_BOUND, self._protocol_int, 0)

    def __eq__(self, other):
        if type(other) is not Bound:
            return NotImplemented
        return self._protocol_int == (<Bound>other)._protocol_int

    def __repr__(self):
        return f"Bound(protocol_int={self._protocol_int})"


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class DeliveryAck(_Backed):
    """DELIVERY_ACK: QUIC-style ranges of acknowledged seqs (wire.md 3.5).

    The ranges stay in wire form (``range_count | first_range | (gap | range)*``,
    always minimal varints) and become tuples only when ``ranges`` is read.
    """

    cdef uint64_t _largest
    cdef uint64_t _ack_delay_us
    cdef uint64_t _first_range

    def __init__(self, largest, ack_delay_us, first_range, ranges):
        cdef uint8_t buf[(2 * C_MAX_ACK_RANGES + 2) * C_MAX_VARINT_BYTES]
        cdef Py_ssize_t n
        self._largest = _uint(largest, _MAX_VARINT, "largest")
        self._ack_delay_us = _uint(ack_delay_us, _MAX_VARINT, "ack_delay_us")
        self._first_range = _uint(first_range, _MAX_VARINT, "first_range")
        pairs = tuple(ranges)
        if len(pairs) > C_MAX_ACK_RANGES:
            raise UsageError(f"at most {C_MAX_ACK_RANGES} ranges, got {len(pairs)}")
        n = write_varint(buf, len(pairs))
        n += write_varint(buf + n, self._first_range)
        for gap, length in pairs:
            n += write_varint(buf + n, _uint(gap, _MAX_VARINT, "gap"))
            n += write_varint(buf + n, _uint(length, _MAX_VARINT, "range"))
        self._hold(PyBytes_FromStringAndSize(<const char*>buf, n))

    @property
    def largest(self):
        return self._largest

    @property
    def ack_delay_us(self):
        return self._ack_delay_us

    @property
    def first_range(self):
        return self._first_range

    @property
    def ranges(self):
        """The (gap, range) pairs after first_range, going down."""
        cdef Py_ssize_t p = 0
        cdef uint64_t count, gap, length
        read_varint(self._ptr, self._len, &p, &count)
        read_varint(self._ptr, self._len, &p, &gap)  # first_range
        out = []
        while count:
            read_varint(self._ptr, self._len, &p, &gap)
            read_varint(self._ptr, self._len, &p, &length)
            out.append((gap, length))
            count -= 1
        return tuple(out)

    cdef Py_ssize_t _size(self) except -1:
        return _framed_size(varint_size(self._largest) + varint_size(self._ack_delay_us)
                            + self._len)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        cdef Py_ssize_t body = (varint_size(self._largest) + varint_size(self._ack_delay_us)
                                + self._len)
        cdef Py_ssize_t n = _framed_size(body)
        if n > cap:
            return -1
        buf[0] = FRAME_DELIVERY_ACK
        buf += 1 + write_varint(buf + 1, <uint64_t>body)
        buf += write_varint(buf, self._largest)
        buf += write_varint(buf, self._ack_delay_us)
        memcpy(buf, self._ptr, self._len)
        return n

    def __eq__(self, other):
        if type(other) is not DeliveryAck:
            return NotImplemented
        cdef DeliveryAck o = <DeliveryAck>other
        return (self._largest == o._largest and self._ack_delay_us == o._ack_delay_us
                and self._len == o._len and memcmp(self._ptr, o._ptr, self._len) == 0)

    def __repr__(self):
        return (f"DeliveryAck(largest={self._largest}, ack_delay_us={self._ack_delay_us}, "
                f"first_range={self._first_range}, ranges={self.ranges!r})")


@cython.no_gc
cdef class _Probe(_Exported):
    """PING and PONG: up to 32 bytes of opaque data, echoed by PONG."""

    cdef int _set_data(self, object data) except -1:
        self._hold(data)
        if self._len > C_MAX_PING_DATA:
            raise UsageError(f"data must be at most {C_MAX_PING_DATA} bytes, got {self._len}")
        return 0

    @property
    def data(self):
        """The data as a read-only zero-copy memoryview."""
        return PyMemoryView_FromObject(self)

    cdef Py_ssize_t _size(self) except -1:
        return _framed_size(self._len)

    cdef bint _same_data(self, _Probe o) noexcept:
        return self._len == o._len and memcmp(self._ptr, o._ptr, self._len) == 0


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class Ping(_Probe):
    """PING: a keep-alive or RTT probe; the peer answers with a PONG of the same data."""

    def __init__(self, data):
        self._set_data(data)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return _write_blob(buf, cap, FRAME_PING, 0, False, self._ptr, self._len)

    def __eq__(self, other):
        if type(other) is not Ping:
            return NotImplemented
        return self._same_data(<Ping>other)

    def __repr__(self):
        return f"Ping(data={_bytes_repr(self._ptr, self._len)})"


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class Pong(_Probe):
    """PONG: the answer to a PING, echoing its data."""

    def __init__(self, data):
        self._set_data(data)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return _write_blob(buf, cap, FRAME_PONG, 0, False, self._ptr, self._len)

    def __eq__(self, other):
        if type(other) is not Pong:
            return NotImplemented
        return self._same_data(<Pong>other)

    def __repr__(self):
        return f"Pong(data={_bytes_repr(self._ptr, self._len)})"


@cython.final
@cython.freelist(16)
@cython.no_gc
cdef class Close(_Backed):
    """CLOSE: the sender tears the session down (codes in wire.md 3.5)."""

    cdef uint64_t _code
    cdef object _reason  # the str, decoded on first access

    def __init__(self, code, str reason):
        self._code = _uint(code, _MAX_VARINT, "code")
        self._ptr = _utf8(reason, 0, C_MAX_CLOSE_REASON, "reason", &self._len)
        self._reason = reason

    @property
    def code(self):
        return self._code

    @property
    def reason(self):
        if self._reason is None:
            self._reason = PyUnicode_DecodeUTF8(<const char*>self._ptr, self._len, NULL)
        return self._reason

    cdef Py_ssize_t _size(self) except -1:
        return _framed_size(varint_size(self._code) + self._len)

    cdef Py_ssize_t _write(self, uint8_t* buf, Py_ssize_t cap) noexcept:
        return _write_blob(buf, cap, FRAME_CLOSE, self._code, True, self._ptr, self._len)

    def __eq__(self, other):
        if type(other) is not Close:
            return NotImplemented
        cdef Close o = <Close>other
        return (self._code == o._code and self._len == o._len
                and memcmp(self._ptr, o._ptr, self._len) == 0)

    def __repr__(self):
        return f"Close(code={self._code}, reason={self.reason!r})"


# ---------------------------------------------------------------------------
# Python API: decoding
# ---------------------------------------------------------------------------

cdef inline const uint8_t* _bind(_Backed f, object data, const uint8_t* base,
                                 Py_ssize_t n) except NULL:
    """Make f keep the decoded input alive; return the input's address as f holds it.

    ``bytes`` are held as they are (immutable). Other buffers get an export of
    their own, so a bytearray cannot be resized under the frame; pointers parsed
    from the caller's temporary export at ``base`` are rebased on it.
    """
    if PyBytes_CheckExact(data):
        f._owner = data
        return base
    PyObject_GetBuffer(data, &f._view, PyBUF_SIMPLE)
    f._has_view = True
    if f._view.len != n:
        raise BufferError("input buffer changed size during decoding")
    return <const uint8_t*>f._view.buf


cdef Frame _make_frame(FrameView* fv, object data, const uint8_t* base, Py_ssize_t n):
    """The Python frame object for a parsed FrameView."""
    cdef const uint8_t* mine
    cdef uint8_t t = fv.type
    cdef Continuation cont
    cdef Init init
    cdef _Probe probe
    cdef Close close
    cdef DeliveryAck dack
    cdef Ack ack
    cdef Reset reset
    cdef Bound bound
    cdef Py_ssize_t p
    if t == FRAME_CONTINUATION:
        cont = Continuation.__new__(Continuation)
        cont._set_from(fv, base, _bind(cont, data, base, n))
        return cont
    if t == FRAME_INIT:
        init = Init.__new__(Init)
        mine = _bind(init, data, base, n)
        init._set_from(fv, base, mine)
        init._transport_id = fv.transport_id
        init._protocol_ptr = mine + (fv.protocol - base)
        init._protocol_len = fv.protocol_len
        return init
    if t == FRAME_PING or t == FRAME_PONG:
        probe = Ping.__new__(Ping) if t == FRAME_PING else Pong.__new__(Pong)
        probe._ptr = _bind(probe, data, base, n) + (fv.payload - base)
        probe._len = fv.payload_len
        return probe
    if t == FRAME_ACK:
        ack = Ack.__new__(Ack)
        ack._transport_id = fv.transport_id
        return ack
    if t == FRAME_BOUND:
        bound = Bound.__new__(Bound)
        bound._protocol_int = fv.protocol_int
        return bound
    if t == FRAME_RESET:
        reset = Reset.__new__(Reset)
        reset._protocol_int = fv.protocol_int
        reset._code = <uint8_t>fv.code
        return reset
    if t == FRAME_DELIVERY_ACK:
        dack = DeliveryAck.__new__(DeliveryAck)
        dack._ptr = _bind(dack, data, base, n) + (fv.payload - base)
        dack._len = fv.payload_len
        dack._largest = fv.seq
        dack._ack_delay_us = fv.code
        p = 0
        read_varint(dack._ptr, dack._len, &p, &dack._first_range)  # skip range_count
        read_varint(dack._ptr, dack._len, &p, &dack._first_range)
        return dack
    close = Close.__new__(Close)
    close._ptr = _bind(close, data, base, n) + (fv.payload - base)
    close._len = fv.payload_len
    close._code = fv.code
    return close


cdef inline int _check_offset(Py_ssize_t offset, Py_ssize_t n) except -1:
    if offset < 0 or offset > n:
        raise UsageError(f"offset {offset} outside the input (0..{n})")
    return 0


cdef tuple _decode_one(object data, const uint8_t* buf, Py_ssize_t n, Py_ssize_t offset):
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
    """Decode the frame at ``data[offset:]``: ``(frame, offset after it)``.

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
    """Decode a whole packet payload into its frames (PADDING and skippable ones dropped).

    A malformed frame raises FrameError; its ``frames`` attribute holds the
    valid frames before it, which wire.md 3.1 says the receiver keeps.
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
    """Decode the varint at ``data[offset:]``: ``(value, offset after it)``."""
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


def encode_frame(Frame frame):
    """The wire bytes of one frame."""
    cdef Py_ssize_t n = frame._size()
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    frame._write(<uint8_t*>PyBytes_AS_STRING(out), n)
    return out


def encode_packet(frames, Py_ssize_t padding=0):
    """A packet payload: the frames in order, then ``padding`` PADDING bytes."""
    cdef tuple items = tuple(frames)
    cdef Py_ssize_t total = padding, n, pos = 0
    cdef Frame frame
    cdef bytes out
    cdef uint8_t* buf
    if padding < 0:
        raise UsageError(f"padding must be >= 0, got {padding}")
    if len(items) > C_MAX_FRAMES_PER_PACKET:
        raise UsageError(f"at most {C_MAX_FRAMES_PER_PACKET} frames per packet, got {len(items)}")
    for obj in items:
        frame = <Frame?>obj
        total += frame._size()
    out = PyBytes_FromStringAndSize(NULL, total)
    buf = <uint8_t*>PyBytes_AS_STRING(out)
    for obj in items:
        pos += (<Frame>obj)._write(buf + pos, total - pos)
    memset(buf + pos, 0, padding)
    return out


cdef bytes _encode_message(uint8_t frame_type, uint16_t transport_id,
                           const uint8_t* protocol, Py_ssize_t protocol_len, object protocol_int,
                           object payload, object flags, object request_id, object seq,
                           object frag_index, object frag_count):
    """Validate the fast encoders' arguments and write one INIT or CONTINUATION."""
    cdef uint64_t pint = _uint(protocol_int, C_MAX_PROTOCOL_INT, "protocol_int")
    cdef uint8_t f = <uint8_t>_uint(flags, 0xFF, "flags")
    cdef uint64_t rid = _uint(request_id, _MAX_VARINT, "request_id")
    cdef uint64_t s = _uint(seq, _MAX_VARINT, "seq")
    cdef uint64_t fi = _uint(frag_index, _MAX_VARINT, "frag_index")
    cdef uint64_t fc = _uint(frag_count, _MAX_VARINT, "frag_count")
    cdef Py_buffer view
    cdef const uint8_t* data
    cdef Py_ssize_t size, body
    cdef bint is_bytes = PyBytes_CheckExact(payload)
    cdef bytes out
    _check_flags(f, fi, fc)
    _check_absent(f, _FLAG_KIND, rid, "request_id")
    _check_absent(f, FLAG_SEQ, s, "seq")
    _check_absent(f, FLAG_FRAGMENT, fi | fc, "frag_index/frag_count")
    if is_bytes:
        data = <const uint8_t*>PyBytes_AS_STRING(payload)
        size = PyBytes_GET_SIZE(payload)
    else:
        PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
        data = <const uint8_t*>view.buf
        size = view.len
    try:
        _check_payload_size(size)
        body = varint_size(pint) + message_header_size(f, rid, s, fi, fc) + size
        if frame_type == FRAME_INIT:
            body += 2 + varint_size(<uint64_t>protocol_len) + protocol_len
            out = PyBytes_FromStringAndSize(NULL, _framed_size(body))
            write_init(<uint8_t*>PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out), transport_id,
                       protocol, protocol_len, pint, f, rid, s, fi, fc, data, size)
        else:
            out = PyBytes_FromStringAndSize(NULL, _framed_size(body))
            write_continuation(<uint8_t*>PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out), pint,
                               f, rid, s, fi, fc, data, size)
        return out
    finally:
        if not is_bytes:
            PyBuffer_Release(&view)


def encode_continuation(protocol_int, payload, flags=0, request_id=0, seq=0,
                        frag_index=0, frag_count=0):
    """CONTINUATION wire bytes without a frame object (the send fast path).

    ``flags`` says which optional fields are written (the Continuation
    constructor instead derives it from the fields given); a non-zero field
    whose flag is off is a UsageError.
    """
    return _encode_message(FRAME_CONTINUATION, 0, NULL, 0, protocol_int, payload, flags,
                           request_id, seq, frag_index, frag_count)


def encode_init(transport_id, str protocol, protocol_int, payload, flags=0, request_id=0,
                seq=0, frag_index=0, frag_count=0):
    """INIT wire bytes without a frame object; ``flags`` as in encode_continuation()."""
    cdef uint16_t tid = <uint16_t>_uint(transport_id, 0xFFFF, "transport_id")
    cdef Py_ssize_t n
    cdef const uint8_t* proto = _utf8(protocol, 1, C_MAX_PROTOCOL_LENGTH, "protocol", &n)
    return _encode_message(FRAME_INIT, tid, proto, n, protocol_int, payload, flags,
                           request_id, seq, frag_index, frag_count)
