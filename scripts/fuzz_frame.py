#!/usr/bin/env python3
"""Mutation fuzz of the frame decoder: any input decodes to valid frames or raises FrameError.

Seeds are valid packets of random frames (with PADDING and skippable unknown frames
between them). Each input is a mutated seed: a truncation, bit flips, random bytes,
a splice of two seeds, an overwritten/inserted/deleted byte, or a length lie (a
frame's length varint, or any varint, rewritten larger, smaller or non-minimal).
Inputs go in as bytes, bytearray or an offset memoryview slice. A successful
decode must re-encode and decode back to the same frames, and frame-by-frame
decoding must agree with decode_packet; with --oracle-every N every Nth input is
also compared with the pure-Python twin (same frames or same error message).

    python scripts/fuzz_frame.py --iterations 10000000 --seed 7 --oracle-every 10

tests/test_frame.py runs a short, fixed-seed pass of the same code.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from msgnet import _frame, _frame_py  # noqa: E402
from msgnet.errors import FrameError  # noqa: E402
from msgnet.limits import (  # noqa: E402
    FLAG_ORDERED,
    FLAG_RELIABLE,
    FLAG_REQUEST,
    FLAG_RESPONSE,
    MAX_ACK_RANGES,
    MAX_FRAGMENTS,
)

PROTOCOLS = ("/echo/1.0.0", "/ipfs/kad/1.0.0", "/é/ü/日本語", "/" + "x" * 255, "p")
FIELDS = {
    "Init": ("transport_id", "protocol", "protocol_int", "payload", "flags", "request_id",
             "seq", "frag_index", "frag_count"),
    "Continuation": ("protocol_int", "payload", "flags", "request_id", "seq", "frag_index",
                     "frag_count"),
    "Ack": ("transport_id",),
    "Reset": ("protocol_int", "code"),
    "Bound": ("protocol_int",),
    "DeliveryAck": ("largest", "ack_delay_us", "first_range", "ranges"),
    "Ping": ("data",),
    "Pong": ("data",),
    "Close": ("code", "reason"),
}


def describe(frame: Any) -> tuple[Any, ...]:
    """An implementation-neutral value of a frame, to compare the two codecs' results."""
    name = type(frame).__name__
    values = (getattr(frame, field) for field in FIELDS[name])
    return (name, *(bytes(v) if isinstance(v, memoryview) else v for v in values))


def _u63(rng: random.Random) -> int:
    """A varint value, biased to the small ones real traffic has."""
    return rng.choice((rng.randrange(128), rng.randrange(1 << 14),
                       rng.getrandbits(rng.randrange(1, 64))))


def message_fields(rng: random.Random) -> dict[str, int]:
    """Keyword arguments of a valid INIT/CONTINUATION (wire.md 3.2 flag rules)."""
    kind = rng.choice((0, FLAG_REQUEST, FLAG_RESPONSE))
    fields = {"flags": kind}
    if kind:
        fields["request_id"] = _u63(rng)
    if rng.random() < 0.6:
        fields["seq"] = _u63(rng)
        fields["flags"] |= rng.choice((0, FLAG_RELIABLE, FLAG_RELIABLE | FLAG_ORDERED))
        if rng.random() < 0.3:
            fields["frag_count"] = rng.randint(1, MAX_FRAGMENTS)
            fields["frag_index"] = rng.randrange(fields["frag_count"])
    return fields


def random_frame(rng: random.Random, codec: ModuleType) -> Any:
    """A random valid frame of any type."""
    payload = rng.randbytes(rng.choice((0, 1, 7, 64, 300)))
    kind = rng.randrange(9)
    if kind == 0:
        return codec.Init(rng.randrange(1 << 16), rng.choice(PROTOCOLS), rng.randrange(1 << 16),
                          payload, **message_fields(rng))
    if kind == 1:
        return codec.Continuation(rng.randrange(1 << 16), payload, **message_fields(rng))
    if kind == 2:
        return codec.Ack(rng.randrange(1 << 16))
    if kind == 3:
        return codec.Reset(rng.randrange(1 << 16), rng.randrange(256))
    if kind == 4:
        return codec.Bound(rng.randrange(1 << 16))
    if kind == 5:
        ranges = [(_u63(rng), _u63(rng)) for _ in range(rng.choice((0, 1, 3, MAX_ACK_RANGES)))]
        return codec.DeliveryAck(_u63(rng), _u63(rng), _u63(rng), ranges)
    if kind in (6, 7):
        return (codec.Ping if kind == 6 else codec.Pong)(payload[: rng.randint(0, 32)])
    return codec.Close(rng.randrange(4), rng.choice(("", "bye", "idle ⏳", "x" * 128)))


def seed_packet(rng: random.Random) -> tuple[bytes, list[int]]:
    """A valid packet payload and the offsets where its length-prefixed frames start."""
    out = bytearray()
    starts = []
    for _ in range(rng.randint(1, 8)):
        out += bytes(rng.choice((0, 0, 0, 1, 5)))  # PADDING
        starts.append(len(out))
        if rng.random() < 0.1:  # skippable unknown frame
            body = rng.randbytes(rng.randrange(12))
            out += bytes([rng.randint(0x40, 0x7F)]) + _frame.encode_varint(len(body)) + body
        else:
            out += _frame.encode_frame(random_frame(rng, _frame))
    return bytes(out), starts


def _rewrite_varint(rng: random.Random, data: bytes, at: int) -> bytes:
    """Replace the varint at data[at:] by a lie: off by one, random, zero, or non-minimal."""
    try:
        value, end = _frame.decode_varint(data, at)
    except FrameError:
        return data
    lie = rng.choice((value + 1, max(value - 1, 0), value + rng.randint(2, 2000), 0,
                      rng.getrandbits(rng.randrange(1, 63)), value))
    raw = _frame.encode_varint(lie)
    if rng.random() < 0.2:  # the same value, non-minimal
        raw = raw[:-1] + bytes([raw[-1] | 0x80, 0])
    return data[:at] + raw + data[end:]


def mutate(rng: random.Random, seeds: list[tuple[bytes, list[int]]]) -> bytes:
    """One fuzz input derived from a random seed."""
    data, starts = rng.choice(seeds)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not data:
            break
        how = rng.randrange(8)
        if how == 0:
            data = data[: rng.randrange(len(data))]
        elif how == 1:
            buf = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            data = bytes(buf)
        elif how == 2:
            data = rng.randbytes(rng.randrange(64))
        elif how == 3:
            at = rng.choice(starts) + 1
            data = _rewrite_varint(rng, data, at) if at < len(data) else data
        elif how == 4:
            data = _rewrite_varint(rng, data, rng.randrange(len(data)))
        elif how == 5:
            at = rng.randrange(len(data))
            byte = bytes([rng.choice((0x00, 0x01, 0x3F, 0x40, 0x7F, 0x80, 0xFF))])
            data = data[:at] + byte + data[at + rng.randint(0, 1):]
        elif how == 6:
            at = rng.randrange(len(data))
            data = data[:at] + data[at + 1:]
        else:
            other = rng.choice(seeds)[0]
            data = data[: rng.randrange(len(data))] + other[rng.randrange(len(other)):]
    return data


def as_buffer(rng: random.Random, data: bytes) -> Any:
    """data as bytes, a bytearray or a memoryview slice at an offset (pointer rebasing)."""
    how = rng.randrange(5)
    if how == 0:
        return bytearray(data)
    if how == 1:
        return memoryview(b"\xaa\x00" + data + b"\x07")[2 : 2 + len(data)]
    return data


def outcome(codec: ModuleType, data: Any) -> tuple[Any, ...]:
    """decode_packet's result, comparable across codecs: the frames, or the error and the
    frames before it."""
    try:
        return ("ok", [describe(f) for f in codec.decode_packet(data)])
    except FrameError as exc:
        kept = exc.frames  # type: ignore[attr-defined]  # set by decode_packet
        return ("error", str(exc), [describe(f) for f in kept])


def check(data: Any, oracle: bool) -> str:
    """Decode one input with the Cython codec; raise AssertionError on any disagreement."""
    result = outcome(_frame, data)
    if result[0] == "ok":
        frames = _frame.decode_packet(data)
        again = _frame.decode_packet(_frame.encode_packet(frames))
        assert again == frames, f"re-encoded frames differ for {bytes(data).hex()}"
        stepped, pos = [], 0
        while True:
            frame, pos = _frame.decode_frame(data, pos)
            if frame is None:
                break
            stepped.append(frame)
        assert stepped == frames, f"decode_frame and decode_packet differ: {bytes(data).hex()}"
    if oracle:
        expected = outcome(_frame_py, data)
        assert result == expected, f"codecs differ on {bytes(data).hex()}:\n{result}\n{expected}"
    return str(result[0])


def run(iterations: int, seed: int, oracle_every: int = 0) -> Counter[str]:
    """Fuzz for a number of inputs; a Counter of outcomes ('ok', 'error')."""
    rng = random.Random(seed)
    seeds = [seed_packet(rng) for _ in range(256)]
    outcomes: Counter[str] = Counter()
    for i in range(iterations):
        data = as_buffer(rng, mutate(rng, seeds))
        outcomes[check(data, oracle_every > 0 and i % oracle_every == 0)] += 1
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--oracle-every", type=int, default=0,
                        help="compare every Nth input with the pure-Python twin (0: never)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    outcomes = run(args.iterations, args.seed, args.oracle_every)
    elapsed = time.perf_counter() - started
    print(f"{args.iterations} inputs in {elapsed:.1f} s: {dict(outcomes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
