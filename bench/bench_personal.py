"""Benchmark: personal heads against local-only training, on each member's own split.

Each seed simulates a federation of 10 members (real peers on the in-memory network
and virtual clock of ``fedup-peer simulate``) over 10 synthetic lenders' rows dealt
out by ``dirichlet:0.3`` (skewed label mixes and sizes), every member with
``--personal-layers K`` (default 1), and scores, on each member's own validation split,
three models: the shared (federated) one, the member's personal one
(``personal.safetensors``) and the same model trained on the member's data alone
(local-only); the figures are the members' ``summary.json`` ``personal`` entries.
It also trains the centralized model on the pooled data (the same code path as
``--baselines``) and scores the shared model against it on the union of the
validation splits.

Goal (issue 15): in every seed the personal model beats local-only (lower own-split
loss) for at least 9 of 10 members, and the shared model's union loss is within 1 %
of centralized.

Usage: ``python bench/bench_personal.py [--seeds 0 1 2] [--layers 1]``; from code,
``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

PEERS = 10
PARTITION = "dirichlet:0.3"
GOAL_MEMBERS = 9
GOAL_GAP_PERCENT = 1.0


def one_seed(seed: int, layers: int, work: Path) -> dict[str, Any]:
    from fedup.sim import SimSettings, simulate
    from fedup.sim.data import sources_of, synthetic_tables
    from fedup.sim.report import build_report

    tables = synthetic_tables(PEERS, PARTITION, seed=seed)
    sources = sources_of(tables, personal_layers=layers)
    result = simulate(sources, work / f"seed{seed}", SimSettings(seed=seed))
    report = build_report(result, sources, baselines=True)
    summaries = [p.summary for p in result.peers]
    personal = [s.personal for s in summaries if s is not None and s.personal is not None]
    n = len(personal)
    wins = sum(p["own_val"]["loss"] < p["local_only_own_val"]["loss"] for p in personal)

    def mean(key: str) -> float:
        return sum(p[key]["loss"] for p in personal) / n

    shared_union = report["federated"]["union"]["val_loss"]
    central_union = report["centralized"]["union"]["val_loss"]
    return {
        "seed": seed,
        "members": n,
        "personal_beats_local_only": wins,
        "mean_own_loss_shared": mean("shared_own_val"),
        "mean_own_loss_personal": mean("own_val"),
        "mean_own_loss_local_only": mean("local_only_own_val"),
        "union_loss_shared": shared_union,
        "union_loss_centralized": central_union,
        "union_gap_percent": (shared_union / central_union - 1) * 100,
        "mean_union_loss_personal": report["personalized"]["mean_union_val_loss"],
        "mean_union_loss_local_only": report["local_only"]["union"]["val_loss"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedup-bench-personal-") as tmp:
        for seed in args.seeds:
            row = one_seed(seed, args.layers, Path(tmp))
            rows.append(row)
            if not args.json:
                print(
                    f"seed {seed}: personal beats local-only for "
                    f"{row['personal_beats_local_only']}/{row['members']} members; mean own-split "
                    f"loss shared {row['mean_own_loss_shared']:.4f}, personal "
                    f"{row['mean_own_loss_personal']:.4f}, local-only "
                    f"{row['mean_own_loss_local_only']:.4f}; union loss shared "
                    f"{row['union_loss_shared']:.4f} vs centralized "
                    f"{row['union_loss_centralized']:.4f} ({row['union_gap_percent']:+.3f}%); "
                    f"mean union loss personal {row['mean_union_loss_personal']:.4f}, "
                    f"local-only {row['mean_union_loss_local_only']:.4f}",
                    flush=True,
                )
    met = all(
        r["personal_beats_local_only"] >= GOAL_MEMBERS
        and r["union_gap_percent"] <= GOAL_GAP_PERCENT
        for r in rows
    )
    figures = {"layers": args.layers, "partition": PARTITION, "peers": PEERS, "seeds": rows,
               "goal_met": met}  # fmt: skip
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"goal (>= {GOAL_MEMBERS}/{PEERS} members every seed, shared within "
              f"{GOAL_GAP_PERCENT:g}% of centralized): {'met' if met else 'NOT met'}")  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
