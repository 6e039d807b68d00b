"""asyncio: many tasks on one event loop, and cancellation of a queued acquire."""

from __future__ import annotations

import asyncio
import time

import turnstile
from conftest import wait_until


def test_fifty_tasks_at_most_n_inside(url, name):
    # register=False: the tasks' first acquires also connect (on executor threads, not on
    # the event loop).
    sem = turnstile.Semaphore(max_leases=3, name=name, url=url, register=False)
    inside = 0
    most = 0
    ticks = 0

    full = None  # set once 3 are inside at the same time

    async def task():
        nonlocal inside, most
        async with sem:
            inside += 1
            most = max(most, inside)
            if inside == 3:
                full.set()
            # Stay inside until the semaphore has been seen full (so that "3 reached" does not
            # depend on how fast the backend hands slots on), or for 2 s at most.
            try:
                await asyncio.wait_for(full.wait(), 2)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.005)
            inside -= 1

    async def ticker():
        # Runs while the tasks wait: the loop is never blocked by a waiting acquire.
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def main():
        nonlocal full
        full = asyncio.Event()
        t = asyncio.ensure_future(ticker())
        await asyncio.wait_for(asyncio.gather(*(task() for _ in range(50))), 120)
        t.cancel()

    asyncio.run(main())
    assert most == 3
    assert ticks > 10
    assert sem.get_value() == 0


def test_cancelling_a_waiting_task_frees_its_place(url, name):
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)
    assert sem.acquire()

    async def main():
        waiter = asyncio.ensure_future(sem.acquire_async())
        await asyncio.sleep(0)
        deadline = time.monotonic() + 30
        while sem.get_waiting() != 1:
            assert time.monotonic() < deadline, "the acquire never queued"
            await asyncio.sleep(0.02)
        waiter.cancel()
        try:
            await waiter
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the cancelled acquire completed")

    asyncio.run(main())
    wait_until("the cancelled acquire to leave the queue", lambda: sem.get_waiting() == 0)
    sem.release()
    # Had the cancelled acquire stayed queued, it would take the slot (FIFO) and a try
    # would fail.
    other = turnstile.Semaphore(max_leases=1, name=name, url=url)
    assert other.acquire(timeout=0) is True
    assert sem.get_value() == 1
    other.release()
