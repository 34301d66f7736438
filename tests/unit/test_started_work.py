"""Work a member starts at once in a worker thread (``TaskBuilder.start``)."""

from __future__ import annotations

import threading

import pytest
import trio

from fedup.peer.tasks import Started


async def test_thread_work_runs_in_another_thread_and_returns_its_value() -> None:
    here = threading.get_ident()
    work = Started(lambda: (threading.get_ident(), 42), in_thread=True)
    ident, value = await work.result()
    assert value == 42
    assert ident != here


async def test_thread_work_has_begun_before_the_next_checkpoint() -> None:
    began = threading.Event()
    release = threading.Event()

    def fn() -> str:
        began.set()
        release.wait(5)
        return "done"

    work = Started(fn, in_thread=True)
    # start() does not wait for a turn of the event loop to start the thread.
    assert began.wait(5)
    release.set()
    assert await work.result() == "done"


async def test_an_exception_in_the_thread_is_raised_by_result() -> None:
    def fn() -> None:
        raise ValueError("bad hop")

    work = Started(fn, in_thread=True)
    with pytest.raises(ValueError, match="bad hop"):
        await work.result()


async def test_inline_work_runs_only_when_awaited() -> None:
    calls: list[int] = []
    work = Started(lambda: calls.append(threading.get_ident()) or 7, in_thread=False)
    assert calls == []
    assert await work.result() == 7
    assert calls == [threading.get_ident()]


async def test_a_cancelled_waiter_still_waits_for_the_thread_to_end() -> None:
    release = threading.Event()
    ended = threading.Event()

    def fn() -> None:
        release.wait(5)
        ended.set()

    work = Started(fn, in_thread=True)
    with trio.CancelScope() as scope:
        scope.cancel()
        trio.lowlevel.current_trio_token().run_sync_soon(release.set)
        await work.result()
    # The shielded wait returned only once the work was over: nothing else may
    # touch the model it trains before then.
    assert ended.is_set()
