"""SecureChannel over memory streams: the trio Stream contract, records, deadlines.

Deadlines are tested in virtual time (pytest-trio's ``autojump_clock``) and
asserted to the exact virtual second.
"""

from __future__ import annotations

import hashlib
import random

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConnectionLostError, PeerTimeoutError, RemoteProtocolError
from fedup.identity import Identity
from fedup.net.channel import (
    ChannelError,
    ChannelFrameError,
    ChannelLostError,
    ChannelTimeoutError,
    SecureChannel,
    max_record_plaintext,
)
from fedup.net.transport import Credentials, upgrade_inbound, upgrade_outbound
from fedup.protocol.framing import FrameDecoder, FrameError, encode_frame
from fedup.protocol.handshake import AbortCode, HandshakeError, InitiatorHandshake, encode_abort
from fedup.protocol.records import Address, PeerRecord

ALICE = Identity(b"\x01" * 32)
BOB = Identity(b"\x02" * 32)
NET = "lenders"


async def connect(
    left: trio.abc.Stream,
    right: trio.abc.Stream,
    *,
    limits: Limits = DEFAULT_LIMITS,
    alice: Credentials | None = None,
    bob: Credentials | None = None,
) -> tuple[SecureChannel, SecureChannel]:
    """Run both sides of the handshake over ``left``/``right``; returns (ALICE's, BOB's) channel."""
    channels: dict[str, SecureChannel] = {}

    async def dial() -> None:
        channels["a"] = await upgrade_outbound(
            left,
            peer="bob-address",
            credentials=alice or Credentials(ALICE, NET),
            limits=limits,
            expected_peer=BOB.peer_id,
        )

    async def accept() -> None:
        channels["b"] = await upgrade_inbound(
            right, peer="alice-address", credentials=bob or Credentials(BOB, NET), limits=limits
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial)
        nursery.start_soon(accept)
    return channels["a"], channels["b"]


async def memory_pair(limits: Limits = DEFAULT_LIMITS) -> tuple[SecureChannel, SecureChannel]:
    return await connect(*trio.testing.memory_stream_pair(), limits=limits)


async def clogged_pair() -> tuple[SecureChannel, SecureChannel]:
    return await connect(*trio.testing.lockstep_stream_pair())


# -- the trio Stream contract -----------------------------------------------------------------


async def test_check_two_way_stream() -> None:
    await trio.testing.check_two_way_stream(memory_pair, clogged_pair)


async def test_channel_errors_are_both_fedup_and_trio_errors() -> None:
    for cls in (ChannelError, ChannelTimeoutError, ChannelLostError, ChannelFrameError):
        assert issubclass(cls, RemoteProtocolError)
        assert issubclass(cls, trio.BrokenResourceError)
    assert issubclass(ChannelTimeoutError, PeerTimeoutError)
    assert issubclass(ChannelLostError, ConnectionLostError)
    assert issubclass(ChannelFrameError, FrameError)


# -- what the channel carries -----------------------------------------------------------------


async def test_identities_and_transcript_are_exposed() -> None:
    rec_a = PeerRecord(ALICE.peer_id, 1, (Address("10.0.0.1", 4100),), NET).seal(ALICE)
    rec_b = PeerRecord(BOB.peer_id, 1, (Address("10.0.0.2", 4100),), NET).seal(BOB)
    left, right = trio.testing.memory_stream_pair()
    a, b = await connect(
        left,
        right,
        alice=Credentials(ALICE, NET, local_record=rec_a),
        bob=Credentials(BOB, NET, local_record=rec_b),
    )
    assert a.remote_peer == BOB.peer_id and b.remote_peer == ALICE.peer_id
    assert a.remote_record == rec_b and b.remote_record == rec_a
    assert a.transcript_hash == b.transcript_hash
    assert a.transport_stream is left


async def test_large_transfer_round_trip_in_records_within_the_frame_limit() -> None:
    limits = attrs.evolve(DEFAULT_LIMITS, max_frame_size=64 * 1024)
    a, b = await memory_pair(limits)
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 12345)
    frames: list[int] = []
    original = a._framed.send_frame

    async def spy(payload: bytes | bytearray | memoryview) -> None:
        frames.append(len(payload))
        await original(payload)

    a._framed.send_frame = spy  # type: ignore[method-assign]
    echoed = bytearray()
    expected = data + data[:10]

    async def echo() -> None:
        while chunk := await b.receive_some():
            await b.send_all(chunk)
        await b.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        await a.send_all(data)
        await a.send_all(memoryview(data)[:10])
        frames_before_close = len(frames)
        while len(echoed) < len(expected):
            chunk = await a.receive_some(100_000)
            assert 0 < len(chunk) <= 100_000
            echoed.extend(chunk)
        await a.aclose()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(expected).digest()
    record = max_record_plaintext(limits)
    assert record == 64 * 1024 - 17
    # header, then full records, then the rest, then 10 bytes; then close-notify (17 bytes)
    assert frames[0] == 24
    assert max(frames) == limits.max_frame_size
    assert frames_before_close == 1 + -(-len(data) // record) + 1
    assert frames[-1] == 17


async def test_a_record_is_received_whole() -> None:
    a, b = await memory_pair()
    payload = bytes(1024 * 1024)
    await a.send_all(payload)
    got = await b.receive_some()
    assert got == payload  # a whole record comes back in one piece


async def test_close_notify_is_a_clean_end() -> None:
    a, b = await memory_pair()
    await a.send_all(b"last words")
    await a.aclose()
    assert await b.receive_some() == b"last words"
    assert await b.receive_some() == b""
    assert await b.receive_some() == b""  # and it stays ended


async def test_close_without_sending_still_sends_header_and_close_notify() -> None:
    a, b = await memory_pair()
    await a.aclose()
    assert await b.receive_some() == b""


async def test_truncation_is_detected() -> None:
    a, b = await memory_pair()
    await a.send_all(b"partial")
    await a.transport_stream.aclose()  # the transport ends without close-notify
    assert await b.receive_some() == b"partial"
    with pytest.raises(ChannelLostError) as info:
        await b.receive_some()
    assert "truncated: connection ended without close-notify" in str(info.value)
    assert info.value.peer == ALICE.peer_id.text
    with pytest.raises(ChannelLostError):  # the channel stays broken
        await b.receive_some()


async def test_forged_record_fails_authentication_and_breaks_the_channel() -> None:
    a, b = await memory_pair()
    await a.send_all(b"genuine")
    assert await b.receive_some() == b"genuine"
    await a.transport_stream.send_all(encode_frame(bytes(40), max_size=1 << 20))
    with pytest.raises(ChannelError) as info:
        await b.receive_some()
    assert "record failed authentication" in info.value.reason
    assert type(info.value) is ChannelError
    await a.send_all(b"more")  # even a genuine record is refused now
    with pytest.raises(ChannelError):
        await b.receive_some()


async def test_abort_instead_of_stream_header_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = await memory_pair()
    await b.transport_stream.send_all(
        encode_frame(encode_abort(AbortCode.SELF_DIAL, "no"), max_size=1 << 20)
    )
    with pytest.raises(ChannelError) as info:
        await a.receive_some()
    assert "rejected the handshake" in info.value.reason
    assert "dialed itself" in info.value.reason


async def test_oversized_frame_is_refused_before_reading_it() -> None:
    limits = attrs.evolve(DEFAULT_LIMITS, max_frame_size=4096)
    a, b = await memory_pair(limits)
    await a.transport_stream.send_all((4097).to_bytes(4, "big"))
    with pytest.raises(ChannelFrameError) as info:
        await b.receive_some()
    assert "exceeds the limit of 4096" in info.value.reason


async def test_send_fails_cleanly_when_the_peer_is_gone() -> None:
    a, b = await memory_pair()
    await trio.aclose_forcefully(b)
    with pytest.raises(ChannelLostError):
        for _ in range(100):
            await a.send_all(b"x" * 100)


# -- deadlines in virtual time -------------------------------------------------------------------

SHORT = attrs.evolve(DEFAULT_LIMITS, handshake_timeout=3.0, idle_timeout=7.0, frame_timeout=10.0)


async def test_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    _, b = await memory_pair(SHORT)
    start = trio.current_time()
    with pytest.raises(ChannelTimeoutError) as info:
        await b.receive_some()
    assert trio.current_time() - start == pytest.approx(7.0)
    assert isinstance(info.value, PeerTimeoutError)
    assert "sent nothing for 7 s" in info.value.reason
    assert info.value.peer == ALICE.peer_id.text


async def test_trickle_is_cut_at_the_frame_deadline(autojump_clock: trio.testing.MockClock) -> None:
    """One byte a second: every read is quick (< idle 7 s), the frame is not (> 10 s)."""
    a, b = await memory_pair(SHORT)
    raw = a.transport_stream
    start = trio.current_time()

    async def trickle() -> None:
        for byte in (100).to_bytes(4, "big") + bytes(100):
            await raw.send_all(bytes([byte]))
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(ChannelTimeoutError) as info:
            await b.receive_some()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(10.0)
    assert "did not complete a frame within 10 s" in info.value.reason


async def test_trickle_after_an_idle_pause_gets_the_full_frame_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = attrs.evolve(SHORT, idle_timeout=60.0)
    a, b = await memory_pair(limits)
    raw = a.transport_stream
    start = trio.current_time()

    async def trickle() -> None:
        await trio.sleep(20.0)  # a legitimate pause, well within the idle timeout
        for byte in (100).to_bytes(4, "big") + bytes(100):
            await raw.send_all(bytes([byte]))
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(ChannelTimeoutError):
            await b.receive_some()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(30.0), trio.current_time() - start


async def test_a_dialer_that_says_nothing_is_cut_at_the_first_frame_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, right = trio.testing.memory_stream_pair()  # the dialer connects and says nothing
    start = trio.current_time()
    with pytest.raises(PeerTimeoutError) as info:
        await upgrade_inbound(
            right, peer="10.9.9.9:5000", credentials=Credentials(BOB, NET), limits=SHORT
        )
    assert SHORT.first_frame_timeout < SHORT.handshake_timeout
    assert trio.current_time() - start == pytest.approx(SHORT.first_frame_timeout)
    assert f"sent no handshake within {SHORT.first_frame_timeout:g} s" in info.value.reason
    assert info.value.peer == "10.9.9.9:5000"


async def test_handshake_timeout_responder(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.memory_stream_pair()
    msg1 = InitiatorHandshake(ALICE, network=NET).start()
    await left.send_all(encode_frame(msg1, max_size=1 << 16))  # then nothing: no msg3
    start = trio.current_time()
    with pytest.raises(PeerTimeoutError) as info:
        await upgrade_inbound(
            right, peer="10.9.9.9:5000", credentials=Credentials(BOB, NET), limits=SHORT
        )
    assert trio.current_time() - start == pytest.approx(3.0)
    assert "handshake did not complete within 3 s" in info.value.reason
    assert info.value.peer == "10.9.9.9:5000"


async def test_handshake_timeout_initiator_with_a_slow_responder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline covers the whole handshake, not each read: 2.5 s + 2.5 s > 3 s."""
    left, right = trio.testing.memory_stream_pair()
    decoder = FrameDecoder(max_size=1 << 16)

    async def slow_responder() -> None:
        while not list(decoder.frames()):  # wait for msg1
            decoder.feed(await right.receive_some())
        await trio.sleep(2.5)
        await right.send_all((200).to_bytes(4, "big") + bytes(100))
        await trio.sleep(2.5)
        await right.send_all(bytes(100))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_responder)
        with pytest.raises(PeerTimeoutError):
            await upgrade_outbound(
                left, peer="bob-address", credentials=Credentials(ALICE, NET), limits=SHORT
            )
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(3.0)


async def test_handshake_failure_closes_the_stream_after_the_abort() -> None:
    left, right = trio.testing.memory_stream_pair()

    async def dial() -> None:
        with pytest.raises(HandshakeError) as info:
            await upgrade_outbound(
                left, peer="bob-address", credentials=Credentials(ALICE, "other"), limits=SHORT
            )
        assert info.value.code == "wrong-network"
        assert info.value.peer == "bob-address"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dial)
        with pytest.raises(HandshakeError) as info:
            await upgrade_inbound(
                right, peer="alice-address", credentials=Credentials(BOB, NET), limits=SHORT
            )
    assert info.value.code == "wrong-network"
    assert info.value.peer == "alice-address"
    with pytest.raises(trio.ClosedResourceError):
        await right.send_all(b"x")
