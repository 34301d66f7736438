"""Where a peer trains: the CPU or one CUDA device, a local choice that never travels.

A device is named by a *spec*: ``auto`` (the first CUDA device when torch sees
one, else the CPU), ``cpu``, ``cuda`` (the first CUDA device) or ``cuda:N``.
:func:`parse_device` checks a spec's form (no torch: the command line checks
``--device`` without loading it); :func:`choose_device` turns it into a
``torch.device`` on this machine, or says in one line why it cannot.

The device is each member's own business: the model's layout digest
(``RunSettings.model_digest``) names tensors, dtypes and shapes, never where
they live; the ring state that travels, the files a run writes and every
digest are CPU tensors of the same dtypes whatever device trained them.  So
members with and without a GPU federate together.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from fedup.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_FORMS", "DeviceError", "choose_device", "describe_device", "parse_device"]

DEVICE_FORMS: Final = "auto, cpu, cuda or cuda:N"
"""The forms of a device spec, as messages name them."""
MAX_CUDA_INDEX: Final = 1023
"""Largest ``N`` of ``cuda:N`` the form admits (a bound on the text, not on machines:
whether device N exists is :func:`choose_device`'s question)."""
_SPEC = re.compile(r"auto|cpu|cuda(?::(\d{1,4}))?")


class DeviceError(ConfigError):
    """A device spec this machine cannot honour (CUDA asked for where there is none)."""


def parse_device(text: object) -> str:
    """The device spec ``text`` in its canonical form (lower case, no spaces).

    Raises ``ValueError`` with a one-line reason for anything that is not
    ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a whole number up to
    :data:`MAX_CUDA_INDEX`).
    """
    if not isinstance(text, str):
        raise ValueError(f"must be {DEVICE_FORMS} (got {text!r})")
    spec = text.strip().lower()
    match = _SPEC.fullmatch(spec)
    if match is None or (match.group(1) is not None and int(match.group(1)) > MAX_CUDA_INDEX):
        raise ValueError(f"must be {DEVICE_FORMS} (got {text!r})")
    if match.group(1) is not None:
        return f"cuda:{int(match.group(1))}"  # cuda:01 is cuda:1
    return spec


def choose_device(spec: str | torch.device) -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine.

    ``auto`` is ``cuda:0`` when ``torch.cuda.is_available()``, else ``cpu``;
    ``cuda`` is ``cuda:0``.  A CUDA device always comes back with its index.
    Raises :class:`DeviceError` (one line naming what this machine has) for
    ``cuda``/``cuda:N`` when CUDA is not available or has no device N, and
    ``ValueError`` for a spec that is not one of the forms.
    """
    import torch

    if isinstance(spec, torch.device):
        if spec.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be {DEVICE_FORMS} (got {str(spec)!r})")
        spec = str(spec)
    name = parse_device(spec)
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count() if available else 0
    if index < count:
        return torch.device("cuda", index)
    if count == 0:
        raise DeviceError(
            f"device {name}: this machine has no CUDA device (torch {torch.__version__} "
            "sees none); pass --device cpu or auto"
        )
    have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    raise DeviceError(
        f"device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
        f"({have}); pass one of them, cpu or auto"
    )


def describe_device(device: torch.device) -> str:
    """``device`` for a log line: ``cpu`` or ``cuda:N (the GPU's name)``."""
    if device.type != "cuda":
        return str(device)
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})"
