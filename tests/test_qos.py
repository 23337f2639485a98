"""Delivery guarantees end to end over real UDP sockets, through a seeded impairment relay."""

from __future__ import annotations

import asyncio
import hashlib
import os
from contextlib import AsyncExitStack

import pytest

from msgnet import (
    MessageHost,
    MessageTooLargeError,
    PeerUnreachableError,
    Reliable,
    RequestTimeoutError,
)
from msgnet._testing import wait_for as _wait_for
from msgnet._testing.relay import Impairment, Relay

pytestmark = pytest.mark.timeout(120)


def wait_for(predicate, timeout: float = 30.0):
    """The shared polling wait, with this file's longer default timeout."""
    return _wait_for(predicate, timeout)


async def impaired_pair(stack: AsyncExitStack, impairment: Impairment):
    """a reaches b only through the relay (both directions impaired); plaintext off."""
    a = await stack.enter_async_context(MessageHost())
    b = await stack.enter_async_context(MessageHost())
    relay = await Relay.start(b.network.sockets()[0].sockname, impairment)
    stack.callback(relay.close)
    a.add_peer(f"/ip4/127.0.0.1/udp/{relay.address[1]}", b.peer_id)
    await a.connect(b.peer_id, timeout=20)
    return a, b, relay


def lossy(seed: int, loss: float = 0.1) -> Impairment:
    return Impairment(loss=loss, duplicate=0.01, delay=0.002, jitter=0.004, seed=seed)


def test_reliable_messages_arrive_exactly_once_under_loss(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, _ = await impaired_pair(stack, lossy(3))
            got: list[bytes] = []
            b.set_message_handler("/r/1", lambda m: got.append(m.data))
            for i in range(2000):
                await a.send_message(b.peer_id, "/r/1", b"%06d" % i, qos=Reliable())
                if i % 50 == 0:
                    await asyncio.sleep(0)
            await wait_for(lambda: len(got) >= 2000, timeout=60)
            await asyncio.sleep(0.3)  # duplicates, if any, would arrive now
            assert sorted(got) == [b"%06d" % i for i in range(2000)]
            counters = a.metrics()
            assert counters["retransmissions"] > 0  # the loss was real and was repaired

    run(main(), timeout=100)


def test_ordered_messages_arrive_in_order_per_protocol(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, _ = await impaired_pair(stack, lossy(5))
            got: dict[str, list[int]] = {"/o/1": [], "/o/2": []}
            for protocol in got:
                b.set_message_handler(protocol,
                                      lambda m: got[m.protocol].append(int(m.data)))
            for i in range(500):
                for protocol in got:
                    await a.send_message(b.peer_id, protocol, b"%d" % i,
                                         qos=Reliable(ordered=True))
                if i % 25 == 0:
                    await asyncio.sleep(0)
            await wait_for(lambda: all(len(v) == 500 for v in got.values()), timeout=60)
            for values in got.values():
                assert values == list(range(500))

    run(main(), timeout=100)


def test_fan_out_alternating_peers_keeps_each_peers_order(run):
    """Reliable ordered sends that alternate between peers (pubsub fan-out), one of them
    never contacted before (its first messages wait for the handshake): every peer gets
    each of its messages once, in order, and after the first contact the sends take the
    no-wait path, whichever peer came last."""
    async def main():
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(MessageHost())
            peers = [await stack.enter_async_context(MessageHost()) for _ in range(3)]
            got: dict[int, list[int]] = {i: [] for i in range(3)}
            for i, peer in enumerate(peers):
                peer.set_message_handler(
                    "/fan/1", lambda m, i=i: got[i].append(int(m.data)))
                a.add_peer(peer.addrs[0])
            for peer in peers[:2]:
                await a.connect(peer.peer_id)
            waiting = a.network.send_message
            taken = {"waiting": 0}

            async def counting(*args, **kwargs):
                taken["waiting"] += 1
                return await waiting(*args, **kwargs)

            a.network.send_message = counting  # type: ignore[method-assign]
            for n in range(300):
                for peer in peers:
                    await a.send_message(peer.peer_id, "/fan/1", b"%d" % n,
                                         qos=Reliable(ordered=True))
                if n % 50 == 0:
                    await asyncio.sleep(0)
            await wait_for(lambda: all(len(v) == 300 for v in got.values()))
            await asyncio.sleep(0.2)  # duplicates, if any, would arrive now
            assert all(values == list(range(300)) for values in got.values())
            assert taken["waiting"] == 0  # no send fell back to the waiting path

    run(main())


def test_one_mebibyte_reliable_message_under_loss(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b, _ = await impaired_pair(stack, lossy(9, loss=0.05))
            blob = os.urandom(1 << 20)
            got: list[bytes] = []
            b.set_message_handler("/blob/1", lambda m: got.append(m.data))
            await a.send_message(b.peer_id, "/blob/1", blob, qos=Reliable(wait=True))
            await wait_for(lambda: got)
            assert len(got) == 1 and hashlib.sha256(got[0]).digest() == \
                hashlib.sha256(blob).digest()

    run(main(), timeout=100)


def test_a_burst_of_small_reliable_messages_fills_its_packets(run):
    """The delivery layer sends in bursts bounded in bytes (qos._pump, poll_transmit's
    max_bytes): small reliable messages queued in one loop iteration share full packets,
    not one short packet per fixed number of messages."""
    async def main():
        async with MessageHost() as a, MessageHost() as b:
            got: list[bytes] = []
            b.set_message_handler("/small/1", lambda m: got.append(m.data))
            a.add_peer(b.addrs[0], b.peer_id)
            # Binds the protocol's alias: the messages below go as CONTINUATION frames.
            await a.send_message(b.peer_id, "/small/1", b"warm-up!", qos=Reliable(wait=True))
            before = a.metrics()["packets_out"]
            for i in range(300):
                await a.send_message(b.peer_id, "/small/1", b"%08d" % i, qos=Reliable())
            await wait_for(lambda: len(got) == 301)
            # Each frame is at most 14 bytes (type, length, alias, flags, a 2-byte seq and
            # the 8-byte payload): 4,200 bytes fill 4 payloads of 1171 bytes.
            assert a.metrics()["packets_out"] - before <= 4
            assert sorted(got[1:]) == [b"%08d" % i for i in range(300)]

    run(main())


def test_large_best_effort_message_is_fragmented(run):
    async def main():
        async with MessageHost() as a, MessageHost() as b:
            a.add_peer(b.addrs[0])
            got: list[bytes] = []
            b.set_message_handler("/be/1", lambda m: got.append(m.data))
            blob = os.urandom(10_000)
            await a.send_message(b.peer_id, "/be/1", blob)
            await wait_for(lambda: got)
            assert got == [blob]
            with pytest.raises(MessageTooLargeError):
                await a.send_message(b.peer_id, "/be/1", bytes(100_000))  # > 16 fragments

    run(main())


def test_large_reliable_reply_to_a_request(run):
    async def main():
        async with MessageHost() as a, MessageHost() as b:
            a.add_peer(b.addrs[0])
            b.set_message_handler("/big/1", lambda m: m.reply(bytes(200_000) + m.data))
            reply = await a.request(b.peer_id, "/big/1", b"!", timeout=10, qos=Reliable())
            assert len(reply) == 200_001 and reply.endswith(b"!")

    run(main())


def test_reliable_send_to_a_vanished_peer_fails_or_times_out(run):
    async def main():
        async with MessageHost() as a:
            b = MessageHost()
            await b.start()
            b.set_message_handler("/r/1", lambda m: None)
            a.add_peer(b.addrs[0])
            await a.send_message(b.peer_id, "/r/1", b"x", qos=Reliable(wait=True))
            await b.close()
            with pytest.raises((PeerUnreachableError, RequestTimeoutError)):
                await a.send_message(b.peer_id, "/r/1", b"y",
                                     qos=Reliable(wait=True, timeout=1.0))

    run(main())


def test_a_host_closing_right_after_receiving_still_acknowledges(run):
    """The receiver's host closes the moment its handler has the message: the ack it owed
    (delayed up to MAX_ACK_DELAY) goes out before the session does, so the sender's wait
    ends in success instead of MAX_RETRANSMISSIONS timeouts and PeerUnreachableError."""
    async def main():
        async with MessageHost() as a:
            b = MessageHost()
            await b.start()
            closing: list[asyncio.Future] = []
            b.set_message_handler("/r/1", lambda m: closing.append(
                asyncio.ensure_future(b.close())))
            a.add_peer(b.addrs[0])
            await a.connect(b.peer_id)
            await a.send_message(b.peer_id, "/r/1", b"last",
                                 qos=Reliable(wait=True, timeout=5.0))
            await asyncio.gather(*closing)
            assert len(closing) == 1

    run(main())


def test_reliable_sends_wait_when_the_peer_falls_behind(run):
    """docs/wire.md §3.6 sender memory: with the peer's acknowledgements cut off, reliable
    sends are accepted up to MAX_OUTSTANDING_PER_SESSION and then wait (memory stays bounded);
    once acknowledgements flow again they go on, and every message arrives once."""
    from msgnet import limits

    async def main():
        async with AsyncExitStack() as stack:
            cut = {"acks": False}
            impairment = Impairment(drop_rule=lambda _data, way: cut["acks"] and way == "b->a")
            a, b, _ = await impaired_pair(stack, impairment)
            got: list[bytes] = []
            b.set_message_handler("/bulk/1", lambda m: got.append(m.data[:8]))
            await a.send_message(b.peer_id, "/bulk/1", b"%08d" % 0, qos=Reliable(wait=True))
            session = a.network.sessions(b.peer_id)[0]  # confirmed: the first ack came back
            cut["acks"] = True
            blob = os.urandom(1 << 20)
            limit = limits.MAX_OUTSTANDING_PER_SESSION
            sends = []
            for i in range(1, limit // len(blob) + 5):
                task = asyncio.ensure_future(
                    a.send_message(b.peer_id, "/bulk/1", b"%08d" % i + blob[8:],
                                   qos=Reliable()))
                sends.append(task)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            waiting = [t for t in sends if not t.done()]
            assert len(waiting) >= 3  # the sends beyond the bound wait ...
            conn = a.network.delivery.connection(session)
            assert conn.outstanding_bytes <= limit + len(blob)  # ... and memory stays bounded
            cut["acks"] = False
            await asyncio.wait_for(asyncio.gather(*sends), 60)  # ... until acks flow again
            await wait_for(lambda: len(got) == len(sends) + 1, timeout=60)
            assert sorted(got) == [b"%08d" % i for i in range(len(sends) + 1)]
            await wait_for(lambda: conn.outstanding_bytes == 0)  # the last acks come back

    run(main())


def test_an_acknowledgement_wait_resolves_times_out_or_is_cancelled_with_its_caller(run):
    """network._within, how every Reliable(wait=True) send awaits its acknowledgement: the
    future it waits for ends done whichever way the wait ends, so the delivery layer's
    done() check skips a late acknowledgement."""
    from msgnet.network import _within

    async def main():
        loop = asyncio.get_running_loop()
        acked = loop.create_future()
        loop.call_later(0.01, acked.set_result, None)
        await _within(acked, 5.0)
        await _within(acked, None)  # done already: returns at once

        silent = loop.create_future()
        start = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await _within(silent, 0.1)
        assert 0.09 <= loop.time() - start < 2.0 and silent.done()  # (timers: ms steps)

        abandoned = loop.create_future()
        waiter = asyncio.ensure_future(_within(abandoned, 5.0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert abandoned.cancelled()

    run(main())
