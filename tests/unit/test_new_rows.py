"""Rows to score, read under a schema: the kinds the schema says, training's encoding."""

from __future__ import annotations

import numpy as np
import pytest

from fedup.learn.new_rows import rows_from_cells, rows_from_records
from fedup.learn.schema import CATEGORICAL, NUMERIC, FeatureColumn, FeatureSchema
from fedup.learn.tabular import DataError, Table, encode

SCHEMA = FeatureSchema(
    target="default",
    n_rows=100,
    n_positive=10,
    n_summaries=2,
    columns=(
        FeatureColumn("income", NUMERIC, mean=50.0, std=10.0, missing=True),
        FeatureColumn("zip", CATEGORICAL, categories=("10001", "94105")),
    ),
)
HEADER = ["income", "zip"]
ROWS = [["60", "10001"], ["", "94105"], ["45.5", "02134"], ["NA", ""]]


def test_a_code_that_looks_numeric_stays_a_category_and_encodes_as_training() -> None:
    new = rows_from_cells(HEADER, ROWS, SCHEMA, source="t")
    forced = Table.from_rows(
        [*HEADER, "default"], [[*r, "0"] for r in ROWS], "default", categorical=["zip"]
    )
    np.testing.assert_array_equal(encode(new.table, SCHEMA)[0], encode(forced, SCHEMA)[0])
    report = new.report
    assert report.unknown == {"zip": 1} and report.rows_with_unknown == 1
    assert report.missing == {"income": 2, "zip": 1} and report.rows_with_missing == 2
    assert report.never_missing == ("zip",) and report.absent == ()
    assert new.ids == ("1", "2", "3", "4") and new.id_column is None


def test_columns_in_another_order_and_extra_columns_encode_the_same() -> None:
    plain = encode(rows_from_cells(HEADER, ROWS, SCHEMA, source="t").table, SCHEMA)[0]
    other = rows_from_cells(
        ["note", "zip", "income"], [["x", z, i] for i, z in ROWS], SCHEMA, source="t"
    )
    np.testing.assert_array_equal(encode(other.table, SCHEMA)[0], plain)
    assert other.report.ignored == ("note",)


def test_records_with_numbers_and_none_read_as_their_text() -> None:
    records = [{"income": 60, "zip": "10001"}, {"zip": "94105"}, {"income": float("nan")}]
    new = rows_from_records(records, SCHEMA)
    cells = rows_from_cells(HEADER, [["60", "10001"], ["", "94105"], ["", ""]], SCHEMA, source="t")
    np.testing.assert_array_equal(encode(new.table, SCHEMA)[0], encode(cells.table, SCHEMA)[0])
    with pytest.raises(DataError, match="row 2 is a list, not a mapping"):
        rows_from_records([{"income": 1}, [1, 2]], SCHEMA)  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("header", "rows", "says"),
    [
        (HEADER, [], "no rows to score"),
        (["income", "income"], [["1", "2"]], "column 'income' appears twice"),
        (HEADER, [["1"]], "row 1 has 1 fields, the header has 2"),
        (
            HEADER,
            [["1", "10001"], ["inf", "10001"]],
            "column 'income' is numeric .* row 2 has 'inf'",
        ),
        (["income"], [["1"]], "no column 'zip', which the model needs"),
    ],
)
def test_rows_that_cannot_be_scored_are_refused_in_one_line(
    header: list[str], rows: list[list[str]], says: str
) -> None:
    with pytest.raises(DataError, match=says) as err:
        rows_from_cells(header, rows, SCHEMA, source="t")
    assert "\n" not in str(err.value)


def test_an_absent_column_with_a_missing_input_is_missing_in_every_row() -> None:
    new = rows_from_cells(["zip"], [["10001"], ["94105"]], SCHEMA, source="t")
    assert new.report.absent == ("income",) and new.report.missing == {"income": 2}
    assert new.report.rows_with_missing == 0  # counted for the column, not per row
    blank = rows_from_cells(HEADER, [["", "10001"], ["", "94105"]], SCHEMA, source="t")
    np.testing.assert_array_equal(encode(new.table, SCHEMA)[0], encode(blank.table, SCHEMA)[0])
