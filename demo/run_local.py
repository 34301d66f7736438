"""Run a real three-peer federation on this machine and print what it produced.

Each peer is its own ``fedup-peer start`` process with its own state directory
and its own synthetic lender's loan book; they talk over real TCP on 127.0.0.1
with real crypto, find each other through ``--bootstrap`` (no multicast), form
a federation, train one model around the ring and all save the same model.

    python demo/run_local.py [--peers 3] [--out demo-out] [--max-laps 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--max-laps", type=int, default=60)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    ports = free_ports(args.peers)
    procs = []
    started = time.perf_counter()
    for i, port in enumerate(ports):
        state = str(args.out / f"peer{i}")
        cmd = [sys.executable, "-m", "fedup.cli", "start", "--state-dir", state,
               "--listen", f"127.0.0.1:{port}", "--no-mdns", "--min-peers", str(args.peers),
               "--settle", "1", "--max-laps", str(args.max_laps),
               "--log-level", "error"]  # fmt: skip
        for other in ports:
            if other != port:
                cmd += ["--bootstrap", f"127.0.0.1:{other}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            print(f"a peer failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.perf_counter() - started
    summaries = [json.loads((Path(r["out"]) / "summary.json").read_text()) for r in results]
    first = summaries[0]
    print(f"federation of {len(summaries)} peers, run {first['run_id'][:8]}, {elapsed:.1f} s")
    print(
        f"stopped: {first['stop_reason']} after {first['laps']} laps; best lap {first['best_lap']}"
    )
    losses = first["federated_val_loss"]
    print(f"federated validation loss: first lap {losses[0]:.4f} -> best {min(losses):.4f}")
    print(f"{'peer':<14} {'own val loss':>12}  model sha256")
    for s in summaries:
        print(f"{s['peer_id'][-12:]:<14} {s['final_val_loss']:>12.4f}  {s['model_sha256'][:16]}")
    same = len({s["model_sha256"] for s in summaries}) == 1
    print("every peer saved the same model:", "yes" if same else "NO")
    print(f"outputs under {args.out}/peer*/runs/")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
