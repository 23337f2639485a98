"""msgnet: message-oriented networking for libp2p.

A peer registers a handler for a protocol and sends messages to peers on a
protocol, over UDP and TCP alike, with sessions bound to libp2p identities.
"""

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

__all__ = [
    "__version__",
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
