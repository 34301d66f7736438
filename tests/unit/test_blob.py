"""The pure blob protocol's records: header and its checks in order, END, replay guard, replies."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.blob import (
    BLOB_END_DOMAIN,
    BLOB_END_TYPE,
    BLOB_HEADER_DOMAIN,
    BLOB_HEADER_TYPE,
    CHUNK_LAST,
    CHUNK_MORE,
    REPLY_MAX_SIZE,
    BlobChunkSizeError,
    BlobDataError,
    BlobDigestError,
    BlobEndError,
    BlobEpochError,
    BlobError,
    BlobHeader,
    BlobHeaderError,
    BlobRecipientError,
    BlobRefusedError,
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
    open_blob_end,
    refusal_code,
    seal_blob_end,
)
from fedup.protocol.blob.reply import MAX_PROOF, MAX_SIGNED
from fedup.protocol.blob.sender import BlobSender
from fedup.protocol.envelope import SignatureError, seal_envelope
from fedup.protocol.refusal import REASON_MAX_BYTES, RefusalCode
from tests.unit.blob_helpers import (
    ALICE,
    BOB,
    DATA,
    LIMITS,
    MALLORY,
    OTHER_RUN,
    RUN,
    frames_of,
    header,
    sealed,
    verify,
)


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
    value = cbor.decode(header().to_cbor(), max_size=1 << 16, max_depth=1)
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
        "run", "kind", "lap", "hop", "epoch", "from", "to", "size", "chunk",
    }  # fmt: skip
    assert verify(sealed(h)) == h
    assert h.chunks == chunk_count(len(DATA), 100) == 8


def test_final_header() -> None:
    h = header(kind="final")
    assert verify(sealed(h)) == h


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"run_id": b"short"}, "'run' must be 16 bytes"),
        ({"kind": "weights"}, "'kind' must be 'model' or 'final'"),
        ({"chunk_size": 0}, "'chunk' must be between 1"),
        ({"lap": -1}, "'lap' must be an unsigned integer"),
        ({"size": 2**64}, "does not fit in 64-bit CBOR"),
    ],
)
def test_sender_refuses_to_seal_invalid_headers(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        sealed(header(**kw))


def test_sender_must_sign_its_own_header() -> None:
    with pytest.raises(LocalProtocolError, match="signed by its sender"):
        sealed(header(), MALLORY)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lap": _DELETE}, "missing field 'lap'"),
        ({"extra": 1}, "unknown field"),
        ({"meta": {}}, r"unknown field\(s\) 'meta'"),  # the header has no meta any more
        ({"lap": -1}, "'lap' must be an unsigned integer"),
        ({"lap": 1.5}, "'lap' must be an unsigned integer"),
        ({"size": "big"}, "'size' must be an unsigned integer"),
        ({"from": b"\0" * 38}, "'from' not an Ed25519"),
        ({"to": b"x"}, "'to' must be 38 bytes"),
        ({"kind": 1}, "'kind' must be a text string"),
        ({"run": [1]}, "nesting deeper than 1"),
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
# chunk layout and the END record


def test_chunk_frames_layout() -> None:
    frames = frames_of(DATA, 100)
    assert len(frames) == 8 == chunk_count(len(DATA), 100)
    assert all(f[0] == CHUNK_MORE and len(f) == 101 for f in frames[:-1])
    assert frames[-1][0] == CHUNK_LAST and len(frames[-1]) == 1 + len(DATA) - 700
    assert frames_of(b"", 100) == [bytes([CHUNK_LAST])]
    assert frames_of(b"x" * 200, 100)[-1] == bytes([CHUNK_LAST]) + b"x" * 100
    with pytest.raises(LocalProtocolError):
        chunk_count(10, 0)


def end_signed(
    payload: dict[str, Any], ident: Identity = ALICE, domain: str = BLOB_END_DOMAIN
) -> bytes:
    envelope = seal_envelope(
        ident.sign, ident.public_key, domain=domain, payload_type=BLOB_END_TYPE,
        payload=cbor.encode(payload),
    )  # fmt: skip
    return envelope.to_cbor()


def open_end(frame: bytes) -> bytes:
    h = header()
    return open_blob_end(frame, header=h, header_id=blob_header_id(sealed(h)), limits=LIMITS)


def test_end_round_trip() -> None:
    digest = blob_digest(DATA)
    assert open_end(seal_blob_end(ALICE, sealed(), digest)) == digest
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        seal_blob_end(ALICE, sealed(), digest[:31])


def test_end_checks() -> None:
    good = {"header": blob_header_id(sealed()), "digest": blob_digest(DATA)}
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
    ]
    for frame, error, match in cases:
        with pytest.raises(error, match=match):
            open_end(frame)
    forged = bytearray(end_signed(good))
    forged[-1] ^= 1
    with pytest.raises(BlobSignatureError):
        open_end(bytes(forged))
    assert open_end(end_signed(good)) == good["digest"]


def test_end_of_another_blob_is_refused() -> None:
    # A valid END of a different header (another lap) cannot finish this blob.
    other = seal_blob_end(ALICE, sealed(header(lap=4)), blob_digest(DATA))
    with pytest.raises(BlobEndError, match="names another header"):
        open_end(other)


# --------------------------------------------------------------------------
# refusal codes of the errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BlobHeaderError, RefusalCode.MALFORMED),
        (BlobSignatureError, RefusalCode.MALFORMED),
        (BlobSenderError, RefusalCode.MALFORMED),
        (BlobRecipientError, RefusalCode.WRONG_RUN),
        (BlobRunError, RefusalCode.WRONG_RUN),
        (BlobEpochError, RefusalCode.STALE),
        (BlobSizeError, RefusalCode.TOO_LARGE),
        (BlobChunkSizeError, RefusalCode.MALFORMED),
        (BlobReplayError, RefusalCode.STALE),
        (BlobDataError, RefusalCode.MALFORMED),
        (BlobEndError, RefusalCode.MALFORMED),
        (BlobDigestError, RefusalCode.MALFORMED),
        (BlobTruncatedError, RefusalCode.MALFORMED),
        (BlobReplyError, RefusalCode.MALFORMED),
    ],
)
def test_every_error_says_which_refusal_answers_it(
    error: type[BlobError], code: RefusalCode
) -> None:
    assert error.code is code
    exc = error("why")
    assert refusal_code(exc) is code
    named = exc.with_peer("peer-x")  # the copy that names the peer keeps class and code
    assert type(named) is error and named.code is code and named.peer == "peer-x"
    assert type(exc.again()) is error and exc.again().reason == "why"


def test_refusal_codes_of_the_header_checks() -> None:
    # The header checks raise errors whose code is the refusal the receiver sends.
    guard = BlobReplayGuard()
    guard.commit(header(lap=9))
    cases: list[tuple[dict[str, Any], RefusalCode]] = [
        ({"me": MALLORY.peer_id}, RefusalCode.WRONG_RUN),
        ({"run_id": OTHER_RUN}, RefusalCode.WRONG_RUN),
        ({"min_epoch": 8}, RefusalCode.STALE),
        ({"max_size": 10}, RefusalCode.TOO_LARGE),
        ({"guard": guard}, RefusalCode.STALE),
        ({"remote": MALLORY.peer_id}, RefusalCode.MALFORMED),
    ]
    for kw, code in cases:
        with pytest.raises(BlobError) as info:
            verify(sealed(), **kw)
        assert info.value.code is code, kw


def test_refused_error_carries_the_code_of_the_nack() -> None:
    exc = BlobRefusedError("refused", code=RefusalCode.STALE)
    assert exc.code is RefusalCode.STALE and BlobRefusedError.code is RefusalCode.MALFORMED
    assert exc.with_peer("p").code is RefusalCode.STALE
    assert exc.again().code is RefusalCode.STALE


def test_refusal_code_of_other_errors() -> None:
    class Coded(RemoteProtocolError):
        code = RefusalCode.BAD_STATE

    assert refusal_code(Coded("x")) is RefusalCode.BAD_STATE
    assert refusal_code(RemoteProtocolError("x")) is RefusalCode.MALFORMED
    broken = RemoteProtocolError("x")
    broken.code = "stale"  # type: ignore[attr-defined]  # not a RefusalCode: ignored
    assert refusal_code(broken) is RefusalCode.MALFORMED


# --------------------------------------------------------------------------
# replies


def test_replies_round_trip() -> None:
    digest = blob_digest(DATA)
    for reply in (
        BlobReply.accept(blob_header_id(sealed())),
        BlobReply.ack(digest),
        BlobReply.nack(RefusalCode.MALFORMED, "digest mismatch"),
        BlobReply.nack(RefusalCode.STALE, ""),
    ):
        assert BlobReply.from_cbor(reply.to_cbor()) == reply
    assert cbor.decode(BlobReply.ack(digest).to_cbor(), max_size=100, max_depth=1) == {
        "ack": digest
    }
    wire = BlobReply.nack(RefusalCode.STALE, "why").to_cbor()
    assert wire == cbor.encode({"nack": "why", "code": "stale"})


@pytest.mark.parametrize("code", list(RefusalCode))
def test_every_code_encodes_and_decodes(code: RefusalCode) -> None:
    reply = BlobReply.nack(code, f"refused: {code.value}")
    frame = reply.to_cbor()
    assert len(frame) <= REPLY_MAX_SIZE
    back = BlobReply.from_cbor(frame)
    assert back == reply and back.code is code and back.kind == "nack"
    # with the longest reason allowed, it still fits a reply frame
    assert len(BlobReply.nack(code, "x" * 10_000).to_cbor()) <= REPLY_MAX_SIZE


def test_an_unknown_code_is_a_malformed_reply() -> None:
    for code in ("rude", "", "STALE", "x" * 40):
        with pytest.raises(BlobReplyError, match="malformed blob reply") as info:
            BlobReply.from_cbor(cbor.encode({"nack": "why", "code": code}))
        assert info.value.code is RefusalCode.MALFORMED
    with pytest.raises(BlobReplyError, match="names no known refusal: 'rude'"):
        BlobReply.from_cbor(cbor.encode({"nack": "why", "code": "rude"}))
    with pytest.raises(BlobReplyError, match="missing field 'code'"):
        BlobReply.from_cbor(cbor.encode({"nack": "why"}))  # the old wire form


def test_a_long_reason_in_any_script_arrives_cut_not_refused() -> None:
    reason = "é" * 300  # 600 bytes of UTF-8, two bytes a character
    assert len(reason.encode()) == 600
    reply = BlobReply.nack(RefusalCode.BAD_STATE, reason)
    back = BlobReply.from_cbor(reply.to_cbor())
    assert back.code is RefusalCode.BAD_STATE
    raw = back.reason.encode()
    assert len(raw) <= REASON_MAX_BYTES
    assert back.reason.endswith("...") and set(back.reason[:-3]) == {"é"}
    assert raw[:-3].decode("utf-8") == "é" * ((REASON_MAX_BYTES - 3) // 2)  # whole characters
    for char in ("€", "😀"):  # three and four bytes a character
        cut = BlobReply.from_cbor(BlobReply.nack(RefusalCode.STALE, char * 200).to_cbor())
        assert set(cut.reason[:-3]) == {char} and len(cut.reason.encode()) <= REASON_MAX_BYTES


def test_nack_reason_is_printable() -> None:
    reply = BlobReply.nack(RefusalCode.MALFORMED, "evil\x1b[2J\nreason")
    assert "\x1b" not in reply.reason and "\n" not in reply.reason
    assert BlobReply.from_cbor(cbor.encode({"nack": "a\rb", "code": "stale"})).reason == "a\\rb"


def test_a_nack_without_a_code_cannot_be_sent() -> None:
    with pytest.raises(LocalProtocolError, match="needs a refusal code"):
        BlobReply("nack", reason="why").to_cbor()


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01abc",
        cbor.encode({}),
        cbor.encode([1]),
        cbor.encode({"ack": b"short"}),
        cbor.encode({"ack": b"\0" * 32, "extra": 1}),
        cbor.encode({"nack": None, "code": "stale"}),
        cbor.encode({"nack": "x" * 600, "code": "stale"}),
        cbor.encode({"nack": "why", "code": 1}),
        cbor.encode({"nack": "why", "code": "stale", "extra": 1}),
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
    except BlobError as exc:
        assert isinstance(exc.code, RefusalCode)
        return
    assert h.sender == ALICE.peer_id and h.recipient == BOB.peer_id and h.run_id == RUN


reply_values = field_values | st.sampled_from([c.value for c in RefusalCode])


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["accept", "ack", "nack", "code", "x"]), reply_values, max_size=4
    )
    | st.binary(max_size=64).map(lambda b: {"raw": b})
)
def test_hostile_replies(value: dict[str, object]) -> None:
    """Any map or bytes: a reply of the right shape, or a BlobReplyError, nothing else."""
    try:
        frame = value["raw"] if set(value) == {"raw"} else cbor.encode(value)
    except LocalProtocolError:
        return
    assert isinstance(frame, bytes)
    try:
        reply = BlobReply.from_cbor(frame)
    except BlobReplyError:
        return
    assert BlobReply.from_cbor(reply.to_cbor()) == reply
    assert (reply.kind == "nack") == (reply.code is not None)


# --------------------------------------------------------------------------
# custody receipts in ACKs, proofs in NACKs

RECEIPT = b"r" * 300  # a signed custody receipt is about this size
PROOF = (b"n0" * 150, b"n1" * 150, b"n2" * 150)


def test_ack_with_a_receipt_round_trips() -> None:
    digest = blob_digest(DATA)
    reply = BlobReply.ack(digest, RECEIPT)
    assert reply.kind == "ack" and reply.ref == digest
    assert reply.receipt == RECEIPT and reply.extra == (RECEIPT,)
    frame = reply.to_cbor()
    assert cbor.decode(frame, max_size=REPLY_MAX_SIZE, max_depth=1) == {
        "ack": digest,
        "receipt": RECEIPT,
    }
    back = BlobReply.from_cbor(frame)
    assert back == reply and back.receipt == RECEIPT


def test_only_an_ack_has_a_receipt() -> None:
    assert BlobReply.ack(blob_digest(DATA)).receipt is None
    assert BlobReply.ack(blob_digest(DATA)).extra == ()
    assert BlobReply.accept(b"\0" * 32).receipt is None
    nack = BlobReply.nack(RefusalCode.EXCLUDED, "you are dead", PROOF)
    assert nack.receipt is None and nack.extra == PROOF


def test_nack_with_a_proof_round_trips() -> None:
    reply = BlobReply.nack(RefusalCode.EXCLUDED, "you are dead", PROOF)
    frame = reply.to_cbor()
    assert cbor.decode(frame, max_size=REPLY_MAX_SIZE, max_depth=2) == {
        "nack": "you are dead",
        "code": "excluded",
        "proof": list(PROOF),
    }
    back = BlobReply.from_cbor(frame)
    assert back == reply and back.extra == PROOF and back.code is RefusalCode.EXCLUDED
    # no proof: no "proof" key on the wire
    plain = BlobReply.nack(RefusalCode.EXCLUDED, "x").to_cbor()
    assert cbor.decode(plain, max_size=100, max_depth=1) == {"nack": "x", "code": "excluded"}


def test_a_proof_longer_than_max_proof_is_cut_on_making() -> None:
    proof = tuple(bytes([i]) * 10 for i in range(MAX_PROOF + 3))
    reply = BlobReply.nack(RefusalCode.EXCLUDED, "dead", proof)
    assert reply.extra == proof[:MAX_PROOF] and len(reply.extra) == MAX_PROOF
    assert BlobReply.from_cbor(reply.to_cbor()).extra == proof[:MAX_PROOF]


def test_the_largest_replies_fit_the_reply_frame() -> None:
    proof = tuple(bytes([i]) * MAX_SIGNED for i in range(MAX_PROOF))
    nack = BlobReply.nack(RefusalCode.EXCLUDED, "é" * 1000, proof)
    frame = nack.to_cbor()
    assert len(frame) <= REPLY_MAX_SIZE
    assert BlobReply.from_cbor(frame) == nack
    ack = BlobReply.ack(b"\1" * 32, b"r" * MAX_SIGNED)
    assert len(ack.to_cbor()) <= REPLY_MAX_SIZE
    assert BlobReply.from_cbor(ack.to_cbor()).receipt == b"r" * MAX_SIGNED


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (cbor.encode({"ack": b"\0" * 32, "receipt": b"r" * (MAX_SIGNED + 1)}), "receipt"),
        (cbor.encode({"ack": b"\0" * 32, "receipt": "text"}), "receipt"),
        (cbor.encode({"ack": b"\0" * 32, "receipt": None}), "receipt"),
        (cbor.encode({"accept": b"\0" * 32, "receipt": b"r"}), "unknown field"),
        (
            cbor.encode({"nack": "x", "code": "excluded", "proof": [b"n" * (MAX_SIGNED + 1)]}),
            r"proof\[0\] must be a byte string of at most",
        ),
        (
            cbor.encode({"nack": "x", "code": "excluded", "proof": [b"ok", b"n" * 2000]}),
            r"proof\[1\]",
        ),
        (cbor.encode({"nack": "x", "code": "excluded", "proof": [b"ok", 3]}), r"proof\[1\]"),
        (
            cbor.encode({"nack": "x", "code": "excluded", "proof": [b"n"] * (MAX_PROOF + 1)}),
            "'proof' must have",
        ),
        (cbor.encode({"nack": "x", "code": "excluded", "proof": b"n"}), "must be an array"),
        (cbor.encode({"ack": b"\0" * 32, "proof": [b"n"]}), "unknown field"),
    ],
)
def test_over_long_or_ill_typed_receipts_and_proofs_are_refused(frame: bytes, match: str) -> None:
    with pytest.raises(BlobReplyError, match="malformed blob reply") as info:
        BlobReply.from_cbor(frame)
    assert info.value.code is RefusalCode.MALFORMED
    with pytest.raises(BlobReplyError, match=match):
        BlobReply.from_cbor(frame)


def sender_at_ack() -> BlobSender:
    tx = BlobSender(ALICE, header(), DATA, limits=LIMITS)
    tx.receive_reply(BlobReply.accept(blob_header_id(tx.header_frame)).to_cbor())
    while tx.state == "CHUNKS":
        tx.next_chunk()
    tx.end_frame(blob_digest(DATA))
    return tx


def test_the_sender_keeps_the_receipt_of_the_ack() -> None:
    tx = sender_at_ack()
    assert tx.receipt is None
    tx.receive_reply(BlobReply.ack(blob_digest(DATA), RECEIPT).to_cbor())
    assert tx.state == "DONE" and tx.receipt == RECEIPT
    plain = sender_at_ack()
    plain.receive_reply(BlobReply.ack(blob_digest(DATA)).to_cbor())
    assert plain.state == "DONE" and plain.receipt is None


def test_a_nack_with_a_proof_reaches_the_sender_as_a_refusal_carrying_it() -> None:
    for at_ack in (False, True):
        tx = sender_at_ack() if at_ack else BlobSender(ALICE, header(), DATA, limits=LIMITS)
        with pytest.raises(BlobRefusedError, match="you are dead") as info:
            tx.receive_reply(BlobReply.nack(RefusalCode.EXCLUDED, "you are dead", PROOF).to_cbor())
        assert info.value.code is RefusalCode.EXCLUDED and info.value.proof == PROOF
        assert tx.state == "FAILED" and tx.receipt is None
    tx = BlobSender(ALICE, header(), DATA, limits=LIMITS)
    with pytest.raises(BlobRefusedError) as plain:
        tx.receive_reply(BlobReply.nack(RefusalCode.STALE, "old").to_cbor())
    assert plain.value.proof == ()


def test_a_sender_refuses_an_ack_with_an_over_long_receipt() -> None:
    tx = sender_at_ack()
    frame = cbor.encode({"ack": blob_digest(DATA), "receipt": b"r" * (MAX_SIGNED + 1)})
    with pytest.raises(BlobReplyError, match="receipt"):
        tx.receive_reply(frame)
    assert tx.state == "FAILED" and tx.receipt is None
