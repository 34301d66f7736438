"""fedup.learn.parallel: a member's round as a vector, and what the sum of them says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedup.errors import LocalProtocolError
from fedup.learn.fedavg import average
from fedup.learn.lap_sums import SUMS_LEN
from fedup.learn.parallel import VectorLayout, contribution, finite, round_end


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "0.weight": torch.randn(4, 3, generator=g),
        "0.bias": torch.randn(4, generator=g),
        "2.weight": torch.randn(1, 4, generator=g),
    }


def summed(vectors: list[bytes]) -> bytes:
    total = np.zeros(len(vectors[0]) // 4, dtype="<f4")
    for v in vectors:
        total = total + np.frombuffer(v, dtype="<f4")
    return total.tobytes()


def test_the_sum_of_contributions_is_the_rows_weighted_average_and_the_totals() -> None:
    models = [weights(i) for i in range(3)]
    rows, samples = [120, 0, 45], [64, 0, 32]
    sums = [tuple(range(k, k + SUMS_LEN)) for k in (1, 100, 1000)]
    layout = VectorLayout.for_weights(models[0])
    assert layout.length == 12 + 4 + 4 + SUMS_LEN + 2
    vectors = [
        contribution(layout, m, rows=r, samples=s, sums=u)
        for m, r, s, u in zip(models, rows, samples, sums, strict=True)
    ]
    got = round_end(layout, summed(vectors))
    want = average(models, rows)
    assert got.average is not None and got.average.keys() == want.keys()
    for name, tensor in want.items():
        assert got.average[name].shape == tensor.shape
        assert torch.allclose(got.average[name], tensor, atol=1e-6)
    assert got.rows == 165 and got.samples == 96
    assert got.sums == tuple(a + b + c for a, b, c in zip(*sums, strict=True))


def test_a_round_where_nobody_had_rows_has_no_average() -> None:
    layout = VectorLayout.for_weights(weights(0))
    vector = contribution(layout, weights(0), rows=0, samples=0, sums=(0,) * SUMS_LEN)
    got = round_end(layout, vector)
    assert got.average is None and got.rows == 0


def test_counters_cannot_be_averaged_and_sizes_are_checked() -> None:
    with pytest.raises(LocalProtocolError, match="floating tensors only"):
        VectorLayout.for_weights({"steps": torch.zeros(1, dtype=torch.int64)})
    layout = VectorLayout.for_weights(weights(0))
    with pytest.raises(LocalProtocolError, match="sums"):
        contribution(layout, weights(0), rows=1, samples=1, sums=(0,))
    with pytest.raises(LocalProtocolError, match="elements"):
        round_end(layout, b"\0" * 8)


def test_finite_says_whether_a_model_can_be_contributed() -> None:
    good = weights(0)
    assert finite(good)
    bad = {**good, "0.bias": torch.tensor([0.0, float("nan"), 1.0, 2.0])}
    assert not finite(bad)
