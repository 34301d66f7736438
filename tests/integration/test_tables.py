"""Tables whose columns differ between members: the federation uses what all of them have.

Simulated members (``fedup.sim``, virtual clock) with small synthetic lenders.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs
import numpy as np
import pytest
import trio
import trio.testing

from fedup.learn.loans import generate_lender, lender_seed
from fedup.learn.schema import NUMERIC
from fedup.learn.tabular import Column, Table
from fedup.peer import TabularSource
from fedup.protocol.view import RunSettings
from fedup.sim import SimSettings, run_simulation


def with_column(table: Table, name: str) -> Table:
    extra = Column(name, NUMERIC, np.arange(table.n_rows, dtype=np.float64))
    return attrs.evolve(table, columns=(*table.columns, extra))


async def test_a_column_only_one_member_has_is_left_out_and_all_three_train(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each member has a column the others lack (so whoever leads has one): all three
    join, agree on the columns they share, finish with one model, and each logs which
    of its columns the federation leaves out."""
    tables = [generate_lender(lender_seed(0, i), 300).table for i in range(3)]
    tables = [with_column(t, f"branch_{i}") for i, t in enumerate(tables)]
    sources = [TabularSource(t, target="default") for t in tables]
    caplog.set_level(logging.INFO, logger="fedup.peer")
    with trio.fail_after(10_000):
        result = await run_simulation(
            sources, tmp_path, SimSettings(run=RunSettings(max_laps=3, patience=3))
        )
    assert [p.error for p in result.peers] == [None] * 3
    summaries = [p.summary for p in result.peers if p.summary is not None]
    assert len(summaries) == 3 and all(s.ok and s.dead == [] for s in summaries)
    assert len({s.model_sha256 for s in summaries}) == 1
    assert result.schema is not None
    names = [c.name for c in result.schema.columns]
    assert names == sorted(c.name for c in tables[0].columns if not c.name.startswith("branch"))
    for s in summaries:
        federation = json.loads((Path(s.out_dir) / "federation.json").read_text())
        assert [c["name"] for c in federation["schema"]["columns"]] == names
    notes = [r.getMessage() for r in caplog.records if "does not use my columns" in r.getMessage()]
    assert sorted(notes) == [
        f"the federation does not use my columns 'branch_{i}': not every member has them"
        for i in range(3)
    ]
