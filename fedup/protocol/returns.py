"""Taking a member back: return requests and return notices.

A member counted as dead (it crashed and was restarted, it was cut off, it was
slower than ``hop_timeout``) comes back by asking: it signs a *return request*
and sends it to the members.  The member that is its live predecessor takes it
back the next time it hands the model on: it appends a *return notice*, which
embeds the request, to the run's chain of notices
(:class:`~fedup.protocol.notices.DeadChain`) and hands the model to the
returner.  The chain's epoch grows by one, as for a death; the dead set shrinks.

The rules (``docs/reliability.md``, ``docs/federation.md`` section 4):

* a request is signed by the returner itself, names the run and carries a
  counter ``n`` that the returner raises for every request it makes; a notice
  may use a request only with a counter above that of the last request the
  chain used for the same member, so no request is used twice, and nobody can
  bring back a member that did not ask;
* a notice is signed by a live member, names a member the chain counts as dead,
  and its signer must be that member's predecessor in the ring with the member
  back (the only member that hands the model to it next);
* a member returns at most ``Limits.max_returns`` times in one run (each return
  and the death before it are two notices every blob carries).

What a hostile member can do with this is bring back a member that asked and
then died again: the next hand-over to it fails and it is declared dead again,
one failed hand-over later.  It cannot keep out a member that asks to return
except by being its predecessor and not handing it the model, which is the power
every predecessor has over its successor already (docs/federation.md, the
member threat model).

Wire forms (signed envelopes, :mod:`fedup.protocol.envelope`)::

    return request  (domain fedup-return-request, type fedup/return-request/1)
      {"run": bstr(16), "by": bstr(38), "n": uint}
    return notice   (domain fedup-return-notice, type fedup/return-notice/1)
      {"run": bstr(16), "index": uint, "prev": bstr(32), "by": bstr(38),
       "back": bstr(38), "at": [lap, hop], "ask": bstr (the return request)}
"""

from __future__ import annotations

import hashlib

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Signer, open_envelope, seal_envelope
from fedup.protocol.laps import Position
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.schema import FieldReader

__all__ = ["ReturnError", "ReturnNotice", "ReturnRequest", "max_chain_notices"]

REQUEST_DOMAIN = "fedup-return-request"
REQUEST_TYPE = "fedup/return-request/1"
NOTICE_DOMAIN = "fedup-return-notice"
NOTICE_TYPE = "fedup/return-notice/1"
MAX_REQUEST_SIZE = 256
"""Largest return request envelope (about 190 bytes)."""
MAX_NOTICE_SIZE = 1024
"""Largest return notice envelope, request included (about 480 bytes)."""
RUN_ID_SIZE = 16
DIGEST_SIZE = 32
MAX_COUNTER = 2**32 - 1


class ReturnError(RemoteProtocolError):
    """A return request or notice that is forged, malformed or out of place."""

    code = RefusalCode.BAD_CLAIM


def entry_digest(envelope: bytes) -> bytes:
    """The digest of a chain entry (dead or return notice): what the next one names."""
    return hashlib.blake2b(envelope, digest_size=DIGEST_SIZE, person=b"fedup-dead-note").digest()


def max_chain_notices(members: int, limits: Limits = DEFAULT_LIMITS) -> int:
    """The most notices a run's chain can hold: every member dead once, and each
    member back and dead again at most ``max_returns`` times."""
    return members * (1 + 2 * limits.max_returns)


@attrs.frozen
class ReturnRequest:
    """A member's signed request to be taken back into a run."""

    run_id: bytes
    peer: PeerId
    """Who asks (and signed it)."""
    counter: int
    """Raised by the returner for every request it makes (a notice uses each once)."""
    envelope: bytes

    @classmethod
    def seal(cls, signer: Signer, *, run_id: bytes, counter: int) -> ReturnRequest:
        payload = cbor.encode({"run": run_id, "by": signer.peer_id.raw, "n": counter})
        envelope = seal_envelope(
            signer.sign,
            signer.public_key,
            domain=REQUEST_DOMAIN,
            payload_type=REQUEST_TYPE,
            payload=payload,
        ).to_cbor()
        return cls(run_id, signer.peer_id, counter, envelope)

    @classmethod
    def open(cls, data: bytes) -> ReturnRequest:
        """Verify and decode a request; raises :class:`ReturnError`."""
        try:
            envelope = open_envelope(
                data, domain=REQUEST_DOMAIN, payload_type=REQUEST_TYPE, max_size=MAX_REQUEST_SIZE
            )
            f = FieldReader(
                cbor.decode(envelope.payload, max_size=MAX_REQUEST_SIZE, max_depth=1),
                "return request",
            )
            run_id = f.bytestr("run", size=RUN_ID_SIZE)
            peer = PeerId.from_bytes(f.bytestr("by", size=RAW_SIZE))
            counter = f.uint("n", max_value=MAX_COUNTER)
            f.done()
        except RemoteProtocolError as exc:
            raise ReturnError(f"return request: {exc.reason}") from None
        if envelope.signer != peer:
            raise ReturnError(f"return request names {peer} but is signed by {envelope.signer}")
        return cls(run_id, peer, counter, bytes(data))


@attrs.frozen
class ReturnNotice:
    """A verified return notice and the exact envelope bytes that carried it."""

    run_id: bytes
    index: int
    prev: bytes
    claimer: PeerId
    """Who signed it: the returner's live predecessor."""
    back: PeerId
    """The member taken back."""
    at: Position
    """The position the claimer was handing on when it took the member back."""
    request: ReturnRequest
    envelope: bytes

    @property
    def subject(self) -> PeerId:
        """The member this notice is about."""
        return self.back

    @property
    def digest(self) -> bytes:
        """What the next notice names as ``prev``."""
        return entry_digest(self.envelope)

    def describe(self) -> str:
        return f"{self.claimer} took {self.back} back at {self.at}"

    @classmethod
    def seal(
        cls,
        signer: Signer,
        *,
        run_id: bytes,
        index: int,
        prev: bytes,
        request: ReturnRequest,
        at: Position,
    ) -> ReturnNotice:
        payload = cbor.encode(
            {
                "run": run_id,
                "index": index,
                "prev": prev,
                "by": signer.peer_id.raw,
                "back": request.peer.raw,
                "at": [at.lap, at.hop],
                "ask": request.envelope,
            }
        )
        envelope = seal_envelope(
            signer.sign,
            signer.public_key,
            domain=NOTICE_DOMAIN,
            payload_type=NOTICE_TYPE,
            payload=payload,
        ).to_cbor()
        return cls(run_id, index, prev, signer.peer_id, request.peer, at, request, envelope)

    @classmethod
    def open(cls, data: bytes, *, max_index: int) -> ReturnNotice:
        """Verify the notice and the request inside it; raises :class:`ReturnError`.

        Its place in a chain is :meth:`DeadChain.extend_with`'s to check.
        """
        try:
            envelope = open_envelope(
                data, domain=NOTICE_DOMAIN, payload_type=NOTICE_TYPE, max_size=MAX_NOTICE_SIZE
            )
            f = FieldReader(
                cbor.decode(envelope.payload, max_size=MAX_NOTICE_SIZE, max_depth=2),
                "return notice",
            )
            run_id = f.bytestr("run", size=RUN_ID_SIZE)
            index = f.uint("index", max_value=max_index)
            prev = f.bytestr("prev", size=DIGEST_SIZE)
            claimer = PeerId.from_bytes(f.bytestr("by", size=RAW_SIZE))
            back = PeerId.from_bytes(f.bytestr("back", size=RAW_SIZE))
            at = f.array("at", _uint_item, max_items=2, min_items=2)
            ask = f.bytestr("ask", max_size=MAX_REQUEST_SIZE)
            f.done()
        except RemoteProtocolError as exc:
            raise ReturnError(f"return notice: {exc.reason}") from None
        if envelope.signer != claimer:
            raise ReturnError(f"return notice names {claimer} but is signed by {envelope.signer}")
        request = ReturnRequest.open(ask)
        if request.peer != back or request.run_id != run_id:
            raise ReturnError(
                f"return notice for {back} carries a request by {request.peer} for run "
                f"{request.run_id.hex()[:8]}"
            )
        position = Position(at[0], at[1])
        return cls(run_id, index, prev, claimer, back, position, request, bytes(data))


def _uint_item(value: object, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ReturnError(f"{label} must be an unsigned 32-bit integer")
    return value
