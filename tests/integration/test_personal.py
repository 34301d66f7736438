"""Personalization in a simulated federation: every member fine-tunes its own head."""

from __future__ import annotations

import argparse
import hashlib
import json
import stat
from pathlib import Path

import pytest

from fedup.cli import _common as cli_common
from fedup.cli import main
from fedup.commands import simulate as simulate_command
from fedup.commands.verify import verify_model
from fedup.learn.personal import PULL
from fedup.learn.weights import load_safetensors


def run_cli(argv: list[str]) -> int:
    """``fedup-peer simulate`` as ``fedup.cli`` registers it."""
    parser = argparse.ArgumentParser(prog="fedup-peer")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_command.add_parser(sub, common=cli_common)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_every_member_writes_its_personal_model_and_the_shared_one_is_unchanged(
    tmp_path: Path,
) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--peers", "3", "--rows", "300", "--max-laps", "3", "--patience", "3"]
    assert run_cli([*argv, "--personal-layers", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    peers = sorted((out / "peers").iterdir())
    assert len(peers) == 3
    shared = {hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for p in peers}
    assert len(shared) == 1  # identical on every member, personal or not
    assert shared == {report["simulation"]["model_sha256"]}
    for folder in peers:
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["model_sha256"] in shared
        personal_file = folder / "personal.safetensors"
        assert stat.S_IMODE(personal_file.stat().st_mode) == 0o600
        mine = load_safetensors(personal_file)
        common = load_safetensors(folder / "model.safetensors")
        assert set(mine) == set(common)
        changed = {n for n in mine if not (mine[n] == common[n]).all()}
        assert changed <= {"4.weight", "4.bias"}  # the MLP's last Linear only
        personal = summary["personal"]
        assert personal["layers"] == 1
        for key in ("own_val", "shared_own_val", "local_only_own_val"):
            assert set(personal[key]) == {"loss", "auc", "accuracy"}
            assert 0 < personal[key]["loss"] < 5 and 0 <= personal[key]["accuracy"] <= 1
        # Chosen on a holdout of the training split, so the own-split figure is not
        # guaranteed below the shared model's; epoch 0 is the start (the shared model,
        # or it with the last bias moved to this member's base rate).
        assert personal["selected_on"] == "training holdout" and personal["holdout_rows"] > 0
        assert personal["pull"] == PULL > 0
        if personal["best_epoch"] == 0:
            assert changed <= {"4.bias"}
        else:
            assert changed and personal["epochs"] >= personal["best_epoch"]
        verify_model(folder)  # the shared model still verifies
        assert main(["verify", str(folder)]) == 0
    entry = report["personalized"]
    assert [p["peer"] for p in entry["per_peer"]] == [0, 1, 2]
    n_val = [d["val_rows"] for d in report["data"]]
    assert [p["n"] for p in entry["per_peer"]] == n_val
    assert all(p["union"]["n"] == sum(n_val) for p in entry["per_peer"])
    assert entry["peers_with_local_only"] == 3
    for peer, folder in zip(entry["per_peer"], peers, strict=True):
        own = json.loads((folder / "summary.json").read_text())["personal"]["own_val"]
        assert peer["val_loss"] == pytest.approx(own["loss"], rel=1e-6)  # float32 sums vs float64


def test_without_personal_layers_no_personal_model_is_made(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--peers", "2", "--rows", "300", "--max-laps", "2", "--patience", "2"]
    assert run_cli([*argv, "--out", str(out)]) == 0
    for folder in (out / "peers").iterdir():
        assert not (folder / "personal.safetensors").exists()
        assert json.loads((folder / "summary.json").read_text())["personal"] is None
    assert "personalized" not in json.loads((out / "report.json").read_text())
