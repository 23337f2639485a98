"""MessageHost: handlers by protocol, send_message, request, lifecycle.

The host is deliberately small: everything about sockets and sessions lives
in :class:`~msgnet.network.MessageNetwork`; the host adds what applications
need on top (coroutine handlers, request/response correlation).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any

from multiaddr import Multiaddr

from . import limits
from ._engine import Message
from ._requests import MAX_PENDING_REQUESTS, PendingRequest, RequestTable
from .addr import parse_multiaddr
from .errors import (
    ClosedError,
    MessageTooLargeError,
    UsageError,
)
from .identity import KeyPair, PeerID
from .network import TRANSPORT_POLICIES, MessageNetwork
from .peerstore import Peerstore
from .qos import BEST_EFFORT, BestEffort, QoS, Reliable
from .tcp import StreamSettings

__all__ = ["MAX_PENDING_REQUESTS", "Handler", "MessageHost", "PendingRequest"]

log = logging.getLogger("msgnet")

Handler = Callable[[Message], None] | Callable[[Message], Awaitable[None]]

DEFAULT_LISTEN = ("/ip4/127.0.0.1/udp/0",)


class MessageHost:
    """A libp2p peer that sends and receives messages by protocol.

    ``async with MessageHost(listen=[...]) as host:`` binds the listen
    addresses (``/ip4|ip6/.../udp/PORT`` and ``/.../tcp/PORT``, as many as wanted) and
    closes everything on exit.  ``transport_policy`` is "prefer-udp" (default),
    "prefer-tcp", "udp-only" or "tcp-only" (docs/wire.md §5); ``stream_settings`` adjusts
    the TCP limits of docs/wire.md §6.  ``aes_gcm=False`` keeps every session on
    ChaCha20-Poly1305; by default a session uses AES-256-GCM when both hosts offer it, which
    a host does where its CPU has AES instructions (docs/wire.md §2.2).  Sessions send
    datagrams of up to 1200 bytes until a large message makes them probe their path for
    larger ones, up to ``max_datagram`` (default 65000; 1200 turns probing off; docs/wire.md
    §5.1).  Handlers may be plain functions or coroutine functions; they receive a
    :class:`Message` whose ``from_peer`` is the peer proven by the handshake.
    """

    def __init__(
        self,
        keypair: KeyPair | None = None,
        listen: Iterable[Multiaddr | str] = DEFAULT_LISTEN,
        *,
        plaintext: bool = False,
        max_datagram: int = limits.MAX_DATAGRAM_CEILING,
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
        self._requests: RequestTable | None = None  # outstanding requests, while started
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers: dict[str, Handler] = {}
        self._default_qos: dict[str, QoS] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._network is not None:
            raise UsageError("host already started")
        loop = asyncio.get_running_loop()
        network = MessageNetwork(self._keypair, loop=loop,
                                 **self._options)  # type: ignore[arg-type]
        requests = RequestTable(loop, network.route, network, self._request_later)
        network.add_response_listener(requests.on_response)
        network.add_reset_listener(requests.on_reset)
        network.add_unreachable_listener(requests.on_unreachable)
        self._network = network
        self._requests = requests
        if type(self).request_callback is MessageHost.request_callback:
            # The table's compiled method serves request_callback while the host runs (the
            # method below, a Python frame per request, is its stand-in: not started, closed).
            self.request_callback = requests.request_callback  # type: ignore[method-assign]
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
        requests, self._requests = self._requests, None
        self.__dict__.pop("request_callback", None)
        if requests is not None:
            requests.close(lambda: ClosedError("host closed"))
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
        # The common cases go straight to the compiled send paths that
        # send_message_nowait and send_reliable_nowait start with (a Python frame less per
        # message: about a seventh of a small best-effort send); those two take the rest.
        if qos is BEST_EFFORT:
            try:
                sent = network.route.send(peer, protocol, data)
                if sent > 0 or (sent < 0 and network.send_message_nowait(peer, protocol, data)):
                    return
            except MessageTooLargeError:
                pass  # network.send_message fragments it
        elif type(qos) is Reliable and not qos.wait:
            ordered = qos.ordered
            sent = network.delivery.send_routed(peer, protocol, data, ordered)
            if sent > 0 or (sent < 0
                            and network.send_reliable_nowait(peer, protocol, data, ordered)):
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
        network = self._network  # _started(), inline: a Python frame less per request
        requests = self._requests
        if network is None or requests is None:
            raise ClosedError("host is not started")
        future: asyncio.Future[bytes] = network.loop.create_future()
        # Best effort goes out at once in the common case (one compiled call); otherwise
        # (reliable, back-pressure, too large for one datagram) it is sent by awaiting.
        request_id = (requests.send(network, peer, protocol, data, future, timeout)
                      if qos is BEST_EFFORT else 0)
        try:
            if not request_id:
                request_id = requests.register(peer, protocol, timeout, future)
                await network.send_message(peer, protocol, data, flags=limits.FLAG_REQUEST,
                                           request_id=request_id,
                                           qos=Reliable(qos.ordered) if isinstance(
                                               qos, Reliable) else qos)
                # The timeout runs from here, once the request is queued (back-pressure aside).
                requests.started(request_id)
            return await future
        finally:
            requests.forget(request_id)

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
        network, requests = self._started()
        future: asyncio.Future[bytes] = network.loop.create_future()
        request_id = requests.send(network, peer, protocol, data, future, timeout)
        if not request_id:
            return self._request_later(peer, protocol, data, timeout)
        future.add_done_callback(lambda _: requests.forget(request_id))
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
        _, requests = self._started()
        return requests.request_callback(peer, protocol, data, callback, timeout=timeout)

    def _started(self) -> tuple[MessageNetwork, RequestTable]:
        network = self._network
        requests = self._requests
        if network is None or requests is None:
            raise ClosedError("host is not started")
        return network, requests

    def _request_later(self, peer: PeerID, protocol: str, data: bytes,
                       timeout: float) -> asyncio.Task[bytes]:
        """A request that could not go out at once (back-pressure, or too large for one
        datagram): a task running :meth:`request`, its timeout running from when it is
        sent."""
        return self.network.loop.create_task(self.request(peer, protocol, data,
                                                          timeout=timeout, qos=BEST_EFFORT))

    async def connect(self, peer: PeerID, timeout: float = 5.0) -> None:
        """Establish a session with ``peer`` ahead of the first message."""
        await self.network.connect(peer, timeout)

    def metrics(self) -> dict[str, int]:
        counters = self.network.metrics()
        counters["pending_requests"] = 0 if self._requests is None else len(self._requests)
        return counters

    def metrics_text(self) -> str:
        return self.network.metrics_text()


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

