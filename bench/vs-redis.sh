#!/usr/bin/env bash
# Turnstile against Redis doing the same lock work, interleaved so that both see the same
# machine: ROUNDS rounds of (Redis, turnstile in-memory, turnstile --fsync batch), each a
# DURATION run of CLIENTS clients with one connection each and equal, bare-protocol clients
# (`turnstile bench --client raw`; Redis: SET k v NX PX 10000, then DEL k). Prints every round
# and the median ratios. The machine has 2 cores shared by the server and the load generator,
# so a single run moves by +-15%; read the medians.
#
#   bash bench/vs-redis.sh
#   ROUNDS=7 CLIENTS=64 DURATION=3s bash bench/vs-redis.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p turnstile --quiet
T=target/release/turnstile
ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-64}
D=${DURATION:-3s}

source bench/redis.sh

rate() { sed -E 's/.*"pairs_per_sec":([0-9.]+).*/\1/'; }
common=(--json --duration "$D" --warmup 1s --clients "$CLIENTS")
mem_ratios=() batch_ratios=()
printf '%-6s %10s %12s %12s %8s %8s\n' round redis in-memory batch mem/r batch/r
for r in $(seq "$ROUNDS"); do
  redis=$("$T" bench "${common[@]}" --scenario redis --redis "127.0.0.1:$REDIS_PORT" | rate)
  mem=$("$T" bench "${common[@]}" --scenario uncontended --client raw --storage in-memory | rate)
  batch=$("$T" bench "${common[@]}" --scenario uncontended --client raw --storage batch | rate)
  m=$(awk -v a="$mem" -v b="$redis" 'BEGIN { printf "%.2f", a / b }')
  b=$(awk -v a="$batch" -v b="$redis" 'BEGIN { printf "%.2f", a / b }')
  mem_ratios+=("$m") batch_ratios+=("$b")
  printf '%-6s %10.0f %12.0f %12.0f %7sx %7sx\n' "$r" "$redis" "$mem" "$batch" "$m" "$b"
done
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo
echo "median over $ROUNDS rounds, $CLIENTS clients: in-memory = $(median "${mem_ratios[@]}")x Redis (target 1.0x), --fsync batch = $(median "${batch_ratios[@]}")x Redis (target 0.5x)"
