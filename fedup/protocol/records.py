"""Peer records (after libp2p RFC 0003): who a peer is and where to reach it.

A peer record is the payload of a signed envelope (domain
``fedup-peer-record``, payload type ``fedup/peer-record/1``)::

    {
      "peer": bstr .size 38,        ; the signer's peer ID (binary form)
      "seq": uint,                  ; grows with every new record of this peer
      "addrs": [[tstr, uint], ...], ; IP literal and TCP port, 1..max_addresses
      "net": tstr,                  ; network name
      "netkey": bstr .size 16 / null, ; fingerprint of the network key, if any
      "proto": uint                 ; protocol version (1)
    }

:func:`verify_peer_record` checks, in order: size, signature, payload
decoding, that ``peer`` is derived from the signing key.  Freshness (``seq``
greater than the last one accepted for that peer) is the job of a
:class:`PeerRecordBook`, which remembers the last ``seq`` per peer.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import time
from collections.abc import Callable, Iterator

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Envelope, Signer, open_envelope, seal_envelope
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader, MessageError

PEER_RECORD_DOMAIN = "fedup-peer-record"
PEER_RECORD_TYPE = "fedup/peer-record/1"
PROTOCOL_VERSION = 1
NETWORK_KEY_ID_SIZE = 16


class PeerIdMismatchError(MessageError):
    """A record whose peer ID is not the one derived from the key that signed it."""


class StaleRecordError(RemoteProtocolError):
    """A record whose ``seq`` is not newer than one already accepted."""


def network_key_id(key: bytes) -> bytes:
    """The public fingerprint of a 32-byte network key (keyed BLAKE2b, 16 bytes).

    It tells peers whether they share a key without revealing it.
    """
    if len(key) != 32:
        raise LocalProtocolError("a network key has 32 bytes")
    return hashlib.blake2b(
        b"", key=key, digest_size=NETWORK_KEY_ID_SIZE, person=b"fedup-netkey-id"
    ).digest()


@attrs.frozen(order=True, cache_hash=True)
class Address:
    """A TCP address: an IP literal (v4 or v6) and a port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``HOST:PORT`` or ``[V6HOST]:PORT``; raises ``ValueError`` with a reason."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls.checked(host, int(port))

    @classmethod
    def checked(cls, host: str, port: int) -> Address:
        """Build an address, checking the IP literal and port; raises ``ValueError``."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        return cls(str(ip), port)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


@attrs.frozen
class PeerRecord:
    """The content of a peer record; see the module docstring for the wire form."""

    peer_id: PeerId
    seq: int
    addresses: tuple[Address, ...]
    network: str
    network_key_id: bytes | None = None
    protocol: int = PROTOCOL_VERSION

    def to_cbor(self) -> bytes:
        return cbor.encode(
            {
                "peer": self.peer_id.raw,
                "seq": self.seq,
                "addrs": [[a.host, a.port] for a in self.addresses],
                "net": self.network,
                "netkey": self.network_key_id,
                "proto": self.protocol,
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> PeerRecord:
        """Decode and check a record payload; raises a ``RemoteProtocolError`` subclass."""
        fields = FieldReader(
            cbor.decode(data, max_size=limits.max_record_size, max_depth=3), "peer record"
        )
        raw = fields.bytestr("peer", size=RAW_SIZE)
        try:
            peer = PeerId.from_bytes(raw)
        except RemoteProtocolError as exc:
            raise fields.fail("peer", exc.reason) from None
        seq = fields.uint("seq")
        addrs = fields.array("addrs", _address, max_items=limits.max_addresses, min_items=1)
        net = fields.text("net", max_bytes=limits.max_network_name)
        netkey = (
            fields.bytestr("netkey", size=NETWORK_KEY_ID_SIZE)
            if fields.optional("netkey")
            else None
        )
        proto = fields.uint("proto", min_value=1)
        fields.done()
        return cls(peer, seq, tuple(addrs), net, netkey, proto)

    def seal(self, identity: Signer) -> SignedPeerRecord:
        """Sign this record with ``identity``, whose peer ID must be ``peer_id``."""
        if identity.peer_id != self.peer_id:
            raise LocalProtocolError("a peer record must be signed by its own peer")
        envelope = seal_envelope(
            identity.sign,
            identity.public_key,
            domain=PEER_RECORD_DOMAIN,
            payload_type=PEER_RECORD_TYPE,
            payload=self.to_cbor(),
        )
        return SignedPeerRecord(self, envelope.to_cbor())


@attrs.frozen
class SignedPeerRecord:
    """A verified record together with the exact envelope bytes that carried it.

    Forward ``envelope`` unchanged to other peers: they verify it themselves.
    """

    record: PeerRecord
    envelope: bytes

    @property
    def peer_id(self) -> PeerId:
        return self.record.peer_id


def _address(value: object, label: str) -> Address:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
        or isinstance(value[1], bool)
        or len(value[0]) > 64
    ):
        raise MessageError(f"{label} must be [ip-address, port]")
    try:
        addr = Address.checked(value[0], value[1])
    except ValueError as exc:
        raise MessageError(f"{label}: {exc}") from None
    if addr.host != value[0]:
        raise MessageError(f"{label}: {value[0]!r} is not in canonical form")
    return addr


def verify_peer_record(
    data: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> SignedPeerRecord:
    """Verify a signed peer record from outside; freshness is checked separately.

    Order: size, signature, decode, peer ID derives from the signing key.
    Raises a :class:`~fedup.errors.RemoteProtocolError` subclass naming the problem.

    The same record reaches a peer many times (every mDNS refresh, every bootstrap
    list, every view); a bounded cache of *successful* verifications, keyed by the
    exact bytes and the limits, avoids repeating the signature check.  Failures are
    never cached, and the size is checked before the bytes are copied for the key.
    """
    if len(data) > limits.max_record_size:
        raise cbor.CBORDecodeError(
            f"envelope of {len(data)} bytes exceeds the limit of {limits.max_record_size}"
        )
    return _verify_cached(bytes(data), limits)


@functools.lru_cache(maxsize=4096)
def _verify_cached(data: bytes, limits: Limits) -> SignedPeerRecord:
    envelope: Envelope = open_envelope(
        data,
        domain=PEER_RECORD_DOMAIN,
        payload_type=PEER_RECORD_TYPE,
        max_size=limits.max_record_size,
    )
    record = PeerRecord.from_cbor(envelope.payload, limits=limits)
    if record.peer_id != envelope.signer:
        raise PeerIdMismatchError(
            f"peer record claims peer {record.peer_id} but is signed by {envelope.signer}"
        )
    return SignedPeerRecord(record, bytes(data))


def next_seq(previous: int = 0, *, now_ns: int | None = None) -> int:
    """A new ``seq``: the time in microseconds, and always above ``previous``.

    Using the clock (as libp2p does) keeps ``seq`` growing across restarts
    without storing it.
    """
    now = time.time_ns() if now_ns is None else now_ns
    return max(previous + 1, now // 1000)


class PeerRecordBook:
    """The newest verified record of each peer; enforces freshness.

    The highest ``seq`` seen of a peer is remembered even after the peer is
    forgotten, so an old record cannot be replayed after a goodbye.
    ``max_peers`` bounds memory when someone floods us with identities: when
    the book is full, a newcomer takes the place of the peer admitted least
    recently among those ``admit``'s ``evictable`` allows (the discovery core
    allows the ones not live now), so waves of identities that come and go
    never lock newcomers out.  An evicted peer's old records could then be
    replayed, which only announces an address where that peer is not: a
    candidate that never completes a handshake (docs/federation.md).
    """

    def __init__(self, *, max_peers: int = 1024) -> None:
        self._records: dict[PeerId, SignedPeerRecord] = {}
        self._high_seq: dict[PeerId, int] = {}
        """By admission, least recent first."""
        self._max_peers = max_peers

    def admit(
        self, signed: SignedPeerRecord, *, evictable: Callable[[PeerId], bool] | None = None
    ) -> bool:
        """Store ``signed`` if it is newer than anything seen of that peer.

        Returns True when stored, False when it is the very record we already
        hold (a harmless repeat).  Raises :class:`StaleRecordError` for a
        record whose ``seq`` is not above the highest seen, and
        :class:`~fedup.errors.RemoteProtocolError` when the book is full and
        no peer in it may be evicted (``evictable``; by default: peers whose
        record was forgotten).
        """
        peer = signed.peer_id
        current = self._records.get(peer)
        if current is not None and signed.envelope == current.envelope:
            return False
        high = self._high_seq.get(peer)
        if high is not None and signed.record.seq <= high:
            raise StaleRecordError(
                f"record seq {signed.record.seq} is not newer than {high}", peer=peer.text
            )
        if high is None and len(self._high_seq) >= self._max_peers and not self._evict(evictable):
            raise RemoteProtocolError(
                f"record book is full ({self._max_peers} peers)", peer=peer.text
            )
        self._records[peer] = signed
        if high is not None:
            del self._high_seq[peer]  # to the end: admitted most recently
        self._high_seq[peer] = signed.record.seq
        return True

    def _evict(self, evictable: Callable[[PeerId], bool] | None) -> bool:
        """Forget the least recently admitted evictable peer entirely; False if none."""
        for old in self._high_seq:
            if old not in self._records if evictable is None else evictable(old):
                del self._high_seq[old]
                self._records.pop(old, None)
                return True
        return False

    def get(self, peer: PeerId) -> SignedPeerRecord | None:
        """The current record of ``peer``, or None."""
        return self._records.get(peer)

    def forget(self, peer: PeerId) -> None:
        """Drop a peer's record (after a goodbye or expiry); its ``seq`` stays known."""
        self._records.pop(peer, None)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[SignedPeerRecord]:
        return iter(list(self._records.values()))
