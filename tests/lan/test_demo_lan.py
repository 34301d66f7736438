"""``fedup-peer demo`` as the README runs it: mDNS on 127.0.0.1, real processes.

SAFETY: the demo multicasts on 127.0.0.1, so it runs in a namespace from the
``netns`` fixture (tests/lan/conftest.py), never on the machine's loopback.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest

from tests.lan.conftest import Netns

pytestmark = pytest.mark.netns

TIMEOUT = 300.0
"""Seconds for the whole demo; it takes about 20 s on two CPUs."""


def test_the_default_demo_finds_its_peers_by_mdns_and_writes_every_output(
    netns: Netns, tmp_path: Path
) -> None:
    ns = netns.add("demo")
    out = tmp_path / "demo"
    proc = netns.spawn(
        ns,
        [sys.executable, "-m", "fedup.cli", "demo", "--out", str(out)],
        log=tmp_path / "demo",
    )
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    stdout = (tmp_path / "demo.out").read_text()
    stderr = (tmp_path / "demo.err").read_text()
    assert proc.returncode == 0, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "by mDNS on 127.0.0.1" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["mdns"] is True
    assert len(report["peers"]) == 3 and all(p["finished"] for p in report["peers"])
    assert report["same_model_everywhere"]
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digest == report["model_sha256"]
    for peer in report["peers"]:
        own = Path(peer["directory"]) / "run" / "model.safetensors"
        assert hashlib.sha256(own.read_bytes()).hexdigest() == digest
    assert {"federated", "centralized", "local_only", "claim"} <= set(report)
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "The claim:" in stdout
