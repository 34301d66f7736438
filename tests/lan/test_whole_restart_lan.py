"""A whole LAN federation killed mid-run and started again resumes its run.

Four network namespaces ("hosts") on a bridge run the real ``fedup-peer start``
with zero configuration, as in tests/lan/test_restart_lan.py.  Once every member
has trained hops of three laps, in the middle of the fourth (once its second hop
is trained), all four process groups are killed with SIGKILL at once (no goodbye,
nothing flushed); some 2 s later the four are started again with the very same
command lines and ``--state-dir``s.
docs/reliability.md promises (issue 12, "all members killed at once"): each
resumes from what it saved, so the four end with one identical model, each in
the run it was killed in (the same run ID and output folder), and the run goes
on from where it was rather than starting again: the laps trained after the
restart follow the laps reached before it, and at most one position (lap, hop)
is trained twice (a hop trained but not yet handed on, or not yet saved as
trained, is trained again; no more work is lost).

A variant brings the four back a few seconds apart, the member that trained last
first: the first back may count one member dead (not more: two of four is no
majority), and the run must still end as one, with one model and all exiting 0.

SAFETY: every process here runs in a namespace from the ``netns`` fixture
(tests/lan/conftest.py); nothing multicasts on the machine's interfaces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest

from fedup.config import Limits
from fedup.peer.run_state_file import max_run_state_size
from fedup.protocol.run_state import decode_run_state
from tests.lan.conftest import Netns
from tests.lan.test_restart_lan import (
    DOWN,
    FINISH_TIMEOUT,
    OPTIONS,
    RESUMED,
    SEEDS,
    TRAINING_TIMEOUT,
    federation,
    hop_lines,
    listening_on,
    run_folder,
    wait_until,
)
from tests.lan.test_start_lan import Host, Result, check_identical_models, finish, make_hosts
from tests.lan.test_start_lan import start as start_peer

pytestmark = pytest.mark.netns

Procs = list[tuple[Host, subprocess.Popen[bytes]]]

FULL_LAPS = 3
"""Laps every member must have trained a hop of before the kill: mid-run (of 50 laps),
and late enough that a run started again from lap 0 could not pass the lap check."""
APART = 2.0
"""Seconds between two members' restarts in the staggered variant (0, 2, 4, 6 s)."""


@attrs.frozen
class Killed:
    """What the federation had done when it was killed."""

    run_id: str
    outs: dict[Host, Path]
    """Each member's run folder, ``<state>/runs/<run id>``."""
    hops: dict[Host, list[dict[str, Any]]]
    """Each member's hop lines at the kill (whole lines only)."""
    phases: dict[Host, str]
    """The phase each member's run-state file had saved at the kill."""

    def full_lap(self) -> int:
        """The highest lap every member had trained a hop of."""
        laps = [{h["lap"] for h in lines} for lines in self.hops.values()]
        return int(max(set.intersection(*laps)))

    def holder(self) -> Host:
        """The member that held the model at the kill: the one training it, else the one
        handing it on (both if the model was passing from one to the next)."""
        for phase in ("training", "handing"):
            for host, saved in self.phases.items():
                if saved == phase:
                    return host
        raise AssertionError(f"nobody held the model at the kill: {self.phases}")


def full_laps(outs: dict[Host, Path]) -> int:
    """How many laps every member has a hop line of."""
    laps = [{h["lap"] for h in hop_lines(out)} for out in outs.values()]
    return len(set.intersection(*laps))


def saved_phase(host: Host) -> str:
    """The phase ``host``'s run-state file saved (what it resumes in)."""
    data = (host.state / "run-state.cbor").read_bytes()
    return decode_run_state(data, max_size=max_run_state_size(Limits())).custody.phase


def kill_all_mid_run(netns: Netns, hosts: list[Host]) -> tuple[Procs, Killed]:
    """Start the four, wait until each trained hops of ``FULL_LAPS`` laps and the second in
    the ring its hop of the next, and kill all four at once."""
    procs = [(h, start_peer(netns, h, *OPTIONS)) for h in hosts]
    fed = federation(procs)
    assert sorted(fed["members"]) == sorted(h.peer_id for h in hosts), fed["members"]
    outs = {
        h: wait_until(f"{h.ns}'s run folder", lambda h=h: run_folder(h), procs, TRAINING_TIMEOUT)
        for h in hosts
    }
    second = outs[sorted(hosts, key=lambda h: h.peer_id)[1]]  # ring order: by peer ID
    wait_until(
        f"{FULL_LAPS} laps trained by every member",
        lambda: full_laps(outs) >= FULL_LAPS or None,
        procs,
        TRAINING_TIMEOUT,
    )
    # Mid-lap: as soon as the second member has trained its hop of the next lap, while
    # it hands the model on (or has just handed it on).
    wait_until(
        f"hop 1 of lap {FULL_LAPS}",
        lambda: any((h["lap"], h["hop"]) == (FULL_LAPS, 1) for h in hop_lines(second)) or None,
        procs,
        60,
    )
    for _, proc in procs:  # all four at once: no member learns of another's end
        os.killpg(proc.pid, signal.SIGKILL)
    for host, proc in procs:
        assert proc.wait(timeout=10) == -signal.SIGKILL, f"{host.ns} ended before the kill"
    for host, out in outs.items():  # mid-run: nobody had finished
        assert not (out / "summary.json").exists(), f"{host.ns} finished before the kill"
        assert (host.state / "run-state.cbor").exists(), f"{host.ns} saved no run"
    hops = {h: hop_lines(out) for h, out in outs.items()}
    killed = Killed(fed["run_id"], outs, hops, {h: saved_phase(h) for h in hosts})
    return procs, killed


def restart_all(netns: Netns, procs: Procs, order: list[Host], apart: float) -> Procs:
    """Start each member again with the very command it had, logging to ``<state>/restart``,
    in ``order``, ``apart`` seconds one after the other (after ``DOWN`` s)."""
    time.sleep(DOWN)
    first = dict(procs)
    again = {}
    for i, host in enumerate(order):
        if i:
            time.sleep(apart)
        again[host] = start_peer(netns, host, *OPTIONS, log=host.state / "restart")
        assert again[host].args == first[host].args
    return [(h, again[h]) for h, _ in procs]


def finish_restarted(procs: Procs) -> list[Result]:
    return finish(procs, FINISH_TIMEOUT, logs={h: h.state / "restart" for h, _ in procs})


def check_same_run(killed: Killed, results: list[Result]) -> None:
    """One model for all four; each resumed the run it was killed in, where others dial it."""
    for r in results:
        assert "Traceback" not in r.stderr, r.tail(60)
        assert RESUMED in r.stderr, f"{r.host.ns} did not resume:\n{r.tail()}"
        before = (r.host.state / "start.err").read_text(errors="replace")
        assert listening_on(r.stderr) == listening_on(before), r.host.ns
    summaries = check_identical_models(results)
    for r, s in zip(results, summaries, strict=True):
        assert s["run_id"] == killed.run_id, (r.host.ns, s["run_id"], killed.run_id)
        assert Path(r.last_json()["out"]) == killed.outs[r.host]  # the same run folder
        assert not (r.host.state / "run-state.cbor").exists(), f"{r.host.ns} kept its run state"


def test_the_whole_federation_killed_at_once_resumes_its_run(netns: Netns, tmp_path: Path) -> None:
    hosts = make_hosts(netns, tmp_path, SEEDS)
    procs, killed = kill_all_mid_run(netns, hosts)
    results = finish_restarted(restart_all(netns, procs, hosts, apart=0.0))
    check_same_run(killed, results)

    before = [(h["lap"], h["hop"]) for lines in killed.hops.values() for h in lines]
    after_by = {h: hop_lines(out)[len(killed.hops[h]) :] for h, out in killed.outs.items()}
    after = [(h["lap"], h["hop"]) for lines in after_by.values() for h in lines]
    assert after, "nobody trained after the restart"
    # Resumed, not started again: the first lap trained after the restart follows the
    # laps the ring had completed before the kill.
    first_lap = min(lap for lap, _ in after)
    assert first_lap >= killed.full_lap() - 1, (killed.full_lap(), sorted(after)[:8])
    # At most one hop of work lost: at most one position trained twice, by anyone.
    twice = {p: n for p, n in Counter(before + after).items() if n > 1}
    assert len(twice) <= 1 and all(n == 2 for n in twice.values()), twice
    assert len(before) == len(set(before)), "a position trained twice before the kill"


def test_the_whole_federation_restarted_seconds_apart_finishes_as_one(
    netns: Netns, tmp_path: Path
) -> None:
    hosts = make_hosts(netns, tmp_path, SEEDS)
    procs, killed = kill_all_mid_run(netns, hosts)
    # The member that held the model comes back first, then the others in ring order:
    # it hands the model on to a member that is not back yet.
    ring = sorted(hosts, key=lambda h: h.peer_id)
    at = ring.index(killed.holder())
    results = finish_restarted(restart_all(netns, procs, ring[at:] + ring[:at], APART))
    check_same_run(killed, results)
