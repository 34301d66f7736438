"""CSV parsing, local summaries, encoding with a merged schema, and the split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedup.learn.schema import merge_summaries
from fedup.learn.tabular import (
    CATEGORICAL,
    CLIP,
    NUMERIC,
    DataError,
    Table,
    encode,
    read_csv,
    split,
    summarize,
)
from fedup.learn.task import MIN_ROWS, SPLIT_SEED, VAL_FRACTION, check_rows


def write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# targets


@pytest.mark.parametrize(
    ("negative", "positive"),
    [
        ("0", "1"),
        ("0.0", "1.0"),
        ("no", "yes"),
        ("No", "Yes"),
        ("N", "Y"),
        ("false", "true"),
        ("FALSE", "TRUE"),
        ("f", "t"),
        ("non-default", "default"),
        ("Fully Paid", "Charged Off"),
        ("good", "bad"),
    ],
)
def test_target_spellings(tmp_path: Path, negative: str, positive: str) -> None:
    path = write(tmp_path, f"x,default\n1,{positive}\n2,{negative}\n3, {positive} \n")
    assert read_csv(path).target.tolist() == [1, 0, 1]


def test_two_unknown_labels_need_positive_label(tmp_path: Path) -> None:
    path = write(tmp_path, "x,status\n1,late\n2,ok\n3,late\n")
    with pytest.raises(DataError, match=r"'late' and 'ok'.*positive_label"):
        read_csv(path, "status")
    assert read_csv(path, "status", positive_label="late").target.tolist() == [1, 0, 1]
    with pytest.raises(DataError, match="'bad' is not one of the target's values 'late', 'ok'"):
        read_csv(path, "status", positive_label="bad")


def test_single_label_is_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "x,default\n1,no\n2,no\n")
    assert read_csv(path).target.tolist() == [0, 0]


def test_target_not_binary_names_values(tmp_path: Path) -> None:
    path = write(tmp_path, "x,default\n1,0\n2,1\n3,2\n")
    with pytest.raises(DataError, match=r"not binary: it has 3 values \('0', '1', '2'\)"):
        read_csv(path)


def test_missing_target_cell_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x,default\n1,0\n2,\n3,NA\n")
    with pytest.raises(DataError, match=r"missing on line 3 \(and 1 other lines\)"):
        read_csv(path)


# --------------------------------------------------------------------------
# file errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_csv(tmp_path / "absent.csv")


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read the file"):
        read_csv(tmp_path)


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="the file is empty"):
        read_csv(write(tmp_path, text))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="a header but no rows"):
        read_csv(write(tmp_path, "x,default\n"))


def test_missing_target_column_names_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "income,region,defaulted\n1,a,0\n")
    with pytest.raises(
        DataError,
        match="no target column 'default'; the columns are 'income', 'region', 'defaulted'",
    ):
        read_csv(path)


def test_no_feature_columns(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no feature columns besides the target 'default'"):
        read_csv(write(tmp_path, "default\n0\n1\n"))
    with pytest.raises(DataError, match="no feature columns"):
        read_csv(write(tmp_path, "id,default\n7,0\n"), drop=["id"])


def test_ragged_row(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="line 3 has 3 fields, the header has 2"):
        read_csv(write(tmp_path, "x,default\n1,0\n2,1,9\n"))


def test_duplicate_and_empty_column_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="column 'x' appears twice"):
        read_csv(write(tmp_path, "x,x,default\n1,2,0\n"))
    with pytest.raises(DataError, match="empty name"):
        read_csv(write(tmp_path, "x,,default\n1,2,0\n"))


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("x,default\ncaf\xe9,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_csv(path)


# --------------------------------------------------------------------------
# columns


def test_types_missing_values_and_options(tmp_path: Path) -> None:
    text = (
        "\ufeffincome;region;zip;note;id;default\n"
        "1000;north;01234;;1;0\n"
        "NA;south;02345;x;2;1\n"
        "n/a;;01234;y;3;0\n"
        "3000;NULL;09999;?;4;1\n"
        "None;east;01234;NaN;5;0\n"
    )
    table = read_csv(write(tmp_path, text), categorical=["zip"], drop=["id"])
    kinds = {c.name: c.kind for c in table.columns}
    assert kinds == {"income": NUMERIC, "region": CATEGORICAL, "zip": CATEGORICAL,
                     "note": CATEGORICAL}  # fmt: skip
    income = table.column("income").values
    assert income[0] == 1000 and income[3] == 3000 and np.isnan(income[[1, 2, 4]]).all()
    assert table.column("region").values.tolist() == ["north", "south", "", "", "east"]
    assert table.column("zip").values.tolist()[0] == "01234"  # kept as text, leading zero
    assert table.column("note").missing.tolist() == [True, False, False, True, True]


def test_a_word_makes_a_column_categorical(tmp_path: Path) -> None:
    table = read_csv(write(tmp_path, "x,default\n1,0\n2,1\nmany,0\ninf,1\n"))
    assert table.column("x").kind == CATEGORICAL


# --------------------------------------------------------------------------
# summaries and encoding


def make_table(rows: list[tuple[str, str, str]], target: list[str]) -> Table:
    header = ["amount", "colour", "default"]
    return Table.from_rows(header, [(a, c, t) for (a, c, _), t in zip(rows, target, strict=True)],
                           "default")  # fmt: skip


def test_summary_statistics_and_vocabulary() -> None:
    rows = [("1", "red", ""), ("2", "red", ""), ("", "blue", ""), ("5", "red", ""),
            ("4", "", ""), ("6", "green", "")]  # fmt: skip
    t = make_table(rows, ["0", "1", "0", "0", "1", "0"])
    s = summarize(t, min_category_count=2)
    assert (s.target, s.n_rows, s.n_positive) == ("default", 6, 2)
    amount, colour = s.columns
    x = np.array([1, 2, 5, 4, 6], dtype=float)
    assert (amount.count, amount.n_missing) == (5, 1)
    assert amount.mean == pytest.approx(x.mean())
    assert amount.m2 == pytest.approx(((x - x.mean()) ** 2).sum())
    assert colour.kind == CATEGORICAL
    assert colour.categories == (("red", 3),)  # blue and green are too rare to name
    assert (colour.other_count, colour.count, colour.n_missing) == (2, 5, 1)
    capped = summarize(t, min_category_count=1, max_categories=2)
    assert capped.columns[1].categories == (("red", 3), ("blue", 1))


def test_encoding_uses_the_federation_schema() -> None:
    a = make_table([("10", "red", ""), ("", "blue", ""), ("30", "", "")], ["0", "1", "1"])
    b = make_table([("50", "red", ""), ("70", "pink", ""), ("90", "red", "")], ["0", "0", "1"])
    schema = merge_summaries([summarize(a, min_category_count=1),
                              summarize(b, min_category_count=1)], "default")  # fmt: skip
    amount, colour = schema.columns
    pooled = np.array([10, 30, 50, 70, 90], dtype=float)
    assert amount.mean == pytest.approx(pooled.mean())
    assert amount.std == pytest.approx(pooled.std())
    assert amount.missing and colour.missing
    assert colour.categories == ("red", "blue", "pink")
    assert schema.feature_names() == [
        "amount", "amount:missing", "colour=red", "colour=blue", "colour=pink",
        "colour=<other>", "colour:missing",
    ]  # fmt: skip
    x, y = encode(a, schema)
    assert x.dtype == np.float32 and x.shape == (3, schema.width)
    assert y.tolist() == [0.0, 1.0, 1.0]
    z = (10 - pooled.mean()) / pooled.std()
    np.testing.assert_allclose(x[0], [z, 0, 1, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(x[1], [0, 1, 0, 1, 0, 0, 0])  # imputed with the pooled mean
    np.testing.assert_allclose(x[2, 2:], [0, 0, 0, 0, 1])  # category missing

    c = make_table([("1e9", "mauve", "")], ["0"])  # unseen category, huge number
    xc, _ = encode(c, schema)
    assert xc[0, 0] == CLIP and xc[0, 5] == 1.0  # clipped, "other"


def test_encoding_ignores_column_order(tmp_path: Path) -> None:
    p1 = write(tmp_path, "a,b,default\n1,x,0\n2,y,1\n3,x,0\n", "one.csv")
    p2 = write(tmp_path, "default,b,a\n0,x,1\n1,y,2\n0,x,3\n", "two.csv")
    t1, t2 = read_csv(p1), read_csv(p2)
    schema = merge_summaries([summarize(t1, min_category_count=1)], "default")
    x1, y1 = encode(t1, schema)
    x2, y2 = encode(t2, schema)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_encoding_refuses_a_kind_conflict(tmp_path: Path) -> None:
    numeric = read_csv(write(tmp_path, "a,default\n1,0\n2,1\n", "n.csv"))
    words = read_csv(write(tmp_path, "a,default\nx,0\ny,1\n", "w.csv"))
    empty = read_csv(write(tmp_path, "a,default\n,0\nNA,1\n", "e.csv"))
    schema = merge_summaries([summarize(numeric)], "default")
    with pytest.raises(DataError, match="column 'a' is categorical"):
        encode(words, schema)
    x, _ = encode(empty, schema)  # all missing fits any kind: imputed with the mean
    assert x.tolist() == [[0.0], [0.0]]


def test_split_is_stratified_and_deterministic() -> None:
    n = 1000
    rows = [(str(i), "a", "") for i in range(n)]
    target = ["1" if i % 5 == 0 else "0" for i in range(n)]
    t = make_table(rows, target)
    train, val = split(t, val_fraction=0.2, seed=7)
    assert (train.n_rows, val.n_rows) == (800, 200)
    assert (train.n_positive, val.n_positive) == (160, 40)
    ids_train = set(train.column("amount").values.tolist())
    ids_val = set(val.column("amount").values.tolist())
    assert not ids_train & ids_val and len(ids_train | ids_val) == n
    again, _ = split(t, val_fraction=0.2, seed=7)
    assert np.array_equal(again.column("amount").values, train.column("amount").values)
    other, _ = split(t, val_fraction=0.2, seed=8)
    assert not np.array_equal(other.column("amount").values, train.column("amount").values)
    assert math.isclose(val.target.mean(), t.target.mean())


def test_options_must_name_real_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "x,default\n1,0\n")
    with pytest.raises(DataError, match="no column named 'id', 'zip'"):
        read_csv(path, categorical=["zip"], drop=["id"])


def test_an_unknown_drop_column_names_the_columns_there_and_the_target_stays(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "id,x,default\n1,2,0\n")
    with pytest.raises(DataError, match=r"no column named 'ID'; the columns are 'id', 'x', 'def"):
        read_csv(path, drop=["ID"])
    with pytest.raises(DataError, match="'default' is the target; it cannot be dropped"):
        read_csv(path, drop=["default"])


def test_a_dropped_column_is_never_parsed_nor_summarized(tmp_path: Path) -> None:
    # An ID: one value per row, which would otherwise become a feature of its own.
    rows = "".join(f"{'k' * 300}{i},{i},{i % 2}\n" for i in range(10))
    table = read_csv(write(tmp_path, "id,x,default\n" + rows), drop=["id"])
    assert [c.name for c in table.columns] == ["x"]
    assert [c.name for c in summarize(table).columns] == ["x"]


# --------------------------------------------------------------------------
# the positive label


def test_the_spelling_of_each_class_is_kept_and_summarized(tmp_path: Path) -> None:
    path = write(tmp_path, "x,status\n1,late\n2,ok\n3,late\n")
    table = read_csv(path, "status", positive_label="ok")
    assert table.target.tolist() == [0, 1, 0]
    assert (table.negative_label, table.positive_label) == ("late", "ok")
    s = summarize(table)
    assert (s.negative_label, s.positive_label) == ("late", "ok")
    inferred = read_csv(write(tmp_path, "x,default\n1, Yes \n2,no\n", "b.csv"))
    assert (inferred.negative_label, inferred.positive_label) == ("no", "Yes")
    # The spellings survive taking rows, and pooling tables that spell alike.
    part = inferred.take(np.array([1]))
    assert (part.negative_label, part.positive_label) == ("no", "Yes")
    mixed = Table.concat([inferred, read_csv(write(tmp_path, "x,default\n1,1\n2,0\n", "c.csv"))])
    assert (mixed.negative_label, mixed.positive_label) == (None, None)


def test_a_positive_label_not_in_the_target_is_refused_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x,default\n1,yes\n2,no\n")
    with pytest.raises(DataError, match=r"'Yes' is not one of the target's values 'no', 'yes'"):
        read_csv(path, positive_label="Yes")
    # One value that reads as positive: a misspelled label would make every row negative.
    only_yes = write(tmp_path, "x,default\n1,yes\n2,yes\n", "b.csv")
    with pytest.raises(DataError, match="'Yes' is not one of the target's values 'yes'"):
        read_csv(only_yes, positive_label="Yes")
    # One value that is not positive: a lender with no defaults, 'default' being absent.
    only_ok = read_csv(write(tmp_path, "x,status\n1,ok\n2,ok\n", "c.csv"), "status",
                       positive_label="default")  # fmt: skip
    assert only_ok.target.tolist() == [0, 0]
    assert (only_ok.negative_label, only_ok.positive_label) == ("ok", "default")


# --------------------------------------------------------------------------
# the smallest table that trains


def test_min_rows_always_leave_a_validation_row_and_a_training_row() -> None:
    def parts(n_neg: int, n_pos: int) -> tuple[int, int]:
        t = Table((), np.array([0] * n_neg + [1] * n_pos, dtype=np.int8), "y")
        train, val = split(t, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
        return train.n_rows, val.n_rows

    for n in range(MIN_ROWS, 60):
        for n_pos in range(n + 1):
            n_train, n_val = parts(n - n_pos, n_pos)
            assert n_train >= 1 and n_val >= 1, (n - n_pos, n_pos)
    assert any(parts(MIN_ROWS - 1 - k, k)[1] == 0 for k in range(MIN_ROWS))  # it is the least


def test_a_table_too_small_to_train_is_refused_naming_file_rows_and_minimum(
    tmp_path: Path,
) -> None:
    from fedup.peer.source import TabularSource

    path = write(tmp_path, "x,default\n1,1\n")
    with pytest.raises(DataError) as e:
        TabularSource.from_csv(path, "default")
    assert str(e.value) == (
        f"{path}: 1 row, too few to train: a peer needs at least 5 (a 20% share of each "
        "label is held out for validation); add rows"
    )
    four = write(tmp_path, "x,default\n1,1\n2,1\n3,0\n4,0\n", "four.csv")
    with pytest.raises(DataError, match="4 rows, too few to train"):
        check_rows(read_csv(four))
    five = write(tmp_path, "x,default\n1,1\n2,1\n3,0\n4,0\n5,0\n", "five.csv")
    assert TabularSource.from_csv(five, "default").table.n_rows == 5
