"""PMTU discovery (docs/wire.md 5.1): sessions start at 1200-byte datagrams and probe for
larger ones once they have a large message; a probe that does not get through (dropped on the
way, or larger than the link with Don't Fragment) leaves the size where it was."""

from __future__ import annotations

import asyncio
import os
import subprocess
from contextlib import AsyncExitStack

import pytest
from test_multitransport import Peer, namespaces  # noqa: F401 - the fixture

from msgnet import MessageHost, Reliable
from msgnet._engine import PMTU_DONE, PMTU_IDLE
from msgnet._testing import wait_for
from msgnet._testing.relay import Impairment, Relay
from msgnet.limits import (
    DATA_HEADER_SIZE,
    MAX_DATAGRAM,
    MAX_DATAGRAM_CEILING,
    PMTU_MAX_PROBES,
    PMTU_PROBE_MARK,
    max_best_effort_payload,
)

pytestmark = pytest.mark.timeout(120)

PING, PONG = 0x07, 0x08


def session_of(host: MessageHost, peer):
    session, _ = host.network.session_for(peer)
    return session


def test_small_messages_never_probe_and_a_large_one_raises_the_size(run):
    async def main():
        async with MessageHost() as a, MessageHost() as b:
            got: list[bytes] = []
            b.set_message_handler("/m", lambda m: got.append(m.data))
            b.set_message_handler("/echo", lambda m: m.reply(m.data))
            peer = a.add_peer(b.addrs[0])
            for i in range(50):
                await a.send_message(peer, "/m", b"%d" % i, qos=Reliable())
                assert await a.request(peer, "/echo", b"x" * 1000) == b"x" * 1000
            session = session_of(a, peer)
            assert session.datagram_size == MAX_DATAGRAM and session.pmtu_state == PMTU_IDLE
            assert a.metrics().get("pmtu_probes", 0) == 0

            first = os.urandom(200_000)
            await a.send_message(peer, "/m", first, qos=Reliable(wait=True))
            await wait_for(lambda: session.pmtu_state == PMTU_DONE)
            # Loopback carries the host's ceiling: one probe, answered.
            assert session.datagram_size == MAX_DATAGRAM_CEILING
            assert a.metrics()["pmtu_probes"] == 1 and a.metrics()["pmtu_raised"] == 1

            before = a.metrics()["packets_out"]
            second = os.urandom(1 << 20)
            await a.send_message(peer, "/m", second, qos=Reliable(wait=True))
            packets = a.metrics()["packets_out"] - before
            # 65000-byte datagrams: 17 for 1 MiB, where 1200-byte ones need ~900.
            assert packets < 40, packets
            await wait_for(lambda: len(got) == 52)
            assert got[50] == first and got[51] == second
            assert a.metrics()["pmtu_probes"] == 1  # searched once

    run(main())


def test_max_datagram_1200_turns_probing_off(run):
    async def main():
        async with MessageHost(max_datagram=MAX_DATAGRAM) as a, MessageHost() as b:
            got: list[bytes] = []
            b.set_message_handler("/m", lambda m: got.append(m.data))
            peer = a.add_peer(b.addrs[0])
            blob = os.urandom(300_000)
            await a.send_message(peer, "/m", blob, qos=Reliable(wait=True))
            session = session_of(a, peer)
            assert not session.engine.probes_path
            assert session.datagram_size == MAX_DATAGRAM
            assert a.metrics().get("pmtu_probes", 0) == 0
            await wait_for(lambda: got == [blob])

    run(main())


def test_best_effort_size_bound_is_the_same_on_every_path(run):
    """A best-effort message may carry what 16 fragments of a 1200-byte datagram carry,
    whether or not the session found larger datagrams."""
    async def main():
        from msgnet.errors import MessageTooLargeError

        async with MessageHost() as a, MessageHost() as b:
            got: list[int] = []
            b.set_message_handler("/m", lambda m: got.append(len(m.data)))
            peer = a.add_peer(b.addrs[0])
            await a.send_message(peer, "/m", os.urandom(200_000), qos=Reliable(wait=True))
            session = session_of(a, peer)
            await wait_for(lambda: session.datagram_size == MAX_DATAGRAM_CEILING)
            bound = max_best_effort_payload(len(b"/m"))
            await a.send_message(peer, "/m", bytes(bound))  # 16 small fragments' worth
            # One byte more would fit one 65000-byte datagram, but not every path.
            with pytest.raises(MessageTooLargeError):
                await a.send_message(peer, "/m", bytes(bound + 1))
            with pytest.raises(MessageTooLargeError):
                a.network.send_message_nowait(peer, "/m", bytes(bound + 1))
            await wait_for(lambda: got[1:] == [bound])

    run(main())


def test_probes_that_are_dropped_leave_the_size_at_what_gets_through(run):
    """A path that silently drops datagrams over 1500 bytes (a middlebox, no ICMP): the probes
    of 65000 and 8952 bytes go unanswered, 1452 gets through. In plaintext mode the relay sees
    each probe as docs/wire.md 5.1 lays it out, and the PONG that answers it."""
    async def main():
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(MessageHost(plaintext=True))
            b = await stack.enter_async_context(MessageHost(plaintext=True))
            seen: list[tuple[str, bytes]] = []

            def drop_large(data: bytes, direction: str) -> bool:
                seen.append((direction, data))
                return len(data) > 1500

            relay = await Relay.start(b.network.sockets()[0].sockname,
                                      Impairment(drop_rule=drop_large))
            stack.callback(relay.close)
            a.add_peer(f"/ip4/127.0.0.1/udp/{relay.address[1]}", b.peer_id)
            got: list[bytes] = []
            b.set_message_handler("/m", lambda m: got.append(m.data))
            blob = os.urandom(100_000)
            await a.send_message(b.peer_id, "/m", blob, qos=Reliable(wait=True))
            assert got == [blob]  # delivered in 1200-byte datagrams meanwhile
            session = session_of(a, b.peer_id)
            await wait_for(lambda: session.pmtu_state == PMTU_DONE, timeout=10)
            assert session.datagram_size == 1452
            assert a.metrics()["pmtu_probes"] == 2 * PMTU_MAX_PROBES + 1

            probes = [data for direction, data in seen
                      if direction == "a->b" and data[DATA_HEADER_SIZE] == PING
                      and data[DATA_HEADER_SIZE + 2:].startswith(PMTU_PROBE_MARK)]
            assert [len(p) + 16 for p in probes] == (
                [MAX_DATAGRAM_CEILING] * PMTU_MAX_PROBES + [8952] * PMTU_MAX_PROBES + [1452])
            for probe in probes:  # PLAIN_DATA: the 13-byte header, then the frames
                frame = probe[DATA_HEADER_SIZE:]
                assert frame[1] == 22  # PING's length: mark, size, 8 random bytes
                data = frame[2:24]
                assert int.from_bytes(data[12:14], "big") == len(probe) + 16
                assert not any(frame[24:])  # PADDING to the size
            answered = probes[-1][DATA_HEADER_SIZE + 2:DATA_HEADER_SIZE + 24]
            assert any(direction == "b->a" and bytes([PONG, 22]) + answered in data
                       for direction, data in seen)
            # From then on nothing larger than what got through goes out.
            seen.clear()
            await a.send_message(b.peer_id, "/m", os.urandom(50_000), qos=Reliable(wait=True))
            sizes = [len(data) + 16 for direction, data in seen if direction == "a->b"]
            assert MAX_DATAGRAM < max(sizes) <= 1452  # (fragments leave room for INIT)

    run(main())


def test_a_session_closed_mid_search_stops_probing(run):
    async def main():
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(MessageHost())
            b = await stack.enter_async_context(MessageHost())
            relay = await Relay.start(b.network.sockets()[0].sockname,
                                      Impairment(drop_rule=lambda data, _: len(data) > 1500))
            stack.callback(relay.close)
            a.add_peer(f"/ip4/127.0.0.1/udp/{relay.address[1]}", b.peer_id)
            b.set_message_handler("/m", lambda m: None)
            await a.send_message(b.peer_id, "/m", os.urandom(50_000), qos=Reliable(wait=True))
            assert a.network._pmtu  # a probe is out, unanswered
            await a.network.close_peer(b.peer_id)
            assert not a.network._pmtu
            probes = a.metrics()["pmtu_probes"]
            await asyncio.sleep(1.2)  # past two probe timeouts: nothing more goes out
            assert a.metrics()["pmtu_probes"] == probes

    run(main())


def test_probes_never_exceed_the_local_route():
    """The bound on probe sizes: loopback carries what msgnet allows; an unroutable address
    bounds nothing (the probes find out)."""
    from msgnet.network import _route_mtu_bound

    assert _route_mtu_bound(("127.0.0.1", 9)) >= MAX_DATAGRAM_CEILING
    assert _route_mtu_bound(None) == MAX_DATAGRAM_CEILING


def _set_mtu(namespace: str, mtu: int) -> None:
    for dev in subprocess.run(["ip", "-n", namespace, "-o", "link", "show", "type", "veth"],
                              check=True, capture_output=True, text=True).stdout.splitlines():
        name = dev.split(":")[1].strip().split("@")[0]
        subprocess.run(["ip", "-n", namespace, "link", "set", name, "mtu", str(mtu)],
                       check=True, capture_output=True)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.parametrize("mtu,found", [(1500, 1452), (9000, 8952)])
def test_dont_fragment_keeps_datagrams_to_what_the_link_carries(namespaces, mtu, found):  # noqa: F811
    """Two namespaces joined by a veth pair of the given MTU: over 1500 the search ends at
    1452; over jumbo frames at 8952 (9000 is the IP packet). Sizes the link cannot carry are
    skipped without a probe (the route's MTU bounds them): one probe each. The message
    arrives either way."""
    (ns_a, ns_b), (addr_a, addr_b) = namespaces
    for ns in (ns_a, ns_b):
        _set_mtu(ns, mtu)
    a = b = None
    try:
        a = Peer(ns_a, 1, addr_a)
        b = Peer(ns_b, 2, addr_b)
        udp = next(addr for addr in b.addrs if "/udp/" in addr)
        peer = a("add_peer", addr=udp)["peer"]
        a("send_big", peer=peer, size=300_000)
        assert "big:300000" in b("received")["messages"]
        answer = a("datagram", peer=peer)
        deadline = 20
        while answer["state"] != PMTU_DONE and deadline:
            a("request", peer=peer, timeout=5.0)  # (the search runs meanwhile)
            subprocess.run(["sleep", "0.5"], check=True)
            deadline -= 1
            answer = a("datagram", peer=peer)
        assert answer == {"size": found, "state": PMTU_DONE}
        assert a("metrics")["metrics"]["pmtu_probes"] == 1
        a("send_big", peer=peer, size=300_000)
        assert b("received")["messages"].count("big:300000") == 2
    finally:
        for peer_proc in (a, b):
            if peer_proc is not None:
                peer_proc.close()
