"""The simulator's partitions: ``column:NAME`` values grouped into a number of peers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedup.learn.loans import generate_lender, group_by_rows, lender_seed, partition
from fedup.learn.tabular import DataError, Table
from fedup.sim.data import DEFAULT_PEERS, csv_tables, synthetic_tables


def test_grouping_deals_largest_first_to_the_smallest_group() -> None:
    sizes = [10, 9, 8, 7, 6, 5, 4]
    # 10 -> g0, 9 -> g1, 8 -> g2, 7 -> g2 (8), 6 -> g1 (9), 5 -> g0 (10), 4 -> g0 or g1
    # (both 15): g0, the lower one.
    assert group_by_rows(sizes, 3) == [[0, 5, 6], [1, 4], [2, 3]]
    assert group_by_rows(sizes, 1) == [list(range(7))]
    assert group_by_rows(sizes, 7) == [[i] for i in range(7)]


def test_grouping_ties_go_by_index_and_are_deterministic() -> None:
    sizes = [5, 5, 5, 5, 5]
    assert group_by_rows(sizes, 2) == [[0, 2, 4], [1, 3]]
    rng = np.random.default_rng(3)
    for _ in range(50):
        sizes = [int(s) for s in rng.integers(1, 1000, size=int(rng.integers(1, 40)))]
        n = int(rng.integers(1, len(sizes) + 1))
        groups = group_by_rows(sizes, n)
        assert groups == group_by_rows(list(sizes), n)  # the same input, the same groups
        assert len(groups) == n and all(groups)  # n groups, none empty
        assert sorted(i for g in groups for i in g) == list(range(len(sizes)))  # each once
        assert all(g == sorted(g) for g in groups)
        totals = [sum(sizes[i] for i in g) for g in groups]
        assert max(totals) <= sum(sizes) / n + max(sizes)  # the greedy bound


def test_grouping_balances_better_than_values_in_order() -> None:
    """Contiguous runs of sorted values would put 900 + 800 together; the greedy does not."""
    sizes = [900, 800, 100, 100, 100, 100]
    groups = group_by_rows(sizes, 2)
    totals = sorted(sum(sizes[i] for i in g) for g in groups)
    assert totals == [1000, 1100]


def test_grouping_refuses_more_groups_than_sizes() -> None:
    with pytest.raises(ValueError, match="3 sizes into 4"):
        group_by_rows([1, 2, 3], 4)
    with pytest.raises(ValueError, match="into 0"):
        group_by_rows([1, 2, 3], 0)


def _regions(table: Table) -> set[str]:
    return {str(v) for v in table.column("region").values}


def test_a_column_is_grouped_into_the_peers_asked_for() -> None:
    per_value = synthetic_tables(None, "column:region", seed=2, n_rows=300)
    assert len(per_value) == 5  # five regions, DEFAULT_PEERS lenders: one peer per value
    assert [len(_regions(t)) for t in per_value] == [1] * 5
    assert len(synthetic_tables(DEFAULT_PEERS, "column:region", seed=2, n_rows=300)) == 5

    three = synthetic_tables(3, "column:region", seed=2, n_rows=300)
    assert len(three) == 3
    # The same three lenders, one table per region, dealt by the greedy rule.
    lenders = [generate_lender(lender_seed(2, i), 300).table for i in range(3)]
    by_value = partition(lenders, "column:region")
    groups = group_by_rows([t.n_rows for t in by_value], 3)
    assert [t.n_rows for t in three] == [sum(by_value[i].n_rows for i in g) for g in groups]
    names = [[by_value[i].source.removeprefix("region=") for i in g] for g in groups]
    assert [t.source for t in three] == ["region=" + "+".join(n) for n in names]
    regions = [_regions(t) for t in three]
    assert sorted(r for rs in regions for r in rs) == sorted(_regions(Table.concat(lenders)))
    assert sum(len(r) for r in regions) == 5  # each value in exactly one peer
    assert sum(t.n_rows for t in three) == 3 * 300  # no row lost
    for t, rs in zip(three, regions, strict=True):
        assert t.source == "region=" + "+".join(sorted(rs))
    again = synthetic_tables(3, "column:region", seed=2, n_rows=300)
    assert [t.source for t in again] == [t.source for t in three]
    assert all(np.array_equal(a.target, b.target) for a, b in zip(again, three, strict=True))


def test_more_peers_than_values_is_one_clear_line() -> None:
    with pytest.raises(DataError) as caught:
        synthetic_tables(6, "column:region", n_rows=300)
    message = str(caught.value)
    assert message == (
        "partition column:region has 5 values, too few for 6 peers: ask for at most 5, "
        "or leave the number of peers out for one peer per value"
    )


def test_a_csv_column_is_grouped_by_rows(tmp_path: Path) -> None:
    data = tmp_path / "loans.csv"
    counts = {"a": 40, "b": 30, "c": 20, "d": 10}
    rows = [f"{branch},{i},{i % 2}" for branch, n in counts.items() for i in range(n)]
    data.write_text("branch,income,default\n" + "\n".join(rows) + "\n")
    two = csv_tables(data, "default", 2, "column:branch")
    # 40 -> first, 30 -> second, 20 -> second (30 < 40), 10 -> first (40 < 50).
    assert [t.source for t in two] == ["branch=a+d", "branch=b+c"]
    assert [t.n_rows for t in two] == [50, 50]
    assert len(csv_tables(data, "default", None, "column:branch")) == 4
    assert len(csv_tables(data, "default", None, "iid")) == DEFAULT_PEERS
