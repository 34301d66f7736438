"""FedAvg-style parallel training in one process: the parallel mode's learning, no network.

Every member computes at once.  Round ``r``:

1. every member holds the round's model ``w_r`` (round 0: the initial model of
   the run seed, the same as the ring's);
2. each member evaluates ``w_r`` on its validation split and trains a copy of
   it on its own data for ``hop_epochs`` passes (what the ring gives it per
   lap), with the seed of (run seed, round, member) and the task's optimizer;
3. the members average: ``w_{r+1}`` is the mean of their trained models
   weighted by training rows (a member without training rows has weight 0),
   and their validation sums are added.  On separate machines this is one ring
   all-reduce of the model (the sums ride along);
4. the pooled validation loss of ``w_r`` (the output of round ``r - 1``) is
   judged by the ring's rule (:class:`~fedup.protocol.laps.StopState`: the
   same ``tolerance``, ``patience`` and ``max_laps``; the best output is kept).

So a round is what a lap is to the ring: the same training data, the output
evaluated by every member during the next round, the same stopping rule and
best-model keeping, and round ``max_laps`` only evaluates.  The last round
trains an output that is never judged, as the ring's last lap does.

What happens to the optimizer's state (:data:`OPTIMIZER_STATES`):

``none``    a fresh optimizer for every member every round;
``member``  each member keeps its own optimizer state from round to round
            (nothing extra travels);
``server``  a fresh optimizer per member and round, and server momentum
            (FedAvgM): ``v = beta * v + (average - w_r)``, ``w_{r+1} = w_r + v``,
            computed identically by every member after the all-reduce;
``member+server``  both at once.

The default (``server``) was chosen by measuring all four on the simulator's
default scenario (5 synthetic lenders) and on ``dirichlet:0.3`` label skew, seeds 0
and 1: it had the lowest mean and worst gap to centralized training over the four
runs, though ``member`` was better on the lenders alone (docs/learning.md has the
numbers).

Each round records every member's measured compute seconds (evaluation and
training); :mod:`fedup.sim.report` turns them and the link model into a modelled
wall-clock (the slowest member of each round plus the all-reduce).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import torch
from torch import nn

from fedup.errors import LocalProtocolError
from fedup.learn.lap_sums import ZERO_SUMS, add_sums, open_sums, to_sums
from fedup.learn.ring import (
    FederationStats,
    LapResult,
    RingSettings,
    hop_budget,
    hop_seed,
)
from fedup.learn.task import EvalStats, Task, seeded
from fedup.protocol.laps import StopState

__all__ = [
    "DEFAULT_OPTIMIZER_STATE",
    "OPTIMIZER_STATES",
    "FedAvgResult",
    "RoundLedger",
    "RoundTime",
    "average",
    "fedavg",
    "federation_of",
    "judge_round",
    "member_round",
    "server_step",
]

OPTIMIZER_STATES: Final = ("none", "member", "server", "member+server")
"""What happens to the optimizer's state between rounds (see the module docstring)."""
DEFAULT_OPTIMIZER_STATE: Final = "server"
"""The best of :data:`OPTIMIZER_STATES` as measured (docs/learning.md)."""
SERVER_MOMENTUM: Final = 0.9
"""``beta`` of the ``server`` choice (FedAvgM's usual value)."""

Weights = dict[str, torch.Tensor]


@attrs.frozen
class RoundTime:
    """One round: each member's measured compute seconds (evaluation and training)."""

    round: int
    compute: tuple[float, ...]
    """Seconds per member, in member order."""
    reduced: bool
    """The models were averaged (every round but an evaluation-only last one)."""


@attrs.frozen(eq=False)
class FedAvgResult:
    """What a FedAvg run did."""

    weights: Weights
    """The final model: the judged round output with the lowest pooled validation loss."""
    history: tuple[LapResult, ...]
    """Pooled validation loss of every judged round output (``lap`` = the round)."""
    rounds: tuple[RoundTime, ...]
    """Every round run, in order, with its members' compute seconds."""
    passes: float
    """Data passes (training samples / training rows) until the final model's round ended."""
    total_passes: float
    """Data passes of the whole run."""
    seconds: float
    """Real wall time of the run (every member in this one process, one after another)."""
    model_bytes: int
    """Bytes of the model each all-reduce averages (every tensor of its state dict)."""
    stop: StopState
    """The stopping rule's final state."""

    @property
    def best(self) -> LapResult | None:
        return next((h for h in self.history if h.lap == self.stop.best_lap), None)

    @classmethod
    def ended(
        cls,
        ledger: RoundLedger,
        rounds: Sequence[RoundTime],
        n_train: int,
        started: float,
        model_bytes: int,
    ) -> FedAvgResult:
        """The result of a run over ``n_train`` rows that began at ``perf_counter()``
        ``started`` and ended with ``ledger``."""
        stop = ledger.stop
        kept = next((h for h in ledger.history if h.lap == stop.best_lap), None)
        return cls(
            weights=ledger.best,
            history=tuple(ledger.history),
            rounds=tuple(rounds),
            passes=(kept.samples if kept else 0) / n_train if n_train else 0.0,
            total_passes=ledger.samples / n_train if n_train else 0.0,
            seconds=time.perf_counter() - started,
            model_bytes=model_bytes,
            stop=stop,
        )


def _cpu(weights: Mapping[str, torch.Tensor]) -> Weights:
    return {k: v.detach().cpu().clone() for k, v in weights.items()}


def _load(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> nn.Module:
    model.load_state_dict(dict(weights), strict=True)
    return model


def average(models: Sequence[Mapping[str, torch.Tensor]], rows: Sequence[int]) -> Weights:
    """The mean of ``models`` weighted by ``rows`` (a model with 0 rows counts for nothing).

    Tensors that are not floating point (counters) come from the first model with
    rows.  Raises :class:`~fedup.errors.LocalProtocolError` when no model has rows.
    """
    total = sum(rows)
    if len(models) != len(rows) or total <= 0 or min(rows) < 0:
        raise LocalProtocolError(f"cannot average {len(models)} models by rows {list(rows)}")
    first = next(m for m, n in zip(models, rows, strict=True) if n > 0)
    out: Weights = {}
    for k, ref in first.items():
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for m, n in zip(models, rows, strict=True):
            if n > 0:
                acc += m[k].double() * (n / total)
        out[k] = acc.to(ref.dtype)
    return out


def judge_round(
    task: Task, sums: tuple[int, ...], lap: int, samples: int, stop: StopState, tol: float
) -> tuple[LapResult | None, StopState]:
    e = open_sums(sums, slots=task.metrics is not None)
    if e is None:
        return None, stop
    second, third = task.lap_figures(e)
    record = LapResult(lap, e.loss, second if math.isfinite(second) else 0.0, third, e.n, samples)
    return record, stop.judge(record, tolerance=tol)[0]


@attrs.define(eq=False)
class RoundLedger:
    """The stopping rule's book of a run in rounds (FedAvg, the parallel and hybrid
    modes): round ``r``'s pooled sums judge the model ``w_r`` that round began from (the
    output of round ``r - 1``), the best one judged is kept, and the samples add up."""

    best: Weights
    """The judged model with the lowest pooled validation loss (first: the initial one)."""
    stop: StopState = attrs.field(factory=StopState)
    history: list[LapResult] = attrs.field(factory=list)
    samples: int = 0
    """Samples trained by the rounds before the current one."""

    def judge(
        self,
        task: Task,
        sums: tuple[int, ...],
        round_: int,
        current: Weights,
        trained: int,
        tolerance: float,
    ) -> LapResult | None:
        """Judge ``current`` (round ``round_``'s model) by ``sums``, then count the
        ``trained`` samples of the round; the lap result, None for no sums."""
        record, self.stop = judge_round(task, sums, round_ - 1, self.samples, self.stop, tolerance)
        if record is not None:
            self.history.append(record)
            if self.stop.best_lap == round_ - 1:
                self.best = current
        self.samples += trained
        return record

    def ends(self, round_: int, settings: RingSettings) -> bool:
        """Whether the run ends after round ``round_`` (the last round only evaluates)."""
        return round_ >= settings.max_laps or self.stop.holds(
            judged_lap=round_ - 1, patience=settings.patience, max_laps=settings.max_laps
        )


def fedavg(
    tasks: Sequence[Task],
    settings: RingSettings,
    *,
    optimizer_state: str = DEFAULT_OPTIMIZER_STATE,
    federation: FederationStats | None = None,
) -> FedAvgResult:
    """Run FedAvg over ``tasks`` (one per member) as the module docstring says."""
    if optimizer_state not in OPTIMIZER_STATES:
        raise LocalProtocolError(
            f"optimizer_state {optimizer_state!r} is not one of {', '.join(OPTIMIZER_STATES)}"
        )
    start = time.perf_counter()
    fed = federation or federation_of(tasks)
    rows = [t.n_train for t in tasks]
    n_train = sum(rows)
    current = _cpu(tasks[0].build_model(settings.seed).state_dict())
    model_bytes = sum(v.element_size() * v.nelement() for v in current.values())
    keep = optimizer_state in ("member", "member+server")
    server = optimizer_state in ("server", "member+server")
    momentum: Weights | None = None
    saved: list[dict[str, Any] | None] = [None] * len(tasks)
    ledger = RoundLedger(current)
    rounds: list[RoundTime] = []
    round_ = 0
    while True:
        trains = round_ < settings.max_laps
        trained: list[Weights] = []
        compute: list[float] = []
        sums = ZERO_SUMS
        round_samples = 0
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            stats, weights, n, state = member_round(
                task, current, settings, round_, i, fed, saved[i] if keep else None, train=trains
            )
            if keep:
                saved[i] = state
            sums = add_sums(sums, to_sums(stats))
            trained.append(weights)
            round_samples += n
            compute.append(time.perf_counter() - t0)
        rounds.append(RoundTime(round_, tuple(compute), trains))
        # The all-reduce: the round's output, and the pooled evaluation of its input.
        ledger.judge(tasks[0], sums, round_, current, round_samples, settings.tolerance)
        if ledger.ends(round_, settings):
            break
        if n_train > 0:
            new = average(trained, rows)
            if server:
                new, momentum = server_step(current, new, momentum)
            current = new
        round_ += 1
    return FedAvgResult.ended(ledger, rounds, n_train, start, model_bytes)


def federation_of(tasks: Sequence[Task]) -> FederationStats:
    """Federation counts from the tasks' training labels (peers get them from the schema)."""
    counts = [t.label_counts or (t.n_train, 0) for t in tasks]
    return FederationStats(len(tasks), sum(a + b for a, b in counts), sum(b for _, b in counts))


def member_round(
    task: Task,
    weights: Weights,
    settings: RingSettings,
    round_: int,
    member: int,
    fed: FederationStats,
    opt_state: dict[str, Any] | None,
    *,
    train: bool,
) -> tuple[EvalStats, Weights, int, dict[str, Any] | None]:
    """One member's round: evaluate the round's model, train a copy of it.

    Returns the evaluation, the trained weights (CPU), the samples trained and the
    optimizer's state afterwards."""
    seed = hop_seed(settings, round_, member)
    with task.scratch_model() as model:
        with seeded(seed, task.device):
            _load(model, weights)
            evaluated = task.evaluate(model)
            if not train or task.n_train == 0:
                return evaluated, weights, 0, opt_state
            optimizer = task.make_optimizer(model)
            if opt_state is not None:
                optimizer.load_state_dict(opt_state)
            stats = task.train(model, optimizer, hop_budget(task, settings, fed, model, seed))
            state = copy.deepcopy(optimizer.state_dict())
        return evaluated, _cpu(model.state_dict()), stats.samples, state


def server_step(
    current: Weights, averaged: Weights, momentum: Weights | None
) -> tuple[Weights, Weights]:
    """FedAvgM: the averaged update pushed through server momentum."""
    new: Weights = {}
    velocity: Weights = {}
    for k, w in current.items():
        if not w.is_floating_point():
            new[k] = averaged[k]
            continue
        delta = averaged[k] - w
        v = delta if momentum is None else SERVER_MOMENTUM * momentum[k] + delta
        velocity[k] = v
        new[k] = w + v
    return new, velocity
