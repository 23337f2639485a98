# C-level declarations that Cython applies to delivery.py when it compiles it (pure-Python
# mode, "augmenting .pxd"): the per-message objects become cdef classes with typed fields,
# and the per-fragment helpers cdef methods. delivery.py stays the reference and runs as
# plain Python where nothing is built (MSGNET_NO_EXTENSIONS=1).

cimport cython

# Constants read per message or per fragment: C values instead of module-dict lookups and
# Python arithmetic (they are no longer attributes of the compiled module; nothing reads
# them from there).
cdef int FLAG_FRAGMENT, FLAG_ORDERED, FLAG_RELIABLE, FLAG_SEQ
cdef long long SEQ_WINDOW
cdef Py_ssize_t MAX_FRAGMENTS, MAX_BEST_EFFORT_FRAGMENTS, MAX_OUTSTANDING_PER_SESSION
cdef Py_ssize_t _FRAGMENT_OVERHEAD, _PER_MESSAGE_COST, _SENT_MESSAGE_COST


# OutgoingMessage and Fragment are also @cython.no_gc (in delivery.py: the directive is only
# honoured there): see Fragment's docstring. A message of one fragment is a Fragment.
cdef class OutgoingMessage:
    cdef public str protocol
    cdef public long long seq
    cdef public int flags
    cdef public long long request_id  # 0..2**63-1 (send() checks)
    cdef public Py_ssize_t size
    cdef public int frag_count
    cdef public double queued_at
    cdef public bint done
    cdef public object error
    cdef public bint notify
    cdef public int _unacked


@cython.final
cdef class Fragment(OutgoingMessage):
    cdef public OutgoingMessage _message
    cdef public int frag_index
    cdef readonly bytes _payload  # the message's; this fragment is [_offset, + _length)
    cdef readonly Py_ssize_t _offset
    cdef readonly Py_ssize_t _length
    cdef public bint acked
    cdef public bint queued
    cdef public _OutSpace _space
    cdef public Py_ssize_t cost


@cython.final
cdef class ReassemblyBudget:
    cdef public Py_ssize_t limit
    cdef public Py_ssize_t used


cdef Py_ssize_t _drop_consumed(list items, Py_ssize_t head) except -1


@cython.final
cdef class _Unacked:
    cdef list _items
    cdef Py_ssize_t _start
    cdef public long long base
    cdef public Py_ssize_t count
    @cython.locals(items=list, gap=cython.longlong)
    cpdef add(self, long long seq, OutgoingMessage message)
    @cython.locals(items=list, start=cython.Py_ssize_t, end=cython.Py_ssize_t,
                   i=cython.Py_ssize_t)
    cpdef remove(self, long long seq)
    cpdef list messages(self)


@cython.final
cdef class _OutSpace:
    cdef public long long next_seq
    cdef public _Unacked unacked
    cdef public bint closed


@cython.final
cdef class _InSpace:
    cdef public long long base
    cdef public object bits
    cdef public dict partial
    cdef public dict ready


@cython.final
cdef class _Reassembly:
    cdef public _InSpace space
    cdef public long long seq
    cdef public int flags
    cdef public object request_id
    cdef public int count
    cdef public bytearray received
    cdef public int missing
    cdef public Py_ssize_t full
    cdef public Py_ssize_t last_size
    cdef public bytes last
    cdef public object buffer
    cdef public Py_ssize_t charge
    cdef public double expires

    cpdef add(self, int index, payload)
    cpdef bytes message(self)


@cython.final
cdef class _FragmentQueue:
    cdef list _items
    cdef Py_ssize_t _head
    cpdef push(self, Fragment fragment)
    @cython.locals(items=list, head=cython.Py_ssize_t, end=cython.Py_ssize_t,
                   taken=cython.Py_ssize_t, fragment=Fragment)
    cpdef Py_ssize_t take(self, list out, double budget, Py_ssize_t limit) except -1
    cpdef Fragment peek(self)
    @cython.locals(items=list, head=cython.Py_ssize_t)
    cpdef Fragment pop(self)
    cpdef clear(self)


@cython.final
cdef class _SentPacket:
    cdef public double time
    cdef public Py_ssize_t size
    cdef public list fragments
    cdef public bint by_threshold


@cython.locals(packet=_SentPacket)
cdef _SentPacket _sent_packet(double time, Py_ssize_t size, list fragments)


@cython.locals(new=OutgoingMessage)
cdef OutgoingMessage _outgoing_message(str protocol, long long seq, int flags, long long request_id,
                                       Py_ssize_t size, int frag_count, double queued_at,
                                       bint notify)
cdef OutgoingMessage _message_of(Fragment fragment)
@cython.locals(new=Fragment, size=Py_ssize_t)
cdef Fragment _single(str protocol, long long seq, int flags, long long request_id, bytes payload,
                      double queued_at, bint notify, _OutSpace space)
@cython.locals(new=Fragment)
cdef Fragment _fragment(OutgoingMessage message, str protocol, int flags, long long request_id,
                        long long seq, int frag_index, int frag_count, bytes payload,
                        Py_ssize_t offset, _OutSpace space, Py_ssize_t size)
@cython.locals(unacked=_Unacked)
cdef bint _within_window(_OutSpace space, long long seq) except -1


@cython.final
cdef class DeliveryConnection:
    cdef Py_ssize_t _fragment_size
    cdef Py_ssize_t _max_message
    cdef ReassemblyBudget _budget
    cdef bint _closed
    cdef public dict counters
    cdef dict _out_unordered
    cdef dict _out_ordered
    cdef _FragmentQueue _queue
    cdef object _retransmit
    cdef _FragmentQueue _be_queue
    cdef dict _sent
    cdef dict _lost
    cdef long long _largest_sent
    cdef long long _largest_acked
    cdef Py_ssize_t _bytes_in_flight
    cdef Py_ssize_t _handed_out
    cdef bint _has_rtt
    cdef double _srtt
    cdef double _rttvar
    cdef double _min_rtt
    cdef double _latest_rtt
    cdef double _rto_value
    cdef int _backoff
    cdef double _rto_base
    cdef double _loss_time
    cdef Py_ssize_t _mss
    cdef Py_ssize_t _min_cwnd
    cdef double _cwnd
    cdef double _ssthresh
    cdef long long _recovery_end
    cdef bint _cwnd_limited
    cdef double _pace_tokens
    cdef double _pace_time
    cdef double _pace_at
    cdef dict _in_unordered
    cdef dict _in_ordered
    cdef dict _be_partials
    cdef Py_ssize_t _held
    cdef long long _veto
    cdef long long _eliciting
    cdef list _ranges
    cdef double _largest_received_at
    cdef int _unacked_eliciting
    cdef double _ack_at
    cdef int _packet_threshold
    cdef int _reorder_shift
    cdef object _undo
    cdef set _episode
    cdef long long _ack_now
    cdef double _probe_base
    cdef bint _probed
    cdef Py_ssize_t _probe_budget
    cdef Py_ssize_t _outstanding
    cdef str _last_protocol
    cdef bint _last_ordered
    cdef _OutSpace _last_space

    @cython.locals(space=_OutSpace, message=OutgoingMessage, single=Fragment,
                   seq=cython.longlong, flags=cython.int, size=cython.Py_ssize_t,
                   i=cython.Py_ssize_t, queue=_FragmentQueue)
    cdef OutgoingMessage _enqueue(self, str protocol, bytes payload, bint reliable, bint ordered,
                                  int flags_extra, long long request_id, Py_ssize_t count,
                                  Py_ssize_t fs, double now, bint notify)
    cpdef set_datagram_size(self, Py_ssize_t max_datagram)
    @cython.locals(data=bytes)
    cpdef bint send_nowait(self, str protocol, payload, bint ordered, Py_ssize_t fragment_size,
                           double now) except -1
    cdef Py_ssize_t _fragment_count(self, Py_ssize_t size, bint reliable, bint ordered,
                                    Py_ssize_t fs) except -1
    @cython.locals(fragment=Fragment, window=cython.double, budget=cython.double,
                   taken=cython.Py_ssize_t, queue=_FragmentQueue)
    cpdef list poll_transmit(self, double now, Py_ssize_t max_fragments, double max_bytes=*)
    @cython.locals(fragment=Fragment, message=OutgoingMessage, tokens=cython.double, rate=cython.double,
                   queue=_FragmentQueue)
    cdef _poll_best_effort(self, double now, Py_ssize_t max_fragments, double max_bytes,
                           list out)
    @cython.locals(fragment=Fragment, handed=cython.Py_ssize_t, mixed=cython.bint)
    cpdef on_packet_sent(self, long long counter, list fragments, Py_ssize_t size, double now)
    @cython.locals(packet=_SentPacket, newest=_SentPacket, low=cython.longlong, high=cython.longlong,
                   oldest=cython.longlong, counter=cython.longlong)
    cpdef list on_ack(self, long long largest, long long ack_delay_us, long long first_range,
                      ranges, double now)
    cpdef list on_fragment(self, long long counter, str protocol, int flags, request_id,
                           long long seq, int frag_index, int frag_count, payload, double now)
    @cython.locals(space=_InSpace, offset=cython.longlong)
    cpdef receive(self, long long counter, str protocol, int flags, request_id,
                  long long seq, int frag_index, int frag_count, payload, double now)
    cpdef on_packet_received(self, long long counter, double now, bint acknowledge=*)
    cpdef bint ack_frame_due(self, double now) except -1
    cpdef build_ack(self, double now)
    cpdef next_deadline(self)
    @cython.locals(fragment=Fragment, message=OutgoingMessage, space=_OutSpace)
    cdef _ack_fragments(self, list fragments, list events)
    cdef bint _ack_lost(self, list spans, long long previous, double now, list events) except -1
    cdef _adapt_thresholds(self, long long counter, double sent, long long previous, double now)
    cdef _undo_congestion(self)
    cdef _update_rtt(self, double latest, double ack_delay)
    @cython.locals(packet=_SentPacket)
    cdef _detect_losses(self, double now)
    @cython.locals(packet=_SentPacket)
    cdef _declare_lost(self, list counters)
    cdef double _probe_deadline(self)
    cdef _probe(self)
    @cython.locals(fragment=Fragment)
    cdef _requeue(self, list fragments)
    @cython.locals(packet=_SentPacket)
    cdef _on_timeout(self, double now, list events)
    cdef _fail(self, OutgoingMessage message, _OutSpace space, error, list events)
    cdef _fail_all(self, error, list events)
    @cython.locals(space=_InSpace, offset=cython.longlong, base=cython.longlong)
    cdef _on_ordered(self, long long counter, str protocol, int flags, request_id, long long seq,
                     int frag_index, int frag_count, payload, double now)
    @cython.locals(partial=_Reassembly)
    cdef _reassemble(self, _InSpace space, long long counter, int flags, request_id,
                     long long seq, int index, int count, payload, double now, bint head)
    cdef bint _try_charge(self, Py_ssize_t charge, bint head) except -1
    cdef _release(self, Py_ssize_t charge)
    cdef _mark_received(self, _InSpace space, long long seq)
    cdef _slide(self, _InSpace space, long long base)
    cdef _drop(self, _Reassembly partial)
    @cython.locals(partial=_Reassembly, space=_InSpace)
    cdef _expire(self, double now)
    cdef bint _add_range(self, long long counter) except -1
