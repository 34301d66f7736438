"""The pure blob protocol: header, checks and their order, replay guard, chunk receiver."""

from __future__ import annotations

import gc
import mmap
import os
import tracemalloc
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConnectionLostError, LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import blob as blob_module
from fedup.protocol import cbor
from fedup.protocol.blob import (
    BLOB_END_DOMAIN,
    BLOB_END_TYPE,
    BLOB_HEADER_DOMAIN,
    BLOB_HEADER_TYPE,
    CHUNK_LAST,
    CHUNK_MORE,
    REASON_MAX,
    BlobBuffer,
    BlobChunkSizeError,
    BlobDataError,
    BlobDigestError,
    BlobEndError,
    BlobEpochError,
    BlobError,
    BlobHasher,
    BlobHeader,
    BlobHeaderError,
    BlobReceiver,
    BlobRecipientError,
    BlobReplayError,
    BlobReplayGuard,
    BlobReply,
    BlobReplyError,
    BlobRunError,
    BlobSenderError,
    BlobSignatureError,
    BlobSizeError,
    BlobTruncatedError,
    blob_digest,
    blob_header_id,
    chunk_count,
    iter_chunks,
    seal_blob_end,
    seal_blob_header,
    verify_blob_header,
)
from fedup.protocol.envelope import SignatureError, seal_envelope

ALICE = Identity(b"\x01" * 32)  # the sender
BOB = Identity(b"\x02" * 32)  # the recipient
MALLORY = Identity(b"\x03" * 32)
RUN = bytes(range(16))
OTHER_RUN = bytes(range(1, 17))
DATA = bytes(range(256)) * 3 + b"tail"
LIMITS = attrs.evolve(DEFAULT_LIMITS, blob_chunk_size=100)


def header(**kw: Any) -> BlobHeader:
    fields: dict[str, Any] = {
        "run_id": RUN,
        "kind": "model",
        "lap": 3,
        "hop": 2,
        "epoch": 7,
        "sender": ALICE.peer_id,
        "recipient": BOB.peer_id,
        "size": len(DATA),
        "chunk_size": LIMITS.blob_chunk_size,
        "meta": {"loss": [0.5, 0.25], "samples": [120, 80], "task": "loans", "n": 2},
    }
    fields.update(kw)
    return BlobHeader(**fields)


def sealed(h: BlobHeader | None = None, ident: Identity = ALICE) -> bytes:
    return seal_blob_header(ident, h or header(), limits=LIMITS)


def verify(frame: bytes, **kw: Any) -> BlobHeader:
    args: dict[str, Any] = {
        "me": BOB.peer_id,
        "remote": ALICE.peer_id,
        "run_id": RUN,
        "limits": LIMITS,
    }
    args.update(kw)
    return verify_blob_header(frame, **args)


def signed_payload(
    payload: bytes,
    ident: Identity = ALICE,
    domain: str = BLOB_HEADER_DOMAIN,
    payload_type: str = BLOB_HEADER_TYPE,
) -> bytes:
    envelope = seal_envelope(
        ident.sign, ident.public_key, domain=domain, payload_type=payload_type, payload=payload
    )
    return envelope.to_cbor()


def payload_map(**changes: Any) -> dict[str, Any]:
    value = cbor.decode(header().to_cbor(), max_size=1 << 16, max_depth=3)
    assert isinstance(value, dict)
    for key, item in changes.items():
        if item is _DELETE:
            del value[key]
        else:
            value[key] = item
    return value


_DELETE = object()


# --------------------------------------------------------------------------
# header


def test_header_round_trip_and_wire_keys() -> None:
    h = header()
    assert BlobHeader.from_cbor(h.to_cbor()) == h
    wire = cbor.decode(h.to_cbor(), max_size=1 << 16, max_depth=3)
    assert isinstance(wire, dict)
    assert set(wire) == {
        "run", "kind", "lap", "hop", "epoch", "from", "to", "size", "chunk", "meta",
    }  # fmt: skip
    assert verify(sealed(h)) == h
    assert h.chunks == chunk_count(len(DATA), 100) == 8


def test_final_header_and_empty_meta() -> None:
    h = header(kind="final", meta={})
    assert verify(sealed(h)) == h


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"run_id": b"short"}, "'run' must be 16 bytes"),
        ({"kind": "weights"}, "'kind' must be 'model' or 'final'"),
        ({"chunk_size": 0}, "'chunk' must be between 1"),
        ({"meta": {"flag": True}}, "must be a number, a text or a list of numbers"),
        ({"meta": {"m": {"nested": 1}}}, "must be a number, a text or a list of numbers"),
        ({"meta": {"l": [1, "x"]}}, "must be a list of numbers"),
        ({"meta": {"": 1}}, "keys must be text of 1 to 64 bytes"),
        ({"meta": {"k" * 65: 1}}, "keys must be text of 1 to 64 bytes"),
        ({"meta": {"t": "x" * 257}}, "at most 256 bytes of text"),
        ({"meta": {"l": [0] * 1025}}, "at most 1024 items"),
        ({"meta": {f"k{i}": i for i in range(65)}}, "at most 64 entries"),
    ],
)
def test_sender_refuses_to_seal_invalid_headers(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        sealed(header(**kw))


def test_sender_must_sign_its_own_header() -> None:
    with pytest.raises(LocalProtocolError, match="signed by its sender"):
        sealed(header(), MALLORY)


def test_sender_refuses_values_cbor_cannot_carry() -> None:
    with pytest.raises(LocalProtocolError):
        sealed(header(meta={"x": float("nan")}))
    with pytest.raises(LocalProtocolError):
        sealed(header(lap=-1))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lap": _DELETE}, "missing field 'lap'"),
        ({"meta": _DELETE}, "missing field 'meta'"),
        ({"extra": 1}, "unknown field"),
        ({"lap": -1}, "'lap' must be an unsigned integer"),
        ({"lap": 1.5}, "'lap' must be an unsigned integer"),
        ({"size": "big"}, "'size' must be an unsigned integer"),
        ({"from": b"\0" * 38}, "'from' not an Ed25519"),
        ({"to": b"x"}, "'to' must be 38 bytes"),
        ({"kind": 1}, "'kind' must be a text string"),
        ({"meta": [1]}, "'meta' must be a map"),
    ],
)
def test_unknown_missing_and_ill_typed_fields(changes: dict[str, Any], match: str) -> None:
    frame = signed_payload(cbor.encode(payload_map(**changes)))
    with pytest.raises(BlobHeaderError, match=match):
        verify(frame)


def test_payload_that_is_not_strict_cbor() -> None:
    for payload in (b"", b"\xa0\x00", b"\xff", cbor.encode([1, 2])):
        with pytest.raises(BlobHeaderError, match=r"^blob header"):
            verify(signed_payload(payload))


def test_oversized_frame_refused_before_decoding() -> None:
    n = LIMITS.max_message_size
    with pytest.raises(BlobHeaderError, match=f"of {n + 1} bytes exceeds the limit of {n}$"):
        verify(b"\xff" * (n + 1))


def test_bad_signature() -> None:
    frame = bytearray(sealed())
    frame[-1] ^= 1  # the signature is the last field of the envelope map
    with pytest.raises(BlobSignatureError, match="bad signature") as info:
        verify(bytes(frame))
    assert isinstance(info.value, SignatureError)


def test_tampered_payload() -> None:
    frame = sealed(header(lap=3))
    tampered = frame.replace(b"clap\x03", b"clap\x09")
    assert tampered != frame
    with pytest.raises(BlobSignatureError):
        verify(tampered)


def test_signature_from_another_domain() -> None:
    frame = signed_payload(header().to_cbor(), domain="fedup-peer-record")
    with pytest.raises(BlobSignatureError):
        verify(frame)


def test_another_payload_type() -> None:
    frame = signed_payload(header().to_cbor(), payload_type="fedup/peer-record/1")
    with pytest.raises(BlobHeaderError, match="expected 'fedup/blob-header/1'"):
        verify(frame)


def test_signed_by_someone_other_than_the_sender() -> None:
    frame = signed_payload(header().to_cbor(), ident=MALLORY)  # claims to be from ALICE
    with pytest.raises(BlobSenderError, match=f"names sender {ALICE.peer_id} but is signed by"):
        verify(frame)


def test_sender_is_not_the_authenticated_remote() -> None:
    with pytest.raises(BlobSenderError, match=f"arrived on the connection of {MALLORY.peer_id}"):
        verify(sealed(), remote=MALLORY.peer_id)


def test_wrong_recipient() -> None:
    with pytest.raises(BlobRecipientError) as info:
        verify(sealed(), me=MALLORY.peer_id)
    assert info.value.reason == f"blob for recipient {BOB.peer_id}, I am {MALLORY.peer_id}"


def test_wrong_run() -> None:
    with pytest.raises(BlobRunError) as info:
        verify(sealed(), run_id=OTHER_RUN)
    assert info.value.reason == f"blob for run {RUN.hex()}, expected run {OTHER_RUN.hex()}"


def test_stale_epoch() -> None:
    assert verify(sealed(), min_epoch=7).epoch == 7
    with pytest.raises(BlobEpochError, match="epoch 7 is older than the current epoch 8"):
        verify(sealed(), min_epoch=8)


def test_oversize_against_limit_and_per_call_cap() -> None:
    big = header(size=LIMITS.max_blob_size + 1)
    with pytest.raises(BlobSizeError) as info:
        verify(sealed(big))
    assert info.value.reason == (
        f"blob of {LIMITS.max_blob_size + 1} bytes exceeds the limit of {LIMITS.max_blob_size}"
    )
    with pytest.raises(BlobSizeError, match=f"blob of {len(DATA)} bytes exceeds the limit of 100"):
        verify(sealed(), max_size=100)
    assert verify(sealed(), max_size=len(DATA)).size == len(DATA)


def test_chunk_size_must_be_the_agreed_one() -> None:
    with pytest.raises(BlobChunkSizeError, match="chunk size 100, expected 64"):
        verify(sealed(), limits=attrs.evolve(LIMITS, blob_chunk_size=64))


def test_checks_run_in_the_documented_order() -> None:
    # Each frame fails two checks; the earlier one in the documented order wins.
    bad_sig = bytearray(sealed(header(recipient=MALLORY.peer_id)))
    bad_sig[-1] ^= 1
    with pytest.raises(BlobSignatureError):
        verify(bytes(bad_sig))
    with pytest.raises(BlobSenderError):
        verify(signed_payload(header(recipient=MALLORY.peer_id).to_cbor(), ident=MALLORY))
    with pytest.raises(BlobRecipientError):
        verify(sealed(header(recipient=MALLORY.peer_id, run_id=OTHER_RUN)))
    with pytest.raises(BlobRunError):
        verify(sealed(header(run_id=OTHER_RUN, epoch=0)), min_epoch=1)
    with pytest.raises(BlobEpochError):
        verify(sealed(header(epoch=0, size=10**9)), min_epoch=1)
    with pytest.raises(BlobSizeError):
        verify(sealed(header(size=10**9)), limits=attrs.evolve(LIMITS, blob_chunk_size=64))
    guard = BlobReplayGuard()
    guard.commit(header(lap=9))
    with pytest.raises(BlobChunkSizeError):
        verify(sealed(), limits=attrs.evolve(LIMITS, blob_chunk_size=64), guard=guard)
    with pytest.raises(BlobReplayError):
        verify(sealed(), guard=guard)


# --------------------------------------------------------------------------
# replay guard


def test_replay_guard_model_blobs() -> None:
    guard = BlobReplayGuard()
    guard.commit(header(lap=3, hop=2))
    assert guard.high_water(RUN) == (3, 2)
    with pytest.raises(BlobReplayError) as info:
        verify(sealed(header(lap=3, hop=1)), guard=guard)
    assert info.value.reason == "lap 3 hop 1 is not newer than lap 3 hop 2 (replay?)"
    with pytest.raises(BlobReplayError, match="lap 3 hop 2 is not newer than lap 3 hop 2"):
        guard.check(header(lap=3, hop=2))
    with pytest.raises(BlobReplayError):
        guard.check(header(lap=2, hop=9))
    guard.check(header(lap=3, hop=3))
    guard.check(header(lap=4, hop=0))
    guard.check(header(run_id=OTHER_RUN, lap=0, hop=0))  # runs are independent


def test_check_does_not_record_and_commit_rechecks() -> None:
    guard = BlobReplayGuard()
    guard.check(header(lap=1, hop=1))
    guard.check(header(lap=1, hop=1))  # a failed transfer may be retried
    guard.commit(header(lap=1, hop=1))
    with pytest.raises(BlobReplayError):
        guard.commit(header(lap=1, hop=1))


def test_replay_guard_final_once_per_run() -> None:
    guard = BlobReplayGuard()
    guard.commit(header(lap=5, hop=0))
    guard.commit(header(kind="final", lap=5, hop=0))  # its own rule: not ordered by lap/hop
    assert guard.has_final(RUN)
    with pytest.raises(BlobReplayError, match=r"final model of run \w+ was already accepted"):
        guard.check(header(kind="final", lap=6))
    with pytest.raises(BlobReplayError, match="after the final model"):
        guard.check(header(lap=9, hop=0))
    guard.check(header(kind="final", run_id=OTHER_RUN))


def test_replay_guard_is_bounded() -> None:
    guard = BlobReplayGuard(max_runs=2)
    runs = [bytes([i]) * 16 for i in range(3)]
    for run in runs:
        guard.commit(header(run_id=run))
    assert guard.high_water(runs[0]) is None
    assert guard.high_water(runs[2]) == (3, 2)


# --------------------------------------------------------------------------
# chunks, the end, and the receiver


def frames_of(data: bytes, chunk_size: int) -> list[bytes]:
    return [kind + bytes(piece) for kind, piece in iter_chunks(memoryview(data), chunk_size)]


def receiver_for(data: bytes, chunk_size: int = 100, **kw: Any) -> BlobReceiver:
    h = header(size=len(data), chunk_size=chunk_size, **kw)
    return BlobReceiver(h, sealed(h))


def end_for(rx: BlobReceiver, data: bytes, ident: Identity = ALICE) -> bytes:
    """The END the honest sender of ``rx``'s header would send after ``data``."""
    return seal_blob_end(ident, sealed(rx.header), blob_digest(data))


def receive_all(rx: BlobReceiver, frames: list[bytes], data: bytes) -> memoryview:
    for frame in frames:
        rx.feed_chunk(frame)
    return rx.finish(end_for(rx, data), limits=LIMITS)


def test_chunk_frames_layout() -> None:
    frames = frames_of(DATA, 100)
    assert len(frames) == 8
    assert all(f[0] == CHUNK_MORE and len(f) == 101 for f in frames[:-1])
    assert frames[-1][0] == CHUNK_LAST and len(frames[-1]) == 1 + len(DATA) - 700
    assert frames_of(b"", 100) == [bytes([CHUNK_LAST])]
    assert frames_of(b"x" * 200, 100)[-1] == bytes([CHUNK_LAST]) + b"x" * 100


def test_receiver_whole_blob() -> None:
    rx = receiver_for(DATA)
    results = [rx.feed_chunk(f) for f in frames_of(DATA, 100)]
    assert results == [False] * 7 + [True]
    assert rx.state == "END_DUE" and rx.digest is None
    out = rx.finish(end_for(rx, DATA), limits=LIMITS)
    assert isinstance(out, memoryview) and not out.readonly and out == DATA
    assert rx.state == "DONE"  # type: ignore[comparison-overlap]  # mypy narrowed it above
    assert rx.digest == blob_digest(DATA)
    with pytest.raises(LocalProtocolError, match="in state DONE"):
        rx.finish(end_for(rx, DATA), limits=LIMITS)


def test_receiver_every_size_and_chunk_size() -> None:
    # The chunking of a blob is canonical; check every small size / chunk size,
    # frames given as bytes, bytearray and memoryview.
    for chunk_size in range(1, 8):
        for size in range(0, 4 * chunk_size + 2):
            data = bytes((i * 7 + size) % 256 for i in range(size))
            for wrap in (bytes, bytearray, memoryview):
                rx = receiver_for(data, chunk_size)
                frames = frames_of(data, chunk_size)
                assert len(frames) == chunk_count(size, chunk_size)
                done = [rx.feed_chunk(wrap(f)) for f in frames]
                assert done[-1] and not any(done[:-1])
                assert rx.finish(wrap(end_for(rx, data)), limits=LIMITS) == data


def test_receiver_deferred_hashing_at_any_point() -> None:
    frames = frames_of(DATA, 100)
    for hash_at in range(len(frames) + 1):
        rx = receiver_for(DATA)
        for i, frame in enumerate(frames):
            rx.accept_chunk(frame)
            if i == hash_at:
                assert rx.hasher.hash_pending() == min(100 * (i + 1), len(DATA))
        assert rx.finish(end_for(rx, DATA), limits=LIMITS) == DATA  # hashes what is left


def test_hasher_matches_one_pass() -> None:
    hasher = BlobHasher()
    view = memoryview(DATA)
    for i in range(0, len(DATA), 33):
        hasher.queue(view[i : i + 33])
        if i % 99 == 0:
            hasher.hash_pending()
    assert hasher.pending > 0
    assert hasher.digest() == blob_digest(DATA) and hasher.hashed == len(DATA)


def test_empty_blob_is_one_empty_last_chunk() -> None:
    assert receive_all(receiver_for(b""), [bytes([CHUNK_LAST])], b"").nbytes == 0
    with pytest.raises(BlobDataError, match="chunk of 0 bytes before the last"):
        receiver_for(b"").feed_chunk(bytes([CHUNK_MORE]))
    with pytest.raises(BlobDataError, match="complete but its chunk is not last"):
        receiver_for(DATA[:100]).feed_chunk(bytes([CHUNK_MORE]) + DATA[:100])


def test_missing_last_chunk() -> None:
    rx = receiver_for(DATA)
    for frame in frames_of(DATA, 100)[:-1]:
        rx.feed_chunk(frame)
    with pytest.raises(LocalProtocolError, match="before the last chunk"):
        rx.finish(end_for(rx, DATA), limits=LIMITS)
    with pytest.raises(BlobTruncatedError, match=r"after 700 of 772 bytes .*before the last chunk"):
        rx.eof()
    with pytest.raises(ConnectionLostError):  # poisoned, and still a lost connection
        rx.eof()


def test_missing_end() -> None:
    rx = receiver_for(DATA)
    for frame in frames_of(DATA, 100):
        rx.feed_chunk(frame)
    with pytest.raises(BlobTruncatedError, match=r"after 772 of 772 bytes .*before its END"):
        rx.eof()


def test_eof_after_the_end_is_fine() -> None:
    rx = receiver_for(DATA)
    assert receive_all(rx, frames_of(DATA, 100), DATA) == DATA
    rx.eof()


def test_frame_of_another_type_mid_blob() -> None:
    frames = frames_of(DATA, 100)
    for intruder in (b"\x03" + b"x" * 10, BlobReply.ack(b"\0" * 32).to_cbor(), b"\x00"):
        rx = receiver_for(DATA)
        rx.feed_chunk(frames[0])
        with pytest.raises(BlobDataError, match="expected a chunk"):
            rx.feed_chunk(intruder)
    with pytest.raises(BlobDataError, match="empty frame"):
        receiver_for(DATA).feed_chunk(b"")


def test_end_before_last_chunk_is_refused_as_a_chunk() -> None:
    rx = receiver_for(DATA)
    rx.feed_chunk(frames_of(DATA, 100)[0])
    with pytest.raises(BlobDataError, match="of type 0xa4 after 100 of 772 bytes"):
        rx.feed_chunk(end_for(rx, DATA))


def test_extra_chunk_after_last() -> None:
    for feed in ("feed_chunk", "finish"):
        rx = receiver_for(DATA)
        for frame in frames_of(DATA, 100):
            rx.feed_chunk(frame)
        with pytest.raises(BlobDataError, match="a chunk arrived after the last chunk"):
            getattr(rx, feed)(bytes([CHUNK_LAST]))


def test_chunks_beyond_declared_size() -> None:
    rx = receiver_for(DATA[:150])
    rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:100])
    with pytest.raises(BlobDataError, match="exceed the declared 150 bytes"):
        rx.feed_chunk(bytes([CHUNK_LAST]) + DATA[100:200])


def test_short_total() -> None:
    rx = receiver_for(DATA[:150])
    rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:100])
    with pytest.raises(BlobDataError, match=r"last chunk ends .* after 140 of 150 bytes"):
        rx.feed_chunk(bytes([CHUNK_LAST]) + DATA[100:140])


def test_more_chunk_must_be_full() -> None:
    rx = receiver_for(DATA)
    with pytest.raises(BlobDataError, match="every chunk but the last carries exactly 100"):
        rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:99])


def test_chunk_larger_than_chunk_size() -> None:
    rx = receiver_for(DATA)
    with pytest.raises(BlobDataError, match="chunk of 101 bytes exceeds the chunk size 100"):
        rx.feed_chunk(bytes([CHUNK_MORE]) + DATA[:101])


def test_digest_mismatch_and_poisoning() -> None:
    rx = receiver_for(DATA)
    for frame in frames_of(DATA, 100):
        rx.feed_chunk(frame)
    with pytest.raises(BlobDigestError, match="digest mismatch"):
        rx.finish(end_for(rx, b"something else"), limits=LIMITS)
    assert rx.state == "FAILED"
    with pytest.raises(BlobDigestError):  # poisoned: the same error again
        rx.finish(end_for(rx, DATA), limits=LIMITS)
    with pytest.raises(BlobDigestError):
        rx.feed_chunk(bytes([CHUNK_LAST]))


def test_flipped_byte_in_a_chunk() -> None:
    frames = frames_of(DATA, 100)
    frames[3] = frames[3][:50] + bytes([frames[3][50] ^ 0x80]) + frames[3][51:]
    with pytest.raises(BlobDigestError):
        receive_all(receiver_for(DATA), frames, DATA)


def finished_chunks() -> BlobReceiver:
    rx = receiver_for(DATA)
    for frame in frames_of(DATA, 100):
        rx.feed_chunk(frame)
    return rx


def end_signed(
    payload: dict[str, Any], ident: Identity = ALICE, domain: str = BLOB_END_DOMAIN
) -> bytes:
    envelope = seal_envelope(
        ident.sign, ident.public_key, domain=domain, payload_type=BLOB_END_TYPE,
        payload=cbor.encode(payload),
    )  # fmt: skip
    return envelope.to_cbor()


def test_end_checks() -> None:
    rx = finished_chunks()
    good = {"header": blob_header_id(sealed(rx.header)), "digest": blob_digest(DATA)}
    cases: list[tuple[bytes, type[BlobError], str]] = [
        (b"\xff" * (LIMITS.max_message_size + 1), BlobEndError, "exceeds the limit"),
        (b"", BlobEndError, "^blob end: empty input"),
        (cbor.encode({"a": 1}), BlobEndError, "^blob end: envelope: missing field"),
        (end_signed(good, domain=BLOB_HEADER_DOMAIN), BlobSignatureError, "bad signature"),
        (end_signed(good, ident=MALLORY), BlobSenderError, "blob end signed by .*, the blob is"),
        (end_signed({**good, "x": 1}), BlobEndError, "unknown field"),
        (end_signed({"header": good["header"]}), BlobEndError, "missing field 'digest'"),
        (end_signed({**good, "header": b"\0" * 32}), BlobEndError, "names another header"),
        (end_signed({**good, "digest": b"\0" * 31}), BlobEndError, "'digest' must be 32 bytes"),
        (end_signed({**good, "digest": b"\0" * 32}), BlobDigestError, "digest mismatch"),
    ]
    for frame, error, match in cases:
        with pytest.raises(error, match=match):
            finished_chunks().finish(frame, limits=LIMITS)
    forged = bytearray(end_signed(good))
    forged[-1] ^= 1
    with pytest.raises(BlobSignatureError):
        finished_chunks().finish(bytes(forged), limits=LIMITS)
    assert finished_chunks().finish(end_signed(good), limits=LIMITS) == DATA


def test_end_of_another_blob_is_refused() -> None:
    # A valid END of a different header (another lap) cannot finish this blob.
    rx = finished_chunks()
    other = seal_blob_end(ALICE, sealed(header(lap=4)), blob_digest(DATA))
    with pytest.raises(BlobEndError, match="names another header"):
        rx.finish(other, limits=LIMITS)


def test_huge_claim_then_one_small_chunk_allocates_nothing_proportional() -> None:
    for limits in (attrs.evolve(DEFAULT_LIMITS, blob_chunk_size=4096), DEFAULT_LIMITS):
        claim = limits.max_blob_size
        chunk = bytes([CHUNK_MORE]) + b"\x5a" * limits.blob_chunk_size
        frame = sealed(header(size=claim, chunk_size=limits.blob_chunk_size))
        gc.collect()
        tracemalloc.start()
        try:
            rx = BlobReceiver(verify(frame, limits=limits), frame)
            assert not rx.feed_chunk(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert rx.received == limits.blob_chunk_size
        # Python allocations (tracemalloc) and the reserved map (capacity) are both
        # bounded by what arrived, never by the claim.
        assert peak < 2 * limits.blob_chunk_size + 256 * 1024, peak
        assert rx.capacity <= max(2 * limits.blob_chunk_size, 2 * 1024 * 1024)
        assert rx.capacity < claim / 100


@pytest.mark.parametrize("use_map", [True, False])
def test_blob_buffer_grows_with_the_data(monkeypatch: pytest.MonkeyPatch, use_map: bool) -> None:
    monkeypatch.setattr(blob_module, "_USE_MAP", use_map and blob_module._USE_MAP)
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
    if not blob_module._USE_MAP:
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


# --------------------------------------------------------------------------
# replies


def test_replies_round_trip() -> None:
    digest = blob_digest(DATA)
    for reply in (
        BlobReply.accept(blob_header_id(sealed())),
        BlobReply.ack(digest),
        BlobReply.nack("digest mismatch"),
        BlobReply.nack(""),
    ):
        assert BlobReply.from_cbor(reply.to_cbor()) == reply
    assert cbor.decode(BlobReply.ack(digest).to_cbor(), max_size=100, max_depth=1) == {
        "ack": digest
    }
    assert BlobReply.nack("why").to_cbor() == cbor.encode({"nack": "why"})


def test_nack_reason_is_printable_and_bounded() -> None:
    reply = BlobReply.nack("evil\x1b[2J\nreason" + "é" * 1000)
    assert "\x1b" not in reply.reason and "\n" not in reply.reason
    assert len(reply.reason.encode()) <= REASON_MAX
    assert BlobReply.from_cbor(cbor.encode({"nack": "a\rb"})).reason == "a\\rb"


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01abc",
        cbor.encode({}),
        cbor.encode([1]),
        cbor.encode({"ack": b"short"}),
        cbor.encode({"ack": b"\0" * 32, "extra": 1}),
        cbor.encode({"nack": None}),
        cbor.encode({"nack": "x" * 600}),
        cbor.encode({"hello": 1}),
        b"\xa1" + b"\x00" * 2000,
    ],
)
def test_malformed_replies(frame: bytes) -> None:
    with pytest.raises(BlobReplyError, match="malformed blob reply"):
        BlobReply.from_cbor(frame)


# --------------------------------------------------------------------------
# hostile input (hypothesis)

cbor_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = cbor_values | st.sampled_from(
    [RUN, ALICE.peer_id.raw, BOB.peer_id.raw, "model", "final", 0, 100, b"\0" * 32]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_header_bytes(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        verify(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["run", "kind", "lap", "hop", "epoch", "from", "to", "size"])
        | st.sampled_from(["chunk", "meta", "x"]),
        field_values,
        max_size=12,
    ),
    st.booleans(),
)
def test_hostile_signed_headers(fields: dict[str, object], start_valid: bool) -> None:
    payload = payload_map() if start_valid else {}
    payload.update(fields)
    try:
        raw = cbor.encode(payload)
    except LocalProtocolError:
        return
    frame = signed_payload(raw)
    try:
        h = verify(frame, guard=BlobReplayGuard())
    except BlobError:
        return
    assert h.sender == ALICE.peer_id and h.recipient == BOB.peer_id and h.run_id == RUN


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
    rx = receiver_for(data, chunk_size)
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
            assert rx.finish(end_frame, limits=LIMITS) == data
            assert end is None or end == end_for(rx, data)
    except BlobError as exc:
        assert isinstance(exc, BlobDataError | BlobSignatureError | BlobSenderError)
