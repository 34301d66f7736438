from __future__ import annotations

import random

from fedup.protocol.laps import LapRecord, Position, StopState, last_lap, next_position
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import Ring


def ring(n: int) -> Ring:
    rng = random.Random(1)
    return Ring.of(PeerId.from_public_key(rng.randbytes(32)) for _ in range(n))


def test_a_lap_visits_everyone_then_returns_to_the_leader() -> None:
    r = ring(4)
    peer, pos = r.leader, Position(1, 0)
    visits = [(peer, pos)]
    for _ in range(8):
        peer, pos = next_position(r, peer, pos)
        visits.append((peer, pos))
    assert [v[1] for v in visits[:5]] == [Position(1, h) for h in range(4)] + [Position(2, 0)]
    assert [v[0] for v in visits[:4]] == list(r.members)
    assert visits[4][0] == r.leader
    positions = [v[1] for v in visits]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_dead_member_skipped_positions_still_grow() -> None:
    r = ring(4)
    m = r.members
    nxt, pos = next_position(Ring.of(m, dead=[m[2]]), m[1], Position(3, 1))
    assert nxt == m[3] and pos == Position(3, 2)
    # The leader dies: the next lowest leads and the lap advances when it gets the model.
    r2 = Ring.of(m, dead=[m[0]])
    nxt, pos = next_position(r2, m[3], Position(3, 3))
    assert nxt == m[1] and pos == Position(4, 0)


def judge_all(losses: list[float], *, tolerance: float) -> StopState:
    state = StopState()
    for lap, loss in enumerate(losses):
        state, _ = state.judge(LapRecord(lap, loss, 0.0, 0.0, 1, 1), tolerance=tolerance)
    return state


def test_convergence_patience_and_tolerance() -> None:
    state = judge_all([1.0, 0.8, 0.799], tolerance=0.01)
    assert state == StopState(best_lap=2, best_loss=0.799, ref_loss=0.8, stale=1)
    assert not state.holds(judged_lap=2, patience=2, max_laps=50)
    state, improved = state.judge(LapRecord(3, 0.7995, 0, 0, 1, 1), tolerance=0.01)
    assert not improved and state.stale == 2 and state.best_lap == 2
    assert state.holds(judged_lap=3, patience=2, max_laps=50)
    assert state.reason(patience=2) == "converged"


def test_max_laps_and_best_lap() -> None:
    state = judge_all([0.5, 0.6, 0.55], tolerance=0.0)
    assert state.best_lap == 0 and state.stale == 2
    assert state.holds(judged_lap=2, patience=10, max_laps=3)  # the output of the last lap
    assert not state.holds(judged_lap=1, patience=10, max_laps=3)
    assert state.reason(patience=10) == "max-laps"
    assert last_lap(3) == 4


def test_a_nan_loss_never_improves_and_never_becomes_best() -> None:
    state = judge_all([1.0, float("nan")], tolerance=0.0)
    assert state.best_lap == 0 and state.stale == 1
