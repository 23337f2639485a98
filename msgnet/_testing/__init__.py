"""Test helpers shipped with msgnet: a seeded impairment relay for real-socket tests, and
the one polling wait the tests share."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0,
                   interval: float = 0.005) -> None:
    """Poll predicate on the running loop until it is true; AssertionError after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
