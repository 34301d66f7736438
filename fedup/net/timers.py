"""Named deadlines for a pure state machine: the machine asks, this keeps time.

The formation and custody machines never read a clock; they return
``SetTimer(name, seconds)`` and ``CancelTimer(name)`` actions.  :class:`Timers`
holds those deadlines on trio's clock and calls ``fire(name)`` when one is
reached (setting a name again replaces its deadline).  One task waits for the
earliest deadline, so a thousand idle timers cost nothing between events.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

__all__ = ["Timers"]


class Timers:
    """Deadlines by name; :meth:`run` fires each once it is due (run it in a nursery)."""

    def __init__(self, fire: Callable[[str], None]) -> None:
        self._fire = fire
        self._due: dict[str, float] = {}
        self._changed = trio.Event()

    def set(self, name: str, seconds: float) -> None:
        self._due[name] = trio.current_time() + seconds
        self._changed.set()

    def cancel(self, name: str) -> None:
        if self._due.pop(name, None) is not None:
            self._changed.set()

    def cancel_all(self) -> None:
        self._due.clear()
        self._changed.set()

    def due(self, name: str) -> float | None:
        """When ``name`` fires (trio time), or None."""
        return self._due.get(name)

    async def run(self) -> None:
        """Fire deadlines as they come due, until cancelled."""
        while True:
            self._changed = trio.Event()
            if not self._due:
                await self._changed.wait()
                continue
            name, at = min(self._due.items(), key=lambda item: item[1])
            with trio.move_on_at(at if math.isfinite(at) else math.inf):
                await self._changed.wait()
                continue
            if self._due.get(name) == at:
                del self._due[name]
                self._fire(name)
