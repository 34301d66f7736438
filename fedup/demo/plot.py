"""``loss_curves.png``: validation loss per data pass for every model of the demo.

A bare matplotlib ``Figure`` draws off-screen (Agg): no display, no pyplot state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from fedup.files import atomic_writer

__all__ = ["plot_loss_curves"]


def _xy(points: list[Any]) -> tuple[list[float], list[float]]:
    return [float(p[0]) for p in points], [float(p[1]) for p in points]


def plot_loss_curves(report: dict[str, Any], path: Path) -> None:
    """Draw the report's curves; a dot marks the model each run kept."""
    curves = report["curves"]
    fig = Figure(figsize=(9, 5.5), dpi=110)
    ax = fig.subplots()
    for i, points in enumerate(curves.get("local_only", [])):
        x, y = _xy(points)
        ax.plot(x, y, color="0.6", lw=1, label="local-only (each lender alone)" if i == 0 else None)
        kept = report["local_only"]["per_peer"][i]["epochs"]
        _mark(ax, x, y, kept, "0.6")
    if "centralized" in curves:
        x, y = _xy(curves["centralized"])
        ax.plot(x, y, color="tab:orange", lw=2, ls="--", label="centralized (pooled data)")
        _mark(ax, x, y, report["centralized"]["mean"]["epochs"], "tab:orange")
    x, y = _xy(curves["federated"])
    ax.plot(x, y, color="tab:blue", lw=2.2, label="federated (FedUp ring)")
    _mark(ax, x, y, report["federated"]["mean"]["epochs"], "tab:blue")
    ax.set_xlabel("data passes (epochs over the data each model trains on)")
    ax.set_ylabel("validation loss (binary cross-entropy)")
    ax.set_title(
        f"FedUp demo: {len(report['peers'])} lenders; every model scored on all lenders' "
        "validation rows",
        fontsize=9,
    )
    # Leave out each curve's first point (the untrained model): it would squash the rest.
    trained = [float(p[1]) for c in _all(curves) for p in c[1:]]
    if trained:
        ax.set_ylim(min(trained) * 0.98, max(trained) * 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_writer(path) as f:  # 0600, replacing (never following) a link at path
        fig.savefig(f, format="png")


def _all(curves: dict[str, Any]) -> list[list[Any]]:
    return [curves["federated"], curves.get("centralized", []), *curves.get("local_only", [])]


def _mark(ax: Any, x: list[float], y: list[float], kept_passes: float, color: str) -> None:
    """A dot on the point whose data passes are those of the kept model."""
    if not x:
        return
    i = min(range(len(x)), key=lambda k: abs(x[k] - kept_passes))
    ax.plot([x[i]], [y[i]], "o", color=color, ms=6)
