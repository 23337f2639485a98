"""MessageHost: handlers by protocol, send_message, request, lifecycle.

The host is deliberately small: everything about sockets and sessions lives
in :class:`~msgnet.network.MessageNetwork`; the host adds what applications
need on top (coroutine handlers, request/response correlation).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from multiaddr import Multiaddr

from . import limits
from ._engine import Message, Session
from ._requests import PendingRequest
from .addr import parse_multiaddr
from .errors import (
    ClosedError,
    MessageTooLargeError,
    MsgnetError,
    PeerUnreachableError,
    ProtocolResetError,
    RequestTimeoutError,
    UsageError,
)
from .identity import KeyPair, PeerID
from .network import TRANSPORT_POLICIES, MessageNetwork
from .peerstore import Peerstore
from .qos import BEST_EFFORT, BestEffort, QoS, Reliable
from .tcp import StreamSettings

__all__ = ["Handler", "MessageHost", "PendingRequest"]

log = logging.getLogger("msgnet")

Handler = Callable[[Message], None] | Callable[[Message], Awaitable[None]]

DEFAULT_LISTEN = ("/ip4/127.0.0.1/udp/0",)
MAX_PENDING_REQUESTS = 65536
_FLAG_REQUEST = limits.FLAG_REQUEST


class MessageHost:
    """A libp2p peer that sends and receives messages by protocol.

    ``async with MessageHost(listen=[...]) as host:`` binds the listen
    addresses (``/ip4|ip6/.../udp/PORT`` and ``/.../tcp/PORT``, as many as wanted) and
    closes everything on exit.  ``transport_policy`` is "prefer-udp" (default),
    "prefer-tcp", "udp-only" or "tcp-only" (docs/wire.md §5); ``stream_settings`` adjusts
    the TCP limits of docs/wire.md §6.  ``aes_gcm=False`` keeps every session on
    ChaCha20-Poly1305; by default a session uses AES-256-GCM when both hosts offer it, which
    a host does where its CPU has AES instructions (docs/wire.md §2.2).  Handlers may be plain
    functions
    or coroutine functions; they receive a :class:`Message` whose
    ``from_peer`` is the peer proven by the handshake.
    """

    def __init__(
        self,
        keypair: KeyPair | None = None,
        listen: Iterable[Multiaddr | str] = DEFAULT_LISTEN,
        *,
        plaintext: bool = False,
        max_datagram: int = limits.MAX_DATAGRAM,
        use_recvmmsg: bool | None = None,
        peerstore: Peerstore | None = None,
        transport_policy: str = "prefer-udp",
        stream_settings: StreamSettings | None = None,
        aes_gcm: bool = True,
    ) -> None:
        self._keypair = keypair or KeyPair.generate()
        self._listen = [str(a) for a in listen]
        for addr in self._listen:
            parse_multiaddr(addr)  # bad addresses fail here, not at start
        if transport_policy not in TRANSPORT_POLICIES:
            raise UsageError(f"transport_policy must be one of {TRANSPORT_POLICIES}")
        self._options = dict(plaintext=plaintext, max_datagram=max_datagram,
                             use_recvmmsg=use_recvmmsg, peerstore=peerstore,
                             transport_policy=transport_policy,
                             stream_settings=stream_settings, aes_gcm=aes_gcm)
        self._network: MessageNetwork | None = None
        # Outstanding requests by request id (unique per host, whatever the peer):
        # [future, protocol, peer, timeout, deadline]; the deadline is appended once the
        # request is sent.
        self._pending: dict[int, list[Any]] = {}
        self._request_ids = itertools.count(1)
        # One timer for every request timeout, armed for the earliest deadline (a timer per
        # request costs ~1 us on uvloop: as much as the rest of the request path in Python).
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._timeout_at = math.inf
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[str, Handler] = {}
        self._default_qos: dict[str, QoS] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._network is not None:
            raise UsageError("host already started")
        network = MessageNetwork(self._keypair, loop=asyncio.get_running_loop(),
                                 **self._options)  # type: ignore[arg-type]
        network.add_response_listener(self._on_response)
        network.add_reset_listener(self._on_reset)
        network.add_unreachable_listener(self._on_unreachable)
        self._network = network
        for protocol, handler in self._handlers.items():
            network.set_message_handler(protocol, self._wrap(protocol, handler))
        try:
            await network.listen(*self._listen)
        except BaseException:
            await network.close()
            raise

    async def close(self) -> None:
        network, self._network = self._network, None
        if network is None:
            return
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
            self._timeout_timer = None
            self._timeout_at = math.inf
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if not entry[0].done():
                entry[0].set_exception(ClosedError("host closed"))
        for task in list(self._tasks):
            task.cancel()
        await network.close()

    async def __aenter__(self) -> MessageHost:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- identity and addresses ----------------------------------------------------------

    @property
    def peer_id(self) -> PeerID:
        return self._keypair.peer_id

    @property
    def network(self) -> MessageNetwork:
        if self._network is None:
            raise ClosedError("host is not started")
        return self._network

    @property
    def peerstore(self) -> Peerstore:
        return self.network.peerstore

    @property
    def addrs(self) -> list[Multiaddr]:
        """Listen addresses with our ``/p2p/<peer-id>`` suffix, ready to hand to peers."""
        suffix = f"/p2p/{self.peer_id}"
        return [Multiaddr(str(a) + suffix) for a in self.network.listen_addrs()]

    def add_peer(self, addr: Multiaddr | str, peer_id: PeerID | None = None) -> PeerID:
        """Remember a peer's address; ``addr`` may carry ``/p2p/<id>`` instead of ``peer_id``."""
        endpoint = parse_multiaddr(addr)
        peer = peer_id or endpoint.peer_id
        if peer is None:
            raise UsageError(f"{addr} has no /p2p/ part and no peer_id was given")
        self.peerstore.add_addrs(peer, [addr])
        return peer

    # -- handlers ------------------------------------------------------------------------

    def set_message_handler(self, protocol: str, handler: Handler) -> None:
        """Call ``handler(message)`` for every message on ``protocol`` (replacing any)."""
        if not callable(handler):
            raise UsageError("handler must be callable")
        self._handlers[protocol] = handler
        if self._network is not None:
            self._network.set_message_handler(protocol, self._wrap(protocol, handler))

    def remove_message_handler(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)
        if self._network is not None:
            self._network.remove_message_handler(protocol)

    def _wrap(self, protocol: str, handler: Handler) -> Callable[[Message], None]:
        """The engine calls handlers synchronously; coroutine handlers become tasks."""
        if not inspect.iscoroutinefunction(handler):
            return handler  # type: ignore[return-value]
        loop = asyncio.get_running_loop()
        tasks = self._tasks

        def spawn(message: Message) -> None:
            task = loop.create_task(handler(message))  # type: ignore[arg-type]
            tasks.add(task)
            task.add_done_callback(_task_done(tasks, loop, protocol))

        return spawn

    # -- sending -------------------------------------------------------------------------

    async def send_message(self, peer: PeerID, protocol: str, data: bytes, *,
                           qos: QoS | None = None) -> None:
        """Send one message with the guarantee ``qos`` (default: the protocol's, see
        :meth:`set_default_qos`, else best effort).

        Best effort resolves once the message is accepted for sending (waiting only for
        back-pressure); ``Reliable(wait=True)`` once the peer acknowledged it.  Raises
        ProtocolResetError while the peer's refusal of ``protocol`` is remembered,
        PeerUnreachableError if no address is known or a waited-for message fails,
        MessageTooLargeError beyond what ``qos`` can carry.
        """
        network = self._network
        if network is None:
            raise ClosedError("host is not started")
        if qos is None:
            qos = self._default_qos.get(protocol, BEST_EFFORT)
        if qos is BEST_EFFORT:
            try:
                if network.send_message_nowait(peer, protocol, data):
                    return
            except MessageTooLargeError:
                pass  # network.send_message fragments it
        elif (type(qos) is Reliable and not qos.wait
              and network.send_reliable_nowait(peer, protocol, data, qos.ordered)):
            return
        await network.send_message(peer, protocol, data, qos=qos)

    def set_default_qos(self, protocol: str, qos: QoS) -> None:
        """The guarantee of sends and requests on ``protocol`` that name none."""
        if not isinstance(qos, (BestEffort, Reliable)):
            raise UsageError(f"qos must be BestEffort or Reliable, not {qos!r}")
        self._default_qos[protocol] = qos

    async def request(self, peer: PeerID, protocol: str, data: bytes, *,
                      timeout: float = 5.0, qos: QoS | None = None) -> bytes:
        """Send a request and return the peer's reply (``Message.reply`` on its side).

        Raises RequestTimeoutError after ``timeout`` seconds, ProtocolResetError
        if the peer has no handler for ``protocol``, PeerUnreachableError if no
        session can be established. With ``qos=Reliable()`` the request and its reply are
        retransmitted until acknowledged, and may be as large as reliable messages are.
        """
        if qos is None:
            qos = self._default_qos.get(protocol, BEST_EFFORT)
        network, request_id, entry = self._new_request(peer, protocol, timeout)
        loop = network.loop
        future: asyncio.Future[bytes] = entry[0]
        pending = self._pending
        try:
            try:
                sent = qos is BEST_EFFORT and network.send_message_nowait(
                    peer, protocol, data, _FLAG_REQUEST, request_id)
            except MessageTooLargeError:
                sent = False  # network.send_message fragments it
            if not sent:
                await network.send_message(peer, protocol, data, flags=limits.FLAG_REQUEST,
                                           request_id=request_id,
                                           qos=Reliable(qos.ordered) if isinstance(
                                               qos, Reliable) else qos)
            # The timeout runs from here, once the request is queued (back-pressure aside).
            deadline = loop.time() + timeout
            entry.append(deadline)
            if deadline < self._timeout_at:
                self._arm_timeouts(loop, deadline)
            return await future
        finally:
            pending.pop(request_id, None)

    def request_nowait(self, peer: PeerID, protocol: str, data: bytes, *,
                       timeout: float = 5.0) -> asyncio.Future[bytes]:
        """:meth:`request` (best effort) without a coroutine: send now, return the reply's
        future.

        For protocols that fan a request out to many peers (a DHT asks 20 at once), where a
        task per request would cost more than the request itself. The future fails as
        :meth:`request` would; cancelling it forgets the request. When the request cannot
        go out at once (back-pressure, or too large for one datagram) the future is a task
        running :meth:`request`.
        """
        network, request_id, entry = self._new_request(peer, protocol, timeout)
        task = self._send_now(network, peer, protocol, data, request_id, entry, timeout)
        if task is not None:
            return task
        future: asyncio.Future[bytes] = entry[0]
        pending = self._pending
        future.add_done_callback(lambda _: pending.pop(request_id, None))
        return future

    def request_callback(self, peer: PeerID, protocol: str, data: bytes,
                         callback: Callable[[PendingRequest], None], *,
                         timeout: float = 5.0) -> PendingRequest:
        """:meth:`request_nowait` with the outcome handed to ``callback(pending)`` in the
        call that settles it (the reply's dispatch, the timeout, a reset...), where a
        future would schedule its done callbacks for a later loop iteration.

        For protocols whose requests are driven by callbacks anyway (a DHT lookup): it
        saves a future and a loop callback per request. ``pending`` is future-like
        (``done``, ``cancelled``, ``result``, ``exception``); cancelling it forgets the
        request, and then the callback is not called. An exception from the callback goes
        to the loop's exception handler.
        """
        if self._network is None:
            raise ClosedError("host is not started")
        request = PendingRequest(callback, self._network.loop, self._pending)
        network, request_id, entry = self._new_request(peer, protocol, timeout, request)
        request._request_id = request_id
        task = self._send_now(network, peer, protocol, data, request_id, entry, timeout)
        if task is not None:
            request._follow(task)
        return request

    def _send_now(self, network: MessageNetwork, peer: PeerID, protocol: str, data: bytes,
                  request_id: int, entry: list[Any], timeout: float
                  ) -> asyncio.Task[bytes] | None:
        """Send a registered request at once, its timeout running from now. If it cannot go
        out at once (back-pressure, or too large for one datagram), forget it and return a
        task running :meth:`request` in its place."""
        loop = network.loop
        pending = self._pending
        deadline = loop.time() + timeout
        entry.append(deadline)
        try:
            sent = network.send_message_nowait(peer, protocol, data, _FLAG_REQUEST, request_id)
        except MessageTooLargeError:
            sent = False
        except BaseException:
            pending.pop(request_id, None)
            raise
        if not sent:
            pending.pop(request_id, None)
            return loop.create_task(self.request(peer, protocol, data, timeout=timeout,
                                                 qos=BEST_EFFORT))
        if deadline < self._timeout_at:
            self._arm_timeouts(loop, deadline)
        return None

    def _new_request(self, peer: PeerID, protocol: str, timeout: float,
                     request: PendingRequest | None = None
                     ) -> tuple[MessageNetwork, int, list[Any]]:
        """Check a request's arguments and register it: its id and pending entry
        [future, protocol, peer, timeout] (the sender appends the deadline once it is sent);
        the future is ``request`` if given (request_callback), else a new asyncio future."""
        if timeout <= 0:
            raise UsageError("timeout must be positive")
        pending = self._pending
        if len(pending) >= MAX_PENDING_REQUESTS:
            raise UsageError(f"more than {MAX_PENDING_REQUESTS} requests outstanding")
        network = self._network
        if network is None:
            raise ClosedError("host is not started")
        request_id = next(self._request_ids)
        entry: list[Any] = [network.loop.create_future() if request is None else request,
                            protocol, peer, timeout]
        pending[request_id] = entry
        return network, request_id, entry

    def _arm_timeouts(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timeout_timer is not None:
            self._timeout_timer.cancel()
        self._timeout_at = when
        self._timeout_timer = loop.call_at(when, self._expire_requests, loop)

    def _expire_requests(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail the requests whose deadline passed with RequestTimeoutError; re-arm for the
        next. Visits every outstanding request, about once per timeout period."""
        self._timeout_timer = None
        self._timeout_at = math.inf
        # Due within the loop clock's resolution (uvloop: 1 ms) counts as due: a timer that
        # fires a fraction early must not re-arm itself at once.
        now = loop.time() + 0.001
        next_at = math.inf
        pending = self._pending
        for request_id, entry in list(pending.items()):
            if len(entry) < 5:
                continue  # not sent yet: no deadline
            future, protocol, peer, timeout, deadline = entry
            if future.done():
                continue
            if deadline <= now:
                del pending[request_id]
                future.set_exception(RequestTimeoutError(
                    f"no reply from {peer} on {protocol} within {timeout} s"))
            elif deadline < next_at:
                next_at = deadline
        if next_at < self._timeout_at:  # (a callback may have armed it for a new request)
            self._arm_timeouts(loop, next_at)

    async def connect(self, peer: PeerID, timeout: float = 5.0) -> None:
        """Establish a session with ``peer`` ahead of the first message."""
        await self.network.connect(peer, timeout)

    def metrics(self) -> dict[str, int]:
        counters = self.network.metrics()
        counters["pending_requests"] = len(self._pending)
        return counters

    def metrics_text(self) -> str:
        return self.network.metrics_text()

    # -- network callbacks ---------------------------------------------------------------

    def _on_response(self, session: Session, request_id: int, data: bytes) -> None:
        entry = self._pending.get(request_id)
        if entry is None:
            return
        # Request ids are unique per host, not per peer: only the peer asked may answer.
        peer = entry[2]
        if peer is not session.peer_id and peer != session.peer_id:
            return
        del self._pending[request_id]
        future = entry[0]
        if not future.done():
            future.set_result(data)

    def _on_reset(self, peer: PeerID, protocol: str, code: int) -> None:
        pending = self._pending
        for request_id, (future, pending_protocol, pending_peer, *_) in list(pending.items()):
            if pending_peer == peer and pending_protocol == protocol and not future.done():
                del pending[request_id]
                future.set_exception(ProtocolResetError(protocol, code))

    def _on_unreachable(self, peer: PeerID, error: BaseException) -> None:
        pending = self._pending
        for request_id, (future, _protocol, pending_peer, *_) in list(pending.items()):
            if pending_peer == peer and not future.done():
                del pending[request_id]
                if isinstance(error, MsgnetError):  # e.g. SecurityError for a wrong PeerID
                    future.set_exception(error)
                else:
                    future.set_exception(PeerUnreachableError(str(error)))


def _task_done(tasks: set[asyncio.Task[Any]], loop: asyncio.AbstractEventLoop,
               protocol: str) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            loop.call_exception_handler({
                "message": f"msgnet handler for {protocol!r} raised",
                "exception": exc,
                "task": task,
            })
    return done

