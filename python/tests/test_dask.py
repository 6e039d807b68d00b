"""A real Dask cluster (LocalCluster with worker processes) limited by turnstile's semaphore."""

from __future__ import annotations

import os

import pytest

import turnstile
from helpers import dask_task, max_overlap

if os.environ.get("TURNSTILE_REQUIRE_DASK"):
    import distributed  # noqa: F401  (the suite runner installed it: failing is right)
else:
    distributed = pytest.importorskip("distributed")


def test_client_map_at_most_n(url, name):
    from distributed import Client, LocalCluster

    sem = turnstile.Semaphore(max_leases=2, name=name, url=url)
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        futures = client.map(dask_task, range(20), sem=sem, pure=False)
        results = client.gather(futures)
    assert sorted(r[0] for r in results) == list(range(20))
    most = max_overlap([(r[1], r[2]) for r in results])
    assert most <= 2
    assert most == 2
    assert sem.get_value() == 0
