"""Dead notices, the dead chain, custody receipts and final seals: signed, placed, refused."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.envelope import seal_envelope
from fedup.protocol.laps import Position
from fedup.protocol.notices import (
    MAX_SIGNED_SIZE,
    NOTICE_DOMAIN,
    NOTICE_TYPE,
    RECEIPT_DOMAIN,
    RECEIPT_TYPE,
    SEAL_DOMAIN,
    SEAL_TYPE,
    ChainBehindError,
    CustodyReceipt,
    DeadChain,
    DeadNotice,
    FinalSeal,
    NoticeError,
    ReceiptError,
    SealError,
    chain_genesis,
)
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import max_chain_notices
from fedup.protocol.ring import Ring

IDS = sorted((Identity(bytes([i]) * 32) for i in range(1, 6)), key=lambda i: i.peer_id)
M0, M1, M2, M3, M4 = IDS
OUTSIDER = Identity(b"\x09" * 32)
MEMBERS = tuple(i.peer_id for i in IDS)
RUN = b"R" * 16
OTHER_RUN = b"S" * 16
VIEW = hashlib.sha256(b"view").digest()
OTHER_VIEW = hashlib.sha256(b"another view").digest()
AT = Position(3, 1)


def empty_chain(view: bytes = VIEW, run: bytes = RUN) -> DeadChain:
    return DeadChain(run, view, MEMBERS)


def signed(ident: Identity, payload: object, *, domain: str, payload_type: str) -> bytes:
    """An envelope over any payload, validly signed by ``ident``."""
    raw = payload if isinstance(payload, bytes) else cbor.encode(payload)
    envelope = seal_envelope(
        ident.sign, ident.public_key, domain=domain, payload_type=payload_type, payload=raw
    )
    return envelope.to_cbor()


def tampered(envelope: bytes, **changes: Any) -> bytes:
    """The envelope with fields replaced (signature no longer matching)."""
    value = cbor.decode(envelope, max_size=4096, max_depth=2)
    assert isinstance(value, dict)
    value.update(changes)
    return cbor.encode(value)


def flip_sig(envelope: bytes) -> bytes:
    value = cbor.decode(envelope, max_size=4096, max_depth=2)
    assert isinstance(value, dict)
    sig = bytearray(value["sig"])
    sig[0] ^= 1
    return tampered(envelope, sig=bytes(sig))


def notice_fields(ident: Identity = M0, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run": RUN,
        "index": 0,
        "prev": chain_genesis(VIEW),
        "by": ident.peer_id.raw,
        "dead": M1.peer_id.raw,
        "why": "unreachable",
        "at": [AT.lap, AT.hop],
    }
    fields.update(changes)
    return fields


def notice_bytes(ident: Identity = M0, **changes: Any) -> bytes:
    return signed(
        ident, notice_fields(ident, **changes), domain=NOTICE_DOMAIN, payload_type=NOTICE_TYPE
    )


def seal_notice(signer: Identity, dead: Identity, *, chain: DeadChain, **kw: Any) -> bytes:
    """A notice sealed at the head of ``chain`` (fields overridable), as its bytes."""
    args: dict[str, Any] = {
        "run_id": chain.run_id,
        "index": len(chain),
        "prev": chain.head,
        "dead": dead.peer_id,
        "cause": "timed-out",
        "at": AT,
    }
    args.update(kw)
    return DeadNotice.seal(signer, **args).envelope


# --------------------------------------------------------------------------
# dead notices


def test_notice_seal_and_open_round_trip() -> None:
    notice = DeadNotice.seal(
        M2, run_id=RUN, index=4, prev=b"p" * 32, dead=M3.peer_id, cause="timed-out", at=AT
    )
    opened = DeadNotice.open(notice.envelope)
    assert opened == notice
    assert (opened.run_id, opened.index, opened.prev) == (RUN, 4, b"p" * 32)
    assert (opened.claimer, opened.dead) == (M2.peer_id, M3.peer_id)
    assert (opened.cause, opened.at) == ("timed-out", AT)
    assert opened.digest == notice.digest and len(opened.digest) == 32
    assert opened.digest != chain_genesis(VIEW)
    assert str(M3.peer_id) in opened.describe() and "timed-out" in opened.describe()
    assert len(notice.envelope) <= MAX_SIGNED_SIZE


def test_notice_digest_depends_on_the_envelope() -> None:
    a = DeadNotice.open(notice_bytes())
    b = DeadNotice.open(notice_bytes(why="timed-out"))
    assert a.digest != b.digest
    assert DeadNotice.open(a.envelope).digest == a.digest


def test_notice_open_accepts_a_memoryview_and_keeps_bytes() -> None:
    data = notice_bytes()
    opened = DeadNotice.open(memoryview(bytearray(data)))  # type: ignore[arg-type]
    assert opened.envelope == data and isinstance(opened.envelope, bytes)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (flip_sig(notice_bytes()), "bad signature"),
        (tampered(notice_bytes(), payload=cbor.encode(notice_fields(index=1))), "bad signature"),
        (notice_bytes(by=M1.peer_id.raw), "signed by"),
        (notice_bytes(why="bored"), "cause 'bored'"),
        (notice_bytes(extra=1), "unknown field"),
        (notice_bytes(index=max_chain_notices(DEFAULT_LIMITS.max_members) + 1), "index"),
        (notice_bytes(run=b"R" * 15), "run"),
        (notice_bytes(prev=b"p" * 31), "prev"),
        (notice_bytes(dead=b"\0" * 38), "peer ID"),
        (notice_bytes(at=[1, 2, 3]), "at"),
        (notice_bytes(at=[1, -2]), "unsigned"),
        (notice_bytes(at=[True, 2]), "unsigned"),
        (
            signed(M0, notice_fields(), domain=RECEIPT_DOMAIN, payload_type=NOTICE_TYPE),
            "bad signature",
        ),
        (signed(M0, notice_fields(), domain=NOTICE_DOMAIN, payload_type=RECEIPT_TYPE), "type"),
        (signed(M0, b"\xff", domain=NOTICE_DOMAIN, payload_type=NOTICE_TYPE), "dead notice"),
        (signed(M0, [1, 2], domain=NOTICE_DOMAIN, payload_type=NOTICE_TYPE), "expected a map"),
        (b"", "dead notice"),
        (b"\x00" * (MAX_SIGNED_SIZE + 1), "exceeds"),
    ],
)
def test_notice_open_refuses(data: bytes, match: str) -> None:
    with pytest.raises(NoticeError, match=match) as info:
        DeadNotice.open(data)
    assert info.value.code is RefusalCode.BAD_CLAIM
    assert isinstance(info.value, RemoteProtocolError)


def test_notice_fed_split_and_with_trailing_garbage() -> None:
    data = notice_bytes()
    for cut in range(len(data)):
        with pytest.raises(NoticeError):
            DeadNotice.open(data[:cut])
    with pytest.raises(NoticeError):
        DeadNotice.open(data + b"\x00")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    with pytest.raises(NoticeError):
        DeadNotice.open(data)
    with pytest.raises(ReceiptError):
        CustodyReceipt.open(data)
    with pytest.raises(SealError):
        FinalSeal.open(data)


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["run", "index", "prev", "by", "dead", "why", "at", "x"]),
        st.none()
        | st.integers(-5, 2**40)
        | st.binary(max_size=40)
        | st.sampled_from([RUN, M1.peer_id.raw, "unreachable", "timed-out", [1, 2], [[1], 2]])
        | st.text(max_size=10),
    ),
    st.booleans(),
)
def test_hostile_signed_notice_fields(fields: dict[str, object], start_valid: bool) -> None:
    payload = notice_fields() if start_valid else {}
    payload.update(fields)
    data = signed(M0, payload, domain=NOTICE_DOMAIN, payload_type=NOTICE_TYPE)
    try:
        notice = DeadNotice.open(data)
    except NoticeError as exc:
        assert exc.code is RefusalCode.BAD_CLAIM
        return
    assert notice.claimer == M0.peer_id and notice.cause in ("unreachable", "timed-out")


# --------------------------------------------------------------------------
# the chain: genesis, claims


def test_genesis_binds_the_chain_to_the_view() -> None:
    assert chain_genesis(VIEW) == chain_genesis(VIEW)
    assert chain_genesis(VIEW) != chain_genesis(OTHER_VIEW)
    assert len(chain_genesis(VIEW)) == 32 and chain_genesis(VIEW) != VIEW
    assert empty_chain().head == chain_genesis(VIEW)
    ours = empty_chain().claim(M0, "unreachable", AT)
    assert ours.notices[0].prev == chain_genesis(VIEW)
    with pytest.raises(NoticeError, match="out of place"):
        empty_chain(OTHER_VIEW).extend_with(ours.envelopes, receiver=None)


def test_claims_name_the_successor_in_the_ring_of_the_notices_before() -> None:
    chain = empty_chain()
    assert len(chain) == 0 and chain.dead == frozenset() and chain.envelopes == ()
    one = chain.claim(M0, "unreachable", AT)
    n0 = one.notices[0]
    assert (n0.index, n0.claimer, n0.dead, n0.cause, n0.at) == (
        0,
        M0.peer_id,
        M1.peer_id,
        "unreachable",
        AT,
    )
    assert one.dead == {M1.peer_id} and one.head == n0.digest
    assert one.ring == Ring(MEMBERS, frozenset({M1.peer_id}))
    two = one.claim(M0, "timed-out", Position(4, 0))  # M1 is skipped now
    n1 = two.notices[1]
    assert (n1.index, n1.prev, n1.dead) == (1, n0.digest, M2.peer_id)
    assert two.dead == {M1.peer_id, M2.peer_id} and len(two) == 2
    assert two.notice_about(M2.peer_id) == n1 and two.notice_about(M3.peer_id) is None
    wrap = two.claim(M4, "unreachable", AT)  # the ring wraps around
    assert wrap.notices[2].dead == M0.peer_id
    assert len(chain) == 0 and len(one) == 1  # frozen: claims return new chains


def test_who_may_not_claim() -> None:
    one = empty_chain().claim(M0, "unreachable", AT)
    with pytest.raises(LocalProtocolError, match="not a live member"):
        one.claim(M1, "unreachable", AT)  # dead
    with pytest.raises(LocalProtocolError, match="not a live member"):
        one.claim(OUTSIDER, "unreachable", AT)
    chain = empty_chain()
    for _ in range(len(MEMBERS) - 1):
        chain = chain.claim(M0, "unreachable", AT)
    assert chain.ring.live == (M0.peer_id,)
    with pytest.raises(LocalProtocolError, match="no other live member"):
        chain.claim(M0, "unreachable", AT)


# --------------------------------------------------------------------------
# extend_with


def three_deep() -> DeadChain:
    """M0 declares M1, then M2 declares M3, then M4 declares M0."""
    chain = empty_chain().claim(M0, "unreachable", AT)
    chain = chain.claim(M2, "timed-out", AT)
    return chain.claim(M4, "unreachable", AT)


def test_extend_from_nothing_verifies_every_notice() -> None:
    full = three_deep()
    got = empty_chain().extend_with(full.envelopes, receiver=M2.peer_id)
    assert got == full and got.dead == {M1.peer_id, M3.peer_id, M0.peer_id}
    # a prefix of ours grows to the whole
    part = empty_chain().extend_with(full.envelopes[:1], receiver=M2.peer_id)
    assert part.extend_with(full.envelopes, receiver=M2.peer_id) == full
    # the same chain again is no change
    assert full.extend_with(full.envelopes, receiver=M2.peer_id) == full
    assert empty_chain().extend_with([], receiver=M2.peer_id) == empty_chain()


def test_only_new_notices_are_opened(monkeypatch: pytest.MonkeyPatch) -> None:
    full = three_deep()
    ours = empty_chain().extend_with(full.envelopes[:2], receiver=None)
    opened: list[bytes] = []
    real_open = DeadNotice.open

    def counting(data: bytes, **kw: Any) -> DeadNotice:
        opened.append(data)
        return real_open(data, **kw)

    monkeypatch.setattr(DeadNotice, "open", counting)
    assert ours.extend_with(full.envelopes, receiver=None) == full
    assert opened == [full.envelopes[2]]


def test_our_notices_must_come_back_byte_for_byte() -> None:
    ours = empty_chain().claim(M0, "unreachable", AT)
    # the same claim sealed again with another cause: valid, but not our notice 0
    theirs = empty_chain().claim(M0, "timed-out", AT)
    with pytest.raises(NoticeError, match="differs from ours at notice 0") as info:
        ours.extend_with(theirs.envelopes, receiver=None)
    assert not isinstance(info.value, ChainBehindError)
    longer = ours.claim(M2, "unreachable", AT)
    fork = ours.claim(M2, "timed-out", AT)  # agrees on notice 0, not on notice 1
    with pytest.raises(NoticeError, match="differs from ours at notice 1"):
        longer.extend_with(fork.envelopes, receiver=None)


def test_a_chain_behind_ours_is_refused_with_what_it_misses() -> None:
    full = three_deep()
    with pytest.raises(ChainBehindError, match="behind ours") as info:
        full.extend_with(full.envelopes[:1], receiver=None)
    assert info.value.missing == full.notices[1:]
    assert isinstance(info.value, NoticeError) and info.value.code is RefusalCode.BAD_CLAIM
    with pytest.raises(ChainBehindError) as none:
        full.extend_with([], receiver=None)
    assert none.value.missing == full.notices


def place_cases() -> list[tuple[str, DeadChain, bytes, str]]:
    base = empty_chain()
    one = base.claim(M0, "unreachable", AT)  # M1 dead
    return [
        (
            "forged signature",
            base,
            flip_sig(seal_notice(M0, M1, chain=base)),
            "bad signature",
        ),
        (
            "another key swapped in",
            base,
            tampered(
                seal_notice(M0, M1, chain=base),
                key=M4.public_key,
            ),
            "bad signature",
        ),
        ("another run", base, seal_notice(M0, M1, chain=base, run_id=OTHER_RUN), "is for run"),
        ("wrong index", base, seal_notice(M0, M1, chain=base, index=1), "out of place"),
        ("wrong prev", one, seal_notice(M2, M3, chain=one, prev=base.head), "out of place"),
        ("claimer not a member", base, seal_notice(OUTSIDER, M1, chain=base), "not a member"),
        ("dead not a member", base, seal_notice(M0, OUTSIDER, chain=base), "not a member"),
        ("claimer already dead", one, seal_notice(M1, M2, chain=one), "already dead"),
        ("dead already dead", one, seal_notice(M4, M1, chain=one), "already dead"),
        ("not the successor", base, seal_notice(M0, M2, chain=base), "its own successor"),
        ("not the successor after a death", one, seal_notice(M0, M3, chain=one), "successor"),
        ("the claimer itself", base, seal_notice(M0, M0, chain=base), "its own successor"),
        ("the receiver", base, seal_notice(M0, M1, chain=base), "the receiver itself"),
    ]


@pytest.mark.parametrize(
    ("chain", "data", "match"),
    [case[1:] for case in place_cases()],
    ids=[case[0] for case in place_cases()],
)
def test_a_new_notice_must_fit_its_place(chain: DeadChain, data: bytes, match: str) -> None:
    with pytest.raises(NoticeError, match=match) as info:
        chain.extend_with([*chain.envelopes, data], receiver=M1.peer_id)
    assert info.value.code is RefusalCode.BAD_CLAIM
    assert f"dead notice {len(chain)}" in info.value.reason or "signature" in info.value.reason


def test_the_successor_after_a_death_is_the_next_live_member() -> None:
    one = empty_chain().claim(M0, "unreachable", AT)  # M1 dead: M0's successor is M2
    data = seal_notice(M0, M2, chain=one)
    got = one.extend_with([*one.envelopes, data], receiver=M3.peer_id)
    assert got.dead == {M1.peer_id, M2.peer_id}
    # M1 (dead) is not a successor of M0 any more
    with pytest.raises(NoticeError, match="already dead"):
        one.extend_with([*one.envelopes, seal_notice(M0, M1, chain=one)], receiver=None)


def test_a_notice_about_the_receiver_is_refused_only_when_it_is_named() -> None:
    data = seal_notice(M0, M1, chain=empty_chain())
    with pytest.raises(NoticeError, match="the receiver itself"):
        empty_chain().extend_with([data], receiver=M1.peer_id)
    got = empty_chain().extend_with([data], receiver=None)  # a final to a member counted dead
    assert got.dead == {M1.peer_id}
    assert empty_chain().extend_with([data], receiver=M2.peer_id).dead == {M1.peer_id}


def test_a_chain_longer_than_the_view_is_refused_before_any_check() -> None:
    bound = max_chain_notices(len(MEMBERS))  # every member dead, back and dead again
    junk = [b"junk"] * (bound + 1)
    with pytest.raises(NoticeError, match=f"of {bound + 1} notices for a view of 5"):
        empty_chain().extend_with(junk, receiver=None)
    # as many as the view is the limit; the junk is then what is refused
    with pytest.raises(NoticeError, match="dead notice") as info:
        empty_chain().extend_with(junk[:-1], receiver=None)
    assert "for a view of" not in info.value.reason


def test_the_first_bad_notice_is_named_and_the_chain_is_unchanged() -> None:
    full = three_deep()
    bad = [*full.envelopes[:2], seal_notice(M0, M2, chain=full)]
    ours = empty_chain()
    with pytest.raises(NoticeError, match="dead notice 2"):
        ours.extend_with(bad, receiver=None)
    assert len(ours) == 0


# --------------------------------------------------------------------------
# custody receipts


def receipt_fields(ident: Identity = M1, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run": RUN,
        "kind": "model",
        "lap": 2,
        "hop": 1,
        "from": M0.peer_id.raw,
        "by": ident.peer_id.raw,
        "digest": b"d" * 32,
    }
    fields.update(changes)
    return fields


def receipt_bytes(ident: Identity = M1, **changes: Any) -> bytes:
    return signed(
        ident,
        receipt_fields(ident, **changes),
        domain=RECEIPT_DOMAIN,
        payload_type=RECEIPT_TYPE,
    )


@pytest.mark.parametrize("kind", ["model", "final"])
def test_receipt_seal_and_open_round_trip(kind: Any) -> None:
    r = CustodyReceipt.seal(
        M1, run_id=RUN, kind=kind, position=Position(5, 2), sender=M0.peer_id, digest=b"d" * 32
    )
    opened = CustodyReceipt.open(r.envelope)
    assert opened == r
    assert (opened.kind, opened.position, opened.sender, opened.taker) == (
        kind,
        Position(5, 2),
        M0.peer_id,
        M1.peer_id,
    )
    assert opened.digest == b"d" * 32 and opened.run_id == RUN
    assert len(r.envelope) <= MAX_SIGNED_SIZE
    assert CustodyReceipt.open(receipt_bytes(kind=kind)).taker == M1.peer_id


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (flip_sig(receipt_bytes()), "bad signature"),
        (tampered(receipt_bytes(), payload=cbor.encode(receipt_fields(lap=3))), "bad signature"),
        (receipt_bytes(by=M2.peer_id.raw), "signed by"),
        (receipt_bytes(kind="other"), "kind 'other'"),
        (receipt_bytes(kind=""), "kind"),
        (receipt_bytes(digest=b"d" * 31), "digest"),
        (receipt_bytes(lap=2**32), "lap"),
        (receipt_bytes(extra=0), "unknown field"),
        (
            signed(M1, receipt_fields(), domain=NOTICE_DOMAIN, payload_type=RECEIPT_TYPE),
            "bad signature",
        ),
        (notice_bytes(), "type"),  # a dead notice is not a receipt
        (b"\xa0", "custody receipt"),
    ],
)
def test_receipt_open_refuses(data: bytes, match: str) -> None:
    with pytest.raises(ReceiptError, match=match) as info:
        CustodyReceipt.open(data)
    assert info.value.code is RefusalCode.MALFORMED


def test_receipt_fed_split() -> None:
    data = receipt_bytes()
    for cut in range(len(data)):
        with pytest.raises(ReceiptError):
            CustodyReceipt.open(data[:cut])
    with pytest.raises(ReceiptError):
        CustodyReceipt.open(data + b"\x00")


# --------------------------------------------------------------------------
# final seals


def test_final_seal_round_trip() -> None:
    seal = FinalSeal.seal(M3, run_id=RUN, content=b"c" * 32, model=b"m" * 32)
    opened = FinalSeal.open(seal.envelope)
    assert opened == seal
    assert (opened.run_id, opened.origin, opened.content, opened.model) == (
        RUN,
        M3.peer_id,
        b"c" * 32,
        b"m" * 32,
    )
    with pytest.raises(LocalProtocolError):
        FinalSeal.seal(M3, run_id=RUN, content=b"c" * 32, model=b"m" * 31)


def seal_bytes(ident: Identity = M3, **changes: Any) -> bytes:
    fields: dict[str, Any] = {
        "run": RUN,
        "origin": ident.peer_id.raw,
        "content": b"c" * 32,
        "model": b"m" * 32,
    }
    fields.update(changes)
    return signed(ident, fields, domain=SEAL_DOMAIN, payload_type=SEAL_TYPE)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (flip_sig(seal_bytes()), "bad signature"),
        (
            tampered(
                seal_bytes(),
                payload=cbor.encode(
                    {
                        "run": RUN,
                        "origin": M3.peer_id.raw,
                        "content": b"x" * 32,
                        "model": b"m" * 32,
                    }
                ),
            ),
            "bad signature",
        ),
        (seal_bytes(origin=M0.peer_id.raw), "signed by"),
        (seal_bytes(content=b"c" * 33), "content"),
        (seal_bytes(model=b"m" * 31), "model"),
        (seal_bytes(extra=1), "unknown field"),
        (receipt_bytes(), "type"),
        (signed(M3, {"run": RUN}, domain=NOTICE_DOMAIN, payload_type=SEAL_TYPE), "signature"),
    ],
)
def test_final_seal_open_refuses(data: bytes, match: str) -> None:
    with pytest.raises(SealError, match=match) as info:
        FinalSeal.open(data)
    assert info.value.code is RefusalCode.NOT_FINAL
