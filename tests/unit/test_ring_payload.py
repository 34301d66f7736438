"""RingCodec and state_problem: a real ring state to bytes and back, checked and coded."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import RemoteProtocolError
from fedup.identity import Identity
from fedup.learn import baselines, loans
from fedup.learn.ring import RingMeta, RingSettings, RingState, RingStateError, initial_state
from fedup.learn.ring import train_hop as train
from fedup.learn.ring_payload import (
    BadMetaError,
    BadStateError,
    RingCodec,
    content_of,
    decode_ring_blob,
    encode_ring_blob,
    state_problem,
)
from fedup.learn.task import TabularTask
from fedup.learn.weights import state_to_bytes
from fedup.protocol import cbor
from fedup.protocol.laps import Position
from fedup.protocol.notices import DeadChain, FinalSeal
from fedup.protocol.payload import PayloadError, payload_prefix
from fedup.protocol.refusal import RefusalCode

LIMITS = DEFAULT_LIMITS
BOUND = LIMITS.max_weight_magnitude
SETTINGS = RingSettings(seed=11, hop_epochs=0.2)
IDS = sorted((Identity(bytes([i]) * 32) for i in range(1, 4)), key=lambda i: i.peer_id)
VIEW = hashlib.sha256(b"view").digest()
RUN = b"R" * 16


@pytest.fixture(scope="module")
def task() -> TabularTask:
    torch.set_num_threads(1)
    tables = [d.table for d in loans.generate_population(2, seed=5, n_rows=200)]
    return baselines.make_tasks(tables)[0]


@pytest.fixture(scope="module")
def template(task: TabularTask) -> RingState:
    return initial_state(task, SETTINGS)


@pytest.fixture(scope="module")
def trained(task: TabularTask, template: RingState) -> RingState:
    fed = baselines.federation_of([task])
    state, _ = train(task, template, SETTINGS, 0, 0, fed)
    return state


@pytest.fixture(scope="module")
def codec(template: RingState) -> RingCodec:
    return RingCodec(template, limits=LIMITS)


def chain_of_one() -> tuple[bytes, ...]:
    members = tuple(i.peer_id for i in IDS)
    return DeadChain(RUN, VIEW, members).claim(IDS[0], "unreachable", Position(1, 0)).envelopes


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def with_value(state: RingState, name: str, value: float, index: int = 0) -> RingState:
    tensors = {k: v.clone() for k, v in state.tensors.items()}
    tensors[name].view(-1)[index] = value
    return RingState(tensors, state.meta)


# --------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("which", ["template", "trained"])
def test_round_trip_of_a_real_ring_state(
    which: str, codec: RingCodec, request: pytest.FixtureRequest
) -> None:
    state: RingState = request.getfixturevalue(which)
    chain = chain_of_one()
    data = codec.encode(state, view=VIEW, chain=chain)
    assert bytes(data) == bytes(encode_ring_blob(state, view=VIEW, chain=chain, limits=LIMITS))
    blob = codec.decode(bytearray(data))
    assert same_tensors(blob.state.tensors, state.tensors)
    assert blob.state.meta == state.meta
    assert (blob.view, blob.chain, blob.origin, blob.seal) == (VIEW, chain, None, None)
    assert blob.content == content_of(state, limits=LIMITS)


def test_the_trained_state_is_not_the_template(template: RingState, trained: RingState) -> None:
    assert trained.meta != template.meta
    assert not torch.equal(trained.tensors["model.0.weight"], template.tensors["model.0.weight"])


def test_a_final_model_carries_origin_and_seal_over_its_content(
    codec: RingCodec, trained: RingState
) -> None:
    final = RingState(trained.tensors, attrs.evolve(trained.meta, done=True))
    origin = IDS[2]
    seal = FinalSeal.seal(
        origin, run_id=RUN, content=content_of(final, limits=LIMITS), model=b"m" * 32
    )
    data = codec.encode(final, view=VIEW, origin=origin.peer_id, seal=seal.envelope)
    assert bytes(data) == bytes(
        encode_ring_blob(final, view=VIEW, origin=origin.peer_id, seal=seal.envelope, limits=LIMITS)
    )
    blob = codec.decode(bytearray(data))
    assert blob.origin == origin.peer_id and blob.seal == seal.envelope
    assert blob.state.meta.done
    opened = FinalSeal.open(blob.seal)
    assert opened.content == blob.content  # what the receiver computes is what was sealed
    # the content does not depend on the view or chain the final travels with
    again = codec.decode(bytearray(codec.encode(final, view=b"w" * 32, chain=chain_of_one())))
    assert again.content == blob.content
    other = with_value(final, "cand.0.bias", 0.5)
    assert codec.decode(bytearray(codec.encode(other, view=VIEW))).content != blob.content


def test_decode_views_the_received_buffer(codec: RingCodec, trained: RingState) -> None:
    buf = bytearray(codec.encode(trained, view=VIEW))
    blob = codec.decode(buf)
    whole = np.frombuffer(buf, np.uint8)
    assert all(np.shares_memory(t.numpy(), whole) for t in blob.state.tensors.values())


def test_codec_agrees_with_decode_ring_blob(
    codec: RingCodec, trained: RingState, template: RingState
) -> None:
    data = bytes(codec.encode(trained, view=VIEW, chain=chain_of_one()))
    ours = codec.decode(bytearray(data))
    theirs = decode_ring_blob(bytearray(data), template, limits=LIMITS)
    assert same_tensors(ours.state.tensors, theirs.state.tensors)
    assert ours.state.meta == theirs.state.meta and ours.chain == theirs.chain
    assert ours.content == theirs.content


@pytest.mark.parametrize("which", ["template", "trained"])
def test_the_content_a_member_signs_is_the_one_its_receiver_computes(
    which: str, codec: RingCodec, request: pytest.FixtureRequest
) -> None:
    state: RingState = request.getfixturevalue(which)
    body = codec.body(state)
    assert body is not None
    signed = codec.content(state, body)  # what the sender's hop statement says it sent
    assert signed == codec.content(state, None) == content_of(state, limits=LIMITS)
    hops = b"statements" * 40
    data = codec.encode(state, view=VIEW, chain=chain_of_one(), provenance=hops, body=body)
    assert bytes(data) == bytes(
        encode_ring_blob(state, view=VIEW, chain=chain_of_one(), provenance=hops, limits=LIMITS)
    )
    blob = codec.decode(bytearray(data))
    assert blob.content == signed and bytes(blob.provenance) == hops
    assert same_tensors(blob.state.tensors, state.tensors)


def test_the_metadata_is_encoded_once_per_state_and_never_stale(
    template: RingState, trained: RingState, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = RingCodec(template, limits=LIMITS)  # its own: nothing encoded yet
    encoded: list[object] = []
    real = cbor.encode

    def counting(value: object) -> bytes:
        encoded.append(value)
        return real(value)

    monkeypatch.setattr(cbor, "encode", counting)
    body = codec.body(trained)
    content = codec.content(trained, body)
    data = bytes(codec.encode(trained, view=VIEW, body=body))
    rings = [v for v in encoded if v == trained.meta.to_dict()]
    assert len(rings) == 1  # for the content digest, reused in the framing
    # Another state's metadata is its own, however the two alternate.
    for state in (template, trained, template):
        assert codec.meta_cbor(state.meta) == real(state.meta.to_dict())
    assert codec.decode(bytearray(data)).content == content
    changed = attrs.evolve(trained, meta=attrs.evolve(trained.meta, lap=trained.meta.lap + 1))
    assert codec.meta_cbor(changed.meta) == real(changed.meta.to_dict())
    assert codec.decode(bytearray(codec.encode(changed, view=VIEW))).state.meta == changed.meta


def test_a_pre_encoded_ring_gives_the_same_prefix() -> None:
    ring = {"v": 1, "lap": 3, "history": [1.5, None]}
    plain = payload_prefix(ring, view=VIEW, chain=chain_of_one(), provenance=b"p" * 5)
    pre = payload_prefix(
        cbor.Encoded(cbor.encode(ring)), view=VIEW, chain=chain_of_one(), provenance=b"p" * 5
    )
    assert pre == plain


# --------------------------------------------------------------------------
# refusals: values


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model.0.weight", 1e30),
        ("model.4.bias", -1e30),
        ("optim.0.weight.exp_avg_sq", float("nan")),
        ("best.2.weight", float("inf")),
        ("optim.2.bias.step", 2e8),
    ],
)
def test_values_out_of_bounds_are_bad_state(
    codec: RingCodec, template: RingState, trained: RingState, name: str, value: float
) -> None:
    bad = with_value(trained, name, value, index=-1 if trained.tensors[name].dim() else 0)
    data = codec.encode(bad, view=VIEW)  # the sender's codec does not check
    with pytest.raises(BadStateError) as info:
        codec.decode(bytearray(data))
    exc = info.value
    assert exc.code is RefusalCode.BAD_STATE
    assert isinstance(exc, RingStateError) and isinstance(exc, RemoteProtocolError)
    assert "Limits.max_weight_magnitude" in exc.reason and repr(name) in exc.reason
    assert ("NaN or Inf" in exc.reason) == (not math.isfinite(value))
    with pytest.raises(BadStateError) as old:
        decode_ring_blob(bytearray(data), template, limits=LIMITS)
    assert old.value.code is RefusalCode.BAD_STATE
    assert "Limits.max_weight_magnitude" in old.value.reason and repr(name) in old.value.reason


def test_values_at_the_bound_pass(codec: RingCodec, trained: RingState) -> None:
    at = with_value(with_value(trained, "model.0.weight", BOUND), "model.0.bias", -BOUND)
    blob = codec.decode(bytearray(codec.encode(at, view=VIEW)))
    assert blob.state.tensors["model.0.weight"].view(-1)[0] == BOUND
    tight = RingCodec(trained, limits=attrs.evolve(LIMITS, max_weight_magnitude=BOUND / 2))
    with pytest.raises(BadStateError, match=r"'model\.0\.weight'"):
        tight.decode(bytearray(codec.encode(at, view=VIEW)))


# --------------------------------------------------------------------------
# refusals: layout, metadata, framing


def test_another_models_blob_is_bad_state(
    task: TabularTask, codec: RingCodec, template: RingState
) -> None:
    for other_settings in (
        attrs.evolve(SETTINGS, travel_optimizer=False),
        attrs.evolve(SETTINGS, keep_best=False),
    ):
        other = initial_state(task, other_settings)
        data = encode_ring_blob(other, view=VIEW, limits=LIMITS)
        with pytest.raises(BadStateError, match="layout") as info:
            codec.decode(bytearray(data))
        assert info.value.code is RefusalCode.BAD_STATE
        # our codec writes a state of another layout as encode_ring_blob does
        assert bytes(codec.encode(other, view=VIEW)) == bytes(data)
        with pytest.raises(BadStateError) as old:
            decode_ring_blob(bytearray(data), template, limits=LIMITS)
        assert old.value.code is RefusalCode.BAD_STATE


def test_a_tensor_of_another_shape_is_bad_state(codec: RingCodec, template: RingState) -> None:
    tensors = dict(template.tensors)
    tensors["model.4.bias"] = torch.zeros(2)
    data = encode_ring_blob(RingState(tensors, template.meta), view=VIEW, limits=LIMITS)
    with pytest.raises(BadStateError) as info:
        codec.decode(bytearray(data))
    assert info.value.code is RefusalCode.BAD_STATE


def test_a_truncated_state_is_bad_state(codec: RingCodec, template: RingState) -> None:
    data = bytes(codec.encode(template, view=VIEW))
    for cut in (1, 4, 8, 1000):
        with pytest.raises(BadStateError) as info:
            codec.decode(bytearray(data[:-cut]))
        assert info.value.code is RefusalCode.BAD_STATE
    with pytest.raises(BadStateError):
        codec.decode(bytearray(data + bytes(8)))


def blob_with_meta(meta: object, template: RingState) -> bytearray:
    prefix, _ = payload_prefix(meta, view=VIEW)
    return bytearray(state_to_bytes(template.tensors, limits=LIMITS, prefix=prefix))


def meta_dict(**changes: Any) -> dict[str, Any]:
    d = RingMeta().to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (meta_dict(v=99), "'v'"),
        (meta_dict(lap="x"), "'lap'"),
        (meta_dict(lap=-5), "'lap'"),
        (meta_dict(extra=1), "unknown field"),
        ({k: v for k, v in meta_dict().items() if k != "done"}, "missing field 'done'"),
        (meta_dict(cand_sums=b"\x00" * 3), "cand_sums"),
        (meta_dict(history=[[0, 1.0]]), "6-item"),
        ([1, 2, 3], "expected a map"),
        (None, "expected a map"),
    ],
)
def test_bad_ring_metadata_is_bad_meta(
    codec: RingCodec, template: RingState, meta: object, match: str
) -> None:
    data = blob_with_meta(meta, template)
    with pytest.raises(BadMetaError, match=match) as info:
        codec.decode(data)
    assert info.value.code is RefusalCode.BAD_META
    assert isinstance(info.value, RemoteProtocolError)
    with pytest.raises(BadMetaError) as old:
        decode_ring_blob(data, template, limits=LIMITS)
    assert old.value.code is RefusalCode.BAD_META


def test_good_metadata_built_by_hand_decodes(codec: RingCodec, template: RingState) -> None:
    blob = codec.decode(blob_with_meta(meta_dict(lap=3, hop=1, samples=100), template))
    assert (blob.state.meta.lap, blob.state.meta.hop, blob.state.meta.samples) == (3, 1, 100)


def test_bad_framing_is_malformed(codec: RingCodec, template: RingState) -> None:
    data = bytes(codec.encode(template, view=VIEW))
    for bad in (b"", b"junk", b"FUST" + data[4:], data[:20]):
        with pytest.raises(PayloadError) as info:
            codec.decode(bytearray(bad))
        assert info.value.code is RefusalCode.MALFORMED


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_any_byte_changed_is_refused_with_a_code_or_decodes(
    codec: RingCodec, template: RingState, data: st.DataObject
) -> None:
    blob = bytearray(codec.encode(template, view=VIEW, chain=chain_of_one()))
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] ^= data.draw(st.integers(1, 255))
    try:
        got = codec.decode(blob)
    except RemoteProtocolError as exc:
        assert isinstance(getattr(exc, "code", None), RefusalCode)
        return
    assert list(got.state.tensors) == list(template.tensors)


# --------------------------------------------------------------------------
# state_problem


def test_state_problem_accepts_real_states(template: RingState, trained: RingState) -> None:
    assert state_problem(template.tensors, BOUND) is None
    assert state_problem(trained.tensors, BOUND) is None
    assert state_problem({}, BOUND) is None


@pytest.mark.parametrize(
    ("name", "value", "what"),
    [
        ("model.0.weight", 1e30, "reaches 1e+30, beyond the bound 1e+08"),
        ("cand.2.bias", -3e9, "reaches 3e+09, beyond the bound 1e+08"),
        ("avg.4.weight", float("nan"), "contains NaN or Inf"),
        ("optim.0.bias.exp_avg", float("-inf"), "contains NaN or Inf"),
    ],
)
def test_state_problem_names_the_tensor(
    trained: RingState, name: str, value: float, what: str
) -> None:
    bad = with_value(trained, name, value)
    assert state_problem(bad.tensors, BOUND) == (
        f"ring state: tensor {name!r} {what} (Limits.max_weight_magnitude)"
    )


def mixed(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    tensors = {
        "w": torch.tensor([[0.5, -1.0], [2.0, 3.0]]),
        "h": torch.tensor([1.0, 2.0], dtype=torch.float16),
        "b": torch.tensor([1.5, -2.5], dtype=torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
        "i": torch.tensor([3, -4], dtype=torch.int32),
        "u": torch.tensor([200], dtype=torch.uint8),
        "m": torch.tensor([True, False]),
        "e": torch.zeros(0, 3),
    }
    tensors.update(values)
    return tensors


def test_state_problem_on_every_dtype() -> None:
    assert state_problem(mixed(), BOUND) is None
    assert state_problem(mixed(), 200) is None
    assert state_problem(mixed(), 199) == (
        "ring state: tensor 'u' reaches 200, beyond the bound 199 (Limits.max_weight_magnitude)"
    )
    for name, tensor, what in [
        ("b", torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "NaN or Inf"),
        ("b", torch.tensor([3e30], dtype=torch.bfloat16), "beyond the bound"),
        ("h", torch.tensor([float("inf")], dtype=torch.float16), "NaN or Inf"),
        ("n", torch.tensor(2**40, dtype=torch.int64), "beyond the bound"),
        ("i", torch.tensor([0, -(2**31)], dtype=torch.int32), "beyond the bound"),
    ]:
        problem = state_problem(mixed(**{name: tensor}), BOUND)
        assert problem is not None and f"tensor {name!r}" in problem and what in problem


def test_state_problem_ignores_bools_and_empty_tensors() -> None:
    assert state_problem({"m": torch.ones(5, dtype=torch.bool), "e": torch.zeros(0)}, 0.5) is None
    assert state_problem({"n": torch.tensor([2**40])}, BOUND) is not None  # no float tensor


def no_bf16(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float tensors on the CPU and none of bfloat16: state_problem's fast path."""
    return {k: v for k, v in mixed(**values).items() if k != "b"}


def test_the_lowest_int64_is_refused_on_the_slow_path() -> None:
    problem = state_problem(mixed(n=torch.tensor([1, -(2**63)])), BOUND)  # bf16: slow path
    assert problem is not None and "tensor 'n' reaches 9.22e+18" in problem
    assert state_problem({"n": torch.tensor([-(2**63)])}, BOUND) is not None  # no floats


def test_state_problem_refuses_the_lowest_int64() -> None:
    problem = state_problem(no_bf16(n=torch.tensor([1, -(2**63)])), BOUND)
    assert problem is not None and "tensor 'n'" in problem


def mixed_codec() -> RingCodec:
    return RingCodec(RingState(mixed(), RingMeta()), limits=LIMITS)


def test_codec_round_trip_of_every_dtype() -> None:
    state = RingState(mixed(), RingMeta(lap=2, hop=0))
    codec = mixed_codec()
    data = codec.encode(state, view=VIEW)
    assert bytes(data) == bytes(encode_ring_blob(state, view=VIEW, limits=LIMITS))
    blob = codec.decode(bytearray(data))
    assert same_tensors(blob.state.tensors, state.tensors)
    assert blob.state.tensors["b"].dtype == torch.bfloat16
    for name, tensor in [
        ("b", torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)),
        ("n", torch.tensor(10**9, dtype=torch.int64)),
    ]:
        bad = RingState(mixed(**{name: tensor}), RingMeta())
        with pytest.raises(BadStateError, match=f"tensor {name!r}") as info:
            codec.decode(bytearray(codec.encode(bad, view=VIEW)))
        assert info.value.code is RefusalCode.BAD_STATE


def test_codec_refuses_the_lowest_int64() -> None:
    bad = RingState(no_bf16(n=torch.tensor(-(2**63))), RingMeta())
    codec = RingCodec(RingState(no_bf16(), RingMeta()), limits=LIMITS)
    with pytest.raises(BadStateError, match="tensor 'n'"):
        codec.decode(bytearray(codec.encode(bad, view=VIEW)))


def test_decode_ring_blob_refuses_a_bf16_nan() -> None:
    template = RingState(mixed(), RingMeta())
    bad = RingState(mixed(b=torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)), RingMeta())
    data = encode_ring_blob(bad, view=VIEW, limits=LIMITS)
    with pytest.raises(BadStateError, match="'b'"):
        decode_ring_blob(bytearray(data), template, limits=LIMITS)


# --------------------------------------------------------------------------
# the sender's way: body once, checked, then framed


@pytest.mark.parametrize("kind", ["real", "every dtype"])
def test_a_body_frames_to_the_same_blob(
    codec: RingCodec, trained: RingState, template: RingState, kind: str
) -> None:
    if kind == "every dtype":
        codec, trained = mixed_codec(), RingState(mixed(), RingMeta(lap=1, hop=0))
    body = codec.body(trained)
    assert body is not None and codec.problem(trained, body) is None
    framed = codec.encode(trained, view=VIEW, chain=(), body=body)
    assert bytes(framed) == bytes(encode_ring_blob(trained, view=VIEW, limits=LIMITS))
    assert same_tensors(codec.decode(bytearray(framed)).state.tensors, trained.tensors)


@pytest.mark.parametrize(
    ("name", "value", "what"),
    [
        ("model.0.weight", 1e30, "reaches 1e+30, beyond the bound 1e+08"),
        ("optim.0.bias.exp_avg", float("-inf"), "contains NaN or Inf"),
        ("best.4.bias", float("nan"), "contains NaN or Inf"),
    ],
)
def test_problem_on_the_body_names_the_tensor_as_state_problem_does(
    codec: RingCodec, trained: RingState, name: str, value: float, what: str
) -> None:
    bad = with_value(trained, name, value)
    expected = f"ring state: tensor {name!r} {what} (Limits.max_weight_magnitude)"
    assert codec.problem(bad, codec.body(bad)) == expected == state_problem(bad.tensors, BOUND)


def test_mixed_runs_check_each_dtype_on_the_body() -> None:
    codec = mixed_codec()
    for name, tensor, what in [
        ("b", torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "NaN or Inf"),
        ("h", torch.tensor([float("inf"), 1.0], dtype=torch.float16), "NaN or Inf"),
        ("i", torch.tensor([0, -(2**31)], dtype=torch.int32), "beyond the bound"),
    ]:
        bad = RingState(mixed(**{name: tensor}), RingMeta())
        problem = codec.problem(bad, codec.body(bad))
        assert problem is not None and f"tensor {name!r}" in problem and what in problem


def test_a_state_that_does_not_fit_the_layout_has_no_body(
    codec: RingCodec, trained: RingState
) -> None:
    wider = dict(trained.tensors)
    wider["model.0.bias"] = torch.zeros(65)
    doubles = dict(trained.tensors)
    doubles["model.0.bias"] = doubles["model.0.bias"].double()
    fewer = dict(trained.tensors)
    del fewer["best.0.bias"]
    for tensors in (wider, doubles, fewer):
        state = RingState(tensors, trained.meta)
        assert codec.body(state) is None
        # without a body the values are still checked, tensor by tensor
        assert codec.problem(state, None) is None
        assert codec.problem(with_value(state, "model.0.weight", 1e30), None) is not None
