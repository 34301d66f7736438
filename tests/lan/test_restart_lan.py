"""A member of a LAN federation killed mid-run and started again rejoins the run.

Four network namespaces ("hosts") on a bridge run the real ``fedup-peer start``
with zero configuration, as in tests/lan/test_start_lan.py.  Once the federation
trains, one member is killed with SIGKILL (no goodbye, nothing flushed), stays
down a moment, and is started again with the same command line and the same
``--state-dir``.  It must resume the interrupted run by itself (issue 12): the
four processes end with one identical model, and the restarted one trains hops
of laps after the one it was killed in.

SAFETY: every process here runs in a namespace from the ``netns`` fixture
(tests/lan/conftest.py); nothing multicasts on the machine's interfaces.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest

from tests.lan.conftest import Netns
from tests.lan.test_start_lan import Host, Result, check_identical_models, finish, make_hosts
from tests.lan.test_start_lan import start as start_peer

pytestmark = pytest.mark.netns

SEEDS = (1, 2, 10, 3)
"""Four lenders (the first three as in test_start_lan)."""
OPTIONS = ("--min-peers", "4", "--settle", "2",
           "--max-laps", "50", "--patience", "50", "--local-epochs", "20")  # fmt: skip
"""Zero configuration as in test_start_lan, and a run that outlasts the restarted peer's
way back (2 s down, some 5 s to start): 50 laps that patience cannot cut short, of hops
of 20 passes over a member's rows (200 steps, some 0.2 s on two busy CPUs, where
test_start_lan's hops take one step and its laps some 30 ms)."""
RESUMED = "resuming run"
"""What the restarted peer's log says when it takes up the run it was killed in."""
TRAINING_TIMEOUT = 120.0
"""Seconds for the federation to form and the victim to train its first hop."""
DOWN = 2.0
"""Seconds the killed peer stays down before it is started again."""
FINISH_TIMEOUT = 120.0
"""Seconds, after the restart, for all four to finish (the run takes under a minute)."""

T = TypeVar("T")


@attrs.frozen
class Kill:
    """What a killed member had done when it was killed."""

    host: Host
    out: Path
    """Its run's output folder, ``<state>/runs/<run id>``."""
    hops: int
    """Hop lines in its ``metrics.jsonl``."""
    last_lap: int
    """The highest lap it had trained a hop of."""


def wait_until(
    what: str,
    found: Callable[[], T | None],
    procs: list[tuple[Host, subprocess.Popen[bytes]]],
    timeout: float,
) -> T:
    """Poll ``found`` until it gives a value; fail if any process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value is not None:
            return value
        for host, proc in procs:
            if proc.poll() is not None:
                err = (host.state / "start.err").read_text(errors="replace")
                tail = "\n".join(err.splitlines()[-25:])
                pytest.fail(f"{host.ns} exited {proc.returncode} while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.1)


def run_folder(host: Host) -> Path | None:
    """The host's run folder once the run's ``federation.json`` is written there."""
    found = sorted((host.state / "runs").glob("*/federation.json"))
    assert len(found) <= 1, found  # a fresh state dir: one run at most
    return found[0].parent if found else None


def hop_lines(out: Path) -> list[dict[str, Any]]:
    """The ``"hop"`` lines of ``metrics.jsonl`` (only whole lines: it may be being written)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    lines = [json.loads(line) for line in text.split("\n")[:-1] if line]
    return [line for line in lines if line["type"] == "hop"]


def federation(procs: list[tuple[Host, subprocess.Popen[bytes]]]) -> dict[str, Any]:
    """``federation.json`` of the first member to start training."""

    def any_federation() -> dict[str, Any] | None:
        for host, _ in procs:
            out = run_folder(host)
            if out is not None:
                data: dict[str, Any] = json.loads((out / "federation.json").read_text())
                return data
        return None

    return wait_until("federation.json", any_federation, procs, TRAINING_TIMEOUT)


def kill_after_a_hop(procs: list[tuple[Host, subprocess.Popen[bytes]]], victim: Host) -> Kill:
    """SIGKILL ``victim``'s process group once it has trained a hop, mid-run."""
    proc = dict(procs)[victim]
    out = wait_until("the victim's run folder", lambda: run_folder(victim), procs, TRAINING_TIMEOUT)
    wait_until("a hop by the victim", lambda: hop_lines(out) or None, procs, TRAINING_TIMEOUT)
    # mid-run: nobody has ended (wait_until checked), the victim has no summary yet
    assert not (out / "summary.json").exists(), "the victim finished before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    hops = hop_lines(out)  # it may have logged another since
    survivors = [(h, p) for h, p in procs if h != victim]
    assert all(p.poll() is None for _, p in survivors), "the run ended at the kill"
    return Kill(victim, out, len(hops), max(h["lap"] for h in hops))


def restart(
    netns: Netns, procs: list[tuple[Host, subprocess.Popen[bytes]]], victim: Host
) -> list[tuple[Host, subprocess.Popen[bytes]]]:
    """Start ``victim`` again with the very command it had, logging to ``<state>/restart``."""
    time.sleep(DOWN)
    first = dict(procs)[victim]
    again = start_peer(netns, victim, *OPTIONS, log=victim.state / "restart")
    assert again.args == first.args
    return [(h, again if h == victim else p) for h, p in procs]


def kill_and_restart(
    netns: Netns, tmp_path: Path, choose: Callable[[list[Host], dict[str, Any]], Host]
) -> tuple[Kill, list[Result]]:
    """Start four hosts, kill the one ``choose`` picks (from the hosts and
    ``federation.json``) after its first hop, restart it, and wait for all four."""
    hosts = make_hosts(netns, tmp_path, SEEDS)
    procs = [(h, start_peer(netns, h, *OPTIONS)) for h in hosts]
    fed = federation(procs)
    assert sorted(fed["members"]) == sorted(h.peer_id for h in hosts), fed["members"]
    kill = kill_after_a_hop(procs, choose(hosts, fed))
    procs = restart(netns, procs, kill.host)
    return kill, finish(procs, FINISH_TIMEOUT, logs={kill.host: kill.host.state / "restart"})


def listening_on(log: str) -> str:
    """The ``address:port`` a peer's log says it listens on."""
    found = re.search(r" listening on (\S+)", log)
    assert found, log[-2000:]
    return found[1]


def check_rejoined(kill: Kill, results: list[Result]) -> None:
    """One model for all four; the restarted member resumed its run and trained again."""
    (restarted,) = [r for r in results if r.host == kill.host]
    assert "Traceback" not in restarted.stderr, restarted.tail(60)
    assert RESUMED in restarted.stderr, restarted.tail()
    before = (kill.host.state / "start.err").read_text(errors="replace")
    assert listening_on(restarted.stderr) == listening_on(before)  # where the others dial it
    check_identical_models(results)
    assert Path(restarted.last_json()["out"]) == kill.out  # the same run, not a new one
    hops = hop_lines(kill.out)
    assert len(hops) > kill.hops, (kill, hops)
    assert max(h["lap"] for h in hops) > kill.last_lap, (kill, hops)


def test_a_member_killed_mid_run_and_restarted_rejoins(netns: Netns, tmp_path: Path) -> None:
    def neither_leader_nor_head(hosts: list[Host], fed: dict[str, Any]) -> Host:
        spared = {fed["leader"], min(fed["members"])}
        return next(h for h in hosts if h.peer_id not in spared)

    check_rejoined(*kill_and_restart(netns, tmp_path, neither_leader_nor_head))


def test_the_leader_killed_mid_run_and_restarted_rejoins(netns: Netns, tmp_path: Path) -> None:
    # The drawn leader signed the view every member trains under: the run must go on
    # without it and take it back.  When the draw chose the ring head (the lowest peer
    # ID, which starts every lap) this also covers killing and restarting the head.
    def leader(hosts: list[Host], fed: dict[str, Any]) -> Host:
        return next(h for h in hosts if h.peer_id == fed["leader"])

    check_rejoined(*kill_and_restart(netns, tmp_path, leader))
