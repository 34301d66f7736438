"""A typed, checked wrapper over libsodium's ``crypto_secretstream_xchacha20poly1305``.

secretstream encrypts a sequence of messages ("chunks") under one 32-byte key.
The sender (:class:`Encryptor`) starts with a random 24-byte *header* that the
receiver (:class:`Decryptor`) needs before the first chunk.  Each chunk costs
:data:`ABYTES` (17) bytes: an encrypted tag byte and a Poly1305 MAC.  The
state carries a counter, so the receiver detects chunks that were modified,
reordered, duplicated, dropped or made with another key or header.

It does **not** detect truncation by itself: a stream that simply stops looks
like one that has not finished yet.  Callers must end every stream with a
chunk tagged :attr:`Tag.FINAL` and treat an end of input without it as an
attack or a failure (the secure channel and the blob code both do).

Everything here is pure (no I/O).  Errors:

* :class:`SecretStreamError` (a :class:`~fedup.errors.RemoteProtocolError`):
  input from the other side is wrong: a header of the wrong size, a chunk that
  fails authentication, is too short, or comes after the final chunk.  After
  one failure a :class:`Decryptor` refuses everything (it is *broken*).
* :class:`~fedup.errors.LocalProtocolError`: our own misuse, e.g. a key of
  the wrong size, or pushing after the final chunk.
"""

from __future__ import annotations

import enum

import nacl.bindings as sodium
import nacl.exceptions

from fedup.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "ABYTES",
    "HEADER_SIZE",
    "KEY_SIZE",
    "Decryptor",
    "Encryptor",
    "SecretStreamError",
    "Tag",
]

KEY_SIZE: int = sodium.crypto_secretstream_xchacha20poly1305_KEYBYTES  # 32
HEADER_SIZE: int = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
ABYTES: int = sodium.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
_MESSAGE_MAX: int = sodium.crypto_secretstream_xchacha20poly1305_MESSAGEBYTES_MAX

Bytes = bytes | bytearray | memoryview


class Tag(enum.IntEnum):
    """The tag libsodium authenticates with every chunk."""

    MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE  # 0
    PUSH = sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH  # 1
    REKEY = sodium.crypto_secretstream_xchacha20poly1305_TAG_REKEY  # 2
    FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL  # 3


KEEP_BUFFER = 64 * 1024
"""PyNaCl keeps, in each stream state, an output buffer as large as the largest chunk
the state handled; one larger than this is let go after its chunk, so an idle
connection holds a few KiB, not the size of the last blob chunk (up to
``Limits.blob_chunk_size``).  A simulation holds two links per simulated peer: with
blobs that grow by their hop statements, the kept buffers grew a 200-peer run's memory
by 28 MiB a lap.  Letting one go costs an allocation per large chunk."""


class SecretStreamError(RemoteProtocolError):
    """A secretstream header or chunk from the other side is not acceptable."""


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_SIZE:
        raise LocalProtocolError(f"a secretstream key is {KEY_SIZE} bytes")
    return key


def _as_bytes(data: Bytes) -> bytes:
    # nacl.bindings accepts only ``bytes``; avoid a copy when we already have one.
    return data if isinstance(data, bytes) else bytes(data)


class Encryptor:
    """The sending half: turns plaintext chunks into ciphertext chunks.

    ``header`` must reach the receiver before the first chunk.  Raises
    :class:`~fedup.errors.LocalProtocolError` for a key that is not 32 bytes.
    """

    def __init__(self, key: bytes) -> None:
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        self.header: bytes = sodium.crypto_secretstream_xchacha20poly1305_init_push(
            self._state, _check_key(key)
        )
        """The 24 random header bytes that the receiver's :class:`Decryptor` needs."""
        self.finished = False
        """True once a chunk tagged :attr:`Tag.FINAL` was pushed."""

    def push(self, message: Bytes, *, tag: Tag = Tag.MESSAGE, ad: bytes | None = None) -> bytes:
        """Encrypt one chunk; returns ``len(message) + ABYTES`` bytes.

        ``ad`` is optional associated data that the receiver must pass to
        :meth:`Decryptor.pull` unchanged.  Raises
        :class:`~fedup.errors.LocalProtocolError` after the final chunk or for
        a message beyond libsodium's limit (256 GiB).
        """
        if self.finished:
            raise LocalProtocolError("cannot push to a secretstream after its final chunk")
        if len(message) > _MESSAGE_MAX:
            raise LocalProtocolError("secretstream chunk too long")
        ciphertext = sodium.crypto_secretstream_xchacha20poly1305_push(
            self._state, _as_bytes(message), ad, int(tag)
        )
        if len(ciphertext) > KEEP_BUFFER:
            self._state.rawbuf = None
        if tag == Tag.FINAL:
            self.finished = True
        return ciphertext


class Decryptor:
    """The receiving half: checks and decrypts ciphertext chunks, in order.

    Raises :class:`SecretStreamError` if ``header`` (from the other side) is not
    24 bytes, and :class:`~fedup.errors.LocalProtocolError` for a bad key.
    """

    def __init__(self, key: bytes, header: Bytes) -> None:
        _check_key(key)
        if len(header) != HEADER_SIZE:
            raise SecretStreamError(
                f"secretstream header must be {HEADER_SIZE} bytes, got {len(header)}"
            )
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, _as_bytes(header), key)
        self.finished = False
        """True once a chunk tagged :attr:`Tag.FINAL` was pulled."""
        self._error: str | None = None

    @property
    def broken(self) -> bool:
        """True once a chunk failed; every later :meth:`pull` fails too."""
        return self._error is not None

    def pull(self, ciphertext: Bytes, *, ad: bytes | None = None) -> tuple[bytes, Tag]:
        """Check and decrypt the next chunk; returns ``(plaintext, tag)``.

        Raises :class:`SecretStreamError` ("chunk failed authentication") when
        the chunk was modified, reordered, replayed, dropped before, or made
        with another key, header or ``ad``; when it is shorter than
        :data:`ABYTES`; when it follows the final chunk; and for every call
        after a failure.
        """
        if self._error is not None:
            raise SecretStreamError(self._error)
        if self.finished:
            self._error = "chunk after the final chunk"
            raise SecretStreamError(self._error)
        if len(ciphertext) < ABYTES:
            self._error = f"chunk of {len(ciphertext)} bytes is shorter than {ABYTES}"
            raise SecretStreamError(self._error)
        if len(ciphertext) > _MESSAGE_MAX + ABYTES:
            self._error = "chunk too long"
            raise SecretStreamError(self._error)
        try:
            plaintext, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                self._state, _as_bytes(ciphertext), ad
            )
            if len(plaintext) > KEEP_BUFFER:
                self._state.rawbuf = None
        except nacl.exceptions.CryptoError:
            self._error = "chunk failed authentication (tampered, reordered, replayed or dropped)"
            raise SecretStreamError(self._error) from None
        try:
            parsed = Tag(tag)
        except ValueError:  # a peer holding the key may push any tag byte
            self._error = f"chunk has unknown tag {tag}"
            raise SecretStreamError(self._error) from None
        if parsed == Tag.FINAL:
            self.finished = True
        return plaintext, parsed
