from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.envelope import SignatureError, seal_envelope
from fedup.protocol.messages import (
    Ack,
    Call,
    Commit,
    Follow,
    GetPeers,
    Link,
    Offer,
    Passed,
    PeerList,
    Refuse,
    RosterMessage,
    ViewMessage,
    decode_message,
    encode_message,
)
from fedup.protocol.records import Address, PeerRecord, SignedPeerRecord
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.schema import MessageError
from fedup.protocol.view import (
    VIEW_DOMAIN,
    VIEW_TYPE,
    MembershipView,
    RunSettings,
    provenance_capacity_problem,
    verify_view,
)
from tests.conftest import make_identities

IDS = sorted(make_identities(3), key=lambda i: i.peer_id)
RUN = bytes(range(16))


def rec(ident: Identity) -> SignedPeerRecord:
    return PeerRecord(ident.peer_id, 1, (Address("127.0.0.1", 4000),), "net").seal(ident)


def view(**kw: object) -> MembershipView:
    fields: dict[str, object] = {
        "run_id": RUN,
        "epoch": 0,
        "leader": IDS[0].peer_id,
        "members": tuple(rec(i) for i in IDS),
        "settings": RunSettings(seed=7),
        "schema": {"cols": ["a", "b"]},
    }
    fields.update(kw)
    return MembershipView(**fields)  # type: ignore[arg-type]


def test_view_round_trip() -> None:
    signed = view().seal(IDS[0])
    again = verify_view(signed.envelope)
    assert again.view == view()
    assert again.digest == signed.digest
    assert again.view.member_ids == tuple(i.peer_id for i in IDS)


def test_a_view_is_verified_once_per_process_and_bytes_and_limits() -> None:
    data = view(epoch=41).seal(IDS[0]).envelope
    assert verify_view(data) is verify_view(bytearray(data))  # the same bytes: one check
    tight = attrs.evolve(DEFAULT_LIMITS, max_members=2)
    for _ in range(2):  # a failure is not remembered, and the limits are part of the key
        with pytest.raises(MessageError, match="members"):
            verify_view(data, limits=tight)
    assert verify_view(data).view.epoch == 41
    forged = _forge(view(epoch=41).to_cbor(), IDS[1])  # other bytes: checked on their own
    with pytest.raises(MessageError, match="signed by"):
        verify_view(forged)


def test_only_the_leader_signs_and_members_sorted() -> None:
    with pytest.raises(LocalProtocolError):
        view().seal(IDS[1])
    with pytest.raises(LocalProtocolError):
        view(members=tuple(rec(i) for i in reversed(IDS))).seal(IDS[0])


def _forge(payload: bytes, signer: Identity) -> bytes:
    return seal_envelope(
        signer.sign, signer.public_key, domain=VIEW_DOMAIN, payload_type=VIEW_TYPE, payload=payload
    ).to_cbor()


def test_view_signed_by_non_leader_rejected() -> None:
    with pytest.raises(MessageError, match="signed by"):
        verify_view(_forge(view().to_cbor(), IDS[1]))


def test_the_leader_is_any_member_the_draw_chose_but_a_member() -> None:
    drawn = view(leader=IDS[1].peer_id)  # not the lowest: the draw chooses the leader
    assert verify_view(_forge(drawn.to_cbor(), IDS[1])).view.leader == IDS[1].peer_id
    outsider = view(leader=IDS[2].peer_id, members=tuple(rec(i) for i in IDS[:2]))
    with pytest.raises(MessageError, match="not a member"):
        verify_view(_forge(outsider.to_cbor(), IDS[2]))


def test_unsorted_or_duplicate_members_rejected() -> None:
    for members in (tuple(rec(i) for i in reversed(IDS)), (rec(IDS[0]), rec(IDS[0]))):
        with pytest.raises(MessageError, match="ascending"):
            verify_view(_forge(view(members=members).to_cbor(), IDS[0]))


def test_tampered_view_rejected() -> None:
    env = cbor.decode(view().seal(IDS[0]).envelope, max_size=100_000, max_depth=4)
    assert isinstance(env, dict)
    env["payload"] = view(epoch=5).to_cbor()
    with pytest.raises(SignatureError):
        verify_view(cbor.encode(env))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lr": 0.0}, "'lr'"),
        ({"epochs": -1.0}, "'epochs'"),
        ({"tol": 1.0}, "'tol'"),
        ({"max_laps": 20_000}, "'max_laps' must be in \\[1, 10000\\]"),  # crashed members once
        ({"patience": 0}, "'patience'"),
        ({"batch": 0}, "'batch'"),
        ({"alg": "gossip"}, "'alg' must be one of 'ring', 'parallel'"),  # once: the ring anyway
    ],
)
def test_settings_out_of_bounds_are_refused_before_acknowledging(
    change: dict[str, object], match: str
) -> None:
    """Bounds have one source (view.SETTINGS_BOUNDS): a leader's view outside them is
    refused by verify_view, not accepted and then failing in the learning layer."""
    value = cbor.decode(view().to_cbor(), max_size=100_000, max_depth=8)
    assert isinstance(value, dict)
    value["settings"] = {**value["settings"], **change}
    with pytest.raises(MessageError, match=match):
        verify_view(_forge(cbor.encode(value), IDS[0]))


def test_a_view_whose_run_could_outgrow_a_models_provenance_is_refused() -> None:
    """A run makes at most (max_laps + 1) x members + 1 hops, each signing one statement
    that travels with the model: a view that could need more than a peer accepts is
    refused before it is acknowledged."""
    signed = view(settings=RunSettings(max_laps=10)).seal(IDS[0])  # 11 x 3 + 1 = 34 hops
    fits = attrs.evolve(DEFAULT_LIMITS, max_provenance_hops=34)
    assert verify_view(signed.envelope, limits=fits).digest == signed.digest
    small = attrs.evolve(DEFAULT_LIMITS, max_provenance_hops=33)
    with pytest.raises(MessageError, match=r"could make 34 hops.*max_provenance_hops"):
        verify_view(signed.envelope, limits=small)
    # the defaults hold the largest federation for more than the default max_laps
    default_laps = RunSettings().max_laps
    problem = provenance_capacity_problem(DEFAULT_LIMITS.max_members, default_laps, DEFAULT_LIMITS)
    assert problem is None


@pytest.mark.parametrize(
    "change",
    [
        {"lr": 0.0},
        {"local_epochs": -1.0},
        {"max_laps": 0},
        {"max_laps": 10_001},
        {"algorithm": "gossip"},
    ],
)
def test_local_settings_out_of_bounds_are_a_config_error(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(change))):
        attrs.evolve(RunSettings(), **change)


MESSAGES = [
    Call(RUN),
    Call(RUN, b"proof", b"r" * 32),
    Offer(RUN, {"columns": []}, "tabular-mlp"),
    Offer(RUN, None, "tabular-mlp", b"c" * 64),
    RosterMessage(b"xyz"),
    Ack(RUN, 1, b"d" * 32, b"n" * 32),
    Commit(RUN, 0, b"d" * 32, {IDS[1].peer_id: b"n" * 32, IDS[2].peer_id: b"m" * 32}),
    Commit(RUN, 0, b"d" * 32, {IDS[1].peer_id: b"n" * 32}, (rec(IDS[1]).envelope,)),
    Follow(RUN, IDS[0].peer_id),
    ViewMessage(b"xyz"),
    Ack(RUN, 3, b"d" * 32),
    Refuse(RUN, RefusalCode.MISFIT, "columns 'x' do not fit"),
    Refuse(RUN, RefusalCode.GIVEN_UP, ""),
    Link(RUN),
    Commit(RUN, 2, b"d" * 32),
    Passed(RUN, b"r" * 300),
    GetPeers(),
    PeerList((b"env1", b"env2")),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.TYPE)
def test_message_round_trip_and_truncation(message: object) -> None:
    data = encode_message(message)  # type: ignore[arg-type]
    assert decode_message(data) == message
    for cut in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            decode_message(data[:cut])


def test_message_field_errors() -> None:
    with pytest.raises(MessageError, match="unknown type"):
        decode_message(cbor.encode({"t": "nope"}))
    with pytest.raises(MessageError, match="unknown field"):
        decode_message(cbor.encode({"t": "call", "run": RUN, "x": 1}))
    with pytest.raises(MessageError, match="'run' must be 16 bytes"):
        decode_message(cbor.encode({"t": "call", "run": b"short"}))
    with pytest.raises(MessageError, match="'t'"):
        decode_message(cbor.encode([1, 2]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_are_clean_errors(data: bytes) -> None:
    try:
        decode_message(data)
    except RemoteProtocolError:
        pass


def test_a_long_multibyte_refusal_reason_is_cut_at_a_character_not_lost() -> None:
    """Formation once cut reasons to 1,000 characters while the decoder allows 1,024
    bytes: a long reason in another script was refused whole.  Now it is cut by bytes."""
    reason = "列" * 600  # 1,800 bytes of UTF-8
    message = Refuse(RUN, RefusalCode.MISFIT, reason)
    decoded = decode_message(encode_message(message))
    assert isinstance(decoded, Refuse) and decoded.code is RefusalCode.MISFIT
    assert decoded.reason.endswith("...") and len(decoded.reason.encode()) <= 1024
    assert decoded.reason[:-3] == "列" * len(decoded.reason[:-3])


def test_a_refusal_with_an_unknown_code_is_malformed() -> None:
    raw = cbor.encode({"t": "refuse", "run": RUN, "code": "whatever", "why": ""})
    with pytest.raises(MessageError, match="code"):
        decode_message(raw)
