"""MessageNetwork: sockets, sessions, handshakes, dialing and paths.

The network glues the sans-IO handshake core (``core/handshake.py``) to the
Cython engines (``_engine.pyx``, one per bound UDP socket) and to the TCP
stream transport (``tcp.py``).  The engine calls this object (its *delegate*)
only for what is off the hot path: handshake packets, unknown sessions,
resets, responses and control frames; TCP connections hand it every packet
(``stream_packet``), which it runs through the session's engine.

Session model (docs/wire.md §2.3.2): one sending session per peer, the
newest established one; older ones keep receiving until they expire.

Paths (docs/wire.md §5): a session is not tied to a transport.  Per peer the
network keeps a :class:`_PeerPath` (the peer's UDP address, our TCP
connection to it, and which of them its sessions send on) and moves the
sessions with :meth:`UdpEngine.set_path`:

* first contact goes out on every transport we have an address for (the same
  INITIATION, then every packet on both paths with one counter) until the
  responder's ACK names the transport it prefers; the initiator consolidates
  onto the path that ACK arrived on;
* a path fails when its TCP connection closes, or when UDP stays silent for
  PATH_TIMEOUT while a reply, a reliable frame or a probe PING is awaited;
  the sessions move to the other path (dialing TCP if needed) without a new
  handshake, and a peer that sends on a new path is followed once the old one
  has been silent for ADOPT_AFTER;
* the policy (``transport_policy``) says which transports may be used and
  which the responder prefers; messages too large for one datagram take the
  stream when the peer has one (dialled on demand), and on a stream reliable
  QoS needs no acknowledgements, retransmissions or fragments of msgnet's own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from multiaddr import Multiaddr

from . import limits
from ._engine import PMTU_DONE, STREAM_BAD, STREAM_OK, Message, SendRoute, Session, UdpEngine
from ._engine import PeerPath as _PeerPath
from ._frame import Ack, Ping, encode_frame
from ._packet import AES_GCM, SessionCrypto, decode_session_unknown
from .addr import Endpoint, parse_multiaddr, sockaddr_to_multiaddr
from .core.handshake import FinishRepeated, HandshakeFailed, Handshaker, SessionEstablished
from .errors import (
    ClosedError,
    FrameError,
    MessageTooLargeError,
    MsgnetError,
    PeerUnreachableError,
    ProtocolResetError,
    RequestTimeoutError,
    SecurityError,
    UsageError,
)
from .identity import KeyPair, PeerID
from .metrics import merge, prometheus_text
from .peerstore import Peerstore
from .qos import BEST_EFFORT, DeliveryManager, QoS, Reliable
from .tcp import (
    StreamAddress,
    StreamConnection,
    StreamListener,
    StreamRecovery,
    StreamSettings,
    TcpStreams,
    messages_in_payloads,
)

__all__ = [
    "MessageNetwork",
    "MessageTransport",
    "SocketSession",
    "TRANSPORT_POLICIES",
    "TcpListener",
    "TcpTransport",
    "UdpSocket",
    "UdpTransport",
]

log = logging.getLogger("msgnet")

Handler = Callable[[Message], Any]
ResponseListener = Callable[[Session, int, bytes], None]

HOUSEKEEPING_INTERVAL = 1.0

TRANSPORT_POLICIES = ("prefer-udp", "prefer-tcp", "udp-only", "tcp-only")
"""Which transports a host uses (docs/wire.md §5, local): the first two use both and prefer
one when answering a handshake; the others never send on, dial or answer the other."""
ADOPT_AFTER = 1.0
"""A peer's packets arriving on another path move our sending there once the path we send
on has delivered nothing for this long (flapping between two working paths is pointless)."""
PROBE_AFTER = 1.0
"""Sending by UDP with nothing received for this long, and another path to fall back on: a
PING asks the peer for a packet, so a silent path is told from a quiet peer."""
CONSOLIDATE_AFTER = 1.0
"""First contact that got no ACK this long after the session was confirmed (the ACK was
lost): settle on a path by our own policy instead of sending everything twice."""

_FLAG_REQUEST = limits.FLAG_REQUEST
_ZERO_COOKIE = bytes(16)
_U32 = struct.Struct(">I")
_HANDSHAKE_MALFORMED = ("truncated", "unknown_packet_type", "initiation_too_short",
                        "handshake_failed", "bad_signature", "bad_cookie", "wrong_peer_id")
"""Handshake drops that prove a stream peer is not speaking msgnet in good faith."""


class MessageTransport:
    """A kind of transport (the seed's MessageTransport): opens listening sockets.

    Each socket or listener it opens gets the host's next ``transport_id``, numbered from 1
    in listen order and announced in the handshake (docs/wire.md §5).
    """

    name = "abstract"

    def __init__(self, network: MessageNetwork) -> None:
        self.network = network

    def can_dial(self, endpoint: Endpoint) -> bool:
        return endpoint.transport == self.name

    async def open(self, endpoint: Endpoint,
                   transport_id: int) -> UdpSocket | TcpListener:  # pragma: no cover
        raise NotImplementedError


class UdpTransport(MessageTransport):
    """UDP: one engine-owned socket per listen address."""

    name = "udp"

    async def open(self, endpoint: Endpoint, transport_id: int) -> UdpSocket:
        family = socket.AF_INET6 if endpoint.family == "ip6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
                except OSError:  # pragma: no cover - kernel limits vary
                    pass
            sock.bind(endpoint.sockaddr)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen on {endpoint.to_multiaddr()}: {exc}") from exc
        except BaseException:
            sock.close()
            raise
        return UdpSocket(self, sock, family, transport_id)


class TcpTransport(MessageTransport):
    """TCP: msgnet packets length-prefixed on connections (docs/wire.md §6), a listener per
    listen address; the network's :class:`~msgnet.tcp.TcpStreams` holds the connections,
    one per peer, shared by all its sessions and protocols."""

    name = "tcp"

    async def open(self, endpoint: Endpoint, transport_id: int) -> TcpListener:
        listener = await self.network.streams.listen(endpoint.host, endpoint.port, transport_id)
        return TcpListener(self, listener, transport_id)


class TcpListener:
    """A listening TCP socket: the stream counterpart of :class:`UdpSocket`."""

    def __init__(self, transport: TcpTransport, listener: StreamListener,
                 transport_id: int) -> None:
        self.transport = transport
        self.transport_id = transport_id
        self._listener = listener
        self.family = socket.AF_INET6 if len(listener.sockname) == 4 else socket.AF_INET

    @property
    def listen_addr(self) -> Multiaddr:
        return sockaddr_to_multiaddr(self._listener.sockname, "tcp")

    @property
    def sockname(self) -> tuple[str, int]:
        """The bound (host, port)."""
        return self._listener.sockname[:2]

    def start(self) -> None:
        """Accepting started with the listener."""

    def close(self) -> None:
        self._listener.close()


class UdpSocket:
    """A bound UDP socket and the engine that owns its receive path.

    This is the seed's ``SessionedSocket``: many peers and protocols share it;
    ``new_session`` gives a per-(peer, protocol) ``SocketSession`` view.
    """

    def __init__(self, transport: UdpTransport, sock: socket.socket, family: int,
                 transport_id: int) -> None:
        self.transport = transport
        self.transport_id = transport_id
        self.family = family
        self._sock = sock
        network = transport.network
        self.engine = UdpEngine(
            sock,
            network.loop,
            network,
            network.handlers,
            max_datagram=network.max_datagram,
            use_recvmmsg=network.use_recvmmsg,
        )
        self.engine.transport_id = transport_id
        if network._response_listener is not None:
            self.engine.set_response_handler(network._response_listener)

    @property
    def listen_addr(self) -> Multiaddr:
        return sockaddr_to_multiaddr(self._sock.getsockname(), "udp")

    @property
    def sockname(self) -> tuple[str, int]:
        """The bound (host, port)."""
        return self._sock.getsockname()[:2]

    def start(self) -> None:
        self.engine.start()

    def write_message(self, data: bytes, addr: Multiaddr | str) -> None:
        """Send one raw datagram (no session, no encryption): the seed's WriteMessage."""
        self.engine.sendto(bytes(data), parse_multiaddr(addr).sockaddr)

    def new_session(self, protocol: str, peer_id: PeerID) -> SocketSession:
        return SocketSession(self.transport.network, peer_id, protocol)

    def close(self) -> None:
        self.engine.close()
        self._sock.close()


@dataclass(frozen=True)
class SocketSession:
    """The seed's SocketSession: sending on one protocol to one peer."""

    network: MessageNetwork
    peer_id: PeerID
    protocol: str

    async def send_message(self, data: bytes) -> None:
        await self.network.send_message(self.peer_id, self.protocol, data)

    def close(self) -> None:
        """Nothing to release: sessions are per peer and shared by all protocols."""


class _Dial:
    """An initiator handshake in progress and the session it will establish."""

    __slots__ = ("session", "engine", "done", "initiation")

    def __init__(self, session: Session, engine: UdpEngine,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.engine = engine
        self.done: asyncio.Future[Session] = loop.create_future()
        # The first INITIATION, copied to a TCP connection that comes up while it is pending;
        # None until the handshake starts (a dial by TCP alone waits for its connection).
        self.initiation: bytes | None = None


_IP_MTU = 14    # Linux getsockopt names the socket module lacks: the route's MTU, on a
_IPV6_MTU = 24  # connected socket (docs/wire.md 5.1)


def _route_mtu_bound(address: tuple[Any, ...] | None) -> int:
    """The largest UDP payload the local route to ``address`` carries (its MTU less the IP
    and UDP headers), which no probe can exceed; a large number where the platform does not
    say (the probes then find out)."""
    if address is None or not sys.platform.startswith("linux"):
        return limits.MAX_DATAGRAM_CEILING
    v6 = ":" in address[0]
    try:
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(address)  # no packet: it only picks the route
            if v6:
                return sock.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU) - 48
            return sock.getsockopt(socket.IPPROTO_IP, _IP_MTU) - 28
    except OSError:
        return limits.MAX_DATAGRAM_CEILING


class _PmtuSearch:
    """One session's PMTU search (docs/wire.md 5.1): the sizes left to try, largest first, and
    the probe out for the first of them."""

    __slots__ = ("data", "sizes", "timer", "tries")

    def __init__(self) -> None:
        self.sizes: list[int] = []                      # (once the session is up)
        self.tries = 0                                  # probes sent for sizes[0]
        self.data = b""                                 # the PING data of the probe out
        self.timer: asyncio.TimerHandle | None = None  # its timeout


class MessageNetwork:
    """Sockets, transports, peers and their secure sessions."""

    def __init__(
        self,
        keypair: KeyPair | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        plaintext: bool = False,
        max_datagram: int = limits.MAX_DATAGRAM_CEILING,
        max_sessions: int = limits.MAX_SESSIONS,
        use_recvmmsg: bool | None = None,
        peerstore: Peerstore | None = None,
        transport_policy: str = "prefer-udp",
        stream_settings: StreamSettings | None = None,
        aes_gcm: bool = True,
    ) -> None:
        """``aes_gcm``: offer AES-256-GCM for DATA where this machine has it fast
        (msgnet._packet.AES_GCM); sessions use it when the peer offers it too (wire.md 2.2).
        False: offer ChaCha20-Poly1305 alone. ``max_datagram``: the largest UDP datagram a
        session may send once PMTU discovery found its path carries it (wire.md 5.1); every
        session starts at 1200, and 1200 turns the search off."""
        if not limits.MAX_DATAGRAM <= max_datagram <= limits.MAX_DATAGRAM_CEILING:
            raise UsageError(
                f"max_datagram must be within {limits.MAX_DATAGRAM}..{limits.MAX_DATAGRAM_CEILING}"
            )
        if transport_policy not in TRANSPORT_POLICIES:
            raise UsageError(f"transport_policy must be one of {TRANSPORT_POLICIES}")
        self.keypair = keypair or KeyPair.generate()
        self.loop = loop or asyncio.get_running_loop()
        self.max_datagram = max_datagram
        self.max_sessions = max_sessions
        self.use_recvmmsg = use_recvmmsg
        self.handlers: dict[str, Handler] = {}
        self.peerstore = peerstore or Peerstore()
        self._plaintext = plaintext
        self.transport_policy = transport_policy
        self._use_udp = transport_policy != "tcp-only"
        self._use_tcp = transport_policy != "udp-only"
        self._transports: list[MessageTransport] = [UdpTransport(self), TcpTransport(self)]
        # Every listening socket and listener, in listen order (transport id = position + 1).
        self._sockets: list[UdpSocket | TcpListener] = []
        self.streams = TcpStreams(self, loop=self.loop, settings=stream_settings)
        # The engine of sessions on a host without UDP sockets: it reads no socket.
        self._stream_engine: UdpEngine | None = None
        self._paths: dict[PeerID, _PeerPath] = {}
        self._conn_path: dict[StreamConnection, tuple[PeerID, _PeerPath]] = {}
        # Connections that carried an authenticated packet or a handshake of ours: from then
        # on bad packets on them are dropped as on UDP instead of closing them (wire.md §6).
        self._trusted: set[StreamConnection] = set()
        # Where the copies of a pending responder handshake's INITIATION came from.
        self._pending_paths: dict[int, list[Any]] = {}
        self._handshaker = Handshaker(self.keypair, plaintext=plaintext,
                                      aes_gcm=aes_gcm and AES_GCM, transport_ids=())
        self.delivery = DeliveryManager(self.loop, max_datagram, on_large=self._search_pmtu)
        # PMTU searches in progress (docs/wire.md 5.1), by session.
        self._pmtu: dict[Session, _PmtuSearch] = {}
        # Current sending session per peer, least recently used first (bounded).
        self._sessions: OrderedDict[PeerID, Session] = OrderedDict()
        # The sending session of a peer, found in C (SendRoute): the peer sent to last
        # (the PeerID object the caller holds) without the PeerID hash and the LRU move, any
        # other from _sessions. Disabled while a refusal is remembered (_refusals_changed)
        # and once closed; its remembered peer is cleared whenever _sessions or _paths
        # changes. The request table and send_message_nowait start there.
        self.route = SendRoute(self.loop.time, self._sessions, self._paths)
        # Every live session (sending or receive-only) by our local index (its engine is
        # session.engine).
        self._by_index: dict[int, Session] = {}
        self.streams.sessions = self._by_index  # connections feed their DATA to the engines
        # Reliable messages on streams: kept until acknowledged, resumed after a connection
        # dies (docs/wire.md §6.1); its two reserved protocols are handled here.
        self.stream_recovery = StreamRecovery(self.streams, self._send_reliable_nowait,
                                              self._count, self._by_index)
        self.delivery.bind_route(self.route, self.stream_recovery.held)
        self.handlers.update(self.stream_recovery.handlers())
        # Local indices of our initiator sessions not yet confirmed by an authenticated packet:
        # the housekeeping timer tells the handshake to stop re-sending FINISH for them.
        self._unconfirmed: set[int] = set()
        self._by_remote_index: dict[int, Session] = {}
        self._dials: dict[int, _Dial] = {}          # local index -> dial in progress
        self._dial_by_peer: dict[PeerID, _Dial] = {}
        self._refused: dict[tuple[PeerID, str], float] = {}
        self._response_listener: ResponseListener | None = None
        self._reset_listeners: list[Callable[[PeerID, str, int], None]] = []
        self._unreachable_listeners: list[Callable[[PeerID, BaseException], None]] = []
        self._counters: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    # -- the seed's MessageNetwork interface ---------------------------------------------

    @property
    def local_peer(self) -> PeerID:
        return self.keypair.peer_id

    async def listen(self, *addrs: Multiaddr | str) -> list[Multiaddr]:
        """Bind a socket to each address; returns the bound addresses (port 0 resolved)."""
        self._check_open()
        bound = []
        for ma in addrs:
            endpoint = parse_multiaddr(ma)
            transport = next((t for t in self._transports if t.can_dial(endpoint)), None)
            if transport is None:
                raise UsageError(f"no transport can listen on {ma}")
            endpoint = await endpoint.resolve()
            sock = await transport.open(endpoint, len(self._sockets) + 1)
            sock.start()
            self._sockets.append(sock)
            bound.append(sock.listen_addr)
        self._handshaker.set_transport_ids(tuple(s.transport_id for s in self._sockets))
        self._arm_timer(self.loop.time() + HOUSEKEEPING_INTERVAL)
        return bound

    def listen_addrs(self) -> list[Multiaddr]:
        return [s.listen_addr for s in self._sockets]

    def sockets(self) -> list[UdpSocket | TcpListener]:
        """Every listening socket and listener, in listen order."""
        return list(self._sockets)

    def _engines(self) -> list[UdpEngine]:
        engines = [s.engine for s in self._sockets if isinstance(s, UdpSocket)]
        if self._stream_engine is not None:
            engines.append(self._stream_engine)
        return engines

    def transports(self) -> list[MessageTransport]:
        return list(self._transports)

    def peers(self) -> list[PeerID]:
        """Peers with an established session."""
        return [p for p, s in self._sessions.items() if s.established]

    def has_session(self, peer_id: PeerID) -> bool:
        session = self._sessions.get(peer_id)
        return session is not None and session.established

    def sessions(self, peer_id: PeerID) -> list[Session]:
        return [s for s in self._by_index.values() if s.peer_id == peer_id]

    def set_message_handler(self, protocol: str, handler: Handler) -> None:
        if not isinstance(protocol, str) or not protocol:
            raise UsageError("protocol must be a non-empty str")
        if len(protocol.encode()) > limits.MAX_PROTOCOL_LENGTH:
            raise UsageError(f"protocol id longer than {limits.MAX_PROTOCOL_LENGTH} bytes")
        if not callable(handler):
            raise UsageError("handler must be callable")
        if protocol.startswith("/msgnet/stream-"):
            raise UsageError("protocol ids beginning with /msgnet/stream- are msgnet's own")
        # Interned, as the engines intern the protocols peers bind: the per-message handler
        # lookup matches by identity.
        self.handlers[sys.intern(str(protocol))] = handler

    def remove_message_handler(self, protocol: str) -> None:
        self.handlers.pop(protocol, None)

    async def close_peer(self, peer_id: PeerID) -> None:
        """Drop every session with the peer (the seed: reset all its sessions)."""
        dial = self._dial_by_peer.get(peer_id)
        if dial is not None:
            self._fail_dial(dial, PeerUnreachableError(f"closed peer {peer_id}"))
        for session in list(self._by_index.values()):
            if session.peer_id == peer_id:
                self._drop_session(session)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        error = ClosedError("network closed")
        for dial in list(self._dials.values()):
            self._fail_dial(dial, error)
        self.delivery.close(error)
        for session, search in list(self._pmtu.items()):
            self._end_pmtu_search(session, search)
        for session in list(self._by_index.values()):
            session.engine.remove_session(session)
        self._by_index.clear()
        self._unconfirmed.clear()
        self._sessions.clear()
        self._refusals_changed()  # (closed: the route serves no more)
        for path in self._paths.values():
            if path.dialing is not None:
                path.dialing.cancel()
        self._paths.clear()
        self.streams.close()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        if self._stream_engine is not None:
            self._stream_engine.close()

    # -- sending ---------------------------------------------------------------------------

    async def send_message(self, peer_id: PeerID, protocol: str, data: bytes, *,
                           flags: int = 0, request_id: int = 0,
                           qos: QoS = BEST_EFFORT) -> None:
        """Queue a message; waits only when the peer's queue is full (back-pressure), or, for
        ``Reliable(wait=True)``, until the peer acknowledged it.

        On a stream path a reliable message is sent as it is: TCP acknowledges, retransmits
        and orders it, so ``wait`` returns once it is queued; the connection keeps it until
        the peer's PONG proves it arrived, and sends it again by the next path if the
        connection dies first (docs/wire.md §6.1). A message too large for one datagram takes
        the peer's stream (dialled if need be) before it is fragmented."""
        session, engine = self.session_for(peer_id, protocol)
        if flags & limits.FLAG_REQUEST:
            self._expect_reply(self._paths.get(peer_id))
        if isinstance(qos, Reliable) and qos.ordered and session in self.stream_recovery.held:
            # Resuming (docs/wire.md §6.1): after the messages the resume sends again.
            ack = await self.stream_recovery.hold(session, protocol, data, flags, request_id,
                                                  qos.wait)
            if qos.wait:
                await self._acknowledged(peer_id, protocol, ack, qos.timeout)
            return
        if isinstance(qos, Reliable) and session.sends_on_stream:
            recovery = self.stream_recovery
            while True:
                recovery.retain(session)  # first: a request may be written at once
                if engine.send_message(session, protocol, data, flags, request_id):
                    recovery.sent(session)
                    if qos.wait:
                        await self._stream_acknowledged(
                            session, protocol,
                            limits.STREAM_WAIT_TIMEOUT if qos.timeout is None else qos.timeout)
                    return
                await engine.wait_drained(session)
                session, engine = self.session_for(peer_id, protocol)
                if not session.sends_on_stream:
                    break  # moved off the stream meanwhile: the delivery layer takes it
        if isinstance(qos, Reliable):
            room = self.delivery.room_waiter(session)  # back-pressure (docs/wire.md §3.6)
            if room is not None:
                await room
                session, engine = self.session_for(peer_id, protocol)
            waiter = self.delivery.send(session, engine, protocol, data, qos, flags, request_id)
            if waiter is not None:
                await self._acknowledged(peer_id, protocol, waiter, qos.timeout)
            return
        try:
            while not engine.send_message(session, protocol, data, flags, request_id):
                await engine.wait_drained(session)
                session, engine = self.session_for(peer_id, protocol)
            return
        except MessageTooLargeError:
            if not await self._stream_for(peer_id):  # no stream: fragmented best effort
                self.delivery.send(session, engine, protocol, data, qos, flags, request_id)
                return
        session, engine = self.session_for(peer_id, protocol)
        while not engine.send_message(session, protocol, data, flags, request_id):
            await engine.wait_drained(session)
            session, engine = self.session_for(peer_id, protocol)

    async def _acknowledged(self, peer_id: PeerID, protocol: str,
                            ack: asyncio.Future[None] | None, timeout: float | None) -> None:
        """Wait for a reliable message's acknowledgement: ``ack`` from the delivery layer, or,
        when there is none because it went on a stream, a PING of its own after it.
        RequestTimeoutError after ``timeout`` (None: the delivery layer's own bound)."""
        if ack is None:
            session, _ = self.session_for(peer_id, protocol)
            if session.sends_on_stream:
                await self._stream_acknowledged(
                    session, protocol, limits.STREAM_WAIT_TIMEOUT if timeout is None else timeout)
            return
        try:
            await _within(ack, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"{peer_id} did not acknowledge a message on {protocol} within "
                f"{timeout} s") from None

    def send_reply(self, session: Session, protocol: str, data: bytes, request_id: int,
                   reliable: bool, ordered: bool) -> None:
        """Engine delegate: a reply that needs the delivery layer (reliable, or large), unless
        the session sends on a stream, which needs none."""
        qos: QoS = Reliable(ordered=ordered) if reliable else BEST_EFFORT
        if ordered and session in self.stream_recovery.held:  # after what the resume resends
            self.stream_recovery.hold(session, protocol, data, limits.FLAG_RESPONSE,
                                      request_id, False)
            return
        try:
            if session.sends_on_stream:
                if reliable:
                    self.stream_recovery.retain(session)
                if not session.engine.send_message(session, protocol, data,
                                                   limits.FLAG_RESPONSE, request_id):
                    self._count("reply_dropped")
                elif reliable:
                    self.stream_recovery.sent(session)
                return
            self.delivery.send(session, session.engine, protocol, data, qos,
                               limits.FLAG_RESPONSE, request_id)
        except MsgnetError as exc:
            self._count("reply_dropped")
            log.debug("reply on %s dropped: %s", protocol, exc)

    def _send_reliable_nowait(self, peer_id: PeerID, protocol: str, data: bytes, flags: int,
                              request_id: int, wait: bool = False,
                              ordered: bool = False) -> asyncio.Future[None] | None:
        """A reliable message sent from a callback: stream recovery's RESUME, its answer,
        the messages it sends again and the ordered ones that waited for it (docs/wire.md
        §6.1). With ``wait``, the future of its acknowledgement, or None when it went on a
        stream (a later PING acknowledges it).

        Queued at once even on a full queue: stream recovery sends a bounded number of them
        (what a connection kept, the senders that waited), in an order that waiting for room
        would break."""
        qos = Reliable(ordered=ordered, wait=wait)
        try:
            session, engine = self.session_for(peer_id)
            if not session.sends_on_stream:
                return self.delivery.send(session, engine, protocol, data, qos, flags,
                                          request_id)
            self.stream_recovery.retain(session)
            engine.send_message(session, protocol, data, flags, request_id, True)
            self.stream_recovery.sent(session)
            return None
        except MsgnetError as exc:
            self._count("stream_resend_failed")
            log.debug("stream recovery could not send on %s: %s", protocol, exc)
            if not wait:
                return None
            failed: asyncio.Future[None] = self.loop.create_future()
            failed.set_exception(exc)
            return failed

    def send_message_nowait(self, peer_id: PeerID, protocol: str, data: bytes,
                            flags: int = 0, request_id: int = 0) -> bool:
        """Queue a message now, as send_message does, but never wait: False when the peer's
        queue is full (then await send_message). What callers use first, to spare a
        coroutine per message in the common case.

        The route (SendRoute.send) finds the session in C, the peer sent to last or any with
        a session (fan-out changes peer on every message); else session_for dials, refuses
        or raises. A request marks its UDP path as awaiting a reply (_expect_reply; the
        route does it in C)."""
        sent = self.route.send(peer_id, protocol, data, flags, request_id)
        if sent >= 0:
            return sent == 1
        if flags & _FLAG_REQUEST:
            self._expect_reply(self._paths.get(peer_id))
        session, engine = self.session_for(peer_id, protocol)  # it dials, refuses, raises
        return engine.send_message(session, protocol, data, flags, request_id)

    def send_reliable_nowait(self, peer_id: PeerID, protocol: str, data: bytes,
                             ordered: bool) -> bool:
        """send_message of ``Reliable(ordered=ordered)`` (no ``wait``) in the common case: the
        peer's datagram session has room. False otherwise (full, on a stream, or held by a
        resume): then await send_message. Raises what session_for raises.

        The per-message path, to whichever peer (fan-out alternates them): one call into
        the compiled delivery manager, which finds the session by the route
        (DeliveryManager.send_routed), as send_message_nowait does."""
        sent = self.delivery.send_routed(peer_id, protocol, data, ordered)
        if sent >= 0:
            return sent == 1
        session, engine = self.session_for(peer_id, protocol)  # it dials, refuses, raises
        if ordered and session in self.stream_recovery.held:
            return False
        return self.delivery.send_reliable_nowait(session, engine, protocol, data, ordered)

    def _refusals_changed(self) -> None:
        """The route checks no refusals: it serves only while none is remembered."""
        self.route.enabled = not self._refused and not self._closed
        self.route.clear()

    def _expect_reply(self, path: _PeerPath | None) -> None:
        """A request went out on path: its reply is what shows the UDP path still works.
        (SendRoute.send does the same in C for the requests it sends, the common case.)"""
        if path is not None and path.mode == "udp" and not path.expect_since:
            path.expect_since = self.loop.time()

    async def _stream_for(self, peer_id: PeerID) -> bool:
        """Give the peer's sessions a stream for messages too large for a datagram, dialling
        one if the peer has a TCP address; False if there is none to be had."""
        path = self._paths.get(peer_id)
        if path is None or not self._use_tcp:
            return False
        if path.open_stream() is None:
            if path.dialing is None and not self._dial_tcp(peer_id, path):
                return False
            assert path.dialing is not None
            await asyncio.shield(path.dialing)  # the dial reports its own failures
        if path.open_stream() is None:
            return False
        self._apply(peer_id, path)
        return True

    def session_for(self, peer_id: PeerID, protocol: str | None = None
                    ) -> tuple[Session, UdpEngine]:
        """The session to send on, starting a handshake if there is none.

        Raises ProtocolResetError while the peer's refusal of ``protocol`` is
        remembered, PeerUnreachableError when no address is known.
        """
        if self._closed:
            raise ClosedError("network closed")
        if protocol is not None and self._refused:
            until = self._refused.get((peer_id, protocol))
            if until is not None:
                if until > self.loop.time():
                    raise ProtocolResetError(protocol, limits.RESET_NO_HANDLER)
                del self._refused[(peer_id, protocol)]
                self._refusals_changed()
        routed = self.route.session_of(peer_id)
        if routed is not None:
            return routed, routed.engine
        session = self._sessions.get(peer_id)
        if session is not None:  # (a refusal is remembered for another protocol or peer)
            self._sessions.move_to_end(peer_id)
            return session, session.engine
        dial = self._dial_by_peer.get(peer_id)
        if dial is None:
            dial = self._start_dial(peer_id)
        return dial.session, dial.engine

    async def connect(self, peer_id: PeerID, timeout: float = 5.0) -> Session:
        """Establish a session with the peer now (sending nothing)."""
        session, _ = self.session_for(peer_id)
        if session.established:
            return session
        dial = self._dial_by_peer.get(peer_id)
        if dial is None:  # established between the two calls
            return self.session_for(peer_id)[0]
        try:
            return await asyncio.wait_for(asyncio.shield(dial.done), timeout)
        except asyncio.TimeoutError:
            raise PeerUnreachableError(f"no session with {peer_id} after {timeout} s") from None

    def _start_dial(self, peer_id: PeerID) -> _Dial:
        """Start a handshake on every transport we have an address for (docs/wire.md §5):
        UDP at once, TCP once its connection is up (or at once on a connection we have)."""
        if not isinstance(peer_id, PeerID):
            raise UsageError(f"peer must be a PeerID, not {type(peer_id).__name__}")
        if peer_id == self.local_peer:
            raise UsageError("cannot send to ourselves")
        endpoints = self.peerstore.endpoints(peer_id)
        udp = next((e for e in endpoints if self._use_udp and e.transport == "udp"
                    and self._socket_for(e) is not None), None)
        path = self._paths.get(peer_id) or _PeerPath()
        stream = path.open_stream() if self._use_tcp else None
        if udp is None and stream is None and not self._tcp_endpoints(peer_id):
            kinds = {"prefer-udp": "UDP or TCP", "prefer-tcp": "UDP or TCP",
                     "udp-only": "UDP", "tcp-only": "TCP"}[self.transport_policy]
            raise PeerUnreachableError(f"no usable {kinds} address known for {peer_id}")
        self._paths[peer_id] = path
        self.route.clear()
        if udp is not None:
            path.udp = udp.sockaddr
            sock = self._socket_for(udp)
            assert sock is not None
            engine = sock.engine
        else:
            engine = self._default_engine()
        local_index = self._allocate_index()
        session = engine.new_session(peer_id, local_index, True)
        dial = _Dial(session, engine, self.loop)
        dial.done.add_done_callback(_consume_exception)
        self._dials[local_index] = dial
        self._dial_by_peer[peer_id] = dial
        self._count("handshakes_started")
        if udp is not None:
            self._initiate(dial, udp.sockaddr)
        elif stream is not None:
            self._initiate(dial, stream.address)
        if stream is None and self._use_tcp and path.dialing is None:
            self._dial_tcp(peer_id, path)
        return dial

    def _initiate(self, dial: _Dial, address: Any) -> None:
        session, engine = dial.session, dial.engine
        datagrams = self._handshaker.initiate(
            address,
            self.loop.time(),
            local_index=session.local_index,
            peer_id=session.peer_id,
            take_frames=lambda budget: engine.take_payload(session, budget),
        )
        dial.initiation = datagrams[0][0]
        self._send_handshake(datagrams)
        self._arm_timer(self._handshaker.next_deadline())

    def _tcp_endpoints(self, peer_id: PeerID) -> list[Endpoint]:
        if not self._use_tcp:
            return []
        return [e for e in self.peerstore.endpoints(peer_id)
                if e.transport == "tcp" and e.family in ("ip4", "ip6")]

    def _dial_tcp(self, peer_id: PeerID, path: _PeerPath) -> bool:
        """Connect to the peer's TCP addresses in the background; False if it has none."""
        endpoints = self._tcp_endpoints(peer_id)
        if not endpoints or self._closed:
            return False
        path.dialing = self.loop.create_task(self._connect(peer_id, path, endpoints))
        return True

    async def _connect(self, peer_id: PeerID, path: _PeerPath,
                       endpoints: list[Endpoint]) -> None:
        try:
            for endpoint in endpoints:
                try:
                    conn = await self.streams.connect(endpoint.host, endpoint.port,
                                                      self._tcp_transport_id())
                except PeerUnreachableError:
                    continue
                self._stream_connected(peer_id, path, conn)
                return
            self._count("tcp_dials_failed")
            dial = self._dial_by_peer.get(peer_id)
            if dial is not None and dial.initiation is None:  # TCP was its only way
                self._fail_dial(dial, PeerUnreachableError(
                    f"no TCP connection to {peer_id} at {[str(e) for e in endpoints]}"))
        except ClosedError:
            return
        finally:
            if path.dialing is asyncio.current_task():
                path.dialing = None

    def _stream_connected(self, peer_id: PeerID, path: _PeerPath,
                          conn: StreamConnection) -> None:
        """A connection we dialled is up: first contact copies the INITIATION to it; an
        established peer's sessions get it as a path (or as their only one after a failover)."""
        if self._paths.get(peer_id) is not path:  # the peer was forgotten meanwhile
            conn.close()
            return
        self._bind_stream(peer_id, path, conn)
        dial = self._dial_by_peer.get(peer_id)
        if dial is not None:
            if dial.initiation is None:
                self._initiate(dial, conn.address)
            else:
                conn.write_packet(dial.initiation)
            return
        if path.mode == "tcp":
            self._apply(peer_id, path)
            self._ping(peer_id)  # the peer follows us onto the connection at once
        elif path.mode == "both" or path.udp is not None:
            self._apply(peer_id, path)

    def _bind_stream(self, peer_id: PeerID, path: _PeerPath, conn: StreamConnection) -> None:
        """Make conn the peer's connection (one per peer pair, for all its sessions)."""
        path.stream = conn
        self._conn_path[conn] = (peer_id, path)

    def _tcp_transport_id(self) -> int:
        """What outbound connections name as our transport: our first TCP listener, if any."""
        return next((s.transport_id for s in self._sockets if isinstance(s, TcpListener)), 0)

    def _socket_for(self, endpoint: Endpoint) -> UdpSocket | None:
        family = socket.AF_INET6 if endpoint.family == "ip6" else socket.AF_INET
        return next((s for s in self._sockets
                     if isinstance(s, UdpSocket) and s.family == family), None)

    def _default_engine(self) -> UdpEngine:
        """The engine for a session that has no UDP address (yet): the first UDP socket's, or
        on a host without one, an engine that reads no socket."""
        sock = next((s for s in self._sockets if isinstance(s, UdpSocket)), None)
        if sock is not None:
            return sock.engine
        if self._stream_engine is None:
            self._stream_engine = UdpEngine(None, self.loop, self, self.handlers,
                                            max_datagram=self.max_datagram)
            self._stream_engine.transport_id = 0
            if self._response_listener is not None:
                self._stream_engine.set_response_handler(self._response_listener)
            self._stream_engine.start()
        return self._stream_engine

    def _allocate_index(self) -> int:
        while True:
            index = int.from_bytes(os.urandom(4), "big")
            if index and index not in self._by_index and not self._handshaker.holds_index(index):
                return index

    # -- engine delegate (called by the Cython engine) ---------------------------------

    def handle_control(self, data: bytes, addr: Any) -> None:
        """Handshake packets, unknown sessions and other rare packets from an engine, or from
        a TCP connection (``addr`` is then its StreamAddress)."""
        try:
            self._handle_control(data, addr)
        except MsgnetError as exc:  # malformed input that slipped past a parser
            self._count("bad_control")
            log.debug("dropped control packet from %s: %s", addr, exc)

    def _handle_control(self, data: bytes, addr: Any) -> None:
        if self._closed or not data:
            return
        if not (self._use_tcp if isinstance(addr, StreamAddress) else self._use_udp):
            self._count("policy_refused")  # a transport our policy does not use
            return
        kind = data[0]
        now = self.loop.time()
        if kind in (limits.PACKET_DATA, limits.PACKET_PLAIN_DATA):
            if len(data) >= 5:
                index = struct.unpack_from(">I", data, 1)[0]
                if self._handshaker.is_pending(index):
                    self._handshaker.hold_early_data(index, data)  # counts what it drops
                    return
            reply = self._handshaker.answer_unknown_session(data, addr, now)
            if reply is not None:
                self._send_to(reply, addr)
            return
        if kind == limits.PACKET_SESSION_UNKNOWN:
            self._handle_session_unknown(data, addr)
            return
        output = self._handshaker.handle_packet(data, addr, now,
                                                allocate_index=self._allocate_index)
        for reply, to in output.datagrams:
            if reply[0] == limits.PACKET_RESPONSE:  # remember every path the dial came on
                paths = self._pending_paths.setdefault(struct.unpack_from(">I", reply, 1)[0], [])
                if to not in paths or isinstance(to, StreamAddress):
                    paths.append(to)
        self._send_handshake(output.datagrams, output.events)
        for event in output.events:
            self._handle_handshake_event(event)
        self._arm_timer(self._handshaker.next_deadline())

    def _engine_for_addr(self, addr: Any) -> UdpEngine | None:
        """The UDP engine that sends to addr (its family's socket)."""
        family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
        sock = next((s for s in self._sockets
                     if isinstance(s, UdpSocket) and s.family == family), None)
        return sock.engine if sock is not None else None

    def _send_to(self, data: bytes, addr: Any) -> None:
        """One raw packet (a handshake packet or a stateless answer) to addr: back on its
        connection for a StreamAddress, else by UDP."""
        if isinstance(addr, StreamAddress):
            addr.conn.write_packet(data)
            return
        engine = self._engine_for_addr(addr)
        if engine is not None:
            engine.sendto(data, addr)

    def _send_handshake(self, datagrams: Iterable[tuple[bytes, Any]],
                        events: Iterable[Any] = ()) -> None:
        """Send handshake output. Our INITIATION and FINISH (first sends and retransmissions)
        go on every path we have to the peer (docs/wire.md §5, first contact); answers go
        where their packet came from."""
        finishing = {e.remote_index: e.peer_id for e in events
                     if isinstance(e, SessionEstablished) and e.initiator}
        for data, addr in datagrams:
            peer: PeerID | None = None
            if data[0] == limits.PACKET_INITIATION and data[6:22] == _ZERO_COOKIE:
                dial = self._dials.get(struct.unpack_from(">I", data, 2)[0])
                peer = dial.session.peer_id if dial is not None else None
            elif data[0] == limits.PACKET_FINISH:
                remote = struct.unpack_from(">I", data, 1)[0]
                peer = finishing.get(remote)
                if peer is None:
                    session = self._by_remote_index.get(remote)
                    peer = session.peer_id if session is not None else None
            path = self._paths.get(peer) if peer is not None else None
            if path is None:
                self._send_to(data, addr)
                continue
            targets = [addr]
            if self._use_udp and path.udp is not None and path.udp != addr:
                targets.append(path.udp)
            stream = path.open_stream() if self._use_tcp else None
            if stream is not None and stream.address != addr:
                targets.append(stream.address)
            for target in targets:
                self._send_to(data, target)

    def _handle_handshake_event(self, event: Any) -> None:
        if isinstance(event, SessionEstablished):
            if event.initiator:
                self._initiator_established(event)
            else:
                self._responder_established(event)
        elif isinstance(event, FinishRepeated):
            session = self._by_index.get(event.local_index)
            if session is not None:
                if isinstance(event.address, StreamAddress):
                    self._trusted.add(event.address.conn)
                self._send_ack(session)  # the initiator may have missed it with the first one
                session.engine.flush_session(session, True)
        elif isinstance(event, HandshakeFailed) and event.initiator:
            self._count("handshakes_failed")
            dial = self._dials.get(event.local_index)
            if dial is not None:
                self._fail_dial(dial, event.error)
                return
            # The session went up but the responder never confirmed it ("unconfirmed").
            session = self._by_index.get(event.local_index)
            if session is not None:
                self._drop_session(session)
                for listener in self._unreachable_listeners:
                    listener(session.peer_id, event.error)

    def _initiator_established(self, event: SessionEstablished) -> None:
        dial = self._dials.pop(event.local_index, None)
        if dial is None:
            return
        peer_id = dial.session.peer_id
        if self._dial_by_peer.get(peer_id) is dial:
            del self._dial_by_peer[peer_id]
        session, engine = dial.session, dial.engine
        crypto = SessionCrypto(event.local_index, event.remote_index, event.send_key,
                               event.recv_key, event.plaintext,
                               aes=event.aes_gcm and not event.plaintext)
        path = self._paths.setdefault(peer_id, _PeerPath())
        if isinstance(event.address, StreamAddress):
            self._trusted.add(event.address.conn)
            self._bind_stream(peer_id, path, event.address.conn)
        elif self._engine_for_addr(event.address) is engine:
            path.udp = event.address  # where the RESPONSE came from (a NAT may rewrite it)
        udp = path.udp if self._use_udp and engine.sock is not None else None
        stream = path.open_stream() if self._use_tcp else None
        # Until the ACK, every packet goes on every path (wire.md §5, consolidation).
        path.mode = "both" if udp is not None and stream is not None else (
            "udp" if udp is not None else "tcp")
        path.transports = event.remote_transports
        path.started = self.loop.time()
        path.expect_since = 0.0
        self._register(session, engine)
        self._set_path(session, path)
        engine.install_keys(session, event.remote_index, crypto, udp)
        self._by_remote_index[event.remote_index] = session
        self._unconfirmed.add(event.local_index)
        self._count("handshakes_completed")
        if not dial.done.done():
            dial.done.set_result(session)

    def _responder_established(self, event: SessionEstablished) -> None:
        """Choose the path by our policy among those the handshake came on, tell the initiator
        with ACK in the confirmation, and send it on that path (wire.md §5)."""
        arrived = self._pending_paths.pop(event.local_index, []) + [event.address]
        udp = next((a for a in reversed(arrived) if not isinstance(a, StreamAddress)), None)
        stream = next((a.conn for a in reversed(arrived)
                       if isinstance(a, StreamAddress) and not a.conn.closed), None)
        engine = (self._engine_for_addr(udp) if udp is not None else None) or \
            self._default_engine()
        if engine.sock is None or not self._use_udp:
            udp = None
        if not self._use_tcp:
            stream = None
        if udp is None and stream is None:
            self._count("handshakes_refused")
            return
        prefer_tcp = self.transport_policy in ("prefer-tcp", "tcp-only")
        mode = "tcp" if stream is not None and (prefer_tcp or udp is None) else "udp"
        peer_id = event.peer_id
        path = self._paths.setdefault(peer_id, _PeerPath())
        if udp is not None:
            path.udp = udp
        if stream is not None:
            self._trusted.add(stream)
            self._bind_stream(peer_id, path, stream)
        path.mode = mode
        path.transports = event.remote_transports
        path.expect_since = 0.0
        session = engine.new_session(peer_id, event.local_index, False)
        crypto = SessionCrypto(event.local_index, event.remote_index, event.send_key,
                               event.recv_key, event.plaintext,
                               aes=event.aes_gcm and not event.plaintext)
        self._register(session, engine)
        self._set_path(session, path)
        engine.install_keys(session, event.remote_index, crypto, udp)
        self._by_remote_index[event.remote_index] = session
        self._count("handshakes_completed")
        self._send_ack(session)
        if event.frames:
            engine.process_payload(session, event.frames, udp if event.address == udp else None)
        for packet in event.early_data:
            if session.sends_on_stream and stream is not None:
                engine.feed_stream(bytearray(packet), stream)
            elif udp is not None:
                engine.feed_datagram(packet, udp)
        engine.flush_session(session, True)  # confirms the session to the initiator
        self.delivery.session_established(session)
        self._pmtu_session_up(session)

    def _send_ack(self, session: Session) -> None:
        """Queue ACK(our transport on the session's path): where we prefer to hear from the
        initiator; the confirmation carrying it goes on that same path."""
        if session.sends_on_stream:
            transport_id = session.stream.transport_id
        else:
            transport_id = session.engine.transport_id
        session.engine.send_control(session, encode_frame(Ack(transport_id)))

    def _set_path(self, session: Session, path: _PeerPath) -> None:
        """Put session on the peer's path: its stream (when it sends on it, and for messages
        too large for a datagram) and/or UDP, both at once during first contact."""
        stream = path.open_stream() if self._use_tcp else None
        udp = path.mode != "tcp" and self._use_udp
        if stream is None and not udp:
            return  # nothing to move to yet: the queue waits for a connection
        transport_id = (stream.transport_id if stream is not None and not udp
                        else session.engine.transport_id)
        session.engine.set_path(session, stream, udp, path.mode == "both", transport_id)

    def _apply(self, peer_id: PeerID, path: _PeerPath) -> None:
        """Move every live session with the peer (and a dial's) onto its path."""
        for session in self._by_index.values():
            if session.peer_id == peer_id:
                self._set_path(session, path)
        dial = self._dial_by_peer.get(peer_id)
        if dial is not None:
            self._set_path(dial.session, path)

    def _ping(self, peer_id: PeerID) -> None:
        """A PING on the peer's sending session: it answers, and follows us to our path."""
        session = self._sessions.get(peer_id)
        if session is not None and session.established:
            session.engine.send_control(session, encode_frame(Ping(os.urandom(8))))

    def paths(self, peer_id: PeerID) -> list[str]:
        """How each live session with the peer sends: "udp", "tcp" or "udp+tcp" (first
        contact); for tests and diagnostics."""
        return ["udp+tcp" if s.duplicated else "tcp" if s.sends_on_stream else "udp"
                for s in self._by_index.values() if s.peer_id == peer_id]

    def close_streams(self) -> int:
        """Close every TCP connection (their sessions fail over); returns how many."""
        connections = self.streams.connections()
        for conn in connections:
            conn.close()
        return len(connections)

    def _register(self, session: Session, engine: UdpEngine) -> None:
        """Make ``session`` the peer's sending session (the newest one wins)."""
        engine.add_session(session)
        self._by_index[session.local_index] = session
        self._sessions[session.peer_id] = session
        self._sessions.move_to_end(session.peer_id)
        self.route.clear()
        while len(self._by_index) > self.max_sessions:
            oldest = next(iter(self._sessions.values()))
            self._drop_session(oldest)
            self._count("sessions_evicted")

    def _drop_session(self, session: Session) -> None:
        search = self._pmtu.get(session)
        if search is not None:
            self._end_pmtu_search(session, search)
        if self._by_index.pop(session.local_index, None) is not None:
            session.engine.remove_session(session)
        self.delivery.close_session(
            session, PeerUnreachableError(f"session with {session.peer_id} ended"))
        self._unconfirmed.discard(session.local_index)
        if self._by_remote_index.get(session.remote_index) is session:
            del self._by_remote_index[session.remote_index]
        if self._sessions.get(session.peer_id) is session:
            del self._sessions[session.peer_id]
            self.route.clear()
            # Another live session with the peer, if any, takes over sending.
            for other in self._by_index.values():
                if other.peer_id == session.peer_id and other.established:
                    self._sessions[other.peer_id] = other
                    break

    def _fail_dial(self, dial: _Dial, error: BaseException) -> None:
        index = dial.session.local_index
        path = self._paths.get(dial.session.peer_id)
        if isinstance(error, SecurityError) and path is not None and path.stream is not None:
            path.stream.abort("stream_closed")  # not the peer we meant to reach
        self._dials.pop(index, None)
        if self._dial_by_peer.get(dial.session.peer_id) is dial:
            del self._dial_by_peer[dial.session.peer_id]
        self._handshaker.cancel(index)
        dial.engine.remove_session(dial.session)
        if not dial.done.done():
            dial.done.set_exception(error)
        for listener in self._unreachable_listeners:
            listener(dial.session.peer_id, error)

    def _handle_session_unknown(self, data: bytes, addr: Any) -> None:
        """The peer forgot our session: re-handshake and re-send what it lost."""
        try:
            remote_index, counter, tag = decode_session_unknown(data)
        except FrameError:
            self._count("bad_session_unknown")
            return
        session = self._by_remote_index.get(remote_index)
        if session is None:
            self._count("bad_session_unknown")
            return
        payloads = session.retained_since(counter, tag)
        if payloads is None:
            self._count("bad_session_unknown")
            return
        self._count("sessions_forgotten_by_peer")
        peer_id = session.peer_id
        messages = messages_in_payloads(session, payloads)
        self._drop_session(session)
        if self._dial_by_peer.get(peer_id) is None and not isinstance(addr, StreamAddress):
            self.peerstore.add_addrs(peer_id, [sockaddr_to_multiaddr(addr, "udp")])
        new_session, engine = self.session_for(peer_id)
        for protocol, flags, request_id, payload in messages:
            if not engine.send_message(new_session, protocol, payload, flags, request_id):
                self._count("resend_dropped")

    def handle_response(self, session: Session, request_id: int, data: bytes) -> None:
        if self._response_listener is not None:
            self._response_listener(session, request_id, data)

    def handle_reset(self, session: Session, protocol: str | None, code: int) -> None:
        self._count("resets_received")
        if protocol is None or code != limits.RESET_NO_HANDLER:
            return
        self._refused[(session.peer_id, protocol)] = self.loop.time() + limits.RESET_MEMORY
        self._refusals_changed()
        for listener in self._reset_listeners:
            listener(session.peer_id, protocol, code)

    def handle_pong(self, session: Session, data: bytes) -> None:
        self._count("pongs_received")
        search = self._pmtu.get(session)
        if search is not None and data == search.data:
            self._end_pmtu_search(session, search)
            self.delivery.set_datagram_size(session, search.sizes[0])
            self._count("pmtu_raised")
            return
        self.stream_recovery.pong_received(session, data)

    # -- PMTU discovery (docs/wire.md 5.1) -----------------------------------------------

    def _search_pmtu(self, session: Session) -> None:
        """The delivery layer has a message larger than session's datagram: probe for larger
        datagrams, if the path may have them (the engine's socket sets DF)."""
        engine = session.engine
        if not engine.probes_path or engine.max_datagram <= session.datagram_size:
            session.pmtu_state = PMTU_DONE
            return
        search = self._pmtu[session] = _PmtuSearch()
        if session.established and (session.last_received or not session.initiator):
            self._first_probe(session, search)
        # else the first probe goes once the peer confirmed the session (_pmtu_session_up)

    def _pmtu_session_up(self, session: Session) -> None:
        """The session is confirmed: a search that waited for it sends its first probe."""
        search = self._pmtu.get(session)
        if search is not None and not search.tries:
            self._first_probe(session, search)

    def _first_probe(self, session: Session, search: _PmtuSearch) -> None:
        """The sizes to try, largest first, bounded by the local route to the peer (its
        address is known once the session is up), and the probe of the first."""
        engine = session.engine
        bound = min(engine.max_datagram, _route_mtu_bound(session.address))
        search.sizes = sorted({size for size in (engine.max_datagram, *limits.PMTU_PROBE_SIZES)
                               if session.datagram_size < size <= bound}, reverse=True)
        if not search.sizes:  # the route carries nothing larger: no probe to send
            self._end_pmtu_search(session, search)
            return
        self._send_probe(session, search)

    def _send_probe(self, session: Session, search: _PmtuSearch) -> None:
        """A probe of search.sizes[0] bytes: PING (mark, size, 8 random bytes) and PADDING."""
        size = search.sizes[0]
        search.data = limits.PMTU_PROBE_MARK + size.to_bytes(2, "big") + os.urandom(8)
        ping = encode_frame(Ping(search.data))
        payload = ping + bytes(size - limits.DATA_OVERHEAD - len(ping))  # PADDING: 0x00
        try:
            counter = session.engine.send_probe(session, payload)
        except ClosedError:
            counter = -1
        if counter == -1:  # the session closed or has no UDP path now
            self._end_pmtu_search(session, search)
            return  # (-2, the socket blocked: as a lost probe, tried again on its timeout)
        search.tries += 1
        self._count("pmtu_probes")
        search.timer = self.loop.call_later(limits.PMTU_PROBE_TIMEOUT, self._probe_lost,
                                            session, search)

    def _probe_lost(self, session: Session, search: _PmtuSearch) -> None:
        """No PONG in time: the same size again, up to PMTU_MAX_PROBES, then the next."""
        search.timer = None
        if self._pmtu.get(session) is not search:
            return
        if search.tries >= limits.PMTU_MAX_PROBES:
            search.sizes.pop(0)
            search.tries = 0
            if not search.sizes:  # nothing larger gets through: the session stays as it is
                self._end_pmtu_search(session, search)
                return
        self._send_probe(session, search)

    def _end_pmtu_search(self, session: Session, search: _PmtuSearch) -> None:
        if search.timer is not None:
            search.timer.cancel()
            search.timer = None
        if self._pmtu.get(session) is search:
            del self._pmtu[session]
        session.pmtu_state = PMTU_DONE

    async def _stream_acknowledged(self, session: Session, protocol: str,
                                   timeout: float) -> None:
        """Reliable(wait=True) on a stream (docs/wire.md §6.1): a PING queued right after the
        message; its PONG proves the peer handled the message (the stream is ordered and the
        peer handles frames in order); if the connection dies first, the acknowledgement of
        the message sent again in its place. RequestTimeoutError if it does not come in time."""
        marker, future = self.stream_recovery.wait(session)
        try:
            await _within(future, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"{session.peer_id} did not acknowledge a message on {protocol} within "
                f"{timeout} s") from None
        finally:
            self.stream_recovery.unwait(marker)

    def handle_ack(self, session: Session, transport_id: int) -> None:
        """The responder's choice (docs/wire.md §5): consolidate onto the path the ACK came on.

        Only authenticated packets reach here, so only the proven peer steers us; an ACK for
        a transport the peer did not announce, or sent to the responder, changes nothing."""
        self._count("acks_received")
        path = self._paths.get(session.peer_id)
        if (path is None or not session.initiator
                or (path.transports and transport_id not in path.transports)):
            self._count("acks_ignored")
            return
        conn = session.rx_stream
        if conn is not None:
            self._bind_stream(session.peer_id, path, conn)
            path.mode = "tcp"
        elif self._use_udp and session.address is not None:
            path.udp = session.address
            path.mode = "udp"
        else:
            self._count("acks_ignored")
            return
        path.expect_since = 0.0
        self._apply(session.peer_id, path)

    def handle_udp_packet(self, session: Session) -> None:
        """An authenticated datagram for a session that sends on a stream: follow the peer
        back to UDP once the stream has been silent for ADOPT_AFTER."""
        path = self._paths.get(session.peer_id)
        if path is None or not self._use_udp or session.engine.sock is None:
            return
        path.udp = session.address
        stream = path.open_stream()
        if path.mode == "tcp" and (stream is None or self.loop.time() - max(
                path.stream_rx, stream.rx_time) >= ADOPT_AFTER):
            path.mode = "udp"
            path.expect_since = 0.0
            self._apply(session.peer_id, path)
            self._count("paths_adopted")

    # -- the TCP connections' delegate (msgnet.tcp.StreamDelegate) -----------------------

    def stream_opened(self, conn: StreamConnection) -> None:
        """Nothing to do until the connection carries a handshake or a session's packet."""

    def stream_packet(self, conn: StreamConnection, packet: memoryview) -> None:
        """One packet from a TCP connection: DATA goes through its session's engine, the rest
        through the handshake path with the connection's StreamAddress. Before the connection
        proved itself, a packet that fails its checks closes it (docs/wire.md §6)."""
        if self._closed:
            return
        kind = packet[0]
        unknown_data = False
        if kind == limits.PACKET_DATA or kind == limits.PACKET_PLAIN_DATA:
            session = (self._by_index.get(_U32.unpack_from(packet, 1)[0])
                       if len(packet) >= 5 else None)
            if session is not None and session.crypto is not None:
                status = session.engine.feed_stream(packet, conn)
                if status == STREAM_OK:
                    entry = self._conn_path.get(conn)
                    if (entry is not None and entry[0] is session.peer_id
                            and entry[1].stream is conn and entry[1].mode != "udp"):
                        entry[1].stream_rx = session.last_received  # the common case
                    else:
                        self._stream_authenticated(session, conn)
                elif status == STREAM_BAD and conn not in self._trusted:
                    conn.abort("bad_stream")
                return
            unknown_data = session is None and not (
                len(packet) >= 5 and self._handshaker.is_pending(_U32.unpack_from(packet, 1)[0]))
        elif not limits.PACKET_INITIATION <= kind <= limits.PACKET_VERSION_UNSUPPORTED:
            conn.abort("bad_stream")  # not msgnet, or a reserved type: nothing to answer
            return
        address = conn.address
        if conn in self._trusted or address is None:
            self.handle_control(bytes(packet), address)
            return
        before = self._malformed_handshakes()
        self.handle_control(bytes(packet), address)
        if self._malformed_handshakes() > before:
            conn.abort("bad_stream")
        elif unknown_data:
            conn.close("bad_stream")  # after the SESSION_UNKNOWN answer, if one went out

    def _malformed_handshakes(self) -> int:
        counters = self._handshaker.counters
        return sum(counters[name] for name in _HANDSHAKE_MALFORMED)

    def stream_bad_packet(self, conn: StreamConnection) -> None:
        """A DATA packet for a known session failed its checks on conn: before the
        connection proved itself that closes it (docs/wire.md §6)."""
        if conn not in self._trusted:
            conn.abort("bad_stream")

    def stream_authenticated(self, session: Session, conn: StreamConnection) -> None:
        """An authenticated packet on conn for a session that does not send on it alone
        (the connection's fast path handles the rest without calling here)."""
        self._stream_authenticated(session, conn)

    def _stream_authenticated(self, session: Session, conn: StreamConnection) -> None:
        """An authenticated packet came on conn: it is the peer's connection now, and the
        session follows the peer onto it once its UDP path has been silent (ADOPT_AFTER)."""
        entry = self._conn_path.get(conn)
        now = session.last_received  # the engine's clock reading for this packet
        if entry is not None and entry[0] is session.peer_id:
            path = entry[1]
            path.stream_rx = now
            if path.stream is conn and path.mode != "udp":
                return  # the common case: nothing changes
        else:
            self._trusted.add(conn)
            path = self._paths.setdefault(session.peer_id, _PeerPath())
            path.stream_rx = now
        changed = path.stream is not conn
        if changed:
            old = path.open_stream()
            if old is not None and old.retained_packets:
                # What we wrote on old is not known to have arrived: moving now could let what
                # we write on conn overtake it (ordered delivery, docs/wire.md §6.1). Move once
                # its PONG released it; if it acknowledges nothing for STREAM_MOVE_GRACE while
                # the peer talks to us here, close it: its packets are then resumed, in order.
                if not path.move_since:
                    path.move_since = now
                elif now - path.move_since >= limits.STREAM_MOVE_GRACE:
                    self._count("stream_moves_forced")
                    old.close()
                return
            path.move_since = 0.0
            self._bind_stream(session.peer_id, path, conn)
        heard = max(session.last_datagram, session.created)  # a FINISH counts as heard
        if (path.mode == "udp" and self._use_tcp
                and (not self._use_udp or now - heard >= ADOPT_AFTER)):
            path.mode = "tcp"
            changed = True
            self._count("paths_adopted")
        if changed:
            self._apply(session.peer_id, path)

    def stream_writable(self, conn: StreamConnection) -> None:
        """Back-pressure lifted: send what the connection's sessions queued meanwhile."""
        entry = self._conn_path.get(conn)
        if entry is None:
            return
        for session in self._by_index.values():
            if session.stream is conn and session.established:
                session.engine.flush_session(session, False)

    def stream_closed(self, conn: StreamConnection, reason: str) -> None:
        """A path failed (docs/wire.md §5): move the peer's sessions to UDP if they may use it,
        else dial TCP again. (With UDP working, a new connection is dialled when a message
        needs one, or when UDP fails in turn.) Then what the connection kept unacknowledged
        is resumed on that next path (docs/wire.md §6.1)."""
        queued = self.stream_recovery.take_queued(conn) if not self._closed else []
        self._stream_path_closed(conn)
        if not self._closed:
            self.stream_recovery.stream_closed(conn, queued)

    def _stream_path_closed(self, conn: StreamConnection) -> None:
        self._trusted.discard(conn)
        entry = self._conn_path.pop(conn, None)
        if entry is None or self._closed:
            return
        peer_id, path = entry
        if path.stream is not conn:
            return
        path.stream = None
        if path.mode == "udp":
            self._apply(peer_id, path)  # large messages lose their stream
            return
        self._count("path_failovers")
        if self._use_udp and path.udp is not None:
            path.mode = "udp"
            path.expect_since = 0.0
            self._apply(peer_id, path)
        else:  # TCP is the only way: reconnect (if we know where)
            path.mode = "tcp"
            self._dial_tcp(peer_id, path)

    def handle_close(self, session: Session, code: int, reason: str) -> None:
        self._count("closes_received")
        self._drop_session(session)

    @property
    def handle_delivery_ack(self) -> Callable[..., None]:
        """The engine's hook for DELIVERY_ACK frames: the delivery layer's own."""
        return self.delivery.ack_received

    @property
    def handle_fragment(self) -> Callable[..., None]:
        """The engine's hook for sequenced frames: the delivery layer's own (one call less
        per message)."""
        return self.delivery.fragment_received

    def handle_confirmed(self, session: Session) -> None:
        """The responder's first packet on a session we initiated: it holds the session."""
        if session.local_index in self._unconfirmed:
            self._unconfirmed.discard(session.local_index)
            self._handshaker.confirm(session.local_index)
        self.delivery.session_established(session)
        self._pmtu_session_up(session)

    @property
    def handle_packet_received(self) -> Callable[[Session, int, bool], None]:
        """The engine's hook for every authenticated packet of a session with a delivery
        connection: the delivery layer's own (one Python call less per packet)."""
        return self.delivery.packet_received

    # -- timers ------------------------------------------------------------------------

    def _arm_timer(self, when: float | None) -> None:
        if self._closed:
            return
        housekeeping = self.loop.time() + HOUSEKEEPING_INTERVAL
        when = housekeeping if when is None else min(when, housekeeping)
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self.loop.time()
        for index, dial in list(self._dials.items()):
            if dial.session.established and dial.session.last_received:
                self._handshaker.confirm(index)
        for index in list(self._unconfirmed):
            session = self._by_index.get(index)
            if session is None or session.last_received:
                self._handshaker.confirm(index)
                self._unconfirmed.discard(index)
        output = self._handshaker.handle_timer(now)
        self._send_handshake(output.datagrams, output.events)
        for event in output.events:
            self._handle_handshake_event(event)
        self._expire_sessions(now)
        self._check_paths(now)
        self.stream_recovery.tick(now)
        for engine in self._engines():
            engine.purge_retained()
        self._arm_timer(self._handshaker.next_deadline())

    def _check_paths(self, now: float) -> None:
        """Once a second: settle first contacts that got no ACK, probe quiet UDP paths that
        have a fallback, fail over those silent for PATH_TIMEOUT, forget stale state."""
        for index in [i for i in self._pending_paths if not self._handshaker.is_pending(i)]:
            del self._pending_paths[index]
        for peer_id, path in list(self._paths.items()):
            session = self._sessions.get(peer_id)
            if session is None or not session.established:
                if (peer_id not in self._dial_by_peer and path.dialing is None
                        and path.open_stream() is None):
                    del self._paths[peer_id]
                    self.route.clear()
                continue
            if path.mode == "both":
                if session.last_received and now - path.started >= CONSOLIDATE_AFTER:
                    prefer_tcp = self.transport_policy in ("prefer-tcp", "tcp-only")
                    path.mode = "tcp" if prefer_tcp and path.open_stream() else "udp"
                    self._apply(peer_id, path)
                continue
            if path.mode != "udp" or not self._use_tcp or session.engine.sock is None:
                continue
            if path.open_stream() is None and not self._tcp_endpoints(peer_id):
                continue  # nothing to fail over to: no use telling a dead path
            heard = max(session.last_datagram, session.created)  # a FINISH counts as heard
            if path.expect_since and heard >= path.expect_since:
                path.expect_since = 0.0
            if not path.expect_since:
                delivery = self.delivery.connection(session)
                if delivery is not None and delivery.bytes_in_flight:
                    path.expect_since = now
                elif session.last_sent - heard > PROBE_AFTER and now - heard > PROBE_AFTER:
                    self._ping(peer_id)
                    path.expect_since = now
            elif now - path.expect_since >= limits.PATH_TIMEOUT:
                self._udp_failed(peer_id, path)

    def _udp_failed(self, peer_id: PeerID, path: _PeerPath) -> None:
        """UDP stayed silent while we awaited a packet: move to the stream (dialling it if
        need be) without a new handshake."""
        self._count("path_failovers")
        path.mode = "tcp"
        path.expect_since = 0.0
        if path.open_stream() is not None:
            self._apply(peer_id, path)
            self._ping(peer_id)
        elif path.dialing is None:
            self._dial_tcp(peer_id, path)

    def _expire_sessions(self, now: float) -> None:
        for session in list(self._by_index.values()):
            idle = now - max(session.last_received, session.created)
            age = now - session.created
            if idle > limits.SESSION_IDLE_TIMEOUT or age > limits.REJECT_AFTER_TIME:
                self._drop_session(session)
                self._count("sessions_expired")
            elif (age > limits.REKEY_AFTER_TIME and self._sessions.get(session.peer_id) is session
                  and session.initiator and session.peer_id not in self._dial_by_peer
                  and now - session.last_sent < limits.REKEY_AFTER_TIME):
                self._rekey(session)
            elif (now - session.last_sent >= limits.KEEPALIVE_AFTER
                  and now - session.last_frames < limits.KEEPALIVE_AFTER
                  and session.established and not session.sends_on_stream
                  and self._sessions.get(session.peer_id) is session):
                session.engine.flush_session(session, True)  # docs/wire.md §2.3.2 keep-alive
                self._count("keepalives_sent")

    def _rekey(self, session: Session) -> None:
        """Start a fresh handshake; the old session keeps working until the new one is up."""
        address = session.address
        path = self._paths.get(session.peer_id)
        if address is not None:
            self.peerstore.add_addrs(session.peer_id, [sockaddr_to_multiaddr(address, "udp")])
        elif path is None or path.open_stream() is None:
            return
        del self._sessions[session.peer_id]
        self.route.clear()
        try:
            self._start_dial(session.peer_id)
        finally:
            if session.peer_id not in self._sessions:
                self._sessions[session.peer_id] = session
        self._count("rekeys")

    # -- helpers -------------------------------------------------------------------------

    def add_response_listener(self, listener: ResponseListener) -> None:
        """Have listener take every RESPONSE frame; the engines call it directly (one call
        less on the request/response path than going through handle_response)."""
        self._response_listener = listener
        for engine in self._engines():
            engine.set_response_handler(listener)

    def add_reset_listener(self, listener: Callable[[PeerID, str, int], None]) -> None:
        self._reset_listeners.append(listener)

    def add_unreachable_listener(self, listener: Callable[[PeerID, BaseException], None]
                                 ) -> None:
        self._unreachable_listeners.append(listener)

    def metrics(self) -> dict[str, int]:
        """Every counter of this network: engines, handshakes, sessions."""
        gauges = {
            "sessions": len(self._by_index),
            "pending_handshakes": len(self._dials),
            "peers_known": len(self.peerstore),
        }
        gauges["stream_connections"] = len(self.streams.connections())
        parts: list[dict[str, int]] = [e.counters() for e in self._engines()]
        parts += [self._handshaker.counters, self._counters, gauges, self.delivery.stats(),
                  self.streams.counters]
        return merge(parts)

    def metrics_text(self) -> str:
        return prometheus_text(self.metrics(), labels={"peer": str(self.local_peer)})

    def _count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("network closed")


async def _within(future: asyncio.Future[None], timeout: float | None) -> None:
    """Await ``future``, failing it with TimeoutError after ``timeout`` seconds (None: no
    limit). For a future this caller alone awaits, such as an acknowledgement's: what
    ``asyncio.wait_for`` does for it at less than half the cost (5.6 against 13.4 us per
    call, measured on uvloop), which every ``Reliable(wait=True)`` send pays. Whoever
    resolves the future checks ``done()`` first, as it may have timed out or been
    cancelled with its caller."""
    if timeout is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(timeout, _time_out, future)
    try:
        await future
    finally:
        timer.cancel()


def _time_out(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Dial futures nobody awaits must not log 'exception was never retrieved'."""
    if not future.cancelled():
        future.exception()
