from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedup.identity import Identity
from fedup.protocol.peer_id import PeerId, PeerIdError, b58decode, b58encode

# Cross-implementation vector (rust-libp2p keypair test): seed -> public key -> peer ID.
SEED = bytes.fromhex("7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d")
PUBKEY = bytes.fromhex("1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
PEER_TEXT = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_libp2p_vector() -> None:
    ident = Identity(SEED)
    assert ident.public_key == PUBKEY
    assert ident.peer_id.text == PEER_TEXT
    assert (
        ident.peer_id.raw.hex()
        == "0024080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
    )
    assert PeerId.from_text(PEER_TEXT) == ident.peer_id
    assert PeerId.from_text(PEER_TEXT).public_key == PUBKEY


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=20, unique=True))
def test_text_order_equals_byte_order(keys: list[bytes]) -> None:
    ids = [PeerId.from_public_key(k) for k in keys]
    assert all(len(p.text) == 52 for p in ids)
    assert sorted(p.text for p in ids) == [p.text for p in sorted(ids)]
    assert sorted(ids, key=lambda p: p.raw) == sorted(ids)


def test_extreme_keys_keep_52_characters() -> None:
    for key in (b"\0" * 32, b"\xff" * 32):
        assert len(PeerId.from_public_key(key).text) == 52


@given(st.binary(max_size=64))
def test_base58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize(
    "text",
    [
        "",
        PEER_TEXT[:-1],
        PEER_TEXT + "1",
        PEER_TEXT[:-1] + "0",  # '0' is not base58
        PEER_TEXT[:-1] + "l",  # nor 'l'
        "1" * 52,
        "z" * 52,
    ],
)
def test_bad_text_rejected(text: str) -> None:
    with pytest.raises(PeerIdError):
        PeerId.from_text(text)


def test_bad_bytes_rejected() -> None:
    raw = PeerId.from_text(PEER_TEXT).raw
    for bad in (raw[:-1], raw + b"\0", b"\x01" + raw[1:], b"\0\x24\x08\x02" + raw[4:]):
        with pytest.raises(PeerIdError):
            PeerId.from_bytes(bad)
    with pytest.raises(PeerIdError):
        PeerId.from_public_key(b"\0" * 31)


def test_ordering_and_hash() -> None:
    ids = [PeerId.from_public_key(random.Random(i).randbytes(32)) for i in range(10)]
    assert len(set(ids)) == 10
    assert min(ids) == sorted(ids)[0]
    assert ids[0] == PeerId.from_bytes(ids[0].raw)
    assert str(ids[0]) == ids[0].text and ids[0].short.endswith(ids[0].text[-8:])
