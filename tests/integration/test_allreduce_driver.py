"""The all-reduce driver over the project's transports: every member its own identity,
listener and handshake, every message over an authenticated, encrypted channel.

``tcp``: real loopback TCP and the real clock (generous deadlines; nothing asserts
how long anything took).  ``memory``: the same handshake and channel over in-memory
streams (:class:`~fedup.net.transport.MemoryNetwork`), under trio's autojump clock,
so a 60 s deadline takes no real time.  The expected sum is computed independently
with numpy float32, in the order the schedule adds the contributions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import numpy as np
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import RemoteProtocolError
from fedup.identity import Identity
from fedup.net.allreduce_driver import (
    AllReduceInbox,
    SuccessorLink,
    all_reduce,
    float32_adder,
    is_allreduce_frame,
)
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, MemoryNetwork, TcpTransport, Transport
from fedup.protocol.allreduce import AllReduceMachine, Done, Failed, FailureKind
from fedup.protocol.allreduce_messages import (
    ChunkMessage,
    ChunkPlan,
    Phase,
    chunk_digest,
    decode_chunk_message,
    result_digest,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address
from fedup.protocol.ring import ring_order

RUN = bytes(range(16))
EPOCH, ROUND, ATTEMPT = 2, 5, 0
NET = "allreduce"
IDENTITIES = [Identity(bytes([0x40 + i]) * 32) for i in range(6)]
LIMITS = attrs.evolve(
    DEFAULT_LIMITS,
    handshake_timeout=10.0,
    frame_timeout=20.0,
    idle_timeout=600.0,
    allreduce_step_timeout=60.0,
)
SHORT = attrs.evolve(LIMITS, allreduce_step_timeout=2.0)
"""For a silent member on TCP: the deadline that names it is real time there."""


def contribution(seed: int, params: int) -> np.ndarray:
    """``weight x params`` followed by the weight (docs/parallel.md's convention)."""
    rng = np.random.default_rng(seed)
    weight = int(rng.integers(1, 1000))
    params_ = rng.uniform(-2.0, 2.0, params).astype("<f4")
    return np.concatenate([np.float32(weight) * params_, [np.float32(weight)]]).astype("<f4")


def expected_sum(vectors: list[np.ndarray]) -> bytes:
    """Vectors in ring order; chunk ``c`` is summed as members c+1, c+2, ..., c-1, c."""
    n = len(vectors)
    plan = ChunkPlan(len(vectors[0]), n)
    out = np.zeros(len(vectors[0]), dtype="<f4")
    for c in range(n):
        start, stop = plan.span(c)
        acc = vectors[(c + 1) % n][start:stop].copy()
        for j in range(2, n + 1):
            acc = acc + vectors[(c + j) % n][start:stop]
        out[start:stop] = acc
    return out.tobytes()


class Ring:
    """N listening members; each routes all-reduce connections to its inbox, as a
    peer's connection handler would."""

    def __init__(self, kind: str, identities: list[Identity], limits: Limits) -> None:
        self.kind = kind
        self.limits = limits
        self.identities = {i.peer_id: i for i in identities}
        self.order = ring_order(self.identities)
        self.net = MemoryNetwork()
        self.inboxes = {p: AllReduceInbox(limits=limits) for p in self.order}
        self.transports: dict[PeerId, Transport] = {}
        self.addresses: dict[PeerId, Address] = {}
        self.dials: dict[PeerId, int] = {}

    def transport(self, peer: PeerId) -> Transport:
        creds = Credentials(self.identities[peer], NET)
        if self.kind == "memory":
            return self.net.transport(creds, limits=self.limits)
        return TcpTransport(creds, limits=self.limits)

    def handler(self, peer: PeerId) -> Callable[[SecureChannel], Awaitable[None]]:
        async def handle(channel: SecureChannel) -> None:
            remote = channel.remote_peer
            framed = FramedStream(channel, peer=remote.text, limits=self.limits)
            with trio.fail_after(self.limits.frame_timeout):
                first = await framed.receive_frame_or_eof()
            if first is None:
                return
            if not is_allreduce_frame(first):
                raise RemoteProtocolError("opened with something else", peer=remote.text)
            await self.inboxes[peer].serve(framed, remote, first)

        return handle

    def dial_from(self, peer: PeerId) -> Callable[[PeerId], Awaitable[SecureChannel]]:
        async def dial(to: PeerId) -> SecureChannel:
            return await self.transports[peer].dial(self.addresses[to], expected_peer=to)

        return dial

    async def member(
        self,
        peer: PeerId,
        vector: np.ndarray,
        *,
        wrap: Callable[[Callable[[bytes], Awaitable[None]]], Callable[[bytes], Awaitable[None]]]
        | None = None,
        join_wait: float | None = None,
        alive: Callable[[PeerId], Awaitable[bool]] | None = None,
    ) -> tuple[Done | Failed, bytes]:
        machine = AllReduceMachine(
            self.identities[peer],
            run_id=RUN,
            epoch=EPOCH,
            round=ROUND,
            attempt=ATTEMPT,
            members=self.order,
            length=len(vector),
            limits=self.limits,
            join_wait=join_wait,
        )
        local = vector.tobytes()
        result = bytearray(len(local))
        async with SuccessorLink(
            machine.successor, dial=self.dial_from(peer), limits=self.limits
        ) as link:
            send = link.send if wrap is None else wrap(link.send)
            outcome = await all_reduce(
                machine,
                local,
                send=send,
                inbox=self.inboxes[peer],
                add=float32_adder(local),
                result=result,
                alive=alive,
            )
            self.dials[peer] = link.dials
        return outcome, bytes(result)


@asynccontextmanager
async def listening(kind: str, n: int, limits: Limits = LIMITS) -> AsyncIterator[Ring]:
    ring = Ring(kind, IDENTITIES[:n], limits)
    host = "127.0.0.1" if kind == "tcp" else "10.0.0.1"
    async with AsyncExitStack() as stack:
        for peer in ring.order:
            transport = ring.transport(peer)
            ring.transports[peer] = transport
            running = await stack.enter_async_context(
                transport.listen(Address(host, 0), ring.handler(peer))
            )
            ring.addresses[peer] = running.addresses[0]
        yield ring


async def run_all(
    ring: Ring,
    vectors: dict[PeerId, np.ndarray],
    wraps: dict[PeerId, Callable[..., Callable[[bytes], Awaitable[None]]]] | None = None,
    **kw: Any,
) -> dict[PeerId, tuple[Done | Failed, bytes]]:
    outcomes: dict[PeerId, tuple[Done | Failed, bytes]] = {}

    async def one(peer: PeerId) -> None:
        wrap = (wraps or {}).get(peer)
        outcomes[peer] = await ring.member(peer, vectors[peer], wrap=wrap, **kw)

    # Generous: nothing here waits for a deadline, and it bounds a hang.
    with trio.fail_after(10 * ring.limits.allreduce_step_timeout + 60):
        async with trio.open_nursery() as nursery:
            for peer in vectors:
                nursery.start_soon(one, peer)
    return outcomes


def check_sum(ring: Ring, vectors: dict[PeerId, np.ndarray], outcomes: dict) -> None:
    expected = expected_sum([vectors[p] for p in ring.order])
    digests = set()
    for peer in ring.order:
        outcome, result = outcomes[peer]
        assert isinstance(outcome, Done), (peer.short, outcome)
        assert result == expected, f"{peer.short} ended with other bytes"
        digests.add(outcome.digest)
    assert len(digests) == 1
    # The weight element: the sum's last element is the total weight, exactly.
    total = np.frombuffer(expected, dtype="<f4")
    weights = sum(int(v[-1]) for v in vectors.values())
    assert total[-1] == weights


@pytest.fixture(params=["tcp", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(
    ("n", "params"),
    [(3, 1000), (5, 1000), (5, 400_000)],  # 400,000: chunks of 320 KB, added in a thread
)
async def test_every_member_ends_with_the_same_sum_bit_for_bit(
    kind: str, n: int, params: int
) -> None:
    async with listening(kind, n) as ring:
        vectors = {p: contribution(i, params) for i, p in enumerate(ring.order)}
        outcomes = await run_all(ring, vectors)
    check_sum(ring, vectors, outcomes)
    # The digest is the documented one: of the chunk digests, in chunk order.
    plan = ChunkPlan(params + 1, n)
    result = outcomes[ring.order[0]][1]
    digests = [chunk_digest(result[4 * plan.span(c)[0] : 4 * plan.span(c)[1]]) for c in range(n)]
    assert outcomes[ring.order[0]][0] == Done(result_digest(digests))
    # One connection per member per attempt, whatever the number of messages; nothing left.
    assert all(ring.dials[p] == 1 for p in ring.order)
    assert all(len(ring.inboxes[p]) == 0 and ring.inboxes[p].held == 0 for p in ring.order)


async def silent_member(kind: str, limits: Limits) -> None:
    async with listening(kind, 4, limits) as ring:
        silent = ring.order[1]
        vectors = {p: contribution(i, 50) for i, p in enumerate(ring.order) if p != silent}
        outcomes = await run_all(ring, vectors)
    successor = ring.order[2]
    failed = outcomes[successor][0]
    assert isinstance(failed, Failed)
    assert (failed.kind, failed.peer, failed.phase, failed.step) == (
        FailureKind.TIMEOUT,
        silent,
        Phase.REDUCE_SCATTER,
        0,
    )
    assert silent.text in failed.reason
    # Silence cascades: every member that ran ends, each naming its own predecessor.
    for i in (0, 3):
        outcome = outcomes[ring.order[i]][0]
        assert isinstance(outcome, Failed) and outcome.kind is FailureKind.TIMEOUT
        assert outcome.peer == ring.order[i - 1]


async def test_a_member_that_never_sends_is_named_by_its_successor_memory(
    autojump_clock: trio.testing.MockClock,
) -> None:
    await silent_member("memory", LIMITS)


async def test_a_member_that_never_sends_is_named_by_its_successor_tcp() -> None:
    await silent_member("tcp", SHORT)


async def test_a_long_join_wait_ends_early_when_the_silent_predecessor_does_not_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The hybrid mode's reduce-scatter may wait long (``join_wait``) for members still
    in their relay; probing the predecessor every ``probe_interval`` ends the wait
    as soon as it does not answer, naming it."""
    async with listening("memory", 4) as ring:
        silent = ring.order[1]
        vectors = {p: contribution(i, 50) for i, p in enumerate(ring.order) if p != silent}
        gave_up: list[float] = []

        async def alive(peer: PeerId) -> bool:
            if peer == silent:
                gave_up.append(trio.current_time())
            return peer != silent

        start = trio.current_time()
        join = 5 * LIMITS.allreduce_step_timeout
        outcomes = await run_all(ring, vectors, join_wait=join, alive=alive)
    failed = outcomes[ring.order[2]][0]
    assert isinstance(failed, Failed) and failed.kind is FailureKind.ABANDONED
    assert silent.text in failed.reason and "does not answer" in failed.reason
    assert gave_up == [start + LIMITS.probe_interval]  # the first probe: long before
    assert all(isinstance(outcomes[p][0], Failed) for p in vectors)


async def test_a_message_for_a_later_attempt_ends_this_one_and_waits_for_that(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A member that sends a message of attempt + 1 gave this attempt up: the member it
    sends to gives its own up ``probe_interval`` later (the current attempt's last
    messages may still be on their way), not after its deadline, and keeps the message
    for the next attempt."""
    async with listening("memory", 3) as ring:
        me, predecessor = ring.order[1], ring.order[0]
        ahead = ChunkMessage(RUN, EPOCH, ROUND, ATTEMPT + 1, Phase.REDUCE_SCATTER, 0, 2, b"")
        start = trio.current_time()

        async def moved_on() -> None:
            await trio.sleep(5)
            ring.inboxes[me].deliver(predecessor, ahead.encode())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(moved_on)
            outcome, _ = await ring.member(me, contribution(1, 50))
    assert isinstance(outcome, Failed) and outcome.kind is FailureKind.ABANDONED
    assert predecessor.text in outcome.reason and "later attempt" in outcome.reason
    assert trio.current_time() - start == 5 + LIMITS.probe_interval
    assert ring.inboxes[me].held > 0  # kept for attempt + 1


async def test_a_link_idle_for_half_the_idle_timeout_is_dialled_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The receiver closes a connection idle for ``idle_timeout``, and a write into it
    could be lost without an error: the link dials again first."""
    async with listening("memory", 2) as ring:
        a, b = ring.order
        async with SuccessorLink(b, dial=ring.dial_from(a), limits=ring.limits) as link:
            message = ChunkMessage(RUN, EPOCH, ROUND, ATTEMPT, Phase.REDUCE_SCATTER, 0, 0, b"")
            await link.send(message.encode())
            await trio.sleep(ring.limits.idle_timeout / 2 - 1)
            await link.send(message.encode())
            assert link.dials == 1
            await trio.sleep(ring.limits.idle_timeout / 2 + 1)
            await link.send(message.encode())
            assert link.dials == 2
        await trio.sleep(1)
        assert len(ring.inboxes[b]) == 3  # every message arrived


async def test_a_hostile_predecessors_bad_messages_are_refused_and_the_right_one_taken(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fedup.net")
    async with listening(kind, 3) as ring:
        hostile = ring.order[0]
        n = len(ring.order)
        sent_bad = 0

        def wrap(send: Callable[[bytes], Awaitable[None]]) -> Callable[[bytes], Awaitable[None]]:
            async def hostile_send(data: bytes) -> None:
                nonlocal sent_bad
                m = decode_chunk_message(data, max_payload=1 << 20)
                if sent_bad == 0:  # before its first real message: four bad ones
                    nan = np.frombuffer(m.data, dtype="<f4").copy()
                    nan[0] = np.nan
                    for bad in (
                        b"\xa9" + data[1:13] + b"\xff garbage",  # looks like one; is not CBOR
                        attrs.evolve(m, chunk=(m.chunk + 1) % n).encode(),  # the wrong chunk
                        attrs.evolve(m, data=m.data[:-4]).encode(),  # a short payload
                        attrs.evolve(m, data=nan.tobytes()).encode(),  # NaN
                    ):
                        assert is_allreduce_frame(bad)
                        await send(bad)
                        sent_bad += 1
                await send(data)

            return hostile_send

        vectors = {p: contribution(i + 10, 200) for i, p in enumerate(ring.order)}
        outcomes = await run_all(ring, vectors, {hostile: wrap})
    assert sent_bad == 4
    check_sum(ring, vectors, outcomes)
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("all-reduce refused") and hostile.text in r.getMessage()
    ]
    kinds = sorted(line.split("(")[1].split(")")[0] for line in refusals)
    assert kinds == ["bad-size", "malformed", "not-finite", "out-of-order"], refusals
