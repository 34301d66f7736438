"""``run_demo``: peers, federation, baselines, report, plot, in that order."""

from __future__ import annotations

import json
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from fedup.demo.peers import (
    DemoPeer,
    peer_commands,
    prepare_peers,
    run_peers,
    write_network_key,
)
from fedup.demo.report import Baselines, build_report, train_baselines
from fedup.errors import ConfigError, FedupError
from fedup.files import copy_atomic, make_dirs, write_atomic
from fedup.ui.board import RunBoard
from fedup.ui.folder import RunFolder

if TYPE_CHECKING:
    import torch

__all__ = ["MARKER", "DemoSettings", "run_demo"]

MARKER = ".fedup-demo"
"""A file in every demo output folder: only such a folder is ever emptied by a rerun."""

MIN_ROWS = 200
"""Loans per lender at least: its 20% validation split then holds defaults and
repayments, and its categories pass the summaries' minimum count."""
MAX_ROWS = 1_000_000
"""Loans per lender at most: a demo, not a load test (about 100 MB of CSV each)."""

Say = Callable[[str], None]


@attrs.frozen
class DemoSettings:
    peers: int = 3
    out: Path = Path("fedup-demo")
    seed: int = 0
    """Which synthetic lenders (lender ``i`` of population ``seed``)."""
    rows: int | None = None
    """Rows per lender (default: drawn per lender, 1,500 to 5,000)."""
    mdns: bool = True
    """Find each other by mDNS on 127.0.0.1; else dial each other's ports."""
    settle: float = 2.0
    timeout: float = 600.0
    """Deadline for the whole federation (peers still running are stopped)."""
    baselines: bool = True
    peer_args: tuple[str, ...] = ()
    """Extra ``fedup-peer start`` options for every peer (e.g. ``--max-laps 40``)."""
    device: str = "auto"
    """Where every peer and the baselines train (``--device``: auto, cpu, cuda, cuda:N)."""

    def __attrs_post_init__(self) -> None:
        if not 2 <= self.peers <= 16:
            raise ConfigError("the demo runs 2 to 16 peers")
        if self.seed < 0:
            raise ConfigError("--seed must not be negative")
        if self.rows is not None and not MIN_ROWS <= self.rows <= MAX_ROWS:
            raise ConfigError(f"--rows must be in {MIN_ROWS:,}..{MAX_ROWS:,}")
        if not (0 < self.timeout < math.inf and 0 <= self.settle < math.inf):
            raise ConfigError("--timeout must be positive and --settle not negative")


OUTPUTS = frozenset(
    {MARKER, "peers", "network.key", "report.json", "loss_curves.png", "model.safetensors",
     "federation.json"}
)  # fmt: skip
"""Everything a demo writes at the top of its folder: all a rerun removes."""


def _fresh_out(out: Path) -> None:
    """Create ``out``; a folder an earlier demo made is emptied first, nothing else is.

    Only the names of :data:`OUTPUTS` are removed, and only when the folder
    holds the :data:`MARKER` and nothing else: a file the user added stops the
    rerun.  Raises :class:`~fedup.errors.ConfigError` otherwise.
    """
    try:
        if out.is_symlink():
            raise ConfigError(f"{out} is a symbolic link; give the demo a real folder")
        if out.exists():
            names = {p.name for p in out.iterdir()} if out.is_dir() else None
            if names is None or (names and MARKER not in names):
                raise ConfigError(
                    f"{out} exists and was not made by fedup-peer demo; choose another --out"
                )
            if names - OUTPUTS:
                raise ConfigError(
                    f"{out} was made by fedup-peer demo but now also holds "
                    f"{', '.join(sorted(names - OUTPUTS))}; move them or choose another --out"
                )
            for name in sorted(names - {MARKER}):
                target = out / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
        make_dirs(out)
        write_atomic(out / MARKER, b"made by fedup-peer demo; a rerun replaces this folder\n")
    except OSError as exc:
        raise ConfigError(
            f"cannot prepare the demo folder {out}: {exc}; choose another --out"
        ) from None


class _Following:
    """Follows the peers' output folders onto a board while they run (the files as they
    grow), and says when the federation formed."""

    def __init__(self, peers: list[DemoPeer], board: RunBoard, say: Say) -> None:
        self.folders = [RunFolder(p.run_dir, board, p.peer_id) for p in peers]
        self.board = board
        self.say = say
        self.formed = False
        self.unreadable: set[int] = set()

    def tick(self) -> None:
        for i, folder in enumerate(self.folders):
            if i in self.unreadable:
                continue
            try:
                folder.read()
            except FedupError as exc:  # a display problem: the run goes on
                self.unreadable.add(i)
                self.say(f"cannot follow peer {i}'s files any more: {exc}")
        board = self.board
        if not self.formed and board.run_id is not None:
            self.formed = True
            ring = " -> ".join(m[-6:] for m in board.members)
            self.say(f"formed run {board.run_id[:8]}: ring {ring}; training")


class _EarlyBaselines:
    """Trains the baselines in a thread from the moment a peer wrote its run's
    ``federation.json`` (the schema and settings they need), while the ring trains."""

    def __init__(self, peers: list[DemoPeer], device: torch.device) -> None:
        self.peers = peers
        self.device = device
        self._thread: threading.Thread | None = None
        self._result: Baselines | None = None
        self._error: BaseException | None = None

    def poll(self) -> None:
        """Start the thread once a run's ``federation.json`` can be read."""
        if self._thread is not None:
            return
        for peer in self.peers:
            try:
                federation = json.loads((peer.run_dir / "federation.json").read_text("utf-8"))
            except (OSError, ValueError):
                continue  # not written yet (it is replaced whole, never half-written)
            self._thread = threading.Thread(
                target=self._train, args=(federation,), name="fedup-demo-baselines"
            )
            self._thread.start()
            return

    def _train(self, federation: dict[str, Any]) -> None:
        try:
            self._result = train_baselines(self.peers, federation, device=self.device)
        except Exception as exc:  # said, then trained again after the federation
            self._error = exc

    def result(self, say: Say) -> Baselines | None:
        """The baselines, once trained (None: not started, or failed, which is said)."""
        if self._thread is None:
            return None
        self._thread.join()
        if self._error is not None:
            say(f"training the baselines while the peers ran failed ({self._error}); again now")
        return self._result


def run_demo(
    settings: DemoSettings, say: Say = print, board: RunBoard | None = None
) -> dict[str, Any]:
    """Run the whole demo into ``settings.out``; return the report (also ``report.json``).

    While the peers run, their output folders are followed onto ``board`` (every
    member's hops, every lap result, the ring; a live display draws it); without
    one, each lap result is said in one line.  Raises
    :class:`~fedup.errors.FedupError` when no peer finished.  Peers that failed
    are listed in the report with their reason; the demo still compares
    whatever model the others agreed on.
    """
    from fedup.learn.device import choose_device, describe_device

    device = choose_device(settings.device)  # CUDA asked for and absent: before any peer
    if board is None:
        board = RunBoard()
        board.on_lap(lambda point, line: say(line))
    out = settings.out
    _fresh_out(out)
    network = f"fedup-demo-{secrets.token_hex(4)}"
    key_file = out / "network.key"
    write_network_key(key_file)
    peers = prepare_peers(out, settings.peers, seed=settings.seed, rows=settings.rows)
    how = "mDNS on 127.0.0.1" if settings.mdns else "their TCP ports on 127.0.0.1 (no mDNS)"
    say(
        f"starting {len(peers)} peers (network {network}, fresh network key); they find "
        f"each other by {how} and talk over encrypted TCP"
    )
    for p in peers:
        say(
            f"  peer {p.index}: {p.lender}, {p.rows:,} loans, "
            f"{p.default_rate:.1%} defaulted  ({p.directory})"
        )
    commands = peer_commands(
        peers,
        network=network,
        key_file=key_file,
        settle=settings.settle,
        mdns=settings.mdns,
        device=str(device),
        extra=settings.peer_args,
    )
    say(f"every peer and the baselines train on {describe_device(device)}")
    started = time.monotonic()
    following = _Following(peers, board, say)
    early = _EarlyBaselines(peers, device)

    def tick() -> None:
        following.tick()
        if settings.baselines:
            early.poll()

    outcomes = run_peers(peers, commands, timeout=settings.timeout, on_tick=tick)
    following.tick()  # what the peers wrote last
    board.close()
    elapsed = time.monotonic() - started
    for o in outcomes:
        if o.error is not None:
            say(f"peer {o.peer.index} failed: {o.error} (log: {o.peer.log})")
    if all(o.summary is None for o in outcomes):
        hint = " (if mDNS on 127.0.0.1 does not work here, try --no-mdns)" if settings.mdns else ""
        raise FedupError(f"no peer finished the federation; see {out}/peers/*/peer.log{hint}")
    say(f"federation done in {elapsed:.1f} s; the baselines on the pooled data (trained meanwhile)")
    trained = early.result(say) if settings.baselines else None
    report = build_report(outcomes, baselines=settings.baselines, device=device, trained=trained)
    report["network"] = network
    report["mdns"] = settings.mdns
    report["seed"] = settings.seed
    report["federation_seconds"] = elapsed
    first = next(o for o in outcomes if o.summary is not None)
    copy_atomic(first.peer.run_dir / "model.safetensors", out / "model.safetensors")
    copy_atomic(first.peer.run_dir / "federation.json", out / "federation.json")
    from fedup.demo.plot import plot_loss_curves  # matplotlib: only when drawing

    plot_loss_curves(report, out / "loss_curves.png")
    report["out"] = str(out)
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    return report
