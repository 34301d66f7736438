"""Model states as bytes: numpy arrays in, one contiguous blob out, and back.

Weights from a peer are untrusted bytes.  They are never unpickled and never
given to ``torch.load``: a blob is a small binary header (names, wire dtypes,
shapes, offsets) followed by the raw little-endian data of every tensor.  The
decoder checks every field against :class:`~fedup.config.Limits` and against
the bytes actually present *before* it creates any array, then returns
zero-copy views into the input buffer.  ``docs/protocol-tensors.md`` is the
specification; in short::

    preamble  b"FUST" | u8 version (1) | 3 zero bytes | u32 BE header length H
    header    u32 BE count, then per tensor:
                u16 BE name length, name (UTF-8) | u8 dtype length, dtype (ASCII)
                | u8 rank, rank x u64 BE dims | u64 BE offset | u64 BE byte length
    padding   zero bytes up to the next multiple of 8 (the data section's start)
    data      each tensor at its 8-aligned offset from the data section's start,
              zero padding between tensors, nothing after the last one

Every input has exactly one encoding, and the decoder accepts nothing else.
bfloat16 has no numpy dtype: it travels as its raw 16-bit words, which numpy
sees as ``uint16`` while :class:`DecodedState` remembers the wire dtype
``"bf16"`` so that the torch layer can view the words back as bfloat16.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "WIRE_DTYPES",
    "DecodedState",
    "LayoutRun",
    "StateLayout",
    "TensorDecodeError",
    "TensorSpec",
    "check_finite",
    "check_specs",
    "decode_state",
    "describe_state",
    "encode_state",
    "wire_dtype_of",
]

MAGIC: Final = b"FUST"
FORMAT_VERSION: Final = 1
PREAMBLE_SIZE: Final = 12
ALIGNMENT: Final = 8

_PREAMBLE = struct.Struct(">4sB3sI")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_TAIL = struct.Struct(">QQ")  # offset, byte length

#: The wire dtype names and the (little-endian) numpy dtype each travels as.
WIRE_DTYPES: Final[Mapping[str, np.dtype[Any]]] = {
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),  # raw bfloat16 words
    "f32": np.dtype("<f4"),
    "f64": np.dtype("<f8"),
    "i8": np.dtype("i1"),
    "i16": np.dtype("<i2"),
    "i32": np.dtype("<i4"),
    "i64": np.dtype("<i8"),
    "u8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
_FLOATS: Final = frozenset({"f16", "bf16", "f32", "f64"})
# numpy (kind, itemsize) -> wire name, for arrays whose wire dtype is implied.
_BY_KIND: Final[Mapping[tuple[str, int], str]] = {
    ("f", 2): "f16",
    ("f", 4): "f32",
    ("f", 8): "f64",
    ("i", 1): "i8",
    ("i", 2): "i16",
    ("i", 4): "i32",
    ("i", 8): "i64",
    ("u", 1): "u8",
    ("b", 1): "bool",
}
# Exponent bits of the 16-bit floats: all ones means Inf or NaN.
_EXPONENT_MASK16: Final[Mapping[str, int]] = {"f16": 0x7C00, "bf16": 0x7F80}
_MAX_LISTED = 10  # names listed in one error reason before "and N more"

Array = npt.NDArray[Any]
TensorsLike = Mapping[str, Array] | Sequence[tuple[str, Array]]


class TensorDecodeError(RemoteProtocolError):
    """A model-state blob (or file) from outside is malformed or not the expected model.

    The reason names the tensor when one is at fault, e.g.
    ``tensor 'fc.bias' contains NaN or Inf``.
    """


@attrs.frozen
class TensorSpec:
    """What a tensor must look like: its wire dtype and its shape."""

    dtype: str
    """Wire dtype name, a key of :data:`WIRE_DTYPES` (``"f32"``, ``"bf16"``, ...)."""
    shape: tuple[int, ...]
    """Dimensions; ``()`` for a scalar."""

    @property
    def nbytes(self) -> int:
        """Bytes of data this tensor occupies on the wire."""
        n = WIRE_DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


class DecodedState(Mapping[str, Array]):
    """The tensors of a decoded blob, in wire order, with their wire dtypes.

    A read-only mapping from name to numpy array.  The arrays are views into
    the buffer given to :func:`decode_state` (writable when that buffer is),
    so they keep it alive and change if it changes.  ``dtypes[name]`` is the
    wire dtype; it differs from the array's dtype only for ``"bf16"``, whose
    array is ``uint16``.
    """

    __slots__ = ("_arrays", "_dtypes")

    def __init__(self, arrays: dict[str, Array], dtypes: dict[str, str]) -> None:
        self._arrays = arrays
        self._dtypes = dtypes

    def __getitem__(self, name: str) -> Array:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {self._dtypes[n]}{a.shape}" for n, a in self._arrays.items())
        return f"DecodedState({{{inner}}})"

    @property
    def dtypes(self) -> Mapping[str, str]:
        """Wire dtype of each tensor, by name."""
        return self._dtypes

    def specs(self) -> dict[str, TensorSpec]:
        """The :class:`TensorSpec` of every tensor, in order."""
        return {n: TensorSpec(self._dtypes[n], a.shape) for n, a in self._arrays.items()}


# --------------------------------------------------------------------------
# helpers shared by both directions


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) & -ALIGNMENT


def _names(names: Sequence[str] | set[str]) -> str:
    listed = sorted(names) if isinstance(names, set) else list(names)
    text = ", ".join(repr(n) for n in listed[:_MAX_LISTED])
    if len(listed) > _MAX_LISTED:
        text += f" and {len(listed) - _MAX_LISTED} more"
    return text


def wire_dtype_of(array: Array, wire: str | None = None) -> str:
    """Return the wire dtype name of ``array``.

    With ``wire=None`` it is implied by the array's dtype (any byte order).
    ``wire="bf16"`` declares a 16-bit integer array to hold bfloat16 words; any
    other ``wire`` must agree with the array's dtype.

    Raises :class:`~fedup.errors.LocalProtocolError` for a dtype outside the
    allow-list or a ``wire`` that does not fit the array.
    """
    dt = array.dtype
    implied = _BY_KIND.get((dt.kind, dt.itemsize)) if dt.fields is None else None
    if wire is None:
        if implied is None:
            raise LocalProtocolError(
                f"dtype {dt} cannot travel; allowed wire dtypes: {', '.join(WIRE_DTYPES)} "
                "(bfloat16 as 16-bit words with wire dtype 'bf16')"
            )
        return implied
    if wire == "bf16":
        if dt.kind in "iu" and dt.itemsize == 2:
            return wire
        raise LocalProtocolError(f"wire dtype 'bf16' needs an int16/uint16 array of bits, got {dt}")
    if wire not in WIRE_DTYPES:
        raise LocalProtocolError(f"unknown wire dtype {wire!r}")
    if wire != implied:
        raise LocalProtocolError(f"wire dtype {wire!r} does not match array dtype {dt}")
    return wire


def describe_state(
    tensors: TensorsLike, *, dtypes: Mapping[str, str] | None = None
) -> dict[str, TensorSpec]:
    """Return the :class:`TensorSpec` of every tensor, in order.

    ``dtypes`` names wire dtypes as for :func:`encode_state` (a
    :class:`DecodedState` supplies its own).  Raises
    :class:`~fedup.errors.LocalProtocolError` for a dtype that cannot travel.
    """
    if dtypes is None and isinstance(tensors, DecodedState):
        return tensors.specs()
    dtypes = dtypes or {}
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    return {n: TensorSpec(wire_dtype_of(a, dtypes.get(n)), tuple(a.shape)) for n, a in items}


def check_specs(
    actual: Mapping[str, TensorSpec],
    expected: Mapping[str, TensorSpec],
    *,
    ordered: bool = True,
) -> None:
    """Check that ``actual`` describes exactly the tensors of ``expected``.

    Names must be the same set (and, with ``ordered``, in the same order);
    each tensor's wire dtype and shape must be equal.  Raises
    :class:`TensorDecodeError` naming the first difference: missing or
    unexpected tensors, order, dtype, then shape.
    """
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names(set(missing))}")
        if extra:
            parts.append(f"unexpected tensors: {_names(set(extra))}")
        raise TensorDecodeError("; ".join(parts))
    if ordered:
        for i, (got_name, want_name) in enumerate(zip(actual, expected, strict=True)):
            if got_name != want_name:
                raise TensorDecodeError(
                    f"tensors out of order: expected {want_name!r} at position {i}, "
                    f"got {got_name!r}"
                )
    for name, want in expected.items():
        got = actual[name]
        if got.dtype != want.dtype:
            raise TensorDecodeError(
                f"tensor {name!r}: expected dtype {want.dtype}, got {got.dtype}"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise TensorDecodeError(
                f"expected tensor {name!r} with shape {tuple(want.shape)}, got {tuple(got.shape)}"
            )


def _words16(array: Array) -> np.dtype[Any]:
    """uint16 in the byte order of a 16-bit array, to view its words."""
    return np.dtype(np.uint16).newbyteorder(array.dtype.byteorder)


def check_finite(name: str, array: Array, wire: str) -> None:
    """Raise :class:`TensorDecodeError` if a floating tensor holds NaN or Inf.

    Non-float wire dtypes pass.  16-bit floats (``f16`` and ``bf16`` words) are
    checked exactly on their exponent bits.  ``f32``/``f64`` use one summing
    pass as a fast path (any NaN or Inf makes the sum non-finite, and a
    finite sum proves every element finite); only a non-finite sum, which
    legitimate data can cause by overflowing, triggers the exact element check.
    """
    if wire not in _FLOATS or array.size == 0:
        return
    mask = _EXPONENT_MASK16.get(wire)
    if mask is not None:
        bits = array.view(_words16(array))
        bad = bool(np.any((bits & mask) == mask))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            bad = not np.isfinite(array.sum()) and not bool(np.isfinite(array).all())
    if bad:
        raise TensorDecodeError(f"tensor {name!r} contains NaN or Inf")


def magnitude_problem(array: Array, wire: str, max_abs: float) -> str | None:
    """Why ``array`` holds a value that is not finite or beyond ``max_abs``, or None.

    One pass: the largest absolute value (NaN propagates into it, Inf is beyond
    any bound).  Bools pass; 16-bit floats are widened first.
    """
    if array.size == 0 or wire == "bool":
        return None
    if wire in _FLOATS:
        if wire == "bf16":  # 16-bit words: the upper half of a float32
            values = (array.view(_words16(array)).astype(np.uint32) << 16).view(np.float32)
        elif array.dtype.itemsize == 2:
            values = array.astype(np.float32)
        else:
            values = array
        with np.errstate(invalid="ignore", over="ignore"):
            high, low = float(values.max()), float(values.min())  # NaN propagates
        if math.isnan(high) or math.isnan(low) or math.isinf(high) or math.isinf(low):
            return "contains NaN or Inf"
        peak = max(high, -low)
    else:
        peak = float(max(int(array.max()), -int(array.min())))
    if peak > max_abs:
        return f"reaches {peak:.3g}, beyond the bound {max_abs:g}"
    return None


def check_magnitude(name: str, array: Array, wire: str, max_abs: float) -> None:
    """Raise :class:`TensorDecodeError` if :func:`magnitude_problem` finds one."""
    problem = magnitude_problem(array, wire, max_abs)
    if problem is not None:
        raise TensorDecodeError(f"tensor {name!r} {problem}")


# --------------------------------------------------------------------------
# encoding


def encode_state(
    tensors: TensorsLike,
    *,
    dtypes: Mapping[str, str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    prefix: bytes = b"",
) -> memoryview:
    """Encode named arrays as one blob; the data is copied exactly once.

    ``prefix`` (of a length that is a multiple of 8) is written before the
    blob in the same buffer, so a caller that frames the blob (the ring
    payload) needs no second copy; the tensors' alignment is kept.

    ``tensors`` is a mapping or a sequence of ``(name, array)`` pairs; their
    order is the wire order.  Names must be unique, non-empty strings of at
    most ``limits.max_tensor_name`` UTF-8 bytes.  Arrays may have any strides
    and byte order; their dtype must be allowed (see :func:`wire_dtype_of`).
    ``dtypes`` maps names to wire dtypes where the array's dtype does not say
    it, i.e. ``"bf16"`` for arrays of bfloat16 words; a :class:`DecodedState`
    passed as ``tensors`` supplies its own.  The result is deterministic: the
    same names, dtypes, shapes and values always give the same bytes.

    The result is a writable, C-contiguous, one-dimensional ``memoryview``
    (format ``"B"``) over a fresh buffer: slice it without copying, pass it
    to :func:`decode_state` or a socket, or call ``bytes()`` on it.

    Finiteness is not checked here (the receiver checks it); call
    :func:`check_finite` first to fail locally.

    Raises :class:`~fedup.errors.LocalProtocolError` for a bad name, a
    duplicate, a dtype that cannot travel, or a state beyond ``limits``.
    """
    if dtypes is None and isinstance(tensors, DecodedState):
        dtypes = tensors.dtypes
    dtypes = dtypes or {}
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    if len(items) > limits.max_tensors:
        raise LocalProtocolError(
            f"{len(items)} tensors, more than max_tensors={limits.max_tensors}"
        )
    unknown = dtypes.keys() - {n for n, _ in items}
    if unknown:
        raise LocalProtocolError(f"dtypes names tensors that are not given: {_names(set(unknown))}")

    parts = [_U32.pack(len(items))]
    layout: list[tuple[Array, str, int]] = []
    seen: set[str] = set()
    end = 0
    for name, array in items:
        raw_name = _check_local_name(name, seen, limits)
        if not isinstance(array, np.ndarray):
            raise LocalProtocolError(
                f"tensor {name!r}: expected a numpy array, got {type(array).__name__}"
            )
        wire = wire_dtype_of(array, dtypes.get(name))
        if array.ndim > limits.max_tensor_rank:
            raise LocalProtocolError(
                f"tensor {name!r}: rank {array.ndim} exceeds "
                f"max_tensor_rank={limits.max_tensor_rank}"
            )
        offset = _align(end)
        nbytes = array.nbytes
        parts += (
            _U16.pack(len(raw_name)),
            raw_name,
            _U8.pack(len(wire)),
            wire.encode("ascii"),
            _U8.pack(array.ndim),
            struct.pack(f">{array.ndim}Q", *array.shape),
            _TAIL.pack(offset, nbytes),
        )
        layout.append((array, wire, offset))
        end = offset + nbytes
    header = b"".join(parts)
    header_end = PREAMBLE_SIZE + len(header)
    start = _align(header_end)
    total = start + end
    if total > limits.max_blob_size:
        raise LocalProtocolError(
            f"state encodes to {total} bytes, more than max_blob_size={limits.max_blob_size}"
        )
    if len(prefix) % 8:
        raise LocalProtocolError("a prefix must keep the blob 8-byte aligned")

    # One buffer of the final size.  numpy's allocator asks the kernel for huge
    # pages on large buffers; a bytearray of the same size costs about 4x as
    # much to allocate and zero (bench/bench_tensors.py).  np.empty does not
    # zero, so every byte outside the tensors' data is written explicitly.
    whole = np.empty(len(prefix) + total, np.uint8)
    whole[: len(prefix)] = np.frombuffer(prefix, np.uint8)
    out = whole[len(prefix) :]
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, bytes(3), len(header))
    out[:start] = np.frombuffer(preamble + header + bytes(start - header_end), np.uint8)
    prev_end = start
    for array, wire, offset in layout:
        begin = start + offset
        out[prev_end:begin] = 0  # padding
        prev_end = begin + array.nbytes
        if array.size:
            dst = out[begin:prev_end].view(WIRE_DTYPES[wire]).reshape(array.shape)
            src = array.view(_words16(array)) if wire == "bf16" else array
            np.copyto(dst, src, casting="equiv")  # one copy; fixes strides and byte order
    return whole.data


def _check_local_name(name: object, seen: set[str], limits: Limits) -> bytes:
    if not isinstance(name, str) or not name:
        raise LocalProtocolError(f"tensor names must be non-empty strings, got {name!r}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"tensor name {name!r} is not valid Unicode") from None
    if len(raw) > limits.max_tensor_name:
        raise LocalProtocolError(
            f"tensor name {name!r} has {len(raw)} bytes, "
            f"more than max_tensor_name={limits.max_tensor_name}"
        )
    if name in seen:
        raise LocalProtocolError(f"duplicate tensor name {name!r}")
    seen.add(name)
    return raw


# --------------------------------------------------------------------------
# decoding


class _Header:
    """A bounds-checked cursor over the header bytes."""

    __slots__ = ("end", "mv", "pos")

    def __init__(self, mv: memoryview, end: int) -> None:
        self.mv = mv
        self.pos = PREAMBLE_SIZE
        self.end = end

    def take(self, n: int, what: str) -> int:
        pos = self.pos
        if n > self.end - pos:
            raise TensorDecodeError(
                f"header truncated: {what} needs {n} bytes at header byte "
                f"{pos - PREAMBLE_SIZE}, {self.end - pos} left"
            )
        self.pos = pos + n
        return pos

    def uint(self, fmt: struct.Struct, what: str) -> int:
        value: int = fmt.unpack_from(self.mv, self.take(fmt.size, what))[0]
        return value

    def raw(self, n: int, what: str) -> bytes:
        pos = self.take(n, what)
        return bytes(self.mv[pos : pos + n])


@attrs.frozen
class _Entry:
    name: str
    wire: str
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int


def decode_state(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits = DEFAULT_LIMITS,
    expected: Mapping[str, TensorSpec] | None = None,
    max_abs: float | None = None,
) -> DecodedState:
    """Decode a blob made by :func:`encode_state` into zero-copy numpy views.

    Checks, in this order and before any array exists: the total size against
    ``limits.max_blob_size``; the preamble; the header length against the
    buffer; the tensor count, ranks and names against ``limits``; every
    dtype against the allow-list; every shape's byte size (computed with
    Python integers) against the declared length and the bytes present; the
    offsets, padding and absence of trailing bytes; and, with ``expected``,
    that names, order, wire dtypes and shapes match it exactly.  Then it
    creates the arrays and rejects NaN/Inf in floating tensors and bool bytes
    other than 0 and 1; with ``max_abs``, also any value (of any numeric dtype)
    beyond it in absolute value, in the same pass.

    The arrays view ``data``: writable if ``data`` is, and they keep it alive.

    Raises :class:`TensorDecodeError` for anything wrong with the bytes, and
    :class:`~fedup.errors.LocalProtocolError` if ``data`` is a non-contiguous
    buffer.
    """
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise LocalProtocolError("decode_state needs a contiguous buffer")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    size = mv.nbytes
    if size > limits.max_blob_size:
        raise TensorDecodeError(
            f"blob of {size} bytes exceeds max_blob_size={limits.max_blob_size}"
        )
    entries, start = _parse_layout(mv, limits)
    if expected is not None:
        check_specs({e.name: TensorSpec(e.wire, e.shape) for e in entries}, expected)

    arrays: dict[str, Array] = {}
    dtypes: dict[str, str] = {}
    for e in entries:
        dtype = WIRE_DTYPES[e.wire]
        count = e.nbytes // dtype.itemsize
        array = np.frombuffer(mv, dtype, count, start + e.offset).reshape(e.shape)
        if max_abs is None:
            check_finite(e.name, array, e.wire)
        else:
            check_magnitude(e.name, array, e.wire, max_abs)
        if e.wire == "bool" and count and int(array.view(np.uint8).max()) > 1:
            raise TensorDecodeError(f"tensor {e.name!r}: bool bytes must be 0 or 1")
        arrays[e.name] = array
        dtypes[e.name] = e.wire
    return DecodedState(arrays, dtypes)


def _parse_layout(mv: memoryview, limits: Limits) -> tuple[list[_Entry], int]:
    """Check preamble, header, offsets and padding; return entries and data start."""
    size = mv.nbytes
    if size < PREAMBLE_SIZE:
        raise TensorDecodeError(
            f"blob of {size} bytes is shorter than the {PREAMBLE_SIZE}-byte preamble"
        )
    magic, version, reserved, hlen = _PREAMBLE.unpack_from(mv, 0)
    if magic != MAGIC:
        raise TensorDecodeError(
            f"not a model-state blob: magic {bytes(magic)!r}, expected {MAGIC!r}"
        )
    if version != FORMAT_VERSION:
        raise TensorDecodeError(
            f"unsupported blob format version {version}, expected {FORMAT_VERSION}"
        )
    if reserved != bytes(3):
        raise TensorDecodeError("reserved preamble bytes must be zero")
    if hlen > size - PREAMBLE_SIZE:
        raise TensorDecodeError(
            f"header length {hlen} exceeds the {size - PREAMBLE_SIZE} bytes after the preamble"
        )
    header_end = PREAMBLE_SIZE + hlen
    start = _align(header_end)
    if start > size:
        raise TensorDecodeError(
            f"blob truncated in the padding after the header ({size} bytes, needs {start})"
        )
    if any(mv[header_end:start]):
        raise TensorDecodeError("padding after the header must be zero")

    h = _Header(mv, header_end)
    count = h.uint(_U32, "the tensor count")
    if count > limits.max_tensors:
        raise TensorDecodeError(f"{count} tensors exceed max_tensors={limits.max_tensors}")
    entries: list[_Entry] = []
    seen: set[str] = set()
    end = 0  # end of the previous tensor's data, from the data section's start
    for index in range(count):
        name = _read_name(h, index, seen, limits)
        dlen = h.uint(_U8, f"tensor {name!r} dtype length")
        raw_dtype = h.raw(dlen, f"tensor {name!r} dtype")
        wire = raw_dtype.decode("ascii", "replace")
        if wire not in WIRE_DTYPES:
            raise TensorDecodeError(f"tensor {name!r}: unknown dtype {wire!r}")
        rank = h.uint(_U8, f"tensor {name!r} rank")
        if rank > limits.max_tensor_rank:
            raise TensorDecodeError(
                f"tensor {name!r}: rank {rank} exceeds max_tensor_rank={limits.max_tensor_rank}"
            )
        pos = h.take(8 * rank, f"tensor {name!r} shape")
        shape: tuple[int, ...] = struct.unpack_from(f">{rank}Q", mv, pos)
        offset, declared = _TAIL.unpack_from(
            mv, h.take(_TAIL.size, f"tensor {name!r} offset and length")
        )

        itemsize = WIRE_DTYPES[wire].itemsize
        needed = itemsize
        nonzero = itemsize
        for d in shape:
            needed *= d
            nonzero *= d or 1
        if nonzero > limits.max_blob_size:  # also bounds shapes with a zero dimension
            raise TensorDecodeError(
                f"tensor {name!r}: shape {shape} {wire} is larger than "
                f"max_blob_size={limits.max_blob_size}"
            )
        if declared != needed:
            raise TensorDecodeError(
                f"tensor {name!r}: header declares {declared} bytes, "
                f"shape {shape} {wire} needs {needed}"
            )
        want_offset = _align(end)
        if offset != want_offset:
            raise TensorDecodeError(
                f"tensor {name!r}: data offset {offset}, expected {want_offset}"
            )
        present = max(0, size - start - offset)
        if needed > present:
            raise TensorDecodeError(
                f"tensor {name!r}: {present} bytes of data, shape {shape} {wire} needs {needed}"
            )
        if any(mv[start + end : start + offset]):
            raise TensorDecodeError(f"padding before tensor {name!r} must be zero")
        entries.append(_Entry(name, wire, shape, offset, needed))
        end = offset + needed
    if h.pos != header_end:
        raise TensorDecodeError(f"{header_end - h.pos} unused bytes at the end of the header")
    if size != start + end:
        raise TensorDecodeError(f"{size - start - end} trailing bytes after the last tensor")
    return entries, start


def _read_name(h: _Header, index: int, seen: set[str], limits: Limits) -> str:
    nlen = h.uint(_U16, f"tensor #{index} name length")
    if nlen == 0:
        raise TensorDecodeError(f"tensor #{index} has an empty name")
    if nlen > limits.max_tensor_name:
        raise TensorDecodeError(
            f"tensor #{index}: name of {nlen} bytes exceeds "
            f"max_tensor_name={limits.max_tensor_name}"
        )
    raw = h.raw(nlen, f"tensor #{index} name")
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TensorDecodeError(f"tensor #{index}: name is not valid UTF-8: {raw!r}") from None
    if name in seen:
        raise TensorDecodeError(f"duplicate tensor name {name!r}")
    seen.add(name)
    return name


# --------------------------------------------------------------------------
# a fixed layout: encoding and decoding states of one model again and again


@attrs.frozen(eq=False)
class LayoutRun:
    """Consecutive tensors of one wire dtype, with the padding between them: one
    array to copy into and one to check (padding is zero, a harmless value)."""

    wire: str
    begin: int  # byte offsets in the blob
    end: int
    entries: tuple[int, ...]  # indices into the layout's entries
    pads: tuple[Array | None, ...]  # zero elements after each entry, if any


class StateLayout:
    """The layout of one model's states: names, wire dtypes, shapes and offsets.

    A ring passes states of one model around thousands of times; their layout
    never changes.  Built once (from a sample state), a layout encodes a state
    by writing its fixed header bytes and copying each tensor's data to its
    known offset, and decodes one by checking that the header bytes are those
    exact bytes (one comparison: the one layout check) before viewing each
    tensor, so neither side walks the header again.  The bytes are those of
    :func:`encode_state`, and :func:`decode_state` accepts them.

    Tensors of one wire dtype that follow each other form a *run* (all of a
    float32 model's tensors are one run): encoding copies a run with one
    ``concatenate``, and the values are checked one run at a time (one pass
    over all the floats of such a model), tensor by tensor only to name the
    one at fault.
    """

    def __init__(
        self,
        sample: TensorsLike,
        *,
        dtypes: Mapping[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        blob = encode_state(sample, dtypes=dtypes, limits=limits)
        entries, start = _parse_layout(blob, limits)
        self.entries: tuple[_Entry, ...] = tuple(entries)
        self.start = start
        """Bytes of the preamble, the header and its padding."""
        self.head = bytes(blob[:start])
        self.size = blob.nbytes
        self.names = tuple(e.name for e in entries)
        self._native = tuple(WIRE_DTYPES[e.wire].newbyteorder("=") for e in entries)
        self.runs = _runs_of(self.entries, start)
        """The runs of tensors of one wire dtype, in order (:class:`LayoutRun`)."""
        inner = np.zeros(self.size, bool)
        inner[:start] = True
        for e in self.entries:
            inner[start + e.offset : start + e.offset + e.nbytes] = True
        self._padding = np.flatnonzero(~inner)
        """Positions of the padding bytes (between tensors and after the last)."""

    def encode(self, arrays: Sequence[Array], *, prefix: bytes = b"") -> memoryview:
        """The blob of ``arrays`` (in this layout's order, each of its entry's shape and
        wire dtype), behind ``prefix`` (a multiple of 8 bytes) in one buffer.

        Raises :class:`~fedup.errors.LocalProtocolError` for an array that does not
        fit its entry.
        """
        if len(prefix) % 8:
            raise LocalProtocolError("a prefix must keep the blob 8-byte aligned")
        if len(arrays) != len(self.entries):
            raise LocalProtocolError(f"{len(arrays)} arrays for a layout of {len(self.entries)}")
        for e, native, array in zip(self.entries, self._native, arrays, strict=True):
            if e.wire == "bf16":  # 16-bit words, signed or not
                fits = array.dtype.kind in "iu" and array.dtype.itemsize == 2
            else:
                fits = array.dtype.newbyteorder("=") == native
            if not fits or array.shape != e.shape:
                raise LocalProtocolError(f"tensor {e.name!r} does not fit the layout")
        whole = np.zeros(len(prefix) + self.size, np.uint8)
        whole[: len(prefix)] = np.frombuffer(prefix, np.uint8)
        out = whole[len(prefix) :]
        out[: self.start] = np.frombuffer(self.head, np.uint8)
        for run in self.runs:
            pieces: list[Array] = []
            for i, pad in zip(run.entries, run.pads, strict=True):
                array = arrays[i]
                if self.entries[i].wire == "bf16":
                    array = array.view(_words16(array))
                pieces.append(array.reshape(-1))
                if pad is not None:
                    pieces.append(pad)
            dst = out[run.begin : run.end].view(WIRE_DTYPES[run.wire])
            np.concatenate(pieces, out=dst, casting="equiv")
        return whole.data

    def decode(
        self,
        data: bytes | bytearray | memoryview,
        *,
        max_abs: float | None = None,
        check_values: bool = True,
    ) -> DecodedState:
        """Views of the tensors of ``data``, which must be exactly this layout's bytes.

        Raises :class:`TensorDecodeError` for another size or header (another
        model: names, dtypes or shapes differ), padding that is not zero, NaN or
        Inf, a value beyond ``max_abs`` (when given), or bool bytes other than 0
        and 1.  With ``check_values=False`` the values are left to the caller;
        the layout, the padding and the bool bytes are always checked.
        """
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if mv.nbytes != self.size or mv[: self.start] != self.head:
            raise TensorDecodeError(
                "the state's layout (tensor names, dtypes or shapes) is not the model's"
            )
        raw = np.frombuffer(mv, np.uint8)
        if raw[self._padding].any():
            raise TensorDecodeError("padding between tensors must be zero")
        problem = self._problem(mv, max_abs, values=check_values)
        if problem is not None:
            raise TensorDecodeError(problem)
        arrays: dict[str, Array] = {}
        dtypes: dict[str, str] = {}
        for e in self.entries:
            dtype = WIRE_DTYPES[e.wire]
            array = np.frombuffer(mv, dtype, e.nbytes // dtype.itemsize, self.start + e.offset)
            arrays[e.name] = array.reshape(e.shape)
            dtypes[e.name] = e.wire
        return DecodedState(arrays, dtypes)

    def value_problem(self, data: bytes | bytearray | memoryview, max_abs: float) -> str | None:
        """Why the values of ``data`` (this layout's bytes, as :meth:`encode` made
        them) cannot travel: a tensor holds NaN or Inf, or a value beyond
        ``max_abs``; None if every value is fine.  The same rule :meth:`decode`
        applies with ``max_abs``, for a sender to check its own state."""
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        if mv.nbytes != self.size:
            raise LocalProtocolError(f"{mv.nbytes} bytes for a layout of {self.size}")
        return self._problem(mv, max_abs, values=True)

    def _problem(self, mv: memoryview, max_abs: float | None, *, values: bool) -> str | None:
        """The first problem with the values (and bool bytes) of ``mv``, one run at a time."""
        for run in self.runs:
            dtype = WIRE_DTYPES[run.wire]
            whole = np.frombuffer(mv, dtype, (run.end - run.begin) // dtype.itemsize, run.begin)
            if run.wire == "bool":
                if int(whole.view(np.uint8).max()) > 1:
                    return self._culprit(mv, run, max_abs)
            elif values and _run_problem(whole, run.wire, max_abs):
                return self._culprit(mv, run, max_abs)
        return None

    def _culprit(self, mv: memoryview, run: LayoutRun, max_abs: float | None) -> str:
        """What is wrong with the first tensor of ``run`` at fault."""
        dtype = WIRE_DTYPES[run.wire]
        for i in run.entries:
            e = self.entries[i]
            array = np.frombuffer(mv, dtype, e.nbytes // dtype.itemsize, self.start + e.offset)
            if e.wire == "bool":
                if array.size and int(array.view(np.uint8).max()) > 1:
                    return f"tensor {e.name!r}: bool bytes must be 0 or 1"
                continue
            try:
                if max_abs is None:
                    check_finite(e.name, array, e.wire)
                else:
                    check_magnitude(e.name, array, e.wire, max_abs)
            except TensorDecodeError as exc:
                return exc.reason
        raise AssertionError("a run with a problem has a tensor with that problem")


def _run_problem(values: Array, wire: str, max_abs: float | None) -> bool:
    """Whether a run of one wire dtype holds a value its tensors may not."""
    if max_abs is None:
        try:
            check_finite("", values, wire)
        except TensorDecodeError:
            return True
        return False
    return magnitude_problem(values, wire, max_abs) is not None


def _runs_of(entries: Sequence[_Entry], start: int) -> tuple[LayoutRun, ...]:
    """Group ``entries`` into runs of one wire dtype (see :class:`LayoutRun`)."""
    runs: list[LayoutRun] = []
    group: list[int] = []

    def close() -> None:
        if not group:
            return
        first, last = entries[group[0]], entries[group[-1]]
        dtype = WIRE_DTYPES[first.wire]
        pads: list[Array | None] = []
        for i, j in itertools.pairwise(group):
            gap = entries[j].offset - entries[i].offset - entries[i].nbytes
            pads.append(np.zeros(gap // dtype.itemsize, dtype) if gap else None)
        pads.append(None)  # after the run's last tensor, the padding lies outside it
        begin = start + first.offset
        end = start + last.offset + last.nbytes
        if end > begin:
            runs.append(LayoutRun(first.wire, begin, end, tuple(group), tuple(pads)))
        group.clear()

    for i, e in enumerate(entries):
        if group and (
            entries[group[-1]].wire != e.wire
            or (e.offset - entries[group[-1]].offset - entries[group[-1]].nbytes)
            % WIRE_DTYPES[e.wire].itemsize
        ):
            close()
        group.append(i)
    close()
    return tuple(runs)
