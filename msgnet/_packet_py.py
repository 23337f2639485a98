"""Pure-Python twin of ``_packet.pyx``, written from docs/wire.md §2 alone.

It is the oracle the tests check the Cython module against, so it follows the text as
literally as it can (a set of seen counters rather than a bitmap, ``struct`` layouts) and
shares no code with it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from msgnet import limits
from msgnet.errors import ClosedError, FrameError, ProtocolViolation, UsageError

__all__ = [
    "DROP_REASON_NAMES",
    "ReplayWindow",
    "SessionCrypto",
    "decode_cookie",
    "decode_session_unknown",
    "decode_version_unsupported",
    "encode_cookie",
    "encode_session_unknown",
    "encode_version_unsupported",
    "peek_receiver_index",
]

DROP_REASON_NAMES = (
    "ok",
    "truncated",
    "replay",
    "auth_failed",
    "counter_exhausted",
    "plaintext_refused",
    "unknown_session",
    "out_of_room",
)

_HEADER = struct.Struct(">BIQ")  # type, receiver_index, counter: the AEAD's associated data
_U64_MAX = (1 << 64) - 1


def _dropped(reason: str) -> ProtocolViolation:
    exc = ProtocolViolation(f"packet dropped: {reason}")
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


class ReplayWindow:
    """The replay window of §2.2: a counter at or below ``highest - REPLAY_WINDOW``, or already
    seen, is a replay."""

    def __init__(self) -> None:
        self._highest: int | None = None
        self._seen: set[int] = set()

    def would_accept(self, counter: int) -> bool:
        """Whether accept(counter) would succeed; changes nothing."""
        if not 0 <= counter <= _U64_MAX:
            raise OverflowError("counter is not a u64")
        if counter == _U64_MAX:
            return False  # as the Cython window: it stores highest + 1 in a u64
        if self._highest is None or counter > self._highest:
            return True
        if counter <= self._highest - limits.REPLAY_WINDOW:
            return False
        return counter not in self._seen

    def accept(self, counter: int) -> bool:
        """Check and mark counter."""
        if not self.would_accept(counter):
            return False
        if self._highest is None or counter > self._highest:
            self._highest = counter
            floor = counter - limits.REPLAY_WINDOW
            self._seen = {c for c in self._seen if c > floor}
        self._seen.add(counter)
        return True


class SessionCrypto:
    """Keys, counters and replay window of one session (§2.2); PLAIN_DATA when plaintext (§2.6)."""

    def __init__(
        self,
        local_index: int,
        remote_index: int,
        send_key: bytes | None,
        recv_key: bytes | None,
        plaintext: bool = False,
        send_counter: int = 0,
        aes: bool = False,
    ) -> None:
        if not (0 <= local_index < 1 << 32 and 0 <= remote_index < 1 << 32):
            raise OverflowError("session indices are u32")
        if not 0 <= send_counter <= _U64_MAX:
            raise OverflowError("send_counter is a u64")
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = send_counter
        self.plaintext = plaintext
        if aes and plaintext:
            raise UsageError("a plaintext session has no cipher")
        self.aes = aes
        self.sealed_bytes = 0  # AES-256-GCM: payload bytes sealed, against its limit
        self.window = ReplayWindow()
        self._type = limits.PACKET_PLAIN_DATA if plaintext else limits.PACKET_DATA
        if not plaintext:
            if send_key is None or recv_key is None:
                raise UsageError("an encrypted session needs both keys")
            cipher = AESGCM if aes else ChaCha20Poly1305
            self._send_aead = cipher(send_key)
            self._recv_aead = cipher(recv_key)

    @staticmethod
    def _nonce(counter: int) -> bytes:
        return bytes(4) + counter.to_bytes(8, "little")

    def seal(self, payload: bytes) -> bytes:
        """The next DATA (or PLAIN_DATA) packet carrying payload."""
        counter = self.send_counter
        if counter >= limits.REJECT_AFTER_MESSAGES:
            raise ClosedError("send counter exhausted (REJECT_AFTER_MESSAGES)")
        if self.aes:
            if self.sealed_bytes + len(payload) > limits.AES_GCM_REJECT_AFTER_BYTES:
                raise ClosedError("AES-256-GCM usage limit reached (AES_GCM_REJECT_AFTER_BYTES)")
            self.sealed_bytes += len(payload)
        header = _HEADER.pack(self._type, self.remote_index, counter)
        if self.plaintext:
            body = bytes(payload)
        else:
            body = self._send_aead.encrypt(self._nonce(counter), bytes(payload), header)
        self.send_counter = counter + 1
        return header + body

    def open(self, packet: bytes) -> bytes:
        """The payload of packet, checked in the order of §2.2; ProtocolViolation with
        ``reason`` = the drop counter otherwise."""
        packet = bytes(packet)
        if len(packet) < limits.DATA_HEADER_SIZE:
            raise _dropped("truncated")
        packet_type, receiver_index, counter = _HEADER.unpack_from(packet)
        if packet_type == limits.PACKET_DATA:
            if len(packet) < limits.DATA_OVERHEAD:
                raise _dropped("truncated")
        elif packet_type != limits.PACKET_PLAIN_DATA:
            exc = FrameError(f"packet type 0x{packet_type:02x} is not DATA or PLAIN_DATA")
            exc.reason = "not_data"  # type: ignore[attr-defined]
            raise exc
        if receiver_index != self.local_index:
            raise _dropped("unknown_session")
        if packet_type != self._type:
            raise _dropped("plaintext_refused")
        if counter >= limits.REJECT_AFTER_MESSAGES:
            raise _dropped("counter_exhausted")
        if not self.window.would_accept(counter):
            raise _dropped("replay")
        header, body = packet[: limits.DATA_HEADER_SIZE], packet[limits.DATA_HEADER_SIZE :]
        if self.plaintext:
            payload = body
        else:
            try:
                payload = self._recv_aead.decrypt(self._nonce(counter), body, header)
            except InvalidTag:
                raise _dropped("auth_failed") from None
        if not self.window.accept(counter):
            raise _dropped("replay")
        return payload

    def tag_of(self, packet: bytes) -> bytes:
        """The 16-byte tag of a DATA packet this session sealed."""
        if self.plaintext:
            raise UsageError("PLAIN_DATA packets carry no tag")
        if len(packet) < limits.DATA_OVERHEAD or packet[0] != limits.PACKET_DATA:
            raise FrameError("not a DATA packet")
        return bytes(packet[-limits.AEAD_TAG_SIZE :])


def _expect(data: bytes, packet_type: int, size: int, exact: bool = True) -> bytes:
    data = bytes(data)
    if not data or data[0] != packet_type:
        raise FrameError(f"not a packet of type 0x{packet_type:02x}")
    if len(data) < size or (exact and len(data) != size):
        raise FrameError(f"packet of type 0x{packet_type:02x} has wrong length {len(data)}")
    return data


def encode_session_unknown(receiver_index: int, counter: int, tag: bytes) -> bytes:
    """SESSION_UNKNOWN (§2.5): type | receiver_index:u32 | counter:u64 | tag:bytes[16]."""
    if len(tag) != limits.AEAD_TAG_SIZE:
        raise UsageError("tag must be 16 bytes")
    return _HEADER.pack(limits.PACKET_SESSION_UNKNOWN, receiver_index, counter) + bytes(tag)


def decode_session_unknown(data: bytes) -> tuple[int, int, bytes]:
    data = _expect(data, limits.PACKET_SESSION_UNKNOWN, limits.DATA_OVERHEAD)
    _, receiver_index, counter = _HEADER.unpack_from(data)
    return receiver_index, counter, data[limits.DATA_HEADER_SIZE :]


def encode_cookie(receiver_index: int, cookie: bytes) -> bytes:
    """COOKIE (§2.4): type | receiver_index:u32 | cookie:bytes[16]."""
    if len(cookie) != 16:
        raise UsageError("cookie must be 16 bytes")
    return struct.pack(">BI", limits.PACKET_COOKIE, receiver_index) + bytes(cookie)


def decode_cookie(data: bytes) -> tuple[int, bytes]:
    data = _expect(data, limits.PACKET_COOKIE, 21)
    return struct.unpack_from(">I", data, 1)[0], data[5:]


def encode_version_unsupported(receiver_index: int, versions: Iterable[int]) -> bytes:
    """VERSION_UNSUPPORTED (§2.7): type | receiver_index:u32 | version_count:u8 | version:u8*."""
    listed = bytes(versions)
    if len(listed) > 255:
        raise UsageError("at most 255 versions")
    return struct.pack(">BIB", limits.PACKET_VERSION_UNSUPPORTED, receiver_index, len(listed)) + listed


def decode_version_unsupported(data: bytes) -> tuple[int, tuple[int, ...]]:
    data = _expect(data, limits.PACKET_VERSION_UNSUPPORTED, 6, exact=False)
    _, receiver_index, count = struct.unpack_from(">BIB", data)
    if len(data) != 6 + count:
        raise FrameError("VERSION_UNSUPPORTED length does not match its version_count")
    return receiver_index, tuple(data[6:])


def peek_receiver_index(data: bytes) -> int:
    """receiver_index (offset 1) of DATA, PLAIN_DATA, FINISH, SESSION_UNKNOWN or COOKIE."""
    routed = (
        limits.PACKET_DATA,
        limits.PACKET_PLAIN_DATA,
        limits.PACKET_FINISH,
        limits.PACKET_SESSION_UNKNOWN,
        limits.PACKET_COOKIE,
    )
    if not data or data[0] not in routed:
        raise FrameError("packet type carries no receiver_index at offset 1")
    if len(data) < 5:
        raise FrameError("packet too short for a receiver_index")
    return int.from_bytes(data[1:5], "big")
