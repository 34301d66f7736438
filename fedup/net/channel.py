"""The secure channel: an encrypted, authenticated :class:`trio.abc.Stream`.

After the handshake (:mod:`fedup.protocol.handshake`) each direction of a
connection is one libsodium secretstream keyed by that direction's session
key.  On the wire, over :class:`~fedup.net.framed.FramedStream` frames:

* the first frame a side sends is its 24-byte secretstream header (sent
  lazily, with the first record, so an idle channel sends nothing);
* every further frame is one *record*: one secretstream chunk of at most
  ``Limits.max_frame_size - 17`` plaintext bytes, tagged ``MESSAGE``;
* :meth:`SecureChannel.aclose` sends an empty record tagged ``FINAL``
  (close-notify) and closes the transport.  Receiving it is a clean end of
  stream (``receive_some`` returns ``b""``); an end of the transport *without*
  it is a truncation and raises :class:`ChannelLostError`.

secretstream's internal counter makes any modified, reordered, replayed or
dropped record fail authentication.  Every failure breaks the channel in that
direction: the same error is raised again by later calls.

Errors.  What the channel raises about the peer or the connection is a
:class:`ChannelError`: a :class:`~fedup.errors.RemoteProtocolError` that
names the peer by its ID *and* a :class:`trio.BrokenResourceError`, so both
FedUp code and generic trio code recognise a dead stream.  The subclasses
keep the underlying kind: :class:`ChannelTimeoutError` (a
:class:`~fedup.errors.PeerTimeoutError`: idle or per-frame deadline),
:class:`ChannelLostError` (a :class:`~fedup.errors.ConnectionLostError`:
reset, truncation) and :class:`ChannelFrameError` (a
:class:`~fedup.protocol.framing.FrameError`: oversized or cut frame).  Using
the channel after :meth:`~SecureChannel.aclose` raises
:class:`trio.ClosedResourceError`; two tasks sending (or receiving) at once
raise :class:`trio.BusyResourceError`.
"""

from __future__ import annotations

import operator
from types import TracebackType

import trio

from fedup.config import Limits
from fedup.errors import (
    ConnectionLostError,
    LocalProtocolError,
    PeerTimeoutError,
    RemoteProtocolError,
)
from fedup.net.framed import FramedStream
from fedup.protocol.framing import FrameError
from fedup.protocol.handshake import HandshakeResult, decode_abort
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import SignedPeerRecord
from fedup.protocol.secretstream import (
    ABYTES,
    HEADER_SIZE,
    Decryptor,
    Encryptor,
    SecretStreamError,
    Tag,
)

__all__ = [
    "ChannelError",
    "ChannelFrameError",
    "ChannelLostError",
    "ChannelTimeoutError",
    "SecureChannel",
    "max_record_plaintext",
]


class ChannelError(RemoteProtocolError, trio.BrokenResourceError):
    """The secure channel broke: a record failed authentication, or the connection failed."""


class ChannelTimeoutError(ChannelError, PeerTimeoutError):
    """The peer sent nothing for ``idle_timeout``, or did not finish a frame in time."""


class ChannelLostError(ChannelError, ConnectionLostError):
    """The connection was reset, or ended without close-notify (truncation)."""


class ChannelFrameError(ChannelError, FrameError):
    """The peer's bytes do not split into acceptable frames (e.g. an oversized length)."""


def max_record_plaintext(limits: Limits) -> int:
    """Largest plaintext of one record: a frame minus secretstream's 17 bytes.

    With the default 2 MiB frames a record holds 2 MiB - 17 bytes, so a 1 MiB
    blob chunk plus its own header travels as one record.
    """
    size = limits.max_frame_size - ABYTES
    if size < HEADER_SIZE:
        raise LocalProtocolError(f"max_frame_size {limits.max_frame_size} is too small")
    return size


class _Conflict:
    """Raises trio.BusyResourceError when two tasks use one direction at once."""

    def __init__(self, what: str) -> None:
        self._what = what
        self.held = False

    def __enter__(self) -> None:
        if self.held:
            raise trio.BusyResourceError(f"another task is already {self._what} on this channel")
        self.held = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.held = False


class SecureChannel(trio.abc.Stream):
    """An encrypted stream to an authenticated peer, over ``framed`` after a handshake.

    Build it with the transport (:mod:`fedup.net.transport`), which runs the
    handshake on ``framed`` first; frames already buffered by ``framed``
    (records the peer sent right after the handshake) are kept.
    """

    def __init__(self, framed: FramedStream, result: HandshakeResult) -> None:
        self._framed = framed
        self._result = result
        self._peer = result.remote_peer.text
        framed.peer = self._peer
        self._record_size = max_record_plaintext(framed.limits)
        self._encryptor = Encryptor(result.send_key)
        self._header_sent = False
        self._decryptor: Decryptor | None = None
        self._buffer = b""
        self._offset = 0
        self._eof = False
        self._closed = False
        self._send_error: ChannelError | None = None
        self._receive_error: ChannelError | None = None
        self._sending = _Conflict("sending")
        self._receiving = _Conflict("receiving")

    # -- what the handshake established ---------------------------------------

    @property
    def remote_peer(self) -> PeerId:
        """The authenticated peer at the other end."""
        return self._result.remote_peer

    @property
    def remote_record(self) -> SignedPeerRecord | None:
        """The peer's verified signed record, if it sent one in the handshake."""
        return self._result.remote_record

    @property
    def transcript_hash(self) -> bytes:
        """The handshake's transcript hash, equal on both ends (for channel binding)."""
        return self._result.transcript_hash

    @property
    def transport_stream(self) -> trio.abc.Stream:
        """The stream underneath (TCP or memory); writing to it directly breaks the channel."""
        return self._framed.stream

    # -- trio.abc.Stream --------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data`` as records of at most :func:`max_record_plaintext` bytes.

        Raises :class:`ChannelTimeoutError` if the peer does not take a frame
        within ``Limits.frame_timeout``, :class:`ChannelLostError` if the
        connection is gone, :class:`trio.ClosedResourceError` after
        :meth:`aclose`.  If a send is cancelled or fails part way, the peer may
        have received part of a record, so the channel cannot send any more
        (later sends raise :class:`ChannelLostError`), as with trio's SSLStream.
        """
        with self._sending:
            self._check_usable(self._send_error)
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data).cast("B")
            size = view.nbytes
            if size == 0:
                await trio.lowlevel.checkpoint()
                return
            try:
                await self._send_header()
                if isinstance(data, bytes) and size <= self._record_size:
                    await self._framed.send_frame(self._encryptor.push(data))  # no copy
                else:
                    for start in range(0, size, self._record_size):
                        chunk = view[start : start + self._record_size]
                        await self._framed.send_frame(self._encryptor.push(chunk))
            except RemoteProtocolError as exc:
                self._send_error = self._wrap(exc)
                if self._closed:
                    raise trio.ClosedResourceError("the channel was closed") from None
                raise self._send_error from None
            except BaseException:
                self._send_error = ChannelLostError(
                    "an earlier send was interrupted part way; the channel cannot send",
                    peer=self._peer,
                )
                raise

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the transport could take data; errors as for :meth:`send_all`."""
        with self._sending:
            self._check_usable(self._send_error)
            try:
                await self._framed.stream.wait_send_all_might_not_block()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if self._closed:
                    raise trio.ClosedResourceError("the channel was closed") from None
                self._send_error = ChannelLostError(f"connection lost: {exc}", peer=self._peer)
                raise self._send_error from None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return up to ``max_bytes`` decrypted bytes (default: one record), or ``b""`` at the end.

        ``b""`` means the peer closed cleanly (close-notify received).  Raises
        :class:`ChannelError` ("record failed authentication") for a modified,
        reordered, replayed or dropped record or an unexpected tag;
        :class:`ChannelLostError` ("truncated: connection ended without
        close-notify") when the transport ended without close-notify, or on a
        reset; :class:`ChannelTimeoutError` when nothing arrived within
        ``Limits.idle_timeout`` or a frame took longer than
        ``Limits.frame_timeout``; :class:`ChannelFrameError` for an oversized
        or cut frame; :class:`trio.ClosedResourceError` after :meth:`aclose`;
        ``TypeError``/``ValueError`` for a ``max_bytes`` that is not a positive
        integer.
        """
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        with self._receiving:
            self._check_usable(self._receive_error)
            await trio.lowlevel.checkpoint()
            try:
                while self._offset == len(self._buffer) and not self._eof:
                    self._absorb(await self._framed.receive_frame_or_eof())
            except RemoteProtocolError as exc:
                if self._closed:
                    raise trio.ClosedResourceError("the channel was closed") from None
                self._receive_error = self._wrap(exc)
                raise self._receive_error from None
            return self._take(max_bytes)

    async def aclose(self) -> None:
        """Send close-notify (unless a send is in progress or failed), then close.

        Idempotent.  If cancelled, or if the peer does not take the
        close-notify within ``Limits.frame_timeout``, the transport is closed
        anyway (the peer then sees a truncation).  Never raises for a peer
        that is already gone.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if not self._sending.held and self._send_error is None:
                try:
                    await self._send_header()
                    await self._framed.send_frame(self._encryptor.push(b"", tag=Tag.FINAL))
                except RemoteProtocolError:
                    pass
        finally:
            await self._framed.aclose()

    # -- internals ---------------------------------------------------------------

    def _check_usable(self, error: ChannelError | None) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the channel was closed")
        if error is not None:
            raise error.with_peer(self._peer) from None

    async def _send_header(self) -> None:
        if not self._header_sent:
            await self._framed.send_frame(self._encryptor.header)
            self._header_sent = True

    def _absorb(self, frame: bytes | None) -> None:
        """Process one frame from the peer (None: the transport ended between frames)."""
        if frame is None:
            raise ChannelLostError(
                "truncated: connection ended without close-notify", peer=self._peer
            )
        if self._decryptor is None:
            # A responder that rejects msg3 sends an abort where its header would be.  A
            # random header is a well-formed abort message with negligible probability.
            aborted = decode_abort(frame, limits=self._framed.limits)
            if aborted is not None:
                raise ChannelError(
                    f"the peer rejected the handshake: {aborted.reason}", peer=self._peer
                )
            if len(frame) != HEADER_SIZE:
                raise ChannelError(
                    f"expected the {HEADER_SIZE}-byte stream header, got a {len(frame)}-byte frame",
                    peer=self._peer,
                )
            self._decryptor = Decryptor(self._result.receive_key, frame)
            return
        try:
            plaintext, tag = self._decryptor.pull(frame)
        except SecretStreamError as exc:
            raise ChannelError(exc.reason.replace("chunk", "record"), peer=self._peer) from None
        if tag == Tag.FINAL:
            self._eof = True
        elif tag != Tag.MESSAGE:
            raise ChannelError(f"record has unexpected tag {tag.name}", peer=self._peer)
        self._buffer = plaintext
        self._offset = 0

    def _take(self, max_bytes: int | None) -> bytes:
        available = len(self._buffer) - self._offset
        count = available if max_bytes is None else min(max_bytes, available)
        if self._offset == 0 and count == len(self._buffer):
            data = self._buffer
            self._buffer = b""
            return data
        data = self._buffer[self._offset : self._offset + count]
        self._offset += count
        return data

    def _wrap(self, exc: RemoteProtocolError) -> ChannelError:
        if isinstance(exc, ChannelError):
            return exc
        cls: type[ChannelError] = ChannelError
        if isinstance(exc, PeerTimeoutError):
            cls = ChannelTimeoutError
        elif isinstance(exc, ConnectionLostError):
            cls = ChannelLostError
        elif isinstance(exc, FrameError):
            cls = ChannelFrameError
        return cls(exc.reason, peer=exc.peer or self._peer)
