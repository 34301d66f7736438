"""Ring blob framing (version 4): the preamble, the CBOR meta, the provenance, the padding
and the state."""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.notices import MAX_SIGNED_SIZE
from fedup.protocol.payload import (
    MAGIC,
    VERSION,
    HopPayload,
    PayloadError,
    content_digest,
    decode_payload,
    payload_prefix,
)
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import max_chain_notices

ORIGIN = Identity(b"\x07" * 32).peer_id
VIEW = hashlib.sha256(b"view").digest()
RING = {"v": 1, "lap": 2, "hop": 0, "loss": 0.25, "history": [[1, 0.5], [2, 0.25]]}
CHAIN = (b"notice-0" * 10, b"notice-1" * 12)
SEAL = b"s" * 100
STATE = bytes(range(40)) * 3


def blob(
    ring: object = RING, state: bytes = STATE, **kw: Any
) -> tuple[bytes, bytes]:  # (whole blob, the prefix)
    prefix, _ = payload_prefix(ring, view=kw.pop("view", VIEW), **kw)
    return prefix + state, prefix


def framed(
    meta: bytes, state: bytes = b"", *, version: int = VERSION, provenance: bytes = b""
) -> bytes:
    """A blob around raw meta bytes (which payload_prefix would never write)."""
    head = b"".join(
        (
            MAGIC,
            bytes([version, 0, 0, 0]),
            len(meta).to_bytes(4, "big"),
            len(provenance).to_bytes(4, "big"),
            meta,
            provenance,
        )
    )
    return head + bytes(-len(head) % 8) + state


def meta_map(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "ring": RING,
        "view": VIEW,
        "chain": list(CHAIN),
        "origin": ORIGIN.raw,
        "seal": SEAL,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not _DROP}


_DROP = object()


# --------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_round_trip_with_every_field(kind: Any) -> None:
    data, prefix = blob(chain=CHAIN, origin=ORIGIN, seal=SEAL)
    assert len(prefix) % 8 == 0
    got = decode_payload(kind(data))
    assert got.ring == RING
    assert (got.view, got.chain, got.origin, got.seal) == (VIEW, CHAIN, ORIGIN, SEAL)
    assert bytes(got.state) == STATE
    assert isinstance(got.state, memoryview)


def test_defaults_are_a_model_in_training() -> None:
    data, _ = blob()
    got = decode_payload(data)
    assert (got.chain, got.origin, got.seal) == ((), None, None)
    meta = cbor.decode(data[16 : 16 + int.from_bytes(data[8:12], "big")], max_size=1 << 16,
                       max_depth=8)  # fmt: skip
    assert meta == {"ring": RING, "view": VIEW, "chain": [], "origin": None, "seal": None}
    assert bytes(got.provenance) == b""


def test_preamble_layout() -> None:
    data, prefix = blob(provenance=b"hops")
    assert data[:4] == b"FUHP" and data[4] == 4 and data[5:8] == b"\0\0\0"
    size = int.from_bytes(data[8:12], "big")
    assert int.from_bytes(data[12:16], "big") == 4
    assert data[16 + size : 20 + size] == b"hops"
    assert 20 + size <= len(prefix) < 20 + size + 8
    assert not any(prefix[20 + size :])


@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_the_provenance_section_round_trips_as_a_view(kind: Any) -> None:
    hops = bytes(range(256)) * 3
    data, _ = blob(provenance=hops, chain=CHAIN)
    got = decode_payload(kind(data))
    assert bytes(got.provenance) == hops and isinstance(got.provenance, memoryview)
    assert got.chain == CHAIN and bytes(got.state) == STATE
    assert got.content == decode_payload(blob()[0]).content  # the chain is not content


def test_a_provenance_section_beyond_its_limit_or_the_data() -> None:
    hops = b"h" * 600
    data, _ = blob(provenance=hops, state=b"")
    tiny = attrs.evolve(DEFAULT_LIMITS, max_provenance_hops=1)  # 514 bytes at most
    refused(data, "provenance of 600 bytes does not fit", limits=tiny)
    assert bytes(decode_payload(data).provenance) == hops
    size = int.from_bytes(data[8:12], "big")
    for claim in (len(data) - 16 - size + 1, 2**32 - 1):
        refused(data[:12] + claim.to_bytes(4, "big") + data[16:], "does not fit")


def test_state_is_a_view_into_the_buffer() -> None:
    data, prefix = blob()
    buf = bytearray(data)
    got = decode_payload(buf)
    assert not got.state.readonly
    got.state[0] = 0xEE
    assert buf[len(prefix)] == 0xEE


def test_empty_state_and_trailing_bytes_belong_to_the_state() -> None:
    data, _ = blob(state=b"")
    assert bytes(decode_payload(data).state) == b""
    assert bytes(decode_payload(data + b"garbage").state) == b"garbage"


def test_prefix_returns_the_ring_cbor_and_is_deterministic() -> None:
    prefix, ring_cbor = payload_prefix(RING, view=VIEW, chain=CHAIN, origin=ORIGIN, seal=SEAL)
    assert ring_cbor == cbor.encode(RING)
    assert payload_prefix(RING, view=VIEW, chain=CHAIN, origin=ORIGIN, seal=SEAL)[0] == prefix
    assert payload_prefix(RING, view=VIEW)[0] != prefix


def test_padding_to_eight_for_every_meta_length() -> None:
    for n in range(20):
        ring = {"pad": "x" * n}
        data, prefix = blob(ring=ring, state=b"12345678")
        assert len(prefix) % 8 == 0
        got = decode_payload(data)
        assert got.ring == ring and bytes(got.state) == b"12345678"


# --------------------------------------------------------------------------
# content digest


def test_content_digest_is_stable_and_sensitive() -> None:
    ring_cbor = cbor.encode(RING)
    base = content_digest(ring_cbor, STATE)
    assert len(base) == 32
    assert content_digest(ring_cbor, STATE) == base
    assert content_digest(memoryview(ring_cbor), memoryview(STATE)) == base
    assert content_digest(cbor.encode({**RING, "lap": 3}), STATE) != base
    assert content_digest(ring_cbor, STATE[:-1] + b"\xff") != base
    assert content_digest(ring_cbor, STATE + b"\0") != base
    # the metadata's length is part of it: moving a byte across the boundary changes it
    assert content_digest(b"ab", b"c") != content_digest(b"a", b"bc")
    assert base != hashlib.blake2b(ring_cbor + STATE, digest_size=32).digest()


def test_content_depends_only_on_ring_and_state() -> None:
    a = decode_payload(blob()[0])
    b = decode_payload(blob(chain=CHAIN, origin=ORIGIN, seal=SEAL, view=b"w" * 32)[0])
    assert isinstance(a, HopPayload)
    assert a.content == b.content == content_digest(cbor.encode(RING), STATE)
    assert decode_payload(blob(ring={**RING, "hop": 1})[0]).content != a.content
    assert decode_payload(blob(state=STATE[::-1])[0]).content != a.content


# --------------------------------------------------------------------------
# refusals


def refused(data: bytes | bytearray, match: str | None, **kw: Any) -> PayloadError:
    with pytest.raises(PayloadError, match=match) as info:
        decode_payload(data, **kw)
    assert info.value.code is RefusalCode.MALFORMED
    assert isinstance(info.value, RemoteProtocolError)
    return info.value


def test_wrong_magic() -> None:
    data, _ = blob()
    refused(b"FUST" + data[4:], "does not start with FUHP")
    refused(b"", "does not start with FUHP")
    refused(MAGIC + bytes(7), "does not start with FUHP")  # shorter than the preamble


@pytest.mark.parametrize("version", [0, 1, 2, 3, 255])
def test_wrong_version(version: int) -> None:
    data, _ = blob()
    refused(data[:4] + bytes([version]) + data[5:], f"version {version} is not supported")


@pytest.mark.parametrize("at", [5, 6, 7])
def test_reserved_bytes_must_be_zero(at: int) -> None:
    data = bytearray(blob()[0])
    data[at] = 1
    refused(data, "not supported")


def test_meta_length_beyond_the_data() -> None:
    data, _ = blob(state=b"")
    size = int.from_bytes(data[8:12], "big")
    for claim in (size + 1000, 2**32 - 1, len(data) - 16 + 1):
        refused(data[:8] + claim.to_bytes(4, "big") + data[12:], "does not fit")


def test_meta_length_beyond_max_message_size() -> None:
    big_ring = {"blob": b"x" * 5000}
    data, _ = blob(ring=big_ring)
    assert decode_payload(data).ring == big_ring
    small = attrs.evolve(DEFAULT_LIMITS, max_message_size=4096)
    refused(data, "does not fit", limits=small)


def test_padding_must_be_zero() -> None:
    data, prefix = blob()
    size = int.from_bytes(data[8:12], "big")
    assert len(prefix) > 16 + size, "this meta needs padding"
    for at in range(16 + size, len(prefix)):
        bad = bytearray(data)
        bad[at] = 1
        refused(bad, "zero padding")


def test_a_chain_item_over_the_signed_size() -> None:
    ok, _ = blob(chain=(b"n" * MAX_SIGNED_SIZE,))
    assert decode_payload(ok).chain == (b"n" * MAX_SIGNED_SIZE,)
    data, _ = blob(chain=(b"n" * (MAX_SIGNED_SIZE + 1),))
    refused(data, rf"chain\[0\] must be a signed notice of at most {MAX_SIGNED_SIZE} bytes")


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (meta_map(extra=1), "unknown field"),
        (meta_map(ring=_DROP), "missing field 'ring'"),
        (meta_map(view=_DROP), "missing field 'view'"),
        (meta_map(chain=_DROP), "missing field 'chain'"),
        (meta_map(view=b"v" * 31), "'view' must be 32 bytes"),
        (meta_map(view="text"), "'view' must be a byte string"),
        (meta_map(chain="notices"), "'chain' must be an array"),
        (meta_map(chain=[b"ok", 5]), r"chain\[1\]"),
        (
            meta_map(chain=[b"n"] * (max_chain_notices(DEFAULT_LIMITS.max_members) + 1)),
            "'chain' must have",
        ),
        (meta_map(origin=b"o" * 38), "peer ID"),
        (meta_map(origin=ORIGIN.raw[:-1]), "'origin' must be 38 bytes"),
        (meta_map(seal=b"s" * (MAX_SIGNED_SIZE + 1)), "'seal' must be at most"),
        (meta_map(seal=7), "'seal' must be a byte string"),
    ],
)
def test_bad_meta_fields(meta: dict[str, Any], match: str) -> None:
    refused(framed(cbor.encode(meta)), match)


def test_optional_fields_may_be_absent_or_null() -> None:
    got = decode_payload(framed(cbor.encode(meta_map(origin=_DROP, seal=_DROP)), b"xy"))
    assert (got.origin, got.seal, bytes(got.state)) == (None, None, b"xy")
    got = decode_payload(framed(cbor.encode(meta_map(origin=None, seal=None))))
    assert (got.origin, got.seal) == (None, None)


@pytest.mark.parametrize(
    "meta",
    [b"", b"\xff", cbor.encode([1, 2]), cbor.encode("ring"), cbor.encode(meta_map()) + b"\0"],
)
def test_meta_that_is_not_one_cbor_map(meta: bytes) -> None:
    refused(framed(meta), None)


def test_meta_nested_beyond_the_depth_limit() -> None:
    raw = b"\x81" * (DEFAULT_LIMITS.max_cbor_depth + 2) + b"\x01"  # [[[...[1]...]]]
    meta = b"\xa1\x64ring" + raw  # {"ring": that}
    refused(framed(meta), "deep")


# --------------------------------------------------------------------------
# whole, split, garbage


def test_every_truncation_inside_the_prefix_is_refused() -> None:
    data, prefix = blob(chain=CHAIN, origin=ORIGIN, seal=SEAL, provenance=b"hops" * 5)
    for cut in range(len(prefix)):
        with pytest.raises(PayloadError):
            decode_payload(data[:cut])
    for cut in range(len(prefix), len(data) + 1, 7):  # a cut in the state cuts the state
        assert bytes(decode_payload(data[:cut]).state) == data[len(prefix) : cut]


def test_every_single_byte_change_in_the_prefix_is_refused_or_harmless() -> None:
    data, prefix = blob(chain=CHAIN, origin=ORIGIN, seal=SEAL, provenance=b"hops" * 5)
    for at in range(len(prefix)):
        for value in (0x00, 0xFF, data[at] ^ 0x01):
            bad = bytearray(data)
            bad[at] = value
            try:
                got = decode_payload(bad)
            except PayloadError:
                continue
            assert len(got.view) == 32 and bytes(got.state) == STATE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_payload(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 300))
def test_random_meta_behind_a_valid_preamble(meta: bytes, claim: int) -> None:
    data = MAGIC + bytes([VERSION, 0, 0, 0]) + claim.to_bytes(4, "big") + bytes(4) + meta
    try:
        got = decode_payload(data)
    except PayloadError:
        return
    assert len(got.view) == 32


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-10, 2**40)
    | st.binary(max_size=40)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["ring", "view", "chain", "origin", "seal", "x"]),
        cbor_values | st.sampled_from([VIEW, ORIGIN.raw, [b"n"], SEAL]),
    ),
    st.booleans(),
)
def test_hostile_meta_maps(fields: dict[str, object], start_valid: bool) -> None:
    meta = meta_map() if start_valid else {}
    meta.update(fields)
    data = framed(cbor.encode(meta), b"state")
    try:
        got = decode_payload(data)
    except PayloadError:
        return
    assert len(got.view) == 32 and bytes(got.state) == b"state"
    assert all(isinstance(n, bytes) and len(n) <= MAX_SIGNED_SIZE for n in got.chain)
