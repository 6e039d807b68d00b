"""The exceptions of :mod:`turnstile`: one base class, :class:`TurnstileError`.

Each class also derives from the built-in exception that code written for Dask's or
threading's semaphores already catches (``RuntimeError`` for a closed semaphore or a release
too many, ``ValueError`` for bad arguments, ``ConnectionError`` for an unreachable
coordinator), so that switching to turnstile changes no ``except`` clause.
"""

from __future__ import annotations

__all__ = [
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


class TurnstileError(Exception):
    """The base class of every error turnstile raises."""


class InvalidURLError(TurnstileError, ValueError):
    """The URL cannot be used (unknown scheme, missing port, relative path...)."""


class InvalidArgumentError(TurnstileError, ValueError):
    """The backend refused an argument: an empty or over-long name, a weight above the
    capacity."""


class CapacityMismatchError(TurnstileError, ValueError):
    """The semaphore exists with another ``max_leases``."""


class ConnectError(TurnstileError, ConnectionError):
    """The coordinator cannot be reached."""


class StorageError(TurnstileError, OSError):
    """The file backend's directory, or a file in it, cannot be used."""


class SemaphoreClosedError(TurnstileError, RuntimeError):
    """The semaphore was closed (or never existed): Dask's "not known or already closed"."""


class ReleasedTooOftenError(TurnstileError, RuntimeError):
    """``release()`` with no lease held by this semaphore object: Dask's "Released too
    often"."""


class LeaseLostError(TurnstileError):
    """A lease that a call needed was lost first (for a job: its completion was not
    recorded)."""


class SessionLostError(TurnstileError):
    """The client's session ended while the call was in progress."""


class AcquireTimeout(TurnstileError, TimeoutError):
    """A wait with a timeout (for a job or a group) ran out of time."""


class ProtocolError(TurnstileError):
    """The coordinator broke the protocol (a version mismatch?)."""
