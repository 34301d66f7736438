"""Network namespaces for tests that use real mDNS.

SAFETY: real mDNS multicasts.  Every process these fixtures start runs inside
a network namespace created here (``ip netns add``), so nothing reaches the
machine's real interfaces.  Every namespace and process is removed at the end
of the test, also when it fails.  Without root, ``ip`` or namespace support
the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
_PREFIX = f"fedup-t{os.getpid()}"
_counter = iter(range(1, 10_000))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _why_no_netns() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"{_PREFIX}-probe"
    try:
        result = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns add' failed: {exc}"
    if result.returncode != 0:
        return f"'ip netns add' failed: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


_REASON: list[str | None] = []


def netns_unavailable() -> str | None:
    if not _REASON:
        _REASON.append(_why_no_netns())
    return _REASON[0]


class Node:
    """A helper process in a namespace; its stdout is a stream of JSON lines."""

    def __init__(self, ns: str, args: list[str]) -> None:
        self.ns = ns
        self.args = args
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.lan.mdns_node", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self.stderr.append(f"stdout: {line}")

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first line (already seen or arriving within ``timeout`` s) satisfying ``pred``."""
        for line in self.seen:
            if pred(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout} s in {self.ns} {self.args[:2]}; "
                    f"seen {self.seen[-5:]}; stderr {''.join(self.stderr[-20:])}"
                )
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise AssertionError(
                        f"node in {self.ns} exited {self.proc.returncode}: "
                        f"{''.join(self.stderr[-20:])}"
                    ) from None
                continue
            self.seen.append(line)
            if pred(line):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        self.seen = [line for line in self.seen if not line.get("stats")]
        self.send("stats")
        return self.wait_for(lambda line: bool(line.get("stats")), timeout)

    def stop(self, timeout: float = 8.0) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End a :meth:`Netns.spawn` process and its group: SIGTERM, then SIGKILL after 5 s.

    Only while the leader is not yet reaped (so its ID cannot belong to anyone
    else); anything left behind is killed with its namespace in :meth:`Netns.cleanup`.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue


class Netns:
    """Creates namespaces, links and helper processes; removes them all at the end."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        """Processes from :meth:`spawn`, each the leader of its own process group."""

    def add(self, label: str) -> str:
        name = f"{_PREFIX}-{next(_counter)}-{label}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def hosts_on_a_bridge(self, count: int, subnet: str = "10.77.0") -> list[tuple[str, str]]:
        """``count`` namespaces ("hosts") joined by a bridge in a hub namespace.

        Each host has ``eth0`` with ``{subnet}.{i}/24``; returns (namespace, address).
        The hub side of host i's cable is ``port{i}`` in :attr:`hub`.
        """
        self.hub = self.add("hub")
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        hosts = []
        for i in range(1, count + 1):
            ns = self.add(f"h{i}")
            _ip(
                "-n",
                self.hub,
                "link",
                "add",
                f"port{i}",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            _ip("-n", self.hub, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            hosts.append((ns, f"{subnet}.{i}"))
        return hosts

    def cut(self, port: int) -> None:
        """Pull host ``port``'s cable at the switch: no goodbye can get through."""
        _ip("-n", self.hub, "link", "set", f"port{port}", "down")

    def reconnect(self, port: int) -> None:
        """Plug host ``port``'s cable back in (after :meth:`cut`)."""
        _ip("-n", self.hub, "link", "set", f"port{port}", "up")

    def start(self, ns: str, *args: str) -> Node:
        node = Node(ns, list(args))
        self.nodes.append(node)
        return node

    def spawn(
        self, ns: str, argv: list[str], *, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Run ``argv`` in ``ns`` (its own process group); stdout and stderr go to files.

        ``log`` is a path prefix: ``<log>.out`` and ``<log>.err``.  Files, not pipes,
        so a chatty process never blocks on a full pipe.  The group is killed at the end.
        """
        with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                cwd=REPO,
                env=env if env is not None else {**os.environ, "PYTHONPATH": str(REPO)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            _kill_group(proc)
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=5)
        for ns in reversed(self.namespaces):
            # only processes we started can live in namespaces we created
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        self.namespaces.clear()


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    env = Netns()
    try:
        yield env
    finally:
        env.cleanup()
        leftovers = [
            n for n in _ip("netns", "list", check=False).stdout.split() if n.startswith(_PREFIX)
        ]
        assert not leftovers, f"namespaces left behind: {leftovers}"
