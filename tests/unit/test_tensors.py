"""The model-state wire codec: round trips, exactness, and hostile input.

``blob()`` and ``entry()`` below build blobs straight from the specification
in docs/protocol-tensors.md, independently of the encoder, so that hostile
headers can be expressed and the encoder is checked against the spec.
"""

from __future__ import annotations

import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.config import Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol.tensors import (
    WIRE_DTYPES,
    DecodedState,
    TensorDecodeError,
    TensorSpec,
    check_finite,
    decode_state,
    describe_state,
    encode_state,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NUMPY_DTYPES = {
    "f16": np.float16,
    "f32": np.float32,
    "f64": np.float64,
    "i8": np.int8,
    "i16": np.int16,
    "i32": np.int32,
    "i64": np.int64,
    "u8": np.uint8,
    "bool": np.bool_,
    "bf16": np.uint16,
}
SHAPES = [(), (0,), (0, 5), (1,), (7,), (3, 4), (2, 3, 4), (2, 1, 1, 3)]


def entry(name: bytes, dtype: bytes, shape: tuple[int, ...], offset: int, nbytes: int) -> bytes:
    return (
        struct.pack(">H", len(name))
        + name
        + struct.pack(">B", len(dtype))
        + dtype
        + struct.pack(">B", len(shape))
        + b"".join(struct.pack(">Q", d) for d in shape)
        + struct.pack(">QQ", offset, nbytes)
    )


def blob(entries: list[bytes], data: bytes = b"", *, count: int | None = None) -> bytes:
    header = struct.pack(">I", len(entries) if count is None else count) + b"".join(entries)
    out = b"FUST\x01\x00\x00\x00" + struct.pack(">I", len(header)) + header
    return out + bytes(-len(out) % 8) + data


def sample(wire: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    if wire == "bool":
        return rng.integers(0, 2, n).astype(np.bool_).reshape(shape)
    if wire == "bf16":  # bfloat16 words of finite float32 values
        words = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return words.reshape(shape)
    dt = np.dtype(NUMPY_DTYPES[wire])
    if dt.kind == "f":
        return rng.standard_normal(n).astype(dt).reshape(shape)
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, n, dtype=dt, endpoint=True).reshape(shape)


def mixed_state() -> dict[str, np.ndarray[Any, Any]]:
    return {
        "conv.weight": sample("f32", (4, 3, 3, 3)),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        "mask": sample("bool", (5,)),
        "emb": sample("bf16", (3, 2)),
        "empty": np.zeros((0, 5), np.float16),
        "fc.bias": sample("f64", (3,)),
        "idx": sample("i8", (3,)),
    }


MIXED_DTYPES = {"emb": "bf16"}


def reject(data: bytes | bytearray, **kwargs: Any) -> str:
    with pytest.raises(TensorDecodeError) as info:
        decode_state(data, **kwargs)
    return info.value.reason


def decode_or_reject(data: bytes, **kwargs: Any) -> DecodedState | None:
    """Decode, or return None on TensorDecodeError; any other exception fails the test."""
    try:
        decoded = decode_state(data, **kwargs)
    except TensorDecodeError:
        return None
    # Whatever decodes is the one encoding of its content.
    assert bytes(encode_state(decoded)) == data
    return decoded


# --------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("wire", list(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_every_dtype_and_shape(wire: str, shape: tuple[int, ...]) -> None:
    array = sample(wire, shape)
    dtypes = {"t": wire} if wire == "bf16" else None
    data = encode_state({"t": array}, dtypes=dtypes)
    decoded = decode_state(data)
    assert list(decoded) == ["t"]
    assert decoded.dtypes == {"t": wire}
    assert decoded.specs() == {"t": TensorSpec(wire, shape)}
    out = decoded["t"]
    assert out.shape == shape
    assert out.dtype == WIRE_DTYPES[wire]
    np.testing.assert_array_equal(out, array)
    assert bytes(encode_state(decoded)) == bytes(data)


def test_layout_matches_the_spec_byte_for_byte() -> None:
    a = np.arange(3, dtype="<f4")
    b = np.array([1, 0], dtype=np.bool_)
    expected = blob(
        [entry(b"a", b"f32", (3,), 0, 12), entry(b"b", b"bool", (2,), 16, 2)],
        a.tobytes() + bytes(4) + b.tobytes(),
    )
    assert bytes(encode_state([("a", a), ("b", b)])) == expected


def test_the_example_in_the_docs() -> None:
    doc = bytes.fromhex(
        "46555354010000000000004800000002"
        "0009 66632e776569676874 03 663332 01 0000000000000002 0000000000000000 0000000000000008"
        "0005 7374657073 03 693634 00 0000000000000008 0000000000000008"
        "00000000 0000803f000000c0 0300000000000000"
    )
    state = {"fc.weight": np.array([1.0, -2.0], np.float32), "steps": np.array(3, np.int64)}
    assert bytes(encode_state(state)) == doc
    assert decode_state(doc).specs() == describe_state(state)


def test_empty_state_round_trips() -> None:
    data = encode_state({})
    assert bytes(data) == blob([])
    assert len(decode_state(data)) == 0


def test_order_is_kept_and_sequences_work() -> None:
    state = mixed_state()
    items = list(reversed(state.items()))
    decoded = decode_state(encode_state(items, dtypes=MIXED_DTYPES))
    assert list(decoded) == [n for n, _ in items]


def test_encoding_is_deterministic_and_canonical() -> None:
    state = mixed_state()
    first = encode_state(state, dtypes=MIXED_DTYPES)
    assert encode_state(state, dtypes=MIXED_DTYPES) == first
    # Byte order and strides of the input do not change the bytes.
    other = {n: np.array(a, dtype=a.dtype.newbyteorder(">"), order="F") for n, a in state.items()}
    assert encode_state(other, dtypes=MIXED_DTYPES) == first
    strided = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    assert encode_state({"s": strided}) == encode_state({"s": strided.copy()})


def test_data_offsets_are_aligned_and_padding_is_zero() -> None:
    data = encode_state(mixed_state(), dtypes=MIXED_DTYPES)
    decoded = decode_state(data)
    base = np.frombuffer(data, np.uint8).ctypes.data
    for array in decoded.values():
        if array.size:
            assert (array.ctypes.data - base) % 8 == 0


def test_views_share_a_writable_buffer_and_respect_read_only_ones() -> None:
    data = encode_state({"w": np.zeros(4, np.float32)})
    decoded = decode_state(data)
    view = decoded["w"]
    assert view.flags.writeable
    view[0] = 2.5
    assert decode_state(bytes(data))["w"][0] == 2.5  # the write went into the buffer
    frozen = decode_state(bytes(data))["w"]
    assert not frozen.flags.writeable
    assert decode_state(memoryview(data))["w"].flags.writeable


def test_describe_state() -> None:
    specs = describe_state(mixed_state(), dtypes=MIXED_DTYPES)
    assert specs["emb"] == TensorSpec("bf16", (3, 2))
    assert specs["bn.num_batches_tracked"] == TensorSpec("i64", ())
    assert specs["conv.weight"].nbytes == 4 * 3 * 3 * 3 * 4
    decoded = decode_state(encode_state(mixed_state(), dtypes=MIXED_DTYPES))
    assert describe_state(decoded) == specs


# --------------------------------------------------------------------------
# encoder misuse is local


@pytest.mark.parametrize(
    ("tensors", "dtypes", "match"),
    [
        ({"c": np.zeros(2, np.complex64)}, None, "cannot travel"),
        ({"u": np.zeros(2, np.uint16)}, None, "cannot travel"),
        ({"o": np.array([object()])}, None, "cannot travel"),
        ({"s": np.array(["x"])}, None, "cannot travel"),
        ({"": np.zeros(2)}, None, "non-empty"),
        ({"\udcff": np.zeros(2)}, None, "not valid Unicode"),
        ({"x" * 257: np.zeros(2)}, None, "max_tensor_name"),
        ({"a": [1.0, 2.0]}, None, "numpy array"),
        ({"a": np.zeros(2, np.float32)}, {"b": "bf16"}, "not given"),
        ({"a": np.zeros(2, np.float32)}, {"a": "bf16"}, "int16/uint16"),
        ({"a": np.zeros(2, np.float32)}, {"a": "f64"}, "does not match"),
        ({"a": np.zeros(2, np.float32)}, {"a": "f128"}, "unknown wire dtype"),
        ({"a": np.zeros((1,) * 9, np.float32)}, None, "max_tensor_rank"),
    ],
)
def test_encoder_refuses_misuse(tensors: Any, dtypes: Any, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        encode_state(tensors, dtypes=dtypes)


def test_encoder_refuses_duplicates_and_limits() -> None:
    with pytest.raises(LocalProtocolError, match="duplicate"):
        encode_state([("a", np.zeros(1)), ("a", np.zeros(1))])
    with pytest.raises(LocalProtocolError, match="max_tensors"):
        encode_state({str(i): np.zeros(1) for i in range(3)}, limits=Limits(max_tensors=2))
    with pytest.raises(LocalProtocolError, match="max_blob_size"):
        encode_state({"a": np.zeros(100)}, limits=Limits(max_blob_size=200))


# --------------------------------------------------------------------------
# truncation, trailing bytes and exactness


def test_every_truncation_is_rejected() -> None:
    data = bytes(encode_state(mixed_state(), dtypes=MIXED_DTYPES))
    assert decode_or_reject(data) is not None
    for cut in range(len(data)):
        reject(data[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"x", bytes(8)])
def test_trailing_bytes_are_rejected(extra: bytes) -> None:
    data = bytes(encode_state(mixed_state(), dtypes=MIXED_DTYPES))
    assert "trailing" in reject(data + extra)
    assert "trailing" in reject(bytes(encode_state({})) + extra)


def test_nonzero_padding_is_rejected() -> None:
    a = np.arange(3, dtype="<f4")
    ok = blob(
        [entry(b"a", b"f32", (3,), 0, 12), entry(b"b", b"u8", (1,), 16, 1)], a.tobytes() + bytes(5)
    )
    assert decode_or_reject(ok) is not None
    between = bytearray(ok)
    between[-2] = 1  # a padding byte between the tensors
    assert "padding before tensor 'b'" in reject(between)
    after_header = blob([entry(b"u", b"u8", (1,), 0, 1)], b"\x07")
    assert (len(after_header) - 1) % 8 == 0
    bad = bytearray(after_header)
    bad[-2] = 1  # the last padding byte after the header
    assert "padding after the header" in reject(bad)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter than"),
        (b"FUSX\x01\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00", "magic"),
        (b"FUST\x02\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00", "version 2"),
        (b"FUST\x01\x00\x01\x00\x00\x00\x00\x04\x00\x00\x00\x00", "reserved"),
        (b"FUST\x01\x00\x00\x00\xff\xff\xff\xff\x00\x00\x00\x00", "header length 4294967295"),
        (b"FUST\x01\x00\x00\x00\x00\x00\x00\x00" + bytes(4), "tensor count"),
        (b"FUST\x01\x00\x00\x00\x00\x00\x00\x05" + bytes(12), "1 unused bytes"),
    ],
)
def test_bad_preamble_and_header(data: bytes, match: str) -> None:
    assert match in reject(data)


def test_field_errors_name_the_tensor() -> None:
    f32x6 = bytes(24)
    cases = [
        (blob([entry(b"fc.weight", b"f32", (2, 3), 0, 24)], bytes(12)),
         "tensor 'fc.weight': 12 bytes of data, shape (2, 3) f32 needs 24"),
        (blob([entry(b"fc.weight", b"f32", (2, 3), 0, 12)], bytes(12)),
         "tensor 'fc.weight': header declares 12 bytes, shape (2, 3) f32 needs 24"),
        (blob([entry(b"w", b"f128", (1,), 0, 16)], bytes(16)), "tensor 'w': unknown dtype 'f128'"),
        (blob([entry(b"w", b"F32", (1,), 0, 4)], bytes(4)), "unknown dtype 'F32'"),
        (blob([entry(b"w", b"\xff", (1,), 0, 1)], bytes(1)), "unknown dtype"),
        (blob([entry(b"w", b"f32", (2, 3), 8, 24)], bytes(8) + f32x6), "data offset 8, expected 0"),
        (blob([entry(b"", b"f32", (), 0, 4)], bytes(4)), "empty name"),
        (blob([entry(b"\xff\xfe", b"f32", (), 0, 4)], bytes(4)), "not valid UTF-8"),
        (blob([entry(b"a", b"u8", (), 0, 1), entry(b"a", b"u8", (), 8, 1)], bytes(9)),
         "duplicate tensor name 'a'"),
        (blob([entry(b"t", b"f32", (1,) * 9, 0, 4)], bytes(4)), "rank 9 exceeds"),
        (blob([entry(b"x" * 257, b"u8", (), 0, 1)], bytes(1)), "max_tensor_name"),
        (blob([], count=4097), "4097 tensors exceed max_tensors"),
        (blob([entry(b"z", b"f32", (0, 2**64 - 1), 0, 0)]), "larger than max_blob_size"),
        (blob([entry(b"b", b"bool", (2,), 0, 2)], b"\x01\x02"), "bool bytes must be 0 or 1"),
    ]  # fmt: skip
    for data, reason in cases:
        assert reason in reject(data)


def test_blob_size_is_checked_first() -> None:
    data = bytes(encode_state({"a": np.zeros(64, np.float32)}))
    reason = reject(b"garbage" * 100, limits=Limits(max_blob_size=64))
    assert "exceeds max_blob_size=64" in reason
    assert decode_state(data, limits=Limits(max_blob_size=len(data)))
    assert "max_blob_size" in reject(data, limits=Limits(max_blob_size=len(data) - 1))


def test_errors_are_remote_protocol_errors_and_take_a_peer() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_state(b"nope")
    named = info.value.with_peer("12D3KooWpeer")
    assert isinstance(named, TensorDecodeError)
    assert str(named).startswith("12D3KooWpeer: ")


def test_non_contiguous_buffer_is_a_local_error() -> None:
    data = encode_state({})
    with pytest.raises(LocalProtocolError):
        decode_state(memoryview(bytes(data) * 2)[::2])


# --------------------------------------------------------------------------
# NaN and Inf


def _bf16(value: float) -> int:
    return int(np.array(value, np.float32).view(np.uint32) >> 16)


@pytest.mark.parametrize("wire", ["f16", "bf16", "f32", "f64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 517, -1])
def test_nan_and_inf_are_rejected(wire: str, bad: float, where: int) -> None:
    array = sample(wire, (1000,))
    array[where] = _bf16(bad) if wire == "bf16" else bad
    data = encode_state({"fc.bias": array}, dtypes={"fc.bias": wire} if wire == "bf16" else None)
    assert reject(data) == "tensor 'fc.bias' contains NaN or Inf"
    with pytest.raises(TensorDecodeError):
        check_finite("fc.bias", array, wire)


def test_inf_and_nan_together_are_rejected() -> None:
    array = np.array([np.inf, -np.inf, 1.0], np.float32)  # inf + -inf is NaN: still caught
    assert "NaN or Inf" in reject(encode_state({"x": array}))


@pytest.mark.parametrize(
    ("wire", "big"),
    [("f16", 65504.0), ("f32", 3.0e38), ("f64", 1.7e308), ("bf16", 3.0e38)],
)
def test_large_finite_values_whose_sum_overflows_are_accepted(wire: str, big: float) -> None:
    values = np.array([big] * 8 + [-1.0, 0.5])
    array = (
        (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        if wire == "bf16"
        else values.astype(NUMPY_DTYPES[wire])
    )
    decoded = decode_state(
        encode_state({"x": array}, dtypes={"x": wire} if wire == "bf16" else None)
    )
    np.testing.assert_array_equal(decoded["x"], array)


def test_integer_tensors_are_not_checked_for_finiteness() -> None:
    check_finite("i", np.array([0x7F80, 0xFFFF], np.uint16), "i16")  # bf16 NaN bits, but ints


# --------------------------------------------------------------------------
# expected specs


def test_expected_specs_accept_the_right_model() -> None:
    state = mixed_state()
    specs = describe_state(state, dtypes=MIXED_DTYPES)
    decoded = decode_state(encode_state(state, dtypes=MIXED_DTYPES), expected=specs)
    assert decoded.specs() == specs


def test_expected_specs_mismatches() -> None:
    good = {"fc.weight": np.zeros((4, 10), np.float32), "fc.bias": np.zeros(4, np.float32)}
    expected = {"fc.weight": TensorSpec("f32", (10, 4)), "fc.bias": TensorSpec("f32", (4,))}
    data = encode_state(good)
    assert reject(data, expected=expected) == (
        "expected tensor 'fc.weight' with shape (10, 4), got (4, 10)"
    )
    expected["fc.weight"] = TensorSpec("f16", (4, 10))
    assert reject(data, expected=expected) == "tensor 'fc.weight': expected dtype f16, got f32"
    expected["fc.weight"] = TensorSpec("f32", (4, 10))
    assert decode_state(data, expected=expected)
    more = dict(expected, extra=TensorSpec("i64", ()))
    assert reject(data, expected=more) == "missing tensors: 'extra'"
    fewer = {"fc.bias": expected["fc.bias"]}
    assert reject(data, expected=fewer) == "unexpected tensors: 'fc.weight'"
    renamed = {"fc.w": expected["fc.weight"], "fc.bias": expected["fc.bias"]}
    assert (
        reject(data, expected=renamed) == "missing tensors: 'fc.w'; unexpected tensors: 'fc.weight'"
    )
    reordered = {"fc.bias": expected["fc.bias"], "fc.weight": expected["fc.weight"]}
    assert reject(data, expected=reordered) == (
        "tensors out of order: expected 'fc.bias' at position 0, got 'fc.weight'"
    )


def test_expected_check_happens_before_data_is_read() -> None:
    # The data holds a NaN, but the shape mismatch is what is reported.
    data = encode_state({"w": np.array([np.nan], np.float32)})
    assert "shape" in reject(data, expected={"w": TensorSpec("f32", (2,))})


def test_long_name_lists_are_shortened() -> None:
    expected = {f"t{i:02}": TensorSpec("u8", ()) for i in range(25)}
    reason = reject(encode_state({}), expected=expected)
    assert reason.endswith("and 15 more")


# --------------------------------------------------------------------------
# hostile input


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    decode_or_reject(data)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_preamble_never_crash(rest: bytes) -> None:
    decode_or_reject(b"FUST\x01\x00\x00\x00" + struct.pack(">I", len(rest) // 2) + rest)


VALID = bytes(encode_state(mixed_state(), dtypes=MIXED_DTYPES))


@FUZZ
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255))
def test_single_byte_mutations_never_crash(pos: int, value: int) -> None:
    mutated = bytearray(VALID)
    mutated[pos] = value
    decode_or_reject(bytes(mutated))


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(1, 16), st.binary(max_size=16))
def test_splices_never_crash(pos: int, cut: int, insert: bytes) -> None:
    decode_or_reject(VALID[:pos] + insert + VALID[pos + cut :])


HUGE = st.one_of(st.integers(0, 8), st.sampled_from([2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]))
U32 = st.one_of(st.integers(0, 8), st.sampled_from([2**16, 2**31, 2**32 - 1]))
DTYPE_NAMES = st.sampled_from([w.encode() for w in WIRE_DTYPES] + [b"f128", b"", b"\x00\xff"])


@st.composite
def hostile_blobs(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 4))
    entries = []
    end = 0
    for i in range(n):
        name = draw(st.one_of(st.just(f"t{i}".encode()), st.binary(max_size=6)))
        dtype = draw(DTYPE_NAMES)
        shape = tuple(draw(st.lists(HUGE, max_size=draw(st.sampled_from([3, 10])))))
        itemsize = (
            WIRE_DTYPES[dtype.decode()].itemsize if dtype.decode("latin-1") in WIRE_DTYPES else 1
        )
        nbytes = itemsize * int(np.prod(shape, dtype=object)) if shape else itemsize
        offset = (end + 7) & -8
        nbytes = draw(st.one_of(st.just(nbytes), HUGE)) % 2**64
        offset = draw(st.one_of(st.just(offset), HUGE)) % 2**64
        entries.append(entry(name, dtype, shape, offset, nbytes))
        end = offset + nbytes
    count = draw(st.one_of(st.none(), U32))
    data = draw(st.binary(max_size=64))
    return blob(entries, data, count=count)


@FUZZ
@given(hostile_blobs())
def test_hostile_headers_never_crash(data: bytes) -> None:
    decode_or_reject(data)
    decode_or_reject(data, limits=Limits(max_blob_size=2**62))


@FUZZ
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8), st.sampled_from(list(WIRE_DTYPES)), max_size=4
    ),
    st.lists(st.integers(0, 3), max_size=3),
)
def test_generated_states_round_trip(names: dict[str, str], shape: list[int]) -> None:
    state = {n: sample(w, tuple(shape), seed=i) for i, (n, w) in enumerate(names.items())}
    dtypes = {n: w for n, w in names.items() if w == "bf16"}
    data = bytes(encode_state(state, dtypes=dtypes))
    decoded = decode_or_reject(data)
    assert decoded is not None
    assert decoded.dtypes == names
    for n, array in state.items():
        np.testing.assert_array_equal(decoded[n], array)


@pytest.mark.parametrize("limits", [Limits(), Limits(max_blob_size=2**62)])
def test_huge_claims_do_not_allocate(limits: Limits) -> None:
    # About 100 bytes that declare a 2**40-element float32 tensor (4 TiB).
    data = blob([entry(b"huge", b"f32", (2**20, 2**20), 0, 4 * 2**40)], bytes(40))
    assert len(data) < 120
    decode_state(encode_state({}))  # warm up imports and caches
    tracemalloc.start()
    try:
        reason = reject(data, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "tensor 'huge'" in reason
    assert peak < 64 * 1024
