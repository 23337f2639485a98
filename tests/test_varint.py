"""Varints (docs/wire.md notation): minimal unsigned LEB128, at most 9 bytes, values < 2**63.

Checked against the shared multiformats vectors, against each other (the Cython
codec and its pure-Python twin), and against the ``varint`` package.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import ModuleType

import pytest
import varint

from msgnet import _frame, _frame_py
from msgnet.errors import FrameError, UsageError

VECTORS_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "vectors" / "varint_multiaddr_vectors.json"
)
if not VECTORS_FILE.is_file():
    raise FileNotFoundError(f"shared test vectors missing: {VECTORS_FILE}")
VECTORS = json.loads(VECTORS_FILE.read_text())

CODECS = [pytest.param(_frame, id="cython"), pytest.param(_frame_py, id="pure")]

# What each invalid vector's "why" means in our error messages.
PROBLEMS = {"non-minimal": "non-minimal varint", "truncated": "truncated varint",
            "empty": "truncated varint", "longer than 9": "varint longer than 9 bytes"}


def _problem(why: str) -> str:
    return next(text for key, text in PROBLEMS.items() if key in why)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["hex"])
def test_valid_vectors(codec: ModuleType, vector: dict) -> None:
    raw = bytes.fromhex(vector["hex"])
    assert codec.encode_varint(vector["value"]) == raw
    assert codec.decode_varint(raw) == (vector["value"], len(raw))
    assert codec.decode_varint(b"\xff" + raw + b"\x01", 1) == (vector["value"], 1 + len(raw))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["why"])
def test_invalid_vectors(codec: ModuleType, vector: dict) -> None:
    with pytest.raises(FrameError, match=f"^{_problem(vector['why'])} at offset 0$"):
        codec.decode_varint(bytes.fromhex(vector["hex"]))


@pytest.mark.parametrize("codec", CODECS)
def test_error_offset_is_where_the_varint_starts(codec: ModuleType) -> None:
    with pytest.raises(FrameError, match="^non-minimal varint at offset 3$") as info:
        codec.decode_varint(b"\x01\x02\x03\x80\x00", 3)
    assert info.value.offset == 3


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("data", [bytearray(b"\xac\x02"), memoryview(b"\x00\xac\x02")[1:]])
def test_decode_accepts_any_buffer(codec: ModuleType, data: bytearray | memoryview) -> None:
    assert codec.decode_varint(data) == (300, 2)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("value", [-1, 1 << 63, 1 << 64])
def test_encode_rejects_out_of_range(codec: ModuleType, value: int) -> None:
    with pytest.raises(UsageError):
        codec.encode_varint(value)


@pytest.mark.parametrize("codec", CODECS)
def test_encode_rejects_non_int(codec: ModuleType) -> None:
    with pytest.raises(TypeError):
        codec.encode_varint(1.0)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("offset", [-1, 3])
def test_offset_outside_input_is_usage_error(codec: ModuleType, offset: int) -> None:
    with pytest.raises(UsageError):
        codec.decode_varint(b"\x01\x02", offset)


def _outcome(codec: ModuleType, data: bytes) -> tuple[int, int] | str:
    try:
        return codec.decode_varint(data)
    except FrameError as exc:
        return str(exc)


def test_twins_agree_on_every_input_up_to_two_bytes() -> None:
    inputs = [bytes(p) for n in (0, 1, 2) for p in itertools.product(range(256), repeat=n)]
    for data in inputs:
        assert _outcome(_frame, data) == _outcome(_frame_py, data), data.hex()


def test_twins_agree_on_nine_and_ten_byte_edges() -> None:
    for tail in range(256):
        for data in (b"\xff" * 8 + bytes([tail]), b"\x80" * 8 + bytes([tail]),
                     b"\xff" * 9 + bytes([tail])):
            assert _outcome(_frame, data) == _outcome(_frame_py, data), data.hex()


def test_agrees_with_varint_package_on_a_million_values() -> None:
    rng = random.Random(20240611)
    widths = rng.choices([7 * n for n in range(1, 9)] + [63], k=1_000_000)
    values = [rng.getrandbits(width) for width in widths]
    encoded = list(map(_frame.encode_varint, values))
    assert {len(raw) for raw in encoded} == set(range(1, 10))
    assert encoded == list(map(varint.encode, values))
    assert [value for value, _ in map(_frame.decode_varint, encoded)] == values
    sample = rng.sample(range(len(values)), 100_000)
    assert [varint.decode_bytes(encoded[i]) for i in sample] == [values[i] for i in sample]
