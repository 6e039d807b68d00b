#!/usr/bin/env bash
# Builds the fuzz targets with stable rustc (coverage instrumentation through codegen flags;
# libFuzzer from the libfuzzer-sys crate) and runs them. See FUZZING.md.
#
#   fuzz/run.sh build                 build every target
#   fuzz/run.sh replay [TARGET...]    run every input of the checked-in corpus once
#   fuzz/run.sh fuzz SECS [TARGET...] fuzz each target for SECS seconds (new inputs go to a
#                                     scratch corpus under fuzz/target, not the checked-in one)
#   fuzz/run.sh seed                  rewrite fuzz/seeds/ from the code's own encoders
#   fuzz/run.sh minimize TARGET       merge scratch finds into fuzz/corpus/TARGET, minimized
#
# A crash leaves its input in fuzz/artifacts/TARGET/; reproduce it with
#   fuzz/target/<host>/release/TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
cd "$(dirname "$0")"

TARGETS=(frame wal_records wal_dir file_record etcd_message config)
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target"
bin="$CARGO_TARGET_DIR/$host/release"
# The log targets recover a data directory per input: on tmpfs if there is one; removed at exit.
shm=/dev/shm
[ -d "$shm" ] || shm=${TMPDIR:-/tmp}
export TURNSTILE_FUZZ_DIR="$shm/turnstile-fuzz-run-$$"
trap 'rm -rf "$TURNSTILE_FUZZ_DIR"' EXIT

build() {
  # The flags cargo-fuzz passes, minus the sanitizer (which needs nightly): inline 8-bit
  # counters, PC table and compare tracing for libFuzzer. --target keeps them off build
  # scripts and proc macros. Debug assertions and overflow checks stay on.
  RUSTFLAGS="-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --release ${CARGO_LOCKED---locked} --target "$host" \
    $(printf -- '--bin %s ' "${TARGETS[@]}") "$@"
}

targets() { if [ $# -gt 0 ]; then echo "$@"; else echo "${TARGETS[@]}"; fi; }

cmd=${1:-}
shift || true
case "$cmd" in
  build) build ;;
  seed)
    # The seed writer is not instrumented (it has no libFuzzer to link with): a build of its own.
    # Inputs that once crashed (crash-*) are kept: they are regression tests.
    [ -d seeds ] && find seeds -type f ! -name 'crash-*' -delete
    CARGO_TARGET_DIR="$PWD/target/seed" cargo run -q ${CARGO_LOCKED---locked} --bin seed -- seeds
    mkdir -p seeds/config
    # The settings as serve prints them, from the defaults and from a file setting every key.
    CARGO_TARGET_DIR=../target cargo run -q --manifest-path ../Cargo.toml -p turnstile -- serve --print-config \
      >seeds/config/defaults.toml
    CARGO_TARGET_DIR=../target cargo run -q --manifest-path ../Cargo.toml -p turnstile -- serve --config seeds/config/defaults.toml \
      --listen 0.0.0.0:7000 --insecure --forget-idle never --http off --print-config \
      >seeds/config/flags.toml
    ;;
  replay)
    build
    for t in $(targets "$@"); do
      n=$(ls corpus/$t | wc -l)
      echo "== fuzz replay $t ($n inputs)"
      "$bin/$t" -runs=0 corpus/$t 2>&1 | tail -n 2
    done
    ;;
  fuzz)
    secs=${1:?seconds}
    shift
    build
    for t in $(targets "$@"); do
      mkdir -p "target/scratch/$t" "artifacts/$t"
      echo "== fuzz $t for ${secs}s"
      # New inputs go to the first directory; the corpus and the seeds are only read.
      dirs=("target/scratch/$t")
      for d in "corpus/$t" "seeds/$t"; do [ -d "$d" ] && dirs+=("$d"); done
      "$bin/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -max_len=4096 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" "${dirs[@]}" 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss|#[0-9]+[[:space:]]+DONE)|ERROR|panicked|SUMMARY" || true
      # libFuzzer exits non-zero on a crash; grep above hid its status, so look for artifacts.
      # (Not `ls a* b* c*`: it fails when any one pattern matches nothing, which hid crashes.)
      if [ -n "$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) -print -quit)" ]; then
        echo "fuzz: $t found a failing input: $(ls artifacts/$t)" >&2
        exit 1
      fi
    done
    ;;
  minimize)
    t=${1:?target}
    build
    rm -rf "corpus/$t.new"
    mkdir -p "corpus/$t.new"
    dirs=()
    for d in "corpus/$t" "seeds/$t" "target/scratch/$t"; do [ -d "$d" ] && dirs+=("$d"); done
    "$bin/$t" -merge=1 -max_len=4096 "corpus/$t.new" "${dirs[@]}" 2>&1 | tail -n 1
    # Inputs that once crashed stay, whatever their coverage: they are regression tests.
    cp seeds/$t/crash-* "corpus/$t.new/" 2>/dev/null || true
    rm -rf "corpus/$t"
    mv "corpus/$t.new" "corpus/$t"
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
