"""Length-prefixed frames (fedup/protocol/framing.py).

Following h11's tests: streams fed whole, one byte at a time and split at every
byte give the same frames; a stream ending inside a frame fails at eof(); and
hypothesis-generated hostile streams behave exactly like a ten-line reference
parser, never buffering more than the limit allows.
"""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS, MiB
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol.framing import (
    HEADER_SIZE,
    MAX_FRAME_LENGTH,
    FrameDecoder,
    FrameError,
    encode_frame,
)

FAST = settings(max_examples=300, deadline=None)
MANY = settings(max_examples=600, deadline=None)

PAYLOADS = [b"", b"a", b"hello", bytes(range(256)) * 2, b"", b"\x00\x00\x00\x05"]
STREAM = b"".join(encode_frame(p, max_size=1000) for p in PAYLOADS)


def reference(stream: bytes, max_size: int) -> tuple[list[bytes], str | None]:
    """The frames in ``stream`` and how it ends: None, "oversize" or "partial"."""
    frames: list[bytes] = []
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < 4:
            return frames, "partial"
        length = int.from_bytes(stream[pos : pos + 4], "big")
        if length > max_size:
            return frames, "oversize"
        if len(stream) - pos - 4 < length:
            return frames, "partial"
        frames.append(stream[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return frames, None


def kind(err: FrameError) -> str:
    if "exceeds the limit" in err.reason:
        return "oversize"
    assert err.reason.startswith("stream ended inside a frame"), err.reason
    return "partial"


def run(chunks: list[bytes], max_size: int) -> tuple[list[bytes], str | None]:
    """Feed ``chunks`` as an I/O loop would, checking the buffering bound throughout."""
    decoder = FrameDecoder(max_size=max_size)
    frames: list[bytes] = []
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            assert decoder.buffered <= max_size + HEADER_SIZE + len(chunk)
            assert len(decoder._buf) <= max_size + HEADER_SIZE + len(chunk)  # real memory
            frames.extend(decoder.frames())
            assert decoder.buffered < max_size + HEADER_SIZE
            assert decoder.in_frame == (decoder.buffered > 0)
        decoder.eof()
    except FrameError as err:
        with pytest.raises(FrameError) as again:
            decoder.next_frame()
        assert again.value.reason == err.reason  # poisoned with the same reason
        assert decoder.buffered == 0
        return frames, kind(err)
    return frames, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- encode_frame -----------------------------------------------------------


def test_encode_frame() -> None:
    assert encode_frame(b"", max_size=0) == b"\x00\x00\x00\x00"
    assert encode_frame(b"abc", max_size=3).hex() == "00000003616263"
    assert encode_frame(bytearray(b"abc"), max_size=3) == encode_frame(b"abc", max_size=3)
    assert encode_frame(memoryview(b"xabc")[1:], max_size=3) == encode_frame(b"abc", max_size=3)
    assert len(encode_frame(bytes(300), max_size=300)) == 304


def test_encode_frame_refuses_oversize_payloads() -> None:
    with pytest.raises(LocalProtocolError, match="4 bytes exceeds the limit of 3 bytes"):
        encode_frame(b"abcd", max_size=3)
    with pytest.raises(LocalProtocolError):
        encode_frame(b"", max_size=MAX_FRAME_LENGTH + 1)
    with pytest.raises(LocalProtocolError):
        encode_frame(b"", max_size=-1)


@pytest.mark.parametrize("max_size", [-1, MAX_FRAME_LENGTH + 1])
def test_decoder_refuses_bad_limits(max_size: int) -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_size=max_size)


# --- whole, byte by byte, every split ------------------------------------------


def test_whole_stream() -> None:
    decoder = FrameDecoder(max_size=1000)
    decoder.feed(STREAM)
    assert decoder.buffered == len(STREAM)
    assert list(decoder.frames()) == PAYLOADS
    assert decoder.next_frame() is None
    assert decoder.buffered == 0 and not decoder.in_frame
    decoder.eof()


def test_one_byte_at_a_time() -> None:
    decoder = FrameDecoder(max_size=1000)
    frames: list[bytes] = []
    for i in range(len(STREAM)):
        decoder.feed(STREAM[i : i + 1])
        frames.extend(decoder.frames())
    assert frames == PAYLOADS
    decoder.eof()


def test_every_two_way_split() -> None:
    for cut in range(len(STREAM) + 1):
        assert run(split(STREAM, [cut]), 1000) == (PAYLOADS, None)


def test_feed_accepts_bytes_like() -> None:
    decoder = FrameDecoder(max_size=10)
    decoder.feed(bytearray(b"\x00\x00"))
    decoder.feed(memoryview(b"\x00\x02ab"))
    assert decoder.next_frame() == b"ab"
    decoder.feed(b"")
    assert decoder.next_frame() is None


def test_limit_is_inclusive_and_zero_allows_empty_frames() -> None:
    assert run([encode_frame(b"x" * 10, max_size=10)], 10) == ([b"x" * 10], None)
    assert run([b"\x00" * 12], 0) == ([b"", b"", b""], None)
    assert run([b"\x00\x00\x00\x01x"], 0) == ([], "oversize")


# --- a stream that ends inside a frame ------------------------------------------


def test_every_truncation_fails_at_eof_with_a_precise_reason() -> None:
    boundaries = {0}
    for p in PAYLOADS:
        boundaries.add(max(boundaries) + HEADER_SIZE + len(p))
    for cut in range(len(STREAM) + 1):
        decoder = FrameDecoder(max_size=1000)
        decoder.feed(STREAM[:cut])
        frames = list(decoder.frames())
        if cut in boundaries:
            decoder.eof()
            continue
        assert decoder.in_frame
        frame_start = max(b for b in boundaries if b < cut)
        got = cut - frame_start
        with pytest.raises(FrameError) as info:
            decoder.eof()
        if got < HEADER_SIZE:
            expected = f"stream ended inside a frame header: got {got} of 4 bytes"
        else:
            length = len(PAYLOADS[len(frames)])
            expected = f"stream ended inside a frame: got {got - 4} of {length} bytes"
        assert info.value.reason == expected
        with pytest.raises(FrameError, match="stream ended"):
            decoder.feed(b"more")


def test_eof_leaves_complete_frames_available() -> None:
    decoder = FrameDecoder(max_size=10)
    decoder.feed(encode_frame(b"one", max_size=10) + encode_frame(b"two", max_size=10))
    assert not decoder.in_frame
    decoder.eof()
    assert list(decoder.frames()) == [b"one", b"two"]


def test_eof_reports_a_partial_frame_behind_undrained_complete_ones() -> None:
    decoder = FrameDecoder(max_size=10)
    decoder.feed(encode_frame(b"one", max_size=10) + b"\x00\x00\x00\x05ab")
    assert decoder.in_frame
    with pytest.raises(FrameError, match="got 2 of 5 bytes"):
        decoder.eof()


def test_in_frame_tracks_partial_frames() -> None:
    decoder = FrameDecoder(max_size=10)
    assert not decoder.in_frame
    decoder.feed(b"\x00")
    assert decoder.in_frame and decoder.next_frame() is None
    decoder.feed(b"\x00\x00\x02a")
    assert decoder.in_frame and decoder.next_frame() is None
    decoder.feed(b"b")
    assert not decoder.in_frame  # complete, not yet drained
    assert decoder.next_frame() == b"ab"
    assert not decoder.in_frame and decoder.buffered == 0
    decoder.feed(b"\x00\x00\x00\x00")
    assert not decoder.in_frame  # an empty frame is complete with its header
    assert decoder.next_frame() == b""


# --- oversized frames ------------------------------------------------------------


def test_oversize_header_is_rejected_on_arrival_and_poisons() -> None:
    decoder = FrameDecoder(max_size=10)
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None
    with pytest.raises(FrameError) as info:
        decoder.feed(b"\x00\x0b" + b"x" * 100)
    reason = "frame length 11 exceeds the limit of 10 bytes"
    assert info.value.reason == reason
    assert decoder.buffered == 0 and not decoder.in_frame
    for call in (
        lambda: decoder.feed(b"\x00\x00\x00\x00"),
        decoder.next_frame,
        lambda: list(decoder.frames()),
        decoder.eof,
    ):
        with pytest.raises(FrameError) as again:
            call()
        assert again.value.reason == reason
        assert decoder.buffered == 0 and len(decoder._buf) == 0


def test_oversize_header_behind_valid_frames_yields_them_first() -> None:
    decoder = FrameDecoder(max_size=DEFAULT_LIMITS.max_frame_size)
    decoder.feed(encode_frame(b"ok", max_size=2) + b"\xff\xff\xff\xff" + bytes(100))
    frames = decoder.frames()
    assert next(frames) == b"ok"
    with pytest.raises(FrameError, match=f"4294967295 exceeds the limit of {2 * MiB} bytes"):
        next(frames)


def test_largest_header_is_accepted_when_the_limit_allows() -> None:
    decoder = FrameDecoder(max_size=MAX_FRAME_LENGTH)
    decoder.feed(b"\xff\xff\xff\xff" + bytes(10))
    assert decoder.next_frame() is None and decoder.in_frame
    with pytest.raises(FrameError, match=f"got 10 of {MAX_FRAME_LENGTH} bytes"):
        decoder.eof()


def test_frame_error_is_a_remote_protocol_error() -> None:
    decoder = FrameDecoder(max_size=0)
    with pytest.raises(RemoteProtocolError):
        decoder.feed(b"\x00\x00\x00\x01")


# --- efficiency -----------------------------------------------------------------


def test_large_frames_in_small_reads_are_linear() -> None:
    # A quadratic buffer (copying everything buffered on each feed) would move
    # about 32 GiB here; the linear one moves a few tens of MiB.
    size = 8 * MiB
    payload = bytes(range(256)) * (size // 256)
    stream = encode_frame(payload, max_size=size) * 2 + encode_frame(b"end", max_size=size)
    decoder = FrameDecoder(max_size=size)
    frames: list[bytes] = []
    started = time.perf_counter()
    for at in range(0, len(stream), 1024):
        decoder.feed(stream[at : at + 1024])
        frames.extend(decoder.frames())
        assert len(decoder._buf) <= size + HEADER_SIZE + 1024
    elapsed = time.perf_counter() - started
    assert frames == [payload, payload, b"end"]
    assert elapsed < 3.0


def test_typical_reads() -> None:
    size = DEFAULT_LIMITS.max_frame_size
    payloads = [bytes([i]) * (size - i * 1000) for i in range(4)] + [b"", b"x"]
    stream = b"".join(encode_frame(p, max_size=size) for p in payloads)
    chunks = [stream[i : i + 64 * 1024] for i in range(0, len(stream), 64 * 1024)]
    assert run(chunks, size) == (payloads, None)


# --- hypothesis -------------------------------------------------------------------


@FAST
@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_any_chunking_of_valid_frames(payloads: list[bytes], data: st.DataObject) -> None:
    max_size = data.draw(st.integers(max((len(p) for p in payloads), default=0), 64))
    stream = b"".join(encode_frame(p, max_size=max_size) for p in payloads)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert run(split(stream, cuts), max_size) == (payloads, None)


@MANY
@given(st.binary(max_size=120), st.integers(0, 40), st.data())
def test_hostile_streams_match_the_reference(
    stream: bytes, max_size: int, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert run(split(stream, cuts), max_size) == reference(stream, max_size)


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    payloads = draw(st.lists(st.binary(max_size=30), max_size=5))
    data = bytearray(b"".join(encode_frame(p, max_size=30) for p in payloads))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "truncate"]))
        if op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "truncate":
            del data[at:]
        elif at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@MANY
@given(mutated_stream(), st.data())
def test_mutated_streams_match_the_reference(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert run(split(stream, cuts), 30) == reference(stream, 30)
