# cython: language_level=3
"""A bytes object filled in place: the reassembly buffer of a fragmented message.

A reassembled message is handed to its handler as ``bytes``. Joining the fragments at the end
copies the whole message once more, on the path between its last packet and the handler (and
the acknowledgement its sender may be waiting for). Instead, the delivery core
(core/delivery.py) asks here for a bytes object of the message's size when its first
full-sized fragment arrives, copies each fragment to its place as it comes, and hands the
object out when the last one is in: one copy per byte, none at the end.

Writing into a bytes object is sound only while nothing else holds it: ``new_buffer`` returns
one that is not shared (never a cached singleton), and its only holder, the reassembly,
gives it away just once, through ``finish``. Without the extension, delivery.py uses a
bytearray and copies at the end (see its fallback).
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from msgnet.errors import UsageError


cdef extern from "Python.h":
    void Py_SET_SIZE(object o, Py_ssize_t size)


def new_buffer(Py_ssize_t capacity) -> bytes:
    """A bytes object of ``capacity`` (at least 2) bytes to fill with ``write``; its content
    is undefined until written. CPython shares its empty and one-byte bytes objects, hence
    the lower bound."""
    if capacity < 2:
        raise UsageError(f"a message buffer holds at least 2 bytes, not {capacity}")
    return PyBytes_FromStringAndSize(NULL, capacity)


def write(bytes buffer not None, Py_ssize_t offset, data) -> None:
    """Copy ``data`` (any buffer) into ``buffer`` at ``offset``; UsageError if it would not
    fit."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if offset < 0 or view.len > PyBytes_GET_SIZE(buffer) - offset:
            raise UsageError(f"{view.len} bytes at {offset} do not fit a "
                             f"{PyBytes_GET_SIZE(buffer)}-byte buffer")
        memcpy(PyBytes_AS_STRING(buffer) + offset, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def finish(bytes buffer not None, Py_ssize_t size) -> bytes:
    """``buffer`` cut to its first ``size`` bytes, in place, and returned: the message. The
    memory beyond stays allocated with it (at most one fragment's worth: the last fragment
    may be shorter than the room kept for it)."""
    if not 0 < size <= PyBytes_GET_SIZE(buffer):
        raise UsageError(f"cannot cut a {PyBytes_GET_SIZE(buffer)}-byte buffer to {size}")
    if size < PyBytes_GET_SIZE(buffer):
        Py_SET_SIZE(buffer, size)
        PyBytes_AS_STRING(buffer)[size] = 0  # bytes objects end with a NUL byte
    return buffer
