"""Attacks on sessions over real UDP sockets: each is dropped, counted, and delivers nothing.

The attacker sits on loopback: it records datagrams through a relay between the two hosts
and re-sends, flips or reflects them from its own socket.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import AsyncExitStack

import pytest

from msgnet import MessageHost, PeerUnreachableError, Reliable, SecurityError
from msgnet._testing import wait_for
from msgnet._testing.relay import Impairment, Relay
from msgnet.core.handshake import Handshaker
from msgnet.identity import KeyPair

pytestmark = pytest.mark.timeout(60)

DATA = 0x07


class Recorder:
    """Drop rule for the relay that records a->b DATA packets (and can hold one back)."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.hold_next = False
        self.held: bytes | None = None

    def __call__(self, packet: bytes, direction: str) -> bool:
        if direction == "a->b" and packet[0] == DATA:
            self.data.append(packet)
            if self.hold_next:
                self.hold_next = False
                self.held = packet
                return True
        return False


async def relayed_pair(stack: AsyncExitStack):
    """Two hosts; a reaches b only through a recording relay. Returns a, b, relay, recorder."""
    a = await stack.enter_async_context(MessageHost())
    b = await stack.enter_async_context(MessageHost())
    recorder = Recorder()
    relay = await Relay.start(b.network.sockets()[0].sockname, Impairment(drop_rule=recorder))
    stack.callback(relay.close)
    a.add_peer(f"/ip4/127.0.0.1/udp/{relay.address[1]}", b.peer_id)
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    stack.callback(attacker.close)
    return a, b, relay, recorder, attacker


def test_first_message_is_handled_after_one_and_a_half_round_trips(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, relay, _, _ = await relayed_pair(stack)
            seen = []
            b.set_message_handler("/x/1", lambda m: seen.append(dict(relay.impairment.counters)))
            await a.send_message(b.peer_id, "/x/1", b"first")
            await wait_for(lambda: seen)
            # INITIATION a->b, RESPONSE b->a, FINISH a->b carrying the message: 1.5 RTT.
            assert seen[0].get("a->b") == 2 and seen[0].get("b->a") == 1
            # A second message to the same peer needs no handshake: one datagram.
            before = dict(relay.impairment.counters)
            await a.send_message(b.peer_id, "/x/1", b"second")
            await wait_for(lambda: len(seen) == 2)
            assert seen[1]["a->b"] - before["a->b"] == 1

    run(main())


def test_replays_immediate_and_after_1000_packets_are_dropped(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, relay, recorder, attacker = await relayed_pair(stack)
            got: list[bytes] = []
            b.set_message_handler("/x/1", lambda m: got.append(m.data))
            await a.connect(b.peer_id)
            await a.send_message(b.peer_id, "/x/1", b"m0")
            await wait_for(lambda: got == [b"m0"])
            first = recorder.data[-1]
            target = b.network.sockets()[0].sockname
            attacker.sendto(first, target)  # immediate replay
            await asyncio.sleep(0.05)
            assert b.metrics()["replay"] == 1
            for i in range(1, 1101):  # one packet each: yield so every send is flushed alone
                await a.send_message(b.peer_id, "/x/1", b"m%d" % i)
                await asyncio.sleep(0)
            await wait_for(lambda: len(got) == 1101)
            attacker.sendto(first, target)  # far behind the window now
            attacker.sendto(recorder.data[-5], target)  # inside the window, already seen
            await asyncio.sleep(0.05)
            assert b.metrics()["replay"] == 3
            assert len(got) == 1101 and len(set(got)) == 1101

    run(main())


def test_bit_flips_anywhere_never_deliver_and_never_move_the_window(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, relay, recorder, attacker = await relayed_pair(stack)
            got: list[bytes] = []
            b.set_message_handler("/x/1", lambda m: got.append(m.data))
            await a.connect(b.peer_id)
            await a.send_message(b.peer_id, "/x/1", b"warm")
            await wait_for(lambda: got == [b"warm"])
            recorder.hold_next = True
            await a.send_message(b.peer_id, "/x/1", b"held back")
            await wait_for(lambda: recorder.held is not None)
            packet = recorder.held
            target = b.network.sockets()[0].sockname
            for bit in range(len(packet) * 8):
                flipped = bytearray(packet)
                flipped[bit // 8] ^= 1 << (bit % 8)
                attacker.sendto(bytes(flipped), target)
                if bit % 64 == 0:
                    await asyncio.sleep(0.001)
            await asyncio.sleep(0.1)
            counters = b.metrics()
            assert got == [b"warm"]
            dropped = sum(counters.get(name, 0) for name in (
                "auth_failed", "unknown_session", "not_msgnet", "unknown_packet_type",
                "replay", "truncated", "unknown_handshake", "initiation_too_short"))
            assert dropped >= len(packet) * 8 - 8  # flips into a handshake type may pass as one
            assert counters["auth_failed"] > 0
            attacker.sendto(packet, target)  # the genuine packet still opens afterwards
            await wait_for(lambda: got == [b"warm", b"held back"])

    run(main())


def test_spoofed_source_address_changes_nothing(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, relay, recorder, attacker = await relayed_pair(stack)
            got: list[bytes] = []
            b.set_message_handler("/x/1", lambda m: got.append(m.data))
            await a.connect(b.peer_id)
            await a.send_message(b.peer_id, "/x/1", b"m")
            await wait_for(lambda: got == [b"m"])
            session = b.network.sessions(a.peer_id)[0]
            address = session.address
            target = b.network.sockets()[0].sockname
            genuine = recorder.data[-1]
            forged = genuine[:13] + bytes(len(genuine) - 13)  # right index and counter, no key
            forged = forged[:5] + (2**40).to_bytes(8, "big") + forged[13:]
            attacker.sendto(forged, target)
            attacker.sendto(genuine, target)  # authentic but already seen: from elsewhere
            await asyncio.sleep(0.05)
            counters = b.metrics()
            assert counters["auth_failed"] >= 1 and counters["replay"] >= 1
            assert session.address == address and got == [b"m"]

    run(main())


def test_reflected_packets_are_dropped(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, relay, recorder, attacker = await relayed_pair(stack)
            got: list[bytes] = []
            a.set_message_handler("/x/1", lambda m: got.append(m.data))
            b.set_message_handler("/x/1", lambda m: got.append(m.data))
            await a.connect(b.peer_id)
            await a.send_message(b.peer_id, "/x/1", b"m")
            await wait_for(lambda: got == [b"m"])
            own = a.network.sockets()[0].sockname
            before = a.metrics()
            for packet in recorder.data:  # a's own DATA packets, sent back to a
                attacker.sendto(packet, own)
            await asyncio.sleep(0.05)
            after = a.metrics()
            assert after["unknown_session"] - before.get("unknown_session", 0) == \
                len(recorder.data)
            assert got == [b"m"]

    run(main())


def test_handshake_claiming_a_peer_id_without_its_key_fails(run):
    async def main():
        async with MessageHost() as b:
            victim = KeyPair.generate()
            impostor = Handshaker(KeyPair.generate())
            # The impostor presents the victim's identity key but can only sign with its own.
            honest = Handshaker(victim)
            impostor._payload = honest._payload  # victim's key and signature over *another* static
            impostor._finish_prefix = honest._finish_prefix
            got: list[bytes] = []
            b.set_message_handler("/x/1", lambda m: got.append(m.data))
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            target = b.network.sockets()[0].sockname
            try:
                for data, _ in impostor.initiate(target, loop.time(), local_index=7,
                                                 peer_id=b.peer_id):
                    sock.sendto(data, target)
                response = await asyncio.wait_for(loop.sock_recv(sock, 2048), 5)
                out = impostor.handle_packet(response, target, loop.time(),
                                             allocate_index=lambda: 8)
                for data, _ in out.datagrams:
                    sock.sendto(data, target)
                await wait_for(lambda: b.metrics().get("bad_signature", 0) == 1)
                assert not b.network.has_session(victim.peer_id) and got == []
            finally:
                sock.close()

    run(main())


def test_dial_to_the_wrong_peer_id_fails_with_security_error(run):
    async def main():
        async with MessageHost() as a, MessageHost() as b:
            b.set_message_handler("/x/1", lambda m: m.reply(b"no"))
            expected = KeyPair.generate().peer_id
            a.add_peer(b.network.listen_addrs()[0], expected)
            with pytest.raises(SecurityError):
                await a.request(expected, "/x/1", b"?", timeout=5)
            assert a.metrics()["wrong_peer_id"] == 1
            assert not a.network.has_session(expected)

    run(main())


def test_initiation_flood_from_many_addresses_stays_bounded(run):
    async def main():
        async with MessageHost() as a, MessageHost() as b:
            target = b.network.sockets()[0].sockname
            loop = asyncio.get_running_loop()
            flooders = []
            try:
                for _ in range(50):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind(("127.0.0.1", 0))
                    s.setblocking(False)
                    flooders.append(s)
                attacker = Handshaker(KeyPair.generate())
                packets = [attacker.initiate(target, loop.time(), local_index=i + 1)[0][0]
                           for i in range(400)]
                for i, packet in enumerate(packets * 5):
                    try:
                        flooders[i % len(flooders)].sendto(packet, target)
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                    if i % 200 == 0:
                        await asyncio.sleep(0)
                await asyncio.sleep(0.2)
                sizes = b.network._handshaker.table_sizes()
                assert sizes["pending"] <= 1024 and sizes["initiation_rate"] <= 4096
                counters = b.metrics()
                assert counters.get("cookie_sent", 0) + counters.get("rate_limited", 0) > 0
                # A legitimate peer still gets through (echoing a cookie if asked).
                b.set_message_handler("/x/1", lambda m: m.reply(b"ok"))
                a.add_peer(b.addrs[0])
                assert await a.request(b.peer_id, "/x/1", b"hi", timeout=10) == b"ok"
            finally:
                for s in flooders:
                    s.close()

    run(main())


def test_unreachable_address_fails_the_dial(run):
    async def main():
        async with MessageHost() as a:
            dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dead.bind(("127.0.0.1", 0))
            try:
                peer = KeyPair.generate().peer_id
                a.add_peer(f"/ip4/127.0.0.1/udp/{dead.getsockname()[1]}", peer)
                with pytest.raises(PeerUnreachableError):
                    await a.connect(peer, timeout=10)
                assert a.metrics()["handshakes_failed"] == 1
            finally:
                dead.close()

    run(main())


def test_rekey_replaces_the_session_without_losing_messages(run, monkeypatch):
    import msgnet.limits

    monkeypatch.setattr(msgnet.limits, "REKEY_AFTER_TIME", 1.0)  # instead of 120 s

    async def main():
        async with MessageHost() as a, MessageHost() as b:
            got: list[bytes] = []
            b.set_message_handler("/x/1", lambda m: got.append(m.data))
            a.add_peer(b.addrs[0])
            await a.connect(b.peer_id)
            first = a.network.sessions(b.peer_id)[0]
            sent = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3.5
            while loop.time() < deadline:
                await a.send_message(b.peer_id, "/x/1", b"%d" % sent, qos=Reliable())
                sent += 1
                await asyncio.sleep(0.02)
            await wait_for(lambda: len(got) == sent)
            assert sorted(got, key=int) == [b"%d" % i for i in range(sent)]
            counters = a.metrics()
            assert counters["rekeys"] >= 1 and counters["handshakes_completed"] >= 2
            current = a.network._sessions[b.peer_id]
            assert current is not first and current.local_index != first.local_index

    run(main())
