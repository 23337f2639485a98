"""Reliable delivery between two hosts in separate network namespaces over an impaired link.

Loss: iptables ``statistic`` drops 10% of the UDP datagrams entering each namespace.
Delay 20 ms +- 10 ms (jitter: reordering) and duplication (1%): a seeded userspace relay in
namespace b (this kernel has no ``tc netem``). The two ends are msgnet/_testing/transfer.py;
the receiver stays up until the sender is done, so the last acknowledgements get through.
"""

from __future__ import annotations

import pytest
from netns import namespace_pair

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

RELAY = ["--delay", "0.01", "--jitter", "0.02", "--duplicate", "0.01", "--seed", "11"]


@pytest.mark.parametrize("blob", ["last", "first"],
                         ids=["messages-then-blob", "blob-then-messages"])
def test_reliable_delivery_across_an_impaired_link(blob: str) -> None:
    with namespace_pair() as pair:
        pair.drop_udp(0.1)  # each way
        sent, got = pair.transfer(RELAY, ["--messages", "10000", "--blob", blob])
    assert got["messages"] == got["deliveries"] == 10_000  # each exactly once
    assert got["blobs"] == [sent["sha256"]]  # exactly once, intact
    assert sent["failed"] == 0  # every message acknowledged: none declared unreachable
    assert sent["retransmissions"] > 0  # the loss was real, and repaired
    print(f"10,000 reliable messages and 1 MiB ({blob}) over 10% loss in "
          f"{sent['seconds']:.1f} s: {sent}")
