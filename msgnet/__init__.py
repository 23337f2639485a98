"""msgnet: message-oriented networking for libp2p.

A peer registers a handler for a protocol and sends messages to peers on a
protocol, over UDP and TCP alike, with sessions bound to libp2p identities.
"""

from collections.abc import Coroutine
from typing import Any, TypeVar

from ._engine import Message, Session
from ._version import __version__
from .errors import (
    ClosedError,
    FrameError,
    HandshakeError,
    MessageTooLargeError,
    MsgnetError,
    PeerUnreachableError,
    ProtocolResetError,
    ProtocolViolation,
    RequestTimeoutError,
    SecurityError,
    UsageError,
)
from .host import MessageHost, PendingRequest
from .identity import KeyPair, PeerID
from .network import MessageNetwork, MessageTransport, SocketSession, UdpSocket, UdpTransport
from .peerstore import Peerstore
from .qos import BEST_EFFORT, BestEffort, QoS, Reliable

__all__ = [
    "__version__",
    "run",
    "BEST_EFFORT",
    "BestEffort",
    "QoS",
    "Reliable",
    "KeyPair",
    "Message",
    "MessageHost",
    "MessageNetwork",
    "MessageTransport",
    "PeerID",
    "PendingRequest",
    "Peerstore",
    "Session",
    "SocketSession",
    "UdpSocket",
    "UdpTransport",
    "ClosedError",
    "FrameError",
    "HandshakeError",
    "MessageTooLargeError",
    "MsgnetError",
    "PeerUnreachableError",
    "ProtocolResetError",
    "ProtocolViolation",
    "RequestTimeoutError",
    "SecurityError",
    "UsageError",
]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on the uvloop event loop (msgnet's default), or asyncio without uvloop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)
