"""The layering rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fedup"

FORBIDDEN = {
    "fedup/protocol": {
        "trio",
        "torch",
        "zeroconf",
        # pure: no buffers of the operating system's, no threads (fedup/net owns them)
        "mmap",
        "threading",
        "socket",
        "fedup.net",
        "fedup.learn",
        "fedup.peer",
        "fedup.sim",
        "fedup.cli",
        "fedup.commands",
        "fedup.demo",
        "fedup.files",  # pure: it writes no files
        "safetensors",
        "matplotlib",
    },
    "fedup/learn": {
        "trio",
        "zeroconf",
        "fedup.net",
        "socket",
        "fedup.peer",
        "fedup.sim",
        "fedup.cli",
        "fedup.commands",
        "fedup.demo",
        "matplotlib",
    },
    "fedup/net": {
        "torch",
        "fedup.learn",
        "fedup.peer",
        "fedup.sim",
        "fedup.cli",
        "fedup.commands",
        "fedup.demo",
        "safetensors",
        "matplotlib",
    },
    "fedup/identity.py": {"trio", "torch", "zeroconf"},
    "fedup/state_lock.py": {"trio", "torch", "zeroconf", "fedup.net", "fedup.peer"},
    "fedup/peer": {"fedup.cli", "fedup.commands", "fedup.sim", "fedup.demo", "matplotlib"},
    "fedup/sim": {"fedup.cli", "fedup.commands", "fedup.demo", "matplotlib"},
    # What a person sees: drawn from a peer's events or a run's files, never from torch.
    "fedup/ui": {
        "torch",
        "zeroconf",
        "fedup.learn",
        "fedup.net",
        "fedup.sim",
        "fedup.demo",
        "fedup.cli",
        "fedup.commands",
        "matplotlib",
        "safetensors",
    },
    # The board and a run's folder serve the demo, which must not import trio.
    "fedup/ui/board.py": {"trio", "fedup.peer", "rich", "starlette", "hypercorn"},
    "fedup/ui/folder.py": {"trio", "fedup.peer", "rich", "starlette", "hypercorn"},
    # The demo drives real peer processes: it never opens a federation socket itself.
    "fedup/demo": {"trio", "zeroconf", "fedup.net", "fedup.cli", "fedup.commands", "fedup.sim"},
    "fedup/config.py": {"trio", "torch", "zeroconf", "nacl"},
    # Safe file creation: the standard library and fedup.errors, usable from every layer.
    "fedup/files.py": {
        "trio",
        "torch",
        "zeroconf",
        "nacl",
        "numpy",
        "fedup.config",
        "fedup.protocol",
        "fedup.net",
        "fedup.learn",
        "fedup.peer",
        "fedup.sim",
        "fedup.demo",
        "fedup.cli",
        "fedup.commands",
        "fedup.identity",
    },
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def files_of(rule: str) -> list[Path]:
    target = PACKAGE.parent / rule
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("rule", sorted(FORBIDDEN))
def test_layers_import_only_downwards(rule: str) -> None:
    files = files_of(rule)
    assert files, f"no files for {rule}"
    bad = []
    for path in files:
        for name in imported_modules(path):
            for banned in FORBIDDEN[rule]:
                if name == banned or name.startswith(banned + "."):
                    bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py" or "commands" in path.parts:
            continue
        for name in imported_modules(path):
            assert not name.startswith(("fedup.cli", "fedup.commands")), path
