"""Kademlia DHT on msgnet (protocol ``/msgnet/kad/1.0.0``).

::

    async with MessageHost(keypair) as host, KadDHT(host) as dht:
        await dht.bootstrap(["/ip4/127.0.0.1/udp/4001/p2p/12D3Koo..."])
        key, record = sign_record(keypair, "greeting", b"hello")
        await dht.put_value(key, record)
        envelope = await dht.get_value(key)
        await dht.provide(CID.of(b"some content"))

Records are validated per namespace (:class:`Validator`); built in are
``/pk/`` (records signed by the peer named in the key) and ``/ipld/``
(immutable values named by their CID).
Values are limited to :data:`MAX_VALUE_SIZE` bytes (one datagram) until
msgnet's reliable QoS can carry larger messages.
"""

from .dht import KadConfig, KadDHT, LookupResult
from .errors import (
    InvalidRecordError,
    KadError,
    MalformedMessageError,
    NotFoundError,
    ValueTooLargeError,
)
from .records import (
    ContentValidator,
    NamespacedValidator,
    PublicKeyValidator,
    SignedRecord,
    Validator,
    content_record,
    default_validator,
    format_key,
    parse_key,
    pk_key,
    sign_record,
)
from .wire import MAX_KEY_SIZE, MAX_VALUE_SIZE, PROTOCOL, PeerInfo

__all__ = [
    "MAX_KEY_SIZE",
    "MAX_VALUE_SIZE",
    "PROTOCOL",
    "ContentValidator",
    "InvalidRecordError",
    "KadConfig",
    "KadDHT",
    "KadError",
    "LookupResult",
    "MalformedMessageError",
    "NamespacedValidator",
    "NotFoundError",
    "PeerInfo",
    "PublicKeyValidator",
    "SignedRecord",
    "Validator",
    "ValueTooLargeError",
    "content_record",
    "default_validator",
    "format_key",
    "parse_key",
    "pk_key",
    "sign_record",
]
