"""Record validation and the bounded stores of records and provider entries.

Validation follows libp2p's ``record.Validator``: a DHT stores opaque values
under namespaced keys (``/<namespace>/...``) and the namespace's validator
decides whether a value is acceptable (``validate``) and which of several is
the current one (``select``).  Without a validator for its namespace a key
is refused, so a DHT never becomes free storage for arbitrary data.

Two namespaces are built in:

* ``/pk/<peer-id multihash>[/<name>]`` holds *signed*, mutable records: a
  DAG-CBOR envelope ``{"seq": int, "sig": bytes, "value": bytes}`` whose
  ``sig`` is the peer's Ed25519 signature of ``b"msgnet-kad-pk-record:" +
  DAG-CBOR({"key": key, "seq": seq, "value": value})``, so only the peer can
  write under its keys, and the highest ``seq`` wins;
* ``/ipld/<CID bytes>`` holds immutable values named by their content: a
  value is valid if its sha2-256 is the CID's multihash.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, Protocol

from ...errors import UsageError
from ...identity import KeyPair, PeerID, verify_signature
from .. import dagcbor
from ..dagcbor import CID, RAW, DagCborError, read_uvarint, sha256_multihash
from .errors import InvalidRecordError, ValueTooLargeError
from .wire import MAX_KEY_SIZE, MAX_VALUE_SIZE

__all__ = [
    "ContentValidator",
    "NamespacedValidator",
    "ProviderStore",
    "PublicKeyValidator",
    "RecordStore",
    "SignedRecord",
    "Validator",
    "content_record",
    "default_validator",
    "format_key",
    "is_immutable",
    "parse_key",
    "parse_pk_key",
    "pk_key",
    "sign_record",
]

_PK_PREFIX = b"/pk/"
_IPLD_PREFIX = b"/ipld/"
_SIGNATURE_DOMAIN = b"msgnet-kad-pk-record:"


class Validator(Protocol):
    """Decides which values the DHT accepts under a key, and which one is current."""

    def validate(self, key: bytes, value: bytes) -> None:
        """Raise InvalidRecordError unless ``value`` is acceptable under ``key``."""

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Index of the best of several valid ``values`` (never empty)."""

    # Optional: ``immutable(key) -> bool``, True when a key has exactly one valid value
    # (content addressing), so that a get may stop at the first valid record; and
    # ``validate_if_immutable(key, value) -> bool``, ``validate`` when ``immutable(key)``
    # (then True), in one call (see NamespacedValidator).


def is_immutable(validator: Validator, key: bytes) -> bool:
    """Whether ``validator`` says ``key`` has a single valid value (see :class:`Validator`)."""
    immutable = getattr(validator, "immutable", None)
    return bool(immutable is not None and immutable(key))


class NamespacedValidator:
    """Dispatches on the key's namespace: ``/<namespace>/...``; unknown namespaces fail."""

    def __init__(self, validators: dict[str, Validator]) -> None:
        self._validators = {ns.encode(): v for ns, v in validators.items()}
        self._immutable = {ns: getattr(v, "immutable", None)
                           for ns, v in self._validators.items()}
        # Namespaces whose every key is immutable: ContentValidator's, asked nothing.
        self._all_immutable = {ns for ns, v in self._validators.items()
                               if getattr(type(v), "immutable", None) is ContentValidator.immutable}

    def _for(self, key: bytes) -> Validator:
        if key[:1] == b"/":
            end = key.find(b"/", 1)
            if end > 1:
                validator = self._validators.get(key[1:end])
                if validator is not None:
                    return validator
        raise InvalidRecordError(f"no validator for the namespace of key {key[:24]!r}")

    def validate(self, key: bytes, value: bytes) -> None:
        self._for(key).validate(key, value)

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        return self._for(key).select(key, values)

    def validate_if_immutable(self, key: bytes, value: bytes) -> bool:
        """:meth:`validate` if ``key`` is :meth:`immutable` (then True), else nothing (False):
        the DHT checks content-addressed records every time (a hash costs less than
        remembering it was checked) and others once; one namespace lookup for both."""
        end = key.find(b"/", 1)
        if key[:1] != b"/" or end <= 1:
            return False
        namespace = key[1:end]
        if namespace in self._all_immutable:
            self._validators[namespace].validate(key, value)
            return True
        immutable = self._immutable.get(namespace)
        if immutable is not None and immutable(key):
            self._validators[namespace].validate(key, value)
            return True
        return False

    def immutable(self, key: bytes) -> bool:
        end = key.find(b"/", 1)
        if key[:1] == b"/" and end > 1:
            immutable = self._immutable.get(key[1:end])
            if immutable is not None:
                return bool(immutable(key))
        return False


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A decoded ``/pk/`` envelope."""

    value: bytes
    seq: int
    signature: bytes


def _signed_bytes(key: bytes, seq: int, value: bytes) -> bytes:
    return _SIGNATURE_DOMAIN + dagcbor.encode({"key": key, "seq": seq, "value": value})


def pk_key(peer_id: PeerID, name: str | bytes = b"") -> bytes:
    """The ``/pk/`` key of ``peer_id``, optionally with a name below it."""
    if isinstance(name, str):
        name = name.encode()
    key = _PK_PREFIX + peer_id.to_bytes() + (b"/" + name if name else b"")
    if len(key) > MAX_KEY_SIZE:
        raise ValueTooLargeError(f"key is {len(key)} bytes (max {MAX_KEY_SIZE})")
    return key


def parse_pk_key(key: bytes) -> PeerID:
    """The peer that owns a ``/pk/`` key (InvalidRecordError if it is not one)."""
    if not key.startswith(_PK_PREFIX):
        raise InvalidRecordError("not a /pk/ key")
    pos = len(_PK_PREFIX)
    try:
        _code, at = read_uvarint(key, pos)
        size, at = read_uvarint(key, at)
        end = at + size
        if end > len(key) or (end < len(key) and key[end:end + 1] != b"/"):
            raise InvalidRecordError("/pk/ key: bad peer ID length")
        return PeerID(key[pos:end])
    except (DagCborError, UsageError) as exc:
        raise InvalidRecordError(f"/pk/ key does not hold a peer ID: {exc}") from None


def format_key(key: bytes) -> str:
    """Text for a key: ``/pk/<base58 peer id>[/<name>]``, ``/ipld/<CID>``, else hex."""
    if key.startswith(_IPLD_PREFIX):
        try:
            return f"/ipld/{CID(key[len(_IPLD_PREFIX):])}"
        except DagCborError:
            return key.hex()
    try:
        peer = parse_pk_key(key)
    except InvalidRecordError:
        return key.hex()
    rest = key[len(_PK_PREFIX) + len(peer.to_bytes()):]
    return f"/pk/{peer}{rest.decode(errors='backslashreplace')}"


def parse_key(text: str) -> bytes:
    """Inverse of :func:`format_key`."""
    try:
        if text.startswith("/pk/"):
            peer_text, _, name = text[len("/pk/"):].partition("/")
            return pk_key(PeerID.from_string(peer_text), name)
        if text.startswith("/ipld/"):
            return _IPLD_PREFIX + bytes(CID.from_string(text[len("/ipld/"):]))
        return bytes.fromhex(text)
    except (UsageError, DagCborError, ValueError) as exc:
        raise InvalidRecordError(
            f"bad key {text!r} (expected /pk/<peer>[/<name>], /ipld/<CID> or hex): {exc}"
        ) from None


def sign_record(keypair: KeyPair, name: str | bytes, value: bytes,
                seq: int | None = None) -> tuple[bytes, bytes]:
    """A signed ``/pk/`` record of ``keypair``'s peer: (key, envelope to put).

    ``seq`` defaults to the time in nanoseconds, so later puts win.  Raises
    ValueTooLargeError when the envelope exceeds MAX_VALUE_SIZE.
    """
    key = pk_key(keypair.peer_id, name)
    if seq is None:
        seq = time.time_ns()
    envelope = dagcbor.encode({"seq": seq, "sig": keypair.sign(_signed_bytes(key, seq, value)),
                               "value": value})
    if len(envelope) > MAX_VALUE_SIZE:
        overhead = len(envelope) - len(value)
        raise ValueTooLargeError(
            f"value of {len(value)} bytes is too large for a signed record "
            f"(max {MAX_VALUE_SIZE - overhead} bytes until reliable QoS lands)")
    return key, envelope


class PublicKeyValidator:
    """``/pk/<peer>[/<name>]``: envelopes signed by the peer's own (inline Ed25519) key."""

    def decode(self, key: bytes, value: bytes) -> SignedRecord:
        """The verified envelope of ``value`` under ``key`` (InvalidRecordError if not)."""
        record = self._parse(key, value)
        public_key = parse_pk_key(key).extract_public_key()
        if public_key is None:
            raise InvalidRecordError("/pk/ keys need an inline Ed25519 peer ID")
        if not verify_signature(public_key, _signed_bytes(key, record.seq, record.value),
                                record.signature):
            raise InvalidRecordError("bad record signature")
        return record

    @staticmethod
    def _parse(key: bytes, value: bytes) -> SignedRecord:
        try:
            body = dagcbor.decode(value)
        except DagCborError as exc:
            raise InvalidRecordError(f"record is not DAG-CBOR: {exc}") from None
        if type(body) is not dict or set(body) != {"seq", "sig", "value"}:
            raise InvalidRecordError("record must be a map of exactly seq, sig and value")
        seq, sig, inner = body["seq"], body["sig"], body["value"]
        if type(seq) is not int or seq < 0 or type(sig) is not bytes or type(inner) is not bytes:
            raise InvalidRecordError("record fields have the wrong types")
        return SignedRecord(inner, seq, sig)

    def validate(self, key: bytes, value: bytes) -> None:
        self.decode(key, value)

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        """Highest ``seq``; ties go to the greatest envelope bytes, so every node agrees.

        ``values`` were validated already, so this only parses them.
        """
        def rank(i: int) -> tuple[int, bytes]:
            return self._parse(key, values[i]).seq, values[i]
        return max(range(len(values)), key=rank)


class ContentValidator:
    """``/ipld/<CID>``: immutable values whose sha2-256 digest is the CID's multihash.

    Anyone may store such a value and no one can forge one, so it needs no
    signature: the cheapest record to validate.
    """

    def validate(self, key: bytes, value: bytes) -> None:
        if not key.startswith(_IPLD_PREFIX):
            raise InvalidRecordError("not an /ipld/ key")
        raw = key[len(_IPLD_PREFIX):]
        if len(raw) == 36 and raw[0] == 1 and raw[1] < 0x80 and raw[2:4] == b"\x12\x20":
            # CIDv1, one-byte codec, sha2-256: the usual form, compared digest to digest
            valid = raw[4:] == hashlib.sha256(value).digest()
        else:
            try:
                valid = CID(raw).multihash == sha256_multihash(value)
            except DagCborError as exc:
                raise InvalidRecordError(f"/ipld/ key does not hold a CID: {exc}") from None
        if not valid:
            raise InvalidRecordError("value does not match the CID's sha2-256 multihash")

    def select(self, key: bytes, values: Sequence[bytes]) -> int:
        return 0  # every valid value for a CID is the same bytes

    def immutable(self, key: bytes) -> bool:
        return True  # the CID names the one value it can hold


def content_record(value: bytes, codec: int = RAW) -> tuple[bytes, bytes]:
    """An ``/ipld/`` record for ``value``: (key, value), the key naming its CIDv1."""
    if len(value) > MAX_VALUE_SIZE:
        raise ValueTooLargeError(
            f"value of {len(value)} bytes exceeds {MAX_VALUE_SIZE} until reliable QoS lands")
    return _IPLD_PREFIX + bytes(CID.of(value, codec)), value


def default_validator() -> NamespacedValidator:
    """Validators for the built-in namespaces: ``/pk/`` (signed) and ``/ipld/`` (by content)."""
    return NamespacedValidator({"pk": PublicKeyValidator(), "ipld": ContentValidator()})


# --- stores -----------------------------------------------------------------------------------


@dataclass(slots=True)
class StoredRecord:
    value: bytes
    owner: PeerID  # who stored it here (counts against that peer's quota)
    expires: float
    reply: bytes | None = None  # the GET_VALUE reply carrying it, once encoded


class _NoRoom(Enum):
    NO_ROOM = 0


# RecordStore.get_if_room: the owner may not store the key.
NO_ROOM: Final = _NoRoom.NO_ROOM


class RecordStore:
    """Values by key, bounded in total and per storing peer; expired lazily and by sweep."""

    def __init__(self, max_records: int, max_per_peer: int) -> None:
        self._records: dict[bytes, StoredRecord] = {}
        self._per_peer: dict[PeerID, int] = {}
        self._max_records = max_records
        self._max_per_peer = max_per_peer

    def get(self, key: bytes, now: float) -> bytes | None:
        record = self.get_record(key, now)
        return None if record is None else record.value

    def get_record(self, key: bytes, now: float) -> StoredRecord | None:
        record = self._records.get(key)
        if record is None:
            return None
        if record.expires <= now:
            self._remove(key)
            return None
        return record

    def get_if_room(self, key: bytes, owner: PeerID, now: float
                    ) -> bytes | None | Literal[_NoRoom.NO_ROOM]:
        """:meth:`get` if ``owner`` may store ``key`` (:meth:`has_room`), else NO_ROOM: what a
        PUT_VALUE asks, in one call."""
        if not self.has_room(key, owner):
            return NO_ROOM
        return self.get(key, now)

    def has_room(self, key: bytes, owner: PeerID, *, exempt: bool = False) -> bool:
        """Whether ``owner`` may store (or replace) ``key``; ``exempt`` skips the per-peer quota."""
        current = self._records.get(key)
        if current is not None:
            return exempt or current.owner == owner or self._per_peer.get(owner, 0) < self._max_per_peer
        if len(self._records) >= self._max_records:
            return False
        return exempt or self._per_peer.get(owner, 0) < self._max_per_peer

    def put(self, key: bytes, value: bytes, owner: PeerID, expires: float) -> None:
        if key in self._records:
            self._remove(key)
        self._records[key] = StoredRecord(value, owner, expires)
        self._per_peer[owner] = self._per_peer.get(owner, 0) + 1

    def expire(self, now: float) -> int:
        dead = [k for k, r in self._records.items() if r.expires <= now]
        for key in dead:
            self._remove(key)
        return len(dead)

    def _remove(self, key: bytes) -> None:
        record = self._records.pop(key)
        left = self._per_peer[record.owner] - 1
        if left:
            self._per_peer[record.owner] = left
        else:
            del self._per_peer[record.owner]

    def __len__(self) -> int:
        return len(self._records)


@dataclass(slots=True)
class ProviderEntry:
    addrs: tuple[bytes, ...]
    expires: float


class ProviderStore:
    """Who provides which multihash: bounded per key (oldest evicted) and in total."""

    def __init__(self, max_per_key: int, max_total: int) -> None:
        self._by_key: dict[bytes, OrderedDict[PeerID, ProviderEntry]] = {}
        self._total = 0
        self._max_per_key = max_per_key
        self._max_total = max_total

    def add(self, key: bytes, peer: PeerID, addrs: tuple[bytes, ...], expires: float) -> bool:
        """Record ``peer`` as a provider of ``key``; False when the store is full."""
        entries = self._by_key.get(key)
        if entries is not None and peer in entries:
            entries[peer] = ProviderEntry(addrs, expires)
            entries.move_to_end(peer)
            return True
        if self._total >= self._max_total:
            return False
        if entries is None:
            entries = self._by_key[key] = OrderedDict()
        if len(entries) >= self._max_per_key:
            entries.popitem(last=False)
            self._total -= 1
        entries[peer] = ProviderEntry(addrs, expires)
        self._total += 1
        return True

    def get(self, key: bytes, now: float, limit: int) -> list[tuple[PeerID, tuple[bytes, ...]]]:
        """Unexpired providers of ``key``, newest first, at most ``limit``."""
        entries = self._by_key.get(key)
        if not entries:
            return []
        found = []
        for peer, entry in reversed(entries.items()):
            if entry.expires > now:
                found.append((peer, entry.addrs))
                if len(found) == limit:
                    break
        return found

    def expire(self, now: float) -> int:
        removed = 0
        for key in list(self._by_key):
            entries = self._by_key[key]
            for peer in [p for p, e in entries.items() if e.expires <= now]:
                del entries[peer]
                removed += 1
            if not entries:
                del self._by_key[key]
        self._total -= removed
        return removed

    def __len__(self) -> int:
        return self._total
