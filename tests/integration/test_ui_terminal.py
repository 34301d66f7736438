"""The terminal display as users see it: real commands in a pseudo-terminal, and their
plain lines in a pipe."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import attrs

from fedup.demo.peers import free_ports

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
COLUMNS, ROWS = 110, 40


@attrs.frozen
class Ran:
    returncode: int
    stdout: str
    stderr: str


def cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fedup.cli", *argv]


def run_in_a_terminal(argv: list[str], *, timeout: float = 240) -> Ran:
    """Run ``argv`` with stderr on a pseudo-terminal of COLUMNS x ROWS (stdout piped);
    return everything written to both."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(ROWS)}
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    assert proc.stdout is not None
    out, err = b"", b""
    deadline = time.monotonic() + timeout
    try:
        open_fds = {master, proc.stdout.fileno()}
        while open_fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_fds), [], [], 0.5)
            for fd in ready:
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:  # the terminal's other side closed
                    chunk = b""
                if not chunk:
                    open_fds.discard(fd)
                elif fd == master:
                    err += chunk
                else:
                    out += chunk
        returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return Ran(returncode, out.decode(), err.decode(errors="replace"))


def screen_text(raw: str) -> str:
    """What was drawn, without the terminal's control sequences."""
    return ANSI.sub("", raw).replace("\r", "")


def last_panel(raw: str) -> str:
    text = screen_text(raw)
    return "╭─ FedUp" + text.rsplit("╭─ FedUp", 1)[1]


def simulate(out: Path, *extra: str) -> list[str]:
    return cli(
        "simulate", "--peers", "3", "--rows", "200", "--max-laps", "2",
        "--state-dir", str(out.parent / "state"), "--out", str(out), *extra,
    )  # fmt: skip


def lap_results(out: Path) -> list[int]:
    report = json.loads((out / "report.json").read_text())
    assert report["simulation"]["finished"] == 3
    summary = next((out / "peers").glob("*/summary.json"))
    laps: list[int] = json.loads(summary.read_text())["federated_laps"]
    return laps


def test_simulate_on_a_terminal_draws_the_federation_live(tmp_path: Path) -> None:
    ran = run_in_a_terminal(simulate(tmp_path / "sim"))
    assert ran.returncode == 0, screen_text(ran.stderr)[-3000:]
    assert "\x1b[" in ran.stderr  # drawn, not logged
    panel = last_panel(ran.stderr)
    laps = lap_results(tmp_path / "sim")
    assert f"finished: max-laps after laps 0 to {max(laps)}" in panel
    assert "federated validation loss" in panel and "patience" in panel
    assert re.search(r"best (lap \d|the initial model)", panel)
    assert "ring of 3 members (3 alive)" in panel and panel.count("saved the model") == 3
    frames = screen_text(ran.stderr).split("╭─ FedUp")
    assert any("of at most 2)" in frame for frame in frames), "the lap of the maximum"
    # The result itself is on stdout, as it is without a terminal.
    assert "federated (FedUp ring)" in ran.stdout


def test_simulate_in_a_pipe_logs_one_plain_line_per_lap_result(tmp_path: Path) -> None:
    proc = subprocess.run(
        simulate(tmp_path / "sim", "--log-level", "info"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    laps = lap_results(tmp_path / "sim")
    progress = [line for line in proc.stderr.splitlines() if " INFO fedup.progress: " in line]
    # Every member notes every lap; the simulation's one board says each once.
    assert len(progress) == len(laps)
    for lap, line in zip(laps, progress, strict=True):
        name = "the initial model" if lap == -1 else f"lap {lap}"
        assert f"fedup.progress: {name}" in line and "federated validation loss" in line


def test_quiet_prints_only_the_result_and_log_level_chooses_the_lines(tmp_path: Path) -> None:
    quiet = run_in_a_terminal(simulate(tmp_path / "quiet", "--quiet"))
    assert quiet.returncode == 0
    assert quiet.stderr == ""  # no display, no log line, even on a terminal
    assert "federated (FedUp ring)" in quiet.stdout
    debug = subprocess.run(
        simulate(tmp_path / "debug", "--log-level", "debug"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert debug.returncode == 0
    assert " DEBUG " in debug.stderr and " INFO fedup.progress: " in debug.stderr
    default = subprocess.run(
        simulate(tmp_path / "default"), capture_output=True, text=True, timeout=240
    )
    assert default.returncode == 0
    assert " INFO " not in default.stderr and " DEBUG " not in default.stderr


def test_start_on_a_terminal_shows_its_ring_and_every_lap_on_every_member(
    tmp_path: Path,
) -> None:
    """Two real peers: one on a terminal (with the page), one in a pipe."""
    ports = free_ports(2)

    def start(i: int, *extra: str) -> list[str]:
        return cli(
            "start", "--state-dir", str(tmp_path / f"p{i}"), "--no-mdns",
            "--listen", f"127.0.0.1:{ports[i]}", "--bootstrap", f"127.0.0.1:{ports[1 - i]}",
            "--min-peers", "2", "--settle", "1", "--max-laps", "3", "--patience", "3", *extra,
        )  # fmt: skip

    piped = subprocess.Popen(start(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ran = run_in_a_terminal(start(0, "--ui", "0"))
        _, err = piped.communicate(timeout=240)
    finally:
        if piped.poll() is None:
            piped.kill()
            piped.wait()
    assert ran.returncode == 0, screen_text(ran.stderr)[-3000:]
    assert piped.returncode == 0, err[-3000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])
    laps = json.loads((Path(result["out"]) / "summary.json").read_text())["federated_laps"]
    text = screen_text(ran.stderr)
    assert re.search(r"federation page: http://127\.0\.0\.1:\d+/", text)
    panel = last_panel(ran.stderr)
    assert "finished: max-laps after laps 0 to 2" in panel
    assert f"127.0.0.1:{ports[0]}" in panel and f"127.0.0.1:{ports[1]}" in panel
    assert "this peer" in panel and "ring of 2 members" in panel
    # Off a terminal: no control characters, and a line for every lap on this member too.
    assert "\x1b" not in err and "\r" not in err
    progress = [line for line in err.splitlines() if " INFO fedup.progress: " in line]
    assert len(progress) == len(laps) == 4
    assert "lap 2 (3 of at most 3): federated validation loss" in progress[-1]
