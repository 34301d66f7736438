"""The training options ``start`` and ``simulate`` share, and the settings they make."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedup.commands.values import Number, of_setting, real, whole
from fedup.errors import ConfigError
from fedup.learn.privacy import DEFAULT_CLIP, MAX_CLIP, MAX_DELTA, MAX_EPSILON, DpBudget
from fedup.protocol.view import ALGORITHMS, RunSettings

DEFAULTS = RunSettings()

RUN_OPTIONS: tuple[tuple[str, Number, str], ...] = (
    ("max_laps", of_setting("max_laps"), "stop after this many laps"),
    ("patience", of_setting("patience"), "laps without improvement before stopping"),
    ("tolerance", of_setting("tolerance"), "relative improvement that counts"),
    ("local_epochs", of_setting("local_epochs"), "passes over local data per hop"),
    ("lr", of_setting("lr"), "learning rate"),
    ("batch_size", of_setting("batch_size"), "minibatch size"),
    ("sub_rings", of_setting("sub_rings"),
     "--mode hybrid: sub-rings the members are split into (0: the nearest whole number to "
     "the square root of the members)"),
    ("sync_laps", of_setting("sync_laps"),
     "--mode hybrid: laps each sub-ring runs between two averages"),
)  # fmt: skip
"""``(name, type, help)``; the default of each is ``RunSettings``'s, its range
:data:`~fedup.protocol.view.SETTINGS_BOUNDS`'s."""


MODE_HELP = (
    "how the federation trains: ring (the model goes round the members), parallel "
    "(every member trains at once, then a ring all-reduce averages) or hybrid (sub-rings "
    "train in sequence side by side, then the all-reduce averages their models; "
    "docs/parallel.md); the leader's choice is the federation's"
)


def mode_name(text: str) -> str:
    """``--mode``: a training algorithm of :data:`~fedup.protocol.view.ALGORITHMS`."""
    if text not in ALGORITHMS:
        raise ValueError(f"--mode must be one of {', '.join(ALGORITHMS)}, got {text!r}")
    return text


def run_settings(values: Mapping[str, Any], **more: Any) -> RunSettings:
    """The run settings from the options' values (and ``more`` fields, e.g. ``seed``)."""
    try:
        return RunSettings(
            **{name: values[name] for name, _, _ in RUN_OPTIONS},
            algorithm=values.get("mode") or DEFAULTS.algorithm,
            **more,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    # RunSettings raises ConfigError itself for a value outside SETTINGS_BOUNDS


DP_OPTIONS: tuple[tuple[str, Number, float | None, str], ...] = (
    ("dp_epsilon", real(0, MAX_EPSILON, open_lo=True), None,
     "train with differential privacy (DP-SGD) within this epsilon for the whole run; "
     "a local choice, needs --dp-delta and Opacus (pip install 'fedup[dp]')"),
    ("dp_delta", real(0, MAX_DELTA, open_lo=True), None,
     "the delta of that budget (well below 1 / this peer's rows, e.g. 1e-5)"),
    ("dp_clip", real(0, MAX_CLIP, open_lo=True), DEFAULT_CLIP,
     "DP: each row's gradient is clipped to this norm"),
)  # fmt: skip
"""``(name, type, default, help)`` of the differential privacy options: each member's own
budget, in no digest and not in the view (:mod:`fedup.learn.privacy`)."""


def dp_budget(values: Mapping[str, Any]) -> DpBudget | None:
    """The DP budget the options ask for, or None without ``--dp-epsilon``; one-line
    :class:`ConfigError` when ``--dp-epsilon`` and ``--dp-delta`` do not come together."""
    epsilon, delta = values.get("dp_epsilon"), values.get("dp_delta")
    if epsilon is None and delta is None:
        return None
    if epsilon is None:
        raise ConfigError(
            "--dp-delta needs --dp-epsilon: give both, or neither to train without DP"
        )
    if delta is None:
        raise ConfigError("--dp-epsilon needs --dp-delta (e.g. 1e-5, well below 1 / rows)")
    clip = values.get("dp_clip")
    return DpBudget(float(epsilon), float(delta), DEFAULT_CLIP if clip is None else float(clip))


MLP_LAYERS = 3
"""The built-in MLP's ``Linear`` layers (two hidden, one output): the most
``--personal-layers`` can ask for."""

PERSONAL_OPTION: tuple[str, Number, int, str] = (
    "personal_layers", whole(0, MLP_LAYERS), 0,
    "after the run, fine-tune the shared model's last K layers on this peer's own data "
    "into personal.safetensors (never sent; a local choice); 0: off",
)  # fmt: skip
"""``(name, type, default, help)`` of ``--personal-layers`` (:mod:`fedup.peer.personal`)."""
