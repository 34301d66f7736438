"""Synthetic lenders with a multi-class or a numeric target, for measuring those tasks.

The borrowers and their columns are :func:`fedup.learn.loans.generate_lender`'s (same
seed, same rows, same missing values); only the target differs.  Both targets derive
from the borrower's latent risk ``z``: the default log-odds the lender's generator
draws, ``default_logit + N(0, 0.4^2)`` (``logit(true_probability)``), so features
explain most, not all, of them:

* :func:`generate_graded_lender`: ``grade`` in ``A`` / ``B`` / ``C`` (3 classes):
  ``z + N(0, 0.5^2)`` cut at -2.9 and -1.3 (about a third each over a population).
* :func:`generate_priced_lender`: ``interest_rate``, a number (percent, two decimals):
  ``12 + 2.2 z + 0.4 max(z + 1, 0)^2 + N(0, 1.2^2)``, clipped to 1..60.

Each has its own noise generator (seed and a stream of its own), so the same seed gives
the same bytes.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from fedup.learn.loans import COLUMNS, LenderData, generate_lender
from fedup.learn.tabular import Table
from fedup.learn.targets import MULTICLASS, REGRESSION

__all__ = ["GRADE_CUTS", "generate_graded_lender", "generate_priced_lender"]

GRADE_CUTS: Final = (-2.9, -1.3)
"""Latent-risk cut points between grades A | B | C."""


def _latent(data: LenderData) -> np.ndarray:
    p = np.clip(data.true_probability, 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p))


def _with_target(data: LenderData, name: str, cells: list[str], task: str) -> LenderData:
    header = (*COLUMNS[:-1], name)
    rows = tuple((*r[:-1], c) for r, c in zip(data.rows, cells, strict=True))
    table = Table.from_rows(header, rows, name, source=data.table.source, task=task)
    return LenderData(data.profile, header, rows, table, data.true_probability)


def generate_graded_lender(seed: int, n_rows: int | None = None) -> LenderData:
    """Lender ``seed``'s borrowers with a 3-class ``grade`` target (``A`` least risky)."""
    data = generate_lender(seed, n_rows)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    z = _latent(data) + rng.normal(0, 0.5, len(data.rows))
    grade = np.digitize(z, GRADE_CUTS)
    return _with_target(data, "grade", ["ABC"[g] for g in grade], MULTICLASS)


def generate_priced_lender(seed: int, n_rows: int | None = None) -> LenderData:
    """Lender ``seed``'s borrowers with a numeric ``interest_rate`` target (percent)."""
    data = generate_lender(seed, n_rows)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 12]))
    z = _latent(data)
    rate = 12 + 2.2 * z + 0.4 * np.maximum(z + 1, 0) ** 2 + rng.normal(0, 1.2, len(z))
    rate = np.clip(rate, 1.0, 60.0)
    return _with_target(data, "interest_rate", [f"{r:.2f}" for r in rate], REGRESSION)
