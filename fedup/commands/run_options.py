"""The training options ``start`` and ``simulate`` share, and the settings they make."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedup.errors import ConfigError
from fedup.protocol.view import RunSettings

DEFAULTS = RunSettings()

RUN_OPTIONS: tuple[tuple[str, Callable[[Any], Any], str], ...] = (
    ("max_laps", int, "stop after this many laps"),
    ("patience", int, "laps without improvement before stopping"),
    ("tolerance", float, "relative improvement that counts"),
    ("local_epochs", float, "passes over local data per hop"),
    ("lr", float, "learning rate"),
    ("batch_size", int, "minibatch size"),
)
"""``(name, type, help)``; the default of each is ``RunSettings``'s."""


def run_settings(values: Mapping[str, Any], **more: Any) -> RunSettings:
    """The run settings from the options' values (and ``more`` fields, e.g. ``seed``)."""
    try:
        return RunSettings(**{name: values[name] for name, _, _ in RUN_OPTIONS}, **more)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    # RunSettings raises ConfigError itself for a value outside SETTINGS_BOUNDS
