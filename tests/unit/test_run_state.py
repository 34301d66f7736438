"""The run-state file's bytes (:mod:`fedup.protocol.run_state`): what a member saves to
resume its run after a crash, and every way such bytes are refused, with the reason."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.protocol import cbor
from fedup.protocol.custody_events import FINAL, INITIAL
from fedup.protocol.laps import LapRecord, Position
from fedup.protocol.run_state import (
    DIGEST_SIZE,
    MAGIC,
    CustodyMemory,
    Kept,
    RunState,
    RunStateError,
    Taken,
    decode_run_state,
    encode_run_state,
)
from tests.conftest import make_identities

PEERS = [i.peer_id for i in make_identities(3)]
HEAD = len(MAGIC) + DIGEST_SIZE
BIG = 1 << 20


def full() -> RunState:
    """A run state with every optional field set (a kept copy in the INITIAL slot)."""
    memory = CustodyMemory(
        phase="handing",
        last_lap=4,
        received=b"\x11" * 32,
        chain=(b"notice one", b"notice two"),
        provenance=b"statements" * 20,
        holding=Position(5, 1),
        source=PEERS[1],
        kept=Kept(INITIAL, PEERS[2], Position(5, 2)),
        taken=Taken(PEERS[1], "final", Position(5, 1), b"\x22" * 32, b"receipt"),
        asked=3,
        asks=(b"ask of one", b"ask of two"),
    )
    history = (
        LapRecord(-1, 0.69, 0.5, math.nan, 120, 0),  # the initial model; AUC unknown
        LapRecord(0, 0.61, 0.7, 0.75, 120, 960),
        LapRecord(1, math.nan, math.nan, math.nan, 0, 1920),
    )
    return RunState(
        network="loans-lan",
        peer=PEERS[0],
        out_dir="/home/me/.fedup/runs/00ff",
        view=b"the signed view",
        custody=memory,
        state=b"a ring blob" * 50,
        role="kept",
        history=history,
        masks=((3, (0, 1, 2**62 - 1)), (4, tuple(range(103)))),
        sent=123_456_789,
        hops=7,
    )


def bare() -> RunState:
    """A run state with no optional field set: nothing held, kept, taken or learnt."""
    memory = CustodyMemory("ready", -1, b"\x00" * 32, (), b"")
    return RunState("fedup", PEERS[0], "out", b"v", memory, None, "seen")


def same(a: RunState, b: RunState) -> bool:
    """Equal, NaN equal to NaN in the lap records."""
    return (
        attrs.evolve(a, history=()) == attrs.evolve(b, history=())
        and len(a.history) == len(b.history)
        and all(x.same_as(y) for x, y in zip(a.history, b.history, strict=True))
    )


def body_of(state: RunState) -> dict[str, Any]:
    value = cbor.decode(encode_run_state(state)[HEAD:], max_size=BIG, max_depth=8)
    assert isinstance(value, dict)
    return value


def sealed(body: bytes) -> bytes:
    """A file around ``body`` whose digest matches (as a program would write it)."""
    return MAGIC + hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest() + body


def reason(data: bytes, max_size: int = BIG) -> str:
    with pytest.raises(RunStateError) as caught:
        decode_run_state(data, max_size=max_size)
    return caught.value.reason


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("state", [full(), bare()], ids=["every-field", "no-optional-field"])
def test_a_run_state_comes_back_as_it_was_saved(state: RunState) -> None:
    data = encode_run_state(state)
    assert data.startswith(MAGIC)
    assert data[len(MAGIC) : HEAD] == hashlib.blake2b(data[HEAD:], digest_size=32).digest()
    again = decode_run_state(data, max_size=len(data))  # exactly the limit is allowed
    assert same(again, state)
    assert encode_run_state(again) == data  # the same bytes: nothing lost or reordered


def test_every_optional_field_and_slot_survives() -> None:
    state = full()
    again = decode_run_state(encode_run_state(state), max_size=BIG)
    m = again.custody
    assert m.last_lap == 4 and m.holding == Position(5, 1) and m.source == PEERS[1]
    assert m.kept == Kept(INITIAL, PEERS[2], Position(5, 2))
    assert m.taken == Taken(PEERS[1], "final", Position(5, 1), b"\x22" * 32, b"receipt")
    assert m.asks == (b"ask of one", b"ask of two") and m.asked == 3
    assert math.isnan(again.history[0].auc) and again.history[0].lap == -1
    assert math.isnan(again.history[2].loss) and again.history[2].n == 0
    assert again.masks == ((3, (0, 1, 2**62 - 1)), (4, tuple(range(103))))
    final_slot = attrs.evolve(m, kept=Kept(FINAL, PEERS[2], Position(6, 0)))
    kept_final = attrs.evolve(state, custody=final_slot)
    assert decode_run_state(encode_run_state(kept_final), max_size=BIG).custody.kept == Kept(
        FINAL, PEERS[2], Position(6, 0)
    )


def test_a_member_with_no_lap_yet_keeps_last_lap_minus_one() -> None:
    again = decode_run_state(encode_run_state(bare()), max_size=BIG)
    assert again.custody.last_lap == -1
    assert again.state is None and again.role == "seen"
    assert again.custody.holding is None and again.custody.kept is None
    assert again.custody.taken is None and again.custody.source is None
    assert body_of(bare())["custody"]["last_lap"] == 0  # -1 is stored as 0: a uint


# --- refusals before the body: magic, version, size, digest -------------------------------


def test_bytes_that_are_not_a_run_state_file_are_refused() -> None:
    assert reason(b'{"not": "a run state"}') == "it is not a FedUp run-state file"
    assert reason(cbor.encode({"v": 1})) == "it is not a FedUp run-state file"
    assert reason(b"FUPRUX\x00\x01" + bytes(40)) == "it is not a FedUp run-state file"


def test_an_empty_file_is_refused_as_empty() -> None:
    assert reason(b"") == "it is empty"


def test_another_format_version_is_refused_naming_it() -> None:
    data = encode_run_state(full())
    assert reason(MAGIC[:6] + b"\x00\x02" + data[8:]) == "it is of another format version (0002)"
    assert reason(MAGIC[:6] + b"\x01\x01" + data[8:]) == "it is of another format version (0101)"


@pytest.mark.parametrize("cut", [1, 6, 7, 8, 20, HEAD - 1])
def test_a_file_cut_before_its_body_is_truncated(cut: int) -> None:
    """Cut inside the magic or the digest: truncated (never 'another format version')."""
    assert reason(encode_run_state(full())[:cut]) == "it is truncated"


@pytest.mark.parametrize("keep", [0, 1, 100, -1])
def test_a_file_cut_in_its_body_fails_its_digest(keep: int) -> None:
    data = encode_run_state(full())
    cut = HEAD + keep if keep >= 0 else len(data) + keep
    assert reason(data[:cut]) == "it is truncated or corrupt (its digest does not match)"


def test_every_prefix_of_a_file_is_refused() -> None:
    data = encode_run_state(full())
    for cut in range(len(data)):
        with pytest.raises(RunStateError):
            decode_run_state(data[:cut], max_size=BIG)


@pytest.mark.parametrize("where", [HEAD, HEAD + 57, -1, len(MAGIC), HEAD - 1])
def test_a_flipped_byte_in_the_body_or_digest_is_corrupt(where: int) -> None:
    data = bytearray(encode_run_state(full()))
    data[where] ^= 0x40
    assert reason(bytes(data)) == "it is truncated or corrupt (its digest does not match)"


def test_a_file_larger_than_the_limit_is_refused_before_it_is_read() -> None:
    data = encode_run_state(full())
    assert reason(data, max_size=len(data) - 1) == (
        f"it is {len(data)} bytes, more than a run state can be ({len(data) - 1})"
    )
    assert reason(b"junk" * 10, max_size=8) == "it is 40 bytes, more than a run state can be (8)"


# --- a body with a valid digest that is not a run state ------------------------------------


def malformed(body: object) -> str:
    """The reason a file with this (encoded) body and a matching digest is refused."""
    raw = body if isinstance(body, bytes) else cbor.encode(body)
    why = reason(sealed(raw))
    assert why.startswith("it is malformed: "), why
    return why.removeprefix("it is malformed: ")


def changed(state: RunState, path: tuple[str, ...], value: object) -> dict[str, Any]:
    """``state``'s body with the field at ``path`` set to ``value`` (deleted if Ellipsis)."""
    body = body_of(state)
    where = body
    for key in path[:-1]:
        where = where[key]
    if value is ...:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return body


def test_a_body_that_is_not_cbor_or_not_a_map_is_malformed() -> None:
    assert "offset" in malformed(b"\xff")
    assert malformed(cbor.encode(body_of(full())) + b"\x00") == "1 byte trailing after the value"
    assert malformed([1, 2]) == "run state: expected a map, got an array"


def test_an_unknown_or_missing_field_is_malformed() -> None:
    assert malformed(changed(full(), ("extra",), 1)) == "run state: unknown field(s) 'extra'"
    assert malformed(changed(full(), ("custody", "x"), 1)) == "custody: unknown field(s) 'x'"
    assert malformed(changed(full(), ("custody", "kept", "y"), 1)) == "kept: unknown field(s) 'y'"
    assert malformed(changed(full(), ("role",), ...)) == "run state: missing field 'role'"
    assert malformed(changed(full(), ("custody", "taken", "receipt"), ...)) == (
        "taken: missing field 'receipt'"
    )


@pytest.mark.parametrize(
    ("path", "value", "why"),
    [
        (("v",), 2, "version 2 (this peer reads 1)"),
        (("network",), 5, "run state: field 'network' must be a text string, got an integer"),
        (("network",), "", "run state: field 'network' must not be empty"),
        (("peer",), b"\x00" * 38, "not an Ed25519 identity-multihash peer ID"),
        (("peer",), b"\x00" * 3, "run state: field 'peer' must be 38 bytes, got 3"),
        (("view",), "text", "run state: field 'view' must be a byte string, got a text string"),
        (("state",), 1, "run state: field 'state' must be a byte string, got an integer"),
        (("custody",), [], "custody must be a map"),
        (("sent",), -1, "run state: field 'sent' must be an unsigned integer, got an integer"),
        (("hops",), 1.5, "run state: field 'hops' must be an unsigned integer, got a float"),
        (("history",), [[0, 0.5, 0.5, 0.5, 1]], "a lap record has 6 items"),
        (
            ("history",),
            [[0, "x", 0.5, 0.5, 1, 1]],
            ("a lap record's loss, accuracy and AUC are floats or null"),
        ),
        (
            ("history",),
            [[0, 1, 0.5, 0.5, 1, 1]],
            ("a lap record's loss, accuracy and AUC are floats or null"),
        ),
        (("history",), [5], "run state: history[0] must be an array"),
        (("masks",), [[0, [1, 2]]] * 9, "run state: field 'masks' must have 0 to 8 items, got 9"),
        (("masks",), [[0, [1], 2]], "a mask is [lap, [uint, ...]]"),
        (("masks",), [[0, [-1]]], "mask must be an integer of at least 0"),
        (("masks",), [[0, [0] * 257]], "a mask is [lap, [uint, ...]]"),
        (
            ("custody", "received"),
            b"\x00" * 31,
            "custody: field 'received' must be 32 bytes, got 31",
        ),
        (
            ("custody", "chain"),
            [b"x" * 4097],
            ("custody: chain[0] must be a byte string of at most 4096 bytes"),
        ),
        (("custody", "holding"), [1], "a position must be [lap, hop]"),
        (("custody", "holding"), [1, True], "hop must be an integer of at least 0"),
        (("custody", "taken", "kind"), "weights", "taken kind 'weights'"),
        (("custody", "taken", "digest"), b"", "taken: field 'digest' must be 32 bytes, got 0"),
        (
            ("custody", "asked"),
            2**32,
            ("custody: field 'asked' must be between 0 and 4294967295, got 4294967296"),
        ),
    ],
)
def test_a_field_of_the_wrong_type_or_size_is_malformed(
    path: tuple[str, ...], value: object, why: str
) -> None:
    assert malformed(changed(full(), path, value)) == why


def test_a_phase_a_run_does_not_resume_in_is_malformed() -> None:
    for phase in ("done", "finishing", "distributing", "failed", "READY", "x"):
        assert malformed(changed(full(), ("custody", "phase"), phase)) == (
            f"custody phase {phase!r} is not one a run resumes in"
        )
    for phase in ("ready", "waiting", "training", "handing", "excluded"):  # these it resumes
        state = attrs.evolve(full(), custody=attrs.evolve(full().custody, phase=phase))
        assert decode_run_state(encode_run_state(state), max_size=BIG).custody.phase == phase


def test_a_bad_role_is_malformed() -> None:
    for role in ("leader", "HELD", "kept\x00"):
        assert malformed(changed(full(), ("role",), role)) == f"role {role!r}"
    assert malformed(changed(full(), ("role",), "x" * 9)) == (
        "run state: field 'role' must be at most 8 bytes of UTF-8"
    )


def test_a_negative_lap_is_malformed() -> None:
    """Only the initial model's record has lap -1; only the kept copy's slots are negative."""
    assert malformed(changed(full(), ("history",), [[-2, 0.5, 0.5, 0.5, 1, 1]])) == (
        "lap must be an integer of at least -1"
    )
    assert malformed(changed(full(), ("masks",), [[-1, [1]]])) == (
        "lap must be an integer of at least 0"
    )
    assert malformed(changed(full(), ("custody", "holding"), [-1, -1])) == (
        "lap must be an integer of at least 0"
    )
    assert malformed(changed(full(), ("custody", "taken", "at"), [-2, -2])) == (
        "lap must be an integer of at least 0"
    )
    assert malformed(changed(full(), ("custody", "kept", "copy"), [-3, 0])) == (
        "lap must be an integer of at least -2"
    )
    assert malformed(changed(full(), ("custody", "last_lap"), -1)) == (
        "custody: field 'last_lap' must be an unsigned integer, got an integer"
    )
    # A memory whose last lap is below -1 is written, but never read back.
    wrong = attrs.evolve(full(), custody=attrs.evolve(full().custody, last_lap=-2))
    assert reason(encode_run_state(wrong)) == (
        "it is malformed: custody: field 'last_lap' must be an unsigned integer, got an integer"
    )


def test_a_refusal_reason_is_one_line() -> None:
    """A name with a line break in the file is quoted, never printed as a second line."""
    assert "\n" not in malformed(changed(full(), ("role",), "a\nb"))
    assert "\n" not in malformed(changed(full(), ("custody", "phase"), "x\ny"))
    assert "\n" not in malformed(changed(full(), ("bad\nkey",), 1))


# --- properties ------------------------------------------------------------------------

PEER = st.sampled_from(PEERS)
POSITION = st.builds(Position, st.integers(0, 2**32), st.integers(0, 2**16))
SLOT = st.builds(Position, st.integers(-2, 2**32), st.integers(-2, 2**16))
SMALL_BYTES = st.binary(max_size=40)
FLOAT = st.floats(allow_infinity=False)  # NaN included: a lap record's unknown value
MEMORY = st.builds(
    CustodyMemory,
    phase=st.sampled_from(("ready", "waiting", "training", "handing", "excluded")),
    last_lap=st.integers(-1, 2**32 - 1),
    received=st.binary(min_size=32, max_size=32),
    chain=st.lists(SMALL_BYTES, max_size=4).map(tuple),
    provenance=SMALL_BYTES,
    holding=st.none() | POSITION,
    source=st.none() | PEER,
    kept=st.none() | st.builds(Kept, SLOT, PEER, POSITION),
    taken=st.none()
    | st.builds(
        Taken,
        PEER,
        st.sampled_from(("model", "final")),
        POSITION,
        st.binary(min_size=32, max_size=32),
        SMALL_BYTES,
    ),
    asked=st.integers(0, 2**32 - 1),
    asks=st.lists(SMALL_BYTES, max_size=3).map(tuple),
)
RECORD = st.builds(
    LapRecord,
    st.integers(-1, 10_000),
    FLOAT,
    FLOAT,
    FLOAT,
    st.integers(0, 2**40),
    st.integers(0, 2**40),
)
STATE = st.builds(
    RunState,
    network=st.text(min_size=1, max_size=20),
    peer=PEER,
    out_dir=st.text(min_size=1, max_size=30),
    view=SMALL_BYTES,
    custody=MEMORY,
    state=st.none() | SMALL_BYTES,
    role=st.sampled_from(("held", "kept", "seen")),
    history=st.lists(RECORD, max_size=5).map(tuple),
    masks=st.lists(
        st.tuples(st.integers(0, 10_000), st.lists(st.integers(0, 2**62), max_size=6).map(tuple)),
        max_size=3,
    ).map(tuple),
    sent=st.integers(0, 2**63 - 1),
    hops=st.integers(0, 2**32),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STATE)
def test_any_run_state_round_trips(state: RunState) -> None:
    data = encode_run_state(state)
    again = decode_run_state(data, max_size=len(data))
    assert same(again, state)
    assert encode_run_state(again) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_are_a_clean_refusal(data: bytes, with_magic: bool) -> None:
    """Random bytes, after the magic or sealed with a matching digest: RunStateError only."""
    for candidate in (MAGIC + data if with_magic else data, sealed(data)):
        with pytest.raises(RunStateError):
            decode_run_state(candidate, max_size=BIG)
