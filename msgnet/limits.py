"""Every wire and table limit, by the name docs/wire.md gives it.

The Cython modules keep C copies of the few they need in their inner loops
(``_frame.pxd``); tests check that the two agree.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Packet types (docs/wire.md §2.1): all within 0x04-0x0F to share a port with QUIC/STUN.
PACKET_INITIATION = 0x04
PACKET_RESPONSE = 0x05
PACKET_FINISH = 0x06
PACKET_DATA = 0x07
PACKET_COOKIE = 0x08
PACKET_SESSION_UNKNOWN = 0x09
PACKET_PLAIN_DATA = 0x0A
PACKET_VERSION_UNSUPPORTED = 0x0B
PACKET_TYPE_MIN = 0x04
PACKET_TYPE_MAX = 0x0F

DATA_HEADER_SIZE = 13
AEAD_TAG_SIZE = 16
DATA_OVERHEAD = DATA_HEADER_SIZE + AEAD_TAG_SIZE

MAX_DATAGRAM = 1200
"""Base datagram size: the largest UDP payload a session sends until PMTU discovery raises it
(docs/wire.md 5.1); handshake packets and the best-effort size bound are reckoned in it."""
MAX_DATAGRAM_CEILING = 65000
"""The largest UDP payload any host sends (its max_datagram setting, the default) and the
largest every host accepts."""
MAX_STREAM_PACKET = (1 << 20) + 4096
MAX_MESSAGE_PAYLOAD = 1 << 20
MAX_PROTOCOL_LENGTH = 256
MAX_PROTOCOL_INT = 0xFFFF
MAX_ALIASES_PER_SESSION = 256
MAX_FRAMES_PER_PACKET = 256
MAX_FRAGMENTS = 1024
MAX_ACK_RANGES = 64
MAX_VARINT_BYTES = 9
MAX_PING_DATA = 32
MAX_CLOSE_REASON = 128
REPLAY_WINDOW = 1024

# Handshake (docs/wire.md §2.3-2.5).
MIN_INITIATION = 160
AMPLIFICATION_FACTOR = 3
HANDSHAKE_INITIAL_RTO = 0.25
HANDSHAKE_MIN_RETRY = 0.05
HANDSHAKE_RETRIES = 3
HANDSHAKE_TIMEOUT = 5.0
EARLY_DATA_PACKETS = 8
MAX_PENDING_HANDSHAKES = 1024
COOKIE_LOAD_THRESHOLD = 64
HANDSHAKES_PER_SECOND = 20.0
HANDSHAKE_BURST = 5
COOKIE_ROTATE = 120.0
UNKNOWN_REPLIES_PER_SECOND = 10.0
RETAIN_SENT_TIME = 2.0
RETAIN_SENT_PACKETS = 64

# Sessions (docs/wire.md §2.3.2).
REKEY_AFTER_TIME = 120.0
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_TIME = 180.0
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
# AES-256-GCM sessions seal at most this many payload bytes per direction (docs/wire.md
# 2.3.2: about 2^36 blocks per key keep an attacker's advantage below 2^-57).
AES_GCM_REJECT_AFTER_BYTES = 1 << 40
SESSION_IDLE_TIMEOUT = 180.0
KEEPALIVE_AFTER = 15.0
MAX_SESSIONS = 65536
RESET_MEMORY = 30.0

# Frame types (docs/wire.md §3.1).
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

# Message flags (docs/wire.md §3.2).
FLAG_REQUEST = 0x01
FLAG_RESPONSE = 0x02
FLAG_SEQ = 0x04
FLAG_RELIABLE = 0x08
FLAG_ORDERED = 0x10
FLAG_FRAGMENT = 0x20
FLAG_RESERVED = 0xC0

# RESET codes (docs/wire.md §3.3).
RESET_NO_HANDLER = 1
RESET_UNKNOWN_ALIAS = 2
RESET_TOO_MANY_ALIASES = 3
RESET_REFUSED = 4

# CLOSE codes (docs/wire.md §3.5).
CLOSE_NORMAL = 0
CLOSE_PROTOCOL_VIOLATION = 1
CLOSE_SHUTDOWN = 2
CLOSE_IDLE = 3

# Stream transport (docs/wire.md §6).
STREAM_PACKET_TIMEOUT = 10.0
STREAM_IDLE_TIMEOUT = 180.0
MAX_STREAM_CONNECTIONS_PER_IP = 16
MAX_STREAM_CONNECTIONS = 4096
STREAM_HIGH_WATER = 1 << 20
# Reliable messages on a stream (docs/wire.md §6.1): what a sender keeps per connection until
# the peer's PONG proves it arrived (half the replay window, so a resumed session's packets
# are all still within the receiver's window), and how long it awaits that PONG.
STREAM_RETAIN_PACKETS = 512
STREAM_RETAIN_BYTES = 8 << 20
STREAM_ACK_TIMEOUT = 1.0
STREAM_MOVE_GRACE = 3.0
"""How long a connection with unacknowledged packets is kept while the peer sends on another
(docs/wire.md §6.1): after that it is closed, and its packets resumed on the other."""
STREAM_WAIT_TIMEOUT = 30.0

# Delivery (docs/wire.md §3.6).
MAX_BEST_EFFORT_FRAGMENTS = 16
FRAGMENT_INIT_OVERHEAD = 1 + 3 + 2 + 2 + 3 + 1 + 9 + 9 + 2 + 2
"""Room for an INIT frame's fixed fields around a fragment: type, length, transport id,
protocol length, alias, flags, request id, seq, fragment index and count (varints at their
widest useful sizes). With the protocol id, what a fragment's datagram holds besides its
data; it sets the best-effort size bound (max_best_effort_payload)."""


def max_best_effort_payload(protocol_bytes: int) -> int:
    """The largest best-effort message on a protocol whose id is protocol_bytes long: what
    MAX_BEST_EFFORT_FRAGMENTS fragments of a MAX_DATAGRAM datagram carry, on every UDP path
    whatever its datagram size (docs/wire.md 5.1)."""
    return MAX_BEST_EFFORT_FRAGMENTS * (MAX_DATAGRAM - DATA_OVERHEAD - FRAGMENT_INIT_OVERHEAD
                                        - protocol_bytes)
MAX_ACK_DELAY = 0.025
MIN_RTO = 0.2
INITIAL_RTO = 1.0
MAX_RTO = 60.0
MAX_RETRANSMISSIONS = 8
INITIAL_WINDOW = 10
MIN_WINDOW = 2
MAX_REASSEMBLY_PER_SESSION = 4 << 20
MAX_OUTSTANDING_PER_SESSION = 8 << 20
MAX_REASSEMBLY_TOTAL = 64 << 20
MAX_BEST_EFFORT_REASSEMBLIES = 16
SEQ_WINDOW = 4096

# Datagram size: PMTU discovery (docs/wire.md §5.1).
PMTU_PROBE_SIZES = (8952, 1452)  # below the host's max_datagram, which is tried first
PMTU_PROBE_TIMEOUT = 0.5
PMTU_MAX_PROBES = 3
PMTU_PROBE_MARK = b"\xa6msgnet/pmtu"

# Transports, paths and Ack (docs/wire.md §5).
PATH_TIMEOUT = 3.0
