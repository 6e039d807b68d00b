"""Functions that run in other processes (Pool workers, Dask workers): importable by name, so
that the `spawn` and `forkserver` start methods can find them."""

from __future__ import annotations

import os
import signal
import time

import turnstile

#: Set by a Pool initializer: the semaphore handed to every worker once.
WORKER_SEM = None


def init_worker(sem) -> None:
    global WORKER_SEM
    WORKER_SEM = sem


def wait_for_all(barrier) -> None:
    """A Pool initializer: every worker waits until all have started, so that a loaded
    machine starting them slowly cannot leave one worker to run every task alone."""
    barrier.wait(timeout=120)


def critical(i: int, sem=None, hold: float = 0.05):
    """Holds `sem` (or the initializer's) for `hold` seconds: (i, start, end, pid)."""
    sem = sem if sem is not None else WORKER_SEM
    with sem:
        start = time.time()
        time.sleep(hold)
        end = time.time()
    return (i, start, end, os.getpid())


def critical_args(args):
    i, sem = args
    return critical(i, sem)


def hold_and_die(sem, marker: str) -> None:
    """Acquires, says so through `marker`, and dies by SIGKILL while holding."""
    sem.acquire()
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    os.kill(os.getpid(), signal.SIGKILL)


def dask_task(i: int, sem: turnstile.Semaphore):
    with sem:
        start = time.time()
        time.sleep(0.1)
        end = time.time()
    return (i, start, end)


def max_overlap(intervals) -> int:
    """The most intervals (start, end) open at one instant."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    # At a tie an end comes first: one task leaving as another enters is not an overlap.
    events.sort(key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most
