"""The fault matrix: who finishes, with which model, and how much work is lost.

Crashes at every stage of a hop (sending, receiving, the final model's round),
of the ring head, of two members and of the whole federation, each with and
without a restart (the cases :mod:`tests.integration.test_restart` and
:mod:`tests.integration.test_sim` do not cover already).  Real peers in one
process on trio's virtual clock (:mod:`fedup.sim`); a killed peer's task is
cancelled, as a crash, and with ``restart_after`` it starts again with the same
identity and state directory.

Four lenders; ring positions are named by their index in :func:`ring_order`
(position 0 is the ring head, the lowest peer ID).  With the default links a
hop lasts 1.5 virtual seconds and the run about 70: a restart 5 s after a crash
comes back within one hop, one 20 s after comes back laps later (its
predecessor has counted it as dead meanwhile).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.peer import events as ev
from fedup.sim import Faults, Kill, Link, SimResult, SimSettings, run_simulation, sim_identity
from tests.integration.test_restart import RUN, SLOW_LINKS, all_alike, hops_of, lenders, ring_order

BLOB = 110_000
"""Bytes of a ring blob of the lenders' model (about 110 kB, header included)."""
NARROW = Link(latency=SLOW_LINKS.latency, bandwidth=20_000)
"""A link on which a blob takes 5.5 s to go through: a kill 2 s after the trigger
(the header and its acceptance take one round trip, 1 s) falls mid-transfer."""
MID_TRANSFER = 2.0
assert 2 * NARROW.latency < MID_TRANSFER < BLOB / NARROW.bandwidth

Events = list[tuple[int, ev.PeerEvent]]


async def simulate(
    tmp_path: Path,
    *kills: Kill,
    links: Mapping[tuple[int, int], Link] | None = None,
    events: Events | None = None,
    n: int = 4,
) -> SimResult:
    """``n`` lenders on slow links, with ``kills``; ``events`` collects every peer event."""
    faults = Faults(link=SLOW_LINKS, links=dict(links or {}), kills=kills)
    settings = SimSettings(run=RUN, faults=faults)

    def watch(index: int, peer: object, at: float, event: ev.PeerEvent) -> None:
        if events is not None:
            events.append((index, event))

    with trio.fail_after(20_000):  # virtual seconds: a hung peer fails the test
        return await run_simulation(lenders(n), tmp_path, settings, watch=watch)


_FAULT_FREE: dict[frozenset[tuple[tuple[int, int], Link]], str] = {}


async def fault_free_weights(
    tmp_path: Path, links: Mapping[tuple[int, int], Link] | None = None
) -> str:
    """The final weights' hash of the same run without a crash (run once per links)."""
    key = frozenset((links or {}).items())
    if key not in _FAULT_FREE:
        result = await simulate(tmp_path / "fault-free", links=links)
        assert result.weights_sha256 is not None
        _FAULT_FREE[key] = result.weights_sha256
    return _FAULT_FREE[key]


def peer_id(index: int) -> str:
    return sim_identity(0, index).peer_id.text


def positions_logged(result: SimResult) -> collections.Counter[tuple[int, int]]:
    """How many hop lines name each ring position, over every member's metrics.jsonl."""
    return collections.Counter(
        (h["lap"], h["hop"]) for p in result.peers for h in hops_of(result, p.index)
    )


def no_hop_logged_twice(result: SimResult) -> None:
    """Every lap was trained (and the last one closed by (max_laps + 1, 0)) and no ring
    position appears in two hop lines: a member logs a hop once its training ended,
    so a crash in training loses the line with the work (the hop is trained again and
    logged once), and a crash after the line hands on the state it saved."""
    counts = positions_logged(result)
    assert [pos for pos, n in counts.items() if n > 1] == []
    assert {lap for lap, _ in counts} == set(range(RUN.max_laps + 2))
    assert (RUN.max_laps + 1, 0) in counts


def laps_of(result: SimResult, index: int) -> list[int]:
    return [h["lap"] for h in hops_of(result, index)]


def of_kind(events: Events, kind: type, index: int | None = None) -> list[Any]:
    return [e for i, e in events if isinstance(e, kind) and (index is None or i == index)]


def nobody_dead(result: SimResult) -> None:
    for p in result.peers:
        assert p.summary is not None and p.summary.dead == [], p.summary


def survivors_alike(
    result: SimResult, killed: Sequence[int], dead: Sequence[int] | None = None
) -> str:
    """The members not ``killed`` finished ok with one model file, each listing exactly
    ``dead`` (by default the killed) as dead; the killed never finished.  Returns the
    model file's hash."""
    dead = killed if dead is None else dead
    digest = result.model_sha256
    assert digest is not None
    for p in result.peers:
        if p.index in killed:
            assert p.summary is None and p.error == "killed"
            continue
        assert p.summary is not None and p.summary.ok, (p.index, p.error)
        assert p.summary.model_sha256 == digest
        assert sorted(p.summary.dead) == sorted(peer_id(i) for i in dead)
        assert p.summary.laps == RUN.max_laps
    return digest


# --- killed mid-transfer, restarted ----------------------------------------------------


async def test_a_member_killed_while_sending_resends_the_state_it_saved(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 trains lap 1 and dies half-way through sending it (over a narrow
    link), then comes back 5 s later: it resumes handing on the state it saved, its
    successor takes it, and nobody is declared dead.  No hop lost: every member trains
    each of its positions once, and the model is the one of the run without a crash."""
    order = ring_order(4)
    victim, successor = order[2], order[3]
    links = {(victim, successor): NARROW}
    events: Events = []
    kill = Kill(victim, lap=1, hop=2, restart_after=5.0, delay=MID_TRANSFER)
    result = await simulate(tmp_path, kill, links=links, events=events)
    all_alike(result)
    nobody_dead(result)
    assert result.peers[victim].restarts == 1
    assert [r.phase for r in of_kind(events, ev.Resumed, victim)] == ["handing"]
    for i in order:
        hops = [(h["lap"], h["hop"]) for h in hops_of(result, i)]
        assert hops == [(lap, order.index(i)) for lap in range(RUN.max_laps + 1)] + [
            (RUN.max_laps + 1, 0)
        ] * (i == order[0])
    assert result.weights_sha256 == await fault_free_weights(tmp_path, links)


async def test_a_member_killed_while_receiving_is_declared_dead_then_taken_back(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 3 dies half-way through receiving lap 1 (over a narrow link) and comes
    back 20 s later.  The sender's hand-over breaks; its retry finds nothing listening,
    so it declares position 3 dead (unreachable) and the ring goes on with three.  Back,
    position 3 asks to return; the sender, its live predecessor, takes it back at its
    next hand-over and it trains again.  Everyone ends alike; nobody is left dead."""
    order = ring_order(4)
    sender, victim = order[2], order[3]
    events: Events = []
    kill = Kill(victim, lap=1, hop=2, restart_after=20.0, delay=MID_TRANSFER)
    result = await simulate(tmp_path, kill, links={(sender, victim): NARROW}, events=events)
    all_alike(result)
    nobody_dead(result)
    assert result.peers[victim].restarts == 1
    [declared] = of_kind(events, ev.DeclaredDead, sender)
    assert (declared.dead.text, declared.by.text, declared.cause) == (
        peer_id(victim),
        peer_id(sender),
        "unreachable",
    )
    [back] = of_kind(events, ev.TakenBack, sender)
    assert (back.peer.text, back.by.text) == (peer_id(victim), peer_id(sender))
    laps = laps_of(result, victim)
    assert laps[0] == 0 and 1 not in laps  # lap 1 never reached it
    assert min(laps[1:]) > 1 and max(laps) == RUN.max_laps  # trained again, to the end
    no_hop_logged_twice(result)


async def test_a_member_killed_while_the_final_model_goes_round_gets_it_from_one_that_finished(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The head ends the run at (max_laps + 1, 0) and the final model goes round the
    ring; position 2 dies while receiving it and comes back 5 s later.  Its
    predecessor passes the final on to position 3 meanwhile; back, position 2 asks,
    and a member that finished hands it the final model.  Everyone ends with the model
    of the run without a crash; no hop lost, nobody dead."""
    order = ring_order(4)
    victim = order[2]
    events: Events = []
    kill = Kill(victim, lap=RUN.max_laps + 1, hop=0, restart_after=5.0, delay=2.5)
    result = await simulate(tmp_path, kill, events=events)
    all_alike(result)
    nobody_dead(result)
    assert result.peers[victim].restarts == 1
    assert laps_of(result, victim) == list(range(RUN.max_laps + 1))
    [resumed] = of_kind(events, ev.Resumed, victim)
    assert resumed.phase == "waiting"  # it died before the final model reached it
    finals_to_victim = [
        i
        for i, e in events
        if isinstance(e, ev.HandedOver) and e.kind == "final" and e.to.text == peer_id(victim)
    ]
    [giver] = finals_to_victim  # one member's copy went through (the others were refused)
    assert giver != victim and result.peers[giver].summary is not None
    no_hop_logged_twice(result)
    assert result.weights_sha256 == await fault_free_weights(tmp_path)


# --- the ring head, two members, everyone --------------------------------------------


async def test_the_ring_head_killed_after_its_hop_is_taken_back_while_the_next_closes_laps(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The head (lowest peer ID) dies after handing lap 2 on and comes back 20 s later.
    Its predecessor finds it unreachable at the end of lap 2 and declares it dead; the
    next member, now the lowest live one, closes the laps meanwhile.  Back, the head
    asks; its predecessor takes it back and the head closes the last laps.  Everyone
    ends alike; nobody is left dead, no hop logged twice."""
    order = ring_order(4)
    head, second, last = order[0], order[1], order[3]
    events: Events = []
    result = await simulate(tmp_path, Kill(head, lap=2, hop=1, restart_after=20.0), events=events)
    all_alike(result)
    nobody_dead(result)
    [declared] = of_kind(events, ev.DeclaredDead, last)
    assert (declared.dead.text, declared.by.text) == (peer_id(head), peer_id(last))
    assert of_kind(events, ev.LapClosed, second)  # the next member closed laps
    [back] = of_kind(events, ev.TakenBack, head)
    assert (back.peer.text, back.by.text) == (peer_id(head), peer_id(last))
    laps = laps_of(result, head)
    assert laps[:3] == [0, 1, 2] and max(laps) == RUN.max_laps + 1  # it ended the run
    no_hop_logged_twice(result)


async def test_two_members_killed_at_once_are_both_taken_back(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Positions 1 and 2 die together as the head trains lap 1, and both come back 20 s
    later.  The head declares position 1 dead (unreachable), but not position 2: that
    would leave 2 of 4 live, not a majority, so it holds the model and tries again
    until position 2 is back; position 1 asks and is taken back.  Everyone ends alike;
    nobody is left dead, no hop logged twice."""
    order = ring_order(4)
    victims = order[1:3]
    events: Events = []
    kills = [Kill(v, lap=1, hop=0, restart_after=20.0) for v in victims]
    result = await simulate(tmp_path, *kills, events=events)
    all_alike(result)
    nobody_dead(result)
    declared = {e.dead.text for e in of_kind(events, ev.DeclaredDead, order[0])}
    assert declared == {peer_id(order[1])}
    taken_back = {e.peer.text for e in of_kind(events, ev.TakenBack, order[0])}
    assert taken_back == {peer_id(order[1])}
    for v in victims:
        assert result.peers[v].restarts == 1
        assert max(laps_of(result, v)) == RUN.max_laps  # trained again, to the end
    no_hop_logged_twice(result)


def whole_federation_after_a_hop() -> list[Kill]:
    """Every member dies as position 1 trained lap 2; all come back 5 s later."""
    return [Kill(i, lap=2, hop=1, restart_after=5.0) for i in range(4)]


def whole_federation_while_one_trains() -> list[Kill]:
    """Position 2 dies while training lap 2, the others 0.1 s later (before any
    notices); all come back at the same moment."""
    order = ring_order(4)
    trainer = order[2]
    kills = [Kill(trainer, lap=2, hop=2, restart_after=5.1, training=True)]
    kills += [Kill(i, lap=2, hop=1, restart_after=5.0, delay=1.6) for i in order if i != trainer]
    return kills


@pytest.mark.parametrize("kills", [whole_federation_after_a_hop, whole_federation_while_one_trains])
async def test_the_whole_federation_killed_at_once_resumes_from_what_each_saved(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, kills: Any
) -> None:
    """Every member dies at once and all come back together: each resumes from its
    run-state file (the holder hands on what it saved, a member killed in training
    trains that hop again), nobody is declared dead, and the run ends with the model of
    the run without a crash.  At most the hop in training is lost, and it is trained
    again: no hop line twice."""
    events: Events = []
    result = await simulate(tmp_path, *kills(), events=events)
    all_alike(result)
    nobody_dead(result)
    assert [p.restarts for p in result.peers] == [1] * 4
    assert len(of_kind(events, ev.Resumed)) == 4
    assert of_kind(events, ev.DeclaredDead) == []
    no_hop_logged_twice(result)
    assert sum(positions_logged(result).values()) == 4 * (RUN.max_laps + 1) + 1
    assert result.weights_sha256 == await fault_free_weights(tmp_path)


async def test_a_federation_restarted_a_moment_apart_finishes_as_one(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Every member dies as position 1 trained lap 2; position 1, which holds the model,
    comes back after 5 s, the others a second later (a power cut: hosts boot at
    different speeds).  The promise: the run resumes and ends as one, everyone alike."""
    holder = ring_order(4)[1]
    kills = [Kill(i, lap=2, hop=1, restart_after=5.0 if i == holder else 6.0) for i in range(4)]
    result = await simulate(tmp_path, *kills)
    reasons = [p.summary.stop_reason if p.summary is not None else p.error for p in result.peers]
    assert reasons == ["max-laps"] * 4  # the holder ends alone: "members-lost"
    all_alike(result)


# --- the same crashes without a restart -------------------------------------------------


async def test_a_member_killed_while_receiving_and_not_restarted_is_listed_dead(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """As above, without the restart: the sender declares it dead at its retry and the
    three survivors finish alike, listing it as dead."""
    order = ring_order(4)
    sender, victim = order[2], order[3]
    kill = Kill(victim, lap=1, hop=2, delay=MID_TRANSFER)
    result = await simulate(tmp_path, kill, links={(sender, victim): NARROW})
    survivors_alike(result, [victim])
    assert laps_of(result, victim) == [0]
    no_hop_logged_twice(result)


async def test_a_member_lost_while_the_final_model_goes_round_is_not_counted_dead(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 dies while receiving the final model and does not come back: the run
    had ended, so its predecessor passes the final on to the next member, and the three
    others finish with the model of the run without a crash, listing nobody as dead."""
    victim = ring_order(4)[2]
    result = await simulate(tmp_path, Kill(victim, lap=RUN.max_laps + 1, hop=0, delay=2.5))
    survivors_alike(result, [victim], dead=[])
    assert laps_of(result, victim) == list(range(RUN.max_laps + 1))
    assert result.weights_sha256 == await fault_free_weights(tmp_path)


async def test_the_ring_head_killed_and_not_restarted_is_replaced_by_the_next(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The head dies after handing lap 2 on and does not come back: the next member
    becomes the head (it closes the laps and ends the run) and the three survivors
    finish alike, listing the head as dead."""
    order = ring_order(4)
    head, second = order[0], order[1]
    result = await simulate(tmp_path, Kill(head, lap=2, hop=1))
    survivors_alike(result, [head])
    summary = result.peers[second].summary
    assert summary is not None and summary.ended_by == peer_id(second)
    assert laps_of(result, second)[-1] == RUN.max_laps + 1  # it closed the last lap
    no_hop_logged_twice(result)


async def test_two_of_four_killed_and_not_restarted_leave_no_federation_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Positions 1 and 2 die together and do not come back: half the view is gone, so no
    side may go on as the federation.  The head counts position 1 dead, holds the model
    for ``minority_wait`` trying position 2, then stops with ``members-lost`` (not ok,
    nothing distributed); position 3 waits for a model until its deadline and fails.
    Nobody ends with a model that claims to be the federation's."""
    order = ring_order(4)
    victims = order[1:3]
    result = await simulate(tmp_path, *(Kill(v, lap=1, hop=0) for v in victims))
    head = result.peers[order[0]].summary
    assert head is not None and head.stop_reason == "members-lost" and not head.ok
    assert head.dead == [peer_id(order[1])]
    assert result.clock_seconds >= DEFAULT_LIMITS.minority_wait
    last = result.peers[order[3]]
    assert last.summary is None and last.error is not None and "no model arrived" in last.error
    assert all(p.summary is None or not p.summary.ok for p in result.peers)


async def test_a_ring_of_two_takes_each_others_models_without_refusing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Two members hand the model to each other for the whole run; the promise: no
    hand-over between live members is refused."""
    events: Events = []
    await simulate(tmp_path, n=2, events=events)
    assert [(e.code.value, e.reason) for e in of_kind(events, ev.Refused)] == []
