"""Counters of a host, as a dict and in Prometheus text format.

The hot path counts in C (the engine) and the handshake core counts in a
dict; this module only merges and renders them, so reading metrics costs
nothing until someone asks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

# Counters that are gauges (current values), not monotonically increasing totals.
GAUGES = frozenset({"sessions", "pending_handshakes", "peers_known", "pending_requests",
                    "stream_connections"})


def merge(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Sum counters of the same name from several sources (engines, handshaker, network)."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))


def prometheus_text(counters: Mapping[str, int], *, prefix: str = "msgnet",
                    labels: Mapping[str, str] | None = None) -> str:
    """Render counters in the Prometheus text exposition format (version 0.0.4)."""
    label_text = ""
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        label_text = "{" + inner + "}"
    lines = []
    for name, value in sorted(counters.items()):
        kind = "gauge" if name in GAUGES else "counter"
        metric = f"{prefix}_{name}" if kind == "gauge" else f"{prefix}_{name}_total"
        lines.append(f"# TYPE {metric} {kind}")
        lines.append(f"{metric}{label_text} {int(value)}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
