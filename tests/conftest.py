"""Shared test helpers."""

from __future__ import annotations

import pytest

from fedup.identity import Identity


@pytest.fixture
def identity() -> Identity:
    return Identity(bytes(range(32)))


def make_identities(n: int) -> list[Identity]:
    """``n`` deterministic identities (seed i repeated), for reproducible tests."""
    return [Identity(bytes([i + 1]) * 32) for i in range(n)]
