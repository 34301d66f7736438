from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedup.errors import LocalProtocolError
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import Ring, ring_order


def ids(n: int, seed: int = 0) -> list[PeerId]:
    rng = random.Random(seed)
    return [PeerId.from_public_key(rng.randbytes(32)) for _ in range(n)]


def test_every_discovery_order_gives_the_same_ring() -> None:
    members = ids(5)
    rings = {ring_order(p) for p in itertools.permutations(members)}
    assert len(rings) == 1
    (ring,) = rings
    assert [p.text for p in ring] == sorted(p.text for p in members)
    leaders = {Ring.of(p).leader for p in itertools.permutations(members)}
    assert leaders == {ring[0]}


@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=30, unique=True),
    st.randoms(),
)
def test_agreement_property(keys: list[bytes], rnd: random.Random) -> None:
    members = [PeerId.from_public_key(k) for k in keys]
    shuffled = members[:]
    rnd.shuffle(shuffled)
    a, b = Ring.of(members), Ring.of(shuffled + members[:1])  # duplicates are harmless
    assert a == b
    # Following successors from the leader visits every member exactly once.
    seen, peer = [], a.leader
    for _ in members:
        seen.append(peer)
        peer = a.successor(peer)
    assert peer == a.leader and sorted(seen) == sorted(members)


@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=20, unique=True),
    st.randoms(),
)
def test_successors_are_the_live_members_in_the_order_successor_walks(
    keys: list[bytes], rnd: random.Random
) -> None:
    members = [PeerId.from_public_key(k) for k in keys]
    dead = rnd.sample(members, rnd.randrange(len(members)))
    ring = Ring.of(members, dead=dead)
    for peer in members:
        walked, at = [], peer
        for _ in members:
            at = ring.successor(at)
            if at == peer or at in walked:
                break
            walked.append(at)
        assert ring.successors(peer) == walked
        assert peer not in walked and set(walked) == set(ring.live) - {peer}


def test_dead_members_are_skipped_and_leadership_moves() -> None:
    m = sorted(ids(4))
    ring = Ring.of(m)
    assert ring.successor(m[3]) == m[0]
    hurt = Ring.of(m, dead=[m[1]])
    assert hurt.successor(m[0]) == m[2]
    assert hurt.successor(m[1]) == m[2]  # a dead peer's successor is still defined
    assert hurt.position(m[2]) == 1
    assert hurt.successors(m[0]) == [m[2], m[3]]
    leaderless = Ring.of(m, dead=[m[0], m[1]])
    assert leaderless.leader == m[2]
    assert leaderless.successor(m[3]) == m[2]


def test_errors() -> None:
    m = ids(2)
    other = ids(1, seed=9)[0]
    with pytest.raises(LocalProtocolError):
        Ring.of(m, dead=[other])
    with pytest.raises(LocalProtocolError):
        Ring.of(m).successor(other)
    with pytest.raises(LocalProtocolError):
        _ = Ring.of(m, dead=m).leader
