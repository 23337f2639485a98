"""Kademlia distance and the routing table (k-buckets with a replacement cache).

Distances are XOR over the SHA-256 of the key bytes (a PeerID's multihash,
a record key, a provider multihash), as in libp2p.  Buckets are indexed by
the common prefix length with our own ID; each holds at most ``k`` peers
in least-recently-seen order.  A full bucket prefers the peers it has:
a newcomer waits in the bucket's replacement cache while the
least-recently-seen member is pinged, and replaces it only if that ping
fails (old live peers are the most likely to stay live, and an attacker
cannot flush a bucket by announcing many new identities).

The table is plain data; the DHT performs the pings it asks for.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import itemgetter

from ...identity import PeerID
from .wire import MAX_ADDRS_PER_PEER, PeerInfo

__all__ = [
    "KEY_BITS",
    "PeerEntry",
    "RoutingTable",
    "common_prefix_length",
    "kad_id",
    "key_in_bucket",
]

KEY_BITS = 256
_first = itemgetter(0)


def kad_id(key: bytes) -> int:
    """A key's position in the XOR space: SHA-256 of its bytes, as an integer."""
    return int.from_bytes(hashlib.sha256(key).digest(), "big")


def common_prefix_length(a: int, b: int) -> int:
    return KEY_BITS - (a ^ b).bit_length()


def key_in_bucket(local: int, cpl: int) -> bytes:
    """Random key bytes whose kad_id shares exactly ``cpl`` leading bits with ``local``.

    SHA-256 cannot be inverted, so this draws keys until one lands in the
    bucket: 2**(cpl+1) tries on average, which is why refresh stops at a
    small cpl (as libp2p's does at 15).
    """
    while True:
        key = os.urandom(32)
        if common_prefix_length(kad_id(key), local) == cpl:
            return key


@dataclass(slots=True)
class PeerEntry:
    """A peer in the table, with what we measured about it."""

    peer_id: PeerID
    kid: int
    info: PeerInfo  # what replies advertise: the peer and its verified addresses
    last_seen: float
    failures: int = 0
    bucket: int = 0  # index of its bucket (the common prefix length with us, capped)

    @property
    def addrs(self) -> tuple[bytes, ...]:
        return self.info.addrs


@dataclass(slots=True)
class _Bucket:
    peers: OrderedDict[PeerID, PeerEntry] = field(default_factory=OrderedDict)
    replacements: OrderedDict[PeerID, PeerEntry] = field(default_factory=OrderedDict)
    checking: bool = False  # a liveness ping of the oldest peer is in flight
    refreshed: float = 0.0


class RoutingTable:
    """Buckets 0..255 by common prefix length with the local ID."""

    def __init__(self, local: PeerID, k: int = 20) -> None:
        self.local = local
        self.local_kid = kad_id(local.to_bytes())
        self.k = k
        self._buckets = [_Bucket() for _ in range(KEY_BITS)]
        self._index: dict[PeerID, PeerEntry] = {}
        # get(peer): its entry or None.  The index's own dict.get, a C call: the DHT asks
        # several times per query.
        self.get: Callable[[PeerID], PeerEntry | None] = self._index.get
        # Bumped whenever a peer joins or leaves the table or changes its addresses:
        # what is derived from the table (encoded replies) is valid while it stays.
        self.version = 0

    def _bucket_of(self, kid: int) -> _Bucket:
        return self._buckets[min(common_prefix_length(kid, self.local_kid), KEY_BITS - 1)]

    def seen(self, peer: PeerID, addrs: Iterable[bytes], now: float | None = None
             ) -> PeerEntry | None:
        """A live contact with ``peer``: add it, or refresh it, or queue it as a replacement.

        Returns the bucket's least-recently-seen entry when the bucket is full
        and that entry should be pinged (the caller pings it and reports back
        with :meth:`seen` or :meth:`failed`); None otherwise.
        """
        entry = self._index.get(peer)
        if entry is not None:  # the usual case, kept short
            entry.last_seen = time.monotonic() if now is None else now
            entry.failures = 0
            if addrs:
                addrs = tuple(addrs)[:MAX_ADDRS_PER_PEER]
                if addrs and addrs != entry.info.addrs:
                    entry.info = PeerInfo(peer, addrs)
                    self.version += 1
            self._buckets[entry.bucket].peers.move_to_end(peer)
            return None
        if peer == self.local:
            return None
        now = time.monotonic() if now is None else now
        addrs = tuple(addrs)[:MAX_ADDRS_PER_PEER]
        if not addrs:
            return None  # nothing to dial it back with
        kid = kad_id(peer.to_bytes())
        index = self.bucket_index(kid)
        bucket = self._buckets[index]
        if len(bucket.peers) < self.k:
            entry = PeerEntry(peer, kid, PeerInfo(peer, addrs), now, bucket=index)
            bucket.peers[peer] = entry
            self._index[peer] = entry
            self.version += 1
            bucket.replacements.pop(peer, None)
            return None
        bucket.replacements.pop(peer, None)
        bucket.replacements[peer] = PeerEntry(peer, kid, PeerInfo(peer, addrs), now, bucket=index)
        while len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)
        if bucket.checking:
            return None
        bucket.checking = True
        return next(iter(bucket.peers.values()))

    def touch(self, entry: PeerEntry) -> None:
        """A table peer answered: :meth:`seen` without new addresses, for an entry in hand."""
        entry.last_seen = time.monotonic()
        entry.failures = 0
        self._buckets[entry.bucket].peers.move_to_end(entry.peer_id)

    def touch_known(self, peer: PeerID, addrs: tuple[bytes, ...] | None = None) -> bool:
        """:meth:`touch` ``peer`` if it is in the table (with exactly ``addrs``, unless
        None); whether it was: one call for what the DHT does on every message."""
        entry = self._index.get(peer)
        if entry is None or (addrs is not None and entry.info.addrs != addrs):
            return False
        entry.last_seen = time.monotonic()
        entry.failures = 0
        self._buckets[entry.bucket].peers.move_to_end(peer)
        return True

    def check_done(self, entry: PeerEntry) -> None:
        """The liveness ping asked for by :meth:`seen` finished (either way)."""
        self._bucket_of(entry.kid).checking = False

    def failed(self, peer: PeerID, *, evict_after: int = 1) -> PeerEntry | None:
        """``peer`` did not answer; evict it after ``evict_after`` failures in a row.

        Returns the evicted entry (None if it stays).  Its bucket's
        replacements are not promoted blindly: the caller pings them first
        (:meth:`take_replacement`), so a dead candidate never enters the table.
        """
        entry = self._index.get(peer)
        if entry is None:
            return None
        entry.failures += 1
        if entry.failures < evict_after:
            return None
        del self._bucket_of(entry.kid).peers[peer]
        del self._index[peer]
        self.version += 1
        return entry

    def take_replacement(self, kid: int) -> PeerEntry | None:
        """Remove and return the newest replacement candidate of ``kid``'s bucket."""
        bucket = self._bucket_of(kid)
        if not bucket.replacements or len(bucket.peers) >= self.k:
            return None
        return bucket.replacements.popitem(last=True)[1]

    def closest(self, kid: int, count: int, exclude: PeerID | None = None) -> list[PeerEntry]:
        """The ``count`` known peers closest to ``kid`` (XOR), nearest first.

        Small tables are sorted whole.  In a large one the buckets are visited in
        order of distance: with ``c`` the bucket ``kid`` falls in, every peer of
        bucket ``c`` is nearer to ``kid`` than any peer of a deeper bucket, which
        are all nearer than those of bucket ``c - 1``, then ``c - 2``... so only the
        buckets needed to gather ``count`` peers are sorted.
        """
        return [e for _, e in self.closest_by_distance(kid, count, exclude)]

    def closest_by_distance(self, kid: int, count: int, exclude: PeerID | None = None
                            ) -> list[tuple[int, PeerEntry]]:
        """:meth:`closest` as (distance, entry) pairs: a lookup keeps the distances."""
        index = self._index
        skip = None if exclude is None else index.get(exclude)
        if len(index) <= 4 * count:
            # Distances computed by a comprehension, not a key function called per entry.
            pairs = [(e.kid ^ kid, e) for e in index.values() if e is not skip]
            pairs.sort(key=_first)
            return pairs[:count]
        buckets = self._buckets
        home = min(common_prefix_length(kid, self.local_kid), KEY_BITS - 1)
        groups = [buckets[home].peers.values(),
                  [e for b in buckets[home + 1:] for e in b.peers.values()]]
        groups += (buckets[i].peers.values() for i in range(home - 1, -1, -1))
        found: list[tuple[int, PeerEntry]] = []
        for group in groups:
            pairs = [(e.kid ^ kid, e) for e in group if e is not skip]
            pairs.sort(key=_first)
            found += pairs
            if len(found) >= count:
                break
        return found[:count]

    def stale_buckets(self, older_than: float, max_cpl: int) -> list[int]:
        """Buckets up to the deepest non-empty one (capped) not refreshed since ``older_than``.

        Deeper buckets are nearer to us than our closest neighbour: a lookup
        there would find no one new.
        """
        return [i for i in range(self._deepest(max_cpl) + 1)
                if self._buckets[i].refreshed < older_than]

    def unfilled_buckets(self, max_cpl: int) -> list[int]:
        """Buckets up to the deepest non-empty one (capped) holding fewer than k peers."""
        return [i for i in range(self._deepest(max_cpl) + 1)
                if len(self._buckets[i].peers) < self.k]

    def _deepest(self, max_cpl: int) -> int:
        deepest = max((i for i, b in enumerate(self._buckets) if b.peers), default=0)
        return min(deepest, max_cpl)

    def mark_refreshed(self, cpl: int, now: float) -> None:
        self._buckets[min(cpl, KEY_BITS - 1)].refreshed = now

    def bucket_index(self, kid: int) -> int:
        """The bucket a kad ID falls in: its common prefix length with ours (capped)."""
        return min(KEY_BITS - (kid ^ self.local_kid).bit_length(), KEY_BITS - 1)

    def bucket_size(self, index: int) -> int:
        return len(self._buckets[index].peers)

    def bucket_peers(self, index: int) -> list[PeerEntry]:
        """The peers of bucket ``index``, least recently seen first."""
        return list(self._buckets[index].peers.values())

    def peers(self) -> list[PeerID]:
        return list(self._index)

    def entries(self) -> list[PeerEntry]:
        return list(self._index.values())

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, peer: object) -> bool:
        return peer in self._index
