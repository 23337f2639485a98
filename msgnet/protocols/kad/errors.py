"""Errors of the Kademlia DHT, rooted in msgnet's hierarchy.

Remote misbehaviour never raises into the caller: a malformed message or an
invalid record from a peer is dropped and counted.  These exceptions are for
callers of the DHT's API.
"""

from __future__ import annotations

from ...errors import MessageTooLargeError, MsgnetError, UsageError

__all__ = [
    "InvalidRecordError",
    "KadError",
    "MalformedMessageError",
    "NotFoundError",
    "ValueTooLargeError",
]


class KadError(MsgnetError):
    """Root of the DHT's errors."""


class ValueTooLargeError(KadError, MessageTooLargeError):
    """A value (or key) exceeds what one DHT message can carry (see ``wire.MAX_VALUE_SIZE``)."""


class InvalidRecordError(KadError, UsageError):
    """A record failed its namespace's validator (bad signature, unknown namespace...)."""


class NotFoundError(KadError, LookupError):
    """No valid record (or no provider) was found for a key."""


class MalformedMessageError(KadError, ValueError):
    """Bytes from a peer that are not a valid DHT message (dropped and counted, not raised)."""
