"""Using a run's model: ``fedup.predict`` and ``fedup-peer predict`` on a real run's folder.

One simulated federation of three small lenders (real peers, in-memory network,
virtual clock; about a second) runs once for the module.  Each test scores rows with
its output folder and checks the scores against the model applied directly: the
file's weights loaded into the task's MLP, on rows encoded by training's own reader
and encoder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
import trio
import trio.testing

import fedup
from fedup.cli import main
from fedup.learn.loans import LenderData, generate_lender, lender_seed
from fedup.learn.predict import ModelError, Predictions, SavedModel, load_model
from fedup.learn.schema import NUMERIC, FeatureSchema
from fedup.learn.tabular import MISSING_TOKENS, DataError, Table, encode, read_csv
from fedup.learn.task import mlp
from fedup.learn.weights import WeightsFileError, load_safetensors, save_safetensors
from fedup.peer import TabularSource
from fedup.protocol.view import RunSettings
from fedup.sim import SimSettings, run_simulation

ROWS = 200


def lender(index: int, rows: int = ROWS) -> LenderData:
    return generate_lender(lender_seed(0, index), rows)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one member of a finished three-member run."""
    tmp = tmp_path_factory.mktemp("run")
    sources = [TabularSource(lender(i).table, target="default") for i in range(3)]
    settings = SimSettings(run=RunSettings(max_laps=2, patience=2))

    async def simulate() -> Path:
        result = await run_simulation(sources, tmp, settings)
        done = [p.summary for p in result.peers if p.summary is not None and p.summary.ok]
        assert len(done) == 3
        return Path(done[0].out_dir)

    return trio.run(simulate, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.fixture
def folder(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run's folder, to alter."""
    target = tmp_path / "out"
    shutil.copytree(run_dir, target)
    return target


@pytest.fixture(scope="module")
def schema(run_dir: Path) -> FeatureSchema:
    return load_model(run_dir).schema


def direct(run_dir: Path, table: Table, schema: FeatureSchema) -> npt.NDArray[np.float64]:
    """The model applied by hand: the file's weights in the task's MLP, training's encoding."""
    model = mlp(schema.width)
    model.load_state_dict(load_safetensors(run_dir / "model.safetensors", like=model))
    x, _ = encode(table, schema)
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x)).reshape(-1).double()).numpy()


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def lender_rows(index: int, rows: int = ROWS) -> tuple[list[str], list[list[str]]]:
    data = lender(index, rows)
    return list(data.header), [list(r) for r in data.rows]


def column_where(schema: FeatureSchema, *, kind: str, missing: bool) -> str:
    return next(c.name for c in schema.columns if c.kind == kind and c.missing == missing)


# --- scores ------------------------------------------------------------------------


def test_scores_of_a_members_own_rows_are_the_model_applied_directly(
    run_dir: Path, schema: FeatureSchema, tmp_path: Path
) -> None:
    header, rows = lender_rows(0)
    path = write_rows(tmp_path / "own.csv", header, rows)
    result = fedup.predict(run_dir, path)
    assert isinstance(result, Predictions)
    want = direct(run_dir, read_csv(path, "default"), schema)
    np.testing.assert_array_equal(result.probabilities, want)
    assert len(result.probabilities) == ROWS and result.ids == tuple(map(str, range(1, ROWS + 1)))
    assert result.id_column is None and result.target == "default"
    assert ((result.probabilities > 0) & (result.probabilities < 1)).all()
    assert len(set(result.probabilities.tolist())) > ROWS // 2  # rows get their own scores
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result.model_sha256 == summary["model_sha256"]
    # The lender's own missing values are counted per column, as training saw them.
    table = read_csv(path, "default")
    expected = {c.name: int(c.missing.sum()) for c in table.columns if c.missing.any()}
    assert dict(result.report.missing) == expected
    # Values too rare in training to be named in the schema are "other", and counted.
    rare = {
        c.name: int(sum(v not in spec.categories for v in c.values[~c.missing].tolist()))
        for c in table.columns
        if (spec := schema.column(c.name)) is not None and spec.kind == "categorical"
    }
    assert dict(result.report.unknown) == {k: v for k, v in rare.items() if v}
    assert result.report.target_present and result.report.ignored == ("default",)


def test_rows_as_mappings_score_as_the_same_rows_in_a_file(run_dir: Path, tmp_path: Path) -> None:
    header, rows = lender_rows(1, 30)
    from_file = fedup.predict(run_dir, write_rows(tmp_path / "r.csv", header, rows))
    records = [dict(zip(header, r, strict=True)) for r in rows]
    records[0].pop("income")  # a key a row lacks is a missing value
    records[1]["income"] = None
    records[2]["age"] = float(records[2]["age"])  # numbers as numbers
    saved = load_model(run_dir)
    from_records = fedup.predict(saved, records)
    rows[0][header.index("income")] = rows[1][header.index("income")] = ""
    again = fedup.predict(saved, write_rows(tmp_path / "r2.csv", header, rows))
    np.testing.assert_array_equal(from_records.probabilities, again.probabilities)
    assert from_records.probabilities[3:].tolist() == from_file.probabilities[3:].tolist()


def test_unknown_categories_and_missing_values_are_reported_and_still_scored(
    run_dir: Path, schema: FeatureSchema, tmp_path: Path
) -> None:
    header, rows = lender_rows(2, 40)
    category = column_where(schema, kind="categorical", missing=False)
    indicated = column_where(schema, kind=NUMERIC, missing=True)
    never = column_where(schema, kind=NUMERIC, missing=False)
    known = schema.column(category)
    assert known is not None
    for r in rows:  # start from rows with every value there, each category known
        for name in (indicated, never):
            if r[header.index(name)].strip().lower() in MISSING_TOKENS:
                r[header.index(name)] = "1"
        if r[header.index(category)] not in known.categories:
            r[header.index(category)] = known.categories[0]
    rows[0][header.index(category)] = "atlantis"
    rows[3][header.index(category)] = "ATLANTIS"
    rows[1][header.index(indicated)] = "NA"
    rows[3][header.index(indicated)] = ""
    rows[2][header.index(never)] = "null"
    path = write_rows(tmp_path / "odd.csv", header, rows)
    result = fedup.predict(run_dir, path)
    report = result.report
    assert report.unknown == {category: 2} and report.rows_with_unknown == 2
    assert {k: report.missing.get(k) for k in (indicated, never)} == {indicated: 2, never: 1}
    assert report.never_missing == (never,)
    assert report.rows_with_missing >= 3 and not report.clean
    warnings = "\n".join(report.warnings())
    assert f"'{category}' 2" in warnings and repr(never) in warnings
    # Scored as training scores them: "other" for the unknown value, the mean for the
    # missing numbers (with the missing input where the schema has one).
    want = direct(run_dir, read_csv(path, "default"), schema)
    np.testing.assert_array_equal(result.probabilities, want)
    assert len(result.probabilities) == 40


def test_a_text_in_a_numeric_column_is_refused_naming_column_and_row(
    run_dir: Path, schema: FeatureSchema, tmp_path: Path
) -> None:
    header, rows = lender_rows(0, 10)
    name = column_where(schema, kind=NUMERIC, missing=False)
    rows[4][header.index(name)] = "lots"
    with pytest.raises(DataError, match=rf"column '{name}' is numeric .* row 5 has 'lots'"):
        fedup.predict(run_dir, write_rows(tmp_path / "bad.csv", header, rows))


# --- columns -----------------------------------------------------------------------


def drop(header: list[str], rows: list[list[str]], name: str) -> tuple[list[str], list[list[str]]]:
    j = header.index(name)
    return [h for h in header if h != name], [r[:j] + r[j + 1 :] for r in rows]


def test_an_absent_column_the_model_saw_missing_is_scored_as_missing_and_named(
    run_dir: Path, schema: FeatureSchema, tmp_path: Path
) -> None:
    name = column_where(schema, kind=NUMERIC, missing=True)
    header, rows = lender_rows(1, 25)
    blanked = [[("" if h == name else c) for h, c in zip(header, r, strict=True)] for r in rows]
    expected = direct(run_dir, read_csv(write_rows(tmp_path / "b.csv", header, blanked)), schema)
    h2, r2 = drop(header, rows, name)
    h2, r2 = drop(h2, r2, "default")
    result = fedup.predict(run_dir, write_rows(tmp_path / "absent.csv", h2, r2))
    np.testing.assert_array_equal(result.probabilities, expected)
    assert result.report.absent == (name,) and result.report.missing[name] == 25
    assert not result.report.target_present and result.report.ignored == ()
    assert any(name in w and "missing from the data" in w for w in result.report.warnings())


def test_an_absent_column_the_model_never_saw_missing_is_refused(
    run_dir: Path, schema: FeatureSchema, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = column_where(schema, kind=NUMERIC, missing=False)
    header, rows = drop(*lender_rows(1, 5), name)
    path = write_rows(tmp_path / "absent.csv", header, rows)
    with pytest.raises(DataError, match=rf"no column '{name}', which the model needs"):
        fedup.predict(run_dir, path)
    assert main(["predict", str(run_dir), "--data", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and f"no column '{name}'" in err


def test_an_id_column_is_copied_into_the_scores(run_dir: Path, tmp_path: Path) -> None:
    header, rows = lender_rows(0, 6)
    path = write_rows(
        tmp_path / "ids.csv",
        ["Loan_ID", *header],
        [[f"L{900 + i}", *r] for i, r in enumerate(rows)],
    )
    auto = fedup.predict(run_dir, path)
    assert auto.id_column == "Loan_ID" and auto.ids == tuple(f"L{900 + i}" for i in range(6))
    assert set(auto.report.ignored) == {"Loan_ID", "default"}
    plain = fedup.predict(run_dir, write_rows(tmp_path / "plain.csv", header, rows))
    np.testing.assert_array_equal(auto.probabilities, plain.probabilities)
    named = fedup.predict(run_dir, path, id_column="region")
    assert named.ids == tuple(r[header.index("region")] for r in rows)
    with pytest.raises(DataError, match="no id column 'nope'"):
        fedup.predict(run_dir, path, id_column="nope")


# --- the model file ----------------------------------------------------------------


def test_a_model_with_a_flipped_byte_is_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = folder / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x01  # a weight's low bit: still a valid file, a different model
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"SHA-256 .* is not the .* summary\.json records"):
        load_model(folder)
    path = write_rows(tmp_path / "rows.csv", *lender_rows(0, 5))
    assert main(["predict", str(folder), "--data", str(path)]) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and "refusing to use it" in lines[0]
    assert lines[0].startswith("fedup-peer: error: ")


def test_a_model_of_another_shape_is_refused_even_with_its_digest_recorded(
    folder: Path, schema: FeatureSchema
) -> None:
    model = folder / "model.safetensors"
    digest = save_safetensors(mlp(schema.width, (8,)), model)
    summary = json.loads((folder / "summary.json").read_text())
    summary["model_sha256"] = digest
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(WeightsFileError, match=r"model\.safetensors: "):
        load_model(folder)
    with pytest.raises(ModelError, match=r"not the tabular MLP with hidden layers \(8,\)"):
        load_model(folder, hidden=(8,))


def test_a_model_file_that_is_a_symbolic_link_is_refused(folder: Path) -> None:
    model = folder / "model.safetensors"
    model.rename(folder / "elsewhere")
    os.symlink(folder / "elsewhere", model)
    with pytest.raises(ModelError, match="symbolic link"):
        load_model(folder)


def test_a_schema_that_is_not_the_agreed_one_is_refused(folder: Path) -> None:
    path = folder / "federation.json"
    record = json.loads(path.read_text())
    record["schema"]["columns"][0]["mean"] = 1.0 + record["schema"]["columns"][0]["mean"]
    path.write_text(json.dumps(record))
    with pytest.raises(ModelError, match="not the one the run agreed on"):
        load_model(folder)


def test_a_folder_without_a_finished_run_is_refused(folder: Path) -> None:
    (folder / "summary.json").unlink()
    with pytest.raises(ModelError, match=r"no summary\.json in .*not the output folder"):
        load_model(folder)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(folder / "nowhere")


def test_a_run_without_a_feature_schema_is_refused(folder: Path) -> None:
    path = folder / "federation.json"
    record = json.loads(path.read_text())
    record["schema"] = None
    path.write_text(json.dumps(record))
    with pytest.raises(ModelError, match="the run has no feature schema"):
        load_model(folder)


# --- the command -------------------------------------------------------------------


def test_cli_writes_one_score_per_row_to_out(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = lender_rows(2, 12)
    category = "region"
    rows[0][header.index(category)] = "atlantis"
    path = write_rows(tmp_path / "rows.csv", header, rows)
    out = tmp_path / "scores.csv"
    assert main(["predict", str(run_dir), "--data", str(path), "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert stdout == ""
    assert "warning: 1 of 12 rows have a category" in err and "'region' 1" in err
    assert "target column is in the data and was ignored" in err
    assert "wrote 12 scores of 'default'" in err
    lines = list(csv.reader(io.StringIO(out.read_text())))
    assert lines[0] == ["row", "probability"] and len(lines) == 13
    assert [r[0] for r in lines[1:]] == [str(i) for i in range(1, 13)]
    expected = fedup.predict(run_dir, path).probabilities
    assert [float(r[1]) for r in lines[1:]] == expected.tolist()
    assert out.stat().st_mode & 0o777 == 0o600
    # Without --out the same CSV goes to stdout.
    assert main(["predict", str(run_dir), "--data", str(path)]) == 0
    assert capsys.readouterr().out == out.read_text()


def test_cli_warns_when_the_run_did_not_end_by_its_stopping_rule(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(ok=False, stop_reason="members-lost")
    (folder / "summary.json").write_text(json.dumps(summary))
    path = write_rows(tmp_path / "rows.csv", *lender_rows(0, 4))
    assert main(["predict", str(folder), "--data", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 5
    assert "warning: the run did not end by its stopping rule (members-lost)" in err


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["predict", "{run}"], 2, "the following arguments are required: --data"),
        (["predict", "{run}", "--data", "{tmp}/none.csv"], 1, "none.csv: no such file"),
        (["predict", "{tmp}/nowhere", "--data", "{rows}"], 1, "nowhere does not exist"),
        (["predict", "{run}", "--data", "{rows}", "--out", "{tmp}"], 1, "is a folder"),
        (["predict", "{run}", "--data", "{rows}", "--out", "{tmp}/a/b.csv"], 1, "does not exist"),
        (["predict", "{run}", "--data", "{rows}", "--id", "x"], 1, "no id column 'x'"),
    ],
)
def test_cli_errors_are_one_line_with_their_exit_code(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    says: str,
) -> None:
    rows = write_rows(tmp_path / "rows.csv", *lender_rows(0, 3))
    args = [a.format(run=run_dir, tmp=tmp_path, rows=rows) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
    else:
        assert main(args) == code
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and says in err, err


def test_the_library_exports_the_api(run_dir: Path) -> None:
    saved = fedup.load_model(run_dir)
    assert isinstance(saved, SavedModel) and fedup.SavedModel is SavedModel
    assert {"predict", "load_model", "Predictions", "RowReport", "ModelError"} <= set(fedup.__all__)
    assert (
        saved.model_sha256
        == hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    )
