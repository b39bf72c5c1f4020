#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each, from the seeds in
# fuzz/seeds/<target> plus what earlier runs found (fuzz/corpus/<target>, not committed), and
# prints executions, corpus size and crashes per target. Crashing inputs land in
# fuzz/artifacts/<target>/; replay one with `cargo +nightly fuzz run TARGET FILE`.
#
#   scripts/fuzz.sh SECONDS [TARGET...]
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz --locked`, done here when missing), and ../shared/fixtures
# (or SWITCHYARD_FIXTURES) for the tokenizer, chat template and config the targets use.
set -euo pipefail
secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
cd "$(dirname "$0")/.."
rustup toolchain list | grep -q '^nightly' || {
  echo "fuzz: needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
cargo +nightly fuzz build -O >&2
count() { if [ -d "$1" ]; then find "$1" -type f | wc -l; else echo 0; fi; }
log_dir=$(mktemp -d)
failed=0
printf '%-18s %12s %10s %8s\n' target executions corpus crashes
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  before=$(count "fuzz/artifacts/$t")
  # -timeout: a chat template may burn its whole fuel (seconds under ASan), never more.
  if ! cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 -max_len=65536 \
      -print_final_stats=1 >"$log_dir/$t.log" 2>&1; then
    failed=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log_dir/$t.log" | grep -o '[0-9]*$' || echo "?")
  corpus=$(count "fuzz/corpus/$t")
  after=$(count "fuzz/artifacts/$t")
  printf '%-18s %12s %10s %8s\n' "$t" "$execs" "$corpus" "$((after - before))"
  if [ "$after" -gt "$before" ]; then
    grep -m1 -A12 -E 'panicked|ERROR: (libFuzzer|AddressSanitizer)' "$log_dir/$t.log" >&2 || true
  fi
done
echo "logs: $log_dir" >&2
exit $failed
