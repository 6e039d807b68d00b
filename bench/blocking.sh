#!/usr/bin/env bash
# The blocking client against the bare protocol client and the async library client
# (BENCHMARKS.md, "From Python"): one coordinator (`serve --in-memory`), then ROUNDS (default 5)
# interleaved rounds of DURATION seconds (default 3) each of
#   - crates/turnstile-py/examples/blocking_pairs.rs (the Rust blocking client, one thread),
#   - BASELINE, if set: another build of that example (e.g. from before a change),
#   - `turnstile bench --scenario uncontended --clients 1 --client raw` (bare frames),
#   - the same with `--client library` (the async client on tokio).
# Prints each run's pairs/s and p50, then the median of each over the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
cargo build --release --locked -p turnstile -p turnstile-py --bin turnstile --example blocking_pairs
bin=$target/release/turnstile
pairs=$target/release/examples/blocking_pairs
duration=${DURATION:-3}
rounds=${ROUNDS:-5}
out=$(mktemp)
log=$(mktemp)
"$bin" serve --in-memory --http off --listen 127.0.0.1:0 >"$log" 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null; rm -f "$out" "$log"' EXIT
for _ in $(seq 100); do
  grep -q "listening on" "$log" && break
  sleep 0.05
done
url="tcp://$(awk '/listening on/{print $3; exit}' "$log")"
echo "coordinator $url, $rounds rounds of ${duration}s" >&2
for round in $(seq "$rounds"); do
  echo "blocking $("$pairs" "$url" "$duration")" >>"$out"
  if [ -n "${BASELINE:-}" ]; then
    echo "baseline $("$BASELINE" "$url" "$duration")" >>"$out"
  fi
  for client in raw library; do
    echo "$client $("$bin" bench --url "$url" --scenario uncontended --clients 1 \
      --client "$client" --duration "${duration}s" --json 2>/dev/null | tail -1)" >>"$out"
  done
  echo "round $round done" >&2
done
python3 - "$out" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, doc = line.split(" ", 1)
    d = json.loads(doc)
    rate = d.get("pairs_per_sec") or d["pairs"] / d["seconds"]
    runs.setdefault(name, []).append((rate, d["p50_us"]))
for name, rs in runs.items():
    print(f"{name:9} " + "  ".join(f"{r:7.0f}/s p50 {p:4d}us" for r, p in rs))
print()
med = {n: (statistics.median(r for r, _ in rs), statistics.median(p for _, p in rs)) for n, rs in runs.items()}
for name, (r, p) in med.items():
    print(f"median {name:9} {r:7.0f} pairs/s  p50 {p:5.0f} us")
# Per-round ratios (the runs of one round share the machine's load), then their median.
for ref in ("raw", "baseline"):
    for name in ("blocking", "baseline", "library"):
        if name == ref or name not in runs or ref not in runs:
            continue
        pairs = list(zip(runs[name], runs[ref]))
        p50 = statistics.median(a[1] / b[1] for a, b in pairs)
        rate = statistics.median(a[0] / b[0] for a, b in pairs)
        print(f"{name} over {ref}: p50 {p50:.2f}x, pairs/s {rate:.2f}x (median of per-round ratios)")
EOF
