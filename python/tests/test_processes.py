"""Real processes: Pool workers under fork and spawn, fork safety, a SIGKILLed holder, Ctrl-C."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import turnstile
from conftest import SOON, wait_until
from helpers import (
    critical,
    critical_args,
    hold_and_die,
    init_worker,
    max_overlap,
    wait_for_all,
)

START_METHODS = ["fork", "spawn"]


@pytest.mark.parametrize("method", START_METHODS)
def test_pool_map_limits_to_two(url, name, method):
    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(4, initializer=wait_for_all, initargs=(ctx.Barrier(4),)) as pool:
        results = pool.map(critical_args, [(i, sem) for i in range(40)], chunksize=1)
    assert sorted(r[0] for r in results) == list(range(40))
    most = max_overlap([(r[1], r[2]) for r in results])
    assert most <= 2, f"{most} tasks were in the critical section at once"
    assert most == 2, "the two slots were never used at once"
    assert len({r[3] for r in results}) > 1, "one worker did everything"
    assert sem.get_value() == 0


def test_pool_initializer_and_apply_async(url, name):
    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3, initializer=init_worker, initargs=(sem,)) as pool:
        results = [pool.apply_async(critical, (i,)) for i in range(12)]
        results = [r.get(SOON * 2) for r in results]
    assert max_overlap([(r[1], r[2]) for r in results]) <= 2


def test_process_pool_executor(url, name):
    from concurrent.futures import ProcessPoolExecutor

    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("forkserver")) as ex:
        results = list(ex.map(critical, range(9), [sem] * 9))
    assert max_overlap([(r[1], r[2]) for r in results]) == 1


def _child_after_fork(sem, queue):
    try:
        try:
            sem.release()
            queue.put("released the parent's lease!")
            return
        except RuntimeError as e:
            assert "Released too often" in str(e)
        assert sem.leases == ()
        got = sem.acquire(timeout=10)
        queue.put(("acquired", got, sem.get_value()))
        sem.release()
    except BaseException as e:  # report anything to the parent
        queue.put(repr(e))


def test_fork_child_gets_its_own_session(url, name):
    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    assert sem.acquire()
    # No reference to the lease but the semaphore's: the child drops its copy when it finds
    # itself in another process, and that drop must not release the parent's lease.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_after_fork, args=(sem, queue))
    child.start()
    out = queue.get(timeout=SOON)
    child.join(SOON)
    assert out == ("acquired", True, 2), out
    assert child.exitcode == 0
    # The child's exit (and its session's end) left the parent's lease alone.
    assert sem.lease.held
    assert sem.get_value() == 1
    assert sem.release() is True


def _child_with_inherited_lease(lease, queue):
    try:
        queue.put((lease.held, lease.lost, lease.wait_lost(timeout=5), lease.release()))
    except BaseException as e:
        queue.put(repr(e))


def test_inherited_lease_is_inert_in_a_fork_child(url, name):
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)
    assert sem.acquire()
    lease = sem.lease
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_with_inherited_lease, args=(lease, queue))
    child.start()
    out = queue.get(timeout=SOON)
    child.join(SOON)
    # Not held by the child, not waited on (the parent's runtime has no threads there), not
    # released by it.
    assert out == (False, None, None, False), out
    assert lease.held and sem.get_value() == 1
    assert sem.release() is True


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_sigkilled_pool_worker_slot_comes_back(url, name, method, tmp_path):
    # On tcp the slot comes back when the dead worker's session expires: after the TTL the
    # semaphore asks for (2s; the coordinator's default is 30s). On the file backend, as soon
    # as another process sees that the holder's pid is gone.
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url, session_ttl=2)
    marker = str(tmp_path / "holding")
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2) as pool:
        pool.apply_async(hold_and_die, (sem, marker))
        wait_until("the worker to hold the slot", lambda: os.path.exists(marker))
        pid = int(open(marker).read())
        wait_until("the worker to die", lambda: not _alive(pid))
        started = time.monotonic()
        rest = pool.map_async(critical_args, [(i, sem) for i in range(6)], chunksize=1)
        results = rest.get(SOON * 2)
        waited = time.monotonic() - started
    assert sorted(r[0] for r in results) == list(range(6))
    assert max_overlap([(r[1], r[2]) for r in results]) == 1
    if url.startswith("file://"):
        assert waited < 2, f"the file backend took {waited:.1f}s to free a dead holder's slot"
    else:
        assert waited < 20, f"the dead worker's session outlived its 2s TTL ({waited:.1f}s)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers: look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_ctrl_c_interrupts_a_blocking_acquire(url, name):
    holder = turnstile.Semaphore(max_leases=1, name=name, url=url)
    assert holder.acquire()
    script = textwrap.dedent(
        f"""
        import sys, turnstile
        sem = turnstile.Semaphore(max_leases=1, name={name!r}, url={url!r})
        print("waiting", flush=True)
        try:
            sem.acquire()
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        print("acquired?!", flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "waiting"
        wait_until("the child's acquire to queue", lambda: holder.get_waiting() == 1)
        sent = time.monotonic()
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=SOON)
        took = time.monotonic() - sent
    finally:
        child.kill()
    assert child.returncode == 3, out
    assert "interrupted" in out
    assert took < 5, f"Ctrl-C took {took:.1f}s"
    # The queued acquire was withdrawn: the slot goes to nobody else when released.
    wait_until("the withdrawn acquire to leave the queue", lambda: holder.get_waiting() == 0)
    holder.release()
    assert holder.get_value() == 0
