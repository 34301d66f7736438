"""The synthetic loan-default generator: determinism, lender differences, partitions."""

from __future__ import annotations

import numpy as np
import pytest

from fedup.learn import loans
from fedup.learn.tabular import CATEGORICAL, NUMERIC, DataError, Table, read_csv


@pytest.fixture(scope="module")
def population() -> list[loans.LenderData]:
    return loans.generate_population(8, seed=3, n_rows=600)


def test_same_seed_same_bytes() -> None:
    a = loans.generate_lender(1234, n_rows=300)
    b = loans.generate_lender(1234, n_rows=300)
    assert a.csv_bytes() == b.csv_bytes()
    assert a.profile == b.profile
    assert loans.generate_lender(1235, n_rows=300).csv_bytes() != a.csv_bytes()


def test_default_size_comes_from_the_seed() -> None:
    sizes = {loans.generate_lender(s).profile.n_rows for s in range(4)}
    assert all(1500 <= n <= 5000 for n in sizes)
    assert len(sizes) > 1


def test_lenders_differ_in_customer_mix(population: list[loans.LenderData]) -> None:
    rates = [d.table.target.mean() for d in population]
    assert max(rates) - min(rates) > 0.1  # base rates differ
    assert len({d.profile.archetype for d in population}) >= 3
    main_region = [int(np.argmax(d.profile.region_weights)) for d in population]
    assert len(set(main_region)) >= 3
    incomes = [np.nanmedian(d.table.column("income").values) for d in population]
    assert max(incomes) / min(incomes) > 1.3
    purposes = [d.table.column("purpose").values for d in population]
    car_share = [float(np.mean(p == "car")) for p in purposes]
    assert max(car_share) - min(car_share) > 0.2


def test_columns_kinds_and_missing_values(population: list[loans.LenderData]) -> None:
    table = population[0].table
    kinds = {c.name: c.kind for c in table.columns}
    assert [*kinds, "default"] == list(loans.COLUMNS)
    for name in ("region", "home_ownership", "purpose", "term"):
        assert kinds[name] == CATEGORICAL
    for name in ("age", "income", "employment_years", "loan_amount", "credit_score"):
        assert kinds[name] == NUMERIC
    pooled = Table.concat([d.table for d in population])
    for name in ("income", "employment_years", "credit_score", "debt_to_income"):
        assert pooled.column(name).missing.any(), name
    assert set(np.unique(pooled.target)) == {0, 1}
    spellings = {d.profile.target_spelling for d in population}
    assert len(spellings) > 1  # lenders spell the target differently, parsing agrees


def test_csv_round_trip(tmp_path: object, population: list[loans.LenderData]) -> None:
    import pathlib

    assert isinstance(tmp_path, pathlib.Path)
    for d in population[:3]:
        path = tmp_path / f"{d.profile.seed}.csv"
        d.write_csv(path)
        back = read_csv(path)
        assert np.array_equal(back.target, d.table.target)
        for a, b in zip(back.columns, d.table.columns, strict=True):
            assert (a.name, a.kind) == (b.name, b.kind)
            if a.kind == NUMERIC:
                assert np.array_equal(a.values, b.values, equal_nan=True)
            else:
                assert np.array_equal(a.values, b.values)


def test_ground_truth_is_one_mechanism() -> None:
    base = {
        "region": np.array(["north"] * 3),
        "age": np.full(3, 40.0),
        "income": np.full(3, 60_000.0),
        "employment_years": np.full(3, 5.0),
        "home_ownership": np.array(["RENT"] * 3),
        "purpose": np.array(["car"] * 3),
        "loan_amount": np.full(3, 15_000.0),
        "term": np.array(["36 months"] * 3),
        "credit_score": np.array([600.0, 680.0, 760.0]),
        "debt_to_income": np.full(3, 20.0),
        "delinquencies_2y": np.zeros(3),
    }
    z = loans.default_logit(base)
    assert z[0] > z[1] > z[2]  # better credit, fewer defaults
    riskier = dict(base, term=np.array(["60 months"] * 3), purpose=np.array(["small_business"] * 3))
    assert (loans.default_logit(riskier) > z).all()


def test_seed_from_peer_id() -> None:
    assert loans.seed_from_peer_id("12D3KooWabc") == loans.seed_from_peer_id("12D3KooWabc")
    assert loans.seed_from_peer_id("12D3KooWabc") != loans.seed_from_peer_id("12D3KooWabd")
    assert loans.lender_seed(0, 1) != loans.lender_seed(1, 0)


def test_partitions(population: list[loans.LenderData]) -> None:
    tables = [d.table for d in population]
    total = sum(t.n_rows for t in tables)
    assert loans.partition(tables, "lender") == tables

    iid = loans.partition(tables, "iid", 4)
    assert [t.n_rows for t in iid] == [total // 4] * 4
    iid_rates = [t.target.mean() for t in iid]

    skew = loans.partition(tables, "dirichlet:0.3", 4, seed=1)
    assert sum(t.n_rows for t in skew) == total
    assert min(t.n_rows for t in skew) >= 50
    skew_rates = [t.target.mean() for t in skew]
    assert np.std(skew_rates) > 3 * np.std(iid_rates)
    assert loans.partition(tables, "dirichlet:0.3", 4, seed=1)[0].n_rows == skew[0].n_rows

    by_region = loans.partition(tables, "column:region")
    assert sum(t.n_rows for t in by_region) == total
    assert [len(set(t.column("region").values)) for t in by_region] == [1] * len(by_region)
    assert [t.source for t in by_region][:1] == ["region=central"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("bogus", "unknown partition"), ("dirichlet:x", "ALPHA"), ("iid", "n_peers")],
)
def test_partition_errors(population: list[loans.LenderData], spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        loans.partition([population[0].table], spec)
