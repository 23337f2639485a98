"""Strict DAG-CBOR (IPLD) encoding and CIDs, for the protocols built on msgnet.

Why cbor2 and not the pure-Python ``dag-cbor`` package: a Kademlia node
encodes and decodes a message per request, and cbor2's C codec is an order
of magnitude faster on such messages (see ``benchmarks/bench_kad.py
--codec``).  cbor2 is a general CBOR library, so this module makes it
exactly DAG-CBOR (ipld/ipld ``specs/codecs/dag-cbor/spec.md``):

* encoding accepts only the IPLD data model (None, bool, int within
  [-2**64, 2**64-1], finite float, str, bytes, list/tuple, dict with str
  keys, :class:`CID`); maps are sorted length-first, integers and lengths are
  shortest-form, floats are always 64-bit and the only tag is 42 (CID);
* decoding rejects indefinite lengths and duplicate keys in cbor2 itself,
  then re-encodes the result and requires the exact input bytes back.  Any
  non-canonical form (long integers, half or single floats, unsorted keys,
  any tag but 42, undefined, simple values, bignums) changes the bytes, so
  one comparison enforces all the ordering and minimality rules at C speed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import struct
from typing import Any

import cbor2

__all__ = [
    "CID",
    "DAG_CBOR",
    "RAW",
    "SHA2_256",
    "DagCborError",
    "check_multihash",
    "decode",
    "encode",
    "encode_uvarint",
    "read_uvarint",
    "sha256_multihash",
]

DAG_CBOR = 0x71
RAW = 0x55
SHA2_256 = 0x12
_IDENTITY = 0x00
_CID_TAG = 42
_INT_MIN = -(1 << 64)
_INT_MAX = (1 << 64) - 1
_MAX_DEPTH = 64
_MAX_VARINT_BYTES = 9
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_MAX_CID_TEXT = 512  # bounds the quadratic base58 decode of hostile text


class DagCborError(ValueError):
    """Bytes that are not strict DAG-CBOR, or a value outside the IPLD data model."""


# --- multiformats helpers ---------------------------------------------------------------


def encode_uvarint(value: int) -> bytes:
    """Multiformats unsigned varint of a non-negative ``value``."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a minimal unsigned varint at ``pos``: (value, next position).

    Multiformats rules: at most 9 bytes, no redundant trailing zero groups.
    """
    value = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise DagCborError("truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise DagCborError("non-minimal varint")
            return value, pos + i + 1
        shift += 7
    raise DagCborError("varint longer than 9 bytes")


def sha256_multihash(data: bytes) -> bytes:
    """The sha2-256 multihash (0x12 0x20 || digest) of ``data``."""
    return b"\x12\x20" + hashlib.sha256(data).digest()


def check_multihash(mh: bytes) -> bytes:
    """Return ``mh`` if it is one well-formed multihash (code, length, digest), else raise."""
    _code, pos = read_uvarint(mh, 0)
    length, pos = read_uvarint(mh, pos)
    if len(mh) - pos != length:
        raise DagCborError(f"multihash declares {length} digest bytes but holds {len(mh) - pos}")
    return mh


def _b58decode(text: str) -> bytes:
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise DagCborError(f"invalid base58btc character {c!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    return b"\x00" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58[rem])
    zeros = len(data) - len(data.lstrip(b"\x00"))
    return "1" * zeros + "".join(reversed(out))


class CID:
    """A content identifier: CIDv0 (a bare sha2-256 multihash) or CIDv1.

    Kept as its binary form, which is what DAG-CBOR carries (tag 42, with a
    0x00 multibase prefix) and what the DHT hashes; the text form is only
    for people.
    """

    __slots__ = ("_bytes", "_codec", "_multihash", "_version")

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if len(data) == 34 and data[:2] == b"\x12\x20":
            self._version, self._codec, self._multihash = 0, 0x70, data  # dag-pb implied
        else:
            version, pos = read_uvarint(data, 0)
            if version != 1:
                raise DagCborError(f"unsupported CID version {version}")
            self._codec, pos = read_uvarint(data, pos)
            self._version = 1
            self._multihash = check_multihash(data[pos:])
        self._bytes = data

    @classmethod
    def v1(cls, codec: int, multihash: bytes) -> CID:
        return cls(encode_uvarint(1) + encode_uvarint(codec) + check_multihash(multihash))

    @classmethod
    def of(cls, data: bytes, codec: int = RAW) -> CID:
        """The CIDv1 (sha2-256) of ``data`` under ``codec``."""
        return cls.v1(codec, sha256_multihash(data))

    @classmethod
    def from_string(cls, text: str) -> CID:
        """Parse CIDv0 ("Qm...") or multibase base32 ("b...") / base58btc ("z...") CIDv1."""
        if not text or len(text) > _MAX_CID_TEXT:
            raise DagCborError("CID text is empty or too long")
        if len(text) == 46 and text.startswith("Qm"):
            return cls(_b58decode(text))
        if text[0] == "b":
            body = text[1:].upper()
            try:
                data = base64.b32decode(body + "=" * (-len(body) % 8))
            except ValueError:
                raise DagCborError(f"invalid base32 in CID {text!r}") from None
        elif text[0] == "z":
            data = _b58decode(text[1:])
        else:
            raise DagCborError(f"unsupported CID text {text!r} (expected Qm..., b... or z...)")
        cid = cls(data)
        if cid.version == 0:
            raise DagCborError("a CIDv0 must be written in base58btc without a multibase prefix")
        return cid

    @property
    def version(self) -> int:
        return self._version

    @property
    def codec(self) -> int:
        return self._codec

    @property
    def multihash(self) -> bytes:
        return self._multihash

    def __bytes__(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        if self._version == 0:
            return _b58encode(self._bytes)
        return "b" + base64.b32encode(self._bytes).decode("ascii").lower().rstrip("=")

    def __repr__(self) -> str:
        return f"CID({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CID) and self._bytes == other._bytes

    def __hash__(self) -> int:
        return hash(self._bytes)


# --- the codec ----------------------------------------------------------------------------


def _encode_float(encoder: cbor2.CBOREncoder, value: float) -> None:
    # cbor2's canonical mode shortens floats; DAG-CBOR wants all of them 64-bit.
    encoder.write(b"\xfb" + struct.pack(">d", value))


def _encode_cid(encoder: cbor2.CBOREncoder, value: Any) -> None:
    if not isinstance(value, CID):
        raise DagCborError(f"{type(value).__name__} is not in the IPLD data model")
    encoder.encode_semantic(_CID_TAG, b"\x00" + bytes(value))


def _check(value: Any, depth: int) -> bool:
    """Reject anything outside the IPLD data model (cbor2 would happily tag it).

    Returns whether ``value`` holds a float, so that float-free values (all of
    msgnet's protocol messages) skip cbor2's per-item hook lookups.
    """
    kind = type(value)
    if kind is bytes or kind is str or kind is bool or value is None or kind is CID:
        return False
    if kind is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise DagCborError(f"integer {value} does not fit 64 bits")
        return False
    if kind is float:
        if not math.isfinite(value):
            raise DagCborError("NaN and infinities are not allowed in DAG-CBOR")
        return True
    if depth >= _MAX_DEPTH:
        raise DagCborError(f"nesting deeper than {_MAX_DEPTH}")
    floats = False
    if kind is list or kind is tuple:
        for item in value:
            # Inline the common leaves: a call per item would double the cost.
            if type(item) is not bytes and type(item) is not str and _check(item, depth + 1):
                floats = True
        return floats
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise DagCborError(f"map key {key!r} is not a string")
            if type(item) is not bytes and type(item) is not str and _check(item, depth + 1):
                floats = True
        return floats
    raise DagCborError(f"{kind.__name__} is not in the IPLD data model")


# Canonical mode sorts map keys by their encoding, which for string keys is
# DAG-CBOR's length-first order.  Encoders are reused: building one per call
# costs more than encoding a small message.
_ENCODER = cbor2.CBOREncoder(io.BytesIO(), canonical=True, default=_encode_cid)
_FLOAT_ENCODER = cbor2.CBOREncoder(io.BytesIO(), canonical=True, default=_encode_cid,
                                   encoders={float: _encode_float})


def encode(value: Any) -> bytes:
    """Encode ``value`` as strict DAG-CBOR (raises DagCborError outside the data model)."""
    encoder = _FLOAT_ENCODER if _check(value, 0) else _ENCODER
    try:
        return encoder.encode_to_bytes(value)
    except cbor2.CBOREncodeError as exc:
        raise DagCborError(str(exc)) from None


def _decode_tag(tag: cbor2.CBORTag, _immutable: bool) -> CID:
    if tag.tag != _CID_TAG:
        raise DagCborError(f"tag {tag.tag} is not allowed in DAG-CBOR (only 42)")
    data = tag.value
    if type(data) is not bytes or data[:1] != b"\x00":
        raise DagCborError("tag 42 must hold bytes with a 0x00 multibase prefix")
    return CID(data[1:])


def decode(data: bytes) -> Any:
    """Decode one strict DAG-CBOR item; raises DagCborError on anything else.

    Trailing bytes, indefinite lengths, duplicate keys and every
    non-canonical form are rejected (the last by re-encoding, see the
    module docstring).
    """
    data = bytes(data)
    try:
        value = cbor2.loads(data, tag_hook=_decode_tag, allow_indefinite=False,
                            allow_duplicate_keys=False, max_depth=_MAX_DEPTH)
    except DagCborError:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        cause = exc.__cause__
        if isinstance(cause, DagCborError):
            raise cause from None
        raise DagCborError(f"invalid CBOR: {exc}") from None
    if encode(value) != data:
        raise DagCborError("not canonical DAG-CBOR (re-encoding differs from the input)")
    return value
