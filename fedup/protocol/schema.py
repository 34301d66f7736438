"""Checking decoded CBOR maps field by field, once, at the boundary.

Every message type's ``from_cbor`` decodes bytes with the strict decoder and
then reads its fields through a :class:`FieldReader`, which checks presence,
type, size and range, and finally that no unknown field was sent.  Each
failure raises :class:`MessageError` with a reason that names the message and
the field, e.g. ``peer record: field 'seq' must be an unsigned integer``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fedup.errors import RemoteProtocolError

T = TypeVar("T")

U64_MAX = 2**64 - 1


class MessageError(RemoteProtocolError):
    """A decoded message has a missing, unknown or ill-typed field."""


class FieldReader:
    """Reads the fields of one decoded CBOR map.

    ``what`` names the message in error reasons.  Call :meth:`done` last: it
    rejects fields that were never read, so a peer cannot smuggle data in
    fields we ignore.
    """

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise MessageError(f"{what}: expected a map, got {_kind(value)}")
        self._map: dict[object, object] = value
        self._seen: set[object] = set()
        self.what = what

    def _get(self, key: str) -> object:
        if key not in self._map:
            raise MessageError(f"{self.what}: missing field {key!r}")
        self._seen.add(key)
        return self._map[key]

    def has(self, key: str) -> bool:
        """Return whether ``key`` is present (reading it is still required)."""
        return key in self._map

    def fail(self, key: str, problem: str) -> MessageError:
        """Build the error for a field whose value is wrong in a custom way."""
        return MessageError(f"{self.what}: field {key!r} {problem}")

    def uint(self, key: str, *, max_value: int = U64_MAX, min_value: int = 0) -> int:
        """Read an unsigned integer in ``[min_value, max_value]``."""
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(key, f"must be an unsigned integer, got {_kind(value)}")
        if not min_value <= value <= max_value:
            raise self.fail(key, f"must be between {min_value} and {max_value}, got {value}")
        return value

    def number(self, key: str) -> float:
        """Read a finite number (an integer or a float; the decoder rejects NaN/Inf)."""
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"must be a number, got {_kind(value)}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be a boolean, got {_kind(value)}")
        return value

    def bytestr(self, key: str, *, size: int | None = None, max_size: int | None = None) -> bytes:
        """Read a byte string of exactly ``size`` or at most ``max_size`` bytes."""
        value = self._get(key)
        if not isinstance(value, bytes):
            raise self.fail(key, f"must be a byte string, got {_kind(value)}")
        if size is not None and len(value) != size:
            raise self.fail(key, f"must be {size} bytes, got {len(value)}")
        if max_size is not None and len(value) > max_size:
            raise self.fail(key, f"must be at most {max_size} bytes, got {len(value)}")
        return value

    def text(self, key: str, *, max_bytes: int, allow_empty: bool = False) -> str:
        """Read a text string of at most ``max_bytes`` UTF-8 bytes."""
        value = self._get(key)
        if not isinstance(value, str):
            raise self.fail(key, f"must be a text string, got {_kind(value)}")
        if not value and not allow_empty:
            raise self.fail(key, "must not be empty")
        if len(value.encode("utf-8")) > max_bytes:
            raise self.fail(key, f"must be at most {max_bytes} bytes of UTF-8")
        return value

    def array(
        self, key: str, item: Callable[[object, str], T], *, max_items: int, min_items: int = 0
    ) -> list[T]:
        """Read an array whose items are each checked by ``item(value, label)``."""
        value = self._get(key)
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array, got {_kind(value)}")
        if not min_items <= len(value) <= max_items:
            raise self.fail(key, f"must have {min_items} to {max_items} items, got {len(value)}")
        return [item(v, f"{self.what}: {key}[{i}]") for i, v in enumerate(value)]

    def raw(self, key: str) -> object:
        """Read a field whose value the caller checks itself."""
        return self._get(key)

    def optional(self, key: str) -> bool:
        """Return whether the optional field ``key`` is present and not null.

        A present null counts as read.
        """
        if key not in self._map:
            return False
        if self._map[key] is None:
            self._seen.add(key)
            return False
        return True

    def done(self) -> None:
        """Reject any field that was not read."""
        unknown = [k for k in self._map if k not in self._seen]
        if unknown:
            names = ", ".join(repr(k) for k in sorted(unknown, key=repr))
            raise MessageError(f"{self.what}: unknown field(s) {names}")


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a text string"
    if isinstance(value, bytes):
        return "a byte string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__
