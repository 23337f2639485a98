"""The host's outstanding requests: RequestTable, and PendingRequest, the future-like handle
of MessageHost.request_callback.

Compiled by Cython where msgnet is built (setup.py COMPILED_PY, typed by _requests.pxd as
core/delivery.py is by its .pxd): a request is registered, sent, matched with its reply and
settled once per round trip, and as cdef classes that costs C structs and C calls instead of
Python frames and attribute dictionaries (moving this out of host.py cut a request_callback
round trip by about a tenth of its instructions). It runs unchanged as plain Python.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from . import limits
from .errors import (
    ClosedError,
    MessageTooLargeError,
    MsgnetError,
    PeerUnreachableError,
    ProtocolResetError,
    RequestTimeoutError,
    UsageError,
)

try:
    import cython  # type: ignore[import-untyped]
except ImportError:  # running uncompiled without Cython installed: the decorators do nothing
    from types import SimpleNamespace

    cython = SimpleNamespace(cclass=lambda cls: cls, final=lambda cls: cls)

__all__ = ["MAX_PENDING_REQUESTS", "PendingRequest", "RequestTable"]

MAX_PENDING_REQUESTS = 65536
_FLAG_REQUEST = limits.FLAG_REQUEST
_PENDING, _DONE, _FAILED, _CANCELLED = range(4)  # PendingRequest._state
_INF = math.inf  # a C double when compiled (a module attribute read costs ~290 instructions)
_MAX_PENDING = MAX_PENDING_REQUESTS  # a C integer when compiled (as _INF)


@cython.cclass
class _Request:
    """One outstanding request: what its errors name, its ``deadline`` (inf until it is
    sent), and ``future``, the asyncio future it settles (MessageHost.request and
    request_nowait). request_callback's requests are PendingRequests, their own entries: an
    object less per request. Made without an __init__ call, which would be a Python-level
    call per request."""

    __slots__ = ("deadline", "future", "peer", "protocol", "request_id", "timeout")

    request_id: int
    future: Any
    protocol: str
    peer: Any
    timeout: float
    deadline: float

    def _settled(self) -> bool:
        return self.future.done()  # type: ignore[no-any-return]

    def _settle(self, state: int, value: Any) -> None:
        """Complete the future with the reply (_DONE) or the error (_FAILED), unless done."""
        future = self.future
        if future.done():
            return
        if state == _DONE:
            future.set_result(value)
        else:
            future.set_exception(value)


def _new_request(future: Any) -> _Request:
    """The entry of a request that ``future`` awaits (RequestTable._add registers it)."""
    entry = _Request.__new__(_Request)
    entry.future = future
    return entry


@cython.final
@cython.cclass
class PendingRequest(_Request):
    """A request made with :meth:`MessageHost.request_callback`: future-like, but its
    callback runs in the call that settles it (no loop callback per request)."""

    __slots__ = ("_callback", "_loop", "_state", "_table", "_task", "_value")

    def __init__(self, callback: Callable[[PendingRequest], None],
                 loop: asyncio.AbstractEventLoop, table: RequestTable) -> None:
        self._callback = callback
        self._loop = loop
        self._table = table  # the host's outstanding requests
        self.request_id = 0
        self._state = _PENDING
        self._value: Any = None
        self._task: asyncio.Task[bytes] | None = None

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> bytes:
        """The reply; raises the request's error (CancelledError if cancelled)."""
        state = self._state
        if state == _DONE:
            return self._value  # type: ignore[no-any-return]
        if state == _FAILED:
            raise self._value
        if state == _CANCELLED:
            raise asyncio.CancelledError()
        raise asyncio.InvalidStateError("request is not done")

    def exception(self) -> BaseException | None:
        state = self._state
        if state == _FAILED:
            return self._value  # type: ignore[no-any-return]
        if state == _CANCELLED:
            raise asyncio.CancelledError()
        if state == _PENDING:
            raise asyncio.InvalidStateError("request is not done")
        return None

    def cancel(self) -> bool:
        """Forget the request (a late reply is dropped); the callback is not called."""
        if self._state != _PENDING:
            return False
        self._state = _CANCELLED
        if self._task is not None:
            self._task.cancel()
        else:
            self._table.forget(self.request_id)
        return True

    # The host settles it (set_result / set_exception, as on a future).

    def set_result(self, value: bytes) -> None:
        self._settle(_DONE, value)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(_FAILED, exc)

    def _settled(self) -> bool:
        return self._state != _PENDING

    def _settle(self, state: int, value: Any) -> None:
        if self._state != _PENDING:
            return
        self._state = state
        self._value = value
        try:
            self._callback(self)
        except Exception as exc:  # noqa: BLE001 - the settling call (a dispatch) goes on
            self._loop.call_exception_handler({
                "message": "exception in a request callback", "exception": exc})

    def _follow(self, task: asyncio.Task[bytes]) -> None:
        """Settle from ``task`` (the request when it could not go out at once)."""
        self._task = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[bytes]) -> None:
        if task.cancelled():  # through cancel(), or by the loop's shutdown
            self._state = _CANCELLED
            return
        exc = task.exception()
        if exc is not None:
            self.set_exception(exc)
        else:
            self.set_result(task.result())


def _pending_request(callback: Callable[[PendingRequest], None],
                     loop: asyncio.AbstractEventLoop, table: RequestTable) -> PendingRequest:
    """PendingRequest(callback, loop, table) without the __init__ call, a Python-level call
    per request when compiled."""
    request = PendingRequest.__new__(PendingRequest)
    request._callback = callback
    request._loop = loop
    request._table = table
    request.request_id = 0
    request._state = _PENDING
    request._value = None
    request._task = None
    return request


@cython.final
@cython.cclass
class RequestTable:
    """A host's outstanding requests by request id (unique per host, whatever the peer).

    A request is registered, sent, then settled once: by its reply (only from the peer it
    was sent to), by the peer's Reset of its protocol, by the peer becoming unreachable, by
    its timeout, or by the host closing. One timer serves every timeout, armed for the
    earliest deadline: a timer per request costs about 1 us on uvloop, as much as the rest
    of a request.
    """

    __slots__ = ("_entries", "_last_id", "_later", "_loop", "_network", "_route", "_time",
                 "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, route: Any = None,
                 network: Any = None,
                 later: Callable[[Any, str, bytes, float], asyncio.Task[bytes]] | None = None,
                 ) -> None:
        """``route``: the network's SendRoute (MessageNetwork.route), which sends a request
        to a peer with a session by one C call; without it, or when the peer has none,
        requests go through MessageNetwork.send_message_nowait. ``network`` and ``later``
        (the host's, until close) serve request_callback: ``later(peer, protocol, data,
        timeout)`` is the task that sends a request that could not go out at once."""
        self._loop = loop
        self._route = route
        self._network = network
        self._later = later
        self._time = loop.time
        self._entries: dict[int, _Request] = {}
        self._last_id = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[int]:
        return list(self._entries)

    def register(self, peer: Any, protocol: str, timeout: float, future: Any) -> int:
        """Add a request that ``future`` settles; its timeout starts with started()."""
        entry = _new_request(future)
        self._add(entry, peer, protocol, timeout)
        return entry.request_id  # type: ignore[no-any-return]

    def _add(self, entry: _Request, peer: Any, protocol: str, timeout: float) -> None:
        if not timeout > 0:
            raise UsageError("timeout must be positive")
        entries = self._entries
        if len(entries) >= _MAX_PENDING:
            raise UsageError(f"more than {MAX_PENDING_REQUESTS} requests outstanding")
        self._last_id += 1
        entry.request_id = self._last_id
        entry.protocol = protocol
        entry.peer = peer
        entry.timeout = timeout
        entry.deadline = _INF
        entries[entry.request_id] = entry

    def started(self, request_id: int) -> None:
        """The request went out: its timeout runs from now."""
        entry = self._entries.get(request_id)
        if entry is not None:
            self._start(entry)

    def _start(self, entry: _Request) -> None:
        if self._route is None:
            deadline = self._time() + entry.timeout
        else:  # its clock costs no loop.time() call inside a receive batch
            deadline = self._route.now() + entry.timeout
        entry.deadline = deadline
        if deadline < self._timer_at:
            self._arm(deadline)

    def forget(self, request_id: int) -> None:
        self._entries.pop(request_id, None)

    def send(self, network: Any, peer: Any, protocol: str, data: bytes, future: Any,
             timeout: float) -> int:
        """Register a best-effort request and send it at once: its id, or 0 when it cannot
        go out at once (back-pressure, or too large for one datagram), and then it is
        forgotten (the caller sends it another way)."""
        entry = _new_request(future)
        if not self._send(network, peer, protocol, data, entry, timeout):
            return 0
        return entry.request_id  # type: ignore[no-any-return]

    def _send(self, network: Any, peer: Any, protocol: str, data: bytes, entry: _Request,
              timeout: float) -> bool:
        """send() of a request's entry: whether it went out."""
        self._add(entry, peer, protocol, timeout)
        request_id = entry.request_id
        try:
            sent = -1 if self._route is None else self._route.send(
                peer, protocol, data, _FLAG_REQUEST, request_id)
            if sent < 0:  # no session (or a refusal remembered): the network's general path
                sent = network.send_message_nowait(peer, protocol, data, _FLAG_REQUEST,
                                                   request_id)
        except MessageTooLargeError:
            sent = False
        except BaseException:
            del self._entries[request_id]
            raise
        if not sent:
            del self._entries[request_id]
            return False
        self._start(entry)
        return True

    def request_callback(self, peer: Any, protocol: str, data: bytes,
                         callback: Callable[[PendingRequest], None], *,
                         timeout: float = 5.0) -> PendingRequest:
        """MessageHost.request_callback, which a started host binds to this method: called
        from the previous reply's callback (a DHT lookup), the host's Python frame per
        request cost about a twentieth of a round trip."""
        return self._send_callback(peer, protocol, data, callback, timeout)

    def _send_callback(self, peer: Any, protocol: str, data: bytes,
                       callback: Callable[[PendingRequest], None],
                       timeout: float) -> PendingRequest:
        """request_callback past its keyword argument: a C call."""
        if self._later is None:
            raise ClosedError("host is not started")
        request = _pending_request(callback, self._loop, self)
        if not self._send(self._network, peer, protocol, data, request, timeout):
            request._follow(self._later(peer, protocol, data, timeout))
        return request

    # -- what settles requests --------------------------------------------------------------

    def on_response(self, session: Any, request_id: int, data: bytes) -> None:
        """A RESPONSE frame (the engines call this directly): settles the request if it
        came from the peer it was sent to."""
        entries = self._entries
        entry = entries.pop(request_id, None)  # one lookup: the common case is the answer
        if entry is None:
            return
        peer = entry.peer
        if peer is not session.peer_id and peer != session.peer_id:
            entries[request_id] = entry  # still outstanding (iterated last from now on)
            return  # request ids are unique per host, not per peer: only that peer answers
        entry._settle(_DONE, data)

    def on_reset(self, peer: Any, protocol: str, code: int) -> None:
        """The peer has no handler for protocol: its requests there fail."""
        self._fail(lambda entry: entry.peer == peer and entry.protocol == protocol,
                   lambda: ProtocolResetError(protocol, code))

    def on_unreachable(self, peer: Any, error: BaseException) -> None:
        """The peer cannot be reached: its requests fail with ``error`` if it is msgnet's
        own (e.g. SecurityError for a wrong peer id), else PeerUnreachableError."""
        def make() -> BaseException:
            if isinstance(error, MsgnetError):
                return error
            return PeerUnreachableError(str(error))
        self._fail(lambda entry: entry.peer == peer, make)

    def close(self, make_error: Callable[[], BaseException]) -> None:
        """Fail every request (the host closes); request_callback raises ClosedError from
        now on."""
        self._network = None
        self._later = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = _INF
        self._fail(lambda entry: True, make_error)

    def _fail(self, which: Callable[[_Request], bool],
              make_error: Callable[[], BaseException]) -> None:
        entries = self._entries
        for request_id, entry in list(entries.items()):
            if which(entry) and request_id in entries:
                del entries[request_id]
                if not entry._settled():
                    entry._settle(_FAILED, make_error())

    # -- timeouts ------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        """Fail the requests whose deadline passed with RequestTimeoutError; re-arm for the
        next. Visits every outstanding request, about once per timeout period."""
        self._timer = None
        self._timer_at = _INF
        # Due within the loop clock's resolution (uvloop: 1 ms) counts as due: a timer that
        # fires a fraction early must not re-arm itself at once.
        now = self._loop.time() + 0.001
        next_at = _INF
        entries = self._entries
        for request_id, entry in list(entries.items()):
            if request_id not in entries or entry._settled():
                continue
            deadline = entry.deadline
            if deadline <= now:
                del entries[request_id]
                entry._settle(_FAILED, RequestTimeoutError(
                    f"no reply from {entry.peer} on {entry.protocol} within {entry.timeout} s"))
            elif deadline < next_at:
                next_at = deadline
        if next_at < self._timer_at:  # (a callback may have armed it for a new request)
            self._arm(next_at)
