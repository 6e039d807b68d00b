#!/usr/bin/env bash
# Measures turnstile beside its peer in one run, on this machine, and prints ratios.
#
#   bash bench/run.sh            # 5 s per measurement
#   DURATION=10s bash bench/run.sh
#
# Peer: a bare loopback TCP ping-pong (`turnstile bench --scenario echo`), the floor for any
# request/reply protocol here. Each coordinator figure is an acquire+release pair, i.e. two
# round trips, so a pair rate of 0.5x the echo rate is the most a round-trip protocol can do.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p turnstile --quiet
T=target/release/turnstile
D=${DURATION:-5s}
W=${WARMUP:-1s}

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
  for s in in-memory batch always; do
    measure "$s/$c" --scenario uncontended --clients "$c" --storage "$s"
  done
done
measure "contended/in-memory/64" --scenario contended --clients 64 --capacity 4 --storage in-memory

printf '\n%-26s %12s %9s %9s %12s\n' "measurement" "per sec" "p50 us" "p99 us" "vs echo"
for key in echo/1 in-memory/1 batch/1 always/1 echo/64 in-memory/64 batch/64 always/64 contended/in-memory/64; do
  c=${key##*/}
  ratio=$(awk -v a="${rate[$key]}" -v b="${rate[echo/$c]}" 'BEGIN { printf "%.2fx", a / b }')
  printf '%-26s %12.0f %9s %9s %12s\n' "$key" "${rate[$key]}" "${p50[$key]}" "${p99[$key]}" "$ratio"
done
awk -v m="${rate[in-memory/64]}" -v b="${rate[batch/64]}" -v a="${rate[always/64]}" \
  'BEGIN { printf "\n64 clients: batch = %.2fx in-memory, always = %.2fx in-memory\n", b / m, a / m }'
