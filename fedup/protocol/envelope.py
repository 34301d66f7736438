"""Signed envelopes with domain separation (after libp2p RFC 0002).

An envelope carries a public key, a payload type, the payload bytes and a
signature.  The signature covers, each prefixed by its length as an unsigned
LEB128 varint::

    domain || payload_type || payload

The domain string is never sent: the verifier supplies the domain it expects,
so a signature made for one purpose (a peer record) cannot be replayed as
another (a membership view).  We sign the exact payload bytes we send and
verify those bytes, never a re-encoding.

On the wire an envelope is a CBOR map::

    {"key": bstr .size 32, "type": tstr, "payload": bstr, "sig": bstr .size 64}

:func:`open_envelope` checks, in this order: the size, the envelope's shape,
the expected payload type, the signature (with the expected domain).  Only
then may the caller decode the payload, check that the peer ID matches the
key, and check freshness (see :mod:`fedup.protocol.records`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import nacl.exceptions
import nacl.signing

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.peer_id import PUBLIC_KEY_SIZE, PeerId
from fedup.protocol.schema import FieldReader

SIGNATURE_SIZE = 64
_MAX_TYPE = 64


class Signer(Protocol):
    """What signing needs of an identity (:class:`fedup.identity.Identity` fits)."""

    @property
    def peer_id(self) -> PeerId: ...

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


class SignatureError(RemoteProtocolError):
    """A signature did not verify (forged, tampered, or made for another domain)."""


def uvarint(n: int) -> bytes:
    """Encode a non-negative integer as an unsigned LEB128 varint."""
    if n < 0:
        raise LocalProtocolError("uvarint of a negative number")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def signed_bytes(domain: bytes, payload_type: bytes, payload: bytes) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return b"".join(
        (
            uvarint(len(domain)),
            domain,
            uvarint(len(payload_type)),
            payload_type,
            uvarint(len(payload)),
            payload,
        )
    )


@attrs.frozen
class Envelope:
    """A verified envelope: whoever holds ``public_key`` signed ``payload``."""

    public_key: bytes
    """The signer's 32-byte Ed25519 public key."""
    payload_type: str
    """What the payload is, e.g. ``fedup/peer-record/1``."""
    payload: bytes
    """The signed payload bytes, exactly as sent."""
    signature: bytes
    """The 64-byte Ed25519 signature."""

    @property
    def signer(self) -> PeerId:
        """The peer ID derived from the signing key."""
        return PeerId.from_public_key(self.public_key)

    def to_cbor(self) -> bytes:
        return cbor.encode(
            {
                "key": self.public_key,
                "type": self.payload_type,
                "payload": self.payload,
                "sig": self.signature,
            }
        )


def seal_envelope(
    sign: Callable[[bytes], bytes],
    public_key: bytes,
    *,
    domain: str,
    payload_type: str,
    payload: bytes,
) -> Envelope:
    """Sign ``payload`` under ``domain`` with ``sign`` (e.g. ``Identity.sign``)."""
    message = signed_bytes(domain.encode(), payload_type.encode(), payload)
    signature = sign(message)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise LocalProtocolError("sign() must return a 64-byte signature")
    return Envelope(bytes(public_key), payload_type, bytes(payload), signature)


def open_envelope(
    data: bytes | bytearray | memoryview,
    *,
    domain: str,
    payload_type: str,
    max_size: int,
) -> Envelope:
    """Decode and verify an envelope received from outside.

    Raises :class:`~fedup.protocol.cbor.CBORDecodeError` for bytes that are not
    strict CBOR or exceed ``max_size``, :class:`~fedup.protocol.schema.MessageError`
    for a map of the wrong shape or an unexpected payload type, and
    :class:`SignatureError` when the signature does not verify for ``domain``.
    """
    if len(data) > max_size:
        raise cbor.CBORDecodeError(f"envelope of {len(data)} bytes exceeds the limit of {max_size}")
    fields = FieldReader(cbor.decode(data, max_size=max_size, max_depth=1), "envelope")
    key = fields.bytestr("key", size=PUBLIC_KEY_SIZE)
    ptype = fields.text("type", max_bytes=_MAX_TYPE)
    payload = fields.bytestr("payload", max_size=max_size)
    sig = fields.bytestr("sig", size=SIGNATURE_SIZE)
    fields.done()
    if ptype != payload_type:
        raise fields.fail("type", f"is {ptype!r}, expected {payload_type!r}")
    message = signed_bytes(domain.encode(), ptype.encode(), payload)
    try:
        nacl.signing.VerifyKey(key).verify(message, sig)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise SignatureError(f"bad signature on {payload_type} envelope") from exc
    return Envelope(key, ptype, payload, sig)
