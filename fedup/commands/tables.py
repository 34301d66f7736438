"""The comparison table ``simulate`` and ``demo`` print from a report (JSON-ready dict)."""

from __future__ import annotations

from typing import Any

MODELS = (
    ("federated", "federated (FedUp ring)"),
    ("centralized", "centralized (pooled)"),
    ("fedavg", "FedAvg (parallel)"),
    ("hybrid", "hybrid (sub-rings)"),
    ("local_only", "local-only (mean)"),
)


def fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` for a missing one."""
    return "-" if value is None else format(value, spec)


COLUMNS = {
    "binary": (("val loss", "val_loss"), ("AUC", "roc_auc"), ("accuracy", "accuracy")),
    "multiclass": (("val loss", "val_loss"), ("accuracy", "accuracy"), ("macro-F1", "macro_f1")),
    "regression": (("MSE", "mse"), ("MAE", "mae"), ("R2", "r2")),
}
"""The union's scores each task's table shows (heading, report key)."""


def task_of(entry: dict[str, Any]) -> str:
    """The task whose scores a report entry holds (binary unless it has another's)."""
    union = entry["union"]
    if "macro_f1" in union:
        return "multiclass"
    return "regression" if "r2" in union else "binary"


def model_name(report: dict[str, Any], key: str, name: str) -> str:
    """``name`` of a model in ``report``'s tables (the federation's says its mode)."""
    mode = report.get("mode")
    if key == "federated" and mode in ("parallel", "hybrid"):
        return f"federated ({mode})"
    return name


def print_models(report: dict[str, Any]) -> None:
    """One line per model in the report: scores on the union, own-split loss, passes, bytes."""
    columns = COLUMNS[task_of(report["federated"])]
    print(
        "model                   "
        + "".join(f" {head:>9}" for head, _ in columns)
        + "  own-split loss  data passes  sent/peer"
    )
    for key, name in MODELS:
        entry = report.get(key)
        if entry is None:
            continue
        u, m = entry["union"], entry["mean"]
        sent = None if m["bytes_sent"] is None else m["bytes_sent"] / 1e6
        print(
            f"{model_name(report, key, name):<24}"
            + "".join(f" {fmt(u[k], '9.4f')}" for _, k in columns)
            + f" {fmt(m['val_loss'], '15.4f')} {fmt(m['epochs'], '12.2f')}  "
            f"{fmt(sent, '6.2f')} MB"
        )
    if "local_only" in report:
        heads = " / ".join(head for head, _ in columns)
        print(
            f"\n{heads}: on the union of every peer's validation rows "
            "(local-only: the mean over the peers' models); own-split loss: each peer's "
            "model on its own validation rows, averaged. Data passes: training samples "
            "until the kept model / training rows it could see (local-only: its own rows)."
        )
