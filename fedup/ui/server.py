"""Serving the federation page with hypercorn's trio worker, inside the caller's nursery.

:class:`PageServer` binds an address (``--ui [HOST:]PORT``: the host defaults to
127.0.0.1, so the page is for this machine unless the operator names another one)
and serves the app until :meth:`PageServer.stop` (a graceful shutdown: the event
streams end after the board's last change) or until its nursery is cancelled.
"""

from __future__ import annotations

import errno
import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette

from fedup.errors import ConfigError, innermost_single
from fedup.protocol.records import Address

__all__ = ["PageServer"]

GRACE_SECONDS = 2.0
"""How long a stopping page waits for open responses before closing them."""

log = logging.getLogger("fedup.ui")


def _bind_error(address: Address, exc: OSError) -> ConfigError:
    if exc.errno == errno.EADDRINUSE:
        why, fix = f"port {address.port} is in use", "pass another --ui port, or 0 for a free one"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why, fix = f"this host has no address {address.host}", "pass --ui PORT for 127.0.0.1"
    elif exc.errno == errno.EACCES:
        why, fix = f"not allowed to use port {address.port}", "pass a --ui port of 1024 or more"
    else:
        why, fix = exc.strerror or str(exc), "pass another --ui address"
    return ConfigError(f"cannot serve the federation page on {address}: {why}; {fix}")


class PageServer:
    """The page's HTTP server; :meth:`start` it in a nursery."""

    def __init__(self, app: Starlette, address: Address) -> None:
        self.app = app
        self.address = address
        self.url: str | None = None
        """``http://HOST:PORT/`` once started (the port chosen, for port 0)."""
        self._stop = trio.Event()

    def _config(self) -> Config:
        config = Config()
        host = self.address.host
        host = f"[{host}]" if ":" in host else host
        config.bind = [f"{host}:{self.address.port}"]
        config.accesslog = None
        errors = logging.getLogger("fedup.ui.http")
        if errors.level == logging.NOTSET:
            errors.setLevel(logging.WARNING)  # not its "Running on ..." line: we say it
        config.errorlog = errors
        config.graceful_timeout = GRACE_SECONDS
        return config

    async def start(self, nursery: trio.Nursery) -> str:
        """Bind and serve in ``nursery``; return the page's URL.

        Raises :class:`~fedup.errors.ConfigError` (naming the fix) when the address
        cannot be bound.
        """

        async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            await serve(
                self.app,  # type: ignore[arg-type]  # Starlette is an ASGI 3 app
                self._config(),
                shutdown_trigger=self._stop.wait,
                task_status=task_status,
            )

        try:
            binds: list[str] = await nursery.start(run)
        except (OSError, BaseExceptionGroup) as exc:
            bind = innermost_single(exc)
            if not isinstance(bind, OSError):
                raise
            raise _bind_error(self.address, bind) from None
        self.url = binds[0].rstrip("/") + "/"
        return self.url

    def stop(self) -> None:
        """Shut down gracefully (open responses get :data:`GRACE_SECONDS`)."""
        self._stop.set()
