"""mDNS announcements of a signed peer record, and the rules a sighting must pass.

Pure: no trio, no zeroconf.  Both discovery backends (real mDNS and the
in-memory hub) feed what they see through :func:`verify_announcement`, so a
forged announcement is judged the same way everywhere.  ``docs/protocol-discovery.md``
is the specification; this module is its implementation.

**TXT layout, version 1.**  A FedUp service's TXT record holds the items::

    v=1
    r0=<up to 250 base64url characters>
    r1=<...>
    ...

``r0``, ``r1``, ... are the signed peer-record envelope
(:attr:`~fedup.protocol.records.SignedPeerRecord.envelope`, the exact bytes
that were signed) encoded as base64url *without padding* (RFC 4648 section 5)
and cut into chunks of exactly :data:`CHUNK_SIZE` characters, the last one
shorter or equal.  Each item stays under the 255-byte limit of a TXT string.
A typical record (two addresses, a network key) is about 300 bytes: two
items, about 410 bytes of TXT.

**Decoding is hostile input.**  Everything a decoder here raises is an
:class:`AnnouncementError` (a :class:`~fedup.errors.RemoteProtocolError`)
whose :attr:`~AnnouncementError.code` says which rule failed.  Sizes are
checked before anything is decoded.

**The rules of a sighting, in order** (:func:`verify_announcement`):

1. the TXT is well formed and within limits (``bad-txt``; an unknown ``v`` is ``version``);
2. :func:`~fedup.protocol.records.verify_peer_record`: size, signature,
   decoding, peer ID derived from the signing key (``bad-signature``,
   ``bad-record``, ``peer-id-mismatch``);
3. the record's protocol version is one we speak (``version``);
4. network name, then network-key fingerprint, equal ours
   (``other-network``, ``other-network-key``);
5. every address the mDNS service advertises (A/AAAA records with the SRV
   port) is one of the record's signed addresses (``address-mismatch``): a
   copied record re-announced from another address is refused;
6. freshness against a :class:`~fedup.protocol.records.PeerRecordBook`
   (``stale-seq``; the very same record again is fine; ``book-full``).
"""

from __future__ import annotations

import base64
import enum
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol.envelope import SignatureError
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import (
    PROTOCOL_VERSION,
    Address,
    PeerIdMismatchError,
    PeerRecordBook,
    SignedPeerRecord,
    StaleRecordError,
    verify_peer_record,
)

__all__ = [
    "CHUNK_SIZE",
    "SERVICE_TYPE",
    "SUPPORTED_PROTOCOLS",
    "TXT_VERSION",
    "AnnouncementError",
    "NetworkScope",
    "RejectReason",
    "Verified",
    "admit_record",
    "decode_txt",
    "encode_txt",
    "encode_txt_rdata",
    "max_txt_items",
    "max_txt_size",
    "parse_txt_rdata",
    "verify_announcement",
    "verify_sighting",
]

SERVICE_TYPE = "_fedup._tcp.local."
"""Our own DNS-SD service type (not libp2p's ``_p2p._udp``: we do not speak libp2p's wire)."""

TXT_VERSION = b"1"
"""The value of the ``v`` item: the layout of this TXT record."""

CHUNK_SIZE = 250
"""base64 characters per ``rN`` item: ``r999=`` plus 250 characters is 255 bytes."""

SUPPORTED_PROTOCOLS = frozenset({PROTOCOL_VERSION})
"""Peer-record protocol versions this implementation speaks."""

_MAX_CHUNKS = 1000  # "r999" is the longest key that keeps an item within 255 bytes
_B64 = re.compile(rb"[A-Za-z0-9_-]+")
_CHUNK_KEY = re.compile(rb"r(0|[1-9][0-9]{0,2})")


class RejectReason(enum.StrEnum):
    """Why a sighting was refused; the values are the counter names."""

    BAD_TXT = "bad-txt"
    VERSION = "version"
    BAD_RECORD = "bad-record"
    BAD_SIGNATURE = "bad-signature"
    PEER_ID_MISMATCH = "peer-id-mismatch"
    OTHER_NETWORK = "other-network"
    OTHER_NETWORK_KEY = "other-network-key"
    ADDRESS_MISMATCH = "address-mismatch"
    STALE_SEQ = "stale-seq"
    BOOK_FULL = "book-full"


class AnnouncementError(RemoteProtocolError):
    """An announcement broke one of the rules; :attr:`code` names which.

    ``record`` is the signed record when its signature verified before a
    later rule failed (so a display can say whose record was refused), else None.
    """

    def __init__(
        self,
        code: RejectReason,
        reason: str,
        *,
        peer: str | None = None,
        record: SignedPeerRecord | None = None,
    ) -> None:
        super().__init__(reason, peer=peer)
        self.code = code
        self.record = record

    def with_peer(self, peer: str) -> AnnouncementError:
        err = AnnouncementError(self.code, self.reason, peer=peer, record=self.record)
        err.__cause__ = self.__cause__
        return err

    def __str__(self) -> str:
        return f"{self.code}: {super().__str__()}"


@attrs.frozen(cache_hash=True)
class NetworkScope:
    """Which network a sighting must belong to."""

    name: str | None
    """Our network name; None accepts every name (passive browsing only)."""
    key_id: bytes | None = None
    """``network_key_id`` of our network key, or None for a network without a key."""
    any_key: bool = False
    """Accept every key fingerprint (passive browsing without a key file)."""


@attrs.frozen
class Verified:
    """A sighting that passed every rule."""

    signed: SignedPeerRecord
    """The verified record, with the exact envelope bytes."""
    fresh: bool
    """True when the record is newer than any seen of that peer, False for a repeat."""


# --- encoding ---------------------------------------------------------------------


def encode_txt(envelope: bytes, *, limits: Limits = DEFAULT_LIMITS) -> dict[str, str]:
    """The TXT items announcing ``envelope``, in order (``v`` first), as a dict.

    Raises :class:`~fedup.errors.LocalProtocolError` when the envelope is
    larger than ``limits.max_record_size`` (no peer would accept it).
    """
    if not envelope:
        raise LocalProtocolError("cannot announce an empty envelope")
    if len(envelope) > limits.max_record_size:
        raise LocalProtocolError(
            f"a peer record of {len(envelope)} bytes exceeds max_record_size "
            f"({limits.max_record_size}); peers would refuse it"
        )
    text = base64.urlsafe_b64encode(envelope).rstrip(b"=").decode("ascii")
    chunks = [text[i : i + CHUNK_SIZE] for i in range(0, len(text), CHUNK_SIZE)]
    if len(chunks) > _MAX_CHUNKS:
        raise LocalProtocolError("peer record too large for a TXT record")
    items = {"v": TXT_VERSION.decode()}
    items.update((f"r{i}", chunk) for i, chunk in enumerate(chunks))
    return items


def encode_txt_rdata(envelope: bytes, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The TXT record's wire form (RDATA): each item as a length-prefixed string."""
    out = bytearray()
    for key, value in encode_txt(envelope, limits=limits).items():
        item = f"{key}={value}".encode("ascii")
        out.append(len(item))
        out += item
    return bytes(out)


def _b64_length(size: int) -> int:
    return math.ceil(size * 4 / 3)


def max_txt_items(limits: Limits = DEFAULT_LIMITS) -> int:
    """The most items a valid TXT record has under ``limits`` (``v`` included)."""
    return 1 + math.ceil(_b64_length(limits.max_record_size) / CHUNK_SIZE)


def max_txt_size(limits: Limits = DEFAULT_LIMITS) -> int:
    """The largest valid TXT RDATA under ``limits``, in bytes."""
    chunks = max_txt_items(limits) - 1
    key_size = len(f"r{chunks - 1}=")
    return (1 + len(b"v=1")) + chunks * (1 + key_size) + _b64_length(limits.max_record_size)


# --- decoding ---------------------------------------------------------------------


def _bad(reason: str) -> AnnouncementError:
    return AnnouncementError(RejectReason.BAD_TXT, reason)


def parse_txt_rdata(
    rdata: bytes | bytearray | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> dict[bytes, bytes | None]:
    """Split TXT RDATA into its ``key=value`` items.

    Stricter than DNS-SD's reader: a repeated key, an empty key or a
    truncated string is an error, not something to skip.  Raises
    :class:`AnnouncementError` (``bad-txt``).
    """
    if not isinstance(rdata, bytes | bytearray | memoryview):
        raise _bad(f"TXT record must be bytes, got {type(rdata).__name__}")
    bound = max_txt_size(limits)
    size = rdata.nbytes if isinstance(rdata, memoryview) else len(rdata)
    if size > bound:
        raise _bad(f"TXT record of {size} bytes exceeds {bound}")
    data = bytes(rdata)
    items: dict[bytes, bytes | None] = {}
    pos = 0
    while pos < len(data):
        length = data[pos]
        end = pos + 1 + length
        if end > len(data):
            raise _bad("TXT string runs past the end of the record")
        item = data[pos + 1 : end]
        pos = end
        if not item:
            continue  # an empty string (the empty TXT record is one zero byte)
        key, sep, value = item.partition(b"=")
        if not key:
            raise _bad("TXT item with an empty key")
        if key in items:
            raise _bad(f"TXT key {key[:16]!r} repeated")
        if len(items) >= max_txt_items(limits):
            raise _bad(f"more than {max_txt_items(limits)} TXT items")
        items[key] = value if sep else None
    return items


def _as_bytes(value: object, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad(f"TXT {what} is not valid text") from None
    raise _bad(f"TXT {what} must be bytes or text, got {type(value).__name__}")


def _normalise(txt: Mapping[Any, object], limits: Limits) -> dict[bytes, bytes | None]:
    if len(txt) > max_txt_items(limits):
        raise _bad(f"{len(txt)} TXT items, at most {max_txt_items(limits)} expected")
    items: dict[bytes, bytes | None] = {}
    for raw_key, raw_value in txt.items():
        key = _as_bytes(raw_key, "key")
        if key in items:
            raise _bad(f"TXT key {key[:16]!r} repeated")
        items[key] = None if raw_value is None else _as_bytes(raw_value, "value")
    return items


def decode_txt(
    txt: bytes | bytearray | memoryview | Mapping[Any, object],
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Return the envelope bytes announced in a TXT record.

    ``txt`` is the RDATA (bytes) or its items as a mapping (keys and values
    as bytes or text, a value None for a key without ``=``).  Raises
    :class:`AnnouncementError`: ``version`` when ``v`` is not ``1``, ``bad-txt``
    for everything else that is not exactly the layout of
    :func:`encode_txt`: an unknown key, a missing or out-of-order chunk, a chunk
    of the wrong length, characters outside base64url, padding, non-zero
    trailing bits, or more data than ``limits.max_record_size``.
    """
    items = (
        _normalise(txt, limits) if isinstance(txt, Mapping) else parse_txt_rdata(txt, limits=limits)
    )
    if b"v" not in items:
        raise _bad("missing the 'v' item")
    version = items[b"v"]
    if version is None or not version:
        raise _bad("the 'v' item has no value")
    if version != TXT_VERSION:
        raise AnnouncementError(
            RejectReason.VERSION,
            f"TXT layout version {version[:8]!r} is not supported "
            f"(we speak {TXT_VERSION.decode()})",
        )
    chunks: dict[int, bytes] = {}
    for key, value in items.items():
        if key == b"v":
            continue
        match = _CHUNK_KEY.fullmatch(key)
        if match is None:
            raise _bad(f"unknown TXT key {key[:16]!r}")
        if value is None or not value:
            raise _bad(f"TXT item {key.decode()} has no value")
        chunks[int(match.group(1))] = value
    if not chunks:
        raise _bad("no record chunks (r0, r1, ...)")
    count = len(chunks)
    if sorted(chunks) != list(range(count)):
        raise _bad(f"record chunks are not r0..r{count - 1}")
    if count > max_txt_items(limits) - 1:
        raise _bad(f"{count} record chunks, at most {max_txt_items(limits) - 1} expected")
    for i in range(count):
        size = len(chunks[i])
        if (i < count - 1 and size != CHUNK_SIZE) or size > CHUNK_SIZE:
            raise _bad(f"record chunk r{i} has {size} characters; chunks hold {CHUNK_SIZE}")
    text = b"".join(chunks[i] for i in range(count))
    if len(text) > _b64_length(limits.max_record_size):
        raise _bad(f"record exceeds max_record_size ({limits.max_record_size} bytes)")
    if _B64.fullmatch(text) is None:
        raise _bad("record chunks hold characters outside base64url (or padding)")
    if len(text) % 4 == 1:
        raise _bad("record base64 has an impossible length")
    envelope = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    if base64.urlsafe_b64encode(envelope).rstrip(b"=") != text:
        raise _bad("record base64 is not canonical (non-zero trailing bits)")
    return envelope


# --- verification -----------------------------------------------------------------


def _verify_record(envelope: bytes, limits: Limits) -> SignedPeerRecord:
    try:
        return verify_peer_record(envelope, limits=limits)
    except SignatureError as exc:
        raise AnnouncementError(RejectReason.BAD_SIGNATURE, exc.reason) from exc
    except PeerIdMismatchError as exc:
        raise AnnouncementError(RejectReason.PEER_ID_MISMATCH, exc.reason) from exc
    except RemoteProtocolError as exc:
        raise AnnouncementError(RejectReason.BAD_RECORD, exc.reason) from exc


def admit_record(
    book: PeerRecordBook,
    signed: SignedPeerRecord,
    *,
    evictable: Callable[[PeerId], bool] | None = None,
) -> bool:
    """Rule 6: store ``signed`` in ``book`` if fresh; True if newer, False if a repeat.

    ``evictable`` says which peers may make room in a full book (see
    :meth:`PeerRecordBook.admit`).  Raises :class:`AnnouncementError`
    (``stale-seq`` or ``book-full``).
    """
    try:
        return book.admit(signed, evictable=evictable)
    except StaleRecordError as exc:
        raise AnnouncementError(
            RejectReason.STALE_SEQ, exc.reason, peer=signed.peer_id.text, record=signed
        ) from exc
    except RemoteProtocolError as exc:
        raise AnnouncementError(
            RejectReason.BOOK_FULL, exc.reason, peer=signed.peer_id.text, record=signed
        ) from exc


def verify_announcement(
    txt: bytes | bytearray | memoryview | Mapping[Any, object],
    advertised: Sequence[Address],
    *,
    scope: NetworkScope,
    book: PeerRecordBook | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Verified:
    """Apply the rules of a sighting (see the module docstring) in order.

    ``txt`` is the service's TXT record (RDATA or items); ``advertised`` the
    addresses its A/AAAA records give, each with the SRV port.  With a
    ``book``, a fresh record is stored in it; without one, rule 6 is skipped
    and the result says ``fresh=True``.

    Raises :class:`AnnouncementError` naming the first rule that failed;
    nothing else for any ``txt`` or ``advertised``.
    """
    if isinstance(txt, (bytes, bytearray, memoryview)) and len(txt) <= _max_rdata(limits):
        signed = _announcement_cached(bytes(txt), tuple(advertised), scope, limits)
        return Verified(signed, True if book is None else admit_record(book, signed))
    envelope = decode_txt(txt, limits=limits)
    return verify_sighting(envelope, advertised, scope=scope, book=book, limits=limits)


def _max_rdata(limits: Limits) -> int:
    """The longest RDATA whose decoding is worth keeping (a record's base64 and keys)."""
    return 2 * limits.max_record_size + 1024


@functools.lru_cache(maxsize=4096)
def _announcement_cached(
    rdata: bytes, advertised: tuple[Address, ...], scope: NetworkScope, limits: Limits
) -> SignedPeerRecord:
    """Rules 1 to 5 of a sighting given as RDATA, kept by content: the same announcement
    reaches a peer on every refresh, and every simulated peer of a process sees each
    one.  The outcome depends on nothing but these arguments; failures are not kept."""
    return _rules(decode_txt(rdata, limits=limits), advertised, scope, limits)


def verify_sighting(
    envelope: bytes,
    advertised: Sequence[Address],
    *,
    scope: NetworkScope,
    book: PeerRecordBook | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Verified:
    """The rules after the TXT encoding, for a signed record that came some other way
    (a bootstrap peer's list): as :func:`verify_announcement`, ``envelope`` instead of
    ``txt``; an empty or oversized one is ``bad-record``.  (The signature check is
    kept by content in :func:`~fedup.protocol.records.verify_peer_record`.)"""
    signed = _rules(envelope, tuple(advertised), scope, limits)
    return Verified(signed, True if book is None else admit_record(book, signed))


def _rules(
    envelope: bytes, advertised: tuple[Address, ...], scope: NetworkScope, limits: Limits
) -> SignedPeerRecord:
    """Rules 2 to 5 of a sighting (after the TXT, before freshness); raises
    AnnouncementError."""
    signed = _verify_record(envelope, limits)
    record = signed.record
    peer = record.peer_id.text
    if record.protocol not in SUPPORTED_PROTOCOLS:
        raise AnnouncementError(
            RejectReason.VERSION,
            f"protocol version {record.protocol} is not supported "
            f"(we speak {sorted(SUPPORTED_PROTOCOLS)})",
            peer=peer,
            record=signed,
        )
    if scope.name is not None and record.network != scope.name:
        raise AnnouncementError(
            RejectReason.OTHER_NETWORK,
            f"network {record.network!r} is not ours ({scope.name!r})",
            peer=peer,
            record=signed,
        )
    if not scope.any_key and record.network_key_id != scope.key_id:
        theirs = record.network_key_id.hex() if record.network_key_id else "no key"
        ours = scope.key_id.hex() if scope.key_id else "no key"
        raise AnnouncementError(
            RejectReason.OTHER_NETWORK_KEY,
            f"network key {theirs} is not ours ({ours})",
            peer=peer,
            record=signed,
        )
    if not advertised:
        raise AnnouncementError(
            RejectReason.ADDRESS_MISMATCH,
            "the service advertises no address",
            peer=peer,
            record=signed,
        )
    signed_addresses = set(record.addresses)
    foreign = sorted({a for a in advertised if a not in signed_addresses})
    if foreign:
        raise AnnouncementError(
            RejectReason.ADDRESS_MISMATCH,
            "advertised address(es) "
            + ", ".join(str(a) for a in foreign[:4])
            + " not in the signed record",
            peer=peer,
            record=signed,
        )
    return signed
