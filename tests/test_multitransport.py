"""Hosts on UDP and TCP at once (docs/wire.md §5 and §6), over real sockets.

Loopback tests cover the TCP transport end to end, first contact on both transports,
consolidation by ACK, large messages on the stream, failover when a connection closes,
spoofed ACKs, the /p2p/ check over TCP and misbehaving TCP peers. The test marked
``netns`` runs two hosts in network namespaces joined by a veth pair and blocks UDP with
iptables in one of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import pytest

from msgnet import MessageHost, SecurityError, UsageError, limits
from msgnet._frame import Ack, encode_frame, encode_varint
from msgnet._stream import PIECES_FROM
from msgnet._testing import wait_for as _wait_for
from msgnet.core.handshake import decode_handshake_payload
from msgnet.identity import KeyPair
from msgnet.qos import Reliable
from msgnet.tcp import StreamSettings

pytestmark = pytest.mark.timeout(90)

UDP = "/ip4/127.0.0.1/udp/0"
TCP = "/ip4/127.0.0.1/tcp/0"


def wait_for(predicate, timeout: float = 8.0):
    """The shared polling wait, with this file's longer default timeout."""
    return _wait_for(predicate, timeout)


async def pair(stack: AsyncExitStack, listen: list[str], *, policy_a: str = "prefer-udp",
               policy_b: str = "prefer-udp", **options: Any) -> tuple[MessageHost, MessageHost]:
    a = await stack.enter_async_context(MessageHost(listen=listen, transport_policy=policy_a,
                                                    **options))
    b = await stack.enter_async_context(MessageHost(listen=listen, transport_policy=policy_b,
                                                    **options))
    for addr in b.addrs:
        a.add_peer(addr)
    for addr in a.addrs:
        b.add_peer(addr)
    return a, b


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the other end closed the connection (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), 5.0) == b""
    except ConnectionError:
        return True


def record(host: MessageHost, protocol: str = "/m") -> list[bytes]:
    got: list[bytes] = []
    host.set_message_handler(protocol, lambda m: got.append(m.data))
    return got


def echo(host: MessageHost, protocol: str = "/echo") -> None:
    host.set_message_handler(protocol, lambda m: m.reply(m.data))


# --------------------------------------------------------------------------- TCP alone


def test_tcp_only_hosts_carry_every_kind_of_message(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(b)
            echo(b)
            for i in range(2000):  # many per packet: no packet may exceed 256 frames
                await a.send_message(b.peer_id, "/m", b"%d" % i)
            large = os.urandom(700_000)
            await a.send_message(b.peer_id, "/m", large)
            await a.send_message(b.peer_id, "/m", b"reliable", qos=Reliable(wait=True))
            assert await a.request(b.peer_id, "/echo", b"ping") == b"ping"
            assert await a.request(b.peer_id, "/echo", large) == large  # a large reply too
            await wait_for(lambda: len(got) == 2002)
            assert got[:2000] == [b"%d" % i for i in range(2000)]  # TCP keeps the order
            assert got[2000] == large and got[2001] == b"reliable"
            assert a.network.paths(b.peer_id) == ["tcp"] == b.network.paths(a.peer_id)
            ma, mb = a.metrics(), b.metrics()
            # One connection for everything; no fragments, acknowledgements or retransmits.
            assert ma["stream_connections"] == mb["stream_connections"] == 1
            assert ma.get("retransmissions", 0) == 0 and ma.get("acks_sent", 0) == 0
            assert mb["stream_packets_in"] > 0 and mb.get("replay", 0) == 0
            assert mb.get("bad_frame", 0) == 0

    run(main())


def test_tcp_reconnects_when_it_is_the_only_way(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(b)
            echo(a)
            await a.send_message(b.peer_id, "/m", b"before")
            await wait_for(lambda: got == [b"before"])
            a.network.close_streams()
            await wait_for(lambda: a.metrics()["stream_connections_out"] == 2)
            await a.send_message(b.peer_id, "/m", b"after")
            assert await b.request(a.peer_id, "/echo", b"both ways") == b"both ways"
            await wait_for(lambda: got == [b"before", b"after"])
            assert a.metrics()["handshakes_started"] == 1  # the session outlived its connection

    run(main())


def test_transport_ids_follow_listen_order_and_are_announced(run):
    async def main():
        async with MessageHost(listen=[UDP, TCP, UDP.replace("127.0.0.1", "127.0.0.2")]) as h:
            ids = [s.transport_id for s in h.network.sockets()]
            assert ids == [1, 2, 3]
            payload = decode_handshake_payload(h.network._handshaker.handshake_payload)
            assert payload.transport_ids == (1, 2, 3)
            assert [str(a).split("/")[3] for a in h.addrs] == ["udp", "tcp", "udp"]

    run(main())


def test_policy_is_validated():
    with pytest.raises(UsageError):
        MessageHost(transport_policy="carrier-pigeon")


# --------------------------------------------------------------------------- both transports


async def tcp_then_both(a: MessageHost, b: MessageHost) -> None:
    """Make A's next handshake with B go out on both transports at once: A first reaches B by
    TCP alone, keeps the connection, and then learns B's UDP address too."""
    udp_b, tcp_b = b.addrs
    a.peerstore.remove(b.peer_id)
    a.add_peer(tcp_b)
    await a.connect(b.peer_id)
    await a.network.close_peer(b.peer_id)
    a.add_peer(udp_b)


async def settled_on_udp(stack: AsyncExitStack
                         ) -> tuple[MessageHost, MessageHost, list[bytes]]:
    """A and B on UDP and TCP, A's first message delivered and its path settled on UDP, and
    what B receives on /m."""
    a, b = await pair(stack, [UDP, TCP])
    got = record(b)
    await a.send_message(b.peer_id, "/m", b"hello")
    await wait_for(lambda: a.network.paths(b.peer_id) == ["udp"] and got)
    return a, b, got


async def stream_pair(stack: AsyncExitStack, listen: list[str],
                      policy: str) -> tuple[MessageHost, MessageHost, list[bytes]]:
    """A and B whose session runs on TCP (prefer-tcp: with UDP as the next path), and what B
    receives on /m."""
    a, b = await pair(stack, listen, policy_a=policy, policy_b=policy)
    got = record(b)
    if policy == "prefer-tcp":
        await tcp_then_both(a, b)
    return a, b, got


@pytest.mark.parametrize("policy_b, settles_on", [("prefer-udp", "udp"), ("prefer-tcp", "tcp")])
def test_first_contact_goes_on_both_and_is_delivered_once(run, policy_b, settles_on):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [UDP, TCP], policy_b=policy_b)
            got = record(b)
            echo(b)
            await tcp_then_both(a, b)
            await a.send_message(b.peer_id, "/m", b"first")
            await wait_for(lambda: a.network.paths(b.peer_id) == [settles_on])
            for i in range(20):
                await a.send_message(b.peer_id, "/m", b"%d" % i)
            assert await a.request(b.peer_id, "/echo", b"x") == b"x"
            await wait_for(lambda: len(got) == 21)
            await asyncio.sleep(0.1)
            assert sorted(got) == sorted([b"first"] + [b"%d" % i for i in range(20)])
            assert b.network.paths(a.peer_id)[-1] == settles_on
            ma, mb = a.metrics(), b.metrics()
            assert ma["acks_received"] >= 1
            assert ma["handshakes_started"] == 2  # TCP alone, then one on both transports
            assert mb["handshakes_completed"] == 2
            # B saw the second handshake on both transports: a copy of its FINISH, or DATA.
            assert mb.get("finish_repeated", 0) + mb.get("replay", 0) >= 1

    run(main())


def test_large_messages_take_the_stream_and_are_not_fragmented(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [UDP, TCP])
            got = record(b)
            await a.send_message(b.peer_id, "/m", b"small")
            await wait_for(lambda: a.network.paths(b.peer_id) == ["udp"])
            big = os.urandom(300_000)
            await a.send_message(b.peer_id, "/m", big)
            await a.send_message(b.peer_id, "/m", b"small again")
            await wait_for(lambda: len(got) == 3)
            assert big in got
            assert a.network.paths(b.peer_id) == ["udp"]  # small ones stay on UDP
            assert a.metrics().get("retransmissions", 0) == 0
            assert b.metrics()["stream_packets_in"] >= 1

    run(main())


def test_closing_the_connection_moves_traffic_back_to_udp(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [UDP, TCP], policy_a="prefer-tcp", policy_b="prefer-tcp")
            got = record(b)
            echo(a)
            await tcp_then_both(a, b)
            await a.send_message(b.peer_id, "/m", b"0")
            await wait_for(lambda: a.network.paths(b.peer_id) == ["tcp"])
            assert a.network.close_streams() == 1
            await wait_for(lambda: a.network.paths(b.peer_id) == ["udp"]
                           and b.network.paths(a.peer_id)[-1] == "udp")
            for i in range(1, 11):
                await a.send_message(b.peer_id, "/m", b"%d" % i)
            assert await b.request(a.peer_id, "/echo", b"back") == b"back"
            await wait_for(lambda: len(got) == 11)
            assert sorted(got) == sorted(b"%d" % i for i in range(11))
            assert a.metrics()["path_failovers"] >= 1
            assert a.metrics()["handshakes_started"] == 2  # no new one for the failover

    run(main())


@pytest.mark.parametrize("listen,policy", [([TCP], "tcp-only"), ([UDP, TCP], "prefer-tcp")],
                         ids=["reconnect", "to-udp"])
def test_reliable_messages_survive_a_dying_connection(run, listen, policy):
    """docs/wire.md §6.1: reliable messages written to a TCP connection that dies are kept
    until the peer's PONG covers them, and after the failover the peer tells which arrived;
    the rest are sent again by the next path (a new connection, or UDP: fragmented there),
    so every one arrives exactly once."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b, got = await stream_pair(stack, listen, policy)
            sent = [b"warm-up"]
            await a.send_message(b.peer_id, "/m", sent[0], qos=Reliable())
            await wait_for(lambda: got == sent and a.network.paths(b.peer_id) == ["tcp"])
            [conn_a] = a.network.streams.connections()
            await wait_for(lambda: conn_a.retained_packets == 0)  # the PONG came
            [conn_b] = b.network.streams.connections()
            # The first half arrives; then B stops reading and the rest waits in buffers.
            for i in range(100):
                sent.append(b"%d:" % i + b"x" * 300)
                await a.send_message(b.peer_id, "/m", sent[-1], qos=Reliable())
            await wait_for(lambda: len(got) == len(sent))
            conn_b._transport.pause_reading()
            for i in range(100, 300):  # 6 MB: more than the buffers hold, so some is queued
                sent.append(b"%d:" % i + (os.urandom(200_000) if i % 7 == 3 else b"y" * 300))
                await a.send_message(b.peer_id, "/m", sent[-1], qos=Reliable())
            await asyncio.sleep(0.1)
            session = a.network.sessions(b.peer_id)[0]
            assert conn_a.retained_packets > 0 and session.queued_bytes > 0
            assert len(got) == 101
            conn_b.abort("stream_reset")  # B's unread bytes and A's unsent ones are lost
            await wait_for(lambda: len(got) >= len(sent), timeout=30)
            await asyncio.sleep(0.5)  # nothing arrives twice, late
            assert len(got) == len(sent) and sorted(got) == sorted(sent)
            ma, mb = a.metrics(), b.metrics()
            assert ma["stream_resumes_sent"] >= 1 and mb["stream_resumes_received"] >= 1
            assert ma["stream_resent_messages"] > 0  # something was lost and sent again
            assert ma["stream_requeued_messages"] > 0  # and queued, unwritten ones too
            assert ma.get("stream_resend_uncertain", 0) == 0
            if policy == "prefer-tcp":
                assert a.network.paths(b.peer_id) == ["udp"]

    run(main())


@pytest.mark.parametrize("listen,policy", [([TCP], "tcp-only"), ([UDP, TCP], "prefer-tcp")],
                         ids=["reconnect", "to-udp"])
def test_ordered_messages_keep_their_order_across_a_dying_connection(run, listen, policy):
    """docs/wire.md §6.1: Reliable(ordered=True) messages lost with a connection are sent
    again before any ordered message sent after it died: the peer gets every message once,
    in send order, though some went on the dead connection, some were queued for it and
    some were sent while the resume was under way."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b, got = await stream_pair(stack, listen, policy)
            ordered = Reliable(ordered=True)
            sent = [b"warm-up"]
            await a.send_message(b.peer_id, "/m", sent[0], qos=ordered)
            await wait_for(lambda: got == sent and a.network.paths(b.peer_id) == ["tcp"])
            [conn_a] = a.network.streams.connections()
            await wait_for(lambda: conn_a.retained_packets == 0)
            [conn_b] = b.network.streams.connections()
            conn_b._transport.pause_reading()
            for i in range(200):  # written, buffered, or queued when the connection dies
                sent.append(b"%d:" % i + (os.urandom(200_000) if i % 7 == 3 else b"y" * 300))
                await a.send_message(b.peer_id, "/m", sent[-1], qos=ordered)
            await asyncio.sleep(0.1)
            conn_b.abort("stream_reset")
            for i in range(200, 260):  # while the peer is asked what it has
                sent.append(b"%d:" % i + b"z" * 300)
                await a.send_message(b.peer_id, "/m", sent[-1], qos=ordered)
            await wait_for(lambda: len(got) >= len(sent), timeout=30)
            await asyncio.sleep(0.5)
            assert [m[:8] for m in got] == [m[:8] for m in sent]
            assert got == sent
            assert a.metrics()["stream_resent_messages"] > 0

    run(main())


@pytest.mark.parametrize("listen,policy", [([TCP], "tcp-only"), ([UDP, TCP], "prefer-tcp")],
                         ids=["reconnect", "to-udp"])
def test_waiting_sends_complete_when_their_connection_dies(run, listen, policy):
    """docs/wire.md §6.1: a Reliable(wait=True) send whose connection dies before its PONG
    completes once the message sent again in its place is acknowledged (on a new connection
    or on UDP), not by timing out, and each message arrives once."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b, got = await stream_pair(stack, listen, policy)
            await a.send_message(b.peer_id, "/m", b"warm-up", qos=Reliable(wait=True))
            assert got == [b"warm-up"] and a.network.paths(b.peer_id) == ["tcp"]
            [conn_b] = b.network.streams.connections()
            conn_b._transport.pause_reading()  # what A writes from now on stays in buffers
            qos = Reliable(wait=True, timeout=20)
            # Large ones too: alone in their packet, with their PING in the next one.
            payloads = [os.urandom(100_000) if i % 5 == 4 else b"%d" % i for i in range(20)]
            sends = [asyncio.create_task(a.send_message(b.peer_id, "/m", data, qos=qos))
                     for data in payloads]
            await asyncio.sleep(0.2)
            assert not any(task.done() for task in sends)  # no PONG can come
            conn_b.abort("stream_reset")
            started = asyncio.get_running_loop().time()
            await asyncio.wait_for(asyncio.gather(*sends), 10)  # none times out
            assert asyncio.get_running_loop().time() - started < 10
            assert sorted(got[1:]) == sorted(payloads)  # each once
            assert not a.network.stream_recovery.waits
            assert a.metrics()["stream_resent_messages"] > 0
            if policy == "prefer-tcp":
                assert a.network.paths(b.peer_id) == ["udp"]

    run(main())


def test_reliable_stream_packets_are_kept_only_until_acknowledged(run):
    """docs/wire.md §6.1: a connection keeps a retaining session's packets until a PONG
    covers them, never more than its bound (back-pressure instead), and lets them go."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got: list[int] = []
            b.set_message_handler("/m", lambda m: got.append(len(m.data)))
            await a.send_message(b.peer_id, "/m", b"first", qos=Reliable())
            await wait_for(lambda: len(got) == 1)
            [conn] = a.network.streams.connections()
            most = 0
            for _ in range(3000):  # 12 MB: more than the bound of 8 MiB
                await a.send_message(b.peer_id, "/m", bytes(4096), qos=Reliable())
                most = max(most, conn.retained_bytes)
            await wait_for(lambda: len(got) == 3001, timeout=30)
            await wait_for(lambda: conn.retained_packets == 0)
            assert 0 < most <= limits.STREAM_RETAIN_BYTES + 65536
            assert conn.retained_bytes == 0 and not conn.retain_full
            assert a.metrics()["stream_acks_requested"] >= 2
            assert a.metrics().get("stream_resumes_sent", 0) == 0
            # Best effort alone keeps nothing.
            c = await stack.enter_async_context(MessageHost(listen=[TCP],
                                                            transport_policy="tcp-only"))
            c.add_peer(b.addrs[0])
            for _ in range(100):
                await c.send_message(b.peer_id, "/m", b"x")
            await wait_for(lambda: len(got) == 3101)
            [conn_c] = c.network.streams.connections()
            assert conn_c.retained_packets == 0 and c.metrics().get("stream_acks_requested", 0) == 0

    run(main())


def test_a_connection_that_acknowledges_nothing_is_left_for_the_peers(run):
    """docs/wire.md §6.1: while the peer sends on another connection, we stay on ours as long
    as it keeps packets not yet acknowledged (moving could reorder them), and close it after
    STREAM_MOVE_GRACE of silence; its packets are then resumed on the peer's connection, every
    ordered message arriving once and in order."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(b)
            ordered = Reliable(ordered=True)
            sent = [b"warm-up"]
            await a.send_message(b.peer_id, "/m", sent[0], qos=ordered)
            await wait_for(lambda: got == sent)
            [conn_bx] = b.network.streams.connections()
            conn_bx._transport.pause_reading()  # B reads nothing more on X, PINGs included
            for i in range(20):
                sent.append(b"%d" % i)
                await a.send_message(b.peer_id, "/m", sent[-1], qos=ordered)
            [conn_ax] = a.network.streams.connections()
            await wait_for(lambda: conn_ax.retained_packets > 0 and conn_ax.packets_out > 1)
            # B moves to a connection of its own, Y, and talks to A there.
            port = a.network.listen_addrs()[0].value_for_protocol("tcp")
            conn_by = await b.network.streams.connect("127.0.0.1", int(port))
            path = b.network._paths[a.peer_id]
            b.network._bind_stream(a.peer_id, path, conn_by)
            b.network._apply(a.peer_id, path)
            a.set_message_handler("/n", lambda m: None)
            loop = asyncio.get_running_loop()
            start = loop.time()
            while not a.metrics().get("stream_moves_forced") and loop.time() - start < 10:
                await b.send_message(a.peer_id, "/n", b"here")
                await asyncio.sleep(0.2)
            assert a.metrics()["stream_moves_forced"] == 1
            assert loop.time() - start >= limits.STREAM_MOVE_GRACE
            await wait_for(lambda: len(got) >= len(sent), timeout=15)
            await asyncio.sleep(0.3)
            assert got == sent
            assert a.metrics()["stream_resent_messages"] >= 20

    run(main())


def test_packets_of_control_frames_alone_are_not_kept(run):
    """docs/wire.md §6.1: only packets with messages are kept for a resume (nothing else is
    ever sent again), so when both ends send reliable messages on a stream, the PONG that
    acknowledges one end's packets is not itself kept and acknowledged, and so on: the
    acknowledgements stop once the messages are acknowledged."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            echo(b)
            for i in range(20):
                assert await a.request(b.peer_id, "/echo", b"%d" % i, qos=Reliable()) == b"%d" % i
            [conn_a] = a.network.streams.connections()
            [conn_b] = b.network.streams.connections()
            await wait_for(lambda: conn_a.retained_packets == conn_b.retained_packets == 0)
            asked = (a.metrics()["stream_acks_requested"], b.metrics()["stream_acks_requested"])
            packets = conn_a.packets_in + conn_b.packets_in
            await asyncio.sleep(limits.STREAM_ACK_TIMEOUT * 1.5)
            assert (a.metrics()["stream_acks_requested"],
                    b.metrics()["stream_acks_requested"]) == asked
            assert conn_a.packets_in + conn_b.packets_in == packets  # quiet: no PING, no PONG

    run(main())


def test_spoofed_ack_changes_nothing(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, got = await settled_on_udp(stack)
            session = a.network.sessions(b.peer_id)[0]
            acks = a.metrics()["acks_received"]
            # An ACK for the TCP transport in a DATA packet for A's session, without B's key:
            # from B's own address family by UDP, and on a TCP connection of its own.
            forged = (bytes((0x07,)) + struct.pack(">IQ", session.local_index, 10**6)
                      + encode_frame(Ack(2)) + bytes(16))
            udp_target = a.network.sockets()[0].sockname
            tcp_target = a.network.sockets()[1].sockname
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(forged, udp_target)
            reader, writer = await asyncio.open_connection(*tcp_target)
            writer.write(encode_varint(len(forged)) + forged)
            await writer.drain()
            assert await closed(reader)  # bad_stream
            writer.close()
            await asyncio.sleep(0.1)
            m = a.metrics()
            assert m["auth_failed"] >= 2 and m["bad_stream"] == 1
            assert m["acks_received"] == acks
            assert a.network.paths(b.peer_id) == ["udp"]
            await a.send_message(b.peer_id, "/m", b"still fine")
            await wait_for(lambda: len(got) == 2)

    run(main())


def test_authenticated_acks_steer_only_their_own_session(run):
    """An ACK that authenticates, but from another peer, for a transport the peer never
    announced, or sent to the responder, changes no path (docs/wire.md §5)."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b, got = await settled_on_udp(stack)
            c = await stack.enter_async_context(MessageHost(listen=[UDP, TCP]))
            for addr in a.addrs:
                c.add_peer(addr)
            record(a)
            await c.send_message(a.peer_id, "/m", b"third")
            await wait_for(lambda: c.network.paths(a.peer_id) == ["udp"]
                           and a.network.paths(c.peer_id) == ["udp"])  # both ends settled
            before, paths_c = a.metrics(), a.network.paths(c.peer_id)
            # C (a proven peer, but not B) names A's TCP transport; B names one it never had.
            session_c, engine_c = c.network.session_for(a.peer_id)
            engine_c.send_control(session_c, encode_frame(Ack(2)))
            engine_c.flush()
            session_b, engine_b = b.network.session_for(a.peer_id)
            engine_b.send_control(session_b, encode_frame(Ack(99)))
            engine_b.flush()
            await wait_for(lambda: a.metrics()["acks_received"] == before["acks_received"] + 2)
            m = a.metrics()
            assert m["acks_ignored"] == before.get("acks_ignored", 0) + 2
            assert a.network.paths(b.peer_id) == ["udp"]
            assert a.network.paths(c.peer_id) == paths_c
            await a.send_message(b.peer_id, "/m", b"still udp")
            await wait_for(lambda: len(got) == 2)
            assert a.network.paths(b.peer_id) == ["udp"]

    run(main())


def test_forged_packet_on_a_proven_connection_is_dropped_not_fatal(run):
    """docs/wire.md §6: once a connection carried an authenticated packet, a DATA packet
    that fails its checks on it is dropped (auth_failed) as on UDP; the connection and its
    traffic go on."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(a)
            await b.send_message(a.peer_id, "/m", b"before")
            await wait_for(lambda: got == [b"before"])
            session = a.network.sessions(b.peer_id)[0]
            [conn_b] = b.network.streams.connections()
            forged = (bytes((0x07,)) + struct.pack(">IQ", session.local_index, 10**6)
                      + encode_frame(Ack(1)) + bytes(16))
            failed = a.metrics().get("auth_failed", 0)
            assert conn_b.write_packet(forged)
            await b.send_message(a.peer_id, "/m", b"after")
            await wait_for(lambda: got == [b"before", b"after"])
            m = a.metrics()
            assert m["auth_failed"] == failed + 1 and m.get("bad_stream", 0) == 0
            assert not conn_b.closed and a.network.streams.connections()[0].packets_in >= 3

    run(main())


def test_large_stream_packets_are_sealed_and_opened_in_pieces(run):
    """msgnet._stream.PIECE: a stream payload of PIECES_FROM bytes or more is sealed as it is
    written and opened as it arrives; what arrives is the message, intact, once, and a
    forged large packet is dropped (auth_failed) with nothing of it delivered."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(a)
            sizes = [PIECES_FROM - 100, PIECES_FROM, 300_000, limits.MAX_MESSAGE_PAYLOAD]
            sent = [os.urandom(n) for n in sizes]
            for data in sent:
                await b.send_message(a.peer_id, "/m", data, qos=Reliable(wait=True))
            await wait_for(lambda: len(got) == len(sent))
            assert got == sent
            [conn_a] = a.network.streams.connections()
            [conn_b] = b.network.streams.connections()
            assert conn_b.piecewise_out == conn_a.piecewise_in == len(sizes) - 1

            session = a.network.sessions(b.peer_id)[0]
            forged = (bytes((0x07,)) + struct.pack(">IQ", session.local_index, 10**6)
                      + os.urandom(PIECES_FROM + 1000) + bytes(16))
            failed = a.metrics().get("auth_failed", 0)
            framed = encode_varint(len(forged)) + forged
            conn_b._transport.write(framed[:100_000])  # arrives in parts, as a sender's pieces
            await asyncio.sleep(0.05)
            conn_b._transport.write(framed[100_000:])
            await wait_for(lambda: a.metrics().get("auth_failed", 0) == failed + 1)
            assert conn_a.piecewise_in == len(sizes)  # it was opened in pieces, then refused
            await b.send_message(a.peer_id, "/m", sent[2], qos=Reliable(wait=True))
            await wait_for(lambda: len(got) == len(sent) + 1)
            assert got[-1] == sent[2] and not conn_b.closed

    run(main())


def test_large_plaintext_stream_packets_carry_the_payload_as_it_is(run):
    """Plaintext mode: a stream payload of PIECES_FROM bytes or more goes out as its header
    then the payload object itself (no copy): the messages and replies arrive intact, once,
    in order with small ones, and the connection counts every byte it wrote."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only",
                              plaintext=True)
            got = record(a)
            echo(a)
            sizes = [PIECES_FROM - 1, PIECES_FROM, 10, 300_000, limits.MAX_MESSAGE_PAYLOAD, 3]
            sent = [os.urandom(n) for n in sizes]
            for data in sent:
                await b.send_message(a.peer_id, "/m", data, qos=Reliable(ordered=True))
            await wait_for(lambda: len(got) == len(sent))
            assert got == sent
            assert await b.request(a.peer_id, "/echo", sent[4], qos=Reliable()) == sent[4]
            [conn_a] = a.network.streams.connections()
            [conn_b] = b.network.streams.connections()
            assert conn_b.piecewise_out == conn_a.piecewise_in == 0  # nothing to seal
            await wait_for(lambda: conn_a.bytes_in == conn_b.bytes_out)
            assert conn_b.bytes_out > sum(sizes) + sizes[4]

    run(main())


def test_stream_writes_the_socket_refuses_in_part_arrive_whole_and_in_order(run):
    """StreamCore._write sends a packet straight to the socket while the transport holds
    nothing: with a send buffer smaller than a piece, the socket takes part of it and the
    transport the rest, and the messages after it queue behind; everything arrives intact,
    once, in order."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(a)
            await b.connect(a.peer_id)
            [conn_b] = b.network.streams.connections()
            [conn_a] = a.network.streams.connections()
            conn_b._transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            sent = [os.urandom(n) for n in (300_000, 50, 70_000, 1, PIECES_FROM, 9)]
            for data in sent:
                await b.send_message(a.peer_id, "/m", data, qos=Reliable(ordered=True))
            await wait_for(lambda: len(got) == len(sent))
            assert got == sent
            await asyncio.sleep(0.1)
            assert got == sent and not conn_b.closed and not conn_a.closed

    run(main())


def test_wrong_peer_id_over_tcp_is_a_security_error(run):
    async def main():
        async with AsyncExitStack() as stack:
            b = await stack.enter_async_context(MessageHost(listen=[TCP]))
            a = await stack.enter_async_context(MessageHost(listen=[UDP]))
            impostor = KeyPair.generate().peer_id
            tcp_addr = str(b.network.listen_addrs()[0])
            a.add_peer(f"{tcp_addr}/p2p/{impostor}")
            with pytest.raises(SecurityError):
                await a.connect(impostor)
            assert a.metrics()["wrong_peer_id"] == 1
            a.add_peer(f"{tcp_addr}/p2p/{b.peer_id}")
            await a.connect(b.peer_id)  # the right one is reached on the same address
            assert a.network.paths(b.peer_id) == ["tcp"]

    run(main())


# --------------------------------------------------------------------------- bad TCP peers


def test_bad_tcp_peers_are_dropped_while_others_are_served(run):
    settings = StreamSettings(packet_timeout=0.5, idle_timeout=30.0)

    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [UDP, TCP], policy_a="tcp-only", policy_b="tcp-only",
                              stream_settings=settings)
            got = record(b)
            target = b.network.sockets()[1].sockname
            loop = asyncio.get_running_loop()
            attackers = {
                "garbage": bytes(range(0x80, 0x100)),
                "huge": encode_varint(2 << 20),
                "slow": encode_varint(200),
            }
            conns = {}
            for name, first in attackers.items():
                conns[name] = await asyncio.open_connection(*target)
                conns[name][1].write(first)
            started = loop.time()

            async def trickle():
                with suppress(OSError):
                    for _ in range(20):
                        conns["slow"][1].write(b"s")
                        await asyncio.sleep(0.1)

            trickler = asyncio.ensure_future(trickle())
            for i in range(30):
                await a.send_message(b.peer_id, "/m", b"%d" % i)
                await asyncio.sleep(0.02)
            for name in attackers:
                assert await closed(conns[name][0]), name
            assert loop.time() - started < 2.0  # the slow one within its packet timeout
            trickler.cancel()
            await wait_for(lambda: len(got) == 30)
            m = b.metrics()
            assert m["bad_stream"] == 2 and m["stream_packet_timeout"] == 1
            assert m["stream_connections"] == 1  # only A's is left
            for _, writer in conns.values():
                writer.close()

    run(main())


# --------------------------------------------------------------------------- namespaces

NETNS_TOOLS = ("ip", "iptables")


def _netns_skip_reason() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in NETNS_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install iproute2 iptables)"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespaces():
    """Two namespaces joined by a veth pair (10.77.x addresses inside them only), torn down
    whatever happens."""
    reason = _netns_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    ns = (f"msgnet-a-{tag}", f"msgnet-b-{tag}")
    veth = (f"mna{tag}", f"mnb{tag}")
    addrs = ("10.77.0.1", "10.77.0.2")
    try:
        for name in ns:
            _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", veth[0], "netns", ns[0], "type", "veth",
            "peer", "name", veth[1], "netns", ns[1])
        for name, dev, addr in zip(ns, veth, addrs):
            _sh("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", name, "link", "set", dev, "up")
            _sh("ip", "-n", name, "link", "set", "lo", "up")
        yield ns, addrs
    finally:
        for name in ns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


class Peer:
    """A host in a namespace, driven through msgnet._testing.netns_peer."""

    def __init__(self, namespace: str, seed: int, addr: str, policy: str = "prefer-udp"):
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m",
             "msgnet._testing.netns_peer", "--seed", str(seed), "--policy", policy,
             "--listen", f"/ip4/{addr}/udp/4001", f"/ip4/{addr}/tcp/4001"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)})
        ready = self._read()
        self.peer_id, self.addrs = ready["ready"], ready["addrs"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"peer exited with {self.proc.wait(5)}")
        return json.loads(line)

    def __call__(self, cmd: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        assert "error" not in answer, answer
        return answer

    def close(self) -> None:
        with suppress(Exception):
            self("quit")
        with suppress(Exception):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.mark.netns
@pytest.mark.slow
def test_udp_blocked_then_restored(namespaces):
    (ns_a, ns_b), (addr_a, addr_b) = namespaces
    a = b = None
    try:
        a = Peer(ns_a, 1, addr_a)
        b = Peer(ns_b, 2, addr_b)
        for addr in b.addrs:
            a("add_peer", addr=addr)
        for addr in a.addrs:
            b("add_peer", addr=addr)

        # Both transports: the first message goes out on both, arrives once; UDP is chosen.
        a("send_until", peer=b.peer_id, tag="udp", expect=5)
        assert a("paths", peer=b.peer_id)["paths"] == ["udp"]

        # UDP blocked at B: the same calls carry on over TCP once A notices (PATH_TIMEOUT).
        _sh("ip", "netns", "exec", ns_b, "iptables", "-A", "INPUT", "-p", "udp", "-j", "DROP")
        seen = len(set(b("received")["messages"]))
        a("send_until", peer=b.peer_id, tag="tcp", expect=seen + 5, timeout=30)
        assert a("paths", peer=b.peer_id)["paths"] == ["tcp"]
        assert a("metrics")["metrics"]["path_failovers"] >= 1

        # UDP back, the connection closed: traffic moves back to UDP.
        _sh("ip", "netns", "exec", ns_b, "iptables", "-D", "INPUT", "-p", "udp", "-j", "DROP")
        assert a("close_streams")["closed"] >= 1
        seen = len(set(b("received")["messages"]))
        a("send_until", peer=b.peer_id, tag="back", expect=seen + 5, timeout=30)
        assert a("paths", peer=b.peer_id)["paths"] == ["udp"]

        messages = b("received")["messages"]
        assert len(messages) == len(set(messages))  # each delivered exactly once
        assert "udp-0" in messages
        assert a("metrics")["metrics"]["handshakes_started"] == 1
    finally:
        for peer in (a, b):
            if peer is not None:
                peer.close()


def test_reliable_wait_on_a_stream_returns_once_the_peer_has_the_message(run):
    """docs/wire.md §6.1: Reliable(wait=True) on a stream resolves on the PONG of a PING
    written right after the message, so by then the peer's handler has run."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await pair(stack, [TCP], policy_a="tcp-only", policy_b="tcp-only")
            got = record(b)
            for i in range(20):
                await a.send_message(b.peer_id, "/m", b"%d" % i, qos=Reliable(wait=True))
                assert got[-1:] == [b"%d" % i]  # handled before the send returned
            assert a.network.paths(b.peer_id) == ["tcp"]
            assert not a.network.stream_recovery.waits  # nothing left registered

    run(main())
