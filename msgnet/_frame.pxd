# C-level API of the Multipacket frame codec (docs/wire.md section 3).
#
# Other Cython modules (the engine) cimport this and parse frames straight from a
# (pointer, length) pair into a FrameView struct: no Python object per frame.
# The Python-level API (Frame classes, encode_*/decode_*) lives in _frame.pyx.

from libc.stdint cimport uint8_t, uint16_t, uint64_t

cdef enum:
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

    C_MAX_PROTOCOL_LENGTH = 256
    C_MAX_PROTOCOL_INT = 0xFFFF
    C_MAX_FRAMES_PER_PACKET = 256
    C_MAX_FRAGMENTS = 1024
    C_MAX_ACK_RANGES = 64
    C_MAX_PING_DATA = 32
    C_MAX_CLOSE_REASON = 128
    C_MAX_MESSAGE_PAYLOAD = 1048576
    C_MAX_VARINT_BYTES = 9

# Results of read_varint / read_frame. Errors are negative; frame_error_text() names them.
cdef enum:
    READ_OK = 1
    READ_END = 0
    ERR_VARINT_TRUNCATED = -1
    ERR_VARINT_NON_MINIMAL = -2
    ERR_VARINT_TOO_LONG = -3
    ERR_FRAME_TRUNCATED = -4
    ERR_LENGTH_EXCEEDS_PACKET = -5
    ERR_UNKNOWN_FRAME_TYPE = -6
    ERR_INVALID_FRAME_TYPE = -7
    ERR_BODY_LENGTH = -8
    ERR_PROTOCOL_EMPTY = -9
    ERR_PROTOCOL_TOO_LONG = -10
    ERR_PROTOCOL_UTF8 = -11
    ERR_PROTOCOL_INT_RANGE = -12
    ERR_RESERVED_FLAGS = -13
    ERR_FLAG_COMBINATION = -14
    ERR_FRAGMENT_FIELDS = -15
    ERR_PAYLOAD_TOO_LARGE = -16
    ERR_TOO_MANY_RANGES = -17
    ERR_PING_TOO_LONG = -18
    ERR_REASON_TOO_LONG = -19
    ERR_TOO_MANY_FRAMES = -20

# Added with the implementation: CLOSE reason:bytes[0..128] (UTF-8) that is not UTF-8.
cdef enum:
    ERR_REASON_UTF8 = -21

# One decoded frame, pointing into the packet buffer (valid only while it is).
# Fields a frame type does not have are left 0/NULL.
ctypedef struct FrameView:
    uint8_t type
    uint8_t flags
    uint16_t transport_id
    const uint8_t* protocol          # INIT: protocol id bytes (valid UTF-8 checked)
    Py_ssize_t protocol_len
    uint64_t protocol_int            # INIT, CONTINUATION, RESET, BOUND
    uint64_t request_id              # when FLAG_REQUEST or FLAG_RESPONSE
    uint64_t seq                     # when FLAG_SEQ; DELIVERY_ACK: largest
    uint64_t frag_index              # when FLAG_FRAGMENT
    uint64_t frag_count
    uint64_t code                    # RESET code, CLOSE code; DELIVERY_ACK: ack_delay_us
    const uint8_t* payload           # message payload, PING/PONG data, CLOSE reason,
    Py_ssize_t payload_len           # DELIVERY_ACK: the bytes from range_count on (validated)

# Read one varint at buf[pos[0]:length]; advance pos. Returns READ_OK or an ERR_VARINT_*
# (pos unchanged then).
cdef int read_varint(const uint8_t* buf, Py_ssize_t length, Py_ssize_t* pos,
                     uint64_t* out) noexcept nogil

# Bytes needed to encode value (1..9). value must be < 2**63.
cdef int varint_size(uint64_t value) noexcept nogil

# Write value at buf (room for varint_size(value) bytes); returns bytes written.
cdef int write_varint(uint8_t* buf, uint64_t value) noexcept nogil

# Read the next frame of a packet payload at buf[pos[0]:length], skipping PADDING bytes and
# skippable unknown frames; advance pos past it. Returns READ_OK (out filled), READ_END
# (no frame left), or a negative ERR_* (the rest of the packet must be dropped).
# On an error pos[0] is the offset of the offending byte or field (for error messages).
cdef int read_frame(const uint8_t* buf, Py_ssize_t length, Py_ssize_t* pos,
                    FrameView* out) noexcept nogil

# A DELIVERY_ACK's ranges from the payload read_frame validated: first_range, and the
# (gap, range) pairs after it as a tuple of tuples, going down (wire.md 3.5).
cdef tuple delivery_ack_ranges(const FrameView* fv, uint64_t* first_range)

# Human-readable text for a negative read result.
cdef const char* frame_error_text(int code) noexcept nogil

# Size of the message-header part (flags + optional fields) for these values.
cdef Py_ssize_t message_header_size(uint8_t flags, uint64_t request_id, uint64_t seq,
                                    uint64_t frag_index, uint64_t frag_count) noexcept nogil

# Encoders write one frame at buf (capacity cap) and return the bytes written, or -1 if it
# does not fit (nothing is written then). Arguments are trusted (the API validated them).
cdef Py_ssize_t write_continuation(uint8_t* buf, Py_ssize_t cap, uint64_t protocol_int,
                                   uint8_t flags, uint64_t request_id, uint64_t seq,
                                   uint64_t frag_index, uint64_t frag_count,
                                   const uint8_t* payload, Py_ssize_t payload_len) noexcept nogil
cdef Py_ssize_t write_init(uint8_t* buf, Py_ssize_t cap, uint16_t transport_id,
                           const uint8_t* protocol, Py_ssize_t protocol_len,
                           uint64_t protocol_int, uint8_t flags, uint64_t request_id,
                           uint64_t seq, uint64_t frag_index, uint64_t frag_count,
                           const uint8_t* payload, Py_ssize_t payload_len) noexcept nogil
cdef Py_ssize_t write_small(uint8_t* buf, Py_ssize_t cap, uint8_t frame_type,
                            uint64_t a, uint64_t b) noexcept nogil
    # ACK(transport_id=a), BOUND(protocol_int=a), RESET(protocol_int=a, code=b)
