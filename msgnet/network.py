"""MessageNetwork: sockets, sessions, handshakes and dialing.

The network glues the sans-IO handshake core (``core/handshake.py``) to the
Cython engines (``_engine.pyx``, one per bound UDP socket).  The engine calls
this object (its *delegate*) only for what is off the hot path: handshake
packets, unknown sessions, resets, responses and control frames.

Session model (docs/wire.md §2.3.2): one sending session per peer, the
newest established one; older ones keep receiving until they expire.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from multiaddr import Multiaddr

from . import limits
from ._engine import Message, Session, UdpEngine
from ._frame import Continuation, Init, decode_packet
from ._packet import SessionCrypto, decode_session_unknown
from .addr import Endpoint, parse_multiaddr, sockaddr_to_multiaddr
from .core.handshake import FinishRepeated, Handshaker, HandshakeFailed, SessionEstablished
from .errors import (
    ClosedError,
    FrameError,
    MessageTooLargeError,
    MsgnetError,
    PeerUnreachableError,
    ProtocolResetError,
    RequestTimeoutError,
    UsageError,
)
from .identity import KeyPair, PeerID
from .metrics import merge, prometheus_text
from .peerstore import Peerstore
from .qos import BEST_EFFORT, DeliveryManager, QoS, Reliable

__all__ = ["MessageNetwork", "MessageTransport", "UdpTransport", "UdpSocket", "SocketSession"]

log = logging.getLogger("msgnet")

Handler = Callable[[Message], Any]
ResponseListener = Callable[[Session, int, bytes], None]

HOUSEKEEPING_INTERVAL = 1.0


class MessageTransport:
    """A kind of transport (the seed's MessageTransport): opens sockets.

    ``transport_id`` numbers the transports of one host (docs/wire.md §5).
    """

    name = "abstract"

    def __init__(self, network: MessageNetwork, transport_id: int) -> None:
        self.network = network
        self.transport_id = transport_id

    def can_dial(self, endpoint: Endpoint) -> bool:
        return endpoint.transport == self.name

    async def open(self, endpoint: Endpoint) -> UdpSocket:  # pragma: no cover - interface
        raise NotImplementedError


class UdpTransport(MessageTransport):
    """UDP: one engine-owned socket per listen address."""

    name = "udp"

    async def open(self, endpoint: Endpoint) -> UdpSocket:
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
        return UdpSocket(self, sock, family)


class UdpSocket:
    """A bound UDP socket and the engine that owns its receive path.

    This is the seed's ``SessionedSocket``: many peers and protocols share it;
    ``new_session`` gives a per-(peer, protocol) ``SocketSession`` view.
    """

    def __init__(self, transport: UdpTransport, sock: socket.socket, family: int) -> None:
        self.transport = transport
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
        self.engine.transport_id = transport.transport_id

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

    __slots__ = ("session", "engine", "done", "endpoint")

    def __init__(self, session: Session, engine: UdpEngine, endpoint: Endpoint,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.session = session
        self.engine = engine
        self.endpoint = endpoint
        self.done: asyncio.Future[Session] = loop.create_future()


class MessageNetwork:
    """Sockets, transports, peers and their secure sessions."""

    def __init__(
        self,
        keypair: KeyPair | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        plaintext: bool = False,
        max_datagram: int = limits.MAX_DATAGRAM,
        max_sessions: int = limits.MAX_SESSIONS,
        use_recvmmsg: bool | None = None,
        peerstore: Peerstore | None = None,
    ) -> None:
        if not limits.MAX_DATAGRAM <= max_datagram <= limits.MAX_DATAGRAM_CEILING:
            raise UsageError(
                f"max_datagram must be within {limits.MAX_DATAGRAM}..{limits.MAX_DATAGRAM_CEILING}"
            )
        self.keypair = keypair or KeyPair.generate()
        self.loop = loop or asyncio.get_running_loop()
        self.max_datagram = max_datagram
        self.max_sessions = max_sessions
        self.use_recvmmsg = use_recvmmsg
        self.handlers: dict[str, Handler] = {}
        self.peerstore = peerstore or Peerstore()
        self._plaintext = plaintext
        self._transports: list[MessageTransport] = [UdpTransport(self, 1)]
        self._sockets: list[UdpSocket] = []
        self._handshaker = Handshaker(
            self.keypair,
            plaintext=plaintext,
            transport_ids=tuple(t.transport_id for t in self._transports),
        )
        self.delivery = DeliveryManager(self.loop, max_datagram)
        # Current sending session per peer, least recently used first (bounded).
        self._sessions: OrderedDict[PeerID, Session] = OrderedDict()
        # (peer, session, engine) of the latest session_for: a peer sent to again and again
        # (the PeerID object the caller holds) skips two PeerID hashes and the LRU move, and
        # is already the most recently used. Cleared whenever _sessions changes.
        self._last: tuple[PeerID, Session, UdpEngine] | None = None
        # Every live session (sending or receive-only) by our local index (its engine is
        # session.engine).
        self._by_index: dict[int, Session] = {}
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
            sock = await transport.open(endpoint)
            sock.start()
            self._sockets.append(sock)
            bound.append(sock.listen_addr)
        self._arm_timer(self.loop.time() + HOUSEKEEPING_INTERVAL)
        return bound

    def listen_addrs(self) -> list[Multiaddr]:
        return [s.listen_addr for s in self._sockets]

    def sockets(self) -> list[UdpSocket]:
        return list(self._sockets)

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
        self.handlers[protocol] = handler

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
        for session in list(self._by_index.values()):
            session.engine.remove_session(session)
        self._by_index.clear()
        self._unconfirmed.clear()
        self._sessions.clear()
        self._last = None
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    # -- sending ---------------------------------------------------------------------------

    async def send_message(self, peer_id: PeerID, protocol: str, data: bytes, *,
                           flags: int = 0, request_id: int = 0,
                           qos: QoS = BEST_EFFORT) -> None:
        """Queue a message; waits only when the peer's queue is full (back-pressure), or, for
        ``Reliable(wait=True)``, until the peer acknowledged it."""
        session, engine = self.session_for(peer_id, protocol)
        if isinstance(qos, Reliable):
            waiter = self.delivery.send(session, engine, protocol, data, qos, flags, request_id)
            if waiter is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), qos.timeout)
                except asyncio.TimeoutError:
                    raise RequestTimeoutError(
                        f"{peer_id} did not acknowledge a message on {protocol} within "
                        f"{qos.timeout} s") from None
            return
        try:
            while not engine.send_message(session, protocol, data, flags, request_id):
                await engine.wait_drained(session)
                session, engine = self.session_for(peer_id, protocol)
        except MessageTooLargeError:  # more than one packet: fragmented best effort
            self.delivery.send(session, engine, protocol, data, qos, flags, request_id)

    def send_reply(self, session: Session, protocol: str, data: bytes, request_id: int,
                   reliable: bool, ordered: bool) -> None:
        """Engine delegate: a reply that needs the delivery layer (reliable, or large)."""
        qos: QoS = Reliable(ordered=ordered) if reliable else BEST_EFFORT
        try:
            self.delivery.send(session, session.engine, protocol, data, qos,
                               limits.FLAG_RESPONSE, request_id)
        except MsgnetError as exc:
            self._count("reply_dropped")
            log.debug("reply on %s dropped: %s", protocol, exc)

    def send_message_nowait(self, peer_id: PeerID, protocol: str, data: bytes,
                            flags: int = 0, request_id: int = 0) -> bool:
        """Queue a message now, as send_message does, but never wait: False when the peer's
        queue is full (then await send_message). What callers use first, to spare a
        coroutine per message in the common case."""
        last = self._last
        if last is not None and last[0] is peer_id and not self._refused and not self._closed:
            return last[2].send_message(last[1], protocol, data, flags, request_id)
        session, engine = self.session_for(peer_id, protocol)
        return engine.send_message(session, protocol, data, flags, request_id)

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
        last = self._last
        if last is not None and last[0] is peer_id:
            return last[1], last[2]
        session = self._sessions.get(peer_id)
        if session is not None:
            self._sessions.move_to_end(peer_id)
            engine = session.engine
            self._last = (peer_id, session, engine)
            return session, engine
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
        if not isinstance(peer_id, PeerID):
            raise UsageError(f"peer must be a PeerID, not {type(peer_id).__name__}")
        if peer_id == self.local_peer:
            raise UsageError("cannot send to ourselves")
        for endpoint in self.peerstore.endpoints(peer_id):
            if endpoint.transport != "udp" or endpoint.family not in ("ip4", "ip6"):
                continue
            sock = self._socket_for(endpoint)
            if sock is not None:
                break
        else:
            raise PeerUnreachableError(f"no usable UDP address known for {peer_id}")
        engine = sock.engine
        local_index = self._allocate_index()
        session = engine.new_session(peer_id, local_index, True)
        dial = _Dial(session, engine, endpoint, self.loop)
        dial.done.add_done_callback(_consume_exception)
        self._dials[local_index] = dial
        self._dial_by_peer[peer_id] = dial
        now = self.loop.time()
        datagrams = self._handshaker.initiate(
            endpoint.sockaddr,
            now,
            local_index=local_index,
            peer_id=peer_id,
            take_frames=lambda budget: engine.take_payload(session, budget),
        )
        self._send_all(engine, datagrams)
        self._count("handshakes_started")
        self._arm_timer(self._handshaker.next_deadline())
        return dial

    def _socket_for(self, endpoint: Endpoint) -> UdpSocket | None:
        family = socket.AF_INET6 if endpoint.family == "ip6" else socket.AF_INET
        return next((s for s in self._sockets if s.family == family), None)

    def _allocate_index(self) -> int:
        while True:
            index = int.from_bytes(os.urandom(4), "big")
            if index and index not in self._by_index and not self._handshaker.holds_index(index):
                return index

    # -- engine delegate (called by the Cython engine) ---------------------------------

    def handle_control(self, data: bytes, addr: Any) -> None:
        """Handshake packets, unknown sessions and other rare packets from an engine."""
        try:
            self._handle_control(data, addr)
        except MsgnetError as exc:  # malformed input that slipped past a parser
            self._count("bad_control")
            log.debug("dropped control packet from %s: %s", addr, exc)

    def _handle_control(self, data: bytes, addr: Any) -> None:
        if self._closed or not data:
            return
        kind = data[0]
        now = self.loop.time()
        engine = self._engine_for_addr(addr)
        if kind in (limits.PACKET_DATA, limits.PACKET_PLAIN_DATA):
            if len(data) >= 5:
                index = struct.unpack_from(">I", data, 1)[0]
                if self._handshaker.is_pending(index):
                    if not self._handshaker.hold_early_data(index, data):
                        self._count("early_data_dropped")
                    return
            reply = self._handshaker.answer_unknown_session(data, addr, now)
            if reply is not None and engine is not None:
                engine.sendto(reply, addr)
            return
        if kind == limits.PACKET_SESSION_UNKNOWN:
            self._handle_session_unknown(data, addr)
            return
        output = self._handshaker.handle_packet(data, addr, now,
                                                allocate_index=self._allocate_index)
        if engine is not None:
            self._send_all(engine, output.datagrams)
        for event in output.events:
            self._handle_handshake_event(event, engine)
        self._arm_timer(self._handshaker.next_deadline())

    def _engine_for_addr(self, addr: Any) -> UdpEngine | None:
        family = socket.AF_INET6 if len(addr) == 4 else socket.AF_INET
        sock = next((s for s in self._sockets if s.family == family), None)
        return sock.engine if sock is not None else None

    def _handle_handshake_event(self, event: Any, engine: UdpEngine | None) -> None:
        if isinstance(event, SessionEstablished):
            if event.initiator:
                self._initiator_established(event)
            elif engine is not None:
                self._responder_established(event, engine)
        elif isinstance(event, FinishRepeated):
            session = self._by_index.get(event.local_index)
            if session is not None:
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
        if self._dial_by_peer.get(dial.session.peer_id) is dial:
            del self._dial_by_peer[dial.session.peer_id]
        session, engine = dial.session, dial.engine
        crypto = SessionCrypto(event.local_index, event.remote_index, event.send_key,
                               event.recv_key, event.plaintext)
        self._register(session, engine)
        engine.install_keys(session, event.remote_index, crypto, event.address)
        self._by_remote_index[event.remote_index] = session
        self._unconfirmed.add(event.local_index)
        self._count("handshakes_completed")
        if not dial.done.done():
            dial.done.set_result(session)

    def _responder_established(self, event: SessionEstablished, engine: UdpEngine) -> None:
        session = engine.new_session(event.peer_id, event.local_index, False)
        crypto = SessionCrypto(event.local_index, event.remote_index, event.send_key,
                               event.recv_key, event.plaintext)
        self._register(session, engine)
        engine.install_keys(session, event.remote_index, crypto, event.address)
        self._by_remote_index[event.remote_index] = session
        self._count("handshakes_completed")
        if event.frames:
            engine.process_payload(session, event.frames, event.address)
        for packet in event.early_data:
            engine.feed_datagram(packet, event.address)
        engine.flush_session(session, True)  # confirms the session to the initiator
        self.delivery.session_established(session)

    def _register(self, session: Session, engine: UdpEngine) -> None:
        """Make ``session`` the peer's sending session (the newest one wins)."""
        engine.add_session(session)
        self._by_index[session.local_index] = session
        self._sessions[session.peer_id] = session
        self._sessions.move_to_end(session.peer_id)
        self._last = None
        while len(self._by_index) > self.max_sessions:
            oldest = next(iter(self._sessions.values()))
            self._drop_session(oldest)
            self._count("sessions_evicted")

    def _drop_session(self, session: Session) -> None:
        if self._by_index.pop(session.local_index, None) is not None:
            session.engine.remove_session(session)
        self.delivery.close_session(
            session, PeerUnreachableError(f"session with {session.peer_id} ended"))
        self._unconfirmed.discard(session.local_index)
        if self._by_remote_index.get(session.remote_index) is session:
            del self._by_remote_index[session.remote_index]
        if self._sessions.get(session.peer_id) is session:
            del self._sessions[session.peer_id]
            self._last = None
            # Another live session with the peer, if any, takes over sending.
            for other in self._by_index.values():
                if other.peer_id == session.peer_id and other.established:
                    self._sessions[other.peer_id] = other
                    break

    def _fail_dial(self, dial: _Dial, error: BaseException) -> None:
        index = dial.session.local_index
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
        messages = _retained_messages(session, payloads)
        self._drop_session(session)
        if self._dial_by_peer.get(peer_id) is None:
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
        for listener in self._reset_listeners:
            listener(session.peer_id, protocol, code)

    def handle_pong(self, session: Session, data: bytes) -> None:
        self._count("pongs_received")

    def handle_ack(self, session: Session, transport_id: int) -> None:
        self._count("acks_received")

    def handle_close(self, session: Session, code: int, reason: str) -> None:
        self._count("closes_received")
        self._drop_session(session)

    def handle_delivery_ack(self, session: Session, body: bytes) -> None:
        if not self.delivery.ack_received(session, body):
            self._count("bad_delivery_ack")

    def handle_fragment(self, session: Session, counter: int, protocol: str, flags: int,
                        request_id: int, seq: int, frag_index: int, frag_count: int,
                        data: bytes) -> None:
        self.delivery.fragment_received(session, session.engine, counter, protocol, flags,
                                        request_id, seq, frag_index, frag_count, data)

    def handle_confirmed(self, session: Session) -> None:
        """The responder's first packet on a session we initiated: it holds the session."""
        if session.local_index in self._unconfirmed:
            self._unconfirmed.discard(session.local_index)
            self._handshaker.confirm(session.local_index)
        self.delivery.session_established(session)

    def handle_packet_received(self, session: Session, counter: int, acknowledge: bool) -> None:
        self.delivery.packet_received(session, counter, acknowledge)

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
        for data, addr in output.datagrams:
            engine = self._engine_for_addr(addr)
            if engine is not None:
                engine.sendto(data, addr)
        for event in output.events:
            self._handle_handshake_event(event, None)
        self._expire_sessions(now)
        for sock in self._sockets:
            sock.engine.purge_retained()
        self._arm_timer(self._handshaker.next_deadline())

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

    def _rekey(self, session: Session) -> None:
        """Start a fresh handshake; the old session keeps working until the new one is up."""
        address = session.address
        if address is None:
            return
        self.peerstore.add_addrs(session.peer_id, [sockaddr_to_multiaddr(address, "udp")])
        del self._sessions[session.peer_id]
        self._last = None
        try:
            self._start_dial(session.peer_id)
        finally:
            if session.peer_id not in self._sessions:
                self._sessions[session.peer_id] = session
        self._count("rekeys")

    # -- helpers -------------------------------------------------------------------------

    def add_response_listener(self, listener: ResponseListener) -> None:
        self._response_listener = listener

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
        parts: list[dict[str, int]] = [s.engine.counters() for s in self._sockets]
        parts += [self._handshaker.counters, self._counters, gauges, self.delivery.stats()]
        return merge(parts)

    def metrics_text(self) -> str:
        return prometheus_text(self.metrics(), labels={"peer": str(self.local_peer)})

    def _count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1

    def _send_all(self, engine: UdpEngine, datagrams: Iterable[tuple[bytes, Any]]) -> None:
        for data, addr in datagrams:
            engine.sendto(data, addr)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("network closed")


def _retained_messages(session: Session, payloads: list[bytes]
                       ) -> list[tuple[str, int, int, bytes]]:
    """The messages in packets a peer lost, as (protocol, flags, request_id, payload).

    Aliases die with the session, so the frames cannot be re-sent as they are:
    they are decoded and the messages re-sent on the new session.
    """
    protocols = {alias: protocol for protocol, alias in session.protocols_out.items()}
    messages = []
    for payload in payloads:
        for frame in decode_packet(payload):
            if isinstance(frame, Init):
                protocol = frame.protocol
            elif isinstance(frame, Continuation):
                protocol = protocols.get(frame.protocol_int)
                if protocol is None:
                    continue
            else:
                continue
            request_id = frame.request_id or 0
            messages.append((protocol, frame.flags, request_id, bytes(frame.payload)))
    return messages


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Dial futures nobody awaits must not log 'exception was never retrieved'."""
    if not future.cancelled():
        future.exception()
