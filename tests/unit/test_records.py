from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import Limits
from fedup.errors import RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.cbor import CBORDecodeError
from fedup.protocol.envelope import (
    SignatureError,
    open_envelope,
    seal_envelope,
    signed_bytes,
    uvarint,
)
from fedup.protocol.records import (
    PEER_RECORD_DOMAIN,
    PEER_RECORD_TYPE,
    Address,
    PeerRecord,
    PeerRecordBook,
    StaleRecordError,
    network_key_id,
    next_seq,
    verify_peer_record,
)
from fedup.protocol.schema import MessageError

ALICE = Identity(b"\x01" * 32)
MALLORY = Identity(b"\x02" * 32)


def record(seq: int = 5, ident: Identity = ALICE, **kw: object) -> PeerRecord:
    fields: dict[str, object] = {
        "addresses": (Address("192.168.1.7", 4100), Address("fe80::1", 4100)),
        "network": "lenders",
        "network_key_id": network_key_id(b"k" * 32),
    }
    fields.update(kw)
    return PeerRecord(ident.peer_id, seq, **fields)  # type: ignore[arg-type]


def test_uvarint() -> None:
    assert uvarint(0) == b"\0"
    assert uvarint(127) == b"\x7f"
    assert uvarint(128) == b"\x80\x01"
    assert uvarint(300) == b"\xac\x02"


def test_signed_bytes_layout() -> None:
    assert signed_bytes(b"dom", b"ty", b"p") == b"\x03dom\x02ty\x01p"


def test_round_trip_and_exact_bytes_forwarded() -> None:
    signed = record().seal(ALICE)
    again = verify_peer_record(signed.envelope)
    assert again.record == record()
    assert again.envelope == signed.envelope
    assert again.peer_id == ALICE.peer_id


def test_record_without_network_key() -> None:
    signed = record(network_key_id=None).seal(ALICE)
    assert verify_peer_record(signed.envelope).record.network_key_id is None


def test_whole_input_split_and_trailing_garbage() -> None:
    data = record().seal(ALICE).envelope
    # Every truncation is a clean error, never another exception.
    for cut in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            verify_peer_record(data[:cut])
    with pytest.raises(CBORDecodeError):
        verify_peer_record(data + b"\0")


def test_oversized_rejected_before_decoding() -> None:
    data = record().seal(ALICE).envelope
    with pytest.raises(CBORDecodeError, match="exceeds"):
        verify_peer_record(data, limits=Limits(max_record_size=len(data) - 1))


def _envelope_map(data: bytes) -> dict[str, object]:
    value = cbor.decode(data, max_size=4096, max_depth=4)
    assert isinstance(value, dict)
    return value


def test_forged_signature_rejected() -> None:
    env = _envelope_map(record().seal(ALICE).envelope)
    sig = bytearray(env["sig"])  # type: ignore[arg-type]
    sig[0] ^= 1
    env["sig"] = bytes(sig)
    with pytest.raises(SignatureError):
        verify_peer_record(cbor.encode(env))


def test_tampered_payload_rejected() -> None:
    env = _envelope_map(record().seal(ALICE).envelope)
    env["payload"] = record(seq=6).to_cbor()
    with pytest.raises(SignatureError):
        verify_peer_record(cbor.encode(env))


def test_record_signed_by_another_key_rejected() -> None:
    # Mallory signs a record claiming Alice's peer ID with her own key.
    payload = record().to_cbor()
    env = seal_envelope(
        MALLORY.sign,
        MALLORY.public_key,
        domain=PEER_RECORD_DOMAIN,
        payload_type=PEER_RECORD_TYPE,
        payload=payload,
    )
    with pytest.raises(MessageError, match="signed by"):
        verify_peer_record(env.to_cbor())


def test_signature_for_another_domain_rejected() -> None:
    env = seal_envelope(
        ALICE.sign,
        ALICE.public_key,
        domain="fedup-membership-view",
        payload_type=PEER_RECORD_TYPE,
        payload=record().to_cbor(),
    )
    with pytest.raises(SignatureError):
        verify_peer_record(env.to_cbor())
    with pytest.raises(MessageError, match="expected"):
        open_envelope(
            env.to_cbor(), domain=PEER_RECORD_DOMAIN, payload_type="other/1", max_size=4096
        )


def test_check_order_signature_before_payload_decoding() -> None:
    # A garbage payload with a bad signature reports the signature, proving the
    # payload was never decoded before verification.
    env = _envelope_map(record().seal(ALICE).envelope)
    env["payload"] = b"\xff\xff"
    with pytest.raises(SignatureError):
        verify_peer_record(cbor.encode(env))


def _resign(payload_map: dict[str, object]) -> bytes:
    return seal_envelope(
        ALICE.sign,
        ALICE.public_key,
        domain=PEER_RECORD_DOMAIN,
        payload_type=PEER_RECORD_TYPE,
        payload=cbor.encode(payload_map),
    ).to_cbor()


def _payload() -> dict[str, object]:
    value = cbor.decode(record().to_cbor(), max_size=4096, max_depth=4)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seq": -1}, "'seq' must be an unsigned integer"),
        ({"seq": "5"}, "'seq' must be an unsigned integer"),
        ({"addrs": []}, "'addrs' must have 1 to 16 items"),
        ({"addrs": [["10.0.0.1", 1]] * 17}, "'addrs' must have 1 to 16 items"),
        ({"addrs": [["example.com", 80]]}, "not an IP address"),
        ({"addrs": [["10.0.0.1", 0]]}, "out of range"),
        ({"addrs": [["10.0.0.1", 70000]]}, "out of range"),
        ({"addrs": [["10.0.0.1"]]}, "must be \\[ip-address, port\\]"),
        ({"addrs": [["::0001", 80]]}, "canonical"),
        ({"net": ""}, "'net' must not be empty"),
        ({"net": "x" * 65}, "'net' must be at most 64 bytes"),
        ({"netkey": b"short"}, "'netkey' must be 16 bytes"),
        ({"proto": 0}, "'proto' must be between"),
        ({"extra": 1}, "unknown field"),
        ({"peer": b"\0" * 38}, "'peer'"),
    ],
)
def test_every_field_checked(change: dict[str, object], message: str) -> None:
    payload = _payload()
    payload.update(change)
    with pytest.raises(MessageError, match=message):
        verify_peer_record(_resign(payload))


def test_missing_field() -> None:
    for key in ("peer", "seq", "addrs", "net", "proto"):
        payload = _payload()
        del payload[key]
        with pytest.raises(MessageError, match=f"missing field '{key}'"):
            verify_peer_record(_resign(payload))


def test_freshness() -> None:
    book = PeerRecordBook()
    r5 = verify_peer_record(record(5).seal(ALICE).envelope)
    r6 = verify_peer_record(record(6).seal(ALICE).envelope)
    assert book.admit(r5)
    assert not book.admit(r5)  # the same record again is a harmless repeat
    assert book.admit(r6)
    assert book.get(ALICE.peer_id) == r6
    with pytest.raises(StaleRecordError, match="not newer"):
        book.admit(r5)
    # Another record with the same seq but different content is stale too.
    other = verify_peer_record(record(6, network="x").seal(ALICE).envelope)
    with pytest.raises(StaleRecordError):
        book.admit(other)
    # Forgetting a peer keeps its seq: an old record cannot come back after a goodbye.
    book.forget(ALICE.peer_id)
    assert len(book) == 0
    with pytest.raises(StaleRecordError):
        book.admit(r6)


def test_book_is_bounded() -> None:
    book = PeerRecordBook(max_peers=2)
    for i in range(2):
        ident = Identity(bytes([10 + i]) * 32)
        book.admit(verify_peer_record(record(ident=ident).seal(ident).envelope))
    third = Identity(b"\x30" * 32)
    with pytest.raises(RemoteProtocolError, match="full"):
        book.admit(verify_peer_record(record(ident=third).seal(third).envelope))


def test_a_full_book_makes_room_from_peers_that_went_away() -> None:
    """Waves of identities that come and go never lock newcomers out (the landed code
    refused every new peer after four waves filled its sequence memory)."""
    book = PeerRecordBook(max_peers=3)
    waves = [[Identity(bytes([40 + 3 * w + i]) * 32) for i in range(3)] for w in range(4)]
    for wave in waves:
        for ident in wave:
            assert book.admit(verify_peer_record(record(ident=ident).seal(ident).envelope))
        for ident in wave:
            book.forget(ident.peer_id)  # a goodbye
    assert len(book) == 0
    # Only forgotten peers make room by default: a book of live records stays full.
    live = waves[0]
    for ident in live:
        book.admit(verify_peer_record(record(ident=ident, seq=9).seal(ident).envelope))
    newcomer = Identity(b"\x77" * 32)
    signed = verify_peer_record(record(ident=newcomer).seal(newcomer).envelope)
    with pytest.raises(RemoteProtocolError, match="full"):
        book.admit(signed)
    # The caller may allow more: the least recently admitted allowed peer goes.
    assert book.admit(signed, evictable=lambda peer: peer != live[0].peer_id)
    assert book.get(live[0].peer_id) is not None and book.get(live[1].peer_id) is None
    assert book.get(newcomer.peer_id) == signed


def test_next_seq_grows() -> None:
    assert next_seq(0, now_ns=5_000_000) == 5000
    assert next_seq(9000, now_ns=5_000_000) == 9001
    assert next_seq() > 1_700_000_000_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.1.2.3:80", Address("10.1.2.3", 80)),
        ("[::1]:4100", Address("::1", 4100)),
        ("[fe80::0001]:1", Address("fe80::1", 1)),
    ],
)
def test_address_parse(text: str, expected: Address) -> None:
    assert Address.parse(text) == expected
    assert Address.parse(str(expected)) == expected


@pytest.mark.parametrize(
    "text", ["10.1.2.3", "host:80", "10.1.2.3:x", "[::1]4100", ":80", "1.2.3.4:0"]
)
def test_address_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        verify_peer_record(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_envelopes_never_crash(data: st.DataObject) -> None:
    raw = bytearray(record().seal(ALICE).envelope)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        verify_peer_record(bytes(raw))
    except RemoteProtocolError:
        pass
