#!/usr/bin/env bash
# The scale targets of issue 7, on this machine:
# - 100,000 semaphores and 1,000,000 held leases in one coordinator: its resident memory;
# - 100,000 leases expiring at the same moment while a probe client times acquire+release
#   pairs: the probe's p99 and worst pair around the expiry;
# - (issue 14) 200,000 names used once: the probe's worst pair during /metrics and paged
#   status scrapes, and memory after they are forgotten;
# - 10,000 idle sessions keeping alive (default TTL 10 s): the coordinator's CPU share.
#
#   bash bench/scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p turnstile --quiet
T=target/release/turnstile

echo "== 100k semaphores x capacity 10, 1M leases held by 1000 sessions (TTL 5s)"
"$T" bench --scenario scale --semaphores 100000 --capacity 10 --leases 1000000 --clients 1000 --session-ttl 5s
echo "== 100k semaphores x capacity 1, 100k leases held by 1000 sessions, expiring at once"
"$T" bench --scenario scale --semaphores 100000 --capacity 1 --leases 100000 --clients 1000 --session-ttl 5s
echo "== issue 14: 200,000 one-off names; /metrics and the whole paged status scraped while a probe times pairs; memory after --forget-idle"
"$T" bench --scenario scrape --semaphores 200000 --duration 10s --forget-idle 20s
echo "== 10,000 idle sessions keeping alive (TTL 10s: a keep-alive each every 3.3s)"
"$T" bench --scenario keepalive --clients 10000 --session-ttl 10s --duration 10s --warmup 3s
