"""The federated model's quality against centralized and local-only training.

The quality goal: on the synthetic loan data with 3 and 10 non-IID peers, the
federated model's validation loss is within 5% of centralized training and
better than every local-only model; say how many data passes each needed.

Each run is ``fedup-peer simulate --peers N --partition P --seed S --baselines
--json --out DIR`` in a child process (the real peers on the simulated network,
default run settings), and every figure is read from its ``report.json``:

* scenarios: 3 peers ``lender`` and 10 peers ``lender`` (one synthetic lender
  per peer, non-IID by construction), 10 peers ``dirichlet:0.3`` (label skew);
  seeds 0, 1, 2 (``--seeds``; ``--quick``: 3 peers, seed 0);
* ``fed``, ``cen``: the federated and centralized models' loss on the union of
  the peers' validation splits; ``gap`` = fed / cen - 1;
* ``beats_local_union``: the federated model's union loss is below every
  local-only model's union loss; ``beats_local_own``: for every peer, the
  federated model's loss on that peer's own validation split is below the
  peer's local-only model's loss on the same split.  The goal's reading used
  here asks for both (``goal``: gap <= 5% and both);
* ``passes``: data passes each needed: federated and centralized, samples
  trained until the kept model's lap ended / training rows of the federation;
  local-only, passes over the peer's own training rows (mean, min, max);
* AUCs on the union (local-only: the mean of the local models'), wall seconds
  (indicative only).

One line per run, then one summary line per scenario (worst gap, goal met in
k/n runs).  Run ``python bench/bench_quality.py`` (``--quick``, ``--seeds 0``,
``--keep DIR`` to keep the simulations' outputs); ``main()`` returns the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SCENARIOS: tuple[tuple[str, int, str], ...] = (
    ("lender3", 3, "lender"),
    ("lender10", 10, "lender"),
    ("dirichlet0.3_10", 10, "dirichlet:0.3"),
)
SEEDS = (0, 1, 2)
GAP_LIMIT = 0.05


def simulate(peers: int, partition: str, seed: int, out: Path) -> dict[str, Any]:
    """One ``fedup-peer simulate --baselines`` run in a child process; its report."""
    cmd = [
        sys.executable,
        "-m",
        "fedup.cli",  # the entry point of the fedup-peer script
        "simulate",
        "--peers",
        str(peers),
        "--partition",
        partition,
        "--seed",
        str(seed),
        "--baselines",
        "--json",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    report_file = out / "report.json"
    if proc.returncode != 0 or not report_file.exists():
        tail = proc.stderr.strip().splitlines()[-1:]
        raise RuntimeError(f"simulate exited {proc.returncode}: {tail}")
    return json.loads(report_file.read_text(encoding="utf-8"))


def figures_of(report: dict[str, Any]) -> dict[str, Any]:
    """The quality figures of one report (read from its fields, not recomputed)."""
    fed, cen, loc = report["federated"], report["centralized"], report["local_only"]
    fed_union = fed["union"]["val_loss"]
    cen_union = cen["union"]["val_loss"]
    gap = fed_union / cen_union - 1
    local_union = [p["union"]["val_loss"] for p in loc["per_peer"]]
    own = [
        (f["val_loss"], lo["val_loss"])
        for f, lo in zip(fed["per_peer"], loc["per_peer"], strict=True)
    ]
    beats_union = all(fed_union < x for x in local_union)
    beats_own = all(f < lo for f, lo in own)
    local_passes = [p["epochs"] for p in loc["per_peer"]]
    return {
        "peers": report["peers"],
        "finished": report["simulation"]["finished"],
        "fed_loss": fed_union,
        "cen_loss": cen_union,
        "gap": gap,
        "local_union_loss_mean": loc["union"]["val_loss"],
        "local_union_loss_best": min(local_union),
        "beats_local_union": beats_union,
        "beats_local_own": beats_own,
        "own_split_wins": sum(f < lo for f, lo in own),
        "own_split_margin_min": min(lo - f for f, lo in own),
        "goal": gap <= GAP_LIMIT and beats_union and beats_own,
        "fed_auc": fed["union"]["roc_auc"],
        "cen_auc": cen["union"]["roc_auc"],
        "local_auc_mean": loc["union"]["roc_auc"],
        "fed_passes": fed["mean"]["epochs"],
        "cen_passes": cen["mean"]["epochs"],
        "local_passes_mean": loc["mean"]["epochs"],
        "local_passes_min": min(local_passes),
        "local_passes_max": max(local_passes),
        "fed_wall_s": report["simulation"]["wall_seconds"],
        "cen_wall_s": cen["mean"]["wall_seconds"],
        "local_wall_s": sum(p["wall_seconds"] for p in loc["per_peer"]),
    }


def line(name: str, seed: int, f: dict[str, Any]) -> str:
    return (
        f"quality_{name}_seed{seed}: fed {f['fed_loss']:.4f} cen {f['cen_loss']:.4f} "
        f"gap {f['gap'] * 100:+.2f}% | beats every local-only: union "
        f"{'yes' if f['beats_local_union'] else 'NO'} (best local {f['local_union_loss_best']:.4f}"
        f", mean {f['local_union_loss_mean']:.4f}), own split "
        f"{'yes' if f['beats_local_own'] else 'NO'} ({f['own_split_wins']}/{f['peers']}, "
        f"min margin {f['own_split_margin_min']:+.4f}) | goal {'met' if f['goal'] else 'NOT met'}"
        f" | passes fed {f['fed_passes']:.2f} cen {f['cen_passes']:.2f} local "
        f"{f['local_passes_mean']:.2f} ({f['local_passes_min']:.2f}-{f['local_passes_max']:.2f})"
        f" | AUC fed {f['fed_auc']:.4f} cen {f['cen_auc']:.4f} local {f['local_auc_mean']:.4f}"
        f" | wall s fed {f['fed_wall_s']:.1f} cen {f['cen_wall_s']:.1f} "
        f"local {f['local_wall_s']:.1f} | finished {f['finished']}/{f['peers']}"
    )


def main(
    scenarios: tuple[tuple[str, int, str], ...] = SCENARIOS,
    seeds: tuple[int, ...] = SEEDS,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Run every scenario and seed; print one line per run and per scenario; return them."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedup-bench-quality-") as tmp:
        root = keep if keep is not None else Path(tmp)
        for name, peers, partition in scenarios:
            runs: list[dict[str, Any]] = []
            for seed in seeds:
                key = f"{name}_seed{seed}"
                try:
                    f = figures_of(simulate(peers, partition, seed, root / key))
                except RuntimeError as exc:
                    print(f"quality_{key}: failed: {exc}", flush=True)
                    figures[key] = None
                    continue
                figures[key] = f
                runs.append(f)
                print(line(name, seed, f), flush=True)
            if not runs:
                continue
            summary = {
                "worst_gap": max(f["gap"] for f in runs),
                "goal_met": sum(f["goal"] for f in runs),
                "runs": len(seeds),
                "beats_union": sum(f["beats_local_union"] for f in runs),
                "beats_own": sum(f["beats_local_own"] for f in runs),
                "within_5pct": sum(f["gap"] <= GAP_LIMIT for f in runs),
            }
            figures[name] = summary
            print(
                f"quality_{name}: {peers} peers {partition}: worst gap "
                f"{summary['worst_gap'] * 100:+.2f}%; within 5% in "
                f"{summary['within_5pct']}/{summary['runs']}, beats every local-only on the "
                f"union in {summary['beats_union']}/{summary['runs']}, on each own split in "
                f"{summary['beats_own']}/{summary['runs']}; goal met in "
                f"{summary['goal_met']}/{summary['runs']} runs",
                flush=True,
            )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--quick", action="store_true", help="3 peers, seed 0 only")
    parser.add_argument("--keep", type=Path, default=None, help="keep the outputs in this folder")
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else SEEDS
    if args.quick:
        main(SCENARIOS[:1], (0,), args.keep)
    else:
        main(SCENARIOS, seeds, args.keep)
