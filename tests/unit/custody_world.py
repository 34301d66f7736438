"""A whole ring of custody machines wired together in pure Python (no trio, torch or sockets).

:class:`PureRing` plays the trio driver's part for N :class:`CustodyMachine` s:
it delivers every ``Send`` at once (header check, then the whole blob), turns
``Take``/``Refuse`` into the sender's ``HandedOver``/``HandOverFailed``, fires
timers on a virtual clock, and "trains" by advancing the ring metadata the way
:func:`fedup.learn.ring.train_hop` does (:func:`fake_train`), with a loss per
lap from a function.  Members can crash (their machine stops; a hand-over to it
is unreachable), train slowly, or misbehave through ``rewrite`` hooks that
replace what they send.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.identity import Identity
from fedup.protocol.custody import CustodyMachine, StopRule
from fedup.protocol.custody_events import (
    FINAL,
    INITIAL,
    Action,
    AskToReturn,
    Begin,
    BlobArrived,
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
)
from fedup.protocol.laps import LapRecord, Position, Progress
from fedup.protocol.peer_id import PeerId
from fedup.protocol.returns import ReturnRequest

VIEW = hashlib.sha256(b"view").digest()
RUN = b"R" * 16


def fake_train(
    progress: Progress, position: Position, rule: StopRule, loss: Callable[[int], float]
) -> Progress:
    """The metadata :func:`fedup.learn.ring.train_hop` would produce (no tensors)."""
    m = progress
    if position.lap != m.lap and m.lap >= 0:  # the first hop of a lap closes the last one
        judged = m.judged_lap + 1
        record = LapRecord(judged, loss(judged), 0.5, 0.5, 100, 1000 * (judged + 2))
        stop, _ = m.stop.judge(record, tolerance=rule.tolerance)
        history = (*m.history, record)[-8:]
        done = stop.holds(judged_lap=judged, patience=rule.patience, max_laps=rule.max_laps)
        m = Progress(m.lap, m.hop, done, judged, stop, history)
        if done:
            return m
    return attrs.evolve(m, lap=position.lap, hop=position.hop)


def digest_of(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


@attrs.frozen
class Sent:
    """One blob as a member sends it (what a hostile hook may rewrite)."""

    sender: PeerId
    target: PeerId
    kind: str
    position: Position
    epoch: int
    chain: tuple[bytes, ...]
    progress: Progress
    origin: PeerId | None = None
    seal: bytes | None = None
    content: bytes = b""
    view: bytes = VIEW
    provenance: bytes | memoryview = b""
    model: bytes = b""

    @property
    def digest(self) -> bytes:
        return digest_of(
            self.sender, self.kind, self.position, self.progress, self.chain, bytes(self.provenance)
        )

    def arrived(self) -> BlobArrived:
        return BlobArrived(
            self.sender,
            self.kind,
            self.position,
            self.epoch,
            self.digest,
            self.view,  # type: ignore[arg-type]
            self.chain,
            self.progress,
            self.origin,
            self.seal,
            self.content,
            self.provenance,
            self.model,
        )


Rewrite = Callable[["PureRing", Sent], list[Sent]]
"""A hostile member's hook: what to send (in order) instead of ``Sent``; the last one's
outcome is reported to its machine."""


class PureRing:
    def __init__(
        self,
        n: int,
        *,
        max_laps: int = 4,
        patience: int = 3,
        tolerance: float = 1e-3,
        loss: Callable[[int], float] = lambda lap: 1.0 / (lap + 3),
        limits: Limits = DEFAULT_LIMITS,
        first: int = 1,
    ) -> None:
        self.ids = sorted(
            (Identity(bytes([first + i]) * 32) for i in range(n)), key=lambda i: i.peer_id
        )
        self.peers = [i.peer_id for i in self.ids]
        self.rule = StopRule(patience=patience, tolerance=tolerance, max_laps=max_laps)
        self.loss = loss
        self.limits = limits
        self.machines = {
            i.peer_id: CustodyMachine(
                i,
                run_id=RUN,
                view_digest=VIEW,
                view_epoch=0,
                members=self.peers,
                rule=self.rule,
                limits=limits,
                initial=content_of(Progress.initial()),
            )
            for i in self.ids
        }
        self.now = 0.0
        self.queue: deque[tuple[PeerId, Event]] = deque()
        self.later: list[tuple[float, int, PeerId, Event]] = []
        self._seq = 0
        self.timers: dict[tuple[PeerId, str], float] = {}
        self.slots: dict[PeerId, dict[Position, Progress]] = {p: {} for p in self.peers}
        self.inbox: dict[PeerId, Progress] = {}
        self.crashed: set[PeerId] = set()
        self.train_time: dict[PeerId, float] = {}
        self.rewrite: dict[PeerId, Rewrite] = {}
        self.finals: dict[PeerId, tuple[Finish, Progress]] = {}
        self.provenance: dict[PeerId, tuple[tuple[bytes, ...], bytes, bytes]] = {}
        """What each member would write as its final model's provenance."""
        self.finished: set[PeerId] = set()
        self.sent: list[Sent] = []
        """Every blob a machine asked to send (before a hostile member's rewrite)."""
        self.failed: dict[PeerId, str] = {}
        self.log: list[tuple[float, PeerId, Action]] = []
        self.trained: list[tuple[PeerId, Position]] = []
        self.deliver_returns = True
        """Whether a member's return requests reach the others (False: they are lost)."""
        self.crash_when: dict[tuple[PeerId, Position], str] = {}
        """Crash a member when it trains at a position: 'before' taking, or 'after' training."""

    # --- driving ---------------------------------------------------------------------

    def start(self) -> None:
        for p in self.peers:
            self.queue.append((p, Begin()))

    def feed(self, peer: PeerId, event: Event) -> list[Action]:
        """Handle one event now and carry out its actions; returns them."""
        if peer in self.crashed:
            return []
        actions = self.machines[peer].handle(event, self.now)
        for a in actions:
            self.log.append((self.now, peer, a))
            self._do(peer, a)
        return actions

    def run(self, *, until: float = 10_000.0, max_steps: int = 100_000) -> None:
        steps = 0
        while steps < max_steps:
            steps += 1
            if self.queue:
                peer, event = self.queue.popleft()
                self.feed(peer, event)
                continue
            due = [(t, 0, p, TimerFired(name)) for (p, name), t in self.timers.items()]
            due += [(t, 1, p, e) for t, _, p, e in self.later]
            if not due:
                return
            t, kind, peer, event = min(due, key=lambda d: (d[0], d[1], d[2].raw))
            if t > until:
                return
            self.now = max(self.now, t)
            if kind == 0:
                assert isinstance(event, TimerFired)
                del self.timers[(peer, event.name)]
            else:
                self.later = [x for x in self.later if not (x[2] == peer and x[3] is event)]
            self.feed(peer, event)
        raise AssertionError("the ring did not settle within max_steps")

    def crash(self, peer: PeerId) -> None:
        self.crashed.add(peer)
        self.timers = {k: v for k, v in self.timers.items() if k[0] != peer}
        self.later = [x for x in self.later if x[2] != peer]

    # --- carrying out actions ---------------------------------------------------------------

    def _do(self, peer: PeerId, a: Action) -> None:
        if isinstance(a, Train):
            self._train(peer, a)
        elif isinstance(a, Send):
            self._send(peer, a)
        elif isinstance(a, TellPassed):
            self.queue.append((a.to, PassedArrived(peer, a.receipt)))
        elif isinstance(a, Forget):
            self.slots[peer].pop(a.copy, None)
        elif isinstance(a, Finish):
            self._finish(peer, a)
        elif isinstance(a, Finished):
            self.finished.add(peer)
        elif isinstance(a, Failed):
            self.failed[peer] = a.reason
        elif isinstance(a, SetTimer):
            self.timers[(peer, a.name)] = self.now + a.seconds
        elif isinstance(a, CancelTimer):
            self.timers.pop((peer, a.name), None)
        elif isinstance(a, AskToReturn):
            if self.deliver_returns:
                request = ReturnRequest.open(a.request)
                for other in self.peers if a.to is None else a.to:
                    if other != peer and other not in self.crashed:
                        self.queue.append((other, ReturnAsked(request)))
        else:
            assert isinstance(a, Take | Refuse | Declared | Returned | Excluded | Note | Ignored), a

    def _train(self, peer: PeerId, a: Train) -> None:
        position = a.position
        when = self.crash_when.get((peer, position))
        if when == "before":
            self.crash(peer)
            return
        if a.source == INITIAL:
            before = Progress.initial()
        elif a.source is not None:
            before = self.slots[peer][a.source]
        else:
            before = self.inbox.pop(peer)
        after = fake_train(before, position, self.rule, self.loss)
        self.slots[peer][position] = after
        self.trained.append((peer, position))
        if when == "after":
            self.crash(peer)
            return
        samples = SAMPLES if position.lap < self.rule.max_laps and not after.done else 0
        trained = Trained(position, after, content=content_of(after), samples=samples)
        delay = self.train_time.get(peer, 0.0)
        if delay == 0:
            self.queue.append((peer, trained))
            return
        self._seq += 1
        self.later.append((self.now + delay, self._seq, peer, trained))

    def _finish(self, peer: PeerId, a: Finish) -> None:
        progress = self.slots[peer][a.copy] if a.copy != FINAL else self.inbox.pop(peer)
        self.finals[peer] = (a, progress)
        self.slots[peer][FINAL] = progress
        machine = self.machines[peer]
        if a.ended_by == peer:
            machine.seal_final(content_of(progress), model_of(progress))
        dead, hops, seal = machine.provenance_record()
        self.provenance[peer] = (dead, hops.data, seal)
        self.queue.append((peer, FinalSaved()))

    def blob_of(self, peer: PeerId, a: Send) -> Sent:
        progress = self.slots[peer][a.copy]
        return Sent(
            peer,
            a.target,
            a.kind,
            a.position,
            a.epoch,
            a.chain,
            progress,
            a.origin,
            a.seal,
            content_of(progress),
            provenance=a.provenance,
            model=model_of(progress) if a.kind == "final" else b"",
        )

    def _send(self, peer: PeerId, a: Send) -> None:
        blobs = [self.blob_of(peer, a)]
        self.sent.append(blobs[0])
        hook = self.rewrite.get(peer)
        if hook is not None:
            blobs = hook(self, blobs[0])
        outcome: Event | None = None
        for blob in blobs:
            outcome = self.deliver(blob, handover=a.handover)
        if outcome is not None:  # the sender reads the ACK before anything else happens
            self.queue.appendleft((peer, outcome))

    def deliver(self, blob: Sent, *, handover: int = 0) -> Event:
        """Hand ``blob`` to its target now; the sender's outcome event."""
        target = blob.target
        if target in self.crashed:
            return HandOverFailed(handover, Failure(FailureKind.UNREACHABLE, "nothing listens"))
        machine = self.machines[target]
        offered = machine.handle(
            BlobOffered(blob.sender, blob.kind, blob.position, blob.epoch),
            self.now,  # type: ignore[arg-type]
        )
        for act in offered:
            self.log.append((self.now, target, act))
        refusal = next((x for x in offered if isinstance(x, Refuse)), None)
        if refusal is None:
            self.inbox[target] = blob.progress  # what its Train or Finish action takes
            actions = self.feed(target, blob.arrived())
            self.inbox.pop(target, None)  # taken by then, or refused
            refusal = next((x for x in actions if isinstance(x, Refuse)), None)
            take = next((x for x in actions if isinstance(x, Take)), None)
            if take is not None:
                return HandedOver(handover, take.receipt, blob.digest)
        assert refusal is not None
        return HandOverFailed(
            handover,
            Failure(FailureKind.REFUSED, refusal.reason, refusal.code, refusal.proof),
        )

    # --- reading results ---------------------------------------------------------------

    def actions_of(self, peer: PeerId, kind: type) -> list[Any]:
        return [a for _, p, a in self.log if p == peer and isinstance(a, kind)]

    def refusals_by(self, peer: PeerId) -> list[Refuse]:
        return self.actions_of(peer, Refuse)

    def final_contents(self) -> set[bytes]:
        return {content_of(p) for _, p in self.finals.values()}


def content_of(progress: Progress) -> bytes:
    return digest_of("content", progress)


def model_of(progress: Progress) -> bytes:
    """What stands for the SHA-256 of the model file saved from a final state."""
    return digest_of("model", progress)


SAMPLES = 100
"""Samples each training hop of the pure world claims."""
