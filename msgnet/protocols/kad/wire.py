"""Kademlia messages on msgnet: DAG-CBOR maps that each fit one datagram.

libp2p's Kad-DHT sends one protobuf per stream and lets replies grow to
megabytes; msgnet messages are datagrams, so every limit here exists to keep
a request or a reply within :data:`MAX_MESSAGE` bytes (what one datagram
carries today with room for the frame headers):

* peer lists (FIND_NODE, GET_VALUE, GET_PROVIDERS) are split into *pages*:
  the reply to page ``n`` says how many ``pages`` there are and the
  requester fetches the rest.  A responder never drops a peer to make a
  reply fit, and a requester rejects a reply that claims more than the
  limits below instead of truncating it;
* values are capped at :data:`MAX_VALUE_SIZE` bytes until msgnet's
  reliable QoS can carry larger messages (puts beyond that fail with
  :class:`~msgnet.protocols.kad.errors.ValueTooLargeError`).

Messages (DAG-CBOR maps; types numbered as libp2p's; fields not listed are
ignored, so later versions can add some)::

    request  {"type": t, "key": bytes, "page"?: int, "addrs"?: [maddr],
              "value"?: bytes (PUT_VALUE), "provider"?: [maddr] (ADD_PROVIDER)}
    reply    {"type": t, "page": int, "pages": int,           (paged types)
              "closer": [maddr], "providers": [maddr],
              "value"?: bytes (GET_VALUE, page 0), "ok"?: bool, "error"?: str}

``key`` is a namespaced record key (``/pk/...``, ``/ipld/...``) for the
value RPCs, a multihash for the provider RPCs, any bytes for FIND_NODE (a
peer's multihash to find it); PING has no key.  ``maddr`` is a binary
multiaddr ending in ``/p2p/<peer-id>``, so a reply names both who a peer is
and where to reach it, and addresses a sender gives for itself (``addrs``,
sent by DHT servers so that others add them to their tables) must name the
peer its session proved.  The peers of a reply are a set: their order means
nothing (the requester sorts them by distance to the key itself).

Decoding is strict DAG-CBOR (:mod:`msgnet.protocols.dagcbor`).  The requests
a node receives all the time (FIND_NODE, GET_*, PUT_VALUE) and GET_VALUE
replies with a value are first matched against their one canonical form and
read directly; anything else, including every non-canonical variant, goes
through the generic decoder, which accepts or rejects it as it always did.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from multiaddr import Multiaddr

from ...errors import UsageError
from ...identity import PeerID
from .. import dagcbor
from ..dagcbor import DagCborError, read_uvarint
from .errors import MalformedMessageError

__all__ = [
    "MAX_ADDRS_PER_PEER",
    "MAX_ADDR_SIZE",
    "MAX_KEY_SIZE",
    "MAX_MESSAGE",
    "MAX_PAGES",
    "MAX_PEERS_PER_REPLY",
    "MAX_PROVIDERS_PER_REPLY",
    "MAX_VALUE_SIZE",
    "PROTOCOL",
    "MessageType",
    "PeerInfo",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_closer_page",
    "encode_reply_page",
    "encode_request",
    "encode_value_reply",
    "peer_of_addr",
    "peers_from_addrs",
]

PROTOCOL = "/msgnet/kad/1.0.0"

# One encoded message (request or reply page).  A 1200-byte datagram carries
# 1164 payload bytes today; the rest is headroom for the protocol id of a
# session's first message and for the reliable QoS headers being added.
MAX_MESSAGE = 1100
# Record keys: "/pk/" + a 38-byte peer ID + "/" + a name of up to 57 bytes.
MAX_KEY_SIZE = 100
# Stored values (for /pk records: the signed envelope).  MAX_MESSAGE less a
# PUT_VALUE request's key and map overhead; see the module docstring.
MAX_VALUE_SIZE = 960
# One binary multiaddr: room for /dns4/<name of ~40 chars>/udp/N/p2p/<id>.
MAX_ADDR_SIZE = 96
# A peer is advertised with at most its first (newest) addresses.
MAX_ADDRS_PER_PEER = 4
# Enough pages for k closer peers and MAX_PROVIDERS_PER_REPLY providers with
# MAX_ADDRS_PER_PEER addresses of MAX_ADDR_SIZE bytes each.
MAX_PAGES = 16
# k: the closer peers one reply may name (a node's k may be smaller, not larger).
MAX_PEERS_PER_REPLY = 20
MAX_PROVIDERS_PER_REPLY = 20

# Multiaddr protocol codes (multiformats/multiaddr protocols.csv).
_IP4, _IP6, _DNS, _DNS4, _DNS6 = 4, 41, 53, 54, 55
_UDP, _TCP, _P2P = 273, 6, 421
_FIXED_HOST = {_IP4: 4, _IP6: 16}
_NAMED_HOST = {_DNS, _DNS4, _DNS6}
_MAX_DNS_NAME = 253


class MessageType(IntEnum):
    """Message types, numbered as in libp2p's Kad-DHT protobuf."""

    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


_PAGED = frozenset({MessageType.FIND_NODE, MessageType.GET_VALUE, MessageType.GET_PROVIDERS})
_TYPES = {int(t): t for t in MessageType}


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer and its binary multiaddrs (each ending in ``/p2p/<peer_id>``)."""

    peer_id: PeerID
    addrs: tuple[bytes, ...] = ()

    def multiaddrs(self) -> list[Multiaddr]:
        return [Multiaddr(a) for a in self.addrs]


# Replies name the same peers over and over: parsed addresses are remembered,
# with one PeerID object per peer (interned), so that the peers of a reply can be
# told apart by identity.  The three tables are cleared together when full.
_ADDR_CACHE: dict[bytes, PeerID] = {}
_INFO_CACHE: dict[bytes, PeerInfo] = {}
_PEERS: dict[bytes, PeerID] = {}
_ADDR_CACHE_SIZE = 8192


def _make_room(count: int) -> None:
    if len(_ADDR_CACHE) + count > _ADDR_CACHE_SIZE or len(_PEERS) + count > _ADDR_CACHE_SIZE:
        _ADDR_CACHE.clear()
        _INFO_CACHE.clear()
        _PEERS.clear()


def peer_of_addr(data: bytes) -> PeerID:
    """The peer named by a binary multiaddr ``/ip4|ip6|dns*/.../udp|tcp/N/p2p/<id>``.

    A hand-rolled parse: the ``multiaddr`` package needs ~150 us per address
    and a reply carries up to dozens, while this walks the bytes once (and a
    bounded cache skips even that for addresses seen before).  Raises
    MalformedMessageError for anything else.
    """
    peer = _ADDR_CACHE.get(data)
    if peer is None:
        _make_room(1)
        mh = _parse_peer_addr(data)
        peer = _PEERS.get(mh)
        if peer is None:
            try:
                peer = _PEERS[mh] = PeerID(mh)
            except UsageError as exc:
                raise MalformedMessageError(f"bad multiaddr: {exc}") from None
        _ADDR_CACHE[data] = peer
    return peer


def _info_of_addr(data: bytes) -> PeerInfo:
    info = _INFO_CACHE.get(data)
    if info is None:
        info = _INFO_CACHE[data] = PeerInfo(peer_of_addr(data), (data,))
    return info


def _parse_peer_addr(data: bytes) -> bytes:
    """The ``/p2p/`` multihash of a binary multiaddr (checked as a PeerID by the caller)."""
    try:
        if len(data) > MAX_ADDR_SIZE:
            raise MalformedMessageError(f"multiaddr longer than {MAX_ADDR_SIZE} bytes")
        code, pos = read_uvarint(data, 0)
        if code in _FIXED_HOST:
            pos += _FIXED_HOST[code]
        elif code in _NAMED_HOST:
            size, pos = read_uvarint(data, pos)
            if not 0 < size <= _MAX_DNS_NAME:
                raise MalformedMessageError("bad DNS name length in multiaddr")
            pos += size
        else:
            raise MalformedMessageError(f"multiaddr starts with unsupported protocol {code}")
        code, pos = read_uvarint(data, pos)
        if code not in (_UDP, _TCP):
            raise MalformedMessageError(f"multiaddr transport {code} is not udp or tcp")
        pos += 2
        code, pos = read_uvarint(data, pos)
        if code != _P2P:
            raise MalformedMessageError("multiaddr does not end in /p2p/<peer-id>")
        size, pos = read_uvarint(data, pos)
        if pos + size != len(data):
            raise MalformedMessageError("multiaddr /p2p part has the wrong length")
        return data[pos:]
    except DagCborError as exc:
        raise MalformedMessageError(f"bad multiaddr: {exc}") from None


def peers_from_addrs(addrs: Sequence[bytes], limit: int) -> list[PeerInfo]:
    """Group a flat list of ``/p2p/`` multiaddrs into peers (first-seen order).

    At most ``limit`` peers and MAX_ADDRS_PER_PEER addresses per peer: more
    is a malformed reply, never silently cut.
    """
    if not addrs:
        return []
    _make_room(len(addrs))  # no clearing below: the PeerIDs stay comparable by identity
    cached = _INFO_CACHE.get
    infos = [cached(a) or _info_of_addr(a) for a in addrs]
    if len(infos) <= limit and len({id(i.peer_id) for i in infos}) == len(infos):
        return infos  # one address per peer, the usual case
    by_peer: dict[PeerID, list[bytes]] = {}
    for info in infos:
        known = by_peer.setdefault(info.peer_id, [])
        addr = info.addrs[0]
        if addr in known:
            continue
        if len(known) == MAX_ADDRS_PER_PEER:
            raise MalformedMessageError(f"more than {MAX_ADDRS_PER_PEER} addresses for a peer")
        known.append(addr)
        if len(by_peer) > limit:
            raise MalformedMessageError(f"more than {limit} peers in a reply")
    return [PeerInfo(peer, tuple(a)) for peer, a in by_peer.items()]


def _flatten(peers: Iterable[PeerInfo]) -> list[bytes]:
    return [a for p in peers for a in p.addrs[:MAX_ADDRS_PER_PEER]]


# --- requests -------------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """A decoded, validated request; read-only by convention.  Not frozen: a node builds
    one for every request it receives, and a frozen dataclass's ``__init__`` (a
    ``object.__setattr__`` call per field) costs three times as much."""

    type: MessageType
    key: bytes = b""
    page: int = 0
    value: bytes | None = None
    # Addresses the sender can be reached at (only from DHT servers).
    addrs: tuple[bytes, ...] = ()
    # ADD_PROVIDER: the sender's addresses as a provider.
    provider: tuple[bytes, ...] = ()


def _byte_string(data: bytes) -> bytes:
    """``data`` as a shortest-form CBOR byte string (below 64 KiB)."""
    size = len(data)
    if size < 24:
        return bytes((0x40 + size,)) + data
    if size < 256:
        return bytes((0x58, size)) + data
    return b"\x59" + size.to_bytes(2, "big") + data


# Map keys of requests as encoded (text strings of 3 and 5 bytes).
_KEY_FIELD = b"ckey"
_ADDRS_FIELD = b"eaddrs"
_VALUE_FIELD = b"evalue"
# The "addrs" field of a request (name and list), encoded, by the addresses: a DHT server
# sends the same ones with every request.
_ADDRS_FIELDS: dict[tuple[bytes, ...], bytes] = {}


def encode_request(request: Request) -> bytes:
    kind = request.type
    if (kind is not MessageType.PING and not request.page and not request.provider
            and (request.value is None or not request.addrs)):
        # The usual requests, built as _fast_request reads them: the canonical map
        # {"key", "type"[, "addrs" | "value"]} (keys sorted by length, then bytewise).
        addrs, value = request.addrs, request.value
        if value is not None:
            tail = _VALUE_FIELD + _byte_string(value)
        elif addrs:
            known = _ADDRS_FIELDS.get(addrs)
            if known is None:
                known = _ADDRS_FIELD + dagcbor.encode(list(addrs[:MAX_ADDRS_PER_PEER]))
                if len(_ADDRS_FIELDS) >= _ADDR_CACHE_SIZE:
                    _ADDRS_FIELDS.clear()
                _ADDRS_FIELDS[addrs] = known
            tail = known
        else:
            tail = b""
        data = (b"\xa3" if tail else b"\xa2") + _KEY_FIELD + _byte_string(request.key) + (
            b"dtype" + bytes((kind,))) + tail
        if len(data) > MAX_MESSAGE:
            raise UsageError(f"{kind.name} request is {len(data)} bytes (max {MAX_MESSAGE})")
        return data
    body: dict[str, Any] = {"type": int(request.type)}
    if request.type != MessageType.PING:
        body["key"] = request.key
    if request.page:
        body["page"] = request.page
    if request.value is not None:
        body["value"] = request.value
    if request.addrs:
        body["addrs"] = list(request.addrs[:MAX_ADDRS_PER_PEER])
    if request.provider:
        body["provider"] = list(request.provider[:MAX_ADDRS_PER_PEER])
    data = dagcbor.encode(body)
    if len(data) > MAX_MESSAGE:
        raise UsageError(f"{request.type.name} request is {len(data)} bytes (max {MAX_MESSAGE})")
    return data


def _read_bytes(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A shortest-form CBOR byte string at ``pos`` (below 64 KiB): (bytes, end), else None."""
    if pos >= len(data):
        return None
    head = data[pos]
    if 0x40 <= head < 0x58:
        size, pos = head - 0x40, pos + 1
    elif head == 0x58 and pos + 1 < len(data) and data[pos + 1] >= 24:
        size, pos = data[pos + 1], pos + 2
    elif head == 0x59 and pos + 2 < len(data) and (
            size := int.from_bytes(data[pos + 1:pos + 3], "big")) >= 0x100:
        pos += 3
    else:
        return None
    end = pos + size
    return (data[pos:end], end) if end <= len(data) else None


def _tail_bytes(data: bytes, pos: int) -> bytes | None:
    """The shortest-form CBOR byte string at ``pos`` if it ends exactly where ``data``
    does, else None: its head must be the one its length, known from the end, gives."""
    left = len(data) - pos
    if 0 < left <= 24:
        return data[pos + 1:] if data[pos] == 0x3F + left else None
    if 26 <= left <= 257:
        return data[pos + 2:] if data[pos] == 0x58 and data[pos + 1] == left - 2 else None
    if left >= 259 and data[pos:pos + 3] == b"\x59" + (left - 3).to_bytes(2, "big"):
        return data[pos + 3:]
    return None


# "type" and its value as they follow the key in a request the fast path reads.
_TYPE_TAGS = {b"dtype" + bytes([t]): t for t in (MessageType.PUT_VALUE, MessageType.GET_VALUE,
                                                  MessageType.GET_PROVIDERS,
                                                  MessageType.FIND_NODE)}
# The "addrs" of fast-path requests, by their encoded list: (addresses, the one peer they
# all name, or None).  A DHT server sends the same list with every request.
_OWN_ADDRS: dict[bytes, tuple[tuple[bytes, ...], PeerID | None]] = {}


def _fast_request(data: bytes, sender: PeerID) -> Request | None:
    """The usual requests read without the generic decoder, when ``data`` is exactly
    the canonical form of ``{"key", "type"}``, ``{"key", "type", "addrs"}`` (FIND_NODE,
    GET_VALUE, GET_PROVIDERS) or ``{"key", "type", "value"}`` (PUT_VALUE); None for
    anything else, which the generic path then decodes (or rejects)."""
    size = len(data)
    if size < 13 or size > MAX_MESSAGE or data[1:5] != _KEY_FIELD:
        return None
    head = data[5]
    if 0x41 <= head <= 0x57:  # the key's length in its head: 1..23 bytes
        pos, end = 6, head - 0x3A
    elif head == 0x58 and 24 <= data[6] <= MAX_KEY_SIZE:
        pos, end = 7, 7 + data[6]
    else:
        return None
    kind = _TYPE_TAGS.get(data[end:end + 6])
    if kind is None:
        return None
    rest = end + 6
    if data[0] == 0xA2:
        if rest != size or kind is MessageType.PUT_VALUE:
            return None
        return Request(kind, data[pos:end], 0, None, (), ())
    if data[0] != 0xA3:
        return None
    field_name = data[rest:rest + 6]
    if field_name == _VALUE_FIELD:
        if kind is not MessageType.PUT_VALUE:
            return None
        value = _tail_bytes(data, rest + 6)
        if value is None or len(value) > MAX_VALUE_SIZE:
            return None
        return Request(kind, data[pos:end], 0, value, (), ())
    if field_name != _ADDRS_FIELD or kind is MessageType.PUT_VALUE:
        return None
    known = _OWN_ADDRS.get(data[rest + 6:])
    if known is None:
        known = _read_own_addrs(data, rest + 6)
        if known is None:
            return None
    addrs, peer = known
    if peer is not sender and peer != sender:
        raise MalformedMessageError("addrs names another peer than the sender")
    return Request(kind, data[pos:end], 0, None, addrs, ())


def _read_own_addrs(data: bytes, pos: int) -> tuple[tuple[bytes, ...], PeerID | None] | None:
    """The canonical address list from ``pos`` to the end of ``data`` (None if it is not
    one), with the peer its addresses name (None if they name several), remembered."""
    count = data[pos] - 0x80 if pos < len(data) else 0
    if not 1 <= count <= MAX_ADDRS_PER_PEER:
        return None
    start = pos
    pos += 1
    addrs = []
    peers = set()
    for _ in range(count):
        got = _read_bytes(data, pos)
        if got is None:
            return None
        addr, pos = got
        peers.add(peer_of_addr(addr))  # raises MalformedMessageError for a bad address
        addrs.append(addr)
    if pos != len(data):
        return None
    if len(_OWN_ADDRS) >= _ADDR_CACHE_SIZE:
        _OWN_ADDRS.clear()
    known = _OWN_ADDRS[data[start:]] = (tuple(dict.fromkeys(addrs)),
                                        peers.pop() if len(peers) == 1 else None)
    return known


def decode_request(data: bytes, sender: PeerID) -> Request:
    """Decode and validate a request from ``sender`` (the peer its session proved).

    Unknown fields are ignored (room to grow); known ones must have the right
    type and size.  Addresses the sender gives for itself must name it.
    """
    request = _fast_request(data, sender)
    if request is not None:
        return request
    return _decode_request(data, sender)


def _decode_request(data: bytes, sender: PeerID) -> Request:
    """decode_request by the generic decoder (every request shape)."""
    body = _decode_map(data)
    kind = _message_type(body)
    key = b""
    if kind != MessageType.PING:
        key = _bytes(body, "key", MAX_KEY_SIZE, required=True)
        if not key:
            raise MalformedMessageError("empty key")
    page = _int(body, "page", MAX_PAGES - 1) if kind in _PAGED else 0
    value = None
    if kind == MessageType.PUT_VALUE:
        value = _bytes(body, "value", MAX_VALUE_SIZE, required=True)
    provider: tuple[bytes, ...] = ()
    if kind == MessageType.ADD_PROVIDER:
        try:
            dagcbor.check_multihash(key)
        except DagCborError as exc:
            raise MalformedMessageError(f"provider key is not a multihash: {exc}") from None
        provider = _own_addrs(body, "provider", sender)
        if not provider:
            raise MalformedMessageError("ADD_PROVIDER without provider addresses")
    return Request(kind, key, page, value, _own_addrs(body, "addrs", sender), provider)


def _own_addrs(body: dict[str, Any], name: str, sender: PeerID) -> tuple[bytes, ...]:
    addrs = _addr_list(body, name, MAX_ADDRS_PER_PEER)
    for addr in addrs:
        if peer_of_addr(addr) != sender:
            raise MalformedMessageError(f"{name} names another peer than the sender")
    return tuple(dict.fromkeys(addrs))


# --- replies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded, validated reply page (or, after merging, all of a reply's pages)."""

    type: MessageType
    closer: list[PeerInfo] = field(default_factory=list)
    providers: list[PeerInfo] = field(default_factory=list)
    value: bytes | None = None
    ok: bool | None = None
    error: str | None = None
    page: int = 0
    pages: int = 1


def _item_size(addr: bytes) -> int:
    return len(addr) + (1 if len(addr) < 24 else 2)


def _paginate(providers: Sequence[PeerInfo], closer: Sequence[PeerInfo], first_budget: int,
              budget: int) -> list[tuple[list[PeerInfo], list[PeerInfo]]]:
    """Split peers into pages of at most ``budget`` bytes of addresses (page 0: first_budget).

    A peer's addresses stay on one page, so each page is well-formed on its own.
    """
    bound = sum(len(a) + 2 for peers in (providers, closer) for p in peers for a in p.addrs)
    if bound <= first_budget:
        return [(list(providers), list(closer))]  # the usual case: one page
    sizes = [[sum(_item_size(a) for a in p.addrs[:MAX_ADDRS_PER_PEER]) for p in peers]
             for peers in (providers, closer)]
    pages: list[tuple[list[PeerInfo], list[PeerInfo]]] = [([], [])]
    room = first_budget
    for kind, peers in ((0, providers), (1, closer)):
        for peer, size in zip(peers, sizes[kind]):
            if size > room and (pages[-1][0] or pages[-1][1]):
                pages.append(([], []))
                room = budget
            pages[-1][kind].append(peer)
            room -= size
    return pages


def _skeleton_size(kind: MessageType, extra: dict[str, Any]) -> int:
    """Encoded size of a page with empty peer lists and the largest page numbers,
    plus two bytes per list for its header growing past 23 items."""
    skeleton = {"type": int(kind), "page": MAX_PAGES, "pages": MAX_PAGES,
                "closer": [], "providers": [], **extra}
    return len(dagcbor.encode(skeleton)) + 4


_PAGE_BUDGET = {kind: MAX_MESSAGE - _skeleton_size(kind, {}) for kind in _PAGED}
# A one-page reply of closer peers, around its address list: the map in canonical key
# order (page, type, pages, closer, providers) up to "closer", and the empty providers.
_NO_PROVIDERS = b"\x69providers\x80"
_ONE_PAGE_HEAD = {kind: dagcbor.encode({"type": int(kind), "page": 0, "pages": 1, "closer": [],
                                        "providers": []})[:-len(_NO_PROVIDERS) - 1]
                  for kind in _PAGED}


def encode_reply_page(kind: MessageType, page: int, *, providers: Sequence[PeerInfo] = (),
                      closer: Sequence[PeerInfo] = (), value: bytes | None = None,
                      ok: bool | None = None, error: str | None = None) -> bytes:
    """Encode page ``page`` of a reply (a page past the end holds no peers).

    ``value``, ``ok`` and ``error`` go on page 0, peers fill the pages in
    order, providers first.
    """
    if (closer and not providers and value is None and ok is None and error is None
            and kind in _PAGED):
        data = encode_closer_page(kind, closer)
        if data is not None:
            if page:  # a page past the end
                return dagcbor.encode({"type": int(kind), "page": page, "pages": 1,
                                       "closer": [], "providers": []})
            return data
    extra: dict[str, Any] = {}
    if value is not None:
        extra["value"] = value
    if ok is not None:
        extra["ok"] = ok
    if error is not None:
        extra["error"] = error[:200]
    if kind not in _PAGED:
        return dagcbor.encode({"type": int(kind), **extra})
    if not providers and not closer:
        return dagcbor.encode({"type": int(kind), "page": page, "pages": 1, "closer": [],
                               "providers": [], **(extra if page == 0 else {})})
    budget = _PAGE_BUDGET[kind]
    first = MAX_MESSAGE - _skeleton_size(kind, extra) if extra else budget
    pages = _paginate(providers, closer, first, budget)
    if len(pages) > MAX_PAGES:
        raise UsageError(f"reply needs {len(pages)} pages (max {MAX_PAGES})")
    chosen_providers, chosen_closer = pages[page] if page < len(pages) else ([], [])
    body = {"type": int(kind), "page": page, "pages": len(pages),
            "closer": _flatten(chosen_closer), "providers": _flatten(chosen_providers)}
    if page == 0:
        body.update(extra)
    data = dagcbor.encode(body)
    if len(data) > MAX_MESSAGE:  # pragma: no cover - the budget above makes this unreachable
        raise UsageError(f"reply page is {len(data)} bytes (max {MAX_MESSAGE})")
    return data


def encode_closer_page(kind: MessageType, closer: Sequence[PeerInfo]) -> bytes | None:
    """The common reply, closer peers only (FIND_NODE, and GET_* from a node that holds
    nothing), if it fits one page; None if it needs more (:func:`encode_reply_page`).

    Peers carry at most MAX_ADDRS_PER_PEER addresses (the routing table and the
    reply parser both cap them).
    """
    addrs = [a for p in closer for a in p.addrs]
    if sum(map(len, addrs)) + 2 * len(addrs) > _PAGE_BUDGET[kind]:
        return None
    return _ONE_PAGE_HEAD[kind] + dagcbor.encode(addrs) + _NO_PROVIDERS


# A GET_VALUE reply carrying a value, in its one canonical form, around the value.
_VALUE_HEAD = b"\xa6dpage\x00dtype\x01epages\x01evalue"
_VALUE_TAIL = b"fcloser\x80iproviders\x80"


def encode_value_reply(value: bytes) -> bytes:
    """``encode_reply_page(GET_VALUE, 0, value=value)``, built around the value directly."""
    if len(value) > MAX_VALUE_SIZE:
        raise UsageError(f"value of {len(value)} bytes (max {MAX_VALUE_SIZE})")
    return _VALUE_HEAD + dagcbor.encode(value) + _VALUE_TAIL


def _value_reply(data: bytes) -> Reply | None:
    """The GET_VALUE reply with a value, read without the generic decoder, when ``data``
    is exactly its canonical form (what every msgnet peer sends); None otherwise."""
    if not (data.startswith(_VALUE_HEAD) and data.endswith(_VALUE_TAIL)):
        return None
    pos = len(_VALUE_HEAD)
    end = len(data) - len(_VALUE_TAIL)
    if pos >= end:
        return None
    head = data[pos]
    if 0x40 <= head < 0x58:  # length in the head: 0..23
        size, pos = head - 0x40, pos + 1
    elif head == 0x58 and pos + 1 < end and data[pos + 1] >= 24:
        size, pos = data[pos + 1], pos + 2
    elif head == 0x59 and pos + 2 < end and (size := int.from_bytes(data[pos + 1:pos + 3],
                                                                     "big")) >= 0x100:
        pos += 3
    else:
        return None  # not shortest-form, or not bytes: the generic path decides
    if pos + size != end or size > MAX_VALUE_SIZE:
        return None
    return Reply(MessageType.GET_VALUE, [], [], data[pos:end], None, None, 0, 1)


def decode_reply(data: bytes, expected: MessageType, page: int = 0) -> Reply:
    """Decode and validate reply page ``page`` to a request of type ``expected``."""
    if expected is MessageType.GET_VALUE and page == 0:
        reply = _value_reply(data)
        if reply is not None:
            return reply
    body = _decode_map(data)
    kind = _message_type(body)
    if kind != expected:
        raise MalformedMessageError(f"reply of type {kind.name} to a {expected.name} request")
    pages = 1
    if kind in _PAGED:
        pages = _int(body, "pages", MAX_PAGES)
        if pages < 1:
            raise MalformedMessageError("reply with zero pages")
        if _int(body, "page", MAX_PAGES - 1) != page:
            raise MalformedMessageError(f"reply is not page {page}")
    closer = peers_from_addrs(
        _addr_list(body, "closer", MAX_PEERS_PER_REPLY * MAX_ADDRS_PER_PEER),
        MAX_PEERS_PER_REPLY)
    providers = peers_from_addrs(
        _addr_list(body, "providers", MAX_PROVIDERS_PER_REPLY * MAX_ADDRS_PER_PEER),
        MAX_PROVIDERS_PER_REPLY)
    value = _bytes(body, "value", MAX_VALUE_SIZE) if kind == MessageType.GET_VALUE else None
    ok = body.get("ok")
    if ok is not None and type(ok) is not bool:
        raise MalformedMessageError("'ok' is not a bool")
    error = body.get("error")
    if error is not None and type(error) is not str:
        raise MalformedMessageError("'error' is not a string")
    return Reply(kind, closer, providers, value, ok, error, page, pages)


# --- field helpers ---------------------------------------------------------------------------


def _decode_map(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE + 100:  # a little slack: peers may budget differently
        raise MalformedMessageError(f"message of {len(data)} bytes")
    try:
        body = dagcbor.decode(data)
    except DagCborError as exc:
        raise MalformedMessageError(str(exc)) from None
    if type(body) is not dict:
        raise MalformedMessageError("message is not a map")
    return body


def _message_type(body: dict[str, Any]) -> MessageType:
    kind = body.get("type")
    if type(kind) is not int or kind not in _TYPES:
        raise MalformedMessageError(f"unknown message type {kind!r}")
    return _TYPES[kind]


def _bytes(body: dict[str, Any], name: str, limit: int, *, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise MalformedMessageError(f"missing {name!r}")
        return None
    if type(value) is not bytes or len(value) > limit:
        raise MalformedMessageError(f"{name!r} is not bytes of at most {limit}")
    return value


def _int(body: dict[str, Any], name: str, limit: int) -> int:
    value = body.get(name, 0)
    if type(value) is not int or not 0 <= value <= limit:
        raise MalformedMessageError(f"{name!r} is not an int in 0..{limit}")
    return value


def _addr_list(body: dict[str, Any], name: str, limit: int) -> list[bytes]:
    value = body.get(name, [])
    if type(value) is not list or len(value) > limit:
        raise MalformedMessageError(f"{name!r} is not a list of at most {limit} addresses")
    for addr in value:
        if type(addr) is not bytes:
            raise MalformedMessageError(f"{name!r} holds a non-bytes address")
    return value
