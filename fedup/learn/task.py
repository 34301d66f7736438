"""What a federation trains: the :class:`Task` a user hands to a peer.

A task owns everything local to one peer: its data (train and validation
splits), the model architecture, the optimizer and the training step.  The
ring (:mod:`fedup.learn.ring`) owns what travels between peers and decides
how much each peer trains per hop; it calls the task through four methods:

* :meth:`Task.build_model` ``(seed) -> nn.Module``: the same seed must give
  the same initial weights on every peer (all peers build the same
  architecture; only the weights travel).
* :meth:`Task.make_optimizer` ``(model) -> Optimizer``: default Adam.  Its
  state (Adam's moments) travels with the weights, so every peer must make
  the same kind of optimizer with the same hyperparameters.
* :meth:`Task.train` ``(model, optimizer, budget) -> TrainStats``: train in
  place for ``budget.epochs`` passes over the local training data (usually a
  fraction of one), using ``budget.seed`` for every random choice, weighting
  each sample's loss by ``budget.class_weights`` and adding the proximal term
  ``budget.prox_mu / 2 * ||w - anchor||^2`` when asked.
* :meth:`Task.evaluate` ``(model) -> EvalStats``: the *sum* of the loss over
  the local validation split and its size, so a federation can pool them
  exactly (sample-weighted), plus optional accuracy and score histograms.

A task also says where it trains (:attr:`Task.device`, the CPU unless it says
otherwise): the models it lends (:meth:`Task.scratch_model`) live there and
:meth:`Task.train` and :meth:`Task.evaluate` run there.  :meth:`Task.build_model`
builds on the CPU (the initial weights, the same on every member) and the ring
state that travels is CPU tensors (:mod:`fedup.learn.ring`), so the device is a
local choice: it is in no digest and members on different devices federate.

:class:`TensorTask` implements all of this for data that fits in memory as
tensors and a per-sample loss; :class:`TabularTask` is the tabular credit
model (an MLP on :func:`~fedup.learn.tabular.encode`'d rows).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn import functional as F

from fedup.learn.adam import Adam
from fedup.learn.schema import FeatureSchema
from fedup.learn.tabular import DataError, Table, encode, split
from fedup.learn.targets import MULTICLASS, REGRESSION
from fedup.learn.task_metrics import MulticlassMetrics, RegressionMetrics, TargetMetrics

if TYPE_CHECKING:
    from fedup.learn.privacy import PrivateTraining

__all__ = [
    "AUC_BINS",
    "MIN_ROWS",
    "EvalStats",
    "TabularTask",
    "Task",
    "TensorTask",
    "TrainBudget",
    "TrainStats",
    "check_rows",
    "roc_auc",
]

AUC_BINS: Final = 50
"""Bins of the predicted-probability histograms a peer shares for the federation's AUC."""


@attrs.frozen
class TrainBudget:
    """How much and how one hop trains."""

    epochs: float
    """Passes over the local training split (0.25 = a quarter of the local data)."""
    seed: int
    """Seed of every random choice of the hop (minibatch order, dropout)."""
    class_weights: tuple[float, float] | None = None
    """(negative, positive) weight of each sample's loss, or None for 1."""
    prox_mu: float = 0.0
    """Strength of the proximal term toward ``anchor`` (0 = none)."""
    anchor: Mapping[str, torch.Tensor] | None = None
    """Parameters the hop started from (required when ``prox_mu`` > 0)."""


@attrs.frozen
class TrainStats:
    """What a hop's training did."""

    steps: int
    samples: int
    """Training samples processed (with repetition): data passes = samples / n_train."""
    loss_sum: float
    """Sum of the per-sample training losses (weighted, without the proximal term)."""

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else math.nan


@attrs.frozen
class EvalStats:
    """Validation results as sums, so that peers' results add up exactly."""

    loss_sum: float
    """Sum over validation samples of the (unweighted) loss."""
    n: int
    """Validation samples."""
    correct: int = 0
    """Correct predictions (binary tasks: probability >= 0.5 vs label; a multi-class
    task counts its own, e.g. the largest logit's class vs label, as demo/images.py
    does).  The federation pools it like the loss, as ``accuracy`` in each lap."""
    pos_hist: tuple[int, ...] = ()
    """Binary tasks: histogram of predicted probabilities of positive samples."""
    neg_hist: tuple[int, ...] = ()
    """Binary tasks: the same for negative samples."""
    slots: tuple[int, ...] = ()
    """Multi-class and regression tables: the task's own integer sums, pooled like the
    histograms and in their place (:mod:`fedup.learn.task_metrics`)."""

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else math.nan

    def __add__(self, other: EvalStats) -> EvalStats:
        return EvalStats(
            self.loss_sum + other.loss_sum,
            self.n + other.n,
            self.correct + other.correct,
            _add_hist(self.pos_hist, other.pos_hist),
            _add_hist(self.neg_hist, other.neg_hist),
            _add_hist(self.slots, other.slots),
        )

    def auc(self) -> float:
        """ROC AUC from the pooled histograms (ties within a bin count one half)."""
        pos = np.asarray(self.pos_hist, dtype=np.float64)
        neg = np.asarray(self.neg_hist, dtype=np.float64)
        if pos.size == 0 or pos.sum() == 0 or neg.sum() == 0:
            return math.nan
        below = np.cumsum(neg) - neg  # negatives in lower bins
        return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def _add_hist(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    if not a:
        return b
    if not b:
        return a
    return tuple(x + y for x, y in zip(a, b, strict=True))


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Exact ROC AUC (Mann-Whitney U with tied scores sharing ranks); NaN if one class."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    mid_rank = upper - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float(mid_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's global generators seeded with ``seed`` for the block and restored after:
    the CPU's (as ``fork_rng(devices=[])`` and :func:`seed_cpu`: the CPU path is exactly
    that) and, for a CUDA ``device``, that device's too (dropout on a GPU draws there)."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            seed_cpu(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index], device_type="cuda"):
        seed_cpu(seed)
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
        yield


def seed_cpu(seed: int) -> None:
    """Seed torch's CPU generator, the one ``fork_rng(devices=[])`` saves and restores.

    ``torch.manual_seed`` also queues seeding for CUDA, XPU and MTIA when they are
    not initialised, formatting a stack trace each time (about 0.4 ms, on every
    hop), and the fork does not restore those generators anyway."""
    torch.default_generator.manual_seed(seed)


class Task(ABC):
    """A peer's local learning problem; see the module docstring for the contract."""

    @property
    @abstractmethod
    def n_train(self) -> int:
        """Training samples on this peer."""

    @property
    @abstractmethod
    def n_val(self) -> int:
        """Validation samples on this peer."""

    @property
    def label_counts(self) -> tuple[int, int] | None:
        """(negative, positive) training labels for binary tasks, else None.

        When given, the ring weights the loss so that this peer's label mix
        counts as the federation's does.
        """
        return None

    @property
    def device(self) -> torch.device:
        """Where this peer trains and evaluates (the CPU here).  A local choice: models
        are built on the CPU and the state that travels is CPU tensors."""
        return torch.device("cpu")

    def privacy_report(self) -> dict[str, Any] | None:
        """This member's differential privacy so far (:meth:`PrivateTraining.report
        <fedup.learn.privacy.PrivateTraining.report>`), or None when it trains without."""
        return None

    @property
    def metrics(self) -> TargetMetrics | None:
        """How a multi-class or regression table is scored (None: as a binary task, by
        accuracy and the score histograms' AUC)."""
        return None

    def lap_figures(self, stats: EvalStats) -> tuple[float, float]:
        """The two figures a lap record carries beside the loss (its ``accuracy`` and
        ``auc`` fields): accuracy and AUC here; multi-class, accuracy and macro-F1;
        regression, MAE (the target's units) and R²."""
        metrics = self.metrics
        return (stats.accuracy, stats.auc()) if metrics is None else metrics.lap_figures(stats)

    def figures(self, stats: EvalStats) -> dict[str, float]:
        """An evaluation as named figures: ``loss``, ``accuracy``, ``auc`` here;
        multi-class ``loss``, ``accuracy``, ``macro_f1``; regression ``loss``
        (standardized), ``mse``, ``mae``, ``r2`` (the target's units)."""
        metrics = self.metrics
        if metrics is None:
            return {"loss": stats.loss, "accuracy": stats.accuracy, "auc": stats.auc()}
        return metrics.figures(stats)

    @abstractmethod
    def build_model(self, seed: int) -> nn.Module:
        """A new model, on the CPU, whose initial weights depend only on ``seed``."""

    @contextmanager
    def scratch_model(self) -> Iterator[nn.Module]:
        """A model on :attr:`device` to load every weight into, for one use (a hop,
        an evaluation).

        Here a new one each time: a model of the library user's may keep state
        beyond its ``state_dict``.  A task whose models hold nothing else may lend
        the same ones again (:class:`TabularTask` does)."""
        yield self.build_model(0).to(self.device)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer every peer uses (its state travels): Adam, lr 1e-3 (torch's,
        without its compiler import: :mod:`fedup.learn.adam`)."""
        return Adam(model.parameters(), lr=1e-3)

    @abstractmethod
    def train(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, budget: TrainBudget
    ) -> TrainStats:
        """Train ``model`` in place with ``optimizer`` as ``budget`` says."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> EvalStats:
        """Validation loss sum and count (and more) of ``model`` on the local split."""


PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TensorTask(Task):
    """A task whose data are in-memory tensors and whose loss is per sample.

    ``model_fn(seed)`` builds the model; ``loss_fn(outputs, targets)``
    returns one loss per sample.  ``binary=True`` means one logit per sample
    and 0/1 targets: then evaluation also counts correct predictions and
    fills the score histograms, and :attr:`label_counts` is known.
    ``device`` is where the data are kept and the model trains (default: where
    ``x_train`` is); the four tensors are moved there once, here.  ``privacy``
    (a local choice, in no digest) makes every hop train with DP-SGD
    (:mod:`fedup.learn.privacy`; call its ``plan`` before the run).  ``metrics``
    scores a multi-class or regression table (:mod:`fedup.learn.task_metrics`):
    evaluation then adds its counts to the sums.
    """

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        *,
        model_fn: Callable[[int], nn.Module],
        loss_fn: PerSampleLoss,
        batch_size: int = 64,
        lr: float = 1e-3,
        binary: bool = False,
        eval_batch: int = 8192,
        device: torch.device | str | None = None,
        privacy: PrivateTraining | None = None,
        metrics: TargetMetrics | None = None,
    ) -> None:
        self.privacy = privacy
        self._metrics = metrics
        where = torch.device(device) if device is not None else x_train.device
        if where.type == "cuda" and where.index is None:
            where = torch.device("cuda", torch.cuda.current_device())
        self._device = where
        self.x_train, self.y_train = x_train.to(where), y_train.to(where)
        self.x_val, self.y_val = x_val.to(where), y_val.to(where)
        self.model_fn = model_fn
        self.loss_fn = loss_fn
        self.batch_size = batch_size
        self.lr = lr
        self.binary = binary
        self.eval_batch = eval_batch

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def metrics(self) -> TargetMetrics | None:
        return self._metrics

    def privacy_report(self) -> dict[str, Any] | None:
        return self.privacy.report() if self.privacy is not None else None

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_val(self) -> int:
        return len(self.x_val)

    @property
    def label_counts(self) -> tuple[int, int] | None:
        if not self.binary:
            return None
        pos = int(self.y_train.sum().item())
        return self.n_train - pos, pos

    def build_model(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            seed_cpu(seed)
            return self.model_fn(seed)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return Adam(model.parameters(), lr=self.lr)

    def steps_for(self, epochs: float, generator: torch.Generator) -> int:
        """Optimizer steps for ``epochs`` passes over the training split.

        ``epochs * n_train / batch_size`` rounded up or down at random (up with
        probability equal to its fractional part), so that in expectation
        every peer trains exactly in proportion to its data, even a peer
        whose share of a hop is less than one minibatch.
        """
        if self.n_train == 0 or epochs <= 0:
            return 0
        exact = epochs * self.n_train / self.batch_size
        whole = math.floor(exact)
        return whole + int(torch.rand((), generator=generator).item() < exact - whole)

    def train(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, budget: TrainBudget
    ) -> TrainStats:
        gen = torch.Generator().manual_seed(budget.seed)
        steps = self.steps_for(budget.epochs, gen)
        if steps == 0:
            return TrainStats(0, 0, 0.0)
        if self.privacy is not None:
            return self._train_private(self.privacy, model, optimizer, budget, steps)
        need = steps * self.batch_size
        order = torch.cat(
            [torch.randperm(self.n_train, generator=gen) for _ in range(-(-need // self.n_train))]
        ).to(self.device)  # drawn on the CPU (the same order everywhere), used where the data are
        anchor = None
        if budget.prox_mu > 0:
            if budget.anchor is None:
                raise ValueError("prox_mu > 0 needs an anchor")
            anchor = [budget.anchor[n] for n, _ in model.named_parameters()]
        model.train()
        total = 0.0
        samples = 0
        for i in range(steps):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            xb, yb = self.x_train[idx], self.y_train[idx]
            per = self.loss_fn(model(xb), yb)
            if budget.class_weights is not None:
                w_neg, w_pos = budget.class_weights
                per = per * torch.where(yb > 0.5, w_pos, w_neg)
            loss = per.mean()
            total += float(per.detach().sum())
            samples += len(idx)
            if anchor is not None:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * budget.prox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
        return TrainStats(steps, samples, total)

    def _train_private(
        self,
        privacy: PrivateTraining,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        budget: TrainBudget,
        steps: int,
    ) -> TrainStats:
        if budget.prox_mu > 0:
            raise ValueError("DP training has no proximal term: set prox_mu to 0")
        model.train()
        done, samples, total = privacy.train(
            model, optimizer, steps=steps, x=self.x_train, y=self.y_train,
            loss_fn=self.loss_fn, batch_size=self.batch_size,
            class_weights=budget.class_weights,
        )  # fmt: skip
        return TrainStats(done, samples, total)

    @torch.no_grad()
    def outputs(self, model: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        """Model outputs on ``x`` (default: the validation split), in eval mode."""
        x = self.x_val if x is None else x
        model.eval()
        parts = [model(x[i : i + self.eval_batch]) for i in range(0, len(x), self.eval_batch)]
        return torch.cat(parts) if parts else torch.empty(0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> EvalStats:
        if self.n_val == 0:
            return EvalStats(0.0, 0)
        out = self.outputs(model)
        loss_sum = float(self.loss_fn(out, self.y_val).double().sum())
        if self._metrics is not None:
            correct, slots = self._metrics.sums(out, self.y_val)
            return EvalStats(loss_sum, self.n_val, correct, slots=slots)
        if not self.binary:
            return EvalStats(loss_sum, self.n_val)
        prob = torch.sigmoid(out.reshape(-1).double()).cpu().numpy()
        y = self.y_val.reshape(-1).cpu().numpy() > 0.5
        correct = int(((prob >= 0.5) == y).sum())
        bins = np.minimum((prob * AUC_BINS).astype(np.int64), AUC_BINS - 1)
        pos = np.bincount(bins[y], minlength=AUC_BINS)
        neg = np.bincount(bins[~y], minlength=AUC_BINS)
        return EvalStats(
            loss_sum, self.n_val, correct, tuple(int(v) for v in pos), tuple(int(v) for v in neg)
        )

    @staticmethod
    def pooled(tasks: Sequence[TensorTask], **kwargs: Any) -> TensorTask:
        """One task over the union of the tasks' splits (the centralized baseline), on
        the first task's device unless ``kwargs`` names one."""
        first = tasks[0]
        kwargs.setdefault("device", first.device)
        return TensorTask(
            torch.cat([t.x_train for t in tasks]), torch.cat([t.y_train for t in tasks]),
            torch.cat([t.x_val for t in tasks]), torch.cat([t.y_val for t in tasks]),
            model_fn=first.model_fn, loss_fn=first.loss_fn, batch_size=first.batch_size,
            lr=first.lr, binary=first.binary, metrics=first.metrics, **kwargs,
        )  # fmt: skip


def mlp(width: int, hidden: Sequence[int] = (64, 32), outputs: int = 1) -> nn.Sequential:
    """``width -> hidden... -> outputs`` with ReLU between layers (PyTorch's default init)."""
    layers: list[nn.Module] = []
    prev = width
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, outputs))
    return nn.Sequential(*layers)


def target_metrics(schema: FeatureSchema) -> TargetMetrics | None:
    """How the schema's task is scored (None: binary, the built-in way)."""
    if schema.task == MULTICLASS:
        return MulticlassMetrics(schema.classes)
    if schema.task == REGRESSION:
        return RegressionMetrics(schema.target_mean, schema.target_std)
    return None


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.reshape(-1), reduction="none")


VAL_FRACTION: Final = 0.2
"""Share of each peer's rows held out for validation."""
SPLIT_SEED: Final = 0
"""Seed of the (stratified) train/validation split."""
MIN_ROWS: Final = 5
"""Rows a peer's table needs to train.  The split holds out ``round(VAL_FRACTION *
count)`` of each label's rows: with fewer than 5 rows some label mixes hold out none
(2 and 2 rows: none of either), and a peer with no validation row has no validation
loss to report (``summary.json`` would have no figure).  From 5 rows on, the larger
label has at least 3 rows, so one is held out and the rest train, whatever the mix.
A peer needs no row of each label: one with no defaults is a normal lender."""


def check_rows(table: Table) -> None:
    """Raise :class:`~fedup.learn.tabular.DataError` if ``table`` has fewer than
    :data:`MIN_ROWS` rows (one line: the file, its rows, the minimum and why)."""
    if table.n_rows < MIN_ROWS:
        rows = "1 row" if table.n_rows == 1 else f"{table.n_rows} rows"
        raise DataError(
            f"{table.source}: {rows}, too few to train: a peer needs at least {MIN_ROWS} "
            f"(a {VAL_FRACTION:.0%} share of each label is held out for validation); "
            "add rows"
        )


class TabularTask(TensorTask):
    """A table's target learned by a small MLP: binary, multi-class or regression.

    The rows are split (stratified, ``val_fraction``, ``split_seed``) and
    encoded with the federation's ``schema``; the model is
    ``schema.width -> hidden... -> schema.outputs`` with ReLU, trained with Adam
    on the binary cross-entropy of the logit (binary), the cross-entropy of the
    K logits (multi-class) or the squared error of the standardized target
    (regression, :mod:`fedup.learn.task_metrics`).  Every peer must use the same
    ``hidden``, ``lr`` and ``batch_size``; ``device`` is its own (default: the CPU).
    """

    def __init__(
        self,
        table: Table,
        schema: FeatureSchema,
        *,
        val_fraction: float = VAL_FRACTION,
        split_seed: int = SPLIT_SEED,
        hidden: Sequence[int] = (64, 32),
        batch_size: int = 64,
        lr: float = 1e-3,
        device: torch.device | str | None = None,
        privacy: PrivateTraining | None = None,
    ) -> None:
        train_rows, val_rows = split(table, val_fraction=val_fraction, seed=split_seed)
        x_tr, y_tr = encode(train_rows, schema)
        x_va, y_va = encode(val_rows, schema)
        self.schema = schema
        self.hidden = tuple(hidden)
        self.source = table.source
        self._spare: list[nn.Module] = []
        metrics = target_metrics(schema)
        super().__init__(
            torch.from_numpy(x_tr), torch.from_numpy(y_tr),
            torch.from_numpy(x_va), torch.from_numpy(y_va),
            model_fn=lambda seed: mlp(schema.width, self.hidden, schema.outputs),
            loss_fn=_bce if metrics is None else metrics.loss, batch_size=batch_size, lr=lr,
            binary=metrics is None, device=device, privacy=privacy, metrics=metrics,
        )  # fmt: skip

    @contextmanager
    def scratch_model(self) -> Iterator[nn.Module]:
        """Lend a spare MLP on :attr:`device` (building one only when none is free):
        its parameters and buffers are its whole state, every use loads all of them,
        and its gradients are dropped when it comes back.  Building a model cost about a tenth of a
        simulated hop."""
        try:
            model = self._spare.pop()
        except IndexError:
            model = self.build_model(0).to(self.device)
        try:
            yield model
        finally:
            for p in model.parameters():
                p.grad = None
            self._spare.append(model)
