"""The secretstream wrapper: chunks round trip, and an idle stream keeps no large buffer."""

from __future__ import annotations

import pytest

from fedup.protocol.secretstream import (
    ABYTES,
    KEEP_BUFFER,
    Decryptor,
    Encryptor,
    SecretStreamError,
    Tag,
)

KEY = bytes(range(32))


@pytest.mark.parametrize("size", [0, 1, KEEP_BUFFER - ABYTES, KEEP_BUFFER, 3 * KEEP_BUFFER])
def test_chunks_round_trip_and_large_buffers_are_let_go(size: int) -> None:
    """PyNaCl keeps an output buffer as large as the largest chunk in each stream state;
    one beyond KEEP_BUFFER is let go (a simulation holds thousands of idle links)."""
    enc = Encryptor(KEY)
    dec = Decryptor(KEY, enc.header)
    large = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    for message in (b"s" * 100, large, b"t" * 100, large):
        plain, tag = dec.pull(enc.push(message))
        assert (plain, tag) == (message, Tag.MESSAGE)
        assert (enc._state.rawbuf is not None) == (len(message) + ABYTES <= KEEP_BUFFER)
        assert (dec._state.rawbuf is not None) == (len(message) <= KEEP_BUFFER)
    assert dec.pull(enc.push(b"end", tag=Tag.FINAL)) == (b"end", Tag.FINAL)
    with pytest.raises(SecretStreamError):
        dec.pull(b"\0" * 40)
