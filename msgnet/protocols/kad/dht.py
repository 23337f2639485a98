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

Where the time goes (20 nodes in one process, ``benchmarks/bench_kad.py``): a
put is a lookup (k FIND_NODE queries once the network is that small) and k
PUT_VALUE requests, 40 round trips, so every per-request cost counts:

* queries are :meth:`MessageHost.request_callback` requests driven by their
  callbacks (:class:`_Lookup`), not a task or even a future each; a put's k
  stores go out in one loop iteration, encoded once, and their replies are
  counted as they come (the usual ones recognised by their bytes, not decoded);
* a FIND_NODE reply whose peers do not depend on the key (the whole table
  when it is small, else a full bucket: :meth:`KadDHT._known_closer_reply`)
  is encoded once per table state, and the requester decodes the same bytes
  once (``KadDHT._decode_reply``); the usual requests and value replies are
  read by exact-form fast paths in :mod:`.wire`;
* a signature is checked once per record and node (``KadDHT._validate``);
  content-addressed (``/ipld/``) records are only hashed, and a get of one
  stops at the first valid value, which is the only one there can be;
* a FIND_NODE lookup's answer is reused by a store of the same key soon after
  (``lookup_cache_ttl``);
* a PeerID made from the same bytes is the same object (``identity.PeerID``
  interns them), so the table, the peerstore, the host's sessions and the
  replies' PeerInfos find one another by identity; the table and peerstore
  lookups made per message are their dicts' own C methods (``RoutingTable.get``,
  ``Peerstore.knows``).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from operator import itemgetter
from types import TracebackType
from typing import Any, Self

from multiaddr import Multiaddr

from ..._engine import Message
from ...errors import MsgnetError, ProtocolResetError, UsageError
from ...host import MessageHost, PendingRequest
from ...identity import PeerID
from ...peerstore import Peerstore
from ..dagcbor import CID, DagCborError, check_multihash
from .errors import InvalidRecordError, MalformedMessageError, NotFoundError, ValueTooLargeError
from .records import (
    NO_ROOM,
    ProviderStore,
    RecordStore,
    Validator,
    default_validator,
    format_key,
)
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
    _decode_request,
    _fast_request,
    decode_reply,
    encode_closer_page,
    encode_reply_page,
    encode_request,
    encode_value_reply,
    peer_of_addr,
)

__all__ = ["KadConfig", "KadDHT", "LookupResult"]

log = logging.getLogger("msgnet.kad")

_KID_CACHE_SIZE = 8192
# Recent FIND_NODE answers kept for stores of the same key, and records known valid.
_LOOKUP_CACHE_SIZE = 256
_VALID_CACHE_SIZE = 4096
# Encoded replies whose peers do not depend on the key (see _known_closer_reply).
_REPLY_CACHE_SIZE = 1024
# Decoded replies by their bytes (each at most MAX_MESSAGE bytes).
_DECODED_CACHE_SIZE = 128
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
    "republished", "stale_records_corrected", "lookups_reused", "validations",
    "validations_cached",
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
    # A store (put, provide, republish) reuses a FIND_NODE lookup of the same key this
    # recent (0 turns it off); a failed store forgets it.
    lookup_cache_ttl: float = 10.0
    # A record this node validated is not validated again (signature checked once per
    # node) for this long; validators must depend on the key and value only.
    validation_cache_ttl: float = 600.0

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
    """Smoothed RTT and its variation per peer (RFC 6298 weights), and the soft query
    timeout they give, computed once per sample; bounded (the oldest peer goes first)."""

    def __init__(self, config: KadConfig, capacity: int = 4096) -> None:
        self._first = min(config.first_contact_timeout, config.max_query_timeout)
        self._min = config.min_query_timeout
        self._max = config.max_query_timeout
        # A peer contacted once: that exchange included a handshake, so no RTT sample.
        self._contacted = (-1.0, -1.0, self._first)
        # peer -> (srtt, rttvar, soft timeout), or _contacted.
        self._peers: dict[PeerID, tuple[float, float, float]] = {}
        self._capacity = capacity

    def sample(self, peer: PeerID, rtt: float) -> None:
        peers = self._peers
        old = peers.get(peer)
        if old is None:
            peers[peer] = self._contacted
            if len(peers) > self._capacity:
                del peers[next(iter(peers))]
            return
        if old is self._contacted:
            srtt, rttvar = rtt, rtt / 2
        else:
            srtt, rttvar, _ = old
            rttvar = 0.75 * rttvar + 0.25 * abs(srtt - rtt)
            srtt = 0.875 * srtt + 0.125 * rtt
        soft = min(max(3 * srtt, srtt + 4 * rttvar, self._min), self._max)
        peers[peer] = (srtt, rttvar, soft)

    def soft_timeout(self, peer: PeerID) -> float:
        """``max(3*srtt, srtt + 4*rttvar, min_query_timeout)``, first_contact_timeout for a
        peer without a sample, both capped at max_query_timeout."""
        stats = self._peers.get(peer)
        return self._first if stats is None else stats[2]


_NEW, _INFLIGHT, _SLOW, _OK, _FAILED = range(5)

# Where a lookup candidate's addresses come from, which decides whether we
# believe them: the caller's bootstrap list, our routing table, or a reply.
_SEED, _TABLE, _REPLY = range(3)

# A lookup candidate is a plain list (a lookup makes k of them and often asks
# only alpha: a list costs a fifth of a slotted object to build), indexed by:
_DIST = 0  # XOR distance to the target
_STATE = 1  # _NEW ... _FAILED
_INFO = 2  # PeerInfo
_SOURCE = 3  # _SEED, _TABLE or _REPLY
_DEPTH = 4  # round of the lookup that found it (1: table and seeds)
_DEADLINE = 5  # soft deadline of its query
_SENT = 6  # when its query was sent (loop time)
_VERIFIED = 7  # addresses a successful query proves

_Candidate = list  # [distance, state, info, source, depth, deadline, sent, verified]
# A remembered reply's PeerInfos by their ids, and those ids as a set (for subset tests).
_ReplyIds = tuple[dict[int, PeerInfo], frozenset[int]]
_by_distance = itemgetter(_DIST)


# A lookup's reply callback: True stops the lookup (e.g. quorum reached).
ReplyHook = Callable[[PeerInfo, Reply], bool]


class _Lookup:
    """One iterative lookup, driven by the replies' callbacks.

    Every query is a :meth:`MessageHost.request_callback` whose callback
    processes the reply as it is dispatched; the replies that arrive together are all
    taken in before the next queries go out (:meth:`kick`).  No task per
    query, no ``asyncio.wait`` over all of them per reply.  One timer
    (re-armed for the earliest soft deadline) turns late queries into slow
    ones; ``done`` resolves with the :class:`LookupResult`.
    """

    __slots__ = (
        "candidates",
        "complete",
        "config",
        "data",
        "deadline",
        "dht",
        "done",
        "failures",
        "inflight",
        "loop",
        "me",
        "nearest",
        "on_reply",
        "order",
        "pump_soon",
        "queries",
        "request",
        "seconds",
        "seen_ids",
        "seen_infos",
        "stalled",
        "started_at",
        "target",
        "timer",
        "timer_at",
    )

    def __init__(self, dht: KadDHT, target: int, request: Request,
                 on_reply: ReplyHook | None, seeds: Sequence[PeerInfo]) -> None:
        self.dht = dht
        self.config = config = dht.config
        self.loop = loop = asyncio.get_running_loop()
        self.started_at = time.perf_counter()  # loop.time() is only ms-precise on uvloop
        self.deadline = loop.time() + config.lookup_timeout
        self.target = target
        self.request = request
        self.data = encode_request(request)  # the same bytes for every peer asked
        self.on_reply = on_reply
        self.me = dht.host.peer_id
        # Every candidate, nearest first.  The table's closest peers come sorted.
        self.order: list[_Candidate] = [[d, _NEW, e.info, _TABLE, 1, 0.0, 0.0, ()]
                                        for d, e in dht.table.closest_by_distance(target,
                                                                                  config.k)]
        # Candidates by peer, built when a reply first names peers (a get answered
        # with the value never needs it).
        self.candidates: dict[PeerID, _Candidate] | None = None
        # The ids of the PeerInfos named by replies so far (see add_reply_peers), and
        # those PeerInfos, kept alive so that their ids stay unique.
        self.seen_ids: set[int] = set()
        self.seen_infos: list[PeerInfo] = []
        for info in seeds:
            self.add(info, _SEED, 1)
        # The queries out (reply futures, or tasks fetching more pages) and their candidates.
        self.inflight: dict[PendingRequest | asyncio.Task[Any], _Candidate] = {}
        self.queries = self.failures = 0
        # Kademlia's widening rule: once answers stop bringing peers closer than
        # the closest seen (alpha answers in a row), ask all of the k closest
        # not yet asked at once instead of alpha at a time.
        self.nearest = self.order[0][_DIST] if self.order else 0
        self.stalled = 0
        self.complete = False  # ran until the k closest answered (not stopped, no deadline)
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf
        self.pump_soon = False
        self.seconds = 0.0
        self.done: asyncio.Future[None] = loop.create_future()

    def add(self, info: PeerInfo, source: int, depth: int) -> _Candidate | None:
        candidates = self.candidates
        if candidates is None:
            candidates = self.candidates = {c[_INFO].peer_id: c for c in self.order}
        known = candidates.get(info.peer_id)
        if known is not None:
            known[_DEPTH] = min(known[_DEPTH], depth)
            return known
        if info.peer_id == self.me:
            return None
        candidate = [self.dht._kid(info.peer_id) ^ self.target, _NEW, info, source, depth,
                     0.0, 0.0, ()]
        candidates[info.peer_id] = candidate
        bisect.insort(self.order, candidate, key=_by_distance)
        return candidate

    def add_reply_peers(self, peers: list[PeerInfo], depth: int, ids: _ReplyIds | None
                        ) -> None:
        """Take in the peers a reply names (``ids``: the same by their PeerInfos' ids, as
        a dict and a set, when the reply was remembered).

        Replies share their PeerInfo objects (wire.py caches them by address), so the
        peers already met are told apart by identity, and a remembered reply brings them
        by id: a subset test (see answered) or a set difference finds what is new without
        visiting the rest.  A peer keeps the depth at which it was first named.
        """
        seen = self.seen_ids
        if ids is not None:
            by_id, id_set = ids
            infos: Iterable[PeerInfo] = [by_id[key] for key in id_set - seen]
        else:
            infos = [info for info in peers if id(info) not in seen]
        for info in infos:
            seen.add(id(info))
            self.seen_infos.append(info)  # kept alive: its id stays unique
            self.add(info, _REPLY, depth)

    def pump(self) -> None:
        """Send the queries the state allows, or finish; re-arm the timer."""
        if self.done.done():
            return
        config = self.config
        now = self.loop.time()
        if now >= self.deadline:
            self.dht._counters["lookup_deadlines"] += 1
            self.finish()
            return
        active = 0
        wake = self.deadline
        for candidate in self.inflight.values():
            if candidate[_STATE] == _INFLIGHT:
                if now >= candidate[_DEADLINE]:
                    candidate[_STATE] = _SLOW  # keeps running, holds no slot
                    self.dht._counters["queries_slow"] += 1
                else:
                    active += 1
                    wake = min(wake, candidate[_DEADLINE])
        width = config.k if self.stalled >= config.alpha else config.alpha
        waiting = False  # some of the k closest are (or wait to be) asked
        seen = 0
        for candidate in self.order:
            state = candidate[_STATE]
            if state == _FAILED:
                continue
            if state == _NEW and self.queries < config.max_queries_per_lookup:
                waiting = True
                if active < width:
                    if not self.send(candidate, now):
                        continue  # failed at once: the next candidate takes the slot
                    active += 1
                    wake = min(wake, candidate[_DEADLINE])
            elif state == _INFLIGHT or state == _SLOW:
                # A slow peer among the k closest is waited for (up to its hard
                # deadline) but no longer holds up other queries.
                waiting = True
            seen += 1
            if seen == config.k:
                break
        if not waiting:
            self.complete = True  # the k closest have all answered or failed
            self.finish()
            return
        if wake < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = wake
            self.timer = self.loop.call_at(wake, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = math.inf
        self.pump()

    def kick(self) -> None:
        """Pump once the replies that arrived together are all in: a get whose quorum
        they complete then sends no query it would not wait for."""
        if not self.pump_soon:
            self.pump_soon = True
            self.loop.call_soon(self._pump_now)

    def _pump_now(self) -> None:
        self.pump_soon = False
        self.pump()

    def send(self, candidate: _Candidate, now: float) -> bool:
        """Query ``candidate``; False if that failed at once (no address, refused...)."""
        dht = self.dht
        info = candidate[_INFO]
        peer = info.peer_id
        soft = dht._rtt.soft_timeout(peer)
        candidate[_STATE] = _INFLIGHT
        candidate[_DEADLINE] = now + soft
        candidate[_SENT] = now
        self.queries += 1
        dht._counters["requests_out"] += 1
        source = candidate[_SOURCE]
        try:
            if source == _TABLE and dht._peerstore.knows(peer):
                candidate[_VERIFIED] = info.addrs  # the usual case: nothing to add
            elif source == _REPLY:
                # Addresses from a reply are believed only if they are the ones we dial
                # (the peer was unknown): a successful query then proves them.
                if dht._add_to_peerstore(peer, info.addrs):
                    candidate[_VERIFIED] = info.addrs
            else:
                dht._add_to_peerstore(peer, info.addrs, replace_known=source == _SEED)
                candidate[_VERIFIED] = info.addrs
            future = dht.host.request_callback(peer, PROTOCOL, self.data, self._on_reply,
                                               timeout=dht._hard_timeout(peer, soft))
        except MsgnetError as exc:
            self.failed(candidate, exc)
            return False
        self.inflight[future] = candidate
        return True

    def _on_reply(self, future: PendingRequest) -> None:
        if self.done.done():
            _consume(future)
            return
        candidate = self.inflight.pop(future)
        try:
            if future.cancelled():
                self.failed(candidate, asyncio.CancelledError())
            elif (exc := future.exception()) is not None:
                self.failed(candidate, exc)
            else:
                try:
                    reply, ids = self.dht._decode_reply(future.result(), self.request.type)
                except MalformedMessageError as bad:
                    self.failed(candidate, bad)
                else:
                    peer = candidate[_INFO].peer_id
                    self.dht._rtt.sample(peer, self.loop.time() - candidate[_SENT])
                    if reply.pages > 1:  # fetch the rest before the reply counts
                        task = self.loop.create_task(self.dht._rest_pages(
                            peer, self.request, reply, self.config.max_query_timeout))
                        self.inflight[task] = candidate
                        task.add_done_callback(self._on_pages)
                        return
                    if self.answered(candidate, reply, ids):
                        return
            if not self.pump_soon:
                self.kick()
        except Exception as exc:  # noqa: BLE001 - a bug (or a validator's): fail the lookup
            self.abort(exc)

    def _on_pages(self, task: asyncio.Task[Reply]) -> None:
        if self.done.done():
            _consume(task)
            return
        candidate = self.inflight.pop(task)
        try:
            if task.cancelled():
                self.failed(candidate, asyncio.CancelledError())
            elif (exc := task.exception()) is not None:
                self.failed(candidate, exc)
            elif self.answered(candidate, task.result(), None):
                return
            self.kick()
        except Exception as exc:  # noqa: BLE001 - as in _on_reply
            self.abort(exc)

    def answered(self, candidate: _Candidate, reply: Reply, ids: _ReplyIds | None) -> bool:
        """Take a reply in; True if the reply hook stopped the lookup."""
        dht = self.dht
        info = candidate[_INFO]
        # A peer already in the table keeps the addresses it advertised itself.
        if not dht.table.touch_known(info.peer_id):
            dht._seen(info.peer_id, candidate[_VERIFIED])
        dht._counters["queries_ok"] += 1
        candidate[_STATE] = _OK
        self.stalled += 1
        if reply.closer:
            # Most replies name only peers met already: add_reply_peers' first test.
            if ids is None or not ids[1] <= self.seen_ids:
                self.add_reply_peers(reply.closer, candidate[_DEPTH] + 1, ids)
            if self.order[0][_DIST] < self.nearest:
                self.nearest, self.stalled = self.order[0][_DIST], 0
        if self.on_reply is not None and self.on_reply(info, reply):
            self.finish()
            return True
        return False

    def failed(self, candidate: _Candidate, exc: BaseException) -> None:
        candidate[_STATE] = _FAILED
        self.failures += 1
        self.stalled += 1
        self.dht._query_failed(candidate[_INFO].peer_id, exc)

    def finish(self) -> None:
        """Resolve ``done``.  The queries still out are cancelled by :meth:`close` once
        the caller has resumed (their cancellation callbacks would otherwise run before
        it), and the :class:`LookupResult` is built by :meth:`result` if it is wanted."""
        if self.done.done():
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = math.inf
        self.seconds = time.perf_counter() - self.started_at
        self.done.set_result(None)

    def answered_count(self) -> int:
        return sum(1 for c in self.order if c[_STATE] == _OK)

    def result(self) -> LookupResult:
        answered = [c for c in self.order if c[_STATE] == _OK]
        table_entry = self.dht.table.get
        # What the table holds (addresses the peer advertised) over what a reply said.
        return LookupResult(
            closest=[c[_INFO] if (e := table_entry(c[_INFO].peer_id)) is None else e.info
                     for c in answered[:self.config.k]],
            queries=self.queries,
            failures=self.failures,
            hops=max([c[_DEPTH] for c in answered], default=0),
            seconds=self.seconds,
        )

    def abort(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        self.close()

    def close(self) -> None:
        """Stop the timer and cancel the queries still out (slow ones, or after a stop)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = math.inf
        for future in self.inflight:
            future.cancel()
        self.inflight.clear()


_FIND_NODE = MessageType.FIND_NODE

# Replies that are the same bytes every time.
_PUT_OK = encode_reply_page(MessageType.PUT_VALUE, 0, ok=True)
_PUT_REFUSED_QUOTA = encode_reply_page(MessageType.PUT_VALUE, 0, ok=False, error="storage quota")
_PUT_REFUSED_OLDER = encode_reply_page(MessageType.PUT_VALUE, 0, ok=False,
                                       error="older than the stored record")
_PROVIDER_OK = encode_reply_page(MessageType.ADD_PROVIDER, 0, ok=True)
_PROVIDER_REFUSED = encode_reply_page(MessageType.ADD_PROVIDER, 0, ok=False)
# Those replies by request type, with whether they say "stored": read without decoding.
_STORE_REPLIES = {
    MessageType.PUT_VALUE: {_PUT_OK: True, _PUT_REFUSED_QUOTA: False, _PUT_REFUSED_OLDER: False},
    MessageType.ADD_PROVIDER: {_PROVIDER_OK: True, _PROVIDER_REFUSED: False},
}


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
        # Its optional ``immutable(key)`` (see records.Validator), looked up once.
        self._is_immutable: Callable[[bytes], bool] = getattr(
            self.validator, "immutable", None) or _mutable
        # (key, value) -> whether the key is immutable, having validated the value if so
        # (NamespacedValidator does both with one namespace lookup).
        self._validate_if_immutable: Callable[[bytes, bytes], bool] = getattr(
            self.validator, "validate_if_immutable", None) or self._validate_when_immutable
        self.server = server
        self.table = RoutingTable(host.peer_id, self.config.k)
        self.records = RecordStore(self.config.max_records, self.config.max_records_per_peer)
        self.providers = ProviderStore(self.config.max_providers_per_key,
                                       self.config.max_provider_entries)
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._rtt = _RttEstimator(self.config)
        self._kids: dict[PeerID, int] = {}  # kad_id of peers met in lookups (bounded)
        self._own_addrs: tuple[bytes, ...] = ()
        self._peerstore: Peerstore  # the host's, once started
        self._seeds: list[PeerInfo] = []  # the bootstrap peers, to rejoin through
        self._own_values: dict[bytes, bytes] = {}  # what we put: republished
        self._own_provides: set[bytes] = set()
        # Lookups wait for a slot past max_lookups (a plain counter: no await when free).
        self._lookup_waiters: deque[asyncio.Future[None]] = deque()
        self._recent_lookups: OrderedDict[int, tuple[float, list[PeerInfo]]] = OrderedDict()
        # sha256(key, value) of records validated here -> when that stops counting.
        self._valid: OrderedDict[bytes, float] = OrderedDict()
        self._replies: dict[tuple[Any, ...], bytes] = {}
        # Decoded replies by their bytes, with their PeerInfos' ids.
        self._decoded: dict[bytes, tuple[Reply, _ReplyIds]] = {}
        self._replies_version = -1
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
        self._peerstore = self.host.peerstore
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
        self._validate(key, value)
        self._own_values[key] = value
        self.records.put(key, value, self.host.peer_id, time.monotonic() + self.config.record_ttl)
        return await self._put_remote(key, value)

    async def get_value(self, key: bytes, *, quorum: int | None = None) -> bytes:
        """The best valid value for ``key`` (the validator's ``select``) or NotFoundError.

        Stops after ``quorum`` valid records (default: the config's, or 1 for a key
        with a single valid value, such as an ``/ipld/`` CID: the first valid
        record found is the answer); peers that returned an outdated record are
        sent the best one.
        """
        _check_key(key)
        immutable = bool(self._is_immutable(key))
        if quorum is None:
            quorum = 1 if immutable else self.config.quorum
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
                        self._validate(key, value, immutable)
                    except InvalidRecordError:
                        self._counters["invalid_records_in"] += 1
                        return False
                    valid.add(value)
                found[peer.peer_id] = value
            return len(found) >= quorum

        lookup = None
        if len(found) < quorum:
            lookup = await self._run_lookup(kad_id(key), Request(MessageType.GET_VALUE, key),
                                            on_reply, ())
        if not found:
            asked = "" if lookup is None else (
                f" ({lookup.answered_count()} peers answered, {lookup.failures} failed)")
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
            data = msg.data
            request = _fast_request(data, sender) or _decode_request(data, sender)
        except MalformedMessageError as exc:
            counters["dropped_malformed_requests"] += 1
            log.debug("dropped malformed request from %s: %s", sender, exc)
            return
        addrs = request.addrs
        # Known with the same addresses (nearly always): only a sign of life.  The table is
        # touched before the peerstore is asked; _learn would touch it again anyway.
        if addrs and not (self.table.touch_known(sender, addrs)
                          and self._peerstore.knows(sender)):
            self._learn(sender, addrs)
        msg.reply(self._handlers[request.type](sender, request))

    def _closer_for(self, key: bytes, requester: PeerID) -> list[PeerInfo]:
        return [e.info for e in self.table.closest(kad_id(key), self.config.k, requester)]

    def _closer_reply(self, kind: MessageType, request: Request, requester: PeerID) -> bytes:
        """A reply page naming the k peers closest to the key, but the requester."""
        if request.page == 0:
            data = self._known_closer_reply(kind, request.key, requester)
            if data is not None:
                return data
        return encode_reply_page(kind, request.page,
                                 closer=self._closer_for(request.key, requester))

    def _known_closer_reply(self, kind: MessageType, key: bytes, requester: PeerID
                            ) -> bytes | None:
        """The reply when which peers it names does not depend on the key, encoded once.

        That is so when the table holds no more than k peers besides the requester
        (it names all of them), and when the key falls in a full bucket the
        requester is not in (it names that bucket: its peers are nearer to the key
        than any other).  Such replies are kept until the table changes.  Peers are
        then in table order, not by distance (the requester sorts them anyway), so
        only one-page replies are kept: pages fetched one by one could otherwise be
        cut from different orders.  None when the reply must be computed.
        """
        table = self.table
        replies = self._replies
        if self._replies_version == table.version:
            # The usual case, a small table: its reply to this requester is known.  (A
            # requester's key is only ever filled in that case, and the cache is
            # emptied whenever the table changes.)
            data = replies.get((kind, requester))
            if data is not None:
                return data
        k = self.config.k
        entry = table.get(requester)
        if len(table) - (entry is not None) <= k:
            cache_key: tuple[Any, ...] = (kind, requester)
            bucket = None
        else:
            cpl = table.bucket_index(kad_id(key))
            if table.bucket_size(cpl) != k or (
                    entry is not None and table.bucket_index(entry.kid) == cpl):
                return None
            cache_key = (kind, cpl)
            bucket = cpl
        if self._replies_version != table.version or len(replies) >= _REPLY_CACHE_SIZE:
            replies.clear()
            self._replies_version = table.version
        data = replies.get(cache_key)
        if data is None:
            if bucket is None:
                peers = [e.info for e in table.entries() if e is not entry]
            else:
                peers = [e.info for e in table.bucket_peers(bucket)]
            data = encode_closer_page(kind, peers)
            if data is None:
                return None
            replies[cache_key] = data
        return data

    def _handle_find_node(self, sender: PeerID, request: Request) -> bytes:
        # _closer_reply, shorter for the most common request: a first page's known reply.
        if request.page == 0:
            data = self._known_closer_reply(_FIND_NODE, request.key, sender)
            if data is not None:
                return data
        return self._closer_reply(_FIND_NODE, request, sender)

    def _handle_get_value(self, sender: PeerID, request: Request) -> bytes:
        record = self.records.get_record(request.key, time.monotonic())
        if record is None:
            return self._closer_reply(MessageType.GET_VALUE, request, sender)
        # The value fills the datagram; the requester learns closer peers from others.
        if request.page:
            return encode_reply_page(MessageType.GET_VALUE, request.page)
        if record.reply is None:  # encoded once per stored record
            record.reply = encode_value_reply(record.value)
        return record.reply

    def _handle_get_providers(self, sender: PeerID, request: Request) -> bytes:
        found = self.providers.get(request.key, time.monotonic(), MAX_PROVIDERS_PER_REPLY)
        return encode_reply_page(MessageType.GET_PROVIDERS, request.page,
                                 providers=[PeerInfo(p, a) for p, a in found],
                                 closer=self._closer_for(request.key, sender))

    def _handle_put_value(self, sender: PeerID, request: Request) -> bytes:
        key, value = request.key, request.value
        assert value is not None  # decode_request guarantees it for PUT_VALUE
        now = time.monotonic()
        # The quota first: a peer past it costs us no signature check.
        current = self.records.get_if_room(key, sender, now)
        if current is NO_ROOM:
            self._counters["puts_refused_quota"] += 1
            return _PUT_REFUSED_QUOTA
        if current != value:  # a value we hold was validated when it arrived
            try:
                self._validate(key, value)
            except InvalidRecordError as exc:
                self._counters["invalid_records_in"] += 1
                return encode_reply_page(MessageType.PUT_VALUE, 0, ok=False, error=str(exc))
            if current is not None and self.validator.select(key, [current, value]) == 0:
                return _PUT_REFUSED_OLDER
        self.records.put(key, value, sender, now + self.config.record_ttl)
        return _PUT_OK

    def _validate(self, key: bytes, value: bytes, immutable: bool | None = None) -> None:
        """``validator.validate`` once per record and node: a record seen again (a put
        after a get, a republish, a second get) is not checked again for
        ``validation_cache_ttl``; the cache is keyed by SHA-256 of key and value."""
        # Checking a content hash (immutable keys) is as cheap as a cache lookup.
        if immutable is None:
            try:
                if self._validate_if_immutable(key, value):
                    self._counters["validations"] += 1
                    return
            except InvalidRecordError:
                self._counters["validations"] += 1
                raise
        elif immutable:
            self._counters["validations"] += 1
            self.validator.validate(key, value)
            return
        digest = hashlib.sha256(len(key).to_bytes(2, "big") + key + value).digest()
        now = time.monotonic()
        valid = self._valid
        expires = valid.get(digest)
        if expires is not None and expires > now:
            self._counters["validations_cached"] += 1
            return
        self._counters["validations"] += 1
        self.validator.validate(key, value)  # raises InvalidRecordError
        if self.config.validation_cache_ttl > 0:
            valid.pop(digest, None)
            valid[digest] = now + self.config.validation_cache_ttl
            if len(valid) > _VALID_CACHE_SIZE:
                valid.popitem(last=False)

    def _validate_when_immutable(self, key: bytes, value: bytes) -> bool:
        """_validate_if_immutable for validators without ``validate_if_immutable``."""
        if self._is_immutable(key):
            self.validator.validate(key, value)
            return True
        return False

    def _handle_add_provider(self, sender: PeerID, request: Request) -> bytes:
        stored = self.providers.add(request.key, sender, request.provider,
                                    time.monotonic() + self.config.provider_ttl)
        if not stored:
            self._counters["providers_refused_quota"] += 1
        return _PROVIDER_OK if stored else _PROVIDER_REFUSED

    def _handle_ping(self, sender: PeerID, request: Request) -> bytes:
        return encode_reply_page(MessageType.PING, 0)

    def _learn(self, peer: PeerID, addrs: tuple[bytes, ...]) -> None:
        """A DHT server contacted us with its addresses (proven to name it): remember it.
        (The caller has found it is not known with these addresses already.)"""
        entry = self.table.get(peer)
        if entry is None or entry.addrs != addrs or peer not in self._peerstore:
            try:
                self._add_to_peerstore(peer, addrs, replace_known=True)
            except UsageError:  # the multiaddr package refused what our parser let through
                self._counters["dropped_bad_addrs"] += 1
                return
        self._seen(peer, addrs)

    # -- lookups ---------------------------------------------------------------------------

    async def _lookup(self, target: int, request: Request, on_reply: ReplyHook | None = None,
                      *, seeds: Sequence[PeerInfo] = ()) -> LookupResult:
        lookup = await self._run_lookup(target, request, on_reply, seeds)
        result = lookup.result()
        if lookup.complete and request.type == MessageType.FIND_NODE:
            self._remember_closest(target, result.closest)
        return result

    async def _run_lookup(self, target: int, request: Request, on_reply: ReplyHook | None,
                          seeds: Sequence[PeerInfo]) -> _Lookup:
        """Run a lookup to its end; the finished :class:`_Lookup`."""
        if not seeds and not len(self.table):
            seeds = self._seeds  # every peer was lost (timeouts): start over from the seeds
        if self._lookups_in_flight >= self.config.max_lookups or self._lookup_waiters:
            await self._lookup_slot()  # returns holding a slot
        else:
            self._lookups_in_flight += 1
        self._counters["lookups"] += 1
        try:
            if self.server and self._own_addrs and not request.addrs:
                request = Request(request.type, request.key, request.page, request.value,
                                  self._own_addrs, request.provider)
            lookup = _Lookup(self, target, request, on_reply, seeds)
            try:
                lookup.pump()
                await lookup.done
            finally:
                lookup.close()  # forget the queries still out (slow, cancelled, stopped)
            return lookup
        finally:
            self._release_lookup_slot()

    async def _lookup_slot(self) -> None:
        """Wait for a lookup slot, first come first served (a plain counter rather than an
        asyncio.Semaphore: no await at all while slots are free)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lookup_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_lookup_slot()  # handed a slot, but cancelled: pass it on
            raise

    def _release_lookup_slot(self) -> None:
        while self._lookup_waiters:
            waiter = self._lookup_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the waiter as it is
                return
        self._lookups_in_flight -= 1

    def _remember_closest(self, target: int, closest: list[PeerInfo]) -> None:
        """Keep a finished FIND_NODE lookup's answer for a store soon after (put, provide,
        republish of the same key), for ``lookup_cache_ttl`` seconds."""
        if self.config.lookup_cache_ttl <= 0 or not closest:
            return
        recent = self._recent_lookups
        recent.pop(target, None)
        recent[target] = (time.monotonic() + self.config.lookup_cache_ttl, closest)
        while len(recent) > _LOOKUP_CACHE_SIZE:
            recent.popitem(last=False)

    async def _closest_for_store(self, key: bytes) -> tuple[int, list[PeerInfo]]:
        """The k peers closest to ``key``: a recent lookup's answer, else a new lookup."""
        target = kad_id(key)
        cached = self._recent_lookups.get(target)
        if cached is not None:
            if cached[0] > time.monotonic():
                self._counters["lookups_reused"] += 1
                return target, cached[1]
            del self._recent_lookups[target]
        return target, (await self._lookup(target, Request(MessageType.FIND_NODE, key))).closest

    def _decode_reply(self, data: bytes, kind: MessageType
                      ) -> tuple[Reply, _ReplyIds | None]:
        """decode_reply of a first page, remembering replies that only name peers (a peer
        answers the same bytes to many keys, see _known_closer_reply) with the ids of
        their PeerInfos (for _Lookup.add_reply_peers); None for others."""
        memo = self._decoded
        known = memo.get(data)
        if known is not None and known[0].type is kind:
            return known
        reply = decode_reply(data, kind, 0)
        if reply.value is not None or reply.pages != 1 or reply.providers:
            return reply, None
        if len(memo) >= _DECODED_CACHE_SIZE:
            memo.clear()
        by_id = {id(info): info for info in reply.closer}
        known = memo[data] = (reply, (by_id, frozenset(by_id)))
        return known

    def _hard_timeout(self, peer: PeerID, soft: float | None = None) -> float:
        """How long a query may run at all: max_query_timeout, as a loaded peer may need
        it, unless the peer failed its last query (then likely dead: a few soft ones)."""
        entry = self.table.get(peer)
        if entry is not None and entry.failures:
            if soft is None:
                soft = self._rtt.soft_timeout(peer)
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

    def _query_failed(self, peer: PeerID, exc: BaseException) -> None:
        """Count why a query failed and tell the routing table; raise what is not a
        network failure (a bug)."""
        if isinstance(exc, MalformedMessageError):
            self._counters["dropped_malformed_replies"] += 1
            self._failed(peer, 1)  # garbage is not an accident: evict at once
        elif isinstance(exc, ProtocolResetError):
            self._counters["queries_refused"] += 1
            self._failed(peer, 1)  # not a DHT server
        elif isinstance(exc, (MsgnetError, asyncio.CancelledError)):
            self._counters["queries_failed"] += 1
            self._failed(peer, self.config.evict_after_failures)
        else:
            raise exc
        log.debug("query to %s failed: %r", peer, exc)

    async def _rest_pages(self, peer: PeerID, request: Request, first: Reply,
                          timeout: float) -> Reply:
        """Fetch pages 1.. of a paged reply (rare: peers with many addresses) and merge."""
        rest = await asyncio.gather(*(self._rpc(peer, replace(request, page=n), None, timeout)
                                      for n in range(1, first.pages)))
        return _merge_pages(first, rest)

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
        if not replace_known and peer in self._peerstore:
            return False
        for addr in reversed(addrs):  # the peerstore keeps the newest first
            self.host.add_peer(Multiaddr(addr), peer)
        return True

    # -- storing -------------------------------------------------------------------------------

    async def _put_remote(self, key: bytes, value: bytes) -> int:
        target, closest = await self._closest_for_store(key)
        data = encode_request(Request(MessageType.PUT_VALUE, key, value=value))
        return await self._store_all(target, closest, data, MessageType.PUT_VALUE)

    async def _provide_remote(self, mh: bytes) -> int:
        target, closest = await self._closest_for_store(mh)
        data = encode_request(Request(MessageType.ADD_PROVIDER, mh, provider=self._own_addrs))
        return await self._store_all(target, closest, data, MessageType.ADD_PROVIDER)

    async def _store_all(self, target: int, peers: Sequence[PeerInfo], data: bytes,
                         kind: MessageType) -> int:
        """Send one encoded store request (``data``) to every peer at once; the number of
        peers that answered ok.

        Every request goes out in the same loop iteration, without a task each, and each
        reply is counted by its future's callback as it comes (the usual ones are known
        bytes, not decoded): a put costs one round trip after its lookup.
        """
        known = _STORE_REPLIES[kind]
        counters = self._counters
        all_in: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        futures: list[PendingRequest] = []
        outstanding = stored = 0
        failed = False

        def count(future: PendingRequest) -> None:
            nonlocal outstanding, stored, failed
            outstanding -= 1
            if future.cancelled() or future.exception() is not None:
                failed = True
            else:
                reply = future.result()
                ok = known.get(reply)
                if ok is None:
                    try:
                        ok = bool(decode_reply(reply, kind).ok)
                    except MalformedMessageError:
                        counters["dropped_malformed_replies"] += 1
                        ok = False
                stored += ok
            if not outstanding and not all_in.done():
                all_in.set_result(None)

        table_entry = self.table.get
        timeout = self.config.max_query_timeout
        for info in peers:
            peer = info.peer_id
            entry = table_entry(peer)
            try:
                future = self.host.request_callback(
                    peer, PROTOCOL, data, count,
                    timeout=timeout if entry is None or not entry.failures
                    else self._hard_timeout(peer))
            except MsgnetError as exc:
                log.debug("store at %s not sent: %s", peer, exc)
                continue
            futures.append(future)
        outstanding = len(futures)
        counters["requests_out"] += outstanding
        if outstanding:
            try:
                await all_in
            finally:
                for future in futures:  # cancelled while waiting: forget the requests
                    future.cancel()
        if failed or len(futures) < len(peers):
            self._recent_lookups.pop(target, None)  # look again next time
        return stored

    async def _store_at(self, peer: PeerID, key: bytes, value: bytes) -> bool:
        try:
            reply = await self._rpc(peer, Request(MessageType.PUT_VALUE, key, value=value))
        except MalformedMessageError:
            self._counters["dropped_malformed_replies"] += 1
            return False
        except MsgnetError:
            return False
        return bool(reply.ok)

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


def _mutable(key: bytes) -> bool:
    """``immutable`` for validators without one: every key may change."""
    return False


def _consume(task: asyncio.Future[Any] | PendingRequest) -> None:
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
