"""Multi-class and regression targets end to end: ``simulate --data --task``, every output
that fits the task, and ``predict`` on a member's folder.

Each task runs once for the module: three real peers on the simulator's in-memory
network and virtual clock, 3 laps at most, with the baselines (a few seconds)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedup.cli import main
from fedup.learn.loan_targets import generate_graded_lender, generate_priced_lender
from fedup.learn.loans import lender_seed
from fedup.learn.predict import load_model, predict
from fedup.learn.tabular import encode, read_csv
from fedup.learn.targets import MULTICLASS, REGRESSION

ROWS = 200
TARGETS = {MULTICLASS: ("grade", generate_graded_lender), REGRESSION: ("interest_rate",
           generate_priced_lender)}  # fmt: skip


def _csv(path: Path, task: str) -> Path:
    _, gen = TARGETS[task]
    books = [gen(lender_seed(0, i), ROWS) for i in range(3)]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(books[0].header)
    for b in books:
        w.writerows(b.rows)
    path.write_text(out.getvalue())
    return path


@pytest.fixture(scope="module", params=[MULTICLASS, REGRESSION])
def simulated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, dict[str, Any], Path]:
    task: str = request.param
    tmp = tmp_path_factory.mktemp(task)
    data = _csv(tmp / "rows.csv", task)
    out = tmp / "sim"
    code = main([
        "simulate", "--state-dir", str(tmp / "state"), "--data", str(data),
        "--target", TARGETS[task][0], "--task", task, "--peers", "3", "--max-laps", "3",
        "--patience", "3", "--baselines", "--json", "--quiet", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    return task, data, report, out


def test_the_report_scores_every_model_by_the_tasks_metrics(
    simulated: tuple[str, Path, dict[str, Any], Path],
) -> None:
    task, _, report, _ = simulated
    assert report["simulation"]["finished"] == 3
    keys = {"val_loss", "accuracy", "macro_f1", "n"} if task == MULTICLASS else {
        "val_loss", "mse", "mae", "r2", "n"}  # fmt: skip
    n_val = sum(d["val_rows"] for d in report["data"])
    for name in ("federated", "centralized", "fedavg", "local_only"):
        union = report[name]["union"]
        assert set(union) == keys and "roc_auc" not in report[name]["mean"]
        for peer in report[name]["per_peer"]:
            assert keys <= set(peer)
        if name != "local_only":
            assert union["n"] == n_val
    fed = report["federated"]["union"]
    if task == MULTICLASS:
        assert 0 < fed["accuracy"] <= 1 and 0 < fed["macro_f1"] <= 1
        assert 0 < fed["val_loss"] < math.log(3) * 1.5
        assert all(d["positive_rate"] is None for d in report["data"])
    else:
        assert fed["r2"] > 0  # the model learned something in 3 laps
        assert fed["mse"] > 0 and fed["mae"] ** 2 <= fed["mse"]  # MAE^2 <= MSE, always


def test_summaries_and_metrics_lines_carry_the_tasks_figures(
    simulated: tuple[str, Path, dict[str, Any], Path],
) -> None:
    task, _, _, out = simulated
    members = sorted((out / "peers").iterdir())
    assert len(members) == 3
    for folder in members:
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["task"] == task
        figures = summary["final_val"]
        assert figures["loss"] == pytest.approx(summary["final_val_loss"])
        laps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        laps = [r for r in laps if r["type"] == "lap"]
        assert laps and "auc" not in laps[0]
        if task == MULTICLASS:
            assert set(figures) == {"loss", "accuracy", "macro_f1"}
            assert all(0 <= r["macro_f1"] <= 1 and 0 <= r["accuracy"] <= 1 for r in laps)
        else:
            assert set(figures) == {"loss", "mse", "mae", "r2"}
            federation = json.loads((folder / "federation.json").read_text())
            std = federation["schema"]["target_std"]
            for r in laps:  # the MSE in the target's units is the loss times its variance
                assert r["mse"] == pytest.approx(r["federated_val_loss"] * std**2)
                assert r["mae"] > 0


def test_predict_gives_class_probabilities_or_values(
    simulated: tuple[str, Path, dict[str, Any], Path], tmp_path: Path
) -> None:
    task, data, _, out = simulated
    run_dir = sorted((out / "peers").iterdir())[0]
    saved = load_model(run_dir)
    result = predict(saved, data)
    table = read_csv(data, TARGETS[task][0], task=task)
    x, _ = encode(table, saved.schema)
    with torch.no_grad():
        raw = saved.model(torch.from_numpy(x)).double()
    n = table.n_rows
    if task == MULTICLASS:
        assert result.classes == ("A", "B", "C") and result.probabilities.shape == (n, 3)
        assert np.allclose(result.probabilities.sum(axis=1), 1.0)
        assert np.allclose(result.probabilities, torch.softmax(raw, dim=1).numpy())
        text = result.to_csv().decode().splitlines()
        assert text[0] == "row,predicted,probability:A,probability:B,probability:C"
        assert text[1].split(",")[1] == result.predicted[0] in ("A", "B", "C")
    else:
        schema = saved.schema
        want = raw.reshape(-1).numpy() * schema.target_std + schema.target_mean
        assert result.values.shape == (n,) and np.allclose(result.values, want)
        text = result.to_csv().decode().splitlines()
        assert text[0] == "row,predicted" and float(text[1].split(",")[1]) == result.values[0]
    # the command line writes the same file
    scores = tmp_path / "scores.csv"
    assert main(["predict", str(run_dir), "--data", str(data), "--out", str(scores)]) == 0
    assert scores.read_bytes() == result.to_csv()


def test_task_options_are_checked_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["simulate", "--task", "ordinal", "--out", str(tmp_path / "a")])
    assert "must be binary, multiclass or regression (got 'ordinal')" in capsys.readouterr().err
    code = main(["simulate", "--state-dir", str(tmp_path / "s"), "--task", "multiclass",
                 "--out", str(tmp_path / "b")])  # fmt: skip
    assert code != 0
    assert "--task applies to --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["start", "--task", "ordinal"])
    assert "must be binary, multiclass or regression" in capsys.readouterr().err
