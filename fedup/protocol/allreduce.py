"""One ring all-reduce attempt as a state machine (pure: events in, actions out).

The parallel mode's members each train from the round's model, then sum their
contributions with a chunked ring all-reduce: reduce-scatter, then all-gather,
each member sending ``2 (n - 1) / n`` of the vector (``docs/parallel.md`` is the
specification; :mod:`fedup.protocol.allreduce_messages` holds the chunk plan, the
schedule and the message).  This machine is one member's side of ONE attempt among
an agreed member list.  It does no arithmetic and holds no model: it tells the
driver what to send, which received chunk to add its own part to (:class:`Reduce`,
answered by :class:`Reduced`), and which final chunk to store (:class:`Store`).  It
reads no clock: every event comes with ``now``, and it asks for its one timer with
:class:`SetTimer`.

What the driver contributes is its choice; the parallel mode's driver (not built)
sends ``weight x params`` followed by one element holding ``weight`` (the member's
sample count), so the sum's last element divides the rest into the weighted average.

Stages and what moves between them (``k``: the next message expected from the
ring predecessor, ``0 .. 2n - 3``; every message is checked on arrival and, when
it is exactly message ``k``, queued; queued messages are worked on in order)::

    stage       event                                    next       actions
    READY       Begin, n = 1                             DONE       Store, Done
    READY       Begin                                    REDUCING   Send rs/0 (own part)
    READY       MessageArrived, message k                READY      queued (no timer yet:
                                                                    training is the driver's)
    REDUCING    message k (rs) worked on                 REDUCING   Reduce (then idle until
                                                                    Reduced)
    REDUCING    Reduced, not the last rs step            REDUCING   Send rs/s+1
    REDUCING    Reduced, last rs step (own chunk)        GATHERING  Store, Send ag/0 (signed)
    GATHERING   message k (ag) worked on                 GATHERING  Store, Send ag/s+1
    GATHERING   the last ag message worked on            DONE       Store, Done
    REDUCING,   TimerFired at or after the deadline      FAILED     Failed(timeout, the
    GATHERING                                                       predecessor, phase, step)
    REDUCING    Reduced holding NaN or Inf               FAILED     Failed(overflow)
    any live    Abandon                                  FAILED     Failed(abandoned)
    any live    MessageArrived, not message k            same       Refused(code): nothing
                                                                    changes
    DONE,       MessageArrived                           same       Refused(finished)
    FAILED      any other event                          same       Ignored

Whenever this member has begun, is not waiting for :class:`Reduced` and has no
queued message, it waits for message ``k`` and arms its timer for ``now +
Limits.allreduce_step_timeout`` (in the reduce-scatter, ``join_wait`` when given;
:class:`SetTimer` replaces the previous timer; :class:`CancelTimer` drops it).  A
:class:`TimerFired` before the deadline is stale and ignored.  A message that arrives
before the timer fires is taken.

Checks on every :class:`MessageArrived`, in order (the first failing one refuses,
:class:`Refused` names the sender and a :class:`Refusal`): the machine has not
ended; the sender is a member and this member's ring predecessor; the size is at
most ``MESSAGE_OVERHEAD`` plus the largest chunk (before decoding); strict CBOR of
the right fields; run, epoch, round, attempt; (phase, step) is message ``k``, not
an earlier one (duplicate) nor another; the chunk is the one the schedule sends
at that step; the payload is exactly that chunk's bytes; every float is finite;
in all-gather, the chunk owner's signature verifies over the payload's digest.
A refused message changes nothing.  Misuse by the driver (a second Begin, a
Reduced not asked for, a part of the wrong size) raises
:class:`~fedup.errors.LocalProtocolError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TypeAlias

import attrs
import nacl.signing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.protocol.allreduce_messages import (
    Abandon,
    Action,
    Begin,
    CancelTimer,
    ChunkMessage,
    ChunkMessageError,
    ChunkPlan,
    Context,
    Done,
    Event,
    Failed,
    FailureKind,
    Ignored,
    MessageArrived,
    Phase,
    Reduce,
    Reduced,
    Refusal,
    Refused,
    Send,
    SetTimer,
    Stage,
    Status,
    Store,
    TimerFired,
    chunk_digest,
    decode_chunk_message,
    is_finite,
    result_digest,
    ring_digest,
    sign_chunk,
    verify_chunk,
)
from fedup.protocol.envelope import Signer
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import printable
from fedup.protocol.ring import ring_order
from fedup.protocol.view import RUN_ID_SIZE

__all__ = [
    "TRANSITIONS",
    "Abandon",
    "Action",
    "AllReduceMachine",
    "Begin",
    "CancelTimer",
    "Done",
    "Event",
    "Failed",
    "FailureKind",
    "Ignored",
    "MessageArrived",
    "Reduce",
    "Reduced",
    "Refused",
    "Send",
    "SetTimer",
    "Stage",
    "Status",
    "Store",
    "TimerFired",
]


_Handler: TypeAlias = str

TRANSITIONS: dict[Stage, dict[type, _Handler]] = {
    Stage.READY: {Begin: "_begin", MessageArrived: "_arrived", Abandon: "_abandon"},
    Stage.REDUCING: {
        MessageArrived: "_arrived",
        Reduced: "_reduced",
        TimerFired: "_timer",
        Abandon: "_abandon",
    },
    Stage.GATHERING: {MessageArrived: "_arrived", TimerFired: "_timer", Abandon: "_abandon"},
    Stage.DONE: {MessageArrived: "_finished"},
    Stage.FAILED: {MessageArrived: "_finished"},
}
"""Which events each stage takes, and the method that decides; the rest are ignored
(a Begin or Reduced out of place before the end raises: it is the driver's bug)."""
_ENDED = (Stage.DONE, Stage.FAILED)


@attrs.frozen
class _Taken:
    """A checked message waiting to be worked on."""

    chunk: int
    phase: Phase
    step: int
    data: bytes
    signature: bytes | None


class AllReduceMachine:
    """One member's side of one ring all-reduce attempt; see the module docstring.

    ``members`` is put in ring order (:func:`~fedup.protocol.ring.ring_order`); chunk
    ``i`` is owned by the ``i``-th member.  Raises
    :class:`~fedup.errors.LocalProtocolError` for a run ID that is not 16 bytes,
    repeated members, ``signer`` not among them, more than ``limits.max_members``, a
    ``length`` below 1, or a largest chunk beyond ``limits.max_allreduce_chunk``
    bytes (such a vector needs chunks split into parts, not built yet).
    """

    def __init__(
        self,
        signer: Signer,
        *,
        run_id: bytes,
        epoch: int,
        round: int,
        attempt: int,
        members: Sequence[PeerId],
        length: int,
        limits: Limits = DEFAULT_LIMITS,
        join_wait: float | None = None,
    ) -> None:
        ring = ring_order(members)
        if len(ring) != len(members):
            raise LocalProtocolError("the member list repeats a member")
        if signer.peer_id not in ring:
            raise LocalProtocolError("an all-reduce machine needs its own member in the list")
        if len(ring) > limits.max_members:
            raise LocalProtocolError(f"{len(ring)} members exceed max_members")
        if len(run_id) != RUN_ID_SIZE:
            raise LocalProtocolError(f"a run ID has {RUN_ID_SIZE} bytes")
        if min(epoch, round, attempt) < 0:
            raise LocalProtocolError("epoch, round and attempt are unsigned")
        if length < 1:
            raise LocalProtocolError("an all-reduce needs a vector of at least one element")
        self.plan = ChunkPlan(length, len(ring))
        if self.plan.max_nbytes > limits.max_allreduce_chunk:
            raise LocalProtocolError(
                f"a chunk of {self.plan.max_nbytes} bytes exceeds max_allreduce_chunk "
                f"({limits.max_allreduce_chunk}): {length} elements need at least "
                f"{-(-4 * length // limits.max_allreduce_chunk)} members (or segments: "
                "fedup.peer.parallel_driver.ParallelRun.segments)"
            )
        self.members = ring
        self.me = signer.peer_id
        self.index = ring.index(self.me)
        n = len(ring)
        self.successor = ring[(self.index + 1) % n]
        self.predecessor = ring[(self.index - 1) % n]
        self.limits = limits
        self.join_wait = limits.allreduce_step_timeout if join_wait is None else join_wait
        """How long each wait of the reduce-scatter may last: until its last message
        every member may not have begun (the hybrid mode's members come to the
        all-reduce as their sub-ring's relay ends); the all-gather's waits are
        ``allreduce_step_timeout``."""
        self.context = Context(run_id, epoch, round, attempt, ring_digest(ring), length)
        self._signer = signer
        self._keys = [nacl.signing.VerifyKey(m.public_key) for m in ring]
        self.stage = Stage.READY
        self._queue: deque[_Taken] = deque()
        self._accepted = 0
        self._worked = 0
        self._sent = 0
        self._reducing: int | None = None
        self._deadline: float | None = None
        self._waiting_for: int | None = None
        """The message the deadline is for."""
        self._digests: dict[int, bytes] = {}
        self.digest: bytes | None = None
        """The result digest, once done."""

    # --- the public face ------------------------------------------------------------------

    @property
    def first_chunk(self) -> int:
        """The chunk whose own part :class:`Begin` carries."""
        return self.plan.sent_chunk(self.index, 0) if len(self.members) > 1 else 0

    @property
    def status(self) -> Status:
        return Status(
            self.stage,
            self._accepted,
            self._worked,
            self._sent,
            self._reducing,
            self._deadline,
            tuple(sorted(self._digests)),
        )

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply ``event`` at time ``now``; return what to do.  Never raises for a peer's
        bytes; raises :class:`~fedup.errors.LocalProtocolError` for the driver's misuse."""
        name = TRANSITIONS[self.stage].get(type(event))
        if name is None:
            if isinstance(event, Begin | Reduced) and self.stage not in _ENDED:
                raise LocalProtocolError(
                    f"{type(event).__name__} is not expected when {self.stage.value}"
                )
            return [Ignored(type(event).__name__, f"not taken when {self.stage.value}")]
        actions: list[Action] = getattr(self, name)(event, now)
        return actions

    # --- handlers -------------------------------------------------------------------------

    def _begin(self, event: Begin, now: float) -> list[Action]:
        chunk = self.first_chunk
        if len(event.local) != self.plan.nbytes(chunk):
            raise LocalProtocolError(
                f"Begin carries {len(event.local)} bytes; chunk {chunk} has "
                f"{self.plan.nbytes(chunk)}"
            )
        if not is_finite(event.local):
            raise LocalProtocolError("Begin carries NaN or Inf: the driver checks its own state")
        if len(self.members) == 1:
            self.stage = Stage.REDUCING
            return self._final(chunk, bytes(event.local), now)
        self.stage = Stage.REDUCING
        actions: list[Action] = [self._send(chunk, bytes(event.local), None)]
        return actions + self._work(now)

    def _arrived(self, event: MessageArrived, now: float) -> list[Action]:
        sender = event.sender
        if sender not in self.members:
            return [self._refuse(sender, Refusal.NOT_MEMBER, "is not a member of this attempt")]
        if sender != self.predecessor:
            return [
                self._refuse(
                    sender,
                    Refusal.NOT_PREDECESSOR,
                    f"is not this member's ring predecessor ({self.predecessor.short})",
                )
            ]
        try:
            message = decode_chunk_message(event.data, max_payload=self.plan.max_nbytes)
        except ChunkMessageError as exc:
            return [self._refuse(sender, exc.refusal, exc.reason)]
        problem = self._check(message)
        if problem is not None:
            return [self._refuse(sender, *problem)]
        self._queue.append(
            _Taken(message.chunk, message.phase, message.step, message.data, message.signature)
        )
        self._accepted += 1
        if self.stage is Stage.READY:
            return []
        return self._work(now)

    def _check(self, m: ChunkMessage) -> tuple[Refusal, str] | None:
        """Why ``m`` (from the predecessor) is not the next message, or None."""
        c = self.context
        for refusal, name, got, want in (
            (Refusal.WRONG_RUN, "run", m.run_id.hex(), c.run_id.hex()),
            (Refusal.WRONG_EPOCH, "epoch", m.epoch, c.epoch),
            (Refusal.WRONG_ROUND, "round", m.round, c.round),
            (Refusal.WRONG_ATTEMPT, "attempt", m.attempt, c.attempt),
        ):
            if got != want:
                return refusal, f"sent {name} {got}, this attempt's is {want}"
        k = self.plan.index_of(m.phase, m.step)
        where = f"{m.phase.value}/{m.step} chunk {m.chunk}"
        if k is None or k >= self.plan.messages:
            return Refusal.OUT_OF_ORDER, f"sent {where}: no such step"
        expected_chunk = self.plan.received_chunk(self.index, k)
        if k < self._accepted and m.chunk == expected_chunk:
            return Refusal.DUPLICATE, f"sent {where} again"
        if k != self._accepted or m.chunk != expected_chunk:
            phase, step = self.plan.step_of(self._accepted)
            want_chunk = self.plan.received_chunk(self.index, self._accepted)
            return Refusal.OUT_OF_ORDER, (
                f"sent {where}; expected {phase.value}/{step} chunk {want_chunk}"
            )
        size = self.plan.nbytes(m.chunk)
        if len(m.data) != size:
            return Refusal.BAD_SIZE, f"sent {len(m.data)} bytes for {where}, which has {size}"
        if not is_finite(m.data):
            return Refusal.NOT_FINITE, f"sent NaN or Inf in {where}"
        if m.phase is Phase.ALL_GATHER:
            assert m.signature is not None, "the decoder requires sig in all-gather"
            digest = chunk_digest(m.data)
            if not verify_chunk(self._keys[m.chunk], c, m.chunk, digest, m.signature):
                owner = self.members[m.chunk].short
                return Refusal.BAD_SIGNATURE, (
                    f"sent {where} without a valid signature of its owner {owner} over its bytes"
                )
        return None

    def _reduced(self, event: Reduced, now: float) -> list[Action]:
        chunk = self._reducing
        if chunk is None or event.chunk != chunk:
            raise LocalProtocolError(f"Reduced for chunk {event.chunk}; asked for {chunk}")
        if len(event.data) != self.plan.nbytes(chunk):
            raise LocalProtocolError(
                f"Reduced carries {len(event.data)} bytes; chunk {chunk} has "
                f"{self.plan.nbytes(chunk)}"
            )
        self._reducing = None
        data = bytes(event.data)
        if not is_finite(data):
            return self._fail(FailureKind.OVERFLOW, f"the sum of chunk {chunk} is not finite")
        if chunk == self.index:  # the last reduce-scatter step: this member's own chunk
            self.stage = Stage.GATHERING
            return self._final(chunk, data, now)
        return [self._send(chunk, data, None), *self._work(now)]

    def _timer(self, event: TimerFired, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline:
            return [Ignored("TimerFired", "stale: no deadline has passed")]
        phase, step = self.plan.step_of(self._accepted)
        chunk = self.plan.received_chunk(self.index, self._accepted)
        self._deadline = self._waiting_for = None
        self.stage = Stage.FAILED
        self._queue.clear()
        return [
            Failed(
                FailureKind.TIMEOUT,
                f"{self.predecessor} sent nothing for {phase.value}/{step} chunk {chunk} "
                f"within {self._wait()} s",
                self.predecessor,
                phase,
                step,
            )
        ]

    def _abandon(self, event: Abandon, now: float) -> list[Action]:
        return self._fail(FailureKind.ABANDONED, printable(event.reason))

    def _finished(self, event: MessageArrived, now: float) -> list[Action]:
        return [self._refuse(event.sender, Refusal.FINISHED, f"arrived when {self.stage.value}")]

    # --- steps ----------------------------------------------------------------------------

    def _send(self, chunk: int, data: bytes, signature: bytes | None) -> Send:
        phase, step = self.plan.step_of(self._sent)
        c = self.context
        message = ChunkMessage(
            c.run_id, c.epoch, c.round, c.attempt, phase, step, chunk, data, signature
        )
        self._sent += 1
        return Send(self.successor, message.encode(), phase, step, chunk)

    def _store(self, chunk: int, data: bytes) -> Store:
        self._digests[chunk] = chunk_digest(data)
        start, stop = self.plan.span(chunk)
        return Store(chunk, start, stop, data)

    def _final(self, chunk: int, data: bytes, now: float) -> list[Action]:
        """This member's own chunk is final: store it and start the all-gather with it."""
        actions: list[Action] = [self._store(chunk, data)]
        if len(self.members) > 1:
            actions.append(
                self._send(chunk, data, sign_chunk(self._signer, self.context, chunk, data))
            )
        return actions + self._work(now)

    def _work(self, now: float) -> list[Action]:
        """Work on queued messages while not waiting for the driver; then end, or wait."""
        actions: list[Action] = []
        while self._reducing is None and self._queue:
            taken = self._queue.popleft()
            self._worked += 1
            if taken.phase is Phase.REDUCE_SCATTER:
                start, stop = self.plan.span(taken.chunk)
                self._reducing = taken.chunk
                actions.append(Reduce(taken.chunk, start, stop, taken.data))
            else:
                actions.append(self._store(taken.chunk, taken.data))
                if self._sent < self.plan.messages:
                    actions.append(self._send(taken.chunk, taken.data, taken.signature))
        if self._reducing is None and self._worked == self.plan.messages:
            self.digest = result_digest([self._digests[c] for c in range(len(self.members))])
            self.stage = Stage.DONE
            return actions + self._drop_timer() + [Done(self.digest)]
        if self._reducing is None and self._accepted == self._worked:  # wait for message k
            if self._waiting_for != self._accepted:
                self._waiting_for = self._accepted
                self._deadline = now + self._wait()
                actions.append(SetTimer(self._deadline))
            return actions
        return actions + self._drop_timer()

    def _wait(self) -> float:
        """The deadline's length for message ``k``: ``join_wait`` in the reduce-scatter
        (message ``n - 2`` at member ``i`` needs member ``i + 1`` to have begun: every
        member has, once it arrived), the step deadline after."""
        joining = self._accepted < len(self.members) - 1
        return self.join_wait if joining else self.limits.allreduce_step_timeout

    def _drop_timer(self) -> list[Action]:
        self._waiting_for = None
        if self._deadline is None:
            return []
        self._deadline = None
        return [CancelTimer()]

    def _fail(self, kind: FailureKind, reason: str) -> list[Action]:
        actions = self._drop_timer()
        self.stage = Stage.FAILED
        self._queue.clear()
        return [*actions, Failed(kind, reason)]

    def _refuse(self, peer: PeerId, refusal: Refusal, reason: str) -> Refused:
        return Refused(peer, refusal, f"{peer}: {reason}")
