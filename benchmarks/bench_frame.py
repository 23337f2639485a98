"""Frame codec speed: msgnet._frame (Cython), its pure twin _frame_py, and a struct baseline.

One group per operation and frame, the three implementations side by side. Targets:
decoding a 64-byte CONTINUATION under 150 ns median and
at least 10x faster than benchmarks/baseline_struct_codec.py; encoding within 2x of
decoding. Run:

    PYTHONPATH=. python -m pytest benchmarks/bench_frame.py --benchmark-only -q \
        --benchmark-columns=median,ops --benchmark-sort=name
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from benchmarks import baseline_struct_codec as baseline
from msgnet import _frame, _frame_py

IMPLEMENTATIONS = {"cython": _frame, "pure": _frame_py, "baseline": baseline}
PROTOCOL = "/msgnet/echo/1.0.0"

# name -> frame built with a given implementation's classes
FRAMES: dict[str, Callable[[ModuleType], Any]] = {
    "init 64 B": lambda m: m.Init(1, PROTOCOL, 0, bytes(64)),
    "init 1 KiB": lambda m: m.Init(1, PROTOCOL, 0, bytes(1024)),
    "continuation 64 B": lambda m: m.Continuation(3, bytes(64)),
    "continuation 1 KiB": lambda m: m.Continuation(3, bytes(1024)),
    "ack": lambda m: m.Ack(1),
    "reset": lambda m: m.Reset(3, 1),
    "bound": lambda m: m.Bound(3),
    "delivery_ack": lambda m: m.DeliveryAck(100_000, 250, 10, ((2, 5), (1, 3))),
    "ping 32 B": lambda m: m.Ping(bytes(32)),
    "pong 32 B": lambda m: m.Pong(bytes(32)),
    "close": lambda m: m.Close(0, "normal shutdown"),
}
PACKET = 16  # coalesced 64-byte CONTINUATIONs

by_impl = pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
by_frame = pytest.mark.parametrize("frame", list(FRAMES))
by_size = pytest.mark.parametrize("size", [64, 1024], ids=["64 B", "1 KiB"])


@by_frame
@by_impl
def test_decode(benchmark: Any, impl: str, frame: str) -> None:
    codec = IMPLEMENTATIONS[impl]
    wire = _frame.encode_frame(FRAMES[frame](_frame))
    benchmark.group = f"decode {frame}"
    decoded, end = benchmark(codec.decode_frame, wire)
    assert end == len(wire) and codec.encode_frame(decoded) == wire


@by_frame
@by_impl
def test_encode(benchmark: Any, impl: str, frame: str) -> None:
    codec = IMPLEMENTATIONS[impl]
    benchmark.group = f"encode {frame}"
    wire = benchmark(codec.encode_frame, FRAMES[frame](codec))
    assert wire == _frame.encode_frame(FRAMES[frame](_frame))


@by_size
@by_impl
def test_encode_continuation_fast(benchmark: Any, impl: str, size: int) -> None:
    codec = IMPLEMENTATIONS[impl]
    benchmark.group = f"encode_continuation() {size} B"
    wire = benchmark(codec.encode_continuation, 3, bytes(size))
    assert wire == _frame.encode_frame(_frame.Continuation(3, bytes(size)))


@by_size
@by_impl
def test_encode_init_fast(benchmark: Any, impl: str, size: int) -> None:
    codec = IMPLEMENTATIONS[impl]
    benchmark.group = f"encode_init() {size} B"
    wire = benchmark(codec.encode_init, 1, PROTOCOL, 0, bytes(size))
    assert wire == _frame.encode_frame(_frame.Init(1, PROTOCOL, 0, bytes(size)))


@by_impl
def test_decode_packet(benchmark: Any, impl: str) -> None:
    codec = IMPLEMENTATIONS[impl]
    wire = _frame.encode_packet([_frame.Continuation(3, bytes(64))] * PACKET)
    benchmark.group = f"decode packet of {PACKET} continuations 64 B"
    assert len(benchmark(codec.decode_packet, wire)) == PACKET


@by_impl
def test_encode_packet(benchmark: Any, impl: str) -> None:
    codec = IMPLEMENTATIONS[impl]
    frames = [codec.Continuation(3, bytes(64)) for _ in range(PACKET)]
    benchmark.group = f"encode packet of {PACKET} continuations 64 B"
    wire = benchmark(codec.encode_packet, frames)
    assert wire == _frame.encode_packet([_frame.Continuation(3, bytes(64))] * PACKET)
