"""The trio driver of the custody machine: links, training, files, timers; no rules.

:class:`CustodyDriver` feeds :class:`~fedup.protocol.custody.CustodyMachine`
what happens (a blob's header and then the whole decoded blob, the end of a
hop's training, the outcome of a hand-over, ``passed``, fired timers) and
carries out what it returns: train (with the learning layer, in a worker
thread when the peer trains in threads), hand a state to a neighbour over its
link, tell ``passed``, save the final model.  The rules are all the machine's.

The states it keeps are the machine's *slots*: the state trained at each
position it still needs (what it handed on and keeps until ``passed``), the
final model, and the blob just taken (until it is trained).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeAlias

import attrs
import trio

from fedup.config import Limits
from fedup.errors import FedupError, PeerTimeoutError, RemoteProtocolError, SilentPeerError
from fedup.learn.lap_sums import LapMasks
from fedup.learn.ring import (
    HopMetrics,
    LapResult,
    RingSettings,
    RingState,
    evaluate_state,
    final_weights,
    initial_state,
    train_hop,
)
from fedup.learn.ring_payload import RingCodec, content_of
from fedup.learn.weights import safetensors_parts
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.links import OutboundLink, serve_link
from fedup.net.timers import Timers
from fedup.net.transport import DialError
from fedup.peer import events as ev
from fedup.peer.outputs import RunOutputs, RunSummary, federation_json, lap_line, shown_figures
from fedup.peer.run_state_file import RunStateFile
from fedup.peer.tamper import OutgoingBlob, Tamper
from fedup.peer.tasks import Started, TaskBuilder, federation_stats
from fedup.protocol import custody_events as ce
from fedup.protocol.blob import BlobHeader, BlobRefusedError
from fedup.protocol.custody import CustodyMachine, StopRule
from fedup.protocol.envelope import Signer
from fedup.protocol.handshake import AbortCode, HandshakeError
from fedup.protocol.laps import Position, Progress
from fedup.protocol.messages import Message, Passed, Return, encode_message
from fedup.protocol.notices import DeadNotice, FinalSeal
from fedup.protocol.peer_id import PeerId
from fedup.protocol.provenance import provenance_file
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import ReturnError, ReturnRequest
from fedup.protocol.run_state import Role, RunState, encode_run_state
from fedup.protocol.view import SignedView

__all__ = ["CustodyDriver", "RunError"]

log = logging.getLogger("fedup.federation")

Dial = Callable[[PeerId], Awaitable[SecureChannel]]
Confirm = Callable[[PeerId, bytes, bytes], bool]
"""``confirm(sender, run_id, view_digest)``: a blob arrived before our commit did: does it
make the view hold?  (The formation driver's answer.)"""


TWO_MEMBERS_LEFT = (
    "two members are left: from now on each can work out the other's validation results "
    "exactly (the lap totals minus its own); see docs/federation.md, 'What is shared'"
)


class RunError(FedupError):
    """The run could not finish here (no model arrived in time, training failed, ...)."""


class Refusal(RemoteProtocolError):
    """A blob the custody machine refused; carries the code (and proof) for the NACK."""

    def __init__(self, refuse: ce.Refuse) -> None:
        super().__init__(refuse.reason)
        self.code = refuse.code
        self.proof = refuse.proof


@attrs.define
class _Run:
    """Counters for the summary."""

    bytes_sent: int = 0
    hops: int = 0
    dead: dict[PeerId, str] = attrs.field(factory=dict)


class _Keep:
    """No new run state among the items a writer took (only flush markers)."""


_KEEP = _Keep()
_Write: TypeAlias = RunState | trio.Event | None
"""What the run-state writer takes: a state to save, None (delete), or a flush marker."""


class CustodyDriver:
    """This peer's custody of one run, from the view that holds to the final model."""

    def __init__(
        self,
        *,
        identity: Signer,
        signed: SignedView,
        builder: TaskBuilder,
        template: RingState,
        dial: Dial,
        out_dir: Path,
        limits: Limits,
        events: ev.EventHub,
        confirm: Confirm | None = None,
        tamper: Tamper | None = None,
        train_delay: float = 0.0,
        state_file: RunStateFile | None = None,
        durable: bool = True,
    ) -> None:
        view = signed.view
        self.me = identity.peer_id
        self._identity = identity
        self.signed = signed
        self.view_digest = signed.digest
        """The view's digest (a SHA-256 of its envelope, some 250 kB among a thousand
        members: made once, not for every blob sent)."""
        self.view = view
        self.run_id = view.run_id
        self.members = view.member_ids
        self._builder = builder
        self._limits = limits
        self._events = events
        self._dial = dial
        self._confirm = confirm
        self._tamper = tamper
        self._train_delay = train_delay
        self.schema, self.task = builder.for_view(view)
        self.ring_settings = RingSettings.for_run(view.settings)
        self.template = template
        self.codec = RingCodec(template, limits=limits)
        self.federation = federation_stats(self.schema, len(self.members))
        self.machine = CustodyMachine(
            identity,
            run_id=self.run_id,
            view_digest=self.view_digest,
            view_epoch=view.epoch,
            members=self.members,
            rule=StopRule(
                patience=view.settings.patience,
                tolerance=view.settings.tolerance,
                max_laps=view.settings.max_laps,
            ),
            limits=limits,
            initial=content_of(template, limits=limits),
        )
        self.outputs = RunOutputs(out_dir, durable=durable)
        self._timers = Timers(self._fire)
        self._slots: dict[Position, RingState] = {}
        self._lap_masks = LapMasks()
        """The masks on the validation sums of the laps we open (fedup.learn.lap_sums)."""
        self._bodies: dict[Position, memoryview] = {}
        """The encoded tensors of the states we trained (checked, ready to send)."""
        self._inbox: RingState | None = None
        self._links: dict[PeerId, OutboundLink] = {}
        self._inbound: dict[PeerId, FramedStream] = {}
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()
        self._counts = _Run()
        self.summary: RunSummary | None = None
        self.failure: str | None = None
        self.begun = False
        self._history: dict[int, LapResult] = {}
        """Every lap result seen here, by lap (the metadata carries only the last few)."""
        self._taking = False
        """Inside ``decide()``: training inline (on the event loop, the simulator's
        way) waits until the blob's ACK went out, or the sender would wait for the
        ACK as long as the hop trains; training in a worker thread starts at once,
        while the ACK goes out (a blob taken is trained whether or not its ACK
        arrives)."""
        self._after_ack: tuple[Position, RingState] | None = None
        self._unlogged: tuple[RingState, HopMetrics, bool] | None = None
        """The hop trained last, until its line is logged (:meth:`_log_trained`)."""
        self._final_file: tuple[RingState, list[memoryview], bytes] | None = None
        """A final state, the bytes of the model file made from it, and their SHA-256."""
        self._state_file = state_file
        self._saved_key: tuple[object, ...] | None = None
        """What the run-state file last saved (phase, positions, counts): written again
        when it changes."""
        self._saved_state: tuple[int, Role, bytes] | None = None
        """The ring state last saved: its object's id, its role and its encoding."""
        self._held: RingState | None = None
        """The state this member trains now (saved as ``held`` until it hands it on)."""
        self._writes: trio.MemorySendChannel[_Write] | None = None

    @classmethod
    async def template_for(cls, builder: TaskBuilder, signed: SignedView) -> RingState:
        """The initial state of the run (the decoding template), built off the event loop."""
        view = signed.view
        schema = builder.source.parse_schema(view.schema)

        def build() -> RingState:
            task = builder.task_for(schema, view.settings)
            return initial_state(task, RingSettings.for_run(view.settings))

        return await builder.run(build)

    # --- running ----------------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the timers, hand-overs and training while the peer lives."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timers.run)
            if self._state_file is not None and self._builder.in_thread:
                send, receive = trio.open_memory_channel[_Write](math.inf)
                self._writes = send
                nursery.start_soon(self._write_states, receive)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.outputs.close()
                with trio.CancelScope(shield=True):
                    for link in list(self._links.values()):
                        await link.aclose()

    def begin(self) -> None:
        """The view holds: start training (idempotent)."""
        if self.begun:
            return
        self.begun = True
        if log.isEnabledFor(logging.INFO):  # a thousand members' names: not for nothing
            log.info(
                "run %s: %d members, ring %s",
                self.run_id.hex()[:8],
                len(self.members),
                " -> ".join(p.short for p in self.members),
            )
        self.outputs.save_federation(federation_json(self.signed, self.schema))
        self.feed(ce.Begin())

    async def run(self) -> RunSummary:
        """Wait until the final model is saved here; raises :class:`RunError` if the run fails."""
        await self._done.wait()
        await self._flush_writes()
        if self.summary is None:
            raise RunError(self.failure or "the run ended without a model")
        return self.summary

    # --- feeding the machine ------------------------------------------------------------

    def _fire(self, name: str) -> None:
        self.feed(ce.TimerFired(name))

    def feed(self, event: ce.Event) -> list[ce.Action]:
        actions = self.machine.handle(event, trio.current_time())
        for action in actions:
            self._carry_out(action)
        self._save_state()
        return actions

    # --- the run-state file (fedup.peer.run_state_file) ---------------------------------

    def _save_state(self) -> None:
        """Write the run-state file again if custody changed (a blob taken, a hop
        trained, a hand-over done, ``passed``, a notice learnt); delete it once the run
        has ended here."""
        if self._state_file is None:
            return
        m = self.machine
        memory = m.memory()
        if memory is None:
            # The file goes once the run is over here (its outputs written, the final
            # handed on); a crash while saving or handing on the final leaves the last
            # state saved: restarted, the member asks, and gets the final again.
            if m.phase is ce.Phase.DONE and self._saved_key != ("ended",):
                self._saved_key = ("ended",)
                self._write(None)
            return
        kept = m.kept.copy if m.kept is not None else None
        key = (m.phase, m.holding, kept, len(m.chain), m.provenance.count, m.asked, len(m.asks))
        if key == self._saved_key:
            return
        self._saved_key = key
        role, state, slot = self._state_to_save()
        if state is None:
            encoded = self._saved_state[2] if self._saved_state is not None else None
        elif self._saved_state is not None and self._saved_state[:2] == (id(state), role):
            encoded = self._saved_state[2]
        else:
            body = self._bodies.get(slot) if slot is not None else None
            encoded = bytes(self.codec.encode(state, view=self.view_digest, body=body))
            self._saved_state = (id(state), role, encoded)
        saved = RunState(
            network=self._state_file.network,
            peer=self.me,
            out_dir=str(Path(self.outputs.directory).absolute()),
            view=self.signed.envelope,
            custody=memory,
            state=encoded,
            role=role if state is not None else "seen",
            history=tuple(self._history[lap] for lap in sorted(self._history)),
            masks=self._lap_masks.export(),
            sent=self._counts.bytes_sent,
            hops=self._counts.hops,
        )
        self._write(saved)

    def _state_to_save(self) -> tuple[Role, RingState | None, Position | None]:
        """The ring state to save, its role, and its slot (None: keep the last saved)."""
        m = self.machine
        if m.phase is ce.Phase.TRAINING and self._held is not None:
            return "held", self._held, None
        if m.phase is ce.Phase.HANDING and m.holding is not None:
            return "kept", self._slots.get(m.holding), m.holding
        if m.kept is not None:
            return "kept", self._slots.get(m.kept.copy), m.kept.copy
        if m.phase is ce.Phase.READY:
            return "seen", self.template, None
        return "seen", None, None

    def _write(self, data: RunState | None) -> None:
        """Save ``data`` (None: delete the file), in order: inline in the simulator, in
        a worker thread otherwise (encoded there too; the newest write wins; each is
        atomic)."""
        assert self._state_file is not None
        if self._writes is None:
            self._write_now(data)
        else:
            self._writes.send_nowait(data)

    def _write_now(self, data: RunState | None) -> None:
        assert self._state_file is not None
        try:
            if data is None:
                self._state_file.discard()
            else:
                self._state_file.save(encode_run_state(data))
        except OSError as exc:
            log.error("cannot save the run state to %s: %s", self._state_file.path, exc)

    async def _write_states(self, receive: trio.MemoryReceiveChannel[_Write]) -> None:
        async with receive:
            async for item in receive:
                flushed: list[trio.Event] = []
                data: RunState | _Keep | None = _KEEP
                while True:  # only the newest of the writes queued meanwhile matters
                    if isinstance(item, trio.Event):
                        flushed.append(item)
                    else:
                        data = item
                    try:
                        item = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                if not isinstance(data, _Keep):
                    await trio.to_thread.run_sync(self._write_now, data)
                for event in flushed:
                    event.set()

    async def _flush_writes(self) -> None:
        """Wait until every write asked for so far is done (the run's end: its file is
        deleted before the peer stops)."""
        if self._writes is not None:
            done = trio.Event()
            self._writes.send_nowait(done)
            await done.wait()

    def resume(self, saved: RunState) -> None:
        """Go on with the run saved before a restart (instead of :meth:`begin`)."""
        self.begun = True
        # Decoded from a writable copy: the tensors share the buffer, and torch must not
        # be handed read-only memory it may write to.
        saved_state = bytearray(saved.state) if saved.state is not None else None
        state = self.codec.decode(saved_state).state if saved_state is not None else None
        seen = state.meta.progress() if state is not None else Progress.initial()
        memory = saved.custody
        self.machine.restore(memory, seen)
        if state is not None and saved.role == "held":
            self._slots[ce.RESUMED] = state
        elif state is not None and saved.role == "kept":
            slot = memory.kept.copy if memory.kept is not None else memory.holding
            if slot is not None:
                self._slots[slot] = state
        self._history = {r.lap: r for r in saved.history}
        self._lap_masks.restore(saved.masks)
        self._counts.bytes_sent, self._counts.hops = saved.sent, saved.hops
        for n in self.machine.chain.notices:
            if n.subject in self.machine.chain.dead and isinstance(n, DeadNotice):
                self._counts.dead[n.dead] = f"{n.cause} (declared by {n.claimer})"
        self._saved_key = None
        log.info(
            "resuming run %s: %s at lap %d (saved in %s)",
            self.run_id.hex()[:8],
            memory.phase,
            memory.last_lap,
            self._state_file.path if self._state_file is not None else "memory",
        )
        self._events.emit(ev.Resumed(self.run_id, memory.phase))
        for action in self.machine.resume(trio.current_time()):
            self._carry_out(action)
        self._save_state()

    def _carry_out(self, a: ce.Action) -> None:
        if isinstance(a, ce.Train):
            state = self._source_of(a)
            self._held = state
            if a.source is None and self._taking and not self._builder.in_thread:
                self._after_ack = (a.position, state)  # inline training after the ACK
            else:
                self._start_training(a.position, state)
        elif isinstance(a, ce.Send):
            self._spawn(self._send, a)
        elif isinstance(a, ce.TellPassed):
            self._spawn(self._tell_passed, a.to, a.receipt)
        elif isinstance(a, ce.Forget):
            self._slots.pop(a.copy, None)
            self._bodies.pop(a.copy, None)
        elif isinstance(a, ce.Finish):
            final = self._inbox if a.copy == ce.FINAL else self._slots.get(a.copy)
            if final is not None:
                self._slots[ce.FINAL] = final
                body = self._bodies.get(a.copy) if a.copy != ce.FINAL else None
                if body is not None:
                    self._bodies[ce.FINAL] = body
            self._spawn(self._finish, a)
        elif isinstance(a, ce.Finished):
            self.close_summary()
            # Every other buffer is freed; the final state stays for a member that was
            # restarted or cut off and asks for it (ReturnAsked after the run): kept by a
            # peer that saves its run (a real one), or when some member is counted dead
            # (a simulated peer without either frees it: a thousand of them share memory).
            keep = self._state_file is not None or bool(self.machine.chain.dead)
            final, body = self._slots.get(ce.FINAL), self._bodies.get(ce.FINAL)
            self._slots.clear()
            self._bodies.clear()
            if final is not None and keep:
                self._slots[ce.FINAL] = final
            if body is not None and keep:
                self._bodies[ce.FINAL] = body
            self._final_file = None
            self._done.set()
        elif isinstance(a, ce.Failed):
            self.failure = a.reason
            log.error("run %s failed here: %s", self.run_id.hex()[:8], a.reason)
            self._events.emit(ev.Failed(a.reason))
            self._done.set()
        elif isinstance(a, ce.Declared):
            self._declared(a)
        elif isinstance(a, ce.Returned):
            self._returned(a)
        elif isinstance(a, ce.AskToReturn):
            log.info("asking the members of run %s to take us back", self.run_id.hex()[:8])
            self._spawn(self._ask_to_return, a.request, a.to)
        elif isinstance(a, ce.Excluded):
            log.warning(
                "excluded from run %s: %s; training no more, waiting up to %g s for the "
                "final model",
                self.run_id.hex()[:8],
                a.notice.describe(),
                self._limits.excluded_wait,
            )
            self._events.emit(ev.Excluded(a.notice.claimer, a.notice.describe()))
        elif isinstance(a, ce.Refuse):
            log.warning("refused %s from %s: %s", a.code.value, a.peer, a.reason)
            self._events.emit(ev.Refused(a.peer, a.code, a.reason))
        elif isinstance(a, ce.SetTimer):
            self._timers.set(a.name, a.seconds)
        elif isinstance(a, ce.CancelTimer):
            self._timers.cancel(a.name)
        elif isinstance(a, ce.Note):
            log.log(logging.WARNING if a.level == "warning" else logging.INFO, "%s", a.text)
        elif isinstance(a, ce.Ignored):
            log.debug("custody ignored %s when %s: %s", a.event, a.phase.value, a.why)
        # Take is answered by the blob's decide(), which fed the event.

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None, "serve() runs the driver"
        self._nursery.start_soon(fn, *args)

    def _source_of(self, a: ce.Train) -> RingState:
        if a.source == ce.INITIAL:
            return self.template
        if a.source is not None:
            return self._slots[a.source]
        assert self._inbox is not None, "Train follows the Take of a blob"
        state, self._inbox = self._inbox, None
        return state

    def _declared(self, a: ce.Declared) -> None:
        n = a.notice
        epoch = self.view.epoch + n.index + 1
        log.warning(
            "%s declared %s dead (%s at %s); epoch now %d",
            n.claimer.short,
            n.dead,
            n.cause,
            n.at,
            epoch,
        )
        self._counts.dead[n.dead] = f"{n.cause} (declared by {n.claimer})"
        if len(self.members) - len(self._counts.dead) == 2:
            log.warning("%s", TWO_MEMBERS_LEFT)
        self.outputs.log(
            {
                "type": "dead",
                "peer": n.dead.text,
                "by": n.claimer.text,
                "why": n.cause,
                "at": [n.at.lap, n.at.hop],
                "epoch": epoch,
            }
        )
        self._events.emit(ev.DeclaredDead(n.dead, n.claimer, n.cause, epoch))

    def _returned(self, a: ce.Returned) -> None:
        n = a.notice
        epoch = self.view.epoch + n.index + 1
        log.warning("%s took %s back (at %s); epoch now %d", n.claimer.short, n.back, n.at, epoch)
        self._counts.dead.pop(n.back, None)
        self.outputs.log(
            {
                "type": "returned",
                "peer": n.back.text,
                "by": n.claimer.text,
                "at": [n.at.lap, n.at.hop],
                "epoch": epoch,
            }
        )
        self._events.emit(ev.TakenBack(n.back, n.claimer, epoch))

    # --- training ---------------------------------------------------------------------

    def _start_training(self, position: Position, state: RingState) -> None:
        """Start training ``state`` now (in a worker thread, before the ACK of the blob
        it came in goes out), and handle the result in a task of its own."""
        self._log_trained()
        self._events.emit(ev.Training(position.lap, position.hop))
        args = (self.task, state, self.ring_settings, position.lap, position.hop, self.federation)
        masks = self._lap_masks

        def hop(train: bool = True) -> tuple[RingState, HopMetrics]:
            return train_hop(*args, train=train, masks=masks)

        self._spawn(self._train, position, hop, self._builder.start(hop))

    async def _train(
        self,
        position: Position,
        hop: Callable[[bool], tuple[RingState, HopMetrics]],
        work: Started[tuple[RingState, HopMetrics]],
    ) -> None:
        """Take the hop ``work`` trains (``hop`` again, evaluating only, if it gave a bad
        state) and hand it to the custody machine."""
        try:
            new, metrics = await work.result()
            good = True
            body = self.codec.body(new)
            problem = self.codec.problem(new, body)
            if problem is not None:
                log.warning(
                    "training at %s gave a bad state (%s): handing on the last good state instead",
                    position,
                    problem,
                )
                good = False
                new, metrics = await self._builder.run(hop, False)
                body = self.codec.body(new)
                if self.codec.problem(new, body) is not None:
                    raise RunError(f"the state received for {position} cannot be evaluated")
        except (RemoteProtocolError, FedupError, RuntimeError, ValueError) as exc:
            self.feed(ce.TrainFailed(f"{type(exc).__name__}: {exc}"))
            return
        self._counts.hops += 1
        self._slots[position] = new
        if body is not None:
            self._bodies[position] = body
        content = self.codec.content(new, body)
        self._unlogged = (new, metrics, good)
        if self._train_delay > 0:  # a simulated slow member holds the model longer
            await trio.sleep(self._train_delay)
        actions = self.feed(
            ce.Trained(
                position, new.meta.progress(), good, content=content, samples=metrics.samples
            )
        )
        if not (self._builder.in_thread and any(isinstance(x, ce.Send) for x in actions)):
            self._log_trained()

    def _log_trained(self) -> None:
        """Log the hop trained last, once.  A member that trains in worker threads logs
        it when the blob that carries it has been handed over (or not): the successor
        is training by then, so the log line and its events are off the ring's path."""
        unlogged, self._unlogged = self._unlogged, None
        if unlogged is not None:
            self._log_hop(*unlogged)

    def _log_hop(self, state: RingState, metrics: HopMetrics, good: bool) -> None:
        cand = metrics.candidate
        self.outputs.log(
            {
                "type": "hop",
                "lap": metrics.lap,
                "hop": metrics.hop,
                "steps": metrics.steps,
                "samples": metrics.samples,
                "train_loss": metrics.train_loss,
                "candidate_val_loss": cand.loss if cand is not None else None,
                "candidate_val_n": cand.n if cand is not None else None,
                "seconds": metrics.seconds,
                "epoch": self.machine.ring_epoch,
                "good": good,
                **self._dp_figures(),
            }
        )
        self._log_laps(state)
        self._events.emit(
            ev.HopTrained(
                metrics.lap, metrics.hop, metrics.samples, metrics.train_loss, metrics.seconds, good
            )
        )
        closed = metrics.closed
        if closed is not None:
            self._events.emit(ev.LapClosed(closed.lap, closed.loss, state.meta.best_lap))
        if not log.isEnabledFor(logging.INFO):
            return  # the line below is formatted only for a handler that shows it
        trained = (
            f"trained {metrics.samples} samples (loss {metrics.train_loss:.4f})"
            if metrics.samples
            else "evaluated only"
        )
        dp = self._dp_figures()
        log.info(
            "lap %d hop %d: %s%s%s",
            metrics.lap,
            metrics.hop,
            trained,
            f"; DP epsilon spent {dp['dp_epsilon_spent']:.3f} of {dp['dp_epsilon']:g}"
            if dp
            else "",
            f"; federated val loss of lap {closed.lap}: {closed.loss:.4f}" if closed else "",
        )

    def _dp_figures(self) -> dict[str, float]:
        """This member's DP spending for its hop lines ({} without DP)."""
        report = self.task.privacy_report()
        if report is None:
            return {}
        return {"dp_epsilon_spent": report["epsilon_spent"], "dp_epsilon": report["epsilon"]}

    def _log_laps(self, state: RingState) -> None:
        """Note (and log once) every lap result the state carries: the whole history is
        ours to keep, the state carries only the last few."""
        for h in state.meta.history:
            if h.lap in self._history:
                continue  # noted and logged when it first came by (a lap line is written once)
            accuracy, auc = shown_figures(self.task, h)
            self._events.emit(ev.LapNoted(h.lap, h.loss, accuracy, auc, h.samples))
            self._history[h.lap] = h
            self.outputs.log_lap(lap_line(self.task, h))

    # --- handing on ---------------------------------------------------------------------

    def _link(self, peer: PeerId) -> OutboundLink:
        link = self._links.get(peer)
        if link is None:
            assert self._nursery is not None
            link = OutboundLink(
                peer,
                run_id=self.run_id,
                identity=self._identity,
                dial=self._dial,
                on_message=self._on_message,
                limits=self._limits,
                nursery=self._nursery,
                hash_in_thread=None if self._builder.in_thread else False,
            )
            self._links[peer] = link
        return link

    async def _send(self, a: ce.Send) -> None:
        state = self._slots.get(a.copy)
        if state is None:
            self.feed(
                ce.HandOverFailed(
                    a.handover,
                    ce.Failure(ce.FailureKind.BROKEN, f"the state of {a.copy} is no longer kept"),
                )
            )
            return
        data = self.codec.encode(
            state,
            view=self.view_digest,
            chain=a.chain,
            origin=a.origin,
            seal=a.seal,
            provenance=a.provenance,
            body=self._bodies.get(a.copy),
        )
        limits = self._limits
        link = self._link(a.target)
        blob = OutgoingBlob(a.target, a.kind, a.position.lap, a.position.hop, a.epoch, data)
        if self._tamper is not None:
            blob = await self._tampered(blob)
        try:
            with trio.fail_after(limits.blob_timeout + limits.handshake_timeout):
                sent = await link.send_blob(
                    kind=a.kind, lap=blob.lap, hop=blob.hop, epoch=blob.epoch, data=blob.data
                )
        except BaseException as exc:
            self._log_trained()
            failure = _failure(exc)
            if failure is None:
                raise
            if failure.kind is ce.FailureKind.REFUSED:
                self._events.emit(
                    ev.Refused(a.target, failure.code or RefusalCode.MALFORMED, failure.why)
                )
            self.feed(ce.HandOverFailed(a.handover, failure))
            return
        finally:
            if a.kind == "final" and a.target in self.machine.chain.dead:
                self._links.pop(a.target, None)
                await link.aclose()
        self._log_trained()
        self._counts.bytes_sent += data.nbytes
        self._events.emit(
            ev.HandedOver(a.kind, a.target, a.position.lap, a.position.hop, data.nbytes)
        )
        self.feed(ce.HandedOver(a.handover, sent.receipt or b"", sent.digest))

    async def _tampered(self, blob: OutgoingBlob) -> OutgoingBlob:
        """A hostile member's blobs: all but the last one to the target are sent here
        (their outcomes ignored); the last one to the target is returned to send."""
        assert self._tamper is not None
        out = self._tamper.blobs(blob)
        last = max((i for i, b in enumerate(out) if b.target == blob.target), default=None)
        for i, other in enumerate(out):
            if i == last:
                continue
            try:
                with trio.fail_after(self._limits.blob_timeout):
                    await self._link(other.target).send_blob(
                        kind=other.kind,  # type: ignore[arg-type]
                        lap=other.lap,
                        hop=other.hop,
                        epoch=other.epoch,
                        data=other.data,
                    )
            except (RemoteProtocolError, trio.TooSlowError, OSError) as exc:
                log.info("tampered blob to %s: %s", other.target, exc)
        if last is None:
            return attrs.evolve(blob, data=b"")  # nothing for the target: it is refused
        return out[last]

    async def _tell_passed(self, to: PeerId, receipt: bytes) -> None:
        message = Passed(self.run_id, receipt)
        framed = self._inbound.get(to)
        try:
            with trio.fail_after(self._limits.handshake_timeout + self._limits.frame_timeout):
                if framed is not None:
                    await framed.send_frame(encode_message(message))
                else:
                    await self._link(to).send_message(message)
        except (RemoteProtocolError, trio.TooSlowError, OSError) as exc:
            log.info("could not tell %s the model moved on: %s", to, exc)

    # --- receiving ----------------------------------------------------------------------

    async def serve_link(self, framed: FramedStream, remote: PeerId) -> None:
        """Take blobs from ``remote`` over its link until the connection ends."""
        self._inbound[remote] = framed
        try:
            await serve_link(
                framed,
                remote,
                me=self.me,
                run_id=self.run_id,
                admit=self._admit,
                decide=self._decide,
                on_message=self._on_message,
                limits=self._limits,
                hash_in_thread=None if self._builder.in_thread else False,
                taken=self._taken,
            )
        finally:
            if self._inbound.get(remote) is framed:
                del self._inbound[remote]
            self._taken()  # a blob taken whose ACK could not go out is trained all the same

    def _taken(self) -> None:
        pending, self._after_ack = self._after_ack, None
        if pending is not None:
            self._start_training(*pending)

    def _on_message(self, peer: PeerId, message: Message) -> None:
        if isinstance(message, Passed) and message.run_id == self.run_id:
            self.feed(ce.PassedArrived(peer, message.receipt))
        elif isinstance(message, Return) and message.run_id == self.run_id:
            try:
                request = ReturnRequest.open(message.request)
            except ReturnError as exc:
                log.warning("refused a return request from %s: %s", peer, exc.reason)
                return
            if request.peer != peer:
                log.warning(
                    "refused a return request from %s: it is %s's request", peer, request.peer
                )
                return
            self.feed(ce.ReturnAsked(request))
        else:
            log.warning("%s sent %r on a link; ignored", peer, message.TYPE)

    async def _ask_to_return(self, request: bytes, to: tuple[PeerId, ...] | None) -> None:
        """Send our return request to ``to`` (None: every other member), each on its
        link, at once."""
        message = Return(self.run_id, request)
        limits = self._limits

        reached = 0

        async def tell(peer: PeerId) -> None:
            nonlocal reached
            try:
                with trio.fail_after(limits.handshake_timeout + limits.frame_timeout):
                    await self._link(peer).send_message(message)
                reached += 1
            except (RemoteProtocolError, trio.TooSlowError, OSError) as exc:
                log.info("could not ask %s to take us back: %s", peer, exc)

        async with trio.open_nursery() as nursery:
            for peer in self.members if to is None else to:
                if peer != self.me:
                    nursery.start_soon(tell, peer)
        if reached == 0 and len(self.members) > 1:
            log.warning(
                "no member of run %s answers: the network may be down, or the run ended "
                "and its members stopped (their outputs hold its model); asking again in "
                "%g s, and failing after the run's deadline; --fresh starts a new run",
                self.run_id.hex()[:8],
                limits.return_interval,
            )

    def _admit(self, header: BlobHeader) -> None:
        kind = header.kind
        event = ce.BlobOffered(header.sender, kind, Position(header.lap, header.hop), header.epoch)
        if self.machine.phase is ce.Phase.READY and self._confirm is not None:
            return  # the whole blob may show that our view holds: decide() sees
        refusal = next((x for x in self.feed(event) if isinstance(x, ce.Refuse)), None)
        if refusal is not None:
            raise Refusal(refusal)

    def _decide(self, header: BlobHeader, data: memoryview, digest: bytes) -> bytes | None:
        blob = self.codec.decode(data)
        if self.machine.phase is ce.Phase.READY and self._confirm is not None:
            if self._confirm(header.sender, self.run_id, blob.view):
                self.begin()
        event = ce.BlobArrived(
            header.sender,
            header.kind,
            Position(header.lap, header.hop),
            header.epoch,
            digest,
            blob.view,
            blob.chain,
            blob.state.meta.progress(),
            blob.origin,
            blob.seal,
            blob.content,
            blob.provenance,
            self._model_sha256(blob.state) if header.kind == "final" else b"",
        )
        self._inbox = blob.state
        self._taking = True
        try:
            actions = self.feed(event)
        finally:
            self._taking = False
            self._inbox = None if self._inbox is blob.state else self._inbox
        for action in actions:
            if isinstance(action, ce.Take):
                return action.receipt
        refusal = next((x for x in actions if isinstance(x, ce.Refuse)), None)
        if refusal is not None:
            raise Refusal(refusal)
        raise Refusal(ce.Refuse(header.sender, RefusalCode.BUSY, "not taken now"))

    # --- finishing ----------------------------------------------------------------------

    async def _finish(self, a: ce.Finish) -> None:
        self._log_trained()
        state = self._slots.get(ce.FINAL)
        if state is None:
            self.feed(ce.TrainFailed(f"the final state ({a.copy}) is not kept"))
            return
        meta = state.meta
        self._log_laps(state)
        own = await self._builder.run(evaluate_state, self.task, state)
        sha = await self._builder.run(
            lambda: self.outputs.save_model_file(self._model_file(state)[0])
        )
        self._final_file = None
        if a.ended_by == self.me:
            content = self.codec.content(state, self._bodies.get(ce.FINAL))
            self.machine.seal_final(content, bytes.fromhex(sha))
        dead, hops, seal = self.machine.provenance_record()
        if FinalSeal.open(seal).model != bytes.fromhex(sha):  # checked on receipt: a bug here
            self.failure = "the model file written differs from the one the final seal names"
            log.error("run %s failed here: %s", self.run_id.hex()[:8], self.failure)
            self._done.set()
            return
        provenance = provenance_file(view=self.signed.envelope, dead=dead, chain=hops, seal=seal)
        await self._builder.run(self.outputs.save_provenance, provenance)
        history = [self._history[lap] for lap in sorted(self._history)]
        best = self._history.get(meta.best_lap)
        trained_laps = max((h.lap for h in history), default=-1) + 1
        ok = a.reason in ("converged", "max-laps") and meta.best_lap >= 0
        self.summary = RunSummary(
            run_id=self.run_id.hex(),
            peer_id=self.me.text,
            leader=self.view.leader.text,
            members=[p.text for p in self.members],
            laps=trained_laps,
            converged=a.reason == "converged",
            stop_reason=a.reason,
            federated_val_loss=[h.loss for h in history],
            federated_laps=[h.lap for h in history],
            best_lap=meta.best_lap,
            final_val_loss=own.loss,
            final_val_accuracy=own.accuracy,
            data_passes=(best.samples / self.federation.n_rows)
            if best is not None and self.federation.n_rows
            else math.nan,
            model_sha256=sha,
            dead=[p.text for p in sorted(self.machine.chain.dead)],
            model_bytes_sent=self._counts.bytes_sent,
            out_dir=str(self.outputs.directory),
            excluded=a.excluded.describe() if a.excluded is not None else None,
            ended_by=a.ended_by.text,
            ok=ok,
            dp=self.task.privacy_report(),
            task="binary" if self.task.metrics is None else self.task.metrics.kind,
            final_val=self.task.figures(own),
        )
        self.outputs.save_summary(self.summary)
        log.info(
            "run %s finished (%s, ended by %s): best lap %d, final val loss here %.4f, model %s",
            self.run_id.hex()[:8],
            a.reason,
            a.ended_by.short,
            meta.best_lap,
            own.loss,
            sha[:12],
        )
        self._events.emit(ev.Finished(a.reason, a.ended_by, sha))
        self.feed(ce.FinalSaved())

    def _model_metadata(self) -> dict[str, str]:
        """The metadata of ``model.safetensors`` (the same on every member)."""
        return {"fedup_run_id": self.run_id.hex(), "format": "pt"}

    def _model_sha256(self, state: RingState) -> bytes:
        """The SHA-256 of the model file this member would save from a final ``state``."""
        return self._model_file(state)[1]

    def _model_file(self, state: RingState) -> tuple[list[memoryview], bytes]:
        """The bytes of the model file this member would save from a final ``state``, and
        their SHA-256; made once per state (a final model received is checked against its
        seal by this digest, then saved from these bytes)."""
        known = self._final_file
        if known is not None and known[0] is state:
            return known[1], known[2]
        parts = safetensors_parts(final_weights(state), metadata=self._model_metadata())
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        self._final_file = (state, parts, digest.digest())
        return parts, self._final_file[2]

    def close_summary(self) -> RunSummary | None:
        """The summary with what was sent after the final model was saved (distribution)."""
        self._log_trained()
        if self.summary is None:
            return None
        self.summary = attrs.evolve(
            self.summary,
            model_bytes_sent=self._counts.bytes_sent,
            dead=[p.text for p in sorted(self.machine.chain.dead)],
        )
        self.outputs.save_summary(self.summary)
        return self.summary


def _failure(exc: BaseException) -> ce.Failure | None:
    """What a failed hand-over means for custody (None: not ours to handle)."""
    if isinstance(exc, SilentPeerError):
        return ce.Failure(ce.FailureKind.UNREACHABLE, str(exc))
    if isinstance(exc, trio.TooSlowError | PeerTimeoutError):
        return ce.Failure(ce.FailureKind.TIMED_OUT, str(exc) or "timed out")
    if isinstance(exc, BlobRefusedError):
        return ce.Failure(ce.FailureKind.REFUSED, exc.reason, exc.code, exc.proof)
    if isinstance(exc, HandshakeError) and exc.code == AbortCode.BUSY:
        return ce.Failure(ce.FailureKind.BROKEN, exc.reason)  # alive, and full for a moment
    if isinstance(exc, DialError | HandshakeError):
        return ce.Failure(ce.FailureKind.UNREACHABLE, exc.reason)
    if isinstance(exc, RemoteProtocolError):
        return ce.Failure(ce.FailureKind.BROKEN, exc.reason)
    if isinstance(exc, OSError):
        return ce.Failure(ce.FailureKind.UNREACHABLE, f"unreachable: {exc}")
    return None
