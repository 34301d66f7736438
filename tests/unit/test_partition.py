"""``partition(tables, "column:NAME", n_peers)``: a column's values, one peer each or grouped."""

from __future__ import annotations

import numpy as np
import pytest

from fedup.learn.loans import generate_lender, group_by_rows, lender_seed, partition
from fedup.learn.tabular import DataError, Table
from fedup.sim import data as sim_data


def lenders(n: int = 3, seed: int = 2) -> list[Table]:
    return [generate_lender(lender_seed(seed, i), 300).table for i in range(n)]


def values_of(table: Table, name: str) -> set[str]:
    col = table.column(name)
    if col.kind == "categorical":
        return {str(v) for v in col.values}
    return {"nan" if np.isnan(v) else str(v) for v in col.values.tolist()}


def test_grouped_values_are_balanced_deterministic_and_each_in_one_peer() -> None:
    tables = lenders()
    by_value = partition(tables, "column:purpose")
    assert len(by_value) == 8
    three = partition(tables, "column:purpose", 3)
    assert len(three) == 3
    held = [values_of(t, "purpose") for t in three]
    assert sum(len(v) for v in held) == 8  # each value in exactly one peer
    assert set().union(*held) == set().union(*(values_of(t, "purpose") for t in by_value))
    assert sum(t.n_rows for t in three) == 900  # no row lost
    sizes = [t.n_rows for t in by_value]
    assert max(t.n_rows for t in three) <= 900 / 3 + max(sizes)  # the greedy bound
    # The largest value first, each to the peer with the fewest rows so far.
    groups = group_by_rows(sizes, 3)
    assert [t.n_rows for t in three] == [sum(sizes[i] for i in g) for g in groups]
    again = partition(tables, "column:purpose", 3)
    assert [t.source for t in again] == [t.source for t in three]
    assert all(np.array_equal(a.target, b.target) for a, b in zip(again, three, strict=True))
    # A peer's rows keep the pooled order.
    pooled = Table.concat(tables)
    first = three[0].column("age").values
    assert np.array_equal(first, pooled.column("age").values[np.isin(
        pooled.column("purpose").values, sorted(held[0]))])  # fmt: skip


def test_grouped_peers_are_named_by_their_values_and_long_lists_are_cut() -> None:
    tables = lenders()
    two = partition(tables, "column:region", 2)
    for t in two:
        shown = t.source.removeprefix("region=").split("+")
        assert sorted(shown) == shown == sorted(values_of(t, "region"))
    scores = partition(tables, "column:credit_score", 2)
    for t in scores:
        n = len(values_of(t, "credit_score"))
        assert n > 4
        assert t.source.startswith("credit_score=") and t.source.endswith(f" and {n - 4} more")
        assert t.source.count("+") == 3


def test_more_peers_than_values_is_one_clear_error() -> None:
    with pytest.raises(DataError) as caught:
        partition(lenders(), "column:region", 6)
    assert str(caught.value) == (
        "partition column:region has 5 values, too few for 6 peers: ask for at most 5, "
        "or leave the number of peers out for one peer per value"
    )
    with pytest.raises(DataError, match="too few for 0 peers"):
        partition(lenders(), "column:region", 0)
    assert len(partition(lenders(), "column:region", 5)) == 5


def test_missing_values_are_a_group_of_their_own() -> None:
    header = ("branch", "income", "default")
    rows = [("a", "10", "0"), ("", "", "1"), ("b", "20", "0"), ("", "30", "1"), ("a", "", "0")]
    rows = rows * 4
    table = Table.from_rows(header, rows, "default")
    for name, present in (("branch", ["a", "b"]), ("income", ["10.0", "20.0", "30.0"])):
        per_value = partition([table], f"column:{name}")
        assert [t.source for t in per_value] == [
            *(f"{name}={v}" for v in present),
            f"{name}=(missing)",
        ]
        assert sum(t.n_rows for t in per_value) == table.n_rows  # no row lost
        assert per_value[-1].n_rows == 8
    # Numeric missing values are NaN: they too are one group, dealt like any value.
    two = partition([table], "column:income", 2)
    assert sum(t.n_rows for t in two) == 20
    # Missing (8 rows) -> peer 0; 10 (4) -> peer 1; 20 (4) -> peer 1 (4 < 8); 30 (4): a tie
    # at 8, the lower peer.
    assert [t.source for t in two] == ["income=30.0+(missing)", "income=10.0+20.0"]


def test_the_simulator_deals_a_column_the_same_way() -> None:
    grouped = partition(lenders(), "column:region", 3)
    simulated = sim_data.synthetic_tables(3, "column:region", seed=2, n_rows=300)
    assert [values_of(t, "region") for t in grouped] == [values_of(t, "region") for t in simulated]
    assert [t.n_rows for t in grouped] == [t.n_rows for t in simulated]
