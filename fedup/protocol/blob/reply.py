"""The receiver's replies: ACCEPT a header, ACK custody, or NACK with a typed refusal.

Wire forms (CBOR maps, at most :data:`REPLY_MAX_SIZE` bytes)::

    {"accept": header id}                 32 bytes
    {"ack": digest}                       32 bytes
    {"ack": digest, "receipt": bstr}      the taker's signed custody receipt
                                          (fedup.protocol.notices), for ring blobs
    {"nack": reason, "code": code}        reason: text, at most 512 bytes of UTF-8;
                                          code: a RefusalCode's text ("stale", ...)
    {"nack": ..., "code": ..., "proof": [bstr, ...]}
                                          for "excluded": the dead notices, at most
                                          MAX_PROOF, that show the sender is dead

A NACK's reason is escaped (:func:`~fedup.protocol.refusal.printable`) and cut
at a character boundary (:func:`~fedup.protocol.refusal.cut_utf8`) when it is
made, so a long reason in any script arrives shortened, never refused.  A
NACK whose code this version does not know is a malformed reply: the sender
cannot act on a refusal it cannot read.
"""

from __future__ import annotations

from typing import Literal

import attrs

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.blob.errors import BlobReplyError
from fedup.protocol.blob.header import DIGEST_SIZE, Buffer
from fedup.protocol.refusal import REASON_MAX_BYTES, RefusalCode, cut_utf8, printable
from fedup.protocol.schema import FieldReader, MessageError

__all__ = ["REPLY_MAX_SIZE", "BlobReply"]

MAX_SIGNED = 1024
"""Largest receipt or proof notice (each is a signed envelope of about 300 bytes)."""
MAX_PROOF = 8
"""Notices in one proof: a member behind by more cannot check it and treats the refusal
as one for content."""
REPLY_MAX_SIZE = 1024 + (MAX_PROOF + 1) * (MAX_SIGNED + 8)
"""Largest reply frame accepted: a 512-byte reason, a code, a receipt or a proof, framing."""
_CODE_MAX = 32  # the longest RefusalCode text is 11 bytes


@attrs.frozen
class BlobReply:
    """The receiver's answer: ``accept`` a header, ``ack`` custody, or ``nack`` with a refusal."""

    kind: Literal["accept", "ack", "nack"]
    ref: bytes = b""
    """ACCEPT: the header's id; ACK: the blob's digest; NACK: empty."""
    code: RefusalCode | None = None
    """NACK: why the blob was refused, as a code; None for ACCEPT and ACK."""
    reason: str = ""
    """NACK: the refusal in words for logs (at most 512 bytes, printable)."""
    extra: tuple[bytes, ...] = ()
    """ACK: the custody receipt (one item, or none); NACK: the proof (dead notices)."""

    @classmethod
    def accept(cls, header_id: bytes) -> BlobReply:
        return cls("accept", header_id)

    @classmethod
    def ack(cls, digest: bytes, receipt: bytes | None = None) -> BlobReply:
        return cls("ack", digest, extra=() if receipt is None else (receipt,))

    @classmethod
    def nack(cls, code: RefusalCode, reason: str, proof: tuple[bytes, ...] = ()) -> BlobReply:
        """A refusal; ``reason`` is escaped and cut to 512 bytes of UTF-8 (never split)."""
        return cls(
            "nack", b"", code, cut_utf8(printable(reason), REASON_MAX_BYTES), proof[:MAX_PROOF]
        )

    @property
    def receipt(self) -> bytes | None:
        """ACK: the custody receipt it carries, if any."""
        return self.extra[0] if self.kind == "ack" and self.extra else None

    def to_cbor(self) -> bytes:
        if self.kind == "nack":
            if self.code is None:
                raise LocalProtocolError("a NACK needs a refusal code")
            body: dict[str, object] = {"nack": self.reason, "code": self.code.value}
            if self.extra:
                body["proof"] = list(self.extra)
            return cbor.encode(body)
        if self.kind == "ack" and self.extra:
            return cbor.encode({"ack": self.ref, "receipt": self.extra[0]})
        return cbor.encode({self.kind: self.ref})

    @classmethod
    def from_cbor(cls, frame: Buffer) -> BlobReply:
        """Decode a reply frame.

        Raises :class:`BlobReplyError` ("malformed blob reply: ...") for a frame
        over :data:`REPLY_MAX_SIZE`, input that is not strict CBOR, a map that is
        none of the three forms, a missing or extra field, a reason over 512
        bytes, or a NACK code this version does not know.
        """
        try:
            fields = FieldReader(
                cbor.decode(frame, max_size=REPLY_MAX_SIZE, max_depth=2), "blob reply"
            )
            if fields.has("nack"):
                reason = fields.text("nack", max_bytes=REASON_MAX_BYTES, allow_empty=True)
                text = fields.text("code", max_bytes=_CODE_MAX)
                proof = (
                    tuple(fields.array("proof", _signed_item, max_items=MAX_PROOF))
                    if fields.has("proof")
                    else ()
                )
                fields.done()
                code = RefusalCode.parse(text)
                if code is None:
                    raise fields.fail("code", f"names no known refusal: {printable(text)!r}")
                return cls("nack", b"", code, printable(reason), proof)
            for kind in ("accept", "ack"):
                if fields.has(kind):
                    ref = fields.bytestr(kind, size=DIGEST_SIZE)
                    receipt = (
                        (fields.bytestr("receipt", max_size=MAX_SIGNED),)
                        if kind == "ack" and fields.has("receipt")
                        else ()
                    )
                    fields.done()
                    return cls(kind, ref, extra=receipt)
        except RemoteProtocolError as exc:
            raise BlobReplyError(f"malformed blob reply: {exc.reason}") from None
        raise BlobReplyError("malformed blob reply: none of 'accept', 'ack', 'nack'")


def _signed_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > MAX_SIGNED:
        raise MessageError(f"{label} must be a byte string of at most {MAX_SIGNED} bytes")
    return value
