"""msgnet._buffer: the reassembly buffer, a bytes object filled in place."""

import sys

import pytest

from msgnet.errors import UsageError

_buffer = pytest.importorskip("msgnet._buffer")


def test_fragments_written_in_any_order_make_the_message() -> None:
    buffer = _buffer.new_buffer(12)
    assert type(buffer) is bytes and len(buffer) == 12
    _buffer.write(buffer, 8, memoryview(b"ijkl"))
    _buffer.write(buffer, 0, b"abcd")
    _buffer.write(buffer, 4, bytearray(b"efgh"))
    message = _buffer.finish(buffer, 12)
    assert message is buffer and message == b"abcdefghijkl"


def test_finish_cuts_to_the_size_and_the_message_behaves_as_bytes() -> None:
    buffer = _buffer.new_buffer(10)
    _buffer.write(buffer, 0, b"0123456")
    message = _buffer.finish(buffer, 7)
    assert message == b"0123456" and len(message) == 7
    assert message + b"!" == b"0123456!" and message[-1:] == b"6"
    assert hash(message) == hash(b"0123456") and {message: 1}[b"0123456"] == 1
    assert sys.getsizeof(message) == sys.getsizeof(b"0123456")


def test_buffers_are_never_shared() -> None:
    # CPython caches the empty and one-byte bytes objects: writing into one would change
    # every b"" or b"x" in the process.
    for capacity in (-1, 0, 1):
        with pytest.raises(UsageError):
            _buffer.new_buffer(capacity)
    first, second = _buffer.new_buffer(2), _buffer.new_buffer(2)
    assert first is not second


@pytest.mark.parametrize("offset, data", [(-1, b"a"), (9, b"ab"), (0, b"x" * 11), (11, b"")])
def test_writes_beyond_the_buffer_raise(offset: int, data: bytes) -> None:
    buffer = _buffer.new_buffer(10)
    with pytest.raises(UsageError):
        _buffer.write(buffer, offset, data)


@pytest.mark.parametrize("size", [0, -1, 11])
def test_finish_outside_the_buffer_raises(size: int) -> None:
    with pytest.raises(UsageError):
        _buffer.finish(_buffer.new_buffer(10), size)
