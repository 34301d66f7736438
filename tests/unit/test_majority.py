"""Only a majority of the view goes on: the custody machines' partition rule (pure)."""

from __future__ import annotations

import attrs

from fedup.config import DEFAULT_LIMITS
from fedup.protocol.custody_events import Declared, Finish, Send
from fedup.protocol.notices import DeadChain, majority
from fedup.protocol.refusal import RefusalCode
from tests.unit.custody_world import RUN, VIEW, PureRing, Sent
from tests.unit.test_returns import AT, IDS, MEMBERS

LIMITS = attrs.evolve(DEFAULT_LIMITS, hop_timeout=20.0, minority_wait=100.0)


def test_a_majority_is_more_than_half() -> None:
    assert [majority(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 2, 3, 3, 4]
    chain = DeadChain(RUN, VIEW, MEMBERS)  # five members: two may die, not three
    assert chain.keeps_majority() and chain.has_majority
    two = chain.claim(IDS[0], "unreachable", AT).claim(IDS[2], "unreachable", AT)
    assert two.has_majority and not two.keeps_majority()
    three = two.claim(IDS[4], "unreachable", AT)
    assert not three.has_majority


def test_the_last_of_a_majority_is_not_counted_dead_and_the_holder_waits_then_stops() -> None:
    """Of four, two crash: the one that finds the second gone does not count it dead (two
    of four is no majority); it holds the model, tries again, and after minority_wait
    stops with members-lost, having counted only the first as dead."""
    ring = PureRing(4, max_laps=6, patience=10, limits=LIMITS)
    a, b, c, d = ring.peers
    ring.crash(b)
    ring.crash(c)
    ring.start()
    ring.run()
    declared = [x.notice.dead for x in ring.actions_of(a, Declared) if x.ours]
    assert declared == [b]
    finish = ring.actions_of(a, Finish)
    assert [f.reason for f in finish] == ["members-lost"]
    assert ring.now >= LIMITS.minority_wait
    sends = [s for s in ring.actions_of(a, Send) if s.kind == "model"]
    assert {s.target for s in sends} == {b, c}  # c tried again and again, d never
    assert len([s for s in sends if s.target == c]) > 3
    assert d in ring.failed  # it waited for a model that never came


def test_a_blob_whose_chain_lost_the_majority_is_refused() -> None:
    """The head hands on its first model with a chain (validly signed: the receiver's own
    key, as a colluder's would be) counting three of five members dead: the receiver
    refuses it as a bad claim and takes nothing."""
    ring = PureRing(5, max_laps=4, patience=10, limits=LIMITS)
    m0, m1 = ring.peers[0], ring.peers[1]
    signer = next(i for i in ring.ids if i.peer_id == m1)
    chain = DeadChain(RUN, VIEW, tuple(ring.peers))
    for _ in range(3):  # m1 declares m2, then m3, then m4
        chain = chain.claim(signer, "unreachable", AT)
    assert not chain.has_majority

    def forged(ring: PureRing, sent: Sent) -> list[Sent]:
        ring.rewrite.pop(m0)
        return [attrs.evolve(sent, chain=chain.envelopes, epoch=len(chain))]

    ring.rewrite[m0] = forged
    ring.start()
    ring.run(until=1.0)
    refusals = [r for r in ring.refusals_by(m1) if r.peer == m0]
    assert refusals and refusals[0].code is RefusalCode.BAD_CLAIM
    assert "majority" in refusals[0].reason
    assert ring.machines[m1].chain.notices == ()  # it adopted nothing
