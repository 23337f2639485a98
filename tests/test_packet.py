"""DATA/PLAIN_DATA sealing and opening, the replay window and the stateless packets
(docs/wire.md §2), on the Cython module and its pure-Python twin."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from msgnet import _packet_py, limits
from msgnet.errors import ClosedError, FrameError, ProtocolViolation, UsageError

try:
    from msgnet import _packet
except ImportError:
    if not os.environ.get("MSGNET_NO_EXTENSIONS"):
        raise  # a missing extension is a broken build, not a reason to skip
    _packet = None

IMPLS = [m for m in (_packet, _packet_py) if m is not None]
needs_extension = pytest.mark.skipif(_packet is None, reason="MSGNET_NO_EXTENSIONS")
# The extension once per AEAD backend it was built with (sodium+openssl, sodium, openssl and
# cryptography, or those of them it could link), then the pure-Python twin.
BACKENDS = _packet.AEAD_BACKENDS if _packet is not None else ()
IMPL_PARAMS = [pytest.param((_packet, b), id=f"_packet-{b}") for b in BACKENDS] + [
    pytest.param((_packet_py, None), id="_packet_py")]

KEY_AB = bytes(range(32))
KEY_BA = bytes(range(32, 64))
INDEX_A = 0x11223344
INDEX_B = 0xA1B2C3D4
REJECT = limits.REJECT_AFTER_MESSAGES
payloads = st.binary(max_size=1500)


@pytest.fixture(scope="module", params=IMPL_PARAMS)
def impl(request):
    """The packet module under test, with its AEAD backend selected for the whole group."""
    module, backend = request.param
    if backend is None:
        yield module
        return
    previous = module.set_aead_backend(backend)
    try:
        yield module
    finally:
        module.set_aead_backend(previous)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each AEAD backend of the extension in turn (restored afterwards)."""
    previous = _packet.set_aead_backend(request.param)
    try:
        yield request.param
    finally:
        _packet.set_aead_backend(previous)


def sender(impl, plaintext=False, send_counter=0):
    """A's session: sends to B."""
    return impl.SessionCrypto(INDEX_A, INDEX_B, KEY_AB, KEY_BA, plaintext, send_counter)


def receiver(impl, plaintext=False):
    """B's session: receives from A."""
    return impl.SessionCrypto(INDEX_B, INDEX_A, KEY_BA, KEY_AB, plaintext)


def drop_reason(session, packet):
    with pytest.raises(ProtocolViolation) as info:
        session.open(packet)
    return info.value.reason


def data_packet(key, receiver_index, counter, payload, packet_type=limits.PACKET_DATA):
    """A DATA packet built from the text of §2.2 with cryptography directly."""
    header = bytes([packet_type]) + receiver_index.to_bytes(4, "big") + counter.to_bytes(8, "big")
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return header + ChaCha20Poly1305(key).encrypt(nonce, payload, header)


# -- constants -------------------------------------------------------------------------------


@needs_extension
def test_pxd_constants_match_limits():
    for name, value in _packet.PXD_CONSTANTS.items():
        assert getattr(limits, name) == value, name


def test_drop_reason_names_agree():
    assert _packet_py.DROP_REASON_NAMES[1:6] == (
        "truncated", "replay", "auth_failed", "counter_exhausted", "plaintext_refused")
    for impl in IMPLS:
        assert impl.DROP_REASON_NAMES == _packet_py.DROP_REASON_NAMES


# -- seal/open -------------------------------------------------------------------------------


@pytest.mark.parametrize("plaintext", [False, True])
@given(batch=st.lists(payloads, max_size=8))
def test_round_trip(impl, plaintext, batch):
    a, b = sender(impl, plaintext), receiver(impl, plaintext)
    overhead = limits.DATA_HEADER_SIZE if plaintext else limits.DATA_OVERHEAD
    for counter, payload in enumerate(batch):
        packet = a.seal(payload)
        assert len(packet) == len(payload) + overhead
        assert packet[0] == (limits.PACKET_PLAIN_DATA if plaintext else limits.PACKET_DATA)
        assert _packet_py.peek_receiver_index(packet) == INDEX_B
        assert int.from_bytes(packet[5:13], "big") == counter
        assert b.open(packet) == payload
    assert a.send_counter == len(batch)


def test_open_takes_any_buffer(impl):
    a, b = sender(impl), receiver(impl)
    assert b.open(bytearray(a.seal(b"x"))) == b"x"
    assert b.open(memoryview(a.seal(bytearray(b"y")))) == b"y"


@needs_extension
@pytest.mark.parametrize("plaintext", [False, True])
@given(start=st.integers(0, REJECT - 9), batch=st.lists(payloads, min_size=1, max_size=8))
def test_twins_identical(plaintext, start, batch):
    c_send, py_send = sender(_packet, plaintext, start), sender(_packet_py, plaintext, start)
    c_recv, py_recv = receiver(_packet, plaintext), receiver(_packet_py, plaintext)
    for payload in batch:
        packet = c_send.seal(payload)
        assert py_send.seal(payload) == packet
        assert py_recv.open(packet) == payload
        assert c_recv.open(packet) == payload
        if not plaintext:
            assert c_send.tag_of(packet) == py_send.tag_of(packet) == packet[-16:]


@needs_extension
def test_aead_backend_flag():
    assert _packet.AEAD_BACKEND in _packet.AEAD_BACKENDS
    assert _packet.AEAD_BACKENDS[-1] == "cryptography"  # always there, the fallback
    assert ("openssl" in _packet.AEAD_BACKENDS) == _packet.HAVE_OPENSSL
    assert ("sodium" in _packet.AEAD_BACKENDS) == _packet.HAVE_SODIUM
    assert ("sodium+openssl" in _packet.AEAD_BACKENDS) == (_packet.HAVE_SODIUM
                                                           and _packet.HAVE_OPENSSL)
    if os.environ.get("MSGNET_AEAD_BACKEND"):
        assert _packet.AEAD_BACKEND == os.environ["MSGNET_AEAD_BACKEND"]
    else:
        assert _packet.AEAD_BACKEND == _packet.AEAD_BACKENDS[0]
    with pytest.raises(UsageError):
        _packet.set_aead_backend("rot13")
    assert _packet.AEAD_BACKEND in _packet.AEAD_BACKENDS  # unchanged by the refusal


@needs_extension
@settings(max_examples=50)
@given(counter=st.integers(0, REJECT - 1), payload=payloads)
def test_backends_match_the_cryptography_oracle(counter, payload):
    """Every backend seals byte for byte what cryptography's ChaCha20Poly1305 seals for the
    layout of §2.2, and opens what it sealed."""
    expected = data_packet(KEY_AB, INDEX_B, counter, payload)
    for name in BACKENDS:
        previous = _packet.set_aead_backend(name)
        try:
            assert sender(_packet, send_counter=counter).seal(payload) == expected, name
            assert receiver(_packet).open(expected) == payload, name
        finally:
            _packet.set_aead_backend(previous)


@needs_extension
@pytest.mark.parametrize("size", [0, 1, 63, 64, 511, 512, 513, 1200, 1500, 9000])
def test_backends_match_the_oracle_on_both_sides_of_the_size_switch(size):
    """sodium+openssl hands packets below 512 bytes to libsodium and the rest to libcrypto:
    every backend must agree with cryptography at and around that switch."""
    payload = os.urandom(size)
    expected = data_packet(KEY_AB, INDEX_B, 7, payload)
    for name in BACKENDS:
        previous = _packet.set_aead_backend(name)
        try:
            assert sender(_packet, send_counter=7).seal(payload) == expected, name
            assert receiver(_packet).open(expected) == payload, name
            forged = bytearray(expected)
            forged[-1] ^= 1
            assert drop_reason(receiver(_packet), bytes(forged)) == "auth_failed", name
        finally:
            _packet.set_aead_backend(previous)


@needs_extension
def test_backends_open_each_others_packets(backend):
    other = [b for b in BACKENDS if b != backend] or [backend]
    a, b = sender(_packet), receiver(_packet)
    for i in range(20):
        packet = a.seal(b"n%d" % i)
        _packet.set_aead_backend(other[0])  # seal with one, open with the other
        assert b.open(packet) == b"n%d" % i
        _packet.set_aead_backend(backend)


@needs_extension
def test_shared_contexts_serve_interleaved_sessions(backend):
    """One context per direction serves every session: keys never leak between sessions,
    and a forged packet leaves nothing behind for the next open."""
    keys = [os.urandom(32) for _ in range(8)]
    senders = [_packet.SessionCrypto(i + 1, 100 + i, k, bytes(32)) for i, k in enumerate(keys)]
    receivers = [_packet.SessionCrypto(100 + i, i + 1, bytes(32), k) for i, k in enumerate(keys)]
    for round_ in range(3):
        packets = [s.seal(b"%d/%d" % (i, round_)) for i, s in enumerate(senders)]
        for i, r in enumerate(receivers):
            forged = bytearray(packets[i])
            forged[-1] ^= 1
            assert drop_reason(r, bytes(forged)) == "auth_failed"
            wrong_key = data_packet(keys[(i + 1) % 8], 100 + i, round_, b"x")
            assert drop_reason(r, wrong_key) == "auth_failed"
            assert r.open(packets[i]) == b"%d/%d" % (i, round_)


@needs_extension
def test_openssl_leaves_no_error_behind_after_a_forgery():
    """A forged packet must not leave an entry in this thread's OpenSSL error queue, where
    another OpenSSL user (the ssl module) would find it."""
    if not _packet.HAVE_OPENSSL:
        pytest.skip("built without libcrypto")
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("crypto")
    if name is None:
        pytest.skip("libcrypto not found by ctypes")
    libcrypto = ctypes.CDLL(name)
    libcrypto.ERR_peek_error.restype = ctypes.c_ulong
    previous = _packet.set_aead_backend("openssl")
    try:
        b = receiver(_packet)
        forged = data_packet(bytes(32), INDEX_B, 0, b"forged")
        assert drop_reason(b, forged) == "auth_failed"
        assert libcrypto.ERR_peek_error() == 0
    finally:
        _packet.set_aead_backend(previous)


def test_key_must_be_32_bytes(impl):
    with pytest.raises(ValueError):
        impl.SessionCrypto(1, 2, bytes(31), KEY_AB)
    with pytest.raises(ValueError):
        impl.SessionCrypto(1, 2, KEY_AB, bytes(33))
    session = impl.SessionCrypto(1, 2, bytearray(KEY_AB), memoryview(KEY_BA))  # any buffer
    assert impl.SessionCrypto(2, 1, KEY_BA, KEY_AB).open(session.seal(b"k")) == b"k"


def test_golden_data_vector(impl):
    key = bytes(range(0x80, 0xA0))
    index, counter, payload = 0xDEADBEEF, 0x0102030405060708, b"msgnet golden payload"
    header = bytes.fromhex("07" "deadbeef" "0102030405060708")
    nonce = bytes.fromhex("00000000" "0807060504030201")
    expected = header + ChaCha20Poly1305(key).encrypt(nonce, payload, header)
    session = impl.SessionCrypto(1, index, key, bytes(32), send_counter=counter)
    assert session.seal(payload) == expected
    peer = impl.SessionCrypto(index, 1, bytes(32), key)
    assert peer.open(expected) == payload


def test_plain_data_layout(impl):
    packet = sender(impl, plaintext=True, send_counter=258).seal(b"abc")
    assert packet == bytes.fromhex("0a" "a1b2c3d4" "0000000000000102") + b"abc"


# -- replay window ---------------------------------------------------------------------------


def test_immediate_replay_rejected(impl):
    a, b = sender(impl), receiver(impl)
    packet = a.seal(b"once")
    assert b.open(packet) == b"once"
    assert drop_reason(b, packet) == "replay"


def test_replay_after_1000_later_packets_rejected(impl):
    a, b = sender(impl), receiver(impl)
    first = a.seal(b"first")
    b.open(first)
    for _ in range(1000):
        b.open(a.seal(b""))
    assert drop_reason(b, first) == "replay"


def test_counter_older_than_window_rejected(impl):
    a, b = sender(impl), receiver(impl)
    packets = [a.seal(bytes([i % 256])) for i in range(limits.REPLAY_WINDOW + 1)]
    b.open(packets[-1])  # highest = 1024: counter 0 is at highest - REPLAY_WINDOW
    assert drop_reason(b, packets[0]) == "replay"
    assert b.open(packets[1]) == b"\x01"  # the oldest counter still inside the window


@pytest.mark.parametrize("start", [0, 1500])
def test_reordering_within_window_accepted_once(impl, start):
    a, b = sender(impl, send_counter=start), receiver(impl)
    if start:  # earlier traffic, so the ring has wrapped
        b.window.accept(start - 1)
    packets = [a.seal(i.to_bytes(2, "big")) for i in range(limits.REPLAY_WINDOW)]
    order = list(range(limits.REPLAY_WINDOW))
    random.Random(start).shuffle(order)
    for i in order:
        assert b.open(packets[i]) == i.to_bytes(2, "big")
    for i in order:
        assert drop_reason(b, packets[i]) == "replay"


walks = st.lists(
    st.one_of(st.integers(-1100, 1100), st.integers(-(1 << 20), 1 << 20)), max_size=200
)


@needs_extension
@given(steps=walks, start=st.integers(0, (1 << 64) - 1))
def test_window_matches_twin(steps, start):
    """The bitmap window decides exactly like the set-of-counters reading of §2.2."""
    c_window, py_window = _packet.ReplayWindow(), _packet_py.ReplayWindow()
    counter = start
    for step in steps:
        counter = min(max(counter + step, 0), (1 << 64) - 1)
        probe = max(counter - 1024, 0)
        assert c_window.would_accept(probe) == py_window.would_accept(probe)
        assert c_window.accept(counter) == py_window.accept(counter)


def test_window_edges(impl):
    window = impl.ReplayWindow()
    assert window.would_accept(7)
    assert window.would_accept(7)  # would_accept changes nothing
    assert window.accept(7) and not window.accept(7)
    assert not window.accept((1 << 64) - 1)
    with pytest.raises(OverflowError):
        window.accept(-1)


# -- tampering -------------------------------------------------------------------------------


def test_every_bit_flip_rejected_without_moving_window(impl):
    payload = b"tamper!!"
    a = sender(impl)
    earlier = [a.seal(b"") for _ in range(5)]  # counters 0..4, opened first
    packet = a.seal(payload)  # counter 5
    for bit in range(len(packet) * 8):
        b = receiver(impl)
        for p in earlier:
            b.open(p)
        flipped = bytearray(packet)
        flipped[bit // 8] ^= 1 << (bit % 8)
        claimed = int.from_bytes(flipped[5:13], "big")
        if bit < 8:
            with pytest.raises(FrameError):
                b.open(flipped)
        elif bit < 40:
            assert drop_reason(b, flipped) == "unknown_session"
        elif claimed < 5:
            assert drop_reason(b, flipped) == "replay"
        else:
            assert drop_reason(b, flipped) == "auth_failed"
        assert b.open(packet) == payload
        if claimed > 5:  # the flipped packet did not claim its counter
            assert b.open(sender(impl, send_counter=claimed).seal(b"later")) == b"later"


def test_wrong_key_is_auth_failure(impl):
    b = receiver(impl)
    forged = data_packet(bytes(32), INDEX_B, 0, b"forged")
    assert drop_reason(b, forged) == "auth_failed"
    assert b.window.would_accept(0)


def test_unknown_session(impl):
    packet = sender(impl).seal(b"x")
    other = impl.SessionCrypto(INDEX_B + 1, INDEX_A, KEY_BA, KEY_AB)
    assert drop_reason(other, packet) == "unknown_session"


def test_plaintext_cross_refusal(impl):
    encrypted_packet = sender(impl).seal(b"x")
    plain_packet = sender(impl, plaintext=True).seal(b"x")
    assert drop_reason(receiver(impl, plaintext=True), encrypted_packet) == "plaintext_refused"
    assert drop_reason(receiver(impl), plain_packet) == "plaintext_refused"


def test_truncated(impl):
    packet = sender(impl).seal(b"payload")
    b = receiver(impl)
    for n in range(limits.DATA_OVERHEAD):
        assert drop_reason(b, packet[:n]) == "truncated"
    assert drop_reason(b, packet[: limits.DATA_OVERHEAD]) == "auth_failed"
    plain = sender(impl, plaintext=True).seal(b"payload")
    b = receiver(impl, plaintext=True)
    for n in range(limits.DATA_HEADER_SIZE):
        assert drop_reason(b, plain[:n]) == "truncated"
    assert b.open(plain) == b"payload"


def test_not_a_data_packet(impl):
    for packet_type in (limits.PACKET_FINISH, limits.PACKET_SESSION_UNKNOWN, 0x00):
        packet = data_packet(KEY_AB, INDEX_B, 0, b"x", packet_type)
        with pytest.raises(FrameError):
            receiver(impl).open(packet)


def test_send_counter_exhaustion(impl):
    a, b = sender(impl, send_counter=REJECT - 1), receiver(impl)
    last = a.seal(b"last")
    assert a.send_counter == REJECT
    with pytest.raises(ClosedError):
        a.seal(b"one too many")
    assert a.send_counter == REJECT
    assert b.open(last) == b"last"


@pytest.mark.parametrize("counter", [REJECT, (1 << 64) - 1])
def test_receive_counter_exhaustion(impl, counter):
    packet = data_packet(KEY_AB, INDEX_B, counter, b"x")  # a valid tag: the limit alone rejects
    assert drop_reason(receiver(impl), packet) == "counter_exhausted"


def test_encrypted_session_needs_keys(impl):
    with pytest.raises(UsageError):
        impl.SessionCrypto(1, 2, None, KEY_AB)
    impl.SessionCrypto(1, 2, None, None, plaintext=True)


def test_tag_of(impl):
    packet = sender(impl).seal(b"abc")
    assert sender(impl).tag_of(packet) == packet[-16:]
    with pytest.raises(FrameError):
        sender(impl).tag_of(packet[:28])
    with pytest.raises(UsageError):
        sender(impl, plaintext=True).tag_of(packet)


# -- stateless packets -----------------------------------------------------------------------


def test_session_unknown(impl):
    tag = bytes(range(16))
    packet = impl.encode_session_unknown(INDEX_B, 0x0102030405060708, tag)
    assert packet == bytes.fromhex("09" "a1b2c3d4" "0102030405060708") + tag
    assert len(packet) == limits.DATA_OVERHEAD
    assert impl.decode_session_unknown(packet) == (INDEX_B, 0x0102030405060708, tag)
    assert impl.peek_receiver_index(packet) == INDEX_B
    for bad in (packet[:-1], packet + b"\0", b"\x07" + packet[1:], b""):
        with pytest.raises(FrameError):
            impl.decode_session_unknown(bad)
    with pytest.raises(UsageError):
        impl.encode_session_unknown(INDEX_B, 0, bytes(15))


def test_cookie(impl):
    cookie = bytes(range(100, 116))
    packet = impl.encode_cookie(INDEX_A, cookie)
    assert packet == bytes.fromhex("08" "11223344") + cookie
    assert impl.decode_cookie(packet) == (INDEX_A, cookie)
    assert impl.peek_receiver_index(packet) == INDEX_A
    for bad in (packet[:-1], packet + b"\0", b"\x09" + packet[1:], b""):
        with pytest.raises(FrameError):
            impl.decode_cookie(bad)
    with pytest.raises(UsageError):
        impl.encode_cookie(INDEX_A, bytes(17))


def test_version_unsupported(impl):
    packet = impl.encode_version_unsupported(INDEX_A, (1, 2))
    assert packet == bytes.fromhex("0b" "11223344" "02" "0102")
    assert impl.decode_version_unsupported(packet) == (INDEX_A, (1, 2))
    assert impl.decode_version_unsupported(bytes.fromhex("0b1122334400")) == (INDEX_A, ())
    for bad in (packet[:-1], packet + b"\0", packet[:5], b"\x08" + packet[1:], b""):
        with pytest.raises(FrameError):
            impl.decode_version_unsupported(bad)
    with pytest.raises(ValueError):
        impl.encode_version_unsupported(INDEX_A, (256,))


def test_peek_receiver_index(impl):
    for packet_type in (limits.PACKET_DATA, limits.PACKET_PLAIN_DATA, limits.PACKET_FINISH):
        assert impl.peek_receiver_index(bytes([packet_type]) + b"\x00\x00\x01\x02") == 258
    for bad in (b"", b"\x07\x00\x00\x01", b"\x04" + bytes(200), b"\x05" + bytes(100), b"\x0b" + bytes(6)):
        with pytest.raises(FrameError):
            impl.peek_receiver_index(bad)


@needs_extension
@settings(max_examples=200)
@given(index=st.integers(0, (1 << 32) - 1), counter=st.integers(0, (1 << 64) - 1),
       blob=st.binary(min_size=16, max_size=16),
       versions=st.lists(st.integers(0, 255), max_size=255), junk=st.binary(max_size=40))
def test_stateless_twins_identical(index, counter, blob, versions, junk):
    for name, args in [
        ("session_unknown", (index, counter, blob)),
        ("cookie", (index, blob)),
        ("version_unsupported", (index, versions)),
    ]:
        packet = getattr(_packet, "encode_" + name)(*args)
        assert getattr(_packet_py, "encode_" + name)(*args) == packet
        for data in (packet, junk, packet[:1] + junk):
            results = []
            for impl in (_packet, _packet_py):
                try:
                    results.append(getattr(impl, "decode_" + name)(data))
                except FrameError:
                    results.append(FrameError)
            assert results[0] == results[1]


@needs_extension
@pytest.mark.parametrize("plaintext", [False, True])
@pytest.mark.parametrize("seal_in_place", [False, True])
def test_c_api_in_place(plaintext, seal_in_place):
    """seal_into with payload at out + 13 and open_into with out at pkt + 13 (what the engine
    does with its buffers), through the benchmark loop."""
    a, b = sender(_packet, plaintext), receiver(_packet, plaintext)
    payload = bytes(range(200))
    assert _packet.bench_seal_open(a, b, payload, 50, seal_in_place) == payload
    assert a.send_counter == 50 and not b.window.would_accept(49)
    _packet.bench_aead(ChaCha20Poly1305(KEY_AB), 100, 3)


PIECE_BACKENDS = [b for b in BACKENDS if b in ("sodium+openssl", "openssl")]


@needs_extension
@settings(max_examples=40, deadline=None)
@given(size=st.integers(0, 300_000), counter=st.integers(0, REJECT - 1),
       cuts=st.lists(st.integers(1, 70_000), max_size=12), seed=st.integers(0, 2**32 - 1))
def test_pieces_seal_and_open_what_the_oracle_does(size, counter, cuts, seed):
    """A packet sealed or opened in pieces of any sizes (large stream packets,
    msgnet._stream.PIECE) is byte for byte the one-shot AEAD of §2.2."""
    payload = random.Random(seed).randbytes(size)
    expected = data_packet(KEY_AB, INDEX_B, counter, payload)
    for name in PIECE_BACKENDS:
        previous = _packet.set_aead_backend(name)
        try:
            a = sender(_packet, send_counter=counter)
            assert _packet.seal_in_pieces(a, payload, cuts) == expected, name
            assert a.send_counter == counter + 1  # the counter is spent as by seal()
            assert _packet.open_in_pieces(receiver(_packet), expected, cuts) == payload, name
        finally:
            _packet.set_aead_backend(previous)


@needs_extension
@pytest.mark.skipif(not PIECE_BACKENDS, reason="no libcrypto in this build")
def test_pieces_refuse_forgeries_and_replays():
    """Opening in pieces verifies the tag before anything counts as opened, and the replay
    window refuses a counter twice, as open() does."""
    previous = _packet.set_aead_backend(PIECE_BACKENDS[0])
    try:
        payload = os.urandom(200_000)
        packet = sender(_packet, send_counter=5).seal(payload)
        for position in (0, 1, 12, 13, 100_000, len(packet) - 17, len(packet) - 1):
            forged = bytearray(packet)
            forged[position] ^= 0x40
            try:
                opened = _packet.open_in_pieces(receiver(_packet), bytes(forged), [4096, 65536])
            except ProtocolViolation as dropped:
                assert dropped.reason == "auth_failed", position
            else:  # a header no longer naming this session's DATA is not opened at all
                assert opened is None and position < 13, position
        b = receiver(_packet)
        assert _packet.open_in_pieces(b, packet, [65536]) == payload
        assert _packet.open_in_pieces(b, packet, [65536]) is None  # declined: a replay
        assert drop_reason(b, packet) == "replay"                  # which open() names
    finally:
        _packet.set_aead_backend(previous)


@needs_extension
def test_pieces_are_declined_where_they_cannot_be_used(backend):
    """Plaintext sessions, and backends that take packets whole, seal and open whole."""
    payload = os.urandom(300_000)
    plain = sender(_packet, plaintext=True)
    assert _packet.seal_in_pieces(plain, payload, [65536]) is None
    assert plain.send_counter == 0  # nothing spent
    sealed = _packet.seal_in_pieces(sender(_packet), payload, [65536])
    assert (sealed is not None) == (backend in PIECE_BACKENDS)


# -- AES-256-GCM (docs/wire.md 2.2, 2.3.2) ----------------------------------------------------

needs_aes = pytest.mark.skipif(_packet is None or not _packet.AES_GCM,
                               reason="no AES-256-GCM here (libsodium without AES-NI/PCLMUL)")


def aes_packet(key, receiver_index, counter, payload):
    """A DATA packet of an AES-256-GCM session, from the text of §2.2 with cryptography."""
    header = bytes([limits.PACKET_DATA]) + receiver_index.to_bytes(4, "big") + counter.to_bytes(
        8, "big")
    nonce = bytes(4) + counter.to_bytes(8, "little")
    return header + AESGCM(key).encrypt(nonce, payload, header)


def aes_pair(module, send_counter=0):
    return (module.SessionCrypto(INDEX_A, INDEX_B, KEY_AB, KEY_BA, False, send_counter, aes=True),
            module.SessionCrypto(INDEX_B, INDEX_A, KEY_BA, KEY_AB, False, aes=True))


@needs_aes
@settings(max_examples=40, deadline=None)
@given(counter=st.integers(0, REJECT - 1), payload=payloads)
def test_aes_sessions_match_the_oracle_on_every_backend(counter, payload):
    """An AES-256-GCM session seals byte for byte what cryptography's AESGCM seals for the
    layout of §2.2, and opens it, whichever backend serves ChaCha20-Poly1305 sessions; so
    does the pure-Python twin."""
    expected = aes_packet(KEY_AB, INDEX_B, counter, payload)
    for name in BACKENDS:
        previous = _packet.set_aead_backend(name)
        try:
            a, b = aes_pair(_packet, counter)
            assert a.aes and b.aes
            assert a.seal(payload) == expected, name
            assert b.open(expected) == payload, name
        finally:
            _packet.set_aead_backend(previous)
    a, b = aes_pair(_packet_py, counter)
    assert a.seal(payload) == expected
    assert b.open(expected) == payload


@needs_aes
def test_busy_aes_sessions_seal_and_open_as_before():
    """From its AES_KEYS_AFTER-th packet a session keeps its AES key schedules expanded, and
    from EVP_AES_FROM bytes libcrypto seals where linked (the key held across packets, or
    changed when two sessions alternate): the packets stay byte for byte the oracle's, open,
    and a forgery still fails."""
    a, b = aes_pair(_packet)
    c = _packet.SessionCrypto(INDEX_A, INDEX_B, KEY_BA, KEY_AB, False, aes=True)  # other keys
    rng = random.Random(5)
    sizes = [0, 1, 64, 700, 1023, 1024, 1200, 9000, 32_767, 32_768, 64_971]
    for counter in range(3 * _packet.AES_KEYS_AFTER):
        payload = rng.randbytes(rng.choice(sizes))
        assert c.seal(payload) == aes_packet(KEY_BA, INDEX_B, counter, payload), counter
        expected = aes_packet(KEY_AB, INDEX_B, counter, payload)
        assert a.seal(payload) == expected, counter
        if counter % 50 == 49:
            forged = bytearray(expected)
            forged[-1] ^= 1
            assert drop_reason(b, bytes(forged)) == "auth_failed", counter
        assert b.open(expected) == payload, counter
        assert b.seal(payload) == aes_packet(KEY_BA, INDEX_A, counter, payload), counter


@needs_aes
@pytest.mark.parametrize("size", [0, 1, 64, 511, 512, 1200, 65_536, 300_000])
def test_aes_refuses_forgeries_and_the_other_cipher(size):
    """A flipped bit anywhere is auth_failed; a ChaCha20-Poly1305 packet under the same key
    is not an AES-256-GCM one, nor the reverse (each key serves one cipher)."""
    payload = os.urandom(size)
    a, b = aes_pair(_packet)
    packet = a.seal(payload)
    for position in (0 if size else None, len(packet) // 2, len(packet) - 1):
        if position is None or position < 13:
            continue  # the header: its index and counter are checked before the tag
        forged = bytearray(packet)
        forged[position] ^= 1
        assert drop_reason(aes_pair(_packet)[1], bytes(forged)) == "auth_failed", position
    assert drop_reason(receiver(_packet), packet) == "auth_failed"
    assert drop_reason(b, sender(_packet).seal(payload)) == "auth_failed"
    assert b.open(packet) == payload


@needs_aes
@pytest.mark.skipif(not PIECE_BACKENDS, reason="no libcrypto in this build")
@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 300_000), cuts=st.lists(st.integers(1, 70_000), max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_aes_pieces_seal_and_open_what_the_oracle_does(size, cuts, seed):
    """Large stream packets of an AES-256-GCM session, sealed and opened in pieces, are the
    one-shot AES-256-GCM of §2.2."""
    payload = random.Random(seed).randbytes(size)
    expected = aes_packet(KEY_AB, INDEX_B, 9, payload)
    for name in PIECE_BACKENDS:
        previous = _packet.set_aead_backend(name)
        try:
            a, b = aes_pair(_packet, 9)
            assert _packet.seal_in_pieces(a, payload, cuts) == expected, name
            assert a.sealed_bytes == size
            assert _packet.open_in_pieces(b, expected, cuts) == payload, name
            forged = bytearray(expected)
            forged[-1] ^= 1
            with pytest.raises(ProtocolViolation):
                _packet.open_in_pieces(aes_pair(_packet)[1], bytes(forged), cuts)
        finally:
            _packet.set_aead_backend(previous)


@pytest.mark.parametrize("module", IMPLS)
def test_aes_sealing_stops_at_its_byte_limit(module):
    """§2.3.2: an AES-256-GCM session seals at most AES_GCM_REJECT_AFTER_BYTES of payload per
    direction; the packet that would pass it is refused, not sealed."""
    if module is _packet and not _packet.AES_GCM:
        pytest.skip("no AES-256-GCM here")
    a, b = aes_pair(module)
    a.sealed_bytes = limits.AES_GCM_REJECT_AFTER_BYTES - 100
    assert b.open(a.seal(bytes(100))) == bytes(100)  # exactly at the limit: still sealed
    with pytest.raises(ClosedError, match="AES"):
        a.seal(b"x")
    assert a.send_counter == 1  # the refused packet spent no counter
    if module is _packet and PIECE_BACKENDS:
        assert _packet.seal_in_pieces(a, bytes(300_000), [65536]) is None


@needs_extension
def test_aes_is_refused_where_it_cannot_be_used():
    for module in IMPLS:
        with pytest.raises(UsageError):
            module.SessionCrypto(INDEX_A, INDEX_B, None, None, True, aes=True)
    if not _packet.AES_GCM:
        with pytest.raises(UsageError):
            _packet.SessionCrypto(INDEX_A, INDEX_B, KEY_AB, KEY_BA, aes=True)


@needs_extension
def test_aes_gcm_offer_follows_the_machine_and_the_environment():
    """AES_GCM is offered where libsodium has AES-256-GCM, and MSGNET_AES_GCM=0 withdraws it
    (read at import, so in a process of its own)."""
    code = "import msgnet._packet as p; print(p.AES_GCM, p.HAVE_SODIUM)"
    offered = {}
    for value in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "MSGNET_AES_GCM": value}, check=True, timeout=60)
        offered[value], have_sodium = out.stdout.split()
        assert have_sodium == str(_packet.HAVE_SODIUM)
    assert offered["0"] == "False"
    if os.environ.get("MSGNET_AES_GCM", "1") != "0":  # this process's own offer is the machine's
        assert offered["1"] == str(_packet.AES_GCM)
