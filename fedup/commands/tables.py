"""The comparison table ``simulate`` and ``demo`` print from a report (JSON-ready dict)."""

from __future__ import annotations

from typing import Any

MODELS = (
    ("federated", "federated (FedUp ring)"),
    ("centralized", "centralized (pooled)"),
    ("local_only", "local-only (mean)"),
)


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` for a missing one."""
    return "-" if value is None else format(value, spec)


def print_models(report: dict[str, Any]) -> None:
    """One line per model in the report: scores on the union, own-split loss, passes, bytes."""
    print(
        "model                    val loss   AUC     accuracy  own-split loss  data passes"
        "  sent/peer"
    )
    for key, name in MODELS:
        entry = report.get(key)
        if entry is None:
            continue
        u, m = entry["union"], entry["mean"]
        sent = None if m["bytes_sent"] is None else m["bytes_sent"] / 1e6
        print(
            f"{name:<24} {fmt(u['val_loss'], '8.4f')} {fmt(u['roc_auc'], '7.4f')} "
            f"{fmt(u['accuracy'], '9.4f')} {fmt(m['val_loss'], '15.4f')} "
            f"{fmt(m['epochs'], '12.2f')}  {fmt(sent, '6.2f')} MB"
        )
    if "local_only" in report:
        print(
            "\nval loss / AUC / accuracy: on the union of every peer's validation rows "
            "(local-only: the mean over the peers' models); own-split loss: each peer's "
            "model on its own validation rows, averaged. Data passes: training samples "
            "until the kept model / training rows it could see (local-only: its own rows)."
        )
