"""Ring custody as a state machine: who holds the model, who gets it next, who is dead.

Pure: events in, actions out, no sockets, clocks or torch (after
``h11/_state.py``).  The trio driver (:mod:`fedup.peer.custody_driver`) feeds
it what happened (a blob arrived, training ended, a hand-over succeeded or
failed, a timer fired) with the current time, and carries out the actions it
returns (train, send, tell ``passed``, set a timer, save the final model).
Each member runs one machine per run.

The phases and what moves between them (every other event is answered with
:class:`Ignored`, a typed refusal, and changes nothing)::

    phase         event                         next phase
    READY         Begin (lowest member)         TRAINING        trains (0, 0)
    READY         Begin (others)                WAITING
    WAITING       BlobArrived model, accepted   TRAINING
    any live      BlobArrived final, accepted   FINISHING
    TRAINING      Trained, not done             HANDING         hands it to the successor
    TRAINING      Trained, done                 FINISHING       this member ends the run
    HANDING       HandedOver                    WAITING         keeps a copy, tells passed
    HANDING       HandOverFailed dead/timeout   HANDING         declares it dead, next one
    HANDING       HandOverFailed, nobody left   FINISHING       members-lost
    HANDING       refused: excluded (proven)    EXCLUDED
    WAITING       TimerFired wait               FAILED          the ring is broken
    EXCLUDED      BlobArrived final, accepted   FINISHING
    EXCLUDED      TimerFired excluded           FAILED
    FINISHING     FinalSaved                    DISTRIBUTING / DONE
    DISTRIBUTING  every final hand-over ended   DONE

Alongside the phase, a member keeps the last model it handed on until a
custody receipt from the member after its successor arrives (``passed``); if
none comes within ``hop_timeout`` it hands its copy to the member after the
silent one, declaring the silent one dead only once that member took it.

The member threat model (docs/federation.md) is enforced on every
:class:`BlobArrived` before custody is taken (:meth:`CustodyMachine._check_model`,
:meth:`_check_final`): a model is taken only from the live predecessor, at
exactly the next position, at most ``max_laps + 1``, with a dead chain that
extends ours and never names us, metadata consistent with the header and with
the history seen here, and hop statements that continue ours from its last one
and end with the sender's statement about this very state (:meth:`_check_provenance`,
:mod:`fedup.protocol.provenance`; a blob carries only the statements after its
receiver's own last one, :meth:`HopChain.suffix_for`); a final only when the stopping rule holds on
what it carries, sealed by the member whose hop ended the run over this content
and the model file it makes, its chain ending with that member's statement.
Every hop trained here is signed (:class:`Trained` carries the content digest
and the samples), so the final model carries who trained it, hop by hop.  Only an unreachable
member or one that timed out can be declared dead; a refusal for content never
makes anyone dead.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence
from typing import Literal, TypeAlias

import attrs

from fedup.config import Limits
from fedup.errors import LocalProtocolError
from fedup.protocol.blob.reply import MAX_PROOF
from fedup.protocol.custody_events import (
    FINAL,
    INITIAL,
    RESUMED,
    Action,
    AskToReturn,
    Begin,
    BlobArrived,
    BlobKind,
    BlobOffered,
    CancelTimer,
    Declared,
    Event,
    Excluded,
    Failed,
    Failure,
    FailureKind,
    FinalSaved,
    Finish,
    Finished,
    Forget,
    HandedOver,
    HandOverFailed,
    Ignored,
    Note,
    PassedArrived,
    Phase,
    Refuse,
    ReturnAsked,
    Returned,
    Send,
    SetTimer,
    Take,
    TellPassed,
    TimerFired,
    Train,
    Trained,
    TrainFailed,
)
from fedup.protocol.custody_rules import StopRule, check_final_progress, check_model_progress
from fedup.protocol.envelope import Signer
from fedup.protocol.laps import Position, Progress, last_lap, next_position
from fedup.protocol.notices import (
    ChainBehindError,
    ChainNotice,
    CustodyReceipt,
    DeadChain,
    DeadNotice,
    DeathCause,
    FinalSeal,
    NoticeError,
    ReceiptError,
    SealError,
    dead_after,
    open_chain_notice,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.provenance import ChainRules, HopChain, ProvenanceError
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import ReturnError, ReturnNotice, ReturnRequest
from fedup.protocol.ring import Ring, ring_order
from fedup.protocol.run_state import CustodyMemory, Kept
from fedup.protocol.run_state import Taken as MemoryTaken

__all__ = ["TRANSITIONS", "CustodyMachine", "StopRule"]

_RESUMABLE = (Phase.READY, Phase.WAITING, Phase.TRAINING, Phase.HANDING, Phase.EXCLUDED)

NEARBY_ASKS = 3
"""Members a quiet member asks to take it back: those just before it in the ring."""
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Seconds before each retry of a refused or broken hand-over (the last one repeats)."""
WAIT, WATCH, EXCLUDED_WAIT, ASK, QUIET = "wait", "watch", "excluded", "ask", "quiet"


# --- the machine ------------------------------------------------------------------------


Purpose: TypeAlias = Literal["forward", "resend", "final", "final-dead"]


@attrs.define
class _Handover:
    """One hand-over in progress (a model on to the successor, a resend, a final)."""

    id: int
    purpose: Purpose
    kind: BlobKind
    copy: Position
    target: PeerId
    position: Position
    chain: DeadChain
    """The chain the blob carries: ours plus the claims made while handing this one."""
    started: float
    provenance: HopChain
    """The hop statements held when it started (the blob carries those its target has
    not seen: :meth:`HopChain.suffix_for`, made again for each attempt and target)."""
    attempts: int = 1
    held_since: float | None = None
    """Since when the target could not be counted as dead without losing the majority."""


@attrs.define
class _Kept:
    """The copy kept after a hand-over, until ``passed`` proves the model moved on."""

    copy: Position
    target: PeerId
    position: Position
    """The position ``target`` took it at."""
    provenance: HopChain
    """The hop statements it was handed on with (to hand it on again)."""


@attrs.frozen
class _Taken:
    """The last blob this member took (answers an identical resend idempotently)."""

    sender: PeerId
    kind: BlobKind
    position: Position
    digest: bytes
    receipt: bytes


_Handler: TypeAlias = str

TRANSITIONS: dict[Phase, dict[type, _Handler]] = {
    Phase.READY: {
        Begin: "_begin",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
        ReturnAsked: "_return_asked",
    },
    Phase.WAITING: {
        ReturnAsked: "_return_asked",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
        HandedOver: "_handed_over",
        HandOverFailed: "_hand_over_failed",
        PassedArrived: "_passed",
        TimerFired: "_timer",
    },
    Phase.TRAINING: {
        ReturnAsked: "_return_asked",
        Trained: "_trained",
        TrainFailed: "_train_failed",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
        HandedOver: "_handed_over",
        HandOverFailed: "_hand_over_failed",
        PassedArrived: "_passed",
        TimerFired: "_timer",
    },
    Phase.HANDING: {
        ReturnAsked: "_return_asked",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
        HandedOver: "_handed_over",
        HandOverFailed: "_hand_over_failed",
        PassedArrived: "_passed",
        TimerFired: "_timer",
    },
    Phase.EXCLUDED: {
        ReturnAsked: "_return_asked",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
        TimerFired: "_timer",
    },
    Phase.FINISHING: {
        ReturnAsked: "_return_asked",
        FinalSaved: "_final_saved",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
    },
    Phase.DISTRIBUTING: {
        ReturnAsked: "_return_asked",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
        HandedOver: "_handed_over",
        HandOverFailed: "_hand_over_failed",
        TimerFired: "_timer",
    },
    Phase.DONE: {
        ReturnAsked: "_return_asked",
        BlobOffered: "_offered",
        BlobArrived: "_arrived",
    },
    Phase.FAILED: {},
}
"""Which events each phase takes, and the method that decides; the rest are ignored."""


FIRST_CHAINS = 8
"""Runs whose first dead chain and chain rules a process keeps (:func:`_first_chain`)."""

_first_chains: collections.OrderedDict[
    tuple[bytes, bytes, tuple[bytes, ...], int], tuple[DeadChain, ChainRules]
] = collections.OrderedDict()


def _first_chain(
    run_id: bytes, view_digest: bytes, members: Sequence[PeerId], max_laps: int
) -> tuple[DeadChain, ChainRules]:
    """A run's dead chain without notices and the rules of its hop chain, made once per
    process and content: both are immutable, the same for every member of the run, and
    each costs a sort and tables of the whole ring (a simulation of a thousand members
    would build a thousand of each).  Keyed by the members' bytes (a peer ID's hash is
    a Python call)."""
    key = (run_id, view_digest, tuple(p.raw for p in members), max_laps)
    made = _first_chains.get(key)
    if made is None:
        chain = DeadChain(run_id, view_digest, ring_order(members))
        made = chain, ChainRules(run_id, view_digest, chain.members, max_laps)
        _first_chains[key] = made
        if len(_first_chains) > FIRST_CHAINS:
            _first_chains.popitem(last=False)
    return made


class CustodyMachine:
    """One member's custody of one run; see the module docstring."""

    def __init__(
        self,
        signer: Signer,
        *,
        run_id: bytes,
        view_digest: bytes,
        view_epoch: int,
        members: Sequence[PeerId],
        rule: StopRule,
        limits: Limits,
        initial: bytes,
    ) -> None:
        """``initial`` is the content digest of this member's initial state: what its hop
        statement says it received if it trains lap 0 hop 0 (as the leader)."""
        self.me = signer.peer_id
        chain, rules = _first_chain(run_id, view_digest, members, rule.max_laps)
        if self.me not in chain.ring:
            raise LocalProtocolError("a custody machine needs its own member in the view")
        self._signer = signer
        self.run_id = run_id
        self.view_digest = view_digest
        self.view_epoch = view_epoch
        self.rule = rule
        self.limits = limits
        self.chain = chain
        self.provenance = HopChain.start(rules)
        """The hop statements as far as this member verified or signed them: all of them
        (a blob carries only those its receiver has not seen, so a member keeps its own)."""
        self._received = initial
        """The content digest of the state trained here (what our statement received)."""
        self.phase = Phase.READY
        self.last_lap = -1
        """The lap of the last position this member took (or trained first)."""
        self.seen = Progress.initial()
        """The progress of the last state this member verified or produced."""
        self.holding: Position | None = None
        """The position of the model being trained here."""
        self.source: PeerId | None = None
        """Whom the model being trained here came from (to tell ``passed``)."""
        self.kept: _Kept | None = None
        self.handovers: dict[int, _Handover] = {}
        self.taken: _Taken | None = None
        self.final: _Taken | None = None
        self.ended_by: PeerId | None = None
        self.stop_reason: str | None = None
        self.excluded: DeadNotice | None = None
        self.asks: dict[PeerId, ReturnRequest] = {}
        """The latest return request of each member that asked (one per member)."""
        self._final_sent_at: dict[PeerId, float] = {}
        """When this member last handed the final model to each returner that asked."""
        self._ask_nearby = False
        """This member's return requests go only to the members just before it (it
        heard nothing for a while), not to every member (see :meth:`ask_to_return`)."""
        self.asked = 0
        """The counter of this member's own latest return request (0: none made)."""
        self.returning = False
        """This member asked to be taken back and has taken no model since: the next
        model may come at any later lap (the ring went on without it)."""
        self._ids = 0
        self._final_origin: PeerId | None = None
        self._final_seal: bytes | None = None

    # --- the public face -----------------------------------------------------------------

    @property
    def ring_epoch(self) -> int:
        """The view's epoch plus the members declared dead since."""
        return self.view_epoch + len(self.chain)

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply ``event`` (at time ``now``) and return what to do; never raises for input."""
        name = TRANSITIONS[self.phase].get(type(event))
        if name is None:
            return [
                self._ignored(event, f"{type(event).__name__} is not taken when {self.phase.value}")
            ]
        handler = getattr(self, name)
        actions: list[Action] = handler(event, now)
        return actions

    # --- a restart -----------------------------------------------------------------------

    def memory(self) -> CustodyMemory | None:
        """What this machine needs to go on after a restart; None once the run has ended
        here (or failed): a finished member keeps its outputs, not its run state."""
        if self.phase not in _RESUMABLE:
            return None
        k, t = self.kept, self.taken
        return CustodyMemory(
            phase=self.phase.value,
            last_lap=self.last_lap,
            received=self._received,
            chain=self.chain.envelopes,
            provenance=bytes(self.provenance.data),
            holding=self.holding,
            source=self.source,
            kept=Kept(k.copy, k.target, k.position) if k is not None else None,
            taken=(
                MemoryTaken(t.sender, t.kind, t.position, t.digest, t.receipt)
                if t is not None
                else None
            ),
            asked=self.asked,
            asks=tuple(r.envelope for r in self.asks.values()),
        )

    def restore(self, memory: CustodyMemory, seen: Progress) -> None:
        """Take up ``memory`` (this run's, saved by this member before a restart) in a
        machine just made; ``seen`` is the progress of the state saved with it.  Raises
        :class:`~fedup.errors.LocalProtocolError` for a memory that does not fit this run
        (its chain or statements do not verify: a file changed by hand or corrupted)."""
        if self.phase is not Phase.READY:
            raise LocalProtocolError("only a machine that has not begun takes up a memory")
        try:
            chain = self.chain.extend_with(memory.chain, receiver=None, limits=self.limits)
            provenance = self.provenance.extend_with(
                memory.provenance, dead=chain, limits=self.limits, rewind=True
            )
        except (NoticeError, ProvenanceError) as exc:
            raise LocalProtocolError(f"the saved run does not verify: {exc.reason}") from None
        self.chain, self.provenance = chain, provenance
        self.phase = Phase(memory.phase)
        self.last_lap, self._received, self.seen = memory.last_lap, memory.received, seen
        self.holding, self.source, self.asked = memory.holding, memory.source, memory.asked
        if memory.kept is not None:
            k = memory.kept
            self.kept = _Kept(k.copy, k.target, k.position, provenance)
        if memory.taken is not None:
            t = memory.taken
            self.taken = _Taken(t.sender, t.kind, t.position, t.digest, t.receipt)
        for data in memory.asks:
            with contextlib.suppress(ReturnError):
                request = ReturnRequest.open(data)
                if request.run_id == self.run_id and request.peer in chain.ring:
                    self.asks[request.peer] = request
        self.excluded = chain.notice_about(self.me)

    def resume(self, now: float) -> list[Action]:
        """What to do after :meth:`restore`: train the hop held again, hand on the state
        trained, watch the copy kept, and ask to be taken back if this member waits (it
        may have been counted as dead while it was down)."""
        phase = self.phase
        if phase is Phase.READY:
            return self._begin(Begin(), now)
        if phase is Phase.TRAINING:
            assert self.holding is not None, "a member training holds a position"
            return [Train(self.holding, RESUMED)]
        if phase is Phase.HANDING:
            assert self.holding is not None, "a member handing on holds a position"
            return self._forward(self.holding, now)
        if phase is Phase.EXCLUDED:
            return [
                SetTimer(EXCLUDED_WAIT, self.limits.excluded_wait),
                *self.ask_to_return(nearby=False),
            ]
        actions: list[Action] = self._waiting_timers()
        if self.kept is not None:
            actions.append(SetTimer(WATCH, self.limits.hop_timeout))
        return actions + self.ask_to_return(nearby=False)

    # --- starting and training ---------------------------------------------------------------

    def _begin(self, event: Begin, now: float) -> list[Action]:
        ring = self.chain.ring
        if ring.leader == self.me:
            self.phase = Phase.TRAINING
            self.holding = Position(0, 0)
            self.last_lap = 0
            return [Train(Position(0, 0), INITIAL)]
        self.phase = Phase.WAITING
        return self._waiting_timers()

    def _wait_timer(self) -> SetTimer:
        live = len(self.chain.ring.live)
        return SetTimer(WAIT, self.limits.hop_timeout * (live + 1))

    def _waiting_timers(self) -> list[Action]:
        """The deadline for the next model, and a quieter one: a member that hears
        nothing for ``hop_timeout`` asks to be taken back (it may have been counted as
        dead while it was cut off; asking when it was not costs nothing)."""
        return [self._wait_timer(), SetTimer(QUIET, self.limits.hop_timeout)]

    def _trained(self, event: Trained, now: float) -> list[Action]:
        if event.position != self.holding:
            return [self._ignored(event, f"trained {event.position}, holding {self.holding}")]
        self.provenance = self.provenance.append(
            self._signer,
            position=event.position,
            received=self._received,
            sent=event.content,
            samples=event.samples,
            dead=self.chain,
            limits=self.limits,
        )
        self._received = event.content  # a federation of one trains it again next
        actions: list[Action] = []
        if not event.good:
            actions.append(
                Note(
                    "warning",
                    f"training at {event.position} gave a bad state: handing on the "
                    "last good one instead",
                )
            )
        self.seen = event.progress
        if event.progress.done:
            self.holding = None
            reason = event.progress.stop.reason(patience=self.rule.patience)
            return actions + self._finish(event.position, reason, self.me)
        actions += self._forward(event.position, now)
        return actions

    def _train_failed(self, event: TrainFailed, now: float) -> list[Action]:
        self.phase = Phase.FAILED
        return [Failed(f"training failed here: {event.reason}")]

    # --- handing on ----------------------------------------------------------------------

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    def _forward(self, copy: Position, now: float) -> list[Action]:
        """Hand the model trained at ``copy`` to the next live member."""
        ring = self.chain.ring
        if len(ring.members) == 1:  # a federation of one: the model comes straight back
            position = Position(copy.lap + 1, 0)
            self.holding, self.last_lap = position, position.lap
            return [Train(position, copy), Forget(copy)]
        chain = self._taking_back(self.chain, copy)
        ring = chain.ring
        if len(ring.live) < 2:
            return self._finish(copy, "members-lost", self.me)
        target, position = next_position(ring, self.me, copy)
        handover = _Handover(
            self._new_id(),
            "forward",
            "model",
            copy,
            target,
            position,
            chain,
            now,
            self.provenance,
        )
        self.handovers[handover.id] = handover
        self.phase = Phase.HANDING
        return [self._send(handover)]

    def _taking_back(self, chain: DeadChain, at: Position) -> DeadChain:
        """``chain`` with every member that asked to return, and that this member now
        precedes in the ring, taken back (:mod:`fedup.protocol.returns`)."""
        if not self.asks or self.me in chain.dead:
            return chain
        asks = sorted(self.asks.values(), key=lambda r: r.peer.raw)
        while True:
            for request in asks:
                if chain.may_take_back(self.me, request, limits=self.limits) is None:
                    chain = chain.take_back(self._signer, request, at, limits=self.limits)
                    break
            else:
                return chain

    def _send(self, h: _Handover) -> Send:
        return Send(
            h.id,
            h.target,
            h.kind,
            h.position,
            self.view_epoch + len(h.chain),
            h.chain.envelopes,
            h.copy,
            self._final_origin if h.kind == "final" else None,
            self._final_seal if h.kind == "final" else None,
            h.provenance.suffix_for(h.target),
        )

    def _handed_over(self, event: HandedOver, now: float) -> list[Action]:
        h = self.handovers.get(event.handover)
        if h is None:
            return [self._ignored(event, f"hand-over {event.handover} is no longer current")]
        problem = self._check_receipt(event.receipt, h, event.digest)
        if problem is not None:
            failure = Failure(FailureKind.BROKEN, f"bad custody receipt: {problem}")
            return self._hand_over_failed(HandOverFailed(h.id, failure), now)
        del self.handovers[h.id]
        actions: list[Action] = []
        if h.purpose in ("forward", "resend"):
            actions += self._commit(h.chain)
            if h.purpose == "forward" and self.source is not None:
                actions.append(TellPassed(self.source, event.receipt))
            if self.kept is not None and self.kept.copy != h.copy:
                actions.append(Forget(self.kept.copy))
            self.kept = _Kept(h.copy, h.target, h.position, h.provenance)
            actions.append(SetTimer(WATCH, self.limits.hop_timeout))
            if h.purpose == "forward":
                self.holding = None
                self.source = None
                self.phase = Phase.WAITING
                actions += self._waiting_timers()
            return actions
        if h.purpose == "final":
            actions += self._final_ring_done(now)
        return actions + self._maybe_done()

    def _check_receipt(self, data: bytes, h: _Handover, digest: bytes) -> str | None:
        try:
            receipt = CustodyReceipt.open(data)
        except ReceiptError as exc:
            return exc.reason
        expected = (self.run_id, h.kind, h.position, self.me, h.target, digest)
        got = (
            receipt.run_id,
            receipt.kind,
            receipt.position,
            receipt.sender,
            receipt.taker,
            receipt.digest,
        )
        return None if got == expected else "it does not name this hand-over"

    def _commit(self, chain: DeadChain) -> list[Action]:
        """Adopt ``chain`` (an extension of ours) and report the notices new to us."""
        new = chain.notices[len(self.chain) :]
        self.chain = chain
        return [_reported(n, n.claimer == self.me) for n in new]

    def _hand_over_failed(self, event: HandOverFailed, now: float) -> list[Action]:
        h = self.handovers.get(event.handover)
        if h is None:
            return [self._ignored(event, f"hand-over {event.handover} is no longer current")]
        f = event.failure
        if f.kind is FailureKind.REFUSED and f.code is RefusalCode.EXCLUDED:
            proven = self._proven_exclusion(f.proof)
            if proven is not None:
                del self.handovers[h.id]
                return self._become_excluded(proven)
        if f.kind is FailureKind.REFUSED and f.code in (RefusalCode.STALE, RefusalCode.FINISHED):
            return self._moved_on(h, f)
        if h.purpose == "resend" and f.kind is FailureKind.REFUSED:
            return self._moved_on(h, f)
        if f.kind in (FailureKind.UNREACHABLE, FailureKind.TIMED_OUT) or h.purpose == "final-dead":
            return self._skip(h, f, now)
        # Broken or refused for content: the member is alive; try again for half of
        # hop_timeout (so our predecessor, watching us for hop_timeout, hears ``passed``
        # in time), then count it as timed out.
        budget = self.limits.hop_timeout / 2
        if now - h.started >= budget:
            timeout = Failure(
                FailureKind.TIMED_OUT, f"did not take the {h.kind} within {budget:g} s ({f.why})"
            )
            return self._skip(h, timeout, now)
        delay = RETRY_DELAYS[min(h.attempts - 1, len(RETRY_DELAYS) - 1)]
        h.attempts += 1
        return [
            Note(
                "info",
                f"handing {h.kind} {h.position} to {h.target} failed ({f.why}); "
                f"trying again in {delay:g} s",
            ),
            SetTimer(f"retry:{h.id}", delay),
        ]

    def _moved_on(self, h: _Handover, f: Failure) -> list[Action]:
        """The target is past this blob: the ring (or the final) moved on without it."""
        del self.handovers[h.id]
        actions: list[Action] = [
            Note("info", f"{h.target} is past {h.kind} {h.position} ({f.why}): it moved on")
        ]
        if h.purpose == "resend":
            if self.kept is not None:
                actions.append(Forget(self.kept.copy))
                self.kept = None
            return actions
        if h.purpose == "forward":
            actions.append(Forget(h.copy))
            self.holding = None
            self.source = None
            self.phase = Phase.WAITING
            return [*actions, *self._waiting_timers()]
        if h.purpose == "final":
            actions += self._final_ring_done(0.0)
        return actions + self._maybe_done()

    def _skip(self, h: _Handover, f: Failure, now: float) -> list[Action]:
        """``h.target`` is unreachable or timed out: count it dead (or pass it, for a final)."""
        actions: list[Action] = [
            Note("warning", f"{h.target} did not take {h.kind} {h.position}: {f.why}")
        ]
        if h.purpose == "final-dead":
            del self.handovers[h.id]
            return actions + self._maybe_done()
        if h.purpose == "final":
            return actions + self._next_final_target(h, now)
        if not h.chain.keeps_majority():
            return actions + self._hold_on(h, now)
        cause: DeathCause = "unreachable" if f.kind is FailureKind.UNREACHABLE else "timed-out"
        chain = self._taking_back(h.chain.claim(self._signer, cause, h.copy), h.copy)
        ring = chain.ring
        if len(ring.live) < 2:
            del self.handovers[h.id]
            if h.purpose == "resend":
                return [*actions, Note("warning", "no other member to hand our copy to")]
            actions += self._commit(chain)
            return actions + self._finish(h.copy, "members-lost", self.me)
        target, position = next_position(ring, self.me, h.copy)
        h.chain, h.target, h.position, h.attempts, h.started = chain, target, position, 1, now
        h.held_since = None
        return [*actions, self._send(h)]

    def _hold_on(self, h: _Handover, now: float) -> list[Action]:
        """``h.target`` cannot be counted as dead without losing the majority of the view:
        keep trying it (the network may heal) for ``minority_wait``, then stop with
        ``members-lost`` (a model that is not the federation's: docs/reliability.md)."""
        if h.held_since is None:
            h.held_since = now
        if now - h.held_since >= self.limits.minority_wait:
            del self.handovers[h.id]
            why = (
                f"no majority of the {len(self.chain.members)} members answered for "
                f"{self.limits.minority_wait:g} s"
            )
            if h.purpose == "resend":
                return [Note("warning", f"{why}: keeping our copy")]
            stop = Note("warning", f"{why}: stopping without the federation's model")
            declared = self._commit(h.chain)  # who it found gone, for its summary
            return [stop, *declared, *self._finish(h.copy, "members-lost", self.me)]
        delay = RETRY_DELAYS[min(h.attempts - 1, len(RETRY_DELAYS) - 1)]
        h.attempts += 1
        return [
            Note(
                "warning",
                f"counting {h.target} as dead would leave less than a majority of the "
                f"{len(self.chain.members)} members live: holding {h.kind} {h.position} and "
                f"trying again in {delay:g} s",
            ),
            SetTimer(f"retry:{h.id}", delay),
        ]

    def _timer(self, event: TimerFired, now: float) -> list[Action]:
        name = event.name
        if name == WAIT:
            if self.phase is not Phase.WAITING:
                return [self._ignored(event, "not waiting for a model")]
            self.phase = Phase.FAILED
            wait = self.limits.hop_timeout * (len(self.chain.ring.live) + 1)
            return [Failed(f"no model arrived for {wait:g} s; the ring is broken")]
        if name == QUIET:
            if self.phase is not Phase.WAITING or self.returning:
                return [self._ignored(event, "not waiting quietly")]
            note = Note("info", f"no model for {self.limits.hop_timeout:g} s: asking to return")
            return [note, *self.ask_to_return(nearby=True)]
        if name == EXCLUDED_WAIT:
            self.phase = Phase.FAILED
            why = self.excluded.describe() if self.excluded is not None else "excluded"
            return [
                Failed(
                    f"excluded from the run ({why}), and no final model arrived within "
                    f"{self.limits.excluded_wait:g} s"
                )
            ]
        if name == WATCH:
            return self._watch_expired(now)
        if name == ASK:
            if not self.returning:
                return [self._ignored(event, "not asking to return")]
            # A new request each time: the last one may have been used already (taken
            # back, then counted dead again before a model reached us).
            return self.ask_to_return()
        if name.startswith("retry:"):
            h = self.handovers.get(int(name[6:]))
            if h is None:
                return [self._ignored(event, "that hand-over ended")]
            return [self._send(h)]
        return [self._ignored(event, f"unknown timer {name!r}")]

    def _watch_expired(self, now: float) -> list[Action]:
        kept = self.kept
        if kept is None or any(h.purpose == "resend" for h in self.handovers.values()):
            return [self._ignored(TimerFired(WATCH), "no copy to watch")]
        ring = self.chain.ring
        if kept.target in ring.dead or ring.successor(self.me) != kept.target:
            return [
                Note("info", f"{kept.target} is not our successor any more; dropping our copy"),
                *self._drop_kept(),
            ]
        if not self.chain.keeps_majority():
            return [
                Note(
                    "warning",
                    f"{kept.target} is silent, and counting it as dead would leave less than "
                    "a majority of the view live: keeping our copy and waiting",
                ),
                SetTimer(WATCH, self.limits.hop_timeout),
            ]
        chain = self._taking_back(self.chain.claim(self._signer, "timed-out", kept.copy), kept.copy)
        if len(chain.ring.live) < 2:
            return [Note("warning", f"{kept.target} is silent and no other member is left")]
        target, position = next_position(chain.ring, self.me, kept.copy)
        h = _Handover(
            self._new_id(),
            "resend",
            "model",
            kept.copy,
            target,
            position,
            chain,
            now,
            kept.provenance,
        )
        self.handovers[h.id] = h
        return [
            Note(
                "warning",
                f"{kept.target} took {kept.position} and was silent for "
                f"{self.limits.hop_timeout:g} s: handing our copy to {target}",
            ),
            self._send(h),
        ]

    def _drop_kept(self) -> list[Action]:
        if self.kept is None:
            return []
        copy = self.kept.copy
        self.kept = None
        return [Forget(copy), CancelTimer(WATCH)]

    def _passed(self, event: PassedArrived, now: float) -> list[Action]:
        kept = self.kept
        if kept is None or event.sender != kept.target:
            return [self._ignored(event, f"no copy kept for {event.sender}")]
        try:
            receipt = CustodyReceipt.open(event.receipt)
        except ReceiptError as exc:
            return [Refuse(event.sender, RefusalCode.MALFORMED, f"passed: {exc.reason}")]
        p = kept.position
        nexts = (Position(p.lap, p.hop + 1), Position(p.lap + 1, 0))
        if (
            receipt.run_id != self.run_id
            or receipt.sender != kept.target
            or receipt.taker == kept.target
            or receipt.taker not in self.chain.ring
            or receipt.position not in nexts
        ):
            return [
                Refuse(
                    event.sender,
                    RefusalCode.BAD_CLAIM,
                    "passed: the receipt does not show the model moving on from "
                    f"{kept.target} after {p}",
                )
            ]
        self.kept = None
        return [Forget(kept.copy), CancelTimer(WATCH)]

    # --- receiving ------------------------------------------------------------------------

    def _offered(self, event: BlobOffered, now: float) -> list[Action]:
        """A cheap look at a header: refuse what cannot be taken before its bytes come."""
        problem = self._precheck(event.sender, event.kind, event.position, event.epoch)
        return [] if problem is None else [problem]

    def _precheck(
        self, sender: PeerId, kind: BlobKind, position: Position, epoch: int
    ) -> Refuse | None:
        if sender not in self.chain.ring:
            return Refuse(sender, RefusalCode.NOT_MEMBER, "not a member of the run")
        if self.phase is Phase.READY:
            return Refuse(sender, RefusalCode.BUSY, "training has not begun here yet")
        if kind == "final":
            if self.final is not None and self.final.sender != sender:
                return Refuse(sender, RefusalCode.FINISHED, "already holding the final model")
            return None
        if self.taken is not None and (sender, position) == (
            self.taken.sender,
            self.taken.position,
        ):
            return None  # perhaps the same blob again (its ACK was lost): decided on its digest
        if self.phase in (Phase.FINISHING, Phase.DISTRIBUTING, Phase.DONE):
            return Refuse(sender, RefusalCode.FINISHED, "the run has ended here")
        if self.phase is Phase.EXCLUDED and not self.returning:
            return Refuse(sender, RefusalCode.OUT_OF_TURN, "excluded from the run here")
        notice = self.chain.notice_about(sender)
        if notice is not None and epoch <= self.ring_epoch:  # a later epoch may take it back
            return self._excluded_refusal(sender, epoch, notice)
        if position.lap > last_lap(self.rule.max_laps) or (
            position.lap == last_lap(self.rule.max_laps) and position.hop != 0
        ):
            return Refuse(
                sender,
                RefusalCode.OUT_OF_TURN,
                f"{position} is beyond the last lap ({self.rule.max_laps} laps)",
            )
        if position.lap <= self.last_lap:
            return Refuse(
                sender,
                RefusalCode.STALE,
                f"{position} is not newer than lap {self.last_lap}, taken here",
            )
        if position.lap != self.last_lap + 1 and not self.returning:
            return Refuse(
                sender,
                RefusalCode.OUT_OF_TURN,
                f"{position} is not the next lap here ({self.last_lap + 1})",
            )
        if self.phase not in (Phase.WAITING, Phase.EXCLUDED) and not self._overtaken(sender):
            return Refuse(sender, RefusalCode.BUSY, f"still holding the model of {self.holding}")
        return None

    def _overtaken(self, sender: PeerId) -> bool:
        """In a ring of two, the model we are handing on to ``sender`` may come back
        before its ACK reaches us (``sender`` trained it at once): the blob's hop
        statements then show that ``sender`` took ours (:meth:`_arrived_model`)."""
        return self.phase is Phase.HANDING and any(
            h.purpose == "forward" and h.target == sender for h in self.handovers.values()
        )

    def _excluded_refusal(self, sender: PeerId, epoch: int, notice: DeadNotice) -> Refuse:
        # The notices up to the one naming the sender (the last MAX_PROOF of them): its
        # epoch does not say which of ours it holds (after a partition, chains fork).
        proof = self.chain.envelopes[max(0, notice.index + 1 - MAX_PROOF) : notice.index + 1]
        return Refuse(sender, RefusalCode.EXCLUDED, f"counted as dead: {notice.describe()}", proof)

    def _arrived(self, event: BlobArrived, now: float) -> list[Action]:
        if event.kind == "final":
            return self._arrived_final(event, now)
        return self._arrived_model(event, now)

    def _arrived_model(self, event: BlobArrived, now: float) -> list[Action]:
        taken = self.taken
        if taken is not None and (event.sender, event.kind, event.position) == (
            taken.sender,
            taken.kind,
            taken.position,
        ):
            if event.digest == taken.digest:
                return [Take(taken.receipt)]  # the same blob again: its ACK was lost
            return [
                Refuse(
                    event.sender,
                    RefusalCode.STALE,
                    f"a different blob for {event.position}, already taken here",
                )
            ]
        early = self._precheck(event.sender, event.kind, event.position, event.epoch)
        if early is not None:
            return [early]
        refusal, chain = self._check_model(event)
        if refusal is not None:
            return [refusal]
        assert chain is not None
        refusal, provenance = self._check_provenance(event, chain)
        if refusal is not None:
            return [refusal]
        assert provenance is not None
        actions = self._commit(chain)
        for h in [h for h in self.handovers.values() if h.purpose == "forward"]:
            if h.target != event.sender:
                continue
            # Overtaken by its own ACK (a ring of two): its statements, checked above,
            # show our successor took the model we were handing it; that hand-over is
            # done, and the copy we would have kept is obsolete as the model came round.
            del self.handovers[h.id]
            actions.append(Forget(h.copy))
        self.provenance, self._received = provenance, event.content
        receipt = self._receipt(event)
        self.taken = _Taken(event.sender, "model", event.position, event.digest, receipt)
        self.last_lap = event.position.lap
        self.seen = event.progress
        self.holding = event.position
        self.source = event.sender
        self.phase = Phase.TRAINING
        if self.returning:
            self.returning = False
            actions += [CancelTimer(ASK), CancelTimer(EXCLUDED_WAIT)]
            if self.excluded is not None:
                actions.append(Note("info", f"taken back into the run at {event.position}"))
            self.excluded = None
        actions += self._drop_kept()  # it came round: the copy we handed on is obsolete
        for h in [h for h in self.handovers.values() if h.purpose == "resend"]:
            del self.handovers[h.id]  # so is handing it on again
        actions += [CancelTimer(WAIT), CancelTimer(QUIET), Take(receipt), Train(event.position)]
        return actions

    def _receipt(self, event: BlobArrived) -> bytes:
        return CustodyReceipt.seal(
            self._signer,
            run_id=self.run_id,
            kind=event.kind,
            position=event.position,
            sender=event.sender,
            digest=event.digest,
        ).envelope

    def _extend(
        self, event: BlobArrived, receiver: PeerId | None
    ) -> tuple[Refuse | None, DeadChain | None]:
        if event.view != self.view_digest:
            return Refuse(event.sender, RefusalCode.WRONG_RUN, "the blob names another view"), None
        try:
            return None, self.chain.extend_with(event.chain, receiver=receiver, limits=self.limits)
        except ChainBehindError as exc:
            notice = self.chain.notice_about(event.sender)
            if notice is not None:
                return self._excluded_refusal(event.sender, event.epoch, notice), None
            if event.kind == "final":
                return None, self.chain  # we know of more deaths: keep ours
            return Refuse(event.sender, RefusalCode.OUT_OF_TURN, exc.reason), None
        except NoticeError as exc:
            return Refuse(event.sender, RefusalCode.BAD_CLAIM, exc.reason), None

    def _check_model(self, event: BlobArrived) -> tuple[Refuse | None, DeadChain | None]:
        refusal, chain = self._extend(event, self.me)
        if refusal is not None:
            return refusal, None
        assert chain is not None
        ring = chain.ring
        sender, pos = event.sender, event.position
        if not chain.has_majority:
            return self._minority_refusal(sender, chain), None
        notice = chain.notice_about(sender)
        if notice is not None:
            return Refuse(
                sender,
                RefusalCode.EXCLUDED,
                f"counted as dead: {notice.describe()}",
                chain.envelopes[notice.index : notice.index + 1],
            ), None
        if ring.successor(sender) != self.me:
            return Refuse(
                sender,
                RefusalCode.OUT_OF_TURN,
                f"{sender} is not our predecessor ({ring.successor(sender)} follows it)",
            ), None
        if event.epoch != self.view_epoch + len(chain):
            return Refuse(
                sender,
                RefusalCode.BAD_META,
                f"epoch {event.epoch} does not match its {len(chain)} dead notices",
            ), None
        expected_hop = ring.position(self.me)
        if pos.hop != expected_hop:
            return Refuse(
                sender,
                RefusalCode.OUT_OF_TURN,
                f"{pos}: our place in the ring is hop {expected_hop}",
            ), None
        # A returner's own record may hold what the run did not keep (a lap it closed in
        # a model it never handed on): it checks the blob on its own terms instead.
        problem = check_model_progress(
            Progress.initial() if self.returning else self.seen,
            event.progress,
            position=pos,
            sender_position=_trained_ring(chain, sender, event.progress).position(sender),
            rule=self.rule,
            returning=self.returning,
        )
        if problem is not None:
            return Refuse(sender, RefusalCode.BAD_META, problem), None
        return None, chain

    def _minority_refusal(self, sender: PeerId, chain: DeadChain) -> Refuse:
        return Refuse(
            sender,
            RefusalCode.BAD_CLAIM,
            f"its chain counts {len(chain.dead)} of the {len(chain.members)} members as dead: "
            "only a majority of the view goes on",
        )

    def _arrived_final(self, event: BlobArrived, now: float) -> list[Action]:
        final = self.final
        if final is not None:
            if event.digest == final.digest and event.sender == final.sender:
                return [Take(final.receipt)]
            return [Refuse(event.sender, RefusalCode.FINISHED, "already holding the final model")]
        if self.phase in (Phase.FINISHING, Phase.DISTRIBUTING, Phase.DONE):
            return [Refuse(event.sender, RefusalCode.FINISHED, "the run has ended here")]
        early = self._precheck(event.sender, event.kind, event.position, event.epoch)
        if early is not None:
            return [early]
        refusal, chain = self._extend(event, None)
        if refusal is not None:
            return [refusal]
        assert chain is not None
        problem = self._check_final(event, chain)
        if problem is not None:
            return [Refuse(event.sender, RefusalCode.NOT_FINAL, problem)]
        refusal, provenance = self._check_provenance(event, chain)
        if refusal is not None:
            return [refusal]
        assert event.origin is not None and event.seal is not None and provenance is not None
        actions = self._commit(chain)
        self.provenance = provenance
        receipt = self._receipt(event)
        self.final = _Taken(event.sender, "final", event.position, event.digest, receipt)
        self._final_origin, self._final_seal = event.origin, event.seal
        self.seen = event.progress
        actions += [Take(receipt)]
        for h in list(self.handovers.values()):  # our own hand-overs are moot now
            del self.handovers[h.id]
        actions += self._drop_kept()
        notice = self.chain.notice_about(self.me)
        if notice is not None and self.excluded is None:
            self.excluded = notice
            actions.append(Excluded(notice))
        reason = event.progress.stop.reason(patience=self.rule.patience)
        return actions + self._finish(FINAL, reason, event.origin, received=True)

    def _check_final(self, event: BlobArrived, chain: DeadChain) -> str | None:
        if event.origin is None or event.seal is None:
            return "a final model without its origin and seal"
        try:
            seal = FinalSeal.open(event.seal)
        except SealError as exc:
            return exc.reason
        if (
            seal.run_id != self.run_id
            or seal.origin != event.origin
            or seal.content != event.content
        ):
            return "the seal does not match this final model"
        if seal.model != event.model:
            return "the seal names another model file than the one this final model makes"
        ring = chain.ring
        if not chain.has_majority:
            return (
                f"its chain counts {len(chain.dead)} of the {len(chain.members)} members as "
                "dead: a final model needs a majority of the view live"
            )
        if event.origin not in ring.members or ring.leader != event.origin:
            return (
                f"it says {event.origin} ended the run, but only the lowest live member "
                f"({ring.leader}) closes laps"
            )
        if event.sender in ring.dead:
            return f"{event.sender} is counted as dead and cannot hand on the final model"
        return check_final_progress(self.seen, event.progress, rule=self.rule)

    def _check_provenance(
        self, event: BlobArrived, chain: DeadChain
    ) -> tuple[Refuse | None, HopChain | None]:
        """The blob's hop statements, checked: they extend ours and end with the
        statement of the member that made this state (:mod:`fedup.protocol.provenance`)."""
        # Only a member once counted as dead may see its own last statements dropped (the
        # run did not keep them); anyone else's chain is extended, never cut back.
        rewind = chain.was_dead(self.me)
        try:
            provenance = self.provenance.extend_with(
                event.provenance, dead=chain, limits=self.limits, rewind=rewind
            )
        except ProvenanceError as exc:
            return Refuse(event.sender, exc.code, exc.reason), None
        problem = self._last_statement_problem(provenance, event, chain)
        if problem is not None:
            return Refuse(event.sender, RefusalCode.BAD_PROVENANCE, problem), None
        return None, provenance

    def _last_statement_problem(
        self, provenance: HopChain, event: BlobArrived, chain: DeadChain
    ) -> str | None:
        last = provenance.last
        if last is None:
            return "the blob carries no hop statement"
        author = event.origin if event.kind == "final" else event.sender
        if last.signer != author:
            return f"the last hop statement is by {last.signer}, not by {author}, which made it"
        trained = Position(event.progress.lap, event.progress.hop)
        if event.kind == "final":  # the head's hop that closed the last lap came after it
            trained = Position(event.progress.lap + 1, 0)
        if last.position != trained:
            return f"the last hop statement is about {last.position}, the metadata about {trained}"
        if event.kind != "final":
            try:
                place = provenance.next_place(chain)
            except ProvenanceError as exc:
                return exc.reason
            if place != (self.me, event.position):
                return f"the ring puts {place[0]} at {place[1]} next, not us at {event.position}"
        if last.sent != event.content:
            return (
                f"the last hop statement ({last.describe()}) names another model than the "
                "blob carries"
            )
        return None

    def _proven_exclusion(self, proof: tuple[bytes, ...]) -> DeadNotice | None:
        """The notice naming us, if ``proof`` (notices ``k ..``, the last one naming us)
        continues the first ``k`` notices of our chain validly; our own notices after
        those (made on our side of a partition) give way to the run's."""
        if not proof:
            return None
        try:
            first = open_chain_notice(
                proof[0], max_index=len(self.chain) + MAX_PROOF, limits=self.limits
            ).index
            if first > len(self.chain):
                return None  # we lack notices before the proof: it cannot be checked here
            base = attrs.evolve(self.chain, notices=self.chain.notices[:first])
            chain = base.extend_with((*base.envelopes, *proof), receiver=None, limits=self.limits)
        except NoticeError:
            return None
        notice = chain.notice_about(self.me)
        if notice is None:
            return None
        self.chain = attrs.evolve(chain, notices=chain.notices[: notice.index + 1])
        return notice

    def _become_excluded(self, notice: DeadNotice) -> list[Action]:
        self.excluded = notice
        self.phase = Phase.EXCLUDED
        actions: list[Action] = [Excluded(notice)]
        for h in list(self.handovers.values()):
            del self.handovers[h.id]
        if self.holding is not None:
            actions.append(Forget(self.holding))
            self.holding = None
        actions += self._drop_kept()
        actions += [
            CancelTimer(WAIT),
            CancelTimer(QUIET),
            SetTimer(EXCLUDED_WAIT, self.limits.excluded_wait),
        ]
        return actions + self.ask_to_return(nearby=False)

    # --- returning ------------------------------------------------------------------------

    def ask_to_return(self, *, nearby: bool | None = None) -> list[Action]:
        """Ask the members to take this member back: a new signed request, repeated
        every ``return_interval`` until a model comes.  After an exclusion or a restart
        it goes to every member; when this member only heard nothing for a while
        (``nearby``), to the members just before it in the ring, the only ones that can
        take it back unless many before it died too (a quiet wait is common in a long
        ring: asking everyone each time would cost every member a link to every other)."""
        if nearby is not None:
            self._ask_nearby = nearby
        earlier = self.chain.returns_of(self.me)
        if earlier:
            self.asked = max(self.asked, earlier[-1].request.counter)
        self.asked += 1
        self.returning = True
        request = ReturnRequest.seal(self._signer, run_id=self.run_id, counter=self.asked)
        to = self._predecessors(NEARBY_ASKS) if self._ask_nearby else None
        return [AskToReturn(request.envelope, to), SetTimer(ASK, self.limits.return_interval)]

    def _predecessors(self, count: int) -> tuple[PeerId, ...]:
        """The ``count`` members before this one in the ring order (live or not)."""
        members = self.chain.members
        i = members.index(self.me)
        out = [members[(i - k) % len(members)] for k in range(1, len(members))]
        return tuple(out[:count])

    def _return_asked(self, event: ReturnAsked, now: float) -> list[Action]:
        r = event.request
        if r.run_id != self.run_id or r.peer not in self.chain.ring or r.peer == self.me:
            return [Refuse(r.peer, RefusalCode.BAD_CLAIM, "return request: not for this run")]
        known = self.asks.get(r.peer)
        if known is None or r.counter > known.counter:
            self.asks[r.peer] = r
        actions: list[Action] = [Note("info", f"{r.peer} asks to be taken back ({r.counter})")]
        if self.phase in (Phase.DISTRIBUTING, Phase.DONE) and self._serves_final():
            actions += self._send_final_to(r.peer, now)
        return actions

    def _serves_final(self) -> bool:
        """Whether this member holds the federation's final model to give a returner."""
        return (
            self._final_seal is not None
            and self._final_chain is not None
            and self.excluded is None
            and self.stop_reason != "members-lost"
        )

    def _send_final_to(self, peer: PeerId, now: float) -> list[Action]:
        if any(h.target == peer and h.kind == "final" for h in self.handovers.values()):
            return []
        last = self._final_sent_at.get(peer)
        if last is not None and now - last < self.limits.return_interval:
            # At most one final per member per return_interval: a small signed request
            # must not buy a member a model transfer from us as often as it likes.
            why = f"{peer} asks for the final model {now - last:g} s after we handed it"
            return [Note("info", f"{why}: not again before {self.limits.return_interval:g} s")]
        self._final_sent_at[peer] = now
        assert self._final_chain is not None
        h = _Handover(
            self._new_id(),
            "final-dead",
            "final",
            FINAL,
            peer,
            self._final_position(),
            self.chain,
            now,
            self._final_chain,
        )
        self.handovers[h.id] = h
        self.phase = Phase.DISTRIBUTING
        return [Note("info", f"the run has ended: handing {peer} the final model"), self._send(h)]

    # --- finishing -----------------------------------------------------------------------

    def _finish(
        self, copy: Position, reason: str, ended_by: PeerId, *, received: bool = False
    ) -> list[Action]:
        self.phase = Phase.FINISHING
        self.ended_by = ended_by
        self.stop_reason = reason
        self._finish_copy = copy
        self._received_final = received
        actions: list[Action] = [
            CancelTimer(WAIT),
            CancelTimer(QUIET),
            CancelTimer(WATCH),
            CancelTimer(ASK),
        ]
        self.returning = False
        if self.kept is not None and self.kept.copy != copy:
            actions.append(Forget(self.kept.copy))
            self.kept = None
        return [*actions, Finish(copy, reason, ended_by, self.excluded)]

    def _final_saved(self, event: FinalSaved, now: float) -> list[Action]:
        if self.excluded is not None or self.stop_reason == "members-lost":
            self.phase = Phase.DONE
            return [Finished()]
        if not self._received_final:
            # We ended the run: seal the final model (the driver supplied its content
            # digest through :meth:`seal_final`) and start its distribution.
            if self._final_seal is None:
                raise LocalProtocolError("seal_final() must be called before FinalSaved")
        self.phase = Phase.DISTRIBUTING
        self._final_chain = self.provenance
        return self._start_final_ring(now)

    def seal_final(self, content: bytes, model: bytes) -> bytes:
        """Sign the final model this member produced: its content digest and the SHA-256
        of the model file saved from it; call on Finish (also for ``members-lost``, so
        the saved model's provenance ends with a seal)."""
        if self.ended_by != self.me:
            raise LocalProtocolError("only the member that ended the run seals its final model")
        seal = FinalSeal.seal(self._signer, run_id=self.run_id, content=content, model=model)
        self._final_origin, self._final_seal = self.me, seal.envelope
        return seal.envelope

    def provenance_record(self) -> tuple[tuple[bytes, ...], HopChain, bytes]:
        """The final model's provenance, once :class:`Finish` was returned (and, by the
        member that ended the run, :meth:`seal_final` called): the dead notices, the chain
        of hop statements and the seal.  Raises LocalProtocolError before then."""
        seal = self._final_seal
        if self.phase is not Phase.FINISHING or seal is None:
            raise LocalProtocolError("the final model's provenance is not known here yet")
        return self.chain.envelopes, self.provenance, seal

    def _final_position(self) -> Position:
        return Position(max(self.seen.lap, 0), 0)

    def _start_final_ring(self, now: float) -> list[Action]:
        origin, final_chain = self._final_origin, self._final_chain
        assert origin is not None and final_chain is not None
        successors = [p for p in self.chain.ring.successors(self.me)]
        if not successors or successors[0] == origin:
            return self._final_ring_done(now) + self._maybe_done()
        h = _Handover(
            self._new_id(),
            "final",
            "final",
            FINAL,
            successors[0],
            self._final_position(),
            self.chain,
            now,
            final_chain,
        )
        self.handovers[h.id] = h
        return [self._send(h)]

    def _next_final_target(self, h: _Handover, now: float) -> list[Action]:
        successors = self.chain.ring.successors(self.me)
        later = successors[successors.index(h.target) + 1 :] if h.target in successors else []
        if not later or later[0] == self._final_origin:
            del self.handovers[h.id]
            return self._final_ring_done(now) + self._maybe_done()
        h.target, h.attempts, h.started = later[0], 1, now
        return [self._send(h)]

    def _final_ring_done(self, now: float) -> list[Action]:
        """The final went on round the ring; its origin also hands it to the dead members."""
        if self._final_origin != self.me or self._final_dead_sent:
            return []
        self._final_dead_sent = True
        final_chain = self._final_chain
        assert final_chain is not None, "the final model's hop statements are kept to send"
        actions: list[Action] = []
        for dead in sorted(self.chain.dead):
            h = _Handover(
                self._new_id(),
                "final-dead",
                "final",
                FINAL,
                dead,
                self._final_position(),
                self.chain,
                now,
                final_chain,
            )
            self.handovers[h.id] = h
            actions.append(self._send(h))
        return actions

    _final_dead_sent = False
    _final_chain: HopChain | None = None
    """The final model's hop statements, while this member distributes it."""
    _finish_copy: Position = FINAL
    _received_final = False

    _finished = False

    def _maybe_done(self) -> list[Action]:
        if self.phase is Phase.DISTRIBUTING and not self.handovers:
            self.phase = Phase.DONE
            if self._finished:
                return []  # a final handed to a returner after the run
            self._finished = True
            return [Finished()]
        return []

    def _ignored(self, event: object, why: str) -> Ignored:
        return Ignored(type(event).__name__, self.phase, why)


def _trained_ring(chain: DeadChain, sender: PeerId, progress: Progress) -> Ring:
    """The ring ``sender`` trained in: without the deaths it declared (and the members
    it took back) while handing on."""
    at = Position(progress.lap, progress.hop)
    notices = list(chain.notices)
    while notices and notices[-1].claimer == sender and notices[-1].at == at:
        notices.pop()
    if len(notices) == len(chain.notices):
        return chain.ring  # no notices made on the way: the chain's own ring
    return Ring(chain.members, dead_after(chain.members, notices))


def _reported(notice: ChainNotice, ours: bool) -> Action:
    """The action that reports ``notice``, new to this member."""
    if isinstance(notice, ReturnNotice):
        return Returned(notice, ours)
    return Declared(notice, ours)
