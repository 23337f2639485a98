"""Noise Protocol Framework, revision 34, for ``Noise_<PATTERN>_25519_ChaChaPoly_SHA256``.

A direct transcription of the spec's three objects (section 5): CipherState,
SymmetricState and HandshakeState.  Handshake patterns are data
(:data:`PATTERNS`), so the state machine has no per-pattern code.  Every
primitive (X25519, ChaCha20-Poly1305, SHA-256, HMAC-SHA256) comes from
``cryptography``; only Noise's own compositions (HKDF, MixKey, Split...) are
written here.  PSK modifiers and fallback patterns are not supported.

Sans-IO: callers move the bytes.  Errors:

* :class:`~msgnet.errors.HandshakeError` for every protocol failure: a message
  that is too short, too long or fails to decrypt, a low-order DH key, a call
  out of turn, an exhausted nonce.
* :class:`~msgnet.errors.UsageError` for bad arguments (unknown pattern,
  wrong key length, a key the pattern needs but was not given).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from msgnet.errors import HandshakeError, MessageTooLargeError, UsageError

__all__ = [
    "PATTERNS",
    "CipherState",
    "HandshakePattern",
    "HandshakeState",
    "SymmetricState",
    "generate_x25519",
    "hkdf",
    "x25519_private_key",
    "x25519_public",
]

DHLEN = 32
HASHLEN = 32
KEYLEN = 32
TAGLEN = 16
MAX_MESSAGE_LEN = 65535  # spec section 3: every Noise message fits in 65535 bytes
MAX_NONCE = 2**64 - 1  # reserved by the spec: never used to encrypt, only by REKEY

_DH_TOKENS = frozenset({"ee", "es", "se", "ss"})
_TOKENS = _DH_TOKENS | {"e", "s"}


# --- primitives (all from cryptography) and the X25519 helpers --------------------


def generate_x25519() -> bytes:
    """Return a fresh random X25519 private key (raw 32 bytes)."""
    return X25519PrivateKey.generate().private_bytes_raw()


def x25519_public(private32: bytes) -> bytes:
    """Return the raw 32-byte public key of a raw X25519 private key."""
    return _private_key(private32, "private key").public_key().public_bytes_raw()


def x25519_private_key(raw: bytes) -> X25519PrivateKey:
    """The key object of a raw X25519 private key: built once, it spares each handshake
    that uses it the ~40 us of deriving its public key again."""
    return _private_key(raw, "private key")


def _private_key(raw: bytes | X25519PrivateKey, what: str) -> X25519PrivateKey:
    if isinstance(raw, X25519PrivateKey):
        return raw
    raw = bytes(raw)
    if len(raw) != DHLEN:
        raise UsageError(f"X25519 {what} must be {DHLEN} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def _public_key(raw: bytes | None, what: str) -> bytes | None:
    if raw is None:
        return None
    raw = bytes(raw)
    if len(raw) != DHLEN:
        raise UsageError(f"X25519 {what} must be {DHLEN} bytes, got {len(raw)}")
    return raw


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        # cryptography refuses an all-zero shared secret (a low-order remote
        # key); spec section 12.1 allows rejecting it, and a remote that sends
        # one is misbehaving.
        raise HandshakeError("X25519 with a low-order public key") from exc


def _hash(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF (spec section 4.3): two or three chained HMAC-SHA256 outputs.

    Equal to RFC 5869 with salt=chaining_key and empty info, but spelt out as
    the spec does so it can be checked against the spec line by line.
    """
    if num_outputs not in (2, 3):
        raise UsageError(f"Noise HKDF yields 2 or 3 outputs, not {num_outputs}")
    temp_key = _hmac(chaining_key, input_key_material)
    outputs: list[bytes] = []
    previous = b""
    for i in range(1, num_outputs + 1):
        previous = _hmac(temp_key, previous + bytes((i,)))
        outputs.append(previous)
    return tuple(outputs)


def _nonce(n: int) -> bytes:
    # ChaChaPoly (spec section 12.3): 32 zero bits, then n as 64-bit little-endian.
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


# --- CipherState --------------------------------------------------------------------


class CipherState:
    """A key ``k`` (or none) and a nonce counter ``n`` (spec section 5.1).

    Without a key, encryption is the identity, as the spec requires for the
    first handshake messages.  ``n`` advances only on success, so a forged
    ciphertext cannot desynchronise the two sides.
    """

    __slots__ = ("_aead", "_k", "_n")

    def __init__(self, key: bytes | None = None) -> None:
        self._k: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self._n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """Set ``k`` (None for empty) and reset ``n`` to zero."""
        if key is not None:
            key = bytes(key)
            if len(key) != KEYLEN:
                raise UsageError(f"cipher key must be {KEYLEN} bytes, got {len(key)}")
        self._k = key
        self._aead = None if key is None else ChaCha20Poly1305(key)
        self._n = 0

    @property
    def key(self) -> bytes | None:
        """The raw 32-byte key, or None before one is set.

        Exposed because msgnet's packet layer encrypts with explicit
        per-packet counters instead of this object's implicit nonce.
        """
        return self._k

    @property
    def nonce(self) -> int:
        """The nonce the next encrypt or decrypt will use."""
        return self._n

    def has_key(self) -> bool:
        """True once a key is set: from then on messages are encrypted."""
        return self._k is not None

    def set_nonce(self, n: int) -> None:
        """Set ``n``, e.g. to decrypt out of order (spec section 5.1)."""
        if not 0 <= n <= MAX_NONCE:
            raise UsageError(f"nonce must be in [0, 2**64-1], got {n}")
        self._n = n

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``ad``; returns ``plaintext`` unchanged without a key."""
        if self._aead is None:
            return bytes(plaintext)
        self._check_nonce()
        ciphertext = self._aead.encrypt(_nonce(self._n), plaintext, ad)
        self._n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Decrypt and verify; raises HandshakeError (``n`` unchanged) if forged."""
        if self._aead is None:
            return bytes(ciphertext)
        self._check_nonce()
        try:
            plaintext = self._aead.decrypt(_nonce(self._n), ciphertext, ad)
        except InvalidTag as exc:
            raise HandshakeError("ciphertext failed to authenticate") from exc
        self._n += 1
        return plaintext

    def rekey(self) -> None:
        """Replace ``k`` by REKEY(k) (spec sections 4.2 and 11.3); ``n`` is kept.

        REKEY(k) is the first 32 bytes of ENCRYPT(k, 2**64-1, empty, 32 zeros),
        the one use of the reserved nonce.
        """
        if self._aead is None:
            raise UsageError("rekey() needs a key")
        new_key = self._aead.encrypt(_nonce(MAX_NONCE), bytes(KEYLEN), b"")[:KEYLEN]
        n = self._n
        self.initialize_key(new_key)
        self._n = n

    def copy(self) -> CipherState:
        """An independent copy (same key and nonce)."""
        clone = CipherState(self._k)
        clone._n = self._n
        return clone

    def _check_nonce(self) -> None:
        # Spec section 5.1: 2**64-1 is reserved, so once n reaches it the
        # key is spent and every further call fails.
        if self._n >= MAX_NONCE:
            raise HandshakeError("nonce exhausted: this key must not encrypt or decrypt again")

    def __repr__(self) -> str:  # never show the key
        return f"<CipherState has_key={self.has_key()} n={self._n}>"


# --- SymmetricState -----------------------------------------------------------------


class SymmetricState:
    """The chaining key ``ck``, handshake hash ``h`` and a CipherState (spec section 5.2)."""

    __slots__ = ("_cipher", "_ck", "_h")

    def __init__(self, protocol_name: bytes) -> None:
        """InitializeSymmetric: ``h`` is the name zero-padded to 32 bytes, or its hash."""
        if len(protocol_name) <= HASHLEN:
            h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            h = _hash(protocol_name)
        self._h = h
        self._ck = h
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        """``h``: a transcript hash of everything sent and received so far."""
        return self._h

    def has_key(self) -> bool:
        """True once a DH result has been mixed in: later fields are encrypted."""
        return self._cipher.has_key()

    def mix_key(self, input_key_material: bytes) -> None:
        """Feed a DH output into ``ck`` and derive a fresh cipher key."""
        self._ck, temp_k = hkdf(self._ck, input_key_material, 2)
        self._cipher.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        """``h = SHA256(h || data)``: binds ``data`` into the transcript."""
        self._h = _hash(self._h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """Encrypt with ``h`` as associated data, then hash the ciphertext."""
        ciphertext = self._cipher.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Decrypt with ``h`` as associated data, then hash the ciphertext."""
        plaintext = self._cipher.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Derive the transport keys: (initiator-to-responder, responder-to-initiator)."""
        temp_k1, temp_k2 = hkdf(self._ck, b"", 2)
        return CipherState(temp_k1[:KEYLEN]), CipherState(temp_k2[:KEYLEN])

    def copy(self) -> SymmetricState:
        """An independent copy, used to undo a message that failed half-way."""
        clone = SymmetricState.__new__(SymmetricState)
        clone._ck = self._ck
        clone._h = self._h
        clone._cipher = self._cipher.copy()
        return clone


# --- patterns -----------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakePattern:
    """A handshake pattern as the spec writes it (section 7).

    ``messages[0]`` is sent by the initiator and the senders alternate; the
    pre-message keys are known to the other side before the handshake.
    """

    name: str
    initiator_premessage: tuple[str, ...]
    responder_premessage: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(
        cls, name: str, initiator_pre: str, responder_pre: str, *messages: str
    ) -> HandshakePattern:
        """Build a pattern from the spec's notation, e.g. ``"e, ee, s, es"``."""

        def tokens(text: str) -> tuple[str, ...]:
            out = tuple(t.strip() for t in text.split(",") if t.strip())
            if not set(out) <= _TOKENS:
                raise UsageError(f"pattern {name}: unknown token in {text!r}")
            return out

        return cls(name, tokens(initiator_pre), tokens(responder_pre), tuple(map(tokens, messages)))

    def sends(self, initiator: bool) -> set[str]:
        """Every token the given side writes during the handshake."""
        first = 0 if initiator else 1
        return {t for m in self.messages[first::2] for t in m}


# Spec sections 7.4 (one-way) and 7.5 (interactive), in the spec's notation:
# name, initiator pre-message, responder pre-message, then the messages
# (initiator's first, alternating).
PATTERNS: dict[str, HandshakePattern] = {
    p.name: p
    for p in (
        HandshakePattern.parse("N", "", "s", "e, es"),
        HandshakePattern.parse("K", "s", "s", "e, es, ss"),
        HandshakePattern.parse("X", "", "s", "e, es, s, ss"),
        HandshakePattern.parse("NN", "", "", "e", "e, ee"),
        HandshakePattern.parse("NK", "", "s", "e, es", "e, ee"),
        HandshakePattern.parse("NX", "", "", "e", "e, ee, s, es"),
        HandshakePattern.parse("KN", "s", "", "e", "e, ee, se"),
        HandshakePattern.parse("KK", "s", "s", "e, es, ss", "e, ee, se"),
        HandshakePattern.parse("KX", "s", "", "e", "e, ee, se, s, es"),
        HandshakePattern.parse("XN", "", "", "e", "e, ee", "s, se"),
        HandshakePattern.parse("XK", "", "s", "e, es", "e, ee", "s, se"),
        HandshakePattern.parse("XX", "", "", "e", "e, ee, s, es", "s, se"),
        HandshakePattern.parse("IN", "", "", "e, s", "e, ee, se"),
        HandshakePattern.parse("IK", "", "s", "e, es, s, ss", "e, ee, se"),
        HandshakePattern.parse("IX", "", "", "e, s", "e, ee, se, s, es"),
    )
}


# --- HandshakeState -----------------------------------------------------------------


class HandshakeState:
    """One side of a Noise handshake (spec section 5.3).

    Call :meth:`write_message` and :meth:`read_message` in the pattern's
    order; when :attr:`complete` is true, :meth:`split` gives the transport
    CipherStates.

    A message that fails (too short, forged, low-order key) raises
    HandshakeError and leaves the state exactly as it was, as if the message
    had never arrived.  The spec would abandon the handshake instead; undoing
    lets a datagram transport drop an injected or corrupted packet and still
    accept the genuine one.  A caller that prefers the spec's behaviour simply
    discards the object on error.
    """

    def __init__(
        self,
        pattern: str,
        initiator: bool,
        prologue: bytes,
        *,
        s: bytes | X25519PrivateKey | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
    ) -> None:
        """Initialize (spec section 5.3).

        ``pattern`` is a name from :data:`PATTERNS` ("XX"), ``prologue`` is
        data both sides must agree on (it is hashed, never sent).  Keys are
        raw 32 bytes: ``s`` our static private key (or its key object, see
        :func:`x25519_private_key`), ``rs`` the remote static
        public key when the pattern has it as a pre-message (NK, KK, XK, IK).
        ``e`` fixes our ephemeral private key and exists only for test
        vectors: reusing an ephemeral destroys forward secrecy.  ``re`` is the
        remote ephemeral for patterns with an ephemeral pre-message (none of
        the built-in ones).
        """
        try:
            self._pattern = PATTERNS[pattern]
        except KeyError:
            raise UsageError(
                f"unknown Noise pattern {pattern!r}; supported: {', '.join(PATTERNS)}"
            ) from None
        self._initiator = bool(initiator)
        self._protocol_name = f"Noise_{pattern}_25519_ChaChaPoly_SHA256"
        self._s = None if s is None else _private_key(s, "static private key")
        self._s_pub = None if self._s is None else self._s.public_key().public_bytes_raw()
        self._e = None if e is None else _private_key(e, "ephemeral private key")
        self._rs = _public_key(rs, "remote static key")
        self._re = _public_key(re, "remote ephemeral key")
        self._index = 0  # next message in self._pattern.messages
        self._split: tuple[CipherState, CipherState] | None = None
        self._check_keys()

        self._symmetric = SymmetricState(self._protocol_name.encode("ascii"))
        self._symmetric.mix_hash(bytes(prologue))
        # Pre-message keys: the initiator's first, each side's in listed order.
        for owner_is_initiator, tokens in (
            (True, self._pattern.initiator_premessage),
            (False, self._pattern.responder_premessage),
        ):
            local = owner_is_initiator == self._initiator
            for token in tokens:
                self._symmetric.mix_hash(self._key_public(token, local))

    def _check_keys(self) -> None:
        """Refuse at construction what would otherwise fail mid-handshake."""
        p = self._pattern
        local_pre, remote_pre = (
            (p.initiator_premessage, p.responder_premessage)
            if self._initiator
            else (p.responder_premessage, p.initiator_premessage)
        )
        if ("s" in local_pre or "s" in p.sends(self._initiator)) and self._s is None:
            raise UsageError(f"{p.name} needs our static key s")
        if "e" in local_pre and self._e is None:
            raise UsageError(f"{p.name} needs our ephemeral key e as a pre-message")
        for token, remote in (("s", self._rs), ("e", self._re)):
            if token in remote_pre and remote is None:
                raise UsageError(f"{p.name} needs the remote key r{token} in advance")
            if token not in remote_pre and remote is not None:
                raise UsageError(f"{p.name} does not take r{token} in advance")

    # --- public state ---

    @property
    def protocol_name(self) -> str:
        """The full Noise protocol name, e.g. ``Noise_XX_25519_ChaChaPoly_SHA256``."""
        return self._protocol_name

    @property
    def initiator(self) -> bool:
        """True for the side that sends the first message."""
        return self._initiator

    @property
    def complete(self) -> bool:
        """True once every message of the pattern has been written or read."""
        return self._split is not None

    @property
    def handshake_hash(self) -> bytes:
        """``h``; after completion, a unique channel binding for this session."""
        return self._symmetric.handshake_hash

    @property
    def remote_static(self) -> bytes | None:
        """The remote's raw 32-byte static public key, once known.

        Authenticated only once the handshake completes: the caller must
        still check that it belongs to the expected peer.
        """
        return self._rs

    @property
    def local_static_public(self) -> bytes | None:
        """Our raw 32-byte static public key (None if we have no static key)."""
        return self._s_pub

    def is_my_turn(self) -> bool:
        """True if the next call must be write_message (False when complete)."""
        return not self.complete and (self._index % 2 == 0) == self._initiator

    # --- messages ---

    def write_message(self, payload: bytes) -> bytes:
        """Build the next handshake message, carrying ``payload`` (encrypted once a key exists).

        Raises HandshakeError out of turn, and MessageTooLargeError if the
        message would exceed 65535 bytes (state unchanged in both cases).
        """
        tokens = self._next_tokens(writing=True)
        saved = self._save()
        try:
            out = bytearray()
            for token in tokens:
                if token == "e":
                    if self._e is None:
                        self._e = X25519PrivateKey.generate()
                    e_pub = self._e.public_key().public_bytes_raw()
                    out += e_pub
                    self._symmetric.mix_hash(e_pub)
                elif token == "s":
                    assert self._s_pub is not None  # _check_keys
                    out += self._symmetric.encrypt_and_hash(self._s_pub)
                else:
                    self._symmetric.mix_key(self._dh(token))
            out += self._symmetric.encrypt_and_hash(payload)
            if len(out) > MAX_MESSAGE_LEN:
                raise MessageTooLargeError(
                    f"Noise message would be {len(out)} bytes, limit {MAX_MESSAGE_LEN}"
                )
        except BaseException:
            self._restore(saved)
            raise
        self._advance()
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; return its payload.

        Raises HandshakeError (state unchanged) if the message is out of
        turn, truncated, oversized, forged or carries a low-order key.
        """
        tokens = self._next_tokens(writing=False)
        message = bytes(message)
        if len(message) > MAX_MESSAGE_LEN:
            raise HandshakeError(f"Noise message of {len(message)} bytes exceeds {MAX_MESSAGE_LEN}")
        saved = self._save()
        try:
            pos = 0

            def take(n: int) -> bytes:
                nonlocal pos
                if len(message) - pos < n:
                    raise HandshakeError(f"truncated Noise message ({len(message)} bytes)")
                pos += n
                return message[pos - n : pos]

            for token in tokens:
                if token == "e":
                    self._re = take(DHLEN)
                    self._symmetric.mix_hash(self._re)
                elif token == "s":
                    size = DHLEN + (TAGLEN if self._symmetric.has_key() else 0)
                    self._rs = self._symmetric.decrypt_and_hash(take(size))
                else:
                    self._symmetric.mix_key(self._dh(token))
            if self._symmetric.has_key() and len(message) - pos < TAGLEN:
                raise HandshakeError(
                    f"truncated Noise message ({len(message)} bytes): no payload tag"
                )
            payload = self._symmetric.decrypt_and_hash(message[pos:])
        except BaseException:
            self._restore(saved)
            raise
        self._advance()
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """The transport CipherStates: (initiator-to-responder, responder-to-initiator).

        The same order on both sides: the initiator sends with the first, the
        responder with the second.  Every call returns the same two objects,
        so a second call cannot hand out a nonce twice.
        """
        if self._split is None:
            raise HandshakeError("split() before the handshake is complete")
        return self._split

    # --- internals ---

    def _next_tokens(self, writing: bool) -> tuple[str, ...]:
        if self._split is not None:
            raise HandshakeError("handshake already complete")
        if writing != self.is_my_turn():
            expected = "write" if self.is_my_turn() else "read"
            raise HandshakeError(f"out of turn: expected to {expected} message {self._index + 1}")
        return self._pattern.messages[self._index]

    def _advance(self) -> None:
        self._index += 1
        if self._index == len(self._pattern.messages):
            self._split = self._symmetric.split()
            self._e = None  # the ephemeral is no longer needed: drop it

    def _save(self) -> tuple[SymmetricState, X25519PrivateKey | None, bytes | None, bytes | None]:
        return self._symmetric.copy(), self._e, self._re, self._rs

    def _restore(
        self, saved: tuple[SymmetricState, X25519PrivateKey | None, bytes | None, bytes | None]
    ) -> None:
        self._symmetric, self._e, self._re, self._rs = saved

    def _key_public(self, token: str, local: bool) -> bytes:
        """The public key a pre-message token names."""
        if local:
            private = self._s if token == "s" else self._e
            assert private is not None  # _check_keys
            return private.public_key().public_bytes_raw()
        remote = self._rs if token == "s" else self._re
        assert remote is not None  # _check_keys
        return remote

    def _dh(self, token: str) -> bytes:
        """DH for a token such as "es": the first letter is the initiator's key."""
        local, remote = (token[0], token[1]) if self._initiator else (token[1], token[0])
        private = self._e if local == "e" else self._s
        public = self._re if remote == "e" else self._rs
        if private is None or public is None:  # only if a pattern were malformed
            raise HandshakeError(f"token {token!r}: a key is missing")
        return _dh(private, public)

    def __repr__(self) -> str:
        role = "initiator" if self._initiator else "responder"
        return f"<HandshakeState {self._protocol_name} {role} message={self._index} complete={self.complete}>"
