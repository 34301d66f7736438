"""Column summaries of each peer's data, and the federation's merged feature schema.

Pure: standard library only (plus FedUp's own pure protocol helpers), so the
networking layer can validate and merge summaries without importing torch.

A peer never shares rows.  Before training, each peer sends a
:class:`DataSummary` of its local table: per column the inferred kind, counts,
mean and sum of squared deviations (numeric) or the most frequent category
values with their counts (categorical), plus its label counts.  Every peer
merges all summaries with :func:`merge_summaries` into the same
:class:`FeatureSchema` (the merge is exact and independent of the order of
the summaries), and all peers compare :meth:`FeatureSchema.digest` to be sure
they agree.  :func:`fits` refuses a peer whose columns do not fit, naming the
columns; :func:`admit` merges, refuses the peers that do not fit, and merges
again without them.

A summary from another peer is untrusted.  :meth:`DataSummary.from_dict`
bounds it (:class:`SummaryLimits`): at most 1024 columns, 64 listed category
values per column, 128-byte names and values, counts of at most 2**53, and
numeric statistics that are finite with ``|mean| <= 1e100`` and
``0 <= m2 <= 1e200``.  Those two bounds keep every merge step far from the
float limit (about 1.8e308): the pooled mean is a weighted average of the
means, so ``|mean| <= 1e100``; the pooled sum of squared deviations is
``sum(m2_i) + sum(count_i * (mean_i - mean)**2)``, and the second sum is at
most ``sum(count_i * mean_i**2)``, so for ``k`` summaries it is at most
``k * 1e200 + k * 2**53 * 1e200``: below 2.4e218 for the 256 members a
federation may have (and finite for any ``k`` below 1e92).  The variance
(that sum over the pooled count, at least 1) is no larger, and the standard
deviation is below 2e109.  The other bounds keep a merge's time and memory
linear in the size of the summaries, which the message size caps as well.
As a second line of defence, :func:`admit` never raises for a candidate's
statistics: if pooling fails (:class:`PoolingError`, e.g. for summaries built
without ``from_dict``), it finds the summaries that cause it and refuses them
with the reason.

Rules of the merge:

* A column is in the schema when every summary has it: a column only some
  members have is not used by anyone (each member logs which of its columns
  the federation leaves out; :func:`unused_columns`), and it is no reason to
  refuse a member.  Its kind is the majority kind among the summaries that
  have non-missing values for it (a tie makes it categorical); a member
  whose values are of the other kind is refused.  Columns are sorted by name.
* The target's labels: each summary says how its file spells 0 and 1; the
  schema lists every spelling of each class.  No spelling may mean 0 to one
  member and 1 to another (``--positive-label good`` at one lender, ``bad``
  read as the positive class at another, say): :func:`admit` refuses the
  member that contradicts the ones before it (the leader first), so members
  never train opposite targets under one name.
* Numeric statistics are pooled exactly: counts add, and the pooled mean and
  the pooled sum of squared deviations are computed in rational arithmetic
  (every finite float is an integer times a power of two, so the sums are
  kept as integers over a common power of two) from the summaries' means and
  sums of squared deviations, then rounded once to float.  So the result
  equals the statistics of the concatenated data, up to the rounding of each
  peer's own summary, whatever the order.
* Category vocabularies are united by adding the counts of equal values; the
  values are ordered by pooled count (descending) then by value, and the
  first ``max_categories`` are kept.  Everything else becomes "other".
* A column has a missing-value indicator when any summary reports a missing
  value for it.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import attrs

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.learn.targets import (
    BINARY,
    MAX_CLASSES,
    MULTICLASS,
    REGRESSION,
    TASKS,
    check_classes,
    sorted_classes,
    task_problem,
)
from fedup.protocol import cbor
from fedup.protocol.schema import FieldReader, MessageError

__all__ = [
    "CATEGORICAL",
    "KINDS",
    "NUMERIC",
    "Admission",
    "ColumnSummary",
    "DataSummary",
    "FeatureColumn",
    "FeatureSchema",
    "PoolingError",
    "SchemaMismatchError",
    "SummaryError",
    "SummaryLimits",
    "admit",
    "fits",
    "merge_summaries",
    "unused_columns",
]

NUMERIC: Final = "numeric"
CATEGORICAL: Final = "categorical"
KINDS: Final = (NUMERIC, CATEGORICAL)
SCHEMA_VERSION: Final = 1
_MAX_COUNT: Final = 2**53  # counts must stay exact as floats, too


@attrs.frozen
class SummaryLimits:
    """Bounds on a summary from another peer; checked before anything is built."""

    max_columns: int = 1024
    """Columns in one table; credit tables have tens, wide ones a few hundred."""
    max_categories: int = 64
    """Category values a summary may list per column, and the merged vocabulary's cap
    (each becomes one input of the model; rarer values share the "other" input)."""
    max_text: int = 128
    """UTF-8 bytes of a column name or a category value."""
    max_abs_mean: float = 1e100
    """Magnitude of a numeric column's mean: real data are far smaller, and a pooled mean
    (a weighted average) then cannot overflow, nor can its squared deviations."""
    max_m2: float = 1e200
    """A numeric column's sum of squared deviations: with ``max_abs_mean`` and counts of
    at most 2**53, pooling 256 summaries gives at most 2.4e218, a finite float."""
    max_labels: int = 16
    """Spellings of each target class a schema lists (members may spell 1 as ``1``,
    ``yes``, ``default``, ...): a few in practice; :func:`admit` refuses a member
    whose spellings would add more."""


DEFAULT_SUMMARY_LIMITS: Final = SummaryLimits()


class SummaryError(MessageError):
    """A summary or schema received from outside is malformed or inconsistent."""


@contextmanager
def _summary_errors() -> Iterator[None]:
    """Report a malformed field (a :class:`MessageError`) as a :class:`SummaryError`."""
    try:
        yield
    except SummaryError:
        raise
    except MessageError as e:
        raise SummaryError(e.reason) from None


class PoolingError(SummaryError):
    """The numeric statistics of ``column`` cannot be pooled into finite floats.

    :func:`merge_summaries` raises it when a mean or sum of squared deviations
    is not finite, or is so large that pooling overflows.  Summaries decoded
    by :meth:`DataSummary.from_dict` within the default :class:`SummaryLimits`
    never cause it; :func:`admit` refuses the summaries that do.
    """

    def __init__(self, reason: str, *, column: str, peer: str | None = None) -> None:
        super().__init__(reason, peer=peer)
        self.column = column

    def with_peer(self, peer: str) -> PoolingError:
        err = PoolingError(self.reason, column=self.column, peer=peer)
        err.__cause__ = self.__cause__
        return err


class SchemaMismatchError(RemoteProtocolError):
    """A peer's data do not fit the federation's schema.

    ``missing`` and ``conflicts`` name the columns that are absent from the
    peer's data or of another kind there; ``target`` is true when the target
    column differs or a target label means the other class there.
    """

    def __init__(
        self,
        reason: str,
        *,
        peer: str | None = None,
        missing: Sequence[str] = (),
        conflicts: Sequence[str] = (),
        target: bool = False,
    ) -> None:
        super().__init__(reason, peer=peer)
        self.missing = tuple(missing)
        self.conflicts = tuple(conflicts)
        self.target = target

    def with_peer(self, peer: str) -> SchemaMismatchError:
        err = SchemaMismatchError(
            self.reason,
            peer=peer,
            missing=self.missing,
            conflicts=self.conflicts,
            target=self.target,
        )
        err.__cause__ = self.__cause__
        return err


# --------------------------------------------------------------------------
# Summaries


@attrs.frozen
class ColumnSummary:
    """What one peer tells the others about one of its columns (never a row)."""

    name: str
    """The column's header."""
    kind: str
    """``"numeric"`` if every non-missing value is a finite number, else ``"categorical"``."""
    count: int
    """Non-missing values."""
    n_missing: int
    """Missing values (empty cells and the usual NA spellings)."""
    mean: float = 0.0
    """Numeric: mean of the non-missing values (0 when there are none)."""
    m2: float = 0.0
    """Numeric: sum of squared deviations from ``mean`` (variance times ``count``)."""
    categories: tuple[tuple[str, int], ...] = ()
    """Categorical: the most frequent values with their counts, most frequent first."""
    other_count: int = 0
    """Categorical: non-missing values not listed in ``categories``."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "n_missing": self.n_missing,
        }
        if self.kind == NUMERIC:
            out["mean"] = self.mean
            out["m2"] = self.m2
        else:
            out["categories"] = [[v, c] for v, c in self.categories]
            out["other_count"] = self.other_count
        return out

    @classmethod
    def from_dict(
        cls, obj: object, *, what: str = "column summary", limits: SummaryLimits | None = None
    ) -> ColumnSummary:
        """Build from an untrusted decoded dict; raises :class:`SummaryError`."""
        lim = limits or DEFAULT_SUMMARY_LIMITS
        with _summary_errors():
            r = FieldReader(obj, what)
            name = r.text("name", max_bytes=lim.max_text)
            kind = r.text("kind", max_bytes=16)
            if kind not in KINDS:
                raise r.fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
            count = r.uint("count", max_value=_MAX_COUNT)
            n_missing = r.uint("n_missing", max_value=_MAX_COUNT)
            mean = m2 = 0.0
            cats: list[tuple[str, int]] = []
            other = 0
            if kind == NUMERIC:
                mean, m2 = _number(r, "mean"), _number(r, "m2")
                problem = _statistics_problem(mean, m2, lim)
                if problem is not None:
                    raise r.fail(*problem)
            else:
                cats = r.array("categories", _category_item(lim), max_items=lim.max_categories)
                other = r.uint("other_count", max_value=_MAX_COUNT)
            r.done()
        if len({v for v, _ in cats}) != len(cats):
            raise SummaryError(f"{what} {name!r}: repeated category value")
        if kind == CATEGORICAL and sum(c for _, c in cats) + other != count:
            raise SummaryError(f"{what} {name!r}: category counts do not add up to count")
        if count == 0 and (mean != 0.0 or m2 != 0.0):
            raise SummaryError(f"{what} {name!r}: statistics given for no values")
        return cls(name, kind, count, n_missing, mean, m2, tuple(cats), other)


def _statistics_problem(mean: float, m2: float, lim: SummaryLimits) -> tuple[str, str] | None:
    """``(field, problem)`` if a numeric column's mean or m2 is outside ``lim``, else None.

    Within the default bounds, pooling up to 1e92 summaries cannot overflow
    (see the module docstring).
    """
    if not math.isfinite(mean):
        return "mean", "must be finite"
    if not abs(mean) <= lim.max_abs_mean:
        return "mean", f"must be at most {lim.max_abs_mean:g} in magnitude, got {mean:g}"
    if not math.isfinite(m2):
        return "m2", "must be finite"
    if m2 < 0:
        return "m2", "must not be negative"
    if not m2 <= lim.max_m2:
        return "m2", f"must be at most {lim.max_m2:g}, got {m2:g}"
    return None


def _number(r: FieldReader, key: str) -> float:
    """A number field as a float (an integer too large for a float is refused)."""
    try:
        return r.number(key)
    except OverflowError:
        raise r.fail(key, "must be finite") from None


def _finite(r: FieldReader, key: str) -> float:
    value = _number(r, key)
    if not math.isfinite(value):
        raise r.fail(key, "must be finite")
    return value


def _category_item(lim: SummaryLimits) -> Any:
    def item(value: object, label: str) -> tuple[str, int]:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not isinstance(value[0], str)
            or isinstance(value[1], bool)
            or not isinstance(value[1], int)
        ):
            raise SummaryError(f"{label}: must be a [value, count] pair")
        v, c = value
        if not v or len(v.encode("utf-8", "surrogatepass")) > lim.max_text:
            raise SummaryError(f"{label}: value must be 1 to {lim.max_text} bytes")
        if not 0 < c <= _MAX_COUNT:
            raise SummaryError(f"{label}: count must be positive")
        return v, c

    return item


@attrs.frozen
class DataSummary:
    """One peer's summary of its local table: label counts and column summaries."""

    target: str
    """Name of the binary target column."""
    n_rows: int
    """Rows of the local table."""
    n_positive: int
    """Rows whose target is the positive label (1)."""
    columns: tuple[ColumnSummary, ...]
    """Feature columns in the file's order (the target is not among them)."""
    negative_label: str | None = None
    """How this peer's file spells the target's 0 (None: not known)."""
    positive_label: str | None = None
    """How it spells 1 (None: not known).  Members must not read one spelling as
    opposite classes: see :func:`admit`."""
    task: str = BINARY
    """``binary``, ``multiclass`` or ``regression`` (:mod:`fedup.learn.targets`); members
    of another task than the leader's are refused."""
    classes: tuple[tuple[str, int], ...] = ()
    """Multi-class: each class this peer has rows of, with its rows (class order)."""
    target_stats: ColumnSummary | None = None
    """Regression: the target's count, mean and sum of squared deviations."""

    def column(self, name: str) -> ColumnSummary | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "target": self.target,
            "n_rows": self.n_rows,
            "n_positive": self.n_positive,
            "columns": [c.to_dict() for c in self.columns],
        }
        if self.negative_label is not None:
            out["negative_label"] = self.negative_label
        if self.positive_label is not None:
            out["positive_label"] = self.positive_label
        if self.task != BINARY:  # a binary summary is as it always was
            out["task"] = self.task
        if self.task == MULTICLASS:
            out["classes"] = [[c, k] for c, k in self.classes]
        if self.task == REGRESSION and self.target_stats is not None:
            out["target_stats"] = self.target_stats.to_dict()
        return out

    @classmethod
    def from_dict(cls, obj: object, *, limits: SummaryLimits | None = None) -> DataSummary:
        """Build from an untrusted decoded dict (e.g. CBOR from a peer).

        Checks presence, types, bounds (``limits``: sizes, counts, and numeric
        statistics small enough that merging cannot overflow) and consistency
        (counts add up to ``n_rows``, no repeated column, the target is not a
        feature).  Raises :class:`SummaryError` naming the field.
        """
        lim = limits or DEFAULT_SUMMARY_LIMITS
        with _summary_errors():
            r = FieldReader(obj, "data summary")
            if r.uint("v") != SCHEMA_VERSION:
                raise r.fail("v", f"must be {SCHEMA_VERSION}")
            target = r.text("target", max_bytes=lim.max_text)
            n_rows = r.uint("n_rows", max_value=_MAX_COUNT)
            n_positive = r.uint("n_positive", max_value=n_rows)
            cols = r.array(
                "columns",
                lambda v, label: ColumnSummary.from_dict(v, what=label, limits=lim),
                max_items=lim.max_columns,
            )
            negative, positive = (
                r.text(key, max_bytes=lim.max_text) if r.optional(key) else None
                for key in ("negative_label", "positive_label")
            )
            task = r.text("task", max_bytes=16) if r.optional("task") else BINARY
            if task not in TASKS:
                raise r.fail("task", f"must be one of {', '.join(TASKS)}, got {task!r}")
            classes: list[tuple[str, int]] = []
            stats = None
            if task == MULTICLASS:
                classes = r.array("classes", _category_item(lim), max_items=MAX_CLASSES)
            if task == REGRESSION:
                stats = ColumnSummary.from_dict(
                    r.raw("target_stats"), what="data summary: target_stats", limits=lim
                )
            r.done()
        problem = _target_problem(task, n_rows, n_positive, negative, positive, classes, stats)
        if problem is not None:
            raise SummaryError(f"data summary: {problem}")
        if negative is not None and negative == positive:
            raise SummaryError(
                f"data summary: {negative!r} is both the negative and positive label"
            )
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise SummaryError("data summary: repeated column name")
        if target in names:
            raise SummaryError(f"data summary: the target {target!r} is also a feature")
        for c in cols:
            if c.count + c.n_missing != n_rows:
                raise SummaryError(f"data summary: column {c.name!r} does not have n_rows values")
        return cls(
            target, n_rows, n_positive, tuple(cols), negative, positive, task, tuple(classes),
            stats,
        )  # fmt: skip


def _target_problem(
    task: str,
    n_rows: int,
    n_positive: int,
    negative: str | None,
    positive: str | None,
    classes: Sequence[tuple[str, int]],
    stats: ColumnSummary | None,
) -> str | None:
    """Why a summary's target figures do not fit its task, or None."""
    if task == BINARY:
        return None
    if n_positive or negative is not None or positive is not None:
        return f"a {task} target has no positive count nor labels"
    if task == MULTICLASS:
        problem = check_classes([c for c, _ in classes])
        if problem is not None:
            return problem
        if sum(k for _, k in classes) != n_rows:
            return "class counts do not add up to n_rows"
        return None
    assert stats is not None
    if stats.kind != NUMERIC or stats.count != n_rows or stats.n_missing:
        return "target_stats must be numeric, with n_rows values and none missing"
    return None


# --------------------------------------------------------------------------
# The merged schema


@attrs.frozen
class FeatureColumn:
    """How every peer encodes one column."""

    name: str
    kind: str
    """``"numeric"`` or ``"categorical"``."""
    mean: float = 0.0
    """Numeric: pooled mean; missing values are imputed with it."""
    std: float = 1.0
    """Numeric: pooled standard deviation (1 if the column is constant)."""
    categories: tuple[str, ...] = ()
    """Categorical: the merged vocabulary, one input each, then one for "other"."""
    missing: bool = False
    """Whether some peer has missing values here: adds a missing-indicator input."""

    @property
    def width(self) -> int:
        """Inputs of the model this column becomes."""
        base = 1 if self.kind == NUMERIC else len(self.categories) + 1
        return base + int(self.missing)

    def feature_names(self) -> list[str]:
        if self.kind == NUMERIC:
            names = [self.name]
        else:
            names = [f"{self.name}={v}" for v in self.categories] + [f"{self.name}=<other>"]
        if self.missing:
            names.append(f"{self.name}:missing")
        return names

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "missing": self.missing}
        if self.kind == NUMERIC:
            out["mean"] = self.mean
            out["std"] = self.std
        else:
            out["categories"] = list(self.categories)
        return out


@attrs.frozen
class FeatureSchema:
    """The federation's agreed encoding of rows into model inputs.

    Every peer derives the same schema from the same summaries; compare
    :meth:`digest` to check.
    """

    target: str
    n_rows: int
    """Pooled rows of the summaries merged."""
    n_positive: int
    """Pooled positive labels: the federation's label mix, from counts only."""
    n_summaries: int
    columns: tuple[FeatureColumn, ...]
    """Sorted by name."""
    negative_labels: tuple[str, ...] = ()
    """Every spelling of the target's 0 among the members (sorted); none is also in
    ``positive_labels``, so no two members train opposite targets under one spelling."""
    positive_labels: tuple[str, ...] = ()
    """Every spelling of 1 among the members (sorted)."""
    task: str = BINARY
    """The leader's task (:mod:`fedup.learn.targets`): every member's is this one."""
    classes: tuple[str, ...] = ()
    """Multi-class: the union of the members' classes (class order); the model has one
    output per class, and a member without rows of a class trains as well."""
    target_mean: float = 0.0
    """Regression: the pooled mean of the target (every member standardizes with it)."""
    target_std: float = 1.0
    """Regression: the pooled standard deviation of the target (1 if constant)."""

    @property
    def width(self) -> int:
        """Number of model inputs."""
        return sum(c.width for c in self.columns)

    @property
    def outputs(self) -> int:
        """Number of model outputs: one per class (multi-class), else one."""
        return len(self.classes) if self.task == MULTICLASS else 1

    def column(self, name: str) -> FeatureColumn | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None

    def feature_names(self) -> list[str]:
        return [n for c in self.columns for n in c.feature_names()]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "target": self.target,
            "n_rows": self.n_rows,
            "n_positive": self.n_positive,
            "n_summaries": self.n_summaries,
            "columns": [c.to_dict() for c in self.columns],
        }
        if self.negative_labels or self.positive_labels:
            out["negative_labels"] = list(self.negative_labels)
            out["positive_labels"] = list(self.positive_labels)
        if self.task != BINARY:  # a binary schema (and its digest) is as it always was
            out["task"] = self.task
        if self.task == MULTICLASS:
            out["classes"] = list(self.classes)
        if self.task == REGRESSION:
            out["target_mean"] = self.target_mean
            out["target_std"] = self.target_std
        return out

    def digest(self) -> str:
        """SHA-256 (hex) of the schema's deterministic CBOR encoding."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:  # made once: the schema is frozen, and a peer asks often
        return hashlib.sha256(cbor.encode(self.to_dict())).hexdigest()


def merge_summaries(
    summaries: Sequence[DataSummary],
    target: str,
    *,
    max_categories: int = DEFAULT_SUMMARY_LIMITS.max_categories,
) -> FeatureSchema:
    """Merge peers' summaries into the federation's :class:`FeatureSchema`.

    See the module docstring for the rules.  The result does not depend on
    the order of ``summaries``.  Summaries whose target is not ``target``
    still count (call :func:`fits` or use :func:`admit` to refuse them).
    Raises :class:`~fedup.errors.LocalProtocolError` for an empty list,
    :class:`SchemaMismatchError` if a target label means 0 to one summary and
    1 to another, and :class:`PoolingError` naming the column if a column's
    statistics cannot be pooled into finite floats (never for summaries
    within the default :class:`SummaryLimits`).  :func:`admit` refuses the
    summaries that cause either.
    """
    if not summaries:
        raise LocalProtocolError("merge_summaries needs at least one summary")
    task = summaries[0].task
    target_mean, target_std = 0.0, 1.0
    if task == REGRESSION:
        stats = [s.target_stats for s in summaries if s.target_stats is not None]
        try:
            target_mean, target_std = _pooled([c for c in stats if c.count > 0])
        except (ArithmeticError, ValueError) as e:
            raise PoolingError(
                f"the statistics of the target {target!r} cannot be pooled into finite "
                f"numbers ({e})",
                column=target,
            ) from e
    classes = sorted_classes(c for s in summaries if s.task == MULTICLASS for c, _ in s.classes)
    negative, positive = _labels(summaries)
    by_name: dict[str, list[ColumnSummary]] = {}
    for s in summaries:
        for c in s.columns:
            by_name.setdefault(c.name, []).append(c)
    firsts = {c.name: c for c in summaries[0].columns}
    columns = []
    for name in sorted(by_name):
        present = by_name[name]
        if len(present) < len(summaries):
            continue  # not every member has it: nobody uses it
        kind = _majority_kind(present, firsts.get(name))
        agreeing = [c for c in present if c.kind == kind and c.count > 0]
        missing = any(c.n_missing > 0 for c in present)
        if kind == NUMERIC:
            try:
                mean, std = _pooled(agreeing)
            except (ArithmeticError, ValueError) as e:
                raise PoolingError(
                    f"the statistics of column {name!r} cannot be pooled into finite numbers ({e})",
                    column=name,
                ) from e
            columns.append(FeatureColumn(name, kind, mean=mean, std=std, missing=missing))
        else:
            vocab = _vocabulary(agreeing, max_categories)
            columns.append(FeatureColumn(name, kind, categories=vocab, missing=missing))
    return FeatureSchema(
        target=target,
        n_rows=sum(s.n_rows for s in summaries),
        n_positive=sum(s.n_positive for s in summaries),
        n_summaries=len(summaries),
        columns=tuple(columns),
        negative_labels=negative,
        positive_labels=positive,
        task=task,
        classes=classes if task == MULTICLASS else (),
        target_mean=target_mean,
        target_std=target_std,
    )


def _labels(summaries: Sequence[DataSummary]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The summaries' spellings of 0 and of 1, sorted, at most
    :attr:`SummaryLimits.max_labels` of each (the first summary's always among them).

    A spelling that means 0 to one summary and 1 to another (compared as
    :func:`label_key` does: case and number format aside) is left out of both: the
    lists only let a member check that it does not read a spelling the other way
    round (:func:`fits`), and :func:`admit` refuses a member that contradicts the
    leader, the first summary; two other members that disagree only decide their own
    rows' meaning, which each member decides anyway."""
    negative = {s.negative_label for s in summaries if s.negative_label is not None}
    positive = {s.positive_label for s in summaries if s.positive_label is not None}
    ambiguous = {label_key(x) for x in negative} & {label_key(x) for x in positive}
    first = summaries[0]
    lim = DEFAULT_SUMMARY_LIMITS

    def kept(labels: set[str], own: str | None) -> tuple[str, ...]:
        clear = sorted(x for x in labels if label_key(x) not in ambiguous and x != own)
        mine = [own] if own is not None and label_key(own) not in ambiguous else []
        return tuple(sorted([*mine, *clear[: lim.max_labels - len(mine)]]))

    return kept(negative, first.negative_label), kept(positive, first.positive_label)


def label_key(label: str) -> str:
    """A target label as :func:`fedup.learn.tabular.parse_target` reads it: case and
    surrounding space aside, and a number by its value (``1``, ``1.0`` and ``01`` are one
    spelling)."""
    text = label.strip().casefold()
    try:
        value = float(text)
    except ValueError:
        return text
    return repr(value) if math.isfinite(value) else text


def _majority_kind(present: Sequence[ColumnSummary], first: ColumnSummary | None) -> str:
    """The kind most summaries give the column; a tie goes to ``first`` (the first
    summary's, the leader's in :func:`admit`), else to categorical."""
    votes = {NUMERIC: 0, CATEGORICAL: 0}
    for c in present:
        if c.count > 0:
            votes[c.kind] += 1
    if votes[NUMERIC] == votes[CATEGORICAL] and first is not None and first.count > 0:
        return first.kind
    return NUMERIC if votes[NUMERIC] > votes[CATEGORICAL] else CATEGORICAL


def _pooled(columns: Sequence[ColumnSummary]) -> tuple[float, float]:
    """Exact pooled mean and standard deviation (population) of numeric summaries.

    Every finite float is ``m / 2**k`` for integers ``m`` and ``k >= 0``, so
    the sums are kept exactly as integers over a common power of two (like
    :class:`fractions.Fraction` arithmetic, without reducing a fraction at
    every step) and each result is rounded once: ``int / int`` rounds
    correctly.  Raises ``OverflowError`` or ``ValueError`` if a statistic is
    not finite, a result does not fit a float, or the pooled variance is
    negative.
    """
    n = sum(c.count for c in columns)
    if n == 0:
        return 0.0, 1.0
    means = [_dyadic(c.mean) for c in columns]
    m2s = [_dyadic(c.m2) for c in columns]
    k = max(e for _, e in means)
    # sum(count * mean) == s / 2**k and sum(count * mean**2) == q / 2**(2k)
    scaled = [(c.count, m << (k - e)) for c, (m, e) in zip(columns, means, strict=True)]
    s = sum(c * m for c, m in scaled)
    q = sum(c * m * m for c, m in scaled)
    # sum(m2) == w / 2**j
    j = max(e for _, e in m2s)
    w = sum(m << (j - e) for m, e in m2s)
    # pooled m2 == sum(m2) + sum(count * mean**2) - n * pooled_mean**2 == num / (n * 2**h)
    h = max(j, 2 * k)
    num = n * ((w << (h - j)) + (q << (h - 2 * k))) - ((s * s) << (h - 2 * k))
    mean = s / (n << k)
    variance = num / ((n * n) << h)
    std = math.sqrt(variance)  # ValueError if negative (a negative m2)
    if not (math.isfinite(mean) and math.isfinite(std)):
        raise OverflowError("pooled statistics are not finite")
    return mean, (std if std > 0 else 1.0)


def _dyadic(x: float) -> tuple[int, int]:
    """``(m, k)`` with ``x == m / 2**k``; OverflowError/ValueError for inf/NaN."""
    m, d = x.as_integer_ratio()
    return m, d.bit_length() - 1


def _vocabulary(columns: Sequence[ColumnSummary], cap: int) -> tuple[str, ...]:
    counts: dict[str, int] = {}
    for c in columns:
        for value, k in c.categories:
            counts[value] = counts.get(value, 0) + k
    ranked = sorted(counts.items(), key=lambda vc: (-vc[1], vc[0]))
    return tuple(v for v, _ in ranked[:cap])


def fits(summary: DataSummary, schema: FeatureSchema) -> None:
    """Check that a peer's data fit the schema; raise :class:`SchemaMismatchError` if not.

    The peer must have the same target, spell neither class as the other
    class is spelled in the schema, have every schema column, and have each
    column of the schema's kind (a column with no non-missing values fits
    either kind).  Columns the schema does not list are no problem: the
    federation does not use them (:func:`unused_columns` names them).  The
    error names every offending column at once.
    """
    problems: list[str] = []
    wrong_target = summary.target != schema.target
    if wrong_target:
        problems.append(f"target is {summary.target!r}, the federation's is {schema.target!r}")
    label_problem = _label_problem(summary, schema.negative_labels, schema.positive_labels)
    if label_problem is not None:
        problems.append(label_problem)
        wrong_target = True
    kind_problem = task_problem(summary.task, schema.task)
    if kind_problem is not None:
        problems.append(kind_problem)
        wrong_target = True
    elif summary.task == MULTICLASS:
        unknown = [c for c, _ in summary.classes if c not in set(schema.classes)]
        if unknown:
            problems.append(f"classes {_names(unknown[:8])} are not in the federation's")
            wrong_target = True
    have = {c.name: c for c in summary.columns}
    want = {c.name: c for c in schema.columns}
    missing = [n for n in want if n not in have]
    conflicts = [n for n, c in have.items() if n in want and c.count > 0 and c.kind != want[n].kind]
    if missing:
        problems.append(f"missing columns {_names(missing)}")
    if conflicts:
        detail = ", ".join(
            f"{n!r} ({have[n].kind} here, {want[n].kind} in the federation)" for n in conflicts
        )
        problems.append(f"type conflicts {detail}")
    if problems:
        raise SchemaMismatchError(
            "data do not fit the federation's schema: " + "; ".join(problems),
            missing=missing,
            conflicts=conflicts,
            target=wrong_target,
        )


def _label_problem(
    summary: DataSummary, negative: Collection[str], positive: Collection[str]
) -> str | None:
    """Why ``summary``'s target labels contradict the given spellings, or None."""
    negative = {label_key(x) for x in negative}
    positive = {label_key(x) for x in positive}
    if summary.positive_label is not None and label_key(summary.positive_label) in negative:
        return (
            f"the target's positive label here is {summary.positive_label!r}, which is the "
            "negative label in the federation; give the positive label the others use"
        )
    if summary.negative_label is not None and label_key(summary.negative_label) in positive:
        return (
            f"the target's negative label here is {summary.negative_label!r}, which is the "
            "positive label in the federation; give the positive label the others use"
        )
    return None


def unused_columns(summary: DataSummary, schema: FeatureSchema) -> list[str]:
    """The columns of ``summary`` the schema does not list, in the summary's order: not
    every member has them, so the federation does not use them."""
    used = {c.name for c in schema.columns}
    return [c.name for c in summary.columns if c.name not in used]


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


@attrs.frozen
class Admission:
    """Result of :func:`admit`: the schema of the admitted peers and why others were refused."""

    schema: FeatureSchema
    admitted: tuple[int, ...]
    """Indices (into the summaries given) of the peers that fit."""
    refused: dict[int, SchemaMismatchError]
    """Index -> the reason that peer does not fit (or its statistics cannot be pooled)."""
    left_out: dict[str, tuple[int, ...]] = attrs.field(factory=dict)
    """The first summary's columns the schema leaves out -> the admitted peers that lack
    them (so the leader can say who narrowed the federation's features)."""


def admit(
    summaries: Sequence[DataSummary],
    target: str,
    *,
    max_categories: int = DEFAULT_SUMMARY_LIMITS.max_categories,
) -> Admission:
    """Merge, refuse the peers that do not fit, and merge again without them.

    First (see :func:`_disagreeing`), a summary is refused for another
    target, a target label that means the other class to the caller's, or
    columns that would leave the federation none.  Then the rest are merged
    (the schema keeps the columns all of them have; a kind most of them give
    a column, a tie going to the caller's) and those whose columns are of
    the other kind are refused.  Repeats until every remaining peer fits, so
    the schema's statistics come only from admitted peers.  Deterministic
    given the summaries and their order (indices in the result refer to that
    order).  Raises :class:`SchemaMismatchError` if no peer fits.

    ``summaries[0]`` is the caller's own (the leader's).  A summary whose
    statistics cannot be pooled (:class:`PoolingError`) is refused like one
    that does not fit, with the column and values in the reason, and never
    makes ``admit`` raise: see :func:`_merge_refusing` for how the culprits
    are found.  Only when pooling fails and ``summaries[0]`` cannot be pooled
    on its own, or is itself outside the default :class:`SummaryLimits`, is a
    :class:`PoolingError` raised: the caller's own data are the problem.
    """
    admitted = list(range(len(summaries)))
    refused: dict[int, SchemaMismatchError] = {}
    while True:
        disagree = _disagreeing(summaries, admitted, target)
        refused.update(disagree)
        admitted = [i for i in admitted if i not in disagree]
        if not admitted:
            raise SchemaMismatchError("no peer's data fit a common schema")
        schema, unpoolable = _merge_refusing(summaries, admitted, target, max_categories)
        if unpoolable:
            refused.update(unpoolable)
            admitted = [i for i in admitted if i not in unpoolable]
        if schema is None:
            continue
        newly: dict[int, SchemaMismatchError] = {}
        for i in admitted:
            try:
                fits(summaries[i], schema)
            except SchemaMismatchError as e:
                newly[i] = e
        if not newly:
            return Admission(
                schema, tuple(admitted), refused, _left_out(summaries, admitted, schema)
            )
        refused.update(newly)
        admitted = [i for i in admitted if i not in newly]


def _left_out(
    summaries: Sequence[DataSummary], admitted: Sequence[int], schema: FeatureSchema
) -> dict[str, tuple[int, ...]]:
    used = {c.name for c in schema.columns}
    names = {i: {c.name for c in summaries[i].columns} for i in admitted}
    return {
        c.name: tuple(i for i in admitted if c.name not in names[i])
        for c in summaries[0].columns
        if c.name not in used
    }


def _disagreeing(
    summaries: Sequence[DataSummary], indices: Sequence[int], target: str
) -> dict[int, SchemaMismatchError]:
    """The summaries of ``indices`` that cannot join the first one's, and why.

    The first (the caller's own, the leader's) is the reference; nothing another
    member claims about its own data can get a third member refused.  A summary is
    refused if its target is not ``target``, if one of its target labels means the
    other class to the reference (:func:`label_key`: case and number format aside),
    or if it would leave the federation no column: the schema keeps only the columns
    every member has, so the others are taken by how many of the reference's columns
    they share (most first, then in order), and one whose columns would empty what
    the members before it share is refused.  A member that lacks some columns still
    narrows the schema (docs/federation.md, what a member can still do).
    """
    refused: dict[int, SchemaMismatchError] = {}
    if not indices:
        return refused
    reference = summaries[indices[0]]
    ref_names = {c.name for c in reference.columns}
    ref_negative = _present(reference.negative_label)
    ref_positive = _present(reference.positive_label)
    candidates = []
    classes: set[str] = set()
    for i in indices:
        s = summaries[i]
        label_problem = None if i == indices[0] else _label_problem(s, ref_negative, ref_positive)
        problem = label_problem or task_problem(s.task, reference.task)
        if problem is None and s.task == MULTICLASS:
            grown = classes | {c for c, _ in s.classes}
            if len(grown) > MAX_CLASSES and i != indices[0]:
                problem = (
                    f"its classes would make the federation's {len(grown)}, more than {MAX_CLASSES}"
                )
            else:
                classes = grown
        if s.target != target:
            problem = f"target is {s.target!r}, the federation's is {target!r}"
        if problem is not None:
            refused[i] = SchemaMismatchError(
                f"data do not fit the federation's schema: {problem}", target=True
            )
        else:
            candidates.append(i)
    overlap = {i: len(ref_names & {c.name for c in summaries[i].columns}) for i in candidates}
    common: set[str] | None = None
    for i in sorted(candidates, key=lambda i: (i != indices[0], -overlap[i], i)):
        names = {c.name for c in summaries[i].columns}
        if common is not None and not common & names:
            shown = _names(sorted(common)[:8]) + (", ..." if len(common) > 8 else "")
            refused[i] = SchemaMismatchError(
                f"data do not fit the federation's schema: no column in common with the "
                f"federation's ({shown})"
            )
            continue
        common = names if common is None else common & names
    return refused


def _present(label: str | None) -> set[str]:
    return set() if label is None else {label}


def _merge_refusing(
    summaries: Sequence[DataSummary], indices: Sequence[int], target: str, max_categories: int
) -> tuple[FeatureSchema | None, dict[int, SchemaMismatchError]]:
    """Merge ``summaries[indices]``; if pooling fails, find and refuse the culprits.

    Returns the schema of the rest (None if none is left) and the refusals.
    Summaries within the default :class:`SummaryLimits` never fail together,
    so the search runs only for summaries built without
    :meth:`DataSummary.from_dict` or decoded with looser limits:

    1. A summary that cannot be pooled even on its own (a NaN, an infinity, a
       negative sum of squared deviations) is refused.
    2. The reference is the first summary within the bounds (index 0, the
       caller's own, must be: if it is not, or if step 1 fails for it, a
       :class:`PoolingError` is raised).  Each other summary is merged with
       the reference alone and refused if that fails: so one summary with an
       absurd statistic is caught whatever the order, without blaming others.
    3. If the rest still fail together, they are added one by one, those
       within the bounds first, then in index order, and each one whose
       addition fails is refused.

    Steps 1 and 2 skip the summaries within the bounds, which cannot fail
    there; step 3 tests every addition.
    """

    def attempt(ids: Sequence[int]) -> FeatureSchema | PoolingError:
        try:
            return merge_summaries(
                [summaries[i] for i in ids], target, max_categories=max_categories
            )
        except PoolingError as e:
            return e

    merged = attempt(indices)
    if isinstance(merged, FeatureSchema):
        return merged, {}
    # Within the bounds a summary pools with any others (module docstring), so
    # only the others are tested; the last step does not rely on that.
    bounded = {i for i in indices if _out_of_bounds(summaries[i]) is None}
    refused: dict[int, SchemaMismatchError] = {}
    rest: list[int] = []
    for i in indices:
        alone = attempt([i]) if i not in bounded else None
        if alone is None or isinstance(alone, FeatureSchema):
            rest.append(i)
        elif i == 0:
            raise alone
        else:
            refused[i] = _unpoolable(summaries[i], alone, "even on its own")
    if not rest:
        return None, refused
    merged = attempt(rest)
    if isinstance(merged, FeatureSchema):
        return merged, refused
    if rest[0] == 0 and 0 not in bounded:
        raise PoolingError(
            f"{merged.reason}; my own summary is out of bounds: {_out_of_bounds(summaries[0])}",
            column=merged.column,
        ) from merged
    reference = min(bounded.intersection(rest), default=rest[0])
    kept = [reference]
    for i in rest:
        if i == reference:
            continue
        pair = attempt([reference, i]) if i not in bounded or reference not in bounded else None
        if pair is None or isinstance(pair, FeatureSchema):
            kept.append(i)
        else:
            with_whom = "the leader's" if reference == 0 else f"summary {reference}'s"
            refused[i] = _unpoolable(summaries[i], pair, f"together with {with_whom}")
    merged = attempt(kept)
    if isinstance(merged, FeatureSchema):
        return merged, refused
    merged, together = attempt([reference]), [reference]
    for i in sorted(kept[1:], key=lambda i: (i not in bounded, i)):
        grown = attempt([*together, i])
        if isinstance(grown, FeatureSchema):
            merged, together = grown, [*together, i]
        else:
            refused[i] = _unpoolable(summaries[i], grown, "together with the others")
    assert isinstance(merged, FeatureSchema)  # the reference pools on its own
    return merged, refused


def _out_of_bounds(summary: DataSummary) -> str | None:
    """Why a summary's statistics are outside the default bounds, or None."""
    stats = () if summary.target_stats is None else (summary.target_stats,)
    for c in (*summary.columns, *stats):
        if c.kind == NUMERIC:
            problem = _statistics_problem(c.mean, c.m2, DEFAULT_SUMMARY_LIMITS)
            if problem is not None:
                return f"column {c.name!r}: field {problem[0]!r} {problem[1]}"
    return None


def _unpoolable(summary: DataSummary, error: PoolingError, how: str) -> SchemaMismatchError:
    column = summary.column(error.column)
    values = ""
    if column is not None and column.kind == NUMERIC:
        values = f" (mean {column.mean:g}, sum of squared deviations {column.m2:g})"
    lim = DEFAULT_SUMMARY_LIMITS
    reason = (
        f"the statistics of column {error.column!r}{values} cannot be pooled {how} into"
        f" finite numbers; a mean must be at most {lim.max_abs_mean:g} in magnitude and a"
        f" sum of squared deviations between 0 and {lim.max_m2:g}"
    )
    err = SchemaMismatchError(reason)
    err.__cause__ = error
    return err


def schema_from_dict(obj: object, *, limits: SummaryLimits | None = None) -> FeatureSchema:
    """Rebuild a merged schema received in a membership view; raises :class:`SummaryError`.

    Members cannot recompute the schema (they never see the others' summaries),
    so they check its shape here and its :meth:`FeatureSchema.digest` against the
    view's settings.
    """
    lim = limits or DEFAULT_SUMMARY_LIMITS
    with _summary_errors():
        r = FieldReader(obj, "feature schema")
        if r.uint("v") != SCHEMA_VERSION:
            raise r.fail("v", f"must be {SCHEMA_VERSION}")
        target = r.text("target", max_bytes=lim.max_text)
        n_summaries = r.uint("n_summaries", min_value=1, max_value=1 << 20)
        # pooled from up to n_summaries summaries of at most 2**53 rows each
        n_rows = r.uint("n_rows", max_value=n_summaries * _MAX_COUNT)
        n_positive = r.uint("n_positive", max_value=n_summaries * _MAX_COUNT)
        columns = r.array("columns", _feature_column(lim), max_items=lim.max_columns)
        negative: list[str] = []
        positive: list[str] = []
        if r.optional("negative_labels"):
            negative = r.array("negative_labels", _text_item(lim), max_items=lim.max_labels)
            positive = r.array("positive_labels", _text_item(lim), max_items=lim.max_labels)
        task = r.text("task", max_bytes=16) if r.optional("task") else BINARY
        if task not in TASKS:
            raise r.fail("task", f"must be one of {', '.join(TASKS)}, got {task!r}")
        classes: list[str] = []
        target_mean, target_std = 0.0, 1.0
        if task == MULTICLASS:
            classes = r.array("classes", _text_item(lim), max_items=MAX_CLASSES)
        if task == REGRESSION:
            target_mean, target_std = _finite(r, "target_mean"), _finite(r, "target_std")
            if target_std <= 0:
                raise r.fail("target_std", "must be positive")
        r.done()
    if task != BINARY and (n_positive or negative or positive):
        raise SummaryError(f"feature schema: a {task} target has no positives nor labels")
    class_problem = check_classes(classes) if task == MULTICLASS else None
    if class_problem is not None or (task == MULTICLASS and len(classes) < 2):
        raise SummaryError(f"feature schema: {class_problem or 'at least 2 classes'}")
    names = [c.name for c in columns]
    if names != sorted(set(names)):
        raise SummaryError("feature schema: columns must be unique and sorted by name")
    if n_positive > n_rows:
        raise SummaryError("feature schema: more positives than rows")
    for labels in (negative, positive):
        if labels != sorted(set(labels)):
            raise SummaryError("feature schema: target labels must be unique and sorted")
    if set(negative) & set(positive):
        raise SummaryError("feature schema: a target label is both negative and positive")
    return FeatureSchema(
        target, n_rows, n_positive, n_summaries, tuple(columns), tuple(negative),
        tuple(positive), task, tuple(classes), target_mean, target_std,
    )  # fmt: skip


def _feature_column(lim: SummaryLimits) -> Any:
    def item(value: object, label: str) -> FeatureColumn:
        r = FieldReader(value, label)
        name = r.text("name", max_bytes=lim.max_text)
        kind = r.text("kind", max_bytes=16)
        missing = r.boolean("missing")
        if kind == NUMERIC:
            mean = _finite(r, "mean")
            std = _finite(r, "std")
            if std <= 0:
                raise r.fail("std", "must be positive")
            r.done()
            return FeatureColumn(name, kind, mean, std, (), missing)
        if kind != CATEGORICAL:
            raise r.fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
        cats = r.array("categories", _text_item(lim), max_items=lim.max_categories)
        r.done()
        if len(set(cats)) != len(cats):
            raise SummaryError(f"{label}: repeated category value")
        return FeatureColumn(name, kind, categories=tuple(cats), missing=missing)

    return item


def _text_item(lim: SummaryLimits) -> Any:
    def item(value: object, label: str) -> str:
        if not isinstance(value, str) or len(value.encode()) > lim.max_text:
            raise MessageError(f"{label} must be text of at most {lim.max_text} bytes")
        return value

    return item
