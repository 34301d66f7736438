"""Tabular data as users have it: CSV files in, summaries and float32 features out.

:func:`read_csv` parses a CSV file into a :class:`Table`: each column is
*numeric* (every non-missing cell is a finite number) or *categorical*
(anything else), missing cells (empty, ``NA``, ``N/A``, ``NaN``, ``null``,
``None``, ``?``) are kept as missing, and the binary target may be spelled
0/1, yes/no, true/false, y/n, t/f, or any two labels (see
:func:`parse_target`).  Every problem with the file raises :class:`DataError`
with a message the user can act on.

A peer shares only :func:`summarize`'s :class:`~fedup.learn.schema.DataSummary`
(counts, means, variances, frequent category values, how the target's two
classes are spelled), never rows.  Once the
federation has merged the summaries into a
:class:`~fedup.learn.schema.FeatureSchema`, :func:`encode` turns the rows into
the model's float32 inputs the same way on every peer: numeric columns are
standardized with the pooled mean and standard deviation (clipped to
``±CLIP``), missing numbers are imputed with the pooled mean, categories are
one-hot over the merged vocabulary plus an "other" input, and every column
that is missing anywhere in the federation gets a missing-indicator input.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt

from fedup.errors import FedupError
from fedup.learn.schema import (
    CATEGORICAL,
    DEFAULT_SUMMARY_LIMITS,
    NUMERIC,
    ColumnSummary,
    DataSummary,
    FeatureSchema,
    SummaryLimits,
)
from fedup.learn.targets import (
    BINARY,
    MAX_CLASSES,
    MULTICLASS,
    REGRESSION,
    TASKS,
    TargetError,
    class_name,
    infer_task,
    sorted_classes,
)

__all__ = [
    "CATEGORICAL",
    "CLIP",
    "MISSING_TOKENS",
    "NUMERIC",
    "Column",
    "DataError",
    "Table",
    "csv_records",
    "encode",
    "encode_features",
    "encode_target",
    "parse_target",
    "read_csv",
    "split",
    "summarize",
]

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

MISSING_TOKENS: Final = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
"""Cell texts (after stripping, case-insensitive) that mean "missing"."""
POSITIVE_LABELS: Final = frozenset(
    {"1", "yes", "y", "true", "t", "default", "defaulted", "bad", "charged off", "positive"}
)
NEGATIVE_LABELS: Final = frozenset(
    {"0", "no", "n", "false", "f", "non-default", "good", "fully paid", "paid", "negative"}
)
CLIP: Final = 10.0
"""Standardized numbers are clipped to ±CLIP so that one outlier cannot dominate a step."""
_DELIMITERS: Final = ",;\t|"


class DataError(FedupError):
    """The local data cannot be used: missing file, bad target, no features, ..."""


@attrs.frozen(eq=False)
class Column:
    """One feature column.

    ``values`` is float64 with NaN for missing (numeric) or a numpy unicode
    array with ``""`` for missing (categorical).
    """

    name: str
    kind: str
    values: npt.NDArray[Any]

    def take(self, idx: npt.NDArray[np.intp]) -> Column:
        return Column(self.name, self.kind, self.values[idx])

    @property
    def missing(self) -> npt.NDArray[np.bool_]:
        if self.kind == NUMERIC:
            return np.asarray(np.isnan(self.values), dtype=np.bool_)
        return np.asarray(self.values == "", dtype=np.bool_)


@attrs.frozen(eq=False)
class Table:
    """A parsed table: feature columns in file order and the target."""

    columns: tuple[Column, ...]
    target: npt.NDArray[Any]
    """Per row: binary, 0/1 (int8; 1 is the positive label, e.g. "default"); multi-class,
    the index of the row's class in :attr:`classes` (int64); regression, the number
    (float64)."""
    target_name: str
    source: str = "<table>"
    """Where the rows came from (a path), for messages."""
    negative_label: str | None = None
    """How the file the rows came from spells the target's 0 (None: no row of it, or
    unknown).  Shared in the summary, so members can check they mean the same class."""
    positive_label: str | None = None
    """How it spells 1: the ``positive_label`` the user named (even when no row has it:
    a peer may have no positives), else the value rows read as positive."""
    task: str = BINARY
    """``binary``, ``multiclass`` or ``regression`` (:mod:`fedup.learn.targets`)."""
    classes: tuple[str, ...] = ()
    """Multi-class: this table's classes, in :func:`~fedup.learn.targets.sorted_classes`
    order (``target`` indexes them); empty for the other tasks."""

    @property
    def n_rows(self) -> int:
        return len(self.target)

    @property
    def n_positive(self) -> int:
        """Rows of the positive class (binary; 0 for the other tasks)."""
        return int(self.target.sum()) if self.task == BINARY else 0

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise DataError(f"{self.source}: no column {name!r}")

    def take(self, idx: npt.NDArray[np.intp]) -> Table:
        """The rows at ``idx`` (in that order)."""
        return Table(
            tuple(c.take(idx) for c in self.columns),
            self.target[idx],
            self.target_name,
            self.source,
            self.negative_label,
            self.positive_label,
            self.task,
            self.classes,
        )

    @staticmethod
    def concat(tables: Sequence[Table], source: str = "<pooled>") -> Table:
        """Rows of several tables with the same columns (matched by name)."""
        first = tables[0]
        cols = []
        for c in first.columns:
            parts = [t.column(c.name) for t in tables]
            if any(p.kind != c.kind for p in parts):
                raise DataError(f"column {c.name!r} has different kinds in the tables pooled")
            cols.append(Column(c.name, c.kind, np.concatenate([p.values for p in parts])))
        if any(t.task != first.task for t in tables):
            raise DataError("the tables pooled have targets of different tasks")
        classes = sorted_classes(c for t in tables for c in t.classes)
        if first.task == MULTICLASS:
            at = {c: i for i, c in enumerate(classes)}
            remap = [np.array([at[c] for c in t.classes], dtype=np.int64) for t in tables]
            target = np.concatenate([r[t.target] for r, t in zip(remap, tables, strict=True)])
        else:
            target = np.concatenate([t.target for t in tables])
        negative = {t.negative_label for t in tables}
        positive = {t.positive_label for t in tables}
        return Table(
            tuple(cols),
            target,
            first.target_name,
            source,
            negative.pop() if len(negative) == 1 else None,  # spelled alike, else unknown
            positive.pop() if len(positive) == 1 else None,
            first.task,
            classes,
        )

    @classmethod
    def from_rows(
        cls,
        header: Sequence[str],
        rows: Sequence[Sequence[str]],
        target: str,
        *,
        source: str = "<rows>",
        positive_label: str | None = None,
        categorical: Iterable[str] = (),
        drop: Iterable[str] = (),
        first_line: int = 2,
        limits: SummaryLimits = DEFAULT_SUMMARY_LIMITS,
        task: str | None = BINARY,
    ) -> Table:
        """Build a table from text cells (what :func:`read_csv` does after parsing).

        ``task`` is ``binary`` (the default here), ``multiclass``, ``regression``,
        or None to infer it from the target's values
        (:func:`~fedup.learn.targets.infer_task`).

        ``categorical`` forces columns to be categorical even if they look
        numeric (codes such as ZIP codes); ``drop`` removes columns before
        anything else reads them (IDs, free text): their cells are never
        parsed, summarized or encoded.  ``positive_label`` names the target's
        value that is the positive class (see :func:`parse_target`).
        ``first_line`` is the line number of ``rows[0]`` in messages.
        Raises :class:`DataError`, naming a column ``drop`` or ``categorical``
        gives that the header does not have (and the columns it has).
        """
        header = [h.strip() for h in header]
        if not rows:
            raise DataError(f"{source}: the file is empty (a header but no rows)")
        if target not in header:
            present = ", ".join(repr(h) for h in header)
            raise DataError(f"{source}: no target column {target!r}; the columns are {present}")
        seen: set[str] = set()
        for h in header:
            if not h:
                raise DataError(f"{source}: a column has an empty name")
            if h in seen:
                raise DataError(f"{source}: column {h!r} appears twice")
            if len(h.encode("utf-8")) > limits.max_text:
                raise DataError(f"{source}: column name {h[:32]!r}... is too long")
            seen.add(h)
        for i, row in enumerate(rows):
            if len(row) != len(header):
                raise DataError(
                    f"{source}: line {first_line + i} has {len(row)} fields, "
                    f"the header has {len(header)}"
                )
        dropped = set(drop)
        forced = set(categorical)
        unknown = sorted((dropped | forced) - seen)
        if unknown:
            present = ", ".join(repr(h) for h in header)
            raise DataError(
                f"{source}: no column named {', '.join(repr(u) for u in unknown)}; "
                f"the columns are {present}"
            )
        if target in dropped:
            raise DataError(f"{source}: {target!r} is the target; it cannot be dropped")
        features = [j for j, h in enumerate(header) if h != target and h not in dropped]
        if not features:
            raise DataError(f"{source}: no feature columns besides the target {target!r}")
        if len(features) > limits.max_columns:
            raise DataError(f"{source}: {len(features)} columns, at most {limits.max_columns}")
        j_target = header.index(target)
        cells = [row[j_target] for row in rows]
        kind = _target_task(cells, target, task, source, first_line, positive_label)
        columns = tuple(
            _column(header[j], [row[j] for row in rows], header[j] in forced) for j in features
        )
        if kind != BINARY:
            y_other, classes = _other_target(cells, target, kind, source, first_line, limits)
            return cls(columns, y_other, target, source, None, None, kind, classes)
        y = parse_target(
            cells, target, source=source, positive_label=positive_label, first_line=first_line
        )
        spelled = [_first_label(rows, y, j_target, k) for k in (0, 1)]
        return cls(
            columns,
            y,
            target,
            source,
            spelled[0],
            positive_label if positive_label is not None else spelled[1],
        )


def _target_task(
    cells: Sequence[str],
    name: str,
    task: str | None,
    source: str,
    first_line: int,
    positive_label: str | None,
) -> str:
    """The table's task: ``task``, or inferred from the cells (raises :class:`DataError`)."""
    if task is not None and task not in TASKS:
        raise DataError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if task == BINARY:
        return BINARY  # parse_target checks the cells, as it always has
    _check_present([c.strip() for c in cells], name, source, first_line)
    if task is None:
        try:
            task = infer_task(cells)
        except TargetError as e:
            raise DataError(
                f"{source}: target {name!r} cannot be a target: {e}; give a target with "
                "fewer classes, or --task regression for numbers"
            ) from None
    if task != BINARY and positive_label is not None:
        raise DataError(
            f"{source}: target {name!r} is {task}; a positive label applies only to a "
            "binary target: leave it out"
        )
    return task


def _other_target(
    cells: Sequence[str],
    name: str,
    task: str,
    source: str,
    first_line: int,
    limits: SummaryLimits,
) -> tuple[npt.NDArray[Any], tuple[str, ...]]:
    """A multi-class target as class indices and its classes, or a regression target as
    numbers (and no classes); raises :class:`DataError` naming the problem."""
    if task == REGRESSION:
        values = np.empty(len(cells), dtype=np.float64)
        for i, cell in enumerate(cells):
            try:
                v = float(cell.strip())
            except ValueError:
                v = math.nan
            if not math.isfinite(v) or not abs(v) <= limits.max_abs_mean:
                raise DataError(
                    f"{source}: target {name!r} is {cell.strip()!r} on line {first_line + i}, "
                    "not a finite number a regression target can have"
                )
            values[i] = v
        return values, ()
    names = [class_name(c) for c in cells]
    classes = sorted_classes(names)
    if len(classes) > MAX_CLASSES:
        raise DataError(
            f"{source}: target {name!r} has {len(classes)} classes, at most {MAX_CLASSES}; "
            "give a target with fewer classes, or --task regression for numbers"
        )
    too_long = [c for c in classes if len(c.encode("utf-8")) > limits.max_text]
    if too_long:
        raise DataError(
            f"{source}: target {name!r} has a class name of more than {limits.max_text} "
            f"bytes ({too_long[0][:32]!r}...)"
        )
    at = {c: i for i, c in enumerate(classes)}
    return np.array([at[n] for n in names], dtype=np.int64), classes


def _check_present(texts: Sequence[str], name: str, source: str, first_line: int) -> None:
    """Raise :class:`DataError` naming the first line whose target cell is missing."""
    for i, t in enumerate(texts):
        if t.lower() in MISSING_TOKENS:
            more = sum(1 for u in texts if u.lower() in MISSING_TOKENS) - 1
            also = f" (and {more} other lines)" if more else ""
            raise DataError(f"{source}: target {name!r} is missing on line {first_line + i}{also}")


def _first_label(
    rows: Sequence[Sequence[str]], y: npt.NDArray[np.int8], j: int, label: int
) -> str | None:
    """The target cell (stripped) of the first row whose class is ``label``, or None."""
    at = np.flatnonzero(y == label)
    return rows[int(at[0])][j].strip() if len(at) else None


def _column(name: str, cells: list[str], force_categorical: bool) -> Column:
    if not cells or max(map(len, cells)) > _ARRAY_CELL or "\0" in "".join(cells):
        return _column_by_cell(name, cells, force_categorical)
    # Short cells: the same rules on arrays (fixed-width text, so only when short).
    texts = np.char.strip(np.asarray(cells, dtype=np.str_))
    missing = np.isin(np.char.lower(texts), _MISSING_ARRAY)
    if not force_categorical:
        try:  # NumPy reads text as float() does: the same spellings are numbers
            values = np.where(missing, "0", texts).astype(np.float64)
        except ValueError:
            pass
        else:
            if np.isfinite(values).all():
                values[missing] = np.nan
                return Column(name, NUMERIC, values)
    return Column(name, CATEGORICAL, np.where(missing, "", texts))


_ARRAY_CELL: Final = 64
"""The longest cell that :func:`_column` handles as fixed-width array text."""
_MISSING_ARRAY: Final = np.array(sorted(MISSING_TOKENS), dtype=np.str_)


def _column_by_cell(name: str, cells: list[str], force_categorical: bool) -> Column:
    texts = [c.strip() for c in cells]
    missing = [t.lower() in MISSING_TOKENS for t in texts]
    if not force_categorical:
        values = np.full(len(texts), np.nan)
        numeric = True
        for i, (t, m) in enumerate(zip(texts, missing, strict=True)):
            if m:
                continue
            try:
                v = float(t)
            except ValueError:
                numeric = False
                break
            if not np.isfinite(v):
                numeric = False
                break
            values[i] = v
        if numeric:
            return Column(name, NUMERIC, values)
    cats = np.array(["" if m else t for t, m in zip(texts, missing, strict=True)], dtype=np.str_)
    return Column(name, CATEGORICAL, cats)


def parse_target(
    cells: Sequence[str],
    name: str,
    *,
    source: str = "<rows>",
    positive_label: str | None = None,
    first_line: int = 2,
) -> npt.NDArray[np.int8]:
    """Turn a target column's cells into 0/1.

    Accepted: numbers equal to 0 and 1; yes/no, y/n, true/false, t/f and a
    few credit spellings (default / non-default, bad / good, charged off /
    fully paid), case-insensitive; or any two labels with ``positive_label``
    naming the one that becomes 1 (as spelled in the file).  A column with a
    single label is fine (a peer may have no defaults); with ``positive_label``
    that label becomes 0 unless it is ``positive_label`` itself.  Raises
    :class:`DataError` for a missing target cell (naming the line), more
    than two labels (naming them), two unknown labels without
    ``positive_label``, or a ``positive_label`` that is not one of the
    column's values when the column has two values, or when its only value
    reads as positive (``yes``, ``1``, ...: a misspelled ``positive_label``
    would make every row negative).
    """
    texts = [c.strip() for c in cells]
    _check_present(texts, name, source, first_line)
    labels = sorted(set(texts))
    if len(labels) > 2:
        shown = ", ".join(repr(v) for v in labels[:10]) + (", ..." if len(labels) > 10 else "")
        raise DataError(
            f"{source}: target {name!r} is not binary: it has {len(labels)} values ({shown}); "
            "give --task multiclass or regression"
        )
    if positive_label is not None:
        if positive_label not in labels and (
            len(labels) == 2 or (labels and _label_meaning(labels[0]) == 1)
        ):
            shown = ", ".join(repr(v) for v in labels)
            raise DataError(
                f"{source}: positive label {positive_label!r} is not one of the target's "
                f"values {shown}; give one of them"
            )
        return np.array([t == positive_label for t in texts], dtype=np.int8)
    meaning = {label: _label_meaning(label) for label in labels}
    if None in meaning.values() or len(set(meaning.values())) != len(labels):
        shown = " and ".join(repr(v) for v in labels)
        raise DataError(
            f"{source}: target {name!r} has the labels {shown}; which one is positive "
            "is not obvious, so give positive_label"
        )
    return np.array([meaning[t] for t in texts], dtype=np.int8)


def _label_meaning(label: str) -> int | None:
    low = label.lower()
    if low in POSITIVE_LABELS:
        return 1
    if low in NEGATIVE_LABELS:
        return 0
    try:
        v = float(low)
    except ValueError:
        return None
    return int(v) if v in (0.0, 1.0) else None


def read_csv(
    path: str | os.PathLike[str],
    target: str = "default",
    *,
    positive_label: str | None = None,
    categorical: Iterable[str] = (),
    drop: Iterable[str] = (),
    delimiter: str | None = None,
    limits: SummaryLimits = DEFAULT_SUMMARY_LIMITS,
    task: str | None = BINARY,
) -> Table:
    """Read a CSV file (UTF-8, optional BOM) with a header row.

    ``delimiter`` defaults to whichever of ``, ; TAB |`` occurs most in the
    header line.  See :meth:`Table.from_rows` for ``categorical``/``drop``
    and ``task`` (None: inferred from the target, :mod:`fedup.learn.targets`),
    and :func:`parse_target` for a binary target's spellings.

    Raises :class:`DataError` for a missing or unreadable file, a file that
    is empty or has only a header, no target column (naming the columns
    present), a target that is not binary (naming its values), no feature
    column, a row with the wrong number of fields, or text that is not UTF-8.
    """
    source = os.fspath(path)
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{source}: cannot read the file: {e.strerror or e}") from None
    lines = csv_records(text, source, delimiter=delimiter)
    return Table.from_rows(
        lines[0],
        lines[1:],
        target,
        source=source,
        positive_label=positive_label,
        categorical=categorical,
        drop=drop,
        limits=limits,
        task=task,
    )


def csv_records(text: str, source: str, *, delimiter: str | None = None) -> list[list[str]]:
    """The non-blank records of a CSV file's text, the header first.

    ``delimiter`` defaults to whichever of ``, ; TAB |`` occurs most in the
    first line.  Raises :class:`DataError` for an empty text or one the
    ``csv`` module cannot parse.
    """
    if not text.strip():
        raise DataError(f"{source}: the file is empty")
    if delimiter is None:
        first = text.split("\n", 1)[0]
        delimiter = max(_DELIMITERS, key=lambda d: (first.count(d), d == ","))
    try:
        records = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except csv.Error as e:
        raise DataError(f"{source}: not a valid CSV file: {e}") from None
    return [r for r in records if any(c.strip() for c in r)]  # skip blank lines


def summarize(
    table: Table,
    *,
    max_categories: int = DEFAULT_SUMMARY_LIMITS.max_categories,
    min_category_count: int = 5,
    limits: SummaryLimits = DEFAULT_SUMMARY_LIMITS,
) -> DataSummary:
    """The local :class:`~fedup.learn.schema.DataSummary`: statistics, never rows.

    A categorical value is named only if at least ``min_category_count``
    rows share it (so a summary does not reveal one customer's rare value)
    and only the ``max_categories`` most frequent are named (ties broken by
    value); the rest are counted in ``other_count``.
    """
    out = []
    for c in table.columns:
        miss = c.missing
        n_missing = int(miss.sum())
        count = table.n_rows - n_missing
        if c.kind == NUMERIC:
            x = c.values[~miss]
            mean = float(x.mean()) if count else 0.0
            m2 = float(np.sum((x - mean) ** 2)) if count else 0.0
            out.append(ColumnSummary(c.name, NUMERIC, count, n_missing, mean=mean, m2=m2))
        else:
            vals, counts = np.unique(c.values[~miss], return_counts=True)
            ranked = sorted(
                ((str(v), int(k)) for v, k in zip(vals, counts, strict=True)),
                key=lambda vk: (-vk[1], vk[0]),
            )
            named = [
                (v, k)
                for v, k in ranked
                if k >= min_category_count and len(v.encode("utf-8")) <= limits.max_text
            ][:max_categories]
            other = count - sum(k for _, k in named)
            out.append(
                ColumnSummary(
                    c.name,
                    CATEGORICAL,
                    count,
                    n_missing,
                    categories=tuple(named),
                    other_count=other,
                )
            )
    return DataSummary(
        table.target_name,
        table.n_rows,
        table.n_positive,
        tuple(out),
        _shareable(table.negative_label, limits),
        _shareable(table.positive_label, limits),
        task=table.task,
        classes=_class_counts(table),
        target_stats=_target_stats(table),
    )


def _class_counts(table: Table) -> tuple[tuple[str, int], ...]:
    """Multi-class: every class of the table with its rows (the federation's class set is
    their union, so each is named whatever its count); empty for the other tasks."""
    if table.task != MULTICLASS:
        return ()
    counts = np.bincount(table.target, minlength=len(table.classes))
    return tuple((c, int(k)) for c, k in zip(table.classes, counts, strict=True) if k > 0)


def _target_stats(table: Table) -> ColumnSummary | None:
    """Regression: the target's count, mean and sum of squared deviations (pooled into the
    standardization every member applies to it); None for the other tasks."""
    if table.task != REGRESSION:
        return None
    y = np.asarray(table.target, dtype=np.float64)
    mean = float(y.mean()) if len(y) else 0.0
    m2 = float(np.sum((y - mean) ** 2)) if len(y) else 0.0
    return ColumnSummary(table.target_name, NUMERIC, len(y), 0, mean=mean, m2=m2)


def _shareable(label: str | None, limits: SummaryLimits) -> str | None:
    """A target label as the summary carries it: None when there is none, or when it is
    longer than a summary's text may be (then the others cannot check it)."""
    if label is None or not label or len(label.encode("utf-8")) > limits.max_text:
        return None
    return label


def encode(table: Table, schema: FeatureSchema) -> tuple[F32, F32]:
    """Encode rows as the model's inputs: ``(x float32 [n, schema.width], y float32 [n])``.

    Columns are taken by name in the schema's order, so files with columns
    in another order encode the same.  Raises :class:`DataError` if a schema
    column is absent or has values of the other kind (run
    :func:`~fedup.learn.schema.fits` on the summary first to get all
    problems at once).
    """
    return encode_features(table, schema), encode_target(table, schema)


def encode_features(table: Table, schema: FeatureSchema) -> F32:
    """The model's inputs of :func:`encode` alone (rows to score have no target)."""
    n = table.n_rows
    x = np.zeros((n, schema.width), dtype=np.float32)
    at = 0
    for spec in schema.columns:
        col = table.column(spec.name)
        miss = col.missing
        if col.kind != spec.kind and not miss.all():
            raise DataError(
                f"{table.source}: column {spec.name!r} is {col.kind}, "
                f"the federation's schema says {spec.kind}"
            )
        if spec.kind == NUMERIC:
            if col.kind == NUMERIC:
                z = (np.where(miss, spec.mean, col.values) - spec.mean) / spec.std
                x[:, at] = np.clip(z, -CLIP, CLIP)
            at += 1
        else:
            k = len(spec.categories)
            if col.kind == CATEGORICAL:
                index = {v: i for i, v in enumerate(spec.categories)}
                seen, where = np.unique(col.values, return_inverse=True)
                code = np.array([index.get(str(v), k) for v in seen.tolist()], dtype=np.intp)
                pos = code[where.reshape(-1)] if len(seen) else np.zeros(n, dtype=np.intp)
                rows = np.flatnonzero(~miss)
                x[rows, at + pos[rows]] = 1.0
            at += k + 1
        if spec.missing:
            x[:, at] = miss
            at += 1
    return x


def encode_target(table: Table, schema: FeatureSchema) -> F32:
    """The target as the model learns it (float32): binary 0/1; multi-class the index of
    the row's class in the schema's class set; regression standardized with the
    federation's pooled mean and standard deviation.  Raises :class:`DataError` for a
    table of another task than the schema's or a class the schema does not list."""
    if table.task != schema.task:
        raise DataError(
            f"{table.source}: the target is {table.task}, the federation's is {schema.task}"
        )
    if table.task == MULTICLASS:
        at = {c: i for i, c in enumerate(schema.classes)}
        unknown = [c for c in table.classes if c not in at]
        if unknown:
            raise DataError(
                f"{table.source}: class {unknown[0]!r} is not in the federation's classes"
            )
        mapping = np.array([at[c] for c in table.classes], dtype=np.int64)
        return np.asarray(mapping[table.target], dtype=np.float32)
    if table.task == REGRESSION:
        z = (np.asarray(table.target, dtype=np.float64) - schema.target_mean) / schema.target_std
        return z.astype(np.float32)
    return np.asarray(table.target).astype(np.float32)


def split(table: Table, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[Table, Table]:
    """Stratified train/validation split, deterministic in ``seed``.

    Each label's rows (a multi-class table: each class's; a regression table: all
    rows as one group) are shuffled with ``numpy.random.default_rng(seed)`` and
    ``round(val_fraction * count)`` of them go to validation; both parts keep the
    table's row order.  A multi-class or regression table whose groups are all too
    small to give one (5 rows of 4 classes, say) gives one row of its largest group
    when that group has 2 rows or more (so every class keeps a training row, and is
    in the summary of the training split the member shares), so it has a validation
    loss.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val: list[npt.NDArray[np.intp]] = []
    if table.task == REGRESSION:
        groups = [np.arange(table.n_rows)]
    else:
        labels = range(len(table.classes)) if table.task == MULTICLASS else (0, 1)
        groups = [np.flatnonzero(table.target == label) for label in labels]
    for idx in groups:
        k = round(val_fraction * len(idx))
        val.append(rng.permutation(idx)[:k])
    chosen = np.concatenate(val)
    largest = max(groups, key=len)
    if table.task != BINARY and not len(chosen) and val_fraction > 0 and len(largest) >= 2:
        chosen = rng.permutation(largest)[:1]  # its group keeps a training row
    is_val = np.zeros(table.n_rows, dtype=bool)
    is_val[chosen] = True
    return table.take(np.flatnonzero(~is_val)), table.take(np.flatnonzero(is_val))
