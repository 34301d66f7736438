"""``fedup-peer show OUT_DIR``: the federation page of a finished run, from its files.

Reads the run's output folder once (:func:`fedup.ui.folder.load_run`), prints
the page's address and serves it (the same page as ``start --ui``) until
interrupted.  It loads neither torch nor any peer: it only reads files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from fedup.commands.values import UI_HOST, described, ui_address
from fedup.protocol.records import Address

if TYPE_CHECKING:
    from fedup.ui.board import RunBoard


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "show",
        help="serve the federation page of a finished run's output folder",
        description="Serve the read-only federation page (the one 'fedup-peer start --ui' "
        "serves while a peer runs) of a run's output folder: its members, the ring, the "
        "loss curves, the settings, the stop reason and links to its files. Prints the "
        "page's address; Ctrl-C stops it.",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a run's output folder")
    p.add_argument(
        "--ui",
        type=ui_address,
        default=Address(UI_HOST, 0),
        metavar="[HOST:]PORT",
        help=described(
            "where to serve the page; HOST defaults to 127.0.0.1 (this machine only), "
            "port 0 picks a free one",
            str,
            None,
            shown=f"{UI_HOST}:0",
        ),
    )
    common(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from fedup.ui.folder import load_run
    from fedup.ui.page import make_app
    from fedup.ui.server import PageServer

    directory: Path = args.out_dir
    board = load_run(directory)
    address: Address = args.ui

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            app = make_app(board, folder=lambda: directory, host=address.host)
            url = await PageServer(app, address).start(nursery)
            print(f"federation page of {directory}: {url} (Ctrl-C stops it)", flush=True)
            if not args.quiet:
                print(f"  {_summary(board)}", file=sys.stderr, flush=True)

    trio.run(main)
    return 0


def _summary(board: RunBoard) -> str:
    from fedup.ui.board import lap_name

    p = board.progress()
    parts = [f"run {board.run_id[:8] if board.run_id else '?'}", board.stage]
    if board.stop_reason:
        parts.append(f"stopped: {board.stop_reason}")
    if p.best is not None:
        parts.append(f"best {lap_name(p.best.lap)} ({p.best.loss:.4f})")
    parts.append(f"{len(board.members)} members, {len(board.laps)} lap results")
    return "; ".join(parts)
