"""Forming a federation as a state machine: settle, elect, call, propose, acknowledge, commit.

Pure: events in, actions out (after ``h11/_state.py``).  The trio driver
(:mod:`fedup.peer.formation_driver`) feeds discovery news, messages from other
peers, the outcome of its own requests and fired timers, and carries out the
actions (dial and call, send a view, close a connection, join).  Checking a
data summary, merging summaries into a schema and checking a view against the
local model are the learning layer's; the driver does them and feeds the
verdicts here.

The rules (docs/federation.md, section 2):

1. A peer *settles*: it waits until it knows ``min_peers`` candidates (itself
   included) and none appeared for ``settle`` seconds.
2. The lowest candidate it does not ignore leads.  The leader calls every
   candidate; each answers ``offer``, ``follow`` (a lower peer it knows: the
   leader stands down and follows that one) or ``refuse``.
3. The leader admits the offers (the driver merges the summaries and refuses
   misfits, naming the columns), signs a view and sends it; each member checks
   it and acknowledges its digest.  A member that does not acknowledge within
   ``view_timeout`` is left out and the view is re-signed with the next epoch.
   Once every member of a view acknowledged, the leader sends ``commit``.
4. A member joins when ``commit`` arrives, or, if its connection to the leader
   broke after its acknowledgement, when the first ring blob of the view's
   run arrives (the leader commits once it has every acknowledgement, so a
   lost ``commit`` cannot leave a member out of a ring that counts on it).
   While it waits, every ``settle`` seconds it *probes* the candidates lower
   than itself that have not proven themselves (at most ``MAX_PROBES`` at
   once): a handshake under the network's rules, then close.  A record only
   says that someone signed it with the network's public fingerprint, which
   anyone can sniff; a candidate whose probe fails is *unreachable*: it is
   neither elected nor called until it calls us or announces a new record.
   So fake candidates cost formation one ``settle`` interval, not
   ``formation_timeout`` each.
5. A peer answers a call only from the lowest peer it knows; a higher caller
   gets ``follow``.  A leader called by a lower peer stands down.  A peer bound
   to a leader (offered, acknowledged or joined) refuses other callers.  A
   peer that expects a lower peer to call waits ``formation_timeout``, then
   ignores it and elects again.
6. A leader whose view breaks the rules (settings out of bounds, another run,
   a view that does not name us) is refused with ``bad-view`` and distrusted:
   the peer elects again without it.  A view our own data or model do not fit
   is refused with ``misfit`` and ends formation here with that reason; so
   does a leader's ``misfit`` refusal of our offer.
7. Formation gives up after ``peer_wait_timeout`` and says how many peers it
   found.

Every event a stage does not take is answered with :class:`Ignored` (a typed
refusal), never an exception.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs

from fedup.config import Limits
from fedup.protocol.draw import MAX_ROSTER_EPOCH, DrawError, Roster, draw_leader, reveal_matches
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
    PeerLost,
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
    Stage,
    Start,
    TimerFired,
    ViewArrived,
    ViewReady,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode

__all__ = [
    "Drawn",
    "FormationMachine",
    "Stage",
]

DRAW_MEMO = 8
"""Draws whose outcome a process remembers (:func:`_draw`): every member of a roster
computes the same draw, and the simulator runs all of them in one process."""

_draws: collections.OrderedDict[
    tuple[int, tuple[bytes, ...], tuple[bytes, ...]], tuple[Roster, PeerId, frozenset[PeerId]]
] = collections.OrderedDict()


def _draw(
    roster: Roster, reveals: tuple[tuple[PeerId, bytes], ...]
) -> tuple[PeerId, frozenset[PeerId]]:
    """The leader ``roster`` draws with ``reveals`` and the roster's members, computed once
    per process for one roster object and the same reveals (by their bytes).

    A member's roster is the one its driver verified, and a process verifies a roster's
    bytes once, so every member of a simulation passes the same object; the key holds
    the roster's identity, and the entry the roster itself (so the identity is not
    reused while the entry lives).  Keying by the peer IDs' bytes, not the IDs, spares
    two Python hash calls per member and entry (a thousand members: a million calls).
    Raises :class:`DrawError` as :func:`draw_leader` does; failures are not kept.
    """
    key = (id(roster), tuple(p.raw for p, _ in reveals), tuple(r for _, r in reveals))
    known = _draws.get(key)
    if known is not None and known[0] is roster:
        return known[1], known[2]
    leader = draw_leader(roster, dict(reveals))
    members = roster.member_ids
    _draws[key] = (roster, leader, members)
    if len(_draws) > DRAW_MEMO:
        _draws.popitem(last=False)
    return leader, members


MAX_PROBES = 8
"""Candidates probed at once: enough to clear a handful of fakes below the real leader in
one round; few enough that a follower's probes cost the peers below it little."""

MAX_STRIKES = 3
"""Probes in a row that neither completed nor were refused cleanly (a handshake that timed
out, a connection closed at once) after which a candidate counts as unreachable: a real
peer overloaded for three settle intervals is elected around, as a silent one is."""

TIMERS = SETTLE, SETTLE_MAX, FOLLOW, PROBE, HELD, CALLS, ACKS, VIEW_DUE, COMMIT_DUE, GIVE_UP = (
    "settle",
    "settle-max",
    "follow",
    "probe",
    "held",
    "calls",
    "acks",
    "view-due",
    "commit-due",
    "give-up",
)


@attrs.frozen
class Drawn:
    """The outcome of a draw: who leads the second round, among whom."""

    leader: PeerId
    members: frozenset[PeerId]
    """The roster's members, the coordinator included (empty when we learnt the draw from
    the leader's call rather than from the coordinator's commit: we do not lead then)."""
    roster: bytes
    """The digest of the roster drawn on."""


# --- the machine -----------------------------------------------------------------------

_ANY = {
    PeerSeen: "_seen",
    PeersSeen: "_seen_many",
    PeerLost: "_lost",
    ProbeDone: "_probed",
    CallArrived: "_call",
    TimerFired: "_timer",
}
TRANSITIONS: dict[Stage, dict[type, str]] = {
    Stage.SETTLING: {Start: "_start", **_ANY},
    Stage.FOLLOWING: {**_ANY},
    Stage.LEADING: {
        **_ANY,
        OfferArrived: "_offer",
        FollowArrived: "_follow",
        RefuseArrived: "_refused_call",
        CallFailed: "_call_failed",
        ConnectionLost: "_candidate_lost",
    },
    Stage.PROPOSING: {
        **_ANY,
        ViewReady: "_view_ready",
        AckArrived: "_ack",
        RefuseArrived: "_refused_view",
        ConnectionLost: "_candidate_lost",
    },
    Stage.OFFERED: {
        **_ANY,
        ViewArrived: "_view",
        RefuseArrived: "_leader_refused",
        ConnectionLost: "_leader_lost",
    },
    Stage.ACKED: {
        **_ANY,
        ViewArrived: "_view",
        CommitArrived: "_commit",
        RingBlobArrived: "_ring_blob",
        RefuseArrived: "_leader_refused",
        ConnectionLost: "_leader_lost",
    },
    Stage.JOINED: {CallArrived: "_call"},
    Stage.FAILED: {CallArrived: "_call"},
}
"""Which events each stage takes, and the method that decides; the rest are ignored."""


class FormationMachine:
    """One peer's part in forming a federation (as leader or as member)."""

    def __init__(
        self,
        me: PeerId,
        *,
        min_peers: int,
        settle: float,
        limits: Limits,
        new_run_id: Callable[[], bytes],
    ) -> None:
        self.me = me
        self.min_peers = min_peers
        self.settle = settle
        self.limits = limits
        self._new_run_id = new_run_id
        self.stage = Stage.SETTLING
        self.candidates: set[PeerId] = set()
        """Verified peers of our network (not us), as discovery reports them."""
        self.ignored: set[PeerId] = set()
        """Lower peers that did not call us in time: elected around until they call."""
        self.distrusted: set[PeerId] = set()
        """Leaders whose view broke the rules: refused from now on."""
        self.proven: set[PeerId] = set()
        """Candidates that completed a handshake with us (a probe, or their call)."""
        self.unreachable: set[PeerId] = set()
        """Candidates whose probe failed: not elected or called until they call us or
        announce a new record."""
        self.probing: set[PeerId] = set()
        """Probes in flight."""
        self.inconclusive: set[PeerId] = set()
        """Candidates whose last probe proved nothing (busy, timed out): probed again by the
        PROBE timer, but no call is held for them."""
        self.strikes: dict[PeerId, int] = {}
        """Inconclusive probes in a row that count (:data:`MAX_STRIKES`)."""
        self.held: dict[PeerId, bytes] = {}
        """Calls (caller -> run ID) answered once the probes of the unproven candidates
        below the caller are done: they are the only reason not to follow it."""
        self.settled = False
        """No new candidate appeared for ``settle`` seconds (with enough candidates)."""
        self.leader: PeerId | None = None
        """The leader we follow, offered to or acknowledged (or ourselves, leading)."""
        self.run_id: bytes | None = None
        self.epoch = -1
        self.digest: bytes | None = None
        self.called: set[PeerId] = set()
        """Leading: candidates called and not yet answered."""
        self.offers: set[PeerId] = set()
        """Leading: candidates that offered; proposing: the members of the view."""
        self.acked: set[PeerId] = set()
        self.in_view: set[PeerId] = set()
        """Proposing: the members (besides us) of the view being acknowledged."""
        self.lower: set[PeerId] = set()
        """Leading: lower leaders our candidates follow."""
        self.joined: Joined | None = None
        self.failure: str | None = None
        # The draw (fedup.protocol.draw): round 1 draws the leader, round 2 forms under it.
        self.spent: set[PeerId] = set()
        """Coordinators whose roster we revealed for (ourselves too, once a roster of ours
        was sent): each coordinates at most one draw with us, so nobody gets to look at
        draw after draw."""
        self.commits: dict[PeerId, bytes] = {}
        """Coordinating: the candidates' draw commitments."""
        self.reveals: dict[PeerId, bytes] = {}
        """Coordinating: the reveals for the roster being acknowledged."""
        self.sent_roster = False
        """Coordinating: a roster of this run went out (we may have seen reveals)."""
        self.roster: Roster | None = None
        """Member of round 1: the roster we acknowledged."""
        self.revealed: bytes | None = None
        """The digest of the last roster we revealed for (or coordinated): a leader that
        shows the proof of its draw is followed."""
        self.drawn: Drawn | None = None
        """Round 2: the draw that chose our leader (None: round 1, drawing)."""

    # --- the public face --------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Apply ``event`` and return what to do; never raises for input."""
        if isinstance(event, ConnectionLost):
            self.held.pop(event.peer, None)  # a caller that hung up needs no answer
        name = TRANSITIONS[self.stage].get(type(event))
        if name is None:
            return [
                self._ignored(event, f"{type(event).__name__} is not taken when {self.stage.value}")
            ]
        actions: list[Action] = getattr(self, name)(event)
        return actions

    @property
    def electorate(self) -> set[PeerId]:
        """Who may lead, as we see it: the candidates and us, minus those we skip."""
        return (self.candidates - self.ignored - self.distrusted - self.unreachable) | {self.me}

    def found(self) -> int:
        """Peers known (us included), for the give-up message."""
        return len(self.candidates - self.distrusted) + 1

    # --- settling and electing ------------------------------------------------------------

    def _start(self, event: Start) -> list[Action]:
        return [
            SetTimer(GIVE_UP, self.limits.peer_wait_timeout),
            SetTimer(SETTLE, self.settle),
            SetTimer(SETTLE_MAX, self.limits.formation_timeout),
        ]

    def _seen(self, event: PeerSeen) -> list[Action]:
        return self._quiet_again() if self._candidate(event.peer) else []

    def _seen_many(self, event: PeersSeen) -> list[Action]:
        new = [peer for peer in event.peers if self._candidate(peer)]
        return self._quiet_again() if new else []

    def _candidate(self, peer: PeerId) -> bool:
        """Note a verified record of ``peer``; True if it is a new candidate."""
        # Every member notes every other's record (N^2 calls in a simulation): the sets
        # are empty while settling, and a peer ID's hash is a Python call.
        if self.unreachable:
            self.unreachable.discard(peer)  # a new record: worth another probe
        if self.inconclusive:
            self.inconclusive.discard(peer)
        if self.strikes:
            self.strikes.pop(peer, None)
        if peer in self.candidates or peer.raw == self.me.raw:
            return False
        self.candidates.add(peer)
        return True

    def _quiet_again(self) -> list[Action]:
        """A new candidate: settling waits for quiet from now."""
        if self.stage is Stage.SETTLING:
            self.settled = False
            return [SetTimer(SETTLE, self.settle)]
        return []

    def _lost(self, event: PeerLost) -> list[Action]:
        self.candidates.discard(event.peer)
        self.unreachable.discard(event.peer)  # (a new record would clear these anyway)
        self.inconclusive.discard(event.peer)
        self.strikes.pop(event.peer, None)
        return []

    def _timer(self, event: TimerFired) -> list[Action]:
        name = event.name
        if name == GIVE_UP:
            return self._give_up()
        if name == SETTLE and self.stage is Stage.SETTLING:
            self.settled = True
            return self._elect()
        if name == SETTLE_MAX and self.stage is Stage.SETTLING and not self.settled:
            # New candidates keep appearing (a stranger can mint a record every few
            # seconds): settling is not put off past formation_timeout for them.
            self.settled = True
            note = Note(
                "info",
                f"new candidates kept appearing for {self.limits.formation_timeout:g} s; "
                "electing now",
            )
            return [note, CancelTimer(SETTLE), *self._elect()]
        if name == FOLLOW and self.stage is Stage.FOLLOWING and self.leader is not None:
            silent = self.leader
            self.ignored.add(silent)
            self.leader = None
            self.drawn = None
            self.stage = Stage.SETTLING
            return [
                Note(
                    "warning",
                    f"{silent} did not call within "
                    f"{self.limits.formation_timeout:g} s; electing again without it",
                ),
                *self._elect(),
            ]
        if name == PROBE and self.stage is Stage.FOLLOWING:
            return self._probe()
        if name == HELD:
            return self._answer_held(force=True)
        if name == CALLS and self.stage is Stage.LEADING:
            return self._calls_done()
        if name == ACKS and self.stage is Stage.PROPOSING:
            return self._acks_done()
        if name in (VIEW_DUE, COMMIT_DUE) and self.stage in (Stage.OFFERED, Stage.ACKED):
            assert self.leader is not None
            return self._back_to_settling(
                f"{self.leader} sent no {'view' if name == VIEW_DUE else 'commit'} in time",
                distrust=None,
            )
        return [self._ignored(event, f"timer {name!r} is stale when {self.stage.value}")]

    def _give_up(self) -> list[Action]:
        if self.stage in (Stage.JOINED, Stage.FAILED):
            return []
        found = self.found()
        wait = self.limits.peer_wait_timeout
        if found < self.min_peers:
            why = (
                f"no federation formed within {wait:g} s: found {found} of the "
                f"{self.min_peers} peers needed (this one included)"
            )
        else:
            why = (
                f"no federation formed within {wait:g} s although {found} peers were "
                "found; see the log for why"
            )
        return self._fail(why)

    def _fail(self, why: str) -> list[Action]:
        actions: list[Action] = self._release_candidates(RefusalCode.GIVEN_UP, "formation failed")
        actions += self._leave_leader()
        self.stage = Stage.FAILED
        self.failure = why
        held = self._answer_held(force=True)  # callers we held get their refusal now
        return [*actions, *self._cancel_all(), *held, Failed(why)]

    def _cancel_all(self) -> list[Action]:
        return [CancelTimer(n) for n in TIMERS]

    def _elect(self) -> list[Action]:
        """Settled: coordinate a draw if we are the lowest coordinator left, else expect that
        one to call."""
        if not self.settled or len(self.electorate) < self.min_peers:
            return []
        coordinators = self.electorate - self.spent
        if not coordinators:  # every one of them coordinated a draw with us: start afresh
            self.spent.clear()
            coordinators = self.electorate
        leader = min(coordinators)
        if leader == self.me:
            return self._lead()
        self.stage = Stage.FOLLOWING
        self.leader = leader
        return [
            Note("info", f"waiting for {leader} to call"),
            SetTimer(FOLLOW, self.limits.formation_timeout),
            SetTimer(PROBE, self.settle),
        ]

    def _unproven_below(self, peer: PeerId, *, holding: bool = False) -> list[PeerId]:
        """The candidates we would rather follow than ``peer`` that never proved
        themselves, lowest first (``holding``: not those whose last probe proved nothing,
        which no call waits for)."""
        skip = self.proven | self.inconclusive if holding else self.proven
        return sorted(p for p in self.electorate - {self.me} if p < peer and p not in skip)

    def _probe_some(self, peers: list[PeerId]) -> list[Action]:
        """Probe the lowest ``MAX_PROBES`` of ``peers`` that are not being probed already
        (none: every one of them is)."""
        todo = [p for p in peers if p not in self.probing][:MAX_PROBES]
        self.probing.update(todo)
        return [Probe(tuple(todo))] if todo else []

    def _probe(self) -> list[Action]:
        """Still following after ``settle``: check the unproven candidates below us."""
        lower = self._unproven_below(self.me)
        if not lower:
            return []
        return [*self._probe_some(lower), SetTimer(PROBE, self.settle)]

    def _probed(self, event: ProbeDone) -> list[Action]:
        peer = event.peer
        self.probing.discard(peer)
        actions: list[Action] = []
        if event.alive:
            self.proven.add(peer)
            self.inconclusive.discard(peer)
            self.strikes.pop(peer, None)
        elif peer not in self.candidates or peer in self.proven:
            pass  # it proved itself meanwhile (it called us)
        elif event.alive is None and not event.strike:
            self.inconclusive.add(peer)  # busy: proves nothing, costs nothing
        elif event.alive is None and self.strikes.get(peer, 0) + 1 < MAX_STRIKES:
            self.strikes[peer] = self.strikes.get(peer, 0) + 1
            self.inconclusive.add(peer)
        else:
            self.unreachable.add(peer)
            self.inconclusive.discard(peer)
            self.strikes.pop(peer, None)
            actions.append(
                Note("warning", f"candidate {peer} failed its probe ({event.why}); leaving it out")
            )
            if self.stage is Stage.FOLLOWING and self.leader == peer:
                self.leader = None
                self.drawn = None
                self.stage = Stage.SETTLING
                actions += [CancelTimer(FOLLOW), CancelTimer(PROBE), *self._elect()]
        return actions + self._answer_held()

    def _hold_for(self, caller: PeerId) -> list[PeerId]:
        """The candidates a call from ``caller`` waits on: the unproven ones (not found
        inconclusive) below both the caller and us, and below every proven candidate there
        (the answer cannot name anyone lower than those)."""
        cut = min(self.me, caller)
        proven = [p for p in self.proven & self.electorate if p < cut]
        if proven:
            cut = min(proven)
        return self._unproven_below(cut, holding=True)

    def _answer_held(self, *, force: bool = False) -> list[Action]:
        """Answer the held calls whose probes are all done (all of them with ``force``,
        the caller's patience being half spent)."""
        actions: list[Action] = []
        for caller, run_id in list(self.held.items()):
            if force or not self.probing.intersection(self._hold_for(caller)):
                del self.held[caller]
                actions += self._answer_call(caller, run_id, may_hold=False)
                if not self.held:
                    actions.append(CancelTimer(HELD))
        return actions

    # --- leading ------------------------------------------------------------------------

    def _lead(self) -> list[Action]:
        """Call the candidates: for a draw (round 1), or for their summaries (round 2)."""
        if self.drawn is None:
            peers = tuple(sorted(self.candidates - self.distrusted - self.unreachable))
            note = f"coordinating a draw among {len(peers) + 1} candidates (I am {self.me})"
        else:
            peers = tuple(sorted(self.drawn.members - {self.me}))
            note = f"the draw chose me ({self.me}) to lead {len(peers) + 1} members"
        self.stage = Stage.LEADING
        self.leader = self.me
        self.run_id = self._new_run_id()
        self.epoch = -1
        self.called = set(peers)
        self.offers, self.acked, self.lower = set(), set(), set()
        self.commits, self.reveals, self.sent_roster = {}, {}, False
        notes: list[Action] = [Note("info", note)]
        if not peers:
            return [*notes, *self._calls_done()]
        roster = self.drawn.roster if self.drawn is not None else None
        return [*notes, Call(self.run_id, peers, roster), SetTimer(CALLS, self.limits.call_timeout)]

    def _answered(self, peer: PeerId, run_id: bytes) -> bool:
        if run_id != self.run_id or peer not in self.called:
            return False
        self.called.discard(peer)
        return True

    def _offer(self, event: OfferArrived) -> list[Action]:
        if not self._answered(event.peer, event.run_id):
            return [self._ignored(event, "not an answer to a call of ours")]
        if event.problem is not None:
            return [
                Note("warning", f"{event.peer} sent an unusable summary: {event.problem}"),
                SendRefuse(event.peer, event.run_id, RefusalCode.MISFIT, event.problem),
                Close(event.peer),
                *self._maybe_calls_done(),
            ]
        if self.drawn is None:
            if event.commit is None:
                return [
                    Note("warning", f"{event.peer} answered a draw's call without a commitment"),
                    SendRefuse(event.peer, event.run_id, RefusalCode.MALFORMED, "no commitment"),
                    Close(event.peer),
                    *self._maybe_calls_done(),
                ]
            self.commits[event.peer] = event.commit
        self.offers.add(event.peer)
        return self._maybe_calls_done()

    def _follow(self, event: FollowArrived) -> list[Action]:
        if event.peer not in self.called:
            return [self._ignored(event, "not an answer to a call of ours")]
        self.called.discard(event.peer)
        actions: list[Action] = [Close(event.peer)]
        # A lower peer we already found silent (or distrust) does not make us stand down:
        # its followers will find it silent too, and our next call will find them free.
        if (
            self.drawn is None
            and event.leader < self.me
            and event.leader not in (self.distrusted | self.ignored | self.unreachable | self.spent)
        ):
            self.lower.add(event.leader)
            self.candidates.add(event.leader)
            actions.append(Note("info", f"{event.peer} follows {event.leader}, lower than us"))
        return actions + self._maybe_calls_done()

    def _refused_call(self, event: RefuseArrived) -> list[Action]:
        if event.peer not in self.called:
            return [self._ignored(event, "not an answer to a call of ours")]
        self.called.discard(event.peer)
        return [
            Note("info", f"{event.peer} declined the call ({event.code.value}): {event.reason}"),
            Close(event.peer),
            *self._maybe_calls_done(),
        ]

    def _call_failed(self, event: CallFailed) -> list[Action]:
        if event.peer not in self.called:
            return [self._ignored(event, "not a call of ours")]
        self.called.discard(event.peer)
        return [
            Note("warning", f"call to {event.peer} failed: {event.why}"),
            *self._maybe_calls_done(),
        ]

    def _candidate_lost(self, event: ConnectionLost) -> list[Action]:
        if event.peer not in self.called | self.offers:
            return [self._ignored(event, "not a candidate of ours")]
        self.called.discard(event.peer)
        was_member = event.peer in self.offers
        self.offers.discard(event.peer)
        self.acked.discard(event.peer)
        actions: list[Action] = []
        if was_member:
            actions.append(Note("warning", f"{event.peer} left while forming: {event.why}"))
        if self.stage is Stage.LEADING:
            return actions + self._maybe_calls_done()
        return actions + self._maybe_acks_done()

    def _maybe_calls_done(self) -> list[Action]:
        return self._calls_done() if not self.called else []

    def _calls_done(self) -> list[Action]:
        assert self.run_id is not None
        actions: list[Action] = [CancelTimer(CALLS)]
        for peer in sorted(self.called):  # silent: they are not in the proposal
            actions += [Note("warning", f"{peer} did not answer the call in time"), Close(peer)]
        self.called.clear()
        if self.lower:
            lower = min(self.lower)
            actions += self._release_candidates(RefusalCode.GIVEN_UP, "the leader stood down")
            self.stage = Stage.FOLLOWING
            self.leader = lower
            return [
                *actions,
                Note("info", f"standing down: following {lower}"),
                SetTimer(FOLLOW, self.limits.formation_timeout),
                SetTimer(PROBE, self.settle),
            ]
        if len(self.offers) + 1 < self.min_peers:
            actions.append(
                Note(
                    "warning",
                    f"only {len(self.offers) + 1} peers answered, "
                    f"{self.min_peers} needed; trying again",
                )
            )
            actions += self._release_candidates(RefusalCode.GIVEN_UP, "too few peers answered")
            return actions + self._settle_again()
        if self.drawn is None and not self.offers:  # alone (min_peers 1): nothing to draw
            return actions + self._drawn(Drawn(self.me, frozenset({self.me}), b""))
        self.stage = Stage.PROPOSING
        self.epoch = 0
        return [*actions, self._propose()]

    def _propose(self) -> Propose:
        assert self.run_id is not None
        self.reveals = {}
        if self.drawn is None:
            commits = tuple(sorted((p, self.commits[p]) for p in self.offers))
            return Propose(self.run_id, self.epoch, frozenset(self.offers), commits)
        return Propose(self.run_id, self.epoch, frozenset(self.offers))

    def _sign_again(self, why: str) -> list[Action]:
        """Sign the proposal again without the members gone (a roster at most once)."""
        if self.drawn is None and self.epoch >= MAX_ROSTER_EPOCH:
            actions = self._release_candidates(RefusalCode.GIVEN_UP, f"the draw failed: {why}")
            self._settle_again()
            self.settled = True  # we had settled before: elect again at once
            return [
                Note("warning", f"giving the draw up ({why}); another peer coordinates the next"),
                *actions,
                *self._elect(),
            ]
        self.epoch += 1
        self.digest = None
        return [self._propose()]

    def _view_ready(self, event: ViewReady) -> list[Action]:
        if event.run_id != self.run_id or event.epoch != self.epoch:
            return [self._ignored(event, "not the view being proposed")]
        actions: list[Action] = []
        for peer, why in event.refused:
            if peer in self.offers:
                self.offers.discard(peer)
                actions += [
                    Note("warning", f"refusing {peer}: {why}"),
                    SendRefuse(peer, event.run_id, RefusalCode.MISFIT, why),
                    Close(peer),
                ]
        left_out = self.offers - event.members
        for peer in sorted(left_out):
            self.offers.discard(peer)
            actions += [
                SendRefuse(peer, event.run_id, RefusalCode.GIVEN_UP, "left out of the view"),
                Close(peer),
            ]
        if len(self.offers) + 1 < self.min_peers:
            actions += self._release_candidates(RefusalCode.GIVEN_UP, "the proposal was given up")
            return actions + self._settle_again()
        if event.members - self.offers:  # a member left while we signed: sign again
            return actions + self._sign_again("a member left while the roster was signed")
        self.digest = event.digest
        self.acked = set()
        self.in_view = set(event.members)
        if self.drawn is None:
            self.sent_roster = True
        actions += [SendView(p, event.epoch) for p in sorted(self.offers)]
        if not self.offers:
            return actions + self._commit_view()
        return [*actions, SetTimer(ACKS, self.limits.view_timeout)]

    def _ack(self, event: AckArrived) -> list[Action]:
        if (event.run_id, event.epoch, event.digest) != (self.run_id, self.epoch, self.digest):
            return [self._ignored(event, f"acknowledges epoch {event.epoch}, not ours")]
        if event.peer not in self.offers:
            return [self._ignored(event, "not a member of the view")]
        if self.drawn is None:
            commit = self.commits[event.peer]
            if event.reveal is None or not reveal_matches(commit, self.epoch, event.reveal):
                self.offers.discard(event.peer)
                return [
                    Note("warning", f"{event.peer}'s reveal does not open its commitment"),
                    SendRefuse(event.peer, event.run_id, RefusalCode.MALFORMED, "bad reveal"),
                    Close(event.peer),
                    *self._maybe_acks_done(),
                ]
            self.reveals[event.peer] = event.reveal
        self.acked.add(event.peer)
        return self._maybe_acks_done()

    def _refused_view(self, event: RefuseArrived) -> list[Action]:
        if event.peer not in self.offers:
            return [self._ignored(event, "not a member of the view")]
        self.offers.discard(event.peer)
        self.acked.discard(event.peer)
        return [
            Note("warning", f"{event.peer} refused the view ({event.code.value}): {event.reason}"),
            Close(event.peer),
            *self._maybe_acks_done(),
        ]

    def _maybe_acks_done(self) -> list[Action]:
        if self.stage is Stage.PROPOSING and self.digest is not None and self.acked >= self.offers:
            return self._acks_done()
        return []

    def _acks_done(self) -> list[Action]:
        actions: list[Action] = [CancelTimer(ACKS)]
        if self.acked == self.in_view:
            return actions + self._commit_view()
        for peer in sorted(self.offers - self.acked):
            actions += [Note("warning", f"{peer} did not acknowledge the view"), Close(peer)]
        self.offers = set(self.acked)
        if len(self.offers) + 1 < self.min_peers:
            actions += self._release_candidates(RefusalCode.GIVEN_UP, "the proposal was given up")
            return actions + self._settle_again()
        return actions + self._sign_again("members did not acknowledge")

    def _commit_view(self) -> list[Action]:
        assert self.run_id is not None and self.digest is not None
        if self.drawn is not None:
            actions: list[Action] = [
                SendCommit(p, self.run_id, self.epoch, self.digest) for p in sorted(self.offers)
            ]
            actions += [Close(p) for p in sorted(self.offers)]
            return actions + self._join(self.me)
        # Round 1: every candidate revealed; the draw is done.
        roster = Roster(
            self.run_id,
            self.epoch,
            self.me,
            tuple(sorted((p, self.commits[p]) for p in self.in_view)),
        )
        try:
            leader = draw_leader(roster, self.reveals)
        except DrawError as exc:  # cannot happen: every reveal was checked when it came
            return self._sign_again(exc.reason)
        reveals = tuple(sorted(self.reveals.items()))
        actions = [
            SendCommit(p, self.run_id, self.epoch, self.digest, reveals, leader)
            for p in sorted(self.offers)
        ]
        actions += [Close(p) for p in sorted(self.offers)]
        drawn = Drawn(leader, roster.member_ids, self.digest)
        self._end_coordination()
        return actions + self._drawn(drawn)

    def _end_coordination(self) -> None:
        """Our draw ends (done or given up): we coordinate none again with these peers."""
        if self.drawn is None and self.leader == self.me and self.sent_roster:
            self.spent.add(self.me)
        self.sent_roster = False

    def _drawn(self, drawn: Drawn) -> list[Action]:
        """The draw is done: lead round 2, or wait for the drawn leader to call."""
        self.drawn = drawn
        self.revealed = drawn.roster
        self.roster = None
        self.run_id, self.digest, self.epoch = None, None, -1
        self.offers, self.called, self.acked, self.lower = set(), set(), set(), set()
        self.commits, self.reveals = {}, {}
        timers: list[Action] = [CancelTimer(t) for t in (PROBE, VIEW_DUE, COMMIT_DUE, CALLS, ACKS)]
        note = Note("info", f"the draw among {len(drawn.members)} chose {drawn.leader} to lead")
        if drawn.leader == self.me:
            return [note, *timers, *self._lead()]
        self.stage = Stage.FOLLOWING
        self.leader = drawn.leader
        return [note, *timers, SetTimer(FOLLOW, self.limits.formation_timeout)]

    def _release_candidates(self, code: RefusalCode, why: str) -> list[Action]:
        """Leading: tell every candidate still held that the proposal is off."""
        if self.leader != self.me or self.run_id is None:
            return []
        held = sorted(self.offers | self.called)
        self.offers, self.called, self.acked = set(), set(), set()
        self._end_coordination()
        actions: list[Action] = []
        for peer in held:
            actions += [SendRefuse(peer, self.run_id, code, why), Close(peer)]
        return actions

    def _settle_again(self) -> list[Action]:
        self._end_coordination()
        self.stage = Stage.SETTLING
        self.leader = None
        self.drawn = None
        self.roster = None
        self.run_id = None
        self.digest = None
        self.epoch = -1
        self.settled = False
        return [SetTimer(SETTLE, self.settle), SetTimer(SETTLE_MAX, self.limits.formation_timeout)]

    # --- answering a call ---------------------------------------------------------------

    def _call(self, event: CallArrived) -> list[Action]:
        caller = event.leader
        self.proven.add(caller)  # it authenticated to call
        self.unreachable.discard(caller)
        self.inconclusive.discard(caller)
        self.strikes.pop(caller, None)
        if event.roster is not None:
            return self._drawn_call(caller, event.run_id, event.roster)
        return self._answer_call(caller, event.run_id, may_hold=True)

    def _refusal(self, caller: PeerId, run_id: bytes) -> SendRefuse | None:
        """Why any call from ``caller`` is refused now, or None."""
        no = SendRefuse(caller, run_id, RefusalCode.COMMITTED, "", inbound=True)
        if self.stage is Stage.JOINED:
            return attrs.evolve(no, reason="already training in another run")
        if self.stage is Stage.FAILED:
            return attrs.evolve(no, code=RefusalCode.GIVEN_UP, reason="formation failed here")
        if caller in self.distrusted:
            return attrs.evolve(
                no, code=RefusalCode.BAD_VIEW, reason="your earlier view broke the rules"
            )
        return None

    def _drawn_call(self, caller: PeerId, run_id: bytes, roster: bytes) -> list[Action]:
        """A call from the leader a draw chose (the driver checked the proof it showed)."""
        refusal = self._refusal(caller, run_id)
        if refusal is not None:
            return [refusal]
        if roster != self.revealed:
            reason = "a draw I did not reveal for (or not my latest)"
            return [SendRefuse(caller, run_id, RefusalCode.COMMITTED, reason, inbound=True)]
        actions: list[Action] = []
        if self.stage in (Stage.OFFERED, Stage.ACKED):
            if self.drawn is not None and caller == self.leader and run_id == self.run_id:
                return [self._ignored(CallArrived(caller, run_id, roster), "called twice")]
            if self.drawn is not None and caller != self.leader:
                reason = f"already in the federation of {self.leader}"
                return [SendRefuse(caller, run_id, RefusalCode.COMMITTED, reason, inbound=True)]
            if caller != self.leader:  # (its new call replaced its old connection)
                actions += self._leave_leader()  # a coordinator's round we were part of
        if self.stage in (Stage.LEADING, Stage.PROPOSING):
            actions.append(Note("info", f"{caller} was drawn to lead: standing down"))
            actions += self._release_candidates(RefusalCode.GIVEN_UP, "the leader stood down")
            actions += [CancelTimer(CALLS), CancelTimer(ACKS)]
        if self.drawn is None or self.drawn.leader != caller:
            self.drawn = Drawn(caller, frozenset(), roster)
        return actions + self._follow_caller(caller, run_id)

    def _answer_call(self, caller: PeerId, run_id: bytes, *, may_hold: bool) -> list[Action]:
        no = [SendRefuse(caller, run_id, RefusalCode.COMMITTED, "", inbound=True)]
        refusal = self._refusal(caller, run_id)
        if refusal is not None:
            return [refusal]
        if self.drawn is not None:
            reason = f"bound to the draw that chose {self.drawn.leader}"
            return [attrs.evolve(no[0], reason=reason)]
        if caller in self.spent:
            reason = "you coordinated a draw with me already: the next coordinator calls"
            return [attrs.evolve(no[0], reason=reason)]
        if self.stage in (Stage.OFFERED, Stage.ACKED):
            if caller == self.leader and run_id != self.run_id:
                # Our leader starts a new proposal (it gave the old one up): take part.
                return self._follow_caller(caller, run_id)
            return [attrs.evolve(no[0], reason=f"already in the federation of {self.leader}")]
        lowest = min((self.electorate - self.spent) | {caller})
        if caller != lowest:
            waits_on = self._hold_for(caller) if may_hold else []
            if waits_on:
                # Candidates that never proved themselves stand before the caller (it just
                # did): probe them, and answer within half the caller's patience.
                timer = [] if self.held else [SetTimer(HELD, self.limits.call_timeout / 2)]
                self.held[caller] = run_id
                return timer + (self._probe_some(waits_on) or self._answer_held())
            return [AnswerFollow(caller, run_id, lowest)]
        actions: list[Action] = []
        if self.stage in (Stage.LEADING, Stage.PROPOSING):
            actions.append(Note("info", f"{caller} is lower and called: standing down"))
            actions += self._release_candidates(RefusalCode.GIVEN_UP, "the leader stood down")
            actions += [CancelTimer(CALLS), CancelTimer(ACKS)]
        return actions + self._follow_caller(caller, run_id)

    def _follow_caller(self, leader: PeerId, run_id: bytes) -> list[Action]:
        self.stage = Stage.OFFERED
        self.leader = leader
        self.run_id = run_id
        self.epoch = -1
        self.digest = None
        self.roster = None
        self.candidates.add(leader)
        self.ignored.discard(leader)
        return [
            CancelTimer(FOLLOW),
            CancelTimer(PROBE),
            CancelTimer(SETTLE),
            AnswerOffer(leader, run_id, draw=self.drawn is None),
            SetTimer(VIEW_DUE, self.limits.call_timeout + self.limits.view_timeout),
        ]

    def _view(self, event: ViewArrived) -> list[Action]:
        if event.leader != self.leader:
            return [self._ignored(event, "a view from a peer we do not follow")]
        problem = event.problem
        if problem is None and event.run_id != self.run_id:
            problem = "the view is not for the run we were called to"
        if problem is None and event.epoch <= self.epoch:
            problem = f"view epoch {event.epoch} after epoch {self.epoch}"
        if problem is None:
            problem = self._roster_problem(event)
        if problem is not None:
            code = RefusalCode.MISFIT if event.ours else RefusalCode.BAD_VIEW
            refuse = SendRefuse(event.leader, event.run_id, code, problem, inbound=True)
            if event.ours:
                return [
                    refuse,
                    Close(event.leader, inbound=True),
                    *self._fail(f"cannot join the view of {event.leader}: {problem}"),
                ]
            return [
                refuse,
                Close(event.leader, inbound=True),
                *self._back_to_settling(
                    f"the view of {event.leader} breaks the rules: {problem}", distrust=event.leader
                ),
            ]
        self.stage = Stage.ACKED
        self.epoch = event.epoch
        self.digest = event.digest
        if event.roster is not None:  # we reveal with the ack: this coordinator is spent
            self.roster = event.roster
            self.revealed = event.digest
            self.spent.add(event.leader)
        return [
            CancelTimer(VIEW_DUE),
            SendAck(event.leader, event.run_id, event.epoch, event.digest),
            SetTimer(COMMIT_DUE, self.limits.view_timeout * 2),
        ]

    def _roster_problem(self, event: ViewArrived) -> str | None:
        """Why a roster (or a view) is not what this round takes, or None."""
        roster = event.roster
        if self.drawn is not None:
            return "a draw roster after the draw" if roster is not None else None
        if roster is None:
            return "a view before the draw (a roster was due)"
        if (roster.run_id, roster.epoch, roster.coordinator) != (
            event.run_id,
            event.epoch,
            event.leader,
        ):
            return "the roster does not match its run, epoch or coordinator"
        if self.roster is not None and not roster.member_ids <= self.roster.member_ids:
            return "the roster signed again adds members"
        return None

    def _commit(self, event: CommitArrived) -> list[Action]:
        if (event.leader, event.run_id, event.epoch, event.digest) != (
            self.leader,
            self.run_id,
            self.epoch,
            self.digest,
        ):
            return [self._ignored(event, "commits another view than the one we acknowledged")]
        if self.drawn is not None:
            return [Close(event.leader, inbound=True), *self._join(event.leader)]
        assert self.roster is not None and self.digest is not None
        try:
            leader, members = _draw(self.roster, event.reveals or ())
        except DrawError as exc:
            return [
                Close(event.leader, inbound=True),
                *self._back_to_settling(
                    f"the draw of {event.leader} is invalid: {exc.reason}", distrust=event.leader
                ),
            ]
        drawn = Drawn(leader, members, self.digest)
        return [Close(event.leader, inbound=True), *self._drawn(drawn)]

    def _ring_blob(self, event: RingBlobArrived) -> list[Action]:
        if self.drawn is None or (event.run_id, event.digest) != (self.run_id, self.digest):
            return [self._ignored(event, "a blob of another view")]
        assert self.leader is not None
        return [
            Note("info", f"a ring blob from {event.sender} shows the view holds"),
            *self._join(self.leader),
        ]

    def _join(self, leader: PeerId) -> list[Action]:
        assert self.run_id is not None and self.digest is not None
        self.stage = Stage.JOINED
        self.joined = Joined(leader, self.run_id, self.epoch, self.digest)
        return [*self._cancel_all(), *self._answer_held(force=True), self.joined]

    def _leader_refused(self, event: RefuseArrived) -> list[Action]:
        if event.peer != self.leader:
            return [self._ignored(event, "a refusal from a peer we do not follow")]
        if event.code is RefusalCode.MISFIT and self.stage is Stage.OFFERED:
            return self._fail(f"{event.peer} refused us: {event.reason}")
        return self._back_to_settling(
            f"{event.peer} gave the proposal up ({event.code.value}): {event.reason}",
            distrust=None,
        )

    def _leader_lost(self, event: ConnectionLost) -> list[Action]:
        if event.peer != self.leader:
            return [self._ignored(event, "not our leader's connection")]
        if self.stage is Stage.ACKED and self.drawn is not None:
            # The commit may be on its way or lost with the connection: the run's
            # first blob will show whether the view holds (COMMIT_DUE bounds it).
            live = self.limits.hop_timeout * (len(self.candidates) + 2)
            return [
                Note(
                    "info",
                    f"lost the connection to {event.peer} after acknowledging "
                    f"({event.why}); the run's first blob will show whether the view holds",
                ),
                SetTimer(COMMIT_DUE, live),
            ]
        return self._back_to_settling(
            f"{event.peer} went silent while forming: {event.why}", distrust=None
        )

    def _leave_leader(self) -> list[Action]:
        """Member side: close the connection of the leader we offered to or acknowledged."""
        if self.stage in (Stage.OFFERED, Stage.ACKED) and self.leader not in (None, self.me):
            assert self.leader is not None
            return [Close(self.leader, inbound=True)]
        return []

    def _back_to_settling(self, why: str, *, distrust: PeerId | None) -> list[Action]:
        if distrust is not None:
            self.distrusted.add(distrust)
        actions: list[Action] = [
            Note("warning", why),
            *self._leave_leader(),
            CancelTimer(VIEW_DUE),
            CancelTimer(COMMIT_DUE),
        ]
        self._settle_again()
        self.settled = True  # we had settled before: elect again at once
        return actions + self._elect()

    def _ignored(self, event: object, why: str) -> Ignored:
        return Ignored(type(event).__name__, self.stage, why)
