"""Signed statements members make about custody: dead notices and custody receipts.

A member may be counted as dead by the federation only through a *dead
notice*: a statement signed by the member that tried to hand it the model
and could not (it was unreachable, or it took the model and stayed silent for
``hop_timeout``).  The rules (``docs/federation.md``, the member threat model):

* A notice names the claimer's own successor in the ring as it was when the
  claim was made, never anyone else, and never the claimer itself.
* Notices form a hash chain per run: notice ``k`` names the digest of notice
  ``k - 1`` (notice 0 names the view's digest), so a notice is valid at one
  place only, cannot be replayed into another run or view, and a chain can
  only grow; nobody can drop a notice (resurrecting a member) or reorder them.
* A claimer must be live when it claims (not named by an earlier notice).

Every ring blob carries the whole chain; its receiver verifies only the
notices it has not seen (:meth:`DeadChain.extend_with`), so each signature
is checked once per member.

A *custody receipt* is signed by the member that took a blob, and travels
back in the blob's ACK.  The sender forwards it to its own predecessor as
``passed``: a member drops the copy it keeps of a model only on a receipt
from the next member but one, so no member can make its predecessor drop the
last copy by a false "passed".

Wire forms (signed envelopes, :mod:`fedup.protocol.envelope`)::

    dead notice  (domain fedup-dead-notice, type fedup/dead-notice/1)
      {"run": bstr(16), "index": uint, "prev": bstr(32), "by": bstr(38),
       "dead": bstr(38), "why": "unreachable" / "timed-out", "at": [lap, hop]}
    receipt      (domain fedup-custody-receipt, type fedup/custody-receipt/1)
      {"run": bstr(16), "kind": "model" / "final", "lap": uint, "hop": uint,
       "from": bstr(38), "by": bstr(38), "digest": bstr(32)}
    final seal   (domain fedup-final-seal, type fedup/final-seal/2)
      {"run": bstr(16), "origin": bstr(38), "content": bstr(32), "model": bstr(32)}
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal, TypeAlias

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Signer, open_envelope, seal_envelope
from fedup.protocol.laps import Position
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import NOTICE_TYPE as RETURN_TYPE
from fedup.protocol.returns import (
    ReturnError,
    ReturnNotice,
    ReturnRequest,
    entry_digest,
    max_chain_notices,
)
from fedup.protocol.ring import Ring
from fedup.protocol.schema import FieldReader

__all__ = [
    "ChainNotice",
    "CustodyReceipt",
    "DeadChain",
    "DeadNotice",
    "FinalSeal",
    "NoticeError",
    "ReceiptError",
    "SealError",
    "chain_genesis",
]

NOTICE_DOMAIN = "fedup-dead-notice"
NOTICE_TYPE = "fedup/dead-notice/1"
RECEIPT_DOMAIN = "fedup-custody-receipt"
RECEIPT_TYPE = "fedup/custody-receipt/1"
MAX_SIGNED_SIZE = 1024
"""Largest notice or receipt envelope (each is about 300 bytes)."""
DIGEST_SIZE = 32
RUN_ID_SIZE = 16

DeathCause: TypeAlias = Literal["unreachable", "timed-out"]
CAUSES: tuple[DeathCause, ...] = ("unreachable", "timed-out")


class NoticeError(RemoteProtocolError):
    """A dead notice or chain that is forged, out of place, or names whom it may not."""

    code = RefusalCode.BAD_CLAIM


class ReceiptError(RemoteProtocolError):
    """A custody receipt that does not verify or does not fit the hand-over."""

    code = RefusalCode.MALFORMED


def _digest(data: bytes, person: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=person).digest()


def chain_genesis(view_digest: bytes) -> bytes:
    """What notice 0 names as its predecessor: a digest of the view the run trains under."""
    return _digest(view_digest, b"fedup-dead-gen")


@attrs.frozen
class DeadNotice:
    """A verified dead notice and the exact envelope bytes that carried it."""

    run_id: bytes
    index: int
    """Its place in the run's chain (0 first)."""
    prev: bytes
    """The digest of the notice before it (or of the view, for notice 0)."""
    claimer: PeerId
    """Who signed it: the dead member's predecessor."""
    dead: PeerId
    cause: DeathCause
    at: Position
    """The position the claimer was handing on when it gave up."""
    envelope: bytes

    @property
    def subject(self) -> PeerId:
        """The member this notice is about."""
        return self.dead

    @property
    def digest(self) -> bytes:
        """What the next notice names as ``prev``."""
        return entry_digest(self.envelope)

    def describe(self) -> str:
        return f"{self.claimer} declared {self.dead} dead ({self.cause}) at {self.at}"

    @classmethod
    def seal(
        cls,
        signer: Signer,
        *,
        run_id: bytes,
        index: int,
        prev: bytes,
        dead: PeerId,
        cause: DeathCause,
        at: Position,
    ) -> DeadNotice:
        payload = cbor.encode(
            {
                "run": run_id,
                "index": index,
                "prev": prev,
                "by": signer.peer_id.raw,
                "dead": dead.raw,
                "why": cause,
                "at": [at.lap, at.hop],
            }
        )
        envelope = seal_envelope(
            signer.sign,
            signer.public_key,
            domain=NOTICE_DOMAIN,
            payload_type=NOTICE_TYPE,
            payload=payload,
        ).to_cbor()
        return cls(run_id, index, prev, signer.peer_id, dead, cause, at, envelope)

    @classmethod
    def open(
        cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS, max_index: int | None = None
    ) -> DeadNotice:
        """Verify the signature and decode the fields; raises :class:`NoticeError`.

        The notice's place in a chain is :meth:`DeadChain.extend_with`'s to check.
        """
        if max_index is None:
            max_index = max_chain_notices(limits.max_members, limits)
        try:
            envelope = open_envelope(
                data, domain=NOTICE_DOMAIN, payload_type=NOTICE_TYPE, max_size=MAX_SIGNED_SIZE
            )
            f = FieldReader(
                cbor.decode(envelope.payload, max_size=MAX_SIGNED_SIZE, max_depth=2),
                "dead notice",
            )
            run_id = f.bytestr("run", size=RUN_ID_SIZE)
            index = f.uint("index", max_value=max_index)
            prev = f.bytestr("prev", size=DIGEST_SIZE)
            claimer = PeerId.from_bytes(f.bytestr("by", size=RAW_SIZE))
            dead = PeerId.from_bytes(f.bytestr("dead", size=RAW_SIZE))
            cause = f.text("why", max_bytes=16)
            at = f.array("at", _uint_item, max_items=2, min_items=2)
            f.done()
        except RemoteProtocolError as exc:
            raise NoticeError(f"dead notice: {exc.reason}") from None
        if cause not in CAUSES:
            raise NoticeError(f"dead notice: cause {cause!r} is not one of {', '.join(CAUSES)}")
        if envelope.signer != claimer:
            raise NoticeError(f"dead notice names {claimer} but is signed by {envelope.signer}")
        position = Position(at[0], at[1])
        return cls(run_id, index, prev, claimer, dead, cause, position, bytes(data))


def _uint_item(value: object, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise NoticeError(f"{label} must be an unsigned 32-bit integer")
    return value


ChainNotice: TypeAlias = DeadNotice | ReturnNotice
"""An entry of a run's chain: a member declared dead, or a member taken back."""


def open_chain_notice(data: bytes, *, max_index: int, limits: Limits) -> ChainNotice:
    """Verify and decode one chain entry of either kind; raises :class:`NoticeError`."""
    try:
        fields = cbor.decode(data, max_size=MAX_SIGNED_SIZE, max_depth=1)
    except RemoteProtocolError as exc:
        raise NoticeError(f"dead notice: {exc.reason}") from None
    if isinstance(fields, dict) and fields.get("type") == RETURN_TYPE:
        try:
            return ReturnNotice.open(data, max_index=max_index)
        except ReturnError as exc:
            raise NoticeError(exc.reason) from None
    return DeadNotice.open(data, limits=limits, max_index=max_index)


def majority(members: int) -> int:
    """The fewest live members that are a majority of a view of ``members``."""
    return members // 2 + 1


def dead_after(members: Sequence[PeerId], notices: Sequence[ChainNotice]) -> frozenset[PeerId]:
    """The members counted as dead after ``notices``, in order (a return undoes a death)."""
    dead: set[PeerId] = set()
    for n in notices:
        if isinstance(n, DeadNotice):
            dead.add(n.dead)
        else:
            dead.discard(n.back)
    return frozenset(dead)


@attrs.frozen
class DeadChain:
    """The members a run counts as dead, as the chain of notices that made them so:
    dead notices, and return notices that take a member back
    (:mod:`fedup.protocol.returns`)."""

    run_id: bytes
    view_digest: bytes
    members: tuple[PeerId, ...]
    """The view's members in ring order."""
    notices: tuple[ChainNotice, ...] = ()
    _ring: Ring = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(
            self, "_ring", Ring(self.members, dead_after(self.members, self.notices))
        )

    @property
    def dead(self) -> frozenset[PeerId]:
        return self._ring.dead

    @property
    def ring(self) -> Ring:
        """The ring with these dead (built once per chain: custody asks it often)."""
        return self._ring

    @property
    def head(self) -> bytes:
        """The digest the next notice must name."""
        return self.notices[-1].digest if self.notices else chain_genesis(self.view_digest)

    @property
    def envelopes(self) -> tuple[bytes, ...]:
        return tuple(n.envelope for n in self.notices)

    def __len__(self) -> int:
        return len(self.notices)

    def notice_about(self, peer: PeerId) -> DeadNotice | None:
        """The notice that counts ``peer`` as dead now (None while it is live)."""
        if peer not in self._ring.dead:
            return None
        for n in reversed(self.notices):
            if isinstance(n, DeadNotice) and n.dead == peer:
                return n
        return None  # pragma: no cover - a dead member always has its notice

    def was_dead(self, peer: PeerId) -> bool:
        """Whether any notice ever declared ``peer`` dead (even if it was taken back)."""
        return any(isinstance(n, DeadNotice) and n.dead == peer for n in self.notices)

    def returns_of(self, peer: PeerId) -> tuple[ReturnNotice, ...]:
        """The return notices that took ``peer`` back, in order."""
        return tuple(n for n in self.notices if isinstance(n, ReturnNotice) and n.back == peer)

    @property
    def has_majority(self) -> bool:
        """Whether a majority of the view is live in this chain."""
        return len(self.ring.live) >= majority(len(self.members))

    def keeps_majority(self) -> bool:
        """Whether one more death would still leave a majority of the view live: a
        minority (one side of a partition) never counts the rest as dead, so it can
        never end the run as the federation's (docs/reliability.md)."""
        return len(self.ring.live) - 1 >= majority(len(self.members))

    def claim(self, signer: Signer, cause: DeathCause, at: Position) -> DeadChain:
        """The chain with a notice, signed by ``signer``, that its successor is dead.

        Raises :class:`~fedup.errors.LocalProtocolError` if ``signer`` is dead or
        has no other live member to name.  (Custody claims only while
        :meth:`keeps_majority`, and takes no model whose chain lost the majority.)
        """
        ring = self.ring
        me = signer.peer_id
        if me in ring.dead or me not in ring.members:
            raise LocalProtocolError(f"{me} is not a live member and cannot declare anyone dead")
        if len(ring.live) < 2:
            raise LocalProtocolError("no other live member to declare dead")

        notice = DeadNotice.seal(
            signer,
            run_id=self.run_id,
            index=len(self.notices),
            prev=self.head,
            dead=ring.successor(me),
            cause=cause,
            at=at,
        )
        return attrs.evolve(self, notices=(*self.notices, notice))

    def may_take_back(
        self, claimer: PeerId, request: ReturnRequest, *, limits: Limits = DEFAULT_LIMITS
    ) -> str | None:
        """Why ``claimer`` may not take ``request``'s member back now (None: it may)."""
        ring = self.ring
        back = request.peer
        if request.run_id != self.run_id:
            return f"the request is for run {request.run_id.hex()[:8]}"
        if claimer not in ring.members or back not in ring.members:
            return "it names a peer that is not a member"
        if claimer in ring.dead:
            return f"{claimer} is dead and cannot take anyone back"
        if back not in ring.dead:
            return f"{back} is not counted as dead"
        earlier = self.returns_of(back)
        if len(earlier) >= limits.max_returns:
            return f"{back} came back {len(earlier)} times already (Limits.max_returns)"
        if earlier and request.counter <= earlier[-1].request.counter:
            return (
                f"{back}'s request {request.counter} is not newer than the one used before "
                f"({earlier[-1].request.counter})"
            )
        with_back = Ring(self.members, ring.dead - {back})
        if with_back.successor(claimer) != back:
            return f"only {back}'s live predecessor takes it back, not {claimer}"
        return None

    def take_back(
        self,
        signer: Signer,
        request: ReturnRequest,
        at: Position,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> DeadChain:
        """The chain with a return notice, signed by ``signer``, that takes ``request``'s
        member back; raises :class:`~fedup.errors.LocalProtocolError` if it may not."""
        problem = self.may_take_back(signer.peer_id, request, limits=limits)
        if problem is not None:
            raise LocalProtocolError(f"cannot take {request.peer} back: {problem}")
        notice = ReturnNotice.seal(
            signer,
            run_id=self.run_id,
            index=len(self.notices),
            prev=self.head,
            request=request,
            at=at,
        )
        return attrs.evolve(self, notices=(*self.notices, notice))

    def extend_with(
        self,
        envelopes: Sequence[bytes],
        *,
        receiver: PeerId | None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> DeadChain:
        """The chain a blob carries, checked against this one (which it must extend).

        The first ``len(self)`` envelopes must be this chain's, byte for byte;
        each further one must verify and fit its place: this run, the next
        index, the previous digest, a live member claiming its own successor
        in the ring of the notices before it (or taking back the dead member it
        precedes, :meth:`may_take_back`), and the whole chain must leave
        ``receiver`` live (pass None when a chain counting the receiver as dead
        is acceptable, as in a final model sent to a member counted as dead).
        Only the new notices' signatures are checked.  Raises
        :class:`NoticeError` naming the first problem; :class:`ChainBehindError`
        (a subclass) when ``envelopes`` is a proper prefix of this chain: the
        sender has not learnt of some deaths this member knows of.
        """
        bound = max_chain_notices(len(self.members), limits)
        if len(envelopes) > bound:
            raise NoticeError(
                f"chain of {len(envelopes)} notices for a view of {len(self.members)} "
                f"(at most {bound})"
            )
        mine = self.envelopes
        shared = min(len(mine), len(envelopes))
        for i in range(shared):
            if envelopes[i] != mine[i]:
                raise NoticeError(f"dead chain differs from ours at notice {i}")
        if len(envelopes) < len(mine):
            raise ChainBehindError(
                f"dead chain of {len(envelopes)} notices is behind ours ({len(mine)})",
                missing=self.notices[len(envelopes) :],
            )
        chain = self
        for data in envelopes[len(mine) :]:
            notice = open_chain_notice(bytes(data), max_index=bound, limits=limits)
            chain._check_next(notice, limits)
            chain = attrs.evolve(chain, notices=(*chain.notices, notice))
        if receiver is not None and len(chain) > len(self) and receiver in chain.dead:
            last = chain.notice_about(receiver)
            assert last is not None
            raise NoticeError(
                f"dead notice {last.index} declares the receiver itself dead ({last.describe()})"
            )
        return chain

    def _check_next(self, notice: ChainNotice, limits: Limits) -> None:
        kind = "return" if isinstance(notice, ReturnNotice) else "dead"
        where = f"{kind} notice {len(self.notices)}"
        if notice.run_id != self.run_id:
            raise NoticeError(f"{where} is for run {notice.run_id.hex()[:8]}")
        if notice.index != len(self.notices) or notice.prev != self.head:
            raise NoticeError(f"{where} is out of place in the chain (index {notice.index})")
        if isinstance(notice, ReturnNotice):
            problem = self.may_take_back(notice.claimer, notice.request, limits=limits)
            if problem is not None:
                raise NoticeError(f"{where} ({notice.describe()}): {problem}")
            return
        ring = self.ring
        if notice.claimer not in ring.members or notice.dead not in ring.members:
            raise NoticeError(f"{where} names a peer that is not a member")
        if notice.claimer in ring.dead:
            raise NoticeError(f"{where} is by {notice.claimer}, which was already dead")
        if notice.dead in ring.dead:
            raise NoticeError(f"{where} names {notice.dead}, which was already dead")

        if notice.dead == notice.claimer or notice.dead != ring.successor(notice.claimer):
            raise NoticeError(
                f"{where}: {notice.claimer} may only declare its own successor "
                f"{ring.successor(notice.claimer)} dead, not {notice.dead}"
            )


class ChainBehindError(NoticeError):
    """A blob's dead chain is a proper prefix of ours: its sender is behind."""

    def __init__(self, reason: str, *, missing: tuple[ChainNotice, ...]) -> None:
        super().__init__(reason)
        self.missing = missing


@attrs.frozen
class CustodyReceipt:
    """A member's signed statement that it took a blob (sent back in the blob's ACK)."""

    run_id: bytes
    kind: Literal["model", "final"]
    position: Position
    sender: PeerId
    """Who handed the blob over."""
    taker: PeerId
    """Who took it (and signed this)."""
    digest: bytes
    """The blob's digest."""
    envelope: bytes

    @classmethod
    def seal(
        cls,
        signer: Signer,
        *,
        run_id: bytes,
        kind: Literal["model", "final"],
        position: Position,
        sender: PeerId,
        digest: bytes,
    ) -> CustodyReceipt:
        payload = cbor.encode(
            {
                "run": run_id,
                "kind": kind,
                "lap": position.lap,
                "hop": position.hop,
                "from": sender.raw,
                "by": signer.peer_id.raw,
                "digest": digest,
            }
        )
        envelope = seal_envelope(
            signer.sign,
            signer.public_key,
            domain=RECEIPT_DOMAIN,
            payload_type=RECEIPT_TYPE,
            payload=payload,
        ).to_cbor()
        return cls(run_id, kind, position, sender, signer.peer_id, digest, envelope)

    @classmethod
    def open(cls, data: bytes) -> CustodyReceipt:
        """Verify and decode a receipt; raises :class:`ReceiptError`."""
        try:
            envelope = open_envelope(
                data, domain=RECEIPT_DOMAIN, payload_type=RECEIPT_TYPE, max_size=MAX_SIGNED_SIZE
            )
            f = FieldReader(
                cbor.decode(envelope.payload, max_size=MAX_SIGNED_SIZE, max_depth=1),
                "custody receipt",
            )
            run_id = f.bytestr("run", size=RUN_ID_SIZE)
            kind = f.text("kind", max_bytes=8)
            lap = f.uint("lap", max_value=2**32 - 1)
            hop = f.uint("hop", max_value=2**32 - 1)
            sender = PeerId.from_bytes(f.bytestr("from", size=RAW_SIZE))
            taker = PeerId.from_bytes(f.bytestr("by", size=RAW_SIZE))
            digest = f.bytestr("digest", size=DIGEST_SIZE)
            f.done()
        except RemoteProtocolError as exc:
            raise ReceiptError(f"custody receipt: {exc.reason}") from None
        if kind not in ("model", "final"):
            raise ReceiptError(f"custody receipt: kind {kind!r}")
        if envelope.signer != taker:
            raise ReceiptError(f"custody receipt names {taker} but is signed by {envelope.signer}")
        return cls(run_id, kind, Position(lap, hop), sender, taker, digest, bytes(data))  # type: ignore[arg-type]


SEAL_DOMAIN = "fedup-final-seal"
SEAL_TYPE = "fedup/final-seal/2"


class SealError(RemoteProtocolError):
    """A final model's seal that does not verify or does not fit the final model."""

    code = RefusalCode.NOT_FINAL


@attrs.frozen
class FinalSeal:
    """The member whose hop ended the run signs the final state's content digest and
    the SHA-256 of the model file every member saves from it.

    Every member forwards the final model's bytes unchanged, so a member on the
    way cannot swap the weights (or the metadata) of the model the others save;
    the file's digest ties ``model.safetensors`` to the last statement of the
    model's provenance (:mod:`fedup.protocol.provenance`).
    """

    run_id: bytes
    origin: PeerId
    """The member whose hop ended the run (it signed this)."""
    content: bytes
    """The digest of the final state's tensors and metadata (the learning layer's)."""
    model: bytes
    """SHA-256 of ``model.safetensors`` as every member writes it from the final state."""
    envelope: bytes

    @classmethod
    def seal(cls, signer: Signer, *, run_id: bytes, content: bytes, model: bytes) -> FinalSeal:
        if len(content) != DIGEST_SIZE or len(model) != DIGEST_SIZE:
            raise LocalProtocolError("a final seal signs two 32-byte digests")
        payload = cbor.encode(
            {"run": run_id, "origin": signer.peer_id.raw, "content": content, "model": model}
        )
        envelope = seal_envelope(
            signer.sign,
            signer.public_key,
            domain=SEAL_DOMAIN,
            payload_type=SEAL_TYPE,
            payload=payload,
        ).to_cbor()
        return cls(run_id, signer.peer_id, content, model, envelope)

    @classmethod
    def open(cls, data: bytes) -> FinalSeal:
        """Verify and decode a seal; raises :class:`SealError`."""
        try:
            envelope = open_envelope(
                data, domain=SEAL_DOMAIN, payload_type=SEAL_TYPE, max_size=MAX_SIGNED_SIZE
            )
            f = FieldReader(
                cbor.decode(envelope.payload, max_size=MAX_SIGNED_SIZE, max_depth=1), "final seal"
            )
            run_id = f.bytestr("run", size=RUN_ID_SIZE)
            origin = PeerId.from_bytes(f.bytestr("origin", size=RAW_SIZE))
            content = f.bytestr("content", size=DIGEST_SIZE)
            model = f.bytestr("model", size=DIGEST_SIZE)
            f.done()
        except RemoteProtocolError as exc:
            raise SealError(f"final seal: {exc.reason}") from None
        if envelope.signer != origin:
            raise SealError(f"final seal names {origin} but is signed by {envelope.signer}")
        return cls(run_id, origin, content, model, bytes(data))
