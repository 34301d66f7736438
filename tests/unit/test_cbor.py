"""The strict CBOR decoder and the deterministic encoder (fedup/protocol/cbor.py).

Following h11's tests: every accepted encoding whole, every prefix of it,
with trailing garbage, every rejection rule by a hand-written example, and
hypothesis-generated hostile input that must end in CBORDecodeError or a value.
"""

from __future__ import annotations

import array
import math
import struct
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol.cbor import MAX_DEPTH_CEILING, CBORDecodeError, Encoded, decode, encode

MAX_SIZE = DEFAULT_LIMITS.max_message_size
MAX_DEPTH = DEFAULT_LIMITS.max_cbor_depth
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MANY = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dec(data: bytes, *, max_depth: int = MAX_DEPTH, max_size: int = MAX_SIZE) -> object:
    return decode(data, max_size=max_size, max_depth=max_depth)


def same(a: object, b: object) -> bool:
    """Equality that also compares types, dict order and float bits (so -0.0 != 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        assert isinstance(b, float)
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    return a == b


def depth_of(value: object) -> int:
    """The depth of a value as the module defines it (deepest data item; top is 0)."""
    if isinstance(value, list) and value:
        return 1 + max(depth_of(v) for v in value)
    if isinstance(value, dict) and value:
        return 1 + max(max(depth_of(k), depth_of(v)) for k, v in value.items())
    return 0


def rejected(data: bytes, **kwargs: Any) -> str:
    """Decode ``data`` expecting CBORDecodeError; return its reason."""
    with pytest.raises(CBORDecodeError) as info:
        dec(data, **kwargs)
    assert isinstance(info.value.reason, str) and info.value.reason
    return info.value.reason


def decodes_or_rejects(data: bytes, **kwargs: Any) -> object:
    """Decode hostile input: a value or CBORDecodeError, and nothing else may happen."""
    try:
        return dec(data, **kwargs)
    except CBORDecodeError as exc:
        assert exc.reason
        return exc


# --- strategies ------------------------------------------------------------

ints = st.integers(min_value=-(2**64), max_value=2**64 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=20) | st.binary(max_size=20)
keys = st.text(max_size=6) | ints
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4),
    max_leaves=20,
)
# Bytes that are heads of interesting shapes, to make random input more CBOR-like.
HEAD_BYTES = [0x00, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x20, 0x38, 0x3B, 0x40, 0x41, 0x58, 0x5B]
HEAD_BYTES += [0x60, 0x61, 0x78, 0x7B, 0x7F, 0x80, 0x81, 0x82, 0x98, 0x9B, 0x9F, 0xA0, 0xA1]
HEAD_BYTES += [0xA2, 0xB8, 0xBB, 0xBF, 0xC1, 0xD8, 0xF4, 0xF5, 0xF6, 0xF7, 0xF9, 0xFA, 0xFB, 0xFF]
cborish = st.lists(st.sampled_from(HEAD_BYTES) | st.integers(0, 255), max_size=64).map(bytes)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoding with a few byte flips, truncations, insertions or deletions."""
    data = bytearray(encode(draw(values)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = bytes([draw(st.sampled_from(HEAD_BYTES) | st.integers(0, 255))])
        elif op == "truncate":
            del data[at:]
        elif at < len(data):
            if op == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "set":
                data[at] = draw(st.sampled_from(HEAD_BYTES) | st.integers(0, 255))
            else:
                del data[at]
    return bytes(data)


# --- known encodings (RFC 8949 appendix A, deterministic forms) -------------

VECTORS: list[tuple[object, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (2**64 - 1, "1bffffffffffffffff"),
    (-(2**64), "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (0.0, "f90000"),
    (-0.0, "f98000"),
    (1.0, "f93c00"),
    (1.1, "fb3ff199999999999a"),
    (1.5, "f93e00"),
    (65504.0, "f97bff"),
    (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"),
    (1.0e300, "fb7e37e43c8800759c"),
    (5.960464477539063e-8, "f90001"),
    (0.00006103515625, "f90400"),
    (-4.0, "f9c400"),
    (-4.1, "fbc010666666666666"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    (
        {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"},
        "a56161614161626142616361436164614461656145",
    ),
]


@pytest.mark.parametrize(("value", "hexed"), VECTORS)
def test_vectors_encode_and_decode(value: object, hexed: str) -> None:
    assert encode(value).hex() == hexed
    assert same(dec(bytes.fromhex(hexed)), value)


@pytest.mark.parametrize(("value", "hexed"), VECTORS)
def test_every_proper_prefix_and_any_trailing_byte_is_rejected(value: object, hexed: str) -> None:
    data = bytes.fromhex(hexed)
    for cut in range(len(data)):
        rejected(data[:cut])
    for extra in (b"\x00", b"\xff", data):
        reason = rejected(data + extra)
        assert f"{len(extra)} byte" in reason and "trailing" in reason


def test_map_keys_sorted_bytewise_not_length_first() -> None:
    # RFC 8949 4.2.1 order: 10, 100, -1, "z", "aa" (RFC 7049 "canonical" would put -1 first).
    value = {"aa": 0, "z": 0, -1: 0, 100: 0, 10: 0}
    assert encode(value).hex() == "a5" + "0a00" + "186400" + "2000" + "617a00" + "62616100"
    assert list(dec(encode(value)).keys()) == [10, 100, -1, "z", "aa"]  # type: ignore[attr-defined]


def test_encode_accepts_tuples_and_buffers() -> None:
    assert encode((1, bytearray(b"ab"), memoryview(b"cd"))) == encode([1, b"ab", b"cd"])
    assert encode(memoryview(array.array("H", [1]))) == bytes.fromhex("42") + struct.pack("=H", 1)


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        2**64,
        -(2**64) - 1,
        object(),
        {1, 2},
        1j,
        {(1, 2): 0},
        {True: 0},
        {1.5: 0},
        {None: 0},
        [math.nan],
        "\ud800",
    ],
)
def test_encode_rejects_what_it_cannot_represent(value: object) -> None:
    with pytest.raises(LocalProtocolError):
        encode(value)


def test_encode_rejects_cycles_and_excessive_depth() -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    with pytest.raises(LocalProtocolError, match="deeper"):
        encode(cyclic)
    deep: object = 0
    for _ in range(MAX_DEPTH_CEILING):
        deep = [deep]
    assert dec(encode(deep), max_depth=MAX_DEPTH_CEILING) == deep
    with pytest.raises(LocalProtocolError, match="deeper"):
        encode([deep])


# --- every rejection rule, by hand-written example ------------------------

REJECTIONS: list[tuple[str, str]] = [
    ("c11a514b67b0", "CBOR tag 1 is not allowed"),
    ("c249010000000000000000", "CBOR tag 2 is not allowed"),
    ("d81c80", "CBOR tag 28 is not allowed"),
    ("d9d9f700", "CBOR tag 55799 is not allowed"),
    ("f7", "undefined"),
    ("f0", "simple value 16"),
    ("e0", "simple value 0"),
    ("f820", "simple value"),
    ("f8ff", "simple value"),
    ("ff", "break"),
    ("5f4101ff", "indefinite-length byte string"),
    ("7f6161ff", "indefinite-length text string"),
    ("9f01ff", "indefinite-length array"),
    ("bfff", "indefinite-length map"),
    ("1f", "additional information 31"),
    ("3f", "additional information 31"),
    ("df00", "additional information 31"),
    ("1c", "reserved additional information 28"),
    ("3d", "reserved additional information 29"),
    ("5e", "reserved additional information 30"),
    ("7c", "reserved additional information 28"),
    ("9d", "reserved additional information 29"),
    ("be", "reserved additional information 30"),
    ("dc", "reserved additional information 28"),
    ("fc", "reserved additional information 28"),
    ("fd", "reserved additional information 29"),
    ("fe", "reserved additional information 30"),
    ("1805", "non-shortest encoding of unsigned integer head"),
    ("190005", "non-shortest"),
    ("1900ff", "non-shortest"),
    ("1a0000ffff", "non-shortest"),
    ("1b00000000ffffffff", "non-shortest"),
    ("3817", "non-shortest encoding of negative integer head"),
    ("580161", "non-shortest encoding of byte string head"),
    ("780161", "non-shortest encoding of text string head"),
    ("9800", "non-shortest encoding of array head"),
    ("b800", "non-shortest encoding of map head"),
    ("d801", "non-shortest encoding of tag head"),
    ("f97e00", "float nan"),
    ("fa7fc00000", "float nan"),
    ("fb7ff8000000000000", "float nan"),
    ("f97c00", "float inf"),
    ("f9fc00", "float -inf"),
    ("fa7f800000", "float inf"),
    ("fbfff0000000000000", "float -inf"),
    ("61ff", "not valid UTF-8"),
    ("62c328", "not valid UTF-8"),
    ("62c0af", "not valid UTF-8"),  # overlong "/"
    ("63eda080", "not valid UTF-8"),  # encoded surrogate U+D800
    ("64f4908080", "not valid UTF-8"),  # beyond U+10FFFF
    ("a1410000", "map key at offset 1 is a byte string"),
    ("a18000", "map key at offset 1 is a array"),
    ("a1a000", "map key at offset 1 is a map"),
    ("a1f400", "map key at offset 1 is a simple value or float"),
    ("a1f600", "map key at offset 1 is a simple value or float"),
    ("a1f93c0000", "map key at offset 1 is a simple value or float"),
    ("a1c10000", "map key at offset 1 is a tag"),
    ("a2616101616102", "map has duplicate key 'a'"),
    ("a201000100", "map has duplicate key 1"),
    ("a301000200f93c0000", "map key at offset 5 is a simple value or float"),
    ("", "empty input"),
    ("0000", "1 byte trailing"),
    ("80000000", "3 bytes trailing"),
    ("18", "needs 1 argument bytes but 0 are left"),
    ("1901", "needs 2 argument bytes but 1 are left"),
    ("1b00000001", "needs 8 argument bytes but 4 are left"),
    ("f900", "float at offset 0 needs 2 bytes but 1 are left"),
    ("fb00", "float at offset 0 needs 8 bytes"),
    ("6261", "declared text string length 2 exceeds the 1 byte left"),
    ("8201", "declared array of 2 items exceeds the 1 byte left"),
    ("820181", "declared array of 1 items exceeds the 0 bytes left"),
    ("a201", "declared map of 2 pairs exceeds the 1 byte left"),
    ("a2010203", "declared map of 2 pairs exceeds the 3 bytes left"),
    ("a10101a0", "trailing"),
    ("a1", "declared map of 1 pairs exceeds the 0 bytes left"),
    (
        "5b0000010000000000" + "00" * 11,
        "declared byte string length 1099511627776 exceeds the 11 bytes left",
    ),
    ("7bffffffffffffffff00", "declared text string length 18446744073709551615"),
    ("9bffffffffffffffff0000", "declared array of 18446744073709551615 items"),
    ("bb7fffffffffffffff0000", "declared map of 9223372036854775807 pairs"),
    ("5affffffff", "declared byte string length 4294967295 exceeds the 0 bytes left"),
]


@pytest.mark.parametrize(("hexed", "reason"), REJECTIONS)
def test_rejection_rule(hexed: str, reason: str) -> None:
    assert reason in rejected(bytes.fromhex(hexed))


def test_tag_rejected_even_where_cbor2_builds_objects() -> None:
    data = bytes.fromhex("c11a514b67b0")
    assert not isinstance(cbor2.loads(data), int)  # cbor2 makes a datetime of it
    assert rejected(data) == "CBOR tag 1 is not allowed (offset 0)"


def test_errors_are_remote_protocol_errors_and_carry_the_peer() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        dec(b"\xf7")
    err = info.value.with_peer("12D3KooWpeer")
    assert isinstance(err, CBORDecodeError)
    assert err.peer == "12D3KooWpeer" and "undefined" in str(err)


def test_size_limit_is_checked_before_any_byte() -> None:
    assert dec(b"\x43abc", max_size=4) == b"abc"
    # 0xff would be "break"; the size rule must fire first.
    reason = rejected(b"\xff" * 5, max_size=4)
    assert reason == "CBOR item of 5 bytes exceeds the limit of 4 bytes"
    # A memoryview is measured in bytes, not in items.
    view = memoryview(array.array("I", [0, 0]))
    assert len(view) == 2
    assert "of 8 bytes" in rejected(view, max_size=4)  # type: ignore[arg-type]


def test_accepts_any_bytes_like_input() -> None:
    data = encode({"seq": [1, b"x"]})
    for form in (data, bytearray(data), memoryview(data), memoryview(b"\x00" + data)[1:]):
        assert dec(form) == {"seq": [1, b"x"]}  # type: ignore[arg-type]


def test_decoder_does_not_require_deterministic_input() -> None:
    # Peers may write longer floats and unsorted maps; values, not bytes, are checked.
    assert same(dec(bytes.fromhex("fb3ff0000000000000")), 1.0)
    assert same(dec(bytes.fromhex("fa3f800000")), 1.0)
    assert list(dec(bytes.fromhex("a2616202616101")).keys()) == ["b", "a"]  # type: ignore[attr-defined]
    assert dec(bytes.fromhex("a201006131f5")) == {1: 0, "1": True}


def test_decode_result_types_are_plain() -> None:
    value = dec(encode({"b": b"x", "l": [1, -1, 1.5, "t", None, True]}))
    assert same(value, {"b": b"x", "l": [1, -1, 1.5, "t", None, True]})
    assert type(value["b"]) is bytes  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_depth": -1}, "max_depth"),
        ({"max_depth": MAX_DEPTH_CEILING + 1}, "max_depth"),
    ],
)
def test_bad_arguments_are_local_errors(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        dec(b"\x00", **kwargs)
    with pytest.raises(LocalProtocolError):
        decode("00", max_size=10, max_depth=1)  # type: ignore[arg-type]


# --- depth ---------------------------------------------------------------


@pytest.mark.parametrize("max_depth", [0, 1, 2, 16])
def test_depth_boundary(max_depth: int) -> None:
    for depth in range(max_depth + 3):
        arrays = b"\x81" * depth + b"\x00"  # [[...[0]...]]: the 0 is at `depth`
        maps = b"\xa1\x00" * depth + b"\x00"  # {0: {0: ... 0}}
        empty_inner = b"\x81" * depth + b"\x80"  # innermost [] has no items: same depth
        for data in (arrays, maps, empty_inner):
            if depth <= max_depth:
                assert depth_of(dec(data, max_depth=max_depth)) == depth
            else:
                assert f"nesting deeper than {max_depth}" in rejected(data, max_depth=max_depth)
    assert dec(b"\x80", max_depth=0) == [] and dec(b"\xa0", max_depth=0) == {}


@pytest.mark.parametrize("unit", [b"\x81", b"\xa1\x00", b"\x82\x00", b"\xa1\x61a"])
def test_hostile_deep_nesting(unit: bytes) -> None:
    for max_depth in (MAX_DEPTH, MAX_DEPTH_CEILING):
        data = unit * 10_000 + b"\x00"
        assert f"nesting deeper than {max_depth}" in rejected(
            data, max_depth=max_depth, max_size=len(data)
        )


# --- huge claims never allocate -------------------------------------------


@pytest.mark.parametrize("major", [2, 3, 4, 5])
def test_huge_claim_does_not_allocate(major: int) -> None:
    data = bytes([(major << 5) | 27]) + (2**40).to_bytes(8, "big") + b"\x00" * 11
    assert len(data) == 20
    tracemalloc.start()
    try:
        reason = rejected(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "exceeds the 11 bytes left" in reason
    assert peak < 64 * 1024


@FAST
@given(
    st.integers(0, 3),
    st.sampled_from([2, 3, 4, 5]),
    st.integers(2**32, 2**64 - 1),
    st.binary(max_size=40),
)
def test_huge_declared_lengths(prefix: int, major: int, claim: int, tail: bytes) -> None:
    data = b"\x81" * prefix + bytes([(major << 5) | 27]) + claim.to_bytes(8, "big") + tail
    assert "exceeds the" in rejected(data)


# --- properties -----------------------------------------------------------


@MANY
@given(values)
def test_roundtrip_and_stable_bytes(value: object) -> None:
    data = encode(value)
    back = dec(data, max_depth=MAX_DEPTH_CEILING)
    assert same(back, _normalise_order(value))
    assert encode(back) == data  # byte-stable
    if isinstance(value, dict):
        assert encode(dict(reversed(value.items()))) == data  # insertion order is irrelevant


def _normalise_order(value: object) -> object:
    """``value`` with every dict re-ordered as the deterministic encoding orders it."""
    if isinstance(value, list):
        return [_normalise_order(v) for v in value]
    if isinstance(value, dict):
        ordered = sorted(value.items(), key=lambda kv: encode(kv[0]))
        return {k: _normalise_order(v) for k, v in ordered}
    return value


@FAST
@given(values)
def test_depth_definition_is_tight(value: object) -> None:
    depth = depth_of(value)
    data = encode(value)
    assert same(dec(data, max_depth=depth), _normalise_order(value))
    if depth > 0:
        assert "nesting deeper" in rejected(data, max_depth=depth - 1)


@FAST
@given(values)
def test_every_prefix_of_a_valid_encoding_is_rejected(value: object) -> None:
    data = encode(value)
    for cut in range(len(data)):
        rejected(data[:cut], max_depth=MAX_DEPTH_CEILING)
    rejected(data + b"\x00", max_depth=MAX_DEPTH_CEILING)


@MANY
@given(floats)
def test_floats_take_the_shortest_exact_width(x: float) -> None:
    data = encode(x)
    assert same(dec(data), x)
    fits16 = _fits(">e", x)
    fits32 = _fits(">f", x)
    assert len(data) == (3 if fits16 else 5 if fits32 else 9)


@FAST
@given(values, values)
def test_an_encoded_item_is_placed_as_it_is(inner: object, other: object) -> None:
    # The same bytes as encoding the value in place, wherever it sits.
    assert encode(Encoded(encode(inner))) == encode(inner)
    assert encode({"ring": Encoded(encode(inner)), "x": other}) == encode(
        {"ring": inner, "x": other}
    )
    assert encode([other, Encoded(encode(inner))]) == encode([other, inner])


def _fits(fmt: str, x: float) -> bool:
    try:
        packed = struct.pack(fmt, x)
    except OverflowError:
        return False
    return bool(struct.unpack(fmt, packed)[0] == x)


@FAST
@given(values)
def test_differential_against_cbor2(value: object) -> None:
    ours = encode(value)
    assert same(cbor2.loads(ours), _normalise_order(value))
    assert same(dec(cbor2.dumps(value), max_depth=MAX_DEPTH_CEILING), value)
    if not _has_multikey_map(value):
        # Without maps of two or more keys, RFC 7049 canonical and RFC 8949
        # deterministic encodings coincide.
        assert cbor2.dumps(value, canonical=True) == ours


def _has_multikey_map(value: object) -> bool:
    if isinstance(value, list):
        return any(_has_multikey_map(v) for v in value)
    if isinstance(value, dict):
        return len(value) > 1 or any(_has_multikey_map(v) for v in value.values())
    return False


def _check_hostile(data: bytes) -> None:
    result = decodes_or_rejects(data, max_depth=MAX_DEPTH)
    if not isinstance(result, CBORDecodeError):
        # Whatever we accept, cbor2 reads as the same value, and we re-encode it.
        assert same(cbor2.loads(data), result)
        assert same(dec(encode(result)), _normalise_order(result))


@MANY
@given(st.binary(max_size=64))
def test_random_bytes(data: bytes) -> None:
    _check_hostile(data)


@MANY
@given(cborish)
def test_cbor_like_random_bytes(data: bytes) -> None:
    _check_hostile(data)


@MANY
@given(mutated())
def test_mutated_valid_encodings(data: bytes) -> None:
    _check_hostile(data)


def test_small_integers_inside_arrays_follow_the_same_rules() -> None:
    """Arrays take their one-byte unsigned items without a call per item; the rules
    (shortest form, no truncation, the same bytes as cbor2) stay the same."""
    counts = [0, 1, 23, 24, 255, 256, 70000, -1, 2**40]
    data = encode(counts)
    assert data == cbor2.dumps(counts)
    assert decode(data, max_size=100, max_depth=1) == counts
    small = decode(bytes([0x83, 0x17, 0x18, 0x18, 0x18, 0xFF]), max_size=9, max_depth=1)
    assert small == [23, 24, 255]
    for bad in (
        b"\x82\x18\x05\x01",  # 5 written in two bytes
        b"\x82\x01",  # one item missing
        b"\x81\x18",  # an argument byte missing
    ):
        with pytest.raises(CBORDecodeError):
            decode(bad, max_size=9, max_depth=1)
