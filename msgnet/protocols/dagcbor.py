"""Strict DAG-CBOR (IPLD) encoding and CIDs, for the protocols built on msgnet.

Why cbor2 and not the pure-Python ``dag-cbor`` package: a Kademlia node
decodes a message per request and reply, and cbor2's C decoder is an order
of magnitude faster on such messages (``python -m benchmarks.bench_kad``,
codec section).  cbor2 is a general CBOR library, so this module makes it
exactly DAG-CBOR (ipld/ipld ``specs/codecs/dag-cbor/spec.md``):

* encoding accepts only the IPLD data model (None, bool, int within
  [-2**64, 2**64-1], finite float, str, bytes, list/tuple, dict with str
  keys, :class:`CID`); maps are sorted length-first, integers and lengths are
  shortest-form, floats are always 64-bit and the only tag is 42 (CID).  The
  encoder is a small hand-written one (a table lookup per head, map layouts
  cached by key set): on protocol-sized messages it is 2-4x faster than
  cbor2's canonical mode, which spends its time sorting keys and calling hooks;
  the tests hold it to cbor2's canonical output byte for byte;
* decoding is cbor2's C decoder, which rejects indefinite lengths and
  duplicate keys itself; the result is re-encoded and must give back the
  exact input bytes.  Any non-canonical form (long integers, half or single
  floats, unsorted keys, any tag but 42, undefined, simple values, bignums,
  shared values) changes the bytes, so one comparison enforces all the
  ordering and minimality rules.
"""

from __future__ import annotations

import base64
import hashlib
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


def _head(major: int, n: int) -> bytes:
    """A CBOR item head in its shortest form: major type (high 3 bits) and argument ``n``."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


# Heads of the common small items, built once: a table lookup beats building bytes.
_SMALL = 2048
_BYTES_HEADS = [_head(0x40, n) for n in range(_SMALL)]
_UINTS = [_head(0x00, n) for n in range(256)]
_LIST_HEADS = [_head(0x80, n) for n in range(256)]
# Map layouts by key tuple: (map head, [(key, encoded key)] in canonical order).
_MAP_PLANS: dict[tuple[Any, ...], tuple[bytes, list[tuple[str, bytes]]]] = {}
_MAX_MAP_PLANS = 1024
_CID_HEAD = b"\xd8\x2a"  # tag 42


def _map_plan(keys: tuple[Any, ...]) -> tuple[bytes, list[tuple[str, bytes]]]:
    plan = _MAP_PLANS.get(keys)
    if plan is None:
        encoded = []
        for key in keys:
            if type(key) is not str:
                raise DagCborError(f"map key {key!r} is not a string")
            try:
                raw = key.encode()
            except UnicodeEncodeError:
                raise DagCborError(f"map key {key!r} is not valid UTF-8") from None
            encoded.append((_head(0x60, len(raw)) + raw, key))
        # Sorting the encoded keys sorts by length first (the head holds the length),
        # then bytewise: DAG-CBOR's order, and RFC 7049's canonical one.
        encoded.sort()
        plan = (_head(0xA0, len(keys)), [(key, enc) for enc, key in encoded])
        if len(_MAP_PLANS) < _MAX_MAP_PLANS and all(len(k) <= 64 for k in keys):
            _MAP_PLANS[keys] = plan
    return plan


def _encode_item(value: Any, out: list[bytes], depth: int) -> None:
    """Append the canonical DAG-CBOR of ``value`` to ``out`` (raise outside the data model).

    Hand-written rather than cbor2's canonical mode: messages are small, and
    cbor2 spends most of its time on map-key sorting and per-item hooks.
    Byte strings, small ints and lists of byte strings (every protocol
    message here) take inline paths.
    """
    kind = type(value)
    if kind is bytes:
        n = len(value)
        out.append(_BYTES_HEADS[n] if n < _SMALL else _head(0x40, n))
        out.append(value)
    elif kind is int:
        if 0 <= value < 256:
            out.append(_UINTS[value])
        elif value >= 0:
            if value > _INT_MAX:
                raise DagCborError(f"integer {value} does not fit 64 bits")
            out.append(_head(0x00, value))
        else:
            if value < _INT_MIN:
                raise DagCborError(f"integer {value} does not fit 64 bits")
            out.append(_head(0x20, -1 - value))
    elif kind is dict:
        if depth >= _MAX_DEPTH:
            raise DagCborError(f"nesting deeper than {_MAX_DEPTH}")
        head, plan = _map_plan(tuple(value))
        out.append(head)
        for key, encoded_key in plan:
            out.append(encoded_key)
            item = value[key]
            if type(item) is bytes and len(item) < _SMALL:
                out.append(_BYTES_HEADS[len(item)])
                out.append(item)
            else:
                _encode_item(item, out, depth + 1)
    elif kind is list or kind is tuple:
        if depth >= _MAX_DEPTH:
            raise DagCborError(f"nesting deeper than {_MAX_DEPTH}")
        n = len(value)
        out.append(_LIST_HEADS[n] if n < 256 else _head(0x80, n))
        for item in value:
            if type(item) is bytes and len(item) < _SMALL:
                out.append(_BYTES_HEADS[len(item)])
                out.append(item)
            else:
                _encode_item(item, out, depth + 1)
    elif kind is str:
        try:
            raw = value.encode()
        except UnicodeEncodeError:
            raise DagCborError("string is not valid UTF-8") from None
        out.append(_head(0x60, len(raw)))
        out.append(raw)
    elif value is True:
        out.append(b"\xf5")
    elif value is False:
        out.append(b"\xf4")
    elif value is None:
        out.append(b"\xf6")
    elif kind is float:
        if not math.isfinite(value):
            raise DagCborError("NaN and infinities are not allowed in DAG-CBOR")
        out.append(b"\xfb" + struct.pack(">d", value))  # always 64-bit in DAG-CBOR
    elif kind is CID:
        raw = b"\x00" + bytes(value)
        out.append(_CID_HEAD)
        out.append(_head(0x40, len(raw)))
        out.append(raw)
    else:
        raise DagCborError(f"{kind.__name__} is not in the IPLD data model")


def encode(value: Any) -> bytes:
    """Encode ``value`` as strict DAG-CBOR (raises DagCborError outside the data model)."""
    out: list[bytes] = []
    _encode_item(value, out, 0)
    return b"".join(out)


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
