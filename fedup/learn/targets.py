"""What a table's target is: binary, multi-class or numeric (regression), and its classes.

Pure (standard library), like :mod:`fedup.learn.schema`, which carries the task
and the class set in the summaries and the merged schema.

**The inference rule** (:func:`infer_task`), on the target's non-missing cells
(stripped):

1. At most 2 distinct values (compared as :func:`class_name` reads them) ->
   :data:`BINARY` (one value is fine: a lender may have no defaults).
2. Every value a finite number: whole numbers with at most
   :data:`MAX_INTEGER_CLASSES` distinct values -> :data:`MULTICLASS` (grades
   1-5, say); any other numbers -> :data:`REGRESSION`.
3. Otherwise (text): at most :data:`MAX_CLASSES` distinct values ->
   :data:`MULTICLASS`; more is an error (:class:`TargetError`).

Each member infers from its own rows, so a member whose rows hold only two of a
federation's three classes reads its target as binary and is left out with the
reason: ``--task multiclass`` (``task=`` in the library) overrides the rule, as
does ``--task regression`` for whole numbers meant as amounts.

**Class names** (:func:`class_name`): the cell stripped; a number is named by its
value (``2``, ``2.0`` and ``02`` are class ``2``; ``2.5`` is ``2.5``).  Text keeps
its case (``A`` and ``a`` are two classes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "BINARY",
    "MAX_CLASSES",
    "MAX_INTEGER_CLASSES",
    "MULTICLASS",
    "REGRESSION",
    "TASKS",
    "TargetError",
    "check_classes",
    "class_name",
    "infer_task",
    "sorted_classes",
    "task_problem",
]

BINARY: Final = "binary"
MULTICLASS: Final = "multiclass"
REGRESSION: Final = "regression"
TASKS: Final = (BINARY, MULTICLASS, REGRESSION)
MAX_CLASSES: Final = 50
"""Classes a multi-class target may have: each is one output of the model, and the
federation's validation sums carry two counts per class in the 100 slots the binary
score histograms use (:mod:`fedup.learn.lap_sums`)."""
MAX_INTEGER_CLASSES: Final = 10
"""Distinct whole numbers a target may have to be read as classes (ratings, grades);
more are read as an amount (regression)."""


class TargetError(ValueError):
    """The target's values fit no task (too many text classes, no number to regress)."""


def class_name(cell: str) -> str:
    """A target cell as a class: stripped; a finite number by its value (``2.0`` -> ``2``)."""
    text = cell.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        return text
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def infer_task(cells: Iterable[str]) -> str:
    """The task the rule of the module docstring gives ``cells`` (non-missing, any order).

    Raises :class:`TargetError` for text with more than :data:`MAX_CLASSES` values.
    """
    distinct = {class_name(c) for c in cells}
    if len(distinct) <= 2:
        return BINARY
    numbers = [_number(v) for v in distinct]
    if all(v is not None for v in numbers):
        whole = all(v == int(v) for v in numbers if v is not None)
        return MULTICLASS if whole and len(distinct) <= MAX_INTEGER_CLASSES else REGRESSION
    if len(distinct) > MAX_CLASSES:
        raise TargetError(
            f"it has {len(distinct)} text values, more than the {MAX_CLASSES} classes a "
            "multi-class target may have"
        )
    return MULTICLASS


def task_problem(mine: str, theirs: str, *, where: str = "here") -> str | None:
    """Why a member's task ``mine`` cannot join a federation's ``theirs``, or None."""
    if mine == theirs:
        return None
    return (
        f"the target is {mine} {where}, the federation's is {theirs}; "
        f"give --task {theirs} if the rows here are {theirs}"
    )


def sorted_classes(names: Iterable[str]) -> tuple[str, ...]:
    """Class names in the schema's order: numbers by value first, then text."""

    def key(name: str) -> tuple[int, float, str]:
        value = _number(name)
        return (0, value, name) if value is not None else (1, 0.0, name)

    return tuple(sorted(set(names), key=key))


def check_classes(classes: Sequence[str]) -> str | None:
    """Why a class list received from outside is malformed, or None."""
    if len(classes) > MAX_CLASSES:
        return f"at most {MAX_CLASSES} classes"
    if tuple(classes) != sorted_classes(classes):
        return "classes must be unique and in order (numbers by value, then text)"
    if any(not c or class_name(c) != c for c in classes):
        return "a class name must be a target value as read (stripped, numbers by value)"
    return None
