"""Ed25519 identities and libp2p peer IDs.

Peer IDs follow libp2p/specs peer-ids/peer-ids.md: the multihash of the
deterministic protobuf ``PublicKey{Type=Ed25519, Data=raw32}``.  Ed25519 keys
are short enough to be inlined with the identity multihash, so the peer ID
carries the public key and a remote can be authenticated from its ID alone.
Legacy sha2-256 peer IDs ("Qm...") parse too, but cannot yield a key.

All cryptography goes through the ``cryptography`` package; only the text
encodings (base58btc, base32) are implemented here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from msgnet.errors import SecurityError, UsageError

__all__ = [
    "KeyPair",
    "PeerID",
    "encode_public_key_protobuf",
    "decode_public_key_protobuf",
    "verify_signature",
]

# Protobuf prefix of a libp2p key message: field 1 (Type) = 1 (Ed25519),
# field 2 (Data) with a one-byte length.  libp2p requires this exact
# deterministic encoding, so anything else is rejected rather than parsed.
_ED25519_PREFIX = b"\x08\x01\x12"
_KEY_LEN = 32
_SIG_LEN = 64

_MH_IDENTITY = 0x00
_MH_SHA2_256 = 0x12
_CID_V1 = 0x01
_CODEC_LIBP2P_KEY = 0x72
_CID_PREFIX = bytes((_CID_V1, _CODEC_LIBP2P_KEY))
# Real peer ID strings are under 64 chars; the cap bounds the quadratic
# base58 decode of hostile input.
_MAX_PEER_ID_TEXT = 256

# A key file holds at most a 68-byte protobuf; a cap keeps load() from
# reading an arbitrarily large file by mistake.
_MAX_KEY_FILE = 4096


def encode_public_key_protobuf(raw32: bytes) -> bytes:
    """Serialize a raw Ed25519 public key as a libp2p PublicKey protobuf."""
    raw32 = bytes(raw32)
    if len(raw32) != _KEY_LEN:
        raise UsageError(f"Ed25519 public key must be {_KEY_LEN} bytes, got {len(raw32)}")
    return _ED25519_PREFIX + bytes((_KEY_LEN,)) + raw32


def decode_public_key_protobuf(data: bytes) -> bytes:
    """Return the raw key of a libp2p Ed25519 PublicKey protobuf.

    Strict: only the exact 36-byte deterministic Ed25519 form is accepted.
    Raises UsageError; code handling remote input wraps it as it sees fit.
    """
    data = bytes(data)
    if len(data) < 2 or data[0] != 0x08:
        raise UsageError("public key protobuf must start with the key type field (0x08)")
    if data[1] != 0x01:
        raise UsageError(f"unsupported key type {data[1]} in public key protobuf (only Ed25519=1)")
    if len(data) < 4 or data[2] != 0x12 or data[3] != _KEY_LEN:
        raise UsageError("public key protobuf must carry a 32-byte data field right after the type")
    if len(data) != 4 + _KEY_LEN:
        raise UsageError(
            f"public key protobuf must be {4 + _KEY_LEN} bytes, got {len(data)}"
        )
    return data[4:]


def verify_signature(public_raw32: bytes, data: bytes, sig: bytes) -> bool:
    """Check an Ed25519 signature; False (never an exception) for any bad input.

    Key and signature usually come from the network, so a malformed one is
    just a failed verification.
    """
    if len(public_raw32) != _KEY_LEN or len(sig) != _SIG_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_raw32)).verify(bytes(sig), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


# --- text encodings -------------------------------------------------------

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise UsageError(f"invalid base58btc character {c!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x00" * zeros + body


def _b32encode(data: bytes) -> str:
    """RFC 4648 base32, lowercase, unpadded (multibase 'b')."""
    return base64.b32encode(data).decode("ascii").lower().rstrip("=")


def _b32decode(text: str) -> bytes:
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        data = base64.b32decode(padded)
    except (binascii.Error, ValueError):
        raise UsageError("invalid base32 text") from None
    # Re-encoding rejects uppercase, bad lengths and non-zero trailing bits,
    # so each peer ID has exactly one accepted base32 spelling.
    if _b32encode(data) != text:
        raise UsageError("invalid or non-canonical base32 text")
    return data


# --- PeerID ---------------------------------------------------------------

# Recent PeerIDs by their multihash (plain bytes keys): PeerID(same bytes) is the same object.
_INTERNED: dict[bytes, PeerID] = {}
_MAX_INTERNED = 16384


class PeerID(bytes):
    """A libp2p peer ID: immutable, hashable, ordered by its multihash bytes.

    It is the multihash itself, as a ``bytes`` subclass: hashing it, which every dict and set
    of peers does on every message, then runs in C. It equals other PeerIDs with the same
    bytes, never plain bytes.
    """

    __slots__ = ()

    def __new__(cls, multihash: bytes) -> PeerID:
        """Validate and wrap multihash bytes (identity/Ed25519 or sha2-256).

        The same bytes give the same object while it is in a bounded table of recent
        IDs: dicts of peers then find their keys by identity, without a Python-level
        ``__eq__`` (the handshake, the routing table and the DHT's replies all name the
        same peers).
        """
        if type(multihash) is PeerID and cls is PeerID:
            return multihash
        if not isinstance(multihash, (bytes, bytearray, memoryview)):
            raise UsageError(f"PeerID needs multihash bytes, got {type(multihash).__name__}")
        mh = bytes(multihash)
        if cls is PeerID:
            known = _INTERNED.get(mh)
            if known is not None:
                return known
        if len(mh) < 2:
            raise UsageError("peer ID multihash is truncated")
        code, length, digest = mh[0], mh[1], mh[2:]
        if code == _MH_IDENTITY:
            if length != len(digest):
                raise UsageError(
                    f"identity multihash declares {length} bytes but holds {len(digest)}"
                )
            decode_public_key_protobuf(digest)
        elif code == _MH_SHA2_256:
            if length != 32 or len(digest) != 32:
                raise UsageError("sha2-256 peer ID multihash must hold exactly 32 bytes")
        else:
            raise UsageError(
                f"unsupported multihash code 0x{code:02x} for a peer ID (identity or sha2-256)"
            )
        peer = super().__new__(cls, mh)
        if cls is PeerID:
            if len(_INTERNED) >= _MAX_INTERNED:  # IDs from the network are unbounded
                _INTERNED.clear()
            _INTERNED[mh] = peer
        return peer

    @classmethod
    def from_public_key(cls, raw32: bytes) -> PeerID:
        """The (inlined, identity-multihash) peer ID of an Ed25519 public key."""
        proto = encode_public_key_protobuf(raw32)
        return cls(bytes((_MH_IDENTITY, len(proto))) + proto)

    @classmethod
    def from_string(cls, text: str) -> PeerID:
        """Parse base58btc ("12D3Koo...", "Qm...") or CIDv1 text ("bafz...")."""
        if not isinstance(text, str):
            raise UsageError(f"peer ID text must be str, got {type(text).__name__}")
        if not text:
            raise UsageError("empty peer ID string")
        if len(text) > _MAX_PEER_ID_TEXT:
            raise UsageError(f"peer ID string too long ({len(text)} > {_MAX_PEER_ID_TEXT} chars)")
        try:
            if text.startswith(("1", "Qm")):
                return cls(_b58decode(text))
            if text[0] == "b":
                cid = _b32decode(text[1:])
            elif text[0] == "z":
                cid = _b58decode(text[1:])
            else:
                raise UsageError(
                    f"unsupported multibase prefix {text[0]!r} "
                    "(expected base32 'b' or base58btc 'z')"
                )
            if cid[:2] != _CID_PREFIX:
                raise UsageError("CID is not a CIDv1 with the libp2p-key (0x72) codec")
            return cls(cid[2:])
        except UsageError as exc:
            raise UsageError(f"invalid peer ID {text!r}: {exc}") from None

    def to_bytes(self) -> bytes:
        """The multihash bytes (the binary form used on the wire), as plain bytes."""
        return bytes(self)

    def to_base58(self) -> str:
        return _b58encode(bytes(self))

    def to_cid_string(self) -> str:
        """CIDv1 text: multibase base32 of 0x01 0x72 || multihash."""
        return "b" + _b32encode(_CID_PREFIX + self)

    def extract_public_key(self) -> bytes | None:
        """The raw Ed25519 key for inlined IDs; None for sha2-256 IDs."""
        if self[0] != _MH_IDENTITY:
            return None
        return decode_public_key_protobuf(self[2:])

    def matches_public_key(self, raw32: bytes) -> bool:
        """Whether this ID was derived from ``raw32`` (either multihash form)."""
        proto = encode_public_key_protobuf(raw32)
        if self[0] == _MH_IDENTITY:
            return self[2:] == proto
        return self[2:] == hashlib.sha256(proto).digest()

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerID({self.to_base58()!r})"

    __hash__ = bytes.__hash__  # C, not a Python method: what makes dicts of peers cheap

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PeerID):
            return bytes.__eq__(self, other)
        if isinstance(other, (bytes, bytearray, memoryview)):
            return False  # bytes' own comparison would say equal
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __reduce__(self) -> tuple[type[PeerID], tuple[bytes]]:
        return (PeerID, (bytes(self),))


# --- KeyPair --------------------------------------------------------------


class KeyPair:
    """An Ed25519 identity: signs for this host and names it by its PeerID."""

    __slots__ = ("_private", "_public_raw", "_peer_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = PeerID.from_public_key(self._public_raw)

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed32: bytes) -> KeyPair:
        """Rebuild a key pair from its 32-byte Ed25519 seed (private key)."""
        seed32 = bytes(seed32)
        if len(seed32) != _KEY_LEN:
            raise UsageError(f"Ed25519 seed must be {_KEY_LEN} bytes, got {len(seed32)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed32))

    @property
    def public_key_bytes(self) -> bytes:
        return self._public_raw

    @property
    def private_seed(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def peer_id(self) -> PeerID:
        return self._peer_id

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        return self._private.sign(bytes(data))

    def to_protobuf(self) -> bytes:
        """libp2p PrivateKey protobuf, py-libp2p layout: 08 01 12 20 || seed."""
        return _ED25519_PREFIX + bytes((_KEY_LEN,)) + self.private_seed

    @classmethod
    def from_protobuf(cls, data: bytes) -> KeyPair:
        """Parse a libp2p Ed25519 PrivateKey protobuf.

        Accepts py-libp2p's 32-byte seed form and the go/rust-libp2p 64-byte
        seed || public key form (whose public half must match the seed).
        """
        data = bytes(data)
        if data[:3] != _ED25519_PREFIX or len(data) < 4:
            raise UsageError("not a libp2p Ed25519 private key protobuf (expected 08 01 12 ...)")
        size = data[3]
        if size not in (_KEY_LEN, 2 * _KEY_LEN):
            raise UsageError(f"Ed25519 private key data must be 32 or 64 bytes, got {size}")
        if len(data) != 4 + size:
            raise UsageError(
                f"private key protobuf must be {4 + size} bytes, got {len(data)}"
            )
        pair = cls.from_seed(data[4 : 4 + _KEY_LEN])
        if size == 2 * _KEY_LEN and data[4 + _KEY_LEN :] != pair.public_key_bytes:
            raise UsageError("private key protobuf: public half does not match the seed")
        return pair

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key protobuf atomically, readable by the owner only."""
        target = Path(path)
        # mkstemp creates the file with mode 0600 whatever the umask.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_protobuf())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read a key file written by :meth:`save` (or by py/go-libp2p).

        Raises SecurityError if group or others may access the file (on POSIX)
        and UsageError if its content is not a valid Ed25519 private key.
        OSError (e.g. FileNotFoundError) propagates unchanged.
        """
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise SecurityError(
                    f"key file {os.fspath(path)!r} has mode {stat.S_IMODE(mode):04o}; "
                    "it must not be accessible by group or others (chmod 600)"
                )
            data = f.read(_MAX_KEY_FILE + 1)
        if len(data) > _MAX_KEY_FILE:
            raise UsageError(f"key file {os.fspath(path)!r} is too large to be a key")
        try:
            return cls.from_protobuf(data)
        except UsageError as exc:
            raise UsageError(f"bad key file {os.fspath(path)!r}: {exc}") from None

    def __repr__(self) -> str:
        return f"KeyPair(peer_id={self._peer_id!r})"
