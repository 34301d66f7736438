"""A member's personal model, made after the run from the saved shared model.

When the member's task source asks for personal layers
(:attr:`~fedup.peer.source.TaskSource.personal_layers` > 0), :func:`personalize`
runs once the final model is saved and the run's custody is over (the custody
machine does not know of it): it reads ``model.safetensors``, fine-tunes a copy's
last layers on this member's own data (:func:`fedup.learn.personal.fine_tune`),
writes ``personal.safetensors`` beside it (0600, atomically; it never travels and
``model.safetensors`` is left as it was) and adds ``personal`` to ``summary.json``.

For a task with in-memory tensors it also trains the same model on this member's
data alone (:func:`fedup.learn.baselines.local_only`, the run's settings and seed)
so that ``personal`` compares three models on the member's own validation split:
``shared_own_val`` (the federation's), ``own_val`` (the personal one) and
``local_only_own_val`` (``null`` for other tasks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import attrs

from fedup.learn.baselines import local_only
from fedup.learn.personal import fine_tune, own_scores
from fedup.learn.ring import RingSettings, final_weights
from fedup.learn.task import Task, TensorTask
from fedup.learn.weights import load_safetensors, save_safetensors
from fedup.peer.outputs import RunOutputs, RunSummary
from fedup.peer.tasks import TaskBuilder
from fedup.protocol.view import RunSettings

__all__ = ["PERSONAL_FILE", "personal_figures", "personalize"]

log = logging.getLogger("fedup.peer")

PERSONAL_FILE = "personal.safetensors"
"""This member's personal model, beside ``model.safetensors``."""


def personal_figures(task: Task, out_dir: Path, k: int, settings: RunSettings) -> dict[str, Any]:
    """Fine-tune, write :data:`PERSONAL_FILE` into ``out_dir``, and return the
    summary's ``personal`` entry (blocking: run it off the event loop)."""
    shared = load_safetensors(out_dir / "model.safetensors")
    result = fine_tune(task, shared, k, seed=settings.seed)
    save_safetensors(
        result.weights,
        out_dir / PERSONAL_FILE,
        metadata={"fedup_personal_layers": str(k), "format": "pt"},
    )
    local = None
    if isinstance(task, TensorTask):
        run = local_only([task], RingSettings.for_run(settings))[0]
        local = own_scores(task, final_weights(run.state)).to_json()
    return {
        "layers": k,
        "own_val": result.scores.to_json(),
        "shared_own_val": own_scores(task, shared).to_json(),
        "local_only_own_val": local,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "intercept": result.intercept,
        "selected_on": result.selected_on,
        "holdout_rows": result.holdout_rows,
        "pull": result.pull,
        "file": PERSONAL_FILE,
    }


async def personalize(
    builder: TaskBuilder,
    task: Task,
    outputs: RunOutputs,
    summary: RunSummary,
    settings: RunSettings,
) -> RunSummary:
    """The summary with ``personal`` added, after writing this member's personal model
    (nothing when its source asks for no personal layer)."""
    k = builder.source.personal_layers
    if k <= 0:
        return summary
    figures = await builder.run(personal_figures, task, outputs.directory, k, settings)
    summary = attrs.evolve(summary, personal=figures)
    outputs.save_summary(summary)
    log.info(
        "personal model (last %d layers) written: own validation loss %.4f (shared model %.4f)",
        k,
        figures["own_val"]["loss"] or float("nan"),
        figures["shared_own_val"]["loss"] or float("nan"),
    )
    return summary
