#!/usr/bin/env bash
# Fail-over on the file backend when the holder is one this host cannot check: how long
# until a waiter's command starts? A holder on another host that dies (or is cut off) stops
# rewriting its record, and its pid cannot be looked up here; the holder here is a local
# `turnstile run` stopped with SIGSTOP, which has the same effect (its pid stays alive, so
# the dead-local-pid rule does not apply). `turnstile run` on the file backend has the
# default TTL, 10 s. Three cases, each timed from the moment the holder stops:
#   waiting:  a waiter already queued when the holder stops;
#   fresh:    a waiter that starts 5 s after the holder stopped (a new process);
#   local:    the holder killed with SIGKILL instead (the dead-local-pid rule), waiter queued.
# Prints every gap and the median, in ms; waiter start-up (`sh`, `date`) is included.
#
#   bash bench/file-remote-failover.sh              # 3 rounds each
#   ROUNDS=5 T=/path/to/turnstile bash bench/file-remote-failover.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${T:-}" ]; then
  cargo build --release -p turnstile --quiet
  T=$PWD/target/release/turnstile
fi
ROUNDS=${ROUNDS:-3}
export DIR
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
URL=file://$DIR/sems

# One round; prints the gap in ms. $1: waiting, fresh or local.
round() {
  local mode=$1 name
  name=remote-$RANDOM$RANDOM
  rm -f "$DIR/holder" "$DIR/granted"
  "$T" run "$name" --limit 1 --url "$URL" -- sh -c \
    'echo "$PPID $$" > "$DIR/holder.tmp" && mv "$DIR/holder.tmp" "$DIR/holder"; exec sleep 1000' &
  local sup=$!
  until [ -e "$DIR/holder" ]; do sleep 0.01; done
  read -r holder command <"$DIR/holder"
  local waiter
  start_waiter() {
    "$T" run "$name" --limit 1 --url "$URL" -- sh -c 'date +%s%N > "$DIR/granted"' 2>>"$DIR/waiter.log" &
    waiter=$!
  }
  if [ "$mode" != fresh ]; then
    start_waiter
    until "$T" status "$name" --json --url "$URL" | grep -q '"queued":1'; do sleep 0.02; done
  fi
  local stopped
  stopped=$(date +%s%N)
  if [ "$mode" = local ]; then kill -9 "$holder"; else kill -STOP "$holder"; fi
  if [ "$mode" = fresh ]; then
    sleep 5
    start_waiter
  fi
  wait "$waiter"
  echo $((($(cat "$DIR/granted") - stopped) / 1000000))
  kill -9 "$holder" "$command" 2>/dev/null || true
  wait "$sup" 2>/dev/null || true
}

measure() {
  local mode=$1 gaps=()
  for _ in $(seq "$ROUNDS"); do gaps+=("$(round "$mode")"); done
  local sorted
  sorted=$(printf '%s\n' "${gaps[@]}" | sort -n)
  printf '%-8s median %6s ms   gaps: %s\n' "$mode" \
    "$(sed -n "$(((ROUNDS + 1) / 2))p" <<<"$sorted")" "$(tr '\n' ' ' <<<"$sorted")"
}

measure waiting
measure fresh
measure local
