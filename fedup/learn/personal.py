"""Personalization: a member's private fine-tuning of the shared model's last layers.

After the run, a member that asks for ``K`` personal layers makes its own model from
the federation's final one.  Only the last ``K`` parameterised layers (the model's
``Linear`` and ``Conv`` modules, in the order :meth:`torch.nn.Module.modules` lists
them) can change; every other parameter and buffer is the shared model's.  For a
task with in-memory tensors (:class:`~fedup.learn.task.TensorTask`):

1. **A holdout from the training split.**  :func:`holdout_rows` sets aside
   :data:`HOLDOUT_FRACTION` of the member's *training* rows (stratified by label for
   binary and multi-class targets, drawn from the run seed).  Every choice below is
   made on it; the member's validation split is never looked at, so the personal
   model's figures on that split are not biased by the choosing.
2. **Intercept.**  For a binary target whose last layer has one output with a bias,
   that bias is shifted so the model's mean predicted probability on the rows it
   learns from equals their positive rate (smoothed, :func:`intercept_shift`): the
   shared model predicts the federation's base rate, a member's may be far from it.
   The shifted model is the starting point when the holdout prefers it to the shared
   model.
3. **Fine-tuning.**  From that start, the last ``K`` layers train on the other
   training rows with the run's optimizer at :data:`LR_SCALE` times its learning
   rate, one epoch at a time (epoch ``e`` draws its minibatches with
   :func:`epoch_seed`), for at most :data:`MAX_EPOCHS` epochs, stopping after
   :data:`PATIENCE` without a lower holdout loss.  The layers' weights (not their
   biases) are pulled towards where they started (L2-SP): each step's gradient gains
   :data:`PULL` times their distance from the start, the gradient of
   ``PULL / 2 * ||w - w_start||^2``.  The epoch with the lowest holdout loss is chosen
   (0: the starting point itself).
4. **Refit.**  The same recipe then runs again on the whole training split (the
   intercept recomputed on it) for exactly the chosen number of epochs: that is the
   personal model.

A task without in-memory tensors cannot be split here: its fine-tuning keeps the
epoch whose loss on the member's *validation* split is lowest and skips the
intercept step, and :attr:`PersonalResult.selected_on` says so (``"validation"``;
its own-split figures are then optimistic).

The result never travels: it is this member's own model.  Everything is
deterministic from the run seed.  :func:`own_scores` scores a model on the member's
own validation split (loss, AUC, accuracy), the figures ``summary.json``'s
``personal`` compares.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import attrs
import torch
from torch import nn

from fedup.errors import ConfigError
from fedup.learn.ring import model_with
from fedup.learn.task import Task, TensorTask, TrainBudget, roc_auc
from fedup.learn.task_metrics import MulticlassMetrics

__all__ = [
    "HOLDOUT_FRACTION",
    "LAYER_TYPES",
    "LR_SCALE",
    "MAX_EPOCHS",
    "PATIENCE",
    "PULL",
    "OwnScores",
    "PersonalResult",
    "check_layers",
    "epoch_seed",
    "fine_tune",
    "head_names",
    "holdout_rows",
    "intercept_shift",
    "layers_of",
    "own_scores",
]

MAX_EPOCHS = 1000
"""Passes over the rows fine-tuning learns from, at most: a member whose split is
almost all one class keeps improving for hundreds; early stopping usually ends it
far sooner."""
PATIENCE = 20
"""Epochs without a lower holdout loss before fine-tuning stops."""
HOLDOUT_FRACTION = 0.2
"""Share of the member's training rows set aside to choose the epoch and the start
(stratified by label, as the train/validation split is)."""
LR_SCALE = 3.0
"""Fine-tuning's learning rate against the run's: a head's few parameters take larger
steps well, and one that must move its base rate far gets there in fewer epochs.  On
the benchmark's data (``bench/bench_personal.py``) 1x and 3x won for as many members,
or 3x for one more, depending on the holdout drawn."""
PULL = 1.0
"""Strength of the pull of the trained layers' weights towards the starting point's
(L2-SP; biases are free, so a member's intercept can go as far as its rows say).  It
keeps a head trained on a member's thousands of rows from drifting from the shared
model where the rows say little; on ``bench/bench_personal.py``'s data 0.03 to 3 won for
as many members, 0 for one fewer (docs/quality.md)."""
RATE_PRIOR = 0.5
"""Pseudo-rows of each label added to the positive rate the intercept aims at, so a
member with no row of one label gets a finite intercept."""

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


def _seed_of(label: str, run_seed: int, n: int) -> int:
    digest = hashlib.sha256(f"fedup-personal{label}:{run_seed}:{n}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def epoch_seed(run_seed: int, epoch: int) -> int:
    """The seed of fine-tuning epoch ``epoch`` of a run (63 bits of a SHA-256)."""
    return _seed_of("", run_seed, epoch)


def holdout_rows(
    labels: torch.Tensor, run_seed: int, *, stratify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, holdout)``: sorted row indices of a training split with ``labels`` (one
    per row), the holdout being :data:`HOLDOUT_FRACTION` of each label's rows (rounded;
    of all rows when not ``stratify``), at least one row whenever there are two,
    drawn from ``run_seed``.  The two are disjoint and cover every row."""
    n = len(labels)
    gen = torch.Generator().manual_seed(_seed_of("-holdout", run_seed, n))
    flat = labels.reshape(n, -1)[:, 0].cpu() if n else labels.reshape(0)
    groups = (
        [flat == v for v in torch.unique(flat)] if stratify else [torch.ones(n, dtype=torch.bool)]
    )
    fit: list[torch.Tensor] = []
    held: list[torch.Tensor] = []
    for mask in groups:
        idx = torch.nonzero(mask).reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        take = round(HOLDOUT_FRACTION * len(idx))
        held.append(idx[:take])
        fit.append(idx[take:])
    fit_rows = torch.cat(fit) if fit else torch.empty(0, dtype=torch.long)
    held_rows = torch.cat(held) if held else torch.empty(0, dtype=torch.long)
    if len(held_rows) == 0 and n >= 2:  # every label too rare to round to a row
        pick = int(torch.randint(len(fit_rows), (), generator=gen))
        held_rows = fit_rows[pick : pick + 1]
        fit_rows = torch.cat([fit_rows[:pick], fit_rows[pick + 1 :]])
    return fit_rows.sort().values, held_rows.sort().values


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
    """Epochs trained while choosing (on the training rows outside the holdout)."""
    best_epoch: int
    """The epoch chosen, and so the refit's length (0: the starting point, the shared
    model or, with :attr:`intercept`, the shared model with its intercept moved)."""
    intercept: bool = False
    """Whether the starting point was the shared model with its intercept moved to this
    member's base rate (:func:`intercept_shift`)."""
    selected_on: str = "training holdout"
    """Which rows chose: ``"training holdout"`` (the member's validation split untouched),
    ``"validation"`` (a task without in-memory tensors) or ``"none"`` (nothing trained:
    ``k`` is 0, or fewer than two training rows, and the result is the shared model)."""
    holdout_rows: int = 0
    """Training rows set aside to choose (0 with ``selected_on == "validation"``)."""
    pull: float = 0.0
    """The strength of the pull towards the starting weights that trained it
    (:data:`PULL`; 0 when nothing was trained)."""


def _last_bias(model: nn.Module) -> torch.Tensor | None:
    """The last layer's bias when it is a single output's (a binary logit's)."""
    layers = layers_of(model)
    if not layers:
        return None
    bias = getattr(layers[-1][1], "bias", None)
    return bias if isinstance(bias, torch.Tensor) and bias.numel() == 1 else None


@torch.no_grad()
def intercept_shift(task: TensorTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Move ``model``'s last bias (in place; a binary task's single logit) so that its
    mean predicted probability on rows ``x`` is their positive rate ``y`` smoothed by
    :data:`RATE_PRIOR` pseudo-rows of each label (bisection over a shift of +-30)."""
    bias = _last_bias(model)
    if bias is None or len(x) == 0:
        return
    target = (float(y.sum()) + RATE_PRIOR) / (len(y) + 2 * RATE_PRIOR)
    start = bias.detach().clone()
    low, high = -30.0, 30.0
    for _ in range(50):
        mid = (low + high) / 2
        bias.copy_(start + mid)
        mean = float(torch.sigmoid(task.outputs(model, x).reshape(-1).double()).mean())
        low, high = (mid, high) if mean < target else (low, mid)
    bias.copy_(start + (low + high) / 2)


def _subtask(task: TensorTask, fit: torch.Tensor, held: torch.Tensor) -> TensorTask:
    """``task`` learning from the training rows ``fit`` and scored on ``held``."""
    x, y = task.x_train, task.y_train
    fit, held = fit.to(x.device), held.to(x.device)
    return TensorTask(
        x[fit], y[fit], x[held], y[held], model_fn=task.model_fn, loss_fn=task.loss_fn,
        batch_size=task.batch_size, lr=task.lr, binary=task.binary,
        eval_batch=task.eval_batch, device=task.device, metrics=task.metrics,
    )  # fmt: skip


def _pull_hook(p: torch.Tensor, pull: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook adding ``pull * (p - start)``: the gradient of
    ``pull / 2 * ||p - start||^2``, ``start`` being ``p``'s value now."""
    start = p.detach().clone()

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad + pull * (p.detach() - start)

    return hook


class _Tuner:
    """One fine-tuning recipe: which names train, from where, at which rate."""

    def __init__(
        self, task: Task, shared: Mapping[str, torch.Tensor], k: int, pull: float = 0.0
    ) -> None:
        self.task = task
        self.shared = shared
        self.pull = pull
        self.head = head_names(model_with(task, shared), k)
        self.frozen = {n: v.detach().cpu().clone() for n, v in shared.items() if n not in self.head}

    def start(self, learner: Task, intercept: bool) -> nn.Module:
        model = model_with(learner, self.shared)
        for name, p in model.named_parameters():
            p.requires_grad_(name in self.head)
        if intercept and isinstance(learner, TensorTask):
            intercept_shift(learner, model, learner.x_train, learner.y_train)
        if self.pull > 0:
            for name, p in model.named_parameters():
                if name in self.head and not name.endswith("bias"):
                    p.register_hook(_pull_hook(p, self.pull))  # type: ignore[no-untyped-call]
        return model

    def optimizer(self, learner: Task, model: nn.Module) -> torch.optim.Optimizer:
        optimizer = learner.make_optimizer(model)
        for group in optimizer.param_groups:
            group["lr"] *= LR_SCALE
        return optimizer

    def epoch(
        self, learner: Task, model: nn.Module, opt: torch.optim.Optimizer, seed: int, e: int
    ) -> None:
        learner.train(model, opt, TrainBudget(epochs=1.0, seed=epoch_seed(seed, e)))
        model.load_state_dict(self.frozen, strict=False)  # buffers of frozen layers unchanged


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: v.detach().cpu().clone() for n, v in model.state_dict().items()}


def _choose(
    tuner: _Tuner, learner: Task, intercept: bool, seed: int, max_epochs: int, patience: int
) -> tuple[dict[str, torch.Tensor], int, int]:
    """Fine-tune ``learner`` from the start, scoring each epoch on its validation rows:
    ``(best weights, epochs trained, best epoch)``."""
    model = tuner.start(learner, intercept)
    best_weights, best_loss = _state(model), learner.evaluate(model).loss
    best_epoch, epochs, stale = 0, 0, 0
    if not tuner.head or learner.n_train == 0:
        return best_weights, epochs, best_epoch
    optimizer = tuner.optimizer(learner, model)
    for e in range(1, max_epochs + 1):
        tuner.epoch(learner, model, optimizer, seed, e)
        epochs = e
        loss = learner.evaluate(model).loss
        if loss < best_loss:
            best_loss, best_epoch, stale = loss, e, 0
            best_weights = _state(model)
        else:
            stale += 1
            if stale >= patience:
                break
    return best_weights, epochs, best_epoch


def fine_tune(
    task: Task,
    shared: Mapping[str, torch.Tensor],
    k: int,
    *,
    seed: int,
    max_epochs: int = MAX_EPOCHS,
    patience: int = PATIENCE,
) -> PersonalResult:
    """This member's personal model: ``shared`` with its last ``k`` layers retrained on
    ``task``'s training split (see the module docstring; ``seed`` is the run seed);
    ``shared`` is not modified.  Raises :class:`~fedup.errors.ConfigError` when the
    model has fewer than ``k`` layers."""
    tuner = _Tuner(task, shared, k, PULL)
    if not tuner.head or task.n_train == 0 or (isinstance(task, TensorTask) and task.n_train < 2):
        weights = {n: v.detach().cpu().clone() for n, v in shared.items()}
        return PersonalResult(weights, own_scores(task, weights), 0, 0, selected_on="none")
    if not isinstance(task, TensorTask):
        weights, epochs, best = _choose(tuner, task, False, seed, max_epochs, patience)
        return PersonalResult(
            weights, own_scores(task, weights), epochs, best, selected_on="validation",
            pull=tuner.pull,
        )  # fmt: skip
    stratify = task.binary or isinstance(task.metrics, MulticlassMetrics)
    fit, held = holdout_rows(task.y_train, seed, stratify=stratify)
    chooser = _subtask(task, fit, held)
    intercept = False
    plain = tuner.start(chooser, False)
    if task.binary and _last_bias(plain) is not None:
        shifted = chooser.evaluate(tuner.start(chooser, True)).loss
        intercept = shifted < chooser.evaluate(plain).loss
    _, epochs, best = _choose(tuner, chooser, intercept, seed, max_epochs, patience)
    model = tuner.start(task, intercept)  # the refit: the whole training split, as chosen
    if best:
        optimizer = tuner.optimizer(task, model)
        for e in range(1, best + 1):
            tuner.epoch(task, model, optimizer, seed, e)
    weights = _state(model)
    return PersonalResult(
        weights, own_scores(task, weights), epochs, best, intercept, holdout_rows=len(held),
        pull=tuner.pull,
    )  # fmt: skip
