"""Type stubs of the native module (Rust, PyO3). Use the public API of :mod:`turnstile`."""

from typing import Any, Callable, Optional, Tuple

class SemaphoreCore:
    """A semaphore as one process sees it; connects lazily, once per process."""

    def __init__(
        self, url: str, name: str, capacity: int, session_ttl: Optional[float] = None
    ) -> None: ...
    @property
    def connected(self) -> bool:
        """Whether this process has connected."""
    def connect(self) -> None:
        """Connects and creates (or checks) the semaphore."""
    def acquire(self, timeout: Optional[float] = None, weight: int = 1) -> Optional[Lease]:
        """Blocks for a permit (GIL released, Ctrl-C interrupts); ``None`` on timeout."""
    def acquire_async(
        self,
        callback: Callable[[Optional[Lease], Optional[BaseException]], Any],
        timeout: Optional[float] = None,
        weight: int = 1,
    ) -> PendingAcquire:
        """Starts an acquire; ``callback`` runs on the thread driving the client with its outcome."""
    def counts(self) -> Tuple[int, int]:
        """``(in_use, queued)`` across every client."""
    def close(self) -> bool:
        """Closes the semaphore for everyone; ``False`` if it already was."""
    @property
    def url(self) -> str:
        """The URL."""
    @property
    def name(self) -> str:
        """The name."""
    @property
    def capacity(self) -> int:
        """The capacity."""
    @property
    def session_ttl(self) -> Optional[float]:
        """The session TTL asked for, in seconds."""

class PendingAcquire:
    """An acquire started by :meth:`SemaphoreCore.acquire_async`."""

    def cancel(self) -> None:
        """Withdraws the acquire."""

class Lease:
    """A held permit."""

    @property
    def lease_id(self) -> int:
        """The lease id."""
    @property
    def fencing_token(self) -> int:
        """The fencing token."""
    @property
    def semaphore(self) -> str:
        """The semaphore's name."""
    @property
    def session(self) -> str:
        """The session id, 16 hex digits."""
    @property
    def lost(self) -> Optional[str]:
        """Why the lease was lost, or ``None``."""
    @property
    def held(self) -> bool:
        """Whether it is held by this process."""
    def release(self) -> bool:
        """Releases it (returns once sent, without the answer); ``False`` if it was released
        or lost already."""
    def wait_lost(self, timeout: Optional[float] = None) -> Optional[str]:
        """Blocks until it is lost (the reason) or ``timeout`` passes (``None``)."""
    def on_lost(self, callback: Callable[[str], Any]) -> None:
        """Calls ``callback(reason)`` on the thread driving the client when it is lost."""

class JobAttempt:
    """An attempt holding a run-once job's exclusive lease."""

    @property
    def job(self) -> str:
        """The job's name."""
    @property
    def fencing_token(self) -> int:
        """The attempt's fencing token."""
    @property
    def lost(self) -> Optional[str]:
        """Why the job's lease was lost, or ``None``."""
    def succeed(self) -> None:
        """Records the completion."""
    def fail(self, reason: str) -> None:
        """Records a failed attempt."""

def begin_job(
    url: str,
    job: str,
    group: Optional[str] = None,
    wait: bool = True,
    timeout: Optional[float] = None,
    session_ttl: Optional[float] = None,
) -> Optional[Tuple[str, Any]]:
    """``("run", JobAttempt)``, ``("completed", dict)``, ``("running", dict)`` or ``None``."""

def wait_group(
    url: str,
    group: str,
    jobs: int = 0,
    timeout: Optional[float] = None,
    session_ttl: Optional[float] = None,
) -> Optional[Tuple[int, int, int, int]]:
    """``(jobs, completed, running, failures)``, or ``None`` on timeout."""

def reset_job(url: str, job: str, session_ttl: Optional[float] = None) -> bool:
    """Forgets a job's completion."""

def default_url() -> str:
    """``TURNSTILE_URL``, else the local default."""

def shutdown() -> None:
    """Ends this process's sessions."""
