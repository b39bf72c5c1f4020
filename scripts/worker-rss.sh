#!/usr/bin/env bash
# Resident memory of a worker hosting half the experts of DIR: bf16 as stored, quantized at load
# (q8_0, q4_0), and from a checkpoint written by `switchyard quantize` (q4_0). Each worker loads,
# reports ready, and its VmRSS is read; then it is stopped.
# Usage: bash scripts/worker-rss.sh DIR [EXPERTS]     (EXPERTS default 0-3)
set -euo pipefail
DIR=$(cd "$1" && pwd); EXPERTS=${2:-0-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd); BIN=$ROOT/target/release/switchyard
[ -x "$BIN" ] || cargo build --release -p switchyard --manifest-path "$ROOT/Cargo.toml"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$BIN" quantize --model "$DIR" --out "$TMP/q4_0" --format q4_0 >/dev/null 2>&1
rss() { # MODEL [FLAGS...] -> prints "VmRSS kB, load seconds"
  local model=$1; shift
  local t0; t0=$(date +%s.%N)
  "$BIN" --threads 2 worker --model "$model" --experts "$EXPERTS" --listen 127.0.0.1:0 \
    --ready-file "$TMP/ready" "$@" 2>/dev/null & local pid=$!
  while [ ! -s "$TMP/ready" ]; do sleep 0.1; kill -0 $pid; done
  local t1; t1=$(date +%s.%N)
  local kb; kb=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  kill $pid; wait $pid 2>/dev/null || true; rm -f "$TMP/ready"
  echo "$kb $(echo "$t1 - $t0" | bc)"
}
base=$(rss "$DIR"); echo "bf16 (as stored): RSS $((${base% *} / 1024)) MiB, ready in ${base#* } s"
for f in q8_0 q4_0; do
  r=$(rss "$DIR" --quantize $f)
  echo "$f at load: RSS $((${r% *} / 1024)) MiB ($(echo "scale=3; ${r% *} / ${base% *}" | bc)x), ready in ${r#* } s"
done
r=$(rss "$TMP/q4_0"); echo "q4_0 saved: RSS $((${r% *} / 1024)) MiB ($(echo "scale=3; ${r% *} / ${base% *}" | bc)x), ready in ${r#* } s"
