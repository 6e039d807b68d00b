"""Acquire+release pairs per second from Python: turnstile's package against Dask's
`distributed.Semaphore` on a local scheduler, in the same run, and against the Rust blocking
client it wraps (the Python call's overhead). Run by `bench/python.sh`, which builds what it
needs; prints a Markdown table.

Every measurement loops `acquire()` then `release()` for DURATION seconds after a warm-up.
"1 thread" is one loop in this process; "16 processes" is 16 spawned processes looping at once
on one semaphore of capacity 16 (so never waiting for each other: the figure is throughput).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_turnstile(binary: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--http", "off", "--in-memory"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc, "tcp://" + line.split()[-1]


def start_dask_scheduler() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"tcp://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, address
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the Dask scheduler did not start")
            time.sleep(0.1)


def make_semaphore(kind: str, target: str, name: str, capacity: int):
    """The semaphore under test, plus whatever must stay alive with it."""
    if kind == "turnstile":
        import turnstile

        return turnstile.Semaphore(max_leases=capacity, name=name, url=target), None
    from distributed import Client, Semaphore

    client = Client(target, set_as_default=True)
    return Semaphore(max_leases=capacity, name=name), client


def loop(sem, seconds: float, samples: list | None) -> int:
    """Pairs done in `seconds`; per-pair latencies (ns) into `samples` if given."""
    pairs = 0
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    while True:
        t = clock()
        if t >= end:
            return pairs
        sem.acquire()
        sem.release()
        if samples is not None:
            samples.append(clock() - t)
        pairs += 1


def one_thread(kind: str, target: str, seconds: float) -> dict:
    sem, keep = make_semaphore(kind, target, f"bench-{kind}-{uuid.uuid4().hex[:8]}", 1)
    loop(sem, 1.0, None)  # warm-up
    samples: list = []
    start = time.perf_counter()
    pairs = loop(sem, seconds, samples)
    took = time.perf_counter() - start
    if keep is not None:
        keep.close()
    samples.sort()
    return {
        "pairs_per_s": pairs / took,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
    }


def _worker(kind, target, name, capacity, seconds, barrier, out):
    sem, keep = make_semaphore(kind, target, name, capacity)
    loop(sem, 0.5, None)
    barrier.wait()
    start = time.perf_counter()
    pairs = loop(sem, seconds, None)
    out.put((pairs, time.perf_counter() - start))
    if keep is not None:
        keep.close()


def processes(kind: str, target: str, seconds: float, n: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(n)
    out = ctx.Queue()
    name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    procs = [
        ctx.Process(target=_worker, args=(kind, target, name, n, seconds, barrier, out))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(60)
    pairs = sum(r[0] for r in results)
    took = statistics.mean(r[1] for r in results)
    return {"pairs_per_s": pairs / took}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turnstile-bin", required=True)
    ap.add_argument("--rust-pairs", required=True, help="the blocking_pairs example binary")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    rows = []
    server, url = start_turnstile(args.turnstile_bin)
    scheduler, address = start_dask_scheduler()
    tmp = tempfile.mkdtemp(prefix="turnstile-bench-")
    file_url = "file://" + tmp
    try:
        # Rounds interleave the peers, so that a change of load on this shared machine hits
        # all of them; each row is the median round (by pairs/s).
        runs: dict = {}
        overhead = []

        def record(label, r):
            runs.setdefault(label, []).append(r)

        for _ in range(args.rounds):
            out = subprocess.check_output([args.rust_pairs, url, str(args.duration)], text=True)
            rust = json.loads(out)
            rust = {
                "pairs_per_s": rust["pairs"] / rust["seconds"],
                "p50_us": rust["p50_us"],
                "p99_us": rust["p99_us"],
            }
            record("Rust blocking client, tcp, 1 thread", rust)
            py = one_thread("turnstile", url, args.duration)
            record("turnstile (Python), tcp, 1 thread", py)
            overhead.append(py["p50_us"] / rust["p50_us"] - 1)
            record("distributed.Semaphore, 1 thread", one_thread("dask", address, args.duration))
        record("turnstile (Python), file, 1 thread", one_thread("turnstile", file_url, args.duration))
        for _ in range(args.rounds):
            record(
                f"turnstile (Python), tcp, {args.procs} processes",
                processes("turnstile", url, args.duration, args.procs),
            )
            record(
                f"distributed.Semaphore, {args.procs} processes",
                processes("dask", address, args.duration, args.procs),
            )
        record(
            f"turnstile (Python), file, {args.procs} processes",
            processes("turnstile", file_url, args.duration, args.procs),
        )
        for label, rs in runs.items():
            r = sorted(rs, key=lambda r: r["pairs_per_s"])[len(rs) // 2]
            rows.append((label, r["pairs_per_s"], r.get("p50_us"), r.get("p99_us")))
    finally:
        server.kill()
        scheduler.kill()

    dask = {r[0].split(",")[-1].strip(): r[1] for r in rows if r[0].startswith("distributed")}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{args.duration}s per measurement, median of {args.rounds} interleaved rounds, "
        f"{os.cpu_count()} cores, load average at the end {load}"
    )
    print()
    print("| measurement | pairs/s | p50 µs | p99 µs | vs Dask |")
    print("|---|---:|---:|---:|---:|")
    for label, rate, p50, p99 in rows:
        scope = label.split(",")[-1].strip()
        ratio = f"{rate / dask[scope]:.0f}x" if scope in dask and not label.startswith("Rust") else ""
        fmt = lambda v: "" if v is None else f"{v:,.0f}"  # noqa: E731
        print(f"| {label} | {rate:,.0f} | {fmt(p50)} | {fmt(p99)} | {ratio} |")
    print()
    print(
        "Python call over the Rust blocking client, tcp pair p50, per round: "
        + ", ".join(f"{o * 100:+.0f}%" for o in overhead)
        + f" (median {statistics.median(overhead) * 100:+.0f}%)"
    )

if __name__ == "__main__":
    main()
