#!/usr/bin/env bash
# Hand-off latency on the file backend: how long after a holder's command ends does the next
# waiter's command start? 10 rounds of `turnstile run` on a fresh directory; prints every gap
# and the median, in ms. Process start-up of the shell and `date` is included.
#
#   bash bench/file-handoff.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p turnstile --quiet
T=target/release/turnstile
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
export TURNSTILE_URL=file://$D
gaps=()
for _ in $(seq 10); do
  "$T" run h --limit 1 -- sh -c "sleep 1.5; date +%s%N > $D/end" &
  sleep 0.3 # let the holder take the slot first
  "$T" run h --limit 1 -- sh -c "date +%s%N > $D/start"
  wait
  gaps+=($(( ($(cat "$D/start") - $(cat "$D/end")) / 1000000 )))
done
sorted=$(printf '%s\n' "${gaps[@]}" | sort -n | tr '\n' ' ')
echo "gaps (ms): $sorted"
echo "median (ms): $(printf '%s\n' "${gaps[@]}" | sort -n | sed -n 5p)"
