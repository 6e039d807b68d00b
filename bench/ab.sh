#!/usr/bin/env bash
# Interleaved A/B of two builds of turnstile: BASE (a binary built from another commit, e.g.
# in a `git worktree`) against this tree's release build. Rounds alternate, so that the
# machine's drift hits both alike; compare the two columns, not the absolute figures.
#
#   BASE=/path/to/old/turnstile bash bench/ab.sh [BENCH ARGS...]
#
#   SIDE=server (default): two coordinators side by side, one from each build, loaded in
#                turn by this tree's `turnstile bench` (a change to the coordinator);
#   SIDE=client: one coordinator (this tree's), loaded in turn by each build's `turnstile
#                bench` (a change to the client library).
#   SERVE: how the coordinators keep state (default `--fsync batch`, each in a temporary
#          data directory; or `--in-memory`).
#   SERVE_THREADS: the coordinators' tokio worker threads (default: one per core); e.g. 1 for
#          a coordinator that has one core to itself, as Redis does.
#   ROUNDS (default 5), DURATION (default 3s), WARMUP (default 1s).
#   BENCH ARGS default to `--clients 64 --client library`; e.g. add `--release drop`.
#
# Prints each run's pairs/s and p50, then the median of each column.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${BASE:?set BASE to the turnstile binary to compare against}
[ -x "$base" ] || { echo "ab: $base is not an executable" >&2; exit 1; }
side=${SIDE:-server}
serve=${SERVE:---fsync batch}
rounds=${ROUNDS:-5}
duration=${DURATION:-3s}
warmup=${WARMUP:-1s}
[ $# -gt 0 ] || set -- --clients 64 --client library
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
cargo build --release --locked -q -p turnstile --bin turnstile
new=$target/release/turnstile
tmp=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT

# start NAME BINARY: a coordinator on a free port; prints its URL.
start() {
  local name=$1 bin=$2 args=($serve)
  [ "$serve" = "--in-memory" ] || args+=(--data-dir "$tmp/$name")
  env ${SERVE_THREADS:+TOKIO_WORKER_THREADS=$SERVE_THREADS} \
    "$bin" serve --listen 127.0.0.1:0 --http off "${args[@]}" >"$tmp/$name.out" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 200); do
    grep -q '^listening on ' "$tmp/$name.out" && break
    sleep 0.05
  done
  local addr
  addr=$(sed -n 's/^listening on //p' "$tmp/$name.out")
  [ -n "$addr" ] || { echo "ab: coordinator $name did not start" >&2; exit 1; }
  echo "tcp://$addr"
}

case "$side" in
  server)
    url_base=$(start base "$base")
    url_new=$(start new "$new")
    bench_base=$new bench_new=$new
    ;;
  client)
    url_base=$(start one "$new")
    url_new=$url_base
    bench_base=$base bench_new=$new
    ;;
  *) echo "ab: SIDE is server or client" >&2; exit 1 ;;
esac

field() { sed -nE "s/.*\"$1\":([0-9.]+).*/\1/p"; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "$side side, $rounds rounds of $duration: $*" >&2
for round in $(seq "$rounds"); do
  for which in base new; do
    bin_var=bench_$which url_var=url_$which
    line=$("${!bin_var}" bench --json --duration "$duration" --warmup "$warmup" --url "${!url_var}" "$@")
    pairs=$(field pairs_per_sec <<<"$line")
    p50=$(field p50_us <<<"$line")
    echo "$which $pairs $p50" >>"$tmp/runs"
    printf 'round %s %-4s %9s pairs/s  p50 %6s us\n' "$round" "$which" "$pairs" "$p50"
  done
done
for which in base new; do
  pairs=$(awk -v w=$which '$1 == w {print $2}' "$tmp/runs" | median)
  p50=$(awk -v w=$which '$1 == w {print $3}' "$tmp/runs" | median)
  printf 'median   %-4s %9s pairs/s  p50 %6s us\n' "$which" "$pairs" "$p50"
done
