"""Sending and receiving model blobs over a :class:`~fedup.net.framed.FramedStream`.

The rules live in :mod:`fedup.protocol.blob` (and ``docs/protocol-blob.md``);
this module moves the frames and keeps time:

* :func:`send_blob` signs the header, waits for ACCEPT, sends the chunks as
  slices of the caller's buffer while a worker thread hashes them, signs the
  END with the digest, and returns once the receiver acknowledged custody.
* :func:`receive_blob` checks the header, answers ACCEPT or NACK, reassembles
  the chunks while a worker thread hashes them, checks the END and the digest,
  records the blob in the replay guard, and answers ACK.

Blobs under :data:`THREAD_HASH_MIN` are hashed inline.  Both functions run
under ``Limits.blob_timeout`` as a whole (from the header to the ACK), on top
of the per-frame deadlines of the :class:`FramedStream`, so a peer that
trickles chunks is cut off.  Every failure is a
:class:`~fedup.errors.RemoteProtocolError` subclass naming the peer.

After an error the stream is in a known state only when the header was
refused (both sides are then between blobs); in every other case close it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import attrs
import trio

from fedup.config import Limits
from fedup.errors import (
    ConnectionLostError,
    LocalProtocolError,
    PeerTimeoutError,
    RemoteProtocolError,
)
from fedup.net.framed import FramedStream
from fedup.net.groups import collapse_single_exception
from fedup.protocol.blob import (
    BlobError,
    BlobHasher,
    BlobHeader,
    BlobKind,
    BlobReceiver,
    BlobRefusedError,
    BlobReplayGuard,
    BlobReply,
    BlobReplyError,
    Buffer,
    MetaValue,
    blob_header_id,
    iter_chunks,
    seal_blob_end,
    seal_blob_header,
    verify_blob_header,
)
from fedup.protocol.envelope import Signer
from fedup.protocol.peer_id import PeerId

__all__ = ["THREAD_HASH_MIN", "ReceivedBlob", "receive_blob", "send_blob"]

THREAD_HASH_MIN = 2 * 1024 * 1024
"""Blobs of at least this size are hashed in a worker thread, concurrently with the I/O."""
HASH_QUEUE = 4
"""Chunks that may wait for the hashing thread before the I/O waits for it."""

CheckBlob = Callable[[BlobHeader, memoryview], None]


@attrs.frozen
class ReceivedBlob:
    """A blob whose header, end and digest were verified."""

    header: BlobHeader
    """The verified header (who sent it, for which run, lap and hop, with what metrics)."""
    data: memoryview
    """The blob's bytes, writable (the tensor codec can view them without copying)."""
    digest: bytes
    """BLAKE2b-256 of ``data``, as signed by the sender."""
    acknowledged: bool = True
    """False if the ACK could not be delivered (the sender may believe we did not take it)."""


async def send_blob(
    stream: FramedStream,
    identity: Signer,
    *,
    run_id: bytes,
    kind: BlobKind,
    lap: int,
    hop: int,
    epoch: int,
    recipient: PeerId,
    data: Buffer,
    meta: Mapping[str, MetaValue] | None = None,
    limits: Limits | None = None,
    hash_in_thread: bool | None = None,
) -> bytes:
    """Send ``data`` as one blob to ``recipient``; return its digest once it took custody.

    ``data`` is sent as slices (no copy of the whole blob) and hashed while
    it is sent: do not modify it until this returns.  ``limits`` defaults to
    the stream's.  ``hash_in_thread`` forces hashing in a worker thread (True)
    or inline (False); by default blobs of :data:`THREAD_HASH_MIN` bytes or
    more use a thread.  Tests on trio's virtual clock with ``autojump`` should
    pass False: virtual time does not wait for threads.

    Raises:
        LocalProtocolError: ``data`` exceeds ``max_blob_size``, a chunk does
            not fit the stream's frame size, or a header field is invalid.
        BlobRefusedError: the receiver answered NACK; ``reason`` says why.
        BlobReplyError: the receiver answered something that is not a reply
            to this blob.
        PeerTimeoutError: the whole exchange took longer than ``blob_timeout``
            (or one frame longer than the stream's deadlines).
        ConnectionLostError, FrameError: the connection broke or was garbled.
    """
    limits = stream.limits if limits is None else limits
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if view.nbytes > limits.max_blob_size:
        raise LocalProtocolError(
            f"blob of {view.nbytes} bytes exceeds max_blob_size={limits.max_blob_size}"
        )
    if limits.blob_chunk_size + 1 > stream.max_frame_size:
        raise LocalProtocolError(
            f"blob_chunk_size={limits.blob_chunk_size} does not fit a frame of "
            f"{stream.max_frame_size} bytes"
        )
    header = BlobHeader(
        run_id=run_id,
        kind=kind,
        lap=lap,
        hop=hop,
        epoch=epoch,
        sender=identity.peer_id,
        recipient=recipient,
        size=view.nbytes,
        chunk_size=limits.blob_chunk_size,
        meta=dict(meta or {}),
    )
    header_frame = seal_blob_header(identity, header, limits=limits)
    hasher = BlobHasher()

    async def send_chunks(hashed: Callable[[], Awaitable[None]]) -> None:
        for kind_byte, piece in iter_chunks(view, header.chunk_size):
            hasher.queue(piece)
            await hashed()
            await stream.send_frame(b"".join((kind_byte, piece)))

    try:
        with trio.fail_after(limits.blob_timeout):
            await stream.send_frame(header_frame)
            await _expect_reply(stream, header, BlobReply.accept(blob_header_id(header_frame)))
            try:
                await _with_hashing(hasher, _threaded(hash_in_thread, header), send_chunks)
            except ConnectionLostError as lost:
                await _raise_nack_if_any(stream, header, lost)
                raise
            digest = hasher.digest()
            await stream.send_frame(seal_blob_end(identity, header_frame, digest))
            await _expect_reply(stream, header, BlobReply.ack(digest))
    except trio.TooSlowError:
        raise PeerTimeoutError(
            f"did not take the {header.label} within {limits.blob_timeout:g} s",
            peer=stream.peer,
        ) from None
    return digest


async def _expect_reply(stream: FramedStream, header: BlobHeader, want: BlobReply) -> None:
    """Wait for the reply ``want``; raise on NACK or anything else."""
    frame = await stream.receive_frame()
    try:
        reply = BlobReply.from_cbor(frame)
    except BlobError as exc:
        raise exc.with_peer(stream.peer) from None
    if reply.kind == "nack":
        raise BlobRefusedError(f"refused the {header.label}: {reply.reason}", peer=stream.peer)
    if reply != want:
        raise BlobReplyError(
            f"answered {reply.kind.upper()} where {want.kind.upper()} of the {header.label} "
            "was due",
            peer=stream.peer,
        )


async def _raise_nack_if_any(
    stream: FramedStream, header: BlobHeader, lost: ConnectionLostError
) -> None:
    """After a failed send, read a NACK the receiver may have left; raise it if found."""
    with trio.move_on_after(stream.limits.blob_nack_timeout):
        try:
            frame = await stream.receive_frame_or_eof()
            reply = BlobReply.from_cbor(frame) if frame is not None else None
        except RemoteProtocolError:
            return
        if reply is not None and reply.kind == "nack":
            raise BlobRefusedError(
                f"refused the {header.label}: {reply.reason}", peer=stream.peer
            ) from lost


async def receive_blob(
    stream: FramedStream,
    *,
    me: PeerId,
    remote: PeerId,
    run_id: bytes,
    guard: BlobReplayGuard,
    limits: Limits | None = None,
    max_size: int | None = None,
    min_epoch: int = 0,
    header_frame: bytes | None = None,
    check: CheckBlob | None = None,
    hash_in_thread: bool | None = None,
) -> ReceivedBlob:
    """Receive one blob from ``remote`` (the channel's authenticated peer).

    ``header_frame`` is the header if the caller already read it (e.g. a
    dispatcher that looked at the frame); otherwise the next frame is read.
    ``check(header, data)`` runs after the digest was verified and before
    custody is acknowledged (e.g. decode the tensors against the expected
    model); a :class:`~fedup.errors.RemoteProtocolError` it raises is sent to
    the sender as the NACK's reason.  ``limits`` defaults to the stream's;
    ``hash_in_thread`` as for :func:`send_blob`.

    Raises (all naming the peer; the peer got a NACK with the reason where
    the connection still allowed it):

    * a :class:`~fedup.protocol.blob.BlobError` subclass for each header
      check of :func:`~fedup.protocol.blob.verify_blob_header` (the stream
      stays usable: both sides are between blobs), for bad chunk frames
      (:class:`~fedup.protocol.blob.BlobDataError`), a bad END, a digest
      mismatch (:class:`~fedup.protocol.blob.BlobDigestError`), or an end of
      stream before the END (:class:`~fedup.protocol.blob.BlobTruncatedError`);
    * :class:`~fedup.errors.PeerTimeoutError` if the blob is not complete
      within ``blob_timeout`` of its header (or a frame misses its deadline);
    * whatever ``check`` raised;
    * :class:`~fedup.errors.ConnectionLostError`, ``FrameError`` for a broken
      or garbled connection.
    """
    limits = stream.limits if limits is None else limits
    if header_frame is None:
        header_frame = await stream.receive_frame()
    try:
        header = verify_blob_header(
            header_frame,
            me=me,
            remote=remote,
            run_id=run_id,
            limits=limits,
            max_size=max_size,
            min_epoch=min_epoch,
            guard=guard,
        )
    except BlobError as exc:
        await _refuse(stream, exc.reason)
        raise exc.with_peer(stream.peer) from exc.__cause__
    receiver = BlobReceiver(header, header_frame)

    async def receive_chunks(hashed: Callable[[], Awaitable[None]]) -> None:
        while not receiver.done:
            frame = await stream.receive_frame_or_eof()
            if frame is None:
                receiver.eof()
            else:
                receiver.accept_chunk(frame)
                await hashed()

    try:
        with trio.fail_after(limits.blob_timeout):
            await stream.send_frame(BlobReply.accept(blob_header_id(header_frame)).to_cbor())
            await _with_hashing(receiver.hasher, _threaded(hash_in_thread, header), receive_chunks)
            end_frame = await stream.receive_frame_or_eof()
            if end_frame is None:
                receiver.eof()
            data = receiver.finish(end_frame or b"", limits=limits)
            if check is not None:
                check(header, data)
            guard.commit(header)
    except trio.TooSlowError:
        reason = (
            f"did not deliver the {header.label} within {limits.blob_timeout:g} s "
            f"(got {receiver.received} bytes)"
        )
        await _refuse(stream, f"blob deadline passed: {reason}")
        raise PeerTimeoutError(reason, peer=stream.peer) from None
    except RemoteProtocolError as exc:
        if not isinstance(exc, ConnectionLostError):
            await _refuse(stream, exc.reason)
        if exc.peer is None:
            raise exc.with_peer(stream.peer) from exc.__cause__
        raise
    assert receiver.digest is not None
    acknowledged = True
    try:
        with trio.fail_after(limits.frame_timeout):
            await stream.send_frame(BlobReply.ack(receiver.digest).to_cbor())
    except (RemoteProtocolError, trio.TooSlowError):
        acknowledged = False
    return ReceivedBlob(header, data, receiver.digest, acknowledged)


def _threaded(hash_in_thread: bool | None, header: BlobHeader) -> bool:
    return header.size >= THREAD_HASH_MIN if hash_in_thread is None else hash_in_thread


async def _with_hashing(
    hasher: BlobHasher,
    threaded: bool,
    body: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
) -> None:
    """Run ``body(hashed)``; each ``await hashed()`` hands the queued pieces to the hasher.

    Inline, or (``threaded``) in a worker thread so that hashing piece k
    overlaps the sending (encrypting) or receiving (decrypting) of piece
    k + 1; at most :data:`HASH_QUEUE` hand-offs wait before ``hashed()``
    blocks.  Exceptions from ``body`` propagate as they are (not wrapped in
    an exception group); cancellation waits for the piece being hashed.
    """
    if not threaded:

        async def inline() -> None:
            hasher.hash_pending()

        await body(inline)
        return
    send_token, receive_token = trio.open_memory_channel[None](HASH_QUEUE)
    with collapse_single_exception():  # body's error cancels the worker and goes on unwrapped
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hash_worker, hasher, receive_token)
            async with send_token:
                await body(lambda: send_token.send(None))


async def _hash_worker(hasher: BlobHasher, tokens: trio.MemoryReceiveChannel[None]) -> None:
    async with tokens:
        async for _ in tokens:
            while True:  # one thread hop hashes everything queued so far
                try:
                    tokens.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await trio.to_thread.run_sync(hasher.hash_pending)


async def _refuse(stream: FramedStream, reason: str) -> None:
    """Best effort: tell the sender why its blob is refused (never raises)."""
    with trio.move_on_after(stream.limits.blob_nack_timeout):
        try:
            await stream.send_frame(BlobReply.nack(reason).to_cbor())
        except RemoteProtocolError:
            pass
