"""A synthetic loan-default data set: each seed is a different lender.

Every lender shares one ground truth, the probability that a borrower
defaults given who they are and what they borrow (:func:`default_logit`,
documented in ``docs/learning.md``), but each has its own customers: its
regions, product mix, income and credit-score distributions, term lengths and
record-keeping habits differ, so its default rate differs too and the peers'
data are naturally not identically distributed.  Everything is deterministic
in the seed (numpy's PCG64), and :meth:`LenderData.write_csv` writes the same
bytes for the same seed.

Columns (``default`` is the target)::

    region            categorical  north / south / east / west / central
    age               numeric      years
    income            numeric      yearly, currency units (some missing)
    employment_years  numeric      0..40 (missing for some, more often for risky borrowers)
    home_ownership    categorical  RENT / MORTGAGE / OWN / OTHER
    purpose           categorical  debt_consolidation, credit_card, home_improvement, car,
                                   small_business, medical, education, other
    loan_amount       numeric      currency units
    term              categorical  "36 months" / "60 months"
    credit_score      numeric      300..850 (missing for thin files)
    debt_to_income    numeric      percent of income already going to debt (some missing)
    delinquencies_2y  numeric      late payments in the last two years (some lenders omit it)
    default           target       1 = the loan defaulted (spelled 0/1, no/yes or false/true)

:func:`generate_population` makes many lenders at once, and :func:`partition`
re-splits pooled rows for experiments: ``lender`` (one peer per lender),
``iid``, ``dirichlet:ALPHA`` (label skew) and ``column:NAME`` (one peer per
value of a column, or the values grouped into a number of peers).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Sequence
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt

from fedup.files import write_atomic
from fedup.learn.tabular import DataError, Table

__all__ = [
    "COLUMNS",
    "LenderData",
    "LenderProfile",
    "default_logit",
    "generate_lender",
    "generate_population",
    "group_by_rows",
    "lender_seed",
    "partition",
    "seed_from_peer_id",
]

F64 = npt.NDArray[np.float64]

COLUMNS: Final = (
    "region", "age", "income", "employment_years", "home_ownership", "purpose",
    "loan_amount", "term", "credit_score", "debt_to_income", "delinquencies_2y", "default",
)  # fmt: skip
REGIONS: Final = ("north", "south", "east", "west", "central")
HOMES: Final = ("RENT", "MORTGAGE", "OWN", "OTHER")
PURPOSES: Final = (
    "debt_consolidation", "credit_card", "home_improvement", "car",
    "small_business", "medical", "education", "other",
)  # fmt: skip

# Ground truth effects (log-odds), shared by every lender.
REGION_EFFECT: Final = {"north": -0.10, "south": 0.20, "east": -0.05, "west": 0.0, "central": 0.10}
HOME_EFFECT: Final = {"RENT": 0.30, "MORTGAGE": 0.0, "OWN": -0.20, "OTHER": 0.45}
PURPOSE_EFFECT: Final = {
    "debt_consolidation": 0.15, "credit_card": 0.0, "home_improvement": -0.15, "car": -0.25,
    "small_business": 0.70, "medical": 0.35, "education": 0.30, "other": 0.25,
}  # fmt: skip
INTERCEPT: Final = -2.6
NOISE_SD: Final = 0.4
"""Unobserved borrower heterogeneity added to the log-odds: no model can explain it."""

# Lender archetypes: (name, region concentration, purpose weights, income median,
# credit-score mean, credit-score sd, renters' share, 60-month share, missing rate).
_ARCHETYPES: Final = (
    ("prime bank", 2.0, (3, 3, 3, 1, 1, 0.5, 0.5, 1), 85_000, 728, 45, 0.25, 0.20, 0.02),
    ("credit union", 0.4, (3, 2, 2, 3, 0.5, 1, 1, 1), 60_000, 705, 50, 0.35, 0.25, 0.05),
    ("online lender", 5.0, (6, 4, 1, 0.5, 0.5, 1, 1, 1), 62_000, 668, 60, 0.50, 0.45, 0.04),
    ("subprime lender", 1.0, (3, 1, 0.5, 2, 0.5, 2, 1, 2), 42_000, 612, 55, 0.65, 0.50, 0.10),
    ("business lender", 1.0, (1, 1, 1, 0.5, 6, 0.2, 0.3, 1), 78_000, 695, 50, 0.30, 0.40, 0.06),
    ("auto lender", 0.7, (0.5, 0.5, 0.5, 8, 0.3, 0.3, 0.3, 0.5), 55_000, 680, 60, 0.45, 0.55, 0.03),
)  # fmt: skip
_REGION_INCOME: Final = {"north": 1.10, "south": 0.85, "east": 1.15, "west": 1.20, "central": 0.90}
_PURPOSE_SIZE: Final = {  # median loan amount as a fraction of income
    "debt_consolidation": 0.25, "credit_card": 0.18, "home_improvement": 0.30, "car": 0.35,
    "small_business": 0.50, "medical": 0.12, "education": 0.25, "other": 0.15,
}  # fmt: skip
_TARGET_SPELLINGS: Final = (("0", "1"), ("no", "yes"), ("false", "true"))
_MISSING_SPELLINGS: Final = ("", "NA", "null")


@attrs.frozen
class LenderProfile:
    """Who a lender's customers are (drawn from the seed)."""

    seed: int
    archetype: str
    n_rows: int
    region_weights: tuple[float, ...]
    """Probabilities of :data:`REGIONS`."""
    purpose_weights: tuple[float, ...]
    """Probabilities of :data:`PURPOSES`."""
    income_median: float
    credit_mean: float
    credit_sd: float
    renter_share: float
    long_term_share: float
    missing_rate: float
    records_delinquencies: bool
    """False for a lender that does not record ``delinquencies_2y`` (always missing)."""
    target_spelling: tuple[str, str]
    missing_spelling: str


@attrs.frozen(eq=False)
class LenderData:
    """One lender's rows: the CSV text cells and the parsed :class:`~fedup.learn.tabular.Table`."""

    profile: LenderProfile
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    table: Table
    true_probability: F64
    """The ground-truth default probability of each row (for evaluation only)."""

    def csv_bytes(self) -> bytes:
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(self.header)
        w.writerows(self.rows)
        return out.getvalue().encode("utf-8")

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the rows as a CSV file (same seed, same bytes), mode 0600.

        The file is replaced atomically (:func:`fedup.files.write_atomic`): a
        symbolic link at ``path`` is replaced, not followed.
        """
        write_atomic(path, self.csv_bytes())


def seed_from_peer_id(peer_id: str) -> int:
    """A lender seed derived from a peer ID (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(peer_id.encode("utf-8")).digest()[:8], "big")


def lender_seed(population_seed: int, index: int) -> int:
    """The seed of lender ``index`` of a population."""
    return int(np.random.SeedSequence([population_seed, index]).generate_state(1, np.uint64)[0])


def _profile(seed: int, n_rows: int | None) -> LenderProfile:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    name, conc, purposes, income, cmean, csd, renters, long_share, miss = _ARCHETYPES[
        int(rng.integers(len(_ARCHETYPES)))
    ]
    home = int(rng.integers(len(REGIONS)))
    alpha = np.full(len(REGIONS), conc)
    alpha[home] += 3.0 * conc + 1.0
    regions = rng.dirichlet(alpha)
    purpose = rng.dirichlet(np.array(purposes) * 4.0)
    return LenderProfile(
        seed=seed,
        archetype=name,
        n_rows=int(n_rows if n_rows is not None else rng.integers(1500, 5001)),
        region_weights=tuple(float(w) for w in regions),
        purpose_weights=tuple(float(w) for w in purpose),
        income_median=float(income * np.exp(rng.normal(0, 0.12))),
        credit_mean=float(cmean + rng.normal(0, 8)),
        credit_sd=float(csd * np.exp(rng.normal(0, 0.1))),
        renter_share=float(np.clip(renters + rng.normal(0, 0.05), 0.05, 0.9)),
        long_term_share=float(np.clip(long_share + rng.normal(0, 0.05), 0.05, 0.9)),
        missing_rate=float(miss * np.exp(rng.normal(0, 0.2))),
        records_delinquencies=bool(rng.random() > 0.15),
        target_spelling=_TARGET_SPELLINGS[int(rng.integers(len(_TARGET_SPELLINGS)))],
        missing_spelling=_MISSING_SPELLINGS[int(rng.integers(len(_MISSING_SPELLINGS)))],
    )


def default_logit(f: dict[str, Any]) -> F64:
    """The ground-truth log-odds of default, without the noise term.

    ``f`` maps column names to arrays of true values (numbers as float64,
    categories as strings; nothing missing).  The mechanism is the same for
    every lender; see ``docs/learning.md`` for the formula.
    """
    cs = (f["credit_score"] - 680.0) / 50.0
    dti = f["debt_to_income"]
    lti = np.log(f["loan_amount"] / f["income"] / 0.25)  # loan-to-income, 0 at a quarter
    emp = f["employment_years"]
    long_term = f["term"] == "60 months"
    renter = f["home_ownership"] == "RENT"
    z = (
        INTERCEPT
        - 0.85 * cs
        + 0.25 * np.maximum(0.0, -cs) ** 2
        + 0.035 * (dti - 18.0)
        + 0.002 * np.maximum(0.0, dti - 35.0) ** 2
        + 0.02 * np.maximum(0.0, -cs) * (dti - 18.0)
        + 0.9 * lti
        - 0.35 * np.log(f["income"] / 55_000.0)
        - 0.09 * np.minimum(emp, 10.0)
        + 0.35 * (emp < 1.0)
        + 0.40 * long_term
        + 0.50 * long_term * np.maximum(0.0, lti)
        + 0.30 * np.minimum(f["delinquencies_2y"], 4.0)
        + 0.15 * ((f["age"] - 45.0) / 15.0) ** 2
        + 0.30 * (f["purpose"] == "small_business") * renter
    )
    z = z + _lookup(f["region"], REGION_EFFECT) + _lookup(f["home_ownership"], HOME_EFFECT)
    return np.asarray(z + _lookup(f["purpose"], PURPOSE_EFFECT), dtype=np.float64)


def _lookup(values: npt.NDArray[Any], effect: dict[str, float]) -> F64:
    keys = np.array(sorted(effect))
    at = np.searchsorted(keys, values).clip(0, len(keys) - 1)
    if not (keys[at] == values).all():
        raise KeyError(f"no effect for {sorted(set(values.tolist()) - set(effect))[:4]}")
    table: F64 = np.array([effect[k] for k in keys.tolist()], dtype=np.float64)
    return np.asarray(table[at], dtype=np.float64)


def _borrowers(p: LenderProfile, rng: np.random.Generator) -> dict[str, Any]:
    n = p.n_rows
    region = np.array(REGIONS)[rng.choice(len(REGIONS), n, p=p.region_weights)]
    age = np.clip(np.round(rng.normal(42, 12, n)), 21, 75)
    income_mult = _lookup(region, _REGION_INCOME)
    log_income = (
        np.log(p.income_median * income_mult)
        + 0.012 * (np.minimum(age, 55) - 40)
        + rng.normal(0, 0.5, n)
    )
    income = np.round(np.exp(log_income), -2).clip(8_000, 1_000_000)
    emp = np.minimum(np.floor(rng.gamma(1.6, 4.0, n)), np.maximum(age - 18, 0)).clip(0, 40)
    young = (age < 30).astype(float)
    home_logits = np.stack(
        [
            np.full(n, np.log(p.renter_share)) + 0.8 * young,
            np.full(n, np.log(0.9 * (1 - p.renter_share))) + 0.02 * (age - 40) - young,
            np.full(n, np.log(0.3 * (1 - p.renter_share))) + 0.04 * (age - 40),
            np.full(n, np.log(0.03)),
        ],
        axis=1,
    )
    home = np.array(HOMES)[_categorical(rng, home_logits)]
    credit = np.round(
        rng.normal(p.credit_mean, p.credit_sd, n) + 1.5 * (np.minimum(emp, 15) - 5)
    ).clip(300, 850)
    purpose = np.array(PURPOSES)[rng.choice(len(PURPOSES), n, p=p.purpose_weights)]
    size = _lookup(purpose, _PURPOSE_SIZE)
    amount = np.round(income * size * np.exp(rng.normal(0, 0.45, n)), -2).clip(1_000, 100_000)
    p_long = 1 / (
        1
        + np.exp(
            -(np.log(p.long_term_share / (1 - p.long_term_share)) + 1.2 * np.log(amount / 15_000))
        )
    )
    term = np.where(rng.random(n) < p_long, "60 months", "36 months")
    dti = np.round(
        np.clip(rng.normal(17, 8, n) + 0.03 * (p.credit_mean - credit) + 4 * young, 0, 60), 1
    )
    delinq = rng.poisson(0.15 * np.exp(np.clip((660 - credit) / 60, -3, 3)))
    return {
        "region": region, "age": age, "income": income, "employment_years": emp,
        "home_ownership": home, "purpose": purpose, "loan_amount": amount, "term": term,
        "credit_score": credit, "debt_to_income": dti, "delinquencies_2y": delinq.astype(float),
    }  # fmt: skip


def _categorical(rng: np.random.Generator, logits: F64) -> npt.NDArray[np.intp]:
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    picked = np.minimum((rng.random((len(logits), 1)) > cdf).sum(axis=1), logits.shape[1] - 1)
    return np.asarray(picked, dtype=np.intp)


def _format(values: F64, spec: str) -> npt.NDArray[np.str_]:
    """``spec % v`` for each value; whole numbers as integers' text (the same, faster)."""
    whole = (
        spec == "%.0f"
        and bool(np.isfinite(values).all())
        and bool((np.abs(values) < 2.0**53).all())
        and bool((values == np.round(values)).all())
        and not bool((np.signbit(values) & (values == 0)).any())
    )
    return values.astype(np.int64).astype(np.str_) if whole else np.char.mod(spec, values)


def generate_lender(seed: int, n_rows: int | None = None) -> LenderData:
    """One lender's loan book, deterministic in ``seed``.

    ``n_rows`` defaults to a size drawn from the seed (1,500 to 5,000).
    Missing values are spelled the lender's way (empty, ``NA`` or ``null``)
    and the target too (0/1, no/yes, false/true).
    """
    p = _profile(seed, n_rows)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    f = _borrowers(p, rng)
    prob = 1.0 / (1.0 + np.exp(-(default_logit(f) + rng.normal(0, NOISE_SD, p.n_rows))))
    y = rng.random(p.n_rows) < prob
    # What the lender failed to record; employment is omitted more often by risky borrowers.
    n = p.n_rows
    miss = {
        "income": rng.random(n) < 0.3 * p.missing_rate,
        "employment_years": rng.random(n) < p.missing_rate * (1 + 2 * (f["employment_years"] < 1)),
        "credit_score": rng.random(n) < p.missing_rate * (1 + 2 * (f["age"] < 25)),
        "debt_to_income": rng.random(n) < 0.5 * p.missing_rate,
        "delinquencies_2y": (
            rng.random(n) < p.missing_rate if p.records_delinquencies else np.ones(n, bool)
        ),
    }
    fmt = {"debt_to_income": "%.1f"}
    cells: list[list[str]] = []
    for name in COLUMNS[:-1]:
        values = np.asarray(f[name])
        text = values if values.dtype.kind == "U" else _format(values, fmt.get(name, "%.0f"))
        m = miss.get(name)
        if m is not None:
            text = np.where(m, p.missing_spelling, text)
        cells.append(text.tolist())
    no, yes = p.target_spelling
    cells.append([yes if t else no for t in y])
    rows = tuple(tuple(r) for r in zip(*cells, strict=True))
    table = Table.from_rows(COLUMNS, rows, "default", source=f"lender {seed}")
    return LenderData(p, COLUMNS, rows, table, prob)


def generate_population(
    n_lenders: int, seed: int = 0, n_rows: int | None = None
) -> list[LenderData]:
    """``n_lenders`` different lenders, lender ``i`` seeded by :func:`lender_seed`."""
    return [generate_lender(lender_seed(seed, i), n_rows) for i in range(n_lenders)]


def partition(
    tables: Sequence[Table],
    spec: str,
    n_peers: int | None = None,
    *,
    seed: int = 0,
    min_rows: int = 50,
) -> list[Table]:
    """Split the rows of ``tables`` among peers according to ``spec``.

    * ``lender``: the tables as they are, one peer each (the natural split).
    * ``iid``: all rows shuffled and dealt evenly to ``n_peers`` peers.
    * ``dirichlet:ALPHA``: label skew; each label's rows are divided among
      ``n_peers`` peers in proportions drawn from Dirichlet(ALPHA), redrawn
      until every peer has at least ``min_rows`` rows.
    * ``column:NAME``: the rows by the value of column NAME (missing values,
      empty or NaN, form their own group).  ``n_peers`` None: one peer per value,
      in sorted order.  A number: the values grouped into that many peers,
      balancing rows (:func:`group_by_rows`); each peer is named by the values it
      holds (``NAME=a+b+c``, a long list cut after :data:`NAMED_VALUES` with the
      count of the rest).  More peers than values is a :class:`DataError`.

    Raises :class:`~fedup.learn.tabular.DataError` for an unknown spec.
    """
    if spec == "lender":
        return list(tables)
    pooled = Table.concat(tables)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    kind, _, arg = spec.partition(":")
    if kind == "column":
        return _by_column(pooled, spec, arg, n_peers)
    if not (kind == "iid" and not arg) and kind != "dirichlet":
        raise DataError(f"unknown partition {spec!r} (lender, iid, dirichlet:ALPHA, column:NAME)")
    alpha = 0.0
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise DataError(f"partition {spec!r}: ALPHA must be a number") from None
        if not alpha > 0:
            raise DataError(f"partition {spec!r}: ALPHA must be positive")
    if n_peers is None or n_peers < 1:
        raise DataError(f"partition {spec!r} needs n_peers >= 1")
    if kind == "dirichlet" and pooled.task != "binary":
        raise DataError(
            f"partition {spec!r} deals a binary target's two labels; the target is "
            f"{pooled.task}: use iid or column:NAME"
        )
    if kind == "iid":
        parts = np.array_split(rng.permutation(pooled.n_rows), n_peers)
    else:
        parts = _dirichlet(pooled.target, n_peers, alpha, rng, min_rows)
    return [_named(pooled.take(np.sort(p)), f"peer {i}") for i, p in enumerate(parts)]


NAMED_VALUES: Final = 4
"""Values a grouped ``column:NAME`` peer's name lists before it says how many more."""


def _by_column(pooled: Table, spec: str, name: str, n_peers: int | None) -> list[Table]:
    """The rows of each value of column ``name`` (missing last), or those values dealt
    into ``n_peers`` peers by rows."""
    col = pooled.column(name)
    if col.kind == "categorical":
        values = col.values.astype(str)
        missing = values == ""
    else:
        values = col.values
        missing = np.isnan(values)
    keys = np.unique(values[~missing])
    texts = [str(k) for k in keys.tolist()]
    rows = [np.flatnonzero(values == k) for k in keys]
    if missing.any():
        texts.append("(missing)")
        rows.append(np.flatnonzero(missing))
    if n_peers is None:
        return [_named(pooled.take(r), f"{name}={t}") for t, r in zip(texts, rows, strict=True)]
    if not 1 <= n_peers <= len(rows):
        raise DataError(
            f"partition {spec} has {len(rows)} values, too few for {n_peers} peers: ask "
            f"for at most {len(rows)}, or leave the number of peers out for one peer per value"
        )
    return [
        _named(
            pooled.take(np.sort(np.concatenate([rows[i] for i in g]))),
            _group_name(name, [texts[i] for i in g]),
        )
        for g in group_by_rows([len(r) for r in rows], n_peers)
    ]


def _group_name(name: str, texts: Sequence[str]) -> str:
    """``NAME=a+b+c``; past :data:`NAMED_VALUES` values, ``NAME=a+b+c+d and 7 more``."""
    shown = "+".join(texts[:NAMED_VALUES])
    rest = len(texts) - NAMED_VALUES
    return f"{name}={shown}" + (f" and {rest} more" if rest > 0 else "")


def group_by_rows(sizes: Sequence[int], n_groups: int) -> list[list[int]]:
    """The indices of ``sizes`` dealt into ``n_groups`` groups of similar total size.

    Largest first (ties: the lower index first), each index goes to the group with
    the smallest total so far (ties: the lower group); every group gets at least one
    index, each index lands in exactly one group, and the same input gives the same
    groups.  Each group lists its indices in ascending order.  No group's total exceeds
    the mean total by more than the largest size (greedy "longest processing time
    first" scheduling).

    Raises :class:`ValueError` if ``n_groups`` is not between 1 and ``len(sizes)``.
    """
    if not 1 <= n_groups <= len(sizes):
        raise ValueError(f"cannot deal {len(sizes)} sizes into {n_groups} non-empty groups")
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    totals = [0] * n_groups
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(n_groups), key=lambda g: (totals[g], g))
        groups[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in groups]


def _dirichlet(
    y: npt.NDArray[np.int8], n_peers: int, alpha: float, rng: np.random.Generator, min_rows: int
) -> list[npt.NDArray[np.intp]]:
    for _ in range(1000):
        parts: list[list[npt.NDArray[np.intp]]] = [[] for _ in range(n_peers)]
        for label in (0, 1):
            idx = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(n_peers, alpha)))[:-1] * len(idx)).astype(int)
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if min(len(p) for p in out) >= min_rows:
            return out
    raise DataError(f"dirichlet:{alpha} cannot give {n_peers} peers {min_rows} rows each")


def _named(table: Table, source: str) -> Table:
    return attrs.evolve(table, source=source)
