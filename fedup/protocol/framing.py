"""Length-prefixed frames: the unit every FedUp connection carries.

Wire format: a 4-byte big-endian unsigned length ``N``, then ``N`` payload
bytes.  ``N == 0`` is a valid, empty frame.  Frames carry no type or flags;
what a payload means is decided one layer up.

The receiving side is :class:`FrameDecoder`, a pure state machine in the
style of h11: the I/O layer feeds it whatever bytes arrived and drains the
complete frames.  A header announcing more than ``max_size`` bytes is
rejected as soon as its 4 bytes are in, before any of its body is buffered,
and the decoder then refuses all further input.  :attr:`FrameDecoder.in_frame`
tells the I/O layer when a frame has started but not finished, so that it can
apply ``Limits.frame_timeout`` from a frame's first byte to its last.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

from fedup.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["HEADER_SIZE", "MAX_FRAME_LENGTH", "FrameDecoder", "FrameError", "encode_frame"]

HEADER_SIZE = 4
"""Bytes of the length prefix in front of every frame."""

MAX_FRAME_LENGTH = 2**32 - 1
"""Largest payload the 4-byte length prefix can describe."""


class FrameError(RemoteProtocolError):
    """The byte stream from a peer does not split into acceptable frames."""


def _check_max_size(max_size: int) -> None:
    if not 0 <= max_size <= MAX_FRAME_LENGTH:
        raise LocalProtocolError(f"max_size {max_size} is outside 0..{MAX_FRAME_LENGTH}")


def encode_frame(payload: bytes | bytearray | memoryview, *, max_size: int) -> bytes:
    """Return ``payload`` with its 4-byte big-endian length in front.

    Raises :class:`~fedup.errors.LocalProtocolError` if the payload is longer
    than ``max_size`` bytes (the caller should have split or refused it), or
    if ``max_size`` is outside ``0..MAX_FRAME_LENGTH``.
    """
    _check_max_size(max_size)
    size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
    if size > max_size:
        raise LocalProtocolError(
            f"frame payload of {size} bytes exceeds the limit of {max_size} bytes"
        )
    return b"".join((size.to_bytes(HEADER_SIZE, "big"), payload))


class FrameDecoder:
    """Split a byte stream into frame payloads, refusing oversized frames.

    Typical use by the I/O layer::

        decoder = FrameDecoder(max_size=limits.max_frame_size)
        while data := await receive_some():      # deadline if decoder.in_frame
            decoder.feed(data)
            for payload in decoder.frames():
                handle(payload)
        decoder.eof()

    Memory: provided complete frames are drained after each :meth:`feed`, at
    most ``max_size + 4`` bytes plus one fed chunk are ever buffered.  Frames
    are copied out once; the buffer is compacted in linear total time.

    Once a :class:`FrameError` has been raised, the decoder is *poisoned*: it
    drops everything buffered, and every later call to :meth:`feed`,
    :meth:`next_frame`, :meth:`frames` or :meth:`eof` raises a
    :class:`FrameError` with the same reason.
    """

    def __init__(self, *, max_size: int) -> None:
        """Create a decoder accepting payloads of at most ``max_size`` bytes.

        Raises :class:`~fedup.errors.LocalProtocolError` if ``max_size`` is
        outside ``0..MAX_FRAME_LENGTH``.
        """
        _check_max_size(max_size)
        self._max_size = max_size
        self._buf = bytearray()
        self._start = 0  # offset in _buf of the first byte not yet returned
        self._length: int | None = None  # payload length of the frame at _start, once known
        self._error: str | None = None  # reason, once poisoned

    @property
    def max_size(self) -> int:
        """The largest payload accepted, in bytes."""
        return self._max_size

    def raise_max_size(self, max_size: int) -> None:
        """Accept payloads of up to ``max_size`` bytes from now on (never lowers the cap).

        A connection reads the handshake under a small cap and raises it once the
        peer has authenticated.
        """
        _check_max_size(max_size)
        self._max_size = max(self._max_size, max_size)

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as (part of) a frame."""
        return len(self._buf) - self._start

    @property
    def in_frame(self) -> bool:
        """True when buffered bytes end inside an incomplete frame (or its header).

        False when nothing is buffered, when only complete frames are
        buffered, and when the decoder is poisoned.  Never raises.
        """
        if self._error is not None:
            return False
        return self._incomplete_tail()[0] > 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the stream (any split, possibly empty).

        Raises :class:`FrameError` if the decoder is poisoned, or if this data
        completes the header of the next frame to be returned and that header
        announces more than ``max_size`` bytes; in both cases nothing is kept.
        """
        self._raise_if_poisoned()
        if self._start:
            if self._start == len(self._buf):
                self._buf.clear()
            else:
                del self._buf[: self._start]
            self._start = 0
        self._buf += data
        if self._length is None:
            self._read_header()

    def next_frame(self) -> bytes | None:
        """Return the next complete frame's payload, or None if more bytes are needed.

        Raises :class:`FrameError` ("frame length N exceeds the limit of M
        bytes") when the next frame's header announces more than ``max_size``
        bytes, and when the decoder is already poisoned.
        """
        self._raise_if_poisoned()
        length = self._length
        if length is None:
            length = self._read_header()
            if length is None:
                return None
        body = self._start + HEADER_SIZE
        stop = body + length
        if stop > len(self._buf):
            return None
        with memoryview(self._buf) as view:
            payload = bytes(view[body:stop])
        self._length = None
        if stop == len(self._buf):
            self._buf.clear()
            self._start = 0
        else:
            self._start = stop
        return payload

    def frames(self) -> Iterator[bytes]:
        """Yield every complete frame's payload buffered so far, in order.

        Raises :class:`FrameError` as :meth:`next_frame` does, after yielding
        the frames that precede the offending header.
        """
        while (payload := self.next_frame()) is not None:
            yield payload

    def eof(self) -> None:
        """Tell the decoder that the stream has ended.

        Complete frames still buffered stay available through
        :meth:`next_frame`.  Raises :class:`FrameError` if the stream ended
        part way through a frame ("stream ended inside a frame header: got X
        of 4 bytes" or "stream ended inside a frame: got X of Y bytes"), if an
        oversized header is buffered, or if the decoder is poisoned.  The
        first two cases poison the decoder too.
        """
        self._raise_if_poisoned()
        left, length = self._incomplete_tail()
        if left == 0:
            return
        if length is None:
            self._poison(f"stream ended inside a frame header: got {left} of {HEADER_SIZE} bytes")
        elif length > self._max_size:
            self._poison(self._too_long(length))
        else:
            self._poison(f"stream ended inside a frame: got {left - HEADER_SIZE} of {length} bytes")

    # -- internals -----------------------------------------------------------

    def _read_header(self) -> int | None:
        """Parse the header at ``_start`` if all of it is buffered; poison if too long."""
        if len(self._buf) - self._start < HEADER_SIZE:
            return None
        length = int.from_bytes(self._buf[self._start : self._start + HEADER_SIZE], "big")
        if length > self._max_size:
            self._poison(self._too_long(length))
        self._length = length
        return length

    def _incomplete_tail(self) -> tuple[int, int | None]:
        """Return (bytes after the last complete buffered frame, its declared length).

        The declared length is None when its header is not complete.
        """
        buf = self._buf
        pos = self._start
        end = len(buf)
        while pos < end:
            if end - pos < HEADER_SIZE:
                return end - pos, None
            length = int.from_bytes(buf[pos : pos + HEADER_SIZE], "big")
            if end - pos - HEADER_SIZE < length:
                return end - pos, length
            pos += HEADER_SIZE + length
        return 0, None

    def _too_long(self, length: int) -> str:
        return f"frame length {length} exceeds the limit of {self._max_size} bytes"

    def _poison(self, reason: str) -> NoReturn:
        self._error = reason
        self._buf = bytearray()
        self._start = 0
        self._length = None
        raise FrameError(reason)

    def _raise_if_poisoned(self) -> None:
        if self._error is not None:
            raise FrameError(self._error)
