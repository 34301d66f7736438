"""Shared test helpers."""

from __future__ import annotations

import pytest

from fedup.identity import Identity
from fedup.protocol.peer_id import PeerId


@pytest.fixture
def identity() -> Identity:
    return Identity(bytes(range(32)))


def make_identities(n: int) -> list[Identity]:
    """``n`` deterministic identities (seed i repeated), for reproducible tests."""
    return [Identity(bytes([i + 1]) * 32) for i in range(n)]


def rig_draw(world: object, peers: list[PeerId], leader: PeerId, run_id: bytes) -> None:
    """Seed ``world`` (a :class:`fedup.sim.MemoryWorld`) so that the first draw among
    ``peers`` (coordinated by the lowest, every other peer revealing at epoch 0) in run
    ``run_id`` chooses ``leader``: tests that need a given leader say so."""
    from fedup.protocol.draw import Roster, commitment, draw_leader, reveal_of
    from fedup.sim.world import MemoryWorld, seeded_nonces

    assert isinstance(world, MemoryWorld)
    coordinator = min(peers)
    candidates = sorted(p for p in peers if p != coordinator)
    for i in range(10_000):
        seed = i.to_bytes(4, "big")
        nonces = {p: seeded_nonces(seed, p, coordinator, run_id) for p in candidates}
        commits = tuple((p, commitment(nonces[p])) for p in candidates)
        reveals = {p: reveal_of(n, 0) for p, n in nonces.items()}
        if draw_leader(Roster(run_id, 0, coordinator, commits), reveals) == leader:
            world.draw_seed = seed
            return
    raise AssertionError("no seed draws that leader")
