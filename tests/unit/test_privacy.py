"""A member's DP budget: options, accounting across hops, hooks that do not leak."""

from __future__ import annotations

import math

import pytest
import torch

from fedup.cli import build_parser
from fedup.commands.run_options import dp_budget
from fedup.errors import ConfigError
from fedup.learn.loans import generate_lender, lender_seed
from fedup.learn.privacy import DEFAULT_CLIP, DpBudget, DpError, PrivateTraining
from fedup.learn.ring import FederationStats, RingSettings, initial_state, train_hop
from fedup.learn.schema import merge_summaries
from fedup.learn.tabular import summarize
from fedup.learn.task import TabularTask


def parse(*argv: str) -> object:
    return build_parser().parse_args(["simulate", *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ("--dp-epsilon", "0"),
        ("--dp-epsilon", "-1"),
        ("--dp-epsilon", "nan"),
        ("--dp-epsilon", "1000"),
        ("--dp-delta", "0"),
        ("--dp-delta", "0.5"),
        ("--dp-clip", "0"),
        ("--dp-clip", "inf"),
    ],
)
def test_bad_dp_values_exit_2_with_one_line(
    argv: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and argv[0] in err


def test_dp_options_make_a_budget() -> None:
    args = vars(parse("--dp-epsilon", "8", "--dp-delta", "1e-5", "--dp-clip", "2"))
    assert dp_budget(args) == DpBudget(8.0, 1e-5, 2.0)
    assert dp_budget(vars(parse())) is None
    default = dp_budget(vars(parse("--dp-epsilon", "8", "--dp-delta", "1e-5")))
    assert default == DpBudget(8.0, 1e-5) and default.clip == DEFAULT_CLIP == 5.0


@pytest.mark.parametrize("argv", [("--dp-epsilon", "8"), ("--dp-delta", "1e-5")])
def test_epsilon_and_delta_come_together(argv: tuple[str, str]) -> None:
    with pytest.raises(ConfigError, match="--dp-"):
        dp_budget(vars(parse(*argv)))


def test_start_takes_the_dp_options() -> None:
    args = build_parser().parse_args(["start", "--dp-epsilon", "4", "--dp-delta", "1e-6"])
    assert args.dp_epsilon == 4.0 and args.dp_delta == 1e-6


def test_a_budget_out_of_range_is_refused() -> None:
    with pytest.raises(DpError, match="epsilon"):
        DpBudget(0.0, 1e-5)
    with pytest.raises(DpError, match="delta"):
        DpBudget(1.0, 1.0)
    with pytest.raises(DpError, match="clip"):
        DpBudget(1.0, 1e-5, math.inf)


def lender_task(privacy: PrivateTraining | None, rows: int = 200) -> TabularTask:
    table = generate_lender(lender_seed(0, 0), rows).table
    schema = merge_summaries([summarize(table)], target="default")
    return TabularTask(table, schema, privacy=privacy)


def test_spent_epsilon_grows_and_never_passes_the_budget() -> None:
    privacy = PrivateTraining(DpBudget(1.0, 1e-5))
    task = lender_task(privacy)
    privacy.plan(n_train=task.n_train, batch_size=64, hop_epochs=1.0, max_laps=3)
    assert privacy.noise_multiplier is not None and privacy.noise_multiplier > 0
    settings = RingSettings(hop_epochs=1.0, max_laps=50, patience=50)
    fed = FederationStats(1, task.n_train, 0)
    state = initial_state(task, settings)
    spent = [privacy.epsilon_spent]
    trained = []
    for lap in range(6):  # twice the planned laps
        state, metrics = train_hop(task, state, settings, lap, 0, fed)
        trained.append(metrics.samples)
        spent.append(privacy.epsilon_spent)
    assert spent == sorted(spent) and spent[1] > 0
    assert spent[-1] <= 1.0
    # the cached per-step accounting is Opacus' own over the same history
    assert privacy.epsilon_spent == pytest.approx(privacy.accountant.get_epsilon(1e-5), rel=1e-12)
    assert trained[0] > 0 and trained[-1] == 0  # the budget is spent: the hop trains nothing
    assert privacy.report()["hops_refused"] >= 1
    # the hops that trained nothing still hand on a model of the same layout
    assert list(state.tensors) == list(initial_state(task, settings).tensors)


def test_dp_training_keeps_the_optimizer_layout_and_leaks_no_hooks() -> None:
    privacy = PrivateTraining(DpBudget(8.0, 1e-5))
    task = lender_task(privacy)
    privacy.plan(n_train=task.n_train, batch_size=64, hop_epochs=1.0, max_laps=10)
    settings = RingSettings(hop_epochs=1.0, max_laps=10)
    fed = FederationStats(1, task.n_train, 0)
    start = initial_state(task, settings)
    state, metrics = train_hop(task, start, settings, 0, 0, fed)
    assert metrics.samples > 0
    for k, v in start.tensors.items():
        assert state.tensors[k].dtype == v.dtype and state.tensors[k].shape == v.shape
    assert float(state.tensors[next(k for k in state.tensors if k.endswith(".step"))]) > 0
    with task.scratch_model() as model:  # the lent model is clean for the next hop
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_unplanned_dp_training_is_refused() -> None:
    task = lender_task(PrivateTraining(DpBudget(8.0, 1e-5)))
    settings = RingSettings(hop_epochs=1.0, max_laps=10)
    fed = FederationStats(1, task.n_train, 0)
    with pytest.raises(DpError, match="plan"):
        train_hop(task, initial_state(task, settings), settings, 0, 0, fed)


def test_dp_noise_is_not_the_run_seed_s() -> None:
    """Two members with the same seed, data and state get different noise."""
    outs = []
    for _ in range(2):
        privacy = PrivateTraining(DpBudget(8.0, 1e-5))
        task = lender_task(privacy)
        privacy.plan(n_train=task.n_train, batch_size=64, hop_epochs=1.0, max_laps=10)
        settings = RingSettings(hop_epochs=1.0, max_laps=10)
        state, _ = train_hop(
            task, initial_state(task, settings), settings, 0, 0, FederationStats(1, 1, 0)
        )
        outs.append(state.group("model."))
    assert any(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
