"""FramedStream deadlines and failures, in trio's virtual time."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConnectionLostError, PeerTimeoutError
from fedup.net.framed import FramedStream
from fedup.protocol.framing import FrameError, encode_frame

LIMITS = attrs.evolve(DEFAULT_LIMITS, idle_timeout=20.0, frame_timeout=5.0, max_frame_size=1000)


def pair() -> tuple[FramedStream, trio.testing.MemorySendStream, FramedStream]:
    a, b = trio.testing.memory_stream_pair()
    return FramedStream(a, peer="A", limits=LIMITS), a, FramedStream(b, peer="B", limits=LIMITS)


async def test_round_trip_many_frames() -> None:
    left, _, right = pair()
    payloads = [b"", b"x", bytes(range(256)) * 3]
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for p in payloads:
                await left.send_frame(p)
            await left.aclose()

        nursery.start_soon(send)
        got = [await right.receive_frame() for _ in payloads]
        assert await right.receive_frame_or_eof() is None
    assert got == payloads


async def test_idle_timeout_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    _, _, right = pair()
    start = trio.current_time()
    with pytest.raises(PeerTimeoutError, match="sent nothing for 20 s") as info:
        await right.receive_frame()
    assert trio.current_time() - start == pytest.approx(20.0)
    assert info.value.peer == "B"


async def test_trickle_is_cut_off_by_frame_deadline(autojump_clock: trio.testing.MockClock) -> None:
    a, b = trio.testing.memory_stream_pair()
    right = FramedStream(b, peer="trickler", limits=LIMITS)
    frame = encode_frame(b"z" * 100, max_size=1000)

    async def trickle() -> None:
        for byte in frame:
            await a.send_all(bytes([byte]))
            await trio.sleep(1.0)  # every read is quick, the frame is not

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        start = trio.current_time()
        with pytest.raises(PeerTimeoutError, match="did not complete a frame within 5 s"):
            await right.receive_frame()
        assert trio.current_time() - start == pytest.approx(5.0)
        nursery.cancel_scope.cancel()


async def test_oversized_header_rejected_before_body() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = FramedStream(b, peer="big", limits=LIMITS)
    await a.send_all((10**9).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="exceeds") as info:
        await right.receive_frame()
    assert info.value.peer == "big"


async def test_eof_mid_frame_is_truncation() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = FramedStream(b, peer="cut", limits=LIMITS)
    await a.send_all(encode_frame(b"abcdef", max_size=1000)[:6])
    await a.aclose()
    with pytest.raises(FrameError, match="ended inside a frame"):
        await right.receive_frame()


async def test_clean_eof_between_frames() -> None:
    a, b = trio.testing.memory_stream_pair()
    right = FramedStream(b, peer="done", limits=LIMITS)
    await a.aclose()
    with pytest.raises(ConnectionLostError, match="closed the connection"):
        await right.receive_frame()


async def test_send_deadline_when_peer_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, _b = trio.testing.lockstep_stream_pair()
    left = FramedStream(a, peer="deaf", limits=LIMITS)
    with pytest.raises(PeerTimeoutError, match="did not take"):
        await left.send_frame(b"hello")
