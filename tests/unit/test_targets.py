"""Multi-class and regression targets: inference, metrics, summaries, schema agreement."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedup.learn.baselines import score, simulate_ring
from fedup.learn.lap_sums import open_sums, to_sums
from fedup.learn.loan_targets import generate_graded_lender, generate_priced_lender
from fedup.learn.ring import RingSettings, final_weights
from fedup.learn.schema import (
    DataSummary,
    SchemaMismatchError,
    SummaryError,
    admit,
    fits,
    merge_summaries,
    schema_from_dict,
)
from fedup.learn.tabular import DataError, Table, encode, read_csv, split, summarize
from fedup.learn.targets import (
    BINARY,
    MULTICLASS,
    REGRESSION,
    TargetError,
    class_name,
    infer_task,
)
from fedup.learn.task import EvalStats, TabularTask
from fedup.learn.task_metrics import (
    SLOT_SCALE,
    MulticlassMetrics,
    RegressionMetrics,
    macro_f1,
    prediction_figures,
)


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the inference rule ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cells", "task"),
    [
        (["yes", "no", "yes"], BINARY),
        (["0", "1"], BINARY),
        (["ok"], BINARY),  # one label: a lender may have no defaults
        (["1", "1.0", "2"], BINARY),  # 1 and 1.0 are one value
        (["A", "B", "C"], MULTICLASS),
        (["1", "2", "3", "5"], MULTICLASS),  # few whole numbers: classes
        ([str(i) for i in range(10)], MULTICLASS),
        ([str(i) for i in range(11)], REGRESSION),  # many whole numbers: an amount
        (["1.5", "2", "3"], REGRESSION),  # not whole: an amount
        ([f"v{i}" for i in range(50)], MULTICLASS),
    ],
)
def test_the_task_is_inferred_from_the_targets_values(cells: list[str], task: str) -> None:
    assert infer_task(cells) == task


def test_more_text_classes_than_fit_are_refused() -> None:
    with pytest.raises(TargetError, match="51 text values, more than the 50"):
        infer_task([f"v{i}" for i in range(51)])


def test_class_names_read_numbers_by_value_and_keep_texts_case() -> None:
    assert [class_name(c) for c in (" 2.0", "02", "2.5", "A", "a ")] == ["2", "2", "2.5", "A", "a"]


def test_read_csv_infers_or_takes_the_task(tmp_path: Path) -> None:
    three = write(tmp_path, "x,y\n1,B\n2,A\n3,C\n4,A\n5,2.0\n")
    # the library's default stays binary (a 3-valued target is refused there) ...
    with pytest.raises(DataError, match="not binary: it has 4 values"):
        read_csv(three, "y")
    # ... None infers it
    table = read_csv(three, "y", task=None)
    assert table.task == MULTICLASS and table.classes == ("2", "A", "B", "C")
    assert table.target.tolist() == [2, 1, 3, 1, 0] and table.n_positive == 0
    numbers = write(tmp_path, "x,y\n1,3.5\n2,-1\n3,7.25\n", "n.csv")
    reg = read_csv(numbers, "y", task=None)
    assert reg.task == REGRESSION and reg.target.tolist() == [3.5, -1.0, 7.25]
    # an override: two classes read as multi-class, numbers as classes
    two = write(tmp_path, "x,y\n1,A\n2,B\n", "two.csv")
    assert read_csv(two, "y", task=MULTICLASS).classes == ("A", "B")
    with pytest.raises(DataError, match=r"'A' on line 2, not a finite number"):
        read_csv(two, "y", task=REGRESSION)
    with pytest.raises(DataError, match="a positive label applies only to a binary target"):
        read_csv(three, "y", task=None, positive_label="A")
    with pytest.raises(DataError, match="task 'ordinal' is not one of"):
        read_csv(three, "y", task="ordinal")


def test_split_holds_out_rows_of_every_task(tmp_path: Path) -> None:
    five = read_csv(write(tmp_path, "x,y\n1,A\n2,B\n3,C\n4,D\n5,A\n"), "y", task=None)
    train, val = split(five)
    assert (train.n_rows, val.n_rows) == (4, 1)
    assert val.target.tolist() == [0] and set(train.target.tolist()) == {0, 1, 2, 3}
    singles = read_csv(write(tmp_path, "x,y\n1,A\n2,B\n3,C\n4,D\n5,E\n", "s.csv"), "y",
                       task=None)  # fmt: skip
    assert split(singles)[1].n_rows == 0  # holding one out would hide its class
    table = generate_graded_lender(1, 300).table
    train, val = split(table)
    assert train.n_rows + val.n_rows == 300 and 55 <= val.n_rows <= 65
    assert set(val.target.tolist()) == {0, 1, 2}  # stratified per class
    reg = generate_priced_lender(1, 300).table
    assert split(reg)[1].n_rows == 60


# --- each task's metrics against hand-computed values ---------------------------------


def test_macro_f1_by_hand() -> None:
    # class 0: TP 2, rows 3, predicted 2 -> F1 4/5; class 1: TP 1, rows 1, predicted 2 ->
    # 2/3; class 2: no row, never predicted -> no F1
    assert macro_f1([2, 1, 0], [5, 3, 0]) == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert math.isnan(macro_f1([0, 0], [0, 0]))


def test_multiclass_sums_and_figures_by_hand() -> None:
    m = MulticlassMetrics(("a", "b", "c"))
    out = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0], [0, 0, 2.0]])
    y = torch.tensor([0.0, 1.0, 1.0, 1.0])
    correct, slots = m.sums(out, y)
    # predictions 0, 1, 0, 2; truth 0, 1, 1, 1
    assert correct == 2
    assert slots == (1, 1, 0, 1 + 2, 3 + 1, 0 + 1)
    ce = torch.nn.functional.cross_entropy(out, y.long(), reduction="sum").item()
    stats = EvalStats(ce, 4, correct, slots=slots)
    f1 = (2 / 3 + 2 / 4 + 0 / 1) / 3
    assert m.figures(stats) == pytest.approx({"loss": ce / 4, "accuracy": 0.5, "macro_f1": f1})
    exact = prediction_figures(m, out, y)
    assert exact == pytest.approx({"loss": ce / 4, "accuracy": 0.5, "macro_f1": f1})


def test_regression_sums_and_figures_by_hand() -> None:
    m = RegressionMetrics(mean=10.0, std=2.0)
    out = torch.tensor([[0.5], [-1.0], [1.0]])
    y = torch.tensor([1.0, -1.0, 0.0])  # standardized: 12, 8, 10 in the target's units
    _, slots = m.sums(out, y)
    assert slots == tuple(round(v * SLOT_SCALE) for v in (0.5 + 0 + 1, 1.0, 1.0, 2.0))
    stats = EvalStats(0.25 + 0 + 1, 3, slots=slots)
    # errors in units: -1, 0, 2 -> MSE 5/3, MAE 1; SST (units) = 4 + 4 + 0 = 8, SSE = 5
    expected = {"loss": 1.25 / 3, "mse": 5 / 3, "mae": 1.0, "r2": 1 - 5 / 8}
    assert m.figures(stats) == pytest.approx(expected)
    assert prediction_figures(m, out, y) == pytest.approx(expected)
    assert m.lap_figures(stats) == pytest.approx((1.0, 1 - 5 / 8))


def test_slots_travel_in_the_lap_sums_and_add_up() -> None:
    a = EvalStats(1.5, 4, 3, slots=(1, 2, 3))
    b = EvalStats(0.5, 2, 1, slots=(0, 1, 1))
    opened = open_sums(tuple(x + y for x, y in zip(to_sums(a), to_sums(b), strict=True)),
                       slots=True)  # fmt: skip
    assert opened is not None
    assert (opened.loss_sum, opened.n, opened.correct) == (2.0, 6, 4)
    assert opened.slots[:3] == (1, 3, 4) and not any(opened.slots[3:])
    assert (a + b).slots == (1, 3, 4)
    with pytest.raises(ValueError, match="slots"):
        to_sums(EvalStats(1.0, 1, slots=(1,), pos_hist=(1,) * 50, neg_hist=(0,) * 50))


# --- summaries and the schema agreement ----------------------------------------------


def test_a_class_seen_by_one_member_is_in_the_union_and_the_others_train(
    tmp_path: Path,
) -> None:
    common = "".join(f"{i},{'AB'[i % 2]}\n" for i in range(20))
    only_here = read_csv(write(tmp_path, "x,y\n" + common + "99,Z\n98,Z\n", "a.csv"), "y",
                         task=MULTICLASS)  # fmt: skip
    without = read_csv(write(tmp_path, "x,y\n" + common, "b.csv"), "y", task=MULTICLASS)
    summaries = [summarize(without), summarize(only_here)]
    admission = admit(summaries, "y")
    assert admission.admitted == (0, 1)
    schema = admission.schema
    assert schema.task == MULTICLASS and schema.classes == ("A", "B", "Z")
    assert schema.outputs == 3
    # the member without a row of Z encodes its classes into the union's indices
    _, y = encode(without, schema)
    assert set(y.tolist()) == {0.0, 1.0}
    _, y_here = encode(only_here, schema)
    assert y_here.tolist()[-2:] == [2.0, 2.0]
    # both train in one ring (no crash), the model has one output per class
    tasks = [TabularTask(t, schema) for t in (without, only_here)]
    run = simulate_ring(tasks, RingSettings(max_laps=2, patience=2))
    assert final_weights(run.state)["4.weight"].shape[0] == 3
    assert math.isfinite(score(final_weights(run.state), tasks).macro_f1)


def test_a_member_whose_task_differs_is_left_out_with_the_reason(tmp_path: Path) -> None:
    classes = generate_graded_lender(3, 200).table
    binary = read_csv(write(tmp_path, "x,grade\n1,0\n2,1\n3,1\n4,0\n5,1\n"), "grade")
    numbers = generate_priced_lender(4, 200)
    amounts = Table.from_rows(numbers.header, numbers.rows, "interest_rate", task=REGRESSION)
    amounts = Table(amounts.columns, amounts.target, "grade", task=REGRESSION)
    admission = admit([summarize(classes), summarize(binary), summarize(amounts)], "grade")
    assert admission.admitted == (0,)
    assert admission.refused[1].target
    assert "the target is binary here, the federation's is multiclass" in (
        admission.refused[1].reason
    )
    assert "give --task multiclass" in admission.refused[1].reason
    assert "the target is regression here" in admission.refused[2].reason
    # a member checking the view's schema says the same
    with pytest.raises(SchemaMismatchError, match="the target is binary here"):
        fits(summarize(binary), admission.schema)


def test_a_class_the_schema_does_not_list_does_not_fit(tmp_path: Path) -> None:
    ab = read_csv(write(tmp_path, "x,y\n1,A\n2,B\n3,A\n", "ab.csv"), "y", task=MULTICLASS)
    abc = read_csv(write(tmp_path, "x,y\n1,A\n2,B\n3,C\n", "abc.csv"), "y", task=MULTICLASS)
    schema = merge_summaries([summarize(ab)], "y")
    with pytest.raises(SchemaMismatchError, match="classes 'C' are not in the federation's"):
        fits(summarize(abc), schema)


def test_regression_targets_are_standardized_with_pooled_statistics() -> None:
    tables = [generate_priced_lender(20 + i, 300).table for i in range(3)]
    schema = merge_summaries([summarize(t) for t in tables], "interest_rate")
    pooled = np.concatenate([t.target for t in tables])
    assert schema.task == REGRESSION and schema.n_positive == 0
    assert schema.target_mean == pytest.approx(pooled.mean(), rel=1e-12)
    assert schema.target_std == pytest.approx(pooled.std(), rel=1e-12)
    _, y = encode(tables[0], schema)
    assert y == pytest.approx((tables[0].target - pooled.mean()) / pooled.std(), abs=1e-5)


@pytest.mark.parametrize("gen", [generate_graded_lender, generate_priced_lender])
def test_summaries_and_schemas_of_other_tasks_round_trip(gen: object) -> None:
    tables = [gen(30 + i, 200).table for i in range(2)]  # type: ignore[operator]
    summaries = [summarize(t) for t in tables]
    for s in summaries:
        assert DataSummary.from_dict(s.to_dict()) == s
    schema = merge_summaries(summaries, tables[0].target_name)
    again = schema_from_dict(schema.to_dict())
    assert again == schema and again.digest() == schema.digest()


def test_a_binary_summary_and_schema_are_encoded_as_before() -> None:
    table = generate_graded_lender(5, 200).table
    binary = Table(table.columns, (table.target == 0).astype(np.int8), "y", "<t>", "0", "1")
    encoded = summarize(binary).to_dict()
    assert "task" not in encoded and "classes" not in encoded
    assert "task" not in merge_summaries([summarize(binary)], "y").to_dict()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"task": "ordinal"}, "must be one of binary, multiclass, regression"),
        ({"classes": [["B", 100], ["A", 100]]}, "unique and in order"),
        ({"classes": [["A", 100], ["B", 99]]}, "class counts do not add up"),
        ({"classes": [["2.0", 200]]}, "stripped, numbers by value"),
        ({"n_positive": 3}, "no positive count"),
    ],
)
def test_a_malformed_multiclass_summary_is_refused(change: dict[str, object], reason: str) -> None:
    table = Table.from_rows(["x", "y"], [[str(i), "AB"[i % 2]] for i in range(200)], "y",
                            task=MULTICLASS)  # fmt: skip
    bad = {**summarize(table).to_dict(), **change}
    with pytest.raises(SummaryError, match=reason):
        DataSummary.from_dict(bad)


def test_a_malformed_regression_summary_is_refused() -> None:
    table = generate_priced_lender(6, 200).table
    good = summarize(table).to_dict()
    stats = {**good["target_stats"], "count": 199, "n_missing": 1}
    with pytest.raises(SummaryError, match="target_stats must be numeric, with n_rows values"):
        DataSummary.from_dict({**good, "target_stats": stats})
    with pytest.raises(SummaryError, match="mean"):
        DataSummary.from_dict({**good, "target_stats": {**good["target_stats"], "mean": 1e300}})
    del good["target_stats"]
    with pytest.raises(SummaryError, match="target_stats"):
        DataSummary.from_dict(good)


def test_a_label_skew_partition_is_refused_for_other_tasks() -> None:
    from fedup.learn.loans import partition

    tables = [generate_graded_lender(7, 200).table, generate_graded_lender(8, 200).table]
    with pytest.raises(DataError, match="the target is multiclass: use iid or column:NAME"):
        partition(tables, "dirichlet:0.3", 2)
    dealt = partition(tables, "iid", 3)
    assert sum(t.n_rows for t in dealt) == 400 and dealt[0].classes == ("A", "B", "C")
