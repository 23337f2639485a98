"""Two network namespaces joined by a veth pair, for tests that cross a real (impaired) link.

The kernel here has no ``tc netem``: loss comes from iptables' ``statistic`` match, rate limits
from ``tc tbf``; delay, reordering and duplication from msgnet's seeded userspace relay.
Everything is torn down on exit, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

SUBNET = "10.231.{}.{}"


def require_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs iproute2 and iptables)")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@dataclass
class NamespacePair:
    a: str
    b: str
    addr_a: str
    addr_b: str
    dev_a: str
    dev_b: str

    def exec_args(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def iptables(self, ns: str, *rule: str) -> None:
        sh(*self.exec_args(ns), "iptables", *rule)


@contextmanager
def namespace_pair() -> Iterator[NamespacePair]:
    require_netns()
    tag = uuid.uuid4().hex[:6]
    a, b = f"msgnet-a-{tag}", f"msgnet-b-{tag}"
    veth_a, veth_b = f"mva{tag}", f"mvb{tag}"
    subnet = int(tag[:2], 16) % 250 + 1
    addr_a, addr_b = SUBNET.format(subnet, 1), SUBNET.format(subnet, 2)
    created: list[str] = []
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        sh("ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        sh("ip", "link", "set", veth_a, "netns", a)
        sh("ip", "link", "set", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, addr_a), (b, veth_b, addr_b)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield NamespacePair(a, b, addr_a, addr_b, veth_a, veth_b)
    finally:
        for ns in created:  # deleting a namespace removes its veth end and iptables rules
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
