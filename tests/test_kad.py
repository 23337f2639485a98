"""Kademlia on msgnet: DAG-CBOR conformance, wire limits, records, the routing table,
in-process networks (including hostile nodes) and a 52-node network in 4 processes
(puts readable everywhere, providers, O(log n) hops, churn)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from multiaddr import Multiaddr

from msgnet import MessageHost, RequestTimeoutError
from msgnet._cluster import ClusterProcess
from msgnet.errors import UsageError
from msgnet.identity import KeyPair
from msgnet.protocols import dagcbor
from msgnet.protocols.dagcbor import CID, DagCborError
from msgnet.protocols.kad import (
    PROTOCOL,
    InvalidRecordError,
    KadConfig,
    KadDHT,
    NotFoundError,
    PublicKeyValidator,
    ValueTooLargeError,
    content_record,
    default_validator,
    format_key,
    parse_key,
    sign_record,
)
from msgnet.protocols.kad.errors import MalformedMessageError
from msgnet.protocols.kad.records import ProviderStore, RecordStore
from msgnet.protocols.kad.routing import RoutingTable, common_prefix_length, kad_id, key_in_bucket
from msgnet.protocols.kad.wire import (
    MAX_MESSAGE,
    MAX_PAGES,
    MessageType,
    PeerInfo,
    Request,
    decode_reply,
    decode_request,
    encode_reply_page,
    encode_request,
)

T = TypeVar("T")

# Short timeouts: everything runs on 127.0.0.1, a dead peer should cost little.
FAST = {"first_contact_timeout": 0.2, "max_query_timeout": 1.0, "maintenance_interval": 3600.0}


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run on uvloop; fail if the loop's exception handler fired (a swallowed error)."""
    errors: list[dict[str, Any]] = []
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert not errors, errors
    return result


def peer_addr(keypair: KeyPair, port: int, host: str = "127.0.0.1") -> bytes:
    family = "ip6" if ":" in host else "ip4"
    return Multiaddr(f"/{family}/{host}/udp/{port}/p2p/{keypair.peer_id}").to_bytes()


def fake_peers(count: int, addrs_each: int = 1) -> list[PeerInfo]:
    peers = []
    for _ in range(count):
        key = KeyPair.generate()
        addrs = tuple(peer_addr(key, random.randint(20000, 60000)) for _ in range(addrs_each))
        peers.append(PeerInfo(key.peer_id, addrs))
    return peers


# --- DAG-CBOR ----------------------------------------------------------------------------------


def dag_cbor_fixtures() -> list[Path]:
    root = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "dag-cbor"
    return sorted(root.glob("*/*.dag-cbor"))


@pytest.mark.parametrize("path", dag_cbor_fixtures(), ids=lambda p: p.parent.name)
def test_dag_cbor_fixture_round_trips_to_its_cid(path: Path) -> None:
    data = path.read_bytes()
    value = dagcbor.decode(data)
    again = dagcbor.encode(value)
    assert again == data
    assert str(CID.of(again, dagcbor.DAG_CBOR)) == path.stem


def test_dag_cbor_fixture_set_is_complete(shared_dir: Path) -> None:
    assert len(list((shared_dir / "vectors" / "dag-cbor").glob("*/*.dag-cbor"))) == 125
    assert len(dag_cbor_fixtures()) == 125


def test_dag_cbor_negative_fixtures_are_rejected(shared_dir: Path) -> None:
    cases = json.loads((shared_dir / "vectors" / "dag-cbor" / "negative-duplicate-keys.json")
                       .read_text())
    assert cases
    for case in cases:
        with pytest.raises(DagCborError):
            dagcbor.decode(bytes.fromhex(case["hex"]))


@pytest.mark.parametrize("hex_data", [
    "1801",                # integer not in its shortest form
    "a2616201616101",      # keys out of order
    "a262616101616202",    # keys not length-first
    "f93c00",              # half-precision float
    "fa3f800000",          # single-precision float
    "fb7ff8000000000000",  # NaN
    "fb7ff0000000000000",  # infinity
    "c101",                # a tag other than 42
    "c249010000000000000000",  # bignum
    "f7",                  # undefined
    "f0",                  # simple value
    "9f01ff",              # indefinite-length array
    "5f4101ff",            # indefinite-length bytes
    "a1410101",            # bytes as a map key
    "0101",                # trailing bytes
    "d82a420171",          # CID without the 0x00 prefix
    "62",                  # truncated
])
def test_dag_cbor_rejects_non_canonical_input(hex_data: str) -> None:
    with pytest.raises(DagCborError):
        dagcbor.decode(bytes.fromhex(hex_data))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1: 2}, 1 << 64, {1, 2}, object()])
def test_dag_cbor_encoder_refuses_values_outside_the_data_model(value: Any) -> None:
    with pytest.raises(DagCborError):
        dagcbor.encode(value)


def test_dag_cbor_sorts_keys_length_first_and_keeps_floats_64_bit() -> None:
    assert dagcbor.encode({"b": 1, "aa": 2, "a": 3}).hex() == "a361610361620162616102"
    assert dagcbor.encode(1.5).hex() == "fb3ff8000000000000"
    cid = CID.of(b"hello")
    assert dagcbor.decode(dagcbor.encode({"link": cid})) == {"link": cid}


def _random_ipld(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "bytes", "str", "float", "simple", "cid"]
    if depth < 4:
        kinds += ["list", "map"] * 2
    kind = rng.choice(kinds)
    if kind == "int":
        edge = rng.choice([0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
        return rng.choice([edge, -edge - 1, rng.randint(-2**64, 2**64 - 1)])
    if kind == "bytes":
        return os.urandom(rng.choice([0, 1, 23, 24, 255, 256, 2047, 2048, 70000]))
    if kind == "str":
        return "".join(rng.choice("ab\u00e9\u4e2d\U0001f600") for _ in range(rng.randint(0, 30)))
    if kind == "float":
        return rng.choice([0.0, -0.0, 1.5, 1e300, -2.5e-300, rng.random()])
    if kind == "simple":
        return rng.choice([None, True, False])
    if kind == "cid":
        return CID.of(os.urandom(4))
    if kind == "list":
        return [_random_ipld(rng, depth + 1) for _ in range(rng.choice([0, 1, 5, 24]))]
    keys = ["a", "b", "aa", "type", "page", "pages", "closer", "z" * 30, "\u00e9", ""]
    return {rng.choice(keys) + str(rng.randint(0, 3) if rng.random() < 0.3 else ""):
            _random_ipld(rng, depth + 1) for _ in range(rng.randint(0, 6))}


def test_dag_cbor_encoder_matches_cbor2_canonical_output() -> None:
    """The hand-written encoder is held to cbor2's canonical mode (with 64-bit floats and
    tag 42), byte for byte, and decode inverts it."""
    import io
    import struct

    import cbor2

    def cid_hook(encoder: Any, value: Any) -> None:
        encoder.encode_semantic(42, b"\x00" + bytes(value))

    def float64(encoder: Any, value: float) -> None:
        encoder.write(b"\xfb" + struct.pack(">d", value))

    rng = random.Random(7)
    for _ in range(400):
        value = _random_ipld(rng)
        buffer = io.BytesIO()
        cbor2.CBOREncoder(buffer, canonical=True, default=cid_hook,
                          encoders={float: float64}).encode(value)
        reference = buffer.getvalue()
        assert dagcbor.encode(value) == reference
        assert dagcbor.decode(reference) == value


def test_cid_text_forms() -> None:
    cid = CID.of(b"hello", dagcbor.DAG_CBOR)
    assert CID.from_string(str(cid)) == cid and str(cid).startswith("bafy")
    v0 = CID.from_string("QmQg1v4o9xdT3Q14wh4S7dxZkDjyZ9ssFzFzyep1YrVJBY")
    assert v0.version == 0 and str(v0) == "QmQg1v4o9xdT3Q14wh4S7dxZkDjyZ9ssFzFzyep1YrVJBY"
    for bad in ("", "x123", "bafy!!", "Qm" + "1" * 44):
        with pytest.raises(DagCborError):
            CID.from_string(bad)


# --- wire ----------------------------------------------------------------------------------------


def test_large_replies_are_paged_never_truncated() -> None:
    peers = fake_peers(20, addrs_each=4)
    providers = fake_peers(20, addrs_each=4)
    page0 = decode_reply(encode_reply_page(MessageType.GET_PROVIDERS, 0, providers=providers,
                                           closer=peers), MessageType.GET_PROVIDERS)
    assert 1 < page0.pages <= MAX_PAGES
    got_closer, got_providers = [], []
    for page in range(page0.pages):
        data = encode_reply_page(MessageType.GET_PROVIDERS, page, providers=providers,
                                 closer=peers)
        assert len(data) <= MAX_MESSAGE
        reply = decode_reply(data, MessageType.GET_PROVIDERS, page)
        got_closer += reply.closer
        got_providers += reply.providers
    assert got_closer == peers and got_providers == providers


def test_replies_beyond_the_limits_are_malformed() -> None:
    too_many = [a for p in fake_peers(21) for a in p.addrs]
    cases = [
        {"type": 4, "page": 0, "pages": 1, "closer": too_many, "providers": []},
        {"type": 4, "page": 0, "pages": MAX_PAGES + 1, "closer": [], "providers": []},
        {"type": 4, "page": 1, "pages": 2, "closer": [], "providers": []},  # not page 0
        {"type": 1, "page": 0, "pages": 1, "closer": [], "providers": []},  # wrong type
        {"type": 4, "page": 0, "pages": 1, "closer": [b"\x04garbage"], "providers": []},
        {"type": 4, "page": 0, "pages": 1, "closer": "nope", "providers": []},
    ]
    five_addrs = fake_peers(1, addrs_each=5)[0].addrs
    cases.append({"type": 4, "page": 0, "pages": 1, "closer": list(five_addrs),
                  "providers": []})
    for body in cases:
        with pytest.raises(MalformedMessageError):
            decode_reply(dagcbor.encode(body), MessageType.FIND_NODE)
    with pytest.raises(MalformedMessageError):
        decode_reply(b"\xff\x00garbage", MessageType.FIND_NODE)


def test_requests_are_validated_against_the_proven_sender() -> None:
    me, other = KeyPair.generate(), KeyPair.generate()
    request = Request(MessageType.FIND_NODE, b"key", addrs=(peer_addr(me, 4001),))
    assert decode_request(encode_request(request), me.peer_id) == request
    with pytest.raises(MalformedMessageError):  # addresses naming someone else
        decode_request(encode_request(request), other.peer_id)
    with pytest.raises(MalformedMessageError):  # a provider key that is not a multihash
        decode_request(encode_request(Request(MessageType.ADD_PROVIDER, b"xx",
                                              provider=(peer_addr(me, 1),))), me.peer_id)
    with pytest.raises(MalformedMessageError):
        decode_request(dagcbor.encode({"type": 0, "key": b"k", "value": b"v" * 2000}),
                       me.peer_id)
    with pytest.raises(MalformedMessageError):
        decode_request(dagcbor.encode({"type": 77, "key": b"k"}), me.peer_id)


def test_request_encoder_writes_the_generic_canonical_map() -> None:
    """encode_request builds the usual requests directly: byte for byte what the generic
    DAG-CBOR encoder makes of the request's map, at every length boundary."""
    from msgnet.protocols.kad import wire

    rng = random.Random(7)
    for _ in range(3000):
        kind = rng.choice(list(MessageType))
        key = os.urandom(rng.choice([0, 1, 23, 24, 38, 100, 255, 256]))
        value = rng.choice([None, b"", os.urandom(rng.choice([1, 23, 24, 255, 256, 960, 1100]))])
        addrs = tuple(os.urandom(rng.choice([10, 40])) for _ in range(rng.choice([0, 1, 2, 5])))
        request = Request(kind, key, rng.choice([0, 0, 1]), value, addrs,
                          rng.choice([(), (b"p" * 30,)]))
        body: dict[str, Any] = {"type": int(kind)}
        if kind != MessageType.PING:
            body["key"] = key
        if request.page:
            body["page"] = request.page
        if value is not None:
            body["value"] = value
        if addrs:
            body["addrs"] = list(addrs[:wire.MAX_ADDRS_PER_PEER])
        if request.provider:
            body["provider"] = list(request.provider)
        expected = dagcbor.encode(body)
        if len(expected) > wire.MAX_MESSAGE:
            with pytest.raises(UsageError):
                encode_request(request)
        else:
            assert encode_request(request) == expected


def test_fast_paths_agree_with_the_generic_decoder() -> None:
    """Requests and value replies in their canonical form skip the generic decoder: the
    result must be the generic one, for valid messages and for corrupted ones alike."""
    from msgnet.protocols.kad import wire

    rng = random.Random(11)
    me, other = KeyPair.generate(), KeyPair.generate()
    mine = [peer_addr(me, 4000 + i) for i in range(5)]

    def outcome(decode: Any, *args: Any) -> Any:
        try:
            return decode(*args)
        except MalformedMessageError:
            return "malformed"

    samples = []
    for _ in range(300):
        kind = rng.choice(list(MessageType))
        key = os.urandom(rng.choice([1, 23, 24, 38, 100])) if kind != MessageType.PING else b""
        if kind == MessageType.ADD_PROVIDER:
            key = dagcbor.sha256_multihash(key)
        addrs = tuple(mine[:rng.choice([0, 1, 4])]) if kind != MessageType.PUT_VALUE else ()
        value = os.urandom(rng.choice([0, 23, 24, 255, 256, 960])) if (
            kind == MessageType.PUT_VALUE) else None
        request = Request(kind, key, rng.choice([0, 0, 1]) if kind in (
            MessageType.FIND_NODE, MessageType.GET_VALUE) else 0, value, addrs,
            (mine[0],) if kind == MessageType.ADD_PROVIDER else ())
        data = encode_request(request)
        assert decode_request(data, me.peer_id) == request
        samples.append(data)
    for data in samples:
        for _ in range(20):
            bad = bytearray(data)
            bad[rng.randrange(len(bad))] = rng.randrange(256)
            for sender in (me.peer_id, other.peer_id):
                assert (outcome(decode_request, bytes(bad), sender)
                        == outcome(wire._decode_request, bytes(bad), sender))
    for size in (0, 1, 23, 24, 255, 256, 960):
        value = os.urandom(size)
        data = encode_reply_page(MessageType.GET_VALUE, 0, value=value)
        assert wire.encode_value_reply(value) == data
        assert wire._value_reply(data) is not None
        for _ in range(50):
            bad = bytearray(data)
            bad[rng.randrange(len(bad))] = rng.randrange(256)
            fast = wire._value_reply(bytes(bad))
            if fast is not None:  # then it is canonical DAG-CBOR of the same reply
                assert dagcbor.decode(bytes(bad)) == {"type": 1, "page": 0, "pages": 1,
                                                      "closer": [], "providers": [],
                                                      "value": fast.value}


# --- records ----------------------------------------------------------------------------------


def test_signed_records_validate_and_select_the_newest() -> None:
    owner, intruder = KeyPair.generate(), KeyPair.generate()
    validator = PublicKeyValidator()
    key, old = sign_record(owner, "name", b"one", seq=1)
    _, new = sign_record(owner, "name", b"two", seq=2)
    assert validator.decode(key, new).value == b"two"
    assert validator.select(key, [old, new]) == 1
    assert parse_key(format_key(key)) == key
    _, forged = sign_record(intruder, "name", b"evil", seq=99)  # signed by the wrong peer
    bad_sig = dagcbor.encode({**dagcbor.decode(new), "sig": bytes(64)})
    for value in (forged, bad_sig, b"not cbor", dagcbor.encode({"seq": 1})):
        with pytest.raises(InvalidRecordError):
            validator.validate(key, value)
    with pytest.raises(ValueTooLargeError):
        sign_record(owner, "big", b"x" * 1000)


def test_content_records_are_named_by_their_cid() -> None:
    key, value = content_record(b"some bytes")
    validator = default_validator()
    validator.validate(key, value)
    with pytest.raises(InvalidRecordError):
        validator.validate(key, b"other bytes")
    with pytest.raises(InvalidRecordError):
        validator.validate(b"/nope/x", b"v")  # no validator for the namespace


def test_record_and_provider_stores_are_bounded() -> None:
    a, b = KeyPair.generate().peer_id, KeyPair.generate().peer_id
    records = RecordStore(max_records=4, max_per_peer=2)
    for i in range(2):
        assert records.has_room(b"k%d" % i, a)
        records.put(b"k%d" % i, b"v", a, expires=time.monotonic() + 60)
    assert not records.has_room(b"k9", a)  # a's quota is used up
    assert records.has_room(b"k0", a)  # replacing its own record is fine
    records.put(b"k2", b"v", b, expires=time.monotonic() - 1)  # already expired
    assert records.get(b"k2", time.monotonic()) is None and len(records) == 2
    providers = ProviderStore(max_per_key=3, max_total=4)
    peers = [KeyPair.generate().peer_id for _ in range(5)]
    for peer in peers[:4]:
        assert providers.add(b"mh", peer, (), time.monotonic() + 60)
    assert len(providers.get(b"mh", time.monotonic(), 10)) == 3  # oldest evicted
    assert providers.add(b"mh2", peers[4], (), time.monotonic() + 60)
    assert not providers.add(b"mh3", peers[4], (), time.monotonic() + 60)  # total is full


# --- routing table ------------------------------------------------------------------------------


def test_full_bucket_pings_the_oldest_and_replaces_it_only_if_dead() -> None:
    me = KeyPair.generate()
    table = RoutingTable(me.peer_id, k=2)
    by_bucket: dict[int, list[KeyPair]] = {}
    while not any(len(v) >= 4 for v in by_bucket.values()):
        key = KeyPair.generate()
        cpl = common_prefix_length(kad_id(key.peer_id.to_bytes()), table.local_kid)
        by_bucket.setdefault(cpl, []).append(key)
    first, second, third, fourth = next(v for v in by_bucket.values() if len(v) >= 4)[:4]
    for key in (first, second):
        assert table.seen(key.peer_id, [peer_addr(key, 1)]) is None
    oldest = table.seen(third.peer_id, [peer_addr(third, 1)])
    assert oldest is not None and oldest.peer_id == first.peer_id
    assert table.seen(fourth.peer_id, [peer_addr(fourth, 1)]) is None  # one check at a time
    table.seen(first.peer_id, ())  # the oldest answered: it stays
    table.check_done(oldest)
    assert first.peer_id in table and third.peer_id not in table
    assert table.failed(second.peer_id, evict_after=2) is None  # one failure is not enough
    assert table.failed(second.peer_id, evict_after=2) is not None
    assert second.peer_id not in table
    candidate = table.take_replacement(kad_id(second.peer_id.to_bytes()))
    assert candidate is not None and candidate.peer_id == fourth.peer_id  # newest first
    assert table.seen(fourth.peer_id, candidate.addrs) is None  # it answered a ping: in
    assert fourth.peer_id in table
    assert table.take_replacement(candidate.kid) is None  # the bucket is full again


def test_closest_visits_buckets_in_distance_order() -> None:
    """A large table gathers the closest peers bucket by bucket: the same answer as
    sorting every peer."""
    me = KeyPair.generate()
    table = RoutingTable(me.peer_id, k=20)
    for peer in fake_peers(400):
        table.seen(peer.peer_id, peer.addrs)
    assert len(table) > 80  # several buckets, the far ones full
    entries = table.entries()
    for _ in range(50):
        kid = kad_id(os.urandom(8))
        exclude = random.choice(entries).peer_id
        for skip in (None, exclude):
            expected = sorted((e for e in entries if e.peer_id != skip),
                              key=lambda e: e.kid ^ kid)[:20]
            assert table.closest(kid, 20, skip) == expected


def test_key_independent_replies_name_the_k_closest() -> None:
    """Replies encoded once for many keys (the whole table when it is small, a full bucket
    otherwise) name exactly the k peers closest to the key, never the requester."""
    async def main() -> None:
        async with MessageHost() as host:
            dht = KadDHT(host)
            await dht.start()
            try:
                peers = fake_peers(300)
                requesters = [peers[0].peer_id, KeyPair.generate().peer_id]
                for size in (10, 21, 300):
                    for peer in peers[:size]:
                        dht.table.seen(peer.peer_id, peer.addrs)
                    cached = 0
                    for _ in range(200):
                        key = os.urandom(8)
                        for requester in requesters:
                            data = dht._known_closer_reply(MessageType.FIND_NODE, key, requester)
                            if data is None:
                                continue
                            cached += 1
                            names = {p.peer_id for p in
                                     decode_reply(data, MessageType.FIND_NODE).closer}
                            expected = {e.peer_id for e in
                                        dht.table.closest(kad_id(key), 20, requester)}
                            assert names == expected and requester not in names
                    assert cached > 0
            finally:
                await dht.close()

    run(main())


def test_bucket_refresh_keys_land_in_their_bucket() -> None:
    local = kad_id(b"me")
    for cpl in range(8):
        assert common_prefix_length(kad_id(key_in_bucket(local, cpl)), local) == cpl


def test_config_bounds() -> None:
    for bad in ({"alpha": 2}, {"alpha": 11}, {"k": 21}, {"k": 0}, {"quorum": 0}):
        with pytest.raises(ValueError):
            KadConfig(**bad)


# --- in-process networks -------------------------------------------------------------------------


async def start_network(stack: AsyncExitStack, count: int, *, listen: int = 1,
                        **config: Any) -> tuple[list[KeyPair], list[MessageHost], list[KadDHT]]:
    keys = [KeyPair.generate() for _ in range(count)]
    hosts = [await stack.enter_async_context(
        MessageHost(k, listen=["/ip4/127.0.0.1/udp/0"] * listen)) for k in keys]
    dhts = [await stack.enter_async_context(KadDHT(h, config=KadConfig(**{**FAST, **config})))
            for h in hosts]
    for dht in dhts[1:]:
        await dht.bootstrap([str(hosts[0].addrs[0])])
    return keys, hosts, dhts


def test_request_nowait_resolves_fails_and_forgets() -> None:
    """The host's future-returning request (what lookups fan out with)."""
    async def main() -> None:
        async with MessageHost() as a, MessageHost() as b:
            b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
            b.set_message_handler("/silent/1", lambda m: None)
            a.add_peer(b.addrs[0])
            assert await a.request_nowait(b.peer_id, "/echo/1", b"x", timeout=5) == b"x"
            with pytest.raises(RequestTimeoutError):
                await a.request_nowait(b.peer_id, "/silent/1", b"?", timeout=0.1)
            forgotten = a.request_nowait(b.peer_id, "/silent/1", b"?", timeout=5)
            forgotten.cancel()
            await asyncio.sleep(0.05)
            assert a.metrics()["pending_requests"] == 0
            big = a.request_nowait(b.peer_id, "/echo/1", b"y" * 3000, timeout=5)  # fragmented
            assert await big == b"y" * 3000

    run(main())


def test_put_get_provide_in_one_process() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            keys, hosts, dhts = await start_network(stack, 12)
            key, record = sign_record(keys[3], "hello", b"world")
            assert await dhts[3].put_value(key, record) >= 10
            for dht in dhts:
                envelope = await dht.get_value(key)
                assert PublicKeyValidator().decode(key, envelope).value == b"world"
            _, newer = sign_record(keys[3], "hello", b"again")
            await dhts[3].put_value(key, newer)
            assert PublicKeyValidator().decode(key, await dhts[7].get_value(key)).value == (
                b"again")
            ckey, content = content_record(b"immutable")
            await dhts[5].put_value(ckey, content)
            assert await dhts[9].get_value(ckey) == b"immutable"
            cid = CID.of(b"a file")
            assert await dhts[2].provide(cid) > 0
            found = await dhts[11].find_providers(cid)
            assert [p.peer_id for p in found] == [hosts[2].peer_id]
            with pytest.raises(NotFoundError):
                await dhts[1].get_value(sign_record(keys[1], "missing", b"")[0])
            with pytest.raises(ValueTooLargeError):
                await dhts[1].put_value(b"/ipld/x", b"x" * 2000)
            with pytest.raises(InvalidRecordError):
                await dhts[1].put_value(key, b"unsigned")
            assert await dhts[0].find_peer(hosts[6].peer_id) is not None
            assert all(d.metrics()["dropped_malformed_requests"] == 0 for d in dhts)

    run(main())


def test_peers_with_many_addresses_are_paged_end_to_end() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            _, _, dhts = await start_network(stack, 22, listen=4)
            await dhts[0].bootstrap([])  # the seed announces its own (four) addresses
            result = await dhts[21].get_closest_peers(b"some key")
            assert len(result.closest) == 20
            assert all(len(p.addrs) == 4 for p in result.closest)
            assert sum(d.metrics().get("dropped_malformed_replies", 0) for d in dhts) == 0

    run(main())


def test_malformed_and_over_quota_requests_are_refused_and_counted() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            _, hosts, dhts = await start_network(stack, 2, max_records_per_peer=3)
            target, client = dhts[0], hosts[1]
            for garbage in (b"\xff\xfe", dagcbor.encode([1, 2]), dagcbor.encode({"type": 4})):
                with pytest.raises(RequestTimeoutError):
                    await client.request(target.host.peer_id, PROTOCOL, garbage, timeout=0.2)
            assert target.metrics()["dropped_malformed_requests"] == 3
            answers = []
            for i in range(5):
                key, value = content_record(b"value %d" % i)
                raw = await client.request(target.host.peer_id, PROTOCOL, encode_request(
                    Request(MessageType.PUT_VALUE, key, value=value)))
                answers.append(decode_reply(raw, MessageType.PUT_VALUE).ok)
            assert answers == [True, True, True, False, False]
            assert target.metrics()["puts_refused_quota"] == 2
            assert target.metrics()["records_stored"] == 3

    run(main())


def test_concurrent_lookups_are_bounded() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            _, _, dhts = await start_network(stack, 6, max_lookups=2)
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, dhts[5].metrics()["lookups_in_flight"])
                    await asyncio.sleep(0)

            watcher = asyncio.ensure_future(watch())
            await asyncio.gather(*(dhts[5].get_closest_peers(os.urandom(8)) for _ in range(10)))
            watcher.cancel()
            assert peak == 2

    run(main())


def test_records_expire_and_are_republished() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            _, hosts, dhts = await start_network(
                stack, 4, record_ttl=0.6, republish_interval=0.2, maintenance_interval=0.1)
            key, value = content_record(b"short-lived")
            await dhts[0].put_value(key, value)
            await asyncio.sleep(1.2)  # twice the TTL: alive only because it is republished
            assert await dhts[3].get_value(key) == value
            assert dhts[0].metrics()["republished"] > 0
            await dhts[0].close()
            await hosts[0].close()
            await asyncio.sleep(1.0)  # no more republishing: the copies expire
            with pytest.raises(NotFoundError):
                await dhts[3].get_value(key)
            assert sum(d.metrics().get("records_expired", 0) for d in dhts[1:]) > 0

    run(main())


class Hostile:
    """A DHT node that joined honestly and then lies (one behaviour per node)."""

    def __init__(self, host: MessageHost, dht: KadDHT, behaviour: str) -> None:
        self.host, self.dht, self.behaviour = host, dht, behaviour
        self.answered = 0
        host.set_message_handler(PROTOCOL, self.answer)

    def answer(self, msg: Any) -> None:
        request = decode_request(msg.data, msg.from_peer)
        self.answered += 1
        if self.behaviour == "random peers":
            # Invented peers at unused ports: every query to them times out.
            msg.reply(encode_reply_page(request.type, request.page, closer=fake_peers(20)))
        elif self.behaviour == "oversized":
            variants = [
                dagcbor.encode({"type": int(request.type), "page": 0, "pages": MAX_PAGES + 3,
                                "closer": [], "providers": []}),
                dagcbor.encode({"type": int(request.type), "page": 0, "pages": 1,
                                "closer": [a for p in fake_peers(21) for a in p.addrs],
                                "providers": []}),
                os.urandom(600),
            ]
            msg.reply(variants[self.answered % len(variants)])
        elif request.type == MessageType.GET_VALUE:  # "invalid records"
            forged = dagcbor.encode({"seq": 1 << 62, "sig": os.urandom(64), "value": b"evil"})
            msg.reply(encode_reply_page(MessageType.GET_VALUE, 0, value=forged))
        else:
            msg.reply(encode_reply_page(request.type, request.page, closer=fake_peers(3)))


@pytest.mark.slow
def test_hostile_nodes_do_not_break_honest_lookups() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            # A lie costs a lookup at most one query's hard deadline: keep it short.
            keys, hosts, dhts = await start_network(stack, 19, first_contact_timeout=0.1,
                                                    max_query_timeout=0.25)
            hostile = [Hostile(h, d, b) for h, d, b in zip(
                hosts[-3:], dhts[-3:], ("random peers", "oversized", "invalid records"))]
            honest = dhts[:-3]
            # With 19 nodes and k=20, every lookup asks the hostile nodes too.
            for dht in honest:
                assert all(h.host.peer_id in dht.table for h in hostile)
            records = []
            for i in range(3):
                key, record = sign_record(keys[i], f"r{i}", b"value %d" % i)
                assert await honest[i].put_value(key, record) >= 10
                records.append((key, b"value %d" % i))
            slowest = 0.0
            for key, expected in records:
                for dht in honest[::4]:
                    started = time.monotonic()
                    value = await dht.get_value(key, quorum=6)
                    closest = await dht.get_closest_peers(key)
                    slowest = max(slowest, time.monotonic() - started)
                    assert PublicKeyValidator().decode(key, value).value == expected
                    assert len(closest.closest) >= 10, (closest, dht.metrics())
            # A get that wants a record from every node asks the hostile ones too (a get
            # with a small quorum may be done before it meets them).
            key, expected = records[0]
            value = await honest[5].get_value(key, quorum=len(dhts))
            assert PublicKeyValidator().decode(key, value).value == expected
            assert all(h.answered > 0 for h in hostile)
            # Two lookups, each delayed by at most a few hard deadlines (0.25 s).
            assert slowest < 2.0
            totals = {name: sum(d.metrics().get(name, 0) for d in honest)
                      for name in ("dropped_malformed_replies", "invalid_records_in",
                                   "queries_failed")}
            assert all(totals.values()), totals

    run(main(), timeout=120)


# --- 52 nodes in 4 processes ----------------------------------------------------------------------

PROCESSES = 4
PER_PROCESS = 13
CLUSTER_CONFIG = {**FAST, "refresh_interval": 1.0}


@pytest.mark.slow
def test_network_of_52_nodes_in_4_processes() -> None:
    """Puts readable from every node, providers found, O(log n) hops, then 25% churn."""
    n = PROCESSES * PER_PROCESS

    async def main() -> None:
        workers: list[ClusterProcess] = []
        try:
            workers.append(await ClusterProcess.spawn(PER_PROCESS, config=CLUSTER_CONFIG))
            seed = [workers[0].addrs[0]]
            workers += await asyncio.gather(*(ClusterProcess.spawn(
                PER_PROCESS, bootstrap=seed, config=CLUSTER_CONFIG)
                for _ in range(PROCESSES - 1)))
            nodes = [(w, i) for w in workers for i in range(PER_PROCESS)]

            # Every put is retrievable from every other node.
            puts = await asyncio.gather(*(w.call("put", node=i, name=f"k{j}", value=f"v{j}")
                                          for j, (w, i) in enumerate(nodes[::6])))
            # Replicated on (about) k peers; a loaded machine may time a few stores out.
            assert all(p["stored"] >= 10 for p in puts), [p["stored"] for p in puts]
            for j, put in enumerate(puts):  # one get per node at a time
                gets = await asyncio.gather(*(w.call("get", node=i, key=put["key"])
                                              for w, i in nodes))
                assert [g["value"] for g in gets] == [f"v{j}"] * n

            # Provider records are found from other processes.
            cids = [str(CID.of(b"content %d" % j)) for j in range(4)]
            providers = [nodes[j * 13 + 5] for j in range(4)]
            await asyncio.gather(*(w.call("provide", node=i, cid=c)
                                   for c, (w, i) in zip(cids, providers)))
            for cid, (w, i) in zip(cids, providers):
                expected_peer = w.nodes[i]["peer"]
                found = await asyncio.gather(*(other.call("providers", node=j, cid=cid)
                                               for other, j in nodes[1::5]))
                assert all(expected_peer in f["providers"] for f in found)

            # Lookups take O(log n) rounds.
            lookups = await asyncio.gather(*(w.call("lookup", node=i, key=os.urandom(8).hex())
                                             for w, i in nodes))
            bound = math.ceil(math.log2(n)) + 3
            assert max(r["hops"] for r in lookups) <= bound
            assert all(len(r["closest"]) == 20 for r in lookups)

            # Churn: a quarter of the nodes vanish at once.
            dead = {node["peer"] for node in workers[-1].nodes}
            workers[-1].kill()
            await workers[-1].process.wait()
            alive = [(w, i) for w, i in nodes if w is not workers[-1]]
            for j, put in enumerate(puts):
                gets = await asyncio.gather(*(w.call("get", node=i, key=put["key"])
                                              for w, i in alive))
                assert [g["value"] for g in gets] == [f"v{j}"] * len(alive)
            # Routing tables heal: refresh pings peers not heard from, dead ones leave.
            await asyncio.sleep(CLUSTER_CONFIG["refresh_interval"])
            for _ in range(2):
                await asyncio.gather(*(w.call("refresh") for w in workers[:-1]))
            tables = await asyncio.gather(*(w.call("table", node=i) for w, i in alive))
            assert not any(dead & set(t) for t in tables)
            assert min(len(t) for t in tables) >= 20
            lookups = await asyncio.gather(*(w.call("lookup", node=i, key=os.urandom(8).hex())
                                             for w, i in alive))
            assert all(not dead & set(r["closest"]) and len(r["closest"]) == 20
                       for r in lookups)
        finally:
            await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)

    run(main(), timeout=150)
