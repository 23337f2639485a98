# C-level API of the packet layer (docs/wire.md section 2.2, 2.6): DATA / PLAIN_DATA seal and
# open with an explicit counter, and the sliding replay window. The engine cimports this.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


# Big-endian loads of the packet header's fields (docs/wire.md §2.2), shared by the packet
# layer, the engine and the stream transport. Written as expressions the C compiler makes
# one load and byte swap (a loop over the bytes was about 25 instructions per packet).
cdef inline uint32_t _load_u32_be(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _load_u64_be(const uint8_t* p) noexcept nogil:
    return (<uint64_t>_load_u32_be(p) << 32) | _load_u32_be(p + 4)

cdef enum:
    PACKET_INITIATION = 0x04
    PACKET_RESPONSE = 0x05
    PACKET_FINISH = 0x06
    PACKET_DATA = 0x07
    PACKET_COOKIE = 0x08
    PACKET_SESSION_UNKNOWN = 0x09
    PACKET_PLAIN_DATA = 0x0A
    PACKET_VERSION_UNSUPPORTED = 0x0B
    DATA_HEADER_SIZE = 13
    AEAD_TAG_SIZE = 16
    DATA_OVERHEAD = 29
    C_REPLAY_WINDOW = 1024

# open_into results: 0 = ok, negative = drop reason (index into DROP_REASON_NAMES in _packet.pyx,
# negated). Names are the metric counter names of docs/wire.md.
cdef enum:
    OPEN_OK = 0
    DROP_TRUNCATED = -1
    DROP_REPLAY = -2
    DROP_AUTH_FAILED = -3
    DROP_COUNTER_EXHAUSTED = -4
    DROP_PLAINTEXT_REFUSED = -5
    DROP_WRONG_SESSION = -6
    DROP_OUT_OF_ROOM = -7

# RFC 6479-style sliding window over 64-bit packet counters.
cdef class ReplayWindow:
    cdef uint64_t highest          # highest counter accepted + 1 (0: nothing seen yet)
    cdef uint64_t bitmap[16]       # C_REPLAY_WINDOW bits, ring-indexed by counter
    # True if counter could be accepted (not too old, not seen). Does not change state.
    cdef bint check(self, uint64_t counter) noexcept nogil
    # Mark counter as seen; returns False (and changes nothing) if it is a replay.
    cdef bint update(self, uint64_t counter) noexcept nogil

# Internal to _packet: a buffer-protocol window onto C memory that the cryptography backend
# re-aims before each call, so our buffers reach cryptography without allocating a memoryview.
cdef class _CBuffer:
    cdef char* ptr
    cdef Py_ssize_t shape[1]              # the window's length (also the Py_buffer shape)
    cdef Py_ssize_t strides[1]
    cdef bint writable

# The keys and counters of one established session. One object per session; the engine keeps
# them in a dict by local_index. It holds no AEAD object: the backend (libcrypto's EVP, or
# cryptography's ChaCha20Poly1305) keeps one context per direction for the whole process and
# takes the key with each call (see the AEAD seam in _packet.pyx), so an idle session costs
# its 64 key bytes, not two cipher contexts.
cdef class SessionCrypto:
    cdef readonly uint32_t local_index    # our index: the receiver_index of DATA sent to us
    cdef readonly uint32_t remote_index   # the peer's index: put in the DATA we send
    cdef readonly uint64_t send_counter   # next counter to use
    cdef readonly bint plaintext          # PLAIN_DATA negotiated by both ends
    cdef readonly bint aes                # AES-256-GCM negotiated by both ends, else ChaCha20
    cdef readonly ReplayWindow window
    cdef uint64_t _sealed_bytes           # AES-256-GCM: payload bytes sealed, for its limit
    cdef uint8_t _send_key[32]            # zero in plaintext mode; wiped on deallocation
    cdef uint8_t _recv_key[32]
    cdef void* _aes_keys                  # both keys' AES schedules once busy, else NULL
    cdef uint32_t _aes_packets            # packets sealed and opened until then
    cdef object _aes_sealer               # cryptography AESGCM objects for large packets,
    cdef object _aes_opener               # made on first use, dropped with the session

    # Seal payload[0:n] as one DATA (or PLAIN_DATA) packet into out[0:cap]. Returns the packet
    # length, -1 if the send counter is exhausted, -2 if out is too small. The tag is written at
    # the end; the counter advances only on success.
    cdef Py_ssize_t seal_into(self, const uint8_t* payload, Py_ssize_t n,
                              uint8_t* out, Py_ssize_t cap) except -3
    # Open the packet at pkt[0:n] (first byte DATA or PLAIN_DATA, index already matched) into
    # out[0:cap]. On OPEN_OK, out_len[0] is the payload length and the window was updated.
    # Returns OPEN_OK or a DROP_* reason. out may equal pkt + DATA_HEADER_SIZE (in place).
    cdef int open_into(self, const uint8_t* pkt, Py_ssize_t n, uint8_t* out, Py_ssize_t cap,
                       Py_ssize_t* out_len) except -100
    cdef bint _count_sealed(self, Py_ssize_t n) noexcept
    cdef void* _aes_keys_now(self) noexcept
    cdef object _large_aes(self, bint sealing)

# One DATA packet sealed or opened piece by piece (large packets on streams, where each piece
# is written as soon as it is sealed, and opened as it arrives): see _packet.pyx.
cdef class PieceCipher:
    cdef void* _ctx                          # libcrypto's context (ChaCha20-Poly1305), or
    cdef object _aes                         # cryptography's GCM encryptor or decryptor
    cdef bint _sealing
    cdef readonly uint64_t counter
    cdef SessionCrypto _crypto               # opening: whose replay window finish() updates
    # The next n bytes of the payload (sealing) or ciphertext (opening): inp -> out, may be equal.
    cdef int update(self, const uint8_t* inp, Py_ssize_t n, uint8_t* out) except -1
    # After the last piece; see _packet.pyx. Releases the cipher context either way.
    cdef int finish(self, uint8_t* tag) except -100

# Begin sealing the next packet of crypto, of n bytes of payload: writes its 13-byte header at
# out and takes its counter. None when this build or backend cannot seal in pieces, in
# plaintext mode, or when the counter (or AES-256-GCM's byte limit) is exhausted: the caller
# then seals the packet whole (seal_into), which refuses it in the last two cases.
cdef PieceCipher seal_pieces(SessionCrypto crypto, uint8_t* out, Py_ssize_t n)
# Begin opening the DATA packet whose 13-byte header is at header. None when it cannot be
# opened in pieces (as above) or would be refused (index, counter, replay): the caller then
# opens it whole (open_into), which says why.
cdef PieceCipher open_pieces(SessionCrypto crypto, const uint8_t* header)
