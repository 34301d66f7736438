"""Runs on a chosen device: ``--device cpu`` is the default's run bit for bit on a machine
without CUDA; on a CUDA device the model trains there and what travels and what is saved
is the CPU run's format (the tests that need CUDA skip where there is none)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from fedup.cli import _common as cli_common
from fedup.commands import simulate as simulate_command
from fedup.learn.baselines import federation_of, make_tasks
from fedup.learn.loans import generate_lender, lender_seed
from fedup.learn.ring import RingSettings, initial_state, train_hop
from fedup.peer import TabularSource
from fedup.peer.source import model_digest
from fedup.protocol.view import RunSettings
from fedup.sim import SimSettings, simulate
from fedup.sim.data import sources_of

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
SMALL = ["--peers", "2", "--rows", "200", "--max-laps", "2", "--patience", "2", "--json"]


def run_simulate(out: Path, *more: str) -> dict[str, Any]:
    """``fedup-peer simulate`` (a small run) into ``out``; its report."""
    parser = argparse.ArgumentParser(prog="fedup-peer")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_command.add_parser(sub, common=cli_common)
    args = parser.parse_args(["simulate", *SMALL, "--out", str(out), *more])
    assert args.func(args) == 0
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def saved_models(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(out.glob("peers/*/model.safetensors"))}


@pytest.mark.skipif(CUDA, reason="the default (auto) is a CUDA device on this machine")
def test_an_explicit_cpu_device_gives_the_default_run_bit_for_bit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = run_simulate(tmp_path / "default")
    cpu = run_simulate(tmp_path / "cpu", "--device", "cpu")
    for key in ("model_sha256", "weights_sha256"):
        assert default["simulation"][key] and cpu["simulation"][key] == default["simulation"][key]
    assert cpu["federated"]["union"] == default["federated"]["union"]
    models = saved_models(tmp_path / "default")
    assert len(models) == 2 and saved_models(tmp_path / "cpu") == models


def test_a_library_source_trains_on_the_cpu_unless_told() -> None:
    table = generate_lender(lender_seed(0, 0), 200).table
    assert TabularSource(table, target="default").device == torch.device("cpu")
    assert sources_of([table])[0].device == torch.device("cpu")
    assert TabularSource(table, target="default", device="auto").device.type == (
        "cuda" if CUDA else "cpu"
    )


# --- on a CUDA device ---------------------------------------------------------------------


@needs_cuda
def test_a_run_on_cuda_saves_the_cpu_runs_format_with_a_close_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    on_cpu = run_simulate(tmp_path / "cpu", "--device", "cpu")
    on_cuda = run_simulate(tmp_path / "cuda", "--device", "cuda")
    cpu_files, cuda_files = saved_models(tmp_path / "cpu"), saved_models(tmp_path / "cuda")
    assert len(cuda_files) == 2
    for cpu_path, cuda_path in zip(
        sorted((tmp_path / "cpu").glob("peers/*/model.safetensors")),
        sorted((tmp_path / "cuda").glob("peers/*/model.safetensors")),
        strict=True,
    ):
        with (
            safetensors.safe_open(cpu_path, "pt") as a,
            safetensors.safe_open(cuda_path, "pt") as b,
        ):
            assert list(a.keys()) == list(b.keys())  # same names, same order
            assert (a.metadata() or {}).keys() == (b.metadata() or {}).keys()
            for name in a.keys():
                x, y = a.get_tensor(name), b.get_tensor(name)
                assert y.device.type == "cpu" and y.dtype == x.dtype == torch.float32
                assert y.shape == x.shape
    assert set(cpu_files) == set(cuda_files)  # the same members, by peer ID
    assert on_cuda["federated"]["union"]["val_loss"] == pytest.approx(
        on_cpu["federated"]["union"]["val_loss"], rel=1e-2
    )


@needs_cuda
def test_a_hop_on_cuda_hands_on_cpu_tensors_of_the_templates_layout() -> None:
    tables = [generate_lender(lender_seed(0, i), 300).table for i in range(2)]
    on_cpu = make_tasks(tables)
    on_cuda = make_tasks(tables, device="cuda")
    assert on_cuda[0].device.type == "cuda" and on_cuda[0].x_train.is_cuda
    assert model_digest(on_cuda[0], 0) == model_digest(on_cpu[0], 0)  # not part of the view
    settings = RingSettings(max_laps=2, patience=2)
    template = initial_state(on_cuda[0], settings)
    assert all(t.is_cpu for t in template.tensors.values())
    assert {k: (t.dtype, t.shape) for k, t in template.tensors.items()} == {
        k: (t.dtype, t.shape) for k, t in initial_state(on_cpu[0], settings).tensors.items()
    }
    state = template
    for lap in range(2):
        for hop, task in enumerate(on_cuda):
            state, metrics = train_hop(task, state, settings, lap, hop, federation_of(on_cuda))
            assert metrics.steps > 0
            for name, t in state.tensors.items():
                ref = template.tensors[name]
                assert t.is_cpu and t.dtype == ref.dtype and t.shape == ref.shape, name


@needs_cuda
def test_members_with_and_without_a_gpu_federate_together(tmp_path: Path) -> None:
    tables = [generate_lender(lender_seed(0, i), 300).table for i in range(3)]
    sources = [
        TabularSource(t, target="default", device=d)
        for t, d in zip(tables, ["cuda", "cpu", "cuda"], strict=True)
    ]
    assert {s.summary() == TabularSource(t, target="default").summary()
            for s, t in zip(sources, tables, strict=True)} == {True}  # fmt: skip
    result = simulate(sources, tmp_path, SimSettings(run=RunSettings(max_laps=2, patience=2)))
    assert [p.error for p in result.peers] == [None] * 3
    assert result.model_sha256 is not None  # every member saved the same file
