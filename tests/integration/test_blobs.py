"""Blob transfers between two peers: memory streams in virtual time, real TCP + SecureChannel."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import outcome
import pytest
import torch
import trio
import trio.testing
from torch import nn

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConnectionLostError, PeerTimeoutError, RemoteProtocolError
from fedup.identity import Identity
from fedup.learn.weights import bytes_to_state, state_to_bytes
from fedup.net.blobs import ReceivedBlob, receive_blob, send_blob
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, loopback_channel_pair
from fedup.protocol.blob import (
    BlobDataError,
    BlobDigestError,
    BlobEpochError,
    BlobHeader,
    BlobRecipientError,
    BlobRefusedError,
    BlobReplayError,
    BlobReplayGuard,
    BlobReply,
    BlobReplyError,
    BlobSizeError,
    BlobTruncatedError,
    Buffer,
    blob_digest,
    blob_header_id,
    iter_chunks,
    seal_blob_end,
    seal_blob_header,
)
from fedup.protocol.refusal import REASON_MAX_BYTES, RefusalCode
from fedup.protocol.tensors import TensorDecodeError

ALICE = Identity(b"\x01" * 32)
BOB = Identity(b"\x02" * 32)
CAROL = Identity(b"\x03" * 32)
RUN = bytes(range(16))
LIMITS = attrs.evolve(
    DEFAULT_LIMITS,
    blob_chunk_size=1024,
    blob_timeout=10.0,
    frame_timeout=30.0,
    idle_timeout=60.0,
)


FINISHED: dict[str, float] = {}
"""When each side of the last :func:`both` call finished (trio time)."""


def framed_pair(limits: Limits = LIMITS) -> tuple[FramedStream, FramedStream]:
    """(Alice's end, Bob's end); each names the peer at the other end."""
    a, b = trio.testing.memory_stream_pair()
    return (
        FramedStream(a, peer=BOB.peer_id.text, limits=limits),
        FramedStream(b, peer=ALICE.peer_id.text, limits=limits),
    )


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    model(torch.randn(8, 10))  # move the batch-norm statistics away from their defaults
    return model


async def send(
    stream: FramedStream, data: Buffer, *, lap: int = 1, hop: int = 1, **kw: Any
) -> bytes:
    args: dict[str, Any] = {
        "run_id": RUN,
        "kind": "model",
        "lap": lap,
        "hop": hop,
        "epoch": 4,
        "recipient": BOB.peer_id,
        "data": data,
    }
    args.update(kw)
    return (await send_blob(stream, ALICE, **args)).digest


async def receive(stream: FramedStream, guard: BlobReplayGuard, **kw: Any) -> ReceivedBlob:
    args: dict[str, Any] = {"me": BOB.peer_id, "remote": ALICE.peer_id, "run_id": RUN}
    args.update(kw)
    return await receive_blob(stream, guard=guard, **args)


async def both(
    sender: Callable[[], Awaitable[Any]], receiver: Callable[[], Awaitable[Any]]
) -> tuple[outcome.Outcome[Any], outcome.Outcome[Any]]:
    """Run both sides concurrently; return each side's outcome (value or error)."""
    results: dict[str, outcome.Outcome[Any]] = {}

    async def run(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        results[name] = await outcome.acapture(fn)
        FINISHED[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "send", sender)
        nursery.start_soon(run, "receive", receiver)
    return results["send"], results["receive"]


# --------------------------------------------------------------------------
# memory streams


def make_header(data: Buffer, **kw: Any) -> BlobHeader:
    fields: dict[str, Any] = {
        "run_id": RUN,
        "kind": "model",
        "lap": 1,
        "hop": 1,
        "epoch": 4,
        "sender": ALICE.peer_id,
        "recipient": BOB.peer_id,
        "size": len(data),
        "chunk_size": LIMITS.blob_chunk_size,
    }
    fields.update(kw)
    return BlobHeader(**fields)


def chunks(data: bytes) -> list[bytes]:
    return [k + bytes(p) for k, p in iter_chunks(memoryview(data), LIMITS.blob_chunk_size)]


async def test_round_trip_of_a_real_model_state() -> None:
    model = small_model()
    data = state_to_bytes(model)
    alice, bob = framed_pair()
    guard = BlobReplayGuard()
    sent, got = await both(lambda: send(alice, data, lap=2, hop=1), lambda: receive(bob, guard))
    blob: ReceivedBlob = got.unwrap()
    assert sent.unwrap() == blob.digest == blob_digest(data)
    assert blob.acknowledged
    assert blob.header == make_header(data, lap=2)
    assert blob.header.chunks == 3
    assert not blob.data.readonly and blob.data == data
    state = bytes_to_state(blob.data, like=model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert guard.high_water(RUN) == (2, 1)


async def test_large_blob_hashed_in_threads_with_default_limits() -> None:
    data = bytearray(os.urandom(5 * 1024 * 1024 + 123))
    alice, bob = framed_pair(DEFAULT_LIMITS)
    sent, got = await both(lambda: send(alice, data), lambda: receive(bob, BlobReplayGuard()))
    assert sent.unwrap() == blob_digest(data)
    blob = got.unwrap()
    assert blob.data == data and blob.header.chunks == 6


async def test_empty_blob() -> None:
    alice, bob = framed_pair()
    sent, got = await both(lambda: send(alice, b""), lambda: receive(bob, BlobReplayGuard()))
    assert sent.unwrap() == blob_digest(b"")
    assert got.unwrap().data == b""


async def test_sender_returns_only_after_the_ack(autojump_clock: trio.testing.MockClock) -> None:
    alice, bob = framed_pair()
    data = os.urandom(5000)

    async def slow_acker() -> None:
        header_frame = await bob.receive_frame()
        await bob.send_frame(BlobReply.accept(blob_header_id(header_frame)).to_cbor())
        for _ in chunks(data):
            await bob.receive_frame()
        await bob.receive_frame()  # the END
        await trio.sleep(5)
        await bob.send_frame(BlobReply.ack(blob_digest(data)).to_cbor())

    start = trio.current_time()
    sent, got = await both(lambda: send(alice, data), slow_acker)
    got.unwrap()
    assert sent.unwrap() == blob_digest(data)
    assert FINISHED["send"] - start == pytest.approx(5.0)


async def test_missing_ack_times_out(autojump_clock: trio.testing.MockClock) -> None:
    alice, bob = framed_pair()

    async def silent() -> None:
        header_frame = await bob.receive_frame()
        await bob.send_frame(BlobReply.accept(blob_header_id(header_frame)).to_cbor())
        await trio.sleep(1000)

    start = trio.current_time()
    sent, _ = await both(lambda: send(alice, b"x" * 10), silent)
    with pytest.raises(PeerTimeoutError, match="did not take the model blob lap 1 hop 1") as info:
        sent.unwrap()
    assert info.value.peer == BOB.peer_id.text
    assert FINISHED["send"] - start == pytest.approx(LIMITS.blob_timeout)


async def test_wrong_reply_is_an_error() -> None:
    alice, bob = framed_pair()

    async def confused() -> None:
        await bob.receive_frame()
        await bob.send_frame(BlobReply.ack(b"\0" * 32).to_cbor())  # ACK before any data

    sent, _ = await both(lambda: send(alice, b"abc"), confused)
    with pytest.raises(BlobReplyError, match=r"answered ACK where ACCEPT .* was due"):
        sent.unwrap()


async def test_nack_reason_from_check_propagates() -> None:
    model = small_model()
    data = state_to_bytes(model)
    alice, bob = framed_pair()
    guard = BlobReplayGuard()

    def check(header: BlobHeader, blob: memoryview) -> None:
        bytes_to_state(blob, like=nn.Linear(2, 2))  # not the model we expect

    sent, got = await both(lambda: send(alice, data), lambda: receive(bob, guard, check=check))
    with pytest.raises(TensorDecodeError, match="missing tensors") as rx:
        got.unwrap()
    assert rx.value.peer == ALICE.peer_id.text
    with pytest.raises(BlobRefusedError, match=r"refused the model blob .*: missing tensors") as tx:
        sent.unwrap()
    assert tx.value.peer == BOB.peer_id.text
    assert tx.value.code is RefusalCode.MALFORMED  # an error without a code of its own
    assert guard.high_water(RUN) is None  # nothing was accepted


class WrongState(RemoteProtocolError):
    code = RefusalCode.BAD_STATE


async def test_check_errors_carry_their_code_and_long_reasons_arrive_cut() -> None:
    alice, bob = framed_pair()
    reason = "é" * 300  # 600 bytes of UTF-8: more than a NACK carries

    def check(header: BlobHeader, blob: memoryview) -> None:
        raise WrongState(reason)

    sent, got = await both(
        lambda: send(alice, b"abc"), lambda: receive(bob, BlobReplayGuard(), check=check)
    )
    with pytest.raises(WrongState):
        got.unwrap()
    with pytest.raises(BlobRefusedError) as tx:
        sent.unwrap()
    assert tx.value.code is RefusalCode.BAD_STATE
    quoted = tx.value.reason.split(": ", 1)[1]
    assert len(quoted.encode()) <= REASON_MAX_BYTES
    assert quoted == "é" * ((REASON_MAX_BYTES - 3) // 2) + "..."  # cut between characters


async def test_digest_mismatch_is_refused() -> None:
    alice, bob = framed_pair()
    data = os.urandom(3000)
    header = make_header(data)
    replies: list[BlobReply] = []

    async def lying_sender() -> None:
        header_frame = seal_blob_header(ALICE, header, limits=LIMITS)
        await alice.send_frame(header_frame)
        replies.append(BlobReply.from_cbor(await alice.receive_frame()))
        for frame in chunks(data):
            await alice.send_frame(frame)
        await alice.send_frame(seal_blob_end(ALICE, header_frame, blob_digest(b"other")))
        replies.append(BlobReply.from_cbor(await alice.receive_frame()))

    _, got = await both(lying_sender, lambda: receive(bob, BlobReplayGuard()))
    with pytest.raises(BlobDigestError, match="digest mismatch"):
        got.unwrap()
    assert [r.kind for r in replies] == ["accept", "nack"]
    assert "digest mismatch" in replies[1].reason
    assert replies[1].code is RefusalCode.MALFORMED


async def test_replay_refused_and_receiver_stays_usable() -> None:
    alice, bob = framed_pair()
    guard = BlobReplayGuard()
    data = os.urandom(3000)
    sent, got = await both(lambda: send(alice, data, lap=3, hop=2), lambda: receive(bob, guard))
    sent.unwrap()
    got.unwrap()
    # The same lap and hop again, on the same connection: refused at the header.
    sent, got = await both(lambda: send(alice, data, lap=3, hop=2), lambda: receive(bob, guard))
    with pytest.raises(BlobReplayError, match=r"lap 3 hop 2 is not newer than lap 3 hop 2"):
        got.unwrap()
    with pytest.raises(BlobRefusedError, match=r"\(replay\?\)") as tx:
        sent.unwrap()
    assert tx.value.code is RefusalCode.STALE
    # Both sides are between blobs: the next hop goes through on the same stream.
    sent, got = await both(lambda: send(alice, data, lap=3, hop=3), lambda: receive(bob, guard))
    assert got.unwrap().header.hop == 3
    assert guard.high_water(RUN) == (3, 3)


async def test_blob_for_another_recipient_refused() -> None:
    alice, bob = framed_pair()
    sent, got = await both(
        lambda: send(alice, b"abc", recipient=CAROL.peer_id),
        lambda: receive(bob, BlobReplayGuard()),
    )
    reason = f"blob for recipient {CAROL.peer_id}, I am {BOB.peer_id}"
    with pytest.raises(BlobRecipientError) as rx:
        got.unwrap()
    assert rx.value.reason == reason and rx.value.peer == ALICE.peer_id.text
    with pytest.raises(BlobRefusedError, match=reason) as tx:
        sent.unwrap()
    assert tx.value.code is RefusalCode.WRONG_RUN


async def test_blob_of_an_old_epoch_refused_as_stale() -> None:
    alice, bob = framed_pair()
    sent, got = await both(
        lambda: send(alice, b"abc", epoch=3),
        lambda: receive(bob, BlobReplayGuard(), min_epoch=4),
    )
    with pytest.raises(BlobEpochError, match="epoch 3 is older than the current epoch 4"):
        got.unwrap()
    with pytest.raises(BlobRefusedError, match="older than the current epoch") as tx:
        sent.unwrap()
    assert tx.value.code is RefusalCode.STALE


async def test_oversize_refused_by_per_call_cap() -> None:
    alice, bob = framed_pair()
    sent, got = await both(
        lambda: send(alice, b"x" * 5000),
        lambda: receive(bob, BlobReplayGuard(), max_size=4096),
    )
    with pytest.raises(BlobSizeError, match="blob of 5000 bytes exceeds the limit of 4096"):
        got.unwrap()
    with pytest.raises(BlobRefusedError, match="exceeds the limit of 4096") as tx:
        sent.unwrap()
    assert tx.value.code is RefusalCode.TOO_LARGE


async def test_trickle_cut_off_by_blob_deadline(autojump_clock: trio.testing.MockClock) -> None:
    alice, bob = framed_pair()
    data = os.urandom(10 * LIMITS.blob_chunk_size)
    replies: list[BlobReply] = []

    async def trickler() -> None:
        await alice.send_frame(seal_blob_header(ALICE, make_header(data), limits=LIMITS))
        replies.append(BlobReply.from_cbor(await alice.receive_frame()))
        for frame in chunks(data):  # each chunk well within the idle and frame deadlines
            await trio.sleep(3)
            await alice.send_frame(frame)
        replies.append(BlobReply.from_cbor(await alice.receive_frame()))

    start = trio.current_time()
    _, got = await both(trickler, lambda: receive(bob, BlobReplayGuard()))
    with pytest.raises(PeerTimeoutError, match=r"did not deliver .* within 10 s") as info:
        got.unwrap()
    assert info.value.peer == ALICE.peer_id.text
    assert FINISHED["receive"] - start == pytest.approx(LIMITS.blob_timeout)
    assert [r.kind for r in replies] == ["accept", "nack"]
    assert "blob deadline passed" in replies[1].reason
    assert replies[1].code is RefusalCode.TIMEOUT


async def test_threaded_hashing_cut_off_by_blob_deadline_in_real_time() -> None:
    # Virtual time does not wait for threads, so this one runs on the real clock.
    limits = attrs.evolve(LIMITS, blob_timeout=0.5)
    alice, bob = framed_pair(limits)
    data = os.urandom(10 * LIMITS.blob_chunk_size)

    async def trickler() -> None:
        await alice.send_frame(seal_blob_header(ALICE, make_header(data), limits=limits))
        await alice.receive_frame()
        for frame in chunks(data):
            await trio.sleep(0.1)
            await alice.send_frame(frame)

    start = trio.current_time()
    _, got = await both(
        trickler, lambda: receive(bob, BlobReplayGuard(), limits=limits, hash_in_thread=True)
    )
    with pytest.raises(PeerTimeoutError, match=r"within 0.5 s \(got [1-5]\d{3} bytes\)"):
        got.unwrap()
    assert 0.5 <= FINISHED["receive"] - start < 1.5


@pytest.mark.parametrize("threads", [False, True])
async def test_hashing_inline_or_in_threads_give_the_same_result(threads: bool) -> None:
    data = os.urandom(3 * LIMITS.blob_chunk_size + 5)
    alice, bob = framed_pair()
    sent, got = await both(
        lambda: send(alice, data, hash_in_thread=threads),
        lambda: receive(bob, BlobReplayGuard(), hash_in_thread=threads),
    )
    assert sent.unwrap() == got.unwrap().digest == blob_digest(data)


async def test_bad_chunk_in_threaded_receive_is_refused() -> None:
    alice, bob = framed_pair()
    data = os.urandom(3000)
    replies: list[BlobReply] = []

    async def bad_sender() -> None:
        await alice.send_frame(seal_blob_header(ALICE, make_header(data), limits=LIMITS))
        replies.append(BlobReply.from_cbor(await alice.receive_frame()))
        await alice.send_frame(chunks(data)[0])
        await alice.send_frame(b"\x01" + b"short")
        replies.append(BlobReply.from_cbor(await alice.receive_frame()))

    _, got = await both(bad_sender, lambda: receive(bob, BlobReplayGuard(), hash_in_thread=True))
    with pytest.raises(BlobDataError, match="every chunk but the last carries exactly 1024"):
        got.unwrap()
    assert [r.kind for r in replies] == ["accept", "nack"]
    assert replies[1].code is RefusalCode.MALFORMED


@pytest.mark.parametrize(("sent_chunks", "where"), [(2, "before the last chunk"), (5, "END")])
async def test_truncated_stream(sent_chunks: int, where: str) -> None:
    alice, bob = framed_pair()
    data = os.urandom(5000)

    async def truncating() -> None:
        await alice.send_frame(seal_blob_header(ALICE, make_header(data), limits=LIMITS))
        await alice.receive_frame()
        for frame in chunks(data)[:sent_chunks]:
            await alice.send_frame(frame)
        await alice.aclose()

    _, got = await both(truncating, lambda: receive(bob, BlobReplayGuard()))
    with pytest.raises(BlobTruncatedError, match=where) as info:
        got.unwrap()
    assert isinstance(info.value, ConnectionLostError)
    assert info.value.peer == ALICE.peer_id.text


async def test_sender_reports_the_nack_left_before_a_hang_up() -> None:
    alice, bob = framed_pair()
    data = os.urandom(20 * LIMITS.blob_chunk_size)

    async def refuse_mid_transfer() -> None:
        header_frame = await bob.receive_frame()
        await bob.send_frame(BlobReply.accept(blob_header_id(header_frame)).to_cbor())
        await bob.receive_frame()
        await bob.send_frame(BlobReply.nack(RefusalCode.BUSY, "no room\n").to_cbor())
        await bob.aclose()

    sent, _ = await both(lambda: send(alice, data), refuse_mid_transfer)
    with pytest.raises(BlobRefusedError, match=r"refused the model blob .*: no room\\n$") as tx:
        sent.unwrap()
    assert tx.value.code is RefusalCode.BUSY and tx.value.peer == BOB.peer_id.text
    assert isinstance(tx.value.__cause__, ConnectionLostError)


async def test_sender_sees_connection_loss() -> None:
    alice, bob = framed_pair()

    async def hang_up() -> None:
        await bob.receive_frame()
        await bob.aclose()

    sent, _ = await both(lambda: send(alice, b"abc"), hang_up)
    with pytest.raises(ConnectionLostError):
        sent.unwrap()


# --------------------------------------------------------------------------
# real loopback TCP through the secure channel


async def test_over_loopback_tcp_and_secure_channel() -> None:
    model = small_model()
    model_blob = state_to_bytes(model)
    big = bytearray(os.urandom(3 * 1024 * 1024 + 7))
    guard = BlobReplayGuard()
    pair = loopback_channel_pair(Credentials(ALICE, "test"), Credentials(BOB, "test"))
    async with pair as (a_chan, b_chan):
        assert b_chan.remote_peer == ALICE.peer_id and a_chan.remote_peer == BOB.peer_id
        alice = FramedStream(a_chan, peer=BOB.peer_id.text)
        bob = FramedStream(b_chan, peer=ALICE.peer_id.text)
        blobs: list[Buffer] = [model_blob, big]
        for hop, data in enumerate(blobs, start=1):
            sent, got = await both(
                lambda: send(alice, data, hop=hop),  # noqa: B023
                lambda: receive(bob, guard, remote=b_chan.remote_peer),
            )
            assert sent.unwrap() == blob_digest(data)
            blob = got.unwrap()
            assert blob.data == data and blob.header.hop == hop
        state = bytes_to_state(model_blob, like=model)
        assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
