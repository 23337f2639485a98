"""A msgnet host driven over stdin/stdout, for tests that run peers in network namespaces.

    python -m msgnet._testing.netns_peer --seed 1 --listen /ip4/10.0.0.1/udp/4001 ...

The host prints one JSON line ``{"ready": peer_id, "addrs": [...]}`` once listening, then
answers each JSON command line on stdin with one JSON line on stdout:

=================  ============================================================  ==========
command            arguments                                                     answer
=================  ============================================================  ==========
add_peer           addr (a multiaddr with /p2p/)                                 peer
send               peer, count, tag: send ``tag-0`` .. ``tag-<count-1>``           sent
send_until         peer, tag, expect: resend ``tag-<i>`` until the peer's         sent
                   ``/count`` reply says it has ``expect`` distinct messages
request            peer, data, timeout                                           reply
send_big           peer, size: one reliable message of size random bytes on       sent
                   ``/big``, once the peer acknowledged it
datagram           peer: the session's datagram size and PMTU search state        size, state
received           (none): messages received on ``/msg``, in order               messages
metrics            (none)                                                        metrics
paths              peer: the transport each live session sends on                paths
close_streams      (none): close every TCP connection                            closed
quit               (none)                                                        bye
=================  ============================================================  ==========

Errors answer ``{"error": "..."}``. Messages on ``/msg`` are recorded; requests on ``/count``
are answered with how many distinct ``/msg`` messages arrived, so a sender can tell when
its messages got through without a side channel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from msgnet import Message, MessageHost, PeerID, Reliable
from msgnet.identity import KeyPair


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--listen", nargs="+", required=True)
    parser.add_argument("--policy", default="prefer-udp")
    args = parser.parse_args(argv)
    keypair = KeyPair.from_seed(args.seed.to_bytes(32, "big"))
    received: list[str] = []

    def on_msg(message: Message) -> None:
        received.append(message.data.decode())

    def on_count(message: Message) -> None:
        message.reply(str(len(set(received))).encode())

    def on_big(message: Message) -> None:
        received.append(f"big:{len(message.data)}")

    async with MessageHost(keypair, listen=args.listen, transport_policy=args.policy) as host:
        host.set_message_handler("/msg", on_msg)
        host.set_message_handler("/count", on_count)
        host.set_message_handler("/big", on_big)
        _emit({"ready": str(host.peer_id), "addrs": [str(a) for a in host.addrs]})
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            try:
                answer = await _run(host, command, received)
            except Exception as exc:  # reported to the test, which decides
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            _emit(answer)
            if command["cmd"] == "quit":
                break


async def _run(host: MessageHost, command: dict[str, Any], received: list[str]
               ) -> dict[str, Any]:
    cmd = command["cmd"]
    if cmd == "add_peer":
        return {"peer": str(host.add_peer(command["addr"]))}
    if cmd == "send":
        peer = PeerID.from_string(command["peer"])
        for i in range(command["count"]):
            await host.send_message(peer, "/msg", f"{command['tag']}-{i}".encode())
        return {"sent": command["count"]}
    if cmd == "send_until":
        peer = PeerID.from_string(command["peer"])
        deadline = asyncio.get_running_loop().time() + command.get("timeout", 20.0)
        i = 0
        while asyncio.get_running_loop().time() < deadline:
            await host.send_message(peer, "/msg", f"{command['tag']}-{i}".encode())
            i += 1
            try:
                count = int(await host.request(peer, "/count", b"", timeout=0.5))
            except Exception:  # a lost request while the path fails over
                continue
            if count >= command["expect"]:
                return {"sent": i}
        return {"error": f"peer never reported {command['expect']} messages"}
    if cmd == "request":
        peer = PeerID.from_string(command["peer"])
        reply = await host.request(peer, "/count", command.get("data", "").encode(),
                                   timeout=command.get("timeout", 5.0))
        return {"reply": reply.decode()}
    if cmd == "send_big":
        peer = PeerID.from_string(command["peer"])
        await host.send_message(peer, "/big", os.urandom(command["size"]),
                                qos=Reliable(wait=True, timeout=20.0))
        return {"sent": command["size"]}
    if cmd == "datagram":
        session, _ = host.network.session_for(PeerID.from_string(command["peer"]))
        return {"size": session.datagram_size, "state": session.pmtu_state}
    if cmd == "received":
        return {"messages": received}
    if cmd == "metrics":
        return {"metrics": host.metrics()}
    if cmd == "paths":
        peer = PeerID.from_string(command["peer"])
        return {"paths": host.network.paths(peer)}
    if cmd == "close_streams":
        closed = host.network.close_streams()
        return {"closed": closed}
    if cmd == "quit":
        return {"bye": True}
    return {"error": f"unknown command {cmd!r}"}


def _emit(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
