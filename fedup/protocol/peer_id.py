"""Peer IDs: who a peer is, derived from its Ed25519 public key.

We follow libp2p's peer-ID rule for Ed25519 keys so that our IDs look and
behave like libp2p's (``12D3KooW...``):

* the public key is wrapped in libp2p's ``PublicKey`` protobuf
  (``08 01 12 20`` + 32 key bytes: type Ed25519, data of length 32);
* those 36 bytes are short enough for the *identity* multihash
  (``00 24`` + the protobuf), so the 38-byte peer ID *contains* the key;
* the text form is base58btc of the 38 bytes: always 52 characters.

base58btc's alphabet is in ASCII order and every Ed25519 peer ID has the same
byte length and text length, so sorting text IDs sorts the raw bytes: every
peer derives the same ring from the same set of IDs.

A peer ID is only ever trusted after a signature made with the key inside it
has been verified (see :mod:`fedup.protocol.envelope`).
"""

from __future__ import annotations

import functools

import attrs

from fedup.errors import RemoteProtocolError

PUBLIC_KEY_SIZE = 32
_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
RAW_SIZE = len(_PREFIX) + PUBLIC_KEY_SIZE  # 38
TEXT_SIZE = 52

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}


class PeerIdError(RemoteProtocolError):
    """Bytes or text that are not a valid Ed25519 peer ID."""


def b58encode(data: bytes) -> str:
    """Encode bytes as base58btc (leading zero bytes become ``'1'``)."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Decode base58btc; raises :class:`PeerIdError` on a character outside the alphabet."""
    n = 0
    for c in text:
        digit = _INDEX.get(c)
        if digit is None:
            raise PeerIdError(f"{c!r} is not a base58btc character")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


@functools.total_ordering
@attrs.frozen(eq=True, order=False, repr=False, cache_hash=True)
class PeerId:
    """A peer's identity: the 38-byte identity multihash of its public key.

    Ordering compares the raw bytes, which is also the order of the text form.
    """

    raw: bytes

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        """Derive the peer ID of a 32-byte Ed25519 public key."""
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise PeerIdError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
        return cls(_PREFIX + bytes(public_key))

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerId:
        """Parse the 38-byte binary form; raises :class:`PeerIdError`."""
        if len(raw) != RAW_SIZE or not raw.startswith(_PREFIX):
            raise PeerIdError("not an Ed25519 identity-multihash peer ID")
        return cls(bytes(raw))

    @classmethod
    def from_text(cls, text: str) -> PeerId:
        """Parse the base58btc text form (52 characters); raises :class:`PeerIdError`."""
        if len(text) != TEXT_SIZE:
            raise PeerIdError(f"a peer ID has {TEXT_SIZE} characters, got {len(text)}")
        peer = cls.from_bytes(b58decode(text))
        if peer.text != text:  # rejects non-canonical spellings
            raise PeerIdError("peer ID text is not in canonical base58btc form")
        return peer

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key embedded in this ID."""
        return self.raw[len(_PREFIX) :]

    @functools.cached_property
    def text(self) -> str:
        """The base58btc text form, e.g. ``12D3KooW...`` (52 characters)."""
        return b58encode(self.raw)

    @property
    def short(self) -> str:
        """A short form for logs and tables: the last 8 characters of the text."""
        return "…" + self.text[-8:]

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"PeerId({self.text!r})"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return self.raw < other.raw
