"""The claim's verdict and the demo's output-folder rule, on hand-made inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedup.demo.runner import MARKER, DemoSettings, _fresh_out
from fedup.errors import ConfigError
from fedup.learn.comparison import judge_claim


def entry(union_loss: float, epochs: float, own: list[float], own_epochs: list[float]) -> Any:
    return {
        "union": {"val_loss": union_loss},
        "mean": {"epochs": epochs},
        "per_peer": [{"val_loss": v, "epochs": e} for v, e in zip(own, own_epochs, strict=True)],
    }


def report(fed: Any, cen: Any, loc: Any) -> dict[str, Any]:
    return {"federated": fed, "centralized": cen, "local_only": loc}


def test_the_claim_holds_only_when_both_parts_hold() -> None:
    fed = entry(0.30, 4.0, [0.29, 0.31], [4.0, 4.0])
    loc = entry(0.35, 6.0, [0.30, 0.32], [5.0, 7.0])
    both = judge_claim(report(fed, entry(0.31, 5.0, [0.3, 0.3], [5, 5]), loc))
    assert both["vs_centralized"]["holds"] and both["vs_local_only"]["holds"]
    assert both["vs_centralized"]["loss_gap_percent"] == pytest.approx(-3.2258, abs=1e-3)

    slower = judge_claim(report(fed, entry(0.31, 3.5, [0.3, 0.3], [3.5, 3.5]), loc))
    assert slower["vs_centralized"]["lower_loss"] and not slower["vs_centralized"]["fewer_epochs"]
    assert not slower["vs_centralized"]["holds"]

    worse = judge_claim(report(fed, entry(0.29, 5.0, [0.3, 0.3], [5, 5]), loc))
    assert not worse["vs_centralized"]["lower_loss"] and not worse["vs_centralized"]["holds"]

    equal = judge_claim(report(fed, entry(0.30, 5.0, [0.3, 0.3], [5, 5]), loc))
    assert not equal["vs_centralized"]["lower_loss"], "a tie is not lower"


def test_against_local_only_every_lender_must_do_better_on_its_own_rows() -> None:
    cen = entry(0.3, 5.0, [0.3, 0.3], [5, 5])
    fed = entry(0.30, 4.0, [0.29, 0.33], [4.0, 4.0])
    loc = entry(0.35, 6.0, [0.30, 0.32], [5.0, 7.0])
    verdict = judge_claim(report(fed, cen, loc))["vs_local_only"]
    assert verdict["peers_where_federated_loss_lower"] == 1 and verdict["peers"] == 2
    assert not verdict["lower_loss"] and not verdict["holds"]
    assert verdict["fewer_epochs"]
    quick_local = entry(0.35, 3.0, [0.30, 0.34], [3.0, 9.0])
    fed_ok = entry(0.30, 4.0, [0.29, 0.31], [4.0, 4.0])
    verdict = judge_claim(report(fed_ok, cen, quick_local))["vs_local_only"]
    assert verdict["lower_loss"] and not verdict["fewer_epochs"] and not verdict["holds"]
    assert (verdict["local_only_epochs_min"], verdict["local_only_epochs_max"]) == (3.0, 9.0)


@pytest.mark.parametrize("peers", [1, 17])
def test_demo_peer_count_is_bounded(peers: int) -> None:
    with pytest.raises(ConfigError, match="2 to 16"):
        DemoSettings(peers=peers)


def test_the_demo_never_empties_a_folder_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "precious"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="not made by fedup-peer demo"):
        _fresh_out(mine)
    assert (mine / "thesis.tex").read_text() == "years of work"

    demo = tmp_path / "demo"
    _fresh_out(demo)
    (demo / "report.json").write_text("{}")
    (demo / "peers" / "peer0").mkdir(parents=True)
    _fresh_out(demo)
    assert sorted(p.name for p in demo.iterdir()) == [MARKER]

    # A demo folder the user added to is left alone too.
    (demo / "report.json").write_text("{}")
    (demo / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"also holds notes\.txt"):
        _fresh_out(demo)
    assert (demo / "notes.txt").exists() and (demo / "report.json").exists()

    link = tmp_path / "link"
    link.symlink_to(mine)
    with pytest.raises(ConfigError, match="symbolic link"):
        _fresh_out(link)

    empty = tmp_path / "empty"
    empty.mkdir()
    _fresh_out(empty)
    assert (empty / MARKER).exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seed": -1}, "--seed"), ({"rows": 3}, "--rows"), ({"rows": 10**7}, "--rows")],
)
def test_demo_settings_are_checked(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DemoSettings(**kwargs)  # type: ignore[arg-type]


def test_a_bad_demo_option_ends_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from fedup.cli import main

    assert main(["demo", "--peer-args", "'unclosed"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedup-peer: error: --peer-args: No closing quotation")


def test_the_cli_does_not_load_matplotlib_until_a_demo_draws() -> None:
    code = "import sys, fedup.cli; fedup.cli.build_parser(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
