"""Personalization: a member's private fine-tuning of the shared model's last layers.

After the run, a member that asks for ``K`` personal layers copies the federation's
final model, freezes all but its last ``K`` parameterised layers (the model's
``Linear`` and ``Conv`` modules, in the order :meth:`torch.nn.Module.modules` lists
them) and trains those on its own training split, keeping the epoch whose loss on
its own validation split is lowest (the shared model itself, epoch 0, included) and
stopping after :data:`PATIENCE` epochs without improvement or :data:`MAX_EPOCHS`.
The result never travels: it is this member's own model.

Everything else of the shared model (the frozen layers' parameters and buffers) is
copied back unchanged, so only the last ``K`` layers can differ.  The training is
deterministic from the run seed: epoch ``e`` draws its minibatches with
:func:`epoch_seed`.

:func:`own_scores` scores a model on the member's own validation split (loss,
AUC, accuracy), the figures ``summary.json``'s ``personal`` compares.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import attrs
import torch
from torch import nn

from fedup.errors import ConfigError
from fedup.learn.ring import model_with
from fedup.learn.task import Task, TensorTask, TrainBudget, roc_auc

__all__ = [
    "LAYER_TYPES",
    "MAX_EPOCHS",
    "PATIENCE",
    "OwnScores",
    "PersonalResult",
    "check_layers",
    "epoch_seed",
    "fine_tune",
    "head_names",
    "layers_of",
    "own_scores",
]

MAX_EPOCHS = 1000
"""Passes over the member's own training split at most: at the run's learning rate a
head needs many to move far (a member whose split is almost all one class); early
stopping usually ends it sooner."""
PATIENCE = 20
"""Epochs without a lower own validation loss before fine-tuning stops."""

LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""What counts as a parameterised layer."""


def layers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's ``Linear`` and ``Conv`` modules (name, module), in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]


def check_layers(model: nn.Module, k: int) -> None:
    """Raise a one-line :class:`~fedup.errors.ConfigError` unless ``0 <= k <=`` the
    model's layer count."""
    n = len(layers_of(model))
    if k < 0 or k > n:
        raise ConfigError(
            f"--personal-layers {k}: the model has {n} Linear/Conv layers; "
            f"give a number from 0 to {n}"
        )


def head_names(model: nn.Module, k: int) -> set[str]:
    """The ``state_dict`` names (parameters and buffers) of the model's last ``k`` layers."""
    check_layers(model, k)
    chosen = layers_of(model)[len(layers_of(model)) - k :] if k else []
    names: set[str] = set()
    for prefix, module in chosen:
        for key in module.state_dict():
            names.add(f"{prefix}.{key}" if prefix else key)
    return names


def epoch_seed(run_seed: int, epoch: int) -> int:
    """The seed of fine-tuning epoch ``epoch`` of a run (63 bits of a SHA-256)."""
    digest = hashlib.sha256(f"fedup-personal:{run_seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@attrs.frozen
class OwnScores:
    """A model on this member's own validation split."""

    loss: float
    auc: float
    """Exact ROC AUC for a task with in-memory tensors, else from the score histograms;
    NaN with one class only."""
    accuracy: float

    def to_json(self) -> dict[str, float | None]:
        return {
            k: (v if math.isfinite(v) else None)
            for k, v in (("loss", self.loss), ("auc", self.auc), ("accuracy", self.accuracy))
        }


def own_scores(task: Task, weights: Mapping[str, torch.Tensor]) -> OwnScores:
    """Loss, AUC and accuracy of ``weights`` on ``task``'s validation split."""
    model = model_with(task, weights)
    stats = task.evaluate(model)
    auc = stats.auc()
    if isinstance(task, TensorTask) and task.binary and task.n_val:
        prob = torch.sigmoid(task.outputs(model).reshape(-1).double()).cpu().numpy()
        auc = roc_auc(task.y_val.reshape(-1).cpu().numpy(), prob)
    return OwnScores(stats.loss, auc, stats.accuracy)


@attrs.frozen(eq=False)
class PersonalResult:
    """What fine-tuning made."""

    weights: dict[str, torch.Tensor]
    """The personal model (CPU tensors): the shared one with its last layers retrained."""
    scores: OwnScores
    """The personal model on the member's own validation split."""
    epochs: int
    """Epochs trained (the kept model is from the best of them, or the shared one)."""
    best_epoch: int
    """The epoch whose model was kept (0: the shared model was best)."""


def fine_tune(
    task: Task,
    shared: Mapping[str, torch.Tensor],
    k: int,
    *,
    seed: int,
    max_epochs: int = MAX_EPOCHS,
    patience: int = PATIENCE,
) -> PersonalResult:
    """Retrain the last ``k`` layers of ``shared`` on ``task``'s own data (see the
    module docstring); ``shared`` is not modified.  The task's own optimizer
    (:meth:`Task.make_optimizer`: the run's learning rate) and minibatch size are used.
    Raises :class:`~fedup.errors.ConfigError` when the model has fewer than ``k``
    layers."""
    model = model_with(task, shared)
    head = head_names(model, k)
    frozen = {name: v.detach().cpu().clone() for name, v in shared.items() if name not in head}
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)
    best_weights = {name: v.detach().cpu().clone() for name, v in shared.items()}
    best_loss = task.evaluate(model).loss
    best_epoch, epochs, stale = 0, 0, 0
    if k > 0 and task.n_train > 0:
        optimizer = task.make_optimizer(model)
        for epoch in range(1, max_epochs + 1):
            task.train(model, optimizer, TrainBudget(epochs=1.0, seed=epoch_seed(seed, epoch)))
            model.load_state_dict(frozen, strict=False)  # buffers of frozen layers unchanged
            epochs = epoch
            loss = task.evaluate(model).loss
            if loss < best_loss:
                best_loss, best_epoch, stale = loss, epoch, 0
                best_weights = {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
    return PersonalResult(best_weights, own_scores(task, best_weights), epochs, best_epoch)
