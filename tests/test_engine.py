"""The Cython UDP engine over real sockets on 127.0.0.1: both loops, both receive paths.

No handshake: two engines get sessions with matching keys installed by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

import pytest
import uvloop

from msgnet import limits
from msgnet._engine import COUNTER_NAMES, HAVE_GSO, HAVE_RECVMMSG, Message, Session, UdpEngine
from msgnet._frame import (
    Ack,
    Bound,
    Close,
    DeliveryAck,
    Ping,
    decode_packet,
    encode_continuation,
    encode_frame,
    encode_init,
)
from msgnet._packet import SessionCrypto
from msgnet._testing import wait_for as until
from msgnet.errors import ClosedError, MessageTooLargeError, UsageError

INDEX_A = 0x0A0A0A0A  # A's local index: the receiver index of DATA sent to A
INDEX_B = 0x0B0B0B0B

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
MODES = ["recvmmsg", "endpoint"] if HAVE_RECVMMSG else ["endpoint"]


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """Run a coroutine on a fresh loop of the parametrized kind."""
    def runner(coro):
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(coro)
    return runner


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


class Delegate:
    """Records every delegate call as (name, *args)."""

    def __init__(self):
        self.calls = []

    def of(self, name):
        return [call[1:] for call in self.calls if call[0] == name]

    def handle_control(self, data, addr):
        self.calls.append(("control", data, addr))

    def handle_response(self, session, request_id, data):
        self.calls.append(("response", session, request_id, data))

    def handle_reset(self, session, protocol, code):
        self.calls.append(("reset", session, protocol, code))

    def handle_pong(self, session, data):
        self.calls.append(("pong", session, data))

    def handle_ack(self, session, transport_id):
        self.calls.append(("ack", session, transport_id))

    def handle_close(self, session, code, reason):
        self.calls.append(("close", session, code, reason))

    def handle_delivery_ack(self, session, largest, ack_delay_us, first_range, ranges):
        self.calls.append(("delivery_ack", session, largest, ack_delay_us, first_range, ranges))


class Peer:
    """One end: a bound socket, its engine, one session with the other end."""

    def __init__(self, loop, mode, name, **engine_kw):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()
        self.delegate = Delegate()
        self.handlers = {}
        self.received = []
        self.engine = UdpEngine(self.sock, loop, self.delegate, self.handlers,
                                use_recvmmsg=(mode == "recvmmsg"), **engine_kw)
        self.session = None

    def collect(self, protocol):
        """Record messages on protocol in self.received."""
        self.handlers[protocol] = self.received.append

    def counters(self):
        return self.engine.counters()

    def close(self):
        self.engine.close()
        self.sock.close()


@contextlib.asynccontextmanager
async def pair(mode, **engine_kw):
    """Two started engines with an established session each way; fails the test if the loop's
    exception handler fired (unless the test takes the recorded contexts off `errors`)."""
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    a = b = None
    try:
        a = Peer(loop, mode, "a", **engine_kw)
        b = Peer(loop, mode, "b", **engine_kw)
        key_ab, key_ba = os.urandom(32), os.urandom(32)
        a.session = a.engine.new_session("peer-b", INDEX_A, True)
        b.session = b.engine.new_session("peer-a", INDEX_B, False)
        a.engine.add_session(a.session)
        b.engine.add_session(b.session)
        await a.engine.start()
        await b.engine.start()
        a.engine.install_keys(a.session, INDEX_B, SessionCrypto(INDEX_A, INDEX_B, key_ab, key_ba),
                              b.addr)
        b.engine.install_keys(b.session, INDEX_A, SessionCrypto(INDEX_B, INDEX_A, key_ba, key_ab),
                              a.addr)
        a.keys = b.keys = (key_ab, key_ba)
        a.errors = b.errors = errors
        yield a, b
        assert errors == [], errors
    finally:
        for peer in (a, b):
            if peer is not None:
                peer.close()


def raw_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def forge_from_a(a, send_counter):
    """A second SessionCrypto with A's sending key: seals packets B accepts as A's."""
    key_ab, key_ba = a.keys
    return SessionCrypto(INDEX_A, INDEX_B, key_ab, key_ba, send_counter=send_counter)


# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_counter_names_match_wire_names():
    for name in ("truncated", "not_msgnet", "unknown_packet_type", "unknown_session", "replay",
                 "auth_failed", "counter_exhausted", "plaintext_refused", "bad_frame",
                 "unknown_frame", "unknown_alias", "no_handler", "oversize", "handler_error",
                 "reply_dropped", "send_errors", "packets_in", "bytes_in", "packets_out",
                 "bytes_out", "messages_in", "messages_out"):
        assert name in COUNTER_NAMES
    assert len(set(COUNTER_NAMES)) == len(COUNTER_NAMES)


@pytest.mark.timeout(20)
def test_objects_are_made_by_the_engine():
    with pytest.raises(TypeError):
        Message()
    with pytest.raises(TypeError):
        Session()


@pytest.mark.timeout(20)
def test_messages_on_several_protocols_both_ways(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            for peer in (a, b):
                peer.collect("/x/1")
                peer.collect("/y/1")
            for i in range(5):
                assert a.engine.send_message(a.session, "/x/1", b"ax%d" % i)
                assert a.engine.send_message(a.session, "/y/1", b"ay%d" % i)
                assert b.engine.send_message(b.session, "/y/1", bytearray(b"by%d" % i))
            await until(lambda: len(b.received) == 10 and len(a.received) == 5)
            assert [m.data for m in b.received if m.protocol == "/x/1"] == [
                b"ax%d" % i for i in range(5)]
            assert [m.data for m in b.received if m.protocol == "/y/1"] == [
                b"ay%d" % i for i in range(5)]
            assert [m.data for m in a.received] == [b"by%d" % i for i in range(5)]
            msg = b.received[0]
            assert type(msg.data) is bytes
            assert msg.from_peer == "peer-a" and msg.session is b.session
            assert msg.request_id is None and not msg.is_request and msg.flags == 0
            assert "/x/1" in repr(msg)
            assert b.counters()["messages_in"] == 10
            assert a.counters()["messages_out"] == 10
            assert b.session.protocols_in == {0: "/x/1", 1: "/y/1"}
            assert a.session.protocols_out == {"/x/1": 0, "/y/1": 1}
            assert b.session.last_received > 0 and a.session.last_sent > 0
            assert a.session.queued_bytes == 0
    run(main())


@pytest.mark.timeout(20)
def test_init_until_bound_then_continuation(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            assert not a.session.is_bound("/p")
            a.engine.send_message(a.session, "/p", b"one")
            await until(lambda: a.session.is_bound("/p"))
            a.engine.send_message(a.session, "/p", b"two")
            a.engine.send_message(a.session, "/p", b"three")
            await until(lambda: len(b.received) == 3)
            assert [m.data for m in b.received] == [b"one", b"two", b"three"]
            counters = b.counters()
            assert counters["init_frames_in"] == 1
            assert counters["continuation_frames_in"] == 2
    run(main())


@pytest.mark.timeout(20)
def test_unknown_protocol_is_reset_with_code_1(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            a.engine.send_message(a.session, "/nobody/home", b"hello")
            await until(lambda: a.delegate.of("reset"))
            assert a.delegate.of("reset") == [(a.session, "/nobody/home",
                                               limits.RESET_NO_HANDLER)]
            assert b.counters()["no_handler"] == 1
            assert b.session.protocols_in == {}
    run(main())


@pytest.mark.timeout(20)
def test_a_removed_session_gets_no_more_packets(run, mode):
    """The engine remembers the session the last packet was for (a peer's packets come in
    runs); once that session is removed its packets are unknown_session, not delivered."""
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            a.engine.send_message(a.session, "/p", b"m1")
            await until(lambda: len(b.received) == 1)
            b.engine.remove_session(b.session)
            a.engine.send_message(a.session, "/p", b"m2")
            await until(lambda: b.counters()["unknown_session"] >= 1)
            await asyncio.sleep(0.05)
            assert [m.data for m in b.received] == [b"m1"]
    run(main())


@pytest.mark.timeout(20)
def test_lost_alias_is_reset_with_code_2_and_resent_as_init(run, mode):
    """B loses its alias table (a fresh Session on the same keys, as if B had restarted its
    tables): A's CONTINUATION names an alias B does not know. B answers RESET(alias, 2), A goes
    back to INIT, and later messages are delivered."""
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            a.engine.send_message(a.session, "/p", b"m1")
            await until(lambda: a.session.is_bound("/p"))
            crypto = b.session.crypto
            b.engine.remove_session(b.session)
            b.session = b.engine.new_session("peer-a", INDEX_B, False)
            b.engine.add_session(b.session)
            b.engine.install_keys(b.session, INDEX_A, crypto, a.addr)

            a.engine.send_message(a.session, "/p", b"m2")  # CONTINUATION: lost
            await until(lambda: a.delegate.of("reset"))
            assert a.delegate.of("reset") == [(a.session, "/p", limits.RESET_UNKNOWN_ALIAS)]
            assert not a.session.is_bound("/p")
            assert b.counters()["unknown_alias"] == 1

            a.engine.send_message(a.session, "/p", b"m3")  # INIT again
            await until(lambda: len(b.received) == 2)
            assert [m.data for m in b.received] == [b"m1", b"m3"]
            assert b.received[1].session is b.session
            assert b.counters()["init_frames_in"] == 2
    run(main())


@pytest.mark.timeout(20)
def test_messages_of_one_iteration_are_coalesced(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/coalesce")
            before = a.counters()["packets_out"]
            for i in range(100):
                assert a.engine.send_message(a.session, "/coalesce", b"%020d" % i)
            await until(lambda: len(b.received) == 100)
            assert [m.data for m in b.received] == [b"%020d" % i for i in range(100)]
            # 100 INIT frames of 35 bytes fill 1171-byte payloads: 3 packets.
            assert a.counters()["packets_out"] - before <= 4
            assert b.counters()["packets_in"] <= 4
    run(main())


@pytest.mark.timeout(20)
def test_responses_go_to_the_delegate(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            requests = []

            def serve(msg):
                requests.append(msg)
                msg.reply(b"re:" + msg.data)

            b.handlers["/req"] = serve
            a.engine.send_message(a.session, "/req", b"q1", limits.FLAG_REQUEST, 7)
            a.engine.send_message(a.session, "/req", b"q2", limits.FLAG_REQUEST, 8)
            await until(lambda: len(a.delegate.of("response")) == 2)
            assert a.delegate.of("response") == [(a.session, 7, b"re:q1"),
                                                 (a.session, 8, b"re:q2")]
            assert requests[0].is_request and requests[0].request_id == 7
            # A has no handler for /req: the responses were bound, not reset.
            assert a.counters()["no_handler"] == 0
            assert b.delegate.of("reset") == []
            with pytest.raises(UsageError):
                a.engine.send_message(a.session, "/req", b"", limits.FLAG_RESPONSE, None)
    run(main())


@pytest.mark.timeout(20)
def test_reply_needs_a_request(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            a.engine.send_message(a.session, "/p", b"not a request")
            await until(lambda: b.received)
            with pytest.raises(UsageError):
                b.received[0].reply(b"no")
    run(main())


@pytest.mark.timeout(20)
def test_reply_is_dropped_when_the_queue_is_full(run, mode):
    async def main():
        async with pair(mode, max_queue_payloads=1) as (a, b):
            replies = []

            def serve(msg):
                # Fill B's queue in the handler: the reply cannot be queued and is dropped.
                while b.engine.send_message(b.session, "/fill", bytes(1150)):
                    pass
                msg.reply(b"late")
                replies.append(msg)

            b.handlers["/req"] = serve
            a.engine.send_message(a.session, "/req", b"q", limits.FLAG_REQUEST, 1)
            await until(lambda: replies)
            assert b.counters()["reply_dropped"] == 1
    run(main())


@pytest.mark.timeout(20)
def test_handler_exception_goes_to_the_loop_and_delivery_continues(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            def handler(msg):
                if msg.data == b"boom":
                    raise RuntimeError("handler bug")
                b.received.append(msg)

            b.handlers["/p"] = handler
            a.engine.send_message(a.session, "/p", b"boom")
            a.engine.send_message(a.session, "/p", b"after")
            await until(lambda: b.received)
            a.engine.send_message(a.session, "/p", b"later")
            await until(lambda: len(b.received) == 2)
            assert [m.data for m in b.received] == [b"after", b"later"]
            assert b.counters()["handler_error"] == 1
            [context] = b.errors
            assert isinstance(context["exception"], RuntimeError)
            assert "'/p'" in context["message"]
            b.errors.clear()
    run(main())


@pytest.mark.timeout(20)
def test_garbage_is_counted_and_good_traffic_flows(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            a.engine.send_message(a.session, "/p", b"first")
            await until(lambda: len(b.received) == 1)
            forged = forge_from_a(a, a.session.crypto.send_counter + 100)
            replayed = forged.seal(encode_init(1, "/p", 0, b"forged"))
            unknown_index = bytearray(replayed)
            unknown_index[1:5] = b"\xde\xad\xbe\xef"
            bad_tag = bytearray(forged.seal(encode_init(1, "/p", 0, b"x")))
            bad_tag[-1] ^= 1
            # Valid message, then an invalid frame type (0x80) / unknown frame type (0x0A):
            # the message is kept, the rest dropped.
            bad_frame = forged.seal(encode_continuation(0, b"kept1") + b"\x80\x00")
            unknown_frame = forged.seal(encode_continuation(0, b"kept2") + b"\x0a\x00")
            plain = bytes([limits.PACKET_PLAIN_DATA]) + struct.pack(">IQ", INDEX_B, 5) + b"x"

            garbage = {
                "truncated": [b"", b"\x07", b"\x07" + bytes(27), b"\x0a\x0b\x0b"],
                "not_msgnet": [b"\x00", b"\x03abc", b"\x10" * 40, b"\xff" * 100,
                               b"\x42" + os.urandom(60)],
                "unknown_packet_type": [bytes([t]) + os.urandom(40) for t in range(0x0C, 0x10)],
                "unknown_session": [bytes(unknown_index)],
                "auth_failed": [bytes(bad_tag)],
                "plaintext_refused": [plain],
                "oversize": [bytes([limits.PACKET_DATA]) + bytes(limits.MAX_DATAGRAM_CEILING)],
            }
            # Truncated handshake-family packets go to the network (it owns their formats).
            control = [bytes([t]) for t in (0x04, 0x05, 0x06, 0x08, 0x09, 0x0B)]
            sender = raw_socket()
            try:
                for packets in garbage.values():
                    for packet in packets:
                        sender.sendto(packet, b.addr)
                for packet in control:
                    sender.sendto(packet, b.addr)
                sender.sendto(replayed, b.addr)
                sender.sendto(replayed, b.addr)
                sender.sendto(bad_frame, b.addr)
                sender.sendto(unknown_frame, b.addr)
                total = sum(map(len, garbage.values())) + len(control) + 4
                await until(lambda: b.counters()["packets_in"] >= total + 1)
            finally:
                sender.close()
            counters = b.counters()
            for name, packets in garbage.items():
                assert counters[name] == len(packets), name
            assert counters["replay"] == 1
            assert counters["bad_frame"] == 1
            assert counters["unknown_frame"] == 1
            assert [call[0] for call in b.delegate.of("control")] == (
                garbage["unknown_session"] + control)
            assert [m.data for m in b.received] == [b"first", b"forged", b"kept1", b"kept2"]

            a.engine.send_message(a.session, "/p", b"still flowing")
            await until(lambda: len(b.received) == 5)
            assert b.received[-1].data == b"still flowing"
            assert b.session.address == a.addr  # no garbage moved the session
    run(main())


@pytest.mark.timeout(20)
def test_authenticated_packets_move_the_session_address(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            forged = forge_from_a(a, 500)
            roaming = raw_socket()
            try:
                bad = bytearray(forged.seal(encode_init(1, "/p", 0, b"unauthenticated")))
                bad[20] ^= 1
                roaming.sendto(bytes(bad), b.addr)
                await until(lambda: b.counters()["auth_failed"] == 1)
                assert b.session.address == a.addr
                roaming.sendto(forged.seal(encode_init(1, "/p", 0, b"roamed")), b.addr)
                await until(lambda: b.received)
                assert b.session.address == roaming.getsockname()
                # B now answers at the new address (its BOUND reply went there).
                roaming.settimeout(5)
                reply = roaming.recv(2000)
                assert reply[0] == limits.PACKET_DATA
            finally:
                roaming.close()
    run(main())


@pytest.mark.timeout(20)
def test_back_pressure_and_wait_drained(run, mode):
    async def main():
        async with pair(mode, max_queue_payloads=4) as (a, b):
            b.collect("/big")
            big = bytes(1100)  # one per payload
            accepted = 0
            while a.engine.send_message(a.session, "/big", big):
                accepted += 1
            assert accepted == 5  # four queued payloads and the open one
            drained = a.engine.wait_drained(a.session)
            assert not drained.done()
            await asyncio.wait_for(drained, 5)
            assert a.engine.send_message(a.session, "/big", big)
            await until(lambda: len(b.received) == accepted + 1)
            assert a.engine.wait_drained(a.session).done()
    run(main())


@pytest.mark.timeout(20)
def test_send_validation(run, mode):
    async def main():
        async with pair(mode) as (a, _b):
            engine, session = a.engine, a.session
            with pytest.raises(MessageTooLargeError):
                engine.send_message(session, "/p", bytes(1200))
            with pytest.raises(UsageError):
                engine.send_message(session, "/p", b"", limits.FLAG_SEQ)
            with pytest.raises(UsageError):
                both = limits.FLAG_REQUEST | limits.FLAG_RESPONSE
                engine.send_message(session, "/p", b"", both, 1)
            with pytest.raises(UsageError):
                engine.send_message(session, "/p", b"", 0, 5)
            for flags in (limits.FLAG_REQUEST, limits.FLAG_RESPONSE):
                for bad in (None, -1, 2**63, 2**70, "7", 1.5):
                    with pytest.raises(UsageError, match="request_id"):
                        engine.send_message(session, "/p", b"", flags, bad)
                assert engine.send_message(session, "/p", b"", flags, 2**63 - 1)
                assert engine.send_message(session, "/p", b"", flags, 0)
            with pytest.raises(UsageError):
                engine.send_message(session, "", b"")
            with pytest.raises(UsageError):
                engine.send_message(session, "x" * 257, b"")
            with pytest.raises(TypeError):
                engine.send_message(session, "/p", "text")
            with pytest.raises(UsageError):
                engine.new_session("p", 0, True)
            with pytest.raises(UsageError):
                engine.add_session(engine.new_session("p", INDEX_A, True))
            engine.remove_session(session)
            with pytest.raises(ClosedError):
                engine.send_message(session, "/p", b"")
            with pytest.raises(ClosedError):
                await engine.wait_drained(session)
    run(main())


@pytest.mark.timeout(20)
def test_control_frames_reach_the_delegate(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            a.engine.send_control(a.session, encode_frame(Ping(b"abcd")))
            a.engine.send_control(a.session, encode_frame(Ack(3)))
            a.engine.send_control(a.session, encode_frame(DeliveryAck(10, 5, 2, [(1, 1)])))
            a.engine.send_control(a.session, encode_frame(DeliveryAck(1 << 40, 0, 7, [])))
            many = [(i, 2 * i + 1) for i in range(limits.MAX_ACK_RANGES)]
            a.engine.send_control(a.session, encode_frame(DeliveryAck(3 << 20, 1, 0, many)))
            a.engine.send_control(a.session, encode_frame(Close(2, "bye")))
            await until(lambda: a.delegate.of("pong") and b.delegate.of("close"))
            assert a.delegate.of("pong") == [(a.session, b"abcd")]
            assert b.delegate.of("ack") == [(b.session, 3)]
            # DELIVERY_ACK arrives decoded: largest, ack delay, first range, (gap, range)s.
            assert b.delegate.of("delivery_ack") == [
                (b.session, 10, 5, 2, ((1, 1),)), (b.session, 1 << 40, 0, 7, ()),
                (b.session, 3 << 20, 1, 0, tuple(many))]
            assert b.delegate.of("close") == [(b.session, 2, "bye")]
    run(main())


@pytest.mark.timeout(20)
def test_first_frames_ride_in_the_handshake(run, mode):
    """Before keys the queue holds: take_payload pops whole frames for the FINISH, the
    responder runs them with process_payload, install_keys sends the rest, and
    flush_session(force) confirms with one DATA packet even when nothing is queued."""
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/early")
            index_a2, index_b2 = 0x0D0D0D0D, 0x0C0C0C0C
            pending = a.engine.new_session("peer-b", index_a2, True)
            a.engine.add_session(pending)
            for i in range(3):
                assert a.engine.send_message(pending, "/early", b"early%d" % i)
            await asyncio.sleep(0.01)
            assert a.counters()["packets_out"] == 0 and pending.queued_bytes > 0
            one = len(encode_init(1, "/early", 0, b"early0"))
            frames = a.engine.take_payload(pending, 2 * one + 3)  # room for two whole frames
            assert len(frames) == 2 * one

            key_ab, key_ba = os.urandom(32), os.urandom(32)
            responder = b.engine.new_session("peer-a", index_b2, False)
            b.engine.add_session(responder)
            b.engine.install_keys(responder, index_a2,
                                  SessionCrypto(index_b2, index_a2, key_ba, key_ab), a.addr)
            b.engine.process_payload(responder, frames, a.addr)
            assert [m.data for m in b.received] == [b"early0", b"early1"]
            assert b.received[0].session is responder

            a.engine.install_keys(pending, index_b2,
                                  SessionCrypto(index_a2, index_b2, key_ab, key_ba), b.addr)
            await until(lambda: len(b.received) == 3)
            assert b.received[2].data == b"early2" and pending.queued_bytes == 0

            received = b.counters()["packets_in"]
            a.engine.flush_session(a.session, True)  # nothing queued: one empty DATA packet
            await until(lambda: b.counters()["packets_in"] == received + 1)
            assert b.counters()["bad_frame"] == 0
    run(main())


@pytest.mark.timeout(20)
def test_more_packets_than_the_send_ring(run, mode):
    async def main():
        async with pair(mode, batch=2) as (a, b):
            b.collect("/big")
            for i in range(9):
                assert a.engine.send_message(a.session, "/big", bytes([i]) * 1100)
            await until(lambda: len(b.received) == 9)
            assert [m.data[0] for m in b.received] == list(range(9))
            assert a.counters()["packets_out"] == 9
    run(main())


@pytest.mark.timeout(20)
def test_retained_packets_answer_session_unknown(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            opener = SessionCrypto(INDEX_B, INDEX_A, a.keys[1], a.keys[0])
            sniffer = raw_socket()
            sniffer.settimeout(5)
            try:
                a.engine.install_keys(a.session, INDEX_B, a.session.crypto,
                                      sniffer.getsockname())
                packets = []
                for i in range(limits.RETAIN_SENT_PACKETS + 6):
                    a.engine.send_message(a.session, "/p", b"msg%d" % i)
                    a.engine.flush()
                    packets.append(sniffer.recv(2000))
                counters = [struct.unpack(">Q", p[5:13])[0] for p in packets]
                tags = [p[-16:] for p in packets]
                payloads = [opener.open(p) for p in packets]
                assert [f.payload for f in decode_packet(payloads[-1])] == [b"msg69"]
                assert a.session.retained_since(counters[-3], tags[-3]) == payloads[-3:]
                oldest = -limits.RETAIN_SENT_PACKETS
                assert a.session.retained_since(counters[oldest], tags[oldest]) == (
                    payloads[oldest:])
                assert a.session.retained_since(counters[5], tags[5]) is None  # evicted
                assert a.session.retained_since(counters[-2], tags[-3]) is None
                assert a.session.retained_since(counters[-1] + 1, tags[-1]) is None
            finally:
                sniffer.close()
    run(main())


@pytest.mark.timeout(20)
def test_delivery_layer_packets_are_retained_by_tag_only(run, mode):
    """send_payload's packets (the delivery layer's, which retransmits them itself) answer a
    SESSION_UNKNOWN but pin no payload; a best-effort packet sent before them still comes
    back for re-sending (docs/wire.md 2.5)."""
    async def main():
        async with pair(mode) as (a, _b):
            sniffer = raw_socket()
            sniffer.settimeout(5)
            try:
                a.engine.install_keys(a.session, INDEX_B, a.session.crypto,
                                      sniffer.getsockname())
                a.engine.send_message(a.session, "/p", b"best effort")
                a.engine.flush()
                packets = [sniffer.recv(2000)]
                for _ in range(3):
                    a.engine.send_payload(a.session, encode_continuation(0, bytes(1000)))
                    packets.append(sniffer.recv(2000))
                counters = [struct.unpack(">Q", p[5:13])[0] for p in packets]
                tags = [p[-16:] for p in packets]
                assert a.session.retained_count == 4
                resent = a.session.retained_since(counters[0], tags[0])
                assert [[f.payload for f in decode_packet(p)] for p in resent] == [
                    [b"best effort"]]
                assert a.session.retained_since(counters[1], tags[1]) == []
                assert a.session.retained_since(counters[3], tags[3]) == []
                assert a.session.retained_since(counters[2], tags[1]) is None
            finally:
                sniffer.close()
    run(main())


@pytest.mark.timeout(20)
def test_ipv6(run, mode):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    async def main():
        loop = asyncio.get_running_loop()
        socks, engines = [], []
        try:
            for _ in range(2):
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                try:
                    sock.bind(("::1", 0))
                except OSError:
                    sock.close()
                    pytest.skip("no ::1")
                socks.append(sock)
            delegates = [Delegate(), Delegate()]
            received = []
            handlers = [{}, {"/v6": received.append}]
            for sock, delegate, handler in zip(socks, delegates, handlers):
                engines.append(UdpEngine(sock, loop, delegate, handler,
                                         use_recvmmsg=(mode == "recvmmsg")))
            a, b = engines
            sa, sb = a.new_session("b", INDEX_A, True), b.new_session("a", INDEX_B, False)
            a.add_session(sa)
            b.add_session(sb)
            await a.start()
            await b.start()
            k1, k2 = os.urandom(32), os.urandom(32)
            a.install_keys(sa, INDEX_B, SessionCrypto(INDEX_A, INDEX_B, k1, k2),
                           socks[1].getsockname()[:2])
            b.install_keys(sb, INDEX_A, SessionCrypto(INDEX_B, INDEX_A, k2, k1),
                           socks[0].getsockname())
            assert sa.address == socks[1].getsockname()
            a.send_message(sa, "/v6", b"over six")
            await until(lambda: received)
            assert received[0].data == b"over six"
        finally:
            for engine in engines:
                engine.close()
            for sock in socks:
                sock.close()
    run(main())


# -- the send path's timing, GSO, retention memory -------------------------------------------


@pytest.mark.timeout(20)
def test_lone_request_leaves_at_once_and_a_burst_still_coalesces(run, mode):
    """A request with nothing else waiting is sent inside send_message; what follows it in
    the same iteration waits for the flush and shares packets; one-way messages always do."""
    async def main():
        async with pair(mode) as (a, b):
            b.collect("/p")
            sent = a.counters()["packets_out"]
            assert a.engine.send_message(a.session, "/p", b"lone", limits.FLAG_REQUEST, 1)
            assert a.counters()["packets_out"] == sent + 1  # before the loop ran again
            for i in range(2, 42):
                assert a.engine.send_message(a.session, "/p", b"burst", limits.FLAG_REQUEST, i)
            assert a.engine.send_message(a.session, "/p", b"one-way")
            assert a.counters()["packets_out"] == sent + 1  # the burst waits for the flush
            await until(lambda: len(b.received) == 42)
            assert [m.request_id for m in b.received[:41]] == list(range(1, 42))
            assert a.counters()["packets_out"] <= sent + 3  # 41 frames: one packet or two

            sent = a.counters()["packets_out"]
            assert a.engine.send_message(a.session, "/p", b"one-way alone")
            assert a.counters()["packets_out"] == sent  # one-way: coalesced, never at once
            await until(lambda: len(b.received) == 43)
    run(main())


@pytest.mark.timeout(20)
def test_reply_from_a_handler_leaves_with_the_receive_batch(run, mode):
    async def main():
        async with pair(mode) as (a, b):
            b.handlers["/echo"] = lambda m: m.reply(m.data.upper())
            for i in range(5):
                a.engine.send_message(a.session, "/echo", b"x%d" % i, limits.FLAG_REQUEST, i + 1)
            await until(lambda: len(a.delegate.of("response")) == 5)
            assert [r[2] for r in a.delegate.of("response")] == [b"X%d" % i for i in range(5)]
    run(main())


@pytest.mark.timeout(20)
@pytest.mark.parametrize("gso", [False, True])
def test_gso_sends_arrive_as_the_same_datagrams(run, gso):
    """Runs of same-size packets to one peer go to the kernel as one GSO send; the receiver
    sees exactly the datagrams of a plain send, each a DATA packet of its own."""
    if gso and not HAVE_GSO:
        pytest.skip("no UDP GSO on this platform")

    async def main():
        async with pair("recvmmsg" if HAVE_RECVMMSG else "endpoint", use_gso=gso) as (a, b):
            assert a.engine.use_gso == gso
            opener = SessionCrypto(INDEX_B, INDEX_A, a.keys[1], a.keys[0])
            sniffer = raw_socket()
            sniffer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sniffer.settimeout(5)
            try:
                a.engine.install_keys(a.session, INDEX_B, a.session.crypto,
                                      sniffer.getsockname())
                messages = [bytes([i]) * 1000 for i in range(100)] + [b"tail"]
                for data in messages:
                    assert a.engine.send_message(a.session, "/p", data)
                a.engine.flush()
                got = []
                while len(got) < len(messages):
                    packet = sniffer.recv(2000)
                    got += [f.payload for f in decode_packet(opener.open(packet))]
                assert got == messages
                assert a.counters()["packets_out"] == 100  # 1000 bytes each; the tail rides
                assert a.engine.use_gso == gso  # the kernel accepted it on loopback
            finally:
                sniffer.close()
    run(main())


UDP_SEGMENT, UDP_GRO = 103, 104


def _gso_burst(sender, packets, addr):
    """Send packets (equal sizes but the last) to addr as one UDP GSO send."""
    sender.sendmsg([b"".join(packets)],
                   [(socket.IPPROTO_UDP, UDP_SEGMENT, struct.pack("=H", len(packets[0])))],
                   0, addr)


@pytest.mark.timeout(20)
def test_gro_reads_split_into_datagrams(run):
    """With UDP GRO, a run of datagrams comes up in one read: each is still opened, checked
    and counted on its own; a forged one in the middle costs only itself, and a short last
    one is a datagram of its own too."""
    if not (HAVE_RECVMMSG and HAVE_GSO):
        pytest.skip("no recvmmsg / UDP GSO on this platform")

    async def main():
        async with pair("recvmmsg") as (a, b):
            if not b.engine.use_gro:
                pytest.skip("the kernel refused UDP GRO")
            b.collect("/p")
            a.engine.send_message(a.session, "/p", b"first")  # binds /p's alias
            await until(lambda: len(b.received) == 1)
            forged = forge_from_a(a, a.session.crypto.send_counter + 10)
            packets = [forged.seal(encode_continuation(0, b"m%03d" % i)) for i in range(20)]
            bad = bytearray(packets[7])
            bad[-1] ^= 1
            packets[7] = bytes(bad)
            packets.append(forged.seal(encode_continuation(0, b"end")))  # shorter: the last
            before = b.counters()
            sender = raw_socket()
            try:
                # The kernel keeps such a burst whole for a GRO socket (what the engine reads).
                probe = raw_socket()
                probe.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
                probe.settimeout(5)
                _gso_burst(sender, packets, probe.getsockname())
                assert len(probe.recv(65536)) == sum(map(len, packets))
                probe.close()
                _gso_burst(sender, packets, b.addr)
                await until(lambda: b.counters()["packets_in"] - before["packets_in"] == 21)
            finally:
                sender.close()
            await until(lambda: len(b.received) == 21)
            expected = [b"m%03d" % i for i in range(20) if i != 7] + [b"end"]
            assert [m.data for m in b.received[1:]] == expected
            assert b.counters()["auth_failed"] - before["auth_failed"] == 1
    run(main())


class _ClockLoop:
    """The running loop with its clock replaced: the engine reads time through loop.time."""

    def __init__(self, loop):
        self._loop = loop
        self.now = 1000.0

    def time(self):
        return self.now

    def __getattr__(self, name):
        return getattr(self._loop, name)


@pytest.mark.timeout(20)
def test_retention_ring_is_made_on_demand_and_freed_when_old(run, mode):
    async def main():
        loop = _ClockLoop(asyncio.get_running_loop())
        a, b = Peer(loop, mode, "a"), Peer(loop, mode, "b")
        try:
            key_ab, key_ba = os.urandom(32), os.urandom(32)
            a.session = a.engine.new_session("peer-b", INDEX_A, True)
            b.session = b.engine.new_session("peer-a", INDEX_B, False)
            a.engine.add_session(a.session)
            b.engine.add_session(b.session)
            await a.engine.start()
            await b.engine.start()
            a.engine.install_keys(a.session, INDEX_B,
                                  SessionCrypto(INDEX_A, INDEX_B, key_ab, key_ba), b.addr)
            b.engine.install_keys(b.session, INDEX_A,
                                  SessionCrypto(INDEX_B, INDEX_A, key_ba, key_ab), a.addr)
            b.collect("/p")
            assert a.session.retained_count == 0  # nothing sent: no ring
            for i in range(10):  # grows past its first allocation
                a.engine.send_message(a.session, "/p", b"m%d" % i)
                a.engine.flush()
            assert a.session.retained_count == 10
            await until(lambda: len(b.received) == 10)
            loop.now += limits.RETAIN_SENT_TIME / 2
            a.engine.send_message(a.session, "/p", b"later")
            a.engine.flush()
            a.engine.purge_retained()
            assert a.session.retained_count == 11  # nothing old enough yet
            loop.now += limits.RETAIN_SENT_TIME / 2
            a.engine.purge_retained()
            assert a.session.retained_count == 1  # the first ten are RETAIN_SENT_TIME old
            loop.now += limits.RETAIN_SENT_TIME
            a.engine.purge_retained()
            assert a.session.retained_count == 0  # and the ring is gone
            a.engine.send_message(a.session, "/p", b"again")  # a new ring when needed
            a.engine.flush()
            assert a.session.retained_count == 1
            await until(lambda: len(b.received) == 12)
            a.engine.remove_session(a.session)
            assert a.session.retained_count == 0
        finally:
            a.close()
            b.close()
    run(main())
