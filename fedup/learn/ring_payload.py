"""The ring blob codec: a :class:`~fedup.learn.ring.RingState` to bytes and back, checked.

Encoding copies the tensors into one buffer behind the payload's framing
(:func:`fedup.protocol.payload.payload_prefix`); a member that already encoded
and checked its trained state (:meth:`RingCodec.body`) copies those bytes behind
the framing instead of encoding again.  Decoding views the received buffer (no
copy when it is writable, as the blob receiver's is), checks it once against the
expected layout (names, order, dtypes, shapes: the ``template``,
:func:`fedup.learn.ring.initial_state`) and checks every value in one pass per
run of one dtype (finite, and within ``Limits.max_weight_magnitude``: the rule
:func:`state_problem` applies to a state before it is sent).

Every failure is a :class:`~fedup.errors.RemoteProtocolError` with a ``code``
(:class:`~fedup.protocol.refusal.RefusalCode`) the receiver sends back.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch

from fedup.config import Limits
from fedup.errors import LocalProtocolError
from fedup.learn.ring import RingMeta, RingState, RingStateError
from fedup.learn.weights import (
    TORCH_TO_WIRE,
    _as_numpy,
    _cpu,
    _wire,
    bytes_to_state,
    state_to_bytes,
)
from fedup.protocol import cbor
from fedup.protocol.payload import HopPayload, content_digest, decode_payload, payload_prefix
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.tensors import (
    WIRE_DTYPES,
    LayoutRun,
    StateLayout,
    TensorDecodeError,
    magnitude_problem,
)

__all__ = [
    "BadStateError",
    "RingBlob",
    "RingCodec",
    "decode_ring_blob",
    "encode_ring_blob",
    "state_problem",
]


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
    payload: HopPayload
    """The framing it came in (its content digest is computed from it on demand)."""
    provenance: bytes | memoryview = b""
    """The chain of hop statements it carries (not yet checked)."""

    @property
    def content(self) -> bytes:
        """The content digest (what hop statements name and a final model's seal covers)."""
        return self.payload.content


def encode_ring_blob(
    state: RingState,
    *,
    view: bytes,
    chain: tuple[bytes, ...] = (),
    origin: PeerId | None = None,
    seal: bytes | None = None,
    provenance: bytes | memoryview = b"",
    limits: Limits,
) -> memoryview:
    """The blob's bytes: the framing, then the tensors, copied once."""
    prefix, _ = payload_prefix(
        state.meta.to_dict(),
        view=view,
        chain=chain,
        origin=origin,
        seal=seal,
        provenance=provenance,
    )
    return state_to_bytes(state.tensors, limits=limits, prefix=prefix)


def content_of(state: RingState, *, limits: Limits) -> bytes:
    """The content digest of ``state``: what hop statements name as received and sent,
    and what the origin of a final model seals."""
    prefix, ring_cbor = payload_prefix(state.meta.to_dict(), view=b"\0" * 32)
    data = state_to_bytes(state.tensors, limits=limits, prefix=prefix)
    return content_digest(ring_cbor, data[len(prefix) :])


def decode_ring_blob(
    data: memoryview | bytearray | bytes, template: RingState, *, limits: Limits
) -> RingBlob:
    """Decode and check a ring blob against ``template``; raises a coded RemoteProtocolError."""
    payload = decode_payload(data, limits=limits)
    try:
        tensors = bytes_to_state(
            payload.state,
            like=template.tensors,
            limits=limits,
            max_abs=limits.max_weight_magnitude,
        )
    except TensorDecodeError as exc:
        raise BadStateError(f"ring state: {exc.reason} (Limits.max_weight_magnitude)") from None
    return _ring_blob(payload, tensors)


def _ring_blob(payload: HopPayload, tensors: dict[str, torch.Tensor]) -> RingBlob:
    """The blob of a decoded payload and its checked tensors (the metadata checked here)."""
    try:
        meta = RingMeta.from_dict(payload.ring)
    except RingStateError as exc:
        raise BadMetaError(exc.reason) from None
    return RingBlob(
        RingState(tensors, meta),
        payload.view,
        payload.chain,
        payload.origin,
        payload.seal,
        payload,
        payload.provenance,
    )


def state_problem(tensors: dict[str, torch.Tensor], bound: float) -> str | None:
    """Why these tensors cannot travel (not finite, or beyond ``bound``), or None.

    The same rule the receiver applies while decoding
    (:func:`fedup.protocol.tensors.magnitude_problem`), on our own state before it
    is handed on.  The usual case (every value fine) costs one fused pass over the
    floating tensors; only a state with a problem is walked tensor by tensor.
    """
    floats = [t.detach() for t in tensors.values() if t.is_floating_point() and t.numel()]
    if floats and all(t.device.type == "cpu" and t.dtype != torch.bfloat16 for t in floats):
        peak = float(torch.stack(torch._foreach_norm(floats, math.inf)).max())
        others = [t for t in tensors.values() if not t.is_floating_point() and t.numel()]
        if peak <= bound and all(
            t.dtype == torch.bool or max(int(t.max()), -int(t.min())) <= bound for t in others
        ):
            return None  # NaN fails the comparison above, so it is never let through here
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        if t.dtype == torch.bfloat16 or t.device.type != "cpu":
            t = t.detach().float().cpu()
        array = t.detach().numpy()
        if t.dtype == torch.bool:
            continue
        problem = magnitude_problem(array, "f32" if t.is_floating_point() else "i64", bound)
        if problem is not None:
            return f"ring state: tensor {name!r} {problem} (Limits.max_weight_magnitude)"
    return None


class RingCodec:
    """The ring blob codec for one run's model, its layout computed once.

    Every state of a run has the template's names, dtypes and shapes, so the
    tensors' header is the same bytes each time (:class:`StateLayout`): encoding
    writes those bytes and copies the tensors once; decoding compares them (the
    one layout check) and views each tensor in the received buffer, then checks
    every value (finite, within ``Limits.max_weight_magnitude``) one run of
    tensors of one dtype at a time: one pass for a float32 model.

    A member checks the state it trained on its encoded tensors (:meth:`body`,
    :meth:`problem`) and hands those bytes on (``encode(..., body=)`` copies them
    once more, behind the framing), so each side checks the values once and the
    tensors are never encoded twice.
    """

    def __init__(self, template: RingState, *, limits: Limits) -> None:
        self.template = template
        self.limits = limits
        self._metas: list[tuple[RingMeta, bytes]] = []
        """The CBOR of the last few metadata encoded (:meth:`meta_cbor`)."""
        wires = {n: _wire(n, t) for n, t in template.tensors.items()}
        self._wires = wires
        arrays = [(n, _as_numpy(_cpu(t), wires[n])) for n, t in template.tensors.items()]
        bf16 = {n: w for n, w in wires.items() if w == "bf16"}
        self.layout = StateLayout(arrays, dtypes=bf16, limits=limits)
        self._runs = [_TorchRun.of(run, self.layout) for run in self.layout.runs]

    def body(self, state: RingState) -> memoryview | None:
        """The tensors of ``state`` in the run's layout, or None if it does not fit it.

        Each run of tensors of one dtype is copied with one ``torch.cat`` into its
        place (no numpy view of each tensor); a state whose tensors are not CPU
        tensors of the template's dtypes and shapes goes through the layout's
        checked encoder instead.
        """
        if tuple(state.tensors) != self.layout.names:
            return None
        out = np.zeros(self.layout.size, np.uint8)
        out[: self.layout.start] = np.frombuffer(self.layout.head, np.uint8)
        tensors = state.tensors
        with torch.no_grad():
            for run in self._runs:
                pieces = []
                for name, shape, pad in run.items:
                    t = tensors[name]
                    if t.dtype != run.dtype or not t.is_cpu or t.shape != shape:
                        return self._checked_body(state)
                    pieces.append(t.reshape(-1))
                    if pad is not None:
                        pieces.append(pad)
                torch.cat(pieces, out=run.view(out))
        return out.data

    def _checked_body(self, state: RingState) -> memoryview | None:
        arrays = [_as_numpy(_cpu(t), self._wires[n]) for n, t in state.tensors.items()]
        try:
            return self.layout.encode(arrays)
        except LocalProtocolError:
            return None

    def meta_cbor(self, meta: RingMeta) -> bytes:
        """The CBOR of ``meta`` (``meta.to_dict()``), encoded once per metadata object.

        A member encodes its trained state's metadata for the content digest
        (:meth:`content`) and again in the blob's framing (:meth:`encode`); the
        metadata is frozen, so the bytes of the last few objects are kept and
        reused (looked up by identity, the object held with its bytes).
        """
        for known, data in self._metas:
            if known is meta:
                return data
        data = cbor.encode(meta.to_dict())
        self._metas = [(meta, data), *self._metas[: _META_CACHE - 1]]
        return data

    def content(self, state: RingState, body: memoryview | None) -> bytes:
        """The content digest of ``state`` (:func:`content_of`); ``body`` is its
        :meth:`body`, hashed as it will be sent, not encoded again."""
        if body is None:
            return content_of(state, limits=self.limits)
        return content_digest(self.meta_cbor(state.meta), body)

    def problem(self, state: RingState, body: memoryview | None) -> str | None:
        """Why ``state`` cannot travel (see :func:`state_problem`), or None; ``body``
        is its :meth:`body`, where the values are checked."""
        bound = self.limits.max_weight_magnitude
        if body is None:
            return state_problem(state.tensors, bound)
        problem = self.layout.value_problem(body, bound)
        if problem is None:
            return None
        return f"ring state: {problem} (Limits.max_weight_magnitude)"

    def encode(
        self,
        state: RingState,
        *,
        view: bytes,
        chain: tuple[bytes, ...] = (),
        origin: PeerId | None = None,
        seal: bytes | None = None,
        provenance: bytes | memoryview = b"",
        body: memoryview | None = None,
    ) -> memoryview:
        """The blob's bytes: the framing, then the tensors (``body``, the state's
        :meth:`body`, if given: it is not encoded again)."""
        prefix, _ = payload_prefix(
            cbor.Encoded(self.meta_cbor(state.meta)),
            view=view,
            chain=chain,
            origin=origin,
            seal=seal,
            provenance=provenance,
        )
        if body is not None:
            whole = np.empty(len(prefix) + body.nbytes, np.uint8)
            whole[: len(prefix)] = np.frombuffer(prefix, np.uint8)
            whole[len(prefix) :] = np.frombuffer(body, np.uint8)
            return whole.data
        arrays = [_as_numpy(_cpu(t), self._wires[n]) for n, t in state.tensors.items()]
        try:
            return self.layout.encode(arrays, prefix=prefix)
        except LocalProtocolError:
            return encode_ring_blob(  # a state of another layout: say what is wrong
                state,
                view=view,
                chain=chain,
                origin=origin,
                seal=seal,
                provenance=provenance,
                limits=self.limits,
            )

    def decode(self, data: memoryview | bytearray | bytes) -> RingBlob:
        """Decode and check a ring blob; raises a coded RemoteProtocolError."""
        payload = decode_payload(data, limits=self.limits)
        try:
            decoded = self.layout.decode(payload.state, max_abs=self.limits.max_weight_magnitude)
        except TensorDecodeError as exc:
            raise BadStateError(f"ring state: {exc.reason} (Limits.max_weight_magnitude)") from None
        tensors = {n: _to_torch(a, decoded.dtypes[n]) for n, a in decoded.items()}
        return _ring_blob(payload, tensors)


_META_CACHE = 4
"""Metadata objects whose CBOR a codec keeps (a member's trained state's, between its
content digest and its hand-over; the final's and a resent one's besides)."""

_WIRE_TO_TORCH = {wire: dtype for dtype, wire in TORCH_TO_WIRE.items()}


@attrs.frozen(eq=False)
class _TorchRun:
    """A :class:`~fedup.protocol.tensors.LayoutRun` for ``torch.cat``: the torch dtype,
    each tensor's name and shape, and the zero padding after it."""

    begin: int
    end: int
    wire: str
    dtype: torch.dtype
    items: tuple[tuple[str, torch.Size, torch.Tensor | None], ...]

    @classmethod
    def of(cls, run: LayoutRun, layout: StateLayout) -> _TorchRun:
        dtype = _WIRE_TO_TORCH[run.wire]
        items = []
        for i, pad in zip(run.entries, run.pads, strict=True):
            e = layout.entries[i]
            zeros = torch.zeros(pad.size, dtype=dtype) if pad is not None else None
            items.append((e.name, torch.Size(e.shape), zeros))
        return cls(run.begin, run.end, run.wire, dtype, tuple(items))

    def view(self, out: Any) -> torch.Tensor:
        """Where this run's tensors go in ``out`` (the blob's bytes, a uint8 array)."""
        words = out[self.begin : self.end].view(WIRE_DTYPES[self.wire])
        tensor = torch.from_numpy(words)
        return tensor.view(torch.bfloat16) if self.wire == "bf16" else tensor


def _to_torch(array: Any, wire: str) -> torch.Tensor:
    if wire == "bf16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
