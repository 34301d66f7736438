"""A simulated run's modelled wall-clock: its critical path as if each peer had its own machine.

The simulator runs every peer in one process, so its real wall time is the
sum of everyone's computing.  On separate machines the sequential ring's
critical path is the chain of hops: each hop's computing, then the hand-over
of the model to the member that trains the next position, and so on, from
the end of formation until the final model has gone round the ring.

:class:`TimelineRecorder` notes, from the peers' own events
(:mod:`fedup.peer.events`), what that chain is made of: when the first hop
began (formation), each hop's measured computing (``HopTrained.seconds``:
the hop's evaluation and training, timed around ``train_hop``) and each
hand-over's blob size.  :func:`critical_path` (pure: values in, values out)
adds them up with a link model (:class:`LinkModel`):

* a hand-over costs ``trips`` one-way latencies plus the blob's bytes over
  the bandwidth; the first blob on a directed link also pays the dial and
  handshake (``dial_trips`` more latencies);
* a position trained twice (a member died holding it, its predecessor
  handed its copy on) counts once, the last training;
* the final distribution: the final blob's hand-overs around the ring to
  every member but the one that ended the run, one after another.

Not in the model: the computing outside ``train_hop`` (encoding, hashing,
encryption and decoding of blobs, saving the final model) and the waits of
faults (a dead member's ``hop_timeout``, retries); a slow peer's extra
seconds per hop are added when given (``hold``).  docs/simulator.md says
how this compares with the simulator's own virtual clock.

:func:`parallel_clock` models the parallel baseline (FedAvg rounds) the same
way: each round's slowest member, then a ring all-reduce (:func:`allreduce_seconds`);
:func:`hybrid_clock` the hybrid mode's rounds: the slowest sub-ring's chain of hops and
hand-overs, then the all-reduce among every member.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

import attrs

from fedup.peer import events as ev
from fedup.protocol.peer_id import PeerId
from fedup.sim.network import Link

if TYPE_CHECKING:
    from fedup.learn.fedavg import RoundTime

__all__ = [
    "DIAL_TRIPS",
    "HAND_OVER_TRIPS",
    "CriticalPath",
    "HandOver",
    "HopTime",
    "LinkModel",
    "ParallelClock",
    "Timeline",
    "TimelineRecorder",
    "allreduce_bytes",
    "allreduce_seconds",
    "critical_path",
    "hybrid_clock",
    "parallel_clock",
    "time_to_target",
]

HAND_OVER_TRIPS: Final = 3
"""One-way latencies a hand-over puts on the critical path over an open link: the blob
header, the receiver's ACCEPT, the data with its END (the ACK travels back while the
receiver trains).  The simulator's virtual clock shows exactly this
(tests/integration/test_sim.py)."""

DIAL_TRIPS: Final = 2
"""One-way latencies the first blob on a directed link adds: the dial and the handshake
(a member keeps the link to its successor for the whole run)."""


@attrs.frozen
class HopTime:
    """One hop: member ``peer`` trained (or evaluated) ring position (``lap``, ``hop``)."""

    peer: int
    lap: int
    hop: int
    compute: float
    """Seconds of the hop's evaluation and training (``HopTrained.seconds``)."""


@attrs.frozen
class HandOver:
    """Member ``src`` handed a blob of ``size`` bytes to ``dst`` for position
    (``lap``, ``hop``); ``kind`` is ``model`` or ``final``."""

    src: int
    dst: int
    kind: str
    lap: int
    hop: int
    size: int


@attrs.frozen
class Timeline:
    """What a run's critical path is made of, in the order it happened."""

    formation: float | None = None
    """Clock seconds from the start until the first hop began (None: no hop)."""
    hops: tuple[HopTime, ...] = ()
    handovers: tuple[HandOver, ...] = ()
    """Completed hand-overs, in the order they completed."""
    rounds: tuple[tuple[int, tuple[float, ...]], ...] = ()
    """The parallel mode: each round's number and its members' computing seconds (by
    member index), in round order."""
    round_members: tuple[tuple[int, Mapping[int, tuple[float, float]]], ...] = ()
    """The same rounds, each member's index mapped to its computing seconds and, of
    those, its evaluation's (the hybrid mode's chains are built from them)."""


class TimelineRecorder:
    """Notes the events a :class:`Timeline` is made of (hand it every peer's events)."""

    def __init__(self, index_of: Mapping[PeerId, int]) -> None:
        self._index_of = index_of
        self._formation: float | None = None
        self._hops: list[HopTime] = []
        self._handovers: list[HandOver] = []
        self._rounds: dict[int, dict[int, tuple[float, float]]] = {}

    def note(self, index: int, clock: float, event: ev.PeerEvent) -> None:
        """Peer ``index`` reported ``event`` at ``clock`` seconds after the start."""
        if isinstance(event, ev.Training):
            if self._formation is None:
                self._formation = clock
        elif isinstance(event, ev.HopTrained):
            self._hops.append(HopTime(index, event.lap, event.hop, event.seconds))
        elif isinstance(event, ev.RoundTrained):
            if self._formation is None:
                self._formation = max(0.0, clock - event.seconds)
            self._rounds.setdefault(event.round, {})[index] = (event.seconds, event.evaluation)
        elif isinstance(event, ev.HandedOver):
            dst = self._index_of.get(event.to)
            if dst is not None:
                self._handovers.append(
                    HandOver(index, dst, event.kind, event.lap, event.hop, event.size)
                )

    def timeline(self) -> Timeline:
        ordered = sorted(self._rounds.items())
        rounds = tuple((r, tuple(by[m][0] for m in sorted(by))) for r, by in ordered)
        return Timeline(
            self._formation, tuple(self._hops), tuple(self._handovers), rounds, tuple(ordered)
        )


@attrs.frozen
class LinkModel:
    """What a hand-over costs: latencies and bandwidth of the directed links."""

    link: Link = attrs.field(factory=Link)
    """Every directed link without an entry in ``links``."""
    links: Mapping[tuple[int, int], Link] = attrs.field(factory=dict)
    trips: int = HAND_OVER_TRIPS
    dial_trips: int = DIAL_TRIPS

    def transfer(self, src: int, dst: int, size: int, *, dial: bool) -> float:
        """Seconds from the sender starting a hand-over of ``size`` bytes to the
        receiver holding it (``dial``: the link is opened first)."""
        link = self.links.get((src, dst), self.link)
        trips = self.trips + (self.dial_trips if dial else 0)
        return trips * link.latency + size / link.bandwidth


@attrs.frozen
class CriticalPath:
    """A run's modelled wall-clock, in parts (seconds)."""

    formation: float
    """Until the first hop began (the simulator's clock)."""
    compute: float
    """The hops' computing along the chain (with any ``hold``)."""
    transfer: float
    """The model's hand-overs along the chain."""
    final: float
    """The final model's hand-overs around the ring."""
    hops: int
    """Hops on the chain."""
    lap_ends: Mapping[int, float]
    """Modelled seconds at which each lap's last hop finished (lap -1, the initial
    model: the end of formation)."""

    @property
    def total(self) -> float:
        return self.formation + self.compute + self.transfer + self.final


def critical_path(
    timeline: Timeline, links: LinkModel, hold: Mapping[int, float] | None = None
) -> CriticalPath:
    """The critical path of a sequential ring run (see the module docstring).

    ``hold[peer]``: seconds that member holds the model longer at each hop it trains
    (a slow host).  Pure: the same arguments give the same result.
    """
    hold = hold or {}
    formation = timeline.formation or 0.0
    chain = _chain(timeline.hops)
    sizes = {(h.dst, h.lap, h.hop): h.size for h in timeline.handovers if h.kind == "model"}
    opened: set[tuple[int, int]] = set()
    compute = transfer = 0.0
    lap_ends: dict[int, float] = {-1: formation}
    previous: HopTime | None = None
    for step in chain:
        if previous is not None and previous.peer != step.peer:
            size = sizes.get((step.peer, step.lap, step.hop), 0)
            transfer += _hand_over(links, opened, previous.peer, step.peer, size)
        compute += step.compute + hold.get(step.peer, 0.0)
        lap_ends[step.lap] = formation + compute + transfer
        previous = step
    final = 0.0
    finals = [h for h in timeline.handovers if h.kind == "final"]
    if finals:
        origin = finals[0].src
        for h in finals:
            if h.dst != origin:
                final += _hand_over(links, opened, h.src, h.dst, h.size)
    return CriticalPath(formation, compute, transfer, final, len(chain), lap_ends)


def _chain(hops: Iterable[HopTime]) -> list[HopTime]:
    """The hops in ring order, each position once (the last training of it)."""
    last: dict[tuple[int, int], HopTime] = {}
    for h in hops:
        last[(h.lap, h.hop)] = h
    return [last[p] for p in sorted(last)]


def _hand_over(
    links: LinkModel, opened: set[tuple[int, int]], src: int, dst: int, size: int
) -> float:
    dial = (src, dst) not in opened
    opened.add((src, dst))
    return links.transfer(src, dst, size, dial=dial)


def time_to_target(
    lap_ends: Mapping[int, float], losses: Iterable[tuple[int, float]], target: float | None
) -> tuple[int, float] | None:
    """The first lap (in lap order) whose loss is at most ``target``, with the time its
    last hop ended; None when no lap with a known end reached it (or ``target`` is None)."""
    if target is None:
        return None
    for lap, loss in sorted(losses):
        if loss <= target and lap in lap_ends:
            return lap, lap_ends[lap]
    return None


# --- parallel rounds (FedAvg) -----------------------------------------------------------


def allreduce_seconds(links: LinkModel, members: int, size: int, *, dial: bool = False) -> float:
    """Seconds a bandwidth-optimal ring all-reduce of ``size`` bytes takes among
    ``members`` (member ``i`` sends to member ``i + 1``, the last to the first).

    A reduce-scatter then an all-gather: ``2 (N - 1)`` steps, in each of which every
    member sends one chunk of ``size / N`` bytes to its successor at once, so a step
    lasts the slowest of those links' one latency plus the chunk over its bandwidth.
    Each member sends ``2 (N - 1) / N`` of the model in all.  ``dial``: the links are
    opened first (``links.dial_trips`` latencies of the slowest link, as the ring's
    first hand-over on a link pays).  0 for one member.
    """
    if members < 2:
        return 0.0
    chunk = size / members
    ring = [links.links.get((i, (i + 1) % members), links.link) for i in range(members)]
    step = max(link.latency + chunk / link.bandwidth for link in ring)
    opening = links.dial_trips * max(link.latency for link in ring) if dial else 0.0
    return opening + 2 * (members - 1) * step


def allreduce_bytes(members: int, size: int) -> float:
    """Bytes each member sends in a ring all-reduce of ``size`` bytes: ``2 (N - 1) / N``."""
    return 2 * (members - 1) / members * size if members > 1 else 0.0


@attrs.frozen
class ParallelClock:
    """A parallel run's modelled wall-clock (seconds) and each member's bytes sent."""

    compute: float
    """The slowest member's computing of every round, added up."""
    transfer: float
    """The all-reduces."""
    round_ends: Mapping[int, float]
    """When each round's all-reduce ended (its output exists); round -1 (the initial
    model): 0."""
    bytes_per_member: float

    @property
    def total(self) -> float:
        return self.compute + self.transfer


def parallel_clock(
    rounds: Sequence[RoundTime],
    model_bytes: int,
    links: LinkModel,
    hold: Mapping[int, float] | None = None,
    *,
    sums_bytes: int,
) -> ParallelClock:
    """The modelled wall-clock of parallel rounds, every member on its own machine.

    Each round lasts its slowest member's measured computing (plus ``hold[member]``,
    a slow host's extra seconds) and then an all-reduce (:func:`allreduce_seconds`) of
    the model and the validation sums (``sums_bytes``:
    :data:`~fedup.learn.lap_sums.PACKED_SIZE`); an evaluation-only round reduces the
    sums alone.  The first all-reduce opens the links.  Pure: the same arguments give
    the same result.
    """
    hold = hold or {}
    compute = transfer = sent = 0.0
    ends: dict[int, float] = {-1: 0.0}
    for i, r in enumerate(rounds):
        members = len(r.compute)
        size = sums_bytes + (model_bytes if r.reduced else 0)
        compute += max((c + hold.get(m, 0.0) for m, c in enumerate(r.compute)), default=0.0)
        transfer += allreduce_seconds(links, members, size, dial=i == 0)
        sent += allreduce_bytes(members, size)
        ends[r.round] = compute + transfer
    return ParallelClock(compute, transfer, ends, sent)


def hybrid_clock(
    rounds: Sequence[RoundTime],
    sizes: Sequence[int],
    laps: int,
    model_bytes: int,
    relay_bytes: int,
    links: LinkModel,
    *,
    sums_bytes: int,
) -> ParallelClock:
    """The modelled wall-clock of hybrid rounds (:mod:`fedup.learn.hybrid`), every member
    on its own machine.

    ``rounds[i].compute`` holds each sub-ring's computing in round ``i`` (its slowest
    member's evaluation and the sum of its hops: they run in sequence); ``sizes`` the
    sub-rings' members.  A training round lasts its slowest sub-ring's computing and
    ``laps x size - 1`` hand-overs of the relay state (``relay_bytes``: the model and the
    optimizer's state) over the default link, each member's first of the round also
    opening its link (:mod:`fedup.peer.hybrid_driver` dials each round; a sub-ring of
    one hands nothing over), then an all-reduce of the model and the sums among every
    member; an evaluation-only round reduces the sums alone.  Pure.
    """
    members = sum(sizes)
    hand_over = links.transfer(0, 1, relay_bytes, dial=False)
    opening = links.dial_trips * links.link.latency
    compute = transfer = sent = 0.0
    ends: dict[int, float] = {-1: 0.0}
    for i, r in enumerate(rounds):
        relay = [_relay_hand_overs(n, laps) if r.reduced else (0, 0) for n in sizes]
        chains = [
            c + k * hand_over + d * opening for c, (k, d) in zip(r.compute, relay, strict=True)
        ]
        slowest = max(range(len(chains)), key=chains.__getitem__)
        compute += r.compute[slowest]
        transfer += chains[slowest] - r.compute[slowest]
        size = sums_bytes + (model_bytes if r.reduced else 0)
        transfer += allreduce_seconds(links, members, size, dial=i == 0)
        sent += allreduce_bytes(members, size) + sum(k for k, _ in relay) * relay_bytes / members
        ends[r.round] = compute + transfer
    return ParallelClock(compute, transfer, ends, sent)


def _relay_hand_overs(size: int, laps: int) -> tuple[int, int]:
    """A sub-ring's hand-overs in a round, and how many of its members send any."""
    if size < 2:
        return 0, 0
    count = laps * size - 1
    return count, min(size, count)
