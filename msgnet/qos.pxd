# C-level declarations that Cython applies to qos.py when it compiles it (pure-Python mode,
# "augmenting .pxd", as core/delivery.pxd does for the core): DeliveryManager becomes a cdef
# class whose per-message and per-packet methods reach the session, the engine and the core
# by C calls. qos.py stays the reference and runs as plain Python where nothing is built.

cimport cython

from msgnet._engine cimport SendRoute, Session, UdpEngine
from msgnet.core.delivery cimport DeliveryConnection

cdef Py_ssize_t _DATA_OVERHEAD, _BURST_BYTES, _BURST_FRAGMENTS
cdef int _PMTU_IDLE, _PMTU_SEARCHING


@cython.final
cdef class DeliveryManager:
    cdef object _loop
    cdef Py_ssize_t _max_datagram
    cdef Py_ssize_t _max_message
    cdef object _budget
    cdef dict _conns
    cdef dict _timers
    cdef dict _waiters
    cdef object _on_large
    cdef dict _overheads
    cdef dict _pending
    cdef Session _scheduled
    cdef str _overhead_protocol
    cdef Py_ssize_t _overhead_last
    cdef dict _room_waiters
    cdef object _flush_handle
    cdef double _now
    cdef SendRoute _route
    cdef dict _held

    @cython.locals(room=Py_ssize_t, overhead=Py_ssize_t)
    cpdef bint send_reliable_nowait(self, Session session, UdpEngine engine, str protocol,
                                    payload, bint ordered) except -1
    @cython.locals(session=Session)
    cpdef int send_routed(self, peer_id, str protocol, data, bint ordered) except -2
    @cython.locals(overhead=object)
    cpdef Py_ssize_t _overhead_for(self, str protocol) except -1
    cdef _search_if_large(self, Session session, data, Py_ssize_t room)
    @cython.locals(entry=tuple)
    cpdef DeliveryConnection _conn(self, Session session, UdpEngine engine)
    cpdef schedule(self, Session session)
    @cython.locals(session=Session, entry=tuple)
    cpdef _flush(self)
    @cython.locals(now=cython.double, i=Py_ssize_t, fragments=list, payloads=list,
                   carried=list, room=Py_ssize_t, unsent=Py_ssize_t)
    cpdef _pump(self, Session session, DeliveryConnection conn, UdpEngine engine)
    cpdef _send_packet(self, Session session, DeliveryConnection conn, UdpEngine engine,
                       bytes payload, list carried, double now)
    cpdef _arm(self, Session session, DeliveryConnection conn)
    @cython.locals(entry=tuple, conn=DeliveryConnection, now=cython.double)
    cpdef packet_received(self, Session session, long long counter, bint acknowledge)
    @cython.locals(entry=tuple, conn=DeliveryConnection)
    cpdef ack_received(self, Session session, long long largest, long long ack_delay_us,
                       long long first_range, tuple ranges)
