#!/usr/bin/env bash
# Fail-over latency: a worker that holds a slot (`turnstile run NAME --limit 1 -- sleep`) is
# killed with SIGKILL, as the OOM killer would; how long until the next waiter's command
# starts? Measured with the holder run under `turnstile nanny` (which ends the dead worker's
# session at once) and without it, on the coordinator (session TTL $TTL) and on the file
# backend. Prints every gap and the median, in ms; the waiter's process start-up (`sh`,
# `date`) is included.
#
#   bash bench/nanny-failover.sh               # 5 rounds each; tcp without the nanny waits a TTL per round
#   ROUNDS=9 TTL=5s bash bench/nanny-failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p turnstile --quiet
T=$PWD/target/release/turnstile
ROUNDS=${ROUNDS:-5}
TTL=${TTL:-10s}
export DIR
DIR=$(mktemp -d)
SERVER=
cleanup() {
  [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT

"$T" serve --listen 127.0.0.1:0 --in-memory --session-ttl "$TTL" >"$DIR/serve.out" 2>/dev/null &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$DIR/serve.out" && break; sleep 0.05; done
TCP="tcp://$(sed -n 's/^listening on //p' "$DIR/serve.out")"

# One round; prints the gap in ms. $1: backend URL, $2: "nanny" or "bare".
round() {
  local url=$1 mode=$2 name
  name=failover-$RANDOM$RANDOM
  rm -f "$DIR/holder" "$DIR/granted"
  local holder=("$T" run "$name" --limit 1 --url "$url" -- sh -c \
    'echo "$PPID $$" > "$DIR/holder.tmp" && mv "$DIR/holder.tmp" "$DIR/holder"; exec sleep 1000')
  local sup
  if [ "$mode" = nanny ]; then
    "$T" nanny --restart never --url "$url" -- "${holder[@]}" 2>>"$DIR/nanny.log" &
  else
    "${holder[@]}" &
  fi
  sup=$!
  until [ -e "$DIR/holder" ]; do sleep 0.01; done
  read -r worker command <"$DIR/holder"
  "$T" run "$name" --limit 1 --url "$url" -- sh -c 'date +%s%N > "$DIR/granted"' 2>>"$DIR/waiter.log" &
  local waiter=$!
  until "$T" status "$name" --json --url "$url" | grep -q '"queued":1'; do sleep 0.02; done
  local killed
  killed=$(date +%s%N)
  kill -9 "$worker"
  wait "$waiter"
  echo $((($(cat "$DIR/granted") - killed) / 1000000))
  # Without the nanny the holder's command is an orphan now; with it, it is already gone.
  kill -9 "$command" 2>/dev/null || true
  wait "$sup" 2>/dev/null || true
}

measure() {
  local label=$1 url=$2 mode=$3 gaps=()
  for _ in $(seq "$ROUNDS"); do gaps+=("$(round "$url" "$mode")"); done
  local sorted
  sorted=$(printf '%s\n' "${gaps[@]}" | sort -n)
  printf '%-34s median %6s ms   gaps: %s\n' "$label" \
    "$(sed -n "$(((ROUNDS + 1) / 2))p" <<<"$sorted")" "$(tr '\n' ' ' <<<"$sorted")"
}

measure "tcp, with the nanny" "$TCP" nanny
measure "file, with the nanny" "file://$DIR/sems" nanny
measure "file, without the nanny" "file://$DIR/sems" bare
measure "tcp, without the nanny (TTL $TTL)" "$TCP" bare
