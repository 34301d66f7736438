"""``fedup-peer start`` as users run it: real processes, real TCP, real crypto."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
        # The device chosen, logged once (--device auto: the CPU without CUDA).
        assert err.count(" training on ") == 1
        if not torch.cuda.is_available():
            assert " training on cpu (--device auto; " in err
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
    assert summaries[0]["leader"] in summaries[0]["members"]  # the one the draw chose
    assert all(s["final_val_loss"] > 0 for s in summaries)
    # Each peer used its own synthetic lender, written where the user can see it.
    data = [(tmp_path / f"p{i}" / "data" / "synthetic-loans.csv").read_bytes() for i in range(3)]
    assert len(set(data)) == 3


@pytest.mark.parametrize("mode", ["parallel", "hybrid"])
def test_three_processes_in_parallel_modes_finish_with_identical_models(
    tmp_path: Path, mode: str
) -> None:
    """--mode parallel: every member trains each round at once, then the members average by
    a ring all-reduce over their encrypted channels; --mode hybrid: two sub-rings (of two
    and of one) hand the model on in sequence first; all members save the same model."""
    ports = free_ports(3)
    extra = ["--sub-rings", "2"] if mode == "hybrid" else []
    procs = [
        start(tmp_path / f"p{i}", port, [p for p in ports if p != port], "--mode", mode, *extra)
        for i, port in enumerate(ports)
    ]
    summaries = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        assert f"{mode} rounds" in err and "relay broke" not in err
        folder = Path(json.loads(out.strip().splitlines()[-1])["out"])
        summaries.append(json.loads((folder / "summary.json").read_text()))
        model = (folder / "model.safetensors").read_bytes()
        assert hashlib.sha256(model).hexdigest() == summaries[-1]["model_sha256"]
        federation = json.loads((folder / "federation.json").read_text())
        assert federation["settings"]["algorithm"] == mode
    for key in ("run_id", "members", "laps", "stop_reason", "federated_val_loss", "model_sha256"):
        assert len({json.dumps(s[key]) for s in summaries}) == 1, key
    assert summaries[0]["federated_laps"][0] == -1 and summaries[0]["ok"]


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
    with pytest.raises(ConfigError, match=r"FEDUP_SETTLE: must be <= 600 \(got 601\)"):
        resolve(parse(), environ={"FEDUP_SETTLE": "601"})
    cfg = tmp_path / "bad.toml"
    cfg.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        resolve(parse("--config", str(cfg)), environ={})
    cfg.write_text("state_dir = '/elsewhere'\n")  # would be ignored: refused instead
    with pytest.raises(ConfigError, match=r"unknown settings.*state_dir"):
        resolve(parse("--config", str(cfg)), environ={})
    os.environ.pop("FEDUP_MIN_PEERS", None)


def test_no_mdns_without_bootstrap_is_a_rendezvous_config() -> None:
    args = parse("--no-mdns", "--listen", "127.0.0.1:0")
    config = build_config(args, resolve(args, environ={}))
    assert not config.mdns and config.bootstrap == ()
    assert config.listen == Address("127.0.0.1", 0)


def test_a_config_file_value_out_of_range_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "fedup.toml"
    cfg.write_text("max-laps = 0\n")
    with pytest.raises(ConfigError, match=r"max_laps in .*fedup.toml: must be >= 1 \(got 0\)"):
        resolve(parse("--config", str(cfg)), environ={})


# --- operational errors: one line, the fix, a non-zero exit, before joining anything ----


def fails_at_once(*argv: str) -> str:
    """Run ``fedup-peer ARGV`` (a rendezvous peer unless told otherwise, so that a check
    that did not happen leaves it waiting and the test times out); return its one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedup.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("fedup-peer: error: ")
    return lines[0].removeprefix("fedup-peer: error: ")


def rendezvous(state: Path, *extra: str) -> list[str]:
    return ["start", "--state-dir", str(state), "--no-mdns", *extra]


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = fails_at_once(*rendezvous(tmp_path, "--listen", f"127.0.0.1:{port}"))
    assert line == (
        f"cannot listen on 127.0.0.1:{port}: port {port} is in use by another program; "
        "pass another --listen port, or 0 to pick a free one"
    )


def test_an_address_the_host_does_not_have_is_one_line(tmp_path: Path) -> None:
    line = fails_at_once(*rendezvous(tmp_path, "--listen", "192.0.2.1:7000"))  # TEST-NET-1
    assert line == (
        "cannot listen on 192.0.2.1:7000: this host has no address 192.0.2.1; "
        "pass --listen with one of this host's addresses, or 0.0.0.0:7000"
    )


def test_an_output_folder_it_cannot_create_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "a-file" / "out"
    line = fails_at_once(*rendezvous(tmp_path / "state", "--out", str(out)))
    assert line.startswith(f"cannot create output directory {out}: ")
    assert line.endswith("; pass an --out where you can write")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux sysfs")
def test_an_output_folder_under_sysfs_is_one_line_for_start_and_simulate(tmp_path: Path) -> None:
    """Unwritable for every user, root included (the issue's 'unwritable place')."""
    out = "/sys/kernel/fedup-out"
    line = fails_at_once(*rendezvous(tmp_path, "--out", out))
    assert line.startswith(f"cannot create output directory {out}: ")
    line = fails_at_once("simulate", "--state-dir", str(tmp_path), "--peers", "2", "--out", out)
    assert line.startswith(f"cannot create output directory {out}: ")


def test_an_output_folder_of_another_run_or_user_is_one_line(tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    line = fails_at_once(*rendezvous(tmp_path / "state", "--out", str(used)))
    assert line == (
        f"output directory {used} already holds another run's files (summary.json); "
        "pass a new --out, or move them away"
    )
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")
    line = fails_at_once(*rendezvous(tmp_path / "state", "--out", str(theirs)))
    assert line.startswith(f"output directory {theirs} belongs to another user (uid ")


def test_a_state_directory_in_use_is_one_line_naming_the_process(tmp_path: Path) -> None:
    from fedup.state_lock import hold_state_dir

    with hold_state_dir(tmp_path):
        line = fails_at_once(*rendezvous(tmp_path))
    assert line == (
        f"state directory {tmp_path} is in use by another running peer (pid {os.getpid()}); "
        "stop it or pass another --state-dir"
    )


# --- a rendezvous peer: --no-mdns and no --bootstrap --------------------------------------


def test_a_rendezvous_peer_forms_a_federation_with_peers_that_bootstrap_to_it(
    tmp_path: Path,
) -> None:
    """One peer only listens (``--no-mdns``, no ``--bootstrap``); two others know only its
    address, so they learn of each other through it, and all three train one model."""
    (port,) = free_ports(1)
    tiny = ["--min-peers", "3", "--settle", "1", "--max-laps", "3", "--patience", "3"]
    base = [sys.executable, "-m", "fedup.cli", "start", "--no-mdns", *tiny]
    commands = [
        [*base, "--state-dir", str(tmp_path / "r"), "--listen", f"127.0.0.1:{port}"],
        *([*base, "--state-dir", str(tmp_path / f"j{i}"), "--listen", "127.0.0.1:0",
           "--bootstrap", f"127.0.0.1:{port}"] for i in range(2)),
    ]  # fmt: skip
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert len({o["model_sha256"] for o in outs}) == 1
    assert all(o["ok"] and o["laps"] >= 1 for o in outs)
    summaries = [json.loads((Path(o["out"]) / "summary.json").read_text()) for o in outs]
    assert len({s["run_id"] for s in summaries}) == 1
    assert {s["peer_id"] for s in summaries} == set(summaries[0]["members"])
    assert len(summaries[0]["members"]) == 3
    assert f"waits for peers that bootstrap to it: --bootstrap 127.0.0.1:{port}" in results[0][1]


def start_error(tmp_path: Path, *args: str) -> str:
    """The one line ``start`` prints for a data error (exit 1), before any network."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedup.cli", "start", "--state-dir", str(tmp_path / "state"),
         "--no-mdns", "--bootstrap", "127.0.0.1:9", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    return proc.stderr.strip()


def test_data_errors_of_drop_positive_label_and_size_are_one_line(tmp_path: Path) -> None:
    data = tmp_path / "loans.csv"
    data.write_text("id,income,status\n1,10,late\n2,20,ok\n3,30,ok\n4,40,late\n5,50,ok\n")
    line = start_error(tmp_path, "--data", str(data), "--target", "status", "--drop", "ID",
                       "--positive-label", "late")  # fmt: skip
    assert line.endswith(
        f"{data}: no column named 'ID'; the columns are 'id', 'income', 'status'"
    ), line
    line = start_error(tmp_path, "--data", str(data), "--target", "status",
                       "--positive-label", "Late")  # fmt: skip
    assert line.endswith(
        f"{data}: positive label 'Late' is not one of the target's values 'late', 'ok'; "
        "give one of them"
    ), line
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("x,default\n1,1\n")
    line = start_error(tmp_path, "--data", str(tiny))
    assert line.endswith(
        f"{tiny}: 1 row, too few to train: a peer needs at least 5 (a 20% share of each "
        "label is held out for validation); add rows"
    ), line


def test_drop_and_positive_label_come_from_every_source_of_settings(tmp_path: Path) -> None:
    args = parse("--drop", "id", "--drop", "note", "--positive-label", "late")
    values = resolve(args, environ={})
    assert values["drop"] == ["id", "note"] and values["positive_label"] == "late"
    env = resolve(parse(), environ={"FEDUP_DROP": "id,note", "FEDUP_POSITIVE_LABEL": "bad"})
    assert env["drop"] == ["id", "note"] and env["positive_label"] == "bad"
    assert resolve(parse(), environ={})["drop"] is None


# --- an interrupted run's state file: resumed, refused, or set aside with --fresh ---------

ALONE = ["--listen", "127.0.0.1:0", "--min-peers", "1", "--settle", "0", "--max-laps", "1",
         "--patience", "1"]  # fmt: skip
"""A federation of one: it forms at once and ends after a lap."""


def saved_run(state: Path, out_dir: Path, network: str = "fedup") -> bytes:
    """A run-state file of this state dir's peer, with a real view of it alone."""
    from fedup.identity import load_or_create_identity
    from fedup.protocol.records import PeerRecord
    from fedup.protocol.run_state import CustodyMemory, RunState, encode_run_state
    from fedup.protocol.view import MembershipView, RunSettings

    me = load_or_create_identity(state)
    record = PeerRecord(me.peer_id, 1, (Address("127.0.0.1", 4000),), network).seal(me)
    view = MembershipView(bytes(16), 0, me.peer_id, (record,), RunSettings(), {"cols": ["a"]})
    memory = CustodyMemory("waiting", 0, b"\x00" * 32, (), b"")
    run = RunState(network, me.peer_id, str(out_dir), view.seal(me).envelope, memory, None, "seen")
    data = encode_run_state(run)
    (state / "run-state.cbor").write_bytes(data)
    return data


def fresh_start(state: Path) -> str:
    """``start --fresh`` as a federation of one, to its end (exit 0); returns stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedup.cli", *rendezvous(state, "--fresh", *ALONE)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"]
    assert not os.path.lexists(state / "run-state.cbor")  # the new run ended: nothing to resume
    return proc.stderr


def test_a_corrupt_run_state_is_one_line_and_fresh_sets_it_aside(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    corrupt = b"FUPRUN\x00\x01" + bytes(32) + b"a body that does not match its digest"
    (state / "run-state.cbor").write_bytes(corrupt)
    line = fails_at_once(*rendezvous(state, *ALONE))
    assert line == (
        f"cannot resume the run saved in {state / 'run-state.cbor'}: it is truncated or "
        "corrupt (its digest does not match); pass --fresh to start a new run (the file "
        "is then set aside, not deleted)"
    )
    assert (state / "run-state.cbor").read_bytes() == corrupt  # refused, not touched
    err = fresh_start(state)
    aside = state / "runs" / "run-state.interrupted.cbor"  # unreadable: by the state dir
    assert f"--fresh: the interrupted run's state was moved to {aside}; starting a new run" in err
    assert aside.read_bytes() == corrupt
    assert "Traceback" not in err
    err = fresh_start(state)  # nothing to set aside now: a new run, nothing said about it
    assert "--fresh:" not in err
    assert aside.read_bytes() == corrupt


def test_fresh_sets_a_saved_run_aside_into_its_own_folder(tmp_path: Path) -> None:
    state, folder = tmp_path / "state", tmp_path / "old-run"
    data = saved_run(state, folder, network="elsewhere")
    line = fails_at_once(*rendezvous(state, *ALONE))
    assert line.startswith(f"cannot resume the run saved in {state / 'run-state.cbor'}: it is ")
    assert "a run of network 'elsewhere', and this peer is on 'fedup'; pass --fresh" in line
    data = saved_run(state, folder)  # this network's: --fresh puts it in its run's folder
    err = fresh_start(state)
    aside = folder / "run-state.interrupted.cbor"
    assert f"--fresh: the interrupted run's state was moved to {aside}; starting a new run" in err
    assert aside.read_bytes() == data
    (tmp_path / "a-file").write_text("x")  # a run folder that cannot take it: by the state dir
    data = saved_run(state, tmp_path / "a-file" / "run")
    err = fresh_start(state)
    aside = state / "runs" / "run-state.interrupted.cbor"
    assert f"--fresh: the interrupted run's state was moved to {aside}; starting a new run" in err
    assert aside.read_bytes() == data
