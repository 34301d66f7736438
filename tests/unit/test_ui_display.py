"""The terminal panel (fedup.ui.display): what it draws, and the log lines around it."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from fedup.ui.board import LapPoint, RunBoard
from fedup.ui.display import PROGRESS_LOGGER, TerminalDisplay, log_laps, render

A, B, C = "12D3KooWAaaaaaaa1111", "12D3KooWBbbbbbbb2222", "12D3KooWCccccccc3333"


def running_board() -> RunBoard:
    board = RunBoard(me=B)
    board.formed(
        run_id="ef" * 16,
        epoch=0,
        leader=A,
        members=[A, B, C],
        addresses={A: ["10.0.0.1:7000"], B: ["10.0.0.2:7000"], C: ["10.0.0.3:7000"]},
        settings={"max_laps": 30, "patience": 5, "tolerance": 0.0},
    )
    for n, loss in enumerate([0.69, 0.61, 0.55, 0.57], start=-1):
        board.lap_noted(LapPoint(n, loss, 0.7, 0.8, 0))
    board.hop_trained(B, 3, 1, 0.5123)
    board.handed_over(C, "ring", 3, 2)
    board.declared_dead(A, "unreachable")
    return board


def text_of(board: RunBoard, width: int = 110) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(render(board))
    return console.export_text()


def test_the_panel_shows_the_ring_the_lap_the_losses_and_patience() -> None:
    text = text_of(running_board())
    assert "lap 3 (4 of at most 30)" in text
    assert "federated validation loss 0.5700 (lap 2)" in text
    assert "best lap 1 (0.5500)" in text and "patience 4 of 5 left" in text
    assert "ring of 3 members (2 alive)" in text
    assert "model: …cccc3333 was handed it for lap 3 hop 2" in text
    for member, address in ((A, "10.0.0.1:7000"), (B, "10.0.0.2:7000"), (C, "10.0.0.3:7000")):
        assert "…" + member[-8:] in text and address in text
    row_b = next(line for line in text.splitlines() if "…bbbb2222" in line)
    assert "0.5123" in row_b and "this peer" in row_b
    row_a = next(line for line in text.splitlines() if "…aaaa1111" in line)
    assert "dead: unreachable" in row_a and "leader" in row_a


def test_a_finished_run_says_how_it_ended() -> None:
    board = running_board()
    board.finished(B, "converged", C, "ab" * 32)
    text = text_of(board)
    assert "finished: converged after laps 0 to 2, ended by …cccc3333" in text
    assert "the final model is saved" in text


def test_many_members_show_the_ones_around_the_model() -> None:
    members = [f"12D3KooW{i:012d}" for i in range(40)]
    board = RunBoard()
    board.formed(run_id="00" * 16, epoch=0, leader=members[0], members=members, settings={})
    board.training(members[25], 0, 25)
    text = text_of(board)
    assert "…" + members[25][-8:] in text and "…" + members[0][-8:] not in text
    assert "and 28 more members" in text


def test_every_lap_is_drawn_however_quickly_the_laps_pass() -> None:
    board = RunBoard()
    board.formed(run_id="00" * 16, epoch=0, leader=A, members=[A, B, C], settings={"max_laps": 3})
    stream = io.StringIO()
    console = Console(file=stream, width=100, force_terminal=True, color_system=None)
    with TerminalDisplay(board, console=console) as display:
        board.listen(display.refresh)
        for lap in range(3):  # far quicker than MIN_INTERVAL: only the headline's moves draw
            board.training(A, lap, 0)
            board.hop_trained(A, lap, 0, 0.5)
            board.hop_trained(B, lap, 1, 0.5)
    out = stream.getvalue()
    for lap in range(3):
        assert f"lap {lap} ({lap + 1} of at most 3)" in out
    assert out.count("0.5000") < 6 * 3  # the hops within one lap were not each drawn


def record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_log_lines_print_above_the_panel_except_the_progress_it_shows(level: int) -> None:
    root = logging.getLogger()
    before, before_level = list(root.handlers), root.level
    root.setLevel(level)
    stream = io.StringIO()
    console = Console(file=stream, width=100, force_terminal=True, color_system=None)
    try:
        with TerminalDisplay(running_board(), console=console):
            assert root.handlers != before
            handler = root.handlers[0]
            for r in (
                record("fedup.federation", logging.INFO, "lap 3 hop 1: trained 64 samples"),
                record(PROGRESS_LOGGER, logging.INFO, "lap 2 (3 of at most 30): ..."),
                record("fedup.federation", logging.WARNING, "refused ring from …x: stale"),
                record("fedup.peer", logging.INFO, "peer listening on 10.0.0.2:7000"),
            ):
                handler.handle(r)
        assert root.handlers == before  # put back when the panel closes
    finally:
        root.setLevel(before_level)
    out = stream.getvalue()
    assert "warning: refused ring from …x: stale" in out
    assert "info: peer listening on 10.0.0.2:7000" in out
    shown = "info: lap 3 hop 1: trained 64 samples" in out
    assert shown == (level == logging.DEBUG)  # --log-level debug prints them all
    assert ("lap 2 (3 of at most 30)" in out) == (level == logging.DEBUG)


def test_off_a_terminal_each_lap_result_is_one_plain_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    board = running_board()
    log_laps(board)
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        board.lap_noted(LapPoint(3, 0.52, 0.71, 0.81, 0))
        board.lap_noted(LapPoint(3, 0.52, 0.71, 0.81, 0))  # another member's note of it
    [line] = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert line.startswith("lap 3 (4 of at most 30): federated validation loss 0.5200")
    assert "best so far lap 3 (0.5200), patience 5 of 5 left" in line
