"""PendingRequest: the future-like handle of MessageHost.request_callback.

Compiled by Cython where msgnet is built (setup.py COMPILED_PY, typed by _requests.pxd as
core/delivery.py is by its .pxd): a handle is made and settled once per request, on the
path of a request/response round trip, and as a cdef class that costs a C struct and C
calls instead of a Python object's attribute dictionary and method frames. It runs
unchanged as plain Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

try:
    import cython  # type: ignore[import-untyped]
except ImportError:  # running uncompiled without Cython installed: the decorators do nothing
    from types import SimpleNamespace

    cython = SimpleNamespace(cclass=lambda cls: cls, final=lambda cls: cls)

__all__ = ["PendingRequest"]

_PENDING, _DONE, _FAILED, _CANCELLED = range(4)  # PendingRequest._state


@cython.final
@cython.cclass
class PendingRequest:
    """A request made with :meth:`MessageHost.request_callback`: future-like, but its
    callback runs in the call that settles it (no loop callback per request)."""

    __slots__ = ("_callback", "_loop", "_pending", "_request_id", "_state", "_task", "_value")

    def __init__(self, callback: Callable[[PendingRequest], None],
                 loop: asyncio.AbstractEventLoop, pending: dict[int, list[Any]]) -> None:
        self._callback = callback
        self._loop = loop
        self._pending = pending  # the host's table of outstanding requests
        self._request_id = 0
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
            self._pending.pop(self._request_id, None)
        return True

    # The host settles it (set_result / set_exception, as on a future).

    def set_result(self, value: bytes) -> None:
        self._settle(_DONE, value)

    def set_exception(self, exc: BaseException) -> None:
        self._settle(_FAILED, exc)

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
