"""Torch states through the wire codec and through safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from fedup.config import Limits
from fedup.errors import LocalProtocolError
from fedup.learn.weights import (
    TORCH_TO_WIRE,
    WeightsFileError,
    bytes_to_state,
    layout_digest,
    load_safetensors,
    load_safetensors_bytes,
    save_safetensors,
    state_specs,
    state_to_bytes,
)
from fedup.protocol.tensors import TensorDecodeError, TensorSpec


def make_model(width: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, 2)
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):  # move the running statistics and num_batches_tracked
            model(torch.randn(16, 6))
    return model


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def test_state_specs_of_a_module() -> None:
    specs = state_specs(make_model())
    assert specs["1.num_batches_tracked"] == TensorSpec("i64", ())
    assert specs["0.weight"] == TensorSpec("f32", (4, 6))
    assert list(specs) == list(make_model().state_dict())


@pytest.mark.parametrize("as_bytes", [False, True])
def test_module_round_trip_and_load_into_fresh_module(as_bytes: bool) -> None:
    model = make_model()
    data = state_to_bytes(model)
    assert isinstance(data, memoryview)
    assert not data.readonly
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning about non-writable arrays
        state = bytes_to_state(bytes(data) if as_bytes else data, like=model)
    assert_same_state(state, model.state_dict())
    assert int(state["1.num_batches_tracked"]) == 3
    assert all(t.is_contiguous() and not t.requires_grad for t in state.values())

    fresh = make_model(seed=1)
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    x = torch.randn(5, 6)
    assert torch.equal(model(x), fresh(x))
    assert state_to_bytes(fresh) == data


def test_writable_buffer_is_shared_read_only_buffer_is_copied() -> None:
    data = state_to_bytes({"w": torch.arange(4, dtype=torch.float32)})
    raw = np.frombuffer(data, np.uint8)
    shared = bytes_to_state(data)["w"]
    assert np.shares_memory(shared.numpy(), raw)
    frozen = bytes(data)
    copied = bytes_to_state(frozen)["w"]
    assert not np.shares_memory(copied.numpy(), np.frombuffer(frozen, np.uint8))
    copied[0] = 7.0  # writable, and writes go to private memory
    assert frozen == bytes(data)
    assert torch.equal(bytes_to_state(bytes(data))["w"], torch.arange(4.0))


def test_unaligned_writable_buffer_is_copied() -> None:
    data = state_to_bytes({"w": torch.arange(4, dtype=torch.float32)})
    buf = bytearray(len(data) + 1)
    buf[1:] = data
    state = bytes_to_state(memoryview(buf)[1:])
    assert torch.equal(state["w"], torch.arange(4.0))


def test_bf16_round_trip() -> None:
    values = torch.tensor([[1.0, -2.5, 3.0e38], [1e-30, 0.0, -0.0]], dtype=torch.bfloat16)
    state = {"emb": values, "scale": torch.tensor(0.5, dtype=torch.bfloat16)}
    out = bytes_to_state(state_to_bytes(state), like=state)
    assert out["emb"].dtype == torch.bfloat16
    assert torch.equal(out["emb"].view(torch.int16), values.view(torch.int16))
    assert out["scale"].shape == ()
    assert out["scale"].item() == 0.5


def test_bf16_nan_is_rejected() -> None:
    data = state_to_bytes({"emb": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)})
    with pytest.raises(TensorDecodeError, match="'emb' contains NaN or Inf"):
        bytes_to_state(data)


@pytest.mark.parametrize("dtype", list(TORCH_TO_WIRE))
def test_every_allowed_dtype_round_trips(dtype: torch.dtype) -> None:
    source = torch.arange(-6, 6).reshape(3, 4)
    state = {
        "t": source.to(dtype),
        "s": source[0, 0].to(dtype),
        "e": torch.zeros(0, 3, dtype=dtype),
    }
    out = bytes_to_state(state_to_bytes(state), like=state)
    assert_same_state(out, state)


def test_non_contiguous_and_grad_tensors() -> None:
    w = torch.randn(3, 5, requires_grad=True)
    state = {"t": w.t(), "slice": w[:, ::2]}
    out = bytes_to_state(state_to_bytes(state))
    assert torch.equal(out["t"], w.detach().t())
    assert torch.equal(out["slice"], w.detach()[:, ::2])


@pytest.mark.parametrize(
    "tensor",
    [
        torch.zeros(2, dtype=torch.complex64),
        torch.zeros(2, dtype=torch.uint16),
        torch.zeros(2, dtype=torch.float8_e4m3fn),
        torch.zeros(2).to_sparse(),
    ],
)
def test_refused_tensors(tensor: torch.Tensor) -> None:
    with pytest.raises(LocalProtocolError, match="'x'"):
        state_to_bytes({"x": tensor})


def test_mismatched_like_is_refused() -> None:
    data = state_to_bytes(make_model(width=4))
    with pytest.raises(TensorDecodeError, match=r"expected tensor '0.weight' with shape \(5, 6\)"):
        bytes_to_state(data, like=make_model(width=5))
    with pytest.raises(TensorDecodeError, match="expected dtype f64, got f32"):
        bytes_to_state(data, like=make_model().double())
    with pytest.raises(TensorDecodeError, match=r"unexpected tensors: '3\.bias', '3\.weight'"):
        bytes_to_state(data, like=nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)))
    with pytest.raises(TensorDecodeError, match="missing tensors: 'extra'"):
        bytes_to_state(data, like={**make_model().state_dict(), "extra": torch.zeros(1)})


def test_nan_weights_are_refused() -> None:
    model = make_model()
    with torch.no_grad():
        model[3].bias[1] = float("inf")
    with pytest.raises(TensorDecodeError, match=r"tensor '3\.bias' contains NaN or Inf"):
        bytes_to_state(state_to_bytes(model))


# --------------------------------------------------------------------------
# safetensors files


METADATA = {f"key{i}": f"value {i}" for i in range(12)} | {"note": 'é\x01"'}


def test_safetensors_files_are_deterministic(tmp_path: Path) -> None:
    state = make_model().state_dict()
    state["emb"] = torch.randn(3, 2).to(torch.bfloat16)
    reordered = dict(reversed(state.items()))
    first = save_safetensors(state, tmp_path / "a.safetensors", metadata=METADATA)
    second = save_safetensors(
        reordered, tmp_path / "b.safetensors", metadata=dict(reversed(METADATA.items()))
    )
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    assert first == second == hashlib.sha256(a).hexdigest()
    (n,) = struct.unpack_from("<Q", a)
    assert n % 8 == 0
    # Without metadata the bytes are exactly safetensors' own.
    save_safetensors(state, tmp_path / "c.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == safetensors.torch.save(state)


def test_safetensors_file_is_loadable_by_safetensors(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path, metadata=METADATA)
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata() == METADATA


def test_load_safetensors_round_trip_and_checks(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.safetensors"
    save_safetensors(model, str(path))
    state = load_safetensors(path, like=model)
    assert_same_state(state, model.state_dict())  # in like's order
    make_model(seed=2).load_state_dict(state)
    assert set(load_safetensors(path)) == set(state)
    with pytest.raises(WeightsFileError, match=r"m\.safetensors: expected tensor '0.weight'"):
        load_safetensors(path, like=make_model(width=5))
    with pytest.raises(WeightsFileError, match="max_blob_size"):
        load_safetensors(path, limits=Limits(max_blob_size=100))
    with pytest.raises(WeightsFileError, match="max_tensors"):
        load_safetensors(path, limits=Limits(max_tensors=3))


def test_loaded_tensors_do_not_follow_later_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_safetensors({"x": torch.ones(1000)}, path)
    state = load_safetensors(path)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.seek(size - 4000)
        f.write(bytes(4000))
    assert torch.equal(state["x"], torch.ones(1000))


def test_load_safetensors_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    good = safetensors.torch.save({"w": torch.ones(3)})
    for cut in (0, 7, 8, 20, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(WeightsFileError, match=r"bad\.safetensors"):
            load_safetensors(path)
    path.write_bytes(safetensors.torch.save({"w": torch.tensor([1.0, float("nan")])}))
    with pytest.raises(WeightsFileError, match="tensor 'w' contains NaN or Inf"):
        load_safetensors(path)
    path.write_bytes(safetensors.torch.save({"c": torch.zeros(2, dtype=torch.complex64)}))
    with pytest.raises(WeightsFileError, match="unknown dtype 'C64'"):
        load_safetensors(path)
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "missing.safetensors")


def test_load_safetensors_bytes_checks_as_the_file_loader_does(tmp_path: Path) -> None:
    model = make_model()
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path)
    data = path.read_bytes()
    state = load_safetensors_bytes(data, like=model, source="the model")
    assert_same_state(state, load_safetensors(path, like=model))
    with pytest.raises(WeightsFileError, match=r"the model: expected tensor '0\.weight'"):
        load_safetensors_bytes(data, like=make_model(width=5), source="the model")
    with pytest.raises(WeightsFileError, match="max_blob_size"):
        load_safetensors_bytes(data, like=model, limits=Limits(max_blob_size=100))
    with pytest.raises(WeightsFileError, match="max_tensors"):
        load_safetensors_bytes(data, like=model, limits=Limits(max_tensors=3))
    for cut in (0, 7, 8, 20, len(data) - 1):
        with pytest.raises(WeightsFileError, match="not a valid safetensors file"):
            load_safetensors_bytes(data[:cut], like=model)
    w = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(WeightsFileError, match="tensor 'w' contains NaN or Inf"):
        load_safetensors_bytes(safetensors.torch.save(w), like={"w": torch.ones(2)})
    c = {"w": torch.zeros(2, dtype=torch.complex64)}
    with pytest.raises(WeightsFileError, match=r"dtype torch\.complex64 is not allowed"):
        load_safetensors_bytes(safetensors.torch.save(c), like={"w": torch.ones(2)})


def _file(header: object, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (struct.pack("<Q", 1 << 40) + b"{}", "not a valid safetensors file: a header of"),
        (_file([1, 2]), "not a JSON object"),
        (struct.pack("<Q", 40_000) + b"[" * 40_000, "nested too deeply"),
        (_file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
         "does not match its shape"),
        (_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
         "do not tile the data"),
        (_file({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
         "do not cover the data"),
        (_file({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "malformed shape"),
        (_file({"w" * 5000: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
         "is too long"),
    ],
)  # fmt: skip
def test_a_safetensors_header_is_checked_before_any_tensor_is_made(
    data: bytes, message: str
) -> None:
    with pytest.raises(WeightsFileError, match=message):
        load_safetensors_bytes(data, like={"w": torch.ones(1)})


def test_layout_digest_depends_on_names_dtypes_and_shapes_only() -> None:
    assert layout_digest(make_model(seed=0)) == layout_digest(make_model(seed=1))
    assert layout_digest(make_model(width=4)) != layout_digest(make_model(width=5))
    half = {
        n: t.half() if t.is_floating_point() else t for n, t in make_model().state_dict().items()
    }
    assert layout_digest(half) != layout_digest(make_model())


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    digest = save_safetensors({"x": torch.ones(2)}, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary file left behind
    with pytest.raises(LocalProtocolError):
        save_safetensors({"x": torch.zeros(2, dtype=torch.complex64)}, path)
    with pytest.raises(LocalProtocolError):
        save_safetensors({"x": torch.ones(2)}, path, metadata={"k": 1})  # type: ignore[dict-item]
    assert os.listdir(tmp_path) == ["w.safetensors"]
    assert path.read_bytes() == safetensors.torch.save({"x": torch.ones(2)})


def test_tied_weights_can_be_saved(tmp_path: Path) -> None:
    shared = torch.randn(4, 3)
    path = tmp_path / "tied.safetensors"
    save_safetensors({"enc": shared, "dec": shared, "half": shared[:2]}, path)
    state = load_safetensors(path)
    assert torch.equal(state["enc"], shared)
    assert torch.equal(state["dec"], shared)
    assert torch.equal(state["half"], shared[:2])
