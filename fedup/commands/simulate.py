"""``fedup-peer simulate``: many real peers in one process, with faults and baselines.

Runs ``--peers`` real peers (the code ``fedup-peer start`` runs) on an
in-memory network and discovery hub, by default on a virtual clock, and
writes each peer's outputs under ``--out``/peers and ``report.json`` (the
federated model scored on every peer's validation split and their union;
with ``--baselines`` also centralized, FedAvg-style parallel and local-only
training).  Prints a
table, or the report with ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from fedup.commands.tables import MODELS, fmt, model_name, print_models
from fedup.commands.values import (
    DEVICE_HELP,
    LENDER_ROWS,
    SETTLE,
    TASK_HELP,
    add_option,
    device_spec,
    of_setting,
    real,
    task_name,
    whole,
)
from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConfigError
from fedup.files import write_atomic

PEERS = whole(1, DEFAULT_LIMITS.max_members)
THREADS = whole(1, 256)
SIM_OUTPUTS = ("report.json", "peers")
"""What a simulation writes at the top of its folder: a folder holding either is refused."""

log = logging.getLogger("fedup")
if TYPE_CHECKING:
    from fedup.peer import TaskSource
    from fedup.peer.events import PeerEvent
    from fedup.protocol.peer_id import PeerId
    from fedup.sim import Link, SimResult, SimSettings


def _ints(text: str, form: str, n: tuple[int, ...]) -> list[int]:
    parts = text.split(":")
    try:
        if len(parts) not in n:
            raise ValueError
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {form} (whole numbers)") from None


# The parsers return plain values; _settings makes the fault objects (fedup.sim, and
# with it torch, is imported only when a simulation runs, not for every command line).
# They raise ArgumentTypeError, which argparse prints as "argument --kill: ...".


def parse_kill(text: str) -> list[int]:
    """``PEER:LAP:HOP``."""
    return _ints(text, "PEER:LAP:HOP", (3,))


def parse_drop(text: str) -> list[int]:
    """``SRC:DST`` or ``SRC:DST:LAP:HOP``."""
    return _ints(text, "SRC:DST[:LAP:HOP]", (2, 4))


def parse_slow(text: str) -> tuple[int, float]:
    """``PEER:SECONDS``."""
    peer, _, seconds = text.partition(":")
    try:
        return int(peer), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not PEER:SECONDS") from None


def parse_link(text: str) -> tuple[int, int, float, float]:
    """``SRC:DST:MS`` or ``SRC:DST:MS:MBIT`` (one direction)."""
    parts = text.split(":")
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        mbit = float(parts[3]) if len(parts) == 4 else math.inf
        return int(parts[0]), int(parts[1]), float(parts[2]), mbit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not SRC:DST:MS[:MBIT]") from None


def _link(ms: float, mbit: float) -> Link:
    from fedup.sim import Link

    return Link(latency=ms / 1000, bandwidth=mbit * 1e6 / 8)


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "simulate",
        help="run many real peers in one process (faults, baselines, report.json)",
        description="Run --peers real FedUp peers in one process on an in-memory network and "
        "discovery hub (a virtual clock by default), train one model around the ring, and "
        "write report.json: the federated model scored on each peer's validation split and "
        "their union; with --baselines also centralized, FedAvg-style parallel and local-only "
        "training with the same model, splits and epoch budget. Data: synthetic lenders "
        "(one per peer) or --data FILE.csv dealt out by --partition.",
    )
    common(p)
    p.set_defaults(log_level="warning")
    option = functools.partial(add_option, p)

    option(
        "--peers",
        PEERS,
        None,
        "simulated peers; for column:NAME the column's values grouped into this many",
        shown="5; for column:NAME one per value",
    )
    option("--data", Path, None, "CSV to deal out", shown="synthetic lenders")
    option("--target", str, "default", "target column of --data")
    option("--task", task_name, None, TASK_HELP.split(" (")[0] + " of --target",
           shown="inferred from the whole file's values")  # fmt: skip
    p.add_argument(
        "--drop-column",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a column of --data to leave out before anything reads it (an ID, free text); "
        "repeatable (default: none; --drop is a broken connection here)",
    )
    option(
        "--positive-label",
        str,
        None,
        "the value of --target that is the positive class",
        shown="inferred: 1, yes, true, default, bad, charged off, ...",
    )
    option(
        "--partition",
        str,
        None,
        "lender (synthetic only), iid, dirichlet:ALPHA, column:NAME (values grouped into "
        "--peers peers, or one peer per value)",
        shown="lender; iid for --data",
    )
    option("--rows", LENDER_ROWS, None, "rows per synthetic lender", shown="drawn per lender")
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also centralized, FedAvg-style parallel (every peer at once, a ring "
        "all-reduce per round) and local-only",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    option(
        "--out",
        Path,
        None,
        "output folder; checked before anything runs",
        shown="<state dir>/sims/<date-time>",
    )
    option("--seed", of_setting("seed"), 0, "identities, data and run seed")
    for name, kind, why in RUN_OPTIONS:
        option("--" + name.replace("_", "-"), kind, getattr(DEFAULTS, name), why)
    option("--mode", mode_name, DEFAULTS.algorithm, MODE_HELP)
    option("--settle", SETTLE, 1.0, "formation settle seconds")
    p.add_argument("--real-clock", action="store_true", help="wait in real time, not virtual")
    option("--latency", real(0, 60_000), 0.0, "one-way link latency, ms")
    option(
        "--bandwidth", real(0, open_lo=True), math.inf, "link bandwidth, Mbit/s", shown="unlimited"
    )
    p.add_argument(
        "--link",
        type=parse_link,
        action="append",
        default=[],
        metavar="S:D:MS[:MBIT]",
        help="the link from peer S to peer D differs; repeatable (default: none)",
    )
    p.add_argument(
        "--kill",
        type=parse_kill,
        action="append",
        default=[],
        metavar="P:LAP:HOP",
        help="peer P crashes once ring position HOP of lap LAP was trained; repeatable "
        "(default: none)",
    )
    p.add_argument(
        "--drop",
        type=parse_drop,
        action="append",
        default=[],
        metavar="S:D[:LAP:HOP]",
        help="the next connection from S to D (after that hop) breaks mid-way; repeatable "
        "(default: none)",
    )
    p.add_argument(
        "--slow",
        type=parse_slow,
        action="append",
        default=[],
        metavar="P:SECONDS",
        help="peer P takes SECONDS longer per hop it trains; repeatable (default: none)",
    )
    for name, kind, default, why in DP_OPTIONS:
        shown = "off" if default is None else None
        option("--" + name.replace("_", "-"), kind, default, why, shown)
    p.add_argument(
        "--dp-peer",
        type=whole(0),
        action="append",
        default=[],
        metavar="P",
        help="only peer P trains with --dp-epsilon; repeatable "
        "(range [0, inf); default: every peer)",
    )
    option("--personal-layers", PERSONAL_OPTION[1], 0, PERSONAL_OPTION[3] + " (every peer)",
           "0: off")  # fmt: skip
    option("--threads", THREADS, 1, "torch threads")
    option("--device", device_spec, "auto", DEVICE_HELP.replace("this peer", "every peer"))
    p.set_defaults(func=run)
    return p


def _settings(args: argparse.Namespace) -> SimSettings:
    from fedup.sim import Drop, Faults, Kill, SimSettings, Slow

    run = run_settings(vars(args))
    try:
        faults = Faults(
            link=_link(args.latency, args.bandwidth),
            links={(src, dst): _link(ms, mbit) for src, dst, ms, mbit in args.link},
            kills=tuple(Kill(*k) for k in args.kill),
            drops=tuple(Drop(*d) for d in args.drop),
            slow=tuple(Slow(*s) for s in args.slow),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return SimSettings(
        seed=args.seed,
        run=run,
        settle=args.settle,
        virtual_clock=not args.real_clock,
        faults=faults,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from fedup.learn.device import choose_device, describe_device
    from fedup.peer.outputs import check_out_dir
    from fedup.sim.data import csv_tables, sources_of, synthetic_tables
    from fedup.sim.report import build_report

    settings = _settings(args)
    device = choose_device(args.device)  # CUDA asked for and absent: one line, exit 1
    if args.data is None and (args.drop_column or args.positive_label is not None):
        raise ConfigError(
            "--drop-column and --positive-label apply to --data; the synthetic lenders "
            "have no such columns to leave out and spell their target 0/1"
        )
    if args.data is None and args.task is not None:
        raise ConfigError("--task applies to --data; the synthetic lenders' target is binary")
    out: Path = args.out
    if out is None:
        out = args.state_dir / "sims" / time.strftime("%Y%m%d-%H%M%S")
    check_out_dir(out, outputs=SIM_OUTPUTS)
    torch.set_num_threads(args.threads)
    if args.data is not None:
        tables = csv_tables(
            args.data,
            args.target,
            args.peers,
            args.partition or "iid",
            seed=args.seed,
            drop=args.drop_column,
            positive_label=args.positive_label,
            task=args.task,
        )
    else:
        tables = synthetic_tables(
            args.peers, args.partition or "lender", seed=args.seed, n_rows=args.rows
        )
    budget = dp_budget(vars(args))
    if args.dp_peer and budget is None:
        raise ConfigError("--dp-peer needs --dp-epsilon and --dp-delta")
    if any(p >= len(tables) for p in args.dp_peer):
        raise ConfigError(f"--dp-peer names a peer beyond the {len(tables)} simulated (0-based)")
    private = set(args.dp_peer) if args.dp_peer else set(range(len(tables)))
    sources = sources_of(
        tables,
        device=device,
        privacy=[budget if i in private else None for i in range(len(tables))],
        personal_layers=args.personal_layers,
    )
    log.info(
        "simulating %d peers into %s, training on %s (--device %s)",
        len(sources), out, describe_device(device), args.device,
    )  # fmt: skip
    result = _simulate_watched(sources, out, settings, quiet=args.quiet)
    report = build_report(result, sources, baselines=args.baselines)
    report["partition"] = args.partition or ("iid" if args.data is not None else "lender")
    report["data_source"] = str(args.data) if args.data is not None else "synthetic"
    report["out"] = str(out)
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0 if report["simulation"]["finished"] else 1


def _simulate_watched(
    sources: Sequence[TaskSource], out: Path, settings: SimSettings, *, quiet: bool
) -> SimResult:
    """Simulate with a live display of the whole federation on a terminal (every peer's
    events on one board: the ring, where the model is, every member's hops), else one
    plain log line per lap result."""
    from fedup.sim import simulate
    from fedup.ui.board import RunBoard
    from fedup.ui.display import PROGRESS_LOGGER, TerminalDisplay, log_laps, on_terminal
    from fedup.ui.follow import apply

    board = RunBoard()

    def watch(index: int, peer: PeerId, at: float, event: PeerEvent) -> None:
        apply(board, peer, event)

    if not on_terminal() or quiet:
        if not logging.getLogger(PROGRESS_LOGGER).isEnabledFor(logging.INFO):
            return simulate(sources, out, settings)  # nobody would see the lines: no board
        log_laps(board)
        return simulate(sources, out, settings, watch=watch)
    with TerminalDisplay(board) as display:
        board.listen(display.refresh)
        result = simulate(sources, out, settings, watch=watch)
        board.close()
    return result


def _print_table(report: dict[str, Any]) -> None:
    sim = report["simulation"]
    print(
        f"{report['peers']} peers ({report['partition']}), {sim['finished']} finished, "
        f"{sim['wall_seconds']:.1f} s wall, {sim['clock_seconds']:.1f} s "
        f"{'virtual' if sim['virtual_clock'] else 'real'} clock"
    )
    print_models(report)
    _print_time_to_quality(report)
    failed = [d for d in report["data"] if not d["finished"]]
    for d in failed:
        print(f"peer {d['index']} ({d['peer_id'][-8:]}) did not finish: {d['error']}")
    print(f"model {sim['model_sha256']}  weights {sim['weights_sha256']}")
    print(f"report: {Path(report['out']) / 'report.json'}")


def _print_time_to_quality(report: dict[str, Any]) -> None:
    """Each model's wall seconds (modelled: every peer on its own machine) and modelled
    seconds to the target loss (only with the baselines: the target is centralized's)."""
    cost = report["time_to_quality"]
    target = cost["target_val_loss"]
    goal = "--baselines sets the target" if target is None else f"val loss <= {target:.4f}"
    print(f"\ntime to quality ({cost['target']}; {goal}); modelled: each peer on its own machine")
    print("model                    modelled wall s  real wall s  to target s  target lap")
    for key, name in MODELS:
        c = cost["models"].get(key)
        if c is not None:
            print(
                f"{model_name(report, key, name):<24} "
                f"{fmt(c['modelled_wall_seconds'], '.2f'):>15} "
                f"{fmt(c['real_wall_seconds'], '.2f'):>12} "
                f"{fmt(c['modelled_seconds_to_target'], '.2f'):>12} {fmt(c['target_lap'], 'd'):>11}"
            )
