"""Take the README's pictures of the terminal display and the federation page from a real run.

Three real ``fedup-peer start`` processes on 127.0.0.1 (each with its own synthetic
lender); peer 0 runs on a pseudo-terminal with ``--ui``.  Once the ring has trained
``AT_LAP`` laps, this takes a screenshot of the page in headless Chromium (the
distribution's ``chromium`` package) and turns the terminal's last drawn panel into an
SVG (rich reads the terminal's own escape codes back).  Run from the repository::

    python demo/screenshots.py            # writes docs/img/page.png, docs/img/terminal.svg
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.chromium: the DevTools client the browser test uses

from rich.console import CONSOLE_SVG_FORMAT, Console  # noqa: E402
from rich.text import Text  # noqa: E402

from fedup.demo.peers import free_ports  # noqa: E402
from tests.chromium import chromium, find_chromium  # noqa: E402

AT_LAP = 12
COLUMNS, ROWS = 100, 36
MOVES = re.compile(r"\x1b\[[0-9;?]*[A-LN-Za-ln-z]")  # every CSI but colours (m)
TOP = re.compile(r"╭─(?:\x1b\[[0-9;]*m)* FedUp")
PEER_ARGS = ["--max-laps", "40", "--patience", "40", "--local-epochs", "1"]


def start(state: Path, port: int, others: list[int], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "fedup.cli", "start", "--state-dir", str(state)]
    cmd += ["--no-mdns", "--listen", f"127.0.0.1:{port}", "--min-peers", "3", "--settle", "1"]
    for other in others:
        cmd += ["--bootstrap", f"127.0.0.1:{other}"]
    return [*cmd, *PEER_ARGS, *extra]


class Terminal:
    """A process on a pseudo-terminal; keeps everything it draws."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS)}
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
        )
        os.close(slave)
        self.master = master
        self.raw = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            self.raw += chunk.decode(errors="replace")

    def last_panel(self) -> str:
        """The last panel drawn completely, with its colours.  (A redraw moves the cursor
        up over the panel before it; without the moves, each panel starts right after the
        one before.)"""
        text = MOVES.sub("", self.raw).replace("\r", "")
        tops = list(TOP.finditer(text))
        for top in reversed(tops):
            bottom = text.find("╯", text.find("╰", top.start()))
            if bottom != -1:
                return text[top.start() : bottom + 1]
        raise RuntimeError("no panel was drawn")


def svg_of(ansi: str, path: Path) -> None:
    console = Console(file=io.StringIO(), width=COLUMNS, record=True, force_terminal=True)
    console.print(Text.from_ansi(ansi), soft_wrap=True)
    # No web font: the picture must not fetch anything (a local monospace font is used).
    layout = re.sub(r"@font-face \{\{.*?\}\}\s*", "", CONSOLE_SVG_FORMAT, flags=re.S)
    console.save_svg(str(path), title="fedup-peer start", code_format=layout)


def main() -> None:
    if find_chromium() is None:
        sys.exit("needs Chromium: apt-get install chromium")
    out = ROOT / "docs" / "img"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ports = free_ports(3)
        others = [
            subprocess.Popen(
                start(Path(tmp) / f"p{i}", ports[i], [p for p in ports if p != ports[i]]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in (1, 2)
        ]
        terminal = Terminal(start(Path(tmp) / "p0", ports[0], ports[1:], "--ui", "0"))
        try:
            while not (found := re.search(r"federation page: (http://\S+/)", terminal.raw)):
                time.sleep(0.2)
            url = found.group(1)
            while True:
                with urllib.request.urlopen(url + "state", timeout=10) as answer:
                    state = json.load(answer)
                if len(state["laps"]) >= AT_LAP + 1 or not state["live"]:
                    break
                time.sleep(0.2)
            with chromium(Path(tmp) / "profile", width=1280, height=1060) as browser:
                browser.open(url)
                browser.wait_for("document.querySelector('#curve svg[data-laps]') !== null")
                time.sleep(0.6)  # the next update, so the panel and the page show one moment
                browser.screenshot(out / "page.png")
                svg_of(terminal.last_panel(), out / "terminal.svg")
            for proc in [terminal.proc, *others]:
                proc.wait(timeout=300)
        finally:
            for proc in [terminal.proc, *others]:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    for name in ("page.png", "terminal.svg"):
        print(f"{out / name}: {(out / name).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
