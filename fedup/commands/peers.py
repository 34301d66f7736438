"""``fedup-peer peers``: browse the LAN for a few seconds and list the FedUp peers seen.

A passive browser: it announces nothing and only queries on the chosen
interfaces (by default the LAN interfaces, see
:func:`fedup.net.discovery.mdns.choose_interfaces`).  Every announcement
seen is listed, verified or not, with the reason it was refused.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from fedup.errors import ConfigError
from fedup.files import read_private_file
from fedup.identity import KEY_FILE_NAME, load_or_create_identity
from fedup.net.discovery import MdnsDiscovery, NetworkScope, Sighting
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import network_key_id

DEFAULT_TIMEOUT = 3.0
"""Seconds to browse: registrations announce within about 1.7 s and answers to our
query arrive within a second."""
MAX_TIMEOUT = 3600.0


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_TIMEOUT:g} seconds")
    return value


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    """Register the ``peers`` command; ``common`` adds ``--state-dir`` and ``--log-level``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "peers",
        help="list the FedUp peers announcing themselves on the LAN (announces nothing)",
        description="Browse the LAN with mDNS for a few seconds and list every FedUp peer "
        "announcement seen: peer ID, addresses, network, and whether its signed record "
        "verified (or why not). This command only listens and asks; it announces nothing.",
    )
    common(p)
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to browse (default: {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.add_argument(
        "--interface",
        action="append",
        default=None,
        metavar="IFACE|IP",
        help="browse on this interface (name or IPv4 address); repeat for several "
        "(default: the LAN interfaces that are up)",
    )
    p.add_argument(
        "--loopback",
        action="store_true",
        help="browse on 127.0.0.1 only (peers running on this host)",
    )
    p.add_argument(
        "--network",
        metavar="NAME",
        default=None,
        help="accept only peers of this network (default: list every network as verified)",
    )
    p.add_argument(
        "--network-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the network's key (64 hex digits or 32 raw bytes): accept only peers that "
        "hold it (default: any key, or none when --network is given)",
    )
    p.set_defaults(func=run)
    return p


def read_network_key(path: Path) -> bytes:
    """Read a 32-byte network key: 64 hex digits (whitespace ignored) or 32 raw bytes.

    The file is checked like the identity key (:func:`fedup.files.read_private_file`):
    a symbolic link, another user's file, or one that group or others can read or
    write is refused with :class:`~fedup.errors.ConfigError`, one line with the fix.
    """
    data = read_private_file(path, "network key file", ConfigError, max_bytes=4097)
    if len(data) == 32:
        return data
    try:
        key = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"network key file {path} must hold 64 hex digits (or 32 raw bytes)")
    return key


def _scope(args: argparse.Namespace) -> NetworkScope:
    if args.network is not None and not args.network:
        raise ConfigError("--network must not be empty")
    if args.network_key_file is not None:
        return NetworkScope(args.network, network_key_id(read_network_key(args.network_key_file)))
    return NetworkScope(args.network, None, any_key=args.network is None)


def _local_peer(args: argparse.Namespace) -> PeerId | None:
    """Our own peer ID if this state directory has an identity (never creates one)."""
    state_dir: Path = args.state_dir  # resolved by fedup.cli
    if not (state_dir / KEY_FILE_NAME).exists():
        return None
    return load_or_create_identity(state_dir).peer_id


async def browse(
    scope: NetworkScope,
    *,
    timeout: float,
    interfaces: Sequence[str] | None = None,
    loopback: bool = False,
) -> tuple[list[Sighting], list[str]]:
    """Browse for ``timeout`` seconds; return the sightings and the addresses used."""
    async with MdnsDiscovery.open(scope=scope, interfaces=interfaces, loopback=loopback) as disc:
        await trio.sleep(timeout)
        return disc.sightings(), disc.interfaces


def _sort_key(s: Sighting) -> tuple[int, str, str]:
    return (0 if s.verified else 1, s.peer_id.text if s.peer_id else "~", s.source)


def format_json(sightings: Sequence[Sighting], local: PeerId | None) -> str:
    rows = []
    for s in sorted(sightings, key=_sort_key):
        row = s.to_json()
        row["self"] = local is not None and s.peer_id == local
        rows.append(row)
    return json.dumps(rows, indent=2)


def format_table(
    sightings: Sequence[Sighting], local: PeerId | None, interfaces: Sequence[str], timeout: float
) -> str:
    rows = [("PEER ID", "ADDRESSES", "NETWORK", "STATUS")]
    for s in sorted(sightings, key=_sort_key):
        status = "verified" if s.verified else f"refused: {s.reason} ({s.detail})"
        if local is not None and s.peer_id == local:
            status += " (this peer)"
        rows.append(
            (
                s.peer_id.text if s.peer_id else "-",
                " ".join(str(a) for a in s.addresses) or "-",
                s.network if s.network is not None else "-",
                status,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    verified = sum(1 for s in sightings if s.verified)
    lines.append(
        f"{verified} verified, {len(sightings) - verified} refused; "
        f"browsed {timeout:g} s on {', '.join(interfaces)}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Browse, print the table (or JSON), return the exit status (0)."""
    scope = _scope(args)
    local = _local_peer(args)
    if str(getattr(args, "log_level", "info")) != "debug":
        # the table reports every refusal; per-announcement log lines would repeat it
        logging.getLogger("fedup.discovery").setLevel(logging.ERROR)
    sightings, interfaces = trio.run(
        lambda: browse(
            scope, timeout=args.timeout, interfaces=args.interface, loopback=args.loopback
        )
    )
    if args.json:
        print(format_json(sightings, local))
    else:
        print(format_table(sightings, local, interfaces, args.timeout))
    return 0
