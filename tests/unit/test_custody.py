"""The custody machine: table-driven, then whole rings in pure Python (tests/unit/custody_world.py).

No sockets, no trio, no torch: every hand-over is delivered at once by
:class:`PureRing`, training is the metadata arithmetic of ``train_hop`` and
time is a virtual clock that jumps to the next timer.
"""

from __future__ import annotations

import attrs
import pytest

from fedup.config import DEFAULT_LIMITS
from fedup.errors import LocalProtocolError
from fedup.identity import Identity
from fedup.protocol.custody import TRANSITIONS, CustodyMachine, StopRule
from fedup.protocol.custody_events import (
    Begin,
    BlobArrived,
    BlobOffered,
    Declared,
    Event,
    Excluded,
    FinalSaved,
    Finish,
    HandedOver,
    HandOverFailed,
    Ignored,
    PassedArrived,
    Phase,
    Refuse,
    Send,
    Take,
    TimerFired,
    Trained,
    TrainFailed,
)
from fedup.protocol.laps import LapRecord, Position, Progress, StopState
from fedup.protocol.notices import CustodyReceipt, DeadChain, FinalSeal
from fedup.protocol.peer_id import PeerId
from fedup.protocol.provenance import (
    ChainRules,
    HopChain,
    HopStatement,
    join_chain,
    split_chain,
)
from fedup.protocol.refusal import RefusalCode
from tests.unit.custody_world import RUN, VIEW, PureRing, Sent, content_of, model_of

LIMITS = attrs.evolve(DEFAULT_LIMITS, hop_timeout=20.0, excluded_wait=500.0)


def finished_alike(ring: PureRing, members: list[int] | None = None) -> Progress:
    """Every listed member (default: all not crashed) saved the same final model."""
    idx = (
        members
        if members is not None
        else [i for i, p in enumerate(ring.peers) if p not in ring.crashed]
    )
    peers = [ring.peers[i] for i in idx]
    assert not set(ring.failed) & set(peers), ring.failed
    assert set(peers) <= ring.finished, [p.short for p in peers if p not in ring.finished]
    finals = {content_of(ring.finals[p][1]) for p in peers}
    assert len(finals) == 1
    for p in peers:
        check_provenance(ring, p)
    return ring.finals[peers[0]][1]


def check_provenance(ring: PureRing, peer: PeerId) -> list[HopStatement]:
    """``peer``'s final model has an unbroken chain of hop statements from the initial
    model to the sealed one, every hop where the ring rules put it."""
    finish, progress = ring.finals[peer]
    dead_envelopes, hops, seal_bytes = ring.provenance[peer]
    dead = DeadChain(RUN, VIEW, tuple(ring.peers)).extend_with(dead_envelopes, receiver=None)
    rules = ChainRules(RUN, VIEW, tuple(ring.peers), ring.rule.max_laps)
    chain = HopChain.start(rules).extend_with(hops, dead=dead)
    seal = FinalSeal.open(seal_bytes)
    assert chain.last is not None
    first = next(chain.statements())  # the leader's, from the initial model it built
    assert (first.signer, first.received) == (ring.peers[0], content_of(Progress.initial()))
    assert (seal.origin, seal.content, seal.model) == (
        chain.last.signer,
        chain.last.sent,
        model_of(progress),
    )
    assert seal.origin == finish.ended_by
    statements = list(chain.statements())
    trained = [(s.signer, s.position) for s in statements if s.samples]
    assert set(trained) <= set(ring.trained)  # nobody claims a hop it did not train
    return statements


# --- whole rings ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_a_ring_trains_max_laps_and_everyone_saves_one_final(n: int) -> None:
    ring = PureRing(n, max_laps=4, patience=10, limits=LIMITS)
    ring.start()
    ring.run()
    final = finished_alike(ring)
    assert final.done and final.judged_lap == 3  # the output of the last training lap
    finish, _ = ring.finals[ring.peers[0]]
    assert finish.reason == "max-laps" and finish.ended_by == ring.peers[0]
    # Each member trained each lap once, in ring order, laps 0..4 (lap 4 evaluates only);
    # the hand-over (5, 0) closes lap 4 and ends the run.
    positions = [pos for _, pos in ring.trained]
    assert positions == sorted(positions)
    expected = [Position(lap, hop) for lap in range(5) for hop in range(n)]
    assert positions == [*expected, Position(5, 0)]
    assert ring.now == 0.0  # nothing waited for a timer


def test_a_run_that_stops_improving_converges() -> None:
    ring = PureRing(3, max_laps=50, patience=3, loss=lambda lap: 5.0 if lap > 2 else 2.0 - lap / 10)
    ring.start()
    ring.run()
    final = finished_alike(ring)
    assert final.stop.stale == 3 and final.stop.best_lap == 2
    assert {f.reason for f, _ in ring.finals.values()} == {"converged"}


def test_a_member_that_crashed_before_its_hop_is_skipped_at_once() -> None:
    ring = PureRing(4, limits=LIMITS)
    c = ring.peers[2]
    ring.crash_when[(c, Position(1, 2))] = "before"  # it takes lap 1's model, then dies
    ring.start()
    ring.run()
    final = finished_alike(ring)
    assert final.done
    # B handed lap 1 to C, C crashed holding it; B's copy went to D after hop_timeout,
    # with a dead notice about C signed by B.
    b, d = ring.peers[1], ring.peers[3]
    notices = [a.notice for a in ring.actions_of(b, Declared)]
    assert [(n.claimer, n.dead, n.cause) for n in notices] == [(b, c, "timed-out")]
    for p in (ring.peers[0], d):
        learnt = [a.notice for a in ring.actions_of(p, Declared)]
        assert [(n.claimer, n.dead) for n in learnt] == [(b, c)]
    assert ring.now == pytest.approx(LIMITS.hop_timeout)


def test_an_unreachable_member_is_declared_dead_by_its_predecessor_only() -> None:
    ring = PureRing(4, limits=LIMITS)
    d = ring.peers[3]
    ring.crash(d)
    ring.start()
    ring.run()
    finished_alike(ring)
    c = ring.peers[2]
    ours = [a.notice for a in ring.actions_of(c, Declared) if a.ours]
    assert [(n.dead, n.cause) for n in ours] == [(d, "unreachable")]
    assert ring.now == 0.0


def test_the_leader_dying_makes_the_next_lowest_lead() -> None:
    ring = PureRing(3, limits=LIMITS)
    a, b, _c = ring.peers
    ring.crash_when[(a, Position(2, 0))] = "before"
    ring.start()
    ring.run()
    final = finished_alike(ring, [1, 2])
    finish, _ = ring.finals[b]
    assert finish.ended_by == b and final.done  # b closes laps after a died
    assert any(pos.hop == 0 for p, pos in ring.trained if p == b)


def test_a_slow_member_is_excluded_and_still_saves_the_final_model() -> None:
    ring = PureRing(4, max_laps=6, patience=10, limits=LIMITS)
    c = ring.peers[2]
    ring.train_time[c] = LIMITS.hop_timeout * 1.5
    ring.start()
    ring.run()
    finished_alike(ring)  # c included: it got the final from the member that ended the run
    assert ring.actions_of(c, Excluded)
    finish, _ = ring.finals[c]
    assert finish.excluded is not None and finish.excluded.dead == c


def test_a_member_excluded_after_signing_its_hop_takes_the_final_chain_without_it() -> None:
    """c signs its slow hop after b handed b's copy on past it: the run's chain never
    holds c's statement, which the final model's chain shows; the final blob to c carries
    the statements after c's last one in the run's chain, so c drops its own (rewinds its
    chain to there), checks the rest and saves the final model all the same."""
    ring = PureRing(4, max_laps=6, patience=10, limits=LIMITS)
    ring.deliver_returns = False  # c cannot reach anyone to ask to return
    c = ring.peers[2]
    for p in ring.peers:
        ring.train_time[p] = 1.0
    ring.train_time[c] = LIMITS.hop_timeout * 1.5
    ring.start()
    ring.run()
    mine = [a for a in ring.actions_of(c, Send) if a.kind == "model"]
    assert len(mine) == 1  # it did sign and try to hand on its hop, and was refused
    assert ring.actions_of(c, Excluded)
    assert ring.finals[c][0].excluded is not None
    finished_alike(ring)  # c included, its provenance checked
    assert c not in {s.signer for s in check_provenance(ring, c)}
    [final] = [b for b in ring.sent if b.target == c and b.kind == "final"]
    # c's lap-0 statement was left out too: the final blob to it starts the chain
    c_last = max((i for i, s in enumerate(check_provenance(ring, c)) if s.signer == c), default=-1)
    assert split_chain(final.provenance) == [
        s.envelope for s in check_provenance(ring, c)[c_last + 1 :]
    ]


def statements_in(blob: Sent) -> list[HopStatement]:
    return [HopStatement.open(e) for e in split_chain(blob.provenance)]


@pytest.mark.parametrize("n", [3, 5])
def test_a_blob_carries_only_the_statements_its_receiver_has_not_seen(n: int) -> None:
    """Model blobs and the final's ring carry the statements made since the receiver's
    own last one (fewer than a lap), not the chain since the run began; every member
    still ends with the whole chain, the same for all."""
    ring = PureRing(n, max_laps=6, patience=10, limits=LIMITS)
    ring.start()
    ring.run()
    finished_alike(ring)
    whole = check_provenance(ring, ring.peers[0])
    assert len(whole) == 7 * n + 1
    for blob in ring.sent:
        got = statements_in(blob)
        assert 1 <= len(got) <= n - 1, (blob.kind, blob.position, len(got))
        mine = [i for i, s in enumerate(whole) if s.signer == blob.target]
        before = [i for i in mine if whole.index(got[0]) > i]
        assert whole.index(got[0]) == (max(before) + 1 if before else 0)
    assert {ring.provenance[p][1] for p in ring.peers} == {ring.provenance[ring.peers[0]][1]}


def test_a_re_routed_ring_sends_each_receiver_the_statements_it_lacks() -> None:
    """d crashes holding lap 1's model: c hands its copy to e, whose last statement is
    its lap-0 one; the blob to e carries the three made since (a, b and c at lap 1)."""
    ring = PureRing(5, max_laps=4, patience=10, limits=LIMITS)
    d, e = ring.peers[3], ring.peers[4]
    ring.crash_when[(d, Position(1, 3))] = "before"
    ring.start()
    ring.run()
    finished_alike(ring)
    whole = check_provenance(ring, e)
    resent = [b for b in ring.sent if b.target == e and b.sender == ring.peers[2]]
    got = statements_in(resent[0])
    e_lap0 = whole.index(next(s for s in whole if s.signer == e))
    assert got == whole[e_lap0 + 1 : e_lap0 + 1 + len(got)] and got[-1].signer == ring.peers[2]
    assert [s.signer for s in got] == [ring.peers[0], ring.peers[1], ring.peers[2]]


def test_a_blob_missing_statements_or_resuming_early_is_refused_with_a_code() -> None:
    ring = hostile_ring(5, max_laps=4, patience=10)
    _a, b, c, _d, _e = ring.peers

    def rewrite(world: PureRing, blob: Sent) -> list[Sent]:
        if blob.position != Position(2, 2):
            return [blob]
        hops = split_chain(blob.provenance)
        history = [s.envelope for s in world.machines[b].provenance.statements()]
        c_last = len(history) - len(hops) - 1
        return [
            attrs.evolve(blob, provenance=join_chain(hops[1:])),  # c lacks the first
            attrs.evolve(blob, provenance=join_chain(history[c_last:])),  # c's own again
            attrs.evolve(blob, provenance=b""),
            blob,
        ]

    ring.rewrite[b] = rewrite
    ring.run()
    finished_alike(ring)
    reasons = [r for r in ring.refusals_by(c) if r.peer == b]
    assert [r.code for r in reasons] == [
        RefusalCode.MISSING_HOPS,
        RefusalCode.BAD_PROVENANCE,
        RefusalCode.BAD_PROVENANCE,
    ]
    assert "are missing" in reasons[0].reason
    assert "it must start right after them" in reasons[1].reason


def test_a_hand_over_whose_ack_was_lost_is_taken_again_idempotently() -> None:
    ring = PureRing(3, limits=LIMITS)
    b = ring.peers[1]
    resent: list[object] = []

    def lose_first_ack(world: PureRing, blob: Sent) -> list[Sent]:
        if blob.position == Position(1, 2) and not resent:
            outcome = world.deliver(blob)  # taken, but the sender never hears of it
            assert isinstance(outcome, HandedOver)
            resent.append(outcome)
        return [blob]

    ring.rewrite[b] = lose_first_ack
    ring.start()
    ring.run()
    finished_alike(ring)
    assert resent


# --- the member threat model: a hostile member among honest ones ------------------------------


def attack(ring: PureRing, sender: int, blobs: list[Sent]) -> list[Refuse]:
    """Deliver hostile blobs now; return each receiver's refusal (none may be taken)."""
    refusals = []
    for blob in blobs:
        outcome = ring.deliver(blob)
        assert isinstance(outcome, HandOverFailed), (blob, outcome)
        target_refusals = [a for _, p, a in ring.log if p == blob.target and isinstance(a, Refuse)]
        refusals.append(target_refusals[-1])
    return refusals


def hostile_ring(n: int = 4, **kw: object) -> PureRing:
    ring = PureRing(n, limits=LIMITS, **kw)  # type: ignore[arg-type]
    ring.start()
    return ring


def run_to_lap(ring: PureRing, lap: int) -> None:
    """Run until the model first reaches ``lap`` (one step at a time)."""
    while not any(pos.lap >= lap for _, pos in ring.trained):
        assert ring.queue, "the ring stopped early"
        peer, event = ring.queue.popleft()
        ring.feed(peer, event)


def test_a_done_flag_sent_to_everyone_is_refused_and_the_run_goes_on() -> None:
    ring = hostile_ring()
    run_to_lap(ring, 1)
    m = ring.peers[1]  # the attacker
    done = attrs.evolve(Progress.initial(), lap=1, hop=1, done=True)
    blobs = [
        Sent(m, p, "model", Position(1, i), 0, (), done) for i, p in enumerate(ring.peers) if p != m
    ]
    refusals = attack(ring, 1, blobs)
    assert all(r.peer == m for r in refusals)
    assert {r.code for r in refusals} <= {
        RefusalCode.OUT_OF_TURN,
        RefusalCode.STALE,
        RefusalCode.BAD_META,
        RefusalCode.BUSY,
    }
    ring.run()
    final = finished_alike(ring)
    assert final.judged_lap == 3  # the stopping rule, not the attacker, ended it


def test_done_metadata_from_the_predecessor_at_the_right_position_is_bad_meta() -> None:
    ring = hostile_ring()
    _a, b, c, _d = ring.peers

    def lie(world: PureRing, blob: Sent) -> list[Sent]:
        if blob.position == Position(1, 2):
            return [attrs.evolve(blob, progress=attrs.evolve(blob.progress, done=True)), blob]
        return [blob]

    ring.rewrite[b] = lie
    ring.run()
    finished_alike(ring)
    [refusal] = [r for r in ring.refusals_by(c) if r.peer == b]
    assert refusal.code is RefusalCode.BAD_META and "ended" in refusal.reason


def test_a_far_future_lap_to_a_non_successor_changes_nothing() -> None:
    ring = hostile_ring()
    run_to_lap(ring, 1)
    _a, m, _c, d = ring.peers
    blob = Sent(
        m, d, "model", Position(50, 3), 0, (), attrs.evolve(Progress.initial(), lap=50, hop=2)
    )
    [refusal] = attack(ring, 1, [blob])
    assert refusal.peer == m and refusal.code is RefusalCode.OUT_OF_TURN
    ring.run()
    finished_alike(ring)  # d still took lap 1 from c afterwards
    assert ring.machines[d].chain.dead == frozenset()


def test_a_dead_notice_naming_the_receiver_is_refused() -> None:
    ring = hostile_ring()
    _a, b, c, _d = ring.peers

    def exclude_successor(world: PureRing, blob: Sent) -> list[Sent]:
        if blob.position == Position(1, 2):
            ident = world.ids[1]
            chain = world.machines[b].chain.claim(ident, "unreachable", Position(1, 1))
            # "c is dead" sent to c itself, then (complying) the honest blob
            return [attrs.evolve(blob, chain=chain.envelopes, epoch=1), blob]
        return [blob]

    ring.rewrite[b] = exclude_successor
    ring.run()
    finished_alike(ring)
    [refusal] = [r for r in ring.refusals_by(c) if r.peer == b]
    assert refusal.code is RefusalCode.BAD_CLAIM and "receiver itself" in refusal.reason
    assert not ring.actions_of(c, Excluded)


def test_a_dead_notice_about_someone_else_than_the_successor_is_refused() -> None:
    ring = hostile_ring()
    _a, b, c, d = ring.peers
    chain = DeadChain(RUN, VIEW, tuple(ring.peers))
    # b claims d (not its successor) is dead, and sends that to c at lap 1.
    from fedup.protocol.notices import DeadNotice

    notice = DeadNotice.seal(
        ring.ids[1],
        run_id=RUN,
        index=0,
        prev=chain.head,
        dead=d,
        cause="unreachable",
        at=Position(1, 1),
    )

    def claim_other(world: PureRing, blob: Sent) -> list[Sent]:
        if blob.position == Position(1, 2):
            return [attrs.evolve(blob, chain=(notice.envelope,), epoch=1), blob]
        return [blob]

    ring.rewrite[b] = claim_other
    ring.run()
    finished_alike(ring)
    [refusal] = [r for r in ring.refusals_by(c) if r.peer == b]
    assert refusal.code is RefusalCode.BAD_CLAIM and "own successor" in refusal.reason
    assert all(m.chain.dead == frozenset() for m in ring.machines.values())


def test_a_forged_final_at_lap_0_is_refused_by_everyone() -> None:
    ring = hostile_ring()
    run_to_lap(ring, 1)
    m = ring.peers[1]
    fake = attrs.evolve(Progress.initial(), lap=0, hop=1, done=True)
    seal = FinalSeal.seal(
        ring.ids[1], run_id=RUN, content=content_of(fake), model=model_of(fake)
    ).envelope
    blobs = [
        Sent(
            m,
            p,
            "final",
            Position(0, 0),
            0,
            (),
            fake,
            m,
            seal,
            content_of(fake),
            model=model_of(fake),
        )
        for p in ring.peers
        if p != m
    ]
    refusals = attack(ring, 1, blobs)
    assert {r.code for r in refusals} == {RefusalCode.NOT_FINAL}
    ring.run()
    final = finished_alike(ring)
    assert final.judged_lap == 3


def test_a_final_claiming_the_rule_holds_without_history_is_refused() -> None:
    ring = hostile_ring()
    run_to_lap(ring, 3)
    a, m, c, _d = ring.peers
    # stale >= patience, but no lap results behind it: the rule does not give that
    fake = attrs.evolve(ring.machines[c].seen, done=True, stop=StopState(0, 0.1, 0.1, 3))
    seal = FinalSeal.seal(
        ring.ids[0], run_id=RUN, content=content_of(fake), model=model_of(fake)
    ).envelope
    blob = Sent(
        m, c, "final", Position(3, 0), 0, (), fake, a, seal, content_of(fake), model=model_of(fake)
    )
    [refusal] = attack(ring, 1, [blob])
    assert refusal.code is RefusalCode.NOT_FINAL  # a's seal is a forgery by m anyway
    ring.run()
    finished_alike(ring)


def test_a_rewritten_history_or_reset_patience_is_bad_meta() -> None:
    ring = hostile_ring(max_laps=8, patience=10)
    _a, b, c, _d = ring.peers

    def rewrite(world: PureRing, blob: Sent) -> list[Sent]:
        p = blob.progress
        if blob.position == Position(3, 2) and p.history:
            old = p.history[0]
            forged = (attrs.evolve(old, loss=old.loss / 2), *p.history[1:])
            reset = attrs.evolve(p, stop=attrs.evolve(p.stop, stale=0, best_lap=-1))
            return [
                attrs.evolve(blob, progress=attrs.evolve(p, history=forged)),
                attrs.evolve(blob, progress=reset),
                blob,
            ]
        return [blob]

    ring.rewrite[b] = rewrite
    ring.run()
    finished_alike(ring)
    reasons = [r for r in ring.refusals_by(c) if r.peer == b]
    assert [r.code for r in reasons] == [RefusalCode.BAD_META, RefusalCode.BAD_META]
    assert "rewritten" in reasons[0].reason and "stopping state" in reasons[1].reason


def test_a_false_passed_does_not_make_the_predecessor_drop_its_copy() -> None:
    ring = hostile_ring()
    _a, b, m, _d = ring.peers

    def swallow(world: PureRing, blob: Sent) -> list[Sent]:
        return []  # m takes the model and never hands it on

    ring.rewrite[m] = swallow
    while ring.machines[b].kept is None or ring.machines[b].kept.target != m:
        ring.feed(*ring.queue.popleft())
    # m tells b "passed" with a receipt it signed itself
    fake = CustodyReceipt.seal(
        ring.ids[2], run_id=RUN, kind="model", position=Position(0, 3), sender=m, digest=b"\0" * 32
    )
    ring.feed(b, PassedArrived(m, fake.envelope))
    assert ring.machines[b].kept is not None  # b still keeps its copy
    ring.run()
    finished_alike(ring, [0, 1, 3])
    notices = [a.notice for a in ring.actions_of(b, Declared) if a.ours]
    assert [(n.dead, n.cause) for n in notices] == [(m, "timed-out")]


def test_an_excluded_refusal_without_proof_does_not_exclude_the_sender() -> None:
    ring = hostile_ring()
    _a, _b, c, m = ring.peers
    lies: list[int] = []
    real = ring.machines[m].handle

    def lying_handle(event: Event, now: float) -> list:  # type: ignore[type-arg]
        if isinstance(event, BlobArrived) and event.sender == c and not lies:
            lies.append(1)
            return [Refuse(c, RefusalCode.EXCLUDED, "you are dead", ())]
        return real(event, now)

    ring.machines[m].handle = lying_handle  # type: ignore[method-assign]
    ring.run()
    finished_alike(ring)
    assert lies and not ring.actions_of(c, Excluded)


def test_a_content_refusal_never_makes_a_member_dead() -> None:
    """A member that refuses every blob for content is retried until hop_timeout and
    only then declared dead, as timed out."""
    ring = hostile_ring()
    _a, b, m, _d = ring.peers
    real = ring.machines[m].handle

    def refuse_all(event: Event, now: float) -> list:  # type: ignore[type-arg]
        if isinstance(event, BlobArrived):
            return [Refuse(event.sender, RefusalCode.BAD_STATE, "I do not like it")]
        return real(event, now)

    ring.machines[m].handle = refuse_all  # type: ignore[method-assign]
    ring.run()
    finished_alike(ring, [0, 1, 3])
    notices = [a.notice for a in ring.actions_of(b, Declared) if a.ours]
    assert [(n.dead, n.cause) for n in notices] == [(m, "timed-out")]
    assert ring.now >= LIMITS.hop_timeout / 2


# --- the table --------------------------------------------------------------------------------


def machine(phase: Phase) -> CustodyMachine:
    ring = PureRing(3, limits=LIMITS)
    m = ring.machines[ring.peers[1]]
    m.phase = phase
    return m


SAMPLES: list[Event] = [
    Begin(),
    Trained(Position(0, 1), Progress.initial(), content=b"c" * 32, samples=1),
    TrainFailed("boom"),
    HandedOver(99, b"", b""),
    HandOverFailed(
        99,
        __import__("fedup.protocol.custody_events", fromlist=["Failure"]).Failure(
            __import__(
                "fedup.protocol.custody_events", fromlist=["FailureKind"]
            ).FailureKind.BROKEN,
            "x",
        ),
    ),
    PassedArrived(Identity(b"\x09" * 32).peer_id, b""),
    TimerFired("nonsense"),
    FinalSaved(),
]


@pytest.mark.parametrize(
    ("phase", "event"),
    [
        (phase, event)
        for phase in Phase
        for event in SAMPLES
        # FinalSaved right after our own Finish needs the driver's seal_final() first
        if not (phase is Phase.FINISHING and isinstance(event, FinalSaved))
    ],
    ids=str,
)
def test_every_event_a_phase_does_not_take_is_ignored_without_change(
    phase: Phase, event: Event
) -> None:
    m = machine(phase)
    before = (m.phase, m.last_lap, m.seen, m.holding, m.chain)
    actions = m.handle(event, 0.0)
    if type(event) not in TRANSITIONS[phase]:
        assert len(actions) == 1 and isinstance(actions[0], Ignored)
        assert actions[0].phase is phase
        assert (m.phase, m.last_lap, m.seen, m.holding, m.chain) == before
    else:  # taken events with stale references are ignored too, or decided
        assert all(not isinstance(a, Take) for a in actions)


def test_the_table_covers_every_phase() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert TRANSITIONS[Phase.FAILED] == {}


def test_a_blob_before_training_began_is_busy() -> None:
    m = machine(Phase.READY)
    sender = PureRing(3).peers[0]
    [refusal] = m.handle(BlobOffered(sender, "model", Position(0, 1), 0), 0.0)
    assert isinstance(refusal, Refuse) and refusal.code is RefusalCode.BUSY


def test_a_stranger_is_not_a_member() -> None:
    m = machine(Phase.WAITING)
    stranger = Identity(b"\x77" * 32).peer_id
    [refusal] = m.handle(BlobOffered(stranger, "model", Position(0, 1), 0), 0.0)
    assert isinstance(refusal, Refuse) and refusal.code is RefusalCode.NOT_MEMBER


@pytest.mark.parametrize(
    ("position", "code"),
    [
        (Position(0, 2), RefusalCode.STALE),  # the lap already taken
        (Position(2, 1), RefusalCode.OUT_OF_TURN),  # skips a lap
        (Position(7, 0), RefusalCode.OUT_OF_TURN),  # beyond max_laps + 1
        (Position(6, 1), RefusalCode.OUT_OF_TURN),  # max_laps + 1 is only hop 0
    ],
)
def test_positions_must_be_exactly_the_next(position: Position, code: RefusalCode) -> None:
    ring = PureRing(3, max_laps=5, limits=LIMITS)
    ring.start()
    while not any(p == ring.peers[1] for p, _ in ring.trained):
        ring.feed(*ring.queue.popleft())
    b = ring.machines[ring.peers[1]]
    b.phase = Phase.WAITING
    [refusal] = b.handle(BlobOffered(ring.peers[0], "model", position, 0), 0.0)
    assert isinstance(refusal, Refuse) and refusal.code is code


def test_a_stop_state_replays_from_history() -> None:
    rule = StopRule(patience=2, tolerance=0.0, max_laps=100)
    state = StopState()
    for lap, loss in enumerate([1.0, 0.5, 0.6, 0.7]):
        state, _ = state.judge(LapRecord(lap, loss, 0, 0, 1, 1), tolerance=rule.tolerance)
    assert state == StopState(1, 0.5, 0.5, 2)
    assert state.holds(judged_lap=3, patience=2, max_laps=100)
    assert state.reason(patience=2) == "converged"
    assert Finish  # re-exported names stay importable


def test_the_members_of_one_run_share_its_first_dead_chain_and_chain_rules() -> None:
    """Built once per process and content (a simulation holds every member): equal
    members give the very same immutable chain and rules; another view, its own; a
    signer outside the members is refused as before."""
    ring = PureRing(4)
    a, b = (ring.machines[p] for p in ring.peers[:2])
    assert a.chain is b.chain and a.provenance.rules is b.provenance.rules
    assert a.chain == DeadChain(RUN, VIEW, tuple(ring.peers)) and len(a.chain) == 0
    assert a.chain.members == tuple(ring.peers)  # ring order
    other = CustodyMachine(
        ring.ids[0],
        run_id=RUN,
        view_digest=b"\x01" * 32,
        view_epoch=0,
        members=ring.peers,
        rule=ring.rule,
        limits=DEFAULT_LIMITS,
        initial=content_of(Progress.initial()),
    )
    assert other.chain is not a.chain and other.chain.view_digest == b"\x01" * 32
    with pytest.raises(LocalProtocolError, match="its own member"):
        CustodyMachine(
            Identity(b"\x7e" * 32),
            run_id=RUN,
            view_digest=VIEW,
            view_epoch=0,
            members=ring.peers,
            rule=ring.rule,
            limits=DEFAULT_LIMITS,
            initial=content_of(Progress.initial()),
        )
