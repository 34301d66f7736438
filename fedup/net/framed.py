"""Frames over any trio stream, with the deadlines that make a peer harmless.

:class:`FramedStream` wraps a :class:`trio.abc.Stream` (a TCP stream, a memory
stream, or a :class:`~fedup.net.channel.SecureChannel`) and moves whole frames
(see :mod:`fedup.protocol.framing`).  It enforces three deadlines:

* ``idle_timeout``: waiting for the first byte of the next frame;
* ``frame_timeout``: from the first byte of a frame to its last, so a peer
  that trickles one byte a second is cut off even though every read is quick;
* ``frame_timeout`` again for sending a frame, so a peer that stops reading
  cannot block us forever.

Every failure is a :class:`~fedup.errors.RemoteProtocolError` subclass that
names the peer: :class:`~fedup.protocol.framing.FrameError` (bad framing),
:class:`~fedup.errors.PeerTimeoutError`, :class:`~fedup.errors.ConnectionLostError`.
"""

from __future__ import annotations

import math

import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConnectionLostError, PeerTimeoutError, RemoteProtocolError
from fedup.protocol.framing import FrameDecoder, encode_frame

RECEIVE_SIZE = 256 * 1024


class FramedStream:
    """Send and receive whole frames over ``stream``; ``peer`` names the other side in errors."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        peer: str,
        limits: Limits = DEFAULT_LIMITS,
        max_frame_size: int | None = None,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.limits = limits
        self.max_frame_size = limits.max_frame_size if max_frame_size is None else max_frame_size
        self._decoder = FrameDecoder(max_size=self.max_frame_size)
        self._receive_size = min(RECEIVE_SIZE, self.max_frame_size + 4)
        self._frame_started: float | None = None
        self._eof = False
        self._sending = trio.Lock()

    def raise_max_frame_size(self, max_frame_size: int) -> None:
        """Accept and send frames of up to ``max_frame_size`` bytes from now on.

        A handshake runs under ``Limits.max_handshake_frame_size`` (and reads in
        pieces no larger), so that a connection that has not authenticated costs
        little memory; the channel raises the cap once it has.
        """
        self.max_frame_size = max(self.max_frame_size, max_frame_size)
        self._decoder.raise_max_size(self.max_frame_size)
        self._receive_size = min(RECEIVE_SIZE, self.max_frame_size + 4)

    async def send_frame(self, payload: bytes | bytearray | memoryview) -> None:
        """Send one frame; raises PeerTimeoutError if the peer does not take it in time.

        Tasks may send on one stream concurrently (a link's blob replies and its
        ``passed`` notices): frames go out whole, one after the other.
        """
        data = encode_frame(payload, max_size=self.max_frame_size)
        try:
            with trio.fail_after(self.limits.frame_timeout):
                try:
                    self._sending.acquire_nowait()  # the usual case: no yield for the lock
                except trio.WouldBlock:
                    await self._sending.acquire()
                try:
                    await self.stream.send_all(data)
                finally:
                    self._sending.release()
        except trio.TooSlowError:
            raise PeerTimeoutError(
                f"did not take a {len(data)}-byte frame within {self.limits.frame_timeout:g} s",
                peer=self.peer,
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLostError(
                f"connection lost while sending: {exc}", peer=self.peer
            ) from None

    async def receive_frame(self) -> bytes:
        """Receive one frame; an orderly end of stream raises ConnectionLostError."""
        frame = await self.receive_frame_or_eof()
        if frame is None:
            raise ConnectionLostError("closed the connection", peer=self.peer)
        return frame

    async def receive_frame_or_eof(self) -> bytes | None:
        """Receive one frame, or None if the stream ended cleanly between frames.

        Raises FrameError (oversized or truncated frame), PeerTimeoutError
        (idle or per-frame deadline), ConnectionLostError (reset), all naming the peer.
        """
        try:
            while True:
                frame = self._decoder.next_frame()
                if frame is not None:
                    # Bytes left over may hold whole frames; timing them from now only
                    # makes the per-frame deadline more lenient.  (``in_frame`` would
                    # walk every buffered frame: quadratic in many small frames.)
                    self._frame_started = trio.current_time() if self._decoder.buffered else None
                    return frame
                if self._eof:
                    self._decoder.eof()
                    return None
                await self._receive_more()
        except RemoteProtocolError as exc:
            if exc.peer is None:
                raise exc.with_peer(self.peer) from None
            raise

    async def _receive_more(self) -> None:
        """Read once more; called only when no whole frame is buffered, so anything
        buffered is the start of an incomplete one."""
        now = trio.current_time()
        if self._decoder.buffered:
            if self._frame_started is None:
                self._frame_started = now
            deadline = self._frame_started + self.limits.frame_timeout
            what = f"did not complete a frame within {self.limits.frame_timeout:g} s"
        else:
            deadline = now + self.limits.idle_timeout
            what = f"sent nothing for {self.limits.idle_timeout:g} s"
        try:
            with trio.fail_at(deadline if math.isfinite(deadline) else math.inf):
                data = await self.stream.receive_some(self._receive_size)
        except trio.TooSlowError:
            raise PeerTimeoutError(what, peer=self.peer) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLostError(f"connection lost: {exc}", peer=self.peer) from None
        if not data:
            self._eof = True
            return
        was_in_frame = self._decoder.buffered > 0
        self._decoder.feed(data)
        if not was_in_frame:
            self._frame_started = trio.current_time()

    async def aclose(self) -> None:
        """Close the underlying stream (never raises for an already-broken stream)."""
        try:
            await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
