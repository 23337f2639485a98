"""Cost of one Noise XX handshake, both sides in memory (msgnet.core.noise).

This is the CPU price of every new authenticated session: per side, three
X25519 agreements and two public-key derivations, plus the hashing around them.  Static keys are made once,
outside the timing; ephemerals are generated inside it, as in real use.

Run: PYTHONPATH=. python -m pytest benchmarks/bench_noise.py
"""

from __future__ import annotations

from typing import Any

from msgnet.core.noise import HandshakeState, generate_x25519


def _xx_handshake(initiator_static: bytes, responder_static: bytes) -> bytes:
    initiator = HandshakeState("XX", True, b"", s=initiator_static)
    responder = HandshakeState("XX", False, b"", s=responder_static)
    responder.read_message(initiator.write_message(b""))
    initiator.read_message(responder.write_message(b""))
    responder.read_message(initiator.write_message(b""))
    initiator.split()
    responder.split()
    return initiator.handshake_hash


def test_bench_xx_handshake(benchmark: Any) -> None:
    initiator_static, responder_static = generate_x25519(), generate_x25519()
    handshake_hash = benchmark(_xx_handshake, initiator_static, responder_static)
    assert len(handshake_hash) == 32
