"""The run board (fedup.ui.board) and a run's folder read onto it (fedup.ui.folder)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fedup.errors import ConfigError
from fedup.protocol.laps import LapRecord, StopState
from fedup.ui.board import Cursor, LapPoint, RunBoard
from fedup.ui.folder import RunFolder, load_run

A, B, C = "12D3KooWAaaaaaaaaaaa", "12D3KooWBbbbbbbbbbbb", "12D3KooWCccccccccccc"
SETTINGS = {"max_laps": 10, "patience": 2, "tolerance": 0.01}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def formed(board: RunBoard) -> None:
    board.formed(
        run_id="ab" * 16,
        epoch=0,
        leader=A,
        members=[A, B, C],
        addresses={A: ["10.0.0.1:7000"]},
        settings=SETTINGS,
    )


def lap(n: int, loss: float) -> LapPoint:
    return LapPoint(n, loss, 0.8, 0.7, 100 * (n + 1))


def test_best_lap_and_patience_are_the_stopping_rules_own() -> None:
    board = RunBoard(me=A)
    formed(board)
    losses = [0.9, 0.7, 0.695, 0.71, 0.5, 0.6, 0.55]
    state = StopState()
    for n, loss in enumerate(losses, start=-1):
        board.lap_noted(lap(n, loss))
        state, _ = state.judge(LapRecord(n, loss, 0.8, 0.7, 0, 0), tolerance=0.01)
        p = board.progress()
        assert p.best is not None and p.best.lap == state.best_lap
        assert p.patience_left == max(0, 2 - state.stale)
    # 0.695 is better than 0.7, but by less than the tolerance: lap 1 is the best lap, and
    # the stale count kept running until lap 3 improved.
    assert board.progress().best == lap(3, 0.5)
    assert board.progress().patience_left == 0


def test_each_lap_counts_once_and_is_told_once_in_one_line() -> None:
    board = RunBoard(me=A)
    formed(board)
    lines: list[str] = []
    board.on_lap(lambda point, line: lines.append(line))
    for _ in range(3):  # every simulated member notes every lap
        board.lap_noted(lap(-1, 0.9))
        board.lap_noted(lap(0, 0.8))
    assert [p.lap for p in board.laps] == [-1, 0]
    assert len(lines) == 2
    assert lines[0].startswith("the initial model: federated validation loss 0.9000")
    assert lines[1].startswith("lap 0 (1 of at most 10): federated validation loss 0.8000")
    assert "best so far lap 0 (0.8000), patience 2 of 2 left" in lines[1]
    assert all("\n" not in line and "\x1b" not in line for line in lines)


def test_the_model_is_where_it_was_last_seen_and_the_lap_follows_it() -> None:
    board = RunBoard(me=A)
    formed(board)
    assert board.progress().lap is None
    board.training(A, 0, 0)
    assert board.place is not None and (board.place.holder, board.place.doing) == (A, "training")
    board.hop_trained(A, 0, 0, 0.61)
    board.handed_over(B, "ring", 0, 1)
    assert (board.place.holder, board.place.lap, board.place.hop) == (B, 0, 1)
    board.handed_over(C, "ring", 0, 0)  # an older position never moves it back
    assert board.place.holder == B
    board.hop_trained(A, 1, 0, math.nan)  # an evaluation-only hop is no curve point
    assert [h.loss for h in board.members[A].hops] == [0.61]
    assert board.progress().lap == 1
    board.finished(A, "converged", A, "f" * 64)
    assert board.place.doing == "final" and board.place.holder is None
    assert board.stage == "finished" and board.members[A].finished


def test_time_left_is_the_pace_so_far_for_the_laps_that_remain() -> None:
    clock = Clock()
    board = RunBoard(me=A, clock=clock)
    formed(board)
    board.training(A, 0, 0)
    assert board.progress().eta is None  # nothing timed yet
    clock.now += 30
    board.training(A, 1, 0)
    clock.now += 10
    p = board.progress()
    # 30 s a lap; laps 1..10 (the last only evaluates) are 10 more laps, 10 s of them done.
    assert p.eta == pytest.approx(10 * 30 - 10)
    assert p.elapsed == pytest.approx(40)
    board.close()
    assert board.progress().eta is None


def test_updates_send_only_the_new_laps_and_hops() -> None:
    board = RunBoard(me=A)
    formed(board)
    board.lap_noted(lap(-1, 0.9))
    board.hop_trained(A, 0, 0, 0.7)
    first, cursor = board.update(Cursor())
    assert first["laps"] == [[-1, 0.9, 0.8, 0.7]] and first["laps_from"] == 0
    board.lap_noted(LapPoint(0, 0.8, 0.81, math.nan, 200))
    board.hop_trained(A, 1, 0, 0.65)
    second, cursor = board.update(cursor)
    assert second["laps_from"] == 1 and second["laps"] == [[0, 0.8, 0.81, None]]
    me = next(m for m in second["members"] if m["me"])
    assert me["hops_from"] == 1 and me["hops"] == [[1, 0, 0.65]]
    assert [m["id"] for m in second["members"]] == [A, B, C]
    json.dumps(board.snapshot(), allow_nan=False)  # JSON as the page needs it
    # A viewer whose cursor is ahead (the board was rebuilt) gets everything again.
    third, _ = board.update(Cursor(laps=99, hops={A: 99}))
    assert third["laps_from"] == 0 and len(third["laps"]) == 2


def test_the_board_holds_nothing_of_a_members_own_validation() -> None:
    board = RunBoard(me=A)
    formed(board)
    board.hop_trained(A, 0, 0, 0.7)
    text = json.dumps(board.snapshot())
    for private in ("candidate", "val_n", "schema", "rows", "n_positive"):
        assert private not in text


def write_run(folder: Path, *, summary: bool = True, peer: str = A) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    federation = {
        "run_id": "ab" * 16,
        "epoch": 0,
        "leader": A,
        "members": [A, B, C],
        "settings": SETTINGS,
        "schema": {"columns": "not shown"},
    }
    (folder / "federation.json").write_text(json.dumps(federation))
    lines = [
        {"type": "hop", "lap": 0, "hop": 0, "train_loss": 0.7, "candidate_val_loss": 0.123},
        {"type": "lap", "lap": -1, "federated_val_loss": 0.9, "accuracy": 0.5, "auc": None,
         "n": 30, "samples": 0},
        {"type": "dead", "peer": C, "by": A, "why": "unreachable", "at": [1, 2], "epoch": 1},
        {"type": "hop", "lap": 1, "hop": 0, "train_loss": 0.6},
        {"type": "lap", "lap": 0, "federated_val_loss": 0.8, "accuracy": 0.6, "auc": 0.7,
         "n": 30, "samples": 64},
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary:
        (folder / "summary.json").write_text(
            json.dumps(
                {
                    "peer_id": peer,
                    "stop_reason": "converged",
                    "ended_by": A,
                    "model_sha256": "e" * 64,
                    "excluded": None,
                }
            )
        )
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "notes.txt").write_text("the user's own file")


def test_a_finished_runs_folder_gives_the_same_board(tmp_path: Path) -> None:
    write_run(tmp_path)
    board = load_run(tmp_path)
    assert board.me == A and not board.live and board.stage == "finished"
    assert list(board.members) == [A, B, C] and board.members[C].dead == "unreachable"
    assert [(h.lap, h.loss) for h in board.members[A].hops] == [(0, 0.7), (1, 0.6)]
    assert [p.lap for p in board.laps] == [-1, 0] and math.isnan(board.laps[0].auc)
    assert board.stop_reason == "converged" and board.model_sha256 == "e" * 64
    # Only the run's own files are listed, never another file in the folder.
    assert board.files == ["summary.json", "federation.json", "metrics.jsonl", "model.safetensors"]
    snapshot = json.dumps(board.snapshot())
    assert "candidate" not in snapshot and "not shown" not in snapshot
    assert board.snapshot()["progress"]["elapsed"] is None  # a file has no wall clock


def test_a_growing_folder_is_read_line_by_line_as_it_is_written(tmp_path: Path) -> None:
    board = RunBoard()
    folder = RunFolder(tmp_path, board, peer_id=B)
    folder.read()  # nothing there yet
    assert board.run_id is None
    write_run(tmp_path, summary=False, peer=B)
    metrics = tmp_path / "metrics.jsonl"
    whole = metrics.read_bytes()
    metrics.write_bytes(whole[:-20])  # the last line is still being written
    folder.read()
    assert [p.lap for p in board.laps] == [-1] and len(board.members[B].hops) == 2
    metrics.write_bytes(whole)
    folder.read()
    assert [p.lap for p in board.laps] == [-1, 0] and board.stage == "training"


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "peers").mkdir()
    with pytest.raises(ConfigError, match=r"holds no federation\.json.*one of .*peers"):
        load_run(tmp_path)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_run(tmp_path / "missing")
    write_run(tmp_path / "run")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"type": "lap", "lap": "three"}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 6: lap is not a whole number"):
        load_run(tmp_path / "run")


GOOD_FEDERATION = {
    "run_id": "ab" * 16,
    "epoch": 0,
    "leader": "p1",
    "members": ["p1", "p2"],
    "settings": {"max_laps": 5, "patience": 2, "tolerance": 0.0},
}


def test_a_dead_line_naming_no_member_adds_nobody_to_the_page(tmp_path: Path) -> None:
    (tmp_path / "federation.json").write_text(json.dumps(GOOD_FEDERATION))
    lines = [{"type": "dead", "peer": p, "why": "unreachable"} for p in ("p2", "x1", "x2")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    board = load_run(tmp_path)
    assert set(board.members) == {"p1", "p2"}
    assert board.members["p2"].dead == "unreachable" and board.members["p1"].dead is None


def test_a_fifo_in_a_run_folder_is_an_error_not_a_hang(tmp_path: Path) -> None:
    """``fedup-peer show`` on a folder with a FIFO planted at metrics.jsonl: a one-line
    error (it waited for ever before)."""
    (tmp_path / "federation.json").write_text(json.dumps(GOOD_FEDERATION))
    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl is not a regular file"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    ("federation", "metrics", "message"),
    [
        (b'{"run_id": ', b"", "federation.json is not JSON"),
        (b"[" * 200_000, b"", "federation.json is not JSON"),  # too deep to parse
        (None, b"[" * 200_000 + b"\n", "metrics.jsonl line 1 is not JSON"),
        ({**GOOD_FEDERATION, "addresses": {"p1": 5}}, b"", "addresses is not a map"),
        ({**GOOD_FEDERATION, "addresses": {"p1": [1, 2]}}, b"", "addresses is not a map"),
        ({**GOOD_FEDERATION, "settings": {"max_laps": "x"}}, b"", "max_laps must be in"),
        ({**GOOD_FEDERATION, "settings": {"tolerance": "x"}}, b"", "tolerance must be in"),
        (b'{"settings": {"lr": NaN}, "members": []}', b"", "finite values"),
    ],
)
def test_a_malformed_run_folder_is_a_one_line_error(
    tmp_path: Path, federation: object, metrics: bytes, message: str
) -> None:
    """``fedup-peer show`` reads files from disk: anything malformed is a ConfigError
    naming the file, never a crash (RecursionError, TypeError, a NaN in the page's JSON)."""
    if federation is None:
        federation = GOOD_FEDERATION
    raw = federation if isinstance(federation, bytes) else json.dumps(federation).encode()
    (tmp_path / "federation.json").write_bytes(raw)
    (tmp_path / "metrics.jsonl").write_bytes(metrics)
    with pytest.raises(ConfigError, match=message):
        load_run(tmp_path)
