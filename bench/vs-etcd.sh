#!/usr/bin/env bash
# Turnstile's etcd backend against etcd's own lock (the v3 Lock RPC that `etcdctl lock` uses),
# on one etcd started here (free loopback port, data in a temp dir, stopped by PID), driven by
# the same load generator over the same gRPC client (one HTTP/2 connection per bench client;
# before session 6 both went through etcd's JSON gateway): ROUNDS interleaved rounds of
# (etcd lock, turnstile uncontended) for 1 and 64 clients, then the median ratios. Beside
# each figure: etcd's WAL fsyncs per pair (`etcd_disk_wal_fsync_duration_seconds_count` on
# its /metrics) and etcd's CPU time per pair in ms (utime+stime from /proc/PID/stat), both
# over the warm-up and the measured time, divided by rate x (warm-up + duration).
# Then, on the same etcd, the sustained rate: SUSTAIN (default 30s) of each scenario at one
# client (each side's rate over that span printed too), then ROUNDS more interleaved rounds
# at one client: a backend whose cost per acquire grows with the acquires etcd has served
# (e.g. deleted key names piling up in etcd's index until a compaction) falls behind here.
#
#   bash bench/vs-etcd.sh
#   ROUNDS=5 DURATION=5s SUSTAIN=60s bash bench/vs-etcd.sh
#   TURNSTILE_BIN=/tmp/old/turnstile bash bench/vs-etcd.sh
#   RELEASE=drop bash bench/vs-etcd.sh    # turnstile's permits dropped (see below)
#
# By default turnstile's pair waits for the release's answer, as the lock peer waits for its
# Unlock. RELEASE=drop drops the permit instead, as Rust code that lets a permit go out of
# scope does: the release goes out in the background, beside the next acquire.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "etcd is missing: apt-get install -y etcd-server" >&2; exit 1; }
# TURNSTILE_BIN: another build to measure (e.g. an older commit's, for a before/after).
if [[ -z ${TURNSTILE_BIN:-} ]]; then cargo build --release -p turnstile --quiet; fi
T=${TURNSTILE_BIN:-target/release/turnstile}
ROUNDS=${ROUNDS:-3}
D=${DURATION:-4s}
SUSTAIN=${SUSTAIN:-30s}
RELEASE=${RELEASE:-wait}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
CP=$(port) PP=$(port)
DIR=$(mktemp -d)
etcd --data-dir "$DIR/data" --listen-client-urls "http://127.0.0.1:$CP" \
  --advertise-client-urls "http://127.0.0.1:$CP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
  --initial-cluster "default=http://127.0.0.1:$PP" >"$DIR/etcd.log" 2>&1 &
ETCD_PID=$!
trap 'kill "$ETCD_PID" 2>/dev/null; wait "$ETCD_PID" 2>/dev/null; rm -rf "$DIR"' EXIT
until curl -fs "http://127.0.0.1:$CP/health" >/dev/null 2>&1; do sleep 0.1; done
URL="etcd://127.0.0.1:$CP/bench"

rate() { sed -E 's/.*"pairs_per_sec":([0-9.]+).*/\1/'; }
fsyncs() { curl -fs "http://127.0.0.1:$CP/metrics" | awk '/^etcd_disk_wal_fsync_duration_seconds_count/ { print $2 }'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$ETCD_PID/stat"; }
secs=$(awk -v d="${D%s}" 'BEGIN { print d + 1 }') # warm-up 1 s + duration
# run SCENARIO: prints "rate fsyncs/pair etcd-ms/pair"
run() {
  local f0 c0 r
  f0=$(fsyncs) c0=$(cpu_ticks)
  r=$("$T" bench "${common[@]}" "${@:2}" --scenario "$1" | rate)
  awk -v r="$r" -v f="$(($(fsyncs) - f0))" -v c="$(($(cpu_ticks) - c0))" -v s="$secs" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { n = r * s; printf "%s %.2f %.2f", r, f / n, c * 1000 / hz / n }'
}
median() { printf '%s\n' "$@" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# rounds LABEL: ROUNDS interleaved rounds with the current `common` and `clients`.
rounds() {
  local ratios=() r lock lf lc ours of oc q
  printf '%-6s %8s %10s %12s %8s   %s\n' round clients etcd-lock turnstile ratio \
    "fsyncs/pair, etcd CPU ms/pair (lock | turnstile)"
  for r in $(seq "$ROUNDS"); do
    read -r lock lf lc <<<"$(run etcd-lock)"
    read -r ours of oc <<<"$(run uncontended --release "$RELEASE")"
    q=$(awk -v a="$ours" -v b="$lock" 'BEGIN { printf "%.2f", a / b }')
    ratios+=("$q")
    printf '%-6s %8s %10.0f %12.0f %7sx   %s %s | %s %s\n' "$r" "$clients" "$lock" "$ours" "$q" "$lf" "$lc" "$of" "$oc"
  done
  echo "median over $ROUNDS rounds, $clients clients$1: turnstile on etcd = $(median "${ratios[@]}")x etcd's lock"
}
for clients in 1 64; do
  common=(--json --duration "$D" --warmup 1s --clients "$clients" --url "$URL")
  rounds ""
done
clients=1
common=(--json --duration "$SUSTAIN" --warmup 0s --clients 1 --url "$URL")
ours=$("$T" bench "${common[@]}" --release "$RELEASE" --scenario uncontended | rate)
lock=$("$T" bench "${common[@]}" --scenario etcd-lock | rate)
printf 'sustained load, 1 client, %s each on the same etcd: etcd-lock %.0f, turnstile %.0f pairs/s\n' "$SUSTAIN" "$lock" "$ours"
common=(--json --duration "$D" --warmup 1s --clients 1 --url "$URL")
rounds " after the sustained load"
