"""The ring all-reduce's values: the chunk plan, the schedule, the message and its checks,
and the events and actions of the machine (:mod:`fedup.protocol.allreduce`).

Pure: no I/O, no clocks.  :mod:`fedup.protocol.allreduce` is the machine that uses
them; ``docs/parallel.md`` is the specification.  In short:

* **Chunk plan.**  A vector of ``length`` float32 elements is split into ``n``
  contiguous chunks; chunk ``c`` has ``length // n`` elements, plus one when
  ``c < length % n`` (sizes differ by at most one; a chunk may be empty when
  ``length < n``).  Member ``i`` (its index in ring order) owns chunk ``i``: it
  finishes that chunk's sum and signs it.
* **Schedule.**  Each member receives ``2 (n - 1)`` messages from its ring
  predecessor, in a fixed sequence ``k = 0 .. 2n - 3``: reduce-scatter steps
  ``s = k`` for ``k < n - 1``, then all-gather steps ``s = k - (n - 1)``.  At
  reduce-scatter step ``s`` member ``i`` sends chunk ``(i - s - 1) mod n`` and
  receives chunk ``(i - s - 2) mod n``; at all-gather step ``s`` it sends chunk
  ``(i - s) mod n`` and receives chunk ``(i - s - 1) mod n``.
* **Message.**  One strict CBOR map (:class:`ChunkMessage`); its ``data`` is the
  chunk's raw little-endian float32 bytes, exactly ``4 x`` the chunk's elements.
  All-gather messages carry ``sig``, the chunk owner's Ed25519 signature of a
  :func:`chunk_statement` over the chunk's final bytes; forwarders pass it on.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any, ClassVar, TypeAlias

import attrs
import nacl.exceptions
import nacl.signing
import numpy as np

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import SIGNATURE_SIZE, Signer, signed_bytes
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.schema import FieldReader
from fedup.protocol.view import RUN_ID_SIZE

__all__ = [
    "ELEMENT_SIZE",
    "MESSAGE_OVERHEAD",
    "MESSAGE_TYPE",
    "Abandon",
    "Action",
    "Begin",
    "CancelTimer",
    "ChunkMessage",
    "ChunkMessageError",
    "ChunkPlan",
    "Context",
    "Done",
    "Event",
    "Failed",
    "FailureKind",
    "Ignored",
    "MessageArrived",
    "Phase",
    "Reduce",
    "Reduced",
    "Refusal",
    "Refused",
    "Send",
    "SetTimer",
    "Stage",
    "Status",
    "Store",
    "TimerFired",
    "chunk_digest",
    "chunk_statement",
    "decode_chunk_message",
    "is_finite",
    "result_digest",
    "ring_digest",
    "sign_chunk",
    "verify_chunk",
]

ELEMENT_SIZE = 4
"""Bytes per element: float32, little-endian."""
MESSAGE_TYPE = "allreduce"
"""The ``t`` field of every all-reduce message."""
MESSAGE_OVERHEAD = 256
"""Bytes of a message besides its payload: every field at its largest (64-bit
integers, the signature) takes 199 bytes; a message longer than this plus the
largest chunk is refused before it is decoded."""
DIGEST_SIZE = 32
STATEMENT_DOMAIN = "fedup-allreduce-chunk"
STATEMENT_TYPE = "fedup/allreduce-chunk/1"
_CHUNK_PERSON = b"fedup-ar-chunk"
_RESULT_PERSON = b"fedup-ar-result"
_RING_PERSON = b"fedup-ar-ring"
_F32 = np.dtype("<f4")


class Phase(enum.Enum):
    """The two phases of a ring all-reduce (wire form: the value)."""

    REDUCE_SCATTER = "rs"
    ALL_GATHER = "ag"


class Refusal(enum.Enum):
    """Why a member refused an all-reduce message (wire form: the value).

    :attr:`code` maps each to the project's :class:`~fedup.protocol.refusal.RefusalCode`
    for a refusal sent back on the wire.
    """

    NOT_MEMBER = "not-member"
    """The sender is not in this attempt's member list."""
    NOT_PREDECESSOR = "not-predecessor"
    """The sender is a member but not this member's ring predecessor."""
    MALFORMED = "malformed"
    """Not strict CBOR, or a missing, unknown or ill-typed field."""
    TOO_LARGE = "too-large"
    """The message is longer than ``MESSAGE_OVERHEAD`` plus the largest chunk (refused
    before it is decoded)."""
    BAD_SIZE = "bad-size"
    """The payload is not exactly the expected chunk's byte length."""
    WRONG_RUN = "wrong-run"
    WRONG_EPOCH = "wrong-epoch"
    WRONG_ROUND = "wrong-round"
    WRONG_ATTEMPT = "wrong-attempt"
    OUT_OF_ORDER = "out-of-order"
    """Another (phase, step, chunk) than the next one expected from the predecessor."""
    DUPLICATE = "duplicate"
    """A (phase, step, chunk) already taken from the predecessor."""
    NOT_FINITE = "not-finite"
    """The payload holds NaN or an infinity."""
    BAD_SIGNATURE = "bad-signature"
    """An all-gather chunk whose owner's signature does not verify over its bytes
    (forged, or altered by a forwarder)."""
    FINISHED = "finished"
    """The machine has ended (done or failed): it takes nothing more."""

    @property
    def code(self) -> RefusalCode:
        """The project-wide refusal code for this refusal."""
        return _CODES[self]


_CODES = {
    Refusal.NOT_MEMBER: RefusalCode.NOT_MEMBER,
    Refusal.NOT_PREDECESSOR: RefusalCode.OUT_OF_TURN,
    Refusal.MALFORMED: RefusalCode.MALFORMED,
    Refusal.TOO_LARGE: RefusalCode.TOO_LARGE,
    Refusal.BAD_SIZE: RefusalCode.MALFORMED,
    Refusal.WRONG_RUN: RefusalCode.WRONG_RUN,
    Refusal.WRONG_EPOCH: RefusalCode.STALE,
    Refusal.WRONG_ROUND: RefusalCode.STALE,
    Refusal.WRONG_ATTEMPT: RefusalCode.STALE,
    Refusal.OUT_OF_ORDER: RefusalCode.OUT_OF_TURN,
    Refusal.DUPLICATE: RefusalCode.STALE,
    Refusal.NOT_FINITE: RefusalCode.BAD_STATE,
    Refusal.BAD_SIGNATURE: RefusalCode.MALFORMED,
    Refusal.FINISHED: RefusalCode.FINISHED,
}


# --- the chunk plan and the schedule ------------------------------------------------------


@attrs.frozen
class ChunkPlan:
    """How a vector of ``length`` float32 elements is cut into ``members`` chunks."""

    length: int
    """Elements in the whole vector (at least 1)."""
    members: int
    """Number of chunks: one per member (at least 1)."""

    def __attrs_post_init__(self) -> None:
        if self.length < 1 or self.members < 1:
            raise LocalProtocolError("a chunk plan needs at least one element and one member")

    def size(self, chunk: int) -> int:
        """Elements in ``chunk``: ``length // members``, plus one for the first
        ``length % members`` chunks."""
        base, extra = divmod(self.length, self.members)
        return base + (1 if chunk < extra else 0)

    def span(self, chunk: int) -> tuple[int, int]:
        """Element indices ``[start, stop)`` of ``chunk`` in the vector."""
        if not 0 <= chunk < self.members:
            raise LocalProtocolError(f"chunk {chunk} is outside 0..{self.members - 1}")
        base, extra = divmod(self.length, self.members)
        start = chunk * base + min(chunk, extra)
        return start, start + self.size(chunk)

    def nbytes(self, chunk: int) -> int:
        """Exact payload bytes of ``chunk``."""
        return ELEMENT_SIZE * self.size(chunk)

    @property
    def max_nbytes(self) -> int:
        """Payload bytes of the largest chunk (chunk 0)."""
        return self.nbytes(0)

    @property
    def messages(self) -> int:
        """Messages each member receives (and sends) in one all-reduce: ``2 (n - 1)``."""
        return 2 * (self.members - 1)

    def step_of(self, k: int) -> tuple[Phase, int]:
        """The (phase, step) of the ``k``-th message of the sequence."""
        rs_steps = self.members - 1
        if k < rs_steps:
            return Phase.REDUCE_SCATTER, k
        return Phase.ALL_GATHER, k - rs_steps

    def index_of(self, phase: Phase, step: int) -> int | None:
        """The place of (phase, step) in the sequence, None if there is no such step."""
        if not 0 <= step < self.members - 1:
            return None
        return step if phase is Phase.REDUCE_SCATTER else self.members - 1 + step

    def sent_chunk(self, me: int, k: int) -> int:
        """The chunk member ``me`` sends as its ``k``-th message."""
        phase, step = self.step_of(k)
        shift = step + 1 if phase is Phase.REDUCE_SCATTER else step
        return (me - shift) % self.members

    def received_chunk(self, me: int, k: int) -> int:
        """The chunk member ``me`` receives as its ``k``-th message (what its predecessor
        sends as its own ``k``-th)."""
        return self.sent_chunk((me - 1) % self.members, k)


# --- digests and the owner's signature ----------------------------------------------------


def chunk_digest(payload: bytes) -> bytes:
    """BLAKE2b-256 (person ``fedup-ar-chunk``) of a chunk's final bytes."""
    return hashlib.blake2b(payload, digest_size=DIGEST_SIZE, person=_CHUNK_PERSON).digest()


def result_digest(digests: list[bytes]) -> bytes:
    """BLAKE2b-256 (person ``fedup-ar-result``) of every final chunk's digest, in chunk
    order: equal at every member exactly when their results are bit-identical."""
    return hashlib.blake2b(
        b"".join(digests), digest_size=DIGEST_SIZE, person=_RESULT_PERSON
    ).digest()


def ring_digest(members: tuple[PeerId, ...]) -> bytes:
    """BLAKE2b-256 (person ``fedup-ar-ring``) of the members' raw IDs in ring order."""
    data = b"".join(m.raw for m in members)
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=_RING_PERSON).digest()


@attrs.frozen
class Context:
    """What identifies one all-reduce attempt (the same at every member)."""

    run_id: bytes
    epoch: int
    round: int
    attempt: int
    ring: bytes
    """:func:`ring_digest` of the members."""
    length: int
    """Elements in the vector."""


def chunk_statement(context: Context, chunk: int, digest: bytes) -> bytes:
    """The bytes an owner signs for its final ``chunk`` (CBOR, then the envelope's
    domain-separated framing: domain ``fedup-allreduce-chunk``, type
    ``fedup/allreduce-chunk/1``)."""
    payload = cbor.encode(
        {
            "run": context.run_id,
            "epoch": context.epoch,
            "round": context.round,
            "attempt": context.attempt,
            "ring": context.ring,
            "len": context.length,
            "chunk": chunk,
            "digest": digest,
        }
    )
    return signed_bytes(STATEMENT_DOMAIN.encode(), STATEMENT_TYPE.encode(), payload)


def sign_chunk(signer: Signer, context: Context, chunk: int, payload: bytes) -> bytes:
    """The owner's 64-byte signature over its final ``chunk``."""
    signature = signer.sign(chunk_statement(context, chunk, chunk_digest(payload)))
    if len(signature) != SIGNATURE_SIZE:
        raise LocalProtocolError("sign() must return a 64-byte signature")
    return signature


def verify_chunk(
    owner: nacl.signing.VerifyKey, context: Context, chunk: int, digest: bytes, signature: bytes
) -> bool:
    """Whether ``signature`` is ``owner``'s over ``chunk`` with final-bytes ``digest``."""
    try:
        owner.verify(chunk_statement(context, chunk, digest), signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def is_finite(payload: bytes) -> bool:
    """Whether every float32 in ``payload`` is finite (numpy, one pass, no copy)."""
    values = np.frombuffer(payload, dtype=_F32)
    return bool(np.isfinite(values).all())


# --- the message ------------------------------------------------------------------------


@attrs.frozen
class ChunkMessage:
    """One chunk on its way round the ring."""

    TYPE: ClassVar[str] = MESSAGE_TYPE
    run_id: bytes
    epoch: int
    round: int
    attempt: int
    phase: Phase
    step: int
    chunk: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    """The chunk's raw little-endian float32 bytes (a partial sum in reduce-scatter, the
    final sum in all-gather)."""
    signature: bytes | None = None
    """All-gather only: the chunk owner's signature (:func:`sign_chunk`)."""

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "t": self.TYPE,
            "run": self.run_id,
            "epoch": self.epoch,
            "round": self.round,
            "attempt": self.attempt,
            "phase": self.phase.value,
            "step": self.step,
            "chunk": self.chunk,
            "data": self.data,
        }
        if self.signature is not None:
            fields["sig"] = self.signature
        return cbor.encode(fields)


class ChunkMessageError(RemoteProtocolError):
    """Bytes that are not an all-reduce message (``refusal`` says which kind of no)."""

    def __init__(self, reason: str, refusal: Refusal) -> None:
        super().__init__(reason)
        self.refusal = refusal


def decode_chunk_message(data: bytes, *, max_payload: int) -> ChunkMessage:
    """Decode one message; the size is checked first, before anything is decoded.

    Raises :class:`ChunkMessageError` with :attr:`Refusal.TOO_LARGE` when ``data`` is
    longer than ``MESSAGE_OVERHEAD + max_payload``, :attr:`Refusal.BAD_SIZE` when its
    payload is longer than ``max_payload``, and :attr:`Refusal.MALFORMED` for anything
    that is not exactly one map of the fields below (strict CBOR, no unknown field;
    ``sig`` present exactly in all-gather).  The payload's exact length and every value
    are the machine's to check.
    """
    limit = MESSAGE_OVERHEAD + max_payload
    if len(data) > limit:
        raise ChunkMessageError(
            f"message of {len(data)} bytes exceeds the {limit} any chunk allows", Refusal.TOO_LARGE
        )
    try:
        f = FieldReader(cbor.decode(data, max_size=limit, max_depth=1), "allreduce message")
        kind = f.text("t", max_bytes=16)
        if kind != MESSAGE_TYPE:
            raise f.fail("t", f"is {kind!r}, expected {MESSAGE_TYPE!r}")
        run_id = f.bytestr("run", size=RUN_ID_SIZE)
        epoch, round_, attempt = f.uint("epoch"), f.uint("round"), f.uint("attempt")
        phase_text = f.text("phase", max_bytes=2)
        try:
            phase = Phase(phase_text)
        except ValueError:
            raise f.fail("phase", f"is {phase_text!r}, expected 'rs' or 'ag'") from None
        step, chunk = f.uint("step"), f.uint("chunk")
        payload = f.bytestr("data")
        signature = None
        if phase is Phase.ALL_GATHER:
            signature = f.bytestr("sig", size=SIGNATURE_SIZE)
        f.done()
    except RemoteProtocolError as exc:
        raise ChunkMessageError(exc.reason, Refusal.MALFORMED) from None
    if len(payload) > max_payload:
        raise ChunkMessageError(
            f"payload of {len(payload)} bytes exceeds the largest chunk ({max_payload})",
            Refusal.BAD_SIZE,
        )
    return ChunkMessage(run_id, epoch, round_, attempt, phase, step, chunk, payload, signature)


# --- what goes into the machine and what comes out (fedup.protocol.allreduce) ------------


class Stage(enum.Enum):
    READY = "ready"
    REDUCING = "reducing"
    GATHERING = "gathering"
    DONE = "done"
    FAILED = "failed"


class FailureKind(enum.Enum):
    TIMEOUT = "timeout"
    """The predecessor sent nothing for the expected step within the deadline."""
    OVERFLOW = "overflow"
    """A sum the driver made holds NaN or an infinity."""
    ABANDONED = "abandoned"
    """The driver gave the attempt up (:class:`Abandon`)."""


# --- events -----------------------------------------------------------------------------


@attrs.frozen
class Begin:
    """This member trained: ``local`` is its own part of :attr:`AllReduceMachine.first_chunk`
    (the whole vector when it is alone)."""

    local: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class MessageArrived:
    """``data`` came from ``sender`` (the peer the encrypted channel authenticated)."""

    sender: PeerId
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class Reduced:
    """The driver's answer to :class:`Reduce`: ``data`` = received + its own part."""

    chunk: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class TimerFired:
    """The timer asked for with :class:`SetTimer` fired."""


@attrs.frozen
class Abandon:
    """The driver gives this attempt up (it learnt the attempt is void)."""

    reason: str


Event: TypeAlias = Begin | MessageArrived | Reduced | TimerFired | Abandon


# --- actions ----------------------------------------------------------------------------


@attrs.frozen
class Send:
    """Send ``data`` (one encoded message) to ``to``, this member's ring successor."""

    to: PeerId
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    phase: Phase
    step: int
    chunk: int


@attrs.frozen
class Reduce:
    """Add this member's own elements ``[start, stop)`` to ``received`` (the predecessor's
    partial sum of ``chunk``, as ``received + own``, in float32) and answer with
    :class:`Reduced`."""

    chunk: int
    start: int
    stop: int
    received: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class Store:
    """``data`` is the final sum of ``chunk``: elements ``[start, stop)`` of the result."""

    chunk: int
    start: int
    stop: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")


@attrs.frozen
class SetTimer:
    """Fire :class:`TimerFired` at time ``at`` (replaces this machine's previous timer)."""

    at: float


@attrs.frozen
class CancelTimer:
    """Drop this machine's timer."""


@attrs.frozen
class Refused:
    """A message from ``peer`` was refused; nothing changed."""

    peer: PeerId
    refusal: Refusal
    reason: str


@attrs.frozen
class Ignored:
    """An event that means nothing now (a stale timer, an event after the end)."""

    event: str
    why: str


@attrs.frozen
class Done:
    """Every chunk is stored; ``digest`` (:func:`result_digest`) is equal at every member."""

    digest: bytes


@attrs.frozen
class Failed:
    """The attempt ended without a result here."""

    kind: FailureKind
    reason: str
    peer: PeerId | None = None
    """For a timeout: the silent predecessor."""
    phase: Phase | None = None
    step: int | None = None


Action: TypeAlias = (
    Send | Reduce | Store | SetTimer | CancelTimer | Refused | Ignored | Done | Failed
)


@attrs.frozen
class Status:
    """Everything that changes in a machine (equal before and after a refused message)."""

    stage: Stage
    accepted: int
    """Messages taken from the predecessor (worked on or queued)."""
    worked: int
    """Messages worked on."""
    sent: int
    reducing: int | None
    """The chunk a :class:`Reduce` was asked for and not yet answered."""
    deadline: float | None
    stored: tuple[int, ...]
