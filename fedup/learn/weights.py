"""Torch model states to bytes and files, and back, never trusting what comes in.

The wire codec is :mod:`fedup.protocol.tensors`; this module only moves
tensors between torch and numpy without copying:

* :func:`state_to_bytes` views every CPU tensor as a numpy array
  (``Tensor.numpy()`` shares memory) and lets the codec copy each one exactly
  once into the blob.  bfloat16 tensors travel as their 16-bit words.
* :func:`bytes_to_state` decodes (all checks happen there) and wraps the
  numpy views with ``torch.from_numpy``.  From a writable buffer (what
  :func:`state_to_bytes` returns, a ``bytearray``, or a writable
  ``memoryview``) the tensors share its memory: no copy at all.  From a
  read-only buffer (``bytes``) the blob is copied once first, because torch
  tensors are writable and must not alias immutable memory.

Files use the safetensors format (:func:`save_safetensors`,
:func:`load_safetensors`), written atomically and byte-for-byte deterministic.
Nothing here unpickles or calls ``torch.load``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import safetensors
import safetensors.torch
import torch
from torch import nn

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.files import atomic_writer
from fedup.protocol.tensors import (
    WIRE_DTYPES,
    TensorDecodeError,
    TensorSpec,
    check_finite,
    check_specs,
    decode_state,
    encode_state,
)

__all__ = [
    "StateLike",
    "WeightsFileError",
    "bytes_to_state",
    "layout_digest",
    "load_safetensors",
    "load_safetensors_bytes",
    "save_safetensors",
    "state_specs",
    "state_to_bytes",
]

StateLike = nn.Module | Mapping[str, torch.Tensor]

#: torch dtype -> wire dtype name (the allow-list; everything else is refused).
TORCH_TO_WIRE: Final[Mapping[torch.dtype, str]] = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "bool",
}
# safetensors' dtype names -> wire dtype names.
_SAFETENSORS_TO_WIRE: Final[Mapping[str, str]] = {
    "F16": "f16",
    "BF16": "bf16",
    "F32": "f32",
    "F64": "f64",
    "I8": "i8",
    "I16": "i16",
    "I32": "i32",
    "I64": "i64",
    "U8": "u8",
    "BOOL": "bool",
}


class WeightsFileError(TensorDecodeError):
    """A weights file is corrupt, holds NaN/Inf, or is not the expected model.

    A file is input from outside just like a peer's blob, so this is a
    :class:`~fedup.protocol.tensors.TensorDecodeError`; the reason names the
    file.  A missing or unreadable file raises the plain :class:`OSError`.
    """


def _tensors(state: StateLike) -> dict[str, torch.Tensor]:
    if isinstance(state, nn.Module):
        return state.state_dict()
    if not isinstance(state, Mapping):
        raise LocalProtocolError(f"expected a module or a mapping of tensors, got {type(state)}")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise LocalProtocolError(f"tensor {name!r}: expected a torch.Tensor, got {type(t)}")
        out[name] = t
    return out


def _wire(name: str, t: torch.Tensor) -> str:
    wire = TORCH_TO_WIRE.get(t.dtype)
    if wire is None:
        allowed = ", ".join(str(d) for d in TORCH_TO_WIRE)
        raise LocalProtocolError(f"tensor {name!r}: dtype {t.dtype} cannot travel ({allowed})")
    if t.layout != torch.strided:
        raise LocalProtocolError(f"tensor {name!r}: only dense tensors can travel, got {t.layout}")
    return wire


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """Detached, on the CPU, conjugate/negative bits resolved (no copy if already so)."""
    return t.detach().cpu().resolve_conj().resolve_neg()


def _as_numpy(t: torch.Tensor, wire: str) -> npt.NDArray[Any]:
    """A numpy view of a CPU tensor; bfloat16 as its int16 words."""
    return (t.view(torch.int16) if wire == "bf16" else t).numpy()


def state_specs(state: StateLike) -> dict[str, TensorSpec]:
    """The :class:`~fedup.protocol.tensors.TensorSpec` of every tensor of a state, in order.

    Raises :class:`~fedup.errors.LocalProtocolError` for a dtype that cannot travel.
    """
    return {n: TensorSpec(_wire(n, t), tuple(t.shape)) for n, t in _tensors(state).items()}


def layout_digest(state: StateLike) -> bytes:
    """SHA-256 of a state's tensor layout (names in order, wire dtypes, shapes).

    Members agree on it before training (``RunSettings.model_digest``), so a saved
    model can be checked against the layout its run agreed on.  Raises
    :class:`~fedup.errors.LocalProtocolError` for a dtype that cannot travel.
    """
    specs = state_specs(state)
    text = ";".join(f"{name}:{spec.dtype}:{list(spec.shape)}" for name, spec in specs.items())
    return hashlib.sha256(text.encode()).digest()


def state_to_bytes(
    state: StateLike, *, limits: Limits = DEFAULT_LIMITS, prefix: bytes = b""
) -> memoryview:
    """Encode a module's ``state_dict()`` (or a mapping of tensors) as a blob.

    Tensors are detached and moved to the CPU (a no-op for CPU tensors); each
    one's data is copied exactly once, into the returned buffer (a writable
    ``memoryview``, see :func:`~fedup.protocol.tensors.encode_state`).  The
    order is the state's order, so the same model gives the same bytes.

    Raises :class:`~fedup.errors.LocalProtocolError` for a dtype outside the
    allow-list (see :data:`TORCH_TO_WIRE`), a sparse tensor, a bad or
    duplicate name, or a state beyond ``limits``.  NaN/Inf are not checked
    here; the receiver rejects them.  ``prefix`` goes in front, in the same buffer
    (see :func:`~fedup.protocol.tensors.encode_state`).
    """
    arrays: list[tuple[str, npt.NDArray[Any]]] = []
    dtypes: dict[str, str] = {}
    for name, t in _tensors(state).items():
        wire = _wire(name, t)
        arrays.append((name, _as_numpy(_cpu(t), wire)))
        if wire == "bf16":
            dtypes[name] = wire
    return encode_state(arrays, dtypes=dtypes, limits=limits, prefix=prefix)


def bytes_to_state(
    data: bytes | bytearray | memoryview,
    *,
    like: StateLike | None = None,
    limits: Limits = DEFAULT_LIMITS,
    max_abs: float | None = None,
) -> dict[str, torch.Tensor]:
    """Decode a blob from :func:`state_to_bytes` into CPU tensors, in wire order.

    With ``like`` (a module or a state dict), the blob must hold exactly the
    same tensor names in the same order with the same dtypes and shapes, so
    the result can go straight into ``module.load_state_dict``.

    If ``data`` is writable (a ``bytearray`` or writable ``memoryview``, as
    :func:`state_to_bytes` returns), the tensors share its memory
    and no byte is copied: do not reuse the buffer while they live.  If it is
    read-only (``bytes``), the blob is first copied once into a private
    buffer that the tensors share.  Either way one live tensor keeps the
    whole blob's buffer alive; ``.clone()`` a tensor to keep it alone.

    Raises :class:`~fedup.protocol.tensors.TensorDecodeError` for a malformed
    blob, NaN/Inf, a value beyond ``max_abs`` (when given), or a mismatch with ``like``.
    """
    expected = state_specs(like) if like is not None else None
    mv = memoryview(data)
    if mv.readonly and mv.c_contiguous and mv.nbytes <= limits.max_blob_size:
        # Torch tensors are writable, so they must not alias immutable bytes:
        # copy the blob once into a numpy buffer (huge pages, measured faster
        # than a bytearray or a copy per tensor) and decode views into it.
        data = np.frombuffer(mv, np.uint8).copy().data
    decoded = decode_state(data, limits=limits, expected=expected, max_abs=max_abs)
    out: dict[str, torch.Tensor] = {}
    for name, array in decoded.items():
        wire = decoded.dtypes[name]
        if not array.flags.aligned:  # a writable buffer at an odd address
            array = array.copy()
        if wire == "bf16":
            out[name] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            out[name] = torch.from_numpy(array)
    return out


# --------------------------------------------------------------------------
# safetensors files


def save_safetensors(
    state: StateLike,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a state to a ``.safetensors`` file atomically; return its SHA-256 (hex).

    The file is written to a new temporary file in the same directory
    (:func:`fedup.files.atomic_writer`: mode 0600, never through a symbolic
    link), flushed, fsynced and renamed over ``path`` (then the directory is
    fsynced), so a reader sees the old file or the new one, never a partial
    one, and a symbolic link at ``path`` is replaced, not followed.  The bytes
    depend only on the tensors and metadata, not on dict order or process:
    safetensors sorts tensors itself, and the ``__metadata__`` keys, which it
    keeps in an unordered map, are sorted here.

    Raises :class:`~fedup.errors.LocalProtocolError` for a dtype outside the
    allow-list or metadata that is not ``str`` to ``str``; :class:`OSError`
    if the file cannot be written.
    """
    return write_safetensors_parts(safetensors_parts(state, metadata=metadata), path)


def write_safetensors_parts(
    parts: Sequence[bytes | memoryview], path: str | os.PathLike[str], *, durable: bool = True
) -> str:
    """Write the bytes :func:`safetensors_parts` made as :func:`save_safetensors` does
    (atomically; fsynced unless ``durable`` is False: a simulated member's files, which
    a simulation of a thousand would otherwise push to disk one by one); return the
    file's SHA-256 (hex)."""
    digest = hashlib.sha256()
    with atomic_writer(path, durable=durable) as f:
        for part in parts:
            f.write(part)
            digest.update(part)
    return digest.hexdigest()


def safetensors_parts(
    state: StateLike, *, metadata: Mapping[str, str] | None = None
) -> list[memoryview]:
    """The exact bytes :func:`save_safetensors` writes for ``state``, in parts.

    Raises :class:`~fedup.errors.LocalProtocolError` as :func:`save_safetensors` does.
    """
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise LocalProtocolError(f"metadata must map str to str, got {k!r}: {v!r}")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in _tensors(state).items():
        _wire(name, t)
        t = _cpu(t).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages:  # tied weights: safetensors refuses shared storage
            t = t.clone()
        elif ptr:
            storages.add(ptr)
        tensors[name] = t
    raw = safetensors.torch.save(tensors, metadata=dict(metadata) if metadata else None)
    return _canonical_parts(raw) if metadata else [memoryview(raw)]


def safetensors_sha256(state: StateLike, *, metadata: Mapping[str, str] | None = None) -> str:
    """The SHA-256 (hex) of the file :func:`save_safetensors` would write, without writing it."""
    digest = hashlib.sha256()
    for part in safetensors_parts(state, metadata=metadata):
        digest.update(part)
    return digest.hexdigest()


def _canonical_parts(raw: bytes) -> list[memoryview]:
    """Re-serialize a safetensors header with sorted metadata keys; data untouched.

    The Rust library stores ``__metadata__`` in a HashMap, so with two or more
    keys its JSON order varies between processes.  The header is our own
    output, parsed here only to fix that order; it is padded with spaces to a
    multiple of 8 bytes as safetensors does.
    """
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8 : 8 + n])
    canonical = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))}
    canonical.update(header)
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return [memoryview(struct.pack("<Q", len(text)) + text), memoryview(raw)[8 + n :]]


def load_safetensors(
    path: str | os.PathLike[str],
    *,
    like: StateLike | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file, checking it as strictly as a peer's blob.

    The file may be at most ``limits.max_blob_size`` bytes, hold at most
    ``limits.max_tensors`` tensors of allowed dtypes with names of at most
    ``limits.max_tensor_name`` bytes and ranks up to ``limits.max_tensor_rank``.
    With ``like``, names (in any order), dtypes and shapes must match it
    exactly; this is checked from the file's header before any tensor data is
    read.  Floating tensors must be finite.  Tensors come back in ``like``'s
    order if given, else in the file's order.  Each tensor is copied out of
    the file's memory map, so later changes to the file do not reach it
    (truncating the file *while* it loads can still fault, as with any mmap).

    Raises :class:`WeightsFileError` for a corrupt file or any failed check,
    :class:`OSError` if the file cannot be read.
    """
    path = os.fspath(path)
    expected = state_specs(like) if like is not None else None
    size = os.stat(path).st_size
    if size > limits.max_blob_size:
        raise WeightsFileError(f"{path}: {size} bytes exceeds max_blob_size={limits.max_blob_size}")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            specs = _file_specs(f, path, limits)
            if expected is not None:
                check_specs(specs, expected, ordered=False)
            order = expected if expected is not None else specs
            # get_tensor views the file's memory map: clone, so that the checks
            # below hold for what we return even if the file changes later.
            tensors: dict[str, torch.Tensor] = {n: f.get_tensor(n).clone() for n in order}
    except WeightsFileError:
        raise
    except TensorDecodeError as e:
        raise WeightsFileError(f"{path}: {e.reason}") from e
    except safetensors.SafetensorError as e:
        raise WeightsFileError(f"{path}: not a valid safetensors file: {e}") from e
    for name, t in tensors.items():
        wire = specs[name].dtype
        try:
            check_finite(name, _as_numpy(t, wire), wire)
        except TensorDecodeError as e:
            raise WeightsFileError(f"{path}: {e.reason}") from e
    return tensors


def load_safetensors_bytes(
    data: bytes,
    *,
    like: StateLike,
    source: str = "<model>",
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file's bytes, already read, checking them as
    :func:`load_safetensors` checks a file.

    For a caller that has checked the bytes themselves (their SHA-256, say) and must
    use exactly those, not a file that may have changed since.  ``data`` may be at
    most ``limits.max_blob_size`` bytes and must hold exactly ``like``'s tensors
    (names in any order, dtypes, shapes), finite; they come back in ``like``'s order.
    ``source`` names the bytes in messages.  Raises :class:`WeightsFileError`.
    """
    if len(data) > limits.max_blob_size:
        raise WeightsFileError(
            f"{source}: {len(data)} bytes exceeds max_blob_size={limits.max_blob_size}"
        )
    expected = state_specs(like)
    try:
        entries, body = _parse_safetensors(memoryview(data), limits)
    except ValueError as e:
        raise WeightsFileError(f"{source}: not a valid safetensors file: {e}") from None
    except TensorDecodeError as e:
        raise WeightsFileError(f"{source}: {e.reason}") from e
    specs = {name: spec for name, (spec, _) in entries.items()}
    try:
        check_specs(specs, expected, ordered=False)  # before any tensor is made
        out: dict[str, torch.Tensor] = {}
        for name in expected:
            spec, start = entries[name]
            array = np.frombuffer(
                body, WIRE_DTYPES[spec.dtype], count=math.prod(spec.shape), offset=start
            ).reshape(spec.shape)
            check_finite(name, array, spec.dtype)
            t = torch.from_numpy(array.copy())
            out[name] = t.view(torch.bfloat16) if spec.dtype == "bf16" else t
    except TensorDecodeError as e:
        raise WeightsFileError(f"{source}: {e.reason}") from e
    return out


# safetensors' names of the dtypes that cannot travel (for the message that refuses one).
_REFUSED_DTYPES: Final[Mapping[str, str]] = {
    "C64": "torch.complex64",
    "C128": "torch.complex128",
    "U16": "torch.uint16",
    "U32": "torch.uint32",
    "U64": "torch.uint64",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
}
_MAX_SAFETENSORS_HEADER: Final = 1 << 24
"""Bytes a safetensors header may take before it is parsed (the format's own cap is 100 MB;
a model of ``max_tensors`` tensors needs far less)."""


def _parse_safetensors(
    mv: memoryview, limits: Limits
) -> tuple[dict[str, tuple[TensorSpec, int]], memoryview]:
    """A safetensors file's tensors (spec and offset into the data) and its data, from
    its bytes: the header is bounded and checked (names, count, dtypes, ranks, shapes,
    and byte ranges that tile the data exactly) before anything is allocated for a
    tensor.  Raises :class:`ValueError` for bytes that are not such a file and
    :class:`TensorDecodeError` for a file beyond ``limits`` or with a refused dtype."""
    if mv.nbytes < 8:
        raise ValueError("shorter than its 8-byte header length")
    (n,) = struct.unpack_from("<Q", mv, 0)
    if n > min(mv.nbytes - 8, _MAX_SAFETENSORS_HEADER):
        raise ValueError(f"a header of {n} bytes does not fit")
    try:
        header = json.loads(bytes(mv[8 : 8 + n]).decode("utf-8"))
    except RecursionError:  # a header nested deeper than any real one
        raise ValueError("the header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > limits.max_tensors:
        raise TensorDecodeError(f"{len(header)} tensors exceed max_tensors={limits.max_tensors}")
    body = mv[8 + n :]
    entries: dict[str, tuple[TensorSpec, int]] = {}
    ranges = []
    for name, entry in header.items():
        if len(name.encode("utf-8", "surrogatepass")) > limits.max_tensor_name:
            raise TensorDecodeError(f"tensor name {name[:64]!r}... is too long")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r}: a malformed entry")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        wire = _SAFETENSORS_TO_WIRE.get(code) if isinstance(code, str) else None
        if wire is None:
            refused = _REFUSED_DTYPES.get(code, repr(code)) if isinstance(code, str) else code
            raise TensorDecodeError(f"tensor {name!r}: dtype {refused} is not allowed")
        if not (
            isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
        ):
            raise ValueError(f"tensor {name!r}: a malformed shape or byte range")
        if len(shape) > limits.max_tensor_rank:
            raise TensorDecodeError(
                f"tensor {name!r}: rank {len(shape)} exceeds "
                f"max_tensor_rank={limits.max_tensor_rank}"
            )
        begin, end = offsets
        if end - begin != math.prod(shape) * WIRE_DTYPES[wire].itemsize:
            raise ValueError(f"tensor {name!r}: its byte range does not match its shape")
        entries[name] = (TensorSpec(wire, tuple(shape)), begin)
        ranges.append((begin, end))
    at = 0
    for begin, end in sorted(ranges):
        if begin != at:
            raise ValueError("the tensors' byte ranges do not tile the data")
        at = end
    if at != body.nbytes:
        raise ValueError("the tensors' byte ranges do not cover the data")
    return entries, body


def _file_specs(f: Any, path: str, limits: Limits) -> dict[str, TensorSpec]:
    names: list[str] = list(f.keys())
    if len(names) > limits.max_tensors:
        raise WeightsFileError(
            f"{path}: {len(names)} tensors exceed max_tensors={limits.max_tensors}"
        )
    specs: dict[str, TensorSpec] = {}
    for name in names:
        if len(name.encode("utf-8", "surrogatepass")) > limits.max_tensor_name:
            raise WeightsFileError(f"{path}: tensor name {name[:64]!r}... is too long")
        sl = f.get_slice(name)
        wire = _SAFETENSORS_TO_WIRE.get(sl.get_dtype())
        if wire is None:
            raise WeightsFileError(f"{path}: tensor {name!r}: unknown dtype {sl.get_dtype()!r}")
        shape = tuple(sl.get_shape())
        if len(shape) > limits.max_tensor_rank:
            raise WeightsFileError(
                f"{path}: tensor {name!r}: rank {len(shape)} exceeds "
                f"max_tensor_rank={limits.max_tensor_rank}"
            )
        specs[name] = TensorSpec(wire, shape)
    return specs
