"""The pure blob machines: BlobReceiver and BlobSender, alone and linked with no network."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConnectionLostError, LocalProtocolError
from fedup.protocol import cbor
from fedup.protocol.blob import (
    CHUNK_LAST,
    CHUNK_MORE,
    BlobDataError,
    BlobDigestError,
    BlobEndError,
    BlobError,
    BlobReceiver,
    BlobRefusedError,
    BlobReply,
    BlobReplyError,
    BlobSender,
    BlobSenderError,
    BlobSignatureError,
    BlobTruncatedError,
    blob_digest,
    blob_header_id,
    chunk_count,
    seal_blob_end,
)
from fedup.protocol.framing import FrameDecoder, encode_frame
from fedup.protocol.refusal import RefusalCode
from tests.unit.blob_helpers import (
    ALICE,
    DATA,
    LIMITS,
    MALLORY,
    Collect,
    end_for,
    frames_of,
    header,
    receiver_for,
    sealed,
    verify,
)

# --------------------------------------------------------------------------
# the receiver


def receive_all(rx: BlobReceiver, sink: Collect, frames: list[bytes], data: bytes) -> bytes:
    for frame in frames:
        rx.feed_chunk(frame)
    rx.finish(end_for(rx, data), sink.digest, limits=LIMITS)
    return bytes(sink.data)


# Each row: the events after a valid header (chunk frames by index into the
# honest frames, or "end", "bad-end", "eof", a raw frame) and what must happen.
RECEIVER_TABLE: list[tuple[str, list[object], str, type[Exception] | None, str]] = [
    ("whole blob", [*range(8), "end"], "DONE", None, ""),
    ("eof after DONE", [*range(8), "end", "eof"], "DONE", None, ""),
    ("MORE chunks stay in CHUNKS", [0, 1, 2], "CHUNKS", None, ""),
    ("LAST chunk -> END_DUE", [*range(8)], "END_DUE", None, ""),
    ("eof in CHUNKS", [0, "eof"], "FAILED", BlobTruncatedError, "before the last chunk"),
    ("eof in END_DUE", [*range(8), "eof"], "FAILED", BlobTruncatedError, "before its END"),
    ("LAST too early", [0, 7], "FAILED", BlobDataError, "last chunk ends"),
    ("chunk after LAST", [*range(8), 7], "FAILED", BlobDataError, "after the last chunk"),
    ("END mid-chunks", [0, "end-as-chunk"], "FAILED", BlobDataError, "of type 0xa4"),
    ("bad END", [*range(8), "bad-end"], "FAILED", BlobDigestError, "digest mismatch"),
    ("END before LAST", [0, "end"], "CHUNKS", LocalProtocolError, "before the last chunk"),
    ("END after DONE", [*range(8), "end", "end"], "DONE", LocalProtocolError, "in state DONE"),
    ("chunk after DONE", [*range(8), "end", 0], "DONE", LocalProtocolError, "in state DONE"),
    ("another frame type", [0, b"\x03x"], "FAILED", BlobDataError, "expected a chunk"),
]


@pytest.mark.parametrize(
    ("events", "state", "error", "match"),
    [row[1:] for row in RECEIVER_TABLE],
    ids=[row[0] for row in RECEIVER_TABLE],
)
def test_receiver_transitions(
    events: list[object], state: str, error: type[Exception] | None, match: str
) -> None:
    rx, sink = receiver_for(DATA)
    frames = frames_of(DATA, 100)

    def feed(event: object) -> None:
        if isinstance(event, int):
            rx.feed_chunk(frames[event])
        elif isinstance(event, bytes):
            rx.feed_chunk(event)
        elif event == "end":
            rx.finish(end_for(rx, DATA), sink.digest, limits=LIMITS)
        elif event == "bad-end":
            rx.finish(end_for(rx, DATA), blob_digest(b"other"), limits=LIMITS)
        elif event == "end-as-chunk":
            rx.feed_chunk(end_for(rx, DATA))
        else:
            assert event == "eof"
            rx.eof()

    for event in events[:-1]:
        feed(event)
    if error is None:
        feed(events[-1])
    else:
        with pytest.raises(error, match=match):
            feed(events[-1])
    assert rx.state == state


def test_receiver_whole_blob_goes_to_the_sink_as_slices() -> None:
    rx, sink = receiver_for(DATA)
    frames = frames_of(DATA, 100)
    results = [rx.feed_chunk(f) for f in frames]
    assert results == [False] * 7 + [True]
    assert rx.state == "END_DUE" and rx.digest is None and rx.received == len(DATA)
    # no copies: each piece is a view into its chunk frame, after the type byte
    assert len(sink.views) == len(frames)
    assert all(v.obj is f for v, f in zip(sink.views, frames, strict=True))
    assert b"".join(sink.views) == sink.data == DATA
    rx.finish(end_for(rx, DATA), blob_digest(DATA), limits=LIMITS)
    assert rx.state == "DONE"  # type: ignore[comparison-overlap]  # mypy narrowed it above
    assert rx.digest == blob_digest(DATA)
    with pytest.raises(LocalProtocolError, match="in state DONE"):
        rx.finish(end_for(rx, DATA), blob_digest(DATA), limits=LIMITS)


def test_receiver_every_size_and_chunk_size() -> None:
    # The chunking of a blob is canonical; check every small size / chunk size,
    # frames given as bytes, bytearray and memoryview.
    for chunk_size in range(1, 8):
        for size in range(0, 4 * chunk_size + 2):
            data = bytes((i * 7 + size) % 256 for i in range(size))
            for wrap in (bytes, bytearray, memoryview):
                rx, sink = receiver_for(data, chunk_size)
                frames = frames_of(data, chunk_size)
                assert len(frames) == chunk_count(size, chunk_size)
                done = [rx.feed_chunk(wrap(f)) for f in frames]
                assert done[-1] and not any(done[:-1])
                rx.finish(wrap(end_for(rx, data)), sink.digest, limits=LIMITS)
                assert sink.data == data


def test_empty_blob_is_one_empty_last_chunk() -> None:
    rx, sink = receiver_for(b"")
    assert receive_all(rx, sink, [bytes([CHUNK_LAST])], b"") == b""
    with pytest.raises(BlobDataError, match="chunk of 0 bytes before the last"):
        receiver_for(b"")[0].feed_chunk(bytes([CHUNK_MORE]))
    with pytest.raises(BlobDataError, match="complete but its chunk is not last"):
        receiver_for(DATA[:100])[0].feed_chunk(bytes([CHUNK_MORE]) + DATA[:100])


def test_missing_last_chunk() -> None:
    rx, sink = receiver_for(DATA)
    for frame in frames_of(DATA, 100)[:-1]:
        rx.feed_chunk(frame)
    with pytest.raises(LocalProtocolError, match="before the last chunk"):
        rx.finish(end_for(rx, DATA), sink.digest, limits=LIMITS)
    with pytest.raises(BlobTruncatedError, match=r"after 700 of 772 bytes .*before the last chunk"):
        rx.eof()
    with pytest.raises(ConnectionLostError):  # poisoned, and still a lost connection
        rx.eof()


def test_missing_end() -> None:
    rx, _ = receiver_for(DATA)
    for frame in frames_of(DATA, 100):
        rx.feed_chunk(frame)
    with pytest.raises(BlobTruncatedError, match=r"after 772 of 772 bytes .*before its END"):
        rx.eof()


def test_frame_of_another_type_mid_blob() -> None:
    frames = frames_of(DATA, 100)
    for intruder in (b"\x03" + b"x" * 10, BlobReply.ack(b"\0" * 32).to_cbor(), b"\x00"):
        rx, _ = receiver_for(DATA)
        rx.feed_chunk(frames[0])
        with pytest.raises(BlobDataError, match="expected a chunk"):
            rx.feed_chunk(intruder)
    with pytest.raises(BlobDataError, match="empty frame"):
        receiver_for(DATA)[0].feed_chunk(b"")


def test_end_before_last_chunk_is_refused_as_a_chunk() -> None:
    rx, _ = receiver_for(DATA)
    rx.feed_chunk(frames_of(DATA, 100)[0])
    with pytest.raises(BlobDataError, match="of type 0xa4 after 100 of 772 bytes"):
        rx.feed_chunk(end_for(rx, DATA))


def test_extra_chunk_after_last() -> None:
    for feed in ("feed_chunk", "finish"):
        rx, sink = receiver_for(DATA)
        for frame in frames_of(DATA, 100):
            rx.feed_chunk(frame)
        with pytest.raises(BlobDataError, match="a chunk arrived after the last chunk"):
            if feed == "finish":
                rx.finish(bytes([CHUNK_LAST]), sink.digest, limits=LIMITS)
            else:
                rx.feed_chunk(bytes([CHUNK_LAST]))


def test_chunks_beyond_declared_size() -> None:
    rx, _ = receiver_for(DATA[:150])
    rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:100])
    with pytest.raises(BlobDataError, match="exceed the declared 150 bytes"):
        rx.feed_chunk(bytes([CHUNK_LAST]) + DATA[100:200])


def test_short_total() -> None:
    rx, _ = receiver_for(DATA[:150])
    rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:100])
    with pytest.raises(BlobDataError, match=r"last chunk ends .* after 140 of 150 bytes"):
        rx.feed_chunk(bytes([CHUNK_LAST]) + DATA[100:140])


def test_more_chunk_must_be_full() -> None:
    rx, _ = receiver_for(DATA)
    with pytest.raises(BlobDataError, match="every chunk but the last carries exactly 100"):
        rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:99])


def test_chunk_larger_than_chunk_size() -> None:
    rx, _ = receiver_for(DATA)
    with pytest.raises(BlobDataError, match="chunk of 101 bytes exceeds the chunk size 100"):
        rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:101])


def test_a_rejected_chunk_never_reaches_the_sink() -> None:
    rx, sink = receiver_for(DATA)
    rx.feed_chunk(frames_of(DATA, 100)[0])
    with pytest.raises(BlobDataError):
        rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:101])
    assert len(sink.views) == 1 and sink.data == DATA[:100]


def test_digest_mismatch_and_poisoning() -> None:
    rx, sink = receiver_for(DATA)
    for frame in frames_of(DATA, 100):
        rx.feed_chunk(frame)
    with pytest.raises(BlobDigestError, match="digest mismatch") as first:
        rx.finish(end_for(rx, b"something else"), sink.digest, limits=LIMITS)
    assert rx.state == "FAILED" and first.value.code is RefusalCode.MALFORMED
    with pytest.raises(BlobDigestError) as again:  # poisoned: the same error again
        rx.finish(end_for(rx, DATA), sink.digest, limits=LIMITS)
    assert again.value is not first.value and again.value.reason == first.value.reason
    with pytest.raises(BlobDigestError):
        rx.feed_chunk(bytes([CHUNK_LAST]))
    with pytest.raises(BlobDigestError):
        rx.eof()


def test_flipped_byte_in_a_chunk() -> None:
    frames = frames_of(DATA, 100)
    frames[3] = frames[3][:50] + bytes([frames[3][50] ^ 0x80]) + frames[3][51:]
    rx, sink = receiver_for(DATA)
    with pytest.raises(BlobDigestError):
        receive_all(rx, sink, frames, DATA)


def test_finish_checks_the_end_before_the_digest() -> None:
    # The END's own checks (header module) come first; the caller's digest last.
    cases: list[tuple[Callable[[BlobReceiver], bytes], type[BlobError], str]] = [
        (lambda rx: b"", BlobEndError, "^blob end: empty input"),
        (lambda rx: end_for(rx, DATA, ident=MALLORY), BlobSenderError, "blob end signed by"),
        (
            lambda rx: seal_blob_end(ALICE, sealed(header(lap=4)), blob_digest(DATA)),
            BlobEndError,
            "names another header",
        ),
        (lambda rx: end_for(rx, b"x"), BlobDigestError, "digest mismatch"),
    ]
    for make_end, error, match in cases:
        rx, _ = receiver_for(DATA)
        for frame in frames_of(DATA, 100):
            rx.feed_chunk(frame)
        with pytest.raises(error, match=match):
            rx.finish(make_end(rx), blob_digest(b"not the data either"), limits=LIMITS)
        assert rx.state == "FAILED"


def test_huge_claim_then_one_small_chunk_allocates_nothing_proportional() -> None:
    for limits in (attrs.evolve(DEFAULT_LIMITS, blob_chunk_size=4096), DEFAULT_LIMITS):
        claim = limits.max_blob_size
        chunk = bytes([CHUNK_MORE]) + b"\x5a" * limits.blob_chunk_size
        frame = sealed(header(size=claim, chunk_size=limits.blob_chunk_size))
        sink = Collect()
        gc.collect()
        tracemalloc.start()
        try:
            rx = BlobReceiver(verify(frame, limits=limits), frame, sink)
            assert not rx.feed_chunk(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert rx.received == limits.blob_chunk_size == len(sink.data)
        # The machine allocates nothing from the claim; the sink holds one chunk.
        assert peak < 2 * limits.blob_chunk_size + 256 * 1024, peak


# --------------------------------------------------------------------------
# the sender


def sender_for(data: bytes = DATA, chunk_size: int = 100) -> BlobSender:
    h = header(size=len(data), chunk_size=chunk_size)
    return BlobSender(ALICE, h, data, limits=attrs.evolve(LIMITS, blob_chunk_size=chunk_size))


def accept(tx: BlobSender) -> bytes:
    return BlobReply.accept(blob_header_id(tx.header_frame)).to_cbor()


def ack(tx: BlobSender) -> bytes:
    assert tx.digest is not None
    return BlobReply.ack(tx.digest).to_cbor()


SENDER_EVENTS: dict[str, Callable[[BlobSender], object]] = {
    "accept": lambda tx: tx.receive_reply(accept(tx)),
    "accept-other": lambda tx: tx.receive_reply(BlobReply.accept(b"\1" * 32).to_cbor()),
    "ack": lambda tx: tx.receive_reply(ack(tx)),
    "ack-any": lambda tx: tx.receive_reply(BlobReply.ack(blob_digest(DATA)).to_cbor()),
    "ack-other": lambda tx: tx.receive_reply(BlobReply.ack(b"\1" * 32).to_cbor()),
    "nack": lambda tx: tx.receive_reply(BlobReply.nack(RefusalCode.STALE, "too old").to_cbor()),
    "nack-unknown": lambda tx: tx.receive_reply(cbor.encode({"nack": "x", "code": "rude"})),
    "garbage": lambda tx: tx.receive_reply(b"\xff\x00"),
    "chunk": lambda tx: tx.next_chunk(),
    "chunks": lambda tx: [tx.next_chunk() for _ in range(8)],
    "end": lambda tx: tx.end_frame(blob_digest(DATA)),
}

# Each row: events in order, the state after them, and the error the last one raises.
SENDER_TABLE: list[tuple[str, list[str], str, type[Exception] | None, str]] = [
    ("fresh", [], "HEADER_SENT", None, ""),
    ("ACCEPT -> CHUNKS", ["accept"], "CHUNKS", None, ""),
    ("a MORE chunk stays in CHUNKS", ["accept", "chunk"], "CHUNKS", None, ""),
    ("the LAST chunk -> END_DUE", ["accept", "chunks"], "END_DUE", None, ""),
    ("END -> ACK_DUE", ["accept", "chunks", "end"], "ACK_DUE", None, ""),
    ("ACK -> DONE", ["accept", "chunks", "end", "ack"], "DONE", None, ""),
    # the receiver says no, in any state but DONE
    ("NACK of the header", ["nack"], "FAILED", BlobRefusedError, r"refused .*: too old$"),
    ("NACK mid-chunks", ["accept", "chunk", "nack"], "FAILED", BlobRefusedError, "too old"),
    ("NACK after the chunks", ["accept", "chunks", "nack"], "FAILED", BlobRefusedError, "old"),
    ("NACK of the END", ["accept", "chunks", "end", "nack"], "FAILED", BlobRefusedError, "old"),
    # the receiver answers what is not due
    ("ACK for the header", ["ack-any"], "FAILED", BlobReplyError, "ACK where ACCEPT of the"),
    ("ACCEPT of another header", ["accept-other"], "FAILED", BlobReplyError, "another header"),
    ("ACCEPT twice", ["accept", "accept"], "FAILED", BlobReplyError, "ACCEPT before the END"),
    ("ACK mid-chunks", ["accept", "chunk", "ack-any"], "FAILED", BlobReplyError, "before the"),
    (
        "ACCEPT for the END",
        ["accept", "chunks", "end", "accept"],
        "FAILED",
        BlobReplyError,
        "ACCEPT where ACK of the",
    ),
    (
        "ACK of another digest",
        ["accept", "chunks", "end", "ack-other"],
        "FAILED",
        BlobReplyError,
        "ACK of another digest",
    ),
    ("garbage", ["garbage"], "FAILED", BlobReplyError, "malformed blob reply"),
    ("unknown refusal", ["nack-unknown"], "FAILED", BlobReplyError, "names no known refusal"),
    # our own misuse: loud, and nothing changes
    ("chunk before ACCEPT", ["chunk"], "HEADER_SENT", LocalProtocolError, "in state HEADER_SENT"),
    ("END before ACCEPT", ["end"], "HEADER_SENT", LocalProtocolError, "end_frame"),
    ("END before the LAST", ["accept", "chunk", "end"], "CHUNKS", LocalProtocolError, "CHUNKS"),
    (
        "chunk after the LAST",
        ["accept", "chunks", "chunk"],
        "END_DUE",
        LocalProtocolError,
        "next_chunk",
    ),
    ("END twice", ["accept", "chunks", "end", "end"], "ACK_DUE", LocalProtocolError, "ACK_DUE"),
    (
        "reply after DONE",
        ["accept", "chunks", "end", "ack", "nack"],
        "DONE",
        LocalProtocolError,
        "in state DONE",
    ),
]


@pytest.mark.parametrize(
    ("events", "state", "error", "match"),
    [row[1:] for row in SENDER_TABLE],
    ids=[row[0] for row in SENDER_TABLE],
)
def test_sender_transitions(
    events: list[str], state: str, error: type[Exception] | None, match: str
) -> None:
    tx = sender_for()
    for event in events[:-1]:
        SENDER_EVENTS[event](tx)
    if events:
        if error is None:
            SENDER_EVENTS[events[-1]](tx)
        else:
            with pytest.raises(error, match=match):
                SENDER_EVENTS[events[-1]](tx)
    assert tx.state == state


def test_a_nack_carries_its_code_and_poisoning_keeps_it() -> None:
    for code in RefusalCode:
        tx = sender_for()
        tx.receive_reply(accept(tx))
        with pytest.raises(BlobRefusedError) as info:
            tx.receive_reply(BlobReply.nack(code, "no").to_cbor())
        assert info.value.code is code
        assert info.value.reason == f"refused the {tx.header.label}: no"
        with pytest.raises(BlobRefusedError) as again:
            tx.next_chunk()
        assert again.value.code is code and again.value is not info.value


def test_a_failed_sender_is_poisoned() -> None:
    tx = sender_for()
    with pytest.raises(BlobReplyError, match="malformed") as first:
        tx.receive_reply(b"\xff")
    for event in ("accept", "chunk", "end", "ack-any"):
        with pytest.raises(BlobReplyError) as again:  # the first error again, every time
            SENDER_EVENTS[event](tx)
        assert again.value.reason == first.value.reason and again.value is not first.value
    assert tx.state == "FAILED"


def test_sender_chunks_are_slices_of_the_data() -> None:
    for chunk_size in range(1, 8):
        for size in range(0, 4 * chunk_size + 2):
            data = bytearray((i * 5 + size) % 256 for i in range(size))
            tx = sender_for(bytes(data), chunk_size)
            tx = BlobSender(ALICE, tx.header, data, limits=LIMITS)
            tx.receive_reply(accept(tx))
            frames: list[bytes] = []
            while tx.state == "CHUNKS":
                kind, piece = tx.next_chunk()
                assert piece.obj is data  # a view, not a copy
                frames.append(kind + piece)
            assert frames == frames_of(bytes(data), chunk_size)
            assert tx.sent == size


def test_sender_checks_what_it_is_given() -> None:
    with pytest.raises(LocalProtocolError, match="header says 10 bytes, the blob has 772"):
        BlobSender(ALICE, header(size=10), DATA, limits=LIMITS)
    small = attrs.evolve(LIMITS, max_blob_size=100)
    with pytest.raises(LocalProtocolError, match="exceeds max_blob_size=100"):
        BlobSender(ALICE, header(), DATA, limits=small)
    with pytest.raises(LocalProtocolError, match="signed by its sender"):
        BlobSender(MALLORY, header(), DATA, limits=LIMITS)
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        tx = sender_for()
        SENDER_EVENTS["accept"](tx)
        SENDER_EVENTS["chunks"](tx)
        tx.end_frame(b"short")


@settings(max_examples=300)
@given(st.integers(0, 5), st.binary(max_size=80))
def test_hostile_replies_to_the_sender(stage: int, frame: bytes) -> None:
    """Any reply bytes at any stage: the due transition or a BlobError, nothing else."""
    tx = sender_for()
    for event in ["accept", "chunk", "chunks", "end"][: min(stage, 4)]:
        if event == "chunks":
            while tx.state == "CHUNKS":
                tx.next_chunk()
        else:
            SENDER_EVENTS[event](tx)
    before = tx.state
    try:
        tx.receive_reply(frame)
    except BlobError:
        assert tx.state == "FAILED"
        return
    assert (before, tx.state) in {("HEADER_SENT", "CHUNKS"), ("ACK_DUE", "DONE")}


# --------------------------------------------------------------------------
# both machines linked, with no network (after h11's helpers)


def link(data: bytes, chunk_size: int, split: Callable[[bytes], list[bytes]]) -> bytes:
    """Run a whole exchange; the sender's frames reach the receiver as one byte
    stream cut into pieces by ``split`` and reassembled by a FrameDecoder."""
    limits = attrs.evolve(LIMITS, blob_chunk_size=chunk_size)
    tx = sender_for(data, chunk_size)
    h = verify(tx.header_frame, limits=limits)
    sink = Collect()
    rx = BlobReceiver(h, tx.header_frame, sink)
    tx.receive_reply(BlobReply.accept(blob_header_id(tx.header_frame)).to_cbor())
    wire = bytearray()
    while tx.state == "CHUNKS":
        kind, piece = tx.next_chunk()
        wire += encode_frame(kind + piece, max_size=limits.max_frame_size)
    wire += encode_frame(tx.end_frame(blob_digest(data)), max_size=limits.max_frame_size)
    decoder = FrameDecoder(max_size=limits.max_frame_size)
    for part in split(bytes(wire)):
        decoder.feed(part)
        for frame in decoder.frames():
            if rx.done:
                rx.finish(frame, sink.digest, limits=limits)
            else:
                rx.feed_chunk(frame)
    decoder.eof()
    rx.eof()
    assert rx.state == "DONE" and rx.digest is not None
    tx.receive_reply(BlobReply.ack(rx.digest).to_cbor())
    assert tx.state == "DONE"
    return bytes(sink.data)


def test_linked_machines_whole_and_byte_by_byte() -> None:
    whole = link(DATA, 100, lambda wire: [wire])
    by_byte = link(DATA, 100, lambda wire: [wire[i : i + 1] for i in range(len(wire))])
    assert whole == by_byte == DATA
    assert link(b"", 100, lambda wire: [wire]) == b""


@settings(max_examples=200)
@given(st.binary(max_size=60), st.integers(1, 9), st.lists(st.integers(1, 40), max_size=30))
def test_linked_machines_any_split(data: bytes, chunk_size: int, cuts: list[int]) -> None:
    def split(wire: bytes) -> list[bytes]:
        parts, pos = [], 0
        for n in cuts:
            parts.append(wire[pos : pos + n])
            pos += n
        return [*parts, wire[pos:]]

    assert link(data, chunk_size, split) == data


chunk_frames = st.lists(
    st.tuples(st.sampled_from([0, 1, 1, 2, 2, 3, 0xA1]), st.integers(0, 12)), max_size=8
)


@settings(max_examples=500)
@given(
    st.binary(max_size=40),
    st.integers(1, 8),
    chunk_frames,
    st.booleans(),
    st.none() | st.binary(max_size=80),
)
def test_hostile_chunk_sequences(
    data: bytes,
    chunk_size: int,
    frames: list[tuple[int, int]],
    end_with_eof: bool,
    end: bytes | None,
) -> None:
    """Any frames after a valid header: the blob exactly, or a BlobDataError/BlobError."""
    rx, sink = receiver_for(data, chunk_size)
    pos = 0
    try:
        for kind, n in frames:
            piece = data[pos : pos + n] if pos + n <= len(data) else b"\x00" * n
            pos += n
            rx.feed_chunk(bytes([kind]) + piece)
        if end_with_eof:
            rx.eof()
        if rx.done:
            end_frame = end_for(rx, data) if end is None else end
            rx.finish(end_frame, sink.digest, limits=LIMITS)
            assert sink.data == data
            assert end is None or end == end_for(rx, data)
    except BlobError as exc:
        assert isinstance(exc, BlobDataError | BlobSignatureError | BlobSenderError)
        assert exc.code is RefusalCode.MALFORMED
