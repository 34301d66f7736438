"""Strict CBOR (RFC 8949) for input from strangers, and deterministic encoding.

Every control message, record and envelope FedUp sends is one CBOR data item.
General-purpose decoders are too generous for bytes from the network: cbor2
ignores trailing bytes, follows tags, builds datetimes and bignums, and accepts
indefinite lengths.  This module implements only the small subset FedUp uses,
and rejects everything else with :class:`CBORDecodeError`.

The accepted subset (see ``docs/protocol-encoding.md`` for the full rules):

* unsigned and negative integers (major types 0 and 1) up to 64 bits;
* byte strings (major 2, returned as :class:`bytes`) and text strings (major 3,
  valid UTF-8, returned as :class:`str`), both of definite length;
* arrays (major 4, returned as :class:`list`) and maps (major 5, returned as
  :class:`dict`) of definite length, whose keys are integers or text strings
  and are never repeated;
* ``false``, ``true``, ``null`` and finite half, single and double floats.

Every head (the initial byte and its argument) must use the shortest form.
Tags, ``undefined``, other simple values, indefinite lengths, ``break`` and
the reserved additional-information values 28-30 are rejected.

**Depth.**  The top-level data item is at depth 0; the elements of an array
and the keys and values of a map at depth *d* are at depth *d + 1*.  Input is
rejected when any data item would be at a depth greater than ``max_depth``.
So with ``max_depth=0`` only a scalar or an empty array or map is accepted,
and ``[1]`` or ``{"a": 1}`` needs ``max_depth >= 1``.

:func:`encode` writes RFC 8949 section 4.2.1 "core deterministic encoding",
so equal values always give equal bytes (signatures are computed over them).
"""

from __future__ import annotations

import math
import struct

from fedup.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["MAX_DEPTH_CEILING", "CBORDecodeError", "Encoded", "decode", "encode"]

MAX_DEPTH_CEILING = 256
"""Largest nesting depth :func:`decode` and :func:`encode` handle.

Both recurse once per level; 256 keeps them far below Python's recursion limit
while being sixteen times deeper than any FedUp message (``Limits.max_cbor_depth``).
"""

_UINT64_MAX = 2**64 - 1
_F16 = struct.Struct(">e")
_F32 = struct.Struct(">f")
_F64 = struct.Struct(">d")
# Smallest argument that needs additional information 24, 25, 26, 27.
_SHORTEST_MIN = (24, 0x100, 0x10000, 0x100000000)
_MAJOR_NAMES = (
    "unsigned integer",
    "negative integer",
    "byte string",
    "text string",
    "array",
    "map",
    "tag",
    "simple value or float",
)


class CBORDecodeError(RemoteProtocolError):
    """Bytes from outside are not exactly one value of the accepted CBOR subset.

    ``reason`` names the rule that was broken and, where it helps, the byte
    offset at which it was found.
    """


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


class Encoded:
    """One data item already encoded by :func:`encode`, written as it is.

    For a value that is also needed on its own (the ring metadata, whose bytes
    a content digest covers): encoded once, then placed in a larger item.
    Only bytes from :func:`encode` keep the larger item deterministic.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def encode(value: object) -> bytes:
    """Return the deterministic CBOR encoding of ``value``.

    Accepted: ``None``, :class:`bool`, :class:`int` in ``[-2**64, 2**64 - 1]``,
    finite :class:`float`, :class:`str`, :class:`bytes`, :class:`bytearray` and
    :class:`memoryview` (encoded as byte strings), :class:`list` and
    :class:`tuple` (arrays), and :class:`dict` whose keys are :class:`str` or
    :class:`int` (not :class:`bool`), and :class:`Encoded` items (written as
    they are).  Heads use the shortest form, lengths are
    definite, map entries are sorted by the bytewise order of their encoded
    keys, and each float takes the shortest of half, single or double
    precision that represents it exactly (``-0.0`` keeps its sign).

    Raises :class:`~fedup.errors.LocalProtocolError` (a bug in the caller) for
    any other type, a NaN or infinite float, an integer out of range, a map key
    of another type, a string that cannot be UTF-8 encoded (lone surrogates),
    or nesting deeper than :data:`MAX_DEPTH_CEILING` (which includes cycles).
    """
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _head(out: bytearray, major: int, arg: int) -> None:
    mt = major << 5
    if arg < 24:
        out.append(mt | arg)
    elif arg < 0x100:
        out.append(mt | 24)
        out.append(arg)
    elif arg < 0x10000:
        out.append(mt | 25)
        out += arg.to_bytes(2, "big")
    elif arg < 0x100000000:
        out.append(mt | 26)
        out += arg.to_bytes(4, "big")
    else:
        out.append(mt | 27)
        out += arg.to_bytes(8, "big")


def _encode_float(x: float, out: bytearray) -> None:
    if not math.isfinite(x):
        raise LocalProtocolError(f"cannot encode the non-finite float {x!r} as CBOR")
    try:
        single = _F32.pack(x)
    except OverflowError:
        single = None
    if single is None or _F32.unpack(single)[0] != x:  # the usual case: a double
        out.append(0xFB)
        out += _F64.pack(x)
        return
    try:  # every half is a single, so only a single may be a half
        half = _F16.pack(x)
    except OverflowError:
        half = None
    if half is not None and _F16.unpack(half)[0] == x:
        out.append(0xF9)
        out += half
    else:
        out.append(0xFA)
        out += single


def _encode(value: object, out: bytearray, depth: int) -> None:
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if 0 <= value <= _UINT64_MAX:
            _head(out, 0, value)
        elif -(2**64) <= value < 0:
            _head(out, 1, -1 - value)
        else:
            raise LocalProtocolError(f"integer {value} does not fit in 64-bit CBOR")
    elif isinstance(value, float):
        _encode_float(value, out)
    elif isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"text is not encodable as UTF-8: {exc}") from None
        _head(out, 3, len(data))
        out += data
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        _head(out, 2, len(data))
        out += data
    elif isinstance(value, list | tuple):
        _check_encode_depth(value, depth)
        _head(out, 4, len(value))
        for item in value:
            if type(item) is int and 0 <= item < 0x100:  # counts: the common array item
                if item >= 24:
                    out.append(0x18)
                out.append(item)
            else:
                _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        _check_encode_depth(value, depth)
        pairs: list[tuple[bytes, object]] = []
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise LocalProtocolError(
                    f"CBOR map keys must be str or int, not {type(key).__name__}"
                )
            key_buf = bytearray()
            _encode(key, key_buf, depth + 1)
            pairs.append((bytes(key_buf), item))
        pairs.sort(key=lambda pair: pair[0])
        _head(out, 5, len(pairs))
        for encoded_key, item in pairs:
            out += encoded_key
            _encode(item, out, depth + 1)
    elif isinstance(value, Encoded):
        out += value.data
    else:
        raise LocalProtocolError(f"cannot encode {type(value).__name__} as CBOR")


def _check_encode_depth(container: object, depth: int) -> None:
    if container and depth >= MAX_DEPTH_CEILING:
        raise LocalProtocolError(
            f"value nests deeper than {MAX_DEPTH_CEILING} levels (is it cyclic?)"
        )


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def decode(data: bytes | bytearray | memoryview, *, max_size: int, max_depth: int) -> object:
    """Decode ``data``, which must be exactly one CBOR data item of the subset.

    The size check comes first: input longer than ``max_size`` bytes is
    rejected before any byte is looked at.  Then one data item is decoded and
    it must end exactly at the end of ``data``.  Every declared length or
    count is checked against the bytes that remain before anything is sliced
    or allocated, so memory use is proportional to ``len(data)``, never to a
    claim inside it.  The result is built from ``None``, :class:`bool`,
    :class:`int`, :class:`float`, :class:`str`, :class:`bytes`, :class:`list`
    and :class:`dict` only.  See the module docstring for the depth rule.

    Raises :class:`CBORDecodeError` if ``data`` is longer than ``max_size``,
    is empty or truncated, has trailing bytes, nests deeper than
    ``max_depth``, or breaks any rule of the subset (a tag, ``undefined`` or
    another simple value, NaN or infinity, an indefinite length or ``break``,
    reserved additional information, a non-shortest head, invalid UTF-8, a
    map key that is not an integer or text string, a duplicate map key, or a
    declared length larger than the bytes left).  No other exception escapes
    for any content of ``data``.

    Raises :class:`~fedup.errors.LocalProtocolError` if ``data`` is not a
    bytes-like object or ``max_depth`` is outside ``0..MAX_DEPTH_CEILING``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"cannot decode {type(data).__name__}; expected bytes")
    if not 0 <= max_depth <= MAX_DEPTH_CEILING:
        raise LocalProtocolError(f"max_depth {max_depth} is outside 0..{MAX_DEPTH_CEILING}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > max_size:
        raise CBORDecodeError(f"CBOR item of {size} bytes exceeds the limit of {max_size} bytes")
    buf = bytes(data)
    if not buf:
        raise CBORDecodeError("empty input where one CBOR data item was expected")
    value, pos = _item(buf, 0, 0, max_depth)
    if pos != len(buf):
        raise CBORDecodeError(f"{_nbytes(len(buf) - pos)} trailing after the value")
    return value


def _item(buf: bytes, pos: int, depth: int, max_depth: int) -> tuple[object, int]:
    """Decode the data item at ``buf[pos:]`` (at ``depth``); return it and its end."""
    end = len(buf)
    if pos >= end:
        raise CBORDecodeError(f"input ends at offset {pos} where a data item was expected")
    start = pos
    initial = buf[pos]
    major = initial >> 5
    info = initial & 0x1F
    if major == 7:
        return _simple(buf, pos, info)
    pos += 1
    if info < 24:
        arg = info
    elif info < 28:
        width = 1 << (info - 24)
        if pos + width > end:
            raise CBORDecodeError(
                f"head at offset {start} needs {width} argument bytes but {end - pos} are left"
            )
        arg = int.from_bytes(buf[pos : pos + width], "big")
        if arg < _SHORTEST_MIN[info - 24]:
            raise CBORDecodeError(
                f"non-shortest encoding of {_MAJOR_NAMES[major]} head at offset {start}: "
                f"{arg} written in {_nbytes(width)}"
            )
        pos += width
    elif info == 31:
        raise CBORDecodeError(
            f"indefinite-length {_MAJOR_NAMES[major]} at offset {start} is not allowed"
            if 2 <= major <= 5
            else f"additional information 31 at offset {start} is not allowed"
        )
    else:
        raise CBORDecodeError(f"reserved additional information {info} at offset {start}")

    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major == 2 or major == 3:
        left = end - pos
        if arg > left:
            raise CBORDecodeError(
                f"declared {_MAJOR_NAMES[major]} length {arg} exceeds the {_nbytes(left)} left"
            )
        stop = pos + arg
        if major == 2:
            return buf[pos:stop], stop
        try:
            return buf[pos:stop].decode("utf-8"), stop
        except UnicodeDecodeError:
            raise CBORDecodeError(f"text string at offset {start} is not valid UTF-8") from None
    if major == 4:
        left = end - pos
        if arg > left:
            raise CBORDecodeError(f"declared array of {arg} items exceeds the {_nbytes(left)} left")
        if arg and depth >= max_depth:
            raise CBORDecodeError(f"nesting deeper than {max_depth} (array at offset {start})")
        items: list[object] = []
        for _ in range(arg):
            # A one-byte unsigned integer (the usual array item) is read inline; any
            # other item, or a non-shortest or truncated one, goes through _item.
            head = buf[pos] if pos < end else 0xFF
            if head < 0x18:
                items.append(head)
                pos += 1
            elif head == 0x18 and pos + 1 < end and buf[pos + 1] >= 24:
                items.append(buf[pos + 1])
                pos += 2
            else:
                item, pos = _item(buf, pos, depth + 1, max_depth)
                items.append(item)
        return items, pos
    if major == 5:
        left = end - pos
        if 2 * arg > left:
            raise CBORDecodeError(f"declared map of {arg} pairs exceeds the {_nbytes(left)} left")
        if arg and depth >= max_depth:
            raise CBORDecodeError(f"nesting deeper than {max_depth} (map at offset {start})")
        result: dict[object, object] = {}
        for _ in range(arg):
            if pos < end and (buf[pos] >> 5) not in (0, 1, 3):
                raise CBORDecodeError(
                    f"map key at offset {pos} is a {_MAJOR_NAMES[buf[pos] >> 5]}; "
                    "only integers and text strings are allowed"
                )
            key_at = pos
            key, pos = _item(buf, pos, depth + 1, max_depth)
            if key in result:
                raise CBORDecodeError(f"map has duplicate key {_show(key)} (offset {key_at})")
            result[key], pos = _item(buf, pos, depth + 1, max_depth)
        return result, pos
    raise CBORDecodeError(f"CBOR tag {arg} is not allowed (offset {start})")


def _simple(buf: bytes, pos: int, info: int) -> tuple[object, int]:
    """Decode a major-type-7 item whose initial byte is at ``pos``."""
    if info == 20:
        return False, pos + 1
    if info == 21:
        return True, pos + 1
    if info == 22:
        return None, pos + 1
    if 25 <= info <= 27:
        fmt = (_F16, _F32, _F64)[info - 25]
        stop = pos + 1 + fmt.size
        if stop > len(buf):
            raise CBORDecodeError(
                f"float at offset {pos} needs {fmt.size} bytes but {len(buf) - pos - 1} are left"
            )
        x: float = fmt.unpack_from(buf, pos + 1)[0]
        if not math.isfinite(x):
            raise CBORDecodeError(f"float {x} at offset {pos} is not allowed (only finite)")
        return x, stop
    if info == 23:
        raise CBORDecodeError(f"undefined at offset {pos} is not allowed")
    if info == 31:
        raise CBORDecodeError(f"break (0xff) at offset {pos} is not allowed")
    if info >= 28:
        raise CBORDecodeError(f"reserved additional information {info} at offset {pos}")
    if info == 24:
        raise CBORDecodeError(f"one-byte simple value at offset {pos} is not allowed")
    raise CBORDecodeError(f"simple value {info} at offset {pos} is not allowed")


def _nbytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def _show(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."
