"""The modelled wall-clock of a simulated run: the ring's critical path, on known answers."""

from __future__ import annotations

import pytest

from fedup.peer import events as ev
from fedup.protocol.peer_id import PeerId
from fedup.sim.network import Link
from fedup.sim.wallclock import (
    HandOver,
    HopTime,
    LinkModel,
    Timeline,
    TimelineRecorder,
    critical_path,
    time_to_target,
)

COMPUTE = {0: 0.5, 1: 0.25, 2: 0.125}
"""Seconds each of three members computes per hop."""


def ring_of_three(*, done: float = 0.0625) -> Timeline:
    """Two laps of members 0, 1, 2, then member 0's hop that ends the run; every model
    blob 100 kB; the final model (50 kB) goes 0 -> 1 -> 2 -> 0."""
    hops = [HopTime(p, lap, p, COMPUTE[p]) for lap in (0, 1) for p in (0, 1, 2)]
    hops.append(HopTime(0, 2, 0, done))
    model = [HandOver((p - 1) % 3, p, "model", lap, p, 100_000) for lap, p in
             [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]]  # fmt: skip
    final = [HandOver(s, (s + 1) % 3, "final", 1, 2, 50_000) for s in (0, 1, 2)]
    return Timeline(formation=2.0, hops=tuple(hops), handovers=(*model, *final))


LINKS = LinkModel(link=Link(latency=0.01, bandwidth=1e6))
OPEN = 3 * 0.01 + 0.1
"""A 100 kB hand-over over an open link: three one-way latencies and 0.1 s of bytes."""
DIALLED = OPEN + 2 * 0.01
"""The first on a link also dials and shakes hands: two latencies more."""


def test_the_critical_path_of_a_ring_adds_up_the_chain() -> None:
    path = critical_path(ring_of_three(), LINKS)
    assert path.formation == 2.0
    assert path.hops == 7
    assert path.compute == pytest.approx(2 * 0.875 + 0.0625)
    # Lap 0 opens the links 0->1, 1->2 and 2->0 (the last one into lap 1); the rest are open.
    assert path.transfer == pytest.approx(3 * DIALLED + 3 * OPEN)
    # The final model to members 1 and 2 (not back to 0, which ended the run): 50 kB each.
    assert path.final == pytest.approx(2 * (3 * 0.01 + 0.05))
    assert path.total == pytest.approx(2.0 + 1.8125 + 0.84 + 0.16)
    lap_0 = 2.0 + 0.875 + 2 * DIALLED
    lap_1 = lap_0 + DIALLED + 0.875 + 2 * OPEN
    assert lap_0 == pytest.approx(3.175) and lap_1 == pytest.approx(4.46)
    assert path.lap_ends == pytest.approx({-1: 2.0, 0: lap_0, 1: lap_1, 2: lap_1 + OPEN + 0.0625})


def test_the_critical_path_is_a_pure_function() -> None:
    timeline = ring_of_three()
    assert critical_path(timeline, LINKS) == critical_path(timeline, LINKS)


def test_one_slow_link_costs_only_its_hand_overs() -> None:
    slow = LinkModel(link=LINKS.link, links={(1, 2): Link(latency=0.5, bandwidth=1e6)})
    base = critical_path(ring_of_three(), LINKS)
    path = critical_path(ring_of_three(), slow)
    # 1 -> 2 carries lap 0 (dialled: 5 trips), lap 1 (3 trips) and the final (3 trips).
    assert path.transfer - base.transfer == pytest.approx((5 + 3) * (0.5 - 0.01))
    assert path.final - base.final == pytest.approx(3 * (0.5 - 0.01))
    assert path.compute == base.compute and path.formation == base.formation


def test_no_latency_and_unlimited_bandwidth_leave_formation_and_compute() -> None:
    path = critical_path(ring_of_three(), LinkModel())
    assert path.transfer == 0 and path.final == 0
    assert path.total == pytest.approx(2.0 + 1.8125)


def test_a_slow_host_holds_the_model_at_each_hop_it_trains() -> None:
    base = critical_path(ring_of_three(), LINKS)
    path = critical_path(ring_of_three(), LINKS, hold={1: 1.5})
    assert path.compute - base.compute == pytest.approx(2 * 1.5)  # member 1 trains twice
    assert path.lap_ends[0] - base.lap_ends[0] == pytest.approx(1.5)


def test_a_position_trained_twice_counts_once_the_last_time() -> None:
    """Member 1 died holding lap 1 hop 1; its predecessor handed its copy to member 2,
    which trained the position again (positions count live members)."""
    t = ring_of_three()
    hops = [*t.hops[:4], HopTime(1, 1, 1, 9.0), HopTime(2, 1, 1, 0.125), HopTime(0, 2, 0, 0.0)]
    handovers = (
        HandOver(0, 1, "model", 0, 1, 100_000),
        HandOver(1, 2, "model", 0, 2, 100_000),
        HandOver(2, 0, "model", 1, 0, 100_000),
        HandOver(0, 1, "model", 1, 1, 100_000),
        HandOver(0, 2, "model", 1, 1, 100_000),
        HandOver(2, 0, "model", 2, 0, 100_000),
    )
    path = critical_path(Timeline(2.0, tuple(hops), handovers), LINKS)
    assert path.hops == 6
    assert path.compute == pytest.approx(0.875 + 0.5 + 0.125)  # not member 1's 9 s
    # 0 -> 1, 1 -> 2, 2 -> 0 dialled in lap 0; then 0 -> 2 dialled, 2 -> 0 open.
    assert path.transfer == pytest.approx(4 * DIALLED + OPEN)
    assert path.final == 0


def test_an_empty_timeline_is_zero() -> None:
    path = critical_path(Timeline(), LINKS)
    assert (path.total, path.hops, dict(path.lap_ends)) == (0.0, 0, {-1: 0.0})


def test_time_to_target_is_the_first_lap_within_it() -> None:
    ends = {-1: 1.0, 0: 2.0, 1: 3.0, 2: 4.0}
    losses = [(2, 0.30), (-1, 0.69), (0, 0.40), (1, 0.33)]  # in any order
    assert time_to_target(ends, losses, 0.35) == (1, 3.0)
    assert time_to_target(ends, losses, 0.40) == (0, 2.0)  # "within" includes equal
    assert time_to_target(ends, losses, 0.10) is None  # never reached
    assert time_to_target(ends, losses, None) is None  # no target (no centralized run)
    assert time_to_target({0: 2.0}, [(1, 0.1)], 0.35) is None  # a lap whose end is unknown


def test_the_recorder_notes_formation_hops_and_hand_overs() -> None:
    a, b, stranger = (PeerId.from_public_key(bytes([i]) * 32) for i in (1, 2, 3))
    recorder = TimelineRecorder({a: 0, b: 1})
    recorder.note(0, 1.5, ev.LapNoted(0, 0.5, 0.7, 0.8, 100))  # not part of the path
    recorder.note(0, 2.0, ev.Training(0, 0))
    recorder.note(0, 2.0, ev.HopTrained(0, 0, 100, 0.6, 0.25))
    recorder.note(0, 2.5, ev.HandedOver("model", b, 0, 1, 1234))
    recorder.note(1, 2.5, ev.Training(0, 1))  # formation is the first hop's start only
    recorder.note(1, 2.5, ev.HopTrained(0, 1, 90, 0.5, 0.125))
    recorder.note(1, 3.0, ev.HandedOver("final", stranger, 0, 1, 99))  # not simulated: left out
    assert recorder.timeline() == Timeline(
        formation=2.0,
        hops=(HopTime(0, 0, 0, 0.25), HopTime(1, 0, 1, 0.125)),
        handovers=(HandOver(0, 1, "model", 0, 1, 1234),),
    )
