"""Tests for msgnet.core.noise: cacophony vectors byte for byte, then tampering and misuse."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from msgnet.core.noise import (
    MAX_NONCE,
    PATTERNS,
    CipherState,
    HandshakeState,
    generate_x25519,
    hkdf,
    x25519_public,
)
from msgnet.errors import HandshakeError, MessageTooLargeError, UsageError

VECTOR_FILE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "vectors"
    / "noise_cacophony_25519_chachapoly_sha256.json"
)
VECTOR_PATTERNS = ["NN", "NK", "KK", "XK", "XX", "IK"]

Vector = dict[str, Any]


@pytest.fixture(scope="module")
def vectors() -> dict[str, Vector]:
    """The cacophony vectors by pattern name; a missing file is a broken setup, not a skip."""
    if not VECTOR_FILE.is_file():
        pytest.fail(
            f"Noise test vectors not found at {VECTOR_FILE}: check out shared/ beside the "
            "repository (see shared/vectors/README.md)",
            pytrace=False,
        )
    data = json.loads(VECTOR_FILE.read_text())
    return {v["protocol_name"].split("_")[1]: v for v in data["vectors"]}


def _hex(vector: Vector, key: str) -> bytes | None:
    return bytes.fromhex(vector[key]) if key in vector else None


def _parties(vector: Vector) -> tuple[HandshakeState, HandshakeState]:
    pattern = vector["protocol_name"].split("_")[1]
    initiator = HandshakeState(
        pattern,
        True,
        _hex(vector, "init_prologue") or b"",
        s=_hex(vector, "init_static"),
        e=_hex(vector, "init_ephemeral"),
        rs=_hex(vector, "init_remote_static"),
    )
    responder = HandshakeState(
        pattern,
        False,
        _hex(vector, "resp_prologue") or b"",
        s=_hex(vector, "resp_static"),
        e=_hex(vector, "resp_ephemeral"),
        rs=_hex(vector, "resp_remote_static"),
    )
    return initiator, responder


def _messages(vector: Vector) -> list[tuple[bytes, bytes]]:
    return [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in vector["messages"]
    ]


def _handshake_length(vector: Vector) -> int:
    return len(PATTERNS[vector["protocol_name"].split("_")[1]].messages)


# --- vectors --------------------------------------------------------------------------


def test_vector_file_has_exactly_the_expected_patterns(vectors: dict[str, Vector]) -> None:
    assert sorted(vectors) == sorted(VECTOR_PATTERNS)


@pytest.mark.parametrize("pattern", VECTOR_PATTERNS)
def test_cacophony_vector(vectors: dict[str, Vector], pattern: str) -> None:
    vector = vectors[pattern]
    initiator, responder = _parties(vector)
    assert initiator.protocol_name == responder.protocol_name == vector["protocol_name"]
    transport: tuple[CipherState, CipherState, CipherState, CipherState] | None = None
    for index, (payload, ciphertext) in enumerate(_messages(vector)):
        from_initiator = index % 2 == 0
        sender, receiver = (initiator, responder) if from_initiator else (responder, initiator)
        if not sender.complete:
            assert sender.write_message(payload).hex() == ciphertext.hex(), f"message {index}"
            assert receiver.read_message(ciphertext) == payload
            continue
        if transport is None:
            i_send, i_recv = initiator.split()
            r_recv, r_send = responder.split()
            transport = (i_send, i_recv, r_recv, r_send)
        i_send, i_recv, r_recv, r_send = transport
        send, recv = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        assert send.encrypt_with_ad(b"", payload).hex() == ciphertext.hex(), f"message {index}"
        assert recv.decrypt_with_ad(b"", ciphertext) == payload
    assert transport is not None, "vector has no transport messages"
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash.hex() == vector["handshake_hash"]
    assert responder.handshake_hash == initiator.handshake_hash


@pytest.mark.parametrize("pattern", VECTOR_PATTERNS)
def test_static_keys_are_exposed(vectors: dict[str, Vector], pattern: str) -> None:
    vector = vectors[pattern]
    initiator, responder = _parties(vector)
    for index, (payload, _) in enumerate(_messages(vector)[: _handshake_length(vector)]):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        receiver.read_message(sender.write_message(payload))
    for side, other in ((initiator, responder), (responder, initiator)):
        assert side.remote_static == other.local_static_public
    if "resp_static" in vector:
        assert responder.local_static_public == x25519_public(bytes.fromhex(vector["resp_static"]))


# --- tampering ------------------------------------------------------------------------


def _run_tampered(
    vector: Vector, target: int, tamper: Callable[[bytes], bytes]
) -> tuple[int | None, HandshakeState, HandshakeState, bytes]:
    """Run the handshake, altering message ``target`` in transit.

    Returns the index of the message whose read raised HandshakeError (None
    if none did), both parties, and the untampered message ``target``.
    """
    initiator, responder = _parties(vector)
    original = b""
    for index, (payload, _) in enumerate(_messages(vector)[: _handshake_length(vector)]):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        message = sender.write_message(payload)
        if index == target:
            original, message = message, tamper(message)
        try:
            receiver.read_message(message)
        except HandshakeError:
            return index, initiator, responder, original
    return None, initiator, responder, original


def _authenticated(vector: Vector, index: int) -> bool:
    """True if message ``index`` is read under a key (a DH came before or in it)."""
    pattern = PATTERNS[vector["protocol_name"].split("_")[1]]
    return any(t in ("ee", "es", "se", "ss") for m in pattern.messages[: index + 1] for t in m)


def _tamper_cases(patterns: list[str]) -> list[tuple[str, int]]:
    """(pattern, handshake message index) for every handshake message."""
    return [(p, i) for p in patterns for i in range(len(PATTERNS[p].messages))]


@pytest.mark.parametrize(("pattern", "target"), _tamper_cases(VECTOR_PATTERNS))
def test_flipped_bit_is_rejected(vectors: dict[str, Vector], pattern: str, target: int) -> None:
    """Every byte, one bit each (bit = position mod 8, so bit 255 of a key is covered).

    A message read under a key fails at once and leaves the reader untouched,
    so the genuine message is still accepted afterwards.  A message sent
    before any DH (NN's and XX's first) cannot be checked on arrival; its
    corruption is in ``h`` and the next message fails instead.
    """
    vector = vectors[pattern]
    length = len(_messages(vector)[target][1])
    for position in range(length):

        def flip(message: bytes, position: int = position) -> bytes:
            return (
                message[:position]
                + bytes((message[position] ^ (1 << position % 8),))
                + message[position + 1 :]
            )

        failed_at, initiator, responder, original = _run_tampered(vector, target, flip)
        if _authenticated(vector, target):
            assert failed_at == target, f"bit flip at byte {position} accepted"
            receiver = responder if target % 2 == 0 else initiator
            receiver.read_message(original)  # state was restored
        else:
            assert failed_at == target + 1, f"bit flip at byte {position} never detected"


@pytest.mark.parametrize(("pattern", "target"), _tamper_cases(VECTOR_PATTERNS))
def test_truncated_message_is_rejected(
    vectors: dict[str, Vector], pattern: str, target: int
) -> None:
    vector = vectors[pattern]
    length = len(_messages(vector)[target][1])
    for cut in sorted({0, 1, 31, 32, 47, 48, 63, 64, 80, length - 16, length - 1}):
        if not 0 <= cut < length:
            continue

        def truncate(message: bytes, cut: int = cut) -> bytes:
            return message[:cut]

        failed_at, initiator, responder, original = _run_tampered(vector, target, truncate)
        # Unauthenticated payloads have no length of their own: a cut inside one
        # surfaces at the next message, like a flipped bit.
        assert failed_at is not None, f"truncation to {cut} bytes accepted"
        assert failed_at == target or (
            not _authenticated(vector, target) and failed_at == target + 1
        )
        if failed_at == target:
            receiver = responder if target % 2 == 0 else initiator
            receiver.read_message(original)


def test_oversized_message_is_rejected() -> None:
    responder = HandshakeState("NN", False, b"")
    with pytest.raises(HandshakeError):
        responder.read_message(bytes(65536))
    initiator = HandshakeState("NN", True, b"")
    with pytest.raises(MessageTooLargeError):
        initiator.write_message(bytes(65535 - 32 + 1))
    assert len(initiator.write_message(bytes(65535 - 32))) == 65535  # state survived the refusal


def test_low_order_ephemeral_is_rejected() -> None:
    responder = HandshakeState("NN", False, b"")
    responder.read_message(bytes(32))  # the zero point: nothing to check yet in NN's first message
    with pytest.raises(HandshakeError):
        responder.write_message(b"")  # ee with a low-order key


# --- turns and misuse -----------------------------------------------------------------


def test_wrong_turn() -> None:
    s_i, s_r = generate_x25519(), generate_x25519()
    initiator = HandshakeState("XX", True, b"", s=s_i)
    responder = HandshakeState("XX", False, b"", s=s_r)
    with pytest.raises(HandshakeError):
        responder.write_message(b"")
    with pytest.raises(HandshakeError):
        initiator.read_message(bytes(48))
    with pytest.raises(HandshakeError):
        initiator.split()
    message = initiator.write_message(b"")
    with pytest.raises(HandshakeError):
        initiator.write_message(b"")  # twice in a row
    responder.read_message(message)
    with pytest.raises(HandshakeError):
        responder.read_message(message)  # replayed: now it is the responder's turn to write
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    assert initiator.complete and responder.complete
    for side in (initiator, responder):
        assert not side.is_my_turn()
        with pytest.raises(HandshakeError):
            side.write_message(b"")
        with pytest.raises(HandshakeError):
            side.read_message(message)
    assert initiator.split() is initiator.split()  # one pair, so no nonce is handed out twice


def test_bad_arguments() -> None:
    key = generate_x25519()
    with pytest.raises(UsageError):
        HandshakeState("ZZ", True, b"")
    with pytest.raises(UsageError):
        HandshakeState("XX", True, b"")  # XX sends our static: s required
    with pytest.raises(UsageError):
        HandshakeState("IK", True, b"", s=key)  # rs is a pre-message
    with pytest.raises(UsageError):
        HandshakeState("XX", True, b"", s=key, rs=x25519_public(key))  # rs arrives in the handshake
    with pytest.raises(UsageError):
        HandshakeState("NN", True, b"", e=bytes(31))
    with pytest.raises(UsageError):
        x25519_public(bytes(33))


# --- every built-in pattern, both directions --------------------------------------------


def _handshake(pattern: str, prologue: bytes = b"p") -> tuple[HandshakeState, HandshakeState]:
    """Complete a handshake between fresh parties, checking each payload arrives."""
    p = PATTERNS[pattern]
    s_i, s_r = generate_x25519(), generate_x25519()
    initiator = HandshakeState(
        pattern,
        True,
        prologue,
        s=s_i,
        rs=x25519_public(s_r) if "s" in p.responder_premessage else None,
    )
    responder = HandshakeState(
        pattern,
        False,
        prologue,
        s=s_r,
        rs=x25519_public(s_i) if "s" in p.initiator_premessage else None,
    )
    for index in range(len(p.messages)):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        assert sender.is_my_turn() and not receiver.is_my_turn()
        payload = f"message {index}".encode()
        assert receiver.read_message(sender.write_message(payload)) == payload
    return initiator, responder


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_pattern_agrees(pattern: str) -> None:
    initiator, responder = _handshake(pattern)
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    initiator_known = pattern[0] != "N"  # N, NN, NK, NX: the initiator has no static
    responder_known = len(pattern) == 1 or pattern[1] != "N"  # one-way: a pre-message
    assert responder.remote_static == (initiator.local_static_public if initiator_known else None)
    assert initiator.remote_static == (responder.local_static_public if responder_known else None)
    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    assert (
        r_recv.decrypt_with_ad(b"ad", i_send.encrypt_with_ad(b"ad", b"to responder"))
        == b"to responder"
    )
    assert (
        i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"to initiator")) == b"to initiator"
    )
    assert i_send.key == r_recv.key != i_recv.key == r_send.key


def test_prologue_mismatch_fails() -> None:
    initiator = HandshakeState("NN", True, b"one")
    responder = HandshakeState("NN", False, b"two")
    responder.read_message(initiator.write_message(b""))
    with pytest.raises(HandshakeError):
        initiator.read_message(responder.write_message(b""))


@settings(max_examples=50, deadline=None)
@given(
    prologue=st.binary(max_size=64),
    handshake_payloads=st.lists(st.binary(max_size=512), min_size=3, max_size=3),
    transport=st.lists(
        st.tuples(st.booleans(), st.binary(max_size=2048), st.binary(max_size=32)), max_size=12
    ),
)
def test_xx_random_payloads_round_trip(
    prologue: bytes, handshake_payloads: list[bytes], transport: list[tuple[bool, bytes, bytes]]
) -> None:
    initiator = HandshakeState("XX", True, prologue, s=generate_x25519())
    responder = HandshakeState("XX", False, prologue, s=generate_x25519())
    for index, payload in enumerate(handshake_payloads):
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        assert receiver.read_message(sender.write_message(payload)) == payload
    assert initiator.complete and responder.complete
    assert initiator.handshake_hash == responder.handshake_hash
    assert initiator.remote_static == responder.local_static_public
    assert responder.remote_static == initiator.local_static_public
    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    for from_initiator, payload, ad in transport:
        send, recv = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        ciphertext = send.encrypt_with_ad(ad, payload)
        assert len(ciphertext) == len(payload) + 16
        assert recv.decrypt_with_ad(ad, ciphertext) == payload


# --- CipherState and HKDF against the primitives directly --------------------------------


def test_cipher_nonce_format_and_rekey() -> None:
    key = bytes(range(32))
    aead = ChaCha20Poly1305(key)
    cipher = CipherState(key)
    cipher.set_nonce(0x0102030405060708)
    nonce = b"\x00" * 4 + bytes.fromhex("0807060504030201")  # 4 zero bytes || LE64(n)
    assert cipher.encrypt_with_ad(b"ad", b"hello") == aead.encrypt(nonce, b"hello", b"ad")
    assert cipher.nonce == 0x0102030405060709
    cipher.rekey()
    expected = aead.encrypt(b"\x00" * 4 + b"\xff" * 8, bytes(32), b"")[:32]
    assert cipher.key == expected
    assert cipher.nonce == 0x0102030405060709  # rekey keeps n


def test_cipher_without_key_is_identity() -> None:
    cipher = CipherState()
    assert cipher.key is None and not cipher.has_key()
    assert cipher.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.nonce == 0


def test_cipher_failed_decrypt_keeps_nonce() -> None:
    send, recv = CipherState(bytes(32)), CipherState(bytes(32))
    ciphertext = send.encrypt_with_ad(b"", b"x")
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"", ciphertext[:-1] + bytes((ciphertext[-1] ^ 1,)))
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"other ad", ciphertext)
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"", ciphertext[:15])
    assert recv.nonce == 0
    assert recv.decrypt_with_ad(b"", ciphertext) == b"x"


def test_cipher_nonce_exhaustion() -> None:
    send, recv = CipherState(bytes(32)), CipherState(bytes(32))
    send.set_nonce(MAX_NONCE - 1)
    recv.set_nonce(MAX_NONCE - 1)
    ciphertext = send.encrypt_with_ad(b"", b"last")  # 2**64-2 is the last usable nonce
    assert recv.decrypt_with_ad(b"", ciphertext) == b"last"
    with pytest.raises(HandshakeError):
        send.encrypt_with_ad(b"", b"one more")
    with pytest.raises(HandshakeError):
        recv.decrypt_with_ad(b"", ciphertext)
    with pytest.raises(UsageError):
        send.set_nonce(MAX_NONCE + 1)


def test_hkdf_matches_rfc5869() -> None:
    """Noise's HKDF is RFC 5869 with salt = chaining key and empty info."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    ck, ikm = bytes(range(32)), b"input key material"
    expected = HKDF(algorithm=hashes.SHA256(), length=96, salt=ck, info=b"").derive(ikm)
    assert b"".join(hkdf(ck, ikm, 3)) == expected
    assert hkdf(ck, ikm, 2) == hkdf(ck, ikm, 3)[:2]


def test_x25519_helpers() -> None:
    private = generate_x25519()
    assert len(private) == 32 and len(x25519_public(private)) == 32
    # RFC 7748 section 6.1, Alice's key pair.
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert (
        x25519_public(alice).hex()
        == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
