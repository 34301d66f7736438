"""The receiving state machine: checks the frames of one blob after its header.

It holds no bytes and hashes nothing: every accepted chunk's data goes to a
*sink* the caller supplies (an object with ``append(memoryview)``; in
:mod:`fedup.net.blobs` a growing buffer plus a hasher working in a thread), and
the caller hands the digest of what it received to :meth:`BlobReceiver.finish`.

Transitions (anything not listed: FAILED, with the error named)::

    state        event                                          next state
    CHUNKS       MORE chunk, full, not completing the blob      CHUNKS
    CHUNKS       LAST chunk completing the declared size        END_DUE
    END_DUE      END: signed by the sender, names this header,
                 its digest equals the caller's                 DONE
    CHUNKS,      end of stream                                  FAILED (BlobTruncatedError)
    END_DUE
    DONE         end of stream                                  DONE
    FAILED       anything                                       FAILED (the first error again)

Our own misuse (an END before the LAST chunk, anything after DONE) raises
:class:`~fedup.errors.LocalProtocolError` and changes nothing.
"""

from __future__ import annotations

import hmac
from typing import Literal, NoReturn, Protocol

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.protocol.blob.errors import BlobDataError, BlobDigestError, BlobError, BlobTruncatedError
from fedup.protocol.blob.header import (
    CHUNK_LAST,
    CHUNK_MORE,
    BlobHeader,
    Buffer,
    blob_header_id,
    open_blob_end,
)

__all__ = ["BlobReceiver", "BlobSink", "ReceiverState"]

ReceiverState = Literal["CHUNKS", "END_DUE", "DONE", "FAILED"]


class BlobSink(Protocol):
    """Where a receiver puts the data of each accepted chunk, in order."""

    def append(self, data: memoryview, /) -> None:
        """Take ``data`` (a view into the chunk frame: keep it or copy it, never change it)."""


class BlobReceiver:
    """Checks the chunk frames and the END of one blob; the bytes go to ``sink``.

    Feed each chunk frame to :meth:`feed_chunk` until it returns True (the
    LAST chunk arrived), then give the next frame (the END) to :meth:`finish`
    together with the digest of the bytes the sink took.  If the stream ends
    first, call :meth:`eof`.

    The receiver allocates nothing from the header's claim: a huge declared
    size followed by a stall costs what the sink holds, one chunk.

    After an error the receiver is poisoned: every later call raises an error
    of the same class, reason and code.  The sink is the caller's to free.
    """

    def __init__(self, header: BlobHeader, header_frame: Buffer, sink: BlobSink) -> None:
        self.header = header
        self.state: ReceiverState = "CHUNKS"
        self.digest: bytes | None = None
        """The verified digest, once :meth:`finish` succeeded."""
        self._header_id = blob_header_id(header_frame)
        self._sink = sink
        self._received = 0
        self._error: BlobError | None = None

    @property
    def received(self) -> int:
        """Blob bytes received so far."""
        return self._received

    @property
    def done(self) -> bool:
        """True once the LAST chunk has been accepted (the END is due or checked)."""
        return self.state in ("END_DUE", "DONE")

    def feed_chunk(self, frame: Buffer) -> bool:
        """Check one chunk frame and hand its data to the sink; return True after the LAST.

        Raises :class:`BlobDataError` for an empty frame, a type byte other
        than 0x01/0x02 (another kind of frame arrived mid-blob), a chunk
        longer than the chunk size, a MORE chunk that is not full or would
        complete the blob, a LAST chunk that leaves the blob short, bytes
        beyond the declared size, or a chunk after the LAST one.
        """
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
        self._sink.append(data)
        self._received = end
        if kind == CHUNK_LAST:
            self.state = "END_DUE"
        return self.done

    def eof(self) -> None:
        """The stream ended; raises :class:`BlobTruncatedError` unless the blob is complete."""
        if self._error is not None:
            raise self._error.again()
        if self.state == "DONE":
            return
        where = "before the last chunk" if self.state == "CHUNKS" else "before its END"
        self._fail(
            BlobTruncatedError(
                f"connection ended after {self._received} of {self.header.size} bytes of the "
                f"{self._what}, {where}"
            )
        )

    def finish(self, end_frame: Buffer, digest: bytes, *, limits: Limits = DEFAULT_LIMITS) -> None:
        """Check the END frame against ``digest``, the digest of the bytes the sink took.

        Checks, in order: the frame is not another chunk
        (:class:`BlobDataError`), then :func:`~fedup.protocol.blob.header.open_blob_end`
        (size, shape and signature under the blob-end domain, the signer is the
        blob's sender, the fields, the header it names), and that its signed
        digest equals ``digest`` (:class:`BlobDigestError`).  On success the
        state is DONE and :attr:`digest` is set.  Raises
        :class:`~fedup.errors.LocalProtocolError` before the LAST chunk or
        after a successful finish.
        """
        if self.state == "CHUNKS":
            raise LocalProtocolError("finish() before the last chunk arrived")
        self._expect("END_DUE", "the END")
        if len(end_frame) and end_frame[0] in (CHUNK_MORE, CHUNK_LAST):
            self._fail(BlobDataError(f"a chunk arrived after the last chunk of the {self._what}"))
        try:
            signed = open_blob_end(
                end_frame, header=self.header, header_id=self._header_id, limits=limits
            )
        except BlobError as exc:
            self._fail(exc)
        if not hmac.compare_digest(digest, signed):
            self._fail(
                BlobDigestError(
                    f"digest mismatch: the {self._what} hashes to {digest.hex()[:16]}…, "
                    f"its signed end says {signed.hex()[:16]}…"
                )
            )
        self.state = "DONE"
        self.digest = signed

    @property
    def _what(self) -> str:
        return self.header.label

    def _expect(self, state: ReceiverState, what: str) -> None:
        """Raise unless in ``state``: the first error again, or why ``what`` is out of place."""
        if self._error is not None:
            raise self._error.again()
        if self.state == state:
            return
        if state == "CHUNKS" and self.state == "END_DUE":
            self._fail(BlobDataError(f"a chunk arrived after the last chunk of the {self._what}"))
        raise LocalProtocolError(f"blob receiver got {what} in state {self.state}")

    def _fail(self, error: BlobError) -> NoReturn:
        self.state = "FAILED"
        self._error = error
        raise error
