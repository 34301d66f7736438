"""The ring all-reduce machine, driven in memory: N members, no sockets, a virtual clock.

The driver here is a small pure-Python one: it keeps each member's vector in an
``array('f')``, answers :class:`Reduce` with ``received + own`` in float32, and
delivers each link's messages in order (interleaved at random between links, from
a seed).  The expected result is computed independently with numpy float32, in the
order the schedule adds the contributions.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.identity import Identity
from fedup.protocol.allreduce import (
    TRANSITIONS,
    Abandon,
    Action,
    AllReduceMachine,
    Begin,
    CancelTimer,
    Done,
    Event,
    Failed,
    FailureKind,
    Ignored,
    MessageArrived,
    Reduce,
    Reduced,
    Refused,
    Send,
    SetTimer,
    Stage,
    Store,
    TimerFired,
)
from fedup.protocol.allreduce_messages import (
    MESSAGE_OVERHEAD,
    ChunkMessage,
    ChunkPlan,
    Phase,
    Refusal,
    chunk_digest,
    decode_chunk_message,
    result_digest,
    sign_chunk,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.ring import ring_order

RUN = bytes(range(16))
EPOCH, ROUND, ATTEMPT = 3, 7, 1
IDENTITIES = [Identity(bytes([i + 1]) * 32) for i in range(8)]
STRANGER = Identity(b"\x99" * 32)
TIMEOUT = DEFAULT_LIMITS.allreduce_step_timeout


def ordered(n: int) -> list[Identity]:
    """``n`` identities in ring order."""
    by_id = {i.peer_id: i for i in IDENTITIES[:n]}
    return [by_id[p] for p in ring_order(by_id)]


def contribution(seed: int, params: int) -> tuple[array[float], int]:
    """``weight x params`` followed by the weight (the parallel mode's convention)."""
    rng = random.Random(seed)
    weight = rng.randint(1, 1000)
    values = array("f", [weight * rng.uniform(-2.0, 2.0) for _ in range(params)])
    values.append(float(weight))
    return values, weight


def expected_sum(vectors: list[array[float]]) -> bytes:
    """Chunk ``c`` is summed as the schedule does: members c+1, c+2, ..., c-1, then c."""
    n = len(vectors)
    plan = ChunkPlan(len(vectors[0]), n)
    out = np.zeros(len(vectors[0]), dtype="<f4")
    for c in range(n):
        start, stop = plan.span(c)
        order = [(c + 1 + j) % n for j in range(n)]
        acc = np.frombuffer(vectors[order[0]].tobytes(), dtype="<f4")[start:stop].copy()
        for m in order[1:]:
            acc = acc + np.frombuffer(vectors[m].tobytes(), dtype="<f4")[start:stop]
        out[start:stop] = acc
    return out.tobytes()


Tamper = Callable[["World", int, PeerId, bytes], list[tuple[PeerId, bytes]]]


class World:
    """N machines and an in-memory ring; links keep their order, links interleave."""

    def __init__(
        self,
        n: int,
        params: int,
        *,
        seed: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        silent: frozenset[int] = frozenset(),
        join_wait: float | None = None,
    ) -> None:
        self.ids = ordered(n)
        self.peers = [i.peer_id for i in self.ids]
        self.rng = random.Random(seed)
        self.now = 0.0
        self.vectors = [contribution(seed * 100 + i, params)[0] for i in range(n)]
        self.length = params + 1
        self.machines = [
            AllReduceMachine(
                ident,
                run_id=RUN,
                epoch=EPOCH,
                round=ROUND,
                attempt=ATTEMPT,
                members=list(reversed(self.peers)),  # any order: the machine sorts
                length=self.length,
                limits=limits,
                join_wait=join_wait,
            )
            for ident in self.ids
        ]
        self.results = [array("f", bytes(4 * self.length)) for _ in range(n)]
        self.links: dict[int, deque[tuple[PeerId, bytes]]] = {i: deque() for i in range(n)}
        self.reduces: dict[int, Reduce] = {}
        self.to_begin = [i for i in range(n) if i not in silent]
        self.outcomes: dict[int, Done | Failed] = {}
        self.refused: list[tuple[int, Refused]] = []
        self.sent_payload = [0] * n
        self.sends: list[list[Send]] = [[] for _ in range(n)]
        self.timers: dict[int, float] = {}
        self.delivered: dict[int, list[tuple[PeerId, bytes]]] = {i: [] for i in range(n)}
        self.log: list[tuple[int, float, Event, list[Action]]] = []

    def feed(self, i: int, event: Event) -> list[Action]:
        actions = self.machines[i].handle(event, self.now)
        self.log.append((i, self.now, event, actions))
        for action in actions:
            if isinstance(action, Send):
                to = self.peers.index(action.to)
                assert action.to == self.machines[i].successor
                self.links[to].append((self.peers[i], action.data))
                self.sends[i].append(action)
                self.sent_payload[i] += len(
                    decode_chunk_message(action.data, max_payload=1 << 30).data
                )
            elif isinstance(action, Reduce):
                assert i not in self.reduces
                self.reduces[i] = action
            elif isinstance(action, Store):
                self.results[i][action.start : action.stop] = array("f", action.data)
            elif isinstance(action, Done | Failed):
                assert i not in self.outcomes
                self.outcomes[i] = action
            elif isinstance(action, Refused):
                self.refused.append((i, action))
            elif isinstance(action, SetTimer):
                self.timers[i] = action.at
            elif isinstance(action, CancelTimer):
                self.timers.pop(i, None)
        return actions

    def begin(self, i: int) -> list[Action]:
        m = self.machines[i]
        start, stop = m.plan.span(m.first_chunk)
        return self.feed(i, Begin(self.vectors[i][start:stop].tobytes()))

    def reduce(self, i: int) -> list[Action]:
        r = self.reduces.pop(i)
        own = self.vectors[i][r.start : r.stop]
        received = array("f", r.received)
        total = array("f", [a + b for a, b in zip(received, own, strict=True)])
        return self.feed(i, Reduced(r.chunk, total.tobytes()))

    def step(
        self, tamper: Tamper | None = None, drop: Callable[[int, bytes], bool] | None = None
    ) -> bool:
        """Do one thing chosen at random; False when nothing is left to do."""
        choices: list[tuple[str, int]] = [("begin", i) for i in self.to_begin]
        choices += [("reduce", i) for i in self.reduces]
        choices += [("deliver", i) for i, q in self.links.items() if q]
        if not choices:
            return False
        kind, i = self.rng.choice(choices)
        self.now += 0.25
        if kind == "begin":
            self.to_begin.remove(i)
            self.begin(i)
        elif kind == "reduce":
            self.reduce(i)
        else:
            sender, data = self.links[i].popleft()
            if drop is not None and drop(i, data):
                return True
            for bad_sender, bad in tamper(self, i, sender, data) if tamper else []:
                self.refuse_unchanged(i, bad_sender, bad)
            self.delivered[i].append((sender, data))
            self.feed(i, MessageArrived(sender, data))
        return True

    def refuse_unchanged(self, i: int, sender: PeerId, data: bytes) -> Refused:
        """Deliver a message that must be refused; check that nothing changed."""
        before = self.machines[i].status
        actions = self.machines[i].handle(MessageArrived(sender, data), self.now)
        assert len(actions) == 1 and isinstance(actions[0], Refused), actions
        assert self.machines[i].status == before
        assert sender.text in actions[0].reason
        self.refused.append((i, actions[0]))
        return actions[0]

    def run(
        self, tamper: Tamper | None = None, drop: Callable[[int, bytes], bool] | None = None
    ) -> None:
        while self.step(tamper, drop):
            pass

    def check_success(self) -> None:
        n = len(self.machines)
        want = expected_sum(self.vectors)
        digests = set()
        for i in range(n):
            outcome = self.outcomes[i]
            assert isinstance(outcome, Done), outcome
            assert self.results[i].tobytes() == want
            digests.add(outcome.digest)
            assert self.machines[i].stage is Stage.DONE
        plan = ChunkPlan(self.length, n)
        spans = [plan.span(c) for c in range(n)]
        independent = result_digest([chunk_digest(want[4 * a : 4 * b]) for a, b in spans])
        assert digests == {independent}


def decoded(data: bytes) -> ChunkMessage:
    return decode_chunk_message(data, max_payload=1 << 30)


# --- the whole exchange -------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("params", [0, 1, 2, 5, 16, 37])
def test_every_member_ends_with_the_same_weighted_sum_bit_for_bit(n: int, params: int) -> None:
    for seed in range(3):
        world = World(n, params, seed=seed)
        world.run()
        world.check_success()
        assert not world.refused


def test_the_sum_holds_the_weighted_average_and_the_total_weight() -> None:
    n, params = 5, 9
    world = World(n, params, seed=4)
    world.run()
    world.check_success()
    result = world.results[0]
    weights = [contribution(400 + i, params)[1] for i in range(n)]
    assert result[-1] == sum(weights)
    for j in range(params):
        mean = sum(world.vectors[i][j] for i in range(n)) / sum(weights)
        assert result[j] / result[-1] == pytest.approx(mean, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n", range(1, 8))
@pytest.mark.parametrize("length", [1, 3, 7, 12, 30, 101])
def test_each_member_sends_two_n_minus_one_over_n_of_the_vector(n: int, length: int) -> None:
    world = World(n, length - 1)
    world.run()
    world.check_success()
    plan = ChunkPlan(length, n)
    vector = 4 * length
    for i in range(n):
        assert len(world.sends[i]) == 2 * (n - 1)
        # every chunk but its own in reduce-scatter, every chunk but its successor's after
        others = 2 * vector - plan.nbytes(i) - plan.nbytes((i + 1) % n)
        assert world.sent_payload[i] == (others if n > 1 else 0)
    assert sum(world.sent_payload) == 2 * (n - 1) * vector
    if length % n == 0:
        assert all(sent * n == 2 * (n - 1) * vector for sent in world.sent_payload)


@pytest.mark.parametrize("n", range(2, 8))
def test_the_schedule_is_the_documented_one(n: int) -> None:
    world = World(n, 3 * n)
    world.run()
    world.check_success()
    for i in range(n):
        sent = [(s.phase, s.step, s.chunk) for s in world.sends[i]]
        rs = [(Phase.REDUCE_SCATTER, s, (i - s - 1) % n) for s in range(n - 1)]
        ag = [(Phase.ALL_GATHER, s, (i - s) % n) for s in range(n - 1)]
        assert sent == rs + ag
        # the member's first all-gather message is its own chunk, signed by it
        first = decoded(world.sends[i][n - 1].data)
        assert first.chunk == i and first.signature is not None


def test_chunks_are_contiguous_and_differ_by_at_most_one_element() -> None:
    for length in range(1, 40):
        for n in range(1, 9):
            plan = ChunkPlan(length, n)
            spans = [plan.span(c) for c in range(n)]
            assert spans[0][0] == 0 and spans[-1][1] == length
            assert all(spans[c][1] == spans[c + 1][0] for c in range(n - 1))
            sizes = [b - a for a, b in spans]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_a_member_alone_is_done_at_once_with_its_own_vector() -> None:
    world = World(1, 4)
    actions = world.begin(0)
    assert [type(a) for a in actions] == [Store, Done]
    world.check_success()
    assert world.results[0] == world.vectors[0]


def test_a_vector_shorter_than_the_ring_leaves_some_chunks_empty() -> None:
    world = World(6, 2)  # 3 elements, 6 members: chunks 3..5 are empty
    world.run()
    world.check_success()
    empty = [s for sends in world.sends for s in sends if decoded(s.data).data == b""]
    assert empty and all(s.chunk >= 3 for s in empty)


def test_messages_that_arrive_before_this_member_began_wait_in_order() -> None:
    n = 4
    world = World(n, 11, silent=frozenset({2}))
    world.run()  # member 2 has not trained yet: its predecessor's messages queue up
    m = world.machines[2]
    # the predecessor's reduce-scatter messages need nothing from member 2; its own chunk
    # (and so the all-gather) does
    assert m.stage is Stage.READY and m.status.accepted == n - 1
    assert 2 not in world.timers  # no deadline before it began
    world.to_begin.append(2)
    world.run()
    world.check_success()


# --- refusals -----------------------------------------------------------------------------


def tamper_once(
    make: Callable[[World, int, PeerId, ChunkMessage, bytes], list[tuple[PeerId, bytes]]],
    *,
    at: int,
    phase: Phase,
) -> Tamper:
    """Inject ``make``'s messages once, before the first ``phase`` message delivered to
    member ``at`` for which it makes any."""
    done: list[tuple[PeerId, bytes]] = []

    def tamper(world: World, i: int, sender: PeerId, data: bytes) -> list[tuple[PeerId, bytes]]:
        if done or i != at:
            return []
        message = decoded(data)
        if message.phase is not phase:
            return []
        bad = make(world, i, sender, message, data)
        done.extend(bad)
        return bad

    return tamper


def evolve(message: ChunkMessage, **changes: object) -> bytes:
    return attrs.evolve(message, **changes).encode()  # type: ignore[arg-type]


CASES: dict[
    str,
    tuple[
        Phase,
        Refusal,
        Callable[[World, int, PeerId, ChunkMessage, bytes], list[tuple[PeerId, bytes]]],
    ],
] = {
    "stranger": (
        Phase.REDUCE_SCATTER,
        Refusal.NOT_MEMBER,
        lambda w, i, s, m, d: [(STRANGER.peer_id, d)],
    ),
    "not-predecessor": (
        Phase.REDUCE_SCATTER,
        Refusal.NOT_PREDECESSOR,
        lambda w, i, s, m, d: [(w.peers[(i + 1) % len(w.peers)], d), (w.peers[i], d)],
    ),
    "run": (
        Phase.REDUCE_SCATTER,
        Refusal.WRONG_RUN,
        lambda w, i, s, m, d: [(s, evolve(m, run_id=b"\x01" * 16))],
    ),
    "epoch": (
        Phase.ALL_GATHER,
        Refusal.WRONG_EPOCH,
        lambda w, i, s, m, d: [(s, evolve(m, epoch=EPOCH + 1))],
    ),
    "round": (
        Phase.REDUCE_SCATTER,
        Refusal.WRONG_ROUND,
        lambda w, i, s, m, d: [(s, evolve(m, round=ROUND - 1))],
    ),
    "attempt": (
        Phase.ALL_GATHER,
        Refusal.WRONG_ATTEMPT,
        lambda w, i, s, m, d: [(s, evolve(m, attempt=ATTEMPT + 1))],
    ),
    "step-ahead": (
        Phase.REDUCE_SCATTER,
        Refusal.OUT_OF_ORDER,
        lambda w, i, s, m, d: [(s, evolve(m, step=m.step + 1))],
    ),
    "no-such-step": (
        Phase.ALL_GATHER,
        Refusal.OUT_OF_ORDER,
        lambda w, i, s, m, d: [(s, evolve(m, step=len(w.peers) - 1))],
    ),
    "phase": (
        Phase.REDUCE_SCATTER,
        Refusal.OUT_OF_ORDER,
        lambda w, i, s, m, d: [(s, evolve(m, phase=Phase.ALL_GATHER, signature=bytes(64)))],
    ),
    "chunk": (
        Phase.REDUCE_SCATTER,
        Refusal.OUT_OF_ORDER,
        lambda w, i, s, m, d: [(s, evolve(m, chunk=(m.chunk + 1) % len(w.peers)))],
    ),
    "duplicate": (
        Phase.ALL_GATHER,  # the last reduce-scatter message again, before the first gather
        Refusal.DUPLICATE,
        lambda w, i, s, m, d: [w.delivered[i][-1]],
    ),
    "oversize": (
        Phase.REDUCE_SCATTER,
        Refusal.BAD_SIZE,
        lambda w, i, s, m, d: [(s, evolve(m, data=m.data + bytes(4)))],
    ),
    "undersize": (
        Phase.ALL_GATHER,
        Refusal.BAD_SIZE,
        lambda w, i, s, m, d: [(s, evolve(m, data=m.data[:-4]))],
    ),
    "odd-size": (
        Phase.REDUCE_SCATTER,
        Refusal.BAD_SIZE,
        lambda w, i, s, m, d: [(s, evolve(m, data=m.data[:-1]))],
    ),
    "huge": (
        Phase.REDUCE_SCATTER,
        Refusal.TOO_LARGE,
        lambda w, i, s, m, d: [(s, evolve(m, data=bytes(4 * w.length + MESSAGE_OVERHEAD)))],
    ),
    "truncated": (Phase.REDUCE_SCATTER, Refusal.MALFORMED, lambda w, i, s, m, d: [(s, d[:-1])]),
    "trailing": (Phase.ALL_GATHER, Refusal.MALFORMED, lambda w, i, s, m, d: [(s, d + b"\x00")]),
    "not-cbor": (
        Phase.REDUCE_SCATTER,
        Refusal.MALFORMED,
        lambda w, i, s, m, d: [(s, b"\xff"), (s, b"")],
    ),
    "rs-with-sig": (
        Phase.REDUCE_SCATTER,
        Refusal.MALFORMED,
        lambda w, i, s, m, d: [(s, evolve(m, signature=bytes(64)))],
    ),
    "ag-without-sig": (
        Phase.ALL_GATHER,
        Refusal.MALFORMED,
        lambda w, i, s, m, d: [(s, evolve(m, signature=None))],
    ),
    "unknown-field": (
        Phase.ALL_GATHER,
        Refusal.MALFORMED,
        lambda w, i, s, m, d: [(s, d.replace(b"csig", b"cxyz"))],
    ),
    "nan": (
        Phase.REDUCE_SCATTER,
        Refusal.NOT_FINITE,
        lambda w, i, s, m, d: [
            (s, evolve(m, data=array("f", [float("nan")]).tobytes() + m.data[4:]))
        ],
    ),
    "forged-signature": (
        Phase.ALL_GATHER,
        Refusal.BAD_SIGNATURE,
        lambda w, i, s, m, d: [(s, evolve(m, signature=bytes(m.signature or b"")[:-1] + b"\x00"))],
    ),
    "signed-for-another-attempt": (  # the owner's own signature, from another attempt
        Phase.ALL_GATHER,
        Refusal.BAD_SIGNATURE,
        lambda w, i, s, m, d: [
            (
                s,
                evolve(
                    m,
                    signature=sign_chunk(
                        w.ids[m.chunk],
                        attrs.evolve(w.machines[i].context, attempt=ATTEMPT - 1),
                        m.chunk,
                        m.data,
                    ),
                ),
            )
        ],
    ),
    "signed-by-the-forwarder": (
        Phase.ALL_GATHER,
        Refusal.BAD_SIGNATURE,
        lambda w, i, s, m, d: (
            [
                (
                    s,
                    evolve(
                        m,
                        signature=sign_chunk(
                            w.ids[w.peers.index(s)], w.machines[i].context, m.chunk, m.data
                        ),
                    ),
                )
            ]
            if m.step > 0  # forwarded: the sender is not the chunk's owner
            else []
        ),
    ),
    "altered-by-the-forwarder": (
        Phase.ALL_GATHER,
        Refusal.BAD_SIGNATURE,
        lambda w, i, s, m, d: (
            [(s, evolve(m, data=array("f", [1.0]).tobytes() + m.data[4:]))] if m.step > 0 else []
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("n", [3, 5])
def test_every_refusal_names_the_sender_and_changes_nothing(case: str, n: int) -> None:
    phase, refusal, make = CASES[case]
    at = 1
    world = World(n, 4 * n + 3, seed=n)
    world.run(tamper=tamper_once(make, at=at, phase=phase))
    codes = {r.refusal for i, r in world.refused}
    assert codes == {refusal}, world.refused
    assert all(i == at for i, _ in world.refused)
    world.check_success()  # the honest message that came after was taken


def test_refusals_map_to_the_projects_refusal_codes() -> None:
    assert Refusal.NOT_PREDECESSOR.code is RefusalCode.OUT_OF_TURN
    assert Refusal.BAD_SIGNATURE.code is RefusalCode.MALFORMED
    assert Refusal.TOO_LARGE.code is RefusalCode.TOO_LARGE
    assert Refusal.BAD_SIZE.code is RefusalCode.MALFORMED
    assert {r.code for r in Refusal} <= set(RefusalCode)


def test_a_forwarder_cannot_make_members_disagree() -> None:
    """Member 1 alters the first chunk it forwards to member 2 (and drops the rest): member
    2 refuses it, so it cannot end with another result than the others; it waits, and its
    deadline names member 1."""
    n = 4
    world = World(n, 13)
    forwarder = world.peers[1]

    def alter(i: int, data: bytes) -> bool:
        m = decoded(data)
        if i != 2 or m.phase is not Phase.ALL_GATHER or m.step == 0:  # step 0: its own chunk
            return False
        if m.step == 1:
            bad = evolve(m, data=bytes(len(m.data)))
            assert world.refuse_unchanged(2, forwarder, bad).refusal is Refusal.BAD_SIGNATURE
        return True

    world.run(drop=alter)
    assert 2 not in world.outcomes and world.machines[2].status.stored == (1, 2)
    failed = world.machines[2].handle(TimerFired(), world.timers[2])[0]
    assert isinstance(failed, Failed) and failed.peer == forwarder
    assert (failed.phase, failed.step) == (Phase.ALL_GATHER, 1)
    # member 3 starves behind member 2 (the silence cascades down the ring: the layer above
    # must learn who fell silent first); those done agree
    assert 3 not in world.outcomes
    done = [o for o in world.outcomes.values() if isinstance(o, Done)]
    assert len(done) == 2 and len({o.digest for o in done}) == 1


@given(data=st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_random_bytes_are_refused_never_raised(data: bytes) -> None:
    ids = ordered(3)
    m = AllReduceMachine(
        ids[1], run_id=RUN, epoch=0, round=0, attempt=0, members=[i.peer_id for i in ids], length=9
    )
    before = m.status
    actions = m.handle(MessageArrived(ids[0].peer_id, data), 0.0)
    assert len(actions) == 1 and isinstance(actions[0], Refused)
    assert m.status == before


def test_every_truncation_of_a_message_is_refused() -> None:
    world = World(3, 8)
    world.begin(0)
    data = world.links[1][0][1]
    machine = world.machines[1]
    for cut in range(len(data)):
        actions = machine.handle(MessageArrived(world.peers[0], data[:cut]), 0.0)
        assert isinstance(actions[0], Refused) and actions[0].refusal is Refusal.MALFORMED


def test_a_message_with_every_field_at_its_largest_fits_the_overhead() -> None:
    top = 2**64 - 1
    # from 65,536 bytes up to 4 GiB the data's head has its largest form (5 bytes)
    for size in (0, 1 << 16, DEFAULT_LIMITS.max_allreduce_chunk):
        data = bytes(size)
        big = ChunkMessage(RUN, top, top, top, Phase.ALL_GATHER, top, top, data, bytes(64))
        assert len(big.encode()) - size <= 199 < MESSAGE_OVERHEAD
    assert len(big.encode()) - size == 199


def test_the_documented_example_message() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "parallel.md").read_text()
    block = text.split("<!-- allreduce-example -->\n```text\n", 1)[1].split("```", 1)[0]
    example = ChunkMessage(
        bytes(range(16)),
        3,
        7,
        1,
        Phase.REDUCE_SCATTER,
        1,
        2,
        array("f", [1.0, -2.5]).tobytes(),
    )
    assert bytes.fromhex(block) == example.encode()
    assert len(example.encode()) == 93


# --- deadlines ----------------------------------------------------------------------------


def test_a_silent_predecessor_is_named_when_the_deadline_passes() -> None:
    n = 4
    world = World(n, 10, silent=frozenset({0}))  # member 0 never trains, never sends
    world.run()
    m = world.machines[1]
    assert m.stage is Stage.REDUCING and 1 not in world.outcomes
    deadline = world.timers[1]
    assert [type(a) for a in m.handle(TimerFired(), deadline - 0.01)] == [Ignored]  # stale
    actions = m.handle(TimerFired(), deadline)
    assert len(actions) == 1 and isinstance(actions[0], Failed)
    failed = actions[0]
    assert (failed.kind, failed.peer, failed.phase, failed.step) == (
        FailureKind.TIMEOUT,
        world.peers[0],
        Phase.REDUCE_SCATTER,
        0,
    )
    assert world.peers[0].text in failed.reason
    assert m.status.stage is Stage.FAILED


def test_a_timeout_in_the_all_gather_names_the_phase_and_step() -> None:
    n = 5
    world = World(n, 12)
    target = 3

    def drop(i: int, data: bytes) -> bool:
        m = decoded(data)
        return i == target and m.phase is Phase.ALL_GATHER and m.step == 2

    world.run(drop=drop)
    assert target not in world.outcomes
    m = world.machines[target]
    assert m.status.worked == (n - 1) + 2 and m.status.deadline == world.timers[target]
    actions = m.handle(TimerFired(), world.timers[target] + 5)
    assert len(actions) == 1 and isinstance(actions[0], Failed)
    failed = actions[0]
    assert (failed.kind, failed.peer, failed.phase, failed.step) == (
        FailureKind.TIMEOUT,
        world.peers[target - 1],
        Phase.ALL_GATHER,
        2,
    )


def test_the_deadline_is_armed_per_message_from_when_this_member_waits() -> None:
    world = World(3, 5)
    m = world.machines[1]
    world.now = 10.0
    actions = world.begin(1)  # nothing from the predecessor yet
    assert SetTimer(10.0 + TIMEOUT) in actions
    world.now = 11.0
    world.begin(0)
    sender, data = world.links[1].popleft()
    actions = world.feed(1, MessageArrived(sender, data))
    assert isinstance(actions[0], Reduce) and CancelTimer() in actions  # waiting on the driver
    assert m.status.deadline is None
    world.now = 12.0
    actions = world.reduce(1)
    assert SetTimer(12.0 + TIMEOUT) in actions  # a new deadline for the next message
    # the old deadline's timer, if the driver fires it late, is stale
    assert [type(a) for a in m.handle(TimerFired(), 10.0 + TIMEOUT)] == [Ignored]


def test_the_join_wait_bounds_the_reduce_scatter_and_the_step_deadline_the_rest() -> None:
    """With ``join_wait`` (the hybrid mode's: members begin as their relay ends), every
    wait until the reduce-scatter's last message may last that long: until then some
    member may not have begun; the all-gather's waits are the step deadline."""
    world = World(4, 9, seed=3, join_wait=500.0)
    world.run()
    world.check_success()
    for i in range(4):
        waits = [
            t.at - now
            for j, now, _, actions in world.log
            if j == i
            for t in actions
            if isinstance(t, SetTimer)
        ]
        assert set(waits) <= {500.0, TIMEOUT}
        assert waits == sorted(waits, reverse=True)  # the join waits come first
    # A member still waiting for rs/0 fails only after the join wait, naming it.
    silent = World(3, 5, silent=frozenset({0}), join_wait=500.0)
    silent.run()
    assert 500.0 <= silent.timers[1] < 505.0  # armed at the world's clock, about 0
    actions = silent.machines[1].handle(TimerFired(), silent.timers[1])
    assert isinstance(actions[0], Failed) and "within 500.0 s" in actions[0].reason
    # In the all-gather the step deadline holds again.
    late = World(5, 12, join_wait=500.0)

    def drop(i: int, data: bytes) -> bool:
        return i == 3 and decoded(data).phase is Phase.ALL_GATHER and decoded(data).step == 2

    late.run(drop=drop)
    waited = [
        t.at - now
        for j, now, _, actions in late.log
        if j == 3
        for t in actions
        if isinstance(t, SetTimer)
    ]
    assert waited[-1] == TIMEOUT


def test_every_wait_gets_a_fresh_deadline_and_only_waits_do() -> None:
    n = 4
    world = World(n, 9, seed=2)
    world.run()
    world.check_success()
    waits = 0
    for i, now, event, actions in world.log:
        m = world.machines[i]
        timers = [a for a in actions if isinstance(a, SetTimer | CancelTimer)]
        stores = [a for a in actions if isinstance(a, Store)]
        if (
            isinstance(event, MessageArrived)
            and stores
            and not any(isinstance(a, Done | Reduce) for a in actions)
        ):
            # an all-gather chunk taken at once: the member waits for the next one
            assert timers == [SetTimer(now + TIMEOUT)]
            waits += 1
        assert all(t.at == now + TIMEOUT for t in timers if isinstance(t, SetTimer))
        if any(isinstance(a, Reduce) for a in actions):  # waiting on the driver, not a peer
            assert not any(isinstance(t, SetTimer) for t in timers)
        assert m.status.stage is Stage.DONE
    assert waits > 0


# --- the end and misuse -------------------------------------------------------------------


def test_a_finished_machine_refuses_everything() -> None:
    world = World(3, 6)
    world.run()
    world.check_success()
    m = world.machines[2]
    sender, data = world.delivered[2][-1]
    before = m.status
    actions = m.handle(MessageArrived(sender, data), world.now)
    assert [(type(a), getattr(a, "refusal", None)) for a in actions] == [
        (Refused, Refusal.FINISHED)
    ]
    assert [type(a) for a in m.handle(TimerFired(), world.now + 1e6)] == [Ignored]
    assert [type(a) for a in m.handle(Abandon("late"), world.now)] == [Ignored]
    assert [type(a) for a in m.handle(Begin(b""), world.now)] == [Ignored]
    assert [type(a) for a in m.handle(Reduced(0, b""), world.now)] == [Ignored]
    assert m.status == before


def test_a_failed_machine_refuses_everything() -> None:
    world = World(3, 6)
    world.begin(1)
    m = world.machines[1]
    assert [type(a) for a in m.handle(Abandon("the round was void"), 1.0)] == [CancelTimer, Failed]
    world.begin(0)
    sender, data = world.links[1].popleft()
    actions = m.handle(MessageArrived(sender, data), 2.0)
    assert isinstance(actions[0], Refused) and actions[0].refusal is Refusal.FINISHED
    assert m.stage is Stage.FAILED


def test_a_sum_that_overflows_fails_the_attempt() -> None:
    world = World(2, 3)
    world.begin(0)
    world.begin(1)
    sender, data = world.links[1].popleft()
    world.feed(1, MessageArrived(sender, data))
    r = world.reduces.pop(1)
    actions = world.feed(
        1, Reduced(r.chunk, array("f", [float("inf")] * (r.stop - r.start)).tobytes())
    )
    assert any(isinstance(a, Failed) and a.kind is FailureKind.OVERFLOW for a in actions)


def test_driver_misuse_raises() -> None:
    world = World(3, 6)
    m = world.machines[0]
    with pytest.raises(LocalProtocolError):
        m.handle(Begin(bytes(4)), 0.0)  # the wrong size for its first chunk
    with pytest.raises(LocalProtocolError):
        m.handle(Reduced(0, b""), 0.0)  # not asked for
    world.begin(0)
    with pytest.raises(LocalProtocolError):
        m.handle(Begin(bytes(4 * m.plan.size(m.first_chunk))), 0.0)  # twice


@pytest.mark.parametrize(
    "change",
    [
        {"length": 0},
        {"run_id": b"short"},
        {"members": "without-me"},
        {"members": "repeated"},
        {"round": -1},
    ],
)
def test_construction_refuses_what_cannot_work(change: dict[str, object]) -> None:
    ids = ordered(3)
    members: list[PeerId] = [i.peer_id for i in ids]
    if change.get("members") == "without-me":
        members = members[1:]
    elif change.get("members") == "repeated":
        members = [*members, members[1]]
    kwargs: dict[str, object] = {"run_id": RUN, "epoch": 0, "round": 0, "attempt": 0, "length": 4}
    kwargs.update({k: v for k, v in change.items() if k != "members"})
    with pytest.raises(LocalProtocolError):
        AllReduceMachine(ids[0], members=members, **kwargs)  # type: ignore[arg-type]


def test_a_vector_whose_chunks_exceed_the_limit_is_refused_at_construction() -> None:
    limits = Limits(max_allreduce_chunk=64)
    ids = ordered(2)
    members = [i.peer_id for i in ids]
    AllReduceMachine(
        ids[0], run_id=RUN, epoch=0, round=0, attempt=0, members=members, length=32, limits=limits
    )
    with pytest.raises(LocalProtocolError, match="max_allreduce_chunk"):
        AllReduceMachine(
            ids[0],
            run_id=RUN,
            epoch=0,
            round=0,
            attempt=0,
            members=members,
            length=33,
            limits=limits,
        )


def test_the_transition_table_covers_every_stage() -> None:
    assert set(TRANSITIONS) == set(Stage)


def test_the_step_deadline_is_below_the_idle_timeout() -> None:
    # A member sends within its predecessor's deadline; the channel must still be open.
    assert DEFAULT_LIMITS.allreduce_step_timeout < DEFAULT_LIMITS.idle_timeout
