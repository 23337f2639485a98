"""A libp2p-style Kademlia DHT whose RPCs are msgnet request/response messages.

Each RPC is one ``host.request`` on :data:`~.wire.PROTOCOL` answered with
``Message.reply``: no stream, no multistream negotiation, and the sender of
every request is the peer its session proved, so routing tables and
provider records are keyed by authenticated identities.

Lookups are iterative: alpha parallel queries towards the k closest peers,
widened to all of the k closest once answers stop bringing closer peers
(the Kademlia paper's rule).  Each query has a *soft* deadline derived from
the RTT measured to that peer (``max(3*srtt, srtt + 4*rttvar, 50 ms)``;
first contacts, which include a handshake, get ``first_contact_timeout``):
past it the query stops holding one of the alpha slots and the lookup moves
on, while its reply is still used until the *hard* deadline,
``max_query_timeout`` (a few soft deadlines for a peer whose last query
failed, which is likely gone).  A peer that stalls, answers garbage or
invents peers therefore delays a lookup by at most one hard deadline, and
garbage gets it evicted from the routing table at once.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Self

from multiaddr import Multiaddr

from ..._engine import Message
from ...errors import MsgnetError, ProtocolResetError, UsageError
from ...host import MessageHost
from ...identity import PeerID
from ..dagcbor import CID, DagCborError, check_multihash
from .errors import InvalidRecordError, MalformedMessageError, NotFoundError, ValueTooLargeError
from .records import ProviderStore, RecordStore, Validator, default_validator, format_key
from .routing import PeerEntry, RoutingTable, kad_id, key_in_bucket
from .wire import (
    MAX_ADDR_SIZE,
    MAX_ADDRS_PER_PEER,
    MAX_KEY_SIZE,
    MAX_PEERS_PER_REPLY,
    MAX_PROVIDERS_PER_REPLY,
    MAX_VALUE_SIZE,
    PROTOCOL,
    MessageType,
    PeerInfo,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply_page,
    encode_request,
    peer_of_addr,
)

__all__ = ["KadConfig", "KadDHT", "LookupResult"]

log = logging.getLogger("msgnet.kad")

_KID_CACHE_SIZE = 8192
BOOTSTRAP_ATTEMPTS = 3
# The hard deadline of a query to a peer whose last query failed, in soft ones.
HARD_TIMEOUT_FACTOR = 4

# Every counter, present (at zero) from the start so that metrics keep one shape.
COUNTERS = (
    "requests_in", "dropped_malformed_requests", "dropped_bad_addrs", "requests_out",
    "dropped_malformed_replies", "invalid_records_in", "queries_ok", "queries_failed",
    "queries_refused", "queries_slow", "lookups", "lookup_deadlines", "liveness_pings",
    "routing_table_added", "routing_table_evicted", "puts_refused_quota",
    "providers_refused_quota", "records_expired", "providers_expired", "refreshes",
    "republished", "stale_records_corrected",
)
# Metrics that are current values rather than running totals.
GAUGES = frozenset({"routing_table_peers", "records_stored", "provider_entries",
                    "lookups_in_flight"})


@dataclass(frozen=True)
class KadConfig:
    """Tunables; the defaults follow libp2p's Kad-DHT where it has one."""

    k: int = 20
    alpha: int = 3
    # GET_VALUE stops once this many valid records were seen (then selects the best).
    quorum: int = 3
    min_query_timeout: float = 0.05
    # First contact includes a handshake: no RTT is known yet.
    first_contact_timeout: float = 0.25
    max_query_timeout: float = 2.0
    lookup_timeout: float = 10.0
    max_queries_per_lookup: int = 200
    max_lookups: int = 32
    # Failed queries in a row before a peer leaves the routing table.
    evict_after_failures: int = 2
    max_liveness_checks: int = 16
    record_ttl: float = 36 * 3600.0
    provider_ttl: float = 48 * 3600.0
    republish_interval: float = 3600.0
    refresh_interval: float = 600.0
    max_refresh_cpl: int = 15
    maintenance_interval: float = 30.0
    max_records: int = 10_000
    max_records_per_peer: int = 100
    max_providers_per_key: int = 32
    max_provider_entries: int = 50_000

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_PEERS_PER_REPLY:
            raise UsageError(f"k must be within 1..{MAX_PEERS_PER_REPLY}")
        if not 3 <= self.alpha <= 10:
            raise UsageError("alpha must be within 3..10")
        if self.quorum < 1:
            raise UsageError("quorum must be at least 1")
        if not 0 < self.min_query_timeout <= self.max_query_timeout:
            raise UsageError("need 0 < min_query_timeout <= max_query_timeout")
        if not 0 <= self.max_refresh_cpl <= 20:
            raise UsageError("max_refresh_cpl must be within 0..20 (refresh grinds keys)")


@dataclass(frozen=True)
class LookupResult:
    """What a lookup found and what it cost."""

    closest: list[PeerInfo]  # the k closest peers that answered, nearest first
    queries: int
    failures: int
    hops: int  # rounds of the lookup: depth of the deepest peer that answered
    seconds: float


class _RttEstimator:
    """Smoothed RTT and its variation per peer (RFC 6298 weights), bounded LRU."""

    def __init__(self, capacity: int = 4096) -> None:
        self._peers: OrderedDict[PeerID, tuple[float, float]] = OrderedDict()
        self._capacity = capacity
        self.contacted: OrderedDict[PeerID, None] = OrderedDict()

    def sample(self, peer: PeerID, rtt: float) -> None:
        if peer not in self.contacted:
            # The first exchange included a handshake: not an RTT sample.
            self.contacted[peer] = None
            if len(self.contacted) > self._capacity:
                self.contacted.popitem(last=False)
            return
        old = self._peers.pop(peer, None)
        if old is None:
            srtt, rttvar = rtt, rtt / 2
        else:
            srtt, rttvar = old
            rttvar = 0.75 * rttvar + 0.25 * abs(srtt - rtt)
            srtt = 0.875 * srtt + 0.125 * rtt
        self._peers[peer] = (srtt, rttvar)
        if len(self._peers) > self._capacity:
            self._peers.popitem(last=False)

    def soft_timeout(self, peer: PeerID, config: KadConfig) -> float:
        stats = self._peers.get(peer)
        if stats is None:
            timeout = config.first_contact_timeout
        else:
            srtt, rttvar = stats
            timeout = max(3 * srtt, srtt + 4 * rttvar, config.min_query_timeout)
        return min(timeout, config.max_query_timeout)


_NEW, _INFLIGHT, _SLOW, _OK, _FAILED = range(5)

# Where a lookup candidate's addresses come from, which decides whether we
# believe them: the caller's bootstrap list, our routing table, or a reply.
_SEED, _TABLE, _REPLY = range(3)


class _Candidate:
    __slots__ = ("deadline", "depth", "distance", "info", "source", "state")

    def __init__(self, info: PeerInfo, source: int, distance: int, depth: int) -> None:
        self.info = info
        self.source = source
        self.distance = distance
        self.depth = depth
        self.state = _NEW
        self.deadline = 0.0


def _distance(candidate: _Candidate) -> int:
    return candidate.distance


# A lookup's reply callback: True stops the lookup (e.g. quorum reached).
ReplyHook = Callable[[PeerInfo, Reply], bool]


class KadDHT:
    """Kademlia over a :class:`~msgnet.host.MessageHost` (public API only).

    ``server=True`` answers DHT requests and advertises our addresses so
    other nodes add us to their routing tables; ``server=False`` (client
    mode, for short-lived tools) only asks.  Use ``async with`` or
    :meth:`start`/:meth:`close` inside a started host.
    """

    def __init__(self, host: MessageHost, *, config: KadConfig | None = None,
                 validator: Validator | None = None, server: bool = True) -> None:
        self.host = host
        self.config = config or KadConfig()
        self.validator: Validator = validator or default_validator()
        self.server = server
        self.table = RoutingTable(host.peer_id, self.config.k)
        self.records = RecordStore(self.config.max_records, self.config.max_records_per_peer)
        self.providers = ProviderStore(self.config.max_providers_per_key,
                                       self.config.max_provider_entries)
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._rtt = _RttEstimator()
        self._kids: dict[PeerID, int] = {}  # kad_id of peers met in lookups (bounded)
        self._own_addrs: tuple[bytes, ...] = ()
        self._seeds: list[PeerInfo] = []  # the bootstrap peers, to rejoin through
        self._own_values: dict[bytes, bytes] = {}  # what we put: republished
        self._own_provides: set[bytes] = set()
        self._lookup_slots = asyncio.Semaphore(self.config.max_lookups)
        self._lookups_in_flight = 0
        self._checks = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._next_refresh = 0.0
        self._next_republish = 0.0
        self._handlers: dict[MessageType, Callable[[PeerID, Request], bytes]] = {
            MessageType.FIND_NODE: self._handle_find_node,
            MessageType.GET_VALUE: self._handle_get_value,
            MessageType.PUT_VALUE: self._handle_put_value,
            MessageType.ADD_PROVIDER: self._handle_add_provider,
            MessageType.GET_PROVIDERS: self._handle_get_providers,
            MessageType.PING: self._handle_ping,
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Answer requests (server mode) and start refresh, expiry and republish."""
        self._own_addrs = tuple(a for a in (m.to_bytes() for m in self.host.addrs)
                                if len(a) <= MAX_ADDR_SIZE)[:MAX_ADDRS_PER_PEER]
        if self.server:
            self.host.set_message_handler(PROTOCOL, self._on_message)
        now = time.monotonic()
        self._next_refresh = now + self.config.refresh_interval
        self._next_republish = now + self.config.republish_interval
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        if self.server:
            self.host.remove_message_handler(PROTOCOL)
        tasks = list(self._tasks)
        if self._maintenance is not None:
            tasks.append(self._maintenance)
            self._maintenance = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- public operations -----------------------------------------------------------------

    async def bootstrap(self, addrs: Iterable[Multiaddr | str]) -> int:
        """Join through ``addrs`` (each with ``/p2p/``): look ourselves up, then refresh.

        Returns the number of peers in the routing table afterwards.
        """
        seeds = []
        for addr in addrs:
            raw = Multiaddr(str(addr)).to_bytes()
            try:
                seeds.append(PeerInfo(peer_of_addr(raw), (raw,)))
            except MalformedMessageError as exc:
                raise UsageError(f"bad bootstrap address {addr}: {exc}") from None
        self._seeds = seeds
        for _ in range(BOOTSTRAP_ATTEMPTS):  # a busy seed may miss the first deadline
            await self._lookup_self()
            if len(self.table):
                break
        await self.refresh(force=True)
        return len(self.table)

    async def _lookup_self(self) -> LookupResult:
        """Look up our own ID through the table and the bootstrap peers: finds our neighbours
        and tells them about us."""
        own = self.host.peer_id.to_bytes()
        return await self._lookup(self.table.local_kid, Request(MessageType.FIND_NODE, own),
                                  seeds=self._seeds)

    async def get_closest_peers(self, key: bytes) -> LookupResult:
        """The k peers closest to ``key`` (FIND_NODE lookup)."""
        _check_key(key)
        return await self._lookup(kad_id(key), Request(MessageType.FIND_NODE, key))

    async def find_peer(self, peer: PeerID) -> PeerInfo | None:
        """Addresses of ``peer``, from the table or by a lookup."""
        entry = self.table.get(peer)
        if entry is not None:
            return entry.info
        result = await self.get_closest_peers(peer.to_bytes())
        return next((p for p in result.closest if p.peer_id == peer), None)

    async def put_value(self, key: bytes, value: bytes) -> int:
        """Store ``value`` under ``key`` here and on the k closest peers; republished.

        Raises ValueTooLargeError past MAX_VALUE_SIZE and InvalidRecordError if
        the key's validator refuses it.  Returns how many remote peers stored it.
        """
        _check_key(key)
        if len(value) > MAX_VALUE_SIZE:
            raise ValueTooLargeError(
                f"value of {len(value)} bytes exceeds {MAX_VALUE_SIZE} "
                "(one datagram until reliable QoS lands)")
        self.validator.validate(key, value)
        self._own_values[key] = value
        self.records.put(key, value, self.host.peer_id, time.monotonic() + self.config.record_ttl)
        return await self._put_remote(key, value)

    async def get_value(self, key: bytes, *, quorum: int | None = None) -> bytes:
        """The best valid value for ``key`` (the validator's ``select``) or NotFoundError.

        Stops after ``quorum`` valid records; peers that returned an outdated
        record are sent the best one.
        """
        _check_key(key)
        quorum = quorum or self.config.quorum
        found: dict[PeerID, bytes] = {}
        local = self.records.get(key, time.monotonic())
        if local is not None:
            found[self.host.peer_id] = local

        valid = set(found.values())  # each distinct value is validated once

        def on_reply(peer: PeerInfo, reply: Reply) -> bool:
            value = reply.value
            if value is not None:
                if value not in valid:
                    try:
                        self.validator.validate(key, value)
                    except InvalidRecordError:
                        self._counters["invalid_records_in"] += 1
                        return False
                    valid.add(value)
                found[peer.peer_id] = value
            return len(found) >= quorum

        result = None
        if len(found) < quorum:
            result = await self._lookup(kad_id(key), Request(MessageType.GET_VALUE, key),
                                        on_reply)
        if not found:
            asked = "" if result is None else (
                f" ({len(result.closest)} peers answered, {result.failures} failed)")
            raise NotFoundError(f"no record for key {format_key(key)}{asked}")
        values = list(valid)
        best = values[0] if len(values) == 1 else values[self.validator.select(key, values)]
        stale = [p for p, v in found.items() if v != best and p != self.host.peer_id]
        for peer in stale:
            self._counters["stale_records_corrected"] += 1
            self._spawn(self._store_at(peer, key, best))
        return best

    async def provide(self, key: CID | bytes) -> int:
        """Announce us as a provider of ``key`` (a CID or a multihash); republished.

        Returns how many remote peers accepted the provider record.
        """
        mh = _provider_key(key)
        self._own_provides.add(mh)
        self.providers.add(mh, self.host.peer_id, self._own_addrs,
                           time.monotonic() + self.config.provider_ttl)
        return await self._provide_remote(mh)

    async def find_providers(self, key: CID | bytes, count: int = 20) -> list[PeerInfo]:
        """Up to ``count`` providers of ``key`` (a CID or a multihash)."""
        mh = _provider_key(key)
        found: dict[PeerID, PeerInfo] = {}
        for peer, addrs in self.providers.get(mh, time.monotonic(), count):
            found[peer] = PeerInfo(peer, addrs)

        def on_reply(_peer: PeerInfo, reply: Reply) -> bool:
            for provider in reply.providers:
                found.setdefault(provider.peer_id, provider)
            return len(found) >= count

        if len(found) < count:
            await self._lookup(kad_id(mh), Request(MessageType.GET_PROVIDERS, mh), on_reply)
        return list(found.values())[:count]

    async def refresh(self, *, force: bool = False) -> None:
        """Refresh stale buckets with random lookups and ping peers not heard from lately.

        ``force`` (as at bootstrap) looks up every bucket that is not full yet,
        however recently it was refreshed.
        """
        if not len(self.table) and self._seeds:
            await self._lookup_self()  # lost every peer (timeouts): join again
        now = time.monotonic()
        horizon = now - self.config.refresh_interval
        max_cpl = self.config.max_refresh_cpl
        buckets = (self.table.unfilled_buckets(max_cpl) if force
                   else self.table.stale_buckets(horizon, max_cpl))
        lookups = []
        for cpl in buckets:
            self.table.mark_refreshed(cpl, now)
            key = key_in_bucket(self.table.local_kid, cpl)
            lookups.append(self._lookup(kad_id(key), Request(MessageType.FIND_NODE, key)))
        # Not heard from for refresh_interval and no answer to a ping: gone.
        quiet = [e for e in self.table.entries() if e.last_seen < horizon]
        await asyncio.gather(*lookups, *(self._ping_entry(e, 1) for e in quiet))
        self._counters["refreshes"] += 1

    async def republish(self) -> None:
        """Put our own values and provider records again (before they expire elsewhere)."""
        now = time.monotonic()
        for key, value in self._own_values.items():
            self.records.put(key, value, self.host.peer_id, now + self.config.record_ttl)
        for mh in self._own_provides:
            self.providers.add(mh, self.host.peer_id, self._own_addrs,
                               now + self.config.provider_ttl)
        await asyncio.gather(*(self._put_remote(k, v) for k, v in self._own_values.items()),
                             *(self._provide_remote(mh) for mh in self._own_provides))
        self._counters["republished"] += len(self._own_values) + len(self._own_provides)

    async def ping(self, peer: PeerID, *, timeout: float | None = None) -> float:
        """Round-trip time of one DHT PING to ``peer``, in seconds."""
        start = time.monotonic()
        await self.host.request(peer, PROTOCOL, encode_request(Request(MessageType.PING)),
                                timeout=timeout or self.config.max_query_timeout)
        return time.monotonic() - start

    def metrics(self) -> dict[str, int]:
        """Counters (malformed drops, queries, lookups...) and gauges of this node."""
        counters = dict(self._counters)
        counters["routing_table_peers"] = len(self.table)
        counters["records_stored"] = len(self.records)
        counters["provider_entries"] = len(self.providers)
        counters["lookups_in_flight"] = self._lookups_in_flight
        return dict(sorted(counters.items()))

    def metrics_text(self) -> str:
        """:meth:`metrics` in the Prometheus text format, prefixed ``msgnet_kad_``."""
        lines = []
        for name, value in self.metrics().items():
            gauge = name in GAUGES
            metric = f"msgnet_kad_{name}" if gauge else f"msgnet_kad_{name}_total"
            lines.append(f"# TYPE {metric} {'gauge' if gauge else 'counter'}")
            lines.append(f"{metric} {value}")
        return "\n".join(lines) + "\n"

    # -- serving ---------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        """Answer one request synchronously (the engine's fast path: no task per message)."""
        counters = self._counters
        counters["requests_in"] += 1
        sender: PeerID = msg.from_peer
        try:
            if not msg.is_request:
                raise MalformedMessageError("not a request")
            request = decode_request(msg.data, sender)
        except MalformedMessageError as exc:
            counters["dropped_malformed_requests"] += 1
            log.debug("dropped malformed request from %s: %s", sender, exc)
            return
        if request.addrs:
            self._learn(sender, request.addrs)
        msg.reply(self._handlers[request.type](sender, request))

    def _closer_for(self, key: bytes, requester: PeerID) -> list[PeerInfo]:
        return [e.info for e in self.table.closest(kad_id(key), self.config.k, requester)]

    def _handle_find_node(self, sender: PeerID, request: Request) -> bytes:
        return encode_reply_page(MessageType.FIND_NODE, request.page,
                                 closer=self._closer_for(request.key, sender))

    def _handle_get_value(self, sender: PeerID, request: Request) -> bytes:
        value = self.records.get(request.key, time.monotonic())
        if value is not None:
            # The value fills the datagram; the requester learns closer peers from others.
            return encode_reply_page(MessageType.GET_VALUE, request.page,
                                     value=value if request.page == 0 else None)
        return encode_reply_page(MessageType.GET_VALUE, request.page,
                                 closer=self._closer_for(request.key, sender))

    def _handle_get_providers(self, sender: PeerID, request: Request) -> bytes:
        found = self.providers.get(request.key, time.monotonic(), MAX_PROVIDERS_PER_REPLY)
        return encode_reply_page(MessageType.GET_PROVIDERS, request.page,
                                 providers=[PeerInfo(p, a) for p, a in found],
                                 closer=self._closer_for(request.key, sender))

    def _handle_put_value(self, sender: PeerID, request: Request) -> bytes:
        key, value = request.key, request.value
        assert value is not None  # decode_request guarantees it for PUT_VALUE
        now = time.monotonic()
        current = self.records.get(key, now)
        if current != value:  # a value we hold was validated when it arrived
            try:
                self.validator.validate(key, value)
            except InvalidRecordError as exc:
                self._counters["invalid_records_in"] += 1
                return encode_reply_page(MessageType.PUT_VALUE, 0, ok=False, error=str(exc))
        if (current is not None and current != value
                and self.validator.select(key, [current, value]) == 0):
            return encode_reply_page(MessageType.PUT_VALUE, 0, ok=False,
                                     error="older than the stored record")
        if not self.records.has_room(key, sender):
            self._counters["puts_refused_quota"] += 1
            return encode_reply_page(MessageType.PUT_VALUE, 0, ok=False, error="storage quota")
        self.records.put(key, value, sender, now + self.config.record_ttl)
        return encode_reply_page(MessageType.PUT_VALUE, 0, ok=True)

    def _handle_add_provider(self, sender: PeerID, request: Request) -> bytes:
        stored = self.providers.add(request.key, sender, request.provider,
                                    time.monotonic() + self.config.provider_ttl)
        if not stored:
            self._counters["providers_refused_quota"] += 1
        return encode_reply_page(MessageType.ADD_PROVIDER, 0, ok=stored)

    def _handle_ping(self, sender: PeerID, request: Request) -> bytes:
        return encode_reply_page(MessageType.PING, 0)

    def _learn(self, peer: PeerID, addrs: tuple[bytes, ...]) -> None:
        """A DHT server contacted us with its addresses (proven to name it): remember it."""
        entry = self.table.get(peer)
        if entry is None or entry.addrs != addrs or peer not in self.host.peerstore:
            try:
                self._add_to_peerstore(peer, addrs, replace_known=True)
            except UsageError:  # the multiaddr package refused what our parser let through
                self._counters["dropped_bad_addrs"] += 1
                return
        self._seen(peer, addrs)

    # -- lookups ---------------------------------------------------------------------------

    async def _lookup(self, target: int, request: Request, on_reply: ReplyHook | None = None,
                      *, seeds: Sequence[PeerInfo] = ()) -> LookupResult:
        if not seeds and not len(self.table):
            seeds = self._seeds  # every peer was lost (timeouts): start over from the seeds
        async with self._lookup_slots:
            self._lookups_in_flight += 1
            self._counters["lookups"] += 1
            try:
                return await self._run_lookup(target, request, on_reply, seeds)
            finally:
                self._lookups_in_flight -= 1

    async def _run_lookup(self, target: int, request: Request, on_reply: ReplyHook | None,
                          seeds: Sequence[PeerInfo]) -> LookupResult:
        config = self.config
        loop = asyncio.get_running_loop()
        started_at = time.perf_counter()  # loop.time() is only ms-precise on uvloop
        deadline = loop.time() + config.lookup_timeout
        me = self.host.peer_id
        candidates: dict[PeerID, _Candidate] = {}
        order: list[_Candidate] = []  # every candidate, nearest first

        def add(info: PeerInfo, source: int, depth: int) -> None:
            known = candidates.get(info.peer_id)
            if known is not None:
                known.depth = min(known.depth, depth)
            elif info.peer_id != me:
                candidate = _Candidate(info, source, self._kid(info.peer_id) ^ target, depth)
                candidates[info.peer_id] = candidate
                bisect.insort(order, candidate, key=_distance)

        # The table's closest peers come sorted already: no insertion one by one.
        order += [_Candidate(e.info, _TABLE, e.kid ^ target, 1)
                  for e in self.table.closest(target, config.k)]
        candidates.update((c.info.peer_id, c) for c in order)
        for info in seeds:
            add(info, _SEED, 1)

        if self.server and self._own_addrs:
            request = replace(request, addrs=self._own_addrs)
        data = encode_request(request)  # the same bytes for every peer asked
        tasks: dict[asyncio.Task[Reply], _Candidate] = {}
        queries = failures = 0
        # Kademlia's widening rule: once answers stop bringing peers closer than
        # the closest seen (alpha answers in a row), ask all of the k closest
        # not yet asked at once instead of alpha at a time.
        nearest = order[0].distance if order else 0
        stalled = 0
        stop = False
        try:
            while not stop:
                now = loop.time()
                if now >= deadline:
                    self._counters["lookup_deadlines"] += 1
                    break
                active = 0
                wake = deadline
                for candidate in tasks.values():
                    if candidate.state == _INFLIGHT:
                        if now >= candidate.deadline:
                            candidate.state = _SLOW  # keeps running, holds no slot
                            self._counters["queries_slow"] += 1
                        else:
                            active += 1
                            wake = min(wake, candidate.deadline)
                width = config.k if stalled >= config.alpha else config.alpha
                waiting = False  # some of the k closest are (or wait to be) asked
                seen = 0
                for candidate in order:
                    if candidate.state == _FAILED:
                        continue
                    if candidate.state == _NEW and queries < config.max_queries_per_lookup:
                        waiting = True
                        if active < width:
                            soft = self._rtt.soft_timeout(candidate.info.peer_id, config)
                            candidate.state = _INFLIGHT
                            candidate.deadline = now + soft
                            wake = min(wake, candidate.deadline)
                            hard = self._hard_timeout(candidate.info.peer_id, soft)
                            task = loop.create_task(self._query(
                                candidate.info, candidate.source, request, data, hard))
                            tasks[task] = candidate
                            queries += 1
                            active += 1
                    elif candidate.state in (_INFLIGHT, _SLOW):
                        # A slow peer among the k closest is waited for (up to its
                        # hard deadline) but no longer holds up other queries.
                        waiting = True
                    seen += 1
                    if seen == config.k:
                        break
                if not waiting:
                    break  # the k closest have all answered or failed
                done, _ = await asyncio.wait(tasks, timeout=max(wake - now, 0),
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    candidate = tasks.pop(task)
                    reply = self._query_outcome(task, candidate.info.peer_id)
                    stalled += 1
                    if reply is None:
                        candidate.state = _FAILED
                        failures += 1
                        continue
                    candidate.state = _OK
                    for info in reply.closer:
                        add(info, _REPLY, candidate.depth + 1)
                    if order[0].distance < nearest:
                        nearest, stalled = order[0].distance, 0
                    if on_reply is not None and on_reply(candidate.info, reply):
                        stop = True
        finally:
            for task in tasks:  # slow queries, or any left when the lookup stopped early
                task.cancel()
                task.add_done_callback(_consume)
        answered = [c for c in order if c.state == _OK]
        return LookupResult(
            closest=[self._best_info(c.info) for c in answered[:config.k]],
            queries=queries,
            failures=failures,
            hops=max((c.depth for c in answered), default=0),
            seconds=time.perf_counter() - started_at,
        )

    def _best_info(self, info: PeerInfo) -> PeerInfo:
        """The table's entry (addresses the peer advertised) over what a reply said."""
        entry = self.table.get(info.peer_id)
        return info if entry is None else entry.info

    def _hard_timeout(self, peer: PeerID, soft: float) -> float:
        """How long a query may run at all: max_query_timeout, as a loaded peer may need
        it, unless the peer failed its last query (then likely dead: a few soft ones)."""
        entry = self.table.get(peer)
        if entry is not None and entry.failures:
            return min(HARD_TIMEOUT_FACTOR * soft, self.config.max_query_timeout)
        return self.config.max_query_timeout

    def _kid(self, peer: PeerID) -> int:
        """kad_id of a peer, cached: lookups meet the same peers again and again."""
        kid = self._kids.get(peer)
        if kid is None:
            if len(self._kids) >= _KID_CACHE_SIZE:
                self._kids.clear()
            kid = self._kids[peer] = kad_id(peer.to_bytes())
        return kid

    def _query_outcome(self, task: asyncio.Task[Reply], peer: PeerID) -> Reply | None:
        """The reply of a finished query, or None after counting why it failed."""
        exc = task.exception()
        if exc is None:
            self._counters["queries_ok"] += 1
            return task.result()
        if isinstance(exc, MalformedMessageError):
            self._counters["dropped_malformed_replies"] += 1
            self._failed(peer, 1)  # garbage is not an accident: evict at once
        elif isinstance(exc, ProtocolResetError):
            self._counters["queries_refused"] += 1
            self._failed(peer, 1)  # not a DHT server
        elif isinstance(exc, MsgnetError):
            self._counters["queries_failed"] += 1
            self._failed(peer, self.config.evict_after_failures)
        else:
            raise exc
        log.debug("query to %s failed: %s", peer, exc)
        return None

    async def _query(self, info: PeerInfo, source: int, request: Request, data: bytes,
                     timeout: float) -> Reply:
        """One RPC to ``info`` (``data`` is ``request`` encoded) with all its reply pages.

        The peer joins our table on success.  Addresses from a reply are
        believed only if they are the ones we dialed (the peer was unknown):
        a successful query then proves them.
        """
        peer = info.peer_id
        added = self._add_to_peerstore(peer, info.addrs, replace_known=source == _SEED)
        verified = info.addrs if source != _REPLY or added else ()
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = await self._rpc(peer, request, data, timeout)
        self._rtt.sample(peer, loop.time() - started)
        if first.pages > 1:
            rest = await asyncio.gather(*(self._rpc(peer, replace(request, page=n), None, timeout)
                                          for n in range(1, first.pages)))
            first = _merge_pages(first, rest)
        # A peer already in the table keeps the addresses it advertised itself.
        self._seen(peer, () if peer in self.table else verified)
        return first

    async def _rpc(self, peer: PeerID, request: Request, data: bytes | None = None,
                   timeout: float | None = None) -> Reply:
        self._counters["requests_out"] += 1
        raw = await self.host.request(peer, PROTOCOL, data or encode_request(request),
                                      timeout=timeout or self.config.max_query_timeout)
        return decode_reply(raw, request.type, request.page)

    # -- routing table upkeep -----------------------------------------------------------------

    def _seen(self, peer: PeerID, addrs: tuple[bytes, ...]) -> None:
        known = peer in self.table
        oldest = self.table.seen(peer, addrs)
        if not known and peer in self.table:
            self._counters["routing_table_added"] += 1
        if oldest is not None:
            if self._checks >= self.config.max_liveness_checks:
                self.table.check_done(oldest)
            else:
                self._spawn(self._liveness_check(oldest))

    async def _liveness_check(self, entry: PeerEntry) -> None:
        """Ping a full bucket's least-recently-seen peer; evict it if it is gone."""
        self._checks += 1
        try:
            await self._ping_entry(entry, evict_after=1)
        finally:
            self._checks -= 1
            self.table.check_done(entry)

    async def _ping_entry(self, entry: PeerEntry, evict_after: int) -> None:
        if await self._alive(entry.peer_id):
            self.table.seen(entry.peer_id, ())
        else:
            self._failed(entry.peer_id, evict_after)

    async def _alive(self, peer: PeerID) -> bool:
        self._counters["liveness_pings"] += 1
        try:
            await self._rpc(peer, Request(MessageType.PING))
        except MsgnetError:
            return False
        return True

    def _failed(self, peer: PeerID, evict_after: int) -> None:
        """Count a failure of ``peer``; once evicted, refill its bucket from live candidates."""
        evicted = self.table.failed(peer, evict_after=evict_after)
        if evicted is not None:
            self._counters["routing_table_evicted"] += 1
            self._spawn(self._promote(evicted.kid))

    async def _promote(self, kid: int) -> None:
        """Move the newest replacement candidate that still answers into ``kid``'s bucket."""
        while (candidate := self.table.take_replacement(kid)) is not None:
            if await self._alive(candidate.peer_id):
                self._seen(candidate.peer_id, candidate.addrs)
                return

    def _add_to_peerstore(self, peer: PeerID, addrs: tuple[bytes, ...], *,
                          replace_known: bool = False) -> bool:
        """Make ``addrs`` dialable unless we already know where ``peer`` is; True if added.

        Addresses from third parties never override known ones: a lying peer
        could otherwise point us at the wrong place for an honest one.  Only
        the peer itself or the caller's bootstrap list (``replace_known``)
        update known addresses.
        """
        if peer in self.host.peerstore and not replace_known:
            return False
        for addr in reversed(addrs):  # the peerstore keeps the newest first
            self.host.add_peer(Multiaddr(addr), peer)
        return True

    # -- storing -------------------------------------------------------------------------------

    async def _put_remote(self, key: bytes, value: bytes) -> int:
        result = await self._lookup(kad_id(key), Request(MessageType.FIND_NODE, key))
        stored = await asyncio.gather(*(self._store_at(p.peer_id, key, value)
                                        for p in result.closest))
        return sum(stored)

    async def _store_at(self, peer: PeerID, key: bytes, value: bytes) -> bool:
        try:
            reply = await self._rpc(peer, Request(MessageType.PUT_VALUE, key, value=value))
        except MalformedMessageError:
            self._counters["dropped_malformed_replies"] += 1
            return False
        except MsgnetError:
            return False
        return bool(reply.ok)

    async def _provide_remote(self, mh: bytes) -> int:
        result = await self._lookup(kad_id(mh), Request(MessageType.FIND_NODE, mh))
        request = Request(MessageType.ADD_PROVIDER, mh, provider=self._own_addrs)

        async def announce(peer: PeerID) -> bool:
            try:
                return bool((await self._rpc(peer, request)).ok)
            except MsgnetError:
                return False

        return sum(await asyncio.gather(*(announce(p.peer_id) for p in result.closest)))

    # -- maintenance --------------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Expire, refresh and republish on schedule; an error is logged, never fatal."""
        while True:
            await asyncio.sleep(self.config.maintenance_interval)
            now = time.monotonic()
            try:
                self._counters["records_expired"] += self.records.expire(now)
                self._counters["providers_expired"] += self.providers.expire(now)
                if now >= self._next_refresh:
                    self._next_refresh = now + self.config.refresh_interval
                    await self.refresh()
                if now >= self._next_republish:
                    self._next_republish = now + self.config.republish_interval
                    await self.republish()
            except Exception:  # keep maintaining: one bad round must not stop the node
                log.exception("DHT maintenance failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve the outcome of a query nobody waits for any more (no "never retrieved")."""
    if not task.cancelled():
        task.exception()


def _merge_pages(first: Reply, rest: Sequence[Reply]) -> Reply:
    """One reply from its pages: peers deduplicated, totals still within the wire limits."""
    closer = {p.peer_id: p for page in (first, *rest) for p in page.closer}
    providers = {p.peer_id: p for page in (first, *rest) for p in page.providers}
    if len(closer) > MAX_PEERS_PER_REPLY or len(providers) > MAX_PROVIDERS_PER_REPLY:
        raise MalformedMessageError("reply pages name more peers than one reply may")
    return replace(first, closer=list(closer.values()), providers=list(providers.values()))


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or not key:
        raise UsageError("a DHT key must be non-empty bytes")
    if len(key) > MAX_KEY_SIZE:
        raise ValueTooLargeError(f"key of {len(key)} bytes exceeds {MAX_KEY_SIZE}")


def _provider_key(key: CID | bytes) -> bytes:
    """Providers are keyed by multihash, as in libp2p (any CID version maps to one key)."""
    if isinstance(key, CID):
        return key.multihash
    try:
        return check_multihash(bytes(key))
    except DagCborError as exc:
        raise UsageError(f"provider key must be a CID or a multihash: {exc}") from None
