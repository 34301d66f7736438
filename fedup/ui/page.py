"""The federation page: a small read-only web app (Starlette) over a :class:`RunBoard`.

Routes, all ``GET`` (and ``HEAD``); any other method is refused (405):

* ``/``, ``/app.js``, ``/app.css``: the page (package data: no CDN, nothing fetched
  from elsewhere; the script draws the ring and the curves as inline SVG);
* ``/state``: the board as JSON (:meth:`~fedup.ui.board.RunBoard.snapshot`);
* ``/events``: server-sent events: the whole board first, then, at most every
  ``Limits.ui_update_interval`` seconds, what changed (the new lap results and
  hops only); it ends after the board's last change.  At most
  ``Limits.ui_max_viewers`` streams at once (more get 503); a viewer that does
  not take an update within ``Limits.ui_send_timeout`` is dropped;
* ``/files/NAME``: the run's output files the board lists (``summary.json``,
  ``federation.json``, ``metrics.jsonl``, ``model.safetensors``,
  ``provenance.cbor``), read from the run's folder and never through a
  symbolic link.  Nothing else on disk is served.

Every response forbids framing, sniffing and any script, style or connection
not from the page itself (Content-Security-Policy).  Requests whose ``Host``
is not the address the page is bound to (or ``localhost`` for a loopback
address) are refused, so another web site cannot read the page through DNS
rebinding.

The page shows what the board holds: the members, their addresses, the ring and
the model's place, the federated results of every lap, the hops' training
losses of the members it knows them of, the settings and the stop reason;
never data, data summaries, nor a member's own validation results.  The files
it links to are the member's own outputs and hold more (the merged schema, its
own validation results): whoever can reach the page can fetch them.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO

import trio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import FileError
from fedup.files import open_regular
from fedup.ui.board import Cursor, RunBoard
from fedup.ui.folder import LINKED_FILES

__all__ = ["Changes", "allowed_hosts", "host_allowed", "make_app"]

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
CONTENT_TYPES = {
    ".json": "application/json",
    ".jsonl": "text/plain; charset=utf-8",
}
CHUNK = 64 * 1024

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def _static(name: str) -> bytes:
    return (resources.files("fedup.ui") / "static" / name).read_bytes()


def allowed_hosts(host: str) -> list[str]:
    """The ``Host`` names a page bound to ``host`` answers; ``*``: any address of this
    host, as an IP literal (never a domain name: see :func:`host_allowed`)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ["*"]
    if ip.is_unspecified:
        return ["*"]  # reachable under any of the host's addresses
    if ip.is_loopback:
        return [str(ip), "localhost"]
    return [str(ip)]


class Changes:
    """Wakes the event streams when the board changes (the board calls :meth:`notify`
    in the peer's trio thread)."""

    def __init__(self, board: RunBoard) -> None:
        self.board = board
        self._event = trio.Event()
        board.listen(self.notify)

    def notify(self) -> None:
        event, self._event = self._event, trio.Event()
        event.set()

    async def wait(self, version: int, timeout: float) -> None:
        """Until the board's version is not ``version``, or ``timeout`` seconds."""
        event = self._event
        if self.board.version != version:
            return
        with trio.move_on_after(timeout):
            await event.wait()


class _Viewers:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0


class EventStream(Response):
    """``text/event-stream`` of the board's updates until its last change or the viewer
    leaves; see the module docstring."""

    def __init__(self, changes: Changes, viewers: _Viewers, limits: Limits) -> None:
        self.changes = changes
        self.viewers = viewers
        self.limits = limits
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"content-type": "text/event-stream; charset=utf-8", "x-accel-buffering": "no"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.viewers.count >= self.viewers.limit:
            busy = PlainTextResponse(
                f"{self.viewers.limit} viewers are watching already; try again later", 503
            )
            await busy(scope, receive, send)
            return
        self.viewers.count += 1
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            done = False  # the viewer left (it cancels the nursery) or stopped reading
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_gone, receive, nursery.cancel_scope)
                done = await self._stream(send)
                nursery.cancel_scope.cancel()
            if done:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.viewers.count -= 1

    @staticmethod
    async def _until_gone(receive: Receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _stream(self, send: Send) -> bool:
        """Send updates; True when the board's last change went out, False when the
        viewer stopped taking them."""
        board, limits = self.changes.board, self.limits
        cursor, version = Cursor(), -1
        while True:
            if board.version != version:
                version = board.version
                value, cursor = board.update(cursor)
                body = f"event: board\ndata: {json.dumps(value, allow_nan=False)}\n\n"
                if not await self._send(send, body.encode()):
                    return False
                if not board.live:
                    return await self._send(send, b"event: end\ndata: {}\n\n")
                await trio.sleep(limits.ui_update_interval)
                continue
            await self.changes.wait(version, limits.ui_keepalive)
            if board.version == version and not await self._send(send, b": idle\n\n"):
                return False

    async def _send(self, send: Send, body: bytes) -> bool:
        message: Message = {"type": "http.response.body", "body": body, "more_body": True}
        with trio.move_on_after(self.limits.ui_send_timeout):
            await send(message)
            return True
        return False


def host_allowed(bind: str, header: str) -> bool:
    """Whether a request whose ``Host`` is ``header`` may read a page bound to ``bind``.

    A domain name is refused unless it is ``localhost`` (for a loopback bind) or the
    name the page was bound to: DNS rebinding, a web page reading this one through a
    domain it made point here, always needs a name.  An IP literal is taken when it is
    the bound address (any address for a bind to all of them).
    """
    name = header.strip().lower()
    if name.startswith("["):  # [v6]:port
        name = name[1 : name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:  # name:port or v4:port
        name = name.rsplit(":", 1)[0]
    allowed = allowed_hosts(bind)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name in allowed and name != "*"
    return "*" in allowed or name in allowed


class _HostCheck:
    """Answers 400 to a request whose ``Host`` is not one of this page's (:func:`host_allowed`)."""

    def __init__(self, app: ASGIApp, host: str) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if not host_allowed(self.host, header):
                await PlainTextResponse("Invalid host header", status_code=400)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


class _Headers:
    """Adds :data:`SECURITY_HEADERS` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _open_file(directory: Path, name: str) -> tuple[BinaryIO, int] | None:
    """Regular file ``directory/name``, open, and its size (None: not there, or not a
    regular file: a symbolic link or a FIFO is never followed or waited on)."""
    try:
        return open_regular(directory / name)
    except (FileError, OSError):
        return None


async def _chunks(f: BinaryIO, size: int) -> AsyncIterator[bytes]:
    """The file's first ``size`` bytes (the length announced: a growing file's new lines
    are not sent past it)."""
    left = size
    while left > 0 and (chunk := await trio.to_thread.run_sync(f.read, min(CHUNK, left))):
        left -= len(chunk)
        yield chunk


def make_app(
    board: RunBoard,
    *,
    folder: Callable[[], Path | None],
    host: str = "127.0.0.1",
    limits: Limits = DEFAULT_LIMITS,
) -> Starlette:
    """The page's ASGI app over ``board``; ``folder()`` is the run's output folder (None
    until it is known), ``host`` the address the page is bound to."""
    changes = Changes(board)
    viewers = _Viewers(limits.ui_max_viewers)
    pages = {name: _static(name) for name in STATIC}

    def static(name: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return Response(pages[name], media_type=STATIC[name])

        return endpoint

    async def state(request: Request) -> Response:
        body = json.dumps(board.snapshot(), allow_nan=False)
        return Response(body, media_type="application/json")

    async def events(request: Request) -> Response:
        return EventStream(changes, viewers, limits)

    async def files(request: Request) -> Response:
        name = request.path_params["name"]
        directory = folder()
        if name not in LINKED_FILES or name not in board.files or directory is None:
            return PlainTextResponse("no such file", 404)
        opened = _open_file(directory, name)
        if opened is None:
            return PlainTextResponse("no such file", 404)
        f, size = opened
        suffix = Path(name).suffix
        headers = {"content-length": str(size)}
        if suffix not in CONTENT_TYPES:
            headers["content-disposition"] = f'attachment; filename="{name}"'
        media = CONTENT_TYPES.get(suffix, "application/octet-stream")
        if request.method == "HEAD":
            f.close()
            return Response(b"", headers=headers, media_type=media)
        # Closed once the response is over, however it ends (the viewer may leave first).
        return StreamingResponse(
            _chunks(f, size), headers=headers, media_type=media, background=BackgroundTask(f.close)
        )

    routes = [
        Route("/", static("index.html")),
        Route("/app.js", static("app.js")),
        Route("/app.css", static("app.css")),
        Route("/state", state),
        Route("/events", events),
        Route("/files/{name}", files),
    ]
    middleware = [
        Middleware(_Headers),
        Middleware(_HostCheck, host=host),
    ]
    return Starlette(routes=routes, middleware=middleware)
