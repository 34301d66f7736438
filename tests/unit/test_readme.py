"""The README's Quickstart contract: one block, exactly two commands; CI runs the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```(?:sh|bash|console)?\n(.*?)```", section, re.S)
    assert block, "Quickstart has no fenced block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    for command in commands:
        assert "constraints.txt" in command, "each command pins the CPU build of torch"


def test_ci_runs_the_second_command_verbatim() -> None:
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci_lines


def test_the_main_job_is_the_demo() -> None:
    assert quickstart_commands()[0].endswith("&& .venv/bin/fedup-peer demo")


def test_constraints_pin_torch_with_nothing_only_this_machine_serves() -> None:
    """An exact release (an unpinned torch pulls a multi-GB CUDA build here), without a
    local build label (``+cpu``: plain PyPI has none) and without an index URL, so that
    the README's commands work here and on a machine with only plain PyPI."""
    pins = [
        line.split("#")[0].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    torch_pins = [p for p in pins if p.startswith("torch")]
    assert len(torch_pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", torch_pins[0]), pins
    assert not any(p.startswith("-") or "://" in p for p in pins), pins
