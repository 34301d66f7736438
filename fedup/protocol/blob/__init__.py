"""Model blobs: signed header and end, chunk frames, replies, replay guard, two machines.

A *blob* is one encoded model state (:mod:`fedup.protocol.tensors`) on its way
from one peer to the next.  ``docs/protocol-blob.md`` is the specification; in
short, on one connection (frames of :mod:`fedup.protocol.framing`)::

    sender                                      receiver
    HEADER  signed: run, kind, lap, hop,  --->  checks size, signature, fields, sender,
            epoch, from, to, size, chunk        recipient, run, epoch, size, chunk size,
                                                replay (in this order)
            <---  ACCEPT {"accept": header id}   or   NACK {"nack": reason, "code": code}
    CHUNK   0x01 + chunk_size bytes       --->  ceil(size / chunk_size) chunks, all full
    ...                                         but the last; an empty blob is one
    CHUNK   0x02 + the rest               --->  empty LAST chunk
    END     signed: header id, digest     --->  checks signature, signer, header id, digest
            <---  ACK {"ack": digest}            or   NACK {"nack": reason, "code": code}

The digest (BLAKE2b-256 of the blob) travels in the signed END rather than in
the header so that the sender hashes while it sends instead of before: one
full hashing pass less on every hop's critical path.  The END names the header
(its id is the BLAKE2b-256 of the header frame), so header and end together
bind the bytes to the run, kind, lap, hop, epoch, sender and recipient.  The
secure channel underneath provides confidentiality, ordering and replay
protection of the frames themselves.

The package is pure (no I/O, no threads, no buffers of its own):

* :mod:`~fedup.protocol.blob.errors`: :class:`BlobError` and one subclass per
  check, each with the :class:`~fedup.protocol.refusal.RefusalCode` a receiver
  answers it with;
* :mod:`~fedup.protocol.blob.header`: the signed header and END, digests, the
  chunk layout, and :func:`verify_blob_header`'s ten checks;
* :mod:`~fedup.protocol.blob.sender`: :class:`BlobSender`, the sending machine;
* :mod:`~fedup.protocol.blob.receiver`: :class:`BlobReceiver`, the receiving
  machine (the bytes go to the caller's sink; the caller hashes them);
* :mod:`~fedup.protocol.blob.replay`: :class:`BlobReplayGuard`;
* :mod:`~fedup.protocol.blob.reply`: :class:`BlobReply` (ACCEPT, ACK, NACK).

:mod:`fedup.net.blobs` drives the two machines: it moves the frames, keeps
time, owns the receive buffer and runs the hashing threads
(:mod:`fedup.net.blob_buffers`).
"""

from __future__ import annotations

from fedup.protocol.blob.errors import (
    BlobChunkSizeError,
    BlobDataError,
    BlobDigestError,
    BlobEndError,
    BlobEpochError,
    BlobError,
    BlobHeaderError,
    BlobRecipientError,
    BlobRefusedError,
    BlobReplayError,
    BlobReplyError,
    BlobRunError,
    BlobSenderError,
    BlobSignatureError,
    BlobSizeError,
    BlobTruncatedError,
    refusal_code,
)
from fedup.protocol.blob.header import (
    BLOB_END_DOMAIN,
    BLOB_END_TYPE,
    BLOB_HEADER_DOMAIN,
    BLOB_HEADER_TYPE,
    CHUNK_LAST,
    CHUNK_MORE,
    DIGEST_SIZE,
    KINDS,
    RUN_ID_SIZE,
    BlobHeader,
    BlobKind,
    Buffer,
    blob_digest,
    blob_header_id,
    chunk_count,
    iter_chunks,
    open_blob_end,
    seal_blob_end,
    seal_blob_header,
    verify_blob_header,
)
from fedup.protocol.blob.receiver import BlobReceiver, BlobSink, ReceiverState
from fedup.protocol.blob.replay import BlobReplayGuard
from fedup.protocol.blob.reply import REPLY_MAX_SIZE, BlobReply
from fedup.protocol.blob.sender import BlobSender, SenderState

__all__ = [
    "BLOB_END_DOMAIN",
    "BLOB_END_TYPE",
    "BLOB_HEADER_DOMAIN",
    "BLOB_HEADER_TYPE",
    "CHUNK_LAST",
    "CHUNK_MORE",
    "DIGEST_SIZE",
    "KINDS",
    "REPLY_MAX_SIZE",
    "RUN_ID_SIZE",
    "BlobChunkSizeError",
    "BlobDataError",
    "BlobDigestError",
    "BlobEndError",
    "BlobEpochError",
    "BlobError",
    "BlobHeader",
    "BlobHeaderError",
    "BlobKind",
    "BlobReceiver",
    "BlobRecipientError",
    "BlobRefusedError",
    "BlobReplayError",
    "BlobReplayGuard",
    "BlobReply",
    "BlobReplyError",
    "BlobRunError",
    "BlobSender",
    "BlobSenderError",
    "BlobSignatureError",
    "BlobSink",
    "BlobSizeError",
    "BlobTruncatedError",
    "Buffer",
    "ReceiverState",
    "SenderState",
    "blob_digest",
    "blob_header_id",
    "chunk_count",
    "iter_chunks",
    "open_blob_end",
    "refusal_code",
    "seal_blob_end",
    "seal_blob_header",
    "verify_blob_header",
]
