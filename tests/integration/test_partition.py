"""Partitions: members cut off from the others for a while (simulator, virtual clock).

A :class:`~fedup.sim.Cut` takes the links of some members down once a ring
position was trained: connections across the cut break at once, dials across it
fail as unreachable, and members on the same side still reach each other; after
``duration`` seconds the cut heals.  The majority rule (docs/reliability.md):
only a side with a majority of the view may count the others as dead and go
on; a holder that would leave less than a majority keeps the model and tries
again for ``Limits.minority_wait``, then stops with ``members-lost``.

Four lenders on the slow links of :mod:`tests.integration.test_restart` (a hop
lasts 1.5 virtual seconds); positions are named by their index in
:func:`ring_order`.  Where the cut must end while the run still goes on, the
run has 24 laps (about 110 s with three members), so a member cut off for 60 s
at lap 1 is back with laps to spare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConfigError
from fedup.net.transport import DialError
from fedup.peer import events as ev
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings
from fedup.sim import Cut, Faults, SimNetwork, SimResult, SimSettings, run_simulation
from tests.integration.test_fault_matrix import laps_of, nobody_dead, peer_id
from tests.integration.test_restart import RUN, SLOW_LINKS, all_alike, lenders, ring_order

LONG_RUN = RunSettings(max_laps=24, patience=24)
CUT = 60.0
"""Seconds a cut lasts (where the run must go on after it)."""

Events = list[tuple[int, float, ev.PeerEvent]]


async def simulate(
    tmp_path: Path,
    cut: Cut,
    *,
    run: RunSettings = RUN,
    limits: Limits = DEFAULT_LIMITS,
    events: Events | None = None,
) -> SimResult:
    """Four lenders on slow links with ``cut``; ``events`` collects (peer, time, event)."""
    settings = SimSettings(run=run, faults=Faults(link=SLOW_LINKS, cuts=(cut,)), limits=limits)

    def watch(index: int, peer: object, at: float, event: ev.PeerEvent) -> None:
        if events is not None:
            events.append((index, at, event))

    with trio.fail_after(20_000):  # virtual seconds: a hung peer fails the test
        return await run_simulation(lenders(4), tmp_path, settings, watch=watch)


def of_kind(events: Events, kind: type, index: int | None = None) -> list[tuple[float, Any]]:
    """(time, event) of every ``kind`` event (of peer ``index``)."""
    return [(at, e) for i, at, e in events if isinstance(e, kind) and (index is None or i == index)]


def cut_window(events: Events, cut: Cut, trigger: int) -> tuple[float, float]:
    """When ``cut`` began and healed: ``trigger`` trained its position at the start."""
    [start] = [
        at
        for at, e in of_kind(events, ev.HopTrained, trigger)
        if (e.lap, e.hop) == (cut.lap, cut.hop)
    ]
    start += cut.delay
    return start, start + cut.duration


def dials(result: SimResult, src: int, start: float, end: float) -> list[tuple[int, float]]:
    """(listener, time) of the dials by ``src`` that a cut refused between the times."""
    return [(d, at) for s, d, at in result.unreachable if s == src and start <= at <= end]


# --- the network ------------------------------------------------------------------------


async def test_a_cut_breaks_links_across_it_refuses_dials_and_heals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = SimNetwork()
    addresses = []
    for i in range(3):
        address, _ = network._bind(Address(f"10.0.0.{i + 1}", 0))
        network.register(address.host, i)
        addresses.append(address)
    across = await network.open_link(0, addresses[2])
    same_side = await network.open_link(0, addresses[1])
    cut = network.cut_off([2])
    with pytest.raises(trio.BrokenResourceError):
        await across.send_all(b"x")  # broken at the cut
    await same_side.send_all(b"x")  # 0 and 1 are on the same side
    with pytest.raises(DialError, match="unreachable"):
        await network.open_link(0, addresses[2])
    with pytest.raises(DialError, match="unreachable"):
        await network.open_link(2, addresses[1])
    assert [(s, d) for s, d, _ in network.unreachable] == [(0, 2), (2, 1)]
    assert [(s, d) for s, d, _ in network.dropped] == [(0, 2)]
    network.heal(cut)
    again = await network.open_link(2, addresses[0])
    await again.send_all(b"x")


@pytest.mark.parametrize(
    ("cut", "problem"),
    [
        (Cut((4,), lap=1, hop=0, duration=1.0), "peer 4 is not one of"),
        (Cut((), lap=1, hop=0, duration=1.0), "at least one peer"),
        (Cut((0, 1, 2, 3), lap=1, hop=0, duration=1.0), "not all 4"),
        (Cut((1,), lap=1, hop=0, duration=0.0), "duration must be positive"),
        (Cut((1,), lap=1, hop=0, duration=1.0, delay=-1.0), "must not be negative"),
    ],
)
async def test_a_cut_that_names_no_partition_is_refused(
    tmp_path: Path, cut: Cut, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        await simulate(tmp_path, cut)


# --- 3 | 1 ------------------------------------------------------------------------------


async def test_a_member_cut_off_while_it_waits_is_taken_back_after_the_cut_heals(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 is cut off for 60 s right after position 1 trained lap 1 (it waits for
    the model).  The majority side declares it dead (unreachable) and goes on.  Hearing
    nothing for ``hop_timeout`` (20 s here), it asks to be taken back: its requests fail
    while the cut lasts; after the heal one gets through (it asks every
    ``return_interval``), its predecessor takes it back at its next hand-over and it
    trains again.  Everyone ends alike with one model; nobody is left dead."""
    order = ring_order(4)
    before, victim = order[1], order[2]
    cut = Cut((victim,), lap=1, hop=1, duration=CUT)
    events: Events = []
    limits = attrs.evolve(DEFAULT_LIMITS, hop_timeout=20.0)
    result = await simulate(tmp_path, cut, run=LONG_RUN, limits=limits, events=events)
    start, healed = cut_window(events, cut, before)
    [(_, declared)] = of_kind(events, ev.DeclaredDead, before)
    assert (declared.dead.text, declared.cause) == (peer_id(victim), "unreachable")
    trained_meanwhile = [at for at, _ in of_kind(events, ev.HopTrained) if start < at < healed]
    assert trained_meanwhile  # the majority side went on
    asked = {d for d, _ in dials(result, victim, start + 1.0, healed)}
    assert asked == set(order) - {victim}  # its return requests to everyone failed
    [(back_at, back)] = of_kind(events, ev.TakenBack, before)
    assert (back.peer.text, back.by.text) == (peer_id(victim), peer_id(before))
    assert back_at > healed
    assert max(laps_of(result, victim)) > 1 + 1  # trained again after the cut
    all_alike(result)
    nobody_dead(result)


# --- 2 | 2 ------------------------------------------------------------------------------


async def test_a_two_two_split_holds_the_model_until_the_cut_heals(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Positions 2 and 3 are cut off from 0 and 1 for 60 s as position 1 holds lap 1:
    neither side has a majority.  The holder may count position 2 dead (three of four
    would be live) but not position 3 as well: it keeps the model and tries again all
    through the cut, and nobody ends the run meanwhile.  After the heal the run goes on
    and everyone ends alike with one model, at most one member counted dead."""
    order = ring_order(4)
    holder = order[1]
    cut = Cut((order[2], order[3]), lap=1, hop=1, duration=CUT)
    events: Events = []
    result = await simulate(tmp_path, cut, events=events)
    start, healed = cut_window(events, cut, holder)
    ended = [at for at, _ in of_kind(events, ev.Finished) + of_kind(events, ev.Failed)]
    assert min(ended) > healed  # nobody ended the run while the cut lasted
    trained_meanwhile = [at for at, _ in of_kind(events, ev.HopTrained) if start < at < healed]
    assert trained_meanwhile == []  # the model stayed with the holder
    retries = [at for d, at in dials(result, holder, start, healed) if d == order[3]]
    assert len(retries) >= 5 and max(retries) >= healed - 10  # tried all through the cut
    all_alike(result)
    for p in result.peers:
        assert p.summary is not None and len(p.summary.dead) <= 1, p.summary.dead


async def test_a_two_two_split_longer_than_minority_wait_leaves_no_federation_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The same split, lasting three times ``minority_wait`` (100 s here, hop_timeout
    50 s): the holder stops with ``members-lost`` after ``minority_wait``, not ok and
    nothing distributed; the others fail waiting for a model.  Nobody ends ok: there
    are never two federation models."""
    order = ring_order(4)
    holder = order[1]
    limits = attrs.evolve(DEFAULT_LIMITS, minority_wait=100.0, hop_timeout=50.0)
    cut = Cut((order[2], order[3]), lap=1, hop=1, duration=3 * limits.minority_wait)
    events: Events = []
    result = await simulate(tmp_path, cut, limits=limits, events=events)
    start, healed = cut_window(events, cut, holder)
    assert all(p.summary is None or not p.summary.ok for p in result.peers)
    stopped = {p.index: p.summary for p in result.peers if p.summary is not None}
    assert list(stopped) == [holder]
    assert stopped[holder].stop_reason == "members-lost"
    [(stopped_at, _)] = of_kind(events, ev.Finished, holder)
    assert start + limits.minority_wait <= stopped_at < healed
    for p in result.peers:
        if p.index != holder:
            assert p.error is not None and "no model arrived" in p.error, p.error
    handed = [at for at, _ in of_kind(events, ev.HandedOver, holder) if at >= start]
    assert handed == []  # the holder handed nothing on, not even its members-lost model


# --- 3 | 1, the holder cut off -------------------------------------------------------------


async def test_a_holder_cut_off_is_skipped_then_taken_back_after_the_cut_heals(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 is cut off for 60 s one second after it took and trained lap 1 (its
    predecessor has its acknowledgement; its own hand-over breaks half-way).  Its
    predecessor hears nothing for ``hop_timeout`` (30 s here), declares it dead (timed
    out) and hands its kept copy on; the cut member cannot go on alone and holds.  After
    the heal it learns it was excluded, asks to return and is taken back.  Everyone ends
    alike with one model; nobody is left dead."""
    order = ring_order(4)
    before, victim, after = order[1], order[2], order[3]
    limits = attrs.evolve(DEFAULT_LIMITS, hop_timeout=30.0)
    cut = Cut((victim,), lap=1, hop=2, duration=CUT, delay=1.0)
    events: Events = []
    result = await simulate(tmp_path, cut, run=LONG_RUN, limits=limits, events=events)
    start, healed = cut_window(events, cut, victim)
    [(declared_at, declared)] = of_kind(events, ev.DeclaredDead, before)
    assert (declared.dead.text, declared.cause) == (peer_id(victim), "timed-out")
    assert declared_at >= start + limits.hop_timeout
    resent = [
        e
        for at, e in of_kind(events, ev.HandedOver, before)
        if start < at < healed and (e.lap, e.hop) == (1, 2)
    ]
    assert [e.to.text for e in resent] == [peer_id(after)]  # its kept copy, handed on
    victim_handed = [at for at, _ in of_kind(events, ev.HandedOver, victim) if at > start]
    assert victim_handed == [] or min(victim_handed) > healed  # it held while cut off
    assert [at > healed for at, _ in of_kind(events, ev.Excluded, victim)] == [True]
    [(back_at, back)] = of_kind(events, ev.TakenBack, before)
    assert back.peer.text == peer_id(victim) and back_at > healed
    assert max(laps_of(result, victim)) > 2  # trained again after the cut
    all_alike(result)
    nobody_dead(result)
