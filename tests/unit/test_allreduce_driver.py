"""The all-reduce driver alone: members joined by their inboxes in memory (no channel),
under trio's autojump clock; the inbox's budget and routing; sends that fail or hang.

The driver over real channels is tests/integration/test_allreduce_driver.py.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import numpy as np
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConnectionLostError, LocalProtocolError
from fedup.identity import Identity
from fedup.net.allreduce_driver import (
    ENTRY_COST,
    AllReduceInbox,
    all_reduce,
    float32_adder,
    is_allreduce_frame,
)
from fedup.net.framed import FramedStream
from fedup.protocol.allreduce import AllReduceMachine, Begin, Done, Failed, FailureKind
from fedup.protocol.allreduce import Send as SendAction
from fedup.protocol.allreduce_messages import (
    MESSAGE_OVERHEAD,
    ChunkMessage,
    ChunkPlan,
    Phase,
)
from fedup.protocol.framing import encode_frame as _encode_frame
from fedup.protocol.messages import Link, encode_message
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import ring_order

RUN = bytes(range(16))
IDENTITIES = [Identity(bytes([0x20 + i]) * 32) for i in range(6)]
STRANGER = Identity(b"\x77" * 32)
LIMITS = attrs.evolve(DEFAULT_LIMITS, allreduce_step_timeout=10.0, frame_timeout=30.0)

Send = Callable[[bytes], Awaitable[None]]


def vector(seed: int, length: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.uniform(-3.0, 3.0, length).astype("<f4").tobytes()


def expected_sum(vectors: list[bytes]) -> bytes:
    """Vectors in ring order; chunk ``c`` is summed as members c+1, ..., c-1, c."""
    arrays = [np.frombuffer(v, dtype="<f4") for v in vectors]
    n = len(arrays)
    plan = ChunkPlan(len(arrays[0]), n)
    out = np.zeros(len(arrays[0]), dtype="<f4")
    for c in range(n):
        start, stop = plan.span(c)
        acc = arrays[(c + 1) % n][start:stop].copy()
        for j in range(2, n + 1):
            acc = acc + arrays[(c + j) % n][start:stop]
        out[start:stop] = acc
    return out.tobytes()


class Ring:
    """N members whose sends go straight into their successor's inbox."""

    def __init__(
        self, n: int, length: int, limits: Limits = LIMITS, own: dict[int, Limits] | None = None
    ) -> None:
        by_id = {i.peer_id: i for i in IDENTITIES[:n]}
        self.order = ring_order(by_id)
        self.identities = by_id
        self.length = length
        self.limits = limits
        self.inboxes = {p: AllReduceInbox(limits=limits) for p in self.order}
        self.vectors = {p: vector(i, length) for i, p in enumerate(self.order)}
        self.sent: dict[PeerId, int] = dict.fromkeys(self.order, 0)
        self.own = {self.order[i]: lim for i, lim in (own or {}).items()}
        """Members whose machine has limits of its own."""

    def machine(self, peer: PeerId, round: int = 0, attempt: int = 0) -> AllReduceMachine:
        return AllReduceMachine(
            self.identities[peer],
            run_id=RUN,
            epoch=1,
            round=round,
            attempt=attempt,
            members=self.order,
            length=self.length,
            limits=self.own.get(peer, self.limits),
        )

    def send_from(self, peer: PeerId, to: PeerId) -> Send:
        async def send(data: bytes) -> None:
            await trio.lowlevel.checkpoint()
            self.sent[peer] += 1
            assert self.inboxes[to].deliver(peer, data) is None

        return send

    async def member(
        self, peer: PeerId, send: Send | None = None, round: int = 0, attempt: int = 0
    ) -> tuple[Done | Failed, bytes]:
        machine = self.machine(peer, round, attempt)
        local = self.vectors[peer]
        result = bytearray(len(local))
        outcome = await all_reduce(
            machine,
            local,
            send=send or self.send_from(peer, machine.successor),
            inbox=self.inboxes[peer],
            add=float32_adder(local),
            result=result,
        )
        return outcome, bytes(result)

    async def run(
        self, sends: dict[PeerId, Send] | None = None, round: int = 0, attempt: int = 0
    ) -> dict[PeerId, tuple]:
        outcomes: dict[PeerId, tuple] = {}

        async def one(peer: PeerId) -> None:
            outcomes[peer] = await self.member(peer, (sends or {}).get(peer), round, attempt)

        with trio.fail_after(100 * self.limits.allreduce_step_timeout):
            async with trio.open_nursery() as nursery:
                for peer in self.order:
                    nursery.start_soon(one, peer)
        return outcomes


def encode_frame(payload: bytes) -> bytes:
    return _encode_frame(payload, max_size=DEFAULT_LIMITS.max_frame_size)


def message(**changes: object) -> bytes:
    fields: dict[str, object] = dict(
        run_id=RUN,
        epoch=1,
        round=0,
        attempt=0,
        phase=Phase.REDUCE_SCATTER,
        step=0,
        chunk=0,
        data=b"\x00" * 8,
        signature=None,
    )
    fields.update(changes)
    return ChunkMessage(**fields).encode()  # type: ignore[arg-type]


# --- what the connection handler routes ----------------------------------------------


def test_all_reduce_frames_are_told_from_every_other_first_frame() -> None:
    assert is_allreduce_frame(message())
    assert is_allreduce_frame(message(phase=Phase.ALL_GATHER, signature=b"\x01" * 64))
    assert is_allreduce_frame(message(data=b"\x00" * (1 << 20)))
    assert not is_allreduce_frame(encode_message(Link(RUN)))
    assert not is_allreduce_frame(b"")
    assert not is_allreduce_frame(message()[:13])  # the map header and `t` alone
    assert not is_allreduce_frame(b"\x01" + message()[1:])  # a blob chunk's first byte


# --- the inbox --------------------------------------------------------------------------


def test_the_inbox_refuses_a_message_larger_than_any_chunk_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = attrs.evolve(LIMITS, max_allreduce_chunk=64)
    inbox = AllReduceInbox(limits=limits)
    sender = IDENTITIES[0].peer_id
    assert inbox.deliver(sender, b"x" * (MESSAGE_OVERHEAD + 64)) is None
    why = inbox.deliver(sender, b"x" * (MESSAGE_OVERHEAD + 65))
    assert why is not None and "exceeds" in why
    assert (len(inbox), inbox.refused) == (1, 1)
    assert any(sender.text in r.getMessage() for r in caplog.records)


def test_the_inbox_holds_at_most_its_budget_and_taking_frees_it() -> None:
    limits = attrs.evolve(LIMITS, max_allreduce_inbox=3 * (100 + ENTRY_COST))
    inbox = AllReduceInbox(limits=limits)
    a, b = IDENTITIES[0].peer_id, IDENTITIES[1].peer_id
    for i in range(3):
        assert inbox.deliver(a, bytes([i]) * 100) is None
    assert inbox.held == limits.max_allreduce_inbox
    assert inbox.deliver(b, b"") is not None  # even an empty message costs its entry
    assert inbox.take() == (a, b"\x00" * 100)
    assert inbox.deliver(b, b"y" * 100) is None
    assert [inbox.take() for _ in range(4)] == [
        (a, b"\x01" * 100),
        (a, b"\x02" * 100),
        (b, b"y" * 100),
        None,
    ]
    assert (inbox.held, inbox.refused) == (0, 1)


async def test_serve_delivers_every_frame_and_ends_the_connection_at_a_refusal() -> None:
    limits = attrs.evolve(LIMITS, max_allreduce_chunk=64)
    inbox = AllReduceInbox(limits=limits)
    remote = IDENTITIES[2].peer_id
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(theirs, peer=remote.text, limits=limits)
    first = message()
    await ours.send_all(
        encode_frame(b"second") + encode_frame(b"z" * (MESSAGE_OVERHEAD + 65)) + encode_frame(b"4")
    )
    with trio.fail_after(5):
        await inbox.serve(framed, remote, first)  # returns: the third frame is refused
    assert [inbox.take(), inbox.take(), inbox.take()] == [
        (remote, first),
        (remote, b"second"),
        None,
    ]
    assert inbox.refused == 1


async def test_serve_returns_at_the_end_of_the_connection() -> None:
    inbox = AllReduceInbox(limits=LIMITS)
    remote = IDENTITIES[2].peer_id
    ours, theirs = trio.testing.memory_stream_pair()
    framed = FramedStream(theirs, peer=remote.text, limits=LIMITS)
    await ours.send_all(encode_frame(b"a") + encode_frame(b"b"))
    await ours.aclose()
    with trio.fail_after(5):
        await inbox.serve(framed, remote)
    assert (len(inbox), inbox.refused) == (2, 0)


# --- the driver -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "length"), [(2, 7), (4, 3), (4, 1001), (6, 64)])
async def test_members_joined_in_memory_end_with_the_same_sum(
    autojump_clock: trio.testing.MockClock, n: int, length: int
) -> None:
    ring = Ring(n, length)
    outcomes = await ring.run()
    expected = expected_sum([ring.vectors[p] for p in ring.order])
    assert {outcomes[p][1] for p in ring.order} == {expected}
    assert len({outcomes[p][0] for p in ring.order}) == 1
    assert all(isinstance(outcomes[p][0], Done) for p in ring.order)
    assert all(ring.sent[p] == 2 * (n - 1) for p in ring.order)


async def test_a_member_alone_is_done_with_its_own_vector_and_sends_nothing() -> None:
    ring = Ring(1, 5)
    (peer,) = ring.order
    outcome, result = await ring.member(peer)
    assert isinstance(outcome, Done)
    assert result == ring.vectors[peer]
    assert ring.sent[peer] == 0


async def test_buffers_of_the_wrong_size_are_the_callers_bug() -> None:
    ring = Ring(2, 5)
    peer = ring.order[0]
    with pytest.raises(LocalProtocolError):
        await all_reduce(
            ring.machine(peer),
            ring.vectors[peer][:-4],
            send=ring.send_from(peer, ring.order[1]),
            inbox=ring.inboxes[peer],
            add=float32_adder(ring.vectors[peer]),
            result=bytearray(20),
        )


async def test_a_send_that_fails_abandons_the_attempt_naming_the_successor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ring = Ring(3, 30)
    me = ring.order[0]
    successor = ring.order[1]

    async def broken(data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        raise ConnectionLostError("connection reset", peer=successor.text)

    outcome, _ = await ring.member(me, broken)
    assert isinstance(outcome, Failed)
    assert (outcome.kind, outcome.peer) == (FailureKind.ABANDONED, successor)
    assert successor.text in outcome.reason and "rs/0" in outcome.reason


async def test_a_send_that_hangs_is_given_up_after_the_frame_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ring = Ring(3, 30)
    me = ring.order[0]

    async def stuck(data: bytes) -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    outcome, _ = await ring.member(me, stuck)
    assert isinstance(outcome, Failed) and outcome.kind is FailureKind.ABANDONED
    assert outcome.peer == ring.order[1]
    assert trio.current_time() - start == LIMITS.frame_timeout  # virtual time: exact


async def test_a_message_waiting_when_the_deadline_passed_is_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A member whose own sends outlast its step deadline still takes the message that
    arrived meanwhile: the deadline is for its predecessor's silence, not for its own
    slowness.  (Its successor waits longer here, so that it does not give up on it.)"""
    patient = attrs.evolve(LIMITS, allreduce_step_timeout=100.0)
    ring = Ring(2, 30, own={1: patient})
    slow, other = ring.order
    direct = ring.send_from(slow, other)

    async def slow_send(data: bytes) -> None:
        await trio.sleep(LIMITS.allreduce_step_timeout + 1)  # within frame_timeout
        await direct(data)

    outcomes = await ring.run({slow: slow_send})
    expected = expected_sum([ring.vectors[p] for p in ring.order])
    assert [type(outcomes[p][0]) for p in ring.order] == [Done, Done]
    assert {outcomes[p][1] for p in ring.order} == {expected}
    assert trio.current_time() >= 2 * (LIMITS.allreduce_step_timeout + 1)  # it was late


async def test_a_strangers_message_is_refused_naming_it_and_the_attempt_goes_on(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedup.net")
    ring = Ring(3, 30)
    for p in ring.order:
        ring.inboxes[p].deliver(STRANGER.peer_id, message())
    outcomes = await ring.run()
    assert all(isinstance(outcomes[p][0], Done) for p in ring.order)
    refused = [r.getMessage() for r in caplog.records if STRANGER.peer_id.text in r.getMessage()]
    assert len(refused) == 3 and all("(not-member)" in line for line in refused)


async def test_a_silent_predecessor_is_named_at_the_machines_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ring = Ring(3, 30)
    me = ring.order[1]
    start = trio.current_time()
    outcome, _ = await ring.member(me)  # nobody else runs
    assert isinstance(outcome, Failed)
    assert (outcome.kind, outcome.peer, outcome.phase, outcome.step) == (
        FailureKind.TIMEOUT,
        ring.order[0],
        Phase.REDUCE_SCATTER,
        0,
    )
    assert trio.current_time() - start == LIMITS.allreduce_step_timeout
    assert ring.sent[me] == 1  # its own part went out before it waited


async def test_large_chunks_are_added_in_a_worker_thread() -> None:
    """Real clock: a worker thread and an autojump clock do not mix."""
    ring = Ring(2, 2 * 70_000)  # chunks of 280,000 bytes
    threads: set[int] = set()
    import threading

    main = threading.get_ident()

    def watch(add: Callable[..., bytes]) -> Callable[..., bytes]:
        def added(*args: object) -> bytes:
            threads.add(threading.get_ident())
            return add(*args)

        return added

    outcomes: dict[PeerId, tuple] = {}

    async def one(peer: PeerId) -> None:
        machine = ring.machine(peer)
        local = ring.vectors[peer]
        result = bytearray(len(local))
        outcome = await all_reduce(
            machine,
            local,
            send=ring.send_from(peer, machine.successor),
            inbox=ring.inboxes[peer],
            add=watch(float32_adder(local)),
            result=result,
        )
        outcomes[peer] = (outcome, bytes(result))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for p in ring.order:
                nursery.start_soon(one, p)
    assert threads and main not in threads
    expected = expected_sum([ring.vectors[p] for p in ring.order])
    assert {outcomes[p][1] for p in ring.order} == {expected}


@pytest.mark.parametrize(("round_", "attempt"), [(0, 1), (1, 0)])
async def test_a_message_for_the_next_attempt_waits_for_it(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    round_: int,
    attempt: int,
) -> None:
    """A predecessor already in the next attempt (or round): its first message arrives
    while this member still runs the current one, and is kept for the next."""
    caplog.set_level(logging.WARNING, logger="fedup.net")
    ring = Ring(3, 30)
    early, me = ring.order[0], ring.order[1]
    ahead = ring.machine(early, round_, attempt)
    start, stop = ahead.plan.span(ahead.first_chunk)
    (first_send, *_) = ahead.handle(Begin(ring.vectors[early][4 * start : 4 * stop]), 0.0)
    assert isinstance(first_send, SendAction)
    ring.inboxes[me].deliver(early, first_send.data)
    current = await ring.run()
    assert all(isinstance(current[p][0], Done) for p in ring.order)
    assert not caplog.records  # nothing was refused
    direct = ring.send_from(early, me)
    skipped = 0

    async def first_already_sent(data: bytes) -> None:
        nonlocal skipped
        if skipped == 0:
            assert data == first_send.data
            skipped += 1
            return
        await direct(data)

    nxt = await ring.run({early: first_already_sent}, round_, attempt)
    assert skipped == 1
    expected = expected_sum([ring.vectors[p] for p in ring.order])
    assert {nxt[p][1] for p in ring.order} == {expected}
    assert all(isinstance(nxt[p][0], Done) for p in ring.order)
    assert all(ring.inboxes[p].held == 0 for p in ring.order)


async def test_a_message_two_rounds_ahead_is_refused_not_held(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedup.net")
    ring = Ring(3, 30)
    early, me = ring.order[0], ring.order[1]
    ring.inboxes[me].deliver(early, message(round=2))
    current = await ring.run()
    assert all(isinstance(current[p][0], Done) for p in ring.order)
    refused = [r.getMessage() for r in caplog.records]
    assert len(refused) == 1 and "(wrong-round)" in refused[0] and early.text in refused[0]
    assert ring.inboxes[me].held == 0
