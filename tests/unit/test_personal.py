"""Personal fine-tuning: which layers it trains, that nothing else moves, that it chooses
on a holdout of the training split (never the validation split), determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedup.commands.run_options import MLP_LAYERS
from fedup.errors import ConfigError
from fedup.learn.baselines import make_tasks
from fedup.learn.loans import generate_lender, lender_seed
from fedup.learn.personal import (
    HOLDOUT_FRACTION,
    PULL,
    RATE_PRIOR,
    check_layers,
    fine_tune,
    head_names,
    holdout_rows,
    intercept_shift,
    layers_of,
)
from fedup.learn.ring import model_with
from fedup.learn.task import EvalStats, TabularTask, Task, TensorTask, TrainBudget, TrainStats, mlp
from fedup.peer import TabularSource
from fedup.peer.source import FixedTaskSource


def lender_task() -> tuple[TabularTask, dict[str, torch.Tensor]]:
    (task,) = make_tasks([generate_lender(lender_seed(0, 1), 400).table])
    shared = {k: v.clone() for k, v in task.build_model(7).state_dict().items()}
    return task, shared


def test_layers_are_the_linear_and_conv_modules_in_order() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3),
                          nn.BatchNorm1d(3), nn.Linear(3, 1))  # fmt: skip
    assert [name for name, _ in layers_of(model)] == ["0", "3", "5"]
    assert head_names(model, 1) == {"5.weight", "5.bias"}
    assert head_names(model, 2) == {"3.weight", "3.bias", "5.weight", "5.bias"}
    assert head_names(model, 0) == set()
    assert len(layers_of(mlp(5))) == MLP_LAYERS  # the command line's bound is the MLP's


def test_more_layers_than_the_model_has_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^--personal-layers 4: the model has 3 Linear/Conv"):
        check_layers(mlp(5), 4)
    table = generate_lender(lender_seed(0, 0), 300).table
    with pytest.raises(ConfigError, match="from 0 to 3"):
        TabularSource(table, target="default", personal_layers=4)
    with pytest.raises(ConfigError, match="give a whole number"):
        TabularSource(table, target="default", personal_layers=-1)
    task, _ = lender_task()
    with pytest.raises(ConfigError, match="from 0 to 3"):
        FixedTaskSource(task, personal_layers=5)
    assert TabularSource(table, target="default", personal_layers=3).personal_layers == 3


@pytest.mark.parametrize("k", [1, 2])
def test_only_the_last_k_layers_change_and_the_shared_weights_are_untouched(k: int) -> None:
    task, shared = lender_task()
    before = {n: v.clone() for n, v in shared.items()}
    result = fine_tune(task, shared, k, seed=3, max_epochs=3, patience=3)
    for name, value in shared.items():
        assert torch.equal(value, before[name]), name  # the input is not modified
    head = head_names(mlp(1), k)
    assert result.best_epoch > 0  # the shared model was improved on this member's split
    changed = {n for n, v in result.weights.items() if not torch.equal(v, shared[n])}
    assert changed == head
    assert result.scores.loss < fine_tune(task, shared, k, seed=3, max_epochs=0).scores.loss


def test_fine_tuning_is_deterministic_from_the_seed() -> None:
    task, shared = lender_task()
    a = fine_tune(task, shared, 1, seed=5, max_epochs=2)
    b = fine_tune(task, shared, 1, seed=5, max_epochs=2)
    c = fine_tune(task, shared, 1, seed=6, max_epochs=2)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert a.scores == b.scores
    assert any(not torch.equal(a.weights[n], c.weights[n]) for n in a.weights)


def test_zero_layers_is_the_shared_model() -> None:
    task, shared = lender_task()
    result = fine_tune(task, shared, 0, seed=0)
    assert result.epochs == 0 and result.best_epoch == 0 and result.pull == 0
    assert all(torch.equal(result.weights[n], shared[n]) for n in shared)


def test_the_holdout_is_drawn_from_the_training_rows_by_label_and_seed() -> None:
    labels = torch.tensor([0.0] * 90 + [1.0] * 10)
    fit, held = holdout_rows(labels, 4)
    assert len(set(fit.tolist()) & set(held.tolist())) == 0
    assert sorted(fit.tolist() + held.tolist()) == list(range(100))
    assert int((labels[held] == 1).sum()) == round(HOLDOUT_FRACTION * 10)  # stratified
    assert len(held) == round(HOLDOUT_FRACTION * 90) + round(HOLDOUT_FRACTION * 10)
    again, _ = holdout_rows(labels, 4)
    other, _ = holdout_rows(labels, 5)
    assert torch.equal(fit, again) and not torch.equal(fit, other)
    _, tiny = holdout_rows(torch.tensor([0.0, 1.0]), 0)  # no label rounds to a row
    assert len(tiny) == 1


def test_choosing_never_reads_the_validation_split() -> None:
    task, shared = lender_task()
    a = fine_tune(task, shared, 1, seed=2, max_epochs=30, patience=5)
    scrambled = TensorTask(
        task.x_train, task.y_train, torch.randn_like(task.x_val) * 100, 1 - task.y_val,
        model_fn=task.model_fn, loss_fn=task.loss_fn, batch_size=task.batch_size,
        lr=task.lr, binary=True,
    )  # fmt: skip
    b = fine_tune(scrambled, shared, 1, seed=2, max_epochs=30, patience=5)
    assert a.selected_on == b.selected_on == "training holdout"
    assert a.holdout_rows == round(
        HOLDOUT_FRACTION * (task.n_train - int(task.y_train.sum()))
    ) + round(HOLDOUT_FRACTION * int(task.y_train.sum()))
    assert (a.epochs, a.best_epoch, a.intercept) == (b.epochs, b.best_epoch, b.intercept)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
    assert a.scores != b.scores  # the scores are on each task's own validation split


def test_the_intercept_moves_to_the_members_base_rate() -> None:
    task, shared = lender_task()
    model = model_with(task, shared)
    intercept_shift(task, model, task.x_train, task.y_train)
    moved = {n for n, v in model.state_dict().items() if not torch.equal(v, shared[n])}
    assert moved == {"4.bias"}
    mean = float(torch.sigmoid(task.outputs(model, task.x_train)).mean())
    pos = float(task.y_train.sum())
    assert mean == pytest.approx((pos + RATE_PRIOR) / (task.n_train + 2 * RATE_PRIOR), abs=1e-6)


def test_the_pull_keeps_the_weights_near_the_start_and_leaves_the_biases_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fedup.learn.personal as personal

    task, shared = lender_task()
    weights, biases = ("2.weight", "4.weight"), ("2.bias", "4.bias")

    def moved(result_weights: dict[str, torch.Tensor], names: tuple[str, ...]) -> float:
        return sum(float(((result_weights[n] - shared[n]) ** 2).sum()) for n in names) ** 0.5

    pulled = fine_tune(task, shared, 2, seed=3, max_epochs=5, patience=5)
    monkeypatch.setattr(personal, "PULL", 0.0)
    free = fine_tune(task, shared, 2, seed=3, max_epochs=5, patience=5)
    assert pulled.pull == PULL > 0 and free.pull == 0
    assert pulled.best_epoch == free.best_epoch == 5
    assert moved(pulled.weights, weights) < 0.2 * moved(free.weights, weights)
    assert moved(pulled.weights, biases) > 0.5 * moved(free.weights, biases)  # not pulled
    assert {n for n, v in pulled.weights.items() if not torch.equal(v, shared[n])} == (
        head_names(mlp(1), 2)
    )


def test_a_member_of_one_label_ends_far_below_the_shared_models_loss() -> None:
    task, shared = lender_task()
    keep = task.y_train.reshape(-1) < 0.5
    negatives = TensorTask(
        task.x_train[keep], task.y_train[keep], task.x_val, torch.zeros_like(task.y_val),
        model_fn=task.model_fn, loss_fn=task.loss_fn, binary=True,
    )  # fmt: skip
    result = fine_tune(negatives, shared, 1, seed=0, max_epochs=5)
    assert result.intercept
    assert result.scores.loss < 0.01 < fine_tune(negatives, shared, 0, seed=0).scores.loss


class OpaqueTask(Task):
    """A task without in-memory tensors: fine-tuning can only choose on its validation split."""

    def __init__(self, inner: TensorTask) -> None:
        self.inner = inner

    @property
    def n_train(self) -> int:
        return self.inner.n_train

    @property
    def n_val(self) -> int:
        return self.inner.n_val

    def build_model(self, seed: int) -> nn.Module:
        return self.inner.build_model(seed)

    def train(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, budget: TrainBudget
    ) -> TrainStats:
        return self.inner.train(model, optimizer, budget)

    def evaluate(self, model: nn.Module) -> EvalStats:
        return self.inner.evaluate(model)


def test_a_task_without_tensors_says_it_chose_on_its_validation_split() -> None:
    task, shared = lender_task()
    result = fine_tune(OpaqueTask(task), shared, 1, seed=1, max_epochs=3, patience=3)
    assert result.selected_on == "validation" and result.holdout_rows == 0
    assert not result.intercept
    assert result.scores.loss <= fine_tune(task, shared, 0, seed=1).scores.loss  # epoch 0 counts
    assert fine_tune(task, shared, 0, seed=1).selected_on == "none"
