"""The hybrid mode's round: sub-rings train in sequence side by side, then an all-reduce.

A view whose ``alg`` is ``"hybrid"`` runs here (``docs/parallel.md``, "The hybrid
mode").  :class:`HybridRun` is a :class:`~fedup.peer.parallel_driver.ParallelRun` (the
same all-reduce, survivors' rule, stopping rule and saved model; no server momentum) whose
members do not each train a copy of the round's model: in round ``r`` every member

1. evaluates the round's model on its validation split;
2. takes its part in its sub-ring's relay (:class:`~fedup.protocol.relay.RelayPlan`,
   cut from the members of the round: the view's, less those the survivors' rule left
   out): for each hop it trains, it takes the model of the hop before from its sub-ring
   predecessor (:class:`~fedup.protocol.relay.RelayIntake`; hop 0 starts from the
   round's model), trains it for one hop (:func:`fedup.learn.hybrid.relay_hop`) and
   hands it to its successor in parts of at most ``Limits.max_allreduce_chunk`` bytes;
3. puts into the all-reduce its validation sums and, if it is the sub-ring's holder
   (the trainer of the last hop), the sub-ring's model weighed by the training rows of
   the sub-ring's members that trained.

Every wait is bounded: a member waits ``Limits.relay_hop_timeout`` per hop before its
own, and every ``Limits.probe_interval`` of silence it checks that the
predecessor still completes a handshake; when the predecessor does not, or the wait
passes, or the predecessor sends what the intake refuses, or says the
relay broke, the member sends "broken" on at once and leaves the relay for the round,
so the whole sub-ring learns it within one message per member.  A broken sub-ring puts
no model into the round (its members' sums still count); the round is averaged over the
other sub-rings, and only when none is left does the model stay as it was.

Members come to the all-reduce as their part of the relay ends, so the first segment's
reduce-scatter waits may last the longest sub-ring's relay besides the step deadline
(:meth:`HybridRun._join_wait`), the waiting member probing its predecessor every
``Limits.probe_interval`` meanwhile.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from fedup.config import Limits
from fedup.errors import FedupError
from fedup.learn.hybrid import (
    OPTIM,
    relay_hop,
    relay_seed,
    relay_template,
    weights_bytes,
    weights_from,
)
from fedup.learn.lap_sums import to_sums
from fedup.learn.parallel import VectorLayout, finite
from fedup.net.allreduce_driver import AllReduceInbox, SuccessorLink
from fedup.peer.parallel_driver import Dial, ParallelRun, RoundPart, Weights, timed_round
from fedup.protocol.peer_id import PeerId
from fedup.protocol.relay import (
    Broken,
    Ignored,
    Progress,
    Received,
    Refused,
    RelayIntake,
    RelayMessage,
    RelayMessageError,
    RelayPlan,
    decode_relay_message,
    parts_of,
    sub_rings,
)

__all__ = ["HybridRun"]

log = logging.getLogger("fedup.federation")


class HybridRun(ParallelRun):
    """This peer's part of one hybrid run (:class:`ParallelRun` with the relay's round)."""

    def __init__(self, *, relay_inbox: AllReduceInbox, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.relay_inbox = relay_inbox
        """Where the peer puts relay messages from this run's members."""
        self._relay_layout: VectorLayout | None = None
        """The relay state's layout: the model and the optimizer's state (first round)."""
        self._zero_optim: Weights = {}

    def _next_model(
        self, current: Weights, average: Weights, momentum: Weights | None
    ) -> tuple[Weights, Weights | None]:
        """The round's average itself: the optimizer's momentum travelled in the relay,
        and server momentum on top of it made the model worse (docs/parallel.md)."""
        return average, None

    probes_predecessor = True

    def _join_wait(self, segment: int, limits: Limits) -> float | None:
        """Members come to the all-reduce as their part of the relay ends: until all
        have begun (the first segment's reduce-scatter), a wait may last, besides the
        step deadline, the longest sub-ring's relay (``relay_hop_timeout`` per hop); a
        predecessor that does not answer a probe ends it sooner."""
        if segment > 0:
            return None
        settings = self.view.settings
        longest = max(len(r) for r in sub_rings(self.live, settings.sub_rings))
        relay = settings.sync_laps * longest * limits.relay_hop_timeout
        return limits.allreduce_step_timeout + relay

    def _plan(self) -> RelayPlan:
        settings = self.view.settings
        return RelayPlan.of(self.live, settings.sub_rings, settings.sync_laps, self.me)

    async def _train_round(
        self, round_: int, current: Weights, layout: VectorLayout, trains: bool
    ) -> RoundPart:
        """Evaluate ``current``; then this member's hops of its sub-ring's relay."""
        (stats, _, _, _), evaluation = await self._builder.run(
            timed_round, self.task, current, self.settings, round_, self.index,
            self.federation, False,
        )  # fmt: skip
        sums = to_sums(stats)
        if not trains:
            return RoundPart(sums, current, 0, 0, evaluation, evaluation)
        if self._relay_layout is None:
            template = await self._builder.run(relay_template, self.task, current)
            self._zero_optim = {k: v for k, v in template.items() if k.startswith(OPTIM)}
            self._relay_layout = VectorLayout.for_weights(template)
        plan = self._plan()
        state, rows, samples, took, broken = await self._relay(
            plan, round_, {**current, **self._zero_optim}
        )
        weights = {k: v for k, v in state.items() if not k.startswith(OPTIM)}
        holds = self.me == plan.holder and broken is None
        kept = (rows, samples) if holds else (0, 0)
        return RoundPart(sums, weights, *kept, evaluation + took, evaluation)

    async def _relay(
        self, plan: RelayPlan, round_: int, state: Weights
    ) -> tuple[Weights, int, int, float, str | None]:
        """This member's hops of round ``round_``'s relay, from the round's ``state``:
        the state it ends with, the sub-ring's rows and samples so far, the seconds its
        training took, and why the relay broke (None: it did not)."""
        layout = self._relay_layout
        assert layout is not None
        rows = samples = 0
        seconds = 0.0
        broken: str | None = None
        ring = plan.ring
        successor = ring[(plan.position + 1) % len(ring)] if len(ring) > 1 else None
        async with _Link(successor, self._dial, self._limits) as link:
            previous = -1
            for hop in plan.my_hops:
                if hop > 0 and plan.trainer(hop - 1) != self.me:  # alone: it is here
                    got = await self._receive(plan, layout, round_, hop, hop - previous - 1)
                    if isinstance(got, Broken):
                        broken = got.reason
                        log.warning("round %d: sub-ring %d's relay broke before hop %d: %s",
                                    round_, plan.index, hop, broken)  # fmt: skip
                    else:
                        state, rows, samples = weights_from(layout, got.data), got.rows, got.samples
                previous = hop
                if broken is None:
                    seed = relay_seed(self.settings, round_, plan.index, hop)
                    trained, n, took = await self._builder.run(
                        relay_hop, self.task, state, self.settings, self.federation, seed
                    )
                    seconds += took
                    if self._train_delay > 0:
                        await trio.sleep(self._train_delay)
                    if n and finite(trained):
                        state, samples = trained, samples + n
                        rows += self.task.n_train if hop < len(ring) else 0
                    elif n:
                        log.warning("round %d hop %d: my training gave a non-finite model; "
                                    "I hand on the one I took", round_, hop)  # fmt: skip
                if plan.next_of(hop) is None:
                    break
                await link.send(self._messages(layout, round_, hop, state, rows, samples, broken))
                if broken is not None:
                    break
        self.bytes_sent += link.sent
        return state, rows, samples, seconds, broken

    def _messages(
        self,
        layout: VectorLayout,
        round_: int,
        hop: int,
        weights: Weights,
        rows: int,
        samples: int,
        broken: str | None,
    ) -> list[bytes]:
        """Hop ``hop``'s model as relay messages (one "broken" message after a break)."""
        head = (self.run_id, self.view.epoch, round_, hop)
        if broken is not None:
            return [RelayMessage(*head, part=0, parts=0, rows=0, samples=0, data=b"").encode()]
        data = weights_bytes(layout, weights)
        size = self._limits.max_allreduce_chunk
        parts = parts_of(len(data), size)
        return [
            RelayMessage(
                *head, part=i, parts=parts, rows=rows, samples=samples,
                data=data[i * size : (i + 1) * size],
            ).encode()
            for i in range(parts)
        ]  # fmt: skip

    async def _receive(
        self, plan: RelayPlan, layout: VectorLayout, round_: int, hop: int, hops_between: int
    ) -> Received | Broken:
        """The model of hop ``hop - 1`` from its trainer, within ``relay_hop_timeout``
        for each of the ``hops_between`` hops since this member's last action (at least
        one): :class:`Received`, or :class:`Broken` (said, refused or silent)."""
        inbox = self.relay_inbox
        limits = self._limits
        predecessor = plan.trainer(hop - 1)
        intake = RelayIntake(
            run_id=self.run_id,
            epoch=self.view.epoch,
            round=round_,
            hop=hop,
            predecessor=predecessor,
            size=4 * layout.params,
            max_part=limits.max_allreduce_chunk,
            max_rows=self.federation.n_rows,
            bound=limits.max_weight_magnitude,
        )
        hops_between = max(1, hops_between)
        deadline = trio.current_time() + hops_between * limits.relay_hop_timeout
        while True:
            taken = inbox.take()
            if taken is None:
                now = trio.current_time()
                with trio.move_on_at(min(deadline, now + limits.probe_interval)):
                    await inbox.wait()
                    continue
                if trio.current_time() >= deadline:
                    waited = hops_between * limits.relay_hop_timeout
                    return Broken(f"nothing from {predecessor} within {waited:g} s")
                if predecessor not in await self._probe((predecessor,)):
                    return Broken(f"{predecessor} sent nothing and does not answer")
                continue
            sender, data = taken
            try:
                message = decode_relay_message(data, max_part=limits.max_allreduce_chunk)
            except RelayMessageError as exc:
                if sender == predecessor:
                    return Broken(f"{sender} sent what is not a relay message: {exc.reason}")
                log.warning("refused a relay message from %s: %s", sender, exc.reason)
                continue
            outcome = intake.take(sender, message)
            if isinstance(outcome, Refused):
                log.warning("refused a relay message from %s: %s", sender, outcome.reason)
            elif isinstance(outcome, Ignored):
                log.debug("ignored a relay message from %s: %s", sender, outcome.reason)
            elif not isinstance(outcome, Progress):
                if isinstance(outcome, Broken):
                    return Broken(f"from {sender}: {outcome.reason}")
                return outcome


class _Link:
    """Sends a hop's messages to the sub-ring successor ``peer`` (nothing when None),
    each within ``limits.frame_timeout``; a failed send is logged, not raised: the
    successor's own deadline breaks the relay.  ``sent`` counts the bytes sent."""

    def __init__(self, peer: PeerId | None, dial: Dial, limits: Limits) -> None:
        self._peer = peer
        self._limits = limits
        self._link = None if peer is None else SuccessorLink(peer, dial=dial, limits=limits)
        self._failed = False
        self.sent = 0

    async def send(self, messages: list[bytes]) -> None:
        if self._link is None or self._failed:
            return
        try:
            for data in messages:
                with trio.fail_after(self._limits.frame_timeout):
                    await self._link.send(data)
                self.sent += len(data)
        except (trio.TooSlowError, OSError, FedupError) as exc:
            self._failed = True
            log.warning("could not hand the model on to %s: %s", self._peer, exc)

    async def __aenter__(self) -> _Link:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._link is not None:
            await self._link.aclose()
