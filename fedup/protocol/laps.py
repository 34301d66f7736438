"""Lap arithmetic and the stopping rule of ring training, as pure values.

Positions.  The model's journey is a sequence of hops.  A hop is named by
``(lap, hop)``: in lap ``L`` the model visits the live members in ring order,
and ``hop`` is the receiving member's index among the live members (hop 0 is
the leader, the lowest live member, who starts every lap).  Laps count from
0: the leader trains ``(0, 0)`` on the initial model.  After the last live
member trains, the model returns to the leader as ``(L + 1, 0)``.  Laps
``0 .. max_laps - 1`` train; lap ``max_laps`` only evaluates the last lap's
output, and the hand-over ``(max_laps + 1, 0)`` closes it and ends the run
(:data:`last_lap`).

The stopping rule.  The output of lap ``L`` (the *candidate*) is evaluated by
every member during lap ``L + 1``; its federated validation loss is known when
lap ``L + 2`` begins, and :meth:`StopState.judge` applies the rule to it: a lap
*improves* when its loss is below ``(1 - tolerance)`` times the loss at the
last improvement; the best lap is the one with the lowest loss.  Training
stops after ``patience`` judged laps in a row without improvement
(``converged``) or once the output of lap ``max_laps - 1`` was judged
(``max-laps``); :meth:`StopState.holds` says whether the rule holds.  The final
model is the best lap's output.

:class:`Progress` is what the ring metadata says about a run's progress; the
custody machine (:mod:`fedup.protocol.custody`) checks every blob's progress
against the progress its receiver saw last, so no member can rewrite the
history, reset the stopping state or end the run when the rule does not hold.
"""

from __future__ import annotations

import math

import attrs

from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import Ring


@attrs.frozen(order=True)
class Position:
    """Where the model is: lap (from 0) and hop (the receiver's index in the live ring)."""

    lap: int
    hop: int

    def __str__(self) -> str:
        return f"lap {self.lap} hop {self.hop}"


HISTORY_WINDOW = 8
"""Lap results a ring state's metadata carries: the most recent, oldest first (every
member keeps the whole history itself)."""


def next_position(ring: Ring, sender: PeerId, current: Position) -> tuple[PeerId, Position]:
    """Where ``sender``, holding the model at ``current``, sends it next.

    The successor is the next live member; if that is the leader, a new lap begins.
    """
    successor = ring.successor(sender)
    if successor == ring.leader:
        return successor, Position(current.lap + 1, 0)
    return successor, Position(current.lap, ring.position(successor))


def last_lap(max_laps: int) -> int:
    """The highest lap a hand-over can name: ``max_laps + 1`` (only its hop 0, which
    closes the evaluation-only lap ``max_laps`` and ends the run)."""
    return max_laps + 1


def max_hops(members: int, max_laps: int) -> int:
    """The most hops a run of ``members`` members can make: every member at every lap
    ``0 .. max_laps`` (the last only evaluates), and the hop ``(max_laps + 1, 0)`` that
    closes the run.  Each hop signs one statement of the model's provenance
    (:mod:`fedup.protocol.provenance`)."""
    return (max_laps + 1) * members + 1


@attrs.frozen
class LapRecord:
    """The federated evaluation of one lap's output, as the ring metadata carries it."""

    lap: int
    """The lap whose output was evaluated (-1 = the initial model)."""
    loss: float
    """Federated validation loss (mean over the union of validation splits)."""
    accuracy: float
    auc: float
    """ROC AUC from the pooled score histograms (binned; NaN for non-binary tasks)."""
    n: int
    """Validation samples it was evaluated on."""
    samples: int
    """Training samples processed by the federation up to the end of that lap."""

    def same_as(self, other: LapRecord) -> bool:
        """Equal field by field, NaN equal to NaN (an AUC may be NaN)."""
        return all(
            a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
            for a, b in zip(attrs.astuple(self), attrs.astuple(other), strict=True)
        )


@attrs.frozen
class StopState:
    """The stopping rule's memory: the best lap and the laps since the last improvement."""

    best_lap: int = -2
    """The lap whose output is the best so far (-2: nothing judged yet)."""
    best_loss: float = math.inf
    ref_loss: float = math.inf
    """The loss at the last improvement beyond the tolerance."""
    stale: int = 0
    """Judged laps since that improvement."""

    def judge(self, record: LapRecord, *, tolerance: float) -> tuple[StopState, bool]:
        """The state after judging ``record``, and whether that lap improved."""
        best_lap, best_loss = self.best_lap, self.best_loss
        if record.loss < best_loss:
            best_lap, best_loss = record.lap, record.loss
        if math.isfinite(record.loss) and record.loss < self.ref_loss * (1 - tolerance):
            return StopState(best_lap, best_loss, record.loss, 0), True
        return StopState(best_lap, best_loss, self.ref_loss, self.stale + 1), False

    def holds(self, *, judged_lap: int, patience: int, max_laps: int) -> bool:
        """Whether training stops once the output of ``judged_lap`` has been judged."""
        return self.stale >= patience or judged_lap >= max_laps - 1

    def reason(self, *, patience: int) -> str:
        """``converged`` or ``max-laps``: which half of the rule ended a finished run."""
        return "converged" if self.stale >= patience else "max-laps"


@attrs.frozen
class Progress:
    """What a ring state's metadata says about the run; checked by the custody machine."""

    lap: int
    """The lap of the last hop trained (-1: none yet)."""
    hop: int
    """That hop's ring position (-1: none yet)."""
    done: bool
    """The stopping rule held when the last lap was closed: this is the final model."""
    judged_lap: int
    """The lap whose output was judged last (-2: none yet)."""
    stop: StopState
    history: tuple[LapRecord, ...]
    """The most recent judged laps, oldest first (a bounded window)."""

    @classmethod
    def initial(cls) -> Progress:
        """The progress of the initial state, before any hop."""
        return cls(-1, -1, False, -2, StopState(), ())
