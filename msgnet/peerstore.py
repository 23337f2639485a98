"""Known addresses of peers: what the network dials.

Bounded, because addresses also arrive from the network (DHT replies,
identify): a flood of fake peers evicts the least recently used ones instead
of growing memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from multiaddr import Multiaddr

from .addr import Endpoint, parse_multiaddr
from .errors import UsageError
from .identity import PeerID

MAX_PEERS = 100_000
MAX_ADDRS_PER_PEER = 16


class Peerstore:
    """Addresses per PeerID, least recently used peers evicted past ``max_peers``."""

    def __init__(self, max_peers: int = MAX_PEERS,
                 max_addrs_per_peer: int = MAX_ADDRS_PER_PEER) -> None:
        self._addrs: OrderedDict[PeerID, list[Endpoint]] = OrderedDict()
        # knows(peer): ``peer in self`` as a C call (the dict's own bound method), for
        # callers that ask on every message (the DHT).
        self.knows: Callable[[object], bool] = self._addrs.__contains__
        self._max_peers = max_peers
        self._max_addrs = max_addrs_per_peer

    def add_addrs(self, peer_id: PeerID, addrs: Iterable[Multiaddr | str]) -> None:
        """Remember addresses for ``peer_id``; newest first, duplicates merged.

        An address carrying ``/p2p/<id>`` must name ``peer_id``.
        """
        if not isinstance(peer_id, PeerID):
            raise UsageError(f"peer_id must be a PeerID, not {type(peer_id).__name__}")
        known = self._addrs.pop(peer_id, [])
        for ma in addrs:
            endpoint = parse_multiaddr(ma)
            if endpoint.peer_id is not None and endpoint.peer_id != peer_id:
                raise UsageError(f"address {ma} names peer {endpoint.peer_id}, not {peer_id}")
            endpoint = _without_peer(endpoint)
            if endpoint in known:
                known.remove(endpoint)
            known.insert(0, endpoint)
        self._addrs[peer_id] = known[: self._max_addrs]
        while len(self._addrs) > self._max_peers:
            self._addrs.popitem(last=False)

    def add_addr(self, peer_id: PeerID, addr: Multiaddr | str) -> None:
        self.add_addrs(peer_id, [addr])

    def endpoints(self, peer_id: PeerID) -> list[Endpoint]:
        """The endpoints to try for ``peer_id``, most recent first."""
        endpoints = self._addrs.get(peer_id)
        if endpoints is None:
            return []
        self._addrs.move_to_end(peer_id)
        return list(endpoints)

    def addrs(self, peer_id: PeerID) -> list[Multiaddr]:
        return [e.to_multiaddr() for e in self.endpoints(peer_id)]

    def peers(self) -> list[PeerID]:
        return list(self._addrs)

    def remove(self, peer_id: PeerID) -> None:
        self._addrs.pop(peer_id, None)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._addrs

    def __len__(self) -> int:
        return len(self._addrs)


def _without_peer(endpoint: Endpoint) -> Endpoint:
    if endpoint.peer_id is None:
        return endpoint
    return Endpoint(endpoint.host, endpoint.port, endpoint.transport, endpoint.family, None)
