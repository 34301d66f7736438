"""New rows to score, read under the federation's schema, and what did not fit it.

Training reads a column's kind from its values (:func:`fedup.learn.tabular.read_csv`);
rows to score are read the other way round: the federation's
:class:`~fedup.learn.schema.FeatureSchema` says which columns the model takes and
of which kind, and each column is parsed as that kind.  The rows then become model
inputs through the very function training used (:func:`fedup.learn.tabular.encode`),
so the encoding and its missing-value rules cannot drift apart:

* a missing cell (empty, ``NA``, ``null``, ... as :data:`~fedup.learn.tabular.MISSING_TOKENS`
  says) of a numeric column is imputed with the pooled mean, and of a categorical column
  has no category; where the schema has a missing-indicator input (some training data
  had missing values there) it is set.  Missing cells are counted per column, and a
  column the model never saw missing (no indicator) is named as such;
* a category outside the schema's vocabulary takes the "other" input, as a rare value
  did in training; such rows are counted per column;
* a column of the schema that the rows lack entirely is scored as missing in every row
  when the schema has a missing indicator for it (the model learned what "missing"
  means there), and named; without an indicator, the rows are refused, naming the
  columns: the model never saw that feature missing, so every score would rest on an
  imputation it was not trained for;
* a cell that is not a finite number in a numeric column is refused, naming the
  column and the row: a shifted column or a wrong file, which scoring as missing
  would hide;
* the target column and any other column outside the schema are ignored, and named.

Pure numpy: no torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

from fedup.errors import FileError
from fedup.files import open_regular
from fedup.learn.schema import NUMERIC, FeatureColumn, FeatureSchema
from fedup.learn.tabular import (
    MISSING_TOKENS,
    Column,
    DataError,
    Table,
    csv_records,
)

__all__ = ["ID_SUFFIXES", "NewRows", "RowReport", "read_new_rows", "rows_from_records"]

ID_SUFFIXES: Final = ("_id", " id", "-id")
"""An input column outside the schema whose lower-case name is ``id`` or ends with one
of these identifies its rows (the first such column, unless one is named)."""

Records = Sequence[Mapping[str, object]]


@attrs.frozen
class RowReport:
    """What in the rows did not fit the schema, and how it was scored."""

    rows: int
    """Rows read (every one is scored)."""
    missing: Mapping[str, int]
    """Schema column -> rows whose value is missing (an absent column: every row)."""
    unknown: Mapping[str, int]
    """Categorical schema column -> rows whose category the schema does not list
    (scored with the "other" input, like a rare value in training)."""
    absent: tuple[str, ...]
    """Schema columns the rows lack entirely (scored as missing in every row)."""
    never_missing: tuple[str, ...]
    """Columns of ``missing`` that had no missing value in training (no indicator
    input): their missing values are imputed, a case the model never saw."""
    ignored: tuple[str, ...]
    """Input columns outside the schema, the target and the identifying column included."""
    target_present: bool
    """The rows carry the target column (ignored: scores never use it)."""
    rows_with_missing: int
    """Rows with at least one missing value in a column the rows have."""
    rows_with_unknown: int
    """Rows with at least one unknown category."""

    @property
    def clean(self) -> bool:
        """Every row had every value, each category known."""
        return not (self.missing or self.unknown)

    def warnings(self) -> list[str]:
        """One line per finding, for people (empty when the rows fit the schema)."""
        out = []
        if self.absent:
            out.append(
                f"column {_names(self.absent)} missing from the data: scored as a missing "
                "value in every row (the model had a missing-value input for it)"
            )
        present = {k: v for k, v in self.missing.items() if k not in self.absent}
        if present:
            counts = ", ".join(f"{k!r} {v}" for k, v in present.items())
            out.append(
                f"{self.rows_with_missing} of {self.rows} rows have missing values, "
                f"scored as training scored them (rows per column: {counts})"
            )
        if self.never_missing:
            out.append(
                f"column {_names(self.never_missing)} had no missing values in training: "
                "missing values there are imputed with the training mean (or no "
                "category), which the model never saw"
            )
        if self.unknown:
            counts = ", ".join(f"{k!r} {v}" for k, v in self.unknown.items())
            out.append(
                f"{self.rows_with_unknown} of {self.rows} rows have a category the "
                f"federation's schema does not list, scored as 'other' (rows per column: "
                f"{counts})"
            )
        if self.target_present:
            out.append("the target column is in the data and was ignored: scores never use it")
        return out


@attrs.frozen(eq=False)
class NewRows:
    """Rows under the schema, ready for :func:`~fedup.learn.tabular.encode`."""

    table: Table
    """The schema's columns, each of the schema's kind (the target is all zeros)."""
    id_column: str | None
    """The column the ids come from, or None (then they are row numbers from 1)."""
    ids: tuple[str, ...]
    report: RowReport


def read_new_rows(
    path: str | os.PathLike[str], schema: FeatureSchema, *, id_column: str | None = None
) -> NewRows:
    """Read a CSV file (UTF-8, optional BOM, a header row) of rows to score.

    The file is opened as :func:`fedup.files.open_regular` opens a run's files:
    never through a symbolic link, never blocking on a FIFO.  See the module
    docstring for how columns are matched; ``id_column`` names the identifying
    column (default: the first column outside the schema called ``id`` or ending
    in ``_id``).  Raises :class:`~fedup.learn.tabular.DataError` (or
    :class:`~fedup.errors.FileError` for a link or special file) in one line.
    """
    source = os.fspath(path)
    try:
        opened = open_regular(source)
    except FileError as exc:
        raise DataError(str(exc)) from None
    if opened is None:
        raise DataError(f"{source}: no such file")
    f, _ = opened
    try:
        with f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{source}: cannot read the file: {e.strerror or e}") from None
    lines = csv_records(text, source)
    return rows_from_cells(lines[0], lines[1:], schema, source=source, id_column=id_column)


def rows_from_records(
    records: Records, schema: FeatureSchema, *, id_column: str | None = None
) -> NewRows:
    """Rows given as mappings of column name to value (a row may lack a key: missing).

    ``None``, NaN and the missing spellings are missing values; numbers and text
    are read as their text would be from a CSV.  Raises
    :class:`~fedup.learn.tabular.DataError`.
    """
    header: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"row {i + 1} is a {type(record).__name__}, not a mapping")
        for key in record:
            if not isinstance(key, str):
                raise DataError(f"row {i + 1}: column name {key!r} is not text")
            header.setdefault(key, None)
    names = list(header)
    rows = [[_cell(record.get(name)) for name in names] for record in records]
    return rows_from_cells(names, rows, schema, source="<rows>", id_column=id_column)


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


def rows_from_cells(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    schema: FeatureSchema,
    *,
    source: str,
    id_column: str | None = None,
) -> NewRows:
    """Rows of text cells under ``schema``; see the module docstring."""
    header = [h.strip() for h in header]
    if not rows:
        raise DataError(f"{source}: no rows to score (a header but no rows)")
    seen: set[str] = set()
    for h in header:
        if h in seen:
            raise DataError(f"{source}: column {h!r} appears twice")
        seen.add(h)
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(
                f"{source}: row {i + 1} has {len(row)} fields, the header has {len(header)}"
            )
    where = {h: j for j, h in enumerate(header)}
    absent = tuple(c.name for c in schema.columns if c.name not in where)
    refused = [n for n in absent if not _column_spec(schema, n).missing]
    if refused:
        raise DataError(
            f"{source}: no column {_names(refused)}, which the model needs and never saw "
            "missing in training; add the column (empty cells are scored as missing)"
        )
    n = len(rows)
    columns: list[Column] = []
    missing: dict[str, int] = {}
    unknown: dict[str, int] = {}
    any_missing = np.zeros(n, dtype=bool)
    any_unknown = np.zeros(n, dtype=bool)
    for spec in schema.columns:
        j = where.get(spec.name)
        cells = [""] * n if j is None else [row[j].strip() for row in rows]
        miss = np.array([c.lower() in MISSING_TOKENS for c in cells], dtype=bool)
        if spec.kind == NUMERIC:
            values = _numbers(cells, miss, spec.name, source)
            columns.append(Column(spec.name, NUMERIC, values))
        else:
            texts = np.array(["" if m else c for c, m in zip(cells, miss, strict=True)], np.str_)
            columns.append(Column(spec.name, spec.kind, texts))
            known = np.isin(texts, np.array(spec.categories, dtype=np.str_))
            other = ~miss & ~known
            if other.any():
                unknown[spec.name] = int(other.sum())
                any_unknown |= other
        if miss.any():
            missing[spec.name] = int(miss.sum())
            if j is not None:
                any_missing |= miss
    chosen = _id_column(header, schema, id_column, source)
    ids = (
        tuple(row[where[chosen]].strip() for row in rows)
        if chosen is not None
        else tuple(str(i + 1) for i in range(n))
    )
    wanted = {c.name for c in schema.columns}
    report = RowReport(
        rows=n,
        missing=missing,
        unknown=unknown,
        absent=absent,
        never_missing=tuple(k for k in missing if not _column_spec(schema, k).missing),
        ignored=tuple(h for h in header if h not in wanted),
        target_present=schema.target in where,
        rows_with_missing=int(any_missing.sum()),
        rows_with_unknown=int(any_unknown.sum()),
    )
    table = Table(tuple(columns), np.zeros(n, dtype=np.int8), schema.target, source)
    return NewRows(table, chosen, ids, report)


def _column_spec(schema: FeatureSchema, name: str) -> FeatureColumn:
    spec = schema.column(name)
    assert spec is not None
    return spec


def _numbers(
    cells: Sequence[str], miss: npt.NDArray[np.bool_], name: str, source: str
) -> npt.NDArray[np.float64]:
    """The cells as float64 with NaN for missing; any other text is refused."""
    values = np.full(len(cells), np.nan)
    bad: list[int] = []
    for i, (c, m) in enumerate(zip(cells, miss, strict=True)):
        if m:
            continue
        try:
            v = float(c)
        except ValueError:
            bad.append(i)
            continue
        if not math.isfinite(v):
            bad.append(i)
            continue
        values[i] = v
    if bad:
        more = f" (and {len(bad) - 1} other rows)" if len(bad) > 1 else ""
        raise DataError(
            f"{source}: column {name!r} is numeric in the federation's schema, but row "
            f"{bad[0] + 1} has {cells[bad[0]][:40]!r}{more}; fix those cells or leave them "
            "empty (missing)"
        )
    return values


def _id_column(
    header: Sequence[str], schema: FeatureSchema, named: str | None, source: str
) -> str | None:
    if named is not None:
        if named not in header:
            raise DataError(f"{source}: no id column {named!r}; the columns are {_names(header)}")
        return named
    wanted = {c.name for c in schema.columns} | {schema.target}
    for h in header:
        low = h.lower()
        if h not in wanted and (low == "id" or low.endswith(ID_SUFFIXES)):
            return h
    return None


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)
