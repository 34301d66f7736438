"""``fedup-peer start``: discover, form, train and finish, with zero configuration on a LAN.

Every setting but ``--state-dir``, ``--log-level`` and ``--debug`` can come
from, in order of precedence: the command line, an environment variable
``FEDUP_<NAME>`` (e.g. ``FEDUP_MIN_PEERS=3``), a TOML file given with
``--config`` (keys as the long option names, with ``-`` or ``_``), or the
default; each is checked against its range (``--help`` shows ranges and
defaults).  The state dir comes from ``--state-dir`` or ``FEDUP_STATE_DIR``,
the log level from ``--log-level``: a config file naming either is refused
rather than silently ignored.

Before it joins anything the peer checks that this machine has the device
``--device`` names (:func:`fedup.learn.device.choose_device`: ``cuda`` without a
CUDA device is one line and exit 1), locks its state directory
(:mod:`fedup.state_lock`: one running peer per state directory), checks its
output folder (:func:`fedup.peer.outputs.check_out_dir`) and binds its listen
address.  With ``--no-mdns`` and no ``--bootstrap`` it is a rendezvous: it
listens and waits for peers that bootstrap to it, and logs the ``--bootstrap``
address they should use.

It prints the run's outcome as one JSON line and exits 0 only when the stopping
rule ended the run with a trained model (``summary.json``'s ``ok``); a run that
ended with ``members-lost``, or with a model from no trained lap, exits with
:data:`EXIT_NOT_OK` (3); a failure prints one line and exits 1 (2 for a command
line argparse refuses).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from fedup.commands.peers import read_network_key
from fedup.commands.run_options import (
    DEFAULTS,
    DP_OPTIONS,
    MODE_HELP,
    PERSONAL_OPTION,
    RUN_OPTIONS,
    dp_budget,
    mode_name,
    run_settings,
)
from fedup.commands.values import (
    DEVICE_HELP,
    HOP_TIMEOUT,
    SETTLE,
    TASK_HELP,
    address,
    described,
    device_spec,
    listen_address,
    of_setting,
    task_name,
    ui_address,
    whole,
)
from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConfigError
from fedup.protocol.records import Address
from fedup.state_lock import hold_state_dir

if TYPE_CHECKING:
    import torch

    from fedup.identity import Identity
    from fedup.peer import Peer, PeerConfig
    from fedup.peer.outputs import RunSummary
    from fedup.ui.board import RunBoard
    from fedup.ui.server import PageServer

log = logging.getLogger("fedup")

ENV_PREFIX = "FEDUP_"


def _flag(text: object) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value")


@attrs.frozen
class Setting:
    name: str
    convert: Callable[[Any], Any]
    """The option's argparse type; also applied to a value from the environment or file."""
    default: Any
    help: str
    repeat: bool = False
    flag: bool = False
    shown: str | None = None
    """The default as ``--help`` shows it, when not the value itself."""


SETTINGS = [
    Setting("data", Path, None, "CSV file of this peer's private data",
            shown="synthetic loans made for this peer"),
    Setting("target", str, "default", "the target column of --data"),
    Setting("task", task_name, None, TASK_HELP.split(" (")[0], shown="inferred from its values"),
    Setting("drop", str, None, "a column of --data to leave out before anything reads it "
            "(an ID, free text); repeatable", repeat=True, shown="none"),
    Setting("positive_label", str, None, "the value of --target that is the positive class",
            shown="inferred: 1, yes, true, default, bad, charged off, ..."),
    Setting("out", Path, None, "output folder; checked before the peer joins anything",
            shown="a run folder under the state dir"),
    Setting("min_peers", whole(1, DEFAULT_LIMITS.max_members), 2,
            "members needed, this peer included"),
    Setting("settle", SETTLE, 3.0, "seconds without a new peer before forming"),
    Setting("hop_timeout", HOP_TIMEOUT, DEFAULT_LIMITS.hop_timeout,
            "seconds from handing the model on to hearing it moved on (a successor silent "
            "longer is counted dead and skipped), and of silence after which a waiting "
            "member asks to be taken back (it may have been cut off); a local choice"),
    *(Setting(name, kind, getattr(DEFAULTS, name), why) for name, kind, why in RUN_OPTIONS),
    Setting("mode", mode_name, DEFAULTS.algorithm, MODE_HELP),
    Setting("seed", of_setting("seed"), DEFAULTS.seed,
            "seed of the model's initialisation and shuffling"),
    Setting("device", device_spec, "auto", DEVICE_HELP),
    *(Setting(name, kind, default, why, shown="off" if default is None else None)
      for name, kind, default, why in DP_OPTIONS),
    Setting(PERSONAL_OPTION[0], PERSONAL_OPTION[1], PERSONAL_OPTION[2], PERSONAL_OPTION[3],
            shown="0: off"),
    Setting("listen", listen_address, Address("0.0.0.0", 0),
            "TCP HOST:PORT to listen on; port 0 picks a free one"),
    Setting("interface", str, None, "mDNS interface (name or IPv4); repeatable",
            repeat=True, shown="the LAN interfaces that are up"),
    Setting("network", str, "fedup", "network name; peers of other networks are ignored"),
    Setting("network_key_file", Path, None, "32-byte network key (64 hex digits or raw)",
            shown="none: an open network"),
    Setting("bootstrap", address, None, "known peer HOST:PORT to dial; repeatable",
            repeat=True, shown="none"),
    Setting("no_mdns", _flag, False, "do not use mDNS; without --bootstrap this peer is a "
            "rendezvous: it listens and waits for peers that bootstrap to it", flag=True,
            shown="off"),
    Setting("loopback", _flag, False, "mDNS and TCP on 127.0.0.1 only (peers on one host)",
            flag=True, shown="off"),
    Setting("fresh", _flag, False, "start a new run even if this state dir holds an "
            "interrupted one (without it, start resumes that run); the interrupted run's "
            "state file is moved into its run folder, never deleted", flag=True),
    Setting("ui", ui_address, None, "serve the read-only federation page on [HOST:]PORT; "
            "HOST defaults to 127.0.0.1 (this machine only), port 0 picks a free one",
            shown="off"),
]  # fmt: skip


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "start",
        help="join a federation: discover, form, train, finish",
        description="Start this peer: find the others (mDNS on the LAN, or --bootstrap), form "
        "a federation, train the model around the ring on this peer's private data until "
        "it converges, and write model.safetensors, metrics.jsonl, summary.json and "
        "federation.json. Every "
        "option but --state-dir, --log-level and --debug can also come from FEDUP_<NAME> "
        "environment variables or a --config TOML file.",
    )
    common(p)
    p.add_argument(
        "--config", type=Path, default=None, help="TOML file with settings (default: none)"
    )
    for s in SETTINGS:
        opt = "--" + s.name.replace("_", "-")
        text = described(s.help, s.convert, s.default, s.shown)
        if s.flag:
            p.add_argument(opt, action="store_const", const=True, default=None, help=text)
        elif s.repeat:
            p.add_argument(opt, action="append", type=s.convert, default=None, help=text)
        else:
            p.add_argument(opt, type=s.convert, default=None, help=text)
    p.set_defaults(func=run)
    return p


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Each setting from the command line, the environment, the config file or the default."""
    env = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    if args.config is not None:
        try:
            raw = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {args.config}: {exc}") from None
        file_values = {k.replace("-", "_"): v for k, v in raw.items()}
        unknown = set(file_values) - {s.name for s in SETTINGS}
        if unknown:
            raise ConfigError(f"unknown settings in {args.config}: {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for s in SETTINGS:
        value: Any = getattr(args, s.name)
        if value is not None:  # from the command line: argparse converted and checked it
            out[s.name] = value
            continue
        if ENV_PREFIX + s.name.upper() in env:
            value = env[ENV_PREFIX + s.name.upper()]
            value = value.split(",") if s.repeat else value
            where = ENV_PREFIX + s.name.upper()
        if value is None and s.name in file_values:
            value = file_values[s.name]
            where = f"{s.name} in {args.config}"
        if value is None:
            out[s.name] = s.default
            continue
        try:
            if s.repeat:
                items = value if isinstance(value, list) else [value]
                out[s.name] = [s.convert(v) for v in items]
            else:
                out[s.name] = s.convert(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


def build_config(args: argparse.Namespace, values: dict[str, Any]) -> PeerConfig:
    from fedup.peer import PeerConfig  # torch: only when a peer starts

    key = read_network_key(values["network_key_file"]) if values["network_key_file"] else None
    run = run_settings(values, seed=values["seed"])
    return PeerConfig(
        state_dir=args.state_dir,
        out_dir=values["out"],
        network=values["network"],
        network_key=key,
        listen=values["listen"],
        interfaces=tuple(values["interface"]) if values["interface"] else None,
        loopback=values["loopback"],
        mdns=not values["no_mdns"],
        bootstrap=tuple(values["bootstrap"] or ()),
        min_peers=values["min_peers"],
        settle=values["settle"],
        run=run,
        limits=attrs.evolve(DEFAULT_LIMITS, hop_timeout=values["hop_timeout"]),
    )


EXIT_NOT_OK = 3
"""Exit code of a run that ended, but not by its stopping rule with a trained model."""


def exit_code(summary: RunSummary) -> int:
    """0 when the stopping rule ended the run with a trained model, else :data:`EXIT_NOT_OK`."""
    if summary.ok:
        return 0
    log.error(
        "the run did not end by its stopping rule with a trained model "
        "(stop reason %s, best lap %d, ended by %s): see %s",
        summary.stop_reason, summary.best_lap, summary.ended_by, summary.out_dir,
    )  # fmt: skip
    return EXIT_NOT_OK


def run(args: argparse.Namespace) -> int:
    from fedup.learn.device import choose_device

    values = resolve(args)
    config = build_config(args, values)
    device = choose_device(values["device"])  # CUDA asked for and absent: one line, exit 1
    with hold_state_dir(config.resolved_state_dir()):  # one running peer per state dir
        return _run(config, values, device, quiet=args.quiet)


def _run(
    config: PeerConfig, values: dict[str, Any], device: torch.device, *, quiet: bool = False
) -> int:
    from fedup.peer import Peer, TabularSource
    from fedup.peer.outputs import json_safe
    from fedup.ui.board import RunBoard
    from fedup.ui.display import TerminalDisplay, log_laps, on_terminal
    from fedup.ui.live import PeerView

    identity = config.load_identity()
    state_dir = config.resolved_state_dir()
    table_options: dict[str, Any] = {
        "drop": values["drop"] or (),
        "positive_label": values["positive_label"],
        "task": values["task"],
        "device": device,
        "privacy": dp_budget(values),
        "personal_layers": values["personal_layers"],
    }
    if values["data"] is not None:
        source = TabularSource.from_csv(values["data"], values["target"], **table_options)
    else:
        source = TabularSource.synthetic(identity.peer_id.text, state_dir / "data", **table_options)
    config = attrs.evolve(config, identity=identity, state_dir=state_dir)
    if values["fresh"]:
        _set_aside(config, identity)
    board = RunBoard(me=identity.peer_id.text)

    def folder() -> Path | None:
        return config.run_dir(bytes.fromhex(board.run_id)) if board.run_id else None

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            page = await _serve_page(nursery, board, folder, values["ui"], config)
            with contextlib.ExitStack() as screen:
                async with Peer.open(config, source) as peer:
                    display = None
                    if on_terminal() and not quiet:
                        display = screen.enter_context(TerminalDisplay(board))
                    else:
                        log_laps(board)  # a plain line per lap result, among the other lines
                    view = PeerView(board, folder=folder, display=display, limits=config.limits)
                    view.start(nursery, peer.events)
                    board.started(str(a) for a in peer.addresses)
                    _say_hello(peer, config, values, state_dir, device)
                    summary = await peer.train()
                await view.finish()  # the peer closed its events: the last ones are in
            if page is not None:
                page.stop()  # the page's event streams end with the board's last change
        print(json.dumps(json_safe({"out": summary.out_dir, "model_sha256": summary.model_sha256,
                          "laps": summary.laps, "stop_reason": summary.stop_reason,
                          "ended_by": summary.ended_by, "ok": summary.ok,
                          "final_val_loss": summary.final_val_loss,
                          "excluded": summary.excluded})))  # fmt: skip
        return exit_code(summary)

    return trio.run(main)


def _set_aside(config: PeerConfig, identity: Identity) -> None:
    """``--fresh``: move an interrupted run's state file into that run's folder (or,
    if it cannot be read, or that folder cannot take it, such as one on another file
    system, into the state dir's ``runs`` folder) and say where."""
    from fedup.peer.run_state_file import RunStateFile

    path = config.run_state_path()
    if path is None or not os.path.lexists(path):  # a link there is set aside too
        return
    state_file = RunStateFile(path, identity.peer_id, config.network, config.limits)
    runs = config.resolved_state_dir() / "runs"
    try:
        saved = state_file.load()
        folder = Path(saved.state.out_dir) if saved is not None else runs
    except ConfigError:
        folder = runs
    try:
        moved = state_file.set_aside(folder)
    except OSError:
        if folder == runs:
            raise
        moved = state_file.set_aside(runs)  # by the state dir: the same file system
    log.warning("--fresh: the interrupted run's state was moved to %s; starting a new run", moved)


async def _serve_page(
    nursery: trio.Nursery,
    board: RunBoard,
    folder: Callable[[], Path | None],
    address: Address | None,
    config: PeerConfig,
) -> PageServer | None:
    """Bind and serve the federation page (``--ui``), before the peer joins anything."""
    if address is None:
        return None
    from fedup.ui.page import make_app
    from fedup.ui.server import PageServer

    page = PageServer(
        make_app(board, folder=folder, host=address.host, limits=config.limits), address
    )
    url = await page.start(nursery)
    log.info("federation page: %s", url)
    return page


def _say_hello(
    peer: Peer, config: PeerConfig, values: dict[str, Any], state_dir: Path, device: torch.device
) -> None:
    """Logged once the peer is up: an error before that is the only line on stderr."""
    from fedup.learn.device import describe_device

    log.info(
        "training on %s (--device %s; a local choice, not part of the federation)",
        describe_device(device), values["device"],
    )  # fmt: skip
    if values["data"] is None:
        log.info("no --data given: using synthetic loans in %s", state_dir / "data")
    if not config.mdns and not config.bootstrap:
        log.info(
            "rendezvous: no mDNS and no --bootstrap, so this peer waits for peers that "
            "bootstrap to it: --bootstrap %s (peer %s)",
            " or --bootstrap ".join(str(a) for a in peer.addresses), peer.peer_id,
        )  # fmt: skip
