"""Fixtures: a real coordinator (`turnstile serve --in-memory` on a free port) for the tcp
backend, a fresh directory for the file backend, and `url`, parametrized over both.

The coordinator is the binary built from this workspace: `TURNSTILE_BIN` (set by the Rust test
that runs this suite, `crates/turnstile/tests/python.rs`), else `target/debug/turnstile`.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
import uuid

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

#: The test coordinator's default session TTL: long, so that a test whose dead holder's slot
#: comes back quickly shows that the client's own `session_ttl` (shorter) was used.
SESSION_TTL = "30s"

#: Deadline for things that take well under a second on an idle machine.
SOON = 30.0


def turnstile_bin() -> str:
    path = os.environ.get("TURNSTILE_BIN") or str(REPO / "target" / "debug" / "turnstile")
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"no turnstile binary at {path}: build it (cargo build -p turnstile) or set TURNSTILE_BIN",
            pytrace=False,
        )
    return path


class Server:
    """A `turnstile serve` process; killed at the end of the session."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [
                turnstile_bin(),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "off",
                "--in-memory",
                "--session-ttl",
                SESSION_TTL,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()))
        reader.start()
        reader.join(SOON)
        first = line[0] if line else ""
        prefix = "listening on 127.0.0.1:"
        if not first.startswith(prefix):
            self.proc.kill()
            pytest.fail(f"turnstile serve did not print its address: {first!r}", pytrace=False)
        self.url = "tcp://127.0.0.1:" + first[len(prefix) :].strip()
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(params=["tcp", "file"])
def url(request, tmp_path_factory):
    """A URL of each backend: the session's coordinator, or a fresh shared directory."""
    if request.param == "tcp":
        return request.getfixturevalue("server").url
    return "file://" + str(tmp_path_factory.mktemp("turnstile-dir"))


@pytest.fixture
def name() -> str:
    """A fresh semaphore name (closed names cannot be reused)."""
    return "test-" + uuid.uuid4().hex[:12]


def wait_until(what: str, check, timeout: float = SOON):
    """Polls `check` until it returns a true value; fails naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(0.02)


sys.path.insert(0, str(pathlib.Path(__file__).parent))
