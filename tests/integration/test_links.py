"""Ring links over an in-memory network: one dial for many blobs, replies and messages apart."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.errors import RemoteProtocolError
from fedup.identity import Identity
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.links import OutboundLink, classify, serve_link
from fedup.net.transport import Credentials, MemoryNetwork
from fedup.protocol import cbor
from fedup.protocol.blob import (
    BlobHeader,
    BlobRefusedError,
    BlobReply,
    blob_digest,
    seal_blob_header,
)
from fedup.protocol.messages import Link, Message, Passed, decode_message, encode_message
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address
from fedup.protocol.refusal import RefusalCode

ALICE = Identity(b"\x01" * 32)  # the predecessor: sends blobs
BOB = Identity(b"\x02" * 32)  # the successor: serves the link
RUN = bytes(range(16))
NET = "links"
LIMITS = attrs.evolve(
    DEFAULT_LIMITS,
    blob_chunk_size=1024,
    handshake_timeout=5.0,
    frame_timeout=10.0,
    blob_timeout=30.0,
    idle_timeout=600.0,
)
SERVER_IDLE = 20.0
"""Bob closes a link on which nothing arrived for this long (Alice's side waits longer)."""


def blob_bytes(i: int, size: int = 3000) -> bytes:
    return bytes((i * 7 + k) % 251 for k in range(size))


class Refusal(RemoteProtocolError):
    """What the custody machine raises to refuse a blob: a code, maybe a proof."""

    def __init__(self, reason: str, code: RefusalCode, proof: tuple[bytes, ...] = ()) -> None:
        super().__init__(reason)
        self.code = code
        self.proof = proof


@attrs.define
class Bob:
    """The serving side: a listener whose handler serves every link that opens."""

    refuse_header: Refusal | None = None
    refuse_blob: Refusal | None = None
    receipts: bool = True
    blobs: list[tuple[BlobHeader, bytes, bytes]] = attrs.Factory(list)
    messages: list[tuple[PeerId, Message]] = attrs.Factory(list)
    links: list[FramedStream] = attrs.Factory(list)
    scopes: list[trio.CancelScope] = attrs.Factory(list)
    ended: int = 0
    taken: int = 0

    def admit(self, header: BlobHeader) -> None:
        if self.refuse_header is not None:
            raise self.refuse_header

    def decide(self, header: BlobHeader, data: memoryview, digest: bytes) -> bytes | None:
        if self.refuse_blob is not None:
            raise self.refuse_blob
        self.blobs.append((header, bytes(data), digest))
        return b"receipt for hop %d" % header.hop if self.receipts else None

    def on_message(self, peer: PeerId, message: Message) -> None:
        self.messages.append((peer, message))

    def on_taken(self) -> None:
        self.taken += 1

    async def handler(self, channel: SecureChannel) -> None:
        limits = attrs.evolve(LIMITS, idle_timeout=SERVER_IDLE)
        framed = FramedStream(channel, peer=channel.remote_peer.text, limits=limits)
        first = decode_message(await framed.receive_frame(), limits=limits)
        assert first == Link(RUN)
        self.links.append(framed)
        with trio.CancelScope() as scope:
            self.scopes.append(scope)
            await serve_link(
                framed,
                channel.remote_peer,
                me=BOB.peer_id,
                run_id=RUN,
                admit=self.admit,
                decide=self.decide,
                on_message=self.on_message,
                limits=limits,
                hash_in_thread=False,
                taken=self.on_taken,
            )
        self.ended += 1


@attrs.define
class Alice:
    link: OutboundLink
    messages: list[tuple[PeerId, Message]]
    got_message: trio.Event

    async def send(self, hop: int, data: bytes) -> Any:
        return await self.link.send_blob(kind="model", lap=1, hop=hop, epoch=1, data=data)


@asynccontextmanager
async def linked(bob: Bob) -> AsyncIterator[Alice]:
    net = MemoryNetwork()
    server = net.transport(Credentials(BOB, NET), limits=LIMITS)
    client = net.transport(Credentials(ALICE, NET), limits=LIMITS)
    async with server.listen(Address("10.0.0.2", 0), bob.handler) as listener:
        (address,) = listener.addresses

        async def dial(peer: PeerId) -> SecureChannel:
            return await client.dial(address, expected_peer=peer)

        messages: list[tuple[PeerId, Message]] = []
        got = trio.Event()

        def on_message(peer: PeerId, message: Message) -> None:
            messages.append((peer, message))
            got.set()

        async with trio.open_nursery() as nursery:
            link = OutboundLink(
                BOB.peer_id,
                run_id=RUN,
                identity=ALICE,
                dial=dial,
                on_message=on_message,
                limits=LIMITS,
                nursery=nursery,
                hash_in_thread=False,
            )
            try:
                yield Alice(link, messages, got)
            finally:
                await link.aclose()


async def wait_until(condition: Callable[[], bool], *, within: float = 60.0) -> None:
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.1)


# --------------------------------------------------------------------------
# one link, many blobs


async def test_many_blobs_over_one_dial(autojump_clock: trio.testing.MockClock) -> None:
    bob = Bob()
    async with linked(bob) as alice:
        assert not alice.link.connected and alice.link.dials == 0
        sent = []
        for hop in range(4):
            sent.append(await alice.send(hop, blob_bytes(hop)))
            assert alice.link.connected
        assert alice.link.dials == 1 and len(bob.links) == 1
        for hop, blob in enumerate(sent):
            assert blob.receipt == b"receipt for hop %d" % hop
            assert blob.digest == blob_digest(blob_bytes(hop))
        assert [(h.hop, data) for h, data, _ in bob.blobs] == [
            (hop, blob_bytes(hop)) for hop in range(4)
        ]
        assert all(
            h.sender == ALICE.peer_id and h.recipient == BOB.peer_id for h, _, _ in bob.blobs
        )
        await wait_until(lambda: bob.taken == 4)


async def test_a_blob_that_gets_no_receipt(autojump_clock: trio.testing.MockClock) -> None:
    bob = Bob(receipts=False)
    async with linked(bob) as alice:
        blob = await alice.send(0, b"")
        assert blob.receipt is None and blob.digest == blob_digest(b"")


async def test_passed_travels_both_ways_on_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bob = Bob()
    async with linked(bob) as alice:
        await alice.send(0, blob_bytes(0))
        passed = Passed(RUN, b"the next member's receipt")
        await bob.links[0].send_frame(encode_message(passed))
        with trio.fail_after(5):
            await alice.got_message.wait()
        assert alice.messages == [(BOB.peer_id, passed)]
        # the link still carries blobs after a message, on the same connection
        assert (await alice.send(1, blob_bytes(1))).receipt == b"receipt for hop 1"
        back = Passed(RUN, b"ours")
        await alice.link.send_message(back)
        await wait_until(lambda: bool(bob.messages))
        assert bob.messages == [(ALICE.peer_id, back)]
        assert alice.link.dials == 1 and len(bob.links) == 1


async def test_a_message_before_any_blob_dials_the_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bob = Bob()
    async with linked(bob) as alice:
        await alice.link.send_message(Passed(RUN, b"r"))
        await wait_until(lambda: bool(bob.messages))
        assert alice.link.dials == 1
        await alice.send(0, blob_bytes(0))
        assert alice.link.dials == 1


# --------------------------------------------------------------------------
# the serving side ends the link


async def test_after_the_server_closes_for_idleness_the_next_send_dials_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bob = Bob()
    async with linked(bob) as alice:
        await alice.send(0, blob_bytes(0))
        start = trio.current_time()
        await wait_until(lambda: bob.ended == 1)
        assert trio.current_time() - start == pytest.approx(SERVER_IDLE, abs=0.2)
        await wait_until(lambda: not alice.link.connected)
        blob = await alice.send(1, blob_bytes(1))
        assert blob.receipt == b"receipt for hop 1"
        assert alice.link.dials == 2 and len(bob.links) == 2


async def test_after_the_server_ends_the_link_the_next_send_dials_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bob = Bob()
    async with linked(bob) as alice:
        await alice.send(0, blob_bytes(0))
        bob.scopes[0].cancel()
        await wait_until(lambda: not alice.link.connected)
        assert (await alice.send(1, blob_bytes(1))).receipt == b"receipt for hop 1"
        assert alice.link.dials == 2 and bob.ended == 1


# --------------------------------------------------------------------------
# refusals


PROOF = (b"notice one", b"notice two")


@pytest.mark.parametrize("where", ["admit", "decide"])
@pytest.mark.parametrize(
    ("code", "proof"),
    [(RefusalCode.EXCLUDED, PROOF), (RefusalCode.BAD_STATE, ())],
)
async def test_a_refusal_arrives_with_its_code_and_proof_and_the_link_redials(
    autojump_clock: trio.testing.MockClock,
    where: str,
    code: RefusalCode,
    proof: tuple[bytes, ...],
) -> None:
    bob = Bob()
    refusal = Refusal("not from you", code, proof)
    async with linked(bob) as alice:
        await alice.send(0, blob_bytes(0))
        if where == "admit":
            bob.refuse_header = refusal
        else:
            bob.refuse_blob = refusal
        with pytest.raises(BlobRefusedError, match="not from you") as info:
            await alice.send(1, blob_bytes(1))
        assert info.value.code is code and info.value.proof == proof
        assert info.value.peer == BOB.peer_id.text
        await wait_until(lambda: bob.ended == 1)
        assert not alice.link.connected
        bob.refuse_header = bob.refuse_blob = None
        assert (await alice.send(2, blob_bytes(2))).receipt == b"receipt for hop 2"
        assert alice.link.dials == 2 and len(bob.links) == 2
        assert [h.hop for h, _, _ in bob.blobs] == [0, 2]


async def test_a_refused_first_blob_then_a_taken_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bob = Bob(refuse_header=Refusal("busy", RefusalCode.BUSY))
    async with linked(bob) as alice:
        with pytest.raises(BlobRefusedError) as info:
            await alice.send(0, blob_bytes(0))
        assert info.value.code is RefusalCode.BUSY and info.value.proof == ()
        bob.refuse_header = None
        assert (await alice.send(0, blob_bytes(0))).receipt == b"receipt for hop 0"
        assert alice.link.dials == 2


async def test_a_closed_link_does_not_dial(autojump_clock: trio.testing.MockClock) -> None:
    bob = Bob()
    async with linked(bob) as alice:
        await alice.send(0, blob_bytes(0))
        await alice.link.aclose()
        assert not alice.link.connected
        with pytest.raises(RemoteProtocolError, match="the link was closed"):
            await alice.send(1, blob_bytes(1))
        assert alice.link.dials == 1
        await wait_until(lambda: bob.ended == 1)


# --------------------------------------------------------------------------
# classify


def a_header() -> BlobHeader:
    return BlobHeader(
        run_id=RUN,
        kind="model",
        lap=1,
        hop=2,
        epoch=1,
        sender=ALICE.peer_id,
        recipient=BOB.peer_id,
        size=10,
        chunk_size=LIMITS.blob_chunk_size,
    )


@pytest.mark.parametrize(
    "message",
    [Passed(RUN, b"receipt"), Link(RUN)],
    ids=["passed", "link"],
)
def test_classify_finds_control_messages(message: Message) -> None:
    assert classify(encode_message(message), LIMITS) == message


@pytest.mark.parametrize(
    "frame",
    [
        seal_blob_header(ALICE, a_header(), limits=LIMITS),
        BlobReply.accept(b"\0" * 32).to_cbor(),
        BlobReply.ack(b"\0" * 32, b"receipt").to_cbor(),
        BlobReply.nack(RefusalCode.EXCLUDED, "dead", PROOF).to_cbor(),
        b"\x01" + b"chunk data",
        b"\x02" + b"last chunk",
        b"\x02",
        b"",
        b"\xff\xfe not cbor",
        cbor.encode({"type": "passed"}),
        cbor.encode([1, 2]),
    ],
    ids=[
        "header",
        "accept",
        "ack",
        "nack",
        "chunk",
        "last-chunk",
        "empty-last-chunk",
        "empty",
        "garbage",
        "map-without-t",
        "array",
    ],
)
def test_classify_leaves_blob_frames_to_the_blob_layer(frame: bytes) -> None:
    assert classify(frame, LIMITS) is None


@pytest.mark.parametrize(
    "value",
    [{"t": "no-such-message"}, {"t": "passed"}, {"t": "passed", "run": RUN, "x": 1}, {"t": 3}],
)
def test_classify_refuses_a_malformed_message(value: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError):
        classify(cbor.encode(value), LIMITS)
