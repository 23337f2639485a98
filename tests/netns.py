"""Two network namespaces joined by a veth pair, for tests that cross a real (impaired) link.

The kernel here has no ``tc netem``: loss comes from iptables' ``statistic`` match, rate limits
from ``tc tbf``; delay, reordering and duplication from msgnet's seeded userspace relay.
Everything is torn down on exit, also when the test fails.

benchmarks/reliable.py imports this module too (pytest is needed only to skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBNET = "10.231.{}.{}"
ROOT = Path(__file__).resolve().parents[1]


def netns_unavailable() -> str | None:
    """Why network namespace pairs cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs iproute2 and iptables)"
    return None


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        import pytest

        pytest.skip(reason)


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

    def drop_udp(self, probability: float) -> None:
        """Drop this share of the UDP datagrams entering each namespace (iptables statistic)."""
        for ns, dev in ((self.a, self.dev_a), (self.b, self.dev_b)):
            self.iptables(ns, "-A", "INPUT", "-i", dev, "-p", "udp", "-m", "statistic",
                          "--mode", "random", "--probability", str(probability), "-j", "DROP")

    def transfer(self, receiver: list[str], sender: list[str], timeout: float = 250.0
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
        """One msgnet._testing.transfer run: the receiver (and its relay) in b, the sender
        in a. The receiver stays up until the sender has exited, then reports. Returns the
        sender's report and the receiver's."""
        module = [sys.executable, "-m", "msgnet._testing.transfer"]
        proc = subprocess.Popen(
            self.exec_args(self.b) + module + ["receive", "--host", self.addr_b] + receiver,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            hello = json.loads(proc.stdout.readline())
            done = subprocess.run(
                self.exec_args(self.a) + module
                + ["send", "--host", self.addr_b, "--port", str(hello["port"]),
                   "--peer", hello["peer"]] + sender,
                check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            if done.returncode != 0:
                raise AssertionError(f"sender failed:\n{done.stderr}")
            sent = json.loads(done.stdout.strip().splitlines()[-1])
            proc.stdin.write("report\n")
            proc.stdin.flush()
            received = json.loads(proc.stdout.readline())
            return sent, received
        finally:
            proc.kill()
            proc.wait()


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
            subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
