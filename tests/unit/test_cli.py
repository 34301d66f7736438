from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedup.cli import build_parser, main
from fedup.protocol.peer_id import PeerId


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedup.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_id_is_stable_per_state_dir(tmp_path: Path) -> None:
    first = run_cli("id", "--state-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    peer = PeerId.from_text(first.stdout.strip())
    again = run_cli("id", env={"FEDUP_STATE_DIR": str(tmp_path)})
    assert again.stdout.strip() == peer.text


def test_id_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "--json", "--state-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert PeerId.from_text(out["peer_id"]).public_key.hex() == out["public_key"]


def test_bad_key_file_is_one_line_error(tmp_path: Path) -> None:
    main(["id", "--state-dir", str(tmp_path)])
    (tmp_path / "identity.key").chmod(0o644)
    proc = run_cli("id", "--state-dir", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "accessible by group or others" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_commands_each_with_help() -> None:
    import argparse

    from fedup.cli import build_parser

    top = run_cli("--help")
    assert top.returncode == 0
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = sorted(sub.choices)
    assert {"id", "peers"} <= set(commands)
    for name in commands:
        assert name in top.stdout
        sub = run_cli(name, "--help")
        assert sub.returncode == 0 and "usage: fedup-peer " + name in sub.stdout


def test_simulate_options_reach_the_simulation() -> None:
    from fedup.commands.simulate import _settings
    from fedup.sim import Drop, Kill, Link, Slow

    args = build_parser().parse_args(
        ["simulate", "--peers", "4", "--tolerance", "0.01", "--latency", "2",
         "--link", "0:1:50", "--link", "2:3:10:8", "--kill", "1:2:0", "--drop", "0:1",
         "--slow", "3:0.5"]
    )  # fmt: skip
    settings = _settings(args)
    assert settings.run.tolerance == 0.01
    faults = settings.faults
    assert faults.link == Link(latency=0.002)
    assert dict(faults.links) == {
        (0, 1): Link(latency=0.05),
        (2, 3): Link(latency=0.01, bandwidth=1e6),
    }
    assert faults.kills == (Kill(1, 2, 0),)
    assert faults.drops == (Drop(0, 1),)
    assert faults.slow == (Slow(3, 0.5),)


def test_the_command_line_loads_torch_only_for_commands_that_train() -> None:
    code = (
        "import sys, fedup, fedup.cli; fedup.cli.build_parser(); "
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    code = "import sys; from fedup import Peer; print('torch' in sys.modules, Peer.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "Peer"]


def test_network_key_file_others_can_read_is_one_line_error_before_any_network(
    tmp_path: Path,
) -> None:
    key = tmp_path / "network.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o644)
    proc = run_cli(
        "start", "--state-dir", str(tmp_path / "state"), "--network-key-file", str(key),
        "--no-mdns", "--bootstrap", "127.0.0.1:9",
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "accessible by group or others" in proc.stderr
    assert f"chmod 600 {key}" in proc.stderr
    assert not (tmp_path / "state").exists()  # refused before anything else happened


def test_state_dir_others_can_write_is_one_line_error(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert main(["id", "--state-dir", str(state)]) == 0
    state.chmod(0o777)
    proc = run_cli("id", "--state-dir", str(state))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"chmod 700 {state}" in proc.stderr


def test_a_link_planted_at_metrics_stops_start_before_it_joins_anyone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    code = main(
        ["start", "--state-dir", str(tmp_path / "state"), "--out", str(out),
         "--no-mdns", "--bootstrap", "127.0.0.1:9"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl is a symbolic link" in err
    assert victim.read_text() == "precious\n"
