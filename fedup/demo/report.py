"""The demo's report: what the peers' federation produced against the baselines.

The peers leave their outputs on disk (``summary.json``, ``metrics.jsonl``,
``federation.json`` and ``model.safetensors``).  To compare, the demo (which
wrote every lender's loan book itself) rebuilds each peer's task exactly as
the peer did: the same CSV, the federation's merged schema from
``federation.json``, the same run settings, hence the same train/validation
split.  As a check, the federated model scored here on a peer's validation
split must equal the loss that peer reported in its ``summary.json``.

Then, with :mod:`fedup.learn.comparison`, the same model, splits and epoch
budget train centralized (pooled data) and local-only (each lender alone), and
every model is scored on each peer's own validation split and their union.
Pooling is what the federation avoids; the demo does it only because all the
lenders are simulated on this one host.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from fedup.demo.peers import DemoPeer, PeerOutcome
from fedup.errors import FedupError
from fedup.learn.baselines import RingResult
from fedup.learn.comparison import (
    Curve,
    centralized_entry,
    curve,
    judge_claim,
    local_only_entry,
    model_entry,
)
from fedup.learn.ring import RingSettings
from fedup.learn.schema import FeatureSchema, schema_from_dict
from fedup.learn.task import TensorTask
from fedup.learn.weights import load_safetensors
from fedup.peer import TabularSource
from fedup.protocol.view import RunSettings

__all__ = [
    "SELF_CHECK_TOLERANCE",
    "Baselines",
    "build_report",
    "rebuild_tasks",
    "run_settings_from_json",
    "train_baselines",
]

SELF_CHECK_TOLERANCE = 1e-4
"""Largest difference allowed between a peer's reported validation loss and the
demo's recomputation of it (float32 evaluation order differs slightly)."""


def run_settings_from_json(settings: dict[str, Any]) -> RunSettings:
    """The run settings written in ``federation.json`` (digests are not needed here)."""
    fields = {a.name for a in attrs.fields(RunSettings)} - {"model_digest", "schema_digest"}
    return RunSettings(**{k: v for k, v in settings.items() if k in fields})


def rebuild_tasks(
    peers: Sequence[DemoPeer],
    federation: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
) -> tuple[list[TensorTask], RunSettings, FeatureSchema]:
    """Each peer's task as the peer built it, from its CSV and ``federation.json``, on
    ``device``; also the run settings and the schema read from there."""
    schema = schema_from_dict(federation["schema"])
    run = run_settings_from_json(federation["settings"])
    tasks = []
    for peer in peers:
        task = TabularSource.from_csv(peer.data, "default", device=device).build(schema, run)
        assert isinstance(task, TensorTask)
        tasks.append(task)
    return tasks, run, schema


@attrs.frozen(eq=False)
class Baselines:
    """The baselines of one run, trained on its peers' rebuilt tasks."""

    run_id: str
    """The run whose ``federation.json`` (schema, settings) they were trained under."""
    tasks: list[TensorTask]
    run: RunSettings
    schema: FeatureSchema
    centralized: dict[str, Any]
    centralized_run: RingResult
    local_only: dict[str, Any]
    local_runs: list[RingResult]
    local_on_union: list[Curve]


def train_baselines(
    peers: Sequence[DemoPeer],
    federation: dict[str, Any],
    *,
    device: str | torch.device = "cpu",
) -> Baselines:
    """Centralized and local-only training under ``federation.json``'s schema and
    settings: what the report compares the federated model with.  They need nothing
    the federation's training produces, so the demo starts them once the run has formed
    and trains them while the ring does."""
    tasks, run, schema = rebuild_tasks(peers, federation, device=device)
    settings = RingSettings.for_run(run)
    central, central_run = centralized_entry(tasks, settings)
    local, local_runs, on_union = local_only_entry(tasks, settings, union_curves=True)
    return Baselines(
        federation["run_id"], tasks, run, schema, central, central_run, local, local_runs, on_union
    )


def federated_curve(metrics: Path, n_rows: int) -> list[tuple[float, float]]:
    """``(data passes, federated validation loss)`` per lap, from a peer's ``metrics.jsonl``."""
    laps: dict[int, tuple[float, float]] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("type") == "lap":
            laps[record["lap"]] = (record["samples"] / n_rows, record["federated_val_loss"])
    return [laps[k] for k in sorted(laps)]


def build_report(
    outcomes: Sequence[PeerOutcome],
    *,
    baselines: bool = True,
    device: str | torch.device = "cpu",
    trained: Baselines | None = None,
) -> dict[str, Any]:
    """The JSON-ready report: peers, federated, centralized, local-only, curves, claim
    (the baselines trained and every model scored on ``device``).

    ``trained``: the baselines, trained already (:func:`train_baselines`); used when
    they were trained for the run the peers finished, else trained here.  Raises
    :class:`~fedup.errors.FedupError` if no peer finished, or if the demo's
    recomputation disagrees with what a peer reported.
    """
    done = [o for o in outcomes if o.summary is not None]
    if not done:
        raise FedupError("no peer finished: there is no federated model to compare")
    first = done[0]
    assert first.summary is not None
    federation = json.loads((first.peer.run_dir / "federation.json").read_text("utf-8"))
    if trained is not None and trained.run_id != federation["run_id"]:
        trained = None  # trained for a run the peers did not finish
    if baselines and trained is None:
        trained = train_baselines([o.peer for o in outcomes], federation, device=device)
    if trained is not None:
        tasks, schema = trained.tasks, trained.schema
    else:
        tasks, _, schema = rebuild_tasks([o.peer for o in outcomes], federation, device=device)
    weights = load_safetensors(first.peer.run_dir / "model.safetensors")
    fed_per_peer = [
        {
            "peer": o.peer.index,
            "epochs": first.summary["data_passes"],
            "wall_seconds": o.seconds,
            "bytes_sent": o.summary["model_bytes_sent"] if o.summary else None,
        }
        for o in outcomes
    ]
    report: dict[str, Any] = {
        "peers": [_peer(o) for o in outcomes],
        "run_id": federation["run_id"],
        "ring": federation["members"],
        "settings": federation["settings"],
        "stop_reason": first.summary["stop_reason"],
        "laps": first.summary["laps"],
        "model_sha256": first.summary["model_sha256"],
        "same_model_everywhere": len(done) == len(outcomes)
        and len({(o.summary or {}).get("model_sha256") for o in done}) == 1,
        "federated": model_entry(weights, tasks, fed_per_peer),
    }
    _self_check(report["federated"], outcomes)
    curves: dict[str, Any] = {
        "federated": federated_curve(first.peer.run_dir / "metrics.jsonl", schema.n_rows)
    }
    if baselines and trained is not None:
        report["centralized"], report["local_only"] = trained.centralized, trained.local_only
        curves["centralized"] = curve(trained.centralized_run, sum(t.n_train for t in tasks))
        curves["local_only"] = trained.local_on_union
        curves["local_only_own_split"] = [
            curve(r, t.n_train) for r, t in zip(trained.local_runs, tasks, strict=True)
        ]
        report["claim"] = judge_claim(report)
    report["curves"] = curves
    return report


def _peer(o: PeerOutcome) -> dict[str, Any]:
    s = o.summary or {}
    return {
        "index": o.peer.index,
        "peer_id": s.get("peer_id"),
        "lender": o.peer.lender,
        "rows": o.peer.rows,
        "default_rate": o.peer.default_rate,
        "finished": o.error is None,
        "error": o.error,
        "seconds": o.seconds,
        "model_sha256": s.get("model_sha256"),
        "reported_val_loss": s.get("final_val_loss"),
        "directory": str(o.peer.directory),
    }


def _self_check(federated: dict[str, Any], outcomes: Sequence[PeerOutcome]) -> None:
    for entry, o in zip(federated["per_peer"], outcomes, strict=True):
        if o.summary is None:
            continue
        reported = o.summary["final_val_loss"]
        if not math.isclose(entry["val_loss"], reported, abs_tol=SELF_CHECK_TOLERANCE):
            raise FedupError(
                f"peer {o.peer.index} reported validation loss {reported:.6f} but the demo "
                f"computes {entry['val_loss']:.6f} on the same split: the comparison would "
                "not be fair, so it is not made"
            )
