"""The training options ``start`` and ``simulate`` share, and the settings they make."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedup.commands.values import Number, of_setting
from fedup.errors import ConfigError
from fedup.protocol.view import RunSettings

DEFAULTS = RunSettings()

RUN_OPTIONS: tuple[tuple[str, Number, str], ...] = (
    ("max_laps", of_setting("max_laps"), "stop after this many laps"),
    ("patience", of_setting("patience"), "laps without improvement before stopping"),
    ("tolerance", of_setting("tolerance"), "relative improvement that counts"),
    ("local_epochs", of_setting("local_epochs"), "passes over local data per hop"),
    ("lr", of_setting("lr"), "learning rate"),
    ("batch_size", of_setting("batch_size"), "minibatch size"),
)
"""``(name, type, help)``; the default of each is ``RunSettings``'s, its range
:data:`~fedup.protocol.view.SETTINGS_BOUNDS`'s."""


def run_settings(values: Mapping[str, Any], **more: Any) -> RunSettings:
    """The run settings from the options' values (and ``more`` fields, e.g. ``seed``)."""
    try:
        return RunSettings(**{name: values[name] for name, _, _ in RUN_OPTIONS}, **more)
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    # RunSettings raises ConfigError itself for a value outside SETTINGS_BOUNDS
