"""A peer's whole life as one small state table.

::

    state        event          next
    STARTING     listening      FORMING     (listening and announcing; formation runs)
    FORMING      joined         TRAINING    (a view holds; custody runs)
    FORMING      failed         FAILED
    TRAINING     finishing      FINISHING   (the final model is being saved and handed on)
    TRAINING     excluded       EXCLUDED    (the others count us as dead; we wait for the final)
    TRAINING     failed         FAILED
    EXCLUDED     finishing      FINISHING
    EXCLUDED     failed         FAILED
    FINISHING    done           DONE
    FINISHING    failed         FAILED

:class:`Lifecycle` refuses every other step with a
:class:`~fedup.errors.LocalProtocolError` (it is driven by our own code, never
by a peer's bytes: an illegal step is our bug).  Each step is recorded, so the
peer's event stream and its summary can say when it formed, trained and ended.
"""

from __future__ import annotations

import enum

import attrs

from fedup.errors import LocalProtocolError

__all__ = ["LIFE", "Life", "Lifecycle"]


class Life(enum.Enum):
    STARTING = "starting"
    FORMING = "forming"
    TRAINING = "training"
    EXCLUDED = "excluded"
    FINISHING = "finishing"
    DONE = "done"
    FAILED = "failed"


LIFE: dict[Life, dict[str, Life]] = {
    Life.STARTING: {"listening": Life.FORMING, "failed": Life.FAILED},
    Life.FORMING: {"joined": Life.TRAINING, "failed": Life.FAILED},
    Life.TRAINING: {
        "finishing": Life.FINISHING,
        "excluded": Life.EXCLUDED,
        "failed": Life.FAILED,
    },
    Life.EXCLUDED: {"finishing": Life.FINISHING, "failed": Life.FAILED},
    Life.FINISHING: {"done": Life.DONE, "failed": Life.FAILED},
    Life.DONE: {},
    Life.FAILED: {},
}
"""The transition table: state -> step -> next state."""


@attrs.define
class Lifecycle:
    """Where a peer is in its life; :meth:`step` moves it by the table."""

    state: Life = Life.STARTING
    history: list[tuple[float, Life]] = attrs.field(factory=list)
    """(time, state entered), in order."""

    def step(self, step: str, now: float) -> Life:
        """Take ``step`` at time ``now``; returns the new state."""
        nxt = LIFE[self.state].get(step)
        if nxt is None:
            raise LocalProtocolError(f"a peer that is {self.state.value} cannot take step {step!r}")
        self.state = nxt
        self.history.append((now, nxt))
        return nxt

    def can(self, step: str) -> bool:
        return step in LIFE[self.state]
