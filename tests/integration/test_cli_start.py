"""``fedup-peer start`` as users run it: real processes, real TCP, real crypto."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedup.cli import build_parser
from fedup.commands.start import build_config, resolve
from fedup.demo.peers import free_ports
from fedup.errors import ConfigError
from fedup.protocol.records import Address


def start(state: Path, port: int, others: list[int], *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "fedup.cli", "start", "--state-dir", str(state)]
    args += ["--listen", f"127.0.0.1:{port}", "--no-mdns", "--min-peers", "3", "--settle", "1"]
    for other in others:
        args += ["--bootstrap", f"127.0.0.1:{other}"]
    args += ["--max-laps", "6", "--patience", "3", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_processes_finish_with_identical_models(tmp_path: Path) -> None:
    ports = free_ports(3)
    procs = [
        start(tmp_path / f"p{i}", port, [p for p in ports if p != port])
        for i, port in enumerate(ports)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    hashes = {o["model_sha256"] for o in outs}
    assert len(hashes) == 1
    summaries = []
    for o in outs:
        folder = Path(o["out"])
        if not folder.is_absolute():
            folder = Path.cwd() / folder
        model = (folder / "model.safetensors").read_bytes()
        assert hashlib.sha256(model).hexdigest() in hashes
        summary = json.loads((folder / "summary.json").read_text())
        summaries.append(summary)
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert {x["type"] for x in lines} >= {"hop", "lap"}
    for key in ("run_id", "leader", "members", "laps", "converged", "stop_reason",
                "federated_val_loss", "model_sha256"):  # fmt: skip
        assert len({json.dumps(s[key]) for s in summaries}) == 1, key
    assert {s["peer_id"] for s in summaries} == set(summaries[0]["members"])
    assert summaries[0]["leader"] == min(summaries[0]["members"])
    assert all(s["final_val_loss"] > 0 for s in summaries)
    # Each peer used its own synthetic lender, written where the user can see it.
    data = [(tmp_path / f"p{i}" / "data" / "synthetic-loans.csv").read_bytes() for i in range(3)]
    assert len(set(data)) == 3


def test_missing_data_file_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedup.cli", "start", "--state-dir", str(tmp_path),
         "--data", str(tmp_path / "nope.csv"), "--no-mdns", "--bootstrap", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "nope.csv" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["start", *argv])


def test_settings_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "fedup.toml"
    cfg.write_text('min-peers = 4\nlr = 0.01\nbootstrap = ["10.0.0.1:4000"]\nno_mdns = true\n')
    args = parse("--config", str(cfg), "--lr", "0.5")
    values = resolve(args, environ={"FEDUP_MIN_PEERS": "5", "FEDUP_SEED": "9"})
    assert values["lr"] == 0.5  # flag beats file
    assert values["min_peers"] == 5  # env beats file
    assert values["seed"] == 9
    assert values["bootstrap"] == [Address("10.0.0.1", 4000)]
    config = build_config(args, values)
    assert not config.mdns and config.run.lr == 0.5 and config.min_peers == 5


def test_bad_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FEDUP_MIN_PEERS"):
        resolve(parse(), environ={"FEDUP_MIN_PEERS": "many"})
    with pytest.raises(ConfigError, match="bootstrap"):
        build_config(parse("--no-mdns"), resolve(parse("--no-mdns"), environ={}))
    cfg = tmp_path / "bad.toml"
    cfg.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        resolve(parse("--config", str(cfg)), environ={})
    cfg.write_text("state_dir = '/elsewhere'\n")  # would be ignored: refused instead
    with pytest.raises(ConfigError, match=r"unknown settings.*state_dir"):
        resolve(parse("--config", str(cfg)), environ={})
    os.environ.pop("FEDUP_MIN_PEERS", None)


def test_live_progress_rewrites_one_status_line() -> None:
    import io
    import logging

    from fedup.commands.start import LiveProgress

    stream = io.StringIO()
    handler = LiveProgress(stream)
    fed = logging.getLogger("fedup.federation")

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)

    handler.emit(record(fed.name, "lap 1 hop 0: trained 64 samples (loss 0.6)"))
    handler.emit(record(fed.name, "lap 1 hop 1: trained 64 samples (loss 0.5)"))
    handler.emit(record("fedup.peer", "run finished"))
    out = stream.getvalue()
    assert out.count("\r\x1b[K") == 3  # two status updates, then the line is cleared
    assert out.endswith("info: run finished\n")
    assert "\n" not in out[: out.index("info:")]
