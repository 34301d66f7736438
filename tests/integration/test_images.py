"""A second field: the image example (demo/images.py) on a smaller budget.

Four real peers on an in-memory world train the example's CNN on scikit-learn's
bundled digits, split across them by a Dirichlet label skew; the federated model is
scored on held-out test images next to the same CNN trained centralized and alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
import torch

DEMO = Path(__file__).resolve().parents[2] / "demo" / "images.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedup_images_example", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


images = load_example()

BUDGET = attrs.evolve(images.RUN, max_laps=16, patience=4)
MARGIN = 0.1
"""How far below centralized the federated test accuracy may be (seed 0: 0.017 below
with the example's full budget, 0.008 with this one)."""


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script does: the figures depend on it
    try:
        out = tmp_path_factory.mktemp("images")
        yield images.compare(seed=0, peers=4, alpha=0.5, out=out, settings=BUDGET)
    finally:
        torch.set_num_threads(threads)


def test_the_split_is_skewed_by_label_and_keeps_the_test_images_apart() -> None:
    split = images.split_digits(0, 4, 0.5)
    counts = split.label_counts()
    assert len(counts) == 4 and all(sum(c) >= images.MIN_SHARE for c in counts)
    # 1,797 digits: 20% of each digit held out, the rest shared out, none twice.
    assert sum(map(sum, counts)) + len(split.y_test) == 1797
    assert len(split.y_test) == 359
    # Label skew: some peer lacks (almost) every image of some digit another has many of.
    assert min(min(c) for c in counts) <= 5 and max(max(c) for c in counts) >= 80
    # The same arguments give the same split.
    again = images.split_digits(0, 4, 0.5)
    assert all(
        torch.equal(a.y_train, b.y_train) and torch.equal(a.x_val, b.x_val)
        for a, b in zip(split.tasks, again.tasks, strict=True)
    )


def test_every_peer_ends_with_the_same_model(comparison: Any) -> None:
    fed = comparison.federation
    summaries = fed.summaries
    assert len(summaries) == 4
    assert all(s.ok and s.stop_reason in ("converged", "max-laps") for s in summaries)
    assert len({s.model_sha256 for s in summaries}) == 1
    assert fed.file_sha256 == {summaries[0].model_sha256}
    # Passes until the best lap: at most half a pass per lap (stochastic rounding aside).
    assert 0 < fed.epochs <= 1.1 * BUDGET.local_epochs * (summaries[0].best_lap + 1)
    for s in summaries:
        data = (Path(s.out_dir) / "model.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == s.model_sha256
        written = json.loads((Path(s.out_dir) / "summary.json").read_text())
        assert written["laps"] <= BUDGET.max_laps
        # A library task shares no row counts: passes over the union are not known to a
        # member (it once guessed from its own size, a different figure on each member).
        assert written["data_passes"] is None


def test_the_federation_pools_the_tasks_multi_class_accuracy(comparison: Any) -> None:
    # The task counts a prediction correct by its argmax; each member's own figure
    # in its summary is that count on its validation images, for the final model.
    c = comparison
    for task, s in zip(c.split.tasks, c.federation.summaries, strict=True):
        own = images.score(task, c.federation.model, task.x_val, task.y_val)
        assert s.final_val_accuracy == pytest.approx(own.accuracy)
        assert s.final_val_loss == pytest.approx(own.loss, rel=1e-6)
    metrics = Path(c.federation.summaries[0].out_dir) / "metrics.jsonl"
    laps = [json.loads(line) for line in metrics.read_text().splitlines()]
    accuracy = [r["accuracy"] for r in laps if r["type"] == "lap"]
    assert accuracy[0] < 0.3 < 0.8 < max(accuracy)  # from chance to well above it


def test_federated_accuracy_is_well_above_chance_and_near_centralized(comparison: Any) -> None:
    c = comparison
    n_test = len(c.split.y_test)
    assert c.federated.n == c.centralized.n == n_test
    assert c.federated.accuracy > 0.8
    assert c.federated.accuracy >= c.centralized.accuracy - MARGIN
    # Under this label skew, each peer alone does worse than the federation.
    assert all(e.accuracy < c.federated.accuracy for e in c.local_only)


def test_the_report_prints_every_model_on_the_test_images(comparison: Any) -> None:
    text = images.report(comparison)
    assert f"federated    {comparison.federated.accuracy:.3f}" in text
    assert f"centralized  {comparison.centralized.accuracy:.3f}" in text
    assert text.count(" alone ") == 4
    assert (
        f"every peer holds model {comparison.federation.summaries[0].model_sha256[:16]}: True"
        in text
    )
