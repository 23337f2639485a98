"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only shared/ folder (test vectors) that sits beside the checkout.

    Missing shared data is a broken setup, not a reason to skip: fail loudly.
    """
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.fail(
            f"shared test data folder not found at {path}: check out shared/ beside the "
            "repository (see shared/vectors/README.md)",
            pytrace=False,
        )
    return path


LOOP_KINDS = ["asyncio", "uvloop"]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class LoopRunner:
    """Runs a coroutine on a fresh loop of one kind and fails the test if the loop's
    exception handler fired (a swallowed error), as asyncpg's and uvloop's harnesses do.
    Tests that expect handler errors read and clear ``errors`` themselves."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.errors: list[dict] = []

    def __call__(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        loop = new_loop(self.kind)
        loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, timeout))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


@pytest.fixture(params=LOOP_KINDS)
def run(request: pytest.FixtureRequest) -> Iterator[LoopRunner]:
    runner = LoopRunner(request.param)
    yield runner
    if runner.errors:
        pytest.fail(f"the event loop's exception handler was called: {runner.errors!r}")
