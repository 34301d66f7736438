"""The simulation's report: the federated model against centralized and local-only training.

:func:`build_report` turns a :class:`~fedup.sim.runner.SimResult` into the
JSON-ready dict written as ``report.json``.  Every model is evaluated on the
same held-out rows: each peer's own validation split (the split its peer used
during the run) and their union.  With ``baselines``, the same model, splits
and epoch budget (hop size, patience, tolerance, maximum laps, seed) train

* ``centralized``: one model on the pooled training splits (a ring of one
  peer holding everything, :func:`fedup.learn.baselines.centralized`);
* ``local_only``: one model per peer on its own data, stopped on its own
  validation split (:func:`fedup.learn.baselines.local_only`).

For each model: ``union`` (scored on the union of the validation splits),
``per_peer`` (one entry per peer: scores on its own split, data passes,
wall time, bytes sent) and ``mean`` (the mean of the per-peer entries).
Scores are ``val_loss`` (mean binary cross-entropy), ``roc_auc`` (exact;
null when a split has one class only) and ``accuracy``.  Bytes sent: what a
peer sent over the simulated network (federated), the encoded rows it would
hand to a central server (centralized), nothing (local-only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from fedup.errors import FedupError
from fedup.learn.baselines import RingResult, Score, centralized, local_only, score
from fedup.learn.ring import RingSettings, final_weights
from fedup.learn.task import TensorTask
from fedup.learn.weights import load_safetensors
from fedup.peer import TaskSource
from fedup.protocol.view import RunSettings
from fedup.sim.runner import SimResult

__all__ = ["build_report", "ring_settings"]

METRICS = ("val_loss", "roc_auc", "accuracy", "epochs", "wall_seconds", "bytes_sent")
"""The fields of every per-peer and mean entry."""


def ring_settings(run: RunSettings) -> RingSettings:
    """The learning settings a peer derives from the run's (as ``RingRun`` does)."""
    return RingSettings(
        seed=run.seed,
        hop_epochs=run.local_epochs,
        tolerance=run.tolerance,
        patience=run.patience,
        max_laps=run.max_laps,
    )


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def _scores(sc: Score) -> dict[str, Any]:
    return {"val_loss": sc.loss, "roc_auc": _num(sc.auc), "accuracy": sc.accuracy, "n": sc.n}


def _mean(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [e[key] for e in entries if e.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def _tasks(result: SimResult, sources: Sequence[TaskSource]) -> list[TensorTask]:
    if result.run is None:
        raise FedupError("no federation was formed: nothing to report")
    tasks = []
    for source in sources:
        task = source.build(result.schema, result.run)
        if not isinstance(task, TensorTask):
            raise FedupError("the report needs tasks with in-memory tensors (TensorTask)")
        tasks.append(task)
    return tasks


def _model_entry(
    weights: dict[str, torch.Tensor],
    tasks: Sequence[TensorTask],
    per_peer: list[dict[str, Any]],
) -> dict[str, Any]:
    for task, entry in zip(tasks, per_peer, strict=True):
        entry.update(_scores(score(weights, [task])))
    return {"union": _scores(score(weights, tasks)), "mean": _mean(per_peer), "per_peer": per_peer}


def build_report(
    result: SimResult, sources: Sequence[TaskSource], *, baselines: bool = False
) -> dict[str, Any]:
    """The report of a simulation (JSON-ready); see the module docstring.

    ``sources`` are the ones the simulation ran.  Raises
    :class:`~fedup.errors.FedupError` if no peer finished (there is no
    federated model to score).
    """
    tasks = _tasks(result, sources)
    done = result.finished_peers
    if not done or done[0].summary is None:
        raise FedupError("no peer finished the run: there is no federated model to score")
    first = done[0].summary
    weights = load_safetensors(Path(first.out_dir) / "model.safetensors")
    report: dict[str, Any] = {
        "peers": len(sources),
        "seed": result.settings.seed,
        "settings": _settings(result.run),
        "simulation": _simulation(result),
        "data": [
            {
                "index": p.index,
                "peer_id": p.peer_id,
                "name": p.name,
                "train_rows": t.n_train,
                "val_rows": t.n_val,
                "positive_rate": float(torch.cat([t.y_train, t.y_val]).mean()),
                "finished": p.summary is not None,
                "error": p.error,
                "listed_dead": any(
                    o.summary is not None and p.peer_id in o.summary.dead for o in done
                ),
            }
            for p, t in zip(result.peers, tasks, strict=True)
        ],
    }
    fed_peers = [
        {
            "peer": p.index,
            "epochs": first.data_passes,
            "wall_seconds": result.wall_seconds,
            "bytes_sent": p.bytes_sent,
        }
        for p in result.peers
    ]
    report["federated"] = _model_entry(weights, tasks, fed_peers)
    if baselines:
        settings = ring_settings(result.run) if result.run is not None else RingSettings()
        cen = centralized(tasks, settings)
        report["centralized"] = _model_entry(
            final_weights(cen.state),
            tasks,
            [
                {
                    "peer": i,
                    "epochs": cen.passes,
                    "wall_seconds": cen.seconds,
                    "bytes_sent": _row_bytes(t),
                }
                for i, t in enumerate(tasks)
            ],
        )
        report["local_only"] = _local(tasks, local_only(tasks, settings))
    return report


def _local(tasks: Sequence[TensorTask], runs: Sequence[RingResult]) -> dict[str, Any]:
    per_peer = []
    unions = []
    for i, (task, run) in enumerate(zip(tasks, runs, strict=True)):
        weights = final_weights(run.state)
        union = _scores(score(weights, tasks))
        unions.append(union)
        entry: dict[str, Any] = {
            "peer": i,
            "epochs": run.passes,
            "wall_seconds": run.seconds,
            "bytes_sent": 0,
        }
        entry.update(_scores(score(weights, [task])))
        entry["union"] = union
        per_peer.append(entry)
    union_mean = {
        k: (sum(v) / len(v) if (v := [u[k] for u in unions if u[k] is not None]) else None)
        for k in ("val_loss", "roc_auc", "accuracy")
    }
    union_mean["n"] = unions[0]["n"] if unions else 0
    return {"union": union_mean, "mean": _mean(per_peer), "per_peer": per_peer}


def _row_bytes(task: TensorTask) -> int:
    """What pooling costs a peer: its encoded rows (float32 features and labels)."""
    return sum(
        t.element_size() * t.nelement()
        for t in (task.x_train, task.y_train, task.x_val, task.y_val)
    )


def _settings(run: RunSettings | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        k: v for k, v in attrs.asdict(run).items() if k not in ("model_digest", "schema_digest")
    }


def _simulation(result: SimResult) -> dict[str, Any]:
    laps = result.laps
    ends = [m.wall for m in laps[1:]]
    return {
        "virtual_clock": result.settings.virtual_clock,
        "wall_seconds": result.wall_seconds,
        "clock_seconds": result.clock_seconds,
        "formation_clock_seconds": result.formed,
        "finished_clock_seconds": result.finished,
        "lap_wall_seconds": [b - a.wall for a, b in zip(laps, ends, strict=False)],
        "training_wall_seconds": result.wall_seconds - laps[0].wall if laps else None,
        "peak_rss_bytes": result.peak_rss,
        "model_sha256": result.model_sha256,
        "weights_sha256": result.weights_sha256,
        "finished": len(result.finished_peers),
        "dropped_connections": [list(d) for d in result.dropped],
    }
