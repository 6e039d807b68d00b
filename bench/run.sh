#!/usr/bin/env bash
# Measures turnstile beside its peer in one run, on this machine, and prints ratios.
#
#   bash bench/run.sh            # 5 s per measurement
#   DURATION=10s bash bench/run.sh
#
# Peers, measured in the same run:
# - a bare loopback TCP ping-pong (`turnstile bench --scenario echo`), the floor for any
#   request/reply protocol here. Each coordinator figure is an acquire+release pair, i.e. two
#   round trips, so a pair rate of 0.5x the echo rate is the most a round-trip protocol can do;
# - Redis (Debian's redis-server, installed if missing, in memory, no persistence) doing the
#   equivalent lock pair, `SET k v NX PX 10000` then `DEL k`, one connection per client.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p turnstile --quiet
T=target/release/turnstile
D=${DURATION:-5s}
W=${WARMUP:-1s}

source bench/redis.sh

run() { "$T" bench --json --duration "$D" --warmup "$W" "$@"; }

declare -A rate p50 p99
measure() {
  local key=$1; shift
  local out; out=$(run "$@")
  echo "$key $out" >&2
  rate[$key]=$(sed -E 's/.*"pairs_per_sec":([0-9.]+).*/\1/' <<<"$out")
  p50[$key]=$(sed -E 's/.*"p50_us":([0-9]+).*/\1/' <<<"$out")
  p99[$key]=$(sed -E 's/.*"p99_us":([0-9]+).*/\1/' <<<"$out")
}

for c in 1 64; do
  measure "echo/$c" --scenario echo --clients "$c"
  measure "redis/$c" --scenario redis --clients "$c" --redis "127.0.0.1:$REDIS_PORT"
  for s in in-memory batch always; do
    measure "$s/$c" --scenario uncontended --clients "$c" --storage "$s"
  done
  # Bare protocol frames, as the Redis peer sends them: the two servers with equal clients.
  for s in in-memory batch; do
    measure "$s-raw/$c" --scenario uncontended --clients "$c" --storage "$s" --client raw
  done
done
measure "contended/in-memory/64" --scenario contended --clients 64 --capacity 4 --storage in-memory

printf '\n%-26s %12s %9s %9s %10s %10s\n' "measurement" "per sec" "p50 us" "p99 us" "vs echo" "vs redis"
for key in echo/1 redis/1 in-memory/1 in-memory-raw/1 batch/1 batch-raw/1 always/1 \
           echo/64 redis/64 in-memory/64 in-memory-raw/64 batch/64 batch-raw/64 always/64 contended/in-memory/64; do
  c=${key##*/}
  ratio=$(awk -v a="${rate[$key]}" -v b="${rate[echo/$c]}" 'BEGIN { printf "%.2fx", a / b }')
  vs_redis=$(awk -v a="${rate[$key]}" -v b="${rate[redis/$c]}" 'BEGIN { printf "%.2fx", a / b }')
  printf '%-26s %12.0f %9s %9s %10s %10s\n' "$key" "${rate[$key]}" "${p50[$key]}" "${p99[$key]}" "$ratio" "$vs_redis"
done
awk -v m="${rate[in-memory/64]}" -v b="${rate[batch/64]}" -v a="${rate[always/64]}" \
  'BEGIN { printf "\n64 clients: batch = %.2fx in-memory, always = %.2fx in-memory\n", b / m, a / m }'
awk -v m="${rate[in-memory-raw/64]}" -v b="${rate[batch-raw/64]}" -v r="${rate[redis/64]}" \
  'BEGIN { printf "64 clients, equal clients: in-memory = %.2fx Redis (target 1.0x), batch = %.2fx Redis (target 0.5x)\n", m / r, b / r }'
awk -v p="${p50[in-memory/1]}" -v q="${p50[in-memory-raw/1]}" -v e="${p50[echo/1]}" \
  'BEGIN { printf "1 client: pair p50 = %.2fx (library) / %.2fx (raw) one echo round trip p50 (target: within 2x)\n", p / e, q / e }'
