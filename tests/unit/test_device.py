"""``--device``: its forms, what each means on this machine, and its errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedup.cli import build_parser
from fedup.commands.start import resolve
from fedup.commands.values import device_spec
from fedup.errors import ConfigError
from fedup.learn.device import DeviceError, choose_device, parse_device

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")


@pytest.mark.parametrize(
    ("text", "spec"),
    [("auto", "auto"), ("cpu", "cpu"), (" CPU ", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
     ("CUDA:3", "cuda:3"), ("cuda:07", "cuda:7"), ("cuda:1023", "cuda:1023")],
)  # fmt: skip
def test_the_forms_of_a_device_are_read_in_one_spelling(text: str, spec: str) -> None:
    assert parse_device(text) == spec
    assert device_spec(text) == spec


@pytest.mark.parametrize(
    "text", ["gpu", "cuda:abc", "cuda:", "cuda:-1", "cuda:1024", "cuda0", "mps", "", "cpu:0", 3]
)
def test_anything_else_is_refused_naming_the_forms(text: object) -> None:
    with pytest.raises(ValueError, match=r"^must be auto, cpu, cuda or cuda:N \(got .*\)$"):
        parse_device(text)
    with pytest.raises(argparse.ArgumentTypeError, match="must be auto, cpu, cuda or cuda:N"):
        device_spec(text)


def test_cpu_is_the_cpu_and_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == torch.device("cpu")


@needs_no_cuda
def test_auto_is_the_cpu_on_this_machine() -> None:
    assert choose_device("auto") == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:2"])
def test_cuda_without_cuda_is_one_line_naming_what_there_is(spec: str) -> None:
    with pytest.raises(DeviceError) as caught:
        choose_device(spec)
    text = str(caught.value)
    assert "\n" not in text and isinstance(caught.value, ConfigError)  # exit 1, one line
    assert text.startswith(f"device {spec}: this machine has no CUDA device")
    assert text.endswith("pass --device cpu or auto")


def test_with_cuda_auto_is_the_first_device_and_an_absent_index_names_those_there_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("auto") == torch.device("cuda", 0)
    assert choose_device("cuda") == torch.device("cuda", 0)
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"^device cuda:2: this machine has 2 CUDA devices "
                       r"\(cuda:0 to cuda:1\); pass one of them, cpu or auto$"):  # fmt: skip
        choose_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"has 1 CUDA device \(cuda:0\);"):
        choose_device("cuda:1")


def test_the_device_comes_from_the_command_line_the_environment_or_the_file(
    tmp_path: Path,
) -> None:
    parse = build_parser().parse_args
    assert resolve(parse(["start"]), environ={})["device"] == "auto"
    assert resolve(parse(["start", "--device", "CPU"]), environ={})["device"] == "cpu"
    assert resolve(parse(["start"]), environ={"FEDUP_DEVICE": "cuda:1"})["device"] == "cuda:1"
    cfg = tmp_path / "fedup.toml"
    cfg.write_text('device = "cuda"\n')
    assert resolve(parse(["start", "--config", str(cfg)]), environ={})["device"] == "cuda"
    with pytest.raises(ConfigError, match=r"^FEDUP_DEVICE: must be auto, cpu, cuda or cuda:N"):
        resolve(parse(["start"]), environ={"FEDUP_DEVICE": "gpu"})
    cfg.write_text('device = "cuda:x"\n')
    with pytest.raises(ConfigError, match=r"device in .*fedup.toml: must be auto, cpu, cuda"):
        resolve(parse(["start", "--config", str(cfg)]), environ={})
    for command in ("simulate", "demo"):
        assert parse([command]).device == "auto"
        assert parse([command, "--device", "cuda:2"]).device == "cuda:2"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedup.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("argv", "got"),
    [(["start", "--device", "gpu"], "'gpu'"), (["simulate", "--device", "cuda:abc"], "'cuda:abc'"),
     (["demo", "--device", "gpu"], "'gpu'")],
)  # fmt: skip
def test_a_device_of_no_known_form_exits_2_with_one_line(argv: list[str], got: str) -> None:
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"fedup-peer {argv[0]}: error: argument --device: must be auto, cpu, cuda or cuda:N "
        f"(got {got})"
    )


@needs_no_cuda
@pytest.mark.parametrize("command", ["start", "simulate", "demo"])
def test_cuda_without_cuda_exits_1_with_one_line_before_anything_runs(
    command: str, tmp_path: Path
) -> None:
    # start: a rendezvous peer, which would wait for others had the check not stopped it
    more = {
        "start": ["--state-dir", str(tmp_path / "state"), "--no-mdns", "--listen", "127.0.0.1:0"],
        "simulate": ["--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "sim")],
        "demo": ["--out", str(tmp_path / "demo")],
    }[command]
    proc = run_cli(command, "--device", "cuda", *more)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("fedup-peer: error: device cuda: this machine has no CUDA")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing made, nothing joined
