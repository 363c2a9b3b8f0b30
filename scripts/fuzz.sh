#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser that takes bytes from outside (docs/RELIABILITY.md,
# "Fuzzing"). libFuzzer through cargo-fuzz, on the stable toolchain: `--sanitizer none` keeps
# cargo-fuzz off the nightly-only `-Zsanitizer` flag while libFuzzer's coverage
# instrumentation (`-Cpasses=sancov-module`) is a stable option.
#
#   scripts/fuzz.sh                 every target for 20 s (the CI smoke run)
#   scripts/fuzz.sh 600             every target for 10 minutes
#   scripts/fuzz.sh 600 session     one target
#
# Each target starts from its corpus in fuzz/corpus/<target>/ (kept in the repo) and adds what
# it finds there. A crash stops the run with the failing input in fuzz/artifacts/<target>/;
# replay it with `cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>`, fix it, and
# keep the input in the target's corpus as a regression test.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(decimal protocol_message wire_change chain_message channel session api_bodies)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build -s none
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  printf '%-17s ' "$target"
  # -timeout: one input taking more than 10 s is a hang, reported like a crash.
  if ! cargo fuzz run -s none "$target" -- -max_total_time="$seconds" -timeout=10 \
      >"/tmp/possync-fuzz-$target.log" 2>&1; then
    echo "FAILED"
    tail -n 60 "/tmp/possync-fuzz-$target.log"
    exit 1
  fi
  tail -n 1 "/tmp/possync-fuzz-$target.log"
done
rm -rf /dev/shm/possync-fuzz-* 2>/dev/null || true
