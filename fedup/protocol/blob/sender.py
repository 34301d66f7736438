"""The sending state machine: header, chunks and END out; the receiver's replies in.

It moves no bytes and hashes nothing: the driver (:func:`fedup.net.blobs.send_blob`)
sends :attr:`BlobSender.header_frame`, feeds every reply frame to
:meth:`BlobSender.receive_reply`, sends the chunks :meth:`BlobSender.next_chunk`
hands out (slices of the caller's buffer, no copy of the blob) while it hashes
them, and sends the END :meth:`BlobSender.end_frame` builds from that digest.

Transitions (anything not listed: FAILED, with the error named)::

    state        event                                          next state
    HEADER_SENT  reply ACCEPT naming this header's id           CHUNKS
    CHUNKS       next_chunk(), not the last                     CHUNKS
    CHUNKS       next_chunk(), the LAST chunk                   END_DUE
    END_DUE      end_frame(digest)                              ACK_DUE
    ACK_DUE      reply ACK naming that digest                   DONE
    any but      reply NACK                                     FAILED (BlobRefusedError
    DONE                                                        with its code)
    any but      a malformed reply, or one not due (an ACK      FAILED (BlobReplyError)
    DONE         before the END, an ACCEPT of another header)
    FAILED       anything                                       FAILED (the first error again)

A NACK is taken in every state: a receiver that refuses mid-transfer sends it
at once, and a driver whose connection broke while sending looks for it.  Our
own misuse (a chunk before ACCEPT, an END before the last chunk, anything after
DONE) raises :class:`~fedup.errors.LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

from typing import Literal, NoReturn

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.protocol.blob.errors import BlobError, BlobRefusedError, BlobReplyError
from fedup.protocol.blob.header import (
    CHUNK_LAST,
    CHUNK_MORE,
    BlobHeader,
    Buffer,
    blob_header_id,
    seal_blob_end,
    seal_blob_header,
)
from fedup.protocol.blob.reply import BlobReply
from fedup.protocol.envelope import Signer

__all__ = ["BlobSender", "SenderState"]

SenderState = Literal["HEADER_SENT", "CHUNKS", "END_DUE", "ACK_DUE", "DONE", "FAILED"]


class BlobSender:
    """Builds the frames of one blob and checks the receiver's replies.

    ``data`` is the blob (any buffer; it must not change until the blob is
    DONE).  The signed :attr:`header_frame` is built at once; its ACCEPT is
    due.

    Raises :class:`~fedup.errors.LocalProtocolError` if ``header.size`` is
    not the size of ``data``, ``data`` exceeds ``limits.max_blob_size``, or
    :func:`~fedup.protocol.blob.header.seal_blob_header` refuses the header
    (``identity`` is not its sender, a field cannot travel, the frame is
    too large).
    """

    def __init__(
        self,
        identity: Signer,
        header: BlobHeader,
        data: Buffer,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if view.nbytes > limits.max_blob_size:
            raise LocalProtocolError(
                f"blob of {view.nbytes} bytes exceeds max_blob_size={limits.max_blob_size}"
            )
        if view.nbytes != header.size:
            raise LocalProtocolError(f"header says {header.size} bytes, the blob has {view.nbytes}")
        self.header = header
        self.header_frame = seal_blob_header(identity, header, limits=limits)
        """The signed header frame, to send first."""
        self.state: SenderState = "HEADER_SENT"
        self.digest: bytes | None = None
        """The digest the END signed, once :meth:`end_frame` built it."""
        self.receipt: bytes | None = None
        """The custody receipt the ACK carried, if any (checked by the caller)."""
        self._identity = identity
        self._view = view
        self._header_id = blob_header_id(self.header_frame)
        self._next = 0
        self._error: BlobError | None = None

    @property
    def sent(self) -> int:
        """Blob bytes handed out by :meth:`next_chunk` so far."""
        return min(self._next * self.header.chunk_size, self.header.size)

    def receive_reply(self, frame: Buffer) -> None:
        """Take a reply frame from the receiver (see the table for which is due when).

        Raises :class:`BlobRefusedError` for a NACK (its ``code`` is the
        receiver's, its reason quotes the receiver's words),
        :class:`BlobReplyError` for a malformed reply or one that is not due,
        and :class:`~fedup.errors.LocalProtocolError` after DONE.
        """
        self._check_alive("a reply")
        try:
            reply = BlobReply.from_cbor(frame)
        except BlobReplyError as exc:
            self._fail(exc)
        if reply.kind == "nack":
            assert reply.code is not None  # from_cbor never returns a NACK without one
            self._fail(
                BlobRefusedError(
                    f"refused the {self._what}: {reply.reason}", code=reply.code, proof=reply.extra
                )
            )
        if self.state == "HEADER_SENT" and reply == BlobReply.accept(self._header_id):
            self.state = "CHUNKS"
            return
        if (
            self.state == "ACK_DUE"
            and self.digest is not None
            and reply.kind == "ack"
            and reply.ref == self.digest
        ):
            self.state = "DONE"
            self.receipt = reply.receipt
            return
        kind, what = reply.kind.upper(), self._what
        if self.state == "HEADER_SENT" and reply.kind == "accept":
            self._fail(BlobReplyError(f"answered ACCEPT of another header than the {what}'s"))
        if self.state == "ACK_DUE" and reply.kind == "ack":
            self._fail(BlobReplyError(f"answered ACK of another digest than the {what}'s"))
        if self.state == "HEADER_SENT":
            self._fail(BlobReplyError(f"answered {kind} where ACCEPT of the {what} was due"))
        if self.state == "ACK_DUE":
            self._fail(BlobReplyError(f"answered {kind} where ACK of the {what} was due"))
        self._fail(BlobReplyError(f"answered {kind} before the END of the {what}"))

    def next_chunk(self) -> tuple[bytes, memoryview]:
        """The next chunk frame as ``(type byte, slice of the blob)``; CHUNKS only.

        The frame on the wire is the type byte followed by the slice.  After
        the LAST chunk the state is END_DUE.
        """
        self._expect("CHUNKS", "next_chunk()")
        size, chunk = self.header.size, self.header.chunk_size
        start = self._next * chunk
        self._next += 1
        if start + chunk >= size:
            self.state = "END_DUE"
            return bytes((CHUNK_LAST,)), self._view[start:size]
        return bytes((CHUNK_MORE,)), self._view[start : start + chunk]

    def end_frame(self, digest: bytes) -> bytes:
        """The signed END naming this header and ``digest`` (the caller's hash of the blob).

        END_DUE only; the ACK naming ``digest`` is then due.
        """
        self._expect("END_DUE", "end_frame()")
        frame = seal_blob_end(self._identity, self.header_frame, digest)
        self.digest = digest
        self.state = "ACK_DUE"
        return frame

    @property
    def _what(self) -> str:
        return self.header.label

    def _check_alive(self, what: str) -> None:
        if self._error is not None:
            raise self._error.again()
        if self.state == "DONE":
            raise LocalProtocolError(f"blob sender got {what} in state DONE")

    def _expect(self, state: SenderState, what: str) -> None:
        self._check_alive(what)
        if self.state != state:
            raise LocalProtocolError(f"blob sender got {what} in state {self.state}")

    def _fail(self, error: BlobError) -> NoReturn:
        self.state = "FAILED"
        self._error = error
        raise error
