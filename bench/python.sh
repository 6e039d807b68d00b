#!/usr/bin/env bash
# The Python package's benchmark (BENCHMARKS.md, "From Python"): builds the release binary, the
# Rust blocking-client reference and a release wheel in a venv of its own (with Dask for the
# peer), then runs bench/python_bench.py. DURATION (seconds per measurement, default 3),
# ROUNDS (default 3) and PROCS (default 16) tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
# One command for both, so that dependencies are built once with the same features.
cargo build --release --locked -p turnstile -p turnstile-py --bin turnstile --example blocking_pairs
venv=$target/bench-venv
if [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "maturin>=1.7,<2" distributed
  touch "$venv/.complete"
fi
# A release wheel (pip's default for maturin), as users get it.
PATH="$venv/bin:$PATH" "$venv/bin/pip" install -q --disable-pip-version-check \
  --no-build-isolation --no-deps --force-reinstall ./python
cd "$target"   # not the repository's python/: import the installed package
"$venv/bin/python" "$repo/bench/python_bench.py" \
  --turnstile-bin "$target/release/turnstile" \
  --rust-pairs "$target/release/examples/blocking_pairs" \
  --duration "${DURATION:-3}" --procs "${PROCS:-16}" --rounds "${ROUNDS:-3}"
