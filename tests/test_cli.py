"""The msgnet command: help and exit codes, `demo`, and `node` driven by `dht`, `ping`
and its metrics endpoint from other processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def msgnet(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgnet", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, check=False)


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Node:
    """A running `msgnet node` subprocess."""

    def __init__(self, key: Path, *extra: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "msgnet", "node", "--listen", "/ip4/127.0.0.1/udp/0",
             "--key", str(key), *extra],
            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.process.stdout is not None
        self.addr = self.process.stdout.readline().strip()
        assert self.addr.startswith("/ip4/127.0.0.1/udp/") and "/p2p/" in self.addr, self.addr

    def stop(self) -> int:
        """SIGTERM, as a service manager would; the node must exit cleanly."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=10)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    try:
        yield started
    finally:
        for node in started:
            node.kill()


def test_help_and_usage_errors() -> None:
    result = msgnet("--help")
    assert result.returncode == 0
    for command in ("demo", "node", "id", "ping", "dht"):
        assert command in result.stdout
    assert "put" in msgnet("dht", "--help").stdout
    assert msgnet("no-such-command").returncode == 2
    assert msgnet("demo", "--nodes", "1").returncode == 2
    assert msgnet("dht", "put", "only-a-key", "--bootstrap", "/ip4/127.0.0.1/udp/1").returncode == 2
    bad = msgnet("dht", "get", "not-a-key", "--bootstrap", "/ip4/127.0.0.1/udp/1/p2p/x")
    assert bad.returncode == 2 and "msgnet:" in bad.stderr


def test_id_creates_then_reuses_a_key(tmp_path: Path) -> None:
    key = tmp_path / "id.key"
    first = msgnet("id", "--key", str(key))
    assert first.returncode == 0 and "created" in first.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    second = msgnet("id", "--key", str(key))
    assert second.stdout == first.stdout and second.stdout.startswith("12D3Koo")


@pytest.mark.slow
def test_demo_with_10_nodes_succeeds_and_prints_a_summary() -> None:
    result = msgnet("demo", "--nodes", "10", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for needle in ("put", "get", "provide", "find providers", "request/response",
                   "handshakes", "result             OK"):
        assert needle in result.stdout
    assert "bootstrapped" in result.stderr  # progress goes to stderr


@pytest.mark.slow
def test_dht_and_ping_against_running_nodes(tmp_path: Path, nodes: list[Node]) -> None:
    port = free_tcp_port()
    nodes.append(Node(tmp_path / "a.key", "--metrics-port", str(port)))
    nodes.append(Node(tmp_path / "b.key", "--bootstrap", nodes[0].addr))
    first, second = nodes[0].addr, nodes[1].addr

    put = msgnet("dht", "put", "greeting", "hello from a test", "--bootstrap", first,
                 "--key", str(tmp_path / "writer.key"), "--json")
    assert put.returncode == 0, put.stderr
    written = json.loads(put.stdout)
    assert written["key"].startswith("/pk/12D3Koo") and written["stored"] >= 2

    got = msgnet("dht", "get", written["key"], "--bootstrap", second, "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["value"] == "hello from a test"
    plain = msgnet("dht", "get", written["key"], "--bootstrap", second)
    assert plain.stdout.strip() == "hello from a test"

    missing = msgnet("dht", "get", written["key"] + "-missing", "--bootstrap", second)
    assert missing.returncode == 1 and "not found" in missing.stderr

    provide = msgnet("dht", "provide", "some content", "--bootstrap", first,
                     "--key", str(tmp_path / "writer.key"), "--json")
    assert provide.returncode == 0, provide.stderr
    announced = json.loads(provide.stdout)
    found = msgnet("dht", "providers", announced["cid"], "--bootstrap", second, "--json")
    assert found.returncode == 0, found.stderr
    assert [p["peer"] for p in json.loads(found.stdout)["providers"]] == [announced["provider"]]

    ping = msgnet("ping", second, "--count", "3", "--json")
    assert ping.returncode == 0, ping.stderr
    pinged = json.loads(ping.stdout)
    assert pinged["received"] == 3 and pinged["median_ms"] > 0

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/plain")
    assert "msgnet_kad_requests_in_total" in text and "msgnet_messages_in" in text
    assert "msgnet_kad_routing_table_peers" in text
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)

    for node in nodes:
        assert node.stop() == 0
        assert node.process.stderr is not None
        assert "shutting down" in node.process.stderr.read()


def test_ping_to_a_silent_address_fails_with_exit_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # nobody answers here
        sink.bind(("127.0.0.1", 0))
        key = msgnet("id", "--key", str(tmp_path / "k.key")).stdout.strip()
        addr = f"/ip4/127.0.0.1/udp/{sink.getsockname()[1]}/p2p/{key}"
        result = msgnet("ping", addr, "--count", "1", "--timeout", "0.3")
    assert result.returncode == 1
    assert "failed" in result.stdout
    assert os.path.exists(tmp_path / "k.key")
