"""What can go wrong with a blob, and which typed refusal a receiver answers for it.

Every failure caused by a peer's frames is a :class:`BlobError` (a
:class:`~fedup.errors.RemoteProtocolError`), one subclass per check.  Each class
carries ``code``: the :class:`~fedup.protocol.refusal.RefusalCode` that a
receiver puts in its NACK when it refuses a blob for that reason, so the sender
decides on the code and never parses the words.

=========================  ==============  ============================================
error                      code            why this code
=========================  ==============  ============================================
``BlobHeaderError``        ``MALFORMED``   the header does not decode or has a bad field
``BlobSignatureError``     ``MALFORMED``   a forged, tampered or other-domain signature
``BlobSenderError``        ``MALFORMED``   signer, named sender and channel peer disagree:
                                           a forged header, not a membership question
                                           (the blob layer knows no members)
``BlobRecipientError``     ``WRONG_RUN``   addressed to another peer: not for this run's
                                           receiver
``BlobRunError``           ``WRONG_RUN``   another run than the receiver's
``BlobEpochError``         ``STALE``       made in an older view epoch: the ring moved on
``BlobSizeError``          ``TOO_LARGE``   beyond ``max_blob_size`` or the caller's cap
``BlobChunkSizeError``     ``MALFORMED``   a chunk size other than the agreed one
``BlobReplayError``        ``STALE``       not newer than a blob already accepted
``BlobDataError``          ``MALFORMED``   chunk frames that do not carry exactly the blob
``BlobEndError``           ``MALFORMED``   a bad END, or one naming another header
``BlobDigestError``        ``MALFORMED``   the bytes do not match the signed digest
``BlobTruncatedError``     ``MALFORMED``   never sent: the connection is gone
``BlobReplyError``         ``MALFORMED``   a sender's error about a reply; never sent
``BlobRefusedError``       the NACK's      the code the receiver sent (per instance)
=========================  ==============  ============================================

An error raised by the caller's own check of a received blob (see
:func:`fedup.net.blobs.receive_blob`) is answered with its ``code`` attribute
when it has one, else ``MALFORMED``: :func:`refusal_code` decides.
"""

from __future__ import annotations

from fedup.errors import ConnectionLostError, RemoteProtocolError
from fedup.protocol.envelope import SignatureError
from fedup.protocol.refusal import RefusalCode

__all__ = [
    "BlobChunkSizeError",
    "BlobDataError",
    "BlobDigestError",
    "BlobEndError",
    "BlobEpochError",
    "BlobError",
    "BlobHeaderError",
    "BlobRecipientError",
    "BlobRefusedError",
    "BlobReplayError",
    "BlobReplyError",
    "BlobRunError",
    "BlobSenderError",
    "BlobSignatureError",
    "BlobSizeError",
    "BlobTruncatedError",
    "refusal_code",
]


class BlobError(RemoteProtocolError):
    """Something about a blob from (or a reply of) a peer broke the blob protocol."""

    code: RefusalCode = RefusalCode.MALFORMED
    """The refusal a receiver sends for this error (see the table above)."""

    def again(self) -> BlobError:
        """A fresh error of the same class, reason and code (a poisoned machine re-raises it)."""
        err = type(self).__new__(type(self))
        RemoteProtocolError.__init__(err, self.reason)
        err.__dict__.update(self._extras())
        return err

    def with_peer(self, peer: str) -> BlobError:
        """A copy of this error (same class, reason and code) that names ``peer``."""
        err = type(self).__new__(type(self))
        RemoteProtocolError.__init__(err, self.reason, peer=peer)
        err.__dict__.update(self._extras())
        err.__cause__ = self.__cause__
        return err

    def _extras(self) -> dict[str, object]:
        """What a copy keeps besides the reason and peer: the code, a NACK's proof."""
        return {k: v for k, v in vars(self).items() if k not in ("reason", "peer")}


class BlobHeaderError(BlobError):
    """A blob header frame is too large, is not strict CBOR, or has a bad field."""


class BlobSignatureError(BlobError, SignatureError):
    """A blob header's or end's signature does not verify (forged, tampered, other domain)."""


class BlobSenderError(BlobError):
    """A blob signed by someone other than its sender, or arriving from a third peer."""


class BlobRecipientError(BlobError):
    """A blob addressed to another peer."""

    code = RefusalCode.WRONG_RUN


class BlobRunError(BlobError):
    """A blob of another federated run."""

    code = RefusalCode.WRONG_RUN


class BlobEpochError(BlobError):
    """A blob made in a view epoch older than the receiver's current one."""

    code = RefusalCode.STALE


class BlobSizeError(BlobError):
    """A blob larger than the receiver accepts."""

    code = RefusalCode.TOO_LARGE


class BlobChunkSizeError(BlobError):
    """A blob header announcing a chunk size other than the agreed one."""


class BlobReplayError(BlobError):
    """A blob whose (lap, hop) is not newer than one already accepted, or a second final."""

    code = RefusalCode.STALE


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
    """The receiver refused our blob (a NACK): ``code`` is its refusal, ``reason`` quotes it."""

    def __init__(
        self,
        reason: str,
        *,
        code: RefusalCode = RefusalCode.MALFORMED,
        peer: str | None = None,
        proof: tuple[bytes, ...] = (),
    ) -> None:
        super().__init__(reason, peer=peer)
        self.code = code
        self.proof = proof
        """For ``excluded``: the dead notices the receiver sent to show we are dead."""


def refusal_code(error: BaseException) -> RefusalCode:
    """The code to NACK ``error`` with: its ``code`` if it is a RefusalCode, else MALFORMED."""
    code = getattr(error, "code", None)
    return code if isinstance(code, RefusalCode) else RefusalCode.MALFORMED
