"""What a ring blob carries: federation metadata plus the encoded tensors.

A blob's bytes (see ``docs/protocol-blob.md``) are, for ring training::

    "FUHP" | u8 version (1) | 3 zero bytes | u32 BE length M | M bytes of CBOR meta | state

``meta`` is a strict-CBOR map: ``{"ring": {...}, "dead": [bstr(38), ...], "origin":
bstr(38) / null}``: the learning layer's ring metadata (checked by
``fedup.learn.ring.RingMeta.from_dict``), the members known to be dead (so the
ring heals as the blob travels), and for the final model the member that started its
distribution.  ``state`` is the model-state encoding of ``docs/protocol-tensors.md``.
The whole blob is covered by the signed digest of the blob layer, so the metadata is
as authenticated as the weights.
"""

from __future__ import annotations

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader, MessageError

MAGIC = b"FUHP"
VERSION = 1
_PREAMBLE = 12


class PayloadError(RemoteProtocolError):
    """A ring blob's framing or metadata is malformed."""


@attrs.frozen
class HopPayload:
    """A decoded ring blob: metadata and a view of the encoded tensors."""

    ring: object
    """The learning layer's metadata (a decoded CBOR map; not yet checked)."""
    dead: frozenset[PeerId]
    origin: PeerId | None
    state: memoryview
    """The model-state bytes (a view into the received buffer, writable if it was)."""


def encode_payload(
    ring: object, dead: frozenset[PeerId], origin: PeerId | None, state: bytes | memoryview
) -> bytearray:
    """Build a blob's bytes from metadata and encoded tensors."""
    meta = cbor.encode(
        {
            "ring": ring,
            "dead": [p.raw for p in sorted(dead)],
            "origin": origin.raw if origin is not None else None,
        }
    )
    out = bytearray(MAGIC)
    out += bytes([VERSION, 0, 0, 0])
    out += len(meta).to_bytes(4, "big")
    out += meta
    out += state
    return out


def decode_payload(
    data: bytearray | bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS
) -> HopPayload:
    """Split and check a blob's bytes; raises :class:`PayloadError` naming the problem."""
    if len(data) < _PREAMBLE or bytes(data[:4]) != MAGIC:
        raise PayloadError("ring blob does not start with FUHP")
    if data[4] != VERSION or bytes(data[5:8]) != b"\0\0\0":
        raise PayloadError(f"ring blob version {data[4]} is not supported")
    size = int.from_bytes(data[8:12], "big")
    if size > limits.max_message_size or size > len(data) - _PREAMBLE:
        raise PayloadError(f"ring blob metadata of {size} bytes does not fit")
    view = memoryview(data)
    try:
        f = FieldReader(
            cbor.decode(
                view[_PREAMBLE : _PREAMBLE + size],
                max_size=limits.max_message_size,
                max_depth=limits.max_cbor_depth,
            ),
            "ring blob metadata",
        )
        ring = f.raw("ring")
        dead = f.array("dead", _peer_item, max_items=limits.max_members)
        origin = (
            PeerId.from_bytes(f.bytestr("origin", size=RAW_SIZE)) if f.optional("origin") else None
        )
        f.done()
    except RemoteProtocolError as exc:
        raise PayloadError(exc.reason) from None
    return HopPayload(ring, frozenset(dead), origin, view[_PREAMBLE + size :])


def _peer_item(value: object, label: str) -> PeerId:
    if not isinstance(value, bytes):
        raise MessageError(f"{label} must be a peer ID")
    return PeerId.from_bytes(value)
