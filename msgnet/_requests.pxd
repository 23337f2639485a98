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


@cython.final
cdef class PendingRequest:
    cdef object _callback
    cdef object _loop
    cdef RequestTable _table
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


@cython.locals(request=PendingRequest)
cdef PendingRequest _pending_request(callback, loop, RequestTable table)


@cython.final
cdef class _Request:
    cdef public object request_id
    cdef public object future
    cdef public str protocol
    cdef public object peer
    cdef public double timeout
    cdef public double deadline


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

    cpdef Py_ssize_t register(self, peer, str protocol, double timeout, future) except -1
    @cython.locals(entry=_Request)
    cdef _Request _add(self, peer, str protocol, double timeout, future)
    @cython.locals(entry=_Request)
    cpdef started(self, request_id)
    @cython.locals(deadline=cython.double)
    cdef _start(self, _Request entry)
    cpdef forget(self, request_id)
    @cython.locals(entry=_Request)
    cpdef Py_ssize_t send(self, network, peer, str protocol, data, future,
                         double timeout) except -1
    @cython.locals(entry=_Request, sent=cython.int)
    cdef _Request _send(self, network, peer, str protocol, data, future, double timeout)
    @cython.locals(request=PendingRequest, entry=_Request)
    cdef PendingRequest _send_callback(self, peer, str protocol, data, callback,
                                       double timeout)
    @cython.locals(entries=dict, entry=_Request, pending=PendingRequest)
    cpdef on_response(self, Session session, request_id, data)
    cdef _arm(self, double when)
