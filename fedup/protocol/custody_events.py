"""What goes into the custody machine and what comes out: phases, events and actions.

Values only (frozen attrs classes); :mod:`fedup.protocol.custody` is the machine
that turns events into actions.  The trio driver feeds the events and carries
out the actions.
"""

from __future__ import annotations

import enum
from typing import Literal, TypeAlias

import attrs

from fedup.protocol.laps import Position, Progress
from fedup.protocol.notices import DeadNotice
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import ReturnNotice, ReturnRequest

BlobKind: TypeAlias = Literal["model", "final"]
INITIAL = Position(-1, -1)
"""The copy slot of the initial model (what the lowest member trains at lap 0 hop 0)."""
FINAL = Position(-2, -2)
"""The copy slot of the final model."""
RESUMED = Position(-3, -3)
"""The slot of the state a restarted member held when it stopped (it trains it again)."""


class Phase(enum.Enum):
    READY = "ready"
    WAITING = "waiting"
    TRAINING = "training"
    HANDING = "handing"
    EXCLUDED = "excluded"
    FINISHING = "finishing"
    DISTRIBUTING = "distributing"
    DONE = "done"
    FAILED = "failed"


# --- events --------------------------------------------------------------------------


@attrs.frozen
class Begin:
    """The view holds: training begins."""


@attrs.frozen
class BlobOffered:
    """A blob's signed header arrived (before its bytes): refuse early if it cannot fit."""

    sender: PeerId
    kind: BlobKind
    position: Position
    epoch: int


@attrs.frozen
class BlobArrived:
    """A whole blob arrived and decoded (signature, digest, layout and bounds checked)."""

    sender: PeerId
    kind: BlobKind
    position: Position
    epoch: int
    digest: bytes
    """The blob's digest (signed by its sender)."""
    view: bytes
    """The digest of the view the blob says it belongs to."""
    chain: tuple[bytes, ...]
    """The dead notices it carries, as envelopes."""
    progress: Progress
    origin: PeerId | None = None
    """A final model: the member whose hop ended the run."""
    seal: bytes | None = None
    """A final model: the origin's seal over ``content``."""
    content: bytes = b""
    """The digest of its tensors and metadata (the learning layer's): what the last hop
    statement must say was sent, and what a final model's seal covers."""
    provenance: bytes | memoryview = b""
    """The chain of hop statements it carries (:mod:`fedup.protocol.provenance`)."""
    model: bytes = b""
    """A final model: the SHA-256 of the model file the receiver would save from it."""


@attrs.frozen
class Trained:
    """The driver trained the model taken at ``position``; ``progress`` is the new state's."""

    position: Position
    progress: Progress
    good: bool = True
    """False when training produced a bad state and the driver kept the last good one."""
    content: bytes = attrs.field(kw_only=True)
    """The content digest of the state trained (what this member's hop statement says
    it sent)."""
    samples: int = attrs.field(kw_only=True)
    """Training samples the hop processed (0: it only evaluated)."""


@attrs.frozen
class TrainFailed:
    """Training raised (a bug in the task, out of memory): the run cannot go on here."""

    reason: str


class FailureKind(enum.Enum):
    UNREACHABLE = "unreachable"
    """Nothing listens there, or no connection could be made: the member is gone."""
    TIMED_OUT = "timed-out"
    """The hand-over did not complete within its deadline."""
    BROKEN = "broken"
    """The connection broke half-way: maybe the network's fault; worth a retry."""
    REFUSED = "refused"
    """The member answered no (a NACK with a code): it is alive."""


@attrs.frozen
class Failure:
    kind: FailureKind
    why: str
    code: RefusalCode | None = None
    proof: tuple[bytes, ...] = ()
    """For ``excluded``: the dead notices (envelopes) that name the sender."""


@attrs.frozen
class HandedOver:
    """Hand-over ``handover`` completed: ``target`` took the blob and signed ``receipt``."""

    handover: int
    receipt: bytes
    digest: bytes


@attrs.frozen
class HandOverFailed:
    handover: int
    failure: Failure


@attrs.frozen
class PassedArrived:
    """``sender`` says the model we gave it moved on, with its successor's receipt."""

    sender: PeerId
    receipt: bytes


@attrs.frozen
class TimerFired:
    name: str


@attrs.frozen
class FinalSaved:
    """The driver saved the final model (after :class:`Finish`)."""


@attrs.frozen
class ReturnAsked:
    """A member asks to be taken back (the driver verified that the request is signed
    by the member that sent it: :mod:`fedup.protocol.returns`)."""

    request: ReturnRequest


Event: TypeAlias = (
    Begin
    | BlobOffered
    | BlobArrived
    | Trained
    | TrainFailed
    | HandedOver
    | HandOverFailed
    | PassedArrived
    | TimerFired
    | FinalSaved
    | ReturnAsked
)


# --- actions -------------------------------------------------------------------------


@attrs.frozen
class Train:
    """Train hop ``position``, on the blob just taken or (``source``) on a kept slot."""

    position: Position
    source: Position | None = None
    """None: the blob just taken; ``INITIAL``: the initial model; else our own copy."""


@attrs.frozen
class Take:
    """Answer the blob: custody taken, here is our signed receipt."""

    receipt: bytes


@attrs.frozen
class Refuse:
    """Answer a blob (or report a message) as refused, naming the offender."""

    peer: PeerId
    code: RefusalCode
    reason: str
    proof: tuple[bytes, ...] = ()


@attrs.frozen
class Send:
    """Hand the state in slot ``copy`` to ``target`` as a blob (hand-over ``handover``)."""

    handover: int
    target: PeerId
    kind: BlobKind
    position: Position
    epoch: int
    chain: tuple[bytes, ...]
    copy: Position
    origin: PeerId | None = None
    seal: bytes | None = None
    provenance: bytes | memoryview = b""
    """The chain of hop statements the blob carries."""


@attrs.frozen
class TellPassed:
    """Tell ``to`` (whom we got the model from) that it moved on: forward ``receipt``."""

    to: PeerId
    receipt: bytes


@attrs.frozen
class Forget:
    """Drop the state kept in slot ``copy``."""

    copy: Position


@attrs.frozen
class Declared:
    """``notice`` is now part of the run's dead chain (ours or learnt from a blob)."""

    notice: DeadNotice
    ours: bool


@attrs.frozen
class Returned:
    """``notice`` (a member taken back) is now part of the run's chain."""

    notice: ReturnNotice
    ours: bool


@attrs.frozen
class AskToReturn:
    """Send ``request`` (this member's signed return request) to the members ``to``
    (None: every other member)."""

    request: bytes
    to: tuple[PeerId, ...] | None = None


@attrs.frozen
class Excluded:
    """The others count this member as dead (``notice`` proves it); it trains no more."""

    notice: DeadNotice


@attrs.frozen
class Finish:
    """Save the state in slot ``copy`` as the run's final model."""

    copy: Position
    reason: str
    """``converged``, ``max-laps`` or ``members-lost``."""
    ended_by: PeerId
    excluded: DeadNotice | None


@attrs.frozen
class Finished:
    """Nothing is left to do here; the run is over for this member."""


@attrs.frozen
class Failed:
    reason: str


@attrs.frozen
class SetTimer:
    name: str
    seconds: float


@attrs.frozen
class CancelTimer:
    name: str


@attrs.frozen
class Note:
    """Something worth a log line (``level``: ``info`` or ``warning``)."""

    level: Literal["info", "warning"]
    text: str


@attrs.frozen
class Ignored:
    """An event this phase does not take (a late outcome, a stale timer): nothing changed."""

    event: str
    phase: Phase
    why: str


Action: TypeAlias = (
    Train
    | Take
    | Refuse
    | Send
    | TellPassed
    | Forget
    | Declared
    | Returned
    | AskToReturn
    | Excluded
    | Finish
    | Finished
    | Failed
    | SetTimer
    | CancelTimer
    | Note
    | Ignored
)
