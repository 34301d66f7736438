from __future__ import annotations

import random

import pytest

from fedup.errors import LocalProtocolError
from fedup.protocol.laps import ConvergenceTracker, Position, next_position
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
    nxt, pos = next_position(r.without(m[2]), m[1], Position(3, 1))
    assert nxt == m[3] and pos == Position(3, 2)
    # The leader dies: the next lowest leads and the lap advances when it gets the model.
    r2 = r.without(m[0])
    nxt, pos = next_position(r2, m[3], Position(3, 3))
    assert nxt == m[1] and pos == Position(4, 0)


def test_convergence_patience_and_tolerance() -> None:
    t = ConvergenceTracker(tolerance=0.01, patience=2, max_laps=50)
    assert not t.add(1, 1.0).stop
    assert not t.add(2, 0.8).stop
    assert not t.add(3, 0.799).stop  # improved, but by less than 1%: stale 1
    d = t.add(4, 0.7995)
    assert d.stop and d.reason == "converged" and d.best_lap == 3
    assert t.losses == [1.0, 0.8, 0.799, 0.7995]


def test_max_laps_and_best_lap() -> None:
    t = ConvergenceTracker(tolerance=0.0, patience=10, max_laps=3)
    t.add(1, 0.5)
    t.add(2, 0.6)
    d = t.add(3, 0.55)
    assert d.stop and d.reason == "max-laps" and d.best_lap == 1


def test_misuse() -> None:
    t = ConvergenceTracker(tolerance=0.0, patience=1, max_laps=3)
    with pytest.raises(LocalProtocolError):
        t.add(2, 1.0)
    with pytest.raises(LocalProtocolError):
        ConvergenceTracker(tolerance=1.5, patience=1, max_laps=1)
