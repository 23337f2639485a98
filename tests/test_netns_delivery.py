"""Reliable delivery between two hosts in separate network namespaces over an impaired link.

Loss: iptables ``statistic`` drops 10% of the UDP datagrams entering each namespace.
Delay (20 ms), jitter (5 ms: reordering) and duplication (1%): a seeded userspace relay in
namespace b.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from netns import namespace_pair

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

RECEIVER = textwrap.dedent("""
    import asyncio, hashlib, json, sys, msgnet
    from msgnet._testing.relay import Impairment, Relay
    HOST = sys.argv[1]
    async def main():
        got, blobs = set(), []
        done = asyncio.get_running_loop().create_future()
        def on_msg(m):
            got.add(m.data)
            if len(got) == 10000 and blobs and not done.done():
                done.set_result(None)
        def on_blob(m):
            blobs.append(hashlib.sha256(m.data).hexdigest())
            if len(got) == 10000 and not done.done():
                done.set_result(None)
        async with msgnet.MessageHost(listen=[f"/ip4/{HOST}/udp/0"]) as host:
            host.set_message_handler("/n/1", on_msg)
            host.set_message_handler("/blob/1", on_blob)
            port = host.network.sockets()[0].sockname[1]
            relay = await Relay.start((HOST, port), Impairment(
                delay=0.02, jitter=0.005, duplicate=0.01, seed=11), host=HOST)
            print(json.dumps({"peer": str(host.peer_id), "port": relay.address[1]}), flush=True)
            try:
                await asyncio.wait_for(done, 200)
            finally:
                print(json.dumps({"messages": len(got), "blobs": blobs,
                                  "duplicates_seen": host.metrics().get("duplicates", 0)}),
                      flush=True)
                relay.close()
    msgnet.run(main())
""")

SENDER = textwrap.dedent("""
    import asyncio, hashlib, json, os, sys, time, msgnet
    HOST, PORT, PEER = sys.argv[1], sys.argv[2], sys.argv[3]
    async def main():
        async with msgnet.MessageHost(listen=["/ip4/0.0.0.0/udp/0"]) as host:
            peer = host.add_peer(f"/ip4/{HOST}/udp/{PORT}/p2p/{PEER}")
            await host.connect(peer, timeout=20)
            t0 = time.perf_counter()
            blob = os.urandom(1 << 20)
            await host.send_message(peer, "/blob/1", blob, qos=msgnet.Reliable(wait=True))
            for i in range(10000):
                await host.send_message(peer, "/n/1", b"%05d" % i, qos=msgnet.Reliable())
                if i % 200 == 199:
                    await asyncio.sleep(0)
            # Every message acknowledged: wait until nothing is in flight.
            conn = host.network.delivery.connection(host.network.sessions(peer)[0])
            while conn is not None and (conn.packets_in_flight or conn.transmit_pending):
                await asyncio.sleep(0.05)
            print(json.dumps({"sha256": hashlib.sha256(blob).hexdigest(),
                              "seconds": time.perf_counter() - t0,
                              "retransmissions": host.metrics().get("retransmissions", 0)}),
                  flush=True)
    msgnet.run(main())
""")


def test_reliable_delivery_across_an_impaired_link() -> None:
    with namespace_pair() as pair:
        for ns, dev in ((pair.a, pair.dev_a), (pair.b, pair.dev_b)):  # 10% loss each way
            pair.iptables(ns, "-A", "INPUT", "-i", dev, "-p", "udp", "-m", "statistic",
                          "--mode", "random", "--probability", "0.1", "-j", "DROP")
        receiver = subprocess.Popen(pair.exec_args(pair.b) + [sys.executable, "-c", RECEIVER,
                                                               pair.addr_b],
                                    stdout=subprocess.PIPE, text=True)
        try:
            hello = json.loads(receiver.stdout.readline())
            sender = subprocess.run(
                pair.exec_args(pair.a) + [sys.executable, "-c", SENDER, pair.addr_b,
                                          str(hello["port"]), hello["peer"]],
                capture_output=True, text=True, timeout=250)
            assert sender.returncode == 0, sender.stderr
            sent = json.loads(sender.stdout.strip().splitlines()[-1])
            result = json.loads(receiver.stdout.readline())
        finally:
            receiver.kill()
            receiver.wait()
        assert result["messages"] == 10000
        assert result["blobs"] == [sent["sha256"]]  # exactly once, intact
        assert sent["retransmissions"] > 0
        print(f"10,000 reliable messages + 1 MiB over 10% loss in {sent['seconds']:.1f} s")
