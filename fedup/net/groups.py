"""Exception groups at the edge of a nursery."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["collapse_single_exception"]


@contextlib.contextmanager
def collapse_single_exception() -> Iterator[None]:
    """Re-raise a lone exception out of a nursery's ExceptionGroup as itself.

    Code that keeps background tasks in a nursery around its caller's block
    (discovery backends, listeners, the blob hasher) would otherwise hand the
    caller's own exception (say a :class:`~fedup.errors.FedupError`) back
    wrapped in an ExceptionGroup, which ``except FedupError`` does not catch.
    Groups of several exceptions pass unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        cause, context = exc.__cause__, exc.__context__
        try:
            raise exc  # the group is only a wrapper
        finally:
            exc.__cause__, exc.__context__ = cause, context
