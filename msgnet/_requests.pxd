# C-level declarations that Cython applies to _requests.py when it compiles it (pure-Python
# mode, "augmenting .pxd", as core/delivery.pxd and qos.pxd do): PendingRequest, made and
# settled once per request_callback round trip, becomes a cdef class. _requests.py runs as
# plain Python where nothing is built.

cimport cython

cdef int _PENDING, _DONE, _FAILED, _CANCELLED


@cython.final
cdef class PendingRequest:
    cdef object _callback
    cdef object _loop
    cdef dict _pending
    cdef public object _request_id
    cdef int _state
    cdef object _value
    cdef object _task

    cpdef bint done(self)
    cpdef bint cancelled(self)
    cpdef result(self)
    cpdef exception(self)
    cpdef bint cancel(self)
    cpdef set_result(self, value)
    cpdef set_exception(self, exc)
    cdef _settle(self, int state, value)
