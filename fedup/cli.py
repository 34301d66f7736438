"""``fedup-peer``: the command line.  It parses, composes and prints; nothing else.

Every failure the user can cause or meet (a bad key file, a bad setting, a
peer misbehaving) ends in one line on stderr and a non-zero exit; a traceback
means a bug in FedUp.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedup import __version__
from fedup.commands import demo as demo_command
from fedup.commands import peers as peers_command
from fedup.commands import simulate as simulate_command
from fedup.commands import start as start_command
from fedup.commands import verify as verify_command
from fedup.errors import FedupError
from fedup.identity import STATE_DIR_ENV, default_state_dir, load_or_create_identity

Command = Callable[[argparse.Namespace], int]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"where this peer keeps its identity and runs (default: ${STATE_DIR_ENV}, "
        f"else {default_state_dir()})",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: %(default)s)",
    )


def cmd_id(args: argparse.Namespace) -> int:
    """Print this peer's ID, creating its identity on first use."""
    state_dir: Path = args.state_dir
    identity = load_or_create_identity(state_dir)
    if args.json:
        print(
            json.dumps(
                {
                    "peer_id": identity.peer_id.text,
                    "public_key": identity.public_key.hex(),
                    "state_dir": str(state_dir),
                }
            )
        )
    else:
        print(identity.peer_id.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedup-peer",
        description="FedUp: train one model together without sharing data. "
        "Each command has its own --help.",
    )
    parser.add_argument("--version", action="version", version=f"fedup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "id",
        help="print this peer's ID (creates the identity on first use)",
        description="Print this peer's ID. The identity (an Ed25519 key) is created in the "
        "state directory on first use; the same state directory always gives the same ID.",
    )
    _common(p)
    p.add_argument(
        "--json", action="store_true", help="print peer ID, public key and state dir as JSON"
    )
    p.set_defaults(func=cmd_id)
    peers_command.add_parser(sub, common=_common)
    start_command.add_parser(sub, common=_common)
    simulate_command.add_parser(sub, common=_common)
    demo_command.add_parser(sub)
    verify_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if getattr(args, "state_dir", False) is None:  # resolved once, for every command
        args.state_dir = default_state_dir()
    func: Command = args.func
    try:
        return func(args)
    except FedupError as exc:
        print(f"fedup-peer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedup-peer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
