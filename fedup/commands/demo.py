"""``fedup-peer demo``: real peers on this host, the baselines, and an honest comparison."""

from __future__ import annotations

import argparse
import functools
import shlex
from pathlib import Path
from typing import Any

from fedup.commands.tables import print_models
from fedup.commands.values import (
    DEVICE_HELP,
    LENDER_ROWS,
    SETTLE,
    add_option,
    device_spec,
    of_setting,
    real,
    whole,
)
from fedup.errors import ConfigError

CLAIM = (
    "ring federated learning converges in fewer epochs to a lower validation loss than "
    "traditional training"
)


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    """The ``demo`` command.  No ``--state-dir``: each peer has its own under ``--out``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="a real federation of synthetic lenders on this host, against the baselines",
        description="Start --peers real fedup-peer processes on this host, each with its own "
        "synthetic lender's loan book. They find each other by mDNS on 127.0.0.1, form a "
        "federation over encrypted TCP and train one loan-default model around the ring. "
        "Then the same model is trained centralized (all loans pooled) and local-only "
        "(each lender alone), every model is scored on the same validation rows, and the "
        "demo prints the comparison and writes report.json, loss_curves.png and "
        "model.safetensors to --out.",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="how much the demo logs on stderr (default: warning; each peer logs at info "
        "level to peers/peerI/peer.log)",
    )
    option = functools.partial(add_option, p)

    option("--peers", whole(2, 16), 3, "peer processes")
    option("--out", Path, Path("fedup-demo"), "output folder")
    option("--seed", of_setting("seed"), 0, "which synthetic lenders")
    option("--rows", LENDER_ROWS, None, "loans per lender", shown="1,500 to 5,000, per lender")
    p.add_argument(
        "--no-mdns",
        action="store_true",
        help="peers dial each other's ports instead of using mDNS (no multicast at all)",
    )
    option("--settle", SETTLE, 2.0, "formation settle seconds")
    option("--timeout", real(0, 86_400, open_lo=True), 600.0, "deadline for the federation, s")
    option("--device", device_spec, "auto", DEVICE_HELP.replace("this peer", "every peer "
           "and the baselines"))  # fmt: skip
    option("--peer-args", str, "", "extra 'fedup-peer start' options for every peer, "
           'e.g. "--max-laps 40"', shown="none")  # fmt: skip
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from fedup.demo import DemoSettings, run_demo
    from fedup.ui.board import RunBoard
    from fedup.ui.display import TerminalDisplay, on_terminal

    try:
        peer_args = tuple(shlex.split(args.peer_args))
    except ValueError as exc:
        raise ConfigError(f"--peer-args: {exc}") from None
    torch.set_num_threads(1)
    settings = DemoSettings(
        peers=args.peers,
        out=args.out,
        seed=args.seed,
        rows=args.rows,
        mdns=not args.no_mdns,
        settle=args.settle,
        timeout=args.timeout,
        peer_args=peer_args,
        device=args.device,
    )
    if args.quiet:
        report = run_demo(settings, say=lambda text: None)
    elif on_terminal():
        board = RunBoard()
        with TerminalDisplay(board) as display:  # the peers' progress, from their files
            board.listen(display.refresh)
            report = run_demo(settings, say=display.say, board=board)
    else:
        report = run_demo(settings, say=lambda text: print(text, flush=True))
    print_comparison(report)
    return 0 if report["same_model_everywhere"] else 1


def print_comparison(report: dict[str, Any]) -> None:
    same = report["same_model_everywhere"]
    print(
        f"\nstopped: {report['stop_reason']} after {report['laps']} laps; every peer saved the "
        f"same model: {'yes' if same else 'NO'} (sha256 {report['model_sha256'][:16]})\n"
    )
    print_models(report)
    if "local_only" in report:
        print("\nper lender (own validation rows): federated vs local-only loss")
        for f, lo, p in zip(
            report["federated"]["per_peer"],
            report["local_only"]["per_peer"],
            report["peers"],
            strict=True,
        ):
            print(
                f"  peer {p['index']} ({p['lender']}, {p['rows']:,} loans): "
                f"{f['val_loss']:.4f} vs {lo['val_loss']:.4f}"
            )
    if "claim" in report:
        print_claim(report["claim"])
    out = Path(report["out"])
    print(
        f"\nwritten: {out / 'report.json'}, {out / 'loss_curves.png'}, "
        f"{out / 'model.safetensors'} (with {out / 'federation.json'}: the feature schema "
        "needed to use it)"
    )


def print_claim(claim: dict[str, Any]) -> None:
    cen, loc = claim["vs_centralized"], claim["vs_local_only"]
    print(f'\nThe claim: "{CLAIM}".')
    print(
        f"- against centralized training on the pooled data: validation loss "
        f"{cen['federated_val_loss']:.4f} vs {cen['centralized_val_loss']:.4f} "
        f"({cen['loss_gap_percent']:+.2f}%, {'lower' if cen['lower_loss'] else 'NOT lower'}); "
        f"data passes {cen['federated_epochs']:.2f} vs {cen['centralized_epochs']:.2f} "
        f"({'fewer' if cen['fewer_epochs'] else 'NOT fewer'}). "
        f"{'Holds.' if cen['holds'] else 'Does not hold here.'}"
    )
    print(
        f"- against each lender training alone: federated loss lower for "
        f"{loc['peers_where_federated_loss_lower']} of {loc['peers']} lenders on their own "
        f"validation rows; data passes {loc['federated_epochs']:.2f} vs "
        f"{loc['local_only_epochs_min']:.2f} to {loc['local_only_epochs_max']:.2f} "
        f"({'fewer' if loc['fewer_epochs'] else 'NOT fewer'} than every lender). "
        f"{'Holds.' if loc['holds'] else 'Does not hold here.'}"
    )
    if not cen["lower_loss"]:
        print(
            "  (Pooling every loan in one place is the upper bound a federation approaches; "
            "FedUp's aim is to come close to it without moving any data.)"
        )
