"""The hop step, the lap rules and the in-process ring, on small synthetic lenders."""

from __future__ import annotations

import itertools
import math

import attrs
import numpy as np
import pytest
import torch

from fedup.learn import baselines, loans
from fedup.learn.lap_sums import (
    LOSS_SCALE,
    MAX_MEMBER_COUNT,
    MAX_MEMBER_LOSS,
    MODULUS,
    SUMS_LEN,
    ZERO_SUMS,
    LapMasks,
    add_sums,
    open_sums,
    to_sums,
)
from fedup.learn.ring import (
    FederationStats,
    RingMeta,
    RingSettings,
    RingState,
    RingStateError,
    evaluate_state,
    final_weights,
    hop_seed,
    initial_state,
    train_hop,
)
from fedup.learn.task import AUC_BINS, EvalStats, TabularTask, TrainBudget, roc_auc
from fedup.learn.weights import bytes_to_state, state_to_bytes
from fedup.protocol import cbor


@pytest.fixture(scope="module")
def tasks() -> list[TabularTask]:
    torch.set_num_threads(1)
    tables = [d.table for d in loans.generate_population(3, seed=5, n_rows=500)]
    return baselines.make_tasks(tables)


@pytest.fixture(scope="module")
def fed(tasks: list[TabularTask]) -> FederationStats:
    return baselines.federation_of(tasks)


SETTINGS = RingSettings(seed=11, hop_epochs=0.5)


def same_state(a: RingState, b: RingState) -> bool:
    return (
        list(a.tensors) == list(b.tensors)
        and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
        and a.meta == b.meta
    )


def run_lap(
    tasks: list[TabularTask],
    state: RingState,
    settings: RingSettings,
    lap: int,
    fed: FederationStats,
) -> RingState:
    for hop, task in enumerate(tasks):
        state, _ = train_hop(task, state, settings, lap, hop, fed)
    return state


# --------------------------------------------------------------------------
# metrics


def test_roc_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    pairs = [(a, b) for a, b in itertools.product(s[y], s[~y])]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(y, s) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_histogram_auc_is_close_to_exact(tasks: list[TabularTask]) -> None:
    model = tasks[0].build_model(0)
    stats = sum((t.evaluate(model) for t in tasks), EvalStats(0.0, 0))
    exact = baselines.score(model.state_dict(), tasks)
    assert stats.n == exact.n
    # float32 per-sample losses (summed in float64) against a float64 loss: ~1e-9 apart
    assert stats.loss == pytest.approx(exact.loss, rel=1e-6)
    assert stats.accuracy == pytest.approx(exact.accuracy)
    assert abs(stats.auc() - exact.auc) < 0.02


# --------------------------------------------------------------------------
# one hop


def test_build_model_is_seeded_and_leaves_global_rng_alone(tasks: list[TabularTask]) -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tasks[0].build_model(4).state_dict()
    b = tasks[1].build_model(4).state_dict()
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = tasks[0].build_model(5).state_dict()
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_train_hop_is_deterministic_and_pure(
    tasks: list[TabularTask], fed: FederationStats
) -> None:
    start = initial_state(tasks[0], SETTINGS)
    assert same_state(start, initial_state(tasks[1], SETTINGS))
    snapshot = {k: v.clone() for k, v in start.tensors.items()}
    one, m1 = train_hop(tasks[0], start, SETTINGS, 0, 0, fed)
    two, m2 = train_hop(tasks[0], start, SETTINGS, 0, 0, fed)
    assert same_state(one, two)
    assert all(torch.equal(snapshot[k], start.tensors[k]) for k in snapshot)  # input untouched
    assert m1.steps == m2.steps > 0 and m1.train_loss == m2.train_loss
    assert not torch.equal(one.tensors["model.0.weight"], start.tensors["model.0.weight"])
    other, _ = train_hop(tasks[0], start, attrs.evolve(SETTINGS, seed=12), 0, 0, fed)
    assert not torch.equal(other.tensors["model.0.weight"], one.tensors["model.0.weight"])
    assert hop_seed(SETTINGS, 0, 0) != hop_seed(SETTINGS, 0, 1) != hop_seed(SETTINGS, 1, 0)


def test_optimizer_state_travels(tasks: list[TabularTask], fed: FederationStats) -> None:
    """Two hops on two peers equal one model and one Adam trained on both in turn."""
    start = initial_state(tasks[0], SETTINGS)
    assert all(not v.any() for k, v in start.tensors.items() if k.startswith("optim."))
    s1, m1 = train_hop(tasks[0], start, SETTINGS, 0, 0, fed)
    s2, m2 = train_hop(tasks[1], s1, SETTINGS, 0, 1, fed)
    assert float(s2.tensors["optim.0.weight.step"]) == m1.steps + m2.steps
    assert s1.tensors["optim.0.weight.exp_avg_sq"].abs().sum() > 0

    model = tasks[0].build_model(SETTINGS.seed)
    opt = tasks[0].make_optimizer(model)
    for hop, task in enumerate(tasks[:2]):
        with torch.random.fork_rng(devices=[]):
            seed = hop_seed(SETTINGS, 0, hop)
            torch.manual_seed(seed)
            task.train(model, opt, TrainBudget(epochs=SETTINGS.hop_epochs, seed=seed))
    for name, value in model.state_dict().items():
        assert torch.equal(s2.tensors["model." + name], value), name

    fresh = attrs.evolve(SETTINGS, travel_optimizer=False)
    f2, _ = train_hop(tasks[1], train_hop(tasks[0], initial_state(tasks[0], fresh), fresh, 0, 0,
                                          fed)[0], fresh, 0, 1, fed)  # fmt: skip
    assert not any(k.startswith("optim.") for k in f2.tensors)
    assert not torch.equal(f2.tensors["model.0.weight"], s2.tensors["model.0.weight"])


def test_state_survives_the_wire(tasks: list[TabularTask], fed: FederationStats) -> None:
    """Blob + CBOR metadata round trip; training on the copy gives the same bits."""
    template = initial_state(tasks[0], SETTINGS)
    state = run_lap(tasks, template, SETTINGS, 0, fed)
    state, _ = train_hop(tasks[0], state, SETTINGS, 1, 0, fed)  # closes lap 0
    assert list(state.tensors) == list(template.tensors)  # fixed layout
    blob = state_to_bytes(state.tensors)
    meta = cbor.decode(cbor.encode(state.meta.to_dict()), max_size=65536, max_depth=8)
    received = RingState.from_parts(
        bytes_to_state(bytes(blob), like=template.tensors), meta, template=template
    )
    assert same_state(received, state)
    a, _ = train_hop(tasks[1], state, SETTINGS, 1, 1, fed)
    b, _ = train_hop(tasks[1], received, SETTINGS, 1, 1, fed)
    assert same_state(a, b)
    bad = dict(state.tensors)
    bad["model.0.weight"] = bad["model.0.weight"][:, :3]
    with pytest.raises(RingStateError, match="expected"):
        RingState.from_parts(bad, meta, template=template)


def test_states_out_of_order_are_refused(tasks: list[TabularTask], fed: FederationStats) -> None:
    s = initial_state(tasks[0], SETTINGS)
    with pytest.raises(RingStateError, match="cannot be trained at lap 1"):
        train_hop(tasks[0], s, SETTINGS, 1, 0, fed)
    s1, _ = train_hop(tasks[0], s, SETTINGS, 0, 1, fed)
    with pytest.raises(RingStateError, match="lap 0 hop 1 cannot be trained at lap 0 hop 1"):
        train_hop(tasks[0], s1, SETTINGS, 0, 1, fed)
    done = RingState(s1.tensors, attrs.evolve(s1.meta, done=True))
    with pytest.raises(RingStateError, match="already ended"):
        train_hop(tasks[0], done, SETTINGS, 1, 0, fed)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("v", 9, "must be 2"),
        ("lap", -5, "lap"),
        ("cand_sums", [0] * 103, "must be 824 bytes"),
        ("cand_sums", bytes(823), "must be 824 bytes"),
        ("cand_sums", (2**62).to_bytes(8, "big") + bytes(816), "below 2\\^62"),
        ("best_loss", math.inf, "finite"),
        ("history", [[0, 0.5, 0.5, None, 1]], "6-item"),
        ("extra", 1, "unknown field"),
    ],
)
def test_meta_from_untrusted_dict(key: str, value: object, message: str) -> None:
    d = RingMeta().to_dict()
    d[key] = value
    with pytest.raises(RingStateError, match=message):
        RingMeta.from_dict(d)


def test_settings_round_trip() -> None:
    s = RingSettings(seed=3, hop_epochs=0.2, patience=4)
    assert RingSettings.from_dict(s.to_dict()) == s
    assert s.digest() == RingSettings.from_dict(s.to_dict()).digest() != RingSettings().digest()
    with pytest.raises(RingStateError, match="unknown field"):
        RingSettings.from_dict({**s.to_dict(), "lr": 1.0})
    with pytest.raises(RingStateError, match="local_epochs"):
        RingSettings.from_dict({**s.to_dict(), "hop_epochs": 0.0})


def test_label_weighting_uses_federation_counts(tasks: list[TabularTask]) -> None:
    from fedup.learn.ring import label_weights

    settings = RingSettings(weight_labels=True, max_class_weight=3.0)
    neg, pos = tasks[0].label_counts or (0, 0)
    p_local = pos / (neg + pos)
    w_neg, w_pos = label_weights(tasks[0], settings, FederationStats(3, 1000, 250)) or (0, 0)
    assert w_pos == pytest.approx(min(3.0, 0.25 / p_local))
    assert w_neg == pytest.approx(0.75 / (1 - p_local))
    assert label_weights(tasks[0], RingSettings(), FederationStats(3, 1000, 250)) is None


# --------------------------------------------------------------------------
# laps


def test_lap_closing_pools_validation_and_averages(
    tasks: list[TabularTask], fed: FederationStats
) -> None:
    state = initial_state(tasks[0], SETTINGS)
    init_model = tasks[0].build_model(SETTINGS.seed)
    ends = []
    for hop, task in enumerate(tasks):
        state, metrics = train_hop(task, state, SETTINGS, 0, hop, fed)
        ends.append((metrics.samples, state.group("model.")))
    state, metrics = train_hop(tasks[0], state, SETTINGS, 1, 0, fed)

    evals = [t.evaluate(init_model) for t in tasks]
    closed = metrics.closed
    assert closed is not None and closed.lap == -1
    assert closed.n == sum(e.n for e in evals) == sum(t.n_val for t in tasks)
    # The loss sums travel in fixed point: at most half a unit of rounding per member.
    rounding = len(tasks) * 0.5 / LOSS_SCALE
    assert abs(closed.loss * closed.n - sum(e.loss_sum for e in evals)) <= rounding
    assert state.meta.best_lap == -1 and state.meta.cand_lap == 0
    total = sum(n for n, _ in ends)
    for name, cand in state.group("cand.").items():
        expected = sum(n * w[name] for n, w in ends) / total
        torch.testing.assert_close(cand, expected, rtol=1e-5, atol=1e-6)
    assert metrics.candidate is not None and metrics.candidate.n == tasks[0].n_val


def test_max_laps_and_patience_stop_the_run(tasks: list[TabularTask], fed: FederationStats) -> None:
    short = attrs.evolve(SETTINGS, max_laps=2)
    r = baselines.simulate_ring(tasks, short, federation=fed)
    assert [h.lap for h in r.history] == [-1, 0, 1]  # lap 2 only evaluated lap 1's output
    assert r.laps == 3 and r.state.meta.done
    assert r.total_passes == pytest.approx(2 * short.hop_epochs, rel=0.3)
    impatient = attrs.evolve(SETTINGS, patience=1, tolerance=0.9)  # nothing counts as better
    r2 = baselines.simulate_ring(tasks, impatient, federation=fed)
    assert [h.lap for h in r2.history] == [-1, 0]
    with pytest.raises(RingStateError, match="already ended"):
        train_hop(tasks[0], r2.state, impatient, r2.laps, 0, fed)


def test_short_ring_learns_and_nears_centralized(tasks: list[TabularTask]) -> None:
    settings = RingSettings(seed=1, hop_epochs=0.25, patience=6, max_laps=60)
    result = baselines.simulate_ring(tasks, settings)
    first = result.history[0]
    assert first.lap == -1
    best = result.best
    assert best is not None and best.loss < 0.8 * first.loss
    final = final_weights(result.state)
    assert all(torch.equal(final[k], result.state.tensors["best." + k]) for k in final)
    fed_score = baselines.score(final, tasks)
    assert fed_score.loss == pytest.approx(best.loss, rel=1e-6)
    assert fed_score.auc > 0.75
    central = baselines.score(final_weights(baselines.centralized(tasks, settings).state), tasks)
    assert fed_score.loss < 1.1 * central.loss
    own = evaluate_state(tasks[2], result.state)
    assert own.n == tasks[2].n_val and math.isfinite(own.loss)


# --- masked validation sums ---------------------------------------------------------------


def test_a_neighbour_sees_masked_sums_and_the_lap_totals_are_exact(
    tasks: list[TabularTask], fed: FederationStats
) -> None:
    """The member after the lap's first hop reads no exact figure of it: its sums come
    masked; the member that opened the lap removes the mask when it closes the lap, and
    the lap's result is the same as without masking."""
    init_model = tasks[0].build_model(SETTINGS.seed)
    own = to_sums(tasks[0].evaluate(init_model))
    results = []
    seen_by_hop1 = []
    for masks in (LapMasks(), LapMasks(), None):
        state = initial_state(tasks[0], SETTINGS)
        for hop, task in enumerate(tasks):
            state, _ = train_hop(task, state, SETTINGS, 0, hop, fed, masks=masks)
            if hop == 0:
                seen_by_hop1.append(state.meta.cand_sums)
        state, metrics = train_hop(tasks[0], state, SETTINGS, 1, 0, fed, masks=masks)
        results.append(metrics.closed)
    masked_a, masked_b, clear = seen_by_hop1
    assert clear == own  # unmasked, hop 1 would read hop 0's exact figures
    assert masked_a != own and masked_b != own and masked_a != masked_b
    assert sum(x == y for x, y in zip(masked_a, own, strict=True)) <= 2  # chance only
    assert results[0] == results[1] == results[2]  # exact totals either way


def test_a_lap_whose_opener_is_gone_is_not_judged(
    tasks: list[TabularTask], fed: FederationStats
) -> None:
    """Only the member that opened a lap can remove its mask: if another member closes the
    lap (the opener was skipped as dead), that lap is not judged, and the next one is."""
    opener, closer = LapMasks(), LapMasks()
    state = initial_state(tasks[0], SETTINGS)
    state, _ = train_hop(tasks[0], state, SETTINGS, 0, 0, fed, masks=opener)
    state, _ = train_hop(tasks[1], state, SETTINGS, 0, 1, fed, masks=closer)
    state, metrics = train_hop(tasks[1], state, SETTINGS, 1, 0, fed, masks=closer)
    assert metrics.closed is None and state.meta.history == ()
    assert state.meta.best_lap == -2  # nothing judged yet
    state, _ = train_hop(tasks[2], state, SETTINGS, 1, 1, fed, masks=opener)
    state, metrics = train_hop(tasks[1], state, SETTINGS, 2, 0, fed, masks=closer)
    assert metrics.closed is not None and metrics.closed.lap == 0  # the closer opened lap 1


def test_sums_that_cannot_be_real_are_not_judged() -> None:
    e = EvalStats(3.25, 10, 7, tuple([1] * AUC_BINS), tuple([0] * AUC_BINS))
    assert open_sums(to_sums(e)) == EvalStats(3.25, 10, 7, e.pos_hist, e.neg_hist)
    assert open_sums(to_sums(EvalStats(1.0, 4, 4))) == EvalStats(1.0, 4, 4)
    assert open_sums(ZERO_SUMS) is None  # nobody evaluated
    wrapped = add_sums(to_sums(e), to_sums(EvalStats(0.0, 11, 0)), sign=-1)  # n < 0 mod 2^62
    assert open_sums(wrapped) is None
    assert open_sums((0, 5, 6) + (0,) * (2 * AUC_BINS)) is None  # more correct than samples
    with pytest.raises(ValueError, match="negative"):
        to_sums(EvalStats(-1.0, 1))
    # A diverged member's huge (or NaN) loss counts as the cap: a very bad lap, never one
    # that wraps around the modulus into a small, plausible loss.
    for huge in (2.0**44 + 12345.678, math.inf, math.nan):
        opened = open_sums(to_sums(EvalStats(huge, 10)))
        assert opened is not None and opened.loss_sum == MAX_MEMBER_LOSS
    many = [to_sums(EvalStats(math.inf, MAX_MEMBER_COUNT - 1, MAX_MEMBER_COUNT - 1))] * 1024
    total = ZERO_SUMS
    for one in many:
        total = add_sums(total, one)
    assert open_sums(total) is not None  # 1,024 members at every bound do not wrap
    masks = LapMasks()
    first = masks.open(0)
    assert masks.get(0) == first and masks.get(1) is None
    masks.open(1), masks.open(2)
    assert masks.get(0) is None and masks.get(1) is not None  # only the last two kept


def test_lap_masks_are_fresh_values_below_the_modulus() -> None:
    masks = LapMasks()
    drawn = [masks.open(lap) for lap in range(20)]
    values = [v for mask in drawn for v in mask]
    assert all(len(mask) == SUMS_LEN for mask in drawn)
    assert all(0 <= v < MODULUS for v in values)
    assert len(set(values)) == len(values)  # 2,060 draws of 62 bits: no repeat
    assert max(values) >= MODULUS // 2 and max(v.bit_length() for v in values) == 62
