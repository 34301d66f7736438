"""fedup.net.blob_buffers: the growing receive buffer, the hasher, and the receiver's sink."""

from __future__ import annotations

import gc
import mmap
import os
import tracemalloc

import attrs
import pytest

from fedup.config import DEFAULT_LIMITS
from fedup.errors import LocalProtocolError
from fedup.net import blob_buffers
from fedup.net.blob_buffers import BlobBuffer, BlobHasher, ReceiveSink
from fedup.protocol.blob import CHUNK_MORE, BlobDigestError, BlobReceiver, blob_digest
from tests.unit.blob_helpers import DATA, LIMITS, end_for, frames_of, header, sealed, verify


def test_hasher_matches_one_pass() -> None:
    hasher = BlobHasher()
    view = memoryview(DATA)
    for i in range(0, len(DATA), 33):
        hasher.queue(view[i : i + 33])
        if i % 99 == 0:
            hasher.hash_pending()
    assert hasher.pending > 0
    assert hasher.digest() == blob_digest(DATA) and hasher.hashed == len(DATA)


def receiver_with_sink(data: bytes) -> tuple[BlobReceiver, ReceiveSink]:
    h = header(size=len(data))
    sink = ReceiveSink(h.size)
    return BlobReceiver(h, sealed(h), sink), sink


def test_receiver_with_the_sink_hashing_at_any_point() -> None:
    frames = frames_of(DATA, 100)
    for hash_at in range(len(frames) + 1):
        rx, sink = receiver_with_sink(DATA)
        for i, frame in enumerate(frames):
            rx.feed_chunk(frame)
            if i == hash_at:
                assert sink.hasher.hash_pending() == min(100 * (i + 1), len(DATA))
        rx.finish(end_for(rx, DATA), sink.hasher.digest(), limits=LIMITS)  # hashes the rest
        out = sink.buffer.take()
        assert out == DATA and not out.readonly


def test_a_corrupted_blob_through_the_sink_is_refused_and_freed() -> None:
    frames = frames_of(DATA, 100)
    frames[2] = frames[2][:-1] + bytes([frames[2][-1] ^ 1])
    rx, sink = receiver_with_sink(DATA)
    for frame in frames:
        rx.feed_chunk(frame)
    with pytest.raises(BlobDigestError):
        rx.finish(end_for(rx, DATA), sink.hasher.digest(), limits=LIMITS)
    sink.clear()
    assert sink.buffer.size == 0 and sink.buffer.capacity == 0 and sink.hasher.pending == 0


def test_huge_claim_then_one_small_chunk_reserves_nothing_proportional() -> None:
    for limits in (attrs.evolve(DEFAULT_LIMITS, blob_chunk_size=4096), DEFAULT_LIMITS):
        claim = limits.max_blob_size
        chunk = bytes([CHUNK_MORE]) + b"\x5a" * limits.blob_chunk_size
        frame = sealed(header(size=claim, chunk_size=limits.blob_chunk_size))
        gc.collect()
        tracemalloc.start()
        try:
            h = verify(frame, limits=limits)
            sink = ReceiveSink(h.size)
            rx = BlobReceiver(h, frame, sink)
            assert not rx.feed_chunk(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert rx.received == limits.blob_chunk_size == sink.buffer.size
        # Python allocations (tracemalloc) and the reserved map (capacity) are both
        # bounded by what arrived, never by the claim.
        assert peak < 2 * limits.blob_chunk_size + 256 * 1024, peak
        assert sink.buffer.capacity <= max(2 * limits.blob_chunk_size, 2 * 1024 * 1024)
        assert sink.buffer.capacity < claim / 100
        sink.clear()


@pytest.mark.parametrize("use_map", [True, False])
def test_blob_buffer_grows_with_the_data(monkeypatch: pytest.MonkeyPatch, use_map: bool) -> None:
    monkeypatch.setattr(blob_buffers, "_USE_MAP", use_map and blob_buffers._USE_MAP)
    data = os.urandom(5 * 1024 * 1024 + 3)
    view = memoryview(data)
    buf = BlobBuffer(len(data))
    for i in range(0, len(data), 1 << 20):
        buf.append(view[i : i + (1 << 20)])
        assert buf.size == min(i + (1 << 20), len(data))
        assert buf.capacity <= max(2 * buf.size, 2 * 1024 * 1024)
    with pytest.raises(LocalProtocolError, match="limit"):
        buf.append(memoryview(b"x"))
    out = buf.take()
    assert out == data and not out.readonly and out.nbytes == len(data)
    out[0] ^= 1  # writable, and ours
    assert BlobBuffer(0).take().nbytes == 0


def test_blob_buffer_falls_back_when_the_map_cannot_grow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not blob_buffers._USE_MAP:
        pytest.skip("no memory maps on this platform")

    class Unresizable(mmap.mmap):
        def resize(self, newsize: int) -> None:
            raise SystemError("mmap: resizing not available--no mremap()")

    monkeypatch.setattr(mmap, "mmap", Unresizable)
    data = os.urandom(3 * 1024 * 1024)
    buf = BlobBuffer(len(data))
    for i in range(0, len(data), 1 << 20):
        buf.append(memoryview(data)[i : i + (1 << 20)])
    assert buf.take() == data


def test_blob_buffer_clear_frees() -> None:
    buf = BlobBuffer(100)
    buf.append(memoryview(b"abc"))
    buf.clear()
    assert buf.size == 0 and buf.capacity == 0
