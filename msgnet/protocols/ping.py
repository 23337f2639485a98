"""``/msgnet/ping/1.0.0``: echo a short payload, to measure round trips to a node.

Unlike libp2p's ping (32 random bytes over a stream) this is one request and
its reply, so a round trip is exactly one datagram each way.
"""

from __future__ import annotations

import os
import time

from .._engine import Message
from ..host import MessageHost
from ..identity import PeerID

__all__ = ["MAX_PAYLOAD", "PROTOCOL", "ping", "serve"]

PROTOCOL = "/msgnet/ping/1.0.0"
MAX_PAYLOAD = 64  # a ping is small: larger requests are not echoed (no amplification)


def serve(host: MessageHost) -> None:
    """Answer pings on ``host``."""

    def echo(msg: Message) -> None:
        if msg.is_request and len(msg.data) <= MAX_PAYLOAD:
            msg.reply(msg.data)

    host.set_message_handler(PROTOCOL, echo)


async def ping(host: MessageHost, peer: PeerID, *, timeout: float = 2.0) -> float:
    """One round trip to ``peer`` in seconds (RequestTimeoutError if none).

    Raises PeerUnreachableError (via the host) and ValueError if the echo differs.
    """
    payload = os.urandom(32)
    start = time.perf_counter()
    reply = await host.request(peer, PROTOCOL, payload, timeout=timeout)
    elapsed = time.perf_counter() - start
    if reply != payload:
        raise ValueError("ping reply does not echo the request")
    return elapsed
