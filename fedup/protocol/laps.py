"""Lap arithmetic and the convergence rule of ring training.

Positions.  The model's journey is a sequence of hops.  A hop is named by
``(lap, hop)``: in lap ``L`` the model visits the live members in ring order,
and ``hop`` is the receiving member's index among the live members (hop 0 is
the leader, who starts every lap).  After the last live member trains, the
model returns to the leader as ``(L + 1, 0)``.  A receiver accepts only
positions strictly greater (lexicographically) than the last it accepted, so
an old blob cannot be replayed into a later hop.

Convergence.  The federation's validation loss of lap ``L`` is the
sample-weighted mean, over all live members, of the validation loss of lap
``L``'s model on each member's own validation split:
``sum(loss_sum_i) / sum(n_i)``.  Members compute their share as the model
passes during lap ``L + 1`` (``fedup.learn.ring`` carries the sums), so it is
known when lap ``L + 1`` begins.  A lap *improves* when its loss is below
``(1 - tolerance)`` times the loss at the last improvement (:func:`judge_lap`);
training stops after ``patience`` laps in a row without improvement
("converged"), or when ``max_laps`` laps are done ("max-laps").  The final
model is the lap with the lowest loss.
"""

from __future__ import annotations

import math

import attrs

from fedup.errors import LocalProtocolError
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import Ring


@attrs.frozen(order=True)
class Position:
    """Where the model is: lap (from 1) and hop (receiver's index in the live ring)."""

    lap: int
    hop: int


def next_position(ring: Ring, sender: PeerId, current: Position) -> tuple[PeerId, Position]:
    """Where ``sender``, holding the model at ``current``, sends it next.

    The successor is the next live member; if that is the leader, a new lap begins.
    """
    successor = ring.successor(sender)
    if successor == ring.leader:
        return successor, Position(current.lap + 1, 0)
    return successor, Position(current.lap, ring.position(successor))


def judge_lap(
    ref_loss: float, stale: int, loss: float, *, tolerance: float
) -> tuple[float, int, bool]:
    """Apply the improvement rule to one lap's federated loss.

    ``ref_loss`` is the loss at the last improvement (``inf`` before any) and
    ``stale`` the laps since.  Returns the new ``(ref_loss, stale, improved)``.
    """
    if math.isfinite(loss) and loss < ref_loss * (1 - tolerance):
        return loss, 0, True
    return ref_loss, stale + 1, False


@attrs.frozen
class Decision:
    """The convergence rule's verdict after a lap's federated loss is known."""

    stop: bool
    reason: str  # "continue", "converged" or "max-laps"
    best_lap: int


class ConvergenceTracker:
    """Applies the stopping rule to the federated validation loss, lap by lap."""

    def __init__(self, *, tolerance: float, patience: int, max_laps: int) -> None:
        if patience < 1 or max_laps < 1 or not 0 <= tolerance < 1:
            raise LocalProtocolError("bad convergence settings")
        self.tolerance = tolerance
        self.patience = patience
        self.max_laps = max_laps
        self.losses: list[float] = []
        self.best_lap = 0
        self.best_loss = math.inf
        self._ref_loss = math.inf
        self._stale = 0

    def add(self, lap: int, loss: float) -> Decision:
        """Record lap ``lap``'s federated loss (laps must come in order from 1)."""
        if lap != len(self.losses) + 1:
            raise LocalProtocolError(f"lap {lap} out of order (expected {len(self.losses) + 1})")
        self.losses.append(loss)
        self._ref_loss, self._stale, _ = judge_lap(
            self._ref_loss, self._stale, loss, tolerance=self.tolerance
        )
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.best_lap = loss, lap
        if self._stale >= self.patience and self.best_lap > 0:
            return Decision(True, "converged", self.best_lap)
        if lap >= self.max_laps:
            return Decision(True, "max-laps", self.best_lap)
        return Decision(False, "continue", self.best_lap)
