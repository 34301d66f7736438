"""Differential privacy in a simulated federation: one member trains with DP-SGD."""

from __future__ import annotations

from pathlib import Path

from fedup.learn.loans import generate_lender, lender_seed
from fedup.learn.privacy import DEFAULT_CLIP, DpBudget
from fedup.peer import TabularSource
from fedup.protocol.view import RunSettings
from fedup.sim import SimSettings
from fedup.sim import simulate as run_simulation

RUN = RunSettings(max_laps=3, patience=3)
MAIN_SHA256 = "90139e4547ca0fcc29775ed60411f1ff775cf9c56d00fcc3d37a9d58cd9608a8"
"""The final model of :func:`lenders` ``(3)`` under :data:`RUN` as computed on the main
branch before DP existed (``SimResult.weights_sha256``): the non-private path must not move."""


def lenders(n: int, privacy: dict[int, DpBudget] | None = None) -> list[TabularSource]:
    privacy = privacy or {}
    return [
        TabularSource(
            generate_lender(lender_seed(0, i), 200).table, target="default", privacy=privacy.get(i)
        )
        for i in range(n)
    ]


def test_without_dp_the_model_is_the_one_main_made(tmp_path: Path) -> None:
    result = run_simulation(lenders(3), tmp_path, SimSettings(run=RUN))
    assert result.weights_sha256 == MAIN_SHA256
    assert all(p.summary is not None and p.summary.dp is None for p in result.peers)


def test_one_dp_member_federates_and_stays_within_its_budget(tmp_path: Path) -> None:
    run = RunSettings(max_laps=3, patience=3, local_epochs=1.0)  # a few steps per hop
    result = run_simulation(lenders(3, {0: DpBudget(8.0, 1e-5)}), tmp_path, SimSettings(run=run))
    assert len(result.finished_peers) == 3
    assert result.weights_sha256 is not None  # one identical model on every member
    shas = {p.summary.model_sha256 for p in result.finished_peers if p.summary is not None}
    assert len(shas) == 1
    summaries = [p.summary for p in result.peers]
    assert summaries[0] is not None and summaries[0].dp is not None
    dp = summaries[0].dp
    assert 0 < dp["epsilon_spent"] <= 8.0
    assert dp["delta"] == 1e-5 and dp["clip"] == DEFAULT_CLIP and dp["noise_multiplier"] > 0
    assert dp["steps"] > 0
    assert all(s is not None and s.dp is None for s in summaries[1:])  # a local choice


def test_a_dp_member_of_the_hybrid_mode_plans_for_every_hop_it_trains(tmp_path: Path) -> None:
    """In the hybrid mode a member trains sync_laps hops a round: its budget is planned
    for all of them, so it refuses none (planned for max_laps hops, it refused 3 of 6)."""
    run = RunSettings(
        max_laps=3, patience=3, local_epochs=1.0, algorithm="hybrid", sub_rings=1, sync_laps=2
    )
    result = run_simulation(lenders(3, {0: DpBudget(8.0, 1e-5)}), tmp_path, SimSettings(run=run))
    assert len(result.finished_peers) == 3
    first = result.peers[0].summary
    assert first is not None and first.dp is not None
    assert first.dp["hops_refused"] == 0 and 0 < first.dp["epsilon_spent"] <= 8.0
    assert first.dp["planned_steps"] >= first.dp["steps"] > 0
