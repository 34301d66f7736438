"""StateLayout (one model's fixed layout) against encode_state/decode_state, and magnitudes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol.tensors import (
    StateLayout,
    TensorDecodeError,
    check_magnitude,
    decode_state,
    encode_state,
    magnitude_problem,
)

Array = Any


def bf16_words(values: Any) -> Array:
    """bfloat16 words (truncated float32) as uint16."""
    f32 = np.asarray(values, np.float32)
    return (f32.view(np.uint32) >> 16).astype(np.uint16)


def sample(seed: int = 0) -> list[tuple[str, Array]]:
    """Every kind of tensor, in an order that leaves padding gaps between them."""
    rng = np.random.default_rng(seed)
    return [
        ("w", rng.standard_normal((3, 5)).astype(np.float32)),
        ("half", rng.standard_normal(7).astype(np.float16)),  # 14 bytes: a 2-byte gap
        ("emb", bf16_words(rng.standard_normal((3, 2)))),
        ("flag", rng.random(3) < 0.5),  # 3 bytes: a 5-byte gap
        ("steps", np.array(int(rng.integers(0, 1000)), np.int64)),  # 0-d
        ("empty", np.zeros((0, 4), np.float32)),
        ("raw", rng.integers(0, 256, 5).astype(np.uint8)),
        ("d", rng.standard_normal(2)),
        ("small", rng.integers(-100, 100, 3).astype(np.int8)),
        ("ints", rng.integers(-(2**40), 2**40, (2, 2)).astype(np.int64)),
    ]


DTYPES = {"emb": "bf16"}


def layout() -> StateLayout:
    return StateLayout(sample(), dtypes=DTYPES)


def arrays(seed: int) -> list[Array]:
    return [a for _, a in sample(seed)]


def encoded(seed: int = 1, prefix: bytes = b"") -> bytes:
    return bytes(encode_state(sample(seed), dtypes=DTYPES, prefix=prefix))


# --------------------------------------------------------------------------
# encoding: the bytes of encode_state


@pytest.mark.parametrize("prefix", [b"", b"P" * 8, bytes(range(24))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encode_gives_encode_states_bytes(prefix: bytes, seed: int) -> None:
    out = layout().encode(arrays(seed), prefix=prefix)
    assert isinstance(out, memoryview) and not out.readonly
    assert bytes(out) == encoded(seed, prefix)
    assert bytes(out[: len(prefix)]) == prefix


def test_layout_attributes() -> None:
    lay = layout()
    blob = encoded(0)
    assert lay.size == len(blob)
    assert lay.names == tuple(n for n, _ in sample())
    assert lay.head == blob[: lay.start] and lay.start % 8 == 0
    assert [e.wire for e in lay.entries][:4] == ["f32", "f16", "bf16", "bool"]


def test_encode_fixes_byte_order_and_strides() -> None:
    plain = sample(3)
    twisted = []
    for _, a in plain:
        if a.ndim == 2 and a.size:
            a = np.asfortranarray(a)
        if a.dtype.kind == "f" and a.dtype.itemsize > 1:
            a = a.astype(a.dtype.newbyteorder(">"))
        twisted.append(a)
    assert bytes(layout().encode(twisted)) == encoded(3)


def test_bf16_words_may_be_signed() -> None:
    new = arrays(4)
    new[2] = new[2].view(np.int16)
    assert bytes(layout().encode(new)) == encoded(4)


@pytest.mark.parametrize(
    ("state", "dtypes"),
    [
        ([("only", np.array(2.5, np.float32))], None),
        ([("e1", np.zeros(0, np.int64)), ("e2", np.zeros((2, 0), np.float64))], None),
        ([("b", np.array([True, False, True]))], None),
        ([("z", bf16_words([1.0, -2.0, 3.5]))], {"z": "bf16"}),
    ],
)
def test_small_layouts(state: list[tuple[str, Array]], dtypes: dict[str, str] | None) -> None:
    lay = StateLayout(state, dtypes=dtypes)
    out = lay.encode([a for _, a in state], prefix=b"12345678")
    assert bytes(out) == bytes(encode_state(state, dtypes=dtypes, prefix=b"12345678"))
    back = lay.decode(out[8:])
    assert list(back) == [n for n, _ in state]
    for name, a in state:
        assert back[name].shape == a.shape and np.array_equal(back[name], a)


def test_a_layout_of_no_tensors() -> None:
    lay = StateLayout([])
    assert bytes(lay.encode([])) == bytes(encode_state([]))
    assert len(lay.decode(encode_state([]))) == 0


def test_encode_refuses_arrays_that_do_not_fit() -> None:
    lay = layout()
    good = arrays(0)
    with pytest.raises(LocalProtocolError, match="9 arrays for a layout of 10"):
        lay.encode(good[:-1])
    with pytest.raises(LocalProtocolError, match="11 arrays"):
        lay.encode([*good, good[0]])
    for i, bad in [
        (0, good[0].reshape(5, 3)),  # same size, another shape
        (0, good[0][:2]),
        (0, good[0].astype(np.float64)),  # right shape, another item size
        (4, np.array([7], np.int64)),  # 0-d expected
        (5, np.zeros((1, 4), np.float32)),
    ]:
        new = list(good)
        new[i] = bad
        with pytest.raises(LocalProtocolError, match=f"tensor {lay.names[i]!r} does not fit"):
            lay.encode(new)
    with pytest.raises(LocalProtocolError, match="8-byte aligned"):
        lay.encode(good, prefix=b"abc")


def test_encode_refuses_another_dtype_of_the_same_item_size() -> None:
    lay = StateLayout([("a", np.zeros(3, np.float32))])
    with pytest.raises(LocalProtocolError, match="does not fit"):
        lay.encode([np.zeros(3, np.int32)])


# --------------------------------------------------------------------------
# decoding: decode_state's arrays, one comparison for the layout


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_decode_equals_decode_state(kind: Any) -> None:
    blob = kind(encoded(5))
    ours = layout().decode(blob)
    theirs = decode_state(blob)
    assert list(ours) == list(theirs)
    assert dict(ours.dtypes) == dict(theirs.dtypes)
    assert ours.specs() == theirs.specs()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype
        assert ours[name].shape == theirs[name].shape
        assert np.array_equal(ours[name], theirs[name])
    assert ours["emb"].dtype == np.uint16 and ours.dtypes["emb"] == "bf16"
    assert ours["steps"].shape == () and ours["empty"].shape == (0, 4)


def test_decode_views_the_buffer() -> None:
    buf = bytearray(encoded(5))
    got = layout().decode(buf)
    assert got["w"].flags.writeable
    got["w"][0, 0] = 42.0
    assert decode_state(buf)["w"][0, 0] == 42.0
    assert not layout().decode(bytes(buf))["w"].flags.writeable


def test_decode_accepts_decode_states_input_kinds() -> None:
    blob = encoded(6)
    out = layout().decode(np.frombuffer(blob, np.uint8).copy().data)
    assert np.array_equal(out["ints"], decode_state(blob)["ints"])
    assert len(blob) % 8 == 0  # the last tensor is 8-byte int64s
    as_u32 = memoryview(bytearray(blob)).cast("I")  # a view of another item size
    assert np.array_equal(layout().decode(as_u32)["d"], decode_state(blob)["d"])


def other_layouts() -> list[tuple[str, list[tuple[str, Array]]]]:
    base = sample(1)

    def change(i: int, name: str | None = None, array: Array | None = None) -> list[Any]:
        new = list(base)
        old_name, old = new[i]
        new[i] = (name or old_name, old if array is None else array)
        return new

    return [
        ("another name", change(0, name="v")),  # same length, same size
        ("another shape", change(0, array=base[0][1].reshape(5, 3))),
        ("transposed", change(0, array=np.ascontiguousarray(base[0][1].T))),
        ("another dtype", change(0, array=base[0][1].view(np.int32))),
        ("fewer tensors", base[:-1]),
        ("more tensors", [*base, ("x", np.zeros(1, np.int8))]),
        ("reordered", [base[1], base[0], *base[2:]]),
    ]


@pytest.mark.parametrize(
    "state", [c[1] for c in other_layouts()], ids=[c[0] for c in other_layouts()]
)
def test_decode_refuses_another_layout(state: list[tuple[str, Array]]) -> None:
    blob = encode_state(state, dtypes={"emb": "bf16"} if "emb" in dict(state) else None)
    decode_state(blob)  # a valid blob, just not this model's
    with pytest.raises(TensorDecodeError, match=r"layout .* is not the model's"):
        layout().decode(blob)


def test_decode_refuses_a_different_size() -> None:
    blob = encoded(1)
    for data in (blob[:-1], blob + b"\0", blob + bytes(8), b"", blob[: layout().start]):
        with pytest.raises(TensorDecodeError, match="is not the model's"):
            layout().decode(data)


def test_decode_refuses_a_header_byte_changed() -> None:
    blob = encoded(1)
    for at in range(0, layout().start, 3):
        bad = bytearray(blob)
        bad[at] ^= 0x01
        with pytest.raises(TensorDecodeError, match="is not the model's"):
            layout().decode(bad)


def gaps(lay: StateLayout) -> list[int]:
    """Every padding byte between tensors."""
    out: list[int] = []
    end = 0
    for e in lay.entries:
        out += range(lay.start + end, lay.start + e.offset)
        end = e.offset + e.nbytes
    return out


def test_decode_refuses_nonzero_padding_between_tensors() -> None:
    lay = layout()
    where = gaps(lay)
    assert len(where) >= 10, "the sample must have gaps"
    for at in where:
        bad = bytearray(encoded(1))
        bad[at] = 0x80
        with pytest.raises(TensorDecodeError, match="padding between tensors must be zero"):
            lay.decode(bad)
        with pytest.raises(TensorDecodeError, match="padding"):
            lay.decode(bad, check_values=False)  # the layout is always checked


@pytest.mark.parametrize("name", ["w", "half", "emb", "d"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decode_refuses_nan_and_inf(name: str, bad: float) -> None:
    state = dict(sample(1))
    array = state[name].copy()
    array.flat[1] = bf16_words(bad) if name == "emb" else bad
    state[name] = array
    blob = encode_state(list(state.items()), dtypes=DTYPES)
    with pytest.raises(TensorDecodeError, match=f"tensor '{name}' contains NaN or Inf"):
        layout().decode(blob)
    with pytest.raises(TensorDecodeError, match=f"'{name}'"):
        decode_state(blob)
    # the caller who checks values itself gets the views
    assert layout().decode(blob, check_values=False)[name].shape == array.shape


@pytest.mark.parametrize(
    ("name", "value", "bound"),
    [
        ("w", 1e9, 1e8),
        ("w", -1e9, 1e8),
        ("half", 60000.0, 1e4),
        ("d", 1e30, 1e8),
        ("ints", 2**40 + 1, 2**40),
        ("ints", -(2**62), 1e8),
        ("small", -100, 99),
        ("raw", 200, 100),
        ("steps", 10**9, 1e8),
    ],
)
def test_decode_refuses_values_beyond_max_abs(name: str, value: Any, bound: float) -> None:
    base = [
        (n, a if a.dtype == bool else np.asarray(np.clip(a, -50, 50), a.dtype))
        for n, a in sample(1)
        if n != "emb"
    ]
    lay = StateLayout(base)
    assert lay.decode(encode_state(base), max_abs=bound)[name].shape == dict(base)[name].shape
    state = dict(base)
    array = state[name].copy()
    array.flat[0] = value
    state[name] = array
    blob = encode_state(list(state.items()))
    lay.decode(blob)  # finite, and no bound asked for
    with pytest.raises(TensorDecodeError, match=f"tensor '{name}' reaches .* beyond the bound"):
        lay.decode(blob, max_abs=bound)
    with pytest.raises(TensorDecodeError, match=f"tensor '{name}' reaches"):
        decode_state(blob, max_abs=bound)
    lay.decode(blob, max_abs=bound, check_values=False)


def test_values_at_the_bound_pass() -> None:
    state: list[tuple[str, Array]] = [
        ("w", np.array([-8.0, 8.0], np.float32)),
        ("i", np.array([-8, 3], np.int64)),
    ]
    blob = encode_state(state)
    lay = StateLayout(state)
    assert np.array_equal(lay.decode(blob, max_abs=8.0)["i"], [-8, 3])
    assert np.array_equal(decode_state(blob, max_abs=8.0)["w"], [-8.0, 8.0])
    with pytest.raises(TensorDecodeError, match="'w'"):
        lay.decode(blob, max_abs=7.9)


def test_nan_is_refused_under_max_abs_too() -> None:
    state = dict(sample(1))
    state["w"] = state["w"].copy()
    state["w"][2, 2] = np.nan
    blob = encode_state(list(state.items()), dtypes=DTYPES)
    with pytest.raises(TensorDecodeError, match="'w' contains NaN or Inf"):
        layout().decode(blob, max_abs=1e30)
    with pytest.raises(TensorDecodeError, match="'w' contains NaN or Inf"):
        decode_state(blob, max_abs=1e30)


@pytest.mark.parametrize("check_values", [True, False])
def test_decode_refuses_bool_bytes_other_than_0_and_1(check_values: bool) -> None:
    lay = layout()
    (flag,) = [e for e in lay.entries if e.name == "flag"]
    for value in (2, 0xFF):
        bad = bytearray(encoded(1))
        bad[lay.start + flag.offset + 1] = value
        with pytest.raises(TensorDecodeError, match="'flag': bool bytes must be 0 or 1"):
            lay.decode(bad, check_values=check_values)
        with pytest.raises(TensorDecodeError, match="bool bytes"):
            decode_state(bad)


def test_errors_are_remote_protocol_errors() -> None:
    with pytest.raises(RemoteProtocolError):
        layout().decode(b"nope")


# --------------------------------------------------------------------------
# magnitude_problem / check_magnitude


@pytest.mark.parametrize(
    ("array", "wire", "bound", "expected"),
    [
        (np.array([1.0, -2.0], np.float32), "f32", 2.0, None),
        (np.array([1.0, -2.5], np.float32), "f32", 2.0, "reaches 2.5, beyond the bound 2"),
        (np.array([1.0, np.nan], np.float64), "f64", 1e8, "contains NaN or Inf"),
        (np.array([np.nan, 5.0], np.float32), "f32", 1e8, "contains NaN or Inf"),
        (np.array([np.inf], np.float32), "f32", 1e8, "contains NaN or Inf"),
        (np.array([-np.inf, 0.0], np.float64), "f64", 1e8, "contains NaN or Inf"),
        (np.array([np.inf], np.float16), "f16", 1e8, "contains NaN or Inf"),
        (np.array([65504.0], np.float16), "f16", 1e4, "reaches 6.55e+04, beyond the bound 10000"),
        (np.array([65504.0], np.float16), "f16", 1e5, None),
        (np.array([-(2**63)], np.int64), "i64", 1e8, "reaches 9.22e+18, beyond the bound 1e+08"),
        (np.array([2**31 - 1], np.int32), "i32", 1e8, "reaches 2.15e+09, beyond the bound 1e+08"),
        (np.array([255], np.uint8), "u8", 255, None),
        (np.array([255], np.uint8), "u8", 254, "reaches 255, beyond the bound 254"),
        (np.array([True, False]), "bool", 0.5, None),
        (np.zeros(0, np.float32), "f32", 0.0, None),
        (np.array(3.0, np.float32), "f32", 2.0, "reaches 3, beyond the bound 2"),
    ],
)
def test_magnitude_problem(array: Array, wire: str, bound: float, expected: str | None) -> None:
    assert magnitude_problem(array, wire, bound) == expected
    if expected is None:
        check_magnitude("t", array, wire, bound)
    else:
        with pytest.raises(TensorDecodeError) as info:
            check_magnitude("layer.bias", array, wire, bound)
        assert info.value.reason == f"tensor 'layer.bias' {expected}"


def test_bf16_nan_is_refused_under_max_abs() -> None:
    assert magnitude_problem(bf16_words([1.0, np.nan]), "bf16", 1e8) == "contains NaN or Inf"


def test_bf16_values_are_compared_as_floats_under_max_abs() -> None:
    assert magnitude_problem(bf16_words([1.0, -2.0]), "bf16", 10.0) is None
    assert magnitude_problem(bf16_words([1e30]), "bf16", 1e8) is not None


def test_decode_with_max_abs_refuses_a_bf16_nan() -> None:
    state = [("emb", bf16_words([1.0, np.nan]))]
    blob = encode_state(state, dtypes={"emb": "bf16"})
    with pytest.raises(TensorDecodeError, match="'emb' contains NaN or Inf"):
        decode_state(blob, max_abs=1e8)
    with pytest.raises(TensorDecodeError, match="'emb' contains NaN or Inf"):
        StateLayout(state, dtypes={"emb": "bf16"}).decode(blob, max_abs=1e8)


def test_decode_with_max_abs_accepts_small_bf16_values() -> None:
    state = [("emb", bf16_words([1.0, -2.0, 0.5]))]
    blob = encode_state(state, dtypes={"emb": "bf16"})
    assert decode_state(blob, max_abs=10.0)["emb"].shape == (3,)
    assert StateLayout(state, dtypes={"emb": "bf16"}).decode(blob, max_abs=10.0)["emb"].size == 3


# --------------------------------------------------------------------------
# whole, split, garbage


def test_every_truncation_is_refused() -> None:
    blob = encoded(1)
    lay = layout()
    for cut in range(len(blob)):
        with pytest.raises(TensorDecodeError):
            lay.decode(blob[:cut])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_single_byte_changes_are_refused_or_decode(pos: int, value: int) -> None:
    blob = bytearray(encoded(1))
    pos %= len(blob)
    if blob[pos] == value:
        value ^= 0xFF
    blob[pos] = value
    lay = layout()
    try:
        got = lay.decode(blob, max_abs=1e30)
    except TensorDecodeError:
        return
    assert pos >= lay.start and pos not in gaps(lay)  # only a tensor's data may change
    assert list(got) == list(lay.names)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_random_bytes_are_refused(data: bytes) -> None:
    lay = layout()
    with pytest.raises(TensorDecodeError):
        lay.decode(data)
    with pytest.raises(TensorDecodeError):
        lay.decode(lay.head + data)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=15, max_size=15),
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=4, max_size=4),
)
def test_generated_values_round_trip(floats: list[float], ints: list[int]) -> None:
    new = arrays(0)
    new[0] = np.array(floats, np.float32).reshape(3, 5)
    new[-1] = np.array(ints, np.int64).reshape(2, 2)
    out = layout().encode(new)
    state = sample(0)
    state[0] = ("w", new[0])
    state[-1] = ("ints", new[-1])
    assert bytes(out) == bytes(encode_state(state, dtypes=DTYPES))
    back = layout().decode(out)
    assert np.array_equal(back["w"], new[0]) and np.array_equal(back["ints"], new[-1])
