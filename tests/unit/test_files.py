"""fedup.files: what FedUp creates is 0600/0700 and never written through a planted link;
secrets and the state directory are refused when others can touch them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fedup.errors import ConfigError, FileError, IdentityError
from fedup.files import (
    atomic_writer,
    check_private_dir,
    copy_atomic,
    create_new,
    make_dirs,
    open_append,
    read_bounded,
    read_private_file,
    write_atomic,
)

KEY_HEX = "ab" * 32


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """Another file of the user's, which a planted link points at."""
    path = tmp_path / "victim.txt"
    path.write_bytes(b"precious\n")
    return path


def plant_link(at: Path, victim: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(victim)


# -- files FedUp writes ----------------------------------------------------------------


def test_atomic_write_replaces_a_planted_link_and_creates_0600(
    tmp_path: Path, victim: Path
) -> None:
    target = tmp_path / "out" / "summary.json"
    plant_link(target, victim)
    write_atomic(target, b"{}\n")
    assert victim.read_bytes() == b"precious\n"
    assert not target.is_symlink() and target.read_bytes() == b"{}\n"
    assert mode(target) == 0o600
    assert sorted(os.listdir(target.parent)) == ["summary.json"]  # no temporary file left


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_copy_atomic_replaces_a_planted_link(tmp_path: Path, victim: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(b"model")
    target = tmp_path / "copy.bin"
    plant_link(target, victim)
    copy_atomic(source, target)
    assert victim.read_bytes() == b"precious\n"
    assert target.read_bytes() == b"model" and mode(target) == 0o600


def test_append_refuses_a_planted_link(tmp_path: Path, victim: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    plant_link(target, victim)
    with pytest.raises(FileError, match=r"metrics\.jsonl is a symbolic link.*rm "):
        open_append(target)
    assert victim.read_bytes() == b"precious\n"
    dangling = tmp_path / "dangling.jsonl"
    plant_link(dangling, tmp_path / "nothing-here")
    with pytest.raises(FileError, match="symbolic link"):
        open_append(dangling)
    assert not (tmp_path / "nothing-here").exists()


def test_append_creates_0600_appends_and_narrows_an_open_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    with open_append(target) as f:
        f.write(b"one\n")
    assert mode(target) == 0o600
    target.chmod(0o644)
    with open_append(target) as f:
        f.write(b"two\n")
    assert target.read_bytes() == b"one\ntwo\n"
    assert mode(target) == 0o600


def test_append_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    target = tmp_path / "metrics.jsonl"
    os.mkfifo(target)
    with pytest.raises(FileError, match="not a regular file"):
        open_append(target)


def test_a_run_file_is_read_only_when_regular_and_within_its_bound(
    tmp_path: Path, victim: Path
) -> None:
    """What ``show``, the page, ``verify`` and the demo read back: never a FIFO (which
    would block the reader for ever), never through a link, never past the bound."""
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(FileError, match="not a regular file"):
        read_bounded(fifo, 1024)
    link = tmp_path / "summary.json"
    link.symlink_to(victim)
    with pytest.raises(FileError, match="symbolic link"):
        read_bounded(link, 1024)
    big = tmp_path / "model.safetensors"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(FileError, match="larger than it may be"):
        read_bounded(big, 1024)
    assert read_bounded(big, 4096, offset=2000) == b"x" * 48
    assert read_bounded(tmp_path / "absent", 10) is None


def test_create_new_refuses_what_is_there(tmp_path: Path, victim: Path) -> None:
    made = tmp_path / "network.key"
    with create_new(made) as f:
        f.write(b"k\n")
    assert mode(made) == 0o600
    with pytest.raises(FileError, match="already there"):
        create_new(made)
    link = tmp_path / "peer.log"
    plant_link(link, victim)
    with pytest.raises(FileError, match="symbolic link"):
        create_new(link)
    assert victim.read_bytes() == b"precious\n"


def test_make_dirs_creates_missing_folders_0700_and_keeps_existing_ones(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    deep = existing / "a" / "b" / "c"
    assert make_dirs(deep) == deep
    for folder in (existing / "a", existing / "a" / "b", deep):
        assert mode(folder) == 0o700
    assert mode(existing) == 0o755
    make_dirs(deep)  # again: nothing to do
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "file")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "file" / "below")


# -- the state directory -----------------------------------------------------------------


@pytest.mark.parametrize("loose", [0o777, 0o770, 0o730, 0o703, 0o1777])
def test_a_folder_others_can_write_is_refused_with_the_fix(tmp_path: Path, loose: int) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(loose)
    with pytest.raises(FileError, match=rf"writable by group or others.*chmod 700 {folder}$"):
        check_private_dir(folder)


@pytest.mark.parametrize("fine", [0o700, 0o750, 0o755])
def test_a_folder_only_its_owner_can_write_is_accepted(tmp_path: Path, fine: int) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(fine)
    check_private_dir(folder)


# -- secrets -----------------------------------------------------------------------------


def write_secret(path: Path, data: bytes, file_mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(file_mode)
    return path


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660, 0o606, 0o620])
def test_a_secret_others_can_touch_is_refused_with_the_fix(tmp_path: Path, loose: int) -> None:
    key = write_secret(tmp_path / "k", b"secret", loose)
    with pytest.raises(ConfigError, match=rf"accessible by group or others.*chmod 600 {key}$"):
        read_private_file(key, "network key file", ConfigError, max_bytes=100)


def test_a_private_secret_is_read(tmp_path: Path) -> None:
    key = write_secret(tmp_path / "k", b"secret", 0o600)
    assert read_private_file(key, "key file", IdentityError, max_bytes=100) == b"secret"
    assert read_private_file(key, "key file", IdentityError, max_bytes=3) == b"sec"


def test_a_secret_behind_a_link_or_not_a_file_is_refused(tmp_path: Path) -> None:
    key = write_secret(tmp_path / "k", b"secret", 0o600)
    link = tmp_path / "link"
    link.symlink_to(key)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        read_private_file(link, "network key file", ConfigError, max_bytes=100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_private_file(fifo, "network key file", ConfigError, max_bytes=100)
    with pytest.raises(ConfigError, match="cannot read network key file"):
        read_private_file(tmp_path / "missing", "network key file", ConfigError, max_bytes=100)


# -- another user's files (only root can make them here) ---------------------------------

OTHER_UID = 54321
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a file away"
)


@needs_root
def test_what_another_user_owns_is_refused(tmp_path: Path, victim: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)
    with pytest.raises(FileError, match="belongs to another user"):
        check_private_dir(folder)
    key = write_secret(tmp_path / "k", b"secret", 0o600)
    os.chown(key, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError, match="belongs to another user"):
        read_private_file(key, "network key file", ConfigError, max_bytes=100)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b"")
    os.chown(metrics, OTHER_UID, OTHER_UID)
    with pytest.raises(FileError, match="belongs to another user"):
        open_append(metrics)
    link = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    link.symlink_to(tmp_path / "elsewhere")
    make_dirs(link)  # the user's own link to a folder is followed
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(FileError, match="symbolic link owned by another user"):
        make_dirs(link)


# -- the files FedUp writes, through their writers ------------------------------------------


def test_network_key_file_is_checked_like_the_identity_key(tmp_path: Path) -> None:
    from fedup.commands.peers import read_network_key

    key = write_secret(tmp_path / "network.key", (KEY_HEX + "\n").encode(), 0o644)
    with pytest.raises(ConfigError, match=rf"network key file .*\(mode 0644\).*chmod 600 {key}$"):
        read_network_key(key)
    key.chmod(0o600)
    assert read_network_key(key) == bytes.fromhex(KEY_HEX)
    link = tmp_path / "link.key"
    link.symlink_to(key)
    with pytest.raises(ConfigError, match="symbolic link"):
        read_network_key(link)


def test_run_outputs_refuse_a_link_at_metrics_and_replace_links_elsewhere(
    tmp_path: Path, victim: Path
) -> None:
    import torch

    from fedup.peer.outputs import RunOutputs, RunSummary

    out = tmp_path / "run"
    plant_link(out / "metrics.jsonl", victim)
    with pytest.raises(FileError, match=r"metrics\.jsonl is a symbolic link"):
        RunOutputs(out)
    assert victim.read_bytes() == b"precious\n"

    (out / "metrics.jsonl").unlink()
    for name in ("model.safetensors", "summary.json", "federation.json"):
        plant_link(out / name, victim)
    outputs = RunOutputs(out)
    outputs.log({"type": "hop", "lap": 0})
    outputs.save_federation(b'{"run_id": "r"}\n')
    sha = outputs.save_model({"w": torch.ones(2)}, {"format": "pt"})
    outputs.save_summary(
        RunSummary(
            run_id="r", peer_id="p", leader="p", members=["p"], laps=1, converged=True,
            stop_reason="converged", federated_val_loss=[0.5], federated_laps=[0],
            best_lap=0, final_val_loss=0.5, final_val_accuracy=0.8, data_passes=1.0,
            model_sha256=sha, dead=[], model_bytes_sent=0, out_dir=str(out),
        )
    )  # fmt: skip
    outputs.close()
    assert victim.read_bytes() == b"precious\n"
    for name in ("metrics.jsonl", "model.safetensors", "federation.json", "summary.json"):
        assert not (out / name).is_symlink() and mode(out / name) == 0o600, name
    assert json.loads((out / "summary.json").read_text())["model_sha256"] == sha


def test_a_model_file_from_its_parts_is_the_file_save_model_writes(
    tmp_path: Path, victim: Path
) -> None:
    import attrs
    import torch

    from fedup.learn.weights import safetensors_parts
    from fedup.peer.outputs import RunOutputs, RunSummary

    weights, metadata = {"w": torch.arange(6.0), "b": torch.ones(2)}, {"format": "pt", "z": "1"}
    first, second = RunOutputs(tmp_path / "a"), RunOutputs(tmp_path / "b")
    plant_link(second.model_path, victim)
    sha = first.save_model(weights, metadata)
    assert second.save_model_file(safetensors_parts(weights, metadata=metadata)) == sha
    assert victim.read_bytes() == b"precious\n"
    assert not second.model_path.is_symlink() and mode(second.model_path) == 0o600
    assert second.model_path.read_bytes() == first.model_path.read_bytes()
    summary = RunSummary(
        run_id="r", peer_id="p", leader="p", members=["p", "q"], laps=1, converged=True,
        stop_reason="converged", federated_val_loss=[0.5], federated_laps=[0],
        best_lap=0, final_val_loss=0.5, final_val_accuracy=0.8, data_passes=1.0,
        model_sha256=sha, dead=["q"], model_bytes_sent=0, out_dir=str(tmp_path),
    )  # fmt: skip
    fields = summary.to_json()
    assert fields == attrs.asdict(summary) and list(fields) == list(attrs.asdict(summary))
    assert fields["members"] is not summary.members  # a copy, as attrs.asdict makes


def test_run_outputs_folder_and_parents_are_0700(tmp_path: Path) -> None:
    from fedup.peer.outputs import RunOutputs

    RunOutputs(tmp_path / "runs" / "abc").close()
    assert mode(tmp_path / "runs") == mode(tmp_path / "runs" / "abc") == 0o700
    assert mode(tmp_path / "runs" / "abc" / "metrics.jsonl") == 0o600


def test_synthetic_loans_csv_replaces_a_planted_link(tmp_path: Path, victim: Path) -> None:
    from fedup.peer.source import TabularSource

    data = tmp_path / "state" / "data"
    plant_link(data / "synthetic-loans.csv", victim)
    TabularSource.synthetic("12D3KooWpeer", data)
    assert victim.read_bytes() == b"precious\n"
    csv = data / "synthetic-loans.csv"
    assert not csv.is_symlink() and mode(csv) == 0o600
    assert csv.read_text().count("\n") > 100  # the loan book


def test_demo_files_are_private_and_never_written_through_a_link(
    tmp_path: Path, victim: Path
) -> None:
    from fedup.demo.peers import prepare_peers, run_peers, write_network_key

    loans = tmp_path / "peers" / "peer0" / "data" / "loans.csv"
    plant_link(loans, victim)
    (peer0, peer1) = prepare_peers(tmp_path, 2, seed=0, rows=200)
    assert victim.read_bytes() == b"precious\n"
    assert not loans.is_symlink() and mode(loans) == 0o600
    assert mode(peer1.directory) == mode(peer1.data.parent) == 0o700  # made by the demo
    check_private_dir(peer1.directory)  # what the peer process will check

    plant_link(tmp_path / "network.key", victim)
    with pytest.raises(FileError, match="symbolic link"):
        write_network_key(tmp_path / "network.key")
    write_network_key(tmp_path / "fresh.key")
    assert mode(tmp_path / "fresh.key") == 0o600

    plant_link(peer0.log, victim)
    with pytest.raises(FileError, match="symbolic link"):
        run_peers([peer0], [["true"]], timeout=5.0)
    assert victim.read_bytes() == b"precious\n"


def test_demo_plot_replaces_a_planted_link(tmp_path: Path, victim: Path) -> None:
    from fedup.demo.plot import plot_loss_curves

    report = {
        "curves": {"federated": [[0, 0.7], [1, 0.6], [2, 0.55]]},
        "federated": {"mean": {"epochs": 2}},
        "peers": [{}, {}],
    }
    png = tmp_path / "loss_curves.png"
    plant_link(png, victim)
    plot_loss_curves(report, png)
    assert victim.read_bytes() == b"precious\n"
    assert png.read_bytes().startswith(b"\x89PNG") and mode(png) == 0o600


def test_figures_that_do_not_exist_are_null_in_the_json_files(tmp_path: Path) -> None:
    """JSON has no NaN or infinity: a strict reader must be able to read every file."""
    import math

    from fedup.peer.outputs import RunOutputs, RunSummary

    def strict(text: str) -> object:
        def refuse(word: str) -> float:
            raise ValueError(f"not JSON: {word}")

        return json.loads(text, parse_constant=refuse)

    outputs = RunOutputs(tmp_path / "run")
    outputs.log({"type": "lap", "lap": 0, "federated_val_loss": math.nan, "n": [math.inf]})
    outputs.save_summary(
        RunSummary(
            run_id="r", peer_id="p", leader="p", members=["p"], laps=1, converged=False,
            stop_reason="max-laps", federated_val_loss=[math.nan, 0.5], federated_laps=[-1, 0],
            best_lap=0, final_val_loss=math.nan, final_val_accuracy=-math.inf,
            data_passes=1.0, model_sha256="00", dead=[], model_bytes_sent=0, out_dir="x",
        )
    )  # fmt: skip
    outputs.close()
    summary = strict((tmp_path / "run" / "summary.json").read_text())
    assert isinstance(summary, dict)
    assert summary["final_val_loss"] is None and summary["final_val_accuracy"] is None
    assert summary["federated_val_loss"] == [None, 0.5] and summary["data_passes"] == 1.0
    (line,) = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert strict(line) == {"type": "lap", "lap": 0, "federated_val_loss": None, "n": [None]}


@pytest.mark.parametrize("durable", [True, False])
def test_a_model_file_is_fsynced_unless_the_member_is_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    from fedup.peer.outputs import RunOutputs

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    outputs = RunOutputs(tmp_path / "out", durable=durable)
    sha = outputs.save_model_file([b"model", memoryview(b" bytes")])
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"model bytes"
    assert len(sha) == 64
    # The file and its folder when durable (a real peer); neither for a simulated one.
    assert len(synced) == (2 if durable else 0)
