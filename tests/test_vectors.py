"""msgnet's own wire vectors (tests/vectors/msgnet_v1.json, made by scripts/make_vectors.py).

Every packet is regenerated from the inputs recorded in the file and compared
byte for byte, then decoded: the Noise messages by hand with
msgnet.core.noise, the frames and the DATA/COOKIE/SESSION_UNKNOWN/
VERSION_UNSUPPORTED packets with both the compiled codecs and their
pure-Python twins.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from msgnet import _frame_py, _packet_py
from msgnet.core.handshake import (
    NOISE_PROTOCOL,
    PROLOGUE,
    SIGNATURE_PREFIX,
    Handshaker,
    SessionEstablished,
    decode_handshake_payload,
)
from msgnet.core.noise import HandshakeState, x25519_public
from msgnet.identity import KeyPair, encode_public_key_protobuf, verify_signature

try:
    from msgnet import _frame, _packet
except ImportError:
    if not os.environ.get("MSGNET_NO_EXTENSIONS"):
        raise  # a missing extension is a broken build, not a reason to skip
    _frame = _packet = None  # type: ignore[assignment]

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "msgnet_v1.json").read_text()
)
PACKETS: dict[str, dict[str, Any]] = VECTORS["packets"]
SESSION = {name: bytes.fromhex(value) for name, value in VECTORS["session"].items()}
PACKET_IMPLS = [m for m in (_packet, _packet_py) if m is not None]
FRAME_IMPLS = [m for m in (_frame, _frame_py) if m is not None]


def packet(name: str) -> bytes:
    return bytes.fromhex(PACKETS[name]["hex"])


def side(name: str) -> dict[str, Any]:
    """The recorded inputs of one end, byte strings decoded."""
    raw = VECTORS[name]
    return {
        "seed": bytes.fromhex(raw["identity_seed"]),
        "static": bytes.fromhex(raw["static_private"]),
        "ephemeral": bytes.fromhex(raw["ephemeral_private"]),
        "index": raw["local_index"],
        "address": tuple(raw["address"]),
        "transport_ids": tuple(raw["transport_ids"]),
        "raw": raw,
    }


INITIATOR, RESPONDER = side("initiator"), side("responder")


def scripted(*values: bytes) -> Callable[[int], bytes]:
    """random_bytes handing out exactly these values, in order."""
    queue = list(values)

    def random_bytes(n: int) -> bytes:
        value = queue.pop(0)
        assert len(value) == n
        return value

    return random_bytes


def handshaker(end: dict[str, Any], *randomness: bytes, **options: Any) -> Handshaker:
    return Handshaker(
        KeyPair.from_seed(end["seed"]),
        static_key=end["static"],
        transport_ids=end["transport_ids"],
        random_bytes=scripted(*randomness),
        **options,
    )


def fixed(index: int) -> Callable[[], int]:
    return lambda: index


@pytest.fixture(scope="module")
def transcript() -> dict[str, Any]:
    """The recorded handshake, replayed through msgnet.core.handshake."""
    frames = bytes.fromhex(PACKETS["finish"]["frames"])
    initiator = handshaker(INITIATOR, INITIATOR["ephemeral"])
    responder = handshaker(RESPONDER, RESPONDER["ephemeral"])
    [(initiation, _)] = initiator.initiate(
        RESPONDER["address"],
        0.0,
        local_index=INITIATOR["index"],
        peer_id=responder.peer_id,
        take_frames=lambda budget: frames,
    )
    out = responder.handle_packet(
        initiation, INITIATOR["address"], 0.0, allocate_index=fixed(RESPONDER["index"])
    )
    [(response, _)] = out.datagrams
    out = initiator.handle_packet(response, RESPONDER["address"], 0.05, allocate_index=fixed(0))
    [(finish, _)] = out.datagrams
    [dialer] = out.events
    out = responder.handle_packet(finish, INITIATOR["address"], 0.1, allocate_index=fixed(0))
    [listener] = out.events
    return {
        "initiation": initiation,
        "response": response,
        "finish": finish,
        "dialer": dialer,
        "listener": listener,
        "responder": responder,
    }


# --- inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("end", [INITIATOR, RESPONDER], ids=["initiator", "responder"])
def test_recorded_keys_derive_from_the_seeds(end: dict[str, Any]) -> None:
    raw = end["raw"]
    keypair = KeyPair.from_seed(end["seed"])
    assert keypair.public_key_bytes.hex() == raw["identity_public_key"]
    assert (
        encode_public_key_protobuf(keypair.public_key_bytes).hex() == raw["identity_key_protobuf"]
    )
    assert str(keypair.peer_id) == raw["peer_id"]
    assert x25519_public(end["static"]).hex() == raw["static_public"]
    assert x25519_public(end["ephemeral"]).hex() == raw["ephemeral_public"]


@pytest.mark.parametrize("end", [INITIATOR, RESPONDER], ids=["initiator", "responder"])
def test_handshake_payload(end: dict[str, Any]) -> None:
    recorded = bytes.fromhex(end["raw"]["handshake_payload"])
    assert handshaker(end).handshake_payload == recorded
    payload = decode_handshake_payload(recorded)
    assert payload.identity_key.hex() == end["raw"]["identity_key_protobuf"]
    signed = SIGNATURE_PREFIX + bytes.fromhex(end["raw"]["static_public"])
    public = bytes.fromhex(end["raw"]["identity_public_key"])
    assert verify_signature(public, signed, payload.identity_sig)
    assert payload.flags == 0 and payload.transport_ids == end["transport_ids"]


def test_constants() -> None:
    assert VECTORS["noise_protocol"] == NOISE_PROTOCOL
    assert bytes.fromhex(VECTORS["prologue"]) == PROLOGUE == b"msgnet/1"
    assert bytes.fromhex(VECTORS["signature_prefix"]) == SIGNATURE_PREFIX


# --- handshake packets ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["initiation", "response", "finish"])
def test_handshake_packet_regenerates(transcript: dict[str, Any], name: str) -> None:
    assert transcript[name].hex() == PACKETS[name]["hex"]


def test_session_keys(transcript: dict[str, Any]) -> None:
    dialer: SessionEstablished = transcript["dialer"]
    listener: SessionEstablished = transcript["listener"]
    assert dialer.send_key == listener.recv_key == SESSION["initiator_to_responder_key"]
    assert dialer.recv_key == listener.send_key == SESSION["responder_to_initiator_key"]
    assert dialer.handshake_hash == listener.handshake_hash == SESSION["handshake_hash"]
    assert str(dialer.peer_id) == RESPONDER["raw"]["peer_id"]
    assert str(listener.peer_id) == INITIATOR["raw"]["peer_id"]
    assert (dialer.local_index, dialer.remote_index) == (INITIATOR["index"], RESPONDER["index"])
    assert listener.remote_transports == INITIATOR["transport_ids"]
    assert dialer.remote_transports == RESPONDER["transport_ids"]
    assert listener.frames.hex() == PACKETS["finish"]["frames"]


def test_noise_messages_decode_by_hand() -> None:
    """Replay the three Noise messages with bare HandshakeStates, field by field."""
    initiation, response, finish = packet("initiation"), packet("response"), packet("finish")
    assert len(initiation) == 160
    assert (initiation[0], initiation[1]) == (0x04, 1)
    assert int.from_bytes(initiation[2:6], "big") == INITIATOR["index"]
    assert initiation[6:22] == bytes(16)
    assert initiation[22:54].hex() == INITIATOR["raw"]["ephemeral_public"]
    assert response[0] == 0x05
    assert int.from_bytes(response[1:5], "big") == RESPONDER["index"]
    assert int.from_bytes(response[5:9], "big") == INITIATOR["index"]
    assert finish[0] == 0x06 and int.from_bytes(finish[1:5], "big") == RESPONDER["index"]

    prologue = bytes.fromhex(VECTORS["prologue"])
    dialer = HandshakeState("XX", True, prologue, s=INITIATOR["static"], e=INITIATOR["ephemeral"])
    listener = HandshakeState(
        "XX", False, prologue, s=RESPONDER["static"], e=RESPONDER["ephemeral"]
    )
    assert listener.read_message(initiation[22:]) == bytes(160 - 22 - 32)  # zero padding
    assert dialer.write_message(bytes(160 - 22 - 32)) == initiation[22:]
    assert dialer.read_message(response[9:]).hex() == RESPONDER["raw"]["handshake_payload"]
    assert dialer.remote_static.hex() == RESPONDER["raw"]["static_public"]  # type: ignore[union-attr]
    message_2 = listener.write_message(bytes.fromhex(RESPONDER["raw"]["handshake_payload"]))
    assert message_2 == response[9:]
    plain = listener.read_message(finish[5:])
    identity = bytes.fromhex(INITIATOR["raw"]["handshake_payload"])
    assert plain == bytes((len(identity),)) + identity + bytes.fromhex(PACKETS["finish"]["frames"])
    assert listener.handshake_hash == SESSION["handshake_hash"]
    to_responder, to_initiator = listener.split()
    assert to_responder.key == SESSION["initiator_to_responder_key"]
    assert to_initiator.key == SESSION["responder_to_initiator_key"]


@pytest.mark.parametrize("impl", FRAME_IMPLS, ids=lambda m: m.__name__)
def test_finish_frames_decode(impl: ModuleType) -> None:
    [init] = impl.decode_packet(bytes.fromhex(PACKETS["finish"]["frames"]))
    assert (init.transport_id, init.protocol, init.protocol_int) == (1, "/msgnet/echo/1", 0)
    assert init.flags == 0 and bytes(init.payload) == b"hello"


# --- DATA and the stateless packets -----------------------------------------------------


@pytest.mark.parametrize("impl", PACKET_IMPLS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", ["data", "confirmation"])
def test_data_packets_regenerate_and_open(impl: ModuleType, name: str) -> None:
    vector = PACKETS[name]
    key = SESSION[vector["key"]]
    receiver = vector["receiver_index"]
    sender = impl.SessionCrypto(0x99, receiver, key, bytes(32), send_counter=vector["counter"])
    plaintext = bytes.fromhex(vector["plaintext"])
    assert sender.seal(plaintext) == packet(name)
    opener = impl.SessionCrypto(receiver, 0x99, bytes(32), key)
    assert opener.open(packet(name)) == plaintext


@pytest.mark.parametrize("impl", FRAME_IMPLS, ids=lambda m: m.__name__)
def test_data_frames_decode(impl: ModuleType) -> None:
    [ping] = impl.decode_packet(bytes.fromhex(PACKETS["data"]["plaintext"]))
    assert bytes(ping.data) == b"ping"


@pytest.mark.parametrize("impl", PACKET_IMPLS, ids=lambda m: m.__name__)
def test_cookie(impl: ModuleType) -> None:
    initiation, cookie = packet("initiation"), packet("cookie")
    secret = bytes.fromhex(PACKETS["cookie"]["secret"])
    guarded = handshaker(RESPONDER, secret, RESPONDER["ephemeral"], require_cookie=True)
    out = guarded.handle_packet(initiation, INITIATOR["address"], 0.0, allocate_index=fixed(0))
    assert out.datagrams == [(cookie, INITIATOR["address"])]

    receiver_index, value = impl.decode_cookie(cookie)
    assert receiver_index == INITIATOR["index"]
    host, port = INITIATOR["address"]
    hmac_input = bytes(map(int, host.split("."))) + port.to_bytes(2, "big") + initiation[2:6]
    assert hmac_input.hex() == PACKETS["cookie"]["hmac_input"]
    assert value == hmac.digest(secret, hmac_input, "sha256")[:16]

    redialer = handshaker(INITIATOR, INITIATOR["ephemeral"])
    redialer.initiate(RESPONDER["address"], 0.0, local_index=INITIATOR["index"])
    out = redialer.handle_packet(cookie, RESPONDER["address"], 0.0, allocate_index=fixed(0))
    assert out.datagrams == [(packet("initiation_with_cookie"), RESPONDER["address"])]
    out = guarded.handle_packet(
        packet("initiation_with_cookie"),
        INITIATOR["address"],
        0.0,
        allocate_index=fixed(RESPONDER["index"]),
    )
    assert out.datagrams == [(packet("response"), INITIATOR["address"])]


@pytest.mark.parametrize("impl", PACKET_IMPLS, ids=lambda m: m.__name__)
def test_version_unsupported(impl: ModuleType) -> None:
    question = bytes.fromhex(PACKETS["version_unsupported"]["answers"])
    assert question[1] == 2 and question[2:] == packet("initiation")[2:]
    out = handshaker(RESPONDER).handle_packet(
        question, INITIATOR["address"], 0.0, allocate_index=fixed(0)
    )
    assert out.datagrams == [(packet("version_unsupported"), INITIATOR["address"])]
    assert impl.decode_version_unsupported(packet("version_unsupported")) == (
        INITIATOR["index"],
        (1,),
    )


@pytest.mark.parametrize("impl", PACKET_IMPLS, ids=lambda m: m.__name__)
def test_session_unknown(impl: ModuleType) -> None:
    data = packet("data")
    reply = handshaker(RESPONDER).answer_unknown_session(data, INITIATOR["address"], 0.0)
    assert reply == packet("session_unknown")
    assert impl.decode_session_unknown(reply) == (RESPONDER["index"], 0, data[-16:])
