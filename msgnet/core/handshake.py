"""The msgnet handshake (docs/wire.md section 2.3-2.5, 2.7) as a sans-IO state machine.

``Noise_XX_25519_ChaChaPoly_SHA256`` with the libp2p Noise handshake payload,
carried in INITIATION / RESPONSE / FINISH packets, plus the stateless answers
(COOKIE, SESSION_UNKNOWN, VERSION_UNSUPPORTED) and the DoS defences around
them.  One :class:`Handshaker` serves both roles for one transport (one
prologue): it dials (:meth:`Handshaker.initiate`) and answers dials
(:meth:`Handshaker.handle_packet`).

Sans-IO contract (aioquic's): bytes, source address and ``now`` (monotonic
seconds) in; datagrams to send and events out (:class:`HandshakeOutput`);
:meth:`Handshaker.next_deadline` says when to call
:meth:`Handshaker.handle_timer`.  Randomness (the Noise static key if none is
given, every ephemeral, the cookie secrets) comes only from the injected
``random_bytes``, drawn in a fixed order, so a scripted source reproduces a
transcript byte for byte (tests/vectors/msgnet_v1.json).

Network input never raises: what fails to parse or authenticate is dropped
and counted in :attr:`Handshaker.counters` under these names:

=====================  ===============================================================
truncated              shorter than its fixed header (COOKIE / VERSION_UNSUPPORTED: bad size)
unknown_packet_type    not a handshake packet
initiation_too_short   INITIATION below ``MIN_INITIATION`` bytes
version_unsupported    INITIATION of a version we do not speak (answered, rate limited)
reply_rate_limited     a VERSION_UNSUPPORTED or SESSION_UNKNOWN answer suppressed
cookie_sent            COOKIE sent instead of doing DH (under load or over the IP's rate)
bad_cookie             INITIATION with a cookie we did not issue (or expired)
rate_limited           cookie-validated INITIATION over its IP's rate, or a copy of a pending
                       INITIATION from one address too many (MAX_INITIATION_PATHS)
handshake_failed       Noise failure (forged, corrupt) or malformed handshake payload
bad_signature          identity_sig does not sign the Noise static key
wrong_peer_id          the dialled PeerID is not the one that answered
unknown_handshake      RESPONSE/COOKIE/FINISH/VERSION_UNSUPPORTED for no handshake of ours
duplicate              RESPONSE or COOKIE for a dial already past that step
finish_repeated        identical FINISH for a session completed here (FinishRepeated)
cookie_received        a COOKIE made us re-send our INITIATION
version_rejected       the peer answered VERSION_UNSUPPORTED: dial failed
timeout                no RESPONSE after every INITIATION retry: dial failed
unconfirmed            no authenticated packet after every FINISH retry: dial failed
pending_evicted        a pending responder handshake evicted to admit a newer one
pending_expired        a pending responder handshake got no FINISH in HANDSHAKE_TIMEOUT
early_data_dropped     DATA for a pending handshake beyond EARLY_DATA_PACKETS
=====================  ===============================================================

The wire's ``amplification_limit`` drop cannot occur: a Handshaker's RESPONSE
has a fixed size, refused at construction if above ``3 * MIN_INITIATION``,
and every INITIATION it answers is at least ``MIN_INITIATION`` bytes.

Known limit of wire v1: the index fields of INITIATION and RESPONSE are not
covered by the Noise transcript.  A RESPONSE whose ``sender_index`` was altered
in flight still authenticates, so the initiator emits a SessionEstablished
that the responder never matches; FINISH retries then run out and the dial
ends with ``HandshakeFailed(reason="unconfirmed")``.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import os
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from msgnet.core.noise import HandshakeState, x25519_private_key, x25519_public
from msgnet.errors import (
    HandshakeError,
    MsgnetError,
    PeerUnreachableError,
    SecurityError,
    UsageError,
)
from msgnet.identity import (
    KeyPair,
    PeerID,
    decode_public_key_protobuf,
    encode_public_key_protobuf,
    verify_signature,
)
from msgnet.limits import (
    AMPLIFICATION_FACTOR,
    COOKIE_LOAD_THRESHOLD,
    COOKIE_ROTATE,
    DATA_OVERHEAD,
    EARLY_DATA_PACKETS,
    HANDSHAKE_BURST,
    HANDSHAKE_INITIAL_RTO,
    HANDSHAKE_MIN_RETRY,
    HANDSHAKE_RETRIES,
    HANDSHAKE_TIMEOUT,
    HANDSHAKES_PER_SECOND,
    MAX_DATAGRAM,
    MAX_PENDING_HANDSHAKES,
    MAX_STREAM_PACKET,
    MIN_INITIATION,
    PACKET_COOKIE,
    PACKET_DATA,
    PACKET_FINISH,
    PACKET_INITIATION,
    PACKET_RESPONSE,
    PACKET_SESSION_UNKNOWN,
    PACKET_VERSION_UNSUPPORTED,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    UNKNOWN_REPLIES_PER_SECOND,
)

__all__ = [
    "Address",
    "Datagram",
    "FinishRepeated",
    "HandshakeEvent",
    "HandshakeFailed",
    "HandshakeOutput",
    "HandshakePayload",
    "Handshaker",
    "NOISE_PROTOCOL",
    "PLAINTEXT_FLAG",
    "AES_GCM_FLAG",
    "PROLOGUE",
    "MAX_INITIATION_PATHS",
    "RATE_TABLE_SIZE",
    "SIGNATURE_PREFIX",
    "SessionEstablished",
    "decode_handshake_payload",
    "encode_handshake_payload",
]

Address = tuple[Any, ...]
"""A socket address as the transport reports it: ``(host, port)`` or IPv6's 4-tuple."""
Datagram = tuple[bytes, Address]

NOISE_PROTOCOL = "Noise_XX_25519_ChaChaPoly_SHA256"
PROLOGUE = b"msgnet/1"
"""The Noise prologue: separates msgnet from libp2p's stream Noise (empty prologue); it
names no transport because a session outlives the path of its handshake (docs/wire.md §5)."""
SIGNATURE_PREFIX = b"noise-libp2p-static-key:"
PROVEN_IDENTITIES = 1024
"""How many (identity key, Noise static key, identity_sig) triples that verified are kept."""
RATE_TABLE_SIZE = 4096
"""Addresses each per-IP rate table remembers (least recently seen evicted)."""
MAX_INITIATION_PATHS = 4
"""Source addresses whose copies of one INITIATION are answered: one per transport the
initiator dials (wire.md §5, first contact), with room for a NAT rebinding."""

PLAINTEXT_FLAG = 0x01
AES_GCM_FLAG = 0x02  # this end can seal and open DATA with AES-256-GCM (wire.md 2.2)
_MSGNET_EXTENSION = 1000  # field number of msgnet's entry in NoiseExtensions

_U32 = struct.Struct(">I")
_KEY = 32  # X25519 key, and Noise DH output
_TAG = 16
_COOKIE = 16
_ZERO_COOKIE = bytes(_COOKIE)
_INITIATION_HEADER = 22  # type, version, sender_index, cookie
_RESPONSE_HEADER = 9  # type, sender_index, receiver_index
_FINISH_HEADER = 5  # type, receiver_index
_COOKIE_PACKET = 1 + 4 + _COOKIE
_INITIATION_PADDING = MIN_INITIATION - _INITIATION_HEADER - _KEY
# Noise XX message 2: e, encrypted s, encrypted payload; message 3: encrypted s and payload.
_MSG2_OVERHEAD = _KEY + (_KEY + _TAG) + _TAG
_MSG3_OVERHEAD = (_KEY + _TAG) + _TAG

_AWAIT_RESPONSE = 1
_AWAIT_CONFIRM = 2


# --- events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    """Keys and identity of a new session.

    For the initiator this is emitted on RESPONSE, when FINISH goes out: it
    may send DATA at once, but the session is provisional until the network
    calls :meth:`Handshaker.confirm`; if it never does, a
    ``HandshakeFailed(reason="unconfirmed")`` for the same ``local_index``
    follows and the session must be dropped.
    """

    peer_id: PeerID
    local_index: int  # receiver_index of DATA sent to us
    remote_index: int  # receiver_index of DATA we send
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    plaintext: bool  # both ends advertised plaintext mode: use PLAIN_DATA
    aes_gcm: bool  # both ends advertised AES-256-GCM: DATA uses it (unless plaintext)
    address: Address  # source of the RESPONSE (initiator) or FINISH (responder)
    initiator: bool
    frames: bytes  # responder: the frames that rode in FINISH
    early_data: list[bytes]  # responder: DATA packets held before FINISH, in arrival order
    rtt: float | None  # one handshake round trip; None if a retransmission made it ambiguous
    remote_transports: tuple[int, ...]  # the peer's transport ids from its handshake payload
    # Noise ``h``, a channel binding equal on both ends (empty only in events built by hand).
    handshake_hash: bytes = b""


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """A handshake ended without a session (initiator), or was refused (responder)."""

    local_index: int
    peer_id: PeerID | None  # the dialled PeerID (initiator); None when not known
    address: Address
    reason: str  # the counter name: timeout, unconfirmed, wrong_peer_id, bad_signature, ...
    error: MsgnetError  # what a waiting caller should raise
    initiator: bool


@dataclass(frozen=True, slots=True)
class FinishRepeated:
    """A FINISH identical to one that completed a session here arrived again.

    The initiator missed our confirmation: the network re-sends one DATA
    packet on the session ``local_index`` (to the session's own address;
    ``address`` is where the unauthenticated duplicate came from).
    """

    local_index: int
    address: Address


HandshakeEvent = SessionEstablished | HandshakeFailed | FinishRepeated


@dataclass(slots=True)
class HandshakeOutput:
    """What one input produced: datagrams to send now, and events."""

    datagrams: list[Datagram] = field(default_factory=list)
    events: list[HandshakeEvent] = field(default_factory=list)


# --- handshake payload (protobuf, wire.md 2.3.1) ----------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakePayload:
    """NoiseHandshakePayload with msgnet's extension decoded."""

    identity_key: bytes  # libp2p PublicKey protobuf
    identity_sig: bytes  # Ed25519 over SIGNATURE_PREFIX || Noise static public key
    flags: int = 0  # bit 0: this end accepts plaintext mode
    transport_ids: tuple[int, ...] = ()


def encode_handshake_payload(payload: HandshakePayload) -> bytes:
    """Serialize deterministically (fields in number order, minimal varints)."""
    ids = payload.transport_ids
    if not (0 <= payload.flags <= 0xFF and len(ids) <= 0xFF and all(0 <= i <= 0xFFFF for i in ids)):
        raise UsageError("flags must fit u8, and at most 255 transport ids, each a u16")
    extension = bytes((payload.flags, len(ids))) + struct.pack(f">{len(ids)}H", *ids)
    extensions = _pb_bytes(_MSGNET_EXTENSION, extension)
    return (
        _pb_bytes(1, payload.identity_key)
        + _pb_bytes(2, payload.identity_sig)
        + _pb_bytes(4, extensions)
    )


def decode_handshake_payload(data: bytes) -> HandshakePayload:
    """Parse a NoiseHandshakePayload; unknown fields are skipped as protobuf requires.

    A missing msgnet extension reads as no flags and no transports.  Raises
    HandshakeError for anything malformed.
    """
    identity_key: bytes | None = None
    identity_sig: bytes | None = None
    extension: bytes | None = None
    for number, wire_type, value in _pb_fields(data):
        if number in (1, 2, 4) and wire_type != 2:
            raise HandshakeError(f"handshake payload field {number} is not length-delimited")
        if number == 1:
            identity_key = value
        elif number == 2:
            identity_sig = value
        elif number == 4:
            # Repeated embedded messages merge, so the last msgnet entry wins.
            for inner, inner_type, inner_value in _pb_fields(value):
                if inner == _MSGNET_EXTENSION:
                    if inner_type != 2:
                        raise HandshakeError("msgnet extension is not length-delimited")
                    extension = inner_value
    if identity_key is None or identity_sig is None:
        raise HandshakeError("handshake payload lacks identity_key or identity_sig")
    flags = 0
    transport_ids: tuple[int, ...] = ()
    if extension is not None:
        if len(extension) < 2 or len(extension) != 2 + 2 * extension[1]:
            raise HandshakeError("msgnet extension: transport count does not match its length")
        flags = extension[0]
        transport_ids = struct.unpack(f">{extension[1]}H", extension[2:])
    return HandshakePayload(identity_key, identity_sig, flags, transport_ids)


def _uvarint(value: int) -> bytes:
    """Minimal LEB128, as both protobuf and wire.md write it."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, max_bytes: int, minimal: bool) -> tuple[int, int]:
    """Read a LEB128 varint at ``pos``; return (value, next position).

    Protobuf allows 10 bytes and non-minimal forms; wire.md varints
    (``minimal=True``, 9 bytes) do not.
    """
    value = 0
    for i in range(max_bytes):
        if pos + i >= len(buf):
            raise HandshakeError("truncated varint")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if minimal and byte == 0 and i > 0:
                raise HandshakeError("non-minimal varint")
            if value >> 64:
                raise HandshakeError("varint above 64 bits")
            return value, pos + i + 1
    raise HandshakeError("varint too long")


def _pb_bytes(number: int, value: bytes) -> bytes:
    return _uvarint(number << 3 | 2) + _uvarint(len(value)) + value


def _pb_fields(buf: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Yield (field number, wire type, value bytes); a varint's value is its encoding."""
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos, 10, minimal=False)
        number, wire_type = tag >> 3, tag & 7
        if not 0 < number < 1 << 29:
            raise HandshakeError(f"invalid protobuf field number {number}")
        start = pos
        if wire_type == 0:
            _, pos = _read_varint(buf, pos, 10, minimal=False)
        elif wire_type == 2:
            size, start = _read_varint(buf, pos, 10, minimal=False)
            pos = start + size
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:  # groups (3, 4) are not proto3; 6 and 7 do not exist
            raise HandshakeError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise HandshakeError("protobuf field runs past the payload")
        yield number, wire_type, buf[start:pos]


def _session_keys(noise: HandshakeState) -> tuple[bytes, bytes]:
    """Raw keys from Noise Split(): (initiator to responder, responder to initiator)."""
    to_responder, to_initiator = noise.split()
    assert to_responder.key is not None and to_initiator.key is not None
    return to_responder.key, to_initiator.key


def _split_finish_payload(payload: bytes) -> tuple[bytes, bytes]:
    """FINISH's Noise payload is ``payload_length:varint | handshake payload | frames``."""
    length, pos = _read_varint(payload, 0, 9, minimal=True)
    if length > len(payload) - pos:
        raise HandshakeError("FINISH handshake payload length runs past the message")
    return payload[pos : pos + length], payload[pos + length :]


# --- address helpers ------------------------------------------------------------------


@functools.lru_cache(maxsize=RATE_TABLE_SIZE)
def _host_bytes(host: str) -> bytes:
    """Packed IP; hosts that are not IP literals (in-memory transports) key by their text."""
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        return host.encode()


def _rate_key(address: Address) -> bytes:
    """Rate limits apply per IPv4 address and per IPv6 /64 (one subscriber's allocation)."""
    packed = _host_bytes(address[0])
    return packed[:8] if len(packed) == 16 else packed


class _TokenBuckets:
    """Per-key token buckets in a bounded LRU table, so spoofed sources cannot grow it."""

    __slots__ = ("_burst", "_capacity", "_rate", "_table")

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self._rate = rate
        self._burst = burst
        self._capacity = capacity
        self._table: OrderedDict[bytes, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def take(self, key: bytes, now: float) -> bool:
        """Spend one token for ``key``; False if it has none left."""
        entry = self._table.get(key)
        if entry is None:
            if len(self._table) >= self._capacity:
                self._table.popitem(last=False)
            entry = self._table[key] = [self._burst, now]
        else:
            self._table.move_to_end(key)
            entry[0] = min(self._burst, entry[0] + max(0.0, now - entry[1]) * self._rate)
            entry[1] = now
        if entry[0] < 1.0:
            return False
        entry[0] -= 1.0
        return True


# --- per-handshake state --------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Dial:
    """Our side of a handshake we started."""

    local_index: int
    address: Address
    peer_id: PeerID | None
    take_frames: Callable[[int], bytes] | None
    noise: HandshakeState
    header: bytes  # INITIATION's type, version and sender_index
    message: bytes  # Noise message 1, re-sent unchanged
    packet: bytes  # what a retry re-sends: INITIATION, then FINISH
    phase: int = _AWAIT_RESPONSE
    retries: int = 0
    interval: float = HANDSHAKE_INITIAL_RTO
    deadline: float = 0.0
    last_sent: float = 0.0
    ambiguous: bool = False  # a retry went out, so a reply does not time one round trip
    cookie_welcome: bool = True  # one COOKIE is honoured per INITIATION we send


@dataclass(slots=True, eq=False)
class _Pending:
    """A responder handshake waiting for FINISH."""

    local_index: int
    remote_index: int
    key: bytes  # sender_index and ephemeral: spots a re-sent INITIATION on any path
    addresses: list[Address]  # where copies came from (answered), first one first
    noise: HandshakeState
    response: bytes
    expires: float
    sent_at: float
    responses: int = 1
    early: list[bytes] = field(default_factory=list)


class _Rejected(Exception):
    """A handshake payload that decrypted but does not prove an acceptable identity."""

    def __init__(self, reason: str, error: MsgnetError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


# --- the state machine ----------------------------------------------------------------


class Handshaker:
    """Both roles of the msgnet handshake for one local identity and transport.

    ``keypair`` is the libp2p identity the handshake proves.  ``static_key``
    is the raw X25519 Noise static key (drawn from ``random_bytes`` when
    None): libp2p Noise keeps it separate from the identity key, which only
    signs it.  ``plaintext`` advertises measurement mode; a session uses it
    only when both ends advertise it.  ``aes_gcm`` advertises AES-256-GCM for
    DATA (``msgnet._packet.AES_GCM``); a session uses it only when both ends
    advertise it.  ``transport_ids`` are our transports,
    announced to the peer.  ``max_packet`` bounds FINISH (the datagram size, or
    more on a stream transport).  ``require_cookie`` makes every INITIATION
    prove its address with a COOKIE round trip first, loaded or not.

    Indices are the network's: it passes ``local_index`` to :meth:`initiate`
    and ``allocate_index`` to :meth:`handle_packet`, which must return a
    non-zero u32 not used by a live session nor held here
    (:meth:`holds_index`).
    """

    def __init__(
        self,
        keypair: KeyPair,
        *,
        plaintext: bool = False,
        aes_gcm: bool = False,
        transport_ids: tuple[int, ...] = (1,),
        static_key: bytes | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        max_packet: int = MAX_DATAGRAM,
        max_pending: int = MAX_PENDING_HANDSHAKES,
        require_cookie: bool = False,
        rate_table_size: int = RATE_TABLE_SIZE,
    ) -> None:
        if not MAX_DATAGRAM <= max_packet <= MAX_STREAM_PACKET:
            raise UsageError(f"max_packet must be in [{MAX_DATAGRAM}, {MAX_STREAM_PACKET}]")
        if max_pending < 1 or rate_table_size < 1:
            raise UsageError("max_pending and rate_table_size must be at least 1")
        self._keypair = keypair
        self._prologue = PROLOGUE
        self._plaintext = plaintext
        self._aes_gcm = aes_gcm
        self._random = random_bytes
        self._static = static_key if static_key is not None else random_bytes(_KEY)
        self._static_public = x25519_public(self._static)
        self._static_key = x25519_private_key(self._static)
        # Signing once here keeps the Ed25519 signature off the per-handshake path.
        self._identity_key = encode_public_key_protobuf(keypair.public_key_bytes)
        self._identity_sig = keypair.sign(SIGNATURE_PREFIX + self._static_public)
        self.set_transport_ids(transport_ids)
        self._max_packet = max_packet
        self._max_pending = max_pending
        self._require_cookie = require_cookie

        self.counters: Counter[str] = Counter()
        self._dials: dict[int, _Dial] = {}
        self._timers: list[tuple[float, int, _Dial]] = []  # heap; stale entries skipped
        self._timer_order = itertools.count()
        # Both tables are in insertion order, which is expiry order (one fixed timeout).
        self._pending: dict[int, _Pending] = {}
        self._pending_by_initiation: dict[bytes, int] = {}
        self._completed: dict[int, tuple[bytes, float]] = {}  # index: (FINISH digest, expiry)
        self._initiation_rate = _TokenBuckets(
            HANDSHAKES_PER_SECOND, HANDSHAKE_BURST, rate_table_size
        )
        # Address-validated INITIATIONs have their own budget, so spoofed packets
        # draining an IP's first bucket cannot lock the real owner out.
        self._validated_rate = _TokenBuckets(
            HANDSHAKES_PER_SECOND, HANDSHAKE_BURST, rate_table_size
        )
        self._reply_rate = _TokenBuckets(
            UNKNOWN_REPLIES_PER_SECOND, UNKNOWN_REPLIES_PER_SECOND, rate_table_size
        )
        self._secret: bytes | None = None
        self._previous_secret: bytes | None = None
        self._secret_born = 0.0

    # --- public state ---

    @property
    def peer_id(self) -> PeerID:
        return self._keypair.peer_id

    @property
    def static_public(self) -> bytes:
        """Our Noise static X25519 public key (what identity_sig signs)."""
        return self._static_public

    @property
    def handshake_payload(self) -> bytes:
        """Our encoded NoiseHandshakePayload, the same in every handshake (signed once)."""
        return self._payload

    def set_transport_ids(self, transport_ids: tuple[int, ...]) -> None:
        """Announce these transport ids from now on (a host numbers its transports as it
        starts listening, after the handshaker exists). The signature covers the Noise
        static key, not the payload, so nothing is signed again."""
        payload = encode_handshake_payload(
            HandshakePayload(
                identity_key=self._identity_key,
                identity_sig=self._identity_sig,
                flags=(PLAINTEXT_FLAG if self._plaintext else 0)
                | (AES_GCM_FLAG if self._aes_gcm else 0),
                transport_ids=tuple(transport_ids),
            )
        )
        response_size = _RESPONSE_HEADER + _MSG2_OVERHEAD + len(payload)
        if response_size > AMPLIFICATION_FACTOR * MIN_INITIATION:
            raise UsageError(
                f"RESPONSE would be {response_size} bytes, above {AMPLIFICATION_FACTOR}x "
                f"MIN_INITIATION: announce fewer transport ids"
            )
        self._payload = payload
        self._finish_prefix = _uvarint(len(payload)) + payload

    def is_pending(self, local_index: int) -> bool:
        """True while ``local_index`` is a responder handshake waiting for FINISH."""
        return local_index in self._pending

    def holds_index(self, index: int) -> bool:
        """True if ``index`` is in use here: a dial, a pending or a just-completed handshake."""
        return index in self._dials or index in self._pending or index in self._completed

    def table_sizes(self) -> dict[str, int]:
        """Sizes of every table fed by remote input (all bounded), for metrics and tests."""
        return {
            "dials": len(self._dials),
            "pending": len(self._pending),
            "completed": len(self._completed),
            "initiation_rate": len(self._initiation_rate),
            "validated_rate": len(self._validated_rate),
            "reply_rate": len(self._reply_rate),
        }

    # --- initiator ---

    def initiate(
        self,
        address: Address,
        now: float,
        *,
        local_index: int,
        peer_id: PeerID | None = None,
        take_frames: Callable[[int], bytes] | None = None,
    ) -> list[Datagram]:
        """Start a handshake to ``address``; return the INITIATION to send.

        ``peer_id`` None accepts whoever answers (the event names it).
        ``take_frames(budget)`` is called once, when FINISH is built, and
        returns at most ``budget`` bytes of encoded frames to ride in it.
        """
        if not 0 < local_index <= 0xFFFFFFFF or self.holds_index(local_index):
            raise UsageError(f"local_index {local_index} is not a free non-zero u32 here")
        noise = HandshakeState("XX", True, self._prologue, s=self._static_key,
                               e=self._random(_KEY))
        message = noise.write_message(bytes(_INITIATION_PADDING))
        header = bytes((PACKET_INITIATION, PROTOCOL_VERSION)) + _U32.pack(local_index)
        packet = header + _ZERO_COOKIE + message
        dial = _Dial(
            local_index,
            address,
            peer_id,
            take_frames,
            noise,
            header,
            message,
            packet,
            last_sent=now,
        )
        self._dials[local_index] = dial
        self._schedule(dial, now + dial.interval)
        return [(packet, address)]

    def confirm(self, local_index: int) -> None:
        """An authenticated packet arrived on our new session: stop re-sending FINISH."""
        dial = self._dials.get(local_index)
        if dial is not None and dial.phase == _AWAIT_CONFIRM:
            del self._dials[local_index]

    def cancel(self, local_index: int) -> None:
        """Forget the handshake with this index, in either role, without an event."""
        self._dials.pop(local_index, None)
        if local_index in self._pending:
            self._drop_pending(local_index)

    # --- responder ---

    def hold_early_data(self, local_index: int, data: bytes) -> bool:
        """Keep a DATA packet that beat FINISH; it is handed over in SessionEstablished.

        False (the caller drops it) if no handshake is pending on the index or
        it already holds EARLY_DATA_PACKETS.
        """
        pending = self._pending.get(local_index)
        if pending is None:
            return False
        if len(pending.early) >= EARLY_DATA_PACKETS:
            self.counters["early_data_dropped"] += 1
            return False
        pending.early.append(bytes(data))
        return True

    def answer_unknown_session(self, data: bytes, address: Address, now: float) -> bytes | None:
        """SESSION_UNKNOWN for a DATA packet whose index is unknown; None if rate limited.

        Stateless: it echoes the packet's index, counter and tag, so only a
        party that saw the packet can make one.
        """
        if len(data) < DATA_OVERHEAD or data[0] != PACKET_DATA:
            return None
        if not self._reply_rate.take(_rate_key(address), now):
            self.counters["reply_rate_limited"] += 1
            return None
        return bytes((PACKET_SESSION_UNKNOWN,)) + bytes(data[1:13]) + bytes(data[-_TAG:])

    # --- input ---

    def handle_packet(
        self,
        data: bytes,
        address: Address,
        now: float,
        *,
        allocate_index: Callable[[], int],
    ) -> HandshakeOutput:
        """Process one INITIATION, RESPONSE, FINISH, COOKIE or VERSION_UNSUPPORTED packet.

        ``allocate_index`` is called only when an INITIATION is accepted.
        """
        out = HandshakeOutput()
        data = bytes(data)
        kind = data[0] if data else None
        if kind is None:
            self.counters["truncated"] += 1
        elif kind == PACKET_INITIATION:
            self._on_initiation(data, address, now, allocate_index, out)
        elif kind == PACKET_RESPONSE:
            self._on_response(data, address, now, out)
        elif kind == PACKET_FINISH:
            self._on_finish(data, address, now, out)
        elif kind == PACKET_COOKIE:
            self._on_cookie(data, address, now, out)
        elif kind == PACKET_VERSION_UNSUPPORTED:
            self._on_version_unsupported(data, address, out)
        else:
            self.counters["unknown_packet_type"] += 1
        return out

    # --- timers ---

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has work, or None."""
        while self._timers and not self._timer_live(self._timers[0]):
            heapq.heappop(self._timers)
        deadlines = [self._timers[0][0]] if self._timers else []
        if self._pending:
            deadlines.append(next(iter(self._pending.values())).expires)
        if self._completed:
            deadlines.append(next(iter(self._completed.values()))[1])
        return min(deadlines, default=None)

    def handle_timer(self, now: float) -> HandshakeOutput:
        """Re-send INITIATION/FINISH that are due, fail dials out of retries, expire state."""
        out = HandshakeOutput()
        while self._timers and self._timers[0][0] <= now:
            entry = heapq.heappop(self._timers)
            if self._timer_live(entry):
                self._retry(entry[2], now, out)
        while self._pending:
            pending = next(iter(self._pending.values()))
            if pending.expires > now:
                break
            self._drop_pending(pending.local_index)
            self.counters["pending_expired"] += 1
        while self._completed:
            index, (_, expires) = next(iter(self._completed.items()))
            if expires > now:
                break
            del self._completed[index]
        return out

    # --- responder internals ---

    def _on_initiation(
        self,
        data: bytes,
        address: Address,
        now: float,
        allocate_index: Callable[[], int],
        out: HandshakeOutput,
    ) -> None:
        if len(data) < 2:
            self.counters["truncated"] += 1
            return
        if data[1] not in SUPPORTED_VERSIONS:
            self._answer_version(data, address, now, out)
            return
        if len(data) < MIN_INITIATION:
            self.counters["initiation_too_short"] += 1
            return
        sender, cookie, message = data[2:6], data[6:22], data[22:]
        key = sender + message[:_KEY]
        known = self._pending_by_initiation.get(key)
        if known is not None:
            # A re-sent INITIATION (our RESPONSE was lost), or the same one over another
            # transport (wire.md §5, first contact): the same answer, no new DH. A copy from
            # a new address spends that address's budget, and only MAX_INITIATION_PATHS
            # addresses are answered, so a captured INITIATION replayed from spoofed sources
            # cannot reflect RESPONSEs at will.
            pending = self._pending[known]
            if address not in pending.addresses:
                if len(pending.addresses) >= MAX_INITIATION_PATHS or not (
                    self._initiation_rate.take(_rate_key(address), now)
                ):
                    self.counters["rate_limited"] += 1
                    return
                pending.addresses.append(address)
            pending.responses += 1
            out.datagrams.append((pending.response, address))
            return
        if not self._admit(sender, cookie, address, now, out):
            return
        noise = HandshakeState("XX", False, self._prologue, s=self._static_key,
                               e=self._random(_KEY))
        try:
            noise.read_message(message)
            reply = noise.write_message(self._payload)
        except HandshakeError:
            self.counters["handshake_failed"] += 1
            return
        if len(self._pending) >= self._max_pending:
            self._drop_pending(next(iter(self._pending)))
            self.counters["pending_evicted"] += 1
        local_index = allocate_index()
        if not 0 < local_index <= 0xFFFFFFFF or self.holds_index(local_index):
            raise UsageError(f"allocate_index returned {local_index}: not a free non-zero u32")
        response = bytes((PACKET_RESPONSE,)) + _U32.pack(local_index) + sender + reply
        pending = _Pending(
            local_index=local_index,
            remote_index=_U32.unpack(sender)[0],
            key=key,
            addresses=[address],
            noise=noise,
            response=response,
            expires=now + HANDSHAKE_TIMEOUT,
            sent_at=now,
        )
        self._pending[local_index] = pending
        self._pending_by_initiation[key] = local_index
        out.datagrams.append((response, address))

    def _admit(
        self, sender: bytes, cookie: bytes, address: Address, now: float, out: HandshakeOutput
    ) -> bool:
        """Decide whether an INITIATION earns a DH now; else answer COOKIE or drop it."""
        rate_key = _rate_key(address)
        if cookie != _ZERO_COOKIE:
            if not any(
                hmac.compare_digest(cookie, self._cookie(secret, address, sender))
                for secret in self._cookie_secrets(now)
            ):
                self.counters["bad_cookie"] += 1
                return False
            if not self._validated_rate.take(rate_key, now):
                self.counters["rate_limited"] += 1
                return False
            return True
        if (
            self._require_cookie
            or len(self._pending) > COOKIE_LOAD_THRESHOLD
            or not self._initiation_rate.take(rate_key, now)
        ):
            secret = self._cookie_secrets(now)[0]
            cookie_packet = bytes((PACKET_COOKIE,)) + sender + self._cookie(secret, address, sender)
            out.datagrams.append((cookie_packet, address))
            self.counters["cookie_sent"] += 1
            return False
        return True

    def _cookie_secrets(self, now: float) -> tuple[bytes, ...]:
        """The current secret first, then the previous one while it is still honoured."""
        if self._secret is None or now - self._secret_born >= COOKIE_ROTATE:
            recent = self._secret is not None and now - self._secret_born < 2 * COOKIE_ROTATE
            self._previous_secret = self._secret if recent else None
            self._secret = self._random(32)
            self._secret_born = now
        if self._previous_secret is None:
            return (self._secret,)
        return (self._secret, self._previous_secret)

    @staticmethod
    def _cookie(secret: bytes, address: Address, sender: bytes) -> bytes:
        """HMAC-SHA256(secret, ip || port || sender_index)[0:16] (wire.md 2.4)."""
        material = _host_bytes(address[0]) + address[1].to_bytes(2, "big") + sender
        return hmac.digest(secret, material, "sha256")[:_COOKIE]

    def _answer_version(
        self, data: bytes, address: Address, now: float, out: HandshakeOutput
    ) -> None:
        if len(data) < 6:
            self.counters["truncated"] += 1
            return
        self.counters["version_unsupported"] += 1
        if not self._reply_rate.take(_rate_key(address), now):
            self.counters["reply_rate_limited"] += 1
            return
        reply = (
            bytes((PACKET_VERSION_UNSUPPORTED,))
            + data[2:6]
            + bytes((len(SUPPORTED_VERSIONS), *SUPPORTED_VERSIONS))
        )
        out.datagrams.append((reply, address))

    def _on_finish(self, data: bytes, address: Address, now: float, out: HandshakeOutput) -> None:
        if len(data) < _FINISH_HEADER:
            self.counters["truncated"] += 1
            return
        index = _U32.unpack_from(data, 1)[0]
        pending = self._pending.get(index)
        if pending is None:
            completed = self._completed.get(index)
            if completed is not None and completed[0] == hashlib.sha256(data).digest():
                self.counters["finish_repeated"] += 1
                out.events.append(FinishRepeated(index, address))
            else:
                self.counters["unknown_handshake"] += 1
            return
        try:
            payload = pending.noise.read_message(data[_FINISH_HEADER:])
        except HandshakeError:
            # Forged or corrupt: the Noise state is unchanged, the real FINISH may follow.
            self.counters["handshake_failed"] += 1
            return
        self._drop_pending(index)
        try:
            identity, frames = _split_finish_payload(payload)
            peer_id, remote = self._authenticate(identity, pending.noise, None)
        except HandshakeError as exc:
            self._refuse(index, address, "handshake_failed", exc, out)
            return
        except _Rejected as rejected:
            self._refuse(index, address, rejected.reason, rejected.error, out)
            return
        if len(self._completed) >= self._max_pending:
            del self._completed[next(iter(self._completed))]
        self._completed[index] = (hashlib.sha256(data).digest(), now + HANDSHAKE_TIMEOUT)
        to_responder, to_initiator = _session_keys(pending.noise)
        out.events.append(
            SessionEstablished(
                peer_id=peer_id,
                local_index=index,
                remote_index=pending.remote_index,
                send_key=to_initiator,
                recv_key=to_responder,
                plaintext=self._plaintext and bool(remote.flags & PLAINTEXT_FLAG),
                aes_gcm=self._aes_gcm and bool(remote.flags & AES_GCM_FLAG),
                address=address,
                initiator=False,
                handshake_hash=pending.noise.handshake_hash,
                frames=frames,
                early_data=pending.early,
                rtt=now - pending.sent_at if pending.responses == 1 else None,
                remote_transports=remote.transport_ids,
            )
        )

    def _refuse(
        self, index: int, address: Address, reason: str, error: MsgnetError, out: HandshakeOutput
    ) -> None:
        self.counters[reason] += 1
        out.events.append(HandshakeFailed(index, None, address, reason, error, initiator=False))

    def _drop_pending(self, index: int) -> None:
        pending = self._pending.pop(index)
        del self._pending_by_initiation[pending.key]

    # --- initiator internals ---

    def _on_response(self, data: bytes, address: Address, now: float, out: HandshakeOutput) -> None:
        if len(data) < _RESPONSE_HEADER:
            self.counters["truncated"] += 1
            return
        remote_index, local_index = struct.unpack_from(">II", data, 1)
        dial = self._dials.get(local_index)
        if dial is None:
            self.counters["unknown_handshake"] += 1
            return
        if dial.phase != _AWAIT_RESPONSE:
            self.counters["duplicate"] += 1
            return
        try:
            payload = dial.noise.read_message(data[_RESPONSE_HEADER:])
        except HandshakeError:
            self.counters["handshake_failed"] += 1
            return
        try:
            peer_id, remote = self._authenticate(payload, dial.noise, dial.peer_id)
        except HandshakeError as exc:
            self._fail(dial, "handshake_failed", exc, out)
            return
        except _Rejected as rejected:
            self._fail(dial, rejected.reason, rejected.error, out)
            return

        budget = self._max_packet - _FINISH_HEADER - _MSG3_OVERHEAD - len(self._finish_prefix)
        frames = dial.take_frames(budget) if dial.take_frames is not None else b""
        if len(frames) > budget:
            raise UsageError(f"take_frames returned {len(frames)} bytes for a budget of {budget}")
        message = dial.noise.write_message(self._finish_prefix + frames)
        to_responder, to_initiator = _session_keys(dial.noise)
        rtt = None if dial.ambiguous else now - dial.last_sent
        dial.packet = bytes((PACKET_FINISH,)) + _U32.pack(remote_index) + message
        dial.phase = _AWAIT_CONFIRM
        dial.address = address
        dial.retries = 0
        dial.interval = HANDSHAKE_INITIAL_RTO if rtt is None else max(2 * rtt, HANDSHAKE_MIN_RETRY)
        self._schedule(dial, now + dial.interval)
        out.datagrams.append((dial.packet, address))
        out.events.append(
            SessionEstablished(
                peer_id=peer_id,
                local_index=local_index,
                remote_index=remote_index,
                send_key=to_responder,
                recv_key=to_initiator,
                plaintext=self._plaintext and bool(remote.flags & PLAINTEXT_FLAG),
                aes_gcm=self._aes_gcm and bool(remote.flags & AES_GCM_FLAG),
                address=address,
                initiator=True,
                handshake_hash=dial.noise.handshake_hash,
                frames=b"",
                early_data=[],
                rtt=rtt,
                remote_transports=remote.transport_ids,
            )
        )

    def _on_cookie(self, data: bytes, address: Address, now: float, out: HandshakeOutput) -> None:
        if len(data) != _COOKIE_PACKET:
            self.counters["truncated"] += 1
            return
        dial = self._dial_awaiting_response(data, address)
        if dial is None:
            return
        if not dial.cookie_welcome:
            self.counters["duplicate"] += 1
            return
        # The cookie is outside the Noise message, so the handshake state is unchanged.
        dial.cookie_welcome = False
        dial.packet = dial.header + data[5:] + dial.message
        dial.last_sent = now
        self.counters["cookie_received"] += 1
        out.datagrams.append((dial.packet, dial.address))

    def _on_version_unsupported(self, data: bytes, address: Address, out: HandshakeOutput) -> None:
        if len(data) < 6 or len(data) != 6 + data[5]:
            self.counters["truncated"] += 1
            return
        dial = self._dial_awaiting_response(data, address)
        if dial is None:
            return
        versions = list(data[6:])
        if PROTOCOL_VERSION in versions:  # contradicts itself: not from a real peer
            self.counters["unknown_handshake"] += 1
            return
        error = PeerUnreachableError(
            f"peer speaks msgnet versions {versions}, not {PROTOCOL_VERSION}"
        )
        self._fail(dial, "version_rejected", error, out)

    def _dial_awaiting_response(self, data: bytes, address: Address) -> _Dial | None:
        """The dial an unauthenticated answer (COOKIE, VERSION_UNSUPPORTED) may act on.

        Only from the address we dialled and before RESPONSE: an off-path
        attacker must guess both the address and our random index.
        """
        dial = self._dials.get(_U32.unpack_from(data, 1)[0])
        if dial is None or dial.phase != _AWAIT_RESPONSE or dial.address != address:
            self.counters["unknown_handshake"] += 1
            return None
        return dial

    def _retry(self, dial: _Dial, now: float, out: HandshakeOutput) -> None:
        if dial.retries >= HANDSHAKE_RETRIES:
            if dial.phase == _AWAIT_RESPONSE:
                reason, what = "timeout", "no RESPONSE"
            else:
                reason, what = "unconfirmed", "FINISH never confirmed"
            error = PeerUnreachableError(f"{what} from {dial.address} after {dial.retries} retries")
            self._fail(dial, reason, error, out)
            return
        dial.retries += 1
        dial.ambiguous = True
        dial.cookie_welcome = True
        dial.last_sent = now
        dial.interval *= 2
        self._schedule(dial, now + dial.interval)
        out.datagrams.append((dial.packet, dial.address))

    def _fail(self, dial: _Dial, reason: str, error: MsgnetError, out: HandshakeOutput) -> None:
        del self._dials[dial.local_index]
        self.counters[reason] += 1
        out.events.append(
            HandshakeFailed(
                dial.local_index, dial.peer_id, dial.address, reason, error, initiator=True
            )
        )

    def _schedule(self, dial: _Dial, deadline: float) -> None:
        dial.deadline = deadline
        heapq.heappush(self._timers, (deadline, next(self._timer_order), dial))

    def _timer_live(self, entry: tuple[float, int, _Dial]) -> bool:
        """A heap entry is stale once its dial is gone or was re-scheduled."""
        deadline, _, dial = entry
        return dial.deadline == deadline and self._dials.get(dial.local_index) is dial

    # --- both roles ---

    def _authenticate(
        self, payload: bytes, noise: HandshakeState, expected: PeerID | None
    ) -> tuple[PeerID, HandshakePayload]:
        """Prove the remote identity: identity_sig must sign the Noise static key.

        Raises HandshakeError (malformed) or _Rejected (bad_signature,
        wrong_peer_id).
        """
        remote = decode_handshake_payload(payload)
        try:
            public = decode_public_key_protobuf(remote.identity_key)
        except UsageError as exc:
            raise HandshakeError(f"unusable identity_key: {exc}") from None
        static = noise.remote_static
        assert static is not None  # messages 2 and 3 carry it, and both decrypted
        if not _identity_proven(public, static, remote.identity_sig):
            raise _Rejected(
                "bad_signature", HandshakeError("identity_sig does not sign the Noise static key")
            )
        peer_id = PeerID.from_public_key(public)
        if expected is not None and not expected.matches_public_key(public):
            raise _Rejected(
                "wrong_peer_id", SecurityError(f"dialled {expected} but {peer_id} answered")
            )
        return peer_id, remote


_proven: dict[bytes, None] = {}


def _identity_proven(public: bytes, static: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is the identity key's signature of the Noise static key.

    A host keeps its static key for its lifetime, so every session with a peer after the
    first (idle expiry, rekey, a restart of our side) presents the same triple: a verified
    one is remembered (at most PROVEN_IDENTITIES, oldest dropped first) and spares the
    Ed25519 verification (~130 us) next time. Only triples that verified are kept, so
    forgeries cannot fill the table, and any other bytes are verified afresh.
    """
    triple = public + static + sig
    if triple in _proven:
        return True
    if not verify_signature(public, SIGNATURE_PREFIX + static, sig):
        return False
    if len(_proven) >= PROVEN_IDENTITIES:
        del _proven[next(iter(_proven))]
    _proven[triple] = None
    return True
