"""Crashes during formation: the leader a draw chose dies before the federation forms.

Real peers in one process on trio's virtual clock (:mod:`fedup.sim`).  Four
lenders with seed 0: the lowest peer coordinates the draw (round 1), and the
draw chooses another peer to lead round 2 (found by a fault-free run of the same
seed: its members' ``summary.leader``; the simulation seeds every draw nonce,
so the same seed draws the same leader).  That peer is killed the moment its
formation reaches ``leading`` (it was drawn and starts calling the members; no
member has answered yet).  ``min_peers`` is 3, so the others may form without it.
docs/federation.md, section 2, has the rules these tests check.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConfigError
from fedup.peer import events as ev
from fedup.sim import Faults, Kill, SimResult, SimSettings, run_simulation, sim_identity
from tests.integration.test_restart import RUN, SLOW_LINKS, lenders, ring_order

SEED = 0
N = 4
FORMATION_TIMEOUT = DEFAULT_LIMITS.formation_timeout
PEER_WAIT_TIMEOUT = DEFAULT_LIMITS.peer_wait_timeout

Stages = list[tuple[float, int, str]]
"""(virtual seconds since the start, peer index, formation stage), in order."""


async def simulate(tmp_path: Path, *kills: Kill, stages: Stages | None = None) -> SimResult:
    """Four lenders forming with ``min_peers=3``; ``stages`` collects every stage change."""
    settings = SimSettings(
        seed=SEED, run=RUN, faults=Faults(link=SLOW_LINKS, kills=kills), min_peers=N - 1
    )
    start = trio.current_time()

    def watch(index: int, peer: object, at: float, event: ev.PeerEvent) -> None:
        if stages is not None and isinstance(event, ev.FormationStage):
            stages.append((at - start, index, event.stage))

    # Virtual seconds: past every formation deadline, so a hung peer fails the test.
    with trio.fail_after(PEER_WAIT_TIMEOUT + 20_000):
        return await run_simulation(lenders(N), tmp_path, settings, watch=watch)


_DRAWN: list[int] = []


async def drawn_leader(tmp_path: Path) -> int:
    """The index of the peer the draw chooses to lead (a fault-free run, done once)."""
    if not _DRAWN:
        result = await simulate(tmp_path / "fault-free")
        leaders = {p.summary.leader for p in result.peers if p.summary is not None}
        assert len(result.finished_peers) == N and len(leaders) == 1
        ids = [sim_identity(SEED, i).peer_id.text for i in range(N)]
        _DRAWN.append(ids.index(leaders.pop()))
    return _DRAWN[0]


def three_alike_without(result: SimResult, victim: int) -> None:
    """Every peer but ``victim`` finished ok with one model, in a federation of the three."""
    victim_id = sim_identity(SEED, victim).peer_id.text
    others = [p for p in result.peers if p.index != victim]
    assert result.model_sha256 is not None  # every finished peer saved the same file
    assert result.weights_sha256 is not None
    leaders = set()
    for p in others:
        assert p.error is None and p.summary is not None and p.summary.ok, (p.error, p.summary)
        assert len(p.summary.members) == N - 1 and victim_id not in p.summary.members
        assert p.summary.model_sha256 == result.model_sha256
        leaders.add(p.summary.leader)
    assert len(leaders) == 1 and victim_id not in leaders
    assert result.peers[victim].summary is None


def first(stages: Stages, index: int, stage: str, after: float = -1.0) -> float:
    """When peer ``index`` first reached ``stage`` after ``after``."""
    return next(t for t, i, s in stages if i == index and s == stage and t > after)


async def test_the_drawn_leader_killed_as_it_leads_the_others_form_without_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The leader the draw chose dies as it starts calling the members: they wait
    formation_timeout for its call, forget it, the next lowest peer coordinates a new
    draw among the three, and they finish alike with one model, without it."""
    victim = await drawn_leader(tmp_path)
    assert victim != ring_order(N, SEED)[0]  # not the coordinator: it leads round 2 only
    stages: Stages = []
    result = await simulate(tmp_path / "killed", Kill(victim, stage="leading"), stages=stages)

    assert result.peers[victim].error == "killed"
    three_alike_without(result, victim)
    killed_at = first(stages, victim, "leading")
    assert first(stages, victim, "acked") < killed_at  # it was drawn in round 1's commit
    for i in range(N):
        if i != victim:  # each was waiting for the drawn leader's call
            assert [s for t, j, s in stages if j == i and t <= killed_at][-1] == "following"
    # Nobody formed before the members gave the silent leader up, and they did at once then.
    joined = min(t for t, _, s in stages if s == "joined")
    assert killed_at + FORMATION_TIMEOUT <= joined < killed_at + 2 * FORMATION_TIMEOUT
    assert result.formed is not None and result.formed > joined


async def test_the_drawn_leader_restarted_after_its_crash_is_left_out_and_gives_up(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The leader the draw chose dies as it starts calling the members and is back 5 s
    later: it never had a view, so it has no run to resume and looks for a federation
    again.  It does not know it was drawn; the others, bound to that draw, wait
    formation_timeout for its call and then form without it, as above.  It waits for
    the lower peers' calls in turn (formation_timeout each), is never called into a
    view (a running federation takes no new member), and gives up peer_wait_timeout
    after its restart with a FormationError.  The three finish alike with the same
    model as without the restart."""
    victim = await drawn_leader(tmp_path)
    stages: Stages = []
    kill = Kill(victim, stage="leading", restart_after=5.0)
    result = await simulate(tmp_path / "restarted", kill, stages=stages)

    three_alike_without(result, victim)
    outcome = result.peers[victim]
    assert outcome.restarts == 1
    assert outcome.error == (
        f"FormationError: no federation formed within {PEER_WAIT_TIMEOUT:g} s "
        f"although {N} peers were found; see the log for why"
    )
    killed_at = first(stages, victim, "leading")
    after = [s for t, i, s in stages if i == victim and t > killed_at]
    assert after[0] == "following" and after[-1] == "failed"
    assert set(after) <= {"following", "settling", "failed"}  # never called into a view
    failed_at = first(stages, victim, "failed")
    assert failed_at == pytest.approx(killed_at + 5.0 + PEER_WAIT_TIMEOUT)

    without = await simulate(tmp_path / "not-restarted", Kill(victim, stage="leading"))
    assert result.model_sha256 == without.model_sha256  # the restart changed nothing


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SimSettings(faults=Faults(kills=(Kill(0, stage="electing"),))), "not a formation stage"),
        (
            SimSettings(faults=Faults(kills=(Kill(0, stage="leading", training=True),))),
            "cannot also be while training",
        ),
        (SimSettings(min_peers=0), "min_peers 0 must be from 1"),
        (SimSettings(min_peers=N + 1), f"min_peers {N + 1} must be from 1"),
    ],
)
async def test_a_nonsense_formation_fault_is_refused(
    tmp_path: Path, settings: SimSettings, message: str
) -> None:
    """A kill at a stage formation does not have, a stage kill that is also a training
    kill, and a min_peers outside 1..peers are refused before any peer starts."""
    with pytest.raises(ConfigError, match=message):
        await run_simulation(lenders(N), tmp_path, settings)
    assert not (tmp_path / "peers").exists()
