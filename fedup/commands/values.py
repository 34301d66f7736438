"""Option values with ranges: each numeric option says its range and default in ``--help``.

A :class:`Number` is an argparse ``type``: it turns the option's text (or a
value from a TOML file) into a number in its range, or raises
``argparse.ArgumentTypeError`` with a message such as ``must be >= 1 (got 0)``,
which argparse prints as ``argument --max-laps: must be >= 1 (got 0)``.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import attrs

from fedup.learn.device import parse_device
from fedup.protocol.records import Address
from fedup.protocol.view import SETTINGS_BOUNDS


def _show(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int) and value >= 2**32 and (value + 1).bit_count() == 1:
        return f"2^{(value + 1).bit_length() - 1}-1"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@attrs.frozen
class Number:
    """A number option's type: ``int`` or ``float``, in ``[lo, hi]`` (``(lo`` when
    ``open_lo``).  Infinity is admitted only when ``hi`` is infinite; NaN never."""

    integer: bool
    lo: float = -math.inf
    hi: float = math.inf
    open_lo: bool = False

    def __call__(self, raw: Any) -> int | float:
        value = self._parse(raw)
        got = f"(got {str(raw).strip()})"
        if math.isnan(value):
            raise argparse.ArgumentTypeError(f"must be a number {got}")
        if self.open_lo and not value > self.lo:
            raise argparse.ArgumentTypeError(f"must be > {_show(self.lo)} {got}")
        if value < self.lo:
            raise argparse.ArgumentTypeError(f"must be >= {_show(self.lo)} {got}")
        if value > self.hi or (math.isinf(value) and not math.isinf(self.hi)):
            raise argparse.ArgumentTypeError(f"must be <= {_show(self.hi)} {got}")
        return value

    def _parse(self, raw: Any) -> int | float:
        if isinstance(raw, bool):
            raise argparse.ArgumentTypeError(f"must be a number (got {raw!r})")
        if self.integer:
            if isinstance(raw, int):
                return raw
            try:
                return int(str(raw).strip())
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be a whole number (got {raw!r})") from None
        if isinstance(raw, int | float):
            return float(raw)
        try:
            return float(str(raw).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number (got {raw!r})") from None

    def describe(self) -> str:
        """The range in interval notation, e.g. ``[1, 10000]`` or ``(0, 100]``."""
        hi = f"{_show(self.hi)}]" if not math.isinf(self.hi) else "inf)"
        return f"{'(' if self.open_lo else '['}{_show(self.lo)}, {hi}"


def whole(lo: float, hi: float = math.inf) -> Number:
    return Number(integer=True, lo=lo, hi=hi)


def real(lo: float, hi: float = math.inf, *, open_lo: bool = False) -> Number:
    return Number(integer=False, lo=lo, hi=hi, open_lo=open_lo)


def of_setting(name: str) -> Number:
    """The type of a run setting, with its range from :data:`SETTINGS_BOUNDS`."""
    bound = SETTINGS_BOUNDS[name]
    return Number(integer=bound.integer, lo=bound.lo, hi=bound.hi, open_lo=bound.open_lo)


LENDER_ROWS = whole(200, 1_000_000)
"""Rows per synthetic lender (``simulate`` and ``demo``): ``fedup.demo.runner``'s
``MIN_ROWS`` (a validation split with both classes) to ``MAX_ROWS`` (a demo, not a
load test)."""

SETTLE = real(0, 600)
"""Formation settle seconds: 10 minutes at most (a peer gives up forming after 15,
``Limits.peer_wait_timeout``, so a longer settle could never form)."""

HOP_TIMEOUT = real(1, 3600)
"""``--hop-timeout`` seconds (``Limits.hop_timeout``): at least one second, for a hop's
training and one transfer; at most an hour, as long as an excluded member waits for the
final model (``Limits.excluded_wait``)."""


DEVICE_HELP = (
    "where this peer trains: auto (the first CUDA device if torch sees one, else the "
    "CPU), cpu, cuda (the first CUDA device) or cuda:N; a local choice that never "
    "travels: members with and without a GPU federate together"
)


def device_spec(text: Any) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, its form checked without
    torch (whether this machine has that device is checked when the command runs)."""
    try:
        return parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


TASK_HELP = (
    "the target's task: binary, multiclass or regression "
    "(default: inferred from its values, see docs/learning.md)"
)


def task_name(text: Any) -> str:
    """``binary``, ``multiclass`` or ``regression`` (``--task``)."""
    value = str(text).strip().lower()
    if value not in ("binary", "multiclass", "regression"):
        raise argparse.ArgumentTypeError(f"must be binary, multiclass or regression (got {text!r})")
    return value


def listen_address(text: Any) -> Address:
    """``HOST:PORT`` to listen on; port 0 picks a free port."""
    value = str(text)
    head, sep, port = value.rpartition(":")
    if sep and port.isdigit() and int(port) == 0:
        return Address(address(f"{head}:1").host, 0)
    return address(value)


UI_HOST = "127.0.0.1"
"""The federation page's host when ``--ui`` names only a port: this machine only."""


def ui_address(text: Any) -> Address:
    """``[HOST:]PORT`` of the federation page (``--ui``); the host defaults to
    :data:`UI_HOST`, port 0 picks a free one."""
    value = str(text).strip()
    if value.isdigit():
        value = f"{UI_HOST}:{value}"
    return listen_address(value)


def address(text: Any) -> Address:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` of a peer."""
    try:
        return Address.parse(str(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def described(what: str, kind: Any, default: Any, shown: str | None = None) -> str:
    """An option's help: what it is, its range (for a :class:`Number`) and its default
    (``shown`` instead of the value, e.g. for a default computed at run time)."""
    if shown is None:
        shown = _show(default) if isinstance(default, float) else str(default)
    if isinstance(kind, Number):
        shown = f"range {kind.describe()}, default: {shown}"
    else:
        shown = f"default: {shown}"
    return f"{what} ({shown})".replace("%", "%%")  # argparse formats help with %


def add_option(
    parser: argparse.ArgumentParser,
    name: str,
    kind: Any,
    default: Any,
    what: str,
    shown: str | None = None,
) -> None:
    """Add an option that takes one value of type ``kind``, its help from :func:`described`."""
    parser.add_argument(
        name, type=kind, default=default, help=described(what, kind, default, shown)
    )
