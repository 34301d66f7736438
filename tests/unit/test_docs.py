"""Claims in docs/ that must match the code."""

from __future__ import annotations

from pathlib import Path

from fedup.config import Limits

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_protocol_limits_table_matches_config() -> None:
    text = (DOCS / "protocol.md").read_text()
    assert Limits.markdown_table() in text, "regenerate the table with Limits.markdown_table()"
    for name, default, _reason in Limits.describe():
        assert f"| `{name}` | {default!r} |" in text, f"{name}={default!r} missing from protocol.md"


def test_protocol_parts_exist() -> None:
    text = (DOCS / "protocol.md").read_text()
    for part in ("encoding", "handshake", "tensors", "blob", "discovery", "bootstrap"):
        assert f"(protocol-{part}.md)" in text
        assert (DOCS / f"protocol-{part}.md").exists()
