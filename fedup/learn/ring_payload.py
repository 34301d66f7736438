"""The ring blob codec: a :class:`~fedup.learn.ring.RingState` to bytes and back, checked.

Encoding copies the tensors once, into one buffer behind the payload's framing
(:func:`fedup.protocol.payload.payload_prefix`).  Decoding views the received
buffer (no copy when it is writable, as the blob receiver's is) and checks the
tensors once against the expected layout (names, order, dtypes, shapes: the
``template``, :func:`fedup.learn.ring.initial_state`), then their values
(:func:`state_problem`: finite, and within ``Limits.max_weight_magnitude``).

Every failure is a :class:`~fedup.errors.RemoteProtocolError` with a ``code``
(:class:`~fedup.protocol.refusal.RefusalCode`) the receiver sends back.
"""

from __future__ import annotations

import math

import attrs
import torch

from fedup.config import Limits
from fedup.learn.ring import RingMeta, RingState, RingStateError
from fedup.learn.weights import bytes_to_state, state_to_bytes
from fedup.protocol.payload import content_digest, decode_payload, payload_prefix
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.tensors import TensorDecodeError

__all__ = ["BadStateError", "RingBlob", "decode_ring_blob", "encode_ring_blob", "state_problem"]


class BadStateError(RingStateError):
    """A ring state whose tensors do not fit the model or whose values are out of bounds."""

    code = RefusalCode.BAD_STATE


class BadMetaError(RingStateError):
    code = RefusalCode.BAD_META


@attrs.frozen(eq=False)
class RingBlob:
    """A decoded and checked ring blob."""

    state: RingState
    view: bytes
    chain: tuple[bytes, ...]
    origin: PeerId | None
    seal: bytes | None
    content: bytes
    """The content digest (what a final model's seal covers)."""


def encode_ring_blob(
    state: RingState,
    *,
    view: bytes,
    chain: tuple[bytes, ...] = (),
    origin: PeerId | None = None,
    seal: bytes | None = None,
    limits: Limits,
) -> tuple[memoryview, bytes]:
    """The blob's bytes (one copy of the tensors) and its content digest."""
    prefix, ring_cbor = payload_prefix(
        state.meta.to_dict(), view=view, chain=chain, origin=origin, seal=seal
    )
    data = state_to_bytes(state.tensors, limits=limits, prefix=prefix)
    return data, content_digest(ring_cbor, data[len(prefix) :])


def content_of(state: RingState, *, limits: Limits) -> bytes:
    """The content digest of ``state`` (as :func:`encode_ring_blob` would give)."""
    return encode_ring_blob(state, view=b"\0" * 32, limits=limits)[1]


def decode_ring_blob(
    data: memoryview | bytearray | bytes, template: RingState, *, limits: Limits
) -> RingBlob:
    """Decode and check a ring blob against ``template``; raises a coded RemoteProtocolError."""
    payload = decode_payload(data, limits=limits)
    try:
        tensors = bytes_to_state(payload.state, like=template.tensors, limits=limits)
    except TensorDecodeError as exc:
        raise BadStateError(f"ring state: {exc.reason}") from None
    try:
        meta = RingMeta.from_dict(payload.ring)
    except RingStateError as exc:
        raise BadMetaError(exc.reason) from None
    problem = state_problem(tensors, limits.max_weight_magnitude)
    if problem is not None:
        raise BadStateError(problem)
    return RingBlob(
        RingState(tensors, meta),
        payload.view,
        payload.chain,
        payload.origin,
        payload.seal,
        payload.content,
    )


def state_problem(tensors: dict[str, torch.Tensor], bound: float) -> str | None:
    """Why these tensors cannot travel (not finite, or beyond ``bound``), or None."""
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        if t.is_floating_point():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                return f"ring state: tensor {name!r} holds NaN or infinity"
        peak = float(t.detach().abs().max()) if t.dtype != torch.bool else 1.0
        if not math.isfinite(peak) or peak > bound:
            return (
                f"ring state: tensor {name!r} reaches {peak:.3g}, beyond the bound "
                f"{bound:g} (Limits.max_weight_magnitude)"
            )
    return None
