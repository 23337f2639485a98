"""Generate tests/vectors/msgnet_v1.json: msgnet's own wire test vectors, in the discv5 style.

Fixed inputs (identity seeds, Noise static keys, ephemerals, indices,
addresses, cookie secret) go in; the exact bytes of every packet type of
docs/wire.md section 2 and the derived session keys come out, so another
implementation can check itself packet by packet.  Handshake packets come
from msgnet.core.handshake; DATA is sealed here straight with
ChaCha20-Poly1305 as wire.md 2.2 describes, and the FINISH frames are
encoded by hand from wire.md 3, so neither depends on msgnet's own codecs.
tests/test_vectors.py regenerates every packet from the recorded inputs.

Usage: python scripts/make_vectors.py [output.json]
"""

from __future__ import annotations

import hmac
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing msgnet

from msgnet.core.handshake import (  # noqa: E402
    NOISE_PROTOCOL,
    PROLOGUE,
    SIGNATURE_PREFIX,
    Handshaker,
    SessionEstablished,
)
from msgnet.core.noise import x25519_public  # noqa: E402
from msgnet.identity import KeyPair, encode_public_key_protobuf  # noqa: E402

OUTPUT = ROOT / "tests" / "vectors" / "msgnet_v1.json"


@dataclass(frozen=True)
class End:
    """The fixed inputs of one end of the handshake."""

    identity_seed: bytes
    static_private: bytes
    ephemeral_private: bytes
    local_index: int
    address: tuple[str, int]
    transport_ids: tuple[int, ...]


# Inputs: byte ramps, so another implementation can type them in.
INITIATOR = End(
    identity_seed=bytes(range(0x00, 0x20)),
    static_private=bytes(range(0x40, 0x60)),
    ephemeral_private=bytes(range(0x80, 0xA0)),
    local_index=0x0A0B0C0D,
    address=("192.0.2.1", 4001),
    transport_ids=(1,),
)
RESPONDER = End(
    identity_seed=bytes(range(0x20, 0x40)),
    static_private=bytes(range(0x60, 0x80)),
    ephemeral_private=bytes(range(0xA0, 0xC0)),
    local_index=0x01020304,
    address=("198.51.100.2", 4001),
    transport_ids=(1, 2),
)
COOKIE_SECRET = bytes(range(0xC0, 0xE0))

# One INIT frame (wire.md 3.1, 3.2), written out field by field:
#   01                        type INIT
#   18                        length 24 (varint)
#   0001                      transport_id 1
#   0e 2f6d73676e65742f6563686f2f31   protocol_length 14, "/msgnet/echo/1"
#   00                        protocol_int 0
#   00                        message flags: none
#   68656c6c6f                payload "hello"
FINISH_FRAMES = bytes.fromhex("011800010e2f6d73676e65742f6563686f2f31000068656c6c6f")
# A PING frame (wire.md 3.5): 07, length 4, data "ping".
DATA_FRAMES = bytes.fromhex("070470696e67")


class Script:
    """random_bytes that hands out fixed values in order (the Handshaker's only randomness)."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self._values.pop(0)
        assert len(value) == n, (len(value), n)
        return value


def handshaker(side: End, *randomness: bytes, **options: Any) -> Handshaker:
    return Handshaker(
        KeyPair.from_seed(side.identity_seed),
        static_key=side.static_private,
        transport_ids=side.transport_ids,
        random_bytes=Script(*randomness),
        **options,
    )


def seal_data(key: bytes, receiver_index: int, counter: int, payload: bytes) -> bytes:
    """DATA (wire.md 2.2): header as AD, nonce = 4 zero bytes || counter u64 little-endian."""
    header = bytes((0x07,)) + receiver_index.to_bytes(4, "big") + counter.to_bytes(8, "big")
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return header + ChaCha20Poly1305(key).encrypt(nonce, payload, header)


def describe(side: End) -> dict[str, Any]:
    keypair = KeyPair.from_seed(side.identity_seed)
    return {
        "identity_seed": side.identity_seed.hex(),
        "identity_public_key": keypair.public_key_bytes.hex(),
        "identity_key_protobuf": encode_public_key_protobuf(keypair.public_key_bytes).hex(),
        "peer_id": str(keypair.peer_id),
        "static_private": side.static_private.hex(),
        "static_public": x25519_public(side.static_private).hex(),
        "ephemeral_private": side.ephemeral_private.hex(),
        "ephemeral_public": x25519_public(side.ephemeral_private).hex(),
        "local_index": side.local_index,
        "address": list(side.address),
        "transport_ids": list(side.transport_ids),
        "plaintext": False,
    }


def generate() -> dict[str, Any]:
    initiator = handshaker(INITIATOR, INITIATOR.ephemeral_private)
    responder = handshaker(RESPONDER, RESPONDER.ephemeral_private)
    i_addr, r_addr = INITIATOR.address, RESPONDER.address

    [(initiation, _)] = initiator.initiate(
        r_addr,
        0.0,
        local_index=INITIATOR.local_index,
        peer_id=responder.peer_id,
        take_frames=lambda budget: FINISH_FRAMES,
    )
    out = responder.handle_packet(
        initiation, i_addr, 0.0, allocate_index=lambda: RESPONDER.local_index
    )
    [(response, _)] = out.datagrams
    out = initiator.handle_packet(response, r_addr, 0.05, allocate_index=lambda: 0)
    [(finish, _)] = out.datagrams
    [dialer_session] = out.events
    assert isinstance(dialer_session, SessionEstablished)
    out = responder.handle_packet(finish, i_addr, 0.1, allocate_index=lambda: 0)
    [listener_session] = out.events
    assert isinstance(listener_session, SessionEstablished)
    assert listener_session.frames == FINISH_FRAMES
    assert dialer_session.send_key == listener_session.recv_key

    data = seal_data(dialer_session.send_key, RESPONDER.local_index, 0, DATA_FRAMES)
    confirmation = seal_data(listener_session.send_key, INITIATOR.local_index, 0, b"")

    # Under require_cookie the responder answers COOKIE first; the echo then gets the same RESPONSE.
    guarded = handshaker(RESPONDER, COOKIE_SECRET, RESPONDER.ephemeral_private, require_cookie=True)
    [(cookie, _)] = guarded.handle_packet(
        initiation, i_addr, 0.0, allocate_index=lambda: 0
    ).datagrams
    redialer = handshaker(INITIATOR, INITIATOR.ephemeral_private)
    redialer.initiate(r_addr, 0.0, local_index=INITIATOR.local_index)
    [(echoed, _)] = redialer.handle_packet(cookie, r_addr, 0.0, allocate_index=lambda: 0).datagrams
    out = guarded.handle_packet(echoed, i_addr, 0.0, allocate_index=lambda: RESPONDER.local_index)
    assert out.datagrams == [(response, i_addr)]

    version_2 = initiation[:1] + b"\x02" + initiation[2:]
    out = responder.handle_packet(version_2, i_addr, 0.0, allocate_index=lambda: 0)
    [(version_unsupported, _)] = out.datagrams
    session_unknown = responder.answer_unknown_session(data, i_addr, 0.0)
    assert session_unknown is not None

    cookie_input = bytes((192, 0, 2, 1)) + i_addr[1].to_bytes(2, "big") + initiation[2:6]
    assert cookie[5:] == hmac.digest(COOKIE_SECRET, cookie_input, "sha256")[:16]

    return {
        "description": (
            "msgnet wire v1 test vectors (docs/wire.md section 2). Every packet is the exact "
            "UDP payload; integers are decimal, byte strings hex. See tests/vectors/README.md."
        ),
        "noise_protocol": NOISE_PROTOCOL,
        "prologue": PROLOGUE.hex(),
        "signature_prefix": SIGNATURE_PREFIX.hex(),
        "initiator": describe(INITIATOR) | {"handshake_payload": initiator.handshake_payload.hex()},
        "responder": describe(RESPONDER) | {"handshake_payload": responder.handshake_payload.hex()},
        "session": {
            "handshake_hash": dialer_session.handshake_hash.hex(),
            "initiator_to_responder_key": dialer_session.send_key.hex(),
            "responder_to_initiator_key": dialer_session.recv_key.hex(),
        },
        "packets": {
            "initiation": {
                "hex": initiation.hex(),
                "note": "type 04, version 01, sender_index, 16 zero cookie bytes, e, "
                "zero padding to 160 bytes (Noise message 1 payload, cleartext)",
            },
            "response": {
                "hex": response.hex(),
                "note": "type 05, sender_index (responder), receiver_index (initiator), "
                "Noise message 2: e, encrypted s, encrypted responder handshake payload",
            },
            "finish": {
                "hex": finish.hex(),
                "frames": FINISH_FRAMES.hex(),
                "note": "type 06, receiver_index (responder), Noise message 3: encrypted s, "
                "encrypted (payload_length varint | initiator handshake payload | frames)",
            },
            "data": {
                "hex": data.hex(),
                "key": "initiator_to_responder_key",
                "receiver_index": RESPONDER.local_index,
                "counter": 0,
                "plaintext": DATA_FRAMES.hex(),
                "note": "initiator to responder, one PING frame",
            },
            "confirmation": {
                "hex": confirmation.hex(),
                "key": "responder_to_initiator_key",
                "receiver_index": INITIATOR.local_index,
                "counter": 0,
                "plaintext": "",
                "note": "the responder's answer to FINISH: an empty DATA packet",
            },
            "cookie": {
                "hex": cookie.hex(),
                "secret": COOKIE_SECRET.hex(),
                "hmac_input": cookie_input.hex(),
                "note": "answer to the INITIATION by a responder under load: "
                "HMAC-SHA256(secret, ip | port u16 | sender_index)[0:16]",
            },
            "initiation_with_cookie": {
                "hex": echoed.hex(),
                "note": "the same INITIATION re-sent with the cookie; it is answered "
                "with exactly the RESPONSE above",
            },
            "version_unsupported": {
                "hex": version_unsupported.hex(),
                "answers": version_2.hex(),
                "note": "answer to the INITIATION with its version byte set to 2",
            },
            "session_unknown": {
                "hex": session_unknown.hex(),
                "note": "answer to the DATA packet above by a receiver that lost the session",
            },
        },
    }


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    path.write_text(json.dumps(generate(), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
