"""The msgnet handshake state machine (docs/wire.md 2.3-2.5, 2.7), driven in memory.

No sockets and no sleeping: every call gets an explicit ``now``, packets move
by hand, so loss is simply not delivering a datagram.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import msgnet.core.handshake as handshake_module
from msgnet.core.handshake import (
    AES_GCM_FLAG,
    MAX_INITIATION_PATHS,
    PLAINTEXT_FLAG,
    RATE_TABLE_SIZE,
    SIGNATURE_PREFIX,
    Address,
    Datagram,
    FinishRepeated,
    HandshakeEvent,
    HandshakeFailed,
    HandshakePayload,
    Handshaker,
    SessionEstablished,
    decode_handshake_payload,
    encode_handshake_payload,
)
from msgnet.errors import HandshakeError, PeerUnreachableError, SecurityError, UsageError
from msgnet.identity import KeyPair, encode_public_key_protobuf
from msgnet.limits import (
    AMPLIFICATION_FACTOR,
    COOKIE_LOAD_THRESHOLD,
    COOKIE_ROTATE,
    EARLY_DATA_PACKETS,
    HANDSHAKE_INITIAL_RTO,
    HANDSHAKE_MIN_RETRY,
    HANDSHAKE_RETRIES,
    HANDSHAKE_TIMEOUT,
    MAX_DATAGRAM,
    MAX_PENDING_HANDSHAKES,
    MIN_INITIATION,
    PACKET_COOKIE,
    PACKET_DATA,
    PACKET_FINISH,
    PACKET_INITIATION,
    PACKET_RESPONSE,
    PACKET_SESSION_UNKNOWN,
    PACKET_VERSION_UNSUPPORTED,
    UNKNOWN_REPLIES_PER_SECOND,
)

A_ADDR: Address = ("192.0.2.1", 4001)
B_ADDR: Address = ("198.51.100.2", 4001)
RTT = 0.04


@dataclass
class Node:
    """One Handshaker at one address, with its own index allocator."""

    hs: Handshaker
    address: Address
    next_index: Callable[[], int]
    events: list[HandshakeEvent] = field(default_factory=list)

    @property
    def established(self) -> list[SessionEstablished]:
        return [e for e in self.events if isinstance(e, SessionEstablished)]

    @property
    def failed(self) -> list[HandshakeFailed]:
        return [e for e in self.events if isinstance(e, HandshakeFailed)]

    def receive(self, datagram: bytes, source: Address, now: float) -> list[Datagram]:
        out = self.hs.handle_packet(datagram, source, now, allocate_index=self.allocate)
        self.events += out.events
        return out.datagrams

    def timer(self, now: float) -> list[Datagram]:
        out = self.hs.handle_timer(now)
        self.events += out.events
        return out.datagrams

    def allocate(self) -> int:
        index = self.next_index()
        assert not self.hs.holds_index(index)
        return index


def make_node(
    address: Address, base: int, keypair: KeyPair | None = None, **options: object
) -> Node:
    hs = Handshaker(keypair or KeyPair.generate(), **options)  # type: ignore[arg-type]
    return Node(hs, address, itertools.count(base).__next__)


def only(datagrams: list[Datagram], kind: int | None = None) -> bytes:
    """The single datagram of a step (and its type, when given)."""
    assert len(datagrams) == 1, datagrams
    packet = datagrams[0][0]
    if kind is not None:
        assert packet[0] == kind
    return packet


@pytest.fixture
def a() -> Node:
    return make_node(A_ADDR, 1000)


@pytest.fixture
def b() -> Node:
    return make_node(B_ADDR, 5000)


def handshake(
    a: Node, b: Node, *, frames: bytes = b"", now: float = 0.0, index: int = 77
) -> tuple[SessionEstablished, SessionEstablished]:
    """A full, lossless handshake from a to b; returns (a's event, b's event)."""
    initiation = only(
        a.hs.initiate(
            b.address,
            now,
            local_index=index,
            peer_id=b.hs.peer_id,
            take_frames=lambda budget: frames,
        ),
        PACKET_INITIATION,
    )
    response = only(b.receive(initiation, a.address, now + RTT / 2), PACKET_RESPONSE)
    finish = only(a.receive(response, b.address, now + RTT), PACKET_FINISH)
    assert b.receive(finish, a.address, now + 1.5 * RTT) == []
    a.hs.confirm(index)
    return a.established[-1], b.established[-1]


# --- the happy path ---------------------------------------------------------------------


def test_handshake_establishes_matching_sessions(a: Node, b: Node) -> None:
    ours, theirs = handshake(a, b, frames=b"\x07\x04ping")
    assert ours.initiator and not theirs.initiator
    assert ours.peer_id == b.hs.peer_id and theirs.peer_id == a.hs.peer_id
    assert ours.send_key == theirs.recv_key and ours.recv_key == theirs.send_key
    assert ours.send_key != ours.recv_key and len(ours.send_key) == 32
    assert ours.handshake_hash == theirs.handshake_hash
    assert (ours.local_index, ours.remote_index) == (theirs.remote_index, theirs.local_index)
    assert ours.address == B_ADDR and theirs.address == A_ADDR
    assert ours.remote_transports == theirs.remote_transports == (1,)
    assert not ours.plaintext and not theirs.plaintext
    assert theirs.frames == b"\x07\x04ping" and ours.frames == b""
    assert ours.rtt == pytest.approx(RTT) and theirs.rtt == pytest.approx(RTT)
    assert a.hs.next_deadline() is None  # confirmed: nothing left to re-send
    assert not a.hs.counters and b.hs.counters == {}


def test_session_keys_are_fresh_per_handshake(a: Node, b: Node) -> None:
    first, _ = handshake(a, b, index=1)
    second, _ = handshake(a, b, index=2, now=1.0)
    assert first.send_key != second.send_key


def test_dial_without_peer_id_learns_it(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=9))
    finish = only(a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0))
    b.receive(finish, A_ADDR, 0.0)
    assert a.established[0].peer_id == b.hs.peer_id


@pytest.mark.parametrize(("a_plain", "b_plain"), [(True, True), (True, False), (False, True)])
def test_plaintext_needs_both_ends(a_plain: bool, b_plain: bool) -> None:
    a = make_node(A_ADDR, 1, plaintext=a_plain)
    b = make_node(B_ADDR, 100, plaintext=b_plain)
    ours, theirs = handshake(a, b)
    assert ours.plaintext == theirs.plaintext == (a_plain and b_plain)


@pytest.mark.parametrize(("a_aes", "b_aes"), [(True, True), (True, False), (False, True),
                                              (False, False)])
def test_aes_gcm_needs_both_ends(a_aes: bool, b_aes: bool) -> None:
    """wire.md 2.2: DATA uses AES-256-GCM only when both payloads carry the flag, and both
    ends reach the same answer."""
    a = make_node(A_ADDR, 1, aes_gcm=a_aes)
    b = make_node(B_ADDR, 100, aes_gcm=b_aes)
    ours, theirs = handshake(a, b)
    assert ours.aes_gcm == theirs.aes_gcm == (a_aes and b_aes)


def test_aes_gcm_flag_is_bit_1_of_the_msgnet_extension() -> None:
    """The flag as wire.md 2.3.1 lays it out, beside plaintext's bit 0; an end that knows
    neither (flags 0) gets ChaCha20-Poly1305."""
    payload = HandshakePayload(identity_key=b"k", identity_sig=b"s",
                               flags=AES_GCM_FLAG | PLAINTEXT_FLAG, transport_ids=(1,))
    decoded = decode_handshake_payload(encode_handshake_payload(payload))
    assert AES_GCM_FLAG == 0x02 and decoded.flags == 0x03


def test_transport_ids_are_exchanged() -> None:
    a = make_node(A_ADDR, 1, transport_ids=(1, 2, 7))
    b = make_node(B_ADDR, 100, transport_ids=(3,))
    ours, theirs = handshake(a, b)
    assert ours.remote_transports == (3,) and theirs.remote_transports == (1, 2, 7)


def test_transport_ids_announced_after_listening() -> None:
    """A host numbers its transports as it listens, after its handshaker exists."""
    a = make_node(A_ADDR, 1, transport_ids=())
    b = make_node(B_ADDR, 100, transport_ids=(1,))
    a.hs.set_transport_ids((1, 2))
    b.hs.set_transport_ids((1, 2, 3))
    ours, theirs = handshake(a, b)
    assert ours.remote_transports == (1, 2, 3) and theirs.remote_transports == (1, 2)
    with pytest.raises(UsageError):
        a.hs.set_transport_ids(tuple(range(1, 201)))


def test_a_handshake_with_another_prologue_does_not_mix(a: Node) -> None:
    other = make_node(B_ADDR, 100)
    other.hs._prologue = b""  # libp2p's stream Noise uses an empty prologue
    response = only(other.receive(only(a.hs.initiate(B_ADDR, 0.0, local_index=3)), A_ADDR, 0.0))
    assert a.receive(response, B_ADDR, 0.0) == []
    assert a.hs.counters["handshake_failed"] == 1 and not a.events


def test_frames_ride_in_finish_up_to_the_datagram_size(a: Node, b: Node) -> None:
    budgets: list[int] = []

    def take(budget: int) -> bytes:
        budgets.append(budget)
        return b"\x00" * budget  # PADDING frames, exactly filling the budget

    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=5, take_frames=take))
    finish = only(a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0))
    assert len(finish) == MAX_DATAGRAM and len(budgets) == 1
    b.receive(finish, A_ADDR, 0.0)
    assert b.established[0].frames == b"\x00" * budgets[0]


def test_take_frames_over_budget_is_a_usage_error(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=5, take_frames=lambda n: bytes(n + 1)))
    with pytest.raises(UsageError):
        a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0)


def test_initiate_refuses_an_index_in_use(a: Node) -> None:
    a.hs.initiate(B_ADDR, 0.0, local_index=5)
    for bad in (5, 0, 1 << 32):
        with pytest.raises(UsageError):
            a.hs.initiate(B_ADDR, 0.0, local_index=bad)


def test_constructor_checks() -> None:
    kp = KeyPair.generate()
    with pytest.raises(TypeError):
        Handshaker(kp, transport="udp")  # type: ignore[call-arg]  # sessions are transport-free
    with pytest.raises(UsageError):
        Handshaker(kp, max_packet=1000)
    # 200 transport ids would push RESPONSE past 3x MIN_INITIATION.
    with pytest.raises(UsageError):
        Handshaker(kp, transport_ids=tuple(range(1, 201)))


# --- authentication ---------------------------------------------------------------------


def test_dial_to_the_wrong_peer_fails_with_security_error(a: Node, b: Node) -> None:
    expected = KeyPair.generate().peer_id
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=4, peer_id=expected))
    assert a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0) == []  # no FINISH
    [failed] = a.failed
    assert failed.reason == "wrong_peer_id" and failed.local_index == 4
    assert type(failed.error) is SecurityError and failed.peer_id == expected
    assert a.hs.counters["wrong_peer_id"] == 1 and not a.established
    assert a.hs.next_deadline() is None


def impostor(victim: KeyPair, address: Address, base: int) -> Node:
    """A node that claims the victim's identity_key but can only sign with its own key."""
    node = make_node(address, base)
    node.hs._payload = encode_handshake_payload(  # the attacker controls its own payload
        HandshakePayload(
            identity_key=encode_public_key_protobuf(victim.public_key_bytes),
            identity_sig=KeyPair.generate().sign(SIGNATURE_PREFIX + node.hs.static_public),
            transport_ids=(1,),
        )
    )
    node.hs._finish_prefix = bytes((len(node.hs._payload),)) + node.hs._payload
    return node


def test_responder_impersonating_a_peer_is_rejected(a: Node) -> None:
    victim = KeyPair.generate()
    mallory = impostor(victim, B_ADDR, 100)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=4, peer_id=victim.peer_id))
    assert a.receive(only(mallory.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0) == []
    [failed] = a.failed
    assert failed.reason == "bad_signature" and isinstance(failed.error, HandshakeError)
    assert a.hs.counters["bad_signature"] == 1 and not a.established


def test_initiator_impersonating_a_peer_is_rejected(b: Node) -> None:
    mallory = impostor(KeyPair.generate(), A_ADDR, 100)
    initiation = only(mallory.hs.initiate(B_ADDR, 0.0, local_index=4))
    finish = only(mallory.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0))
    assert b.receive(finish, A_ADDR, 0.0) == []
    [failed] = b.failed
    assert failed.reason == "bad_signature" and failed.peer_id is None and not failed.initiator
    assert b.hs.counters["bad_signature"] == 1 and not b.established
    assert not b.hs.is_pending(failed.local_index)


def test_a_signature_over_another_static_key_is_rejected(a: Node) -> None:
    """Replaying a real peer's payload (signed for its own static key) does not help."""
    real = make_node(B_ADDR, 50)
    replayer = make_node(B_ADDR, 100)
    replayer.hs._payload = real.hs._payload
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=4, peer_id=real.hs.peer_id))
    a.receive(only(replayer.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0)
    assert [f.reason for f in a.failed] == ["bad_signature"]


def test_a_peer_proven_once_is_not_verified_again(a: Node, b: Node, monkeypatch) -> None:
    """Later sessions with the same peer (same identity and Noise static key) skip the
    Ed25519 verification; any other bytes, a forgery for the same keys included, do not."""
    calls: list[bytes] = []
    verify = handshake_module.verify_signature
    monkeypatch.setattr(handshake_module, "verify_signature",
                        lambda key, data, sig: calls.append(sig) or verify(key, data, sig))
    handshake(a, b, index=1)
    assert len(calls) == 2  # each end proved the other
    handshake(a, b, index=2, now=1.0)
    assert len(calls) == 2
    keypair, static = KeyPair.generate(), bytes(range(32))
    sig = keypair.sign(SIGNATURE_PREFIX + static)
    public = keypair.public_key_bytes
    assert handshake_module._identity_proven(public, static, sig)
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    assert not handshake_module._identity_proven(public, static, forged)
    assert not handshake_module._identity_proven(public, bytes(32), sig)
    assert len(calls) == 5


# --- packet corruption ------------------------------------------------------------------


def flips(packet: bytes, rng: random.Random) -> list[bytes]:
    """Each byte of the packet with one random bit flipped (every header bit for the first 9)."""
    out = []
    for i in range(len(packet)):
        bits = range(8) if i < 9 else [rng.randrange(8)]
        for bit in bits:
            mutated = bytearray(packet)
            mutated[i] ^= 1 << bit
            out.append(bytes(mutated))
    return out


def seeded_pair() -> tuple[Node, Node, bytes, bytes]:
    """The same dialer and responder every call (fixed identities and randomness).

    Returns them with the INITIATION sent and the RESPONSE it got.
    """
    a = make_node(
        A_ADDR, 1000, KeyPair.from_seed(b"a" * 32), random_bytes=random.Random(1).randbytes
    )
    b = make_node(
        B_ADDR, 5000, KeyPair.from_seed(b"b" * 32), random_bytes=random.Random(2).randbytes
    )
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=77))
    return a, b, initiation, only(b.receive(initiation, A_ADDR, 0.0))


def relay(
    source: Node, target: Node, datagrams: list[Datagram], now: float = 0.0
) -> list[Datagram]:
    """Deliver source's datagrams to target; return what target sends back."""
    replies: list[Datagram] = []
    for packet, _ in datagrams:
        replies += target.receive(packet, source.address, now)
    return replies


def test_flipped_initiation_never_establishes() -> None:
    _, _, initiation, _ = seeded_pair()
    for mutated in flips(initiation, random.Random(1)):
        a, _, _, _ = seeded_pair()
        b = make_node(B_ADDR, 5000)
        relay(a, b, relay(b, a, b.receive(mutated, A_ADDR, 0.0)))
        assert not a.established and not b.established


def test_flipped_response_never_establishes_a_session_pair() -> None:
    _, _, _, response = seeded_pair()
    provisional = 0
    for mutated in flips(response, random.Random(2)):
        a, b, _, genuine = seeded_pair()
        assert genuine == response
        relay(a, b, a.receive(mutated, B_ADDR, 0.0))
        assert not b.established
        if not a.established:
            # Dropped without harm: the genuine RESPONSE still completes the handshake.
            relay(a, b, a.receive(response, B_ADDR, 0.0))
            assert len(b.established) == 1
            continue
        # Only RESPONSE.sender_index is outside the Noise transcript (see the module
        # docstring): the dialer's session names an index the responder never gave out,
        # is never confirmed, and fails once FINISH retries run out.
        assert mutated[1:5] != response[1:5] and mutated[5:] == response[5:]
        provisional += 1
        while (deadline := a.hs.next_deadline()) is not None:
            relay(a, b, a.timer(deadline), deadline)
        assert [f.reason for f in a.failed] == ["unconfirmed"] and not b.established
    assert provisional == 32  # every bit of sender_index, and nothing else


def test_flipped_finish_never_establishes(a: Node, b: Node) -> None:
    rng = random.Random(3)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=77, take_frames=lambda n: b"\x07\x00"))
    response = only(b.receive(initiation, A_ADDR, 0.0))
    finish = only(a.receive(response, B_ADDR, 0.0))
    for mutated in flips(finish, rng):
        b.receive(mutated, A_ADDR, 0.0)  # a flipped type byte may read as another packet
    assert not b.established and not b.failed
    assert b.receive(finish, A_ADDR, 0.0) == []  # the genuine FINISH still completes
    assert len(b.established) == 1 and b.established[0].frames == b"\x07\x00"


def test_injected_response_does_not_kill_the_dial(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=77))
    response = only(b.receive(initiation, A_ADDR, 0.0))
    forged = response[:20] + bytes(len(response) - 20)
    assert a.receive(forged, B_ADDR, 0.0) == []
    assert a.hs.counters["handshake_failed"] == 1
    assert only(a.receive(response, B_ADDR, 0.0), PACKET_FINISH)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([0x04, 0x05, 0x06, 0x08, 0x0B, 0x07, 0x00]))
def test_random_packets_never_raise(data: bytes, kind: int) -> None:
    node = make_node(B_ADDR, 1)
    dial = make_node(A_ADDR, 1)
    dial.hs.initiate(B_ADDR, 0.0, local_index=1)
    for target in (node, dial):
        target.receive(bytes((kind,)) + data, A_ADDR, 0.0)
        assert not target.established


# --- loss and retransmission ------------------------------------------------------------


def test_lost_initiation_is_resent_identically(a: Node, b: Node) -> None:
    first = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    assert a.hs.next_deadline() == HANDSHAKE_INITIAL_RTO
    assert a.timer(0.1) == []
    again = only(a.timer(HANDSHAKE_INITIAL_RTO))
    assert again == first
    finish = only(a.receive(only(b.receive(again, A_ADDR, 0.3)), B_ADDR, 0.35))
    b.receive(finish, A_ADDR, 0.4)
    assert len(a.established) == len(b.established) == 1
    assert a.established[0].rtt is None  # Karn: ambiguous after a retransmission


def test_lost_response_is_answered_again_without_new_state(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    lost = only(b.receive(initiation, A_ADDR, 0.0))
    again = only(a.timer(HANDSHAKE_INITIAL_RTO))
    response = only(b.receive(again, A_ADDR, HANDSHAKE_INITIAL_RTO))
    assert response == lost and b.hs.table_sizes()["pending"] == 1
    b.receive(only(a.receive(response, B_ADDR, 0.3)), A_ADDR, 0.3)
    assert len(b.established) == 1 and b.established[0].rtt is None


def test_lost_finish_is_resent_until_confirmed(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    lost = only(a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.01))
    retry_at = a.hs.next_deadline()
    assert retry_at == pytest.approx(0.01 + HANDSHAKE_MIN_RETRY)  # 2 x 10 ms RTT < 50 ms
    again = only(a.timer(retry_at))  # type: ignore[arg-type]
    assert again == lost
    b.receive(again, A_ADDR, 0.07)
    assert len(b.established) == 1 and b.established[0].frames == b""
    a.hs.confirm(7)
    assert a.hs.next_deadline() is None and a.timer(100.0) == []
    assert not a.failed


def test_initiation_retries_then_timeout(a: Node) -> None:
    sends = [a.hs.initiate(B_ADDR, 0.0, local_index=7)]
    times = [0.0]
    while (deadline := a.hs.next_deadline()) is not None:
        times.append(deadline)
        sends.append(a.timer(deadline))
    assert times == [0.0, 0.25, 0.75, 1.75, 3.75]
    assert [len(s) for s in sends] == [1, 1, 1, 1, 0]
    [failed] = a.failed
    assert failed.reason == "timeout" and isinstance(failed.error, PeerUnreachableError)
    assert a.hs.counters["timeout"] == 1 and not a.hs.holds_index(7)


def test_unconfirmed_finish_fails_the_dial(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    only(a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.1))
    resent = 0
    while (deadline := a.hs.next_deadline()) is not None:
        resent += len(a.timer(deadline))
    assert resent == HANDSHAKE_RETRIES
    assert len(a.established) == 1 and [f.reason for f in a.failed] == ["unconfirmed"]
    assert a.failed[0].local_index == a.established[0].local_index


def test_duplicate_finish_is_confirmed_not_redelivered(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7, take_frames=lambda n: b"\x07\x00"))
    finish = only(a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0))
    b.receive(finish, A_ADDR, 0.0)
    out = b.hs.handle_packet(finish, A_ADDR, 0.1, allocate_index=b.allocate)
    assert out.datagrams == [] and out.events == [
        FinishRepeated(b.established[0].local_index, A_ADDR)
    ]
    assert len(b.established) == 1
    altered = finish[:-1] + bytes((finish[-1] ^ 1,))
    assert b.hs.handle_packet(altered, A_ADDR, 0.1, allocate_index=b.allocate).events == []
    b.timer(HANDSHAKE_TIMEOUT + 0.1)  # the memory of completed FINISHes expires
    assert b.hs.handle_packet(finish, A_ADDR, 6.0, allocate_index=b.allocate).events == []
    assert b.hs.counters["finish_repeated"] == 1 and b.hs.counters["unknown_handshake"] == 2


def test_pending_handshake_expires(a: Node, b: Node) -> None:
    b.receive(only(a.hs.initiate(B_ADDR, 0.0, local_index=7)), A_ADDR, 1.0)
    assert b.hs.next_deadline() == 1.0 + HANDSHAKE_TIMEOUT
    b.timer(1.0 + HANDSHAKE_TIMEOUT)
    assert b.hs.table_sizes()["pending"] == 0 and b.hs.counters["pending_expired"] == 1
    assert b.hs.next_deadline() is None


def test_cancel_forgets_a_dial(a: Node) -> None:
    a.hs.initiate(B_ADDR, 0.0, local_index=7)
    a.hs.cancel(7)
    assert a.hs.next_deadline() is None and a.timer(10.0) == [] and not a.events


def test_early_data_is_held_until_finish(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    response = only(b.receive(initiation, A_ADDR, 0.0))
    index = int.from_bytes(response[1:5], "big")
    assert b.hs.is_pending(index)
    held = [bytes((PACKET_DATA, i)) * 20 for i in range(EARLY_DATA_PACKETS)]
    assert all(b.hs.hold_early_data(index, packet) for packet in held)
    assert not b.hs.hold_early_data(index, b"one too many")
    assert not b.hs.hold_early_data(index + 1, b"no such handshake")
    b.receive(only(a.receive(response, B_ADDR, 0.0)), A_ADDR, 0.0)
    assert b.established[0].early_data == held and not b.hs.is_pending(index)
    assert b.hs.counters["early_data_dropped"] == 1


# --- denial of service ------------------------------------------------------------------


def test_short_initiation_is_dropped(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    assert len(initiation) == MIN_INITIATION
    assert b.receive(initiation[:-1], A_ADDR, 0.0) == []
    assert b.hs.counters["initiation_too_short"] == 1 and b.hs.table_sizes()["pending"] == 0


def test_response_is_at_most_three_times_the_initiation() -> None:
    a = make_node(A_ADDR, 1, transport_ids=tuple(range(1, 120)))
    b = make_node(B_ADDR, 100, transport_ids=tuple(range(1, 120)), plaintext=True)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    response = only(b.receive(initiation, A_ADDR, 0.0))
    assert len(response) <= AMPLIFICATION_FACTOR * len(initiation)
    assert len(response) > 2 * len(initiation)  # the bound is what limits this config


def test_cookie_is_small_and_echoing_it_completes() -> None:
    a = make_node(A_ADDR, 1)
    b = make_node(B_ADDR, 100, require_cookie=True)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    cookie = only(b.receive(initiation, A_ADDR, 0.0), PACKET_COOKIE)
    assert len(cookie) == 21 and cookie[1:5] == initiation[2:6]
    assert b.hs.table_sizes()["pending"] == 0  # no state for a COOKIE
    echoed = only(a.receive(cookie, B_ADDR, 0.01), PACKET_INITIATION)
    assert echoed[6:22] == cookie[5:] and echoed[22:] == initiation[22:]
    assert a.receive(cookie, B_ADDR, 0.01) == []  # one COOKIE per INITIATION sent
    b.receive(only(a.receive(only(b.receive(echoed, A_ADDR, 0.02)), B_ADDR, 0.03)), A_ADDR, 0.04)
    assert len(a.established) == len(b.established) == 1
    assert a.established[0].rtt == pytest.approx(0.02)  # timed from the echoed INITIATION


def test_cookie_is_bound_to_the_address_and_rotates() -> None:
    a = make_node(A_ADDR, 1)
    b = make_node(B_ADDR, 100, require_cookie=True)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    cookie = only(b.receive(initiation, A_ADDR, 0.0))
    echoed = initiation[:6] + cookie[5:] + initiation[22:]
    assert b.receive(echoed, ("192.0.2.99", 4001), 0.0) == []  # another IP
    assert b.receive(echoed, (A_ADDR[0], 4002), 0.0) == []  # another port
    assert b.hs.counters["bad_cookie"] == 2
    # Still accepted one rotation later (the previous secret), not two.
    assert only(b.receive(echoed, A_ADDR, COOKIE_ROTATE + 1), PACKET_RESPONSE)
    b.hs.cancel(next(i for i in range(100, 200) if b.hs.is_pending(i)))
    assert b.receive(echoed, A_ADDR, 2 * COOKIE_ROTATE + 2) == []
    assert b.hs.counters["bad_cookie"] == 3


def test_per_ip_rate_limit_answers_cookies(a: Node, b: Node) -> None:
    """HANDSHAKE_BURST initiations from one IP get a DH, the next ones a COOKIE."""
    kinds = []
    for index in range(1, 9):
        kinds.append(
            only(b.receive(only(a.hs.initiate(B_ADDR, 0.0, local_index=index)), A_ADDR, 0.0))[0]
        )
    assert kinds == [PACKET_RESPONSE] * 5 + [PACKET_COOKIE] * 3
    # Tokens come back at HANDSHAKES_PER_SECOND.
    assert (
        only(b.receive(only(a.hs.initiate(B_ADDR, 0.1, local_index=20)), A_ADDR, 0.1))[0]
        == PACKET_RESPONSE
    )


def test_validated_initiations_are_rate_limited_too() -> None:
    b = make_node(B_ADDR, 100, require_cookie=True)
    a = make_node(A_ADDR, 1)
    outcomes = []
    for index in range(1, 8):
        initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=index))
        echoed = only(a.receive(only(b.receive(initiation, A_ADDR, 0.0)), B_ADDR, 0.0))
        outcomes.append(len(b.receive(echoed, A_ADDR, 0.0)))
    assert outcomes == [1] * 5 + [0] * 2 and b.hs.counters["rate_limited"] == 2


def test_initiation_flood_stays_bounded_and_a_real_peer_gets_through() -> None:
    b = make_node(B_ADDR, 1)
    template = make_node(A_ADDR, 1)
    flood = only(template.hs.initiate(B_ADDR, 0.0, local_index=0xABCDEF))
    stray_data = bytes((PACKET_DATA,)) + bytes(40)
    cookies = responses = 0
    for i in range(100_000):
        source = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 50000)
        now = i * 1e-5
        # A new sender_index makes each a new INITIATION (the index is outside the Noise
        # message), not a copy of one already pending.
        initiation = flood[:2] + (i + 1).to_bytes(4, "big") + flood[6:]
        for packet, _ in b.receive(initiation, source, now):
            cookies += packet[0] == PACKET_COOKIE
            responses += packet[0] == PACKET_RESPONSE
        b.hs.answer_unknown_session(stray_data, source, now)  # fills the reply rate table
    sizes = b.hs.table_sizes()
    assert responses == COOKIE_LOAD_THRESHOLD + 1  # DH only until "under load"
    assert cookies == 100_000 - responses == b.hs.counters["cookie_sent"]
    assert sizes["pending"] == COOKIE_LOAD_THRESHOLD + 1 <= MAX_PENDING_HANDSHAKES
    assert sizes["reply_rate"] == RATE_TABLE_SIZE
    assert max(sizes.values()) <= RATE_TABLE_SIZE

    a = make_node(("203.0.113.5", 4001), 1)
    now = 1.0
    initiation = only(a.hs.initiate(B_ADDR, now, local_index=1, peer_id=b.hs.peer_id))
    cookie = only(b.receive(initiation, a.address, now), PACKET_COOKIE)
    echoed = only(a.receive(cookie, B_ADDR, now))
    response = only(b.receive(echoed, a.address, now), PACKET_RESPONSE)
    b.receive(only(a.receive(response, B_ADDR, now)), a.address, now)
    assert len(a.established) == len(b.established) == 1


def test_copies_of_one_initiation_are_answered_alike_from_a_few_addresses() -> None:
    """wire.md §5: the same INITIATION over several transports gets the same RESPONSE and
    one DH; replayed from more addresses than a dial has paths, it is dropped."""
    b = make_node(B_ADDR, 1)
    a = make_node(A_ADDR, 1)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=1))
    answers = set()
    for i in range(MAX_INITIATION_PATHS + 5):
        for packet, _ in b.receive(initiation, (f"10.2.0.{i}", 4001), 0.001 * i):
            answers.add(packet)
    assert b.hs.table_sizes()["pending"] == 1
    (response,) = answers
    assert response[0] == PACKET_RESPONSE
    assert b.hs.counters["rate_limited"] == 5
    # The first addresses may still repeat (their RESPONSE was lost).
    assert b.receive(initiation, ("10.2.0.1", 4001), 0.1) == [(response, ("10.2.0.1", 4001))]


def test_rate_table_is_a_bounded_lru() -> None:
    b = make_node(B_ADDR, 1, rate_table_size=16)
    a = make_node(A_ADDR, 1)
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=1))
    for i in range(40):
        now = i * 0.2  # pending handshakes expire, so every source gets a DH
        b.timer(now)
        fresh = initiation[:2] + (i + 1).to_bytes(4, "big") + initiation[6:]  # not a copy
        assert only(b.receive(fresh, (f"10.1.0.{i}", 4001), now))[0] == PACKET_RESPONSE
    assert b.hs.table_sizes()["initiation_rate"] == 16
    assert b.hs.table_sizes()["pending"] <= HANDSHAKE_TIMEOUT / 0.2


def test_pending_table_evicts_the_oldest() -> None:
    b = make_node(B_ADDR, 1, max_pending=8)
    a = make_node(A_ADDR, 1)
    first_index = None
    for i in range(12):
        source = (f"10.0.0.{i}", 4001)
        response = only(b.receive(only(a.hs.initiate(B_ADDR, 0.0, local_index=i + 1)), source, 0.0))
        first_index = first_index or int.from_bytes(response[1:5], "big")
    assert b.hs.table_sizes()["pending"] == 8 and b.hs.counters["pending_evicted"] == 4
    assert not b.hs.is_pending(first_index)  # type: ignore[arg-type]


# --- stateless answers ------------------------------------------------------------------


def test_version_unsupported(a: Node, b: Node) -> None:
    initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
    v2 = initiation[:1] + b"\x02" + initiation[2:]
    reply = only(b.receive(v2, A_ADDR, 0.0), PACKET_VERSION_UNSUPPORTED)
    assert reply == bytes((PACKET_VERSION_UNSUPPORTED,)) + initiation[2:6] + b"\x01\x01"
    assert b.hs.table_sizes()["pending"] == 0 and b.hs.counters["version_unsupported"] == 1
    # A peer that speaks only later versions answers a's v1 INITIATION.
    future_only = bytes((PACKET_VERSION_UNSUPPORTED,)) + initiation[2:6] + b"\x02\x02\x03"
    assert a.receive(future_only, ("192.0.2.66", 1), 0.0) == []  # only from the dialled address
    assert a.receive(reply, B_ADDR, 0.0) == []  # lists our own version: not a real peer
    assert a.hs.counters["unknown_handshake"] == 2 and not a.failed
    assert a.receive(future_only, B_ADDR, 0.0) == []
    [failed] = a.failed
    assert failed.reason == "version_rejected" and isinstance(failed.error, PeerUnreachableError)
    # Even a short future-version INITIATION is answered (its layout may differ).
    assert only(b.receive(b"\x04\x02" + bytes(4), A_ADDR, 0.0))[0] == PACKET_VERSION_UNSUPPORTED


def test_version_replies_are_rate_limited(b: Node) -> None:
    v2 = b"\x04\x02" + bytes(158)
    answered = sum(len(b.receive(v2, A_ADDR, 0.0)) for _ in range(20))
    assert answered == UNKNOWN_REPLIES_PER_SECOND
    assert b.hs.counters["reply_rate_limited"] == 20 - answered


def test_answer_unknown_session_echoes_and_is_rate_limited(b: Node) -> None:
    data = bytes((PACKET_DATA,)) + bytes(range(1, 13)) + b"payload" + bytes(range(100, 116))
    reply = b.hs.answer_unknown_session(data, A_ADDR, 0.0)
    assert reply == bytes((PACKET_SESSION_UNKNOWN,)) + data[1:13] + data[-16:]
    assert len(reply) == 29
    answered = 1 + sum(
        b.hs.answer_unknown_session(data, A_ADDR, 0.0) is not None for _ in range(30)
    )
    assert answered == UNKNOWN_REPLIES_PER_SECOND
    assert b.hs.answer_unknown_session(data, ("192.0.2.77", 1), 0.0) is not None  # per address
    assert b.hs.answer_unknown_session(data, A_ADDR, 0.5) is not None  # refilled
    assert b.hs.answer_unknown_session(data[:28], A_ADDR, 5.0) is None  # shorter than any DATA
    assert b.hs.answer_unknown_session(b"\x0a" + data[1:], A_ADDR, 5.0) is None  # not DATA


def test_ipv6_addresses_share_a_rate_limit_per_64(a: Node) -> None:
    b = make_node(("2001:db8::1", 4001), 1)
    kinds = []
    for i in range(7):
        source = (f"2001:db8:1:2::{i + 1}", 4001, 0, 0)
        kinds.append(
            only(b.receive(only(a.hs.initiate(b.address, 0.0, local_index=i + 1)), source, 0.0))[0]
        )
    assert kinds.count(PACKET_COOKIE) == 2


def test_unrelated_packets_are_counted(b: Node) -> None:
    for packet in (
        b"",
        bytes((PACKET_DATA,)) * 40,
        b"\x05" * 8,
        b"\x06\x00",
        b"\x08" * 20,
        b"\x0b\x00",
    ):
        assert b.receive(packet, A_ADDR, 0.0) == []
    assert b.hs.counters == {"truncated": 5, "unknown_packet_type": 1}
    assert b.receive(b"\x05" + bytes(200), A_ADDR, 0.0) == []
    assert b.receive(b"\x06" + bytes(200), A_ADDR, 0.0) == []
    assert b.hs.counters["unknown_handshake"] == 2


# --- handshake payload codec ------------------------------------------------------------


def test_payload_round_trip_and_unknown_fields() -> None:
    payload = HandshakePayload(
        b"\x08\x01\x12\x20" + bytes(32), bytes(64), PLAINTEXT_FLAG, (1, 65535)
    )
    data = encode_handshake_payload(payload)
    assert decode_handshake_payload(data) == payload
    # webtransport_certhashes (1) and stream_muxers (2) inside extensions, an unknown
    # top-level varint (5), fixed64 (6) and fixed32 (7): all skipped.
    extras = (
        b"\x22\x08\x0a\x02hi\x12\x02/y" + b"\x28\x96\x01" + b"\x31" + bytes(8) + b"\x3d" + bytes(4)
    )
    assert decode_handshake_payload(data + extras) == payload
    without_extensions = data[: 2 + 36 + 2 + 64]
    assert decode_handshake_payload(without_extensions) == HandshakePayload(
        payload.identity_key, payload.identity_sig
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no identity
        b"\x0a\x02ab",  # no signature
        b"\x0a\x05ab",  # length past the end
        b"\x08\x01\x12\x00",  # identity_key as a varint
        b"\x0a\x00\x12\x00\x23",  # group wire type
        b"\x0a\x00\x12\x00\x22\x05\xc2\x3e\x02\x00\x01",  # 1 transport announced, none given
        b"\x0a\x00\x12\x00\x22\x03\xc2\x3e\x00",  # msgnet extension too short
        b"\x0a" + b"\xff" * 11,  # varint too long
        b"\x02\x00",  # field number 0
    ],
)
def test_malformed_payloads_are_rejected(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        decode_handshake_payload(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_payload_decoder_only_raises_handshake_error(data: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        decode_handshake_payload(data)


# --- sans-IO ----------------------------------------------------------------------------


def test_module_does_no_io() -> None:
    import msgnet.core.handshake as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"asyncio", "socket", "time", "random", "selectors", "threading"}


def test_seeded_randomness_reproduces_a_transcript() -> None:
    def transcript() -> list[bytes]:
        seeds = iter(range(10))
        nodes = []
        for address, seed in ((A_ADDR, 1), (B_ADDR, 2)):
            source = random.Random(seed)
            kp = KeyPair.from_seed(bytes([next(seeds)]) * 32)
            nodes.append(make_node(address, 10, kp, random_bytes=source.randbytes))
        a, b = nodes
        initiation = only(a.hs.initiate(B_ADDR, 0.0, local_index=7))
        response = only(b.receive(initiation, A_ADDR, 0.0))
        finish = only(a.receive(response, B_ADDR, 0.0))
        return [initiation, response, finish]

    assert transcript() == transcript()
