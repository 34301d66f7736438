"""Named deadlines (fedup.net.timers) and batched channel reads (fedup.net.batches)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fedup.net.batches import batches
from fedup.net.timers import Timers


async def _timers(nursery: trio.Nursery) -> tuple[Timers, list[tuple[str, float]]]:
    fired: list[tuple[str, float]] = []
    timers = Timers(lambda name: fired.append((name, trio.current_time())))
    nursery.start_soon(timers.run)
    await trio.testing.wait_all_tasks_blocked()
    return timers, fired


async def test_a_timer_pushed_back_fires_once_at_its_last_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        timers, fired = await _timers(nursery)
        last = trio.current_time()
        for _ in range(50):  # a settle period restarted by every newcomer
            last = trio.current_time()
            timers.set("settle", 2.0)
            await trio.sleep(0.1)
        assert fired == []
        await trio.sleep(10)
        assert fired == [("settle", pytest.approx(last + 2.0))]
        nursery.cancel_scope.cancel()


async def test_an_earlier_deadline_wakes_the_runner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        timers, fired = await _timers(nursery)
        start = trio.current_time()
        timers.set("late", 100.0)
        await trio.testing.wait_all_tasks_blocked()
        timers.set("early", 1.0)
        await trio.sleep(200)
        assert fired == [("early", start + 1.0), ("late", start + 100.0)]
        nursery.cancel_scope.cancel()


async def test_cancelled_timers_do_not_fire(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        timers, fired = await _timers(nursery)
        start = trio.current_time()
        timers.set("a", 1.0)
        timers.set("b", 2.0)
        timers.set("c", 3.0)
        timers.cancel("a")
        await trio.sleep(1.5)
        timers.cancel_all()
        timers.set("d", 1.0)
        await trio.sleep(10)
        assert fired == [("d", start + 2.5)]
        assert timers.due("b") is None
        nursery.cancel_scope.cancel()


async def test_a_timer_set_while_firing_fires_too(autojump_clock: trio.testing.MockClock) -> None:
    fired: list[str] = []

    def fire(name: str) -> None:
        fired.append(name)
        if name == "first":
            timers.set("second", 1.0)

    timers = Timers(fire)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.set("first", 1.0)
        await trio.sleep(5)
        assert fired == ["first", "second"]
        nursery.cancel_scope.cancel()


async def test_batches_hand_over_what_is_queued_in_order() -> None:
    send, receive = trio.open_memory_channel[int](100)
    for i in range(10):
        send.send_nowait(i)
    got: list[list[int]] = []
    async with send:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                async for batch in batches(receive, limit=4):
                    got.append(batch)

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            send.send_nowait(10)
            await trio.testing.wait_all_tasks_blocked()
            await send.aclose()
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]
