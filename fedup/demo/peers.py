"""The demo's peers: real ``fedup-peer start`` processes on this host.

Each peer gets its own folder under ``OUT/peers/peerI`` holding its identity
(created by the peer), its lender's loan book (``data/loans.csv``, generated
here from the demo seed so a rerun sees the same lenders), its log and its
run outputs (``run/``).  Folders are made with mode 0700 and files with 0600,
none through a symbolic link (:mod:`fedup.files`).  The peers share nothing but
a fresh network name and a fresh 32-byte network key, so they never mix with
other FedUp peers on the host, and find each other by mDNS on 127.0.0.1
(``--loopback``) or, with ``mdns=False``, by dialing each other's listening
ports (no multicast at all).
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from fedup.errors import FedupError
from fedup.files import create_new, make_dirs, open_regular, read_bounded
from fedup.identity import load_or_create_identity
from fedup.learn.loans import generate_lender, lender_seed

__all__ = [
    "DemoPeer",
    "PeerOutcome",
    "free_ports",
    "peer_commands",
    "prepare_peers",
    "read_json",
    "run_peers",
    "write_network_key",
]

POLL_SECONDS = 0.25
"""How often the waiting loop looks at the processes and the progress files."""
STOP_GRACE_SECONDS = 5.0
"""How long a peer told to stop (SIGTERM) gets before it is killed."""


@attrs.frozen
class DemoPeer:
    """One peer of the demo and its files."""

    index: int
    directory: Path
    """Its state dir: identity, data, log, run outputs."""
    data: Path
    lender: str
    """The archetype of its synthetic lender (see :mod:`fedup.learn.loans`)."""
    rows: int
    default_rate: float
    peer_id: str = ""
    """Its peer ID (the demo makes its identity when it prepares its folder)."""

    @property
    def run_dir(self) -> Path:
        return self.directory / "run"

    @property
    def log(self) -> Path:
        return self.directory / "peer.log"


@attrs.frozen
class PeerOutcome:
    """How a peer process ended."""

    peer: DemoPeer
    returncode: int | None
    """None: it was stopped at the deadline."""
    seconds: float
    summary: dict[str, Any] | None
    """Its ``summary.json``, if it finished."""

    @property
    def error(self) -> str | None:
        if self.summary is not None and self.returncode == 0:
            return None
        if self.returncode is None:
            return "did not finish before the deadline"
        tail = _last_line(self.peer.log)
        return f"exited with status {self.returncode}" + (f": {tail}" if tail else "")


def _last_line(path: Path) -> str:
    """The last line of a peer's log (its error), read from the log's last 64 KiB."""
    try:
        opened = open_regular(path)
        if opened is None:
            return ""
        f, size = opened
        with f:
            f.seek(max(0, size - 65536))
            tail = f.read(65536)
    except (FedupError, OSError):
        return ""
    lines = tail.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def prepare_peers(out: Path, n: int, *, seed: int, rows: int | None) -> list[DemoPeer]:
    """Create each peer's folder, its identity (what ``fedup-peer start`` would create on
    first use: the demo then knows whose files are whose) and its lender's loan book
    (lender ``i`` of ``seed``)."""
    peers = []
    for i in range(n):
        directory = out / "peers" / f"peer{i}"
        data = directory / "data" / "loans.csv"
        make_dirs(data.parent)  # 0700: the peer refuses a state dir others can write
        identity = load_or_create_identity(directory)
        lender = generate_lender(lender_seed(seed, i), rows)
        lender.write_csv(data)
        table = lender.table
        peers.append(
            DemoPeer(
                index=i,
                directory=directory,
                data=data,
                lender=lender.profile.archetype,
                rows=table.n_rows,
                default_rate=table.n_positive / table.n_rows,
                peer_id=identity.peer_id.text,
            )
        )
    return peers


def write_network_key(path: Path) -> None:
    """A fresh random network key in a new file, readable by the owner only (0600).

    Raises :class:`~fedup.errors.FileError` if anything is already at ``path``.
    """
    with create_new(path) as f:
        f.write((secrets.token_hex(32) + "\n").encode("ascii"))


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def peer_commands(
    peers: Sequence[DemoPeer],
    *,
    network: str,
    key_file: Path,
    settle: float,
    mdns: bool,
    device: str = "auto",
    extra: Sequence[str] = (),
) -> list[list[str]]:
    """The ``fedup-peer start`` command line of each peer (training on ``device``)."""
    ports = [] if mdns else free_ports(len(peers))
    commands = []
    for p in peers:
        cmd = [
            sys.executable, "-m", "fedup.cli", "start",
            "--state-dir", str(p.directory), "--log-level", "info",
            "--data", str(p.data), "--target", "default", "--out", str(p.run_dir),
            "--min-peers", str(len(peers)), "--settle", str(settle),
            "--network", network, "--network-key-file", str(key_file), "--device", device,
        ]  # fmt: skip
        if mdns:
            cmd.append("--loopback")
        else:
            cmd += ["--no-mdns", "--listen", f"127.0.0.1:{ports[p.index]}"]
            cmd += [f"--bootstrap=127.0.0.1:{port}" for port in ports if port != ports[p.index]]
        commands.append([*cmd, *extra])
    return commands


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for p in running:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_peers(
    peers: Sequence[DemoPeer],
    commands: Sequence[Sequence[str]],
    *,
    timeout: float,
    on_tick: Callable[[], None] = lambda: None,
) -> list[PeerOutcome]:
    """Start every peer, wait until all have exited or ``timeout`` seconds passed.

    ``on_tick`` is called every :data:`POLL_SECONDS` while waiting (progress
    reports).  Peers still running at the deadline, or when this is
    interrupted, are stopped: nothing outlives the call.
    """
    started = time.monotonic()
    procs: list[subprocess.Popen[bytes]] = []
    ended: dict[int, float] = {}
    try:
        for p, cmd in zip(peers, commands, strict=True):
            with create_new(p.log) as log:
                procs.append(
                    subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                )
        deadline = started + timeout

        def reap() -> None:
            for i, proc in enumerate(procs):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.monotonic() - started

        while len(ended) < len(procs) and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            reap()
            on_tick()
        reap()  # one that ended after the last look but by the deadline finished in time
    finally:
        _stop(procs)
    return [
        PeerOutcome(
            peer=p,
            returncode=proc.returncode if i in ended else None,
            seconds=ended.get(i, timeout),
            summary=read_json(p.run_dir / "summary.json"),
        )
        for i, (p, proc) in enumerate(zip(peers, procs, strict=True))
    ]


MAX_SUMMARY_BYTES = 16 * 1024 * 1024
"""A peer's ``summary.json`` is a few KiB; a larger file is not one."""


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = read_bounded(path, MAX_SUMMARY_BYTES)
        value = json.loads(data) if data is not None else None
    except (FedupError, OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
