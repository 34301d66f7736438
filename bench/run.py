"""Run every benchmark with one command; each prints one line per figure.

    python bench/run.py            # all of them
    python bench/run.py tensors    # only those whose name contains "tensors"

Each benchmark is a module ``bench/bench_*.py`` with a ``main()``.  They run one
after another in separate processes, so that one's memory and threads do not
skew the next; a benchmark that cannot run here (e.g. it needs network
namespaces) says why and the others still run.  Exit status is non-zero if any
benchmark failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["tensors", "handshake", "transfer", "discovery", "hop", "sim"]


def benchmarks(filters: list[str]) -> list[Path]:
    found = {p.stem.removeprefix("bench_"): p for p in HERE.glob("bench_*.py")}
    names = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return [found[n] for n in names if not filters or any(f in n for f in filters)]


def main(argv: list[str]) -> int:
    failed = []
    for path in benchmarks(argv):
        print(f"== {path.stem} ==", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(path)], cwd=HERE.parent, check=False)
        print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)
        if proc.returncode != 0:
            failed.append(path.stem)
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
