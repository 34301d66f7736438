"""The parallel mode's round loop: every member trains at once, then an all-reduce.

A view whose ``alg`` is ``"parallel"`` runs here instead of the ring's custody
(``docs/parallel.md``).  Round ``r`` (``0 .. max_laps``), at every member:

1. evaluate the round's model ``w_r`` on this member's validation split and train a
   copy of it for ``local_epochs`` (:func:`fedup.learn.fedavg.member_round`, off the
   event loop; the last round only evaluates);
2. one all-reduce attempt of :func:`fedup.learn.parallel.contribution` among the
   view's members (:func:`fedup.net.allreduce_driver.all_reduce` over one encrypted
   channel to the ring successor; messages from the predecessor come through the
   peer's :class:`~fedup.net.allreduce_driver.AllReduceInbox`);
3. from the sum: the lap result of ``w_r`` judged by the stopping rule
   (:func:`fedup.learn.fedavg.judge_round`; ``w_r`` is kept when it is the best), and
   ``w_{r+1}``, the rows-weighted average pushed through server momentum
   (:func:`fedup.learn.fedavg.server_step`).

Every member computes the same bytes from the same sum, so every member stops at the
same round and saves the same model, with no final hand-round.  After a failed attempt
(a silent or unreachable neighbour, named by the machine) each member probes the
attempt's members and tries again with those that answer, while they are more than
half of the view, at most ``Limits.allreduce_attempts`` times; then the run ends here
with :class:`~fedup.peer.custody_driver.RunError` (``docs/parallel.md``, "The
survivors' rule").  There is no hop provenance in this mode and no resuming.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import torch
import trio

from fedup.config import Limits
from fedup.errors import FedupError
from fedup.learn.fedavg import RoundLedger, member_round, server_step
from fedup.learn.lap_sums import to_sums
from fedup.learn.parallel import RoundSum, VectorLayout, contribution, finite, round_end
from fedup.learn.ring import FederationStats, LapResult, RingSettings, model_with
from fedup.learn.task import EvalStats
from fedup.learn.weights import safetensors_parts
from fedup.net.allreduce_driver import AllReduceInbox, SuccessorLink, all_reduce, float32_adder
from fedup.net.channel import SecureChannel
from fedup.peer import events as ev
from fedup.peer.custody_driver import RunError
from fedup.peer.outputs import RunOutputs, RunSummary, federation_json, lap_line, shown_figures
from fedup.peer.tasks import TaskBuilder, federation_stats
from fedup.protocol.allreduce import AllReduceMachine, Failed
from fedup.protocol.allreduce_messages import ELEMENT_SIZE
from fedup.protocol.envelope import Signer
from fedup.protocol.laps import StopState
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import ring_order
from fedup.protocol.view import SignedView

__all__ = ["ParallelRun", "RoundPart", "timed_round"]

log = logging.getLogger("fedup.federation")

Dial = Callable[[PeerId], Awaitable[SecureChannel]]
Weights = dict[str, torch.Tensor]


@attrs.frozen(eq=False)
class RoundPart:
    """What this member puts into a round's all-reduce (:func:`~fedup.learn.parallel.
    contribution`), and the seconds its part of the round took."""

    sums: tuple[int, ...]
    """Its validation sums of the round's model."""
    weights: Weights
    """The model it contributes, weighed by ``rows`` (0: none)."""
    rows: int
    samples: int
    seconds: float
    evaluation: float = 0.0
    """Of ``seconds``, those spent evaluating the round's model (0: not told apart)."""


class ParallelRun:
    """This peer's part of one parallel run, from the view that holds to the saved model."""

    def __init__(
        self,
        *,
        identity: Signer,
        signed: SignedView,
        builder: TaskBuilder,
        dial: Dial,
        inbox: AllReduceInbox,
        out_dir: Path,
        limits: Limits,
        events: ev.EventHub,
        durable: bool = True,
        train_delay: float = 0.0,
    ) -> None:
        view = signed.view
        self.me = identity.peer_id
        self._identity = identity
        self.signed = signed
        self.view = view
        self.run_id = view.run_id
        self.members = tuple(ring_order(view.member_ids))
        self.index = self.members.index(self.me)
        self.live = self.members
        """The members of the next attempt: the view's, less those that stopped answering."""
        self._builder = builder
        self._dial = dial
        self._inbox = inbox
        self._limits = limits
        self._events = events
        self.schema, self.task = builder.for_view(view)
        self.settings = RingSettings.for_run(view.settings)
        self.federation = federation_stats(self.schema, len(self.members))
        self.outputs = RunOutputs(out_dir, durable=durable)
        self.bytes_sent = 0
        self._train_delay = train_delay
        """A simulated slow host's extra seconds for each round (or relay hop) it trains."""

    async def run(self) -> RunSummary:
        """Train round after round until the stopping rule holds; save the model (the
        caller closes :attr:`outputs`, after personalizing).

        Raises :class:`~fedup.peer.custody_driver.RunError` when an all-reduce fails."""
        task, settings = self.task, self.settings
        log.info(
            "run %s: %d members, %s rounds, ring %s",
            self.run_id.hex()[:8],
            len(self.members),
            self.view.settings.algorithm,
            " -> ".join(p.short for p in self.members),
        )
        self.outputs.save_federation(federation_json(self.signed, self.schema))
        current: Weights = await self._builder.run(_initial_weights, task, settings.seed)
        layout = VectorLayout.for_weights(current)
        momentum: Weights | None = None
        ledger = RoundLedger(current)
        round_ = 0
        while True:
            trains = round_ < settings.max_laps
            part = await self._train_round(round_, current, layout, trains)
            log.debug("round %d: trained %d samples in %.3f s", round_, part.samples, part.seconds)
            self._events.emit(ev.RoundTrained(round_, part.samples, part.seconds, part.evaluation))
            vector = self._contribution(
                layout, part.weights, rows=part.rows, samples=part.samples, sums=part.sums
            )
            summed = round_end(layout, await self._all_reduce(round_, layout, vector))
            record = ledger.judge(
                task, summed.sums, round_, current, summed.samples, settings.tolerance
            )
            if record is not None:
                self._note(record)
            if ledger.ends(round_, settings):
                break
            if self._usable(round_, summed):
                assert summed.average is not None
                current, momentum = self._next_model(current, summed.average, momentum)
            round_ += 1
        reason = "converged" if round_ < settings.max_laps else "max-laps"
        return await self._finish(reason, ledger.best, ledger.stop, ledger.history)

    async def _train_round(
        self, round_: int, current: Weights, layout: VectorLayout, trains: bool
    ) -> RoundPart:
        """This member's part of round ``round_``: evaluate ``current``, train a copy."""
        task = self.task
        (stats, trained, samples, _), seconds = await self._builder.run(
            timed_round, task, current, self.settings, round_, self.index, self.federation, trains
        )
        if trains and self._train_delay > 0:
            await trio.sleep(self._train_delay)
        rows = task.n_train if trains and samples > 0 else 0
        if rows and not finite(trained):
            log.warning("round %d: my training gave a non-finite model; not counted", round_)
            trained, rows, samples = current, 0, 0
        return RoundPart(to_sums(stats), trained, rows, samples, seconds)

    def _next_model(
        self, current: Weights, average: Weights, momentum: Weights | None
    ) -> tuple[Weights, Weights | None]:
        """The next round's model from the round's average: server momentum (FedAvgM)."""
        return server_step(current, average, momentum)

    def _contribution(
        self,
        layout: VectorLayout,
        weights: Weights,
        *,
        rows: int,
        samples: int,
        sums: tuple[int, ...],
    ) -> bytes:
        """This member's vector for the round (what a test's hostile member replaces)."""
        return contribution(layout, weights, rows=rows, samples=samples, sums=sums)

    def _usable(self, round_: int, summed: RoundSum) -> bool:
        """Whether the round's average may become the next model.  The sum hides who
        sent what, so a member's lies are caught only in the total: more training rows
        than the federation has (a member claiming weight to steer the average), or
        weights that are not finite or beyond ``Limits.max_weight_magnitude`` (the
        ring's bound on a blob).  Such a round changes nothing; the next goes on."""
        if summed.average is None:
            return False
        n_rows, bound = self.federation.n_rows, self._limits.max_weight_magnitude
        if n_rows and summed.rows > n_rows:
            why = f"claims {summed.rows} training rows; the federation has {n_rows}"
        elif not all(bool(t.abs().max() <= bound) for t in summed.average.values()):
            why = f"holds a weight that is not finite or beyond {bound:g}"
        else:
            return True
        log.warning("round %d: the members' sum %s; the model stays as it was", round_, why)
        return False

    async def _all_reduce(self, round_: int, layout: VectorLayout, vector: bytes) -> bytes:
        """The round's sum, among the members that are alive: after a failed attempt,
        each member probes every member of that attempt and tries again with those that
        answer, while they are more than half of the view (the survivors' rule,
        ``docs/parallel.md``); :class:`RunError` after ``Limits.allreduce_attempts``."""
        failure = ""
        for attempt in range(self._limits.allreduce_attempts):
            outcome = await self._attempt(round_, attempt, layout, vector)
            if not isinstance(outcome, Failed):
                return outcome
            failure = outcome.reason
            alive = await self._probe(self.live)
            log.warning(
                "round %d attempt %d failed (%s); %d of %d members answer",
                round_, attempt, failure, len(alive), len(self.live),
            )  # fmt: skip
            if 2 * len(alive) <= len(self.members):
                failure += f"; {len(alive)} of the view's {len(self.members)} members answer"
                break
            self.live = alive
        why = f"round {round_}: the all-reduce failed: {failure}"
        self._events.emit(ev.Failed(why))
        raise RunError(why)

    async def _probe(self, members: tuple[PeerId, ...]) -> tuple[PeerId, ...]:
        """The members of ``members`` that complete a handshake with us now (ourselves
        included), each within ``Limits.handshake_timeout``."""
        alive = {self.me}

        async def probe(peer: PeerId) -> None:
            with trio.move_on_after(self._limits.handshake_timeout):
                try:
                    channel = await self._dial(peer)
                except (OSError, FedupError):
                    return
                await channel.aclose()
                alive.add(peer)

        async with trio.open_nursery() as nursery:
            for peer in members:
                if peer != self.me:
                    nursery.start_soon(probe, peer)
        return tuple(p for p in members if p in alive)

    async def _attempt(
        self, round_: int, attempt: int, layout: VectorLayout, vector: bytes
    ) -> bytes | Failed:
        """One attempt at the round's sum: the vector in :meth:`segments`, each summed by
        one run of the all-reduce machine, numbered ``attempt x segments + segment`` (so
        that a member that moved on to the next segment, or to the next attempt, finds
        its messages held for it, as for a later attempt)."""
        limits = self._limits
        if attempt > 0:
            # A member that failed fast (a dial refused) is here while the others still
            # wait out the last attempt's deadline: give them that long to join.
            limits = attrs.evolve(limits, allreduce_step_timeout=2 * limits.allreduce_step_timeout)
        count = self.segments(layout)
        span = -(-layout.length // count)
        result = bytearray(len(vector))
        ring = ring_order(self.live)
        successor = ring[(ring.index(self.me) + 1) % len(ring)]
        async with SuccessorLink(successor, dial=self._dial, limits=self._limits) as link:

            async def send(data: bytes) -> None:
                await link.send(data)
                self.bytes_sent += len(data)

            for segment in range(count):
                start, stop = (
                    ELEMENT_SIZE * segment * span,
                    ELEMENT_SIZE * min(layout.length, (segment + 1) * span),
                )
                machine = AllReduceMachine(
                    self._identity,
                    run_id=self.run_id,
                    epoch=self.view.epoch,
                    round=round_,
                    attempt=attempt * count + segment,
                    members=self.live,
                    length=(stop - start) // ELEMENT_SIZE,
                    limits=limits,
                    join_wait=self._join_wait(segment, limits),
                )
                part = vector[start:stop]
                outcome = await all_reduce(
                    machine,
                    part,
                    send=send,
                    inbox=self._inbox,
                    add=float32_adder(part),
                    result=memoryview(result)[start:stop],
                    limits=limits,
                    alive=self._alive if self.probes_predecessor else None,
                )
                if isinstance(outcome, Failed):
                    return outcome
        return bytes(result)

    probes_predecessor = False
    """Whether a member waiting in the all-reduce asks after its silent predecessor every
    ``Limits.probe_interval`` (the hybrid mode's, whose first waits are long)."""

    def _join_wait(self, segment: int, limits: Limits) -> float | None:
        """How long each reduce-scatter wait of a segment may last (None: the step
        deadline of ``limits``)."""
        return None

    async def _alive(self, peer: PeerId) -> bool:
        return peer in await self._probe((peer,))

    def segments(self, layout: VectorLayout) -> int:
        """How many all-reduces a round's vector is summed in: as few as keep every chunk
        within ``Limits.max_allreduce_chunk`` with the fewest members a round can have
        (a majority of the view), so the count is the same at every member all run."""
        fewest = len(self.members) // 2 + 1
        per_segment = fewest * (self._limits.max_allreduce_chunk // ELEMENT_SIZE)
        return max(1, -(-layout.length // per_segment))

    def _note(self, record: LapResult) -> None:
        accuracy, auc = shown_figures(self.task, record)
        self._events.emit(ev.LapNoted(record.lap, record.loss, accuracy, auc, record.samples))
        self.outputs.log_lap(lap_line(self.task, record))
        log.info("round %d's model: federated validation loss %.4f", record.lap + 1, record.loss)

    async def _finish(
        self, reason: str, best: Weights, stop: StopState, history: list[LapResult]
    ) -> RunSummary:
        metadata = {"fedup_run_id": self.run_id.hex(), "format": "pt"}
        parts = safetensors_parts(best, metadata=metadata)
        sha = await self._builder.run(self.outputs.save_model_file, parts)
        own = await self._builder.run(_evaluate, self.task, best)
        kept = next((h for h in history if h.lap == stop.best_lap), None)
        n_rows = self.federation.n_rows
        summary = RunSummary(
            run_id=self.run_id.hex(),
            peer_id=self.me.text,
            leader=self.view.leader.text,
            members=[p.text for p in self.members],
            laps=max((h.lap for h in history), default=-1) + 1,
            converged=reason == "converged",
            stop_reason=reason,
            federated_val_loss=[h.loss for h in history],
            federated_laps=[h.lap for h in history],
            best_lap=stop.best_lap,
            final_val_loss=own.loss,
            final_val_accuracy=own.accuracy,
            data_passes=kept.samples / n_rows if kept is not None and n_rows else math.nan,
            model_sha256=sha,
            dead=[p.text for p in self.members if p not in self.live],
            model_bytes_sent=self.bytes_sent,
            out_dir=str(self.outputs.directory),
            ended_by=None,
            ok=stop.best_lap >= 0,
            dp=self.task.privacy_report(),
            task="binary" if self.task.metrics is None else self.task.metrics.kind,
            final_val=self.task.figures(own),
        )
        self.outputs.save_summary(summary)
        log.info(
            "run %s finished (%s): best round output %d, final val loss here %.4f, model %s",
            self.run_id.hex()[:8],
            reason,
            stop.best_lap,
            own.loss,
            sha[:12],
        )
        self._events.emit(ev.Finished(reason, None, sha))
        return summary


def _initial_weights(task: Any, seed: int) -> Weights:
    return {k: v.detach().cpu().clone() for k, v in task.build_model(seed).state_dict().items()}


def _evaluate(task: Any, weights: Weights) -> EvalStats:
    result: EvalStats = task.evaluate(model_with(task, weights))
    return result


def timed_round(
    task: Any,
    weights: Weights,
    settings: RingSettings,
    round_: int,
    member: int,
    federation: FederationStats,
    trains: bool,
) -> tuple[Any, float]:
    """This member's part of a round and the seconds it took (timed here: in the
    simulator the event loop runs other peers between the call and its return)."""
    began = time.perf_counter()
    done = member_round(task, weights, settings, round_, member, federation, None, train=trains)
    return done, time.perf_counter() - began
