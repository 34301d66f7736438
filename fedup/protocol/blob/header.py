"""The signed records of a blob (its HEADER and its END), digests and the chunk layout.

The HEADER says what the bytes are for (run, kind, lap, hop, epoch, sender,
recipient, size, chunk size) and is signed by the sender; :func:`verify_blob_header`
runs the receiver's ten checks in their documented order.  The END, signed too,
names the header by its id and carries the blob's digest; :func:`open_blob_end`
checks it up to the digest comparison, which belongs to the receiver.  Wire
forms and the order of the checks: ``docs/protocol-blob.md``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal, TypeAlias, cast

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.blob.errors import (
    BlobChunkSizeError,
    BlobEndError,
    BlobEpochError,
    BlobHeaderError,
    BlobRecipientError,
    BlobRunError,
    BlobSenderError,
    BlobSignatureError,
    BlobSizeError,
)
from fedup.protocol.envelope import Envelope, SignatureError, Signer, open_envelope, seal_envelope
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader

if TYPE_CHECKING:
    from fedup.protocol.blob.replay import BlobReplayGuard

__all__ = [
    "BLOB_END_DOMAIN",
    "BLOB_END_TYPE",
    "BLOB_HEADER_DOMAIN",
    "BLOB_HEADER_TYPE",
    "CHUNK_LAST",
    "CHUNK_MORE",
    "DIGEST_SIZE",
    "KINDS",
    "RUN_ID_SIZE",
    "BlobHeader",
    "BlobKind",
    "Buffer",
    "blob_digest",
    "blob_header_id",
    "chunk_count",
    "iter_chunks",
    "open_blob_end",
    "seal_blob_end",
    "seal_blob_header",
    "verify_blob_header",
]

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

BlobKind: TypeAlias = Literal["model", "final"]
Buffer: TypeAlias = bytes | bytearray | memoryview


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


# --------------------------------------------------------------------------
# the header


@attrs.frozen
class BlobHeader:
    """What the sender signs about a blob before sending its bytes.

    Wire form: see ``docs/protocol-blob.md``.
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
            }
        )

    @classmethod
    def from_cbor(cls, data: Buffer, *, limits: Limits = DEFAULT_LIMITS) -> BlobHeader:
        """Decode and check a header payload.

        Raises :class:`BlobHeaderError` naming the field for input that is not
        strict CBOR (a flat map), a missing, unknown or ill-typed field, a kind
        other than ``model``/``final``, or an invalid peer ID.  The semantic
        checks are :func:`verify_blob_header`'s.
        """
        try:
            fields = FieldReader(
                cbor.decode(data, max_size=limits.max_message_size, max_depth=1), "blob header"
            )
            run_id = fields.bytestr("run", size=RUN_ID_SIZE)
            kind = fields.text("kind", max_bytes=8)
            if kind not in KINDS:
                raise fields.fail("kind", f"must be 'model' or 'final', got {kind!r}")
            lap, hop, epoch = fields.uint("lap"), fields.uint("hop"), fields.uint("epoch")
            sender, recipient = _peer(fields, "from"), _peer(fields, "to")
            size = fields.uint("size")
            chunk_size = fields.uint("chunk", min_value=1)
            fields.done()
        except RemoteProtocolError as exc:
            raise BlobHeaderError(_prefixed("blob header", exc.reason)) from exc
        kind_ = cast(BlobKind, kind)
        return cls(run_id, kind_, lap, hop, epoch, sender, recipient, size, chunk_size)


def _prefixed(what: str, reason: str) -> str:
    return reason if reason.startswith(what) else f"{what}: {reason}"


def _peer(fields: FieldReader, key: str) -> PeerId:
    raw = fields.bytestr(key, size=RAW_SIZE)
    try:
        return PeerId.from_bytes(raw)
    except RemoteProtocolError as exc:
        raise fields.fail(key, exc.reason) from None


def seal_blob_header(
    identity: Signer, header: BlobHeader, *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Sign ``header`` and return the header frame (an envelope).

    The payload is first checked with the receiver's own decoder, so we never
    send a header that a correct receiver refuses for its shape.  Raises
    :class:`~fedup.errors.LocalProtocolError` if ``identity`` is not the
    sender, a field is out of range or of a type that cannot travel (a run ID
    that is not 16 bytes, a negative lap), or the frame would exceed
    ``limits.max_message_size``.
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

    Errors do not name the peer (the I/O layer adds it); each error's ``code``
    is the refusal to answer with.
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
# the end


def seal_blob_end(identity: Signer, header_frame: Buffer, digest: bytes) -> bytes:
    """Sign the END of the blob announced by ``header_frame``: its id and the blob's digest."""
    if len(digest) != DIGEST_SIZE:
        raise LocalProtocolError(f"a blob digest has {DIGEST_SIZE} bytes")
    payload = cbor.encode({"header": blob_header_id(header_frame), "digest": digest})
    return _seal(identity, BLOB_END_DOMAIN, BLOB_END_TYPE, payload)


def open_blob_end(
    frame: Buffer, *, header: BlobHeader, header_id: bytes, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Check an END frame of the blob ``header`` (whose id is ``header_id``); return its digest.

    Checks, in order: size, envelope shape and signature under the blob-end
    domain (:class:`BlobEndError`, :class:`BlobSignatureError`), that the
    header's sender signed it (:class:`BlobSenderError`), and its two fields,
    ``header`` naming ``header_id`` (:class:`BlobEndError`).  Comparing the
    digest with the received bytes is the caller's.
    """
    envelope = _open(frame, BLOB_END_DOMAIN, BLOB_END_TYPE, "blob end", limits)
    if envelope.signer != header.sender:
        raise BlobSenderError(
            f"blob end signed by {envelope.signer}, the blob is from {header.sender}"
        )
    try:
        fields = FieldReader(
            cbor.decode(envelope.payload, max_size=limits.max_message_size, max_depth=1),
            "blob end",
        )
        named = fields.bytestr("header", size=DIGEST_SIZE)
        digest = fields.bytestr("digest", size=DIGEST_SIZE)
        fields.done()
    except RemoteProtocolError as exc:
        raise BlobEndError(_prefixed("blob end", exc.reason)) from exc
    if named != header_id:
        raise BlobEndError(f"blob end names another header than the {header.label}'s")
    return digest


# --------------------------------------------------------------------------
# signed frames


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
