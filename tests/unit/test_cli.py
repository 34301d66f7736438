from __future__ import annotations

import argparse
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


# --- one line per error, ranges and defaults in --help ----------------------------------


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr of a command that failed, checked to be just that."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "--max-laps", "0"], "argument --max-laps: must be >= 1 (got 0)"),
        (["start", "--local-epochs", "-1"], "argument --local-epochs: must be > 0 (got -1)"),
        (["start", "--local-epochs", "0"], "argument --local-epochs: must be > 0 (got 0)"),
        (["start", "--patience", "1.5"], "argument --patience: must be a whole number"),
        (["start", "--min-peers", "0"], "argument --min-peers: must be >= 1 (got 0)"),
        (["start", "--settle", "nan"], "argument --settle: must be a number (got nan)"),
        (["start", "--hop-timeout", "0.5"], "argument --hop-timeout: must be >= 1 (got 0.5)"),
        (["start", "--tolerance", "1"], "argument --tolerance: must be <= 0.999 (got 1)"),
        (["start", "--lr", "inf"], "argument --lr: must be <= 10 (got inf)"),
        (["start", "--listen", "127.0.0.1"], "argument --listen: '127.0.0.1' is not HOST:PORT"),
        (["simulate", "--peers", "0"], "argument --peers: must be >= 1 (got 0)"),
        (["simulate", "--max-laps", "0"], "argument --max-laps: must be >= 1 (got 0)"),
        (["simulate", "--rows", "10"], "argument --rows: must be >= 200 (got 10)"),
        (["simulate", "--kill", "x"], "argument --kill: 'x' is not PEER:LAP:HOP"),
        (["simulate", "--threads", "0"], "argument --threads: must be >= 1 (got 0)"),
        (["start", "--personal-layers", "4"], "argument --personal-layers: must be <= 3 (got 4)"),
        (
            ["simulate", "--personal-layers", "-1"],
            "argument --personal-layers: must be >= 0 (got -1)",
        ),
        (
            ["simulate", "--personal-layers", "1.5"],
            "argument --personal-layers: must be a whole number",
        ),
        (["demo", "--peers", "1"], "argument --peers: must be >= 2 (got 1)"),
        (["demo", "--timeout", "0"], "argument --timeout: must be > 0 (got 0)"),
        (["demo", "--seed", "-1"], "argument --seed: must be >= 0 (got -1)"),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_the_option(argv: list[str], message: str) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line.startswith(f"fedup-peer {argv[0]}: error: {message}"), line
    assert line.endswith(f"see fedup-peer {argv[0]} --help")


def test_a_setting_out_of_range_from_the_environment_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("start", "--state-dir", str(tmp_path), env={"FEDUP_MAX_LAPS": "0"})
    assert proc.returncode == 1
    assert one_line_error(proc) == "fedup-peer: error: FEDUP_MAX_LAPS: must be >= 1 (got 0)"


def test_personal_layers_from_the_environment_or_a_config_file_are_checked(
    tmp_path: Path,
) -> None:
    env = {"FEDUP_PERSONAL_LAYERS": "9"}
    proc = run_cli("start", "--state-dir", str(tmp_path), env=env)
    assert proc.returncode == 1
    assert one_line_error(proc) == "fedup-peer: error: FEDUP_PERSONAL_LAYERS: must be <= 3 (got 9)"
    from fedup.commands.start import add_parser, resolve

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(), lambda p: None)
    config = tmp_path / "peer.toml"
    config.write_text("personal-layers = 2\n")
    args = parser.parse_args(["start", "--config", str(config)])
    assert resolve(args, environ={})["personal_layers"] == 2
    assert resolve(args, environ={"FEDUP_PERSONAL_LAYERS": "1"})["personal_layers"] == 1
    assert resolve(parser.parse_args(["start"]), environ={})["personal_layers"] == 0


def test_hop_timeout_from_any_source_sets_that_limit_alone() -> None:
    import attrs

    from fedup.commands.start import add_parser, build_config, resolve
    from fedup.config import DEFAULT_LIMITS

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, default=None)

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(), common)

    def limits(*argv: str, environ: dict[str, str] | None = None) -> object:
        args = parser.parse_args(["start", *argv])
        return build_config(args, resolve(args, environ=environ or {})).limits

    assert limits() == DEFAULT_LIMITS  # 300 s unless asked
    assert limits("--hop-timeout", "20") == attrs.evolve(DEFAULT_LIMITS, hop_timeout=20.0)
    assert limits(environ={"FEDUP_HOP_TIMEOUT": "7.5"}) == attrs.evolve(
        DEFAULT_LIMITS, hop_timeout=7.5
    )
    assert limits("--hop-timeout", "9", environ={"FEDUP_HOP_TIMEOUT": "7.5"}) == attrs.evolve(
        DEFAULT_LIMITS, hop_timeout=9.0
    )


def test_personal_layers_with_dp_is_one_line(tmp_path: Path) -> None:
    proc = run_cli(
        "simulate", "--peers", "2", "--personal-layers", "1", "--dp-epsilon", "5",
        "--dp-delta", "1e-5", "--out", str(tmp_path / "sim"), "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 1
    line = one_line_error(proc)
    assert line.startswith("fedup-peer: error: --personal-layers with --dp-epsilon"), line


def value_options(command: str) -> list[argparse.Action]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [
        a
        for a in sub.choices[command]._actions
        if a.option_strings and a.nargs != 0 and a.dest not in ("help", "version")
    ]


@pytest.mark.parametrize("command", ["start", "simulate", "demo"])
def test_help_shows_every_default_and_every_numeric_range(command: str) -> None:
    from fedup.commands.values import Number

    options = value_options(command)
    assert len(options) >= 8
    for action in options:
        assert action.help and "default: " in action.help, action.option_strings
        if isinstance(action.type, Number):
            assert f"range {action.type.describe()}" in action.help, action.option_strings
    text = " ".join(run_cli(command, "--help").stdout.split())  # unwrapped
    assert "(range [1, 10000], default: 500)" in text or command == "demo"
    assert text.count("default: ") >= len(options)


def test_numbers_check_their_range_whatever_the_source() -> None:
    from fedup.commands.values import Number, listen_address, of_setting, real, whole

    laps = of_setting("max_laps")
    assert laps("7") == 7 and laps(7) == 7  # text from argv or env, int from TOML
    assert laps.describe() == "[1, 10000]"
    for bad, why in [(0, ">= 1"), ("10001", "<= 10000"), (2.0, "whole"), (True, "number")]:
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            laps(bad)
    epochs = of_setting("local_epochs")
    assert epochs("0.5") == 0.5 and epochs.describe() == "(0, 100]"
    with pytest.raises(argparse.ArgumentTypeError, match=r"must be > 0 \(got 0\)"):
        epochs(0)
    assert real(0, open_lo=True)("inf") == float("inf")  # an unbounded range admits inf
    assert real(0, open_lo=True).describe() == "(0, inf)"
    assert of_setting("seed").describe() == "[0, 2^63-1]"
    assert whole(2, 16) == Number(integer=True, lo=2, hi=16)
    assert str(listen_address("127.0.0.1:0")) == "127.0.0.1:0"  # 0: pick a free port
    assert str(listen_address("[::1]:0")) == "[::1]:0"
    assert str(listen_address("0.0.0.0:7000")) == "0.0.0.0:7000"
    with pytest.raises(argparse.ArgumentTypeError, match="not an IP address"):
        listen_address("example.org:0")


def test_the_rows_range_is_the_demos() -> None:
    from fedup.commands.values import LENDER_ROWS
    from fedup.demo.runner import MAX_ROWS, MIN_ROWS

    assert (LENDER_ROWS.lo, LENDER_ROWS.hi) == (MIN_ROWS, MAX_ROWS)


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fedup.cli

    def broken(state_dir: Path) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(fedup.cli, "load_or_create_identity", broken)
    assert main(["id", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fedup-peer: internal error: RuntimeError: boom second line")
    assert "rerun with --debug" in err
    for flags in (["--debug"], ["--log-level", "debug"]):
        assert main(["id", "--state-dir", str(tmp_path), *flags]) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last)") and "in broken" in err
        assert err.strip().splitlines()[-1].startswith("fedup-peer: internal error: RuntimeError")


def test_debug_shows_the_traceback_of_a_users_error_too(tmp_path: Path) -> None:
    main(["id", "--state-dir", str(tmp_path)])
    (tmp_path / "identity.key").chmod(0o644)
    proc = run_cli("id", "--state-dir", str(tmp_path), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "accessible by group or others" in proc.stderr.strip().splitlines()[-1]


def test_errors_inside_a_group_of_one_are_reported_as_themselves(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedup.cli import failed
    from fedup.errors import ConfigError

    group = ExceptionGroup("nursery", [ExceptionGroup("inner", [ConfigError("bad thing")])])
    assert failed(group, debug=False) == 1
    assert capsys.readouterr().err == "fedup-peer: error: bad thing\n"
    assert failed(OSError(28, "No space left on device", "/x/model.safetensors"), debug=False) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device: '/x/model.safetensors'" in err
    two = ExceptionGroup("nursery", [ValueError("a"), KeyError("b")])
    assert failed(two, debug=False) == 1
    assert capsys.readouterr().err.startswith("fedup-peer: internal error: ExceptionGroup")


def test_simulate_data_errors_of_drop_column_positive_label_and_size_are_one_line(
    tmp_path: Path,
) -> None:
    data = tmp_path / "loans.csv"
    data.write_text("id,income,status\n" + "".join(f"{i},{i * 10},{'late' if i % 3 else 'ok'}\n"
                                                   for i in range(12)))  # fmt: skip

    def error(*args: str) -> str:
        proc = run_cli("simulate", "--state-dir", str(tmp_path / "state"), "--out",
                       str(tmp_path / f"sim{len(args)}"), *args)  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
        return proc.stderr.strip()

    common = ["--data", str(data), "--target", "status", "--positive-label", "late"]
    assert error(*common, "--drop-column", "ID").endswith(
        f"{data}: no column named 'ID'; the columns are 'id', 'income', 'status'"
    )
    assert error(*common[:4], "--positive-label", "Late", "--peers", "2").endswith(
        "positive label 'Late' is not one of the target's values 'late', 'ok'; give one of them"
    )
    # 12 rows dealt to 3 peers: 4 each, one fewer than a peer needs.
    assert error(*common, "--drop-column", "id", "--peers", "3").endswith(
        "peer 0: 4 rows, too few to train: a peer needs at least 5 (a 20% share of each "
        "label is held out for validation); add rows"
    )
    assert error(*common, "--partition", "column:income", "--peers", "13").endswith(
        "partition column:income has 12 values, too few for 13 peers: ask for at most 12, "
        "or leave the number of peers out for one peer per value"
    )
    assert "--drop-column and --positive-label apply to --data" in error(
        "--drop-column", "id", "--peers", "2"
    )
