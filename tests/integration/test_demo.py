"""The runnable examples in demo/ keep working (they are documentation too)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedup.demo.peers import prepare_peers, run_peers
from fedup.learn.loans import generate_lender, lender_seed

DEMO = Path(__file__).resolve().parents[2] / "demo"


def test_library_api_example_with_a_custom_task() -> None:
    # Three peers embedded in one trio program, each with its own nn.Module task,
    # over real loopback TCP; the script asserts that all hold the same model.
    proc = subprocess.run(
        [sys.executable, str(DEMO / "library_api.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all three peers hold the same model" in proc.stdout
    assert proc.stdout.count("model ") == 3


# --------------------------------------------------------------------------
# fedup-peer demo (the mDNS default runs in a namespace: tests/lan/test_demo_lan.py)


def test_demo_without_mdns_runs_real_peers_and_compares_on_the_same_rows(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fedup.cli", "demo", "--no-mdns", "--peers", "2",
         "--rows", "900", "--seed", "3", "--out", str(out),
         "--peer-args", "--max-laps 12 --patience 4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # The baselines were trained while the ring ran, not again after it.
    assert "(trained meanwhile)" in proc.stdout and "again now" not in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["mdns"] is False and report["seed"] == 3
    peers = report["peers"]
    assert [p["finished"] for p in peers] == [True, True]
    # Each peer trained on lender i of the demo's population seed, and nothing else.
    for p in peers:
        csv = Path(p["directory"]) / "data" / "loans.csv"
        expected = generate_lender(lender_seed(3, p["index"]), 900).csv_bytes()
        assert csv.read_bytes() == expected
        assert p["rows"] == 900
    assert report["same_model_everywhere"]
    assert (
        hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        == (report["model_sha256"])
    )
    fed, cen, loc = report["federated"], report["centralized"], report["local_only"]
    # The demo scored the federated model on exactly the split each peer scored it on.
    for entry, p in zip(fed["per_peer"], peers, strict=True):
        assert entry["val_loss"] == pytest.approx(p["reported_val_loss"], abs=1e-4)
        assert entry["bytes_sent"] > 0
    assert fed["union"]["n"] == cen["union"]["n"] == loc["union"]["n"]
    assert [e["bytes_sent"] for e in loc["per_peer"]] == [0, 0]
    settings = json.loads((out / "federation.json").read_text())["settings"]
    assert settings["max_laps"] == 12 and settings["patience"] == 4
    assert report["laps"] <= 12
    # Curves: one point per evaluated lap, in order of data passes.
    curves = report["curves"]
    for points in [
        curves["federated"],
        curves["centralized"],
        *curves["local_only"],
        *curves["local_only_own_split"],
    ]:
        xs = [x for x, _ in points]
        assert len(xs) >= 2 and xs == sorted(xs) and xs[0] == 0
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each local-only curve is its run scored on the union: its kept model is on it.
    for i, entry in enumerate(loc["per_peer"]):
        on_union = dict(curves["local_only"][i])
        own = dict(curves["local_only_own_split"][i])
        assert on_union[entry["epochs"]] == pytest.approx(entry["union"]["val_loss"], abs=1e-4)
        assert own[entry["epochs"]] == pytest.approx(entry["val_loss"], abs=1e-4)
    # The verdict follows the numbers and is printed as such.
    claim = report["claim"]["vs_centralized"]
    assert claim["lower_loss"] == (fed["union"]["val_loss"] < cen["union"]["val_loss"])
    assert claim["fewer_epochs"] == (fed["mean"]["epochs"] < cen["mean"]["epochs"])
    verdict = "Holds." if claim["holds"] else "Does not hold here."
    line = next(t for t in proc.stdout.splitlines() if "against centralized" in t)
    assert line.endswith(verdict)


def test_a_demo_peer_that_outlives_the_deadline_is_stopped_and_reported(tmp_path: Path) -> None:
    peers = prepare_peers(tmp_path, 2, seed=0, rows=200)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    failing = [sys.executable, "-c", "import sys; print('no key file', file=sys.stderr); exit(3)"]
    started = time.monotonic()
    outcomes = run_peers(peers, [sleeper, failing], timeout=5.0)
    assert time.monotonic() - started < 20
    assert outcomes[0].returncode is None
    assert outcomes[0].error == "did not finish before the deadline"
    assert outcomes[1].returncode == 3
    assert outcomes[1].error == "exited with status 3: no key file"
