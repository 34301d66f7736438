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
    """A parsed table: feature columns in file order and the 0/1 target."""

    columns: tuple[Column, ...]
    target: npt.NDArray[np.int8]
    """0/1 per row; 1 is the positive label (e.g. "default")."""
    target_name: str
    source: str = "<table>"
    """Where the rows came from (a path), for messages."""
    negative_label: str | None = None
    """How the file the rows came from spells the target's 0 (None: no row of it, or
    unknown).  Shared in the summary, so members can check they mean the same class."""
    positive_label: str | None = None
    """How it spells 1: the ``positive_label`` the user named (even when no row has it:
    a peer may have no positives), else the value rows read as positive."""

    @property
    def n_rows(self) -> int:
        return len(self.target)

    @property
    def n_positive(self) -> int:
        return int(self.target.sum())

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
    ) -> Table:
        """Build a table from text cells (what :func:`read_csv` does after parsing).

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
        y = parse_target(
            [row[j_target] for row in rows],
            target,
            source=source,
            positive_label=positive_label,
            first_line=first_line,
        )
        columns = tuple(
            _column(header[j], [row[j] for row in rows], header[j] in forced) for j in features
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
    for i, t in enumerate(texts):
        if t.lower() in MISSING_TOKENS:
            more = sum(1 for u in texts if u.lower() in MISSING_TOKENS) - 1
            also = f" (and {more} other lines)" if more else ""
            raise DataError(f"{source}: target {name!r} is missing on line {first_line + i}{also}")
    labels = sorted(set(texts))
    if len(labels) > 2:
        shown = ", ".join(repr(v) for v in labels[:10]) + (", ..." if len(labels) > 10 else "")
        raise DataError(
            f"{source}: target {name!r} is not binary: it has {len(labels)} values ({shown})"
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
) -> Table:
    """Read a CSV file (UTF-8, optional BOM) with a header row.

    ``delimiter`` defaults to whichever of ``, ; TAB |`` occurs most in the
    header line.  See :meth:`Table.from_rows` for ``categorical``/``drop``
    and :func:`parse_target` for the target's spellings.

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
    )


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
    return x, table.target.astype(np.float32)


def split(table: Table, *, val_fraction: float = 0.2, seed: int = 0) -> tuple[Table, Table]:
    """Stratified train/validation split, deterministic in ``seed``.

    Each label's rows are shuffled with ``numpy.random.default_rng(seed)``
    and ``round(val_fraction * count)`` of them go to validation; both parts
    keep the table's row order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val: list[npt.NDArray[np.intp]] = []
    for label in (0, 1):
        idx = np.flatnonzero(table.target == label)
        k = round(val_fraction * len(idx))
        val.append(rng.permutation(idx)[:k])
    is_val = np.zeros(table.n_rows, dtype=bool)
    is_val[np.concatenate(val)] = True
    return table.take(np.flatnonzero(~is_val)), table.take(np.flatnonzero(is_val))
