"""A real headless Chromium, driven over the DevTools protocol on a pipe.

Chromium from the distribution's packages (``apt-get install chromium``) is
started with ``--remote-debugging-pipe``: it reads DevTools commands from its
file descriptor 3 and writes answers to 4, each a JSON text ended by a NUL
byte.  That needs no WebSocket client and no driver binary; the few commands
used here (attach to the page, navigate, evaluate, screenshot, close) are
Chrome's stable protocol.  The browser runs in its own process group, which is
killed when it closes, so no Chromium process outlives a test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The path of a Chromium binary on PATH, or None."""
    for name in BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


class BrowserError(Exception):
    pass


class Chromium:
    """One headless browser with one page; see the module docstring."""

    def __init__(self, binary: str, profile: Path, *, width: int = 1280, height: int = 1000):
        cmd_read, self._cmd = os.pipe()  # we write commands; it reads them on fd 3
        self._answers, answer_write = os.pipe()  # it writes answers on fd 4

        def to_3_and_4() -> None:  # in the child, before exec
            a, b = os.dup(cmd_read), os.dup(answer_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            binary,
            "--headless",
            "--no-sandbox",  # tests run as root here; the page is our own
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=to_3_and_4,
            pass_fds=(3, 4),
            start_new_session=True,
        )
        os.close(cmd_read)
        os.close(answer_write)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    # --- the protocol -------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0):
        """Send one command (to the page once attached) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method}
        message["params"] = params or {}
        if self.session is not None and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._cmd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._answers], [], [], left)
            if ready:
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    raise BrowserError("Chromium closed its DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        value: dict[str, Any] = json.loads(raw)
        return value

    # --- what tests do -------------------------------------------------------------------

    def attach(self) -> None:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send(
            "Target.attachToTarget", {"targetId": page["targetId"], "flatten": True}
        )["sessionId"]

    def open(self, url: str) -> None:
        if self.session is None:
            self.attach()
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy; its value.  Raises
        :class:`BrowserError` (with the page's text) if it is not within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText : ''")
                raise BrowserError(f"never true: {expression}\npage:\n{text[:2000]}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Close the browser, killing its whole process group if it does not go."""
        with contextlib.suppress(BrowserError, OSError):
            self.send("Browser.close", timeout=5.0)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers (zygote, renderers) too
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        for fd in (self._cmd, self._answers):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def chromium(profile: Path, **size: int) -> Iterator[Chromium]:
    """A headless Chromium for the block (the caller skips when :func:`find_chromium`
    finds none)."""
    binary = find_chromium()
    assert binary is not None, "call find_chromium() first and skip without one"
    browser = Chromium(binary, profile, **size)
    try:
        yield browser
    finally:
        browser.close()
