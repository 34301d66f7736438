"""Time to quality of the three modes, ring, parallel and hybrid, on the same splits.

Each run is ``fedup-peer simulate --peers N --partition P --seed S --baselines --json
--out DIR`` in a child process (the real ring on the simulated network, default run
settings); every figure is read from its ``report.json`` (``time_to_quality``):

* ``loss``: each model's validation loss on the union of the members' splits, and
  ``gap``, that over the centralized model's, minus 1 (issue 13's goal: within 1%);
* ``modelled``: the modelled wall seconds of the whole run, every member on its own
  machine (:mod:`fedup.sim.wallclock`: the ring's chain of hops; FedAvg's slowest member
  and all-reduce per round; the hybrid mode's slowest sub-ring chain and all-reduce per
  round), and ``to_target``: the modelled seconds until the model first came within 1%
  of the final centralized validation loss (``-``: never);
* ``x_ring``: ``to_target`` over the ring's (issue 13's goal for parallel: at most 1/5
  at 10 peers, 1/20 at 50).

The parallel baseline here is :mod:`fedup.learn.fedavg` and the hybrid one
:mod:`fedup.learn.hybrid` in one process (the same learning as ``--mode parallel`` and
``--mode hybrid``, whose own runs report the same clocks as ``rounds_clock``).  Run
``python bench/bench_modes.py`` (``--seeds 0 1 2``, ``--peers 10 50``, ``--sync-laps L``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PARTITIONS = ("lender", "dirichlet:0.3")
MODELS = (("ring", "federated"), ("parallel", "fedavg"), ("hybrid", "hybrid"))


def run(peers: int, partition: str, seed: int, out: Path, extra: list[str]) -> dict[str, Any]:
    argv = [sys.executable, "-m", "fedup.cli", "simulate", "--peers", str(peers),
            "--partition", partition, "--seed", str(seed), "--baselines", "--json",
            "--out", str(out), *extra]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=1800)
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def figures(report: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    central = report["centralized"]["union"]["val_loss"]
    ttq = report["time_to_quality"]["models"]
    ring_target = ttq["federated"]["modelled_seconds_to_target"]
    out = {}
    for name, key in MODELS:
        loss = report[key]["union"]["val_loss"]
        to_target = ttq[key]["modelled_seconds_to_target"]
        out[name] = {
            "loss": loss,
            "gap": loss / central - 1,
            "modelled": ttq[key]["modelled_wall_seconds"],
            "to_target": to_target,
            "x_ring": None if to_target is None or not ring_target else to_target / ring_target,
        }
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10])
    parser.add_argument("--sync-laps", type=int, help="the hybrid mode's (default: the run's)")
    args = parser.parse_args(argv)
    extra = [] if args.sync_laps is None else ["--sync-laps", str(args.sync_laps)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for peers in args.peers:
            for partition in PARTITIONS:
                for seed in args.seeds:
                    out = Path(tmp) / f"{peers}-{partition.replace(':', '')}-{seed}"
                    found = figures(run(peers, partition, seed, out, extra))
                    rows.append({"peers": peers, "partition": partition, "seed": seed, **found})
                    for name, f in found.items():
                        print(
                            f"peers={peers} partition={partition} seed={seed} mode={name} "
                            f"gap={f['gap']:+.2%} modelled_s={fmt(f['modelled'], '.2f')} "
                            f"to_target_s={fmt(f['to_target'], '.2f')} "
                            f"x_ring={fmt(f['x_ring'], '.2f')}",
                            flush=True,
                        )
    return rows


if __name__ == "__main__":
    main()
