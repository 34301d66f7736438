"""The checks a ring blob's metadata must pass before its receiver takes custody.

Pure functions of what the receiver already verified itself (:class:`Progress`
of the last state it took or trained) and what the blob claims.  Each returns
None when the blob passes, or a reason in words; :mod:`fedup.protocol.custody`
turns a reason into a ``bad-meta`` or ``not-final`` refusal.

What they enforce (docs/federation.md, "The member threat model"):

* the metadata names the position the sender trained at: its own place in the
  ring, one hop (or one lap's wrap) before the receiver's;
* history is append-only: every lap result the receiver saw is still there,
  unchanged, and new results come in lap order;
* the stopping state (best lap, best loss, reference loss, stale laps) is what
  the stopping rule gives from the receiver's own state and the new results,
  so nobody can reset patience, move the best lap or hide a stop;
* a model that is not final must not be one at which the rule holds, and a
  final one must be exactly one at which it holds.
"""

from __future__ import annotations

import itertools

import attrs

from fedup.protocol.laps import HISTORY_WINDOW, LapRecord, Position, Progress, StopState

__all__ = ["StopRule", "check_final_progress", "check_model_progress", "new_records"]


@attrs.frozen
class StopRule:
    """The run's stopping settings (from the signed view)."""

    patience: int
    tolerance: float
    max_laps: int


def new_records(seen: Progress, claimed: Progress) -> tuple[LapRecord, ...] | str:
    """The lap results in ``claimed`` that ``seen`` did not have, or why the histories clash.

    Returns the string ``"gap"`` when ``claimed``'s window starts after the
    newest result ``seen`` has (so some results in between were never seen
    here), which only a member that missed many laps can meet.
    """
    laps = [r.lap for r in claimed.history]
    if any(b <= a for a, b in itertools.pairwise(laps)):
        return "lap results are not in increasing lap order"
    by_lap = {r.lap: r for r in claimed.history}
    first = laps[0] if laps else None
    for old in seen.history:
        if first is not None and old.lap < first:
            continue  # fell out of the bounded window
        new = by_lap.get(old.lap)
        if new is None:
            return f"the result of lap {old.lap} disappeared from the history"
        if not new.same_as(old):
            return f"the result of lap {old.lap} was rewritten"
    newest = seen.history[-1].lap if seen.history else None
    fresh = (
        claimed.history if newest is None else tuple(r for r in claimed.history if r.lap > newest)
    )
    # A window shorter than HISTORY_WINDOW holds every result judged so far (laps whose
    # opener died unjudged are simply absent); a full one whose results are all new
    # may have pushed out results never seen here.
    full = len(claimed.history) >= HISTORY_WINDOW
    after = -2 if newest is None else newest  # results begin at lap -1 (the initial model)
    if full and fresh and first is not None and first > after + 1 and first == fresh[0].lap:
        return "gap"
    return fresh


def _replay(seen: Progress, fresh: tuple[LapRecord, ...], rule: StopRule) -> StopState:
    state = seen.stop
    for record in fresh:
        state, _ = state.judge(record, tolerance=rule.tolerance)
    return state


def _stop_matches(expected: StopState, claimed: StopState) -> str | None:
    if expected == claimed:
        return None
    return (
        f"the stopping state (best lap {claimed.best_lap}, {claimed.stale} stale laps) is not "
        f"what the rule gives (best lap {expected.best_lap}, {expected.stale} stale laps)"
    )


def check_model_progress(
    seen: Progress,
    claimed: Progress,
    *,
    position: Position,
    sender_position: int,
    rule: StopRule,
    returning: bool = False,
) -> str | None:
    """Check a model blob's progress; ``position`` is where the receiver is to train it.

    A ``returning`` member (taken back after missing laps) cannot replay the stopping
    state across results it never saw: across such a gap it checks only that the rule
    does not hold (the next member checks the state again against its own history).
    """
    if claimed.done:
        return "the metadata says the run has ended, but this is not a final model"
    trained_lap = position.lap - 1 if position.hop == 0 else position.lap
    if (claimed.lap, claimed.hop) != (trained_lap, sender_position):
        return (
            f"the metadata says it was trained at lap {claimed.lap} hop {claimed.hop}, but the "
            f"sender's place before lap {position.lap} hop {position.hop} is lap {trained_lap} "
            f"hop {sender_position}"
        )
    if claimed.judged_lap < seen.judged_lap:
        return f"judged lap {claimed.judged_lap} is older than lap {seen.judged_lap}, seen here"
    if claimed.judged_lap > trained_lap:
        return f"judged lap {claimed.judged_lap} lies in the future of lap {trained_lap}"
    fresh = new_records(seen, claimed)
    if fresh == "gap" and returning:
        fresh = ()
        expected = claimed.stop
    elif isinstance(fresh, str):
        return "the history has a gap" if fresh == "gap" else fresh
    else:
        expected = _replay(seen, fresh, rule)
    if any(r.lap > claimed.judged_lap for r in fresh):
        return "a lap result is newer than the last judged lap"
    problem = _stop_matches(expected, claimed.stop)
    if problem is not None:
        return problem
    if claimed.judged_lap > seen.judged_lap and claimed.stop.holds(
        judged_lap=claimed.judged_lap, patience=rule.patience, max_laps=rule.max_laps
    ):
        return "the stopping rule holds, but the run was not ended"
    return None


def check_final_progress(seen: Progress, claimed: Progress, *, rule: StopRule) -> str | None:
    """Check a final model's progress: the stopping rule must hold on what it carries."""
    if not claimed.done:
        return "a final model whose metadata does not say the run ended"
    if not claimed.stop.holds(
        judged_lap=claimed.judged_lap, patience=rule.patience, max_laps=rule.max_laps
    ):
        return (
            f"the stopping rule does not hold: {claimed.stop.stale} stale laps of "
            f"{rule.patience}, last judged lap {claimed.judged_lap} of {rule.max_laps - 1}"
        )
    if claimed.judged_lap < seen.judged_lap:
        return f"judged lap {claimed.judged_lap} is older than lap {seen.judged_lap}, seen here"
    fresh = new_records(seen, claimed)
    if fresh == "gap":
        return None  # a member that missed many laps can only check the rule itself
    if isinstance(fresh, str):
        return fresh
    return _stop_matches(_replay(seen, fresh, rule), claimed.stop)
