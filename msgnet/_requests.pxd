# C-level declarations that Cython applies to _requests.py when it compiles it (pure-Python
# mode, "augmenting .pxd", as core/delivery.pxd and qos.pxd do): the request table, its
# entries and PendingRequest become cdef classes, registered, matched and settled once per
# round trip by C calls. _requests.py runs as plain Python where nothing is built.

cimport cython

from msgnet._engine cimport SendRoute, Session

cdef int _PENDING, _DONE, _FAILED, _CANCELLED
cdef int _FLAG_REQUEST
cdef double _INF
cdef Py_ssize_t _MAX_PENDING


# An outstanding request (fields read-only to Python: the table's filters read them).
cdef class _Request:
    cdef readonly object request_id
    cdef readonly object future
    cdef readonly str protocol
    cdef readonly object peer
    cdef readonly double timeout
    cdef readonly double deadline

    cdef bint _settled(self) except -1
    cdef _settle(self, int state, value)


@cython.locals(entry=_Request)
cdef _Request _new_request(future)


cdef class PendingRequest(_Request):
    cdef object _callback
    cdef object _loop
    cdef RequestTable _table
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
    cdef bint _settled(self) except -1
    cdef _settle(self, int state, value)


@cython.locals(request=PendingRequest)
cdef PendingRequest _pending_request(callback, loop, RequestTable table)


@cython.final
cdef class RequestTable:
    cdef object _loop
    cdef object _time
    cdef dict _entries
    cdef Py_ssize_t _last_id
    cdef object _timer
    cdef double _timer_at
    cdef SendRoute _route
    cdef object _network
    cdef object _later

    @cython.locals(entry=_Request)
    cpdef Py_ssize_t register(self, peer, str protocol, double timeout, future) except -1
    cdef _add(self, _Request entry, peer, str protocol, double timeout)
    @cython.locals(entry=_Request)
    cpdef started(self, request_id)
    @cython.locals(deadline=cython.double)
    cdef _start(self, _Request entry)
    cpdef forget(self, request_id)
    @cython.locals(entry=_Request)
    cpdef Py_ssize_t send(self, network, peer, str protocol, data, future,
                         double timeout) except -1
    @cython.locals(entry=_Request, sent=cython.int)
    cdef bint _send(self, network, peer, str protocol, data, _Request entry,
                    double timeout) except -1
    @cython.locals(request=PendingRequest)
    cdef PendingRequest _send_callback(self, peer, str protocol, data, callback,
                                       double timeout)
    @cython.locals(entries=dict, entry=_Request)
    cpdef on_response(self, Session session, request_id, data)
    @cython.locals(entries=dict, entry=_Request)
    cdef _fail(self, which, make_error)
    cdef _arm(self, double when)
    @cython.locals(entries=dict, entry=_Request, now=cython.double, next_at=cython.double,
                   deadline=cython.double)
    cpdef _expire(self)
