"""The exceptions FedUp raises, split by whose fault it was.

Following h11: a :class:`RemoteProtocolError` means a peer (or a file, or a
packet) sent us something wrong; the peer is named when known, the connection
or message is dropped, and the local peer carries on.  A
:class:`LocalProtocolError` means *we* misused an API: it is a bug in the
caller and should be loud.  Any other exception escaping a decoder is a bug in
FedUp.
"""

from __future__ import annotations


class FedupError(Exception):
    """Base class of every error FedUp raises on purpose."""


class RemoteProtocolError(FedupError):
    """Input from outside broke the protocol.

    ``reason`` says what was wrong in words a log reader can act on; ``peer``
    names the sender (a peer ID's text form or an address) when it is known.
    """

    def __init__(self, reason: str, *, peer: str | None = None) -> None:
        self.reason = reason
        self.peer = peer
        super().__init__(f"{peer}: {reason}" if peer else reason)

    def with_peer(self, peer: str) -> RemoteProtocolError:
        """Return a copy of this error of the same class that names ``peer``."""
        err = type(self).__new__(type(self))
        RemoteProtocolError.__init__(err, self.reason, peer=peer)
        err.__cause__ = self.__cause__
        return err


class LocalProtocolError(FedupError):
    """The local program misused an API (a bug in the caller, not the peer)."""


class IdentityError(FedupError):
    """The identity key file cannot be used: unreadable, corrupt or exposed."""


class FileError(FedupError):
    """A file or folder FedUp writes or keeps cannot be used safely: a symbolic link
    where FedUp appends or creates a file, something other than a regular file, or a
    folder others can write.  The message names the path and the fix."""


class ConfigError(FedupError):
    """A setting is invalid; the message names the setting."""


class PeerTimeoutError(RemoteProtocolError):
    """A peer did not send (or take) what it should have within a deadline."""


class SilentPeerError(PeerTimeoutError):
    """A peer answered nothing where an answer comes at once: its link is down (a
    hand-over counts it as unreachable, not as slow)."""


class ConnectionLostError(RemoteProtocolError):
    """The connection ended: the peer closed it, reset it, or it broke mid-message."""


def innermost_single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups (hypercorn's nurseries wrap
    a bind error twice), else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
