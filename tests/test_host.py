"""MessageHost end to end over real UDP sockets on 127.0.0.1, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
from contextlib import AsyncExitStack

import pytest

import msgnet
from msgnet import (
    MessageHost,
    PeerUnreachableError,
    ProtocolResetError,
    RequestTimeoutError,
    UsageError,
)
from msgnet._frame import Init, decode_packet
from msgnet._testing import wait_for
from msgnet._testing.relay import Impairment, Relay
from msgnet.identity import KeyPair

pytestmark = pytest.mark.timeout(60)


async def start_hosts(stack: AsyncExitStack, count: int, **options) -> list[MessageHost]:
    hosts = [await stack.enter_async_context(MessageHost(**options)) for _ in range(count)]
    for host in hosts:
        for other in hosts:
            if other is not host:
                host.add_peer(other.addrs[0])
    return hosts


async def start_echo_pair(stack: AsyncExitStack) -> list[MessageHost]:
    """Two connected hosts: the second answers /echo/1 with what it got and never answers
    /silent/1 (the request tests' peer)."""
    a, b = await start_hosts(stack, 2)
    b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
    b.set_message_handler("/silent/1", lambda m: None)
    await a.connect(b.peer_id)
    return [a, b]


def test_two_hosts_several_protocols_both_ways(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            seen: dict[str, list[tuple[msgnet.PeerID, bytes]]] = {"x": [], "y": []}
            for host in (a, b):
                host.set_message_handler("/x/1", lambda m: seen["x"].append((m.from_peer, m.data)))

            async def on_y(m):  # a coroutine handler
                await asyncio.sleep(0)
                seen["y"].append((m.from_peer, m.data))

            b.set_message_handler("/y/1", on_y)
            for i in range(50):
                await a.send_message(b.peer_id, "/x/1", b"a%d" % i)
                await b.send_message(a.peer_id, "/x/1", b"b%d" % i)
                await a.send_message(b.peer_id, "/y/1", b"y%d" % i)
            await wait_for(lambda: len(seen["x"]) == 100 and len(seen["y"]) == 50)
            from_a = [d for p, d in seen["x"] if p == a.peer_id]
            from_b = [d for p, d in seen["x"] if p == b.peer_id]
            assert sorted(from_a) == sorted(b"a%d" % i for i in range(50))
            assert sorted(from_b) == sorted(b"b%d" % i for i in range(50))
            assert all(p == a.peer_id for p, _ in seen["y"])
            assert a.network.has_session(b.peer_id) and b.network.has_session(a.peer_id)
            assert a.metrics()["handshakes_completed"] + b.metrics()["handshakes_completed"] >= 2

    run(main())


def test_ten_hosts_request_reply_all_pairs(run):
    async def main():
        async with AsyncExitStack() as stack:
            hosts = await start_hosts(stack, 10)
            for host in hosts:
                host.set_message_handler(
                    "/echo/1", lambda m: m.reply(bytes(m.from_peer.to_bytes()[-4:]) + m.data))
                host.set_message_handler("/len/1", lambda m: m.reply(b"%d" % len(m.data)))

            async def ask(h, o):
                reply = await h.request(o.peer_id, "/echo/1", b"ping", timeout=5)
                assert reply == h.peer_id.to_bytes()[-4:] + b"ping"  # the proven sender
                assert await h.request(o.peer_id, "/len/1", b"12345", timeout=5) == b"5"

            await asyncio.gather(*(ask(h, o) for h in hosts for o in hosts if o is not h))

    run(main())


def test_unknown_protocol_raises_protocol_reset(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            with pytest.raises(ProtocolResetError) as info:
                await a.request(b.peer_id, "/nobody/1", b"?", timeout=5)
            assert info.value.protocol == "/nobody/1"
            # Remembered: the next send fails at once, without a round trip.
            with pytest.raises(ProtocolResetError):
                await a.send_message(b.peer_id, "/nobody/1", b"?")
            assert b.metrics()["no_handler"] >= 1

    run(main())


def test_a_refusal_is_remembered_past_the_send_route(run):
    """Sends to the peer sent to last take the network's route (SendRoute), which checks no
    refusals: a Reset must take the route away, or the refused protocol would go out again."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
            for i in range(3):
                assert await a.request(b.peer_id, "/echo/1", b"%d" % i, timeout=5) == b"%d" % i
            route = a.network.route
            assert route.session_of(b.peer_id) is not None  # the route is in use
            with pytest.raises(ProtocolResetError):
                await a.request(b.peer_id, "/nobody/1", b"?", timeout=5)
            assert route.session_of(b.peer_id) is None
            with pytest.raises(ProtocolResetError):
                a.network.send_message_nowait(b.peer_id, "/nobody/1", b"?")
            with pytest.raises(ProtocolResetError):
                a.request_callback(b.peer_id, "/nobody/1", b"?", lambda pending: None)
            # Other protocols still work, without the route while the refusal is remembered.
            assert await a.request(b.peer_id, "/echo/1", b"again", timeout=5) == b"again"
            assert route.session_of(b.peer_id) is None
            assert b.metrics()["no_handler"] == 1

    run(main())


def test_vanished_peer_times_out_or_is_unreachable(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
            assert await a.request(b.peer_id, "/echo/1", b"1", timeout=5) == b"1"
            await b.close()
            with pytest.raises((RequestTimeoutError, PeerUnreachableError)):
                await a.request(b.peer_id, "/echo/1", b"2", timeout=0.5)
            # A peer that never existed at an address: the handshake gives up.
            ghost = KeyPair.generate().peer_id
            dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dead.bind(("127.0.0.1", 0))
            try:
                a.add_peer(f"/ip4/127.0.0.1/udp/{dead.getsockname()[1]}", ghost)
                with pytest.raises((RequestTimeoutError, PeerUnreachableError)):
                    await a.request(ghost, "/echo/1", b"3", timeout=10)
            finally:
                dead.close()

    run(main())


def test_unknown_peer_and_bad_arguments_raise_typed_errors(run):
    async def main():
        async with MessageHost() as a:
            with pytest.raises(PeerUnreachableError):
                await a.send_message(KeyPair.generate().peer_id, "/x/1", b"")
            with pytest.raises(UsageError):
                await a.send_message("not a peer", "/x/1", b"")  # type: ignore[arg-type]
            with pytest.raises(UsageError):
                a.set_message_handler("/x/1", "not callable")  # type: ignore[arg-type]
            with pytest.raises(UsageError):
                MessageHost(listen=["/ip4/127.0.0.1/quic/1"])

    run(main())


def test_handler_that_raises_or_blocks_does_not_stop_delivery(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            got: list[bytes] = []

            def bad(m):
                raise RuntimeError("handler bug")

            async def slow(m):
                await asyncio.sleep(30)

            b.set_message_handler("/bad/1", bad)
            b.set_message_handler("/slow/1", slow)
            b.set_message_handler("/good/1", lambda m: got.append(m.data))
            for i in range(20):
                await a.send_message(b.peer_id, "/bad/1", b"x")
                await a.send_message(b.peer_id, "/slow/1", b"x")
                await a.send_message(b.peer_id, "/good/1", b"%d" % i)
            await wait_for(lambda: len(got) == 20)
            assert b.metrics()["handler_error"] == 20

    run(main())
    assert len(run.errors) == 20 and all("handler bug" in str(e.get("exception")) for e in run.errors)
    run.errors.clear()


def test_lost_init_recovers(run):
    """Drop every datagram carrying the first INIT of each protocol: later messages arrive."""

    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2, plaintext=True)
            seen_protocols: set[str] = set()

            def drop_first_init(data: bytes, direction: str) -> bool:
                if direction != "a->b" or data[0] != 0x0A:  # PLAIN_DATA only
                    return False
                dropped = False
                for frame in decode_packet(data[13:]):
                    if isinstance(frame, Init) and frame.protocol not in seen_protocols:
                        seen_protocols.add(frame.protocol)
                        dropped = True
                return dropped

            impairment = Impairment(drop_rule=drop_first_init)
            relay = await Relay.start(b.network.sockets()[0].sockname, impairment)
            stack.callback(relay.close)
            a.peerstore.remove(b.peer_id)
            a.add_peer(f"/ip4/127.0.0.1/udp/{relay.address[1]}", b.peer_id)
            got: dict[str, list[bytes]] = {"/p/1": [], "/q/1": []}
            for protocol in got:
                b.set_message_handler(protocol, lambda m: got[m.protocol].append(m.data))
            await a.connect(b.peer_id)
            for i in range(10):
                for protocol in got:
                    await a.send_message(b.peer_id, protocol, b"%d" % i)
                await asyncio.sleep(0.01)
            await wait_for(lambda: all(len(v) == 9 for v in got.values()))
            # Both first INITs were lost (in one coalesced datagram or two).
            assert seen_protocols == set(got) and impairment.counters["dropped"] in (1, 2)
            for values in got.values():  # message 0 was lost with its INIT; 1..9 arrived
                assert sorted(values) == sorted(b"%d" % i for i in range(1, 10))

    run(main())


def test_garbage_datagrams_are_counted_and_good_traffic_flows(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            got: list[bytes] = []
            b.set_message_handler("/good/1", lambda m: got.append(m.data))
            await a.connect(b.peer_id)
            target = b.network.sockets()[0].sockname
            attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            attacker.setblocking(False)
            stack.callback(attacker.close)
            rng = __import__("random").Random(7)
            garbage = [b"", b"\x00", b"\xff" * 40, b"\x07", b"\x07" + bytes(12),
                       b"\x07" + os.urandom(60), b"\x04" + bytes(10), b"\x05" + os.urandom(90),
                       b"\x06" + os.urandom(200), b"\x08" + bytes(3), b"\x09" + bytes(28),
                       b"\x0c" + bytes(50)]
            for i in range(2000):
                packet = garbage[i % len(garbage)] if i % 3 else bytes(
                    rng.randrange(256) for _ in range(rng.randrange(1, 100)))
                try:
                    attacker.sendto(packet, target)
                except BlockingIOError:
                    await asyncio.sleep(0)
                if i % 100 == 0:
                    await a.send_message(b.peer_id, "/good/1", b"%d" % i)
                    await asyncio.sleep(0)
            await wait_for(lambda: len(got) == 20)
            counters = b.metrics()
            assert counters["not_msgnet"] > 0
            assert counters["truncated"] > 0
            assert counters["unknown_session"] > 0
            assert counters["unknown_packet_type"] > 0

    run(main())


def test_metrics_dict_and_prometheus_text(run):
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            b.set_message_handler("/m/1", lambda m: None)
            await a.send_message(b.peer_id, "/m/1", b"x")
            await wait_for(lambda: b.metrics().get("messages_in", 0) == 1)
            counters = a.metrics()
            for name in ("packets_out", "bytes_out", "handshakes_started", "sessions"):
                assert counters[name] >= 1, name
            text = a.metrics_text()
            assert "# TYPE msgnet_packets_out_total counter" in text
            assert "msgnet_sessions{" in text

    run(main())


SERVER = textwrap.dedent("""
    import asyncio, sys, msgnet
    async def main():
        async with msgnet.MessageHost() as host:
            host.set_message_handler("/echo/1", lambda m: m.reply(m.data[::-1]))
            print(host.addrs[0], flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    msgnet.run(main())
""")


def test_across_processes(run):
    servers = [subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        addrs = [s.stdout.readline().strip() for s in servers]

        async def main():
            async with MessageHost() as a:
                peers = [a.add_peer(addr) for addr in addrs]
                for i in range(20):
                    replies = await asyncio.gather(
                        *(a.request(p, "/echo/1", b"abc%d" % i, timeout=5) for p in peers))
                    assert replies == [(b"abc%d" % i)[::-1]] * len(peers)

        run(main())
    finally:
        for server in servers:
            server.stdin.close()
            server.wait(timeout=10)


async def started(host: MessageHost) -> MessageHost:
    """host, started (closed by the test, which restarts it with the same key and port)."""
    await host.start()
    return host


def test_remote_restart_same_identity_recovers(run):
    async def main():
        key = KeyPair.generate()
        async with MessageHost() as a:
            b = await started(MessageHost(key))
            port = b.network.sockets()[0].sockname[1]
            b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
            a.add_peer(b.addrs[0])
            assert await a.request(b.peer_id, "/echo/1", b"before", timeout=5) == b"before"
            await b.close()
            b = await started(MessageHost(key, listen=[f"/ip4/127.0.0.1/udp/{port}"]))
            try:
                got: list[bytes] = []
                b.set_message_handler("/note/1", lambda m: got.append(m.data))
                b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
                # The old session is unknown to the new process: it answers SESSION_UNKNOWN,
                # a re-handshakes and re-sends, and the message is not lost.
                await a.send_message(b.peer_id, "/note/1", b"after restart")
                await wait_for(lambda: got == [b"after restart"])
                assert await a.request(b.peer_id, "/echo/1", b"again", timeout=5) == b"again"
                assert a.metrics()["sessions_forgotten_by_peer"] >= 1
            finally:
                await b.close()

    run(main())


def test_request_timeouts_fire_in_deadline_order(run):
    """Every request has its own deadline, though one timer serves them all."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_echo_pair(stack)
            loop = asyncio.get_running_loop()
            done: list[float] = []

            async def timed(timeout: float) -> None:
                start = loop.time()
                with pytest.raises(RequestTimeoutError):
                    await a.request(b.peer_id, "/silent/1", b"?", timeout=timeout)
                done.append(timeout)
                assert timeout - 0.01 <= loop.time() - start < timeout + 0.5

            await asyncio.gather(timed(0.6), timed(0.2), timed(0.4),
                                 a.request(b.peer_id, "/echo/1", b"ok", timeout=0.3))
            assert done == [0.2, 0.4, 0.6]
            assert a.metrics()["pending_requests"] == 0
            assert await a.request(b.peer_id, "/echo/1", b"after", timeout=5) == b"after"

    run(main())


def test_request_callback_settles_in_the_call_and_forgets(run):
    """request_callback: the callback runs once per request, with the outcome a future
    would carry (reply, timeout, reset, a large request's reply); a cancelled request is
    forgotten at once and its callback never runs; a raising callback breaks nothing."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_echo_pair(stack)
            loop = asyncio.get_running_loop()
            settled: list[tuple[object, ...]] = []
            arrived = asyncio.Event()

            def record(pending):
                assert pending.done() and not pending.cancelled()
                error = pending.exception()
                settled.append(("error", type(error)) if error else ("reply", pending.result()))
                arrived.set()

            async def outcome(protocol, data, timeout=5.0):
                settled.clear()
                arrived.clear()
                pending = a.request_callback(b.peer_id, protocol, data, record, timeout=timeout)
                assert not pending.done()
                with pytest.raises(asyncio.InvalidStateError):
                    pending.result()
                await asyncio.wait_for(arrived.wait(), 5)
                await asyncio.sleep(0.05)  # a second call would come by now
                assert a.metrics()["pending_requests"] == 0
                (only,) = settled
                return only

            assert await outcome("/echo/1", b"x") == ("reply", b"x")
            assert await outcome("/silent/1", b"?", timeout=0.1) == ("error", RequestTimeoutError)
            assert await outcome("/none/1", b"?") == ("error", ProtocolResetError)
            big = b"y" * 3000  # fragmented: not sent at once, a task sends it
            assert await outcome("/echo/1", big) == ("reply", big)

            forgotten = a.request_callback(b.peer_id, "/silent/1", b"?", record, timeout=0.2)
            assert forgotten.cancel() and forgotten.cancelled() and not forgotten.cancel()
            assert a.metrics()["pending_requests"] == 0
            with pytest.raises(asyncio.CancelledError):
                forgotten.result()
            settled.clear()
            await asyncio.sleep(0.3)  # past its timeout: still no call
            assert settled == []

            reported: list[dict] = []
            loop.set_exception_handler(lambda _loop, context: reported.append(context))
            try:
                def boom(pending):
                    raise RuntimeError("callback bug")

                a.request_callback(b.peer_id, "/echo/1", b"z", boom)
                await wait_for(lambda: reported)
                assert isinstance(reported[0]["exception"], RuntimeError)
                assert await a.request(b.peer_id, "/echo/1", b"after", timeout=5) == b"after"
            finally:
                loop.set_exception_handler(None)

    run(main())


def test_request_timeout_runs_from_a_send_in_a_reply_callback(run):
    """A request sent from a reply's callback (inside the engine's receive batch, whose
    clock reading its timeout starts from) times out after its timeout, not before."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_echo_pair(stack)
            loop = asyncio.get_running_loop()
            timed_out = loop.create_future()
            sent_at: list[float] = []

            def on_timeout(pending):
                timed_out.set_result((loop.time(), type(pending.exception())))

            def on_reply(pending):
                assert pending.result() == b"x"
                sent_at.append(loop.time())
                a.request_callback(b.peer_id, "/silent/1", b"?", on_timeout, timeout=0.2)

            a.request_callback(b.peer_id, "/echo/1", b"x", on_reply)
            done_at, error = await asyncio.wait_for(timed_out, 5)
            assert error is RequestTimeoutError
            assert 0.2 - 0.01 <= done_at - sent_at[0] < 0.7
            assert a.metrics()["pending_requests"] == 0

    run(main())


def test_request_callback_only_while_started(run):
    """A started host's request_callback is its request table's compiled method: before
    start, after close (also through a reference taken while it ran) it raises ClosedError,
    and a subclass's override is not bypassed."""
    calls: list[str] = []

    class Counting(MessageHost):
        def request_callback(self, *args, **kwargs):
            calls.append(args[1])
            return super().request_callback(*args, **kwargs)

    async def main():
        idle = MessageHost()
        with pytest.raises(msgnet.ClosedError):
            idle.request_callback(idle.peer_id, "/echo/1", b"?", lambda pending: None)
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(MessageHost())
            b = await stack.enter_async_context(Counting())
            a.set_message_handler("/echo/1", lambda m: m.reply(m.data))
            b.add_peer(a.addrs[0])
            replies = asyncio.Queue()
            bound = b.request_callback
            bound(a.peer_id, "/echo/1", b"sub", lambda pending: replies.put_nowait(pending))
            assert (await asyncio.wait_for(replies.get(), 5)).result() == b"sub"
            assert calls == ["/echo/1"]
            a.add_peer(b.addrs[0])
            b.set_message_handler("/echo/1", lambda m: m.reply(m.data))
            early = a.request_callback
            early(b.peer_id, "/echo/1", b"a", lambda pending: replies.put_nowait(pending))
            assert (await asyncio.wait_for(replies.get(), 5)).result() == b"a"
            await a.close()
            for closed in (a.request_callback, early):
                with pytest.raises(msgnet.ClosedError):
                    closed(b.peer_id, "/echo/1", b"?", lambda pending: None)

    run(main())


def test_response_from_another_peer_does_not_answer_a_request(run):
    """Request ids are unique per host, not per peer: a RESPONSE carrying the id of our
    request to B, sent by C, must not complete it."""
    async def main():
        async with AsyncExitStack() as stack:
            a, b, c = await start_hosts(stack, 3)

            async def slow_echo(m):
                await asyncio.sleep(0.3)
                m.reply(b"from b")

            b.set_message_handler("/q/1", slow_echo)
            await a.connect(b.peer_id)
            await c.connect(a.peer_id)
            pending = asyncio.ensure_future(a.request(b.peer_id, "/q/1", b"?", timeout=5))
            await wait_for(lambda: a.metrics()["pending_requests"] == 1)
            (request_id,) = a._requests.ids()
            session, engine = c.network.session_for(a.peer_id)
            for _ in range(3):  # C answers first, with A's request id
                engine.send_message(session, "/q/1", b"from c", msgnet.limits.FLAG_RESPONSE,
                                    request_id)
                await asyncio.sleep(0.02)
            assert not pending.done()
            assert await pending == b"from b"

    run(main())


def test_keepalives_only_while_the_peer_sends(run, monkeypatch):
    """docs/wire.md §2.3.2: a host that only receives sends an empty DATA packet every
    KEEPALIVE_AFTER (its NAT state stays open); keep-alives never answer keep-alives, so once
    the sender stops, both ends fall silent."""
    import msgnet.limits

    monkeypatch.setattr(msgnet.limits, "KEEPALIVE_AFTER", 0.5)  # instead of 15 s

    async def main():
        async with AsyncExitStack() as stack:
            a, b = await start_hosts(stack, 2)
            got: list[bytes] = []
            b.set_message_handler("/feed/1", lambda m: got.append(m.data))
            a.add_peer(b.addrs[0])
            await a.connect(b.peer_id)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3.2
            while loop.time() < deadline:  # a sends, b only receives
                await a.send_message(b.peer_id, "/feed/1", b"tick")
                await asyncio.sleep(0.05)
            await wait_for(lambda: b.metrics().get("keepalives_sent", 0) >= 2)
            sent = b.metrics()["keepalives_sent"]
            assert sent <= 7  # about one per KEEPALIVE_AFTER, not one per message
            quiet_a = a.metrics().get("keepalives_sent", 0)
            await asyncio.sleep(2.5)  # nobody sends frames now
            assert b.metrics()["keepalives_sent"] <= sent + 1  # one may be due already
            assert a.metrics().get("keepalives_sent", 0) == quiet_a  # none answers b's
            assert a.network.sessions(b.peer_id)[0].last_received > 0

    run(main())


def test_remote_restart_with_reliable_traffic_in_flight(run):
    """SESSION_UNKNOWN recovery re-sends the retained best-effort messages; the reliable ones
    (SEQ frames, whose delivery state died with the session) are not replayed as plain frames:
    they fail with the session (no exception escapes into the event loop), and new ones flow
    on the new session."""
    async def main():
        key = KeyPair.generate()
        async with MessageHost() as a:
            b = await started(MessageHost(key))
            port = b.network.sockets()[0].sockname[1]
            b.set_message_handler("/r/1", lambda m: None)
            a.add_peer(b.addrs[0])
            await a.send_message(b.peer_id, "/r/1", b"warm", qos=msgnet.Reliable(wait=True))
            await b.close()
            for i in range(5):  # sealed and retained, never acknowledged
                await a.send_message(b.peer_id, "/r/1", b"lost %d" % i, qos=msgnet.Reliable())
            await a.send_message(b.peer_id, "/note/1", b"best effort")
            b = await started(MessageHost(key, listen=[f"/ip4/127.0.0.1/udp/{port}"]))
            try:
                got: list[bytes] = []
                b.set_message_handler("/note/1", lambda m: got.append(m.data))
                b.set_message_handler("/r/1", lambda m: got.append(m.data))
                await a.send_message(b.peer_id, "/note/1", b"after restart")
                await wait_for(lambda: b"after restart" in got)
                await a.send_message(b.peer_id, "/r/1", b"new", qos=msgnet.Reliable(wait=True))
                assert b"new" in got
                assert a.metrics()["sessions_forgotten_by_peer"] >= 1
            finally:
                await b.close()

    run(main())


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_sessions_use_aes_gcm_where_both_hosts_offer_it(run, tcp):
    """wire.md 2.2: a session seals with AES-256-GCM when both hosts offer it (which they do
    where libsodium has it: msgnet._packet.AES_GCM), else ChaCha20-Poly1305; either way a
    small message and a 1 MiB reliable one arrive (over TCP the large packet is sealed and
    opened in pieces)."""
    from msgnet._packet import AES_GCM

    options = ({"listen": ["/ip4/127.0.0.1/tcp/0"], "transport_policy": "tcp-only"} if tcp
               else {})

    async def main():
        for b_offers in (True, False):
            async with AsyncExitStack() as stack:
                a = await stack.enter_async_context(MessageHost(**options))
                b = await stack.enter_async_context(MessageHost(aes_gcm=b_offers, **options))
                a.add_peer(b.addrs[0])
                got: list[bytes] = []
                b.set_message_handler("/x/1", lambda m: got.append(m.data))
                big = os.urandom(1 << 20)
                await a.send_message(b.peer_id, "/x/1", b"small")
                await a.send_message(b.peer_id, "/x/1", big, qos=msgnet.Reliable(wait=True))
                await wait_for(lambda: len(got) == 2)
                assert got == [b"small", big]
                for host, peer in ((a, b.peer_id), (b, a.peer_id)):
                    crypto = host.network.sessions(peer)[0].crypto
                    assert crypto.aes == (AES_GCM and b_offers), (tcp, b_offers)

    run(main())
