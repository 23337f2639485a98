"""Protocols built on msgnet messages, using only the public MessageHost API.

* :mod:`msgnet.protocols.kad` — a libp2p-style Kademlia DHT whose RPCs are
  request/response messages that each fit one datagram.
* :mod:`msgnet.protocols.dagcbor` — strict DAG-CBOR and CIDs, the encoding
  these protocols speak (IPLD, as libp2p/IPFS name content).
"""
