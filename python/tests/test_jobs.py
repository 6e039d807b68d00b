"""Run-once jobs from Python: exactly once across processes, groups, wait for a group."""

from __future__ import annotations

import multiprocessing

import pytest

import turnstile


def _run(args):
    url, job, counter = args

    def work():
        with open(counter, "a") as f:
            f.write("x")
        return "done"

    out = turnstile.run_once(job, work, group="g", url=url)
    return out.ran


def test_run_once_across_processes(url, name, tmp_path):
    counter = str(tmp_path / "runs")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        ran = pool.map(_run, [(url, name, counter)] * 8, chunksize=1)
    assert sum(ran) == 1
    assert open(counter).read() == "x"
    done = turnstile.begin_job(name, url=url)
    assert isinstance(done, turnstile.JobCompleted) and done.fencing_token >= 1
    summary = turnstile.wait_group("g", jobs=1, timeout=10, url=url)
    assert summary is not None and summary.completed >= 1 and summary.running == 0


def test_failed_attempt_runs_again_and_reset(url, name):
    def boom():
        raise ValueError("nope")

    with pytest.raises(ValueError):
        turnstile.run_once(name, boom, url=url)
    out = turnstile.run_once(name, lambda: 42, url=url)
    assert out.ran and out.value == 42
    assert not turnstile.run_once(name, lambda: 43, url=url).ran
    assert turnstile.reset_job(name, url=url) is True
    assert turnstile.run_once(name, lambda: 44, url=url).value == 44


def test_running_elsewhere(url, name):
    attempt = turnstile.begin_job(name, "grp-" + name, url=url)
    assert isinstance(attempt, turnstile.JobAttempt)
    other = turnstile.begin_job(name, url=url, wait=False)
    assert isinstance(other, turnstile.JobRunning)
    assert turnstile.begin_job(name, url=url, timeout=0.2) is None
    assert turnstile.wait_group("grp-" + name, timeout=0.2, url=url) is None
    with attempt:
        pass
    assert isinstance(turnstile.begin_job(name, url=url), turnstile.JobCompleted)
