"""The federation page's ASGI app, driven directly (no socket): routes, the event stream,
its bounds, and what it refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from fedup.config import Limits
from fedup.ui.board import LapPoint, RunBoard
from fedup.ui.page import allowed_hosts, host_allowed, make_app

A, B = "12D3KooWAaaaaaaaaaaa", "12D3KooWBbbbbbbbbbbb"

Message = dict[str, Any]


def board_with_a_run() -> RunBoard:
    board = RunBoard(me=A)
    board.formed(
        run_id="cd" * 16,
        epoch=0,
        leader=A,
        members=[A, B],
        addresses={A: ["127.0.0.1:7000"], B: ["127.0.0.1:7001"]},
        settings={"max_laps": 5, "patience": 3, "tolerance": 0.0},
    )
    board.lap_noted(LapPoint(-1, 0.9, 0.5, 0.5, 0))
    board.hop_trained(A, 0, 0, 0.8)
    return board


def scope(path: str, method: str = "GET", host: bytes = b"127.0.0.1:8000") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", host)],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


class Viewer:
    """One request to the app: what it sent, and a way to hang up."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.arrived = trio.Event()
        self._gone = trio.Event()

    async def receive(self) -> Message:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        self.arrived.set()

    def hang_up(self) -> None:
        self._gone.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.sent[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def events(self) -> list[tuple[str, Any]]:
        out = []
        for block in self.body.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in lines:
                out.append((lines["event"], json.loads(lines["data"])))
        return out


async def get(app: Callable[..., Any], path: str, **kw: Any) -> Viewer:
    viewer = Viewer()
    await app(scope(path, **kw), viewer.receive, viewer.send)
    return viewer


async def test_the_page_and_its_state_are_served_with_a_strict_policy() -> None:
    app = make_app(board_with_a_run(), folder=lambda: None)
    page = await get(app, "/")
    assert page.status == 200 and b'<script src="app.js"' in page.body
    assert page.headers[b"content-type"].startswith(b"text/html")
    policy = page.headers[b"content-security-policy"]
    assert b"default-src 'none'" in policy and b"script-src 'self'" in policy
    assert page.headers[b"x-frame-options"] == b"DENY"
    script = await get(app, "/app.js")
    assert script.status == 200 and b"EventSource" in script.body
    assert b"innerHTML" not in script.body  # text from the server is never parsed as HTML
    assert b"http" not in script.body.replace(b"http://www.w3.org/2000/svg", b"")
    state = await get(app, "/state")
    value = json.loads(state.body)
    assert [m["id"] for m in value["members"]] == [A, B]
    assert value["members"][1]["addresses"] == ["127.0.0.1:7001"]
    assert value["laps"] == [[-1, 0.9, 0.5, 0.5]]


async def test_it_is_read_only_and_answers_only_its_own_host() -> None:
    app = make_app(board_with_a_run(), folder=lambda: None, host="127.0.0.1")
    for method in ("POST", "PUT", "DELETE"):
        assert (await get(app, "/state", method=method)).status == 405
    assert (await get(app, "/state", host=b"localhost:8000")).status == 200
    assert (await get(app, "/state", host=b"attacker.example:8000")).status == 400
    assert (await get(app, "/nothing")).status == 404
    assert allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost"]
    assert allowed_hosts("192.168.1.5") == ["192.168.1.5"]
    assert allowed_hosts("0.0.0.0") == ["*"]


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "::1", "127.0.0.1"])
async def test_a_domain_name_never_reads_the_page_whatever_the_bind(bind: str) -> None:
    """DNS rebinding needs a domain name: refused for every bind, IPv6 and all-address
    binds included (Starlette's host check let any Host through for those)."""
    app = make_app(board_with_a_run(), folder=lambda: None, host=bind)
    assert (await get(app, "/state", host=b"attacker.example:8000")).status == 400
    assert (await get(app, "/state", host=b"attacker.example")).status == 400
    literal = b"[::1]:8000" if ":" in bind else b"127.0.0.1:8000"
    assert (await get(app, "/state", host=literal)).status == 200
    assert host_allowed("::1", "[::1]:8000") and not host_allowed("::1", "[::2]:8000")
    assert host_allowed("0.0.0.0", "10.1.2.3:80") and not host_allowed("0.0.0.0", "x.example")
    assert not host_allowed("192.168.1.5", "localhost:80")


async def test_the_event_stream_sends_the_board_then_only_what_is_new_then_ends() -> None:
    board = board_with_a_run()
    limits = Limits(ui_update_interval=0.0)
    app = make_app(board, folder=lambda: None, limits=limits)
    viewer = Viewer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope("/events"), viewer.receive, viewer.send)
        await trio.testing.wait_all_tasks_blocked()
        assert viewer.status == 200
        assert viewer.headers[b"content-type"].startswith(b"text/event-stream")
        [(kind, first)] = viewer.events()
        assert kind == "board" and len(first["laps"]) == 1 and first["members"][0]["hops"]
        board.lap_noted(LapPoint(0, 0.7, 0.6, 0.6, 64))
        await trio.testing.wait_all_tasks_blocked()
        kind, second = viewer.events()[-1]
        assert second["laps_from"] == 1 and second["laps"] == [[0, 0.7, 0.6, 0.6]]
        assert second["members"][0]["hops"] == []  # nothing new: not sent again
        board.close()
    assert [kind for kind, _ in viewer.events()][-1] == "end"
    assert viewer.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_viewers_are_bounded_and_one_that_leaves_frees_its_place() -> None:
    board = board_with_a_run()
    app = make_app(board, folder=lambda: None, limits=Limits(ui_max_viewers=2))
    first, second = Viewer(), Viewer()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope("/events"), first.receive, first.send)
        nursery.start_soon(app, scope("/events"), second.receive, second.send)
        await trio.testing.wait_all_tasks_blocked()
        third = await get(app, "/events")
        assert third.status == 503 and b"2 viewers" in third.body
        first.hang_up()
        await trio.testing.wait_all_tasks_blocked()
        fourth = Viewer()
        nursery.start_soon(app, scope("/events"), fourth.receive, fourth.send)
        await trio.testing.wait_all_tasks_blocked()
        assert fourth.status == 200
        nursery.cancel_scope.cancel()


async def test_a_viewer_that_stops_reading_is_dropped(autojump_clock: Any) -> None:
    board = board_with_a_run()
    limits = Limits(ui_max_viewers=1, ui_send_timeout=5.0, ui_update_interval=0.0)
    app = make_app(board, folder=lambda: None, limits=limits)
    stuck = Viewer()

    async def never_taken(message: Message) -> None:
        if message.get("body"):
            await trio.sleep_forever()
        await stuck.send(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(app, scope("/events"), stuck.receive, never_taken)
        await trio.sleep(4.0)
        assert (await get(app, "/events")).status == 503  # still holds the only place
        await trio.sleep(2.0)  # past ui_send_timeout: dropped
        fresh = Viewer()
        nursery.start_soon(app, scope("/events"), fresh.receive, fresh.send)
        await trio.sleep(0.1)
        assert fresh.status == 200
        nursery.cancel_scope.cancel()


async def test_only_the_runs_own_files_are_served_and_never_through_a_link(
    tmp_path: Path,
) -> None:
    board = board_with_a_run()
    (tmp_path / "summary.json").write_text('{"ok": true}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 200_000)
    (tmp_path / "secret.txt").write_text("not for the page")
    os.symlink(tmp_path / "secret.txt", tmp_path / "metrics.jsonl")
    board.set_files(["summary.json", "model.safetensors", "metrics.jsonl"])
    app = make_app(board, folder=lambda: tmp_path)
    summary = await get(app, "/files/summary.json")
    assert summary.status == 200 and summary.body == b'{"ok": true}'
    assert summary.headers[b"content-type"].startswith(b"application/json")
    model = await get(app, "/files/model.safetensors")
    assert model.status == 200 and len(model.body) == 200_000
    assert model.headers[b"content-disposition"] == b'attachment; filename="model.safetensors"'
    head = await get(app, "/files/model.safetensors", method="HEAD")
    assert head.status == 200 and head.headers[b"content-length"] == b"200000"
    assert head.body == b""
    for name in ("metrics.jsonl", "secret.txt", "..%2Fsecret.txt", "federation.json"):
        assert (await get(app, f"/files/{name}")).status == 404, name


def test_the_page_of_a_finished_run_needs_no_torch() -> None:
    code = (
        "import sys, fedup.cli, fedup.commands.show, fedup.ui.folder, fedup.ui.page, "
        "fedup.ui.server; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
