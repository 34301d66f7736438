"""``fedup-peer``: the command line.  It parses, composes and prints; nothing else.

Every failure the user can cause or meet (a bad key file, a bad setting, a
port in use, an output folder it cannot write, a peer misbehaving) ends in one
line on stderr naming the problem and the fix, with a non-zero exit: 2 for a
command line that does not parse (an unknown option, a value out of its
range), 1 for every other error.  Anything else that escapes a command is a
bug in FedUp: it too is one line (``internal error``), and ``--debug`` (or
``--log-level debug``) prints the traceback of any error, for a bug report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from fedup import __version__
from fedup.commands import demo as demo_command
from fedup.commands import peers as peers_command
from fedup.commands import predict as predict_command
from fedup.commands import show as show_command
from fedup.commands import simulate as simulate_command
from fedup.commands import start as start_command
from fedup.commands import verify as verify_command
from fedup.errors import FedupError, innermost_single
from fedup.identity import STATE_DIR_ENV, default_state_dir, load_or_create_identity

Command = Callable[[argparse.Namespace], int]


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), not the usage."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text}; see {self.prog} --help\n")


def _debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        help="log at debug level and print the traceback of an error (for bug reports)",
    )


def _quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only errors and the result: no progress display, no log lines below "
        "error (overrides --log-level, not --debug)",
    )


def _logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: %(default)s)",
    )
    _quiet(parser)
    _debug(parser)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"where this peer keeps its identity and runs (default: ${STATE_DIR_ENV}, "
        f"else {default_state_dir()})",
    )
    _logging(parser)


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
    parser = OneLineParser(
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
    demo = demo_command.add_parser(sub)
    _quiet(demo)
    _debug(demo)
    show_command.add_parser(sub, common=_logging)
    verify_command.add_parser(sub)
    _debug(predict_command.add_parser(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "debug", False):
        args.log_level = "debug"
    elif getattr(args, "quiet", False):
        args.log_level = "error"
    debug = getattr(args, "log_level", None) == "debug"
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
    except KeyboardInterrupt:
        print("fedup-peer: interrupted", file=sys.stderr)
        return 130
    except (Exception, BaseExceptionGroup) as exc:
        return failed(exc, debug=debug)


def failed(exc: BaseException, *, debug: bool) -> int:
    """Report an error that ended a command in one line on stderr; return the exit code.

    With ``debug``, the traceback comes first.  A :class:`FedupError` is the
    user's to fix and says how; an ``OSError`` (a disk filling up, say) is
    printed as the system reports it; anything else is a bug in FedUp.
    """
    leaf = innermost_single(exc)
    if isinstance(leaf, KeyboardInterrupt):
        print("fedup-peer: interrupted", file=sys.stderr)
        return 130
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(leaf, FedupError):
        line = f"error: {leaf}"
    elif isinstance(leaf, OSError):
        line = f"error: {leaf}" + ("" if debug else " (--debug shows where)")
    else:
        line = f"internal error: {type(leaf).__name__}: {leaf}; a bug in FedUp" + (
            "" if debug else ": rerun with --debug and report the traceback"
        )
    print("fedup-peer: " + " ".join(line.split()), file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
