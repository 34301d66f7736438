"""How a multi-class or a regression task is scored, by a member and by the federation.

A member's evaluation is sums (:class:`~fedup.learn.task.EvalStats`), so that the
federation pools them exactly (:mod:`fedup.learn.lap_sums`).  Besides the loss sum,
the count and the correct predictions, a multi-class or regression task adds
integer *slots*, which travel where a binary task's score histograms do:

* **multi-class** (:class:`MulticlassMetrics`): the loss is the cross-entropy.
  Slots ``0..K-1`` count each class's true positives (rows of class k predicted
  k); slots ``K..2K-1`` count, per class, its rows plus the rows predicted as it.
  Class k's F1 is ``2 TP_k / (rows_k + predicted_k)``; the **macro-F1** is their
  mean over the classes with a row or a prediction in the rows scored (a class of
  the union absent from them and never predicted has no F1).
* **regression** (:class:`RegressionMetrics`): the model learns the target
  standardized with the federation's pooled mean and standard deviation, and the
  loss is the mean squared error in those units (so the stopping rule does not
  depend on the target's unit).  Slots (fixed point, :data:`SLOT_SCALE` units per
  unit) hold the sum of absolute errors, of the positive and of the negative
  standardized targets, and of their squares.  Reported in the target's units:
  ``MSE = loss * std**2``, ``MAE = sum|e| / n * std``, and
  ``R2 = 1 - SSE / SST`` with SST the squared deviations of the rows scored from
  their own mean (the usual R², as scikit-learn's ``r2_score``).

:func:`prediction_figures` computes the same figures from a model's outputs on
rows (the comparison of :mod:`fedup.learn.baselines`, ``fedup-peer predict``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from fedup.learn.targets import MULTICLASS, REGRESSION

if TYPE_CHECKING:
    from fedup.learn.task import EvalStats

__all__ = [
    "SLOT_SCALE",
    "MulticlassMetrics",
    "RegressionMetrics",
    "TargetMetrics",
    "macro_f1",
    "prediction_figures",
]

SLOT_SCALE: Final = 2**20
"""Fixed-point units per unit of a regression slot (the loss's scale in the lap sums)."""
MAX_SLOT: Final = 2**50
"""A member's slot counts as at most this (the lap sums' loss cap: 2^30 units of 2^20)."""

F64 = npt.NDArray[np.float64]


def macro_f1(hits: tuple[int, ...] | list[int], sizes: tuple[int, ...] | list[int]) -> float:
    """Mean of ``2 hits[k] / sizes[k]`` over the classes with ``sizes[k] > 0`` (NaN if none);
    ``sizes[k]`` is class k's rows plus the rows predicted as k."""
    f1 = [2 * h / s for h, s in zip(hits, sizes, strict=True) if s > 0]
    return sum(f1) / len(f1) if f1 else math.nan


def _fixed(x: float) -> int:
    return min(round(x * SLOT_SCALE), MAX_SLOT) if math.isfinite(x) else MAX_SLOT


@attrs.frozen
class MulticlassMetrics:
    """Scores of a K-class task: cross-entropy, accuracy, macro-F1."""

    classes: tuple[str, ...]
    kind: str = MULTICLASS

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row cross-entropy of the logits ``out`` [n, K] against class indices ``y``."""
        return F.cross_entropy(out, y.reshape(-1).long(), reduction="none")

    def sums(self, out: torch.Tensor, y: torch.Tensor) -> tuple[int, tuple[int, ...]]:
        """``(correct, slots)`` of outputs on rows: per class, true positives then rows
        plus predictions."""
        k = len(self.classes)
        pred = out.argmax(dim=1).cpu().numpy()
        truth = y.reshape(-1).long().cpu().numpy()
        hits = np.bincount(truth[pred == truth], minlength=k)
        sizes = np.bincount(truth, minlength=k) + np.bincount(pred, minlength=k)
        return int(hits.sum()), tuple(int(v) for v in (*hits, *sizes))

    def lap_figures(self, stats: EvalStats) -> tuple[float, float]:
        """What a lap record carries beside the loss: accuracy and macro-F1."""
        return stats.accuracy, self.f1(stats)

    def f1(self, stats: EvalStats) -> float:
        k = len(self.classes)
        if len(stats.slots) < 2 * k:
            return math.nan
        return macro_f1(list(stats.slots[:k]), list(stats.slots[k : 2 * k]))

    def figures(self, stats: EvalStats) -> dict[str, float]:
        return {"loss": stats.loss, "accuracy": stats.accuracy, "macro_f1": self.f1(stats)}


@attrs.frozen
class RegressionMetrics:
    """Scores of a numeric target: MSE (the loss, standardized), MAE and R² in its units."""

    mean: float
    """The federation's pooled mean of the target."""
    std: float
    """Its pooled standard deviation: the unit the model's errors are measured in."""
    kind: str = REGRESSION

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-row squared error (standardized units)."""
        return (out.reshape(-1) - y.reshape(-1)) ** 2

    def sums(self, out: torch.Tensor, y: torch.Tensor) -> tuple[int, tuple[int, ...]]:
        """``(0, slots)``: sums of |error|, of positive and negative targets, of squares."""
        e = (out.reshape(-1).double() - y.reshape(-1).double()).cpu()
        t = y.reshape(-1).double().cpu()
        figures = (e.abs().sum(), t.clamp(min=0).sum(), (-t).clamp(min=0).sum(), (t * t).sum())
        return 0, tuple(_fixed(float(v)) for v in figures)

    def regression(self, stats: EvalStats) -> tuple[float, float, float]:
        """``(MSE, MAE, R2)`` in the target's units (NaN when there is nothing to score)."""
        if stats.n == 0 or len(stats.slots) < 4:
            return math.nan, math.nan, math.nan
        abs_sum, pos, neg, sq = (v / SLOT_SCALE for v in stats.slots[:4])
        total = pos - neg
        sst = sq - total * total / stats.n
        r2 = 1 - stats.loss_sum / sst if sst > 0 else math.nan
        return stats.loss * self.std**2, abs_sum / stats.n * self.std, r2

    def lap_figures(self, stats: EvalStats) -> tuple[float, float]:
        """What a lap record carries beside the loss: MAE (target units) and R²."""
        _, mae, r2 = self.regression(stats)
        return mae, r2

    def figures(self, stats: EvalStats) -> dict[str, float]:
        mse, mae, r2 = self.regression(stats)
        return {"loss": stats.loss, "mse": mse, "mae": mae, "r2": r2}


TargetMetrics = MulticlassMetrics | RegressionMetrics


def prediction_figures(
    metrics: TargetMetrics, out: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """The task's figures of outputs ``out`` on rows with targets ``y`` (as the model learns
    them), exactly: the same formulas as the pooled sums, without fixed point."""
    out, y = out.double().cpu(), y.double().cpu()
    n = len(y.reshape(-1))
    loss = float(metrics.loss(out, y).sum()) / n if n else math.nan
    if isinstance(metrics, MulticlassMetrics):
        correct, slots = metrics.sums(out, y)
        k = len(metrics.classes)
        f1 = macro_f1(list(slots[:k]), list(slots[k:]))
        return {"loss": loss, "accuracy": correct / n if n else math.nan, "macro_f1": f1}
    e = (out.reshape(-1) - y.reshape(-1)).numpy()
    t = y.reshape(-1).numpy()
    sst = float(((t - t.mean()) ** 2).sum()) if n else 0.0
    sse = float((e * e).sum())
    return {
        "loss": loss,
        "mse": loss * metrics.std**2,
        "mae": float(np.abs(e).mean()) * metrics.std if n else math.nan,
        "r2": 1 - sse / sst if sst > 0 else math.nan,
    }
