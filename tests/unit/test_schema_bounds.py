"""Hostile data summaries: bounds on decode, finite merges at the bounds, and
``admit`` refusing a candidate whose statistics cannot be pooled instead of raising."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.learn.schema import (
    CATEGORICAL,
    NUMERIC,
    ColumnSummary,
    DataSummary,
    PoolingError,
    SchemaMismatchError,
    SummaryError,
    SummaryLimits,
    admit,
    merge_summaries,
    schema_from_dict,
)
from fedup.protocol import cbor

LIM = SummaryLimits()
MAX_MEMBERS = DEFAULT_LIMITS.max_members  # 256: the most summaries a leader merges
MAX_COUNT = 2**53


def num(name: str, count: int, mean: float, m2: float = 0.0, n_missing: int = 0) -> ColumnSummary:
    """A numeric column summary built directly: no bounds are checked."""
    return ColumnSummary(name, NUMERIC, count, n_missing, mean=mean, m2=m2)


def peer(*columns: ColumnSummary, n_rows: int | None = None) -> DataSummary:
    rows = n_rows if n_rows is not None else columns[0].count + columns[0].n_missing
    return DataSummary("y", rows, 0, columns)


def reference(columns: list[ColumnSummary]) -> tuple[float, float]:
    """The pooled mean and std in plain Fraction arithmetic (the documented rule)."""
    cols = [c for c in columns if c.count > 0]
    n = sum(c.count for c in cols)
    mean = sum((c.count * Fraction(c.mean) for c in cols), Fraction(0)) / n
    m2 = sum((Fraction(c.m2) + c.count * (Fraction(c.mean) - mean) ** 2 for c in cols), Fraction(0))
    std = math.sqrt(float(m2 / n))
    return float(mean), (std if std > 0 else 1.0)


def column(summary: DataSummary, name: str) -> ColumnSummary:
    col = summary.column(name)
    assert col is not None
    return col


def decoded(d: dict[str, Any], limits: SummaryLimits | None = None) -> DataSummary:
    """``d`` as a peer would send it: through strict CBOR, then ``from_dict``."""
    wire = cbor.decode(cbor.encode(d), max_size=1 << 20, max_depth=8)
    return DataSummary.from_dict(wire, limits=limits)


# --------------------------------------------------------------------------
# Decode


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mean", 1.7e308, r"field 'mean' must be at most 1e\+100 in magnitude, got 1\.7e\+308"),
        ("mean", -1.0000000000000002e100, r"field 'mean' must be at most 1e\+100 in magnitude"),
        ("mean", 2**64 - 1, None),  # an integer within the bounds is fine
        ("mean", -(2**64), None),
        ("mean", math.inf, r"field 'mean' must be finite"),
        ("m2", 1.0000000000000002e200, r"field 'm2' must be at most 1e\+200"),
        ("m2", 1.7e308, r"field 'm2' must be at most 1e\+200, got 1\.7e\+308"),
        ("m2", math.nan, r"field 'm2' must be finite"),
        ("m2", -1e-300, r"field 'm2' must not be negative"),
    ],
)
def test_decode_bounds_numeric_statistics(field: str, value: float, message: str | None) -> None:
    d = peer(num("x", 3, 1.0, 2.0)).to_dict()
    d["columns"][0][field] = value
    if message is None:
        assert decoded(d).columns[0].mean == float(value)
        return
    if not math.isfinite(value):  # strict CBOR refuses NaN and infinities: skip the wire
        with pytest.raises(SummaryError, match=r"data summary: columns\[0\]: " + message):
            DataSummary.from_dict(d)
        return
    with pytest.raises(SummaryError, match=r"data summary: columns\[0\]: " + message):
        decoded(d)


def test_decode_refuses_numbers_too_large_for_a_float() -> None:
    d = peer(num("x", 3, 1.0, 2.0)).to_dict()
    d["columns"][0]["mean"] = 10**400  # only a Python caller can pass this; CBOR ints are 64-bit
    with pytest.raises(SummaryError, match=r"field 'mean' must be finite"):
        DataSummary.from_dict(d)


def test_bounds_are_inclusive_and_configurable() -> None:
    at = peer(num("x", MAX_COUNT, -LIM.max_abs_mean, LIM.max_m2)).to_dict()
    assert decoded(at).columns[0] == num("x", MAX_COUNT, -1e100, 1e200)
    tight = SummaryLimits(max_abs_mean=10.0, max_m2=100.0)
    with pytest.raises(SummaryError, match=r"columns\[0\]: field 'mean' must be at most 10 "):
        decoded(peer(num("x", 3, 10.5, 2.0)).to_dict(), tight)
    with pytest.raises(SummaryError, match=r"columns\[1\]: field 'm2' must be at most 100, "):
        decoded(peer(num("a", 3, 1.0), num("x", 3, 1.0, 101.0)).to_dict(), tight)


def test_the_other_sizes_are_bounded_too() -> None:
    """Counts, category lists and texts were already bounded; the attack's neighbours."""
    base = peer(num("x", 3, 1.0, 2.0)).to_dict()
    cases: list[tuple[Any, str]] = [
        ({"count": MAX_COUNT + 1, "n_missing": 0}, "between 0 and 9007199254740992"),
        ({"n_missing": MAX_COUNT + 1}, "between 0 and 9007199254740992"),
        ({"name": "x" * (LIM.max_text + 1)}, "at most 128 bytes"),
    ]
    for change, message in cases:
        d = {**base, "columns": [{**base["columns"][0], **change}]}
        with pytest.raises(SummaryError, match=message):
            decoded(d)
    cat = ColumnSummary("c", CATEGORICAL, 3, 0, categories=(("a", 3),)).to_dict()
    for categories, message in [
        ([["a", MAX_COUNT + 1]], "count must be positive"),
        ([["v" * (LIM.max_text + 1), 3]], "value must be 1 to 128 bytes"),
        ([[f"v{i}", 1] for i in range(LIM.max_categories + 1)], "0 to 64 items"),
    ]:
        d = {**base, "columns": [{**cat, "categories": categories}]}
        with pytest.raises(SummaryError, match=message):
            decoded(d)
    many = {**base, "columns": [num(f"c{i}", 3, 0.0).to_dict() for i in range(1025)]}
    with pytest.raises(SummaryError, match="0 to 1024 items"):
        decoded(many)


# --------------------------------------------------------------------------
# Merging at the bounds


def test_256_summaries_at_the_bounds_merge_to_finite_statistics() -> None:
    """Every summary at the extreme: the most rows, the largest means of both signs,
    the largest sums of squared deviations; the pooled statistics stay finite and exact."""
    big, m2 = LIM.max_abs_mean, LIM.max_m2
    per_category = MAX_COUNT // LIM.max_categories
    cats = tuple((f"v{i:02d}", per_category) for i in range(LIM.max_categories))
    summaries = []
    for k in range(MAX_MEMBERS):
        sign = 1.0 if k % 2 else -1.0
        cols = [
            num("spread", MAX_COUNT, sign * big, m2),  # deviations as large as they get
            num("lopsided", MAX_COUNT, big if k == 0 else -big, m2),
            num("tiny", MAX_COUNT, sign * 5e-324 * (k + 1), 5e-324),  # denominators 2**1074
            ColumnSummary("c", CATEGORICAL, MAX_COUNT, 0, categories=cats),
        ]
        d = DataSummary("y", MAX_COUNT, MAX_COUNT, tuple(cols)).to_dict()
        summaries.append(decoded(d))  # within the bounds: decode accepts it
    schema = merge_summaries(summaries, "y")
    assert schema.n_rows == MAX_MEMBERS * MAX_COUNT
    for name in ("spread", "lopsided", "tiny"):
        col = schema.column(name)
        assert col is not None
        assert math.isfinite(col.mean) and math.isfinite(col.std) and col.std > 0
        assert (col.mean, col.std) == reference([column(s, name) for s in summaries])
    spread = schema.column("spread")
    assert spread is not None and spread.mean == 0.0
    assert math.isclose(spread.std, math.sqrt(1e200 * (1 + 1 / MAX_COUNT)), rel_tol=1e-15)
    # Every member accepts the merged schema (n_rows is 2**61, above one summary's cap).
    wire = cbor.decode(cbor.encode(schema.to_dict()), max_size=1 << 20, max_depth=8)
    assert schema_from_dict(wire) == schema
    result = admit(summaries, "y")
    assert result.admitted == tuple(range(MAX_MEMBERS)) and not result.refused
    assert result.schema == schema


def test_schema_from_dict_bounds_pooled_counts_by_the_number_of_summaries() -> None:
    schema = merge_summaries([peer(num("x", 3, 1.0))], "y").to_dict()
    assert schema_from_dict({**schema, "n_rows": MAX_COUNT, "n_positive": 0}).n_rows == MAX_COUNT
    with pytest.raises(SummaryError, match="field 'n_rows' must be between 0 and"):
        schema_from_dict({**schema, "n_rows": MAX_COUNT + 1})
    two = {**schema, "n_summaries": 2, "n_rows": 2 * MAX_COUNT, "n_positive": 2 * MAX_COUNT}
    assert schema_from_dict(two).n_rows == 2 * MAX_COUNT


finite_in_bounds = st.floats(min_value=-LIM.max_abs_mean, max_value=LIM.max_abs_mean)
m2_in_bounds = st.floats(min_value=0.0, max_value=LIM.max_m2)
column_in_bounds = st.builds(
    lambda count, mean, m2: num("x", count, mean if count else 0.0, m2 if count else 0.0),
    st.integers(0, MAX_COUNT),
    finite_in_bounds,
    m2_in_bounds,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(column_in_bounds, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_pooling_within_bounds_is_exact_finite_and_order_independent(
    columns: list[ColumnSummary], rnd: Any
) -> None:
    summaries = [peer(c) for c in columns]
    schema = merge_summaries(summaries, "y")
    col = schema.column("x")
    assert col is not None
    if any(c.count for c in columns):
        assert (col.mean, col.std) == reference(columns)
    assert math.isfinite(col.mean) and math.isfinite(col.std) and col.std > 0
    rnd.shuffle(summaries)
    assert merge_summaries(summaries, "y").digest() == schema.digest()


# --------------------------------------------------------------------------
# admit: a candidate's statistics never crash the leader


def honest() -> list[DataSummary]:
    return [
        peer(num("x", 4, 1.5, 5.0), num("z", 4, -3.0, 1.0)),
        peer(num("x", 2, 4.5, 0.5), num("z", 2, 0.0, 0.0)),
        peer(num("x", 3, -1.0, 2.0), num("z", 3, 7.0, 3.0)),
    ]


HOSTILE = {
    "the attack": num("x", 1, 1.7e308),
    "huge m2 and mean": num("x", 1, -1e200, 1.7e308),
    "nan mean": num("x", 1, math.nan),
    "infinite mean": num("x", 1, -math.inf),
    "infinite m2": num("x", 1, 0.0, math.inf),
    "negative m2": num("x", 1, 0.0, -1e300),
    "max count with 1e200": num("x", MAX_COUNT, 1e200),
}


@pytest.mark.parametrize("position", [1, 2, 3])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_admit_refuses_a_hostile_candidate_and_admits_the_others(kind: str, position: int) -> None:
    # Built directly (not decoded), so the decode bounds cannot stop it.
    bad = peer(HOSTILE[kind], num("z", HOSTILE[kind].count, 1.0))
    others = honest()
    summaries = [*others[:position], bad, *others[position:]]
    with pytest.raises(PoolingError, match="column 'x'") as raised:
        merge_summaries(summaries, "y")  # what used to kill the leader, now named
    assert raised.value.column == "x"
    result = admit(summaries, "y")  # must not raise
    assert list(result.refused) == [position]
    reason = result.refused[position].reason
    assert "'x'" in reason and "cannot be pooled" in reason and "finite" in reason
    assert result.admitted == tuple(i for i in range(len(summaries)) if i != position)
    assert result.schema == merge_summaries(others, "y")


def test_the_attack_is_refused_with_its_numbers() -> None:
    summaries = [*honest(), peer(num("x", 1, 1.7e308), num("z", 1, 0.0))]
    result = admit(summaries, "y")
    reason = result.refused[3].reason
    assert reason.startswith("the statistics of column 'x' (mean 1.7e+308, sum of squared")
    assert "together with the leader's" in reason
    assert isinstance(result.refused[3], SchemaMismatchError)
    assert isinstance(result.refused[3].__cause__, PoolingError)


def test_candidates_that_overflow_only_together_are_refused_not_the_honest_ones() -> None:
    """Each pools with the leader, but not with each other: the later one is refused,
    and an honest peer after both is admitted."""
    leader = peer(num("x", 10, 0.0))
    up = peer(num("x", MAX_COUNT, 1.5e154))
    down = peer(num("x", MAX_COUNT, -1.5e154))
    fine = peer(num("x", 5, 2.0, 1.0))
    merge_summaries([leader, up], "y")
    merge_summaries([leader, down], "y")
    with pytest.raises(PoolingError):
        merge_summaries([leader, up, down], "y")
    result = admit([leader, up, down, fine], "y")
    assert result.admitted == (0, 1, 3) and list(result.refused) == [2]
    assert "together with the others" in result.refused[2].reason
    assert result.schema == merge_summaries([leader, up, fine], "y")
    swapped = admit([leader, down, up, fine], "y")
    assert swapped.admitted == (0, 1, 3) and list(swapped.refused) == [2]


@pytest.mark.parametrize("kind", ["the attack", "nan mean", "negative m2", "infinite m2"])
def test_the_leaders_own_bad_summary_raises(kind: str) -> None:
    bad = peer(HOSTILE[kind], num("z", HOSTILE[kind].count, 1.0))
    with pytest.raises(PoolingError, match="column 'x'") as raised:
        admit([bad, *honest()], "y")
    assert isinstance(raised.value, SummaryError)
    if kind == "the attack":  # pools on its own, so it is judged by the bounds
        assert "my own summary is out of bounds" in raised.value.reason


def test_once_the_leader_is_refused_the_first_summary_within_bounds_is_the_reference() -> None:
    """Pooling can fail only after a refusal: the leader's many rows dilute two hostile
    means; without it they overflow.  The first honest summary then judges them."""
    leader = DataSummary("label", MAX_COUNT, 0, (num("x", MAX_COUNT, 0.0),))  # wrong target
    up, down = peer(num("x", 1, 1e160)), peer(num("x", 1, -1e160))
    summaries = [leader, up, down, peer(num("x", 4, 1.5, 5.0)), peer(num("x", 2, 4.5, 0.5))]
    merge_summaries(summaries, "y")
    result = admit(summaries, "y")
    assert sorted(result.refused) == [0, 1, 2] and result.admitted == (3, 4)
    assert result.refused[0].target
    for i in (1, 2):
        assert "cannot be pooled together with summary 3's" in result.refused[i].reason


def test_pooling_error_keeps_its_column_when_naming_the_peer() -> None:
    err = PoolingError("no", column="x").with_peer("12D3KooWpeer")
    assert err.column == "x" and err.peer == "12D3KooWpeer" and str(err) == "12D3KooWpeer: no"


any_float = st.floats(allow_nan=True, allow_infinity=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, MAX_COUNT), any_float, any_float), min_size=1, max_size=6),
)
def test_admit_never_raises_for_candidates_and_never_refuses_those_within_bounds(
    stats: list[tuple[int, float, float]],
) -> None:
    leader = peer(num("x", 7, 3.0, 10.0))
    candidates = [peer(num("x", count, mean, m2)) for count, mean, m2 in stats]
    result = admit([leader, *candidates], "y")
    assert result.admitted[0] == 0
    for i, (_, mean, m2) in enumerate(stats, start=1):
        within = abs(mean) <= LIM.max_abs_mean and 0 <= m2 <= LIM.max_m2
        if within:
            assert i in result.admitted
        else:
            assert (i in result.admitted) != (i in result.refused)
    col = result.schema.column("x")
    assert col is not None and math.isfinite(col.mean) and math.isfinite(col.std)
    admitted = [([leader, *candidates])[i] for i in result.admitted]
    assert result.schema == merge_summaries(admitted, "y")
