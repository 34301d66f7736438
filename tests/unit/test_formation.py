"""The formation machine: whole formations in pure Python, then the table.

:class:`FormationWorld` plays the drivers of N :class:`FormationMachine` s: it
delivers every message at once, admits offers (refusing the misfits it is told
of), "signs" views as digests of their content, and fires timers on a virtual
clock.  No sockets, no trio.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any

import attrs
import pytest

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.protocol.draw import DrawError, Roster, commitment, draw_leader, reveal_of
from fedup.protocol.formation import MAX_STRIKES, TRANSITIONS, FormationMachine, Stage
from fedup.protocol.formation_events import (
    AckArrived,
    Action,
    AnswerFollow,
    AnswerOffer,
    Call,
    CallArrived,
    CallFailed,
    CancelTimer,
    Close,
    CommitArrived,
    ConnectionLost,
    Event,
    Failed,
    FollowArrived,
    Ignored,
    Joined,
    Note,
    OfferArrived,
    PeerSeen,
    PeersSeen,
    Probe,
    ProbeDone,
    Propose,
    RefuseArrived,
    RingBlobArrived,
    SendAck,
    SendCommit,
    SendRefuse,
    SendView,
    SetTimer,
    Start,
    TimerFired,
    ViewArrived,
    ViewReady,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode

LIMITS = attrs.evolve(
    DEFAULT_LIMITS,
    formation_timeout=15.0,
    call_timeout=5.0,
    view_timeout=10.0,
    peer_wait_timeout=300.0,
    hop_timeout=20.0,
)


class FormationWorld:
    def __init__(self, n: int, *, min_peers: int | None = None, settle: float = 1.0) -> None:
        self.ids = sorted(
            (Identity(bytes([i + 1]) * 32) for i in range(n)), key=lambda i: i.peer_id
        )
        self.peers = [i.peer_id for i in self.ids]
        self._runs = 0
        self.machines = {
            p: FormationMachine(
                p,
                min_peers=min_peers or n,
                settle=settle,
                limits=LIMITS,
                new_run_id=self._run_id,
            )
            for p in self.peers
        }
        self.now = 0.0
        self.queue: deque[tuple[PeerId, Event]] = deque()
        self.timers: dict[tuple[PeerId, str], float] = {}
        self.log: list[tuple[float, PeerId, Action]] = []
        self.down: set[PeerId] = set()
        """Crashed peers (or fake records): calls and probes to them fail, they do nothing."""
        self.mute: set[PeerId] = set()
        """Peers that complete a handshake (a probe succeeds) but call nobody and answer no
        call: a probe cannot tell them from a slow leader."""
        self.probes: list[tuple[PeerId, PeerId]] = []
        """(prober, probed), in order."""
        self.misfit: dict[PeerId, str] = {}
        """The leader's admission refuses these (their columns do not fit)."""
        self.view_problem: dict[PeerId, tuple[str, bool]] = {}
        """Members that find a problem in any view: (problem, ours)."""
        self.bad_leader: set[PeerId] = set()
        """Leaders whose views break the rules (every member finds a problem, not ours)."""
        self.lose_commit: set[PeerId] = set()
        """Members whose connection breaks right after their ack: no commit reaches them."""
        self.lose_draw: set[PeerId] = set()
        """The same for the draw's commit (round 1)."""
        self.views: dict[bytes, tuple[PeerId, bytes, int, frozenset[PeerId]]] = {}
        self.rosters: dict[bytes, Roster] = {}
        self.draws: list[tuple[Roster, PeerId]] = []
        """Each draw a coordinator committed, with the leader its reveals choose."""
        self.nonces: dict[PeerId, bytes] = {}
        """A peer's draw nonces (for every run: the world's peers are honest)."""
        self.drop_on_propose: PeerId | None = None

    def nonces_of(self, peer: PeerId, run_id: bytes) -> bytes:
        seed = self.nonces.get(peer, peer.raw)
        return hashlib.sha512(seed + run_id).digest()

    def rig(self, leader: PeerId, members: list[PeerId] | None = None, run: int = 1) -> None:
        """Pick the nonces of one candidate so that the first draw (run ``run``, epoch 0,
        among ``members``, coordinated by the lowest) chooses ``leader``."""
        members = members or self.peers
        coordinator = min(members)
        candidates = sorted(p for p in members if p != coordinator)
        run_id = run.to_bytes(16, "big")
        for i in range(10_000):
            self.nonces[candidates[-1]] = i.to_bytes(4, "big")
            nonces = {p: self.nonces_of(p, run_id) for p in candidates}
            roster = Roster(
                run_id, 0, coordinator, tuple((p, commitment(nonces[p])) for p in candidates)
            )
            reveals = {p: reveal_of(nonces[p], 0) for p in candidates}
            if draw_leader(roster, reveals) == leader:
                return
        raise AssertionError("no nonce draws that leader")

    def _run_id(self) -> bytes:
        self._runs += 1
        return self._runs.to_bytes(16, "big")

    def start(self, *, sees: dict[PeerId, list[PeerId]] | None = None) -> None:
        for p in self.peers:
            self.queue.append((p, Start()))
            for q in (sees or {}).get(p, [x for x in self.peers if x != p]):
                self.queue.append((p, PeerSeen(q)))

    def feed(self, peer: PeerId, event: Event) -> None:
        if peer in self.down or peer in self.mute:
            return
        for action in self.machines[peer].handle(event):
            self.log.append((self.now, peer, action))
            self._do(peer, action)

    def run(self, until: float = 1000.0) -> None:
        for _ in range(100_000):
            if self.queue:
                self.feed(*self.queue.popleft())
                continue
            live = {k: t for k, t in self.timers.items() if k[0] not in self.down}
            if not live:
                return
            (peer, name), t = min(live.items(), key=lambda kv: (kv[1], kv[0][0].raw, kv[0][1]))
            if t > until:
                return
            self.now = t
            del self.timers[(peer, name)]
            self.feed(peer, TimerFired(name))
        raise AssertionError("formation did not settle")

    def _do(self, me: PeerId, a: Action) -> None:
        if isinstance(a, SetTimer):
            self.timers[(me, a.name)] = self.now + a.seconds
        elif isinstance(a, CancelTimer):
            self.timers.pop((me, a.name), None)
        elif isinstance(a, Probe):
            for p in a.peers:
                self.probes.append((me, p))
                self.queue.append((me, ProbeDone(p, p not in self.down, "nothing listens")))
        elif isinstance(a, Call):
            for p in a.peers:
                if p in self.down:
                    self.queue.append((me, CallFailed(p, "nothing listens")))
                elif p in self.mute:
                    self.queue.append((me, CallFailed(p, "closed the connection")))
                else:
                    self.queue.append((p, CallArrived(me, a.run_id, a.roster)))
        elif isinstance(a, AnswerOffer):
            commit = commitment(self.nonces_of(me, a.run_id)) if a.draw else None
            self.queue.append((a.leader, OfferArrived(me, a.run_id, None, commit)))
        elif isinstance(a, AnswerFollow):
            self.queue.append((a.caller, FollowArrived(me, a.leader)))
        elif isinstance(a, SendRefuse):
            self.queue.append((a.peer, RefuseArrived(me, a.code, a.reason)))
        elif isinstance(a, Propose) and a.commits is not None:
            roster = Roster(a.run_id, a.epoch, me, a.commits)
            digest = hashlib.sha256(roster.to_cbor()).digest()
            self.rosters[digest] = roster
            self.queue.append((me, ViewReady(a.run_id, a.epoch, digest, a.members)))
        elif isinstance(a, Propose):
            if self.drop_on_propose is not None:
                self.down.add(self.drop_on_propose)
                self.queue.append((me, ConnectionLost(self.drop_on_propose, "reset")))
                self.drop_on_propose = None
            refused = tuple((p, self.misfit[p]) for p in sorted(a.members) if p in self.misfit)
            members = frozenset(p for p in a.members if p not in self.misfit)
            digest = hashlib.sha256(
                repr((me, a.run_id, a.epoch, sorted(members))).encode()
            ).digest()
            self.views[digest] = (me, a.run_id, a.epoch, members)
            self.queue.append((me, ViewReady(a.run_id, a.epoch, digest, members, refused)))
        elif isinstance(a, SendView):
            machine = self.machines[me]
            assert machine.run_id is not None and machine.digest is not None
            roster = self.rosters.get(machine.digest)
            if roster is not None:
                self.queue.append(
                    (a.peer, ViewArrived(me, roster.run_id, a.epoch, machine.digest, roster=roster))
                )
                return
            problem, ours = self.view_problem.get(a.peer, (None, False))
            if me in self.bad_leader:
                problem, ours = "max_laps must be in [1, 10000], got 20000", False
            self.queue.append(
                (a.peer, ViewArrived(me, machine.run_id, a.epoch, machine.digest, problem, ours))
            )
        elif isinstance(a, SendAck):
            reveal = None
            if a.digest in self.rosters:
                reveal = reveal_of(self.nonces_of(me, a.run_id), a.epoch)
            self.queue.append((a.leader, AckArrived(me, a.run_id, a.epoch, a.digest, reveal)))
            if me in (self.lose_commit if reveal is None else self.lose_draw):
                self.queue.append((me, ConnectionLost(a.leader, "connection ended")))
        elif isinstance(a, SendCommit):
            if a.peer not in (self.lose_commit if a.reveals is None else self.lose_draw):
                commit = CommitArrived(me, a.run_id, a.epoch, a.digest, a.reveals)
                self.queue.append((a.peer, commit))
            if a.reveals is not None:
                roster = self.rosters[a.digest]
                drawn = (roster, draw_leader(roster, dict(a.reveals)))
                if not self.draws or self.draws[-1] != drawn:
                    self.draws.append(drawn)
        else:
            assert isinstance(a, Close | Joined | Failed | Note | Ignored), a

    def joined(self) -> dict[PeerId, Joined]:
        return {p: m.joined for p, m in self.machines.items() if m.joined is not None}

    def members_of(self, joined: Joined) -> set[PeerId]:
        leader, _, _, members = self.views[joined.digest]
        return {leader, *members}

    def notes(self, peer: PeerId) -> list[str]:
        return [a.text for _, p, a in self.log if p == peer and isinstance(a, Note)]


def one_federation(world: FormationWorld, members: list[PeerId]) -> Joined:
    joined = world.joined()
    assert set(joined) == set(members), [p.short for p in joined]
    views = {j.digest for j in joined.values()}
    assert len(views) == 1
    j = next(iter(joined.values()))
    assert world.members_of(j) == set(members)
    roster, drawn = world.draws[-1]
    assert j.leader == drawn  # the last draw chose the leader
    assert set(members) <= roster.member_ids
    return j


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_everyone_joins_one_view_led_by_the_lowest(n: int) -> None:
    world = FormationWorld(n)
    world.start()
    world.run()
    j = one_federation(world, world.peers)
    assert j.epoch == 0
    assert world.now == pytest.approx(1.0)  # the settle period, nothing else waited


@pytest.mark.parametrize("order", range(6))
def test_discovery_order_does_not_change_the_view(order: int) -> None:
    import itertools

    world = FormationWorld(3)
    perms = list(itertools.permutations(world.peers))
    sees = {p: [q for q in perms[order] if q != p] for p in world.peers}
    world.start(sees=sees)
    world.run()
    one_federation(world, world.peers)


def test_a_hidden_lowest_peer_still_leads() -> None:
    """Nobody sees the lowest peer; it sees them, calls, and they follow it."""
    world = FormationWorld(3)
    low = world.peers[0]
    sees = {p: [q for q in world.peers if q not in (p, low)] for p in world.peers}
    sees[low] = world.peers[1:]
    world.start(sees=sees)
    world.run()
    one_federation(world, world.peers)


def test_a_silent_lowest_peer_is_elected_around() -> None:
    """A lowest peer that answers probes but never calls: formation_timeout decides."""
    world = FormationWorld(4, min_peers=3)
    low = world.peers[0]
    world.mute.add(low)
    world.start()
    world.run()
    one_federation(world, world.peers[1:])
    # one formation_timeout for the silent peer, one more settle period for the
    # others to find it silent too
    assert world.now <= 1.0 + LIMITS.formation_timeout + 1.0 + 1e-9
    assert any("did not call" in n for n in world.notes(world.peers[1]))
    assert (world.peers[1], low) in world.probes  # probed, and it answered


def test_fake_lowest_candidates_cost_one_settle_interval() -> None:
    """Three records below every real peer whose owners never complete a handshake (the
    landed code waited formation_timeout for each): all probed at once after one settle
    interval, left out, and the lowest real peer leads."""
    world = FormationWorld(6, min_peers=3)
    fakes = world.peers[:3]
    world.down.update(fakes)
    world.start()
    world.run()
    one_federation(world, world.peers[3:])
    settle = 1.0
    assert world.now <= settle + settle + 1e-9  # settled, then one probe round
    for real in world.peers[3:]:
        assert {p for who, p in world.probes if who == real} == set(fakes)
        assert world.machines[real].unreachable == set(fakes)
        assert sum("failed its probe" in n for n in world.notes(real)) == 3
    assert not any("did not call" in n for p in world.peers[3:] for n in world.notes(p))
    # A call from the real leader that arrived before a follower's probes were done was
    # held until they were, not answered with "follow" a fake.
    assert not any(isinstance(a, AnswerFollow) and a.leader in fakes for _, _, a in world.log)


def test_probes_are_bounded_and_only_below_us() -> None:
    world = FormationWorld(13, min_peers=3)
    fakes = world.peers[:10]
    world.down.update(fakes)
    world.start()
    world.run()
    one_federation(world, world.peers[10:])
    top = world.peers[12]
    rounds = [p for who, p in world.probes if who == top]
    assert rounds[:8] == fakes[:8]  # MAX_PROBES lowest first, then the rest next round
    assert set(rounds) == set(fakes)
    assert all(p < who for who, p in world.probes)


def test_a_new_record_of_an_unreachable_candidate_earns_it_another_probe() -> None:
    world = FormationWorld(4, min_peers=3)
    me, low = world.peers[3], world.peers[0]
    m = world.machines[me]
    m.handle(Start())
    for p in world.peers[:3]:
        m.handle(PeerSeen(p))
    m.handle(TimerFired("settle"))
    assert m.leader == low
    m.handle(ProbeDone(low, False, "nothing listens"))
    assert low in m.unreachable and m.leader == world.peers[1]
    m.handle(PeerSeen(low))
    assert low not in m.unreachable
    m.handle(ProbeDone(world.peers[1], None, "busy"))  # proves nothing either way
    assert world.peers[1] not in m.unreachable | m.proven


def test_a_batch_of_records_acts_as_each_record_alone_with_one_timer_restart() -> None:
    world = FormationWorld(6, min_peers=3)
    me = world.peers[5]
    alone = world.machines[me]
    batched = FormationMachine(me, min_peers=3, settle=1.0, limits=LIMITS, new_run_id=bytes)
    alone.handle(Start())
    batched.handle(Start())
    alone.handle(ProbeDone(world.peers[0], False, "nothing listens"))
    batched.handle(ProbeDone(world.peers[0], False, "nothing listens"))
    seen = [*world.peers[:5], me, world.peers[1]]  # ourselves and a repeat among them
    restarts = [a for p in seen for a in alone.handle(PeerSeen(p)) if isinstance(a, SetTimer)]
    actions = batched.handle(PeersSeen(tuple(seen)))
    assert actions == [SetTimer("settle", 1.0)]
    assert len(restarts) == 5  # one per new candidate, one in all for the batch
    assert batched.candidates == alone.candidates == set(world.peers[:5])
    assert batched.unreachable == alone.unreachable == set()
    assert batched.handle(PeersSeen(tuple(world.peers[:5]))) == []  # nothing new: no restart
    for m in (alone, batched):
        m.handle(TimerFired("settle"))
    assert batched.leader == alone.leader == world.peers[0]


def test_a_member_whose_model_differs_fails_and_the_others_join_the_next_epoch() -> None:
    world = FormationWorld(4, min_peers=3)
    odd = world.peers[3]
    world.view_problem[odd] = ("my model's layout differs from the leader's", True)
    world.rig(world.peers[0])
    world.start()
    world.run()
    j = one_federation(world, world.peers[:3])
    assert j.epoch == 1
    m = world.machines[odd]
    assert m.stage is Stage.FAILED and m.failure is not None
    assert "layout differs" in m.failure and str(world.peers[0]) in m.failure


def test_a_misfit_candidate_is_refused_with_the_reason() -> None:
    world = FormationWorld(4, min_peers=3)
    odd = world.peers[2]
    world.misfit[odd] = "missing columns 'income'"
    world.rig(world.peers[0])
    world.start()
    world.run()
    one_federation(world, [p for p in world.peers if p != odd])
    failure = world.machines[odd].failure
    assert failure is not None and "missing columns 'income'" in failure


def test_a_leader_proposing_settings_out_of_bounds_is_distrusted_and_elected_around() -> None:
    world = FormationWorld(4, min_peers=3)
    bad = world.peers[0]
    world.bad_leader.add(bad)
    world.rig(bad)  # the draw chooses it (it coordinates too: the lowest)
    world.start()
    world.run()
    j = one_federation(world, world.peers[1:])
    assert j.leader != bad
    for p in world.peers[1:]:
        assert bad in world.machines[p].distrusted
        assert any("breaks the rules" in n for n in world.notes(p))
    # The hostile leader cannot drag anyone back: its next call is refused.
    actions = world.machines[world.peers[2]].handle(CallArrived(bad, b"x" * 16))
    assert [type(a) for a in actions] == [SendRefuse]
    joined_at = max(t for t, _, a in world.log if isinstance(a, Joined))
    assert joined_at <= 2 * 1.0  # no deadline was waited out: one settle period more


def test_a_lost_commit_is_replaced_by_the_first_ring_blob() -> None:
    world = FormationWorld(3)
    c = world.peers[2]
    world.lose_commit.add(c)
    world.rig(world.peers[0])
    world.start()
    world.run(until=5.0)
    m = world.machines[c]
    assert m.stage is Stage.ACKED  # its leader committed, but it does not know yet
    leader_joined = world.machines[world.peers[0]].joined
    assert leader_joined is not None
    world.feed(c, RingBlobArrived(world.peers[1], leader_joined.run_id, leader_joined.digest))
    one_federation(world, world.peers)


def test_a_ring_blob_of_another_view_does_not_join() -> None:
    world = FormationWorld(3)
    c = world.peers[2]
    world.lose_commit.add(c)
    world.rig(world.peers[0])
    world.start()
    world.run(until=5.0)
    m = world.machines[c]
    [ignored] = m.handle(RingBlobArrived(world.peers[1], b"r" * 16, b"d" * 32))
    assert isinstance(ignored, Ignored) and m.stage is Stage.ACKED


def test_too_few_peers_give_up_with_the_count() -> None:
    world = FormationWorld(2, min_peers=3)
    world.start()
    world.run()
    for p in world.peers:
        m = world.machines[p]
        assert m.stage is Stage.FAILED
        assert m.failure == (
            f"no federation formed within {LIMITS.peer_wait_timeout:g} s: found 2 of the 3 "
            "peers needed (this one included)"
        )
    assert world.now == pytest.approx(LIMITS.peer_wait_timeout)


def test_a_leader_called_by_a_lower_peer_stands_down() -> None:
    world = FormationWorld(3)
    low, mid, high = world.peers
    # mid does not see low (so it leads), low sees everyone
    world.start(sees={low: [mid, high], mid: [high], high: [mid]})
    world.run()
    one_federation(world, world.peers)


def test_a_member_that_leaves_after_offering_is_left_out() -> None:
    world = FormationWorld(4, min_peers=3)
    leader, b, c, d = world.peers
    world.drop_on_propose = d  # d's connection breaks while the leader signs the view
    world.start()
    world.run()
    j = one_federation(world, [leader, b, c])
    assert j.epoch == 1


# --- the table ----------------------------------------------------------------------------

SAMPLES: list[Any] = [
    Start(),
    OfferArrived(Identity(b"\x42" * 32).peer_id, b"r" * 16),
    FollowArrived(Identity(b"\x42" * 32).peer_id, Identity(b"\x43" * 32).peer_id),
    RefuseArrived(Identity(b"\x42" * 32).peer_id, RefusalCode.MISFIT, "x"),
    CallFailed(Identity(b"\x42" * 32).peer_id, "x"),
    ViewReady(b"r" * 16, 0, b"d" * 32, frozenset()),
    ViewArrived(Identity(b"\x42" * 32).peer_id, b"r" * 16, 0, b"d" * 32),
    AckArrived(Identity(b"\x42" * 32).peer_id, b"r" * 16, 0, b"d" * 32),
    CommitArrived(Identity(b"\x42" * 32).peer_id, b"r" * 16, 0, b"d" * 32),
    ConnectionLost(Identity(b"\x42" * 32).peer_id, "x"),
    RingBlobArrived(Identity(b"\x42" * 32).peer_id, b"r" * 16, b"d" * 32),
]


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_event_a_stage_does_not_take_is_ignored_without_change(
    stage: Stage, event: Event
) -> None:
    world = FormationWorld(3)
    m = world.machines[world.peers[1]]
    m.stage = stage
    before = attrs.asdict(m) if attrs.has(type(m)) else dict(vars(m))
    actions = m.handle(event)
    if type(event) not in TRANSITIONS[stage]:
        assert len(actions) == 1 and isinstance(actions[0], Ignored)
        assert dict(vars(m)) == before
    else:  # taken events that do not fit the stage's bookkeeping are ignored too
        assert not any(isinstance(a, Joined) for a in actions)


def test_the_table_covers_every_stage() -> None:
    assert set(TRANSITIONS) == set(Stage)
    assert set(TRANSITIONS[Stage.JOINED]) == {CallArrived}


def test_a_joined_member_refuses_calls_as_committed() -> None:
    world = FormationWorld(3)
    world.start()
    world.run()
    m = world.machines[world.peers[2]]
    [refuse] = m.handle(CallArrived(world.peers[1], b"n" * 16))
    assert isinstance(refuse, SendRefuse) and refuse.code is RefusalCode.COMMITTED


def _following(n: int = 4) -> tuple[FormationWorld, FormationMachine]:
    """The highest of ``n`` peers, settled and following the lowest (no probe yet)."""
    world = FormationWorld(n, min_peers=3)
    m = world.machines[world.peers[-1]]
    m.handle(Start())
    for p in world.peers[:-1]:
        m.handle(PeerSeen(p))
    m.handle(TimerFired("settle"))
    assert m.stage is Stage.FOLLOWING and m.leader == world.peers[0]
    return world, m


def test_a_busy_answer_answers_the_held_call_instead_of_probing_again() -> None:
    world, m = _following()
    low, mid = world.peers[0], world.peers[1]
    actions = m.handle(CallArrived(mid, b"r" * 16))  # held: low never proved itself
    assert [a for a in actions if isinstance(a, Probe)] == [Probe((low,))]
    assert mid in m.held
    actions = m.handle(ProbeDone(low, None, "busy"))
    assert not [a for a in actions if isinstance(a, Probe)]  # no loop on a busy peer
    assert [a for a in actions if isinstance(a, AnswerFollow)] == [
        AnswerFollow(mid, b"r" * 16, low)
    ]
    assert not m.held and low not in m.unreachable


def test_a_held_call_is_dropped_when_its_caller_hangs_up_and_answered_at_the_deadline() -> None:
    world, m = _following()
    low, mid = world.peers[0], world.peers[1]
    actions = m.handle(CallArrived(mid, b"r" * 16))
    assert SetTimer("held", LIMITS.call_timeout / 2) in actions
    m.handle(ConnectionLost(mid, "closed the connection"))
    assert not m.held
    actions = m.handle(ProbeDone(low, True))
    assert not [a for a in actions if isinstance(a, AnswerFollow | AnswerOffer)]
    assert m.stage is Stage.FOLLOWING  # not bound to a caller that left
    # A call whose probe never ends is answered when half the caller's patience is spent.
    world, m = _following(5)
    low, caller = world.peers[0], world.peers[2]
    m.handle(ProbeDone(low, True))  # low is real; second is not probed yet
    m.handle(CallArrived(caller, b"s" * 16))
    assert not m.held  # a proven peer below the caller: the answer is known
    world, m = _following(5)
    m.handle(CallArrived(world.peers[2], b"s" * 16))
    assert world.peers[2] in m.held
    actions = m.handle(TimerFired("held"))
    assert [a for a in actions if isinstance(a, AnswerFollow)] == [
        AnswerFollow(world.peers[2], b"s" * 16, world.peers[0])
    ]


def test_a_probe_closed_at_once_is_a_strike_not_a_verdict() -> None:
    """A listener at its connection cap closes a probe without a word: that alone does not
    make an honest leader unreachable; three such probes in a row do."""
    world, m = _following()
    low = world.peers[0]
    for _ in range(MAX_STRIKES - 1):
        m.handle(ProbeDone(low, None, "closed the connection", strike=True))
        assert low not in m.unreachable and m.leader == low
    m.handle(ProbeDone(low, None, "closed the connection", strike=True))
    assert low in m.unreachable and m.leader != low


# --- the draw -----------------------------------------------------------------------------


def test_an_id_grinder_coordinates_but_the_draw_chooses_the_leader() -> None:
    """The lowest ID (say, ground by key generation) coordinates the draw and learns only
    commitments and nonces: every data summary goes to the leader the draw chose."""
    world = FormationWorld(4)
    grinder, drawn = world.peers[0], world.peers[2]
    world.rig(drawn)
    world.start()
    world.run()
    j = one_federation(world, world.peers)
    assert j.leader == drawn
    offers = [(p, a) for _, p, a in world.log if isinstance(a, AnswerOffer)]
    assert {(p, a.leader) for p, a in offers if not a.draw} == {
        (p, drawn) for p in world.peers if p != drawn
    }
    assert all(a.draw for _, a in offers if a.leader == grinder)
    assert world.now == pytest.approx(1.0)  # the draw costs no waiting


def _member_with_roster(n: int = 4) -> tuple[FormationWorld, FormationMachine, Roster, bytes]:
    """The highest of ``n`` peers, called by the lowest for a draw, holding its roster."""
    world = FormationWorld(n, min_peers=2)
    coordinator, me = world.peers[0], world.peers[-1]
    m = world.machines[me]
    m.handle(Start())
    for p in world.peers[:-1]:
        m.handle(PeerSeen(p))
    m.handle(TimerFired("settle"))
    run = b"r" * 16
    [*_, offer, _due] = m.handle(CallArrived(coordinator, run))
    assert offer == AnswerOffer(coordinator, run, draw=True)
    commits = tuple((p, commitment(world.nonces_of(p, run))) for p in world.peers[1:])
    roster = Roster(run, 0, coordinator, commits)
    digest = hashlib.sha256(roster.to_cbor()).digest()
    actions = m.handle(ViewArrived(coordinator, run, 0, digest, roster=roster))
    assert SendAck(coordinator, run, 0, digest) in actions
    assert coordinator in m.spent and m.revealed == digest
    return world, m, roster, digest


def test_a_coordinator_that_gives_its_draw_up_after_the_reveals_coordinates_no_more() -> None:
    world, m, _, _ = _member_with_roster()
    coordinator = world.peers[0]
    actions = m.handle(RefuseArrived(coordinator, RefusalCode.GIVEN_UP, "the draw failed"))
    assert m.stage is Stage.FOLLOWING and m.leader == world.peers[1]
    assert any("gave the proposal up" in a.text for a in actions if isinstance(a, Note))
    [refuse] = m.handle(CallArrived(coordinator, b"s" * 16))  # a second look: refused
    assert isinstance(refuse, SendRefuse) and refuse.code is RefusalCode.COMMITTED
    assert "coordinated a draw with me already" in refuse.reason
    # The next coordinator's call is answered (with a fresh commitment, not a summary).
    actions = m.handle(CallArrived(world.peers[1], b"t" * 16))
    assert AnswerOffer(world.peers[1], b"t" * 16, draw=True) in actions


def test_a_drawn_leaders_call_is_taken_only_with_the_draw_we_revealed_for() -> None:
    world, m, roster, digest = _member_with_roster()
    coordinator, leader = world.peers[0], world.peers[1]
    reveals = tuple((p, reveal_of(world.nonces_of(p, roster.run_id), 0)) for p, _ in roster.commits)
    [refuse] = m.handle(CallArrived(leader, b"s" * 16, b"another roster".ljust(32)))
    assert isinstance(refuse, SendRefuse) and refuse.code is RefusalCode.COMMITTED
    drawn = draw_leader(roster, dict(reveals))
    actions = m.handle(CommitArrived(coordinator, roster.run_id, 0, digest, reveals))
    assert m.drawn is not None and m.drawn.leader == drawn
    assert drawn != m.me  # (the world's nonces draw another member)
    assert m.stage is Stage.FOLLOWING and m.leader == drawn
    assert SetTimer("follow", LIMITS.formation_timeout) in actions
    [refuse] = m.handle(CallArrived(world.peers[2], b"u" * 16))  # a coordinator's call
    assert isinstance(refuse, SendRefuse) and "bound to the draw" in refuse.reason
    actions = m.handle(CallArrived(drawn, b"v" * 16, digest))
    assert AnswerOffer(drawn, b"v" * 16, draw=False) in actions


def test_a_commit_whose_reveals_do_not_open_the_commitments_is_distrusted() -> None:
    world, m, roster, digest = _member_with_roster()
    coordinator = world.peers[0]
    forged = tuple((p, b"\0" * 32) for p, _ in roster.commits)
    actions = m.handle(CommitArrived(coordinator, roster.run_id, 0, digest, forged))
    assert coordinator in m.distrusted and m.drawn is None
    assert any("draw of" in a.text and "invalid" in a.text for a in actions if isinstance(a, Note))


def test_a_roster_signed_again_with_new_members_is_refused() -> None:
    world, m, roster, _ = _member_with_roster()
    coordinator = world.peers[0]
    outsider = Identity(b"\x77" * 32).peer_id
    bigger = Roster(
        roster.run_id, 1, coordinator, tuple(sorted((*roster.commits, (outsider, b"c" * 64))))
    )
    actions = m.handle(ViewArrived(coordinator, roster.run_id, 1, b"e" * 32, roster=bigger))
    [refuse] = [a for a in actions if isinstance(a, SendRefuse)]
    assert refuse.code is RefusalCode.BAD_VIEW and "adds members" in refuse.reason
    assert coordinator in m.distrusted


def _coordinating() -> tuple[FormationWorld, FormationMachine, bytes]:
    """The lowest of 4 peers, coordinating a draw whose roster (epoch 0) went out."""
    world = FormationWorld(4, min_peers=2)
    m = world.machines[world.peers[0]]
    m.handle(Start())
    for p in world.peers[1:]:
        m.handle(PeerSeen(p))
    m.handle(TimerFired("settle"))
    assert m.stage is Stage.LEADING and m.run_id is not None
    run = m.run_id
    for p in world.peers[1:]:
        m.handle(OfferArrived(p, run, None, commitment(world.nonces_of(p, run))))
    assert m.stage is Stage.PROPOSING
    m.handle(ViewReady(run, 0, b"d" * 32, frozenset(world.peers[1:])))
    return world, m, run


def test_a_reveal_that_does_not_open_its_commitment_leaves_the_member_out() -> None:
    world, m, run = _coordinating()
    a, b, c = world.peers[1:]
    actions = m.handle(AckArrived(a, run, 0, b"d" * 32, b"\0" * 32))
    assert SendRefuse(a, run, RefusalCode.MALFORMED, "bad reveal") in actions
    assert a not in m.offers
    m.handle(AckArrived(b, run, 0, b"d" * 32, reveal_of(world.nonces_of(b, run), 0)))
    actions = m.handle(AckArrived(c, run, 0, b"d" * 32, reveal_of(world.nonces_of(c, run), 0)))
    [propose] = [x for x in actions if isinstance(x, Propose)]
    assert propose.epoch == 1 and propose.members == {b, c}  # signed again, without a


def test_a_draw_is_signed_again_at_most_once_then_given_up() -> None:
    """A coordinator gets at most two looks at a draw (epochs 0 and 1), then is spent."""
    world, m, run = _coordinating()
    a, b, _never = world.peers[1:]
    for p in (a, b):
        m.handle(AckArrived(p, run, 0, b"d" * 32, reveal_of(world.nonces_of(p, run), 0)))
    [propose] = [x for x in m.handle(TimerFired("acks")) if isinstance(x, Propose)]
    assert propose.epoch == 1 and propose.members == {a, b}  # c never revealed
    m.handle(ViewReady(run, 1, b"e" * 32, frozenset({a, b})))
    m.handle(AckArrived(a, run, 1, b"e" * 32, reveal_of(world.nonces_of(a, run), 1)))
    actions = m.handle(TimerFired("acks"))  # b never revealed for epoch 1
    assert not [x for x in actions if isinstance(x, Propose)]
    assert (
        SendRefuse(a, run, RefusalCode.GIVEN_UP, "the draw failed: members did not acknowledge")
        in actions
    )
    assert m.me in m.spent and m.stage is Stage.FOLLOWING and m.leader == a


def test_a_member_that_lost_the_draws_commit_joins_on_the_drawn_leaders_call() -> None:
    world = FormationWorld(3)
    c = world.peers[2]
    world.lose_draw.add(c)
    world.rig(world.peers[1])  # neither the coordinator nor c
    world.start()
    world.run()
    j = one_federation(world, world.peers)
    assert j.leader == world.peers[1]
    assert any("went silent" in n for n in world.notes(c))


def test_a_drawn_leader_that_calls_again_for_a_new_run_is_answered_on_its_new_call() -> None:
    """The drawn leader gave its first proposal up and calls again: the member answers on
    the new connection and does not close it (it replaced the old one)."""
    world, m, roster, digest = _member_with_roster()
    coordinator = world.peers[0]
    reveals = tuple((p, reveal_of(world.nonces_of(p, roster.run_id), 0)) for p, _ in roster.commits)
    m.handle(CommitArrived(coordinator, roster.run_id, 0, digest, reveals))
    assert m.drawn is not None
    drawn = m.drawn.leader
    assert drawn != m.me  # (the world's nonces draw another member)
    m.handle(CallArrived(drawn, b"v" * 16, digest))
    assert m.stage is Stage.OFFERED and m.leader == drawn
    actions = m.handle(CallArrived(drawn, b"w" * 16, digest))
    assert AnswerOffer(drawn, b"w" * 16, draw=False) in actions
    assert not [a for a in actions if isinstance(a, Close)]
    assert m.run_id == b"w" * 16


def test_a_held_call_is_refused_at_once_when_formation_ends() -> None:
    """A caller whose call we held (its probes pending) is told when we give up, instead of
    waiting out its whole call_timeout."""
    world, m = _following(5)
    caller = world.peers[2]
    m.handle(CallArrived(caller, b"s" * 16))
    assert caller in m.held
    actions = m.handle(TimerFired("give-up"))
    [refuse] = [a for a in actions if isinstance(a, SendRefuse)]
    assert (refuse.peer, refuse.code) == (caller, RefusalCode.GIVEN_UP) and refuse.inbound
    assert not m.held and m.stage is Stage.FAILED


def test_a_trickle_of_new_candidates_cannot_put_settling_off() -> None:
    """A stranger minting a new record before each settle interval ends kept every peer
    settling until it gave up; settling now ends after formation_timeout regardless."""
    world = FormationWorld(3)
    m = world.machines[world.peers[2]]
    actions = m.handle(Start())
    assert SetTimer("settle-max", LIMITS.formation_timeout) in actions
    for p in world.peers[:2]:
        m.handle(PeerSeen(p))
    for n in range(20):  # a fresh fake identity every 0.9 settle intervals
        m.handle(PeerSeen(Identity(bytes([200, n]) * 16).peer_id))
        assert m.stage is Stage.SETTLING and not m.settled
    actions = m.handle(TimerFired("settle-max"))
    assert m.settled and m.stage is not Stage.SETTLING
    assert any("kept appearing" in a.text for a in actions if isinstance(a, Note))


def test_a_process_draws_once_per_roster_and_reveals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every member of a roster draws the same leader: a process computes it once for
    one roster object and the same reveals, again for another roster object or other
    reveals, and never keeps a failed draw."""
    from fedup.protocol import formation as formation_module

    drawn: list[Roster] = []
    real = formation_module.draw_leader

    def counting(roster: Roster, reveals: dict[PeerId, bytes]) -> PeerId:
        drawn.append(roster)
        return real(roster, reveals)

    monkeypatch.setattr(formation_module, "draw_leader", counting)
    ids = sorted((Identity(bytes([60 + i]) * 32) for i in range(4)), key=lambda i: i.peer_id)
    nonce = {i.peer_id: hashlib.sha512(i.peer_id.raw).digest() for i in ids}
    coordinator, *rest = (i.peer_id for i in ids)
    commits = tuple((p, commitment(nonce[p])) for p in rest)
    roster = Roster(bytes(16), 0, coordinator, commits)
    reveals = tuple((p, reveal_of(nonce[p], 0)) for p in rest)
    expected = real(roster, dict(reveals))
    for _ in range(3):
        assert formation_module._draw(roster, reveals) == (expected, roster.member_ids)
    assert drawn == [roster]
    twin = Roster(bytes(16), 0, coordinator, commits)  # equal, another object
    assert formation_module._draw(twin, tuple(reveals)) == (expected, roster.member_ids)
    assert len(drawn) == 2
    wrong = (*reveals[:-1], (reveals[-1][0], bytes(len(reveals[-1][1]))))
    for _ in range(2):
        with pytest.raises(DrawError):
            formation_module._draw(roster, wrong)
    assert len(drawn) == 4


def test_a_member_finds_its_commitment_in_a_roster_by_bisection() -> None:
    from fedup.peer.formation_driver import _commit_of

    ids = sorted((Identity(bytes([80 + i]) * 32) for i in range(6)), key=lambda i: i.peer_id)
    coordinator, *rest = (i.peer_id for i in ids)
    commits = tuple((p, commitment(hashlib.sha512(p.raw).digest())) for p in rest)
    roster = Roster(bytes(16), 0, coordinator, commits)
    stranger = Identity(b"\x7f" * 32).peer_id
    for peer in [*rest, coordinator, stranger]:
        assert _commit_of(roster, peer) == roster.commit_of(peer)
    assert _commit_of(roster, coordinator) is None and _commit_of(roster, rest[0]) is not None
