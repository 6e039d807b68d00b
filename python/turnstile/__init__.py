"""turnstile: named counting semaphores whose slots are leases.

:class:`Semaphore` takes the arguments of ``distributed.Semaphore`` (``max_leases=1``,
``name=None``) and raises its errors, but needs no Dask scheduler: the URL picks the backend,
``tcp://HOST:PORT`` for a coordinator (``turnstile serve``) or ``file:///DIR`` for a directory
shared by the processes of one host (or of many, over NFS). With no URL, ``TURNSTILE_URL`` is
used, else the same per-user local directory as the ``turnstile`` command.

A semaphore can be pickled (to ``Pool.map``, a Pool initializer, ``ProcessPoolExecutor``,
Dask's ``client.map``) and survives ``fork``: each process gets its own session, made on first
use, and holds only the leases it acquired itself.

The client is the Rust ``turnstile-client`` library (sessions, keep-alive, retries, backends),
driven by the Python thread that waits in a call (with the GIL released; no thread switch per
call) and, while no thread waits, by a background thread per process, so a lease stays alive
while Python code holds the GIL for a long time.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import datetime
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Deque, Optional, Tuple, Union

from . import _native
from ._errors import (
    AcquireTimeout,
    CapacityMismatchError,
    ConnectError,
    InvalidArgumentError,
    InvalidURLError,
    LeaseLostError,
    ProtocolError,
    ReleasedTooOftenError,
    SemaphoreClosedError,
    SessionLostError,
    StorageError,
    TurnstileError,
)

__all__ = [
    "Semaphore",
    "Lock",
    "Lease",
    "JobAttempt",
    "JobCompleted",
    "JobRunning",
    "GroupSummary",
    "OnceResult",
    "begin_job",
    "run_once",
    "wait_group",
    "reset_job",
    "default_url",
    "TurnstileError",
    "InvalidURLError",
    "InvalidArgumentError",
    "CapacityMismatchError",
    "ConnectError",
    "StorageError",
    "SemaphoreClosedError",
    "ReleasedTooOftenError",
    "LeaseLostError",
    "SessionLostError",
    "AcquireTimeout",
    "ProtocolError",
]

__version__ = "0.1.0"

Timeout = Union[None, int, float, str, datetime.timedelta]

_UNITS = {
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)\s*$")


def _seconds(value: Timeout, what: str = "timeout") -> Optional[float]:
    """A timeout as seconds: a number, a ``timedelta`` or a string such as ``"200ms"`` (as
    Dask accepts), or ``None`` for no limit."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a number of seconds, not a bool")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value.lower())
        if m and m.group(2) in _UNITS:
            return float(m.group(1)) * _UNITS[m.group(2)]
        raise ValueError(f"{what} {value!r} is not a duration such as '200ms', '5s' or '2m'")
    raise TypeError(f"{what} must be seconds, a timedelta or a string, not {type(value).__name__}")


def default_url() -> str:
    """The URL used when none is given: ``TURNSTILE_URL``, else the ``turnstile`` command's
    local default (``file://`` in ``$XDG_RUNTIME_DIR/turnstile`` or ``/tmp/turnstile-$UID``)."""
    return _native.default_url()


_exit_hook_pid = 0


def _ensure_exit_hook() -> None:
    """Ends this process's sessions cleanly when it exits, so that its leases are freed at
    once rather than at the session TTL. Registered once per process: after ``fork`` the
    parent's registrations of ``multiprocessing`` are gone (its workers leave through
    ``os._exit``, which runs its finalizers but not ``atexit``)."""
    global _exit_hook_pid
    pid = os.getpid()
    if _exit_hook_pid == pid:
        return
    _exit_hook_pid = pid
    atexit.register(_shutdown_if_same_process, pid)
    try:
        import multiprocessing.util as mp_util

        mp_util.Finalize(None, _shutdown_if_same_process, args=(pid,), exitpriority=0)
    except Exception:  # pragma: no cover - multiprocessing unavailable
        pass


def _shutdown_if_same_process(pid: int) -> None:
    if os.getpid() == pid:
        _native.shutdown()


class Lease:
    """A held permit of a :class:`Semaphore`: the lease, with its fencing token.

    ``lost`` says whether (and why) the lease was lost: its session expired while the client
    was cut off for a TTL, the semaphore was closed, or a supervisor ended the session. Pass
    ``fencing_token`` to the protected resource so that it can refuse a holder whose lease was
    lost while it was paused.
    """

    __slots__ = ("_native",)

    def __init__(self, native: Any) -> None:
        self._native = native

    @property
    def lease_id(self) -> int:
        """The lease id (unique within its session)."""
        return self._native.lease_id

    @property
    def fencing_token(self) -> int:
        """Strictly greater than that of every earlier grant of this semaphore."""
        return self._native.fencing_token

    @property
    def semaphore(self) -> str:
        """The semaphore's name."""
        return self._native.semaphore

    @property
    def session(self) -> str:
        """The session that holds it, as 16 hex digits."""
        return self._native.session

    @property
    def lost(self) -> Optional[str]:
        """``None`` while held; else why it was lost: ``"expired"``, ``"closed"``,
        ``"session ended"``, ``"unreachable"`` or ``"forgotten"`` (a restarted coordinator
        no longer had it when the session was resumed)."""
        return self._native.lost

    @property
    def held(self) -> bool:
        """Whether it is still held by this process (neither released nor lost)."""
        return self._native.held

    def release(self) -> bool:
        """Releases it: ``True`` if it was held until now, ``False`` if it had been released or
        lost already (as far as this process knows).

        It returns once the release is sent (on tcp: written to the coordinator's connection),
        without waiting for the answer: this process's later calls come after it, and other
        processes see the slot free a moment later. A release that cannot be delivered is
        sent again after a reconnect; if the process dies first, the slot comes back when its
        session's TTL passes."""
        return self._native.release()

    def wait_lost(self, timeout: Timeout = None) -> Optional[str]:
        """Blocks until the lease is lost (the reason), at most ``timeout`` (then ``None``)."""
        return self._native.wait_lost(_seconds(timeout))

    def on_lost(self, callback: Callable[[str], Any]) -> None:
        """Calls ``callback(reason)`` from another thread (the background thread, or one
        waiting in a blocking call) if the lease is lost (never if it is released first)."""
        self._native.on_lost(callback)

    async def wait_lost_async(self) -> str:
        """Waits (without blocking the event loop) until the lease is lost; the reason.
        Pending forever while it is held or after it is released."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()

        def settle(reason: str) -> None:
            if not fut.done():
                fut.set_result(reason)

        self._native.on_lost(lambda reason: loop.call_soon_threadsafe(settle, reason))
        return await fut

    def __repr__(self) -> str:
        state = "held" if self.held else (f"lost ({self.lost})" if self.lost else "released")
        return (
            f"<turnstile.Lease {self.semaphore!r} id={self.lease_id} "
            f"token={self.fencing_token} {state}>"
        )


def _rebuild(cls: type, max_leases: int, name: str, url: str, session_ttl: Optional[float]) -> Any:
    return cls._unpickled(max_leases, name, url, session_ttl)


class Semaphore:
    """A semaphore with ``max_leases`` slots shared by every process that names it.

    The same arguments and defaults as ``distributed.Semaphore``: ``name=None`` makes a fresh
    unique name. ``url=None`` means ``TURNSTILE_URL``, else the local default (see
    :func:`default_url`). ``session_ttl`` (seconds) is how long the backend keeps this
    process's leases after it stops hearing from it; ``None`` takes the backend's default.

    Creating it connects (once per process and URL) and creates the semaphore, or checks that
    it exists with the same ``max_leases`` (:class:`CapacityMismatchError` otherwise); with
    ``register=False`` that happens on first use instead.

    Unlike Dask's, waiters are served first come, first served, the client of a process that
    is cut off gives its leases up before the backend may grant them to others, and each held
    lease (:attr:`lease`) carries a fencing token and reports its loss.
    """

    def __init__(
        self,
        max_leases: int = 1,
        name: Optional[str] = None,
        url: Optional[str] = None,
        *,
        session_ttl: Timeout = None,
        register: bool = True,
    ) -> None:
        if isinstance(max_leases, bool) or not isinstance(max_leases, int):
            raise TypeError(f"max_leases must be an int, not {type(max_leases).__name__}")
        self.name: str = name if name is not None else "semaphore-" + uuid.uuid4().hex
        self.max_leases: int = max_leases
        self.url: str = url if url is not None else _native.default_url()
        self.session_ttl: Optional[float] = _seconds(session_ttl, "session_ttl")
        self._core = _native.SemaphoreCore(self.url, self.name, max_leases, self.session_ttl)
        self._pid = os.getpid()
        self._leases: Deque[Lease] = collections.deque()
        self._closed = False
        _ensure_exit_hook()
        if register:
            self._core.connect()

    @classmethod
    def _unpickled(
        cls, max_leases: int, name: str, url: str, session_ttl: Optional[float]
    ) -> "Semaphore":
        sem = object.__new__(cls)
        Semaphore.__init__(sem, max_leases, name, url, session_ttl=session_ttl, register=False)
        return sem

    def __reduce__(self) -> Tuple[Any, ...]:
        # The same semaphore (name, capacity, URL); never the leases, which are this
        # process's. Connecting is left to the first use in the receiving process.
        return (_rebuild, (type(self), self.max_leases, self.name, self.url, self.session_ttl))

    def _check(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            # A forked child: the parent's leases are not ours (the native objects know it
            # and neither release nor keep them).
            self._pid = pid
            self._leases = collections.deque()
            _ensure_exit_hook()
        if self._closed:
            raise SemaphoreClosedError(f"Semaphore `{self.name}` not known or already closed.")

    def acquire(self, timeout: Timeout = None) -> bool:
        """Waits for a slot: ``True`` once held, ``False`` if ``timeout`` (seconds, a
        ``timedelta`` or a string like ``"200ms"``) passed first; ``timeout=0`` tries once.

        The GIL is released while waiting, and Ctrl-C interrupts the wait
        (``KeyboardInterrupt``), withdrawing the queued acquire.
        """
        self._check()
        lease = self._core.acquire(_seconds(timeout))
        if lease is None:
            return False
        self._leases.append(Lease(lease))
        return True

    async def acquire_async(self, timeout: Timeout = None) -> bool:
        """:meth:`acquire` for asyncio: waits without blocking the event loop. Cancelling the
        awaiting task withdraws the queued acquire (and frees the slot if it was granted in
        the meantime)."""
        self._check()
        loop = asyncio.get_running_loop()
        if not self._core.connected:
            # Connecting (once per process) waits for the backend: not on the event loop.
            await loop.run_in_executor(None, self._core.connect)
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(lease: Any, error: Optional[BaseException]) -> None:
            if fut.done():
                # Cancelled meanwhile: the lease (if any) is dropped here, which releases it.
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(lease)

        def done(lease: Any, error: Optional[BaseException]) -> None:
            # Called on the client's thread.
            try:
                loop.call_soon_threadsafe(settle, lease, error)
            except RuntimeError:
                pass  # the loop is closed: dropping the lease releases it

        pending = self._core.acquire_async(done, _seconds(timeout))
        try:
            lease = await fut
        except asyncio.CancelledError:
            pending.cancel()
            raise
        if lease is None:
            return False
        self._leases.append(Lease(lease))
        return True

    def release(self) -> bool:
        """Releases the oldest lease this object holds (in this process). Raises
        :class:`ReleasedTooOftenError` (a ``RuntimeError``, "Released too often") if it holds
        none. ``False`` if the lease had been lost meanwhile. Returns once the release is
        sent, without waiting for the coordinator's answer (see :meth:`Lease.release`)."""
        self._check_pid_only()
        try:
            lease = self._leases.popleft()
        except IndexError:
            raise ReleasedTooOftenError("Released too often") from None
        return lease.release()

    async def release_async(self) -> bool:
        """:meth:`release` for asyncio: sends the release from a thread (on the file
        backend it is done there)."""
        self._check_pid_only()
        try:
            lease = self._leases.popleft()
        except IndexError:
            raise ReleasedTooOftenError("Released too often") from None
        return await asyncio.get_running_loop().run_in_executor(None, lease.release)

    def _check_pid_only(self) -> None:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._leases = collections.deque()

    def get_value(self) -> int:
        """The number of leases held now on this semaphore, by every process."""
        self._check()
        return self._core.counts()[0]

    def get_waiting(self) -> int:
        """The number of acquires waiting now on this semaphore, by every process."""
        self._check()
        return self._core.counts()[1]

    @property
    def lease(self) -> Optional[Lease]:
        """The newest lease this object holds in this process, or ``None``."""
        self._check_pid_only()
        return self._leases[-1] if self._leases else None

    @property
    def leases(self) -> Tuple[Lease, ...]:
        """Every lease this object holds in this process, oldest first."""
        self._check_pid_only()
        return tuple(self._leases)

    def close(self) -> None:
        """Closes the semaphore for everyone: holders lose their leases, and later acquires
        (of any process) raise :class:`SemaphoreClosedError`. Warns (``RuntimeWarning``) if
        leases were still held. Closing twice does nothing. A closed name cannot be reused."""
        self._check_pid_only()
        if self._closed:
            return
        held = len(self._leases)
        try:
            held = max(held, self._core.counts()[0])
        except SemaphoreClosedError:
            pass
        if held:
            warnings.warn(
                f"Closing semaphore {self.name} but there remain {held} unreleased leases",
                RuntimeWarning,
                stacklevel=2,
            )
        self._core.close()
        self._closed = True
        self._leases.clear()

    def __enter__(self) -> "Semaphore":
        if not self.acquire():  # pragma: no cover - acquire without timeout returns True
            raise AcquireTimeout(f"Semaphore `{self.name}`: not acquired")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    async def __aenter__(self) -> "Semaphore":
        await self.acquire_async()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release_async()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__}: name={self.name} max_leases={self.max_leases} "
            f"url={self.url}>"
        )


class Lock(Semaphore):
    """A lock shared by every process that names it: a :class:`Semaphore` with one slot."""

    def __init__(
        self,
        name: Optional[str] = None,
        url: Optional[str] = None,
        *,
        session_ttl: Timeout = None,
        register: bool = True,
    ) -> None:
        super().__init__(1, name, url, session_ttl=session_ttl, register=register)

    @classmethod
    def _unpickled(
        cls, max_leases: int, name: str, url: str, session_ttl: Optional[float]
    ) -> "Lock":
        lock = object.__new__(cls)
        Lock.__init__(lock, name, url, session_ttl=session_ttl, register=False)
        return lock

    def locked(self) -> bool:
        """Whether some process holds the lock."""
        return self.get_value() > 0


# ---- run-once jobs -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobCompleted:
    """The job has completed: do not run it again."""

    job: str
    #: Who ran it ("host:pid").
    client: str
    #: The fencing token of the attempt that completed it.
    fencing_token: int
    #: When that attempt started (seconds since the epoch, by its runner's clock).
    started: float
    #: How long it ran, in seconds.
    duration: float


@dataclass(frozen=True)
class JobRunning:
    """Another attempt runs the job now."""

    job: str
    #: Who runs it ("host:pid").
    client: str
    #: Its fencing token.
    fencing_token: int
    #: How long it has been running, in seconds.
    running_for: float


@dataclass(frozen=True)
class GroupSummary:
    """A job group's state."""

    #: Jobs known in the group.
    jobs: int
    #: Jobs completed.
    completed: int
    #: Jobs running.
    running: int
    #: Failed attempts of its jobs (since their last reset).
    failures: int


class JobAttempt:
    """This attempt runs the job: it holds the job's exclusive lease. End it with
    :meth:`succeed` or :meth:`fail`, or use it as a context manager (success unless the block
    raises). An attempt that is dropped, or whose process dies, counts as failed and the next
    attempt takes over."""

    __slots__ = ("_native",)

    def __init__(self, native: Any) -> None:
        self._native = native

    @property
    def job(self) -> str:
        """The job's name."""
        return self._native.job

    @property
    def fencing_token(self) -> int:
        """Strictly greater than that of every earlier attempt at this job."""
        return self._native.fencing_token

    @property
    def lost(self) -> Optional[str]:
        """Why the job's lease was lost, or ``None``."""
        return self._native.lost

    def succeed(self) -> None:
        """Records the job's completion: no later attempt runs it. Raises
        :class:`LeaseLostError` if the lease was lost first (nothing was recorded)."""
        self._native.succeed()

    def fail(self, reason: str = "failed") -> None:
        """Records a failed attempt, so that the next attempt runs the job."""
        self._native.fail(reason)

    def __enter__(self) -> "JobAttempt":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.succeed()
        else:
            self.fail(f"{exc_type.__name__}: {exc}")

    def __repr__(self) -> str:
        return f"<turnstile.JobAttempt {self.job!r} token={self.fencing_token}>"


def begin_job(
    job: str,
    group: Optional[str] = None,
    *,
    wait: bool = True,
    timeout: Timeout = None,
    url: Optional[str] = None,
    session_ttl: Timeout = None,
) -> Union[JobAttempt, JobCompleted, JobRunning, None]:
    """Starts an attempt at run-once job ``job`` (in ``group``, if given), with the rules of
    ``turnstile once``: a :class:`JobAttempt` if this attempt is to run it, a
    :class:`JobCompleted` if it has completed. While another attempt runs it, waits for that
    one to end (at most ``timeout``, then ``None``), or with ``wait=False`` returns a
    :class:`JobRunning` at once."""
    _ensure_exit_hook()
    out = _native.begin_job(
        url if url is not None else _native.default_url(),
        job,
        group,
        wait,
        _seconds(timeout),
        _seconds(session_ttl, "session_ttl"),
    )
    if out is None:
        return None
    kind, value = out
    if kind == "run":
        return JobAttempt(value)
    if kind == "completed":
        return JobCompleted(job=job, **value)
    return JobRunning(job=job, **value)


@dataclass(frozen=True)
class OnceResult:
    """What :func:`run_once` did."""

    #: Whether this call ran the function.
    ran: bool
    #: The function's result when it ran, else ``None``.
    value: Any = None
    #: The completion record when it did not run (completed before, or by another attempt).
    completed: Optional[JobCompleted] = None
    #: The attempt running it, when ``wait=False`` found one.
    running: Optional[JobRunning] = None


def run_once(
    job: str,
    fn: Callable[..., Any],
    *args: Any,
    group: Optional[str] = None,
    wait: bool = True,
    timeout: Timeout = None,
    url: Optional[str] = None,
    **kwargs: Any,
) -> OnceResult:
    """Runs ``fn(*args, **kwargs)`` as run-once job ``job``: exactly once across every
    process that calls this with the same job name, until :func:`reset_job`. If ``fn``
    raises, the attempt is recorded as failed, the exception propagates, and a later call
    runs it again. Raises :class:`AcquireTimeout` if ``timeout`` passed while another
    attempt was running it."""
    start = begin_job(job, group, wait=wait, timeout=timeout, url=url)
    if start is None:
        raise AcquireTimeout(f"job `{job}`: still running elsewhere after the timeout")
    if isinstance(start, JobCompleted):
        return OnceResult(ran=False, completed=start)
    if isinstance(start, JobRunning):
        return OnceResult(ran=False, running=start)
    with start:
        value = fn(*args, **kwargs)
    return OnceResult(ran=True, value=value)


def wait_group(
    group: str,
    jobs: int = 0,
    timeout: Timeout = None,
    *,
    url: Optional[str] = None,
) -> Optional[GroupSummary]:
    """Waits until no job of ``group`` is running and at least ``jobs`` of its jobs have
    completed (the rules of ``turnstile wait``): the group's summary, or ``None`` if
    ``timeout`` passed first."""
    out = _native.wait_group(
        url if url is not None else _native.default_url(), group, jobs, _seconds(timeout)
    )
    return None if out is None else GroupSummary(*out)


def reset_job(job: str, *, url: Optional[str] = None) -> bool:
    """Forgets job ``job``'s completion, so that its next attempt runs it. Whether it had
    completed."""
    return _native.reset_job(url if url is not None else _native.default_url(), job)
