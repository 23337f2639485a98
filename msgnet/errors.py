"""The whole msgnet exception hierarchy.

Every error msgnet raises derives from :class:`MsgnetError`.  Subclasses also
derive from the builtin they refine, so ``except ValueError`` or
``except TimeoutError`` keeps working for callers who do not know msgnet.

Input from the network never raises into the event loop: malformed,
unauthenticated or replayed packets are dropped and counted.  These
exceptions reach callers of the API (bad arguments, failed sends) and the
sans-IO cores, whose callers convert them into drops.
"""

from __future__ import annotations

__all__ = [
    "MsgnetError",
    "UsageError",
    "MessageTooLargeError",
    "FrameError",
    "ProtocolViolation",
    "SecurityError",
    "HandshakeError",
    "PeerUnreachableError",
    "RequestTimeoutError",
    "ProtocolResetError",
    "ClosedError",
]


class MsgnetError(Exception):
    """Root of every exception msgnet raises."""


class UsageError(MsgnetError, ValueError):
    """The API was called with bad arguments (our caller's mistake)."""


class MessageTooLargeError(UsageError):
    """A message exceeds the size its QoS or transport allows."""


class ProtocolViolation(MsgnetError):
    """The remote sent something the wire spec forbids.

    ``code`` is the wire error code (docs/wire.md, CLOSE codes) that the
    engine uses when it closes or resets in answer.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class FrameError(ProtocolViolation, ValueError):
    """Bytes that do not decode as a valid frame, varint or packet header.

    ``offset`` is where in the input the problem is, when known; from
    ``decode_packet``, ``frames`` holds the valid frames before the bad one
    (docs/wire.md §3.1 keeps them).
    """

    offset: int | None = None
    frames: list[object] | None = None


class SecurityError(MsgnetError):
    """Authentication of the remote failed (wrong key, bad signature, wrong PeerID)."""


class HandshakeError(SecurityError):
    """A handshake message failed to verify or decrypt."""


class PeerUnreachableError(MsgnetError, ConnectionError):
    """No session could be established, or the peer stopped answering."""


class RequestTimeoutError(MsgnetError, TimeoutError):
    """A request or acknowledged send did not complete in time."""


class ProtocolResetError(MsgnetError):
    """The peer refused the protocol (it has no handler for it)."""

    def __init__(self, protocol: str, code: int = 0) -> None:
        super().__init__(f"peer reset protocol {protocol!r} (code {code})")
        self.protocol = protocol
        self.code = code


class ClosedError(MsgnetError, RuntimeError):
    """The host, network or session is closed."""
