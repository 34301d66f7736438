"""``fedup-peer demo`` as the README runs it: mDNS on 127.0.0.1, real processes; and
that mDNS on 127.0.0.1 reaches no other interface (what the README promises).

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


# --------------------------------------------------------------------------
# What "mDNS on 127.0.0.1" means: nothing reaches the host's other interfaces.

LISTENER = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", 5353))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
             struct.pack("4s4s", socket.inet_aton("224.0.0.251"), socket.inet_aton(sys.argv[1])))
s.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
heard = 0
while time.monotonic() < end:
    try:
        _, (src, _) = s.recvfrom(9000)
    except OSError:
        continue
    heard += src == sys.argv[3]
print(heard, flush=True)
"""


def multicast_heard(
    netns: Netns, tmp_path: Path, label: str, subnet: str, *peer_options: str
) -> int:
    """mDNS packets host 2 receives from host 1 while host 1 runs a peer with ``peer_options``."""
    (h1, a1), (h2, a2) = netns.hosts_on_a_bridge(2, subnet=subnet)
    listen_log = tmp_path / f"{label}-listener"
    listener = netns.spawn(h2, [sys.executable, "-c", LISTENER, a2, "8", a1], log=listen_log)
    deadline = time.monotonic() + 20
    while "ready" not in Path(f"{listen_log}.out").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    state = tmp_path / label
    peer = netns.spawn(
        h1,
        [sys.executable, "-m", "fedup.cli", "start", "--state-dir", str(state),
         "--min-peers", "2", *peer_options],
        log=tmp_path / f"{label}-peer",
    )  # fmt: skip
    listener.wait(timeout=30)
    assert peer.poll() is None, Path(f"{tmp_path / label}-peer.err").read_text()[-2000:]
    return int(Path(f"{listen_log}.out").read_text().split()[-1])


def test_loopback_mdns_sends_nothing_on_the_lan(netns: Netns, tmp_path: Path) -> None:
    # The control: the same peer on the LAN interface is heard from the next host.
    assert multicast_heard(netns, tmp_path, "lan", "10.78.1", "--interface", "eth0") > 0
    assert multicast_heard(netns, tmp_path, "loopback", "10.78.2", "--loopback") == 0
