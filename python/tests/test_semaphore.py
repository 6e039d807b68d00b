"""Dask's semaphore semantics, one test each, on every backend."""

from __future__ import annotations

import asyncio
import pickle
import time
import warnings

import pytest

import turnstile
from conftest import wait_until


def test_acquire_and_timeout(url, name):
    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    assert sem.acquire() is True
    assert sem.acquire(timeout=5) is True
    started = time.monotonic()
    assert sem.acquire(timeout=0.3) is False
    assert time.monotonic() - started >= 0.25
    assert sem.acquire(timeout="100ms") is False
    sem.release()
    assert sem.acquire(timeout=1) is True
    sem.release()
    sem.release()


def test_timeout_zero_tries_once(url, name):
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)
    assert sem.acquire(timeout=0) is True
    started = time.monotonic()
    assert sem.acquire(timeout=0) is False
    assert time.monotonic() - started < 5
    sem.release()
    assert sem.acquire(timeout=0) is True
    sem.release()


def test_pickled_copy_shares_the_semaphore(url, name):
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)
    assert sem.acquire()
    copy = pickle.loads(pickle.dumps(sem))
    assert (copy.name, copy.max_leases, copy.url) == (sem.name, 1, url)
    assert copy.leases == ()  # none of the original's leases
    with pytest.raises(RuntimeError, match="Released too often"):
        copy.release()
    assert copy.acquire(timeout=0) is False  # the original holds the one slot
    sem.release()
    assert copy.acquire(timeout=5) is True
    assert sem.acquire(timeout=0) is False
    copy.release()


def test_released_too_often(url, name):
    sem = turnstile.Semaphore(name=name, url=url)
    with pytest.raises(RuntimeError, match="Released too often"):
        sem.release()
    assert sem.acquire()
    assert sem.release() is True
    with pytest.raises(turnstile.ReleasedTooOftenError, match="Released too often"):
        sem.release()
    assert sem.get_value() == 0


def test_close_then_acquire(url, name):
    sem = turnstile.Semaphore(name=name, url=url)
    other = turnstile.Semaphore(name=name, url=url)
    sem.close()
    with pytest.raises(RuntimeError, match="not known or already closed"):
        sem.acquire()
    # Another handle (another process, as far as the backend knows) is refused too.
    with pytest.raises(turnstile.SemaphoreClosedError, match="not known or already closed"):
        other.acquire(timeout=0)
    sem.close()  # closing twice does nothing


def test_close_with_leases_held_warns(url, name):
    sem = turnstile.Semaphore(name=name, url=url)
    assert sem.acquire()
    lease = sem.lease
    with pytest.warns(RuntimeWarning, match="unreleased leases"):
        sem.close()
    wait_until("the lease to be reported lost", lambda: lease.lost == "closed")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        turnstile.Semaphore(name=name + "-b", url=url).close()  # nothing held: no warning


def test_get_value(url, name):
    sem = turnstile.Semaphore(max_leases=3, name=name, url=url)
    other = turnstile.Semaphore(max_leases=3, name=name, url=url)
    assert sem.get_value() == 0
    sem.acquire()
    assert sem.get_value() == 1
    other.acquire()
    assert sem.get_value() == 2 == other.get_value()
    sem.release()
    other.release()
    assert sem.get_value() == 0


def test_with_statement(url, name):
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)
    with sem as entered:
        assert entered is sem
        assert sem.get_value() == 1
        assert sem.lease is not None and sem.lease.held
    assert sem.get_value() == 0
    with pytest.raises(ZeroDivisionError):
        with sem:
            1 / 0
    assert sem.get_value() == 0


def test_async_with(url, name):
    sem = turnstile.Semaphore(max_leases=1, name=name, url=url)

    async def main():
        async with sem as entered:
            assert entered is sem
            assert sem.get_value() == 1
        assert sem.get_value() == 0
        assert await sem.acquire_async(timeout=1) is True
        assert await sem.acquire_async(timeout=0.2) is False
        assert await sem.release_async() is True

    asyncio.run(main())


def test_errors_name_the_thing(url, name):
    turnstile.Semaphore(max_leases=2, name=name, url=url)
    with pytest.raises(turnstile.CapacityMismatchError, match=name) as e:
        turnstile.Semaphore(max_leases=3, name=name, url=url)
    assert isinstance(e.value, ValueError) and isinstance(e.value, turnstile.TurnstileError)
    assert "\n" not in str(e.value)
    with pytest.raises(turnstile.InvalidArgumentError):
        turnstile.Semaphore(name="", url=url)
    with pytest.raises(ValueError, match="max_leases"):
        turnstile.Semaphore(max_leases=0, name=name, url=url)


def test_bad_url_and_unreachable_coordinator(name):
    with pytest.raises(turnstile.InvalidURLError, match="nope://x"):
        turnstile.Semaphore(name=name, url="nope://x")
    with pytest.raises(turnstile.InvalidURLError, match="relative"):
        turnstile.Semaphore(name=name, url="file://relative/dir")
    with pytest.raises(turnstile.ConnectError, match="127.0.0.1:1") as e:
        turnstile.Semaphore(name=name, url="tcp://127.0.0.1:1")
    assert isinstance(e.value, ConnectionError)
    assert "\n" not in str(e.value)


def test_default_url_is_turnstile_url(monkeypatch, tmp_path, name):
    monkeypatch.setenv("TURNSTILE_URL", "file://" + str(tmp_path))
    sem = turnstile.Semaphore(name=name)
    assert sem.url == "file://" + str(tmp_path)
    monkeypatch.delenv("TURNSTILE_URL")
    assert turnstile.default_url().startswith("file:///")


def test_name_none_makes_a_fresh_name(url):
    a = turnstile.Semaphore(url=url)
    b = turnstile.Semaphore(url=url)
    assert a.name != b.name and a.name.startswith("semaphore-")
    assert a.acquire(timeout=0) and b.acquire(timeout=0)


def test_lease_info(url, name):
    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    sem.acquire()
    sem.acquire()
    first, second = sem.leases
    assert second.fencing_token > first.fencing_token
    assert first.lease_id != second.lease_id
    assert first.semaphore == name and len(first.session) == 16
    assert first.lost is None and first.held
    assert first.wait_lost(timeout=0.1) is None
    sem.release()  # the oldest first, as Dask does
    assert not first.held and second.held
    sem.release()
    sem.acquire()
    assert sem.lease.fencing_token > second.fencing_token
    sem.release()


def test_lost_lease_is_reported(url, name):
    sem = turnstile.Semaphore(name=name, url=url)
    sem.acquire()
    lease = sem.lease
    seen = []
    lease.on_lost(seen.append)

    async def watch():
        return await lease.wait_lost_async()

    async def main():
        waiter = asyncio.ensure_future(watch())
        await asyncio.sleep(0)
        with pytest.warns(RuntimeWarning):
            turnstile.Semaphore(name=name, url=url, register=False).close()
        return await asyncio.wait_for(waiter, 30)

    assert asyncio.run(main()) == "closed"
    assert lease.wait_lost(timeout=30) == "closed"
    wait_until("the on_lost callback", lambda: seen == ["closed"])
    assert sem.release() is False  # lost, so not released by this call


def test_lock(url, name):
    lock = turnstile.Lock(name, url=url)
    other = pickle.loads(pickle.dumps(lock))
    assert isinstance(other, turnstile.Lock) and other.max_leases == 1
    assert not lock.locked()
    with lock:
        assert lock.locked() and other.locked()
        assert other.acquire(timeout=0) is False
    assert other.acquire(timeout=0) is True
    other.release()


def test_threads_share_one_semaphore(url, name):
    import threading

    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    inside = []
    most = []
    guard = threading.Lock()

    def work():
        for _ in range(5):
            with sem:
                with guard:
                    inside.append(1)
                    most.append(len(inside))
                time.sleep(0.01)
                with guard:
                    inside.pop()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(most) <= 2
    assert sem.get_value() == 0
