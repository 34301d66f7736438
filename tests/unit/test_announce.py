"""The mDNS TXT layout of a signed peer record, and the rules of a sighting."""

from __future__ import annotations

import base64
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.net.discovery.base import DiscoveryCore, EventKind, LostCause
from fedup.protocol.announce import (
    CHUNK_SIZE,
    AnnouncementError,
    NetworkScope,
    RejectReason,
    decode_txt,
    encode_txt,
    encode_txt_rdata,
    max_txt_items,
    max_txt_size,
    parse_txt_rdata,
    verify_announcement,
    verify_sighting,
)
from fedup.protocol.envelope import seal_envelope
from fedup.protocol.records import (
    PEER_RECORD_DOMAIN,
    PEER_RECORD_TYPE,
    Address,
    PeerRecord,
    PeerRecordBook,
    SignedPeerRecord,
    network_key_id,
)

ALICE = Identity(b"\x01" * 32)
MALLORY = Identity(b"\x02" * 32)
KEY_ID = network_key_id(b"k" * 32)
SCOPE = NetworkScope("lenders", KEY_ID)
HOME = (Address("192.168.1.7", 4100), Address("fe80::1", 4100))


def record(seq: int = 5, ident: Identity = ALICE, **kw: object) -> SignedPeerRecord:
    fields: dict[str, object] = {"addresses": HOME, "network": "lenders", "network_key_id": KEY_ID}
    fields.update(kw)
    return PeerRecord(ident.peer_id, seq, **fields).seal(ident)  # type: ignore[arg-type]


def rdata(*items: bytes) -> bytes:
    return b"".join(bytes([len(i)]) + i for i in items)


def rejected(
    code: RejectReason, txt: object, advertised: tuple[Address, ...] = HOME, **kw: object
) -> str:
    with pytest.raises(AnnouncementError) as info:
        verify_announcement(txt, advertised, **{"scope": SCOPE, **kw})  # type: ignore[arg-type]
    assert info.value.code is code, info.value
    assert isinstance(info.value, RemoteProtocolError)
    return info.value.reason


# --- encoding ---------------------------------------------------------------------


def test_round_trip_rdata_and_items() -> None:
    signed = record()
    items = encode_txt(signed.envelope)
    assert list(items) == ["v", "r0", "r1"]  # a typical record: two chunks
    assert items["v"] == "1"
    assert len(items["r0"]) == CHUNK_SIZE
    wire = encode_txt_rdata(signed.envelope)
    assert len(wire) < 450  # "a few hundred bytes"
    assert decode_txt(wire) == signed.envelope
    assert decode_txt(items) == signed.envelope
    assert decode_txt({k.encode(): v.encode() for k, v in items.items()}) == signed.envelope
    assert all(len(item) <= 255 for item in parse_txt_rdata(wire))
    assert "=" not in "".join(items.values())  # base64url without padding


def test_largest_record_fits_the_bounds() -> None:
    limits = Limits()
    envelope = bytes(range(256)) * (limits.max_record_size // 256)
    wire = encode_txt_rdata(envelope)
    assert len(wire) <= max_txt_size(limits)
    assert len(parse_txt_rdata(wire)) == max_txt_items(limits)
    assert max(len(k) + 1 + len(v or b"") for k, v in parse_txt_rdata(wire).items()) <= 255
    assert decode_txt(wire) == envelope
    with pytest.raises(LocalProtocolError):
        encode_txt(envelope + b"x")
    with pytest.raises(LocalProtocolError):
        encode_txt(b"")


def test_every_truncation_is_refused_cleanly() -> None:
    wire = encode_txt_rdata(record().envelope)
    for n in range(len(wire)):
        with pytest.raises(AnnouncementError):
            verify_announcement(wire[:n], HOME, scope=SCOPE)
    with pytest.raises(AnnouncementError):
        verify_announcement(wire + b"\x00\x01x", HOME, scope=SCOPE)


def test_empty_strings_are_skipped_like_dns_sd() -> None:
    items = encode_txt(record().envelope)
    parts = [f"{k}={v}".encode() for k, v in items.items()]
    assert decode_txt(rdata(b"", *parts, b"")) == record().envelope


# --- every TXT rejection ------------------------------------------------------------


def good_items() -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in encode_txt(record().envelope).items()}


def with_items(**changes: bytes | None) -> dict[bytes, bytes | None]:
    items = good_items()
    for key, value in changes.items():
        if value is None and key.startswith("drop_"):
            items.pop(key[5:].encode())
        else:
            items[key.encode()] = value
    return items


@pytest.mark.parametrize(
    ("txt", "code", "words"),
    [
        (with_items(drop_v=None), RejectReason.BAD_TXT, "missing the 'v'"),
        (with_items(v=None), RejectReason.BAD_TXT, "no value"),
        (with_items(v=b""), RejectReason.BAD_TXT, "no value"),
        (with_items(v=b"2"), RejectReason.VERSION, "version b'2'"),
        (with_items(x=b"1"), RejectReason.BAD_TXT, "unknown TXT key"),
        (with_items(R0=b"AAAA"), RejectReason.BAD_TXT, "unknown TXT key"),
        (with_items(r01=b"AAAA"), RejectReason.BAD_TXT, "unknown TXT key"),
        (with_items(drop_r0=None), RejectReason.BAD_TXT, "not r0..r0"),
        (with_items(drop_r0=None, drop_r1=None), RejectReason.BAD_TXT, "no record chunks"),
        (with_items(r3=b"AAAA"), RejectReason.BAD_TXT, "not r0..r2"),
        (with_items(r1=None), RejectReason.BAD_TXT, "has no value"),
        (with_items(r1=b""), RejectReason.BAD_TXT, "has no value"),
        (with_items(r0=b"A" * 249), RejectReason.BAD_TXT, "chunks hold 250"),
        (with_items(r1=b"A" * 251), RejectReason.BAD_TXT, "chunks hold 250"),
        (with_items(r1=b"AAA+"), RejectReason.BAD_TXT, "outside base64url"),
        (with_items(r1=b"AA=="), RejectReason.BAD_TXT, "outside base64url"),
        (with_items(r1=b"AA AA"), RejectReason.BAD_TXT, "outside base64url"),
        (with_items(r1=b"AAA"), RejectReason.BAD_TXT, "impossible length"),
        (with_items(r1=b"B"), RejectReason.BAD_TXT, "not canonical"),
        ({"v": "1", 0: "A"}, RejectReason.BAD_TXT, "must be bytes or text"),
        ({"v": "1", "r0": 3.5}, RejectReason.BAD_TXT, "must be bytes or text"),
        ({"v": "1", "r0": "\ud800"}, RejectReason.BAD_TXT, "not valid text"),
        ({"v": "1", b"v": "1"}, RejectReason.BAD_TXT, "repeated"),
        ({f"r{i}": "A" for i in range(20)}, RejectReason.BAD_TXT, "TXT items, at most"),
        (12, RejectReason.BAD_TXT, "must be bytes"),
        (None, RejectReason.BAD_TXT, "must be bytes"),
        (rdata(b"v=1", b"v=1"), RejectReason.BAD_TXT, "repeated"),
        (rdata(b"v=1", b"=AAAA"), RejectReason.BAD_TXT, "empty key"),
        (b"\x05v=1", RejectReason.BAD_TXT, "runs past the end"),
        (rdata(b"v=1", *[b"x%d=1" % i for i in range(12)]), RejectReason.BAD_TXT, "more than 12"),
        (b"\x00" * 3000, RejectReason.BAD_TXT, "exceeds"),
        (b"", RejectReason.BAD_TXT, "missing the 'v'"),
        (b"\x00", RejectReason.BAD_TXT, "missing the 'v'"),
    ],
)
def test_txt_rejections(txt: object, code: RejectReason, words: str) -> None:
    assert words in rejected(code, txt)


def test_too_many_chunks_for_the_limit() -> None:
    small = Limits(max_record_size=300)  # 400 base64 characters: 2 chunks
    chunks = {f"r{i}": "A" * CHUNK_SIZE for i in range(3)}
    with pytest.raises(AnnouncementError, match="at most"):
        decode_txt({"v": "1", **chunks}, limits=small)
    envelope = record().envelope
    assert len(envelope) < 300
    assert decode_txt(encode_txt_rdata(envelope), limits=small) == envelope
    too_long = {"v": "1", "r0": "A" * CHUNK_SIZE, "r1": "A" * 160}
    with pytest.raises(AnnouncementError, match="max_record_size"):
        decode_txt(too_long, limits=small)


# --- every rule of a sighting ---------------------------------------------------------


def txt_of(signed: SignedPeerRecord | bytes) -> bytes:
    return encode_txt_rdata(signed.envelope if isinstance(signed, SignedPeerRecord) else signed)


def test_good_sighting_and_address_subset() -> None:
    signed = record()
    assert verify_announcement(txt_of(signed), HOME, scope=SCOPE).signed == signed
    assert verify_announcement(txt_of(signed), HOME[:1], scope=SCOPE).fresh


def test_bad_signature() -> None:
    envelope = bytearray(record().envelope)
    envelope[-5] ^= 1  # inside the 64-byte signature, the last field of the map
    assert "bad signature" in rejected(RejectReason.BAD_SIGNATURE, txt_of(bytes(envelope)))


def test_peer_id_not_matching_the_key() -> None:
    claimed = PeerRecord(MALLORY.peer_id, 5, HOME, "lenders", KEY_ID)
    envelope = seal_envelope(
        ALICE.sign,
        ALICE.public_key,
        domain=PEER_RECORD_DOMAIN,
        payload_type=PEER_RECORD_TYPE,
        payload=claimed.to_cbor(),
    ).to_cbor()
    assert "claims peer" in rejected(RejectReason.PEER_ID_MISMATCH, txt_of(envelope))


def test_well_signed_garbage_payload() -> None:
    envelope = seal_envelope(
        ALICE.sign,
        ALICE.public_key,
        domain=PEER_RECORD_DOMAIN,
        payload_type=PEER_RECORD_TYPE,
        payload=b"\xa1aab",
    ).to_cbor()
    rejected(RejectReason.BAD_RECORD, txt_of(envelope))
    rejected(RejectReason.BAD_RECORD, txt_of(b"not cbor at all"))


def test_unsupported_protocol_version() -> None:
    reason = rejected(RejectReason.VERSION, txt_of(record(protocol=2)))
    assert "protocol version 2" in reason


def test_other_network_name_and_key() -> None:
    rejected(RejectReason.OTHER_NETWORK, txt_of(record(network="hospitals")))
    rejected(RejectReason.OTHER_NETWORK_KEY, txt_of(record(network_key_id=None)))
    other_key = network_key_id(b"o" * 32)
    rejected(RejectReason.OTHER_NETWORK_KEY, txt_of(record(network_key_id=other_key)))
    rejected(RejectReason.OTHER_NETWORK_KEY, txt_of(record()), scope=NetworkScope("lenders", None))
    # name checked before key
    rejected(RejectReason.OTHER_NETWORK, txt_of(record(network="x", network_key_id=None)))
    # passive browsing: any name, any key
    anything = NetworkScope(None, None, any_key=True)
    assert verify_announcement(txt_of(record(network="x")), HOME, scope=anything)
    open_net = NetworkScope("lenders", None)
    assert verify_announcement(txt_of(record(network_key_id=None)), HOME, scope=open_net)


def test_address_mismatch() -> None:
    signed = record()
    moved = (Address("192.168.1.66", 4100),)
    reason = rejected(RejectReason.ADDRESS_MISMATCH, txt_of(signed), moved)
    assert "192.168.1.66:4100" in reason
    other_port = (Address("192.168.1.7", 4101),)
    rejected(RejectReason.ADDRESS_MISMATCH, txt_of(signed), other_port)
    rejected(RejectReason.ADDRESS_MISMATCH, txt_of(signed), (*HOME, *moved))
    assert "no address" in rejected(RejectReason.ADDRESS_MISMATCH, txt_of(signed), ())


def test_freshness_with_a_book() -> None:
    book = PeerRecordBook()
    assert verify_announcement(txt_of(record(5)), HOME, scope=SCOPE, book=book).fresh
    again = verify_announcement(txt_of(record(5)), HOME, scope=SCOPE, book=book)
    assert not again.fresh  # the same record repeated is fine
    assert "not newer" in rejected(RejectReason.STALE_SEQ, txt_of(record(4)), book=book)
    assert verify_announcement(txt_of(record(6)), HOME, scope=SCOPE, book=book).fresh
    full = PeerRecordBook(max_peers=1)
    verify_announcement(txt_of(record()), HOME, scope=SCOPE, book=full)
    rejected(RejectReason.BOOK_FULL, txt_of(record(ident=MALLORY)), book=full)


def test_a_kept_outcome_never_skips_a_rule_that_depends_on_the_observer() -> None:
    """Rules 1-5 are kept by content; freshness, the scope and the addresses are not
    shortcut: the same bytes judged for other books, scopes and addresses."""
    txt = txt_of(record(7))
    older, newer = PeerRecordBook(), PeerRecordBook()
    verify_announcement(txt_of(record(9)), HOME, scope=SCOPE, book=newer)
    assert verify_announcement(txt, HOME, scope=SCOPE, book=older).fresh
    assert "not newer" in rejected(RejectReason.STALE_SEQ, txt, book=newer)
    assert verify_announcement(txt, HOME, scope=SCOPE, book=older).fresh is False  # a repeat
    rejected(RejectReason.OTHER_NETWORK, txt, scope=NetworkScope("hospitals", KEY_ID))
    rejected(RejectReason.ADDRESS_MISMATCH, txt, (Address("192.168.1.66", 4100),))
    assert verify_announcement(txt, HOME, scope=SCOPE).signed == record(7)


def test_a_refused_announcement_is_judged_again_not_remembered() -> None:
    envelope = bytearray(record(11).envelope)
    envelope[-5] ^= 1
    bad = txt_of(bytes(envelope))
    for _ in range(3):  # the same bytes: refused each time, with the same reason
        assert "bad signature" in rejected(RejectReason.BAD_SIGNATURE, bad)


def test_rules_apply_in_order() -> None:
    # a bad signature on a record of another network, from a wrong address: bad-signature
    envelope = bytearray(record(network="x").envelope)
    envelope[-5] ^= 1
    rejected(RejectReason.BAD_SIGNATURE, txt_of(bytes(envelope)), ())
    # version before network, network before addresses, addresses before freshness
    rejected(RejectReason.VERSION, txt_of(record(protocol=2, network="x")))
    rejected(RejectReason.OTHER_NETWORK, txt_of(record(network="x")), ())
    book = PeerRecordBook()
    book.admit(record(9))
    rejected(RejectReason.ADDRESS_MISMATCH, txt_of(record(1)), (), book=book)


def test_error_carries_the_record_after_the_signature_verified() -> None:
    signed = record(network="hospitals")
    with pytest.raises(AnnouncementError) as info:
        verify_announcement(txt_of(signed), HOME, scope=SCOPE)
    assert info.value.record == signed
    assert info.value.peer == ALICE.peer_id.text
    assert str(info.value).startswith("other-network: ")
    renamed = info.value.with_peer("x")
    assert renamed.code is RejectReason.OTHER_NETWORK and renamed.peer == "x"


# --- hostile input ----------------------------------------------------------------------

_keys = st.one_of(
    st.sampled_from([b"v", "v", b"r0", "r0", "r1", b"r2", "r10", "r00", b"V"]),
    st.binary(max_size=6),
    st.text(max_size=6),
    st.integers(),
    st.none(),
)
_values = st.one_of(
    st.none(),
    st.sampled_from([b"1", "1", b"2", ""]),
    st.binary(max_size=300),
    st.text(max_size=300),
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", max_size=260
    ),
    st.integers(),
    st.lists(st.integers(), max_size=3),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=16))
def test_hostile_txt_dicts_only_raise_the_typed_error(txt: dict[object, object]) -> None:
    try:
        verify_announcement(txt, HOME, scope=SCOPE)
    except AnnouncementError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_hostile_rdata_only_raises_the_typed_error(wire: bytes) -> None:
    with pytest.raises(AnnouncementError):
        verify_announcement(wire, HOME, scope=SCOPE)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600))
def test_well_formed_txt_around_random_envelopes(envelope: bytes) -> None:
    with pytest.raises(AnnouncementError) as info:
        verify_announcement(encode_txt_rdata(envelope), HOME, scope=SCOPE)
    assert info.value.code in {RejectReason.BAD_RECORD, RejectReason.BAD_SIGNATURE}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_single_byte_corruption_of_a_good_txt(data: st.DataObject) -> None:
    wire = bytearray(encode_txt_rdata(record().envelope))
    pos = data.draw(st.integers(0, len(wire) - 1))
    value = data.draw(st.integers(0, 255))
    if wire[pos] == value:
        return
    wire[pos] = value
    try:
        result = verify_announcement(bytes(wire), HOME, scope=SCOPE)
    except AnnouncementError:
        return
    # a change that still verifies can only be one that decodes to the same envelope
    assert result.signed == record()


def test_b64_alphabet_is_url_safe() -> None:
    envelope = bytes([0xFB, 0xFF]) * 20  # encodes to '-' and '_' in base64url
    text = "".join(v for k, v in encode_txt(envelope).items() if k != "v")
    assert "-" in text or "_" in text
    assert decode_txt(encode_txt(envelope)) == envelope
    assert base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == envelope


# --- the core's bookkeeping (pure, no trio) ------------------------------------------------


def test_core_events_counters_and_logging_once(caplog: pytest.LogCaptureFixture) -> None:
    core = DiscoveryCore(scope=SCOPE, local_peer=MALLORY.peer_id)
    obs = core.observe("a", txt_of(record(5)), HOME, now=1.0)
    assert [e.kind for e in obs.events] == [EventKind.FOUND]
    assert core.observe("a", txt_of(record(5)), HOME, now=2.0).events == ()
    assert [e.kind for e in core.observe("a", txt_of(record(6)), HOME, now=3.0).events] == [
        EventKind.UPDATED
    ]
    # our own record (MALLORY is local) is ignored entirely
    assert core.observe("m", txt_of(record(ident=MALLORY)), HOME, now=3.0).sighting is None
    with caplog.at_level(logging.INFO, logger="fedup.discovery"):
        for _ in range(5):
            core.observe("evil", txt_of(record(6)), (Address("10.6.6.6", 1),), now=4.0)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert core.rejections.snapshot() == {"address-mismatch": 5}
    sighting = core.sighting("evil")
    assert sighting is not None and not sighting.verified
    assert sighting.reason is RejectReason.ADDRESS_MISMATCH
    assert sighting.peer_id == ALICE.peer_id  # signature verified, so the ID is known
    lost = core.remove("a", cause=LostCause.EXPIRED)
    assert [(e.kind, e.cause) for e in lost] == [(EventKind.LOST, LostCause.EXPIRED)]
    # after an expiry the same record may come back
    assert [e.kind for e in core.observe("a", txt_of(record(6)), HOME, now=5.0).events] == [
        EventKind.FOUND
    ]
    # after a goodbye it may not (a replay)
    core.remove("a", cause=LostCause.GOODBYE)
    assert core.observe("a2", txt_of(record(6)), HOME, now=6.0).sighting.reason is (  # type: ignore[union-attr]
        RejectReason.STALE_SEQ
    )


def test_a_newer_record_supersedes_the_copies_other_sources_carry() -> None:
    core = DiscoveryCore(scope=SCOPE)
    bob = Identity.generate()
    core.observe("a", txt_of(record(5)), HOME, now=1.0)
    core.observe("b", txt_of(record(5)), HOME, now=1.0)  # the same record, a second source
    core.observe("bob", txt_of(record(5, ident=bob)), HOME, now=1.0)
    core.observe("c", txt_of(record(7)), HOME, now=2.0)
    for source in ("a", "b"):
        old = core.sighting(source)
        assert old is not None and not old.verified
        assert old.reason is RejectReason.STALE_SEQ
        assert old.detail == "superseded by seq 7 from c"
    assert all(core.sighting(s).verified for s in ("c", "bob"))  # type: ignore[union-attr]
    # superseded copies are not found again, and a goodbye withdraws the live copies
    core.observe("d", txt_of(record(7)), HOME, now=3.0)
    assert core.remove("c", cause=LostCause.GOODBYE)[0].kind is EventKind.LOST
    withdrawn = core.sighting("d")
    assert withdrawn is not None and not withdrawn.verified
    assert withdrawn.detail == "record withdrawn by a goodbye from c"
    assert core.sighting("a").detail == "superseded by seq 7 from c"  # type: ignore[union-attr]
    assert core.sighting("bob").verified  # type: ignore[union-attr]


def test_observers_of_one_announcement_share_its_values_and_judge_it_each() -> None:
    """A shared dict (the memory hub's one notice for every member) makes the verified
    record, the sighting and the event once; each core still judges freshness itself."""
    shared: dict[object, object] = {}
    first, second, third = (DiscoveryCore(scope=SCOPE) for _ in range(3))
    third.observe("a", txt_of(record(7)), HOME, now=1.0)  # it holds a newer record
    txt = txt_of(record(5))
    a = first.observe("a", txt, HOME, now=1.0, shared=shared)
    b = second.observe("a", txt, HOME, now=1.0, shared=shared)
    assert [e.kind for e in a.events] == [EventKind.FOUND]
    assert b.events == a.events and b.sighting is a.sighting and b.events[0] is a.events[0]
    stale = third.observe("a", txt, HOME, now=1.0, shared=shared)
    assert stale.events == () and stale.sighting is not None
    assert stale.sighting.reason is RejectReason.STALE_SEQ
    assert third.peers()[ALICE.peer_id].record.seq == 7
    # a repeat, later: no event, for each core on its own
    assert first.observe("a", txt, HOME, now=2.0, shared=shared).events == ()
    # another network's core refuses what ours shared
    other = DiscoveryCore(scope=NetworkScope("others", KEY_ID))
    refused = other.observe("a", txt, HOME, now=1.0, shared=shared)
    assert refused.events == () and refused.sighting is not None
    assert refused.sighting.reason is RejectReason.OTHER_NETWORK


def test_equal_rules_share_and_a_core_whose_rules_change_judges_by_the_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a shared dict holds is keyed by the rules (scope and limits), not by the
    objects that carry them: a core with an equal scope of its own takes the values made
    for ours without verifying again; a core whose scope is replaced judges by the new one."""
    import fedup.net.discovery.base as base_module

    verified: list[object] = []
    real = base_module.verify_announcement

    def counting(*args: object, **kw: object) -> object:
        verified.append(args[0])
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(base_module, "verify_announcement", counting)
    shared: dict[object, object] = {}
    txt = txt_of(record(5))
    ours = DiscoveryCore(scope=SCOPE)
    twin = DiscoveryCore(scope=NetworkScope(SCOPE.name, SCOPE.key_id))
    assert twin.scope is not ours.scope
    first = ours.observe("a", txt, HOME, now=1.0, shared=shared)
    second = twin.observe("a", txt, HOME, now=1.0, shared=shared)
    assert len(verified) == 1
    assert second.sighting is first.sighting and second.events == first.events
    # a core that moved to another network refuses what the old one accepted
    moved = DiscoveryCore(scope=SCOPE)
    moved.observe("b", txt_of(record(5, ident=Identity(b"\x02" * 32))), HOME, now=1.0)
    moved.scope = NetworkScope("others", KEY_ID)
    refused = moved.observe("a", txt, HOME, now=1.0, shared=shared)
    assert refused.events == () and refused.sighting is not None
    assert refused.sighting.reason is RejectReason.OTHER_NETWORK


def test_core_bounds_sources_evicting_refused_ones_first() -> None:
    core = DiscoveryCore(scope=SCOPE, max_sources=3)
    core.observe("good", txt_of(record()), HOME, now=0.0)
    for i in range(10):
        core.observe(f"junk{i}", b"junk", HOME, now=float(i))
    assert len(core.sightings()) == 3
    assert core.sighting("good") is not None
    assert core.rejections["bad-txt"] == 10
    full = DiscoveryCore(scope=SCOPE, max_sources=1)
    full.observe("good", txt_of(record()), HOME, now=0.0)
    full.observe("junk", b"junk", HOME, now=1.0)
    assert full.drops.snapshot() == {"too-many-sources": 1}


def test_a_flood_of_signed_fakes_cannot_push_out_a_proven_peer() -> None:
    """Fakes signed with the sniffed fingerprint are verified sightings; when the sources
    are full, a verified newcomer replaces the oldest one of a peer that never completed
    a handshake, never a proven peer, and junk replaces nothing."""
    core = DiscoveryCore(scope=SCOPE, max_sources=3)
    member = Identity(b"\x61" * 32)
    core.observe("member", txt_of(record(ident=member)), HOME, now=0.0)
    core.prove(member.peer_id)
    fakes = [Identity(bytes([0x70 + i]) * 32) for i in range(6)]
    lost = []
    for i, fake in enumerate(fakes):
        obs = core.observe(f"fake{i}", txt_of(record(ident=fake)), HOME, now=1.0 + i)
        lost += [e.peer_id for e in obs.events if e.kind is EventKind.LOST]
        assert any(e.kind is EventKind.FOUND for e in obs.events)  # every newcomer got in
    assert lost == [f.peer_id for f in fakes[:4]]  # oldest first, each reported lost
    assert set(core.peers()) == {member.peer_id, fakes[4].peer_id, fakes[5].peer_id}
    assert core.observe("junk", b"junk", HOME, now=9.0).events == ()
    assert set(core.peers()) == {member.peer_id, fakes[4].peer_id, fakes[5].peer_id}
    assert core.drops.snapshot() == {"evicted": 4, "too-many-sources": 1}


def test_the_victim_of_a_full_name_table_is_never_a_proven_peer() -> None:
    """mDNS tracks names before it resolves them; when the table is full it forgets the
    oldest unresolved or refused name, else the oldest unproven peer's, never a proven one."""
    core = DiscoveryCore(scope=SCOPE)
    member, fake = Identity(b"\x61" * 32), Identity(b"\x71" * 32)
    core.observe("member", txt_of(record(ident=member)), HOME, now=0.0)
    core.observe("fake", txt_of(record(ident=fake)), HOME, now=1.0)
    core.observe("junk", b"junk", HOME, now=2.0)
    core.prove(member.peer_id)
    assert core.victim(["member", "fake", "junk", "resolving"]) == "junk"
    assert core.victim(["member", "resolving", "fake"]) == "resolving"
    assert core.victim(["member", "fake"]) == "fake"
    assert core.victim(["member"]) is None


def test_a_bare_envelope_is_judged_by_the_same_rules() -> None:
    """A bootstrap list carries envelopes, not TXT: same verdicts, no TXT layer."""
    signed = record()
    assert verify_sighting(signed.envelope, HOME, scope=SCOPE).signed == signed
    oversized = b"\x00" * (Limits().max_record_size + 1)
    for envelope in (b"", oversized, b"not cbor at all"):
        with pytest.raises(AnnouncementError) as info:
            verify_sighting(envelope, HOME, scope=SCOPE)
        assert info.value.code is RejectReason.BAD_RECORD
    with pytest.raises(AnnouncementError) as info:
        verify_sighting(signed.envelope, (Address("10.6.6.6", 1),), scope=SCOPE)
    assert info.value.code is RejectReason.ADDRESS_MISMATCH
    core = DiscoveryCore(scope=SCOPE)
    found = core.observe_envelope("boot:a", signed.envelope, HOME, now=0.0)
    assert [e.kind for e in found.events] == [EventKind.FOUND]
    assert core.observe_envelope("boot:b", oversized, HOME, now=1.0).events == ()
    assert core.rejections.snapshot() == {"bad-record": 1}


def test_provisional_address_mismatch_asks_for_a_retry() -> None:
    core = DiscoveryCore(scope=SCOPE)
    moved = (Address("10.1.1.1", 4100),)
    obs = core.observe("a", txt_of(record()), moved, now=0.0, provisional=True)
    assert obs.retry and core.rejections.total() == 0 and core.sightings() == []
    assert not core.observe("a", txt_of(record()), moved, now=0.0).retry
    assert core.rejections["address-mismatch"] == 1
