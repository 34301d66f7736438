"""The demo trains its baselines while the ring runs (``fedup.demo.runner._EarlyBaselines``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedup.demo import runner
from fedup.demo.peers import DemoPeer


def peers_in(tmp_path: Path, n: int) -> list[DemoPeer]:
    return [
        DemoPeer(i, tmp_path / f"peer{i}", tmp_path / "x.csv", "bank", 10, 0.1) for i in range(n)
    ]


def test_the_baselines_start_once_a_peer_has_written_its_run_s_federation_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(
        runner, "train_baselines", lambda peers, federation, device: seen.append(federation)
    )
    peers = peers_in(tmp_path, 2)
    early = runner._EarlyBaselines(peers, torch.device("cpu"))
    early.poll()
    said: list[str] = []
    assert early.result(said.append) is None and seen == []  # nothing formed: not started
    run_dir = peers[1].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "federation.json").write_text("{not json")  # unreadable: not yet
    early.poll()
    assert early._thread is None
    (run_dir / "federation.json").write_text(json.dumps({"run_id": "ab"}))
    early.poll()
    early.poll()  # once
    early.result(said.append)
    assert seen == [{"run_id": "ab"}] and said == []


def test_baselines_that_failed_while_the_peers_ran_are_said_and_left_to_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(peers: object, federation: object, device: object) -> None:
        raise ValueError("no rows")

    monkeypatch.setattr(runner, "train_baselines", fail)
    peers = peers_in(tmp_path, 1)
    peers[0].run_dir.mkdir(parents=True)
    (peers[0].run_dir / "federation.json").write_text(json.dumps({"run_id": "ab"}))
    early = runner._EarlyBaselines(peers, torch.device("cpu"))
    early.poll()
    said: list[str] = []
    assert early.result(said.append) is None  # build_report trains them again
    assert said == ["training the baselines while the peers ran failed (no rows); again now"]
