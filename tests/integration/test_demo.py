"""The runnable examples in demo/ keep working (they are documentation too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "demo"


def test_library_api_example_with_a_custom_task() -> None:
    # Three peers embedded in one trio program, each with its own nn.Module task,
    # over real loopback TCP; the script asserts that all hold the same model.
    proc = subprocess.run(
        [sys.executable, str(DEMO / "library_api.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all three peers hold the same model" in proc.stdout
    assert proc.stdout.count("model ") == 3
