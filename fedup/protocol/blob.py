"""Model blobs: signed header and end, chunk frames, replies, replay guard, receiver.

A *blob* is one encoded model state (:mod:`fedup.protocol.tensors`) on its way
from one peer to the next.  ``docs/protocol-blob.md`` is the specification; in
short, on one connection (frames of :mod:`fedup.protocol.framing`)::

    sender                                      receiver
    HEADER  signed: run, kind, lap, hop,  --->  checks size, signature, fields, sender,
            epoch, from, to, size, chunk,       recipient, run, epoch, size, chunk size,
            meta                                replay (in this order)
            <---  ACCEPT {"accept": header id}   or   NACK {"nack": reason}
    CHUNK   0x01 + chunk_size bytes       --->  ceil(size / chunk_size) chunks, all full
    ...                                         but the last; an empty blob is one
    CHUNK   0x02 + the rest               --->  empty LAST chunk
    END     signed: header id, digest     --->  checks signature, signer, header id, digest
            <---  ACK {"ack": digest}            or   NACK {"nack": reason}

The digest (BLAKE2b-256 of the blob) travels in the signed END rather than in
the header so that the sender hashes while it sends instead of before: one
full hashing pass less on every hop's critical path.  The END names the header
(its id is the BLAKE2b-256 of the header frame), so header and end together
bind the bytes to the run, kind, lap, hop, epoch, sender and recipient.  The
secure channel underneath provides confidentiality, ordering and replay
protection of the frames themselves.

This module is pure: :func:`verify_blob_header` decides about a header,
:class:`BlobReplayGuard` remembers what was accepted, :class:`BlobReceiver`
checks the chunk frames and the END, and :class:`BlobReply` encodes and
decodes the receiver's answers.  :mod:`fedup.net.blobs` moves the frames and
keeps time.  Every failure caused by input from outside is a
:class:`BlobError` (a :class:`~fedup.errors.RemoteProtocolError`); each check
has its own subclass.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import mmap
import sys
import threading
from collections.abc import Iterator
from typing import Literal, NoReturn, TypeAlias, cast

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConnectionLostError, LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Envelope, SignatureError, Signer, open_envelope, seal_envelope
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader

BLOB_HEADER_DOMAIN = "fedup-blob-header"
BLOB_HEADER_TYPE = "fedup/blob-header/1"
BLOB_END_DOMAIN = "fedup-blob-end"
BLOB_END_TYPE = "fedup/blob-end/1"
RUN_ID_SIZE = 16
DIGEST_SIZE = 32
CHUNK_MORE = 0x01
"""Type byte of a chunk frame after which more chunks follow."""
CHUNK_LAST = 0x02
"""Type byte of the last chunk frame of a blob."""
KINDS = ("model", "final")
_HEADER_ID_PERSON = b"fedup-blob-head"

# Bounds of the header's "meta" map (the whole header is also bounded by
# Limits.max_message_size).  Aggregate metrics of one lap of a ring of at most
# 64 members need a handful of keys and lists of at most a few hundred numbers.
META_MAX_ITEMS = 64
META_MAX_KEY = 64
META_MAX_TEXT = 256
META_MAX_LIST = 1024
_HEADER_DEPTH = 3  # payload map > meta map > list > number

REPLY_MAX_SIZE = 1024
"""Largest reply frame (ACCEPT, ACK, NACK) accepted."""
REASON_MAX = 512
"""Largest NACK reason, in UTF-8 bytes."""

BlobKind: TypeAlias = Literal["model", "final"]
MetaValue: TypeAlias = int | float | str | list[int | float]
Buffer: TypeAlias = bytes | bytearray | memoryview


# --------------------------------------------------------------------------
# errors


class BlobError(RemoteProtocolError):
    """Something about a blob from (or a reply of) a peer broke the blob protocol."""


class BlobHeaderError(BlobError):
    """A blob header frame is too large, is not strict CBOR, or has a bad field."""


class BlobSignatureError(BlobError, SignatureError):
    """A blob header's or end's signature does not verify (forged, tampered, other domain)."""


class BlobSenderError(BlobError):
    """A blob signed by someone other than its sender, or arriving from a third peer."""


class BlobRecipientError(BlobError):
    """A blob addressed to another peer."""


class BlobRunError(BlobError):
    """A blob of another federated run."""


class BlobEpochError(BlobError):
    """A blob made in a view epoch older than the receiver's current one."""


class BlobSizeError(BlobError):
    """A blob larger than the receiver accepts."""


class BlobChunkSizeError(BlobError):
    """A blob header announcing a chunk size other than the agreed one."""


class BlobReplayError(BlobError):
    """A blob whose (lap, hop) is not newer than one already accepted, or a second final."""


class BlobDataError(BlobError):
    """The frames after the header do not carry exactly the announced blob."""


class BlobEndError(BlobDataError):
    """The END frame is malformed or names another header."""


class BlobDigestError(BlobDataError):
    """The received bytes do not match the signed digest."""


class BlobTruncatedError(BlobDataError, ConnectionLostError):
    """The connection ended before the blob's END."""


class BlobReplyError(BlobError):
    """A reply frame (ACCEPT, ACK, NACK) is malformed or does not fit the blob."""


class BlobRefusedError(BlobError):
    """The receiver refused our blob (a NACK); ``reason`` carries its explanation."""


# --------------------------------------------------------------------------
# digests and chunks


def blob_digest(data: Buffer) -> bytes:
    """BLAKE2b-256 of ``data`` (releases the GIL for large buffers; safe in a thread)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def blob_header_id(frame: Buffer) -> bytes:
    """The id of a header frame: its BLAKE2b-256 (personalised), as named by ACCEPT and END."""
    return hashlib.blake2b(frame, digest_size=DIGEST_SIZE, person=_HEADER_ID_PERSON).digest()


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunk frames of a blob of ``size`` bytes: ``ceil(size / chunk_size)``, >= 1."""
    if size < 0 or chunk_size < 1:
        raise LocalProtocolError("chunk_count needs size >= 0 and chunk_size >= 1")
    return max(1, -(-size // chunk_size))


def iter_chunks(data: memoryview, chunk_size: int) -> Iterator[tuple[bytes, memoryview]]:
    """Yield ``(type byte, slice)`` for every chunk frame of ``data`` (slices, no copies).

    ``data`` must be a one-dimensional byte view (``memoryview(buf).cast("B")``).
    """
    count = chunk_count(data.nbytes, chunk_size)
    for i in range(count):
        kind = CHUNK_LAST if i == count - 1 else CHUNK_MORE
        yield bytes((kind,)), data[i * chunk_size : (i + 1) * chunk_size]


class BlobHasher:
    """BLAKE2b-256 over pieces queued in order; the hashing may run in a worker thread.

    :meth:`queue` (one thread) and :meth:`hash_pending` (at most one other
    thread at a time) may run concurrently; pieces are hashed in queue order.
    Queued pieces must not change until hashed.
    """

    def __init__(self) -> None:
        self._hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self._pending: collections.deque[memoryview] = collections.deque()
        self._lock = threading.Lock()
        self.hashed = 0
        """Bytes hashed so far."""

    @property
    def pending(self) -> int:
        """Pieces queued but not hashed yet."""
        return len(self._pending)

    def queue(self, piece: memoryview) -> None:
        self._pending.append(piece)

    def hash_pending(self) -> int:
        """Hash every queued piece, in order; return the bytes hashed."""
        count = 0
        with self._lock:
            while True:
                try:
                    piece = self._pending.popleft()
                except IndexError:  # empty, or cleared by another thread
                    break
                self._hasher.update(piece)
                count += piece.nbytes
            self.hashed += count
        return count

    def digest(self) -> bytes:
        """Hash what is left and return the digest."""
        self.hash_pending()
        with self._lock:
            return self._hasher.digest()

    def clear(self) -> None:
        """Drop queued pieces (after a failure)."""
        self._pending.clear()


# --------------------------------------------------------------------------
# the header and the end


@attrs.frozen
class BlobHeader:
    """What the sender signs about a blob before sending its bytes.

    Wire form: see ``docs/protocol-blob.md``.  ``meta`` is a plain dict;
    treat it as read-only.
    """

    run_id: bytes
    """The federated run (16 bytes)."""
    kind: BlobKind
    """``"model"`` for a hop of the ring, ``"final"`` for the final model's distribution."""
    lap: int
    """The lap this model belongs to."""
    hop: int
    """The hop within the lap (the receiving member's position in the live ring)."""
    epoch: int
    """The membership view epoch the sender acted in."""
    sender: PeerId
    """Who sends (and signs) the blob."""
    recipient: PeerId
    """Who the blob is for."""
    size: int
    """Bytes of the blob."""
    chunk_size: int
    """Bytes carried by every chunk frame except the last."""
    meta: dict[str, MetaValue] = attrs.field(factory=dict)
    """Aggregate metrics filled in by the federation layer (str -> number, str, [numbers])."""

    @property
    def chunks(self) -> int:
        """Number of chunk frames that carry this blob."""
        return chunk_count(self.size, self.chunk_size)

    @property
    def label(self) -> str:
        """A short description for logs and error reasons."""
        return f"{self.kind} blob lap {self.lap} hop {self.hop} ({self.size} bytes)"

    def to_cbor(self) -> bytes:
        return cbor.encode(
            {
                "run": self.run_id,
                "kind": self.kind,
                "lap": self.lap,
                "hop": self.hop,
                "epoch": self.epoch,
                "from": self.sender.raw,
                "to": self.recipient.raw,
                "size": self.size,
                "chunk": self.chunk_size,
                "meta": self.meta,
            }
        )

    @classmethod
    def from_cbor(cls, data: Buffer, *, limits: Limits = DEFAULT_LIMITS) -> BlobHeader:
        """Decode and check a header payload.

        Raises :class:`BlobHeaderError` naming the field for input that is not
        strict CBOR, a missing, unknown or ill-typed field, a kind other than
        ``model``/``final``, an invalid peer ID, or a ``meta`` map beyond its
        bounds.  The semantic checks are :func:`verify_blob_header`'s.
        """
        try:
            fields = FieldReader(
                cbor.decode(data, max_size=limits.max_message_size, max_depth=_HEADER_DEPTH),
                "blob header",
            )
            run_id = fields.bytestr("run", size=RUN_ID_SIZE)
            kind = fields.text("kind", max_bytes=8)
            if kind not in KINDS:
                raise fields.fail("kind", f"must be 'model' or 'final', got {kind!r}")
            lap, hop, epoch = fields.uint("lap"), fields.uint("hop"), fields.uint("epoch")
            sender, recipient = _peer(fields, "from"), _peer(fields, "to")
            size = fields.uint("size")
            chunk_size = fields.uint("chunk", min_value=1)
            meta = _read_meta(fields)
            fields.done()
        except RemoteProtocolError as exc:
            raise BlobHeaderError(_prefixed("blob header", exc.reason)) from exc
        kind_ = cast(BlobKind, kind)
        return cls(run_id, kind_, lap, hop, epoch, sender, recipient, size, chunk_size, meta)


def _prefixed(what: str, reason: str) -> str:
    return reason if reason.startswith(what) else f"{what}: {reason}"


def _peer(fields: FieldReader, key: str) -> PeerId:
    raw = fields.bytestr(key, size=RAW_SIZE)
    try:
        return PeerId.from_bytes(raw)
    except RemoteProtocolError as exc:
        raise fields.fail(key, exc.reason) from None


def _read_meta(fields: FieldReader) -> dict[str, MetaValue]:
    value = fields.raw("meta")
    if not isinstance(value, dict):
        raise fields.fail("meta", "must be a map")
    if len(value) > META_MAX_ITEMS:
        raise fields.fail("meta", f"must have at most {META_MAX_ITEMS} entries, got {len(value)}")
    meta: dict[str, MetaValue] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or len(key.encode()) > META_MAX_KEY:
            raise fields.fail("meta", f"keys must be text of 1 to {META_MAX_KEY} bytes")
        meta[key] = _meta_value(fields, key, item)
    return meta


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _meta_value(fields: FieldReader, key: str, value: object) -> MetaValue:
    where = f"entry {key!r}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        if len(value.encode()) > META_MAX_TEXT:
            raise fields.fail("meta", f"{where} must be at most {META_MAX_TEXT} bytes of text")
        return value
    if isinstance(value, list):
        if len(value) > META_MAX_LIST:
            raise fields.fail("meta", f"{where} must have at most {META_MAX_LIST} items")
        if not all(_is_number(v) for v in value):
            raise fields.fail("meta", f"{where} must be a list of numbers")
        return list(value)
    raise fields.fail("meta", f"{where} must be a number, a text or a list of numbers")


def seal_blob_header(
    identity: Signer, header: BlobHeader, *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Sign ``header`` and return the header frame (an envelope).

    The payload is first checked with the receiver's own decoder, so we never
    send a header that a correct receiver refuses for its shape.  Raises
    :class:`~fedup.errors.LocalProtocolError` if ``identity`` is not the
    sender, a field is out of range or of a type that cannot travel (a run ID
    that is not 16 bytes, ``meta`` beyond its bounds, NaN), or the frame
    would exceed ``limits.max_message_size``.
    """
    if identity.peer_id != header.sender:
        raise LocalProtocolError("a blob header must be signed by its sender")
    payload = header.to_cbor()
    try:
        BlobHeader.from_cbor(payload, limits=limits)
    except BlobHeaderError as exc:
        raise LocalProtocolError(f"refusing to send an invalid header: {exc.reason}") from None
    frame = _seal(identity, BLOB_HEADER_DOMAIN, BLOB_HEADER_TYPE, payload)
    if len(frame) > limits.max_message_size:
        raise LocalProtocolError(
            f"blob header of {len(frame)} bytes exceeds max_message_size={limits.max_message_size}"
        )
    return frame


def seal_blob_end(identity: Signer, header_frame: Buffer, digest: bytes) -> bytes:
    """Sign the END of the blob announced by ``header_frame``: its id and the blob's digest."""
    if len(digest) != DIGEST_SIZE:
        raise LocalProtocolError(f"a blob digest has {DIGEST_SIZE} bytes")
    payload = cbor.encode({"header": blob_header_id(header_frame), "digest": digest})
    return _seal(identity, BLOB_END_DOMAIN, BLOB_END_TYPE, payload)


def _seal(identity: Signer, domain: str, payload_type: str, payload: bytes) -> bytes:
    envelope = seal_envelope(
        identity.sign,
        identity.public_key,
        domain=domain,
        payload_type=payload_type,
        payload=payload,
    )
    return envelope.to_cbor()


def _open(frame: Buffer, domain: str, payload_type: str, what: str, limits: Limits) -> Envelope:
    """Size, shape and signature of a signed frame; raises the matching BlobError."""
    error = BlobHeaderError if domain == BLOB_HEADER_DOMAIN else BlobEndError
    if len(frame) > limits.max_message_size:
        raise error(f"{what} of {len(frame)} bytes exceeds the limit of {limits.max_message_size}")
    try:
        return open_envelope(
            frame, domain=domain, payload_type=payload_type, max_size=limits.max_message_size
        )
    except SignatureError as exc:
        raise BlobSignatureError(f"{what}: {exc.reason}") from exc
    except RemoteProtocolError as exc:
        raise error(f"{what}: {exc.reason}") from exc


def verify_blob_header(
    frame: Buffer,
    *,
    me: PeerId,
    remote: PeerId,
    run_id: bytes,
    limits: Limits = DEFAULT_LIMITS,
    max_size: int | None = None,
    min_epoch: int = 0,
    guard: BlobReplayGuard | None = None,
) -> BlobHeader:
    """Check a blob header frame from ``remote`` (the channel's authenticated peer).

    Checks, in this order, each with its own error:

    1. frame size <= ``limits.max_message_size`` (:class:`BlobHeaderError`);
    2. the envelope's shape and signature under the blob-header domain
       (:class:`BlobHeaderError`, :class:`BlobSignatureError`);
    3. the payload's CBOR and every field (:class:`BlobHeaderError`);
    4. signer == header's sender == ``remote`` (:class:`BlobSenderError`);
    5. recipient == ``me`` (:class:`BlobRecipientError`);
    6. run == ``run_id`` (:class:`BlobRunError`);
    7. epoch >= ``min_epoch`` (:class:`BlobEpochError`);
    8. size <= ``limits.max_blob_size`` and <= ``max_size`` (:class:`BlobSizeError`);
    9. chunk size == ``limits.blob_chunk_size`` (:class:`BlobChunkSizeError`);
    10. with ``guard``: :meth:`BlobReplayGuard.check` (:class:`BlobReplayError`).

    Errors do not name the peer (the I/O layer adds it).
    """
    envelope = _open(frame, BLOB_HEADER_DOMAIN, BLOB_HEADER_TYPE, "blob header", limits)
    header = BlobHeader.from_cbor(envelope.payload, limits=limits)
    if envelope.signer != header.sender:
        raise BlobSenderError(
            f"blob header names sender {header.sender} but is signed by {envelope.signer}"
        )
    if header.sender != remote:
        raise BlobSenderError(f"blob from {header.sender} arrived on the connection of {remote}")
    if header.recipient != me:
        raise BlobRecipientError(f"blob for recipient {header.recipient}, I am {me}")
    if header.run_id != run_id:
        raise BlobRunError(f"blob for run {header.run_id.hex()}, expected run {run_id.hex()}")
    if header.epoch < min_epoch:
        raise BlobEpochError(
            f"blob of view epoch {header.epoch} is older than the current epoch {min_epoch}"
        )
    cap = limits.max_blob_size if max_size is None else min(max_size, limits.max_blob_size)
    if header.size > cap:
        raise BlobSizeError(f"blob of {header.size} bytes exceeds the limit of {cap}")
    if header.chunk_size != limits.blob_chunk_size:
        raise BlobChunkSizeError(
            f"blob chunk size {header.chunk_size}, expected {limits.blob_chunk_size}"
        )
    if guard is not None:
        guard.check(header)
    return header


# --------------------------------------------------------------------------
# replay guard


class BlobReplayGuard:
    """What this peer has accepted per run; refuses old and repeated blobs.

    Rules: a ``model`` blob's ``(lap, hop)`` must be strictly greater
    (lexicographically) than the last accepted for its run; a ``final`` blob
    is accepted once per run, and after it no ``model`` blob of that run.
    :meth:`check` looks; :meth:`commit` (once the digest verified) re-checks
    and records, so a transfer that fails half-way can be retried.  At most
    ``max_runs`` runs are remembered, the oldest forgotten first (a forgotten
    run's blobs are still refused by the run check unless it is the current run).
    """

    def __init__(self, *, max_runs: int = 1024) -> None:
        self._high: collections.OrderedDict[bytes, tuple[int, int]] = collections.OrderedDict()
        self._finals: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._max_runs = max_runs

    def high_water(self, run_id: bytes) -> tuple[int, int] | None:
        """The last accepted ``(lap, hop)`` of ``run_id``, or None."""
        return self._high.get(run_id)

    def has_final(self, run_id: bytes) -> bool:
        """Whether the final model of ``run_id`` was accepted."""
        return run_id in self._finals

    def check(self, header: BlobHeader) -> None:
        """Raise :class:`BlobReplayError` if ``header`` is not new for its run."""
        run = header.run_id
        if run in self._finals:
            if header.kind == "final":
                raise BlobReplayError(
                    f"final model of run {run.hex()} was already accepted (replay?)"
                )
            raise BlobReplayError(
                f"lap {header.lap} hop {header.hop} arrived after the final model of run "
                f"{run.hex()} (stale)"
            )
        high = self._high.get(run)
        if header.kind == "model" and high is not None and (header.lap, header.hop) <= high:
            raise BlobReplayError(
                f"lap {header.lap} hop {header.hop} is not newer than "
                f"lap {high[0]} hop {high[1]} (replay?)"
            )

    def commit(self, header: BlobHeader) -> None:
        """Record ``header`` as accepted; raises :class:`BlobReplayError` like :meth:`check`."""
        self.check(header)
        run = header.run_id
        if header.kind == "final":
            self._finals[run] = None
            self._finals.move_to_end(run)
            if len(self._finals) > self._max_runs:
                self._finals.popitem(last=False)
        else:
            self._high[run] = (header.lap, header.hop)
            self._high.move_to_end(run)
            if len(self._high) > self._max_runs:
                self._high.popitem(last=False)


# --------------------------------------------------------------------------
# the receive buffer

_MAP_MIN = 2 * 1024 * 1024  # one transparent huge page
_USE_MAP = sys.platform == "linux" and hasattr(mmap, "MAP_PRIVATE")


class BlobBuffer:
    """The bytes of one blob as they arrive: grows with the data, never with a claim.

    On Linux the bytes go into a private anonymous memory map that grows by
    ``mremap`` (:meth:`mmap.mmap.resize`: pages move, nothing is copied) and
    is advised for transparent huge pages, so that touching fresh memory
    costs about a quarter of what 4 KiB pages cost (about 20 ms less per
    47 MB blob).  Memory in use is the bytes received; the reservation is at
    most twice that (or one huge page) and never more than ``limit``.
    Elsewhere, or if the map cannot grow, a ``bytearray``.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._use_map = _USE_MAP
        self._map: mmap.mmap | None = None
        self._array = bytearray()
        self._size = 0

    @property
    def size(self) -> int:
        """Bytes held."""
        return self._size

    @property
    def capacity(self) -> int:
        """Bytes reserved (address space; only what was written uses memory)."""
        return len(self._map) if self._map is not None else len(self._array)

    def append(self, data: memoryview) -> None:
        """Append ``data``; raises LocalProtocolError beyond ``limit``."""
        end = self._size + data.nbytes
        if end > self._limit:
            raise LocalProtocolError(f"blob buffer limit of {self._limit} bytes exceeded")
        if self._use_map and end > self.capacity:
            self._grow(min(self._limit, max(end, 2 * self.capacity, _MAP_MIN)))
        if self._map is not None:
            self._map[self._size : end] = data
        else:
            self._array += data
        self._size = end

    def take(self) -> memoryview:
        """Return the bytes as a writable memoryview and let go of them."""
        mapped, array, size = self._map, self._array, self._size
        self._map, self._array, self._size = None, bytearray(), 0
        if mapped is None:
            return memoryview(array)
        if len(mapped) > size:
            try:
                mapped.resize(size)  # give back the reserved tail
            except (OSError, SystemError, ValueError):
                return memoryview(mapped)[:size]
        return memoryview(mapped)

    def clear(self) -> None:
        """Free the memory (after a failure)."""
        if self._map is not None:
            self._map.close()
        self._map, self._array, self._size = None, bytearray(), 0

    def _grow(self, capacity: int) -> None:
        try:
            if self._map is None:
                self._map = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            else:
                self._map.resize(capacity)
        except (OSError, SystemError, ValueError, TypeError):
            # No mremap here (or no memory map at all): carry on in a bytearray.
            self._use_map = False
            if self._map is not None:
                self._array = bytearray(self._map[: self._size])
                self._map.close()
                self._map = None
            return
        try:
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass  # no transparent huge pages: 4 KiB pages work too, only slower


# --------------------------------------------------------------------------
# receiving: the state machine
#
#   state        event                          next state   (anything else: FAILED)
#   CHUNKS       MORE chunk, full, not the end   CHUNKS
#   CHUNKS       LAST chunk completing the size  END_DUE
#   END_DUE      END: signed by the sender, names this header, digest matches
#                                                DONE
#   CHUNKS,      end of stream                   FAILED (BlobTruncatedError)
#   END_DUE
#   FAILED       anything                        FAILED (the first error again)


class BlobReceiver:
    """Checks the frames of one blob after its header and reassembles the bytes.

    Feed each chunk frame to :meth:`feed_chunk` until it returns True (the
    LAST chunk arrived), then give the next frame (the END) to :meth:`finish`
    for the bytes.  If the stream ends first, call :meth:`eof`.

    Memory: chunks are appended to one :class:`BlobBuffer` that grows as
    bytes arrive (never preallocated from the header's claim), so a huge
    declared size followed by a stall costs one chunk, and the peak is about
    the blob's size.  The result is a writable ``memoryview``: the tensor
    codec views it without copying.

    Hashing can move to a worker thread: :meth:`accept_chunk` checks and
    appends a chunk and queues it on :attr:`hasher`, whose
    :meth:`BlobHasher.hash_pending` may run in another thread meanwhile.

    After an error the receiver is poisoned: it frees its buffer and every
    later call raises an error of the same class and reason.
    """

    def __init__(self, header: BlobHeader, header_frame: Buffer) -> None:
        self.header = header
        self.hasher = BlobHasher()
        self.state: Literal["CHUNKS", "END_DUE", "DONE", "FAILED"] = "CHUNKS"
        self.digest: bytes | None = None
        """The verified digest, once :meth:`finish` succeeded."""
        self._header_id = blob_header_id(header_frame)
        self._buf = BlobBuffer(header.size)
        self._received = 0
        self._error: BlobError | None = None

    @property
    def received(self) -> int:
        """Blob bytes received so far."""
        return self._received

    @property
    def capacity(self) -> int:
        """Bytes reserved for the blob so far; grows with :attr:`received`, not with the claim."""
        return self._buf.capacity

    @property
    def done(self) -> bool:
        """True once the LAST chunk has been accepted (the END is due or checked)."""
        return self.state in ("END_DUE", "DONE")

    def feed_chunk(self, frame: Buffer) -> bool:
        """Check, append and hash one chunk frame; return True after the LAST chunk.

        Raises :class:`BlobDataError` for an empty frame, a type byte other
        than 0x01/0x02 (another kind of frame arrived mid-blob), a chunk
        longer than the chunk size, a MORE chunk that is not full or would
        complete the blob, a LAST chunk that leaves the blob short, bytes
        beyond the declared size, or a chunk after the LAST one.
        """
        done = self.accept_chunk(frame)
        self.hasher.hash_pending()
        return done

    def accept_chunk(self, frame: Buffer) -> bool:
        """Like :meth:`feed_chunk` but leaves the chunk queued on :attr:`hasher`."""
        self._expect("CHUNKS", "a chunk")
        view = memoryview(frame)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if not view.nbytes:
            self._fail(BlobDataError(f"empty frame where a chunk of the {self._what} was due"))
        kind, data = view[0], view[1:]
        n, size, chunk = data.nbytes, self.header.size, self.header.chunk_size
        end = self._received + n
        if kind not in (CHUNK_MORE, CHUNK_LAST):
            self._fail(
                BlobDataError(
                    f"frame of type 0x{kind:02x} after {self._received} of {size} bytes of the "
                    f"{self._what}; expected a chunk (0x01 or 0x02)"
                )
            )
        if n > chunk:
            self._fail(BlobDataError(f"chunk of {n} bytes exceeds the chunk size {chunk}"))
        if end > size:
            self._fail(
                BlobDataError(f"chunks exceed the declared {size} bytes of the {self._what}")
            )
        if kind == CHUNK_MORE and n != chunk:
            self._fail(
                BlobDataError(
                    f"chunk of {n} bytes before the last; every chunk but the last "
                    f"carries exactly {chunk}"
                )
            )
        if kind == CHUNK_MORE and end == size:
            self._fail(BlobDataError(f"the {self._what} is complete but its chunk is not last"))
        if kind == CHUNK_LAST and end != size:
            self._fail(
                BlobDataError(f"last chunk ends the {self._what} after {end} of {size} bytes")
            )
        self._buf.append(data)
        self._received = end
        self.hasher.queue(data)
        if kind == CHUNK_LAST:
            self.state = "END_DUE"
        return self.done

    def eof(self) -> None:
        """The stream ended; raises :class:`BlobTruncatedError` unless the blob is complete."""
        if self._error is not None:
            raise type(self._error)(self._error.reason)
        if self.state == "DONE":
            return
        where = "before the last chunk" if self.state == "CHUNKS" else "before its END"
        self._fail(
            BlobTruncatedError(
                f"connection ended after {self._received} of {self.header.size} bytes of the "
                f"{self._what}, {where}"
            )
        )

    def finish(self, end_frame: Buffer, *, limits: Limits = DEFAULT_LIMITS) -> memoryview:
        """Check the END frame and return the blob as a writable ``memoryview`` (once).

        Checks, in order: the frame is not another chunk
        (:class:`BlobDataError`), its size, shape and signature under the
        blob-end domain (:class:`BlobEndError`, :class:`BlobSignatureError`),
        that the blob's sender signed it (:class:`BlobSenderError`), its
        fields and that it names this blob's header (:class:`BlobEndError`),
        and the digest (:class:`BlobDigestError`).  Raises
        :class:`~fedup.errors.LocalProtocolError` before the LAST chunk or
        after a successful finish.
        """
        if self.state == "CHUNKS":
            raise LocalProtocolError("finish() before the last chunk arrived")
        self._expect("END_DUE", "the END")
        if len(end_frame) and end_frame[0] in (CHUNK_MORE, CHUNK_LAST):
            self._fail(BlobDataError(f"a chunk arrived after the last chunk of the {self._what}"))
        try:
            envelope = _open(end_frame, BLOB_END_DOMAIN, BLOB_END_TYPE, "blob end", limits)
            if envelope.signer != self.header.sender:
                raise BlobSenderError(
                    f"blob end signed by {envelope.signer}, the blob is from {self.header.sender}"
                )
            try:
                fields = FieldReader(
                    cbor.decode(envelope.payload, max_size=limits.max_message_size, max_depth=1),
                    "blob end",
                )
                header_id = fields.bytestr("header", size=DIGEST_SIZE)
                digest = fields.bytestr("digest", size=DIGEST_SIZE)
                fields.done()
            except RemoteProtocolError as exc:
                raise BlobEndError(_prefixed("blob end", exc.reason)) from exc
            if header_id != self._header_id:
                raise BlobEndError(f"blob end names another header than the {self._what}'s")
        except BlobError as exc:
            self._fail(exc)
        actual = self.hasher.digest()
        if not hmac.compare_digest(actual, digest):
            self._fail(
                BlobDigestError(
                    f"digest mismatch: the {self._what} hashes to {actual.hex()[:16]}…, "
                    f"its signed end says {digest.hex()[:16]}…"
                )
            )
        self.state = "DONE"
        self.digest = digest
        return self._buf.take()

    @property
    def _what(self) -> str:
        return self.header.label

    def _expect(self, state: str, what: str) -> None:
        """Raise unless in ``state``: the first error again, or why ``what`` is out of place."""
        if self._error is not None:
            raise type(self._error)(self._error.reason)
        if self.state == state:
            return
        if state == "CHUNKS" and self.state == "END_DUE":
            self._fail(BlobDataError(f"a chunk arrived after the last chunk of the {self._what}"))
        raise LocalProtocolError(f"blob receiver got {what} in state {self.state}")

    def _fail(self, error: BlobError) -> NoReturn:
        self.state = "FAILED"
        self._error = error
        self._buf.clear()
        self.hasher.clear()
        raise error


# --------------------------------------------------------------------------
# replies


@attrs.frozen
class BlobReply:
    """The receiver's answer: ``accept`` a header, ``ack`` custody, or ``nack`` with a reason."""

    kind: Literal["accept", "ack", "nack"]
    ref: bytes = b""
    """ACCEPT: the header's id; ACK: the blob's digest; NACK: empty."""
    reason: str = ""
    """Why a NACK refused the blob (at most 512 bytes, printable)."""

    @classmethod
    def accept(cls, header_id: bytes) -> BlobReply:
        return cls("accept", header_id)

    @classmethod
    def ack(cls, digest: bytes) -> BlobReply:
        return cls("ack", digest)

    @classmethod
    def nack(cls, reason: str) -> BlobReply:
        return cls("nack", b"", _clip(_printable(reason), REASON_MAX))

    def to_cbor(self) -> bytes:
        return cbor.encode({self.kind: self.reason if self.kind == "nack" else self.ref})

    @classmethod
    def from_cbor(cls, frame: Buffer) -> BlobReply:
        """Decode a reply frame; raises :class:`BlobReplyError` for anything else."""
        try:
            fields = FieldReader(
                cbor.decode(frame, max_size=REPLY_MAX_SIZE, max_depth=1), "blob reply"
            )
            if fields.has("nack"):
                reason = fields.text("nack", max_bytes=REASON_MAX, allow_empty=True)
                fields.done()
                return cls("nack", b"", _printable(reason))
            for kind in ("accept", "ack"):
                if fields.has(kind):
                    ref = fields.bytestr(kind, size=DIGEST_SIZE)
                    fields.done()
                    return cls(kind, ref)
        except RemoteProtocolError as exc:
            raise BlobReplyError(f"malformed blob reply: {exc.reason}") from None
        raise BlobReplyError("malformed blob reply: none of 'accept', 'ack', 'nack'")


def _printable(text: str) -> str:
    """Escape control and other unprintable characters (a peer's text goes to logs)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _clip(text: str, max_bytes: int) -> str:
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    return raw[: max_bytes - 3].decode("utf-8", "ignore") + "..."
