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
        self._armed = math.inf
        """The deadline :meth:`run` sleeps until; only an earlier one needs to wake it."""

    def set(self, name: str, seconds: float) -> None:
        at = trio.current_time() + seconds
        self._due[name] = at
        if at < self._armed:
            self._changed.set()

    def cancel(self, name: str) -> None:
        self._due.pop(name, None)  # run() finds it gone when it wakes at the old deadline

    def cancel_all(self) -> None:
        self._due.clear()

    def due(self, name: str) -> float | None:
        """When ``name`` fires (trio time), or None."""
        return self._due.get(name)

    async def run(self) -> None:
        """Fire deadlines as they come due, until cancelled.

        Setting a timer wakes this task only when the new deadline is earlier than the
        one it sleeps until: a deadline pushed back again and again (a settle period
        restarted by every newcomer) costs a dictionary write, not a wake-up."""
        while True:
            self._changed = trio.Event()
            if not self._due:
                self._armed = math.inf
                await self._changed.wait()
                continue
            name, at = min(self._due.items(), key=lambda item: item[1])
            self._armed = at
            with trio.move_on_at(at if math.isfinite(at) else math.inf):
                await self._changed.wait()
                continue
            self._armed = math.inf
            if self._due.get(name) == at:
                del self._due[name]
                self._fire(name)
