from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedup.cli import main
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
