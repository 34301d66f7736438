"""A federated model against centralized and local-only training, scored the same way.

Used by ``fedup-peer simulate --baselines`` and ``fedup-peer demo``.  Every
model is evaluated on the same held-out rows: each peer's own validation split
and their union.  The baselines train with the same model, splits and epoch
budget (hop size, patience, tolerance, maximum laps, seed) as the federation:

* centralized: one model on the pooled training splits (a ring of one peer
  holding everything, :func:`fedup.learn.baselines.centralized`);
* local-only: one model per peer on its own data, stopped on its own
  validation split (:func:`fedup.learn.baselines.local_only`).

An entry (:func:`model_entry`) has ``union`` (scores on the union of the
validation splits), ``per_peer`` (one dict per peer: scores on its own split
plus ``epochs``, ``wall_seconds``, ``bytes_sent``) and ``mean`` (the mean of
the per-peer dicts).  Scores are ``val_loss`` (mean binary cross-entropy),
``roc_auc`` (exact; ``None`` when a split has one class only) and
``accuracy``.  A multi-class table: ``val_loss`` (cross-entropy), ``accuracy``
and ``macro_f1``; a regression table: ``val_loss`` (the MSE of the standardized
target, the loss it trains on) and ``mse``, ``mae``, ``r2`` in the target's units.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from fedup.learn.baselines import RingResult, Score, centralized, local_only, score
from fedup.learn.ring import LapResult, RingSettings, final_weights
from fedup.learn.task import TensorTask

__all__ = [
    "METRICS",
    "centralized_entry",
    "curve",
    "judge_claim",
    "local_only_entry",
    "model_entry",
]

Curve = list[tuple[float, float]]
"""``(data passes, validation loss)`` per evaluated lap, in order."""

METRICS = ("val_loss", "roc_auc", "accuracy", "epochs", "wall_seconds", "bytes_sent")
"""The fields of every per-peer and mean entry (a binary or custom task)."""
TASK_SCORES = {
    "multiclass": ("val_loss", "accuracy", "macro_f1"),
    "regression": ("val_loss", "mse", "mae", "r2"),
}
"""The scores of a multi-class or regression table, in place of ``val_loss``,
``roc_auc``, ``accuracy``."""


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def scores(sc: Score) -> dict[str, Any]:
    """A :class:`Score` as JSON-ready fields (the task's: see the module docstring)."""
    if sc.task == "multiclass":
        return {"val_loss": sc.loss, "accuracy": sc.accuracy, "macro_f1": _num(sc.macro_f1),
                "n": sc.n}  # fmt: skip
    if sc.task == "regression":
        return {"val_loss": sc.loss, "mse": _num(sc.mse), "mae": _num(sc.mae),
                "r2": _num(sc.r2), "n": sc.n}  # fmt: skip
    return {"val_loss": sc.loss, "roc_auc": _num(sc.auc), "accuracy": sc.accuracy, "n": sc.n}


def score_keys(entries: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The score fields of ``entries`` (their task's), :data:`METRICS`' for a binary one."""
    first = entries[0] if entries else {}
    for keys in TASK_SCORES.values():
        if keys[-1] in first:
            return keys
    return ("val_loss", "roc_auc", "accuracy")


def _mean(entries: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """The mean of each key over the entries that have it (None where none has); by
    default the entries' scores and ``epochs``, ``wall_seconds``, ``bytes_sent``."""
    if keys is None:
        keys = (*score_keys(entries), *METRICS[3:])
    out: dict[str, Any] = {}
    for key in keys:
        values = [e[key] for e in entries if e.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def model_entry(
    weights: dict[str, torch.Tensor],
    tasks: Sequence[TensorTask],
    per_peer: list[dict[str, Any]],
) -> dict[str, Any]:
    """Score one model on every task's validation split and on their union.

    ``per_peer`` (one dict per task, updated in place with its scores) carries
    what only the caller knows: ``epochs``, ``wall_seconds``, ``bytes_sent``.
    """
    for task, entry in zip(tasks, per_peer, strict=True):
        entry.update(scores(score(weights, [task])))
    return {"union": scores(score(weights, tasks)), "mean": _mean(per_peer), "per_peer": per_peer}


def row_bytes(task: TensorTask) -> int:
    """What pooling costs a peer: its encoded rows (float32 features and labels)."""
    return sum(
        t.element_size() * t.nelement()
        for t in (task.x_train, task.y_train, task.x_val, task.y_val)
    )


def centralized_entry(
    tasks: Sequence[TensorTask], settings: RingSettings
) -> tuple[dict[str, Any], RingResult]:
    """Train on the pooled data; its entry (bytes sent: each peer's rows) and the run."""
    run = centralized(tasks, settings)
    per_peer = [
        {"peer": i, "epochs": run.passes, "wall_seconds": run.seconds, "bytes_sent": row_bytes(t)}
        for i, t in enumerate(tasks)
    ]
    return model_entry(final_weights(run.state), tasks, per_peer), run


def local_only_entry(
    tasks: Sequence[TensorTask], settings: RingSettings, *, union_curves: bool = False
) -> tuple[dict[str, Any], list[RingResult], list[Curve]]:
    """Train one model per peer on its own data; the entry, the runs and their curves.

    ``per_peer`` scores each model on its own peer's split, plus ``union``: the
    same model on the union.  The entry's ``union`` is the mean of those.  With
    ``union_curves``, every evaluated lap of each run is also scored on the union
    (``(data passes over the peer's own rows, union loss)`` per lap); else the
    curves are empty.
    """
    curves: list[Curve] = [[] for _ in tasks]

    def on_lap(i: int, result: LapResult, weights: dict[str, torch.Tensor]) -> None:
        curves[i].append((result.samples / tasks[i].n_train, score(weights, tasks).loss))

    runs = local_only(tasks, settings, on_lap=on_lap if union_curves else None)
    per_peer = []
    unions = []
    for i, (task, run) in enumerate(zip(tasks, runs, strict=True)):
        weights = final_weights(run.state)
        union = scores(score(weights, tasks))
        unions.append(union)
        entry: dict[str, Any] = {
            "peer": i,
            "epochs": run.passes,
            "wall_seconds": run.seconds,
            "bytes_sent": 0,
        }
        entry.update(scores(score(weights, [task])))
        entry["union"] = union
        per_peer.append(entry)
    union_mean = _mean(unions, score_keys(unions))
    union_mean["n"] = unions[0]["n"] if unions else 0
    return {"union": union_mean, "mean": _mean(per_peer), "per_peer": per_peer}, runs, curves


def curve(run: RingResult, n_train: int) -> Curve:
    """``(data passes, validation loss)`` of every evaluated lap of a run, in order."""
    return [(h.samples / n_train, h.loss) for h in run.history]


def judge_claim(report: dict[str, Any]) -> dict[str, Any]:
    """Test FedUp's founding claim on a report with all three models.

    The claim: ring federated learning converges in fewer epochs (data passes)
    to a lower validation loss than traditional training.  Traditional
    training is read two ways, each judged on its own:

    * ``vs_centralized``: one model on the pooled data (what a single
      organisation holding everything would do).  Both parts must hold: lower
      loss on the union of the validation splits, and fewer data passes until
      the kept model.
    * ``vs_local_only``: each peer training alone.  Lower loss holds if the
      federated model beats every local-only model on that peer's own split;
      fewer data passes compares the federation's passes with each local
      run's passes over its own data.

    Returns JSON-ready verdicts with the numbers behind them.
    """
    fed, cen, loc = report["federated"], report["centralized"], report["local_only"]
    fed_loss = fed["union"]["val_loss"]
    fed_passes = fed["mean"]["epochs"]
    cen_loss = cen["union"]["val_loss"]
    cen_passes = cen["mean"]["epochs"]
    vs_cen = {
        "federated_val_loss": fed_loss,
        "centralized_val_loss": cen_loss,
        "loss_gap_percent": (fed_loss / cen_loss - 1) * 100,
        "federated_epochs": fed_passes,
        "centralized_epochs": cen_passes,
        "lower_loss": fed_loss < cen_loss,
        "fewer_epochs": fed_passes < cen_passes,
    }
    vs_cen["holds"] = vs_cen["lower_loss"] and vs_cen["fewer_epochs"]
    pairs = list(zip(fed["per_peer"], loc["per_peer"], strict=True))
    local_passes = [lo["epochs"] for _, lo in pairs]
    vs_loc = {
        "peers_where_federated_loss_lower": sum(f["val_loss"] < lo["val_loss"] for f, lo in pairs),
        "peers": len(pairs),
        "federated_epochs": fed_passes,
        "local_only_epochs_min": min(local_passes, default=math.nan),
        "local_only_epochs_max": max(local_passes, default=math.nan),
    }
    vs_loc["lower_loss"] = vs_loc["peers_where_federated_loss_lower"] == len(pairs)
    vs_loc["fewer_epochs"] = all(fed_passes < p for p in local_passes)
    vs_loc["holds"] = vs_loc["lower_loss"] and vs_loc["fewer_epochs"]
    return {"vs_centralized": vs_cen, "vs_local_only": vs_loc}
