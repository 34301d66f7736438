"""The federation page over real HTTP (hypercorn on trio, loopback only) and in a real
headless Chromium (the distribution's package; skipped, with the reason, without one)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from fedup.identity import Identity
from fedup.learn.loans import generate_lender, lender_seed
from fedup.peer import TabularSource
from fedup.peer import events as ev
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings
from fedup.sim import SimSettings, run_simulation
from fedup.ui.board import RunBoard
from fedup.ui.follow import follow
from fedup.ui.page import make_app
from fedup.ui.server import PageServer
from tests.chromium import chromium, find_chromium

NO_CHROMIUM = "no Chromium binary (apt-get install chromium) for the browser test"


def fetch(url: str, *, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def finished_run(tmp_path: Path) -> Path:
    """A real 3-member run (the simulator, virtual clock); one member's output folder."""
    sources = [
        TabularSource(generate_lender(lender_seed(0, i), 300).table, target="default")
        for i in range(3)
    ]
    settings = SimSettings(run=RunSettings(max_laps=4, patience=4))
    with trio.fail_after(10_000):
        result = await run_simulation(sources, tmp_path / "sim", settings)
    assert len(result.finished_peers) == 3
    return result.peers[0].out_dir


def _interruptible() -> None:
    """In the child: Ctrl-C's default action, even when the suite itself was started in
    the background of a script (which ignores SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_show_serves_a_finished_runs_page_from_its_files(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    folder = await finished_run(tmp_path)
    summary = json.loads((folder / "summary.json").read_text())
    show = subprocess.Popen(
        [sys.executable, "-m", "fedup.cli", "show", str(folder), "--ui", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_interruptible,
    )  # fmt: skip
    try:
        assert show.stdout is not None
        line = show.stdout.readline()  # blocks until it serves (or exits)
        assert line.startswith(f"federation page of {folder}: http://127.0.0.1:"), line
        url = line.split(": ", 1)[1].split()[0]
        status, body = fetch(url + "state")
        assert status == 200
        state = json.loads(body)
        assert state["live"] is False and state["stage"] == "finished"
        assert [m["id"] for m in state["members"]] == summary["members"]
        federation = json.loads((folder / "federation.json").read_text())
        assert all(m["addresses"] for m in state["members"])  # from federation.json
        assert {m["id"]: m["addresses"] for m in state["members"]} == federation["addresses"]
        assert [lap[0] for lap in state["laps"]] == summary["federated_laps"]
        assert [lap[1] for lap in state["laps"]] == pytest.approx(summary["federated_val_loss"])
        assert state["progress"]["best_lap"] == summary["best_lap"]
        assert state["outcome"]["stop_reason"] == summary["stop_reason"]
        me = next(m for m in state["members"] if m["me"])
        assert me["id"] == summary["peer_id"] and me["hops"]
        assert all(not m["hops"] for m in state["members"] if not m["me"])  # not ours to know
        assert set(state["files"]) >= {"summary.json", "federation.json", "metrics.jsonl"}
        status, body = fetch(url + "files/summary.json")
        assert status == 200 and body == (folder / "summary.json").read_bytes()
        assert fetch(url + "files/summary.json", method="POST")[0] == 405
        status, page = fetch(url)
        assert status == 200 and b"app.js" in page
        if find_chromium() is not None:
            with chromium(tmp_path / "profile") as browser:
                browser.open(url)
                assert (
                    browser.wait_for("document.querySelectorAll('#ring circle.member').length") == 3
                )
                laps = browser.wait_for(
                    "document.querySelector('#curve svg[data-laps]')?.dataset.laps"
                )
                assert int(laps) == len(summary["federated_laps"])
                browser.wait_for("document.getElementById('status').textContent.includes('last')")
    finally:
        show.send_signal(signal.SIGINT)
        try:
            show.wait(timeout=30)
        except subprocess.TimeoutExpired:
            show.kill()
            show.wait()
    assert show.returncode == 130  # interrupted: the way to stop it


def identity(i: int) -> Identity:
    return Identity(bytes([i + 1]) * 32)


@pytest.mark.skipif(find_chromium() is None, reason=NO_CHROMIUM)
async def test_the_page_draws_a_live_peer_and_a_new_lap_appears_without_reloading(
    tmp_path: Path,
) -> None:
    members = sorted((identity(i).peer_id for i in range(3)), key=lambda p: p.raw)
    me = members[1]
    hub = ev.EventHub(me)
    board = RunBoard(me=me.text)
    settings = RunSettings(max_laps=20, patience=5)
    addresses = tuple((Address("127.0.0.1", 7000 + i),) for i in range(3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow, board, me, hub.subscribe(64))
        app = make_app(board, folder=lambda: None)
        url = await PageServer(app, Address("127.0.0.1", 0)).start(nursery)
        # What a running member's hub says: the federation formed, laps closed, hops trained.
        hub.emit(ev.Formed(b"\x07" * 16, 0, members[0], tuple(members), addresses, settings))
        for lap, loss in enumerate([0.70, 0.62, 0.58], start=-1):
            hub.emit(ev.LapNoted(lap, loss, 0.7, 0.75, 100 * (lap + 1)))
            hub.emit(ev.Training(lap + 1, 1))
            hub.emit(ev.HopTrained(lap + 1, 1, 64, loss - 0.05, 0.1))
            hub.emit(ev.HandedOver("ring", members[2], lap + 1, 2, 4096))
        await trio.testing.wait_all_tasks_blocked()

        def look(browser: Any) -> None:
            browser.open(url)
            browser.wait_for("document.querySelectorAll('#ring circle.member').length === 3")
            holder = browser.evaluate("document.querySelector('#ring circle.holder').dataset.id")
            assert holder == members[2].text
            browser.wait_for("document.querySelector('#curve svg')?.dataset.laps === '3'")
            assert browser.evaluate("document.querySelector('#curve path.federated') !== null")
            assert browser.evaluate("document.querySelector('#curve svg').dataset.hops") == "3"
            assert "127.0.0.1:7002" in browser.evaluate("document.body.innerText")
            browser.evaluate("window.sameDocument = true")  # a reload would forget it

        def look_again(browser: Any) -> None:
            browser.wait_for("document.querySelector('#laps tr[data-lap=\"2\"]') !== null")
            assert browser.evaluate("document.querySelector('#curve svg').dataset.laps") == "4"
            assert browser.evaluate("document.getElementById('best').textContent") == "2"
            assert browser.evaluate("window.sameDocument") is True
            browser.screenshot(tmp_path / "page.png")

        with chromium(tmp_path / "profile") as browser:
            await trio.to_thread.run_sync(look, browser)
            hub.emit(ev.LapNoted(2, 0.51, 0.8, 0.81, 300))  # a new lap, while it watches
            await trio.to_thread.run_sync(look_again, browser)
        assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        nursery.cancel_scope.cancel()
