"""What a ring blob carries: federation metadata plus the encoded tensors (framing only).

A blob's bytes (see ``docs/protocol-blob.md``) are, for ring training::

    "FUHP" | u8 version (4) | 3 zero bytes | u32 BE length M | u32 BE length P
           | M bytes of CBOR meta | P bytes of provenance
           | zero bytes up to the next multiple of 8 | state

``meta`` is a strict-CBOR map::

    {"ring": {...},          ; the learning layer's metadata (fedup.learn.ring.RingMeta)
     "view": bstr(32),       ; the digest of the view the run trains under
     "chain": [bstr, ...],   ; the dead notices (fedup.protocol.notices), in order
     "origin": bstr(38) / null,   ; a final model: the member whose hop ended the run
     "seal": bstr / null}         ; a final model: the origin's seal of its content

``provenance`` is the part of the chain of signed hop statements
(:mod:`fedup.protocol.provenance`) that the receiver has not seen: the statements
after its own last one, fewer than a lap of the ring between live members, the
whole chain at most (``Limits.max_provenance_hops`` statements: a final model to
a member counted as dead long ago), so it lies outside the CBOR metadata (bounded
by ``Limits.max_message_size``) and is checked statement by statement.  (Version 3
carried the whole chain in every blob.)

``state`` is the model-state encoding of ``docs/protocol-tensors.md``.  The whole
blob is covered by the signed digest of the blob layer, so the metadata is as
authenticated as the weights; the *content* of a state (the ``ring`` metadata's
CBOR and the state, :func:`content_digest`) is what every hop statement names as
received and sent, and what the origin of a final model seals, so members that
hand a model on cannot change it.

This module only splits and joins the parts; :mod:`fedup.learn.ring_payload`
decodes the tensors against the model and the ring metadata.
"""

from __future__ import annotations

import hashlib

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.notices import MAX_SIGNED_SIZE
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.provenance import max_chain_bytes
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import max_chain_notices
from fedup.protocol.schema import FieldReader, MessageError

MAGIC = b"FUHP"
VERSION = 4
_PREAMBLE = 16
DIGEST_SIZE = 32


class PayloadError(RemoteProtocolError):
    """A ring blob's framing or metadata is malformed."""

    code = RefusalCode.MALFORMED


@attrs.frozen
class HopPayload:
    """A split ring blob: metadata and a view of the encoded tensors."""

    ring: object
    """The learning layer's metadata (a decoded CBOR map; not yet checked)."""
    view: bytes
    chain: tuple[bytes, ...]
    origin: PeerId | None
    seal: bytes | None
    state: memoryview
    """The model-state bytes (a view into the received buffer, writable if it was)."""
    provenance: bytes | memoryview = b""
    """The chain of hop statements (a view into the received buffer; not yet checked)."""

    @property
    def content(self) -> bytes:
        """The content digest: what hop statements name and a final model's origin seals
        (computed on demand)."""
        return content_digest(cbor.encode(self.ring), self.state)


def content_digest(ring_cbor: bytes | memoryview, state: bytes | memoryview) -> bytes:
    """BLAKE2b-256 over the ring metadata's CBOR and the state bytes (length-prefixed)."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"fedup-content")
    h.update(len(ring_cbor).to_bytes(8, "big"))
    h.update(ring_cbor)
    h.update(state)
    return h.digest()


def payload_prefix(
    ring: object,
    *,
    view: bytes,
    chain: tuple[bytes, ...] = (),
    origin: PeerId | None = None,
    seal: bytes | None = None,
    provenance: bytes | memoryview = b"",
) -> tuple[bytes, bytes]:
    """The bytes before the state (8-byte aligned) and the ring metadata's CBOR.

    The caller encodes the state behind them into the same buffer (one copy:
    :func:`fedup.learn.weights.state_to_bytes` with ``prefix=``).  ``ring`` may be
    a :class:`~fedup.protocol.cbor.Encoded` item (the metadata's CBOR, made by
    :func:`~fedup.protocol.cbor.encode` once for its content digest too).
    """
    ring_cbor = ring.data if isinstance(ring, cbor.Encoded) else cbor.encode(ring)
    meta = cbor.encode(
        {
            "ring": cbor.Encoded(ring_cbor),
            "view": view,
            "chain": list(chain),
            "origin": origin.raw if origin is not None else None,
            "seal": seal,
        }
    )
    size = len(meta) + len(provenance)
    head = b"".join(
        (
            MAGIC,
            bytes([VERSION, 0, 0, 0]),
            len(meta).to_bytes(4, "big"),
            len(provenance).to_bytes(4, "big"),
            meta,
            provenance,
            bytes(-(_PREAMBLE + size) % 8),
        )
    )
    return head, ring_cbor


def decode_payload(
    data: bytearray | bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> HopPayload:
    """Split and check a blob's bytes; raises :class:`PayloadError` naming the problem."""
    if len(data) < _PREAMBLE or bytes(data[:4]) != MAGIC:
        raise PayloadError("ring blob does not start with FUHP")
    if data[4] != VERSION or bytes(data[5:8]) != b"\0\0\0":
        raise PayloadError(f"ring blob version {data[4]} is not supported (this peer: {VERSION})")
    size = int.from_bytes(data[8:12], "big")
    if size > limits.max_message_size or size > len(data) - _PREAMBLE:
        raise PayloadError(f"ring blob metadata of {size} bytes does not fit")
    chain_size = int.from_bytes(data[12:16], "big")
    if chain_size > max_chain_bytes(limits) or chain_size > len(data) - _PREAMBLE - size:
        raise PayloadError(
            f"ring blob provenance of {chain_size} bytes does not fit (Limits.max_provenance_hops)"
        )
    view = memoryview(data)
    meta = view[_PREAMBLE : _PREAMBLE + size]
    end = _PREAMBLE + size + chain_size
    provenance = view[_PREAMBLE + size : end]
    start = end + (-end % 8)
    if start > len(data) or any(view[end:start]):
        raise PayloadError("ring blob metadata is not followed by its zero padding")
    try:
        f = FieldReader(
            cbor.decode(meta, max_size=limits.max_message_size, max_depth=limits.max_cbor_depth),
            "ring blob metadata",
        )
        ring = f.raw("ring")
        digest = f.bytestr("view", size=DIGEST_SIZE)
        chain = f.array(
            "chain", _notice_item, max_items=max_chain_notices(limits.max_members, limits)
        )
        origin = (
            PeerId.from_bytes(f.bytestr("origin", size=RAW_SIZE)) if f.optional("origin") else None
        )
        seal = f.bytestr("seal", max_size=MAX_SIGNED_SIZE) if f.optional("seal") else None
        f.done()
    except RemoteProtocolError as exc:
        raise PayloadError(exc.reason) from None
    return HopPayload(ring, digest, tuple(chain), origin, seal, view[start:], provenance)


def _notice_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > MAX_SIGNED_SIZE:
        raise MessageError(f"{label} must be a signed notice of at most {MAX_SIGNED_SIZE} bytes")
    return value
