"""Personal fine-tuning: which layers it trains, that nothing else moves, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedup.commands.run_options import MLP_LAYERS
from fedup.errors import ConfigError
from fedup.learn.baselines import make_tasks
from fedup.learn.loans import generate_lender, lender_seed
from fedup.learn.personal import check_layers, fine_tune, head_names, layers_of
from fedup.learn.task import TabularTask, mlp
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
    assert result.epochs == 0 and result.best_epoch == 0
    assert all(torch.equal(result.weights[n], shared[n]) for n in shared)
