"""Taking a member back: return requests, return notices in the chain, and the custody
machines that use them (pure: no trio, torch or sockets)."""

from __future__ import annotations

import hashlib

import attrs
import pytest

from fedup.config import DEFAULT_LIMITS
from fedup.errors import LocalProtocolError
from fedup.identity import Identity
from fedup.protocol.custody_events import (
    AskToReturn,
    Begin,
    Excluded,
    Failure,
    FailureKind,
    HandOverFailed,
    Ignored,
    Phase,
    ReturnAsked,
    Returned,
    Send,
    SetTimer,
    TimerFired,
    Train,
)
from fedup.protocol.custody_rules import StopRule, check_model_progress
from fedup.protocol.laps import LapRecord, Position, Progress, StopState
from fedup.protocol.notices import DeadChain, DeadNotice, NoticeError
from fedup.protocol.returns import ReturnError, ReturnNotice, ReturnRequest
from tests.unit.custody_world import PureRing
from tests.unit.test_custody import check_provenance, finished_alike

IDS = sorted((Identity(bytes([i]) * 32) for i in range(1, 6)), key=lambda i: i.peer_id)
M0, M1, M2, M3, M4 = IDS
MEMBERS = tuple(i.peer_id for i in IDS)
RUN = b"R" * 16
VIEW = hashlib.sha256(b"view").digest()
AT = Position(2, 1)
LIMITS = attrs.evolve(DEFAULT_LIMITS, hop_timeout=20.0, excluded_wait=500.0)


def m2_dead() -> DeadChain:
    """M1 declared its successor M2 dead."""
    return DeadChain(RUN, VIEW, MEMBERS).claim(M1, "unreachable", AT)


def ask(ident: Identity = M2, counter: int = 1, run: bytes = RUN) -> ReturnRequest:
    return ReturnRequest.seal(ident, run_id=run, counter=counter)


# --- the wire forms ---------------------------------------------------------------------


def test_a_request_round_trips_and_a_forged_one_is_refused() -> None:
    r = ask()
    assert ReturnRequest.open(r.envelope) == r
    forged = ReturnRequest.seal(M3, run_id=RUN, counter=1).envelope
    assert ReturnRequest.open(forged).peer == M3.peer_id  # signed by M3: it is M3's request
    with pytest.raises(ReturnError, match="return request"):
        ReturnRequest.open(r.envelope[:-1])


def test_a_notice_carries_the_request_and_verifies_both() -> None:
    chain = m2_dead().take_back(M1, ask(), Position(3, 1))
    notice = chain.notices[-1]
    assert isinstance(notice, ReturnNotice)
    assert (notice.claimer, notice.back, notice.request.counter) == (M1.peer_id, M2.peer_id, 1)
    assert ReturnNotice.open(notice.envelope, max_index=10) == notice
    assert chain.dead == frozenset() and len(chain) == 2
    assert chain.was_dead(M2.peer_id) and chain.notice_about(M2.peer_id) is None
    # a receiver verifies the chain from its own
    assert m2_dead().extend_with(chain.envelopes, receiver=M2.peer_id) == chain


# --- who may take whom back -------------------------------------------------------------


def test_only_the_live_predecessor_takes_back_a_dead_member_that_asked() -> None:
    chain = m2_dead()
    assert chain.may_take_back(M1.peer_id, ask()) is None
    assert "predecessor" in (chain.may_take_back(M3.peer_id, ask()) or "")
    assert "not counted as dead" in (chain.may_take_back(M0.peer_id, ask(M1)) or "")
    assert "run" in (chain.may_take_back(M1.peer_id, ask(run=b"S" * 16)) or "")
    with pytest.raises(LocalProtocolError, match="predecessor"):
        chain.take_back(M3, ask(), AT)


def test_with_its_predecessor_dead_too_the_one_before_takes_it_back() -> None:
    chain = m2_dead().claim(M0, "timed-out", Position(3, 0))  # M1 dead as well
    assert chain.may_take_back(M0.peer_id, ask()) is None  # M0 precedes M2 with M1 dead
    assert "dead" in (chain.may_take_back(M1.peer_id, ask()) or "")


def test_a_request_is_used_once_and_returns_are_bounded() -> None:
    chain = m2_dead().take_back(M1, ask(counter=1), Position(3, 1))
    chain = chain.claim(M1, "unreachable", Position(4, 1))  # dead again
    assert "not newer" in (chain.may_take_back(M1.peer_id, ask(counter=1)) or "")
    assert chain.may_take_back(M1.peer_id, ask(counter=2)) is None
    limits = attrs.evolve(DEFAULT_LIMITS, max_returns=1)
    assert "Limits.max_returns" in (
        chain.may_take_back(M1.peer_id, ask(counter=2), limits=limits) or ""
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ReturnNotice.seal(M3, run_id=RUN, index=1, prev=m2_dead().head,
                                   request=ask(), at=AT), "predecessor"),
        (lambda: ReturnNotice.seal(M1, run_id=RUN, index=1, prev=m2_dead().head,
                                   request=ask(M4), at=AT), "not counted as dead"),
        (lambda: ReturnNotice.seal(M1, run_id=RUN, index=2, prev=m2_dead().head,
                                   request=ask(), at=AT), "out of place"),
    ],
)  # fmt: skip
def test_a_misplaced_return_notice_is_refused_naming_it(make: object, match: str) -> None:
    notice = make()  # type: ignore[operator]
    with pytest.raises(NoticeError, match=f"return notice 1.*{match}"):
        m2_dead().extend_with((*m2_dead().envelopes, notice.envelope), receiver=None)


def test_a_return_notice_with_a_request_signed_by_someone_else_is_refused() -> None:
    # M1 wraps a request M3 signed for itself but names M2 as the member back
    notice = ReturnNotice.seal(M1, run_id=RUN, index=1, prev=m2_dead().head, request=ask(M3),
                               at=AT)  # fmt: skip
    assert notice.back == M3.peer_id  # seal() takes the member from the request
    with pytest.raises(NoticeError, match="not counted as dead"):
        m2_dead().extend_with((*m2_dead().envelopes, notice.envelope), receiver=None)


# --- the machines ---------------------------------------------------------------------------


def excluded_then_back(deliver: bool = True) -> tuple[PureRing, int]:
    """A 4-member ring whose third member is slower than hop_timeout once: excluded,
    then (its hops fast again) it asks to return; returns the ring and the lap at which
    it was excluded."""
    ring = PureRing(4, max_laps=8, patience=20, limits=LIMITS)
    ring.deliver_returns = deliver
    c = ring.peers[2]
    for p in ring.peers:
        ring.train_time[p] = 1.0
    ring.train_time[c] = LIMITS.hop_timeout * 1.5
    ring.start()
    while not ring.actions_of(c, Excluded):
        before = len(ring.log)
        ring.run(until=ring.now + 1.0)
        if len(ring.log) == before:
            ring.now += 1.0
    ring.train_time[c] = 1.0
    lap = max(a.position.lap for a in ring.actions_of(c, Train))
    ring.run()
    return ring, lap


def test_an_excluded_member_asks_and_its_predecessor_takes_it_back() -> None:
    ring, excluded_at = excluded_then_back()
    b, c = ring.peers[1], ring.peers[2]
    returned = [a for a in ring.actions_of(b, Returned) if a.ours]
    assert [a.notice.back for a in returned] == [c]
    later = [a.position for a in ring.actions_of(c, Train) if a.position.lap > excluded_at]
    assert later, "c trained no hop after it was taken back"
    finished_alike(ring)  # c included
    assert ring.finals[c][0].excluded is None  # it ends as a member like any other
    signers = [s.signer for s in check_provenance(ring, c)]
    assert c in signers  # its hops after the return are in the final model's chain
    envelopes, _, _ = ring.provenance[c]
    chain = DeadChain(RUN, VIEW, tuple(ring.peers)).extend_with(envelopes, receiver=None)
    assert [(type(n), n.subject) for n in chain.notices] == [(DeadNotice, c), (ReturnNotice, c)]


def test_without_its_requests_reaching_anyone_it_stays_excluded() -> None:
    ring, excluded_at = excluded_then_back(deliver=False)
    c = ring.peers[2]
    assert not any(ring.actions_of(p, Returned) for p in ring.peers)
    assert all(a.position.lap <= excluded_at for a in ring.actions_of(c, Train))
    assert ring.finals[c][0].excluded is not None


def test_a_request_from_a_live_member_changes_no_hand_over() -> None:
    ring = PureRing(3, max_laps=3, patience=5, limits=LIMITS)
    ring.start()
    a, b = ring.peers[0], ring.peers[1]
    ring.feed(a, ReturnAsked(ReturnRequest.seal(ring.ids[1], run_id=b"R" * 16, counter=1)))
    ring.run()
    finished_alike(ring)
    assert not any(ring.actions_of(p, Returned) for p in ring.peers)
    assert {s.target for s in ring.actions_of(a, Send) if s.kind == "model"} == {b}


def test_a_request_for_another_run_is_refused_and_not_kept() -> None:
    ring = PureRing(3, max_laps=2, limits=LIMITS)
    ring.start()
    a = ring.peers[0]
    actions = ring.feed(a, ReturnAsked(ReturnRequest.seal(ring.ids[1], run_id=b"X" * 16,
                                                          counter=1)))  # fmt: skip
    assert [type(x).__name__ for x in actions] == ["Refuse"]
    assert ring.machines[a].asks == {}


# --- the stopping state across laps a returner missed ----------------------------------


def _records(laps: range) -> tuple[LapRecord, ...]:
    return tuple(LapRecord(lap, 1.0 / (lap + 3), 0.5, 0.5, 100, 1000 * (lap + 2)) for lap in laps)


def test_a_returner_accepts_a_history_with_a_gap_and_others_do_not() -> None:
    rule = StopRule(patience=20, tolerance=1e-3, max_laps=30)
    seen = Progress.initial()  # it saw no lap result before it was counted as dead
    stop = StopState()
    for record in _records(range(-1, 12)):
        stop, _ = stop.judge(record, tolerance=rule.tolerance)
    claimed = Progress(12, 1, False, 11, stop, _records(range(4, 12)))  # a window of 8
    kwargs = {"position": Position(12, 2), "sender_position": 1, "rule": rule}
    assert check_model_progress(seen, claimed, **kwargs) == "the history has a gap"  # type: ignore[arg-type]
    assert check_model_progress(seen, claimed, returning=True, **kwargs) is None  # type: ignore[arg-type]
    ended = attrs.evolve(claimed, stop=StopState(0, 0.3, 0.3, 25))  # the rule holds: not ended
    assert "holds" in (check_model_progress(seen, ended, returning=True, **kwargs) or "")  # type: ignore[arg-type]


def test_a_lap_left_unjudged_by_a_dead_head_is_no_gap() -> None:
    """The head that opened lap 0 died: nobody could unmask its sums, so the history goes
    from nothing to lap 0's result; a member that saw no result takes it (the window is
    not full: nothing fell out of it)."""
    rule = StopRule(patience=20, tolerance=1e-3, max_laps=30)
    stop, _ = StopState().judge(_records(range(0, 1))[0], tolerance=rule.tolerance)
    claimed = Progress(2, 0, False, 0, stop, _records(range(0, 1)))
    kwargs = {"position": Position(2, 1), "sender_position": 0, "rule": rule}
    assert check_model_progress(Progress.initial(), claimed, **kwargs) is None  # type: ignore[arg-type]


def test_a_member_that_hears_nothing_for_hop_timeout_asks_to_return() -> None:
    """It may have been counted as dead while it was cut off; asking when it was not
    changes nothing (test_a_request_from_a_live_member_changes_no_hand_over).  It asks
    the members just before it, not everyone."""
    ring = PureRing(3, max_laps=3, limits=LIMITS)
    ring.start()
    b = ring.peers[1]
    begun = ring.feed(b, Begin())
    assert SetTimer("quiet", LIMITS.hop_timeout) in begun  # armed while waiting
    asked = ring.machines[b].handle(TimerFired("quiet"), 20.0)
    assert [type(a) for a in asked if isinstance(a, AskToReturn | SetTimer)] == [
        AskToReturn,
        SetTimer,
    ]
    [ask] = [a for a in asked if isinstance(a, AskToReturn)]
    assert ask.to == (ring.peers[0], ring.peers[2])  # those before it in the ring, nearest first
    assert ring.machines[b].returning
    again = ring.machines[b].handle(TimerFired("quiet"), 40.0)  # already asking: once
    assert [type(a) for a in again] == [Ignored]


def test_a_finished_member_hands_its_final_to_an_asker_at_most_once_a_return_interval() -> None:
    """A small signed request must not buy a member a model transfer as often as it likes."""
    ring = PureRing(3, max_laps=2, patience=5, limits=LIMITS)
    ring.start()
    ring.run()
    finished_alike(ring)
    a, b = ring.peers[0], ring.ids[1]
    machine = ring.machines[a]

    def finals_to_b(now: float, counter: int) -> int:
        request = ReturnRequest.seal(b, run_id=RUN, counter=counter)
        actions = machine.handle(ReturnAsked(request), now)
        sent = [x for x in actions if isinstance(x, Send) and x.kind == "final"]
        for x in sent:  # the hand-over ends (b is unreachable): the member is done again
            lost = Failure(FailureKind.UNREACHABLE, "gone")
            machine.handle(HandOverFailed(x.handover, lost), now)
        assert machine.phase is Phase.DONE
        return len(sent)

    t = ring.now + 1.0
    assert finals_to_b(t, 1) == 1
    assert finals_to_b(t + 1.0, 2) == 0  # asked again at once: refused
    assert finals_to_b(t + LIMITS.return_interval, 3) == 1
