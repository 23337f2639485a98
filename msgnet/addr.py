"""Multiaddr <-> socket address conversion for the transports msgnet speaks.

Only ``/ip4|ip6|dns4|dns6/<host>/udp|tcp/<port>[/p2p/<peer-id>]`` is
supported: that is everything a msgnet transport can dial or listen on, so
any other multiaddr is refused up front with a message naming the problem.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Literal, cast, get_args

from multiaddr import Multiaddr

from msgnet.errors import PeerUnreachableError, UsageError
from msgnet.identity import PeerID

__all__ = [
    "Endpoint",
    "Transport",
    "Family",
    "parse_multiaddr",
    "endpoint_to_multiaddr",
    "sockaddr_to_multiaddr",
]

Transport = Literal["udp", "tcp"]
Family = Literal["ip4", "ip6", "dns4", "dns6"]

_TRANSPORTS: tuple[str, ...] = get_args(Transport)
_FAMILIES: tuple[str, ...] = get_args(Family)
_DNS_FAMILIES = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6}
_SOCKTYPES = {"udp": socket.SOCK_DGRAM, "tcp": socket.SOCK_STREAM}
_MAX_DNS_NAME = 253


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where to reach (or listen for) a peer; IP hosts are kept in canonical form."""

    host: str
    port: int
    transport: Transport
    family: Family
    peer_id: PeerID | None = None

    def __post_init__(self) -> None:
        if self.transport not in _TRANSPORTS:
            raise UsageError(f"unsupported transport {self.transport!r} (expected udp or tcp)")
        if self.family not in _FAMILIES:
            raise UsageError(
                f"unsupported address family {self.family!r} (expected one of {_FAMILIES})"
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise UsageError(f"port must be an int, got {type(self.port).__name__}")
        if not 0 <= self.port <= 0xFFFF:
            raise UsageError(f"port {self.port} out of range 0-65535")
        if self.peer_id is not None and not isinstance(self.peer_id, PeerID):
            raise UsageError(f"peer_id must be a PeerID, got {type(self.peer_id).__name__}")
        if not isinstance(self.host, str):
            raise UsageError(f"host must be str, got {type(self.host).__name__}")
        if self.family in _DNS_FAMILIES:
            _check_dns_name(self.host)
        else:
            # Canonical text keeps Endpoint equality meaningful ("0::1" == "::1").
            ip = _parse_ip(self.host)
            if f"ip{ip.version}" != self.family:
                raise UsageError(f"host {self.host!r} is not an {self.family} address")
            object.__setattr__(self, "host", str(ip))

    @property
    def sockaddr(self) -> tuple[str, int] | tuple[str, int, int, int]:
        """Address tuple for socket.sendto/connect; DNS endpoints need resolve() first."""
        if self.family == "ip4":
            return (self.host, self.port)
        if self.family == "ip6":
            return (self.host, self.port, 0, 0)
        raise UsageError(
            f"{self.family} endpoint {self.host!r} has no sockaddr; resolve() it first"
        )

    def to_multiaddr(self) -> Multiaddr:
        text = f"/{self.family}/{self.host}/{self.transport}/{self.port}"
        if self.peer_id is not None:
            text += f"/p2p/{self.peer_id}"
        try:
            return Multiaddr(text)
        except ValueError as exc:  # multiaddr's ParseError derives from ValueError
            raise UsageError(f"cannot build multiaddr {text!r}: {exc}") from None

    async def resolve(self) -> Endpoint:
        """Resolve a dns4/dns6 endpoint to an ip4/ip6 one (IP endpoints return self).

        Only the family the multiaddr names is asked for, as the multiaddr
        spec requires.  Raises PeerUnreachableError if the name does not
        resolve.
        """
        if self.family not in _DNS_FAMILIES:
            return self
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.host,
                self.port,
                family=_DNS_FAMILIES[self.family],
                type=_SOCKTYPES[self.transport],
            )
        except OSError as exc:
            raise PeerUnreachableError(
                f"cannot resolve {self.family} name {self.host!r}: {exc}"
            ) from exc
        if not infos:
            raise PeerUnreachableError(f"{self.family} name {self.host!r} has no addresses")
        sockaddr = infos[0][4]
        return Endpoint(
            host=str(sockaddr[0]),
            port=self.port,
            transport=self.transport,
            family="ip4" if self.family == "dns4" else "ip6",
            peer_id=self.peer_id,
        )


def parse_multiaddr(ma: str | Multiaddr) -> Endpoint:
    """Parse ``/ip4|ip6|dns4|dns6/<host>/udp|tcp/<port>[/p2p/<peer-id>]``.

    Port 0 is accepted (listen on any port).  Anything else raises UsageError.
    """
    if not isinstance(ma, (str, Multiaddr)):
        raise UsageError(f"multiaddr must be str or Multiaddr, got {type(ma).__name__}")
    try:
        parsed = Multiaddr(ma)
        text = str(parsed)  # also validates a Multiaddr built from raw bytes
        parts = [(proto.name, value) for proto, value in parsed.items()]
    except ValueError as exc:  # multiaddr's ParseError derives from ValueError
        shown = ma if isinstance(ma, str) else ma.to_bytes().hex()
        raise UsageError(f"invalid multiaddr {shown!r}: {exc}") from None

    names = [name for name, _ in parts]
    if len(parts) not in (2, 3) or names[0] not in _FAMILIES or names[1] not in _TRANSPORTS:
        raise UsageError(
            f"unsupported multiaddr {text}: expected "
            "/ip4|ip6|dns4|dns6/<host>/udp|tcp/<port>[/p2p/<peer-id>], got /"
            + "/".join(names)
        )
    peer_id = None
    if len(parts) == 3:
        if names[2] != "p2p":
            raise UsageError(
                f"unsupported multiaddr {text}: /{names[2]} after the port (only /p2p allowed)"
            )
        peer_id = PeerID.from_string(parts[2][1])
    return Endpoint(
        host=parts[0][1],
        port=int(parts[1][1]),
        transport=cast(Transport, names[1]),
        family=cast(Family, names[0]),
        peer_id=peer_id,
    )


def endpoint_to_multiaddr(
    host: str, port: int, transport: Transport, peer_id: PeerID | None = None
) -> Multiaddr:
    """Multiaddr for an IP literal host; ip4 or ip6 is taken from the host itself.

    DNS names are refused because their family (dns4/dns6) cannot be guessed;
    build an ``Endpoint`` with the family and call ``to_multiaddr()`` instead.
    """
    ip = _parse_ip(host)
    family: Family = "ip4" if ip.version == 4 else "ip6"
    return Endpoint(str(ip), port, transport, family, peer_id).to_multiaddr()


def sockaddr_to_multiaddr(
    sockaddr: tuple[str, int] | tuple[str, int, int, int], transport: Transport
) -> Multiaddr:
    """Multiaddr for an address returned by recvfrom/getpeername/getsockname.

    IPv4-mapped IPv6 addresses (from dual-stack sockets) become /ip4, so one
    remote has one address whichever socket saw it.  Scoped (link-local with
    a zone) IPv6 addresses are refused: Endpoint has no zone field.
    """
    if not isinstance(sockaddr, tuple) or len(sockaddr) not in (2, 4):
        raise UsageError(
            f"sockaddr must be (host, port) or (host, port, flowinfo, scope_id), got {sockaddr!r}"
        )
    host, port = sockaddr[0], sockaddr[1]
    if len(sockaddr) == 4 and sockaddr[3]:
        raise UsageError(f"scoped IPv6 address {host!r} (scope id {sockaddr[3]}) is not supported")
    ip = _parse_ip(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return endpoint_to_multiaddr(str(ip), port, transport)


def _parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if not isinstance(host, str):
        raise UsageError(f"host must be str, got {type(host).__name__}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{host!r} is not an IPv4 or IPv6 address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise UsageError(f"scoped IPv6 address {host!r} is not supported")
    return ip


def _check_dns_name(name: str) -> None:
    if not name or len(name) > _MAX_DNS_NAME:
        raise UsageError(f"DNS name must be 1-{_MAX_DNS_NAME} characters, got {len(name)}")
    if "/" in name or any(c.isspace() for c in name):
        raise UsageError(f"DNS name {name!r} contains '/' or whitespace")
