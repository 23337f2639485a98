"""Seal + open of one DATA packet against the bare AEAD it wraps (target: at most 30% more),
with each AEAD backend of this build (msgnet._packet.AEAD_BACKENDS: "openssl" is libcrypto's
EVP linked into _packet, "cryptography" the fallback).

Each round handles PACKETS = 1000 packets in a C loop, so a median in ms reads as µs per
packet. The machine's load drifts between groups of rounds; compare rows of one run. Run:

    PYTHONPATH=. python -m pytest benchmarks/bench_packet.py --benchmark-only -q \
        --benchmark-columns=median,ops
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from msgnet import _packet

PACKETS = 1000
KEY_AB, KEY_BA = bytes(range(32)), bytes(range(32, 64))
SIZES = pytest.mark.parametrize("size", [64, 1200])
BACKENDS = pytest.mark.parametrize("backend", getattr(_packet, "AEAD_BACKENDS", ("cryptography",)))


@pytest.fixture
def use_backend(backend):
    """Run the test on one AEAD backend, then restore the default."""
    if not hasattr(_packet, "set_aead_backend"):
        yield
        return
    previous = _packet.set_aead_backend(backend)
    try:
        yield
    finally:
        _packet.set_aead_backend(previous)


def _pair():
    return (
        _packet.SessionCrypto(1, 2, KEY_AB, KEY_BA),
        _packet.SessionCrypto(2, 1, KEY_BA, KEY_AB),
    )


@SIZES
def test_aead_baseline(benchmark, size):
    """cryptography's encrypt() + decrypt() alone: the cost we wrap."""
    benchmark.group = f"seal+open {size} B x {PACKETS}"
    benchmark(_packet.bench_aead, ChaCha20Poly1305(KEY_AB), size, PACKETS)


@SIZES
@BACKENDS
def test_session_c_api(benchmark, size, backend, use_backend):
    """seal_into + open_into (in place): what the engine pays per packet."""
    benchmark.group = f"seal+open {size} B x {PACKETS}"
    sender, receiver = _pair()
    benchmark(_packet.bench_seal_open, sender, receiver, bytes(size), PACKETS)


@SIZES
@BACKENDS
def test_session_python_api(benchmark, size, backend, use_backend):
    """seal() + open() from a Python loop: what tests and tools pay."""
    benchmark.group = f"seal+open {size} B x {PACKETS}"
    sender, receiver = _pair()
    payload = bytes(size)
    seal, open_ = sender.seal, receiver.open

    def run():
        for _ in range(PACKETS):
            open_(seal(payload))

    benchmark(run)
