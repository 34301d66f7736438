"""The handshake state machines, byte by byte, with no I/O.

A small independent implementation of the key schedule from
docs/protocol-handshake.md (``_ref_*`` below) checks that the code follows the
spec and lets the tests build messages an honest state machine never would.
"""

from __future__ import annotations

import hashlib

import nacl.bindings as sodium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.envelope import signed_bytes, uvarint
from fedup.protocol.framing import FrameDecoder, encode_frame
from fedup.protocol.handshake import (
    AbortCode,
    HandshakeError,
    HandshakeResult,
    InitiatorHandshake,
    ResponderHandshake,
    decode_abort,
    encode_abort,
)
from fedup.protocol.records import Address, PeerRecord, SignedPeerRecord, network_key_id

ALICE = Identity(b"\x01" * 32)  # initiator
BOB = Identity(b"\x02" * 32)  # responder
CAROL = Identity(b"\x03" * 32)
NET = "lenders"
KEY = b"\x42" * 32
OTHER_KEY = b"\x43" * 32
E_I = bytes(range(32))  # fixed ephemeral keys, for reproducible messages
E_R = bytes(range(32, 64))


def record(ident: Identity, *, network: str = NET, key: bytes | None = None) -> SignedPeerRecord:
    rec = PeerRecord(
        ident.peer_id,
        7,
        (Address("192.168.1.7", 4100),),
        network,
        None if key is None else network_key_id(key),
    )
    return rec.seal(ident)


def initiator(ident: Identity = ALICE, **kw: object) -> InitiatorHandshake:
    kw.setdefault("network", NET)
    return InitiatorHandshake(ident, **kw)  # type: ignore[arg-type]


def responder(ident: Identity = BOB, **kw: object) -> ResponderHandshake:
    kw.setdefault("network", NET)
    return ResponderHandshake(ident, **kw)  # type: ignore[arg-type]


def via_frames(message: bytes) -> bytes:
    """Carry ``message`` through the frame layer one byte at a time, as a socket might."""
    decoder = FrameDecoder(max_size=DEFAULT_LIMITS.max_frame_size)
    out: list[bytes] = []
    for byte in encode_frame(message, max_size=DEFAULT_LIMITS.max_frame_size):
        decoder.feed(bytes([byte]))
        out.extend(decoder.frames())
    decoder.eof()
    assert len(out) == 1
    return out[0]


def run(
    ini: InitiatorHandshake, resp: ResponderHandshake
) -> tuple[HandshakeResult, HandshakeResult]:
    msg2 = resp.receive_msg1(via_frames(ini.start()))
    msg3 = ini.receive_msg2(via_frames(msg2))
    return ini.result, resp.receive_msg3(via_frames(msg3))


# -- a reference implementation of the spec ---------------------------------------------


def _ref_hash(*items: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for item in (b"fedup-handshake-v1", *items):
        h.update(uvarint(len(item)) + item)
    return h.digest()


def _ref_kdf(psk: bytes, ee: bytes, h: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(
        ee + h + label, key=psk, digest_size=32, person=b"fedup-hs-v1-kdf"
    ).digest()


def _ref_box(
    ident: Identity, key: bytes, h: bytes, domain: bytes, rec: bytes | None = None
) -> bytes:
    sig = ident.sign(signed_bytes(domain, b"fedup/handshake/1", h))
    plain = cbor.encode({"id": ident.public_key, "sig": sig, "rec": rec})
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, h, bytes(24), key)


def _ref_msg1(e_priv: bytes, *, network: str = NET, key: bytes | None = None) -> bytes:
    netkey = None if key is None else network_key_id(key)
    e_pub = sodium.crypto_scalarmult_base(e_priv)
    return cbor.encode({"v": 1, "net": network, "netkey": netkey, "e": e_pub})


def _ref_msg2(
    ident: Identity,
    e_priv: bytes,
    msg1: bytes,
    *,
    psk: bytes = bytes(32),
    domain: bytes = b"fedup-handshake-responder",
    rec: bytes | None = None,
) -> bytes:
    e_i = cbor.decode(msg1, max_size=1 << 16, max_depth=1)["e"]  # type: ignore[index]
    e_r = sodium.crypto_scalarmult_base(e_priv)
    ee = sodium.crypto_scalarmult(e_priv, e_i)
    h1 = _ref_hash(msg1, e_r)
    box = _ref_box(ident, _ref_kdf(psk, ee, h1, b"responder-box"), h1, domain, rec)
    return cbor.encode({"e": e_r, "box": box})


def _ref_msg3(
    ident: Identity,
    e_priv: bytes,
    msg1: bytes,
    msg2: bytes,
    *,
    psk: bytes = bytes(32),
    domain: bytes = b"fedup-handshake-initiator",
    rec: bytes | None = None,
) -> bytes:
    e_r = cbor.decode(msg2, max_size=1 << 16, max_depth=1)["e"]  # type: ignore[index]
    ee = sodium.crypto_scalarmult(e_priv, e_r)
    h2 = _ref_hash(msg1, e_r, msg2)
    box = _ref_box(ident, _ref_kdf(psk, ee, h2, b"initiator-box"), h2, domain, rec)
    return cbor.encode({"box": box})


# -- the happy path -------------------------------------------------------------------------


def test_both_sides_agree() -> None:
    ini = initiator(expected_peer=BOB.peer_id, local_record=record(ALICE))
    resp = responder(local_record=record(BOB))
    a, b = run(ini, resp)
    assert a.remote_peer == BOB.peer_id
    assert b.remote_peer == ALICE.peer_id
    assert a.send_key == b.receive_key
    assert a.receive_key == b.send_key
    assert a.send_key != a.receive_key
    assert a.transcript_hash == b.transcript_hash
    assert len(a.send_key) == len(a.receive_key) == len(a.transcript_hash) == 32
    assert a.remote_record == record(BOB)
    assert b.remote_record == record(ALICE)


def test_with_network_key_and_no_records() -> None:
    a, b = run(initiator(network_key=KEY), responder(network_key=KEY))
    assert a.remote_record is None and b.remote_record is None
    assert (a.send_key, a.receive_key) == (b.receive_key, b.send_key)


def test_keys_are_not_in_repr() -> None:
    a, _ = run(initiator(), responder())
    assert a.send_key.hex() not in repr(a) and a.receive_key.hex() not in repr(a)


def test_matches_the_reference_key_schedule() -> None:
    ini = initiator(network_key=KEY, ephemeral_key=E_I)
    resp = responder(network_key=KEY, ephemeral_key=E_R)
    msg1 = ini.start()
    assert msg1 == _ref_msg1(E_I, key=KEY)
    msg2 = resp.receive_msg1(msg1)
    assert msg2 == _ref_msg2(BOB, E_R, msg1, psk=KEY)
    msg3 = ini.receive_msg2(msg2)
    assert msg3 == _ref_msg3(ALICE, E_I, msg1, msg2, psk=KEY)
    result = resp.receive_msg3(msg3)
    ee = sodium.crypto_scalarmult(E_I, sodium.crypto_scalarmult_base(E_R))
    e_r = sodium.crypto_scalarmult_base(E_R)
    h3 = _ref_hash(msg1, e_r, msg2, msg3)
    assert result.transcript_hash == h3
    assert ini.result.send_key == _ref_kdf(KEY, ee, h3, b"initiator-to-responder")
    assert ini.result.receive_key == _ref_kdf(KEY, ee, h3, b"responder-to-initiator")


def test_vector_in_the_docs() -> None:
    """The test vector printed in docs/protocol-handshake.md."""
    ini = initiator(network="example", network_key=KEY, ephemeral_key=E_I)
    resp = responder(network="example", network_key=KEY, ephemeral_key=E_R)
    msg1 = ini.start()
    msg2 = resp.receive_msg1(msg1)
    msg3 = ini.receive_msg2(msg2)
    result = resp.receive_msg3(msg3)
    assert hashlib.sha256(msg1 + msg2 + msg3).hexdigest() == DOC_VECTOR["sha256(msg1|msg2|msg3)"]
    assert result.transcript_hash.hex() == DOC_VECTOR["h3"]
    assert ini.result.send_key.hex() == DOC_VECTOR["k_i2r"]
    assert ini.result.receive_key.hex() == DOC_VECTOR["k_r2i"]


DOC_VECTOR = {
    "sha256(msg1|msg2|msg3)": "92d3d0ab64ec9d66fe08a183485d1b4b24d2416d16caef0da9ec96b875485bcc",
    "h3": "7d9b9f0a9b5fca1b1a7d941cfe64057fa034fbd1892218e8331b3ebb45e83ac3",
    "k_i2r": "0167ebd4ee8e96d913e89ac36c02d5f613a79a6bd0a0e64c09e1b0f200bcda22",
    "k_r2i": "3883bd69dddef1eec3ce43343bdbbfb8dac2fe4f0a7d14073dee2d27d615b0a1",
}


def test_forward_secrecy_fresh_keys_every_run() -> None:
    results = [run(initiator(), responder())[0] for _ in range(8)]
    assert len({r.send_key for r in results}) == 8
    assert len({r.receive_key for r in results}) == 8
    assert len({r.transcript_hash for r in results}) == 8


def test_ephemeral_secret_is_forgotten() -> None:
    ini, resp = initiator(), responder()
    run(ini, resp)
    assert ini._e_priv == b"" and resp._e_priv == b"" and resp._ee == b""


# -- who answered ------------------------------------------------------------------------------


def test_wrong_peer_both_sides_report_it() -> None:
    ini = initiator(expected_peer=CAROL.peer_id)
    resp = responder()
    msg2 = resp.receive_msg1(ini.start())
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(msg2)
    assert info.value.code == AbortCode.WRONG_PEER
    assert BOB.peer_id.text in info.value.reason and CAROL.peer_id.text in info.value.reason
    assert info.value.abort is not None
    with pytest.raises(HandshakeError) as remote:
        resp.receive_msg3(info.value.abort)
    assert remote.value.code == "wrong-peer"
    assert remote.value.abort is None  # the peer aborted: nothing to answer


def test_self_dial_detected_by_the_initiator() -> None:
    ini = initiator(BOB)
    resp = responder(BOB)
    msg2 = resp.receive_msg1(ini.start())
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(msg2)
    assert info.value.code == "self-dial"
    assert info.value.abort is not None
    with pytest.raises(HandshakeError) as remote:
        resp.receive_msg3(info.value.abort)
    assert remote.value.code == "self-dial"


def test_self_dial_detected_by_the_responder() -> None:
    # An initiator that skips its own check (a clone of BOB's key) still cannot get in.
    resp = responder(BOB)
    msg1 = _ref_msg1(E_I)
    msg2 = resp.receive_msg1(msg1)
    with pytest.raises(HandshakeError) as info:
        resp.receive_msg3(_ref_msg3(BOB, E_I, msg1, msg2))
    assert info.value.code == "self-dial"
    assert decode_abort(info.value.abort or b"") is not None


# -- network name and key ------------------------------------------------------------------------


def test_wrong_network_both_sides_report_it() -> None:
    ini = initiator(network="other")
    resp = responder()
    with pytest.raises(HandshakeError) as info:
        resp.receive_msg1(ini.start())
    assert info.value.code == "wrong-network"
    assert "'other'" in info.value.reason and f"'{NET}'" in info.value.reason
    with pytest.raises(HandshakeError) as remote:
        ini.receive_msg2(info.value.abort or b"")
    assert remote.value.code == "wrong-network"
    assert "wrong network" in remote.value.reason
    assert NET not in remote.value.reason  # a stranger is not told the network's name
    assert NET.encode() not in (info.value.abort or b"")


@pytest.mark.parametrize(
    ("ini_key", "resp_key"), [(KEY, None), (None, KEY), (KEY, OTHER_KEY)], ids=["i", "r", "both"]
)
def test_wrong_network_key_early(ini_key: bytes | None, resp_key: bytes | None) -> None:
    ini = initiator(network_key=ini_key)
    resp = responder(network_key=resp_key)
    with pytest.raises(HandshakeError) as info:
        resp.receive_msg1(ini.start())
    assert info.value.code == "wrong-network-key"
    assert "wrong network key" in info.value.reason
    with pytest.raises(HandshakeError) as remote:
        ini.receive_msg2(info.value.abort or b"")
    assert remote.value.code == "wrong-network-key"
    assert "wrong network key" in remote.value.reason


def test_wrong_network_key_late_both_sides_report_it() -> None:
    """The fingerprint is only a hint: a lying msg1 gets past it, the crypto does not."""
    ini = initiator(network_key=OTHER_KEY)
    resp = responder(network_key=KEY)
    msg1 = cbor.decode(ini.start(), max_size=1 << 16, max_depth=1)
    assert isinstance(msg1, dict)
    msg1["netkey"] = network_key_id(KEY)
    msg2 = resp.receive_msg1(cbor.encode(msg1))
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(msg2)
    assert info.value.code == "wrong-network-key"
    assert "wrong network key" in info.value.reason
    with pytest.raises(HandshakeError) as remote:
        resp.receive_msg3(info.value.abort or b"")
    assert remote.value.code == "wrong-network-key"
    assert "wrong network key" in remote.value.reason


def test_responder_cannot_open_a_msg3_made_with_another_key() -> None:
    resp = responder(network_key=KEY)
    msg1 = _ref_msg1(E_I, key=KEY)
    msg2 = resp.receive_msg1(msg1)
    with pytest.raises(HandshakeError) as info:
        resp.receive_msg3(_ref_msg3(ALICE, E_I, msg1, msg2, psk=OTHER_KEY))
    assert info.value.code == "wrong-network-key"
    assert "wrong network key" in info.value.reason


def test_version_mismatch() -> None:
    resp = responder()
    msg1 = cbor.encode({"v": 2, "something": "new"})
    with pytest.raises(HandshakeError) as info:
        resp.receive_msg1(msg1)
    assert info.value.code == "version"
    with pytest.raises(HandshakeError) as remote:
        initiator_started().receive_msg2(info.value.abort or b"")
    assert remote.value.code == "version"


def initiator_started(**kw: object) -> InitiatorHandshake:
    ini = initiator(ALICE, **kw)
    ini.start()
    return ini


def test_busy_abort_from_a_listener() -> None:
    with pytest.raises(HandshakeError) as info:
        initiator_started().receive_msg2(encode_abort(AbortCode.BUSY, "try later"))
    assert info.value.code == "busy"
    assert "busy" in info.value.reason and "'try later'" in info.value.reason


# -- forged, tampered, replayed --------------------------------------------------------------------


def test_signature_for_the_other_role_is_refused() -> None:
    msg1 = initiator(ephemeral_key=E_I).start()
    forged = _ref_msg2(BOB, E_R, msg1, domain=b"fedup-handshake-initiator")
    ini = initiator(ephemeral_key=E_I)
    ini.start()
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(forged)
    assert info.value.code == "auth"


def test_record_of_another_peer_is_refused() -> None:
    ini = initiator(ephemeral_key=E_I)
    msg1 = ini.start()
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(_ref_msg2(BOB, E_R, msg1, rec=record(CAROL).envelope))
    assert info.value.code == "bad-record"


def test_record_for_another_network_is_refused() -> None:
    ini = initiator(ephemeral_key=E_I)
    msg1 = ini.start()
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(_ref_msg2(BOB, E_R, msg1, rec=record(BOB, network="x").envelope))
    assert info.value.code == "bad-record"


def test_corrupt_record_is_refused() -> None:
    ini = initiator(ephemeral_key=E_I)
    msg1 = ini.start()
    envelope = bytearray(record(BOB).envelope)
    envelope[-1] ^= 1  # breaks the signature
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(_ref_msg2(BOB, E_R, msg1, rec=bytes(envelope)))
    assert info.value.code == "bad-record"


def _flips(message: bytes) -> list[bytes]:
    return [
        message[:i] + bytes([message[i] ^ 0x01]) + message[i + 1 :] for i in range(len(message))
    ]


def test_every_flipped_bit_of_msg2_fails() -> None:
    msg1 = initiator(ephemeral_key=E_I).start()
    msg2 = responder(ephemeral_key=E_R).receive_msg1(msg1)
    for tampered in _flips(msg2):
        ini = initiator(ephemeral_key=E_I)
        ini.start()
        with pytest.raises(HandshakeError):
            ini.receive_msg2(tampered)


def test_every_flipped_bit_of_msg3_fails() -> None:
    ini = initiator(ephemeral_key=E_I)
    msg1 = ini.start()
    msg2 = responder(ephemeral_key=E_R).receive_msg1(msg1)
    msg3 = ini.receive_msg2(msg2)
    for tampered in _flips(msg3):
        resp = responder(ephemeral_key=E_R)
        resp.receive_msg1(msg1)
        with pytest.raises(HandshakeError):
            resp.receive_msg3(tampered)


def test_msg2_from_an_earlier_session_fails() -> None:
    old_ini, old_resp = initiator(), responder()
    old_msg2 = old_resp.receive_msg1(old_ini.start())
    ini = initiator()
    ini.start()
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(old_msg2)
    assert info.value.code == "wrong-network-key"
    assert "replayed" in info.value.reason


def test_msg3_from_an_earlier_session_fails() -> None:
    old_ini, old_resp = initiator(), responder()
    msg1 = old_ini.start()
    old_msg3 = old_ini.receive_msg2(old_resp.receive_msg1(msg1))
    resp = responder()
    resp.receive_msg1(msg1)  # the attacker replays msg1 too; the responder's fresh key differs
    with pytest.raises(HandshakeError):
        resp.receive_msg3(old_msg3)


def test_low_order_ephemeral_key_is_refused() -> None:
    msg1 = cbor.encode({"v": 1, "net": NET, "netkey": None, "e": bytes(32)})
    with pytest.raises(HandshakeError) as info:
        responder().receive_msg1(msg1)
    assert info.value.code == "protocol"
    assert "low-order" in info.value.reason


# -- malformed input ------------------------------------------------------------------------------

GOOD_E = sodium.crypto_scalarmult_base(E_I)
BAD_MSG1 = {
    "not cbor": b"\xff\x00",
    "trailing bytes": cbor.encode({"v": 1, "net": NET, "netkey": None, "e": GOOD_E}) + b"\x00",
    "not a map": cbor.encode([1, NET, None, GOOD_E]),
    "missing e": cbor.encode({"v": 1, "net": NET, "netkey": None}),
    "missing netkey": cbor.encode({"v": 1, "net": NET, "e": GOOD_E}),
    "extra field": cbor.encode({"v": 1, "net": NET, "netkey": None, "e": GOOD_E, "x": 1}),
    "short e": cbor.encode({"v": 1, "net": NET, "netkey": None, "e": GOOD_E[:31]}),
    "e as text": cbor.encode({"v": 1, "net": NET, "netkey": None, "e": "k" * 32}),
    "v as text": cbor.encode({"v": "1", "net": NET, "netkey": None, "e": GOOD_E}),
    "nested": cbor.encode({"v": 1, "net": NET, "netkey": None, "e": [GOOD_E]}),
    "netkey size": cbor.encode({"v": 1, "net": NET, "netkey": b"k" * 15, "e": GOOD_E}),
    "empty": b"",
    "bad abort": cbor.encode({"abort": "Not A Code", "why": ""}),
    "huge": cbor.encode({"v": 1, "net": NET, "netkey": None, "e": GOOD_E, "pad": bytes(70000)}),
}


@pytest.mark.parametrize("name", sorted(BAD_MSG1))
def test_malformed_msg1(name: str) -> None:
    with pytest.raises(HandshakeError) as info:
        responder().receive_msg1(BAD_MSG1[name])
    assert info.value.code == "protocol"
    assert info.value.abort is not None
    assert "msg1" in info.value.reason


@pytest.mark.parametrize(
    "msg2",
    [
        cbor.encode({"e": GOOD_E}),
        cbor.encode({"e": GOOD_E, "box": b"", "extra": 1}),
        cbor.encode({"e": GOOD_E, "box": "text"}),
        cbor.encode({"box": b"x" * 40}),
        cbor.encode(None),
    ],
)
def test_malformed_msg2(msg2: bytes) -> None:
    with pytest.raises(HandshakeError) as info:
        initiator_started().receive_msg2(msg2)
    assert info.value.code == "protocol"


@pytest.mark.parametrize(
    ("extra", "drop", "problem"),
    [({"more": 1}, None, "unknown field"), ({}, "rec", "'rec' is missing"), ({}, "id", "'id'")],
)
def test_box_of_the_wrong_shape_is_refused(
    extra: dict[str, object], drop: str | None, problem: str
) -> None:
    """A box that opens (made with the peer's real keys) but has the wrong fields."""
    ini = initiator(ephemeral_key=E_I)
    msg1 = ini.start()
    e_r = sodium.crypto_scalarmult_base(E_R)
    ee = sodium.crypto_scalarmult(E_R, sodium.crypto_scalarmult_base(E_I))
    h1 = _ref_hash(msg1, e_r)
    sig = BOB.sign(signed_bytes(b"fedup-handshake-responder", b"fedup/handshake/1", h1))
    fields: dict[str, object] = {"id": BOB.public_key, "sig": sig, "rec": None, **extra}
    fields.pop(drop or "", None)
    box = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        cbor.encode(fields), h1, bytes(24), _ref_kdf(bytes(32), ee, h1, b"responder-box")
    )
    with pytest.raises(HandshakeError) as info:
        ini.receive_msg2(cbor.encode({"e": e_r, "box": box}))
    assert info.value.code == "protocol"
    assert problem in info.value.reason


# -- hostile bytes: only HandshakeError, never another exception ----------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_into_every_receive(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        responder().receive_msg1(data)
    with pytest.raises(HandshakeError):
        initiator_started().receive_msg2(data)
    resp = responder()
    resp.receive_msg1(initiator().start())
    with pytest.raises(HandshakeError):
        resp.receive_msg3(data)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        pos %= len(buf) + 1
        if kind == 0 and pos < len(buf):
            buf[pos] = value
        elif kind == 1:
            buf.insert(pos, value)
        elif kind == 2 and pos < len(buf):
            del buf[pos]
    return bytes(buf)


EDITS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4
)


@FUZZ
@given(EDITS)
def test_mutated_messages(edits: list[tuple[int, int, int]]) -> None:
    ini = initiator(ephemeral_key=E_I)
    msg1 = ini.start()
    msg2 = responder(ephemeral_key=E_R).receive_msg1(msg1)
    msg3 = ini.receive_msg2(msg2)
    # msg1 is plaintext: a mutation may still be a valid msg1 (e.g. another key).
    try:
        responder().receive_msg1(_mutate(msg1, edits))
    except HandshakeError:
        pass
    mutated2 = _mutate(msg2, edits)
    if mutated2 != msg2:
        fresh = initiator(ephemeral_key=E_I)
        fresh.start()
        with pytest.raises(HandshakeError):
            fresh.receive_msg2(mutated2)
    mutated3 = _mutate(msg3, edits)
    if mutated3 != msg3:
        resp = responder(ephemeral_key=E_R)
        resp.receive_msg1(msg1)
        with pytest.raises(HandshakeError):
            resp.receive_msg3(mutated3)


# -- aborts and API misuse ------------------------------------------------------------


def test_abort_round_trip_and_limits() -> None:
    err = decode_abort(encode_abort("wrong-network", "x" * 1000))
    assert err is not None and err.code == "wrong-network"
    assert len(encode_abort("busy", "é" * 300)) < 300  # why is cut to 256 bytes, on a char boundary
    assert decode_abort(b"\x18") is None
    assert decode_abort(cbor.encode({"e": b""})) is None
    unknown = decode_abort(cbor.encode({"abort": "future-code", "why": "?"}))
    assert unknown is not None and unknown.code == "future-code"
    with pytest.raises(LocalProtocolError):
        encode_abort("Bad Code", "")


def test_abort_why_is_quoted_in_reasons() -> None:
    err = decode_abort(encode_abort("busy", "line\nforged log line"))
    assert err is not None and "\n" not in err.reason


def test_out_of_order_calls_are_local_errors() -> None:
    ini = initiator()
    with pytest.raises(LocalProtocolError):
        ini.receive_msg2(b"")
    with pytest.raises(LocalProtocolError):
        _ = ini.result
    ini.start()
    with pytest.raises(LocalProtocolError):
        ini.start()
    resp = responder()
    with pytest.raises(LocalProtocolError):
        resp.receive_msg3(b"")


def test_a_failed_machine_stays_failed() -> None:
    resp = responder()
    with pytest.raises(HandshakeError):
        resp.receive_msg1(b"junk")
    with pytest.raises(LocalProtocolError):
        resp.receive_msg1(initiator().start())


@pytest.mark.parametrize(
    "kw",
    [
        {"network": ""},
        {"network": "n" * 65},
        {"network_key": b"short"},
        {"local_record": record(CAROL)},
        {"local_record": record(ALICE, network="other")},
        {"local_record": record(ALICE, key=KEY)},
        {"ephemeral_key": b"x"},
    ],
)
def test_bad_local_settings_are_local_errors(kw: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        initiator(ALICE, **kw)


def test_errors_are_remote_protocol_errors_and_keep_code_with_peer() -> None:
    err = HandshakeError("x", code="busy", abort=b"a")
    named = err.with_peer("10.0.0.1:4100")
    assert isinstance(named, RemoteProtocolError)
    assert (named.code, named.abort, named.peer) == ("busy", b"a", "10.0.0.1:4100")


def test_message_sizes_follow_limits() -> None:
    small = Limits(max_message_size=60)
    ini = initiator(limits=small)
    msg1 = ini.start()
    assert len(msg1) <= 60
    with pytest.raises(HandshakeError):  # msg2 is bigger than 60 bytes
        ini.receive_msg2(responder().receive_msg1(msg1))
