"""The Adam every built-in task trains with: torch's own, without its compiler import.

torch's :class:`torch.optim.Adam` wraps ``step``, ``zero_grad``, ``add_param_group``,
``state_dict`` and ``load_state_dict`` in guards for ``torch.compile``, and the
first call of any of them imports ``torch._dynamo``: 1.6 s of one core per process
here, 5.4 s where Python does not write bytecode caches (the demo's install), paid
by every peer process and by the demo's baselines, though FedUp never compiles.

:class:`Adam` is a subclass that calls the same methods without those guards
(their ``__wrapped__`` originals, which ``functools.wraps`` keeps), and takes the
step with gradients off as torch's guard does.  The arithmetic, the state (its keys,
dtypes and layout) and the hooks are torch's own: a run's results are the same,
bit for bit (``tests/unit/test_adam.py``).  A torch whose methods lack
``__wrapped__`` gets the guarded methods: slower, not different.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Adam"]


def _unguarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` without the wrappers around it (torch's compile guard; the profiling
    hook torch puts on ``step`` once an optimizer of that class was made)."""
    original: Callable[..., Any] = inspect.unwrap(method)
    return original


_ADD_PARAM_GROUP = _unguarded(torch.optim.Optimizer.add_param_group)
_ZERO_GRAD = _unguarded(torch.optim.Optimizer.zero_grad)
_STATE_DICT = _unguarded(torch.optim.Optimizer.state_dict)
_LOAD_STATE_DICT = _unguarded(torch.optim.Optimizer.load_state_dict)
_STEP = _unguarded(torch.optim.Adam.step)


class Adam(torch.optim.Adam):
    """:class:`torch.optim.Adam` whose methods never import ``torch._dynamo``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = _STATE_DICT(self)
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _LOAD_STATE_DICT(self, state_dict)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            loss: float | None = _STEP(self, closure)
        return loss
