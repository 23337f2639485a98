"""Multiaddr helpers against the multiformats vectors and the supported subset."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from multiaddr import Multiaddr

from msgnet.addr import (
    Endpoint,
    endpoint_to_multiaddr,
    parse_multiaddr,
    sockaddr_to_multiaddr,
)
from msgnet.errors import PeerUnreachableError, UsageError
from msgnet.identity import PeerID

PEER = PeerID.from_string("12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA")
LEGACY_PEER = PeerID.from_string("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")


@pytest.fixture(scope="module")
def multiaddr_vectors(shared_dir: Path) -> list[dict[str, Any]]:
    data = json.loads((shared_dir / "vectors" / "varint_multiaddr_vectors.json").read_text())
    assert len(data["multiaddr"]) == 2, "expected the two multiaddr vectors"
    return data["multiaddr"]


def test_vectors_string_and_packed_forms(multiaddr_vectors: list[dict[str, Any]]) -> None:
    for v in multiaddr_vectors:
        assert Multiaddr(v["string"]).to_bytes().hex() == v["packed_hex"], v["string"]
        assert str(Multiaddr(bytes.fromhex(v["packed_hex"]))) == v["string"], v["string"]


def test_vectors_parse(multiaddr_vectors: list[dict[str, Any]]) -> None:
    expected = {
        "/ip4/192.0.2.42/tcp/443": Endpoint("192.0.2.42", 443, "tcp", "ip4"),
        "/ip4/127.0.0.1/udp/4001": Endpoint("127.0.0.1", 4001, "udp", "ip4"),
    }
    assert {v["string"] for v in multiaddr_vectors} == set(expected)
    for v in multiaddr_vectors:
        want = expected[v["string"]]
        assert parse_multiaddr(v["string"]) == want
        assert parse_multiaddr(Multiaddr(bytes.fromhex(v["packed_hex"]))) == want
        assert want.to_multiaddr().to_bytes().hex() == v["packed_hex"]
        assert endpoint_to_multiaddr(want.host, want.port, want.transport) == Multiaddr(
            v["string"]
        )


def test_ip4_sockaddr() -> None:
    ep = parse_multiaddr("/ip4/127.0.0.1/udp/4001")
    assert ep.sockaddr == ("127.0.0.1", 4001)
    assert ep.peer_id is None


def test_ip6() -> None:
    ep = parse_multiaddr("/ip6/::1/udp/4001")
    assert (ep.host, ep.port, ep.transport, ep.family) == ("::1", 4001, "udp", "ip6")
    assert ep.sockaddr == ("::1", 4001, 0, 0)
    assert str(endpoint_to_multiaddr("::1", 4001, "udp")) == "/ip6/::1/udp/4001"
    # Non-canonical text is normalised, so equal addresses compare equal.
    assert Endpoint("0:0:0::1", 4001, "udp", "ip6") == ep
    assert parse_multiaddr("/ip6/2001:db8::7/tcp/80").host == "2001:db8::7"


@pytest.mark.parametrize(("family", "loopback"), [("ip4", "127.0.0.1"), ("ip6", "::1")])
def test_sockaddr_works_with_sendto(family: str, loopback: str) -> None:
    """The sockaddr tuple really is what socket.sendto wants."""
    af = socket.AF_INET if family == "ip4" else socket.AF_INET6
    with socket.socket(af, socket.SOCK_DGRAM) as rx, socket.socket(af, socket.SOCK_DGRAM) as tx:
        try:
            rx.bind((loopback, 0))
        except OSError as exc:
            if family == "ip4":
                raise
            pytest.skip(f"no IPv6 loopback on this host: {exc}")
        port = rx.getsockname()[1]
        ep = parse_multiaddr(f"/{family}/{loopback}/udp/{port}")
        tx.sendto(b"ping", ep.sockaddr)
        rx.settimeout(2)
        data, src = rx.recvfrom(16)
        assert data == b"ping"
        assert parse_multiaddr(sockaddr_to_multiaddr(src, "udp")).host == loopback


def test_dns4_and_dns6() -> None:
    ep = parse_multiaddr("/dns4/example.com/tcp/443")
    assert (ep.host, ep.port, ep.transport, ep.family) == ("example.com", 443, "tcp", "dns4")
    assert parse_multiaddr("/dns6/example.com/udp/1").family == "dns6"
    with pytest.raises(UsageError, match="resolve"):
        _ = ep.sockaddr
    assert str(ep.to_multiaddr()) == "/dns4/example.com/tcp/443"


def test_resolve_dns4_localhost() -> None:
    ep = parse_multiaddr(f"/dns4/localhost/udp/4001/p2p/{PEER}")
    resolved = asyncio.run(ep.resolve())
    assert resolved == Endpoint("127.0.0.1", 4001, "udp", "ip4", PEER)
    assert resolved.sockaddr == ("127.0.0.1", 4001)


def test_resolve_asks_only_for_the_named_family(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, int]] = []

    async def fake_getaddrinfo(
        self: asyncio.AbstractEventLoop, host: str, port: int, *, family: int, type: int
    ) -> list[tuple[Any, ...]]:
        seen.append((host, family, type))
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", port, 0, 0))]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    ep = parse_multiaddr("/dns6/node.example/tcp/9000")
    resolved = asyncio.run(ep.resolve())
    assert seen == [("node.example", socket.AF_INET6, socket.SOCK_STREAM)]
    assert resolved == Endpoint("2001:db8::1", 9000, "tcp", "ip6")


def test_resolve_failure_is_peer_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_getaddrinfo(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", failing_getaddrinfo)
    with pytest.raises(PeerUnreachableError, match="no-such-host.invalid"):
        asyncio.run(parse_multiaddr("/dns4/no-such-host.invalid/udp/1").resolve())


def test_resolve_of_ip_endpoint_is_identity() -> None:
    ep = parse_multiaddr("/ip4/10.0.0.1/udp/7")
    assert asyncio.run(ep.resolve()) is ep


@pytest.mark.parametrize("peer", [PEER, LEGACY_PEER])
@pytest.mark.parametrize(
    ("host", "base"),
    [("1.2.3.4", "/ip4/1.2.3.4/udp/4001"), ("2001:db8::2", "/ip6/2001:db8::2/udp/4001")],
)
def test_p2p_suffix_round_trip(peer: PeerID, host: str, base: str) -> None:
    ma = endpoint_to_multiaddr(host, 4001, "udp", peer)
    assert str(ma) == f"{base}/p2p/{peer}"
    ep = parse_multiaddr(ma)
    assert ep.peer_id == peer
    assert parse_multiaddr(str(ma)) == ep
    assert ep.to_multiaddr() == ma
    # The binary /p2p/ value is the bare multihash, as the multiaddr spec requires.
    assert ma.to_bytes().endswith(peer.to_bytes())


def test_p2p_cidv1_text_accepted() -> None:
    ep = parse_multiaddr(f"/ip4/1.2.3.4/tcp/1/p2p/{PEER.to_cid_string()}")
    assert ep.peer_id == PEER


def test_port_zero_allowed_for_listening() -> None:
    assert parse_multiaddr("/ip4/0.0.0.0/udp/0").port == 0
    assert str(endpoint_to_multiaddr("::", 0, "tcp")) == "/ip6/::/tcp/0"


def test_sockaddr_to_multiaddr() -> None:
    assert str(sockaddr_to_multiaddr(("127.0.0.1", 5), "udp")) == "/ip4/127.0.0.1/udp/5"
    assert str(sockaddr_to_multiaddr(("::1", 5, 0, 0), "tcp")) == "/ip6/::1/tcp/5"
    # Dual-stack sockets report IPv4 peers as IPv4-mapped IPv6.
    assert str(sockaddr_to_multiaddr(("::ffff:10.0.0.1", 5, 0, 0), "udp")) == "/ip4/10.0.0.1/udp/5"


@pytest.mark.parametrize(
    ("sockaddr", "match"),
    [
        (("fe80::1", 5, 0, 2), "scoped"),
        (("fe80::1%eth0", 5, 0, 0), "scoped"),
        (("example.com", 5), "not an IPv4 or IPv6"),
        (("127.0.0.1",), "sockaddr must be"),
        (["127.0.0.1", 5], "sockaddr must be"),
        (("127.0.0.1", 70000), "out of range"),
    ],
)
def test_sockaddr_to_multiaddr_rejects(sockaddr: Any, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        sockaddr_to_multiaddr(sockaddr, "udp")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "expected /ip4"),
        ("not a multiaddr", "invalid multiaddr"),
        ("/ip4/1.2.3.4", "expected /ip4"),  # missing transport
        ("/ip4/1.2.3.4/udp", "invalid multiaddr"),  # missing port
        ("/ip4/1.2.3.4/udp/4001/quic-v1", "/quic-v1 after the port"),
        ("/ip4/1.2.3.4/udp/4001/quic-v1/p2p/" + str(PEER), "expected /ip4"),
        ("/ip4/999.1.1.1/udp/1", "invalid multiaddr"),
        ("/ip4/1.2.3/udp/1", "invalid multiaddr"),
        ("/ip6/1.2.3.4/udp/1", "invalid multiaddr"),
        ("/ip4/1.2.3.4/udp/65536", "invalid multiaddr"),
        ("/ip4/1.2.3.4/udp/-1", "invalid multiaddr"),
        ("/ip4/1.2.3.4/udp/http", "invalid multiaddr"),
        ("/udp/1", "expected /ip4"),
        ("/dns/example.com/udp/1", "expected /ip4"),  # family must be explicit
        ("/dnsaddr/example.com", "expected /ip4"),
        ("/ip4/1.2.3.4/sctp/1", "expected /ip4"),
        ("/ip4/1.2.3.4/tcp/1/ws", "/ws after the port"),
        ("/ip6zone/eth0/ip6/fe80::1/udp/1", "expected /ip4"),
        ("/p2p/" + str(PEER), "expected /ip4"),
        (f"/ip4/1.2.3.4/udp/1/p2p/{PEER}/p2p/{PEER}", "expected /ip4"),
        ("/ip4/1.2.3.4/udp/1/p2p/QmBad", "invalid multiaddr"),
        ("/ip4/1.2.3.4/udp/1/p2p/bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi",
         "libp2p-key"),
        ("/dns4/exa mple.com/udp/1", "invalid multiaddr"),
    ],
)
def test_parse_rejects(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_multiaddr(text)


def test_parse_rejects_corrupt_binary_and_wrong_type() -> None:
    truncated_port = bytes.fromhex("047f00000191020f")
    with pytest.raises(UsageError, match="invalid multiaddr '047f00000191020f'"):
        parse_multiaddr(Multiaddr(truncated_port))
    with pytest.raises(UsageError, match="must be str or Multiaddr"):
        parse_multiaddr(b"\x04\x7f\x00\x00\x01")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("example.com", 1, "udp"), "not an IPv4 or IPv6"),
        (("1.2.3.4", -1, "udp"), "out of range"),
        (("1.2.3.4", 65536, "udp"), "out of range"),
        (("1.2.3.4", True, "udp"), "must be an int"),
        (("1.2.3.4", "80", "udp"), "must be an int"),
        (("1.2.3.4", 1, "quic"), "unsupported transport"),
        (("1.2.3.4", 1, "udp", "12D3KooW"), "must be a PeerID"),
    ],
)
def test_endpoint_to_multiaddr_rejects(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        endpoint_to_multiaddr(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": "1.2.3.4", "family": "ip6"}, "not an ip6 address"),
        ({"host": "::1", "family": "ip4"}, "not an ip4 address"),
        ({"host": "", "family": "dns4"}, "1-253 characters"),
        ({"host": "a/b", "family": "dns4"}, "contains '/'"),
        ({"host": "1.2.3.4", "family": "dns"}, "unsupported address family"),
    ],
)
def test_endpoint_validates(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Endpoint(port=1, transport="udp", **kwargs)  # type: ignore[arg-type]


def test_endpoint_is_frozen_and_hashable() -> None:
    ep = parse_multiaddr(f"/ip4/1.2.3.4/udp/1/p2p/{PEER}")
    assert hash(ep) == hash(parse_multiaddr(f"/ip4/1.2.3.4/udp/1/p2p/{PEER}"))
    with pytest.raises(AttributeError):
        ep.port = 2  # type: ignore[misc]
