#!/usr/bin/env bash
# The release-to-next-waiter hand-off on the etcd backend (crates/turnstile-client/examples/
# etcd_handoff.rs), beside a bare etcd put on the same etcd: one etcd started here (free
# loopback port, data in a temp dir, stopped by PID).
#
#   bash bench/etcd-handoff.sh
#   ROUNDS=500 bash bench/etcd-handoff.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "etcd is missing: apt-get install -y etcd-server" >&2; exit 1; }
cargo build --release -p turnstile-client --example etcd_handoff --quiet
ROUNDS=${ROUNDS:-200}

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
target/release/examples/etcd_handoff "etcd://127.0.0.1:$CP/handoff" "$ROUNDS"
