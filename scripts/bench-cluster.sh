#!/usr/bin/env bash
# Decode/prefill throughput embedded vs a loopback cluster of N workers on one checkpoint, in one
# sitting, plus each worker's resident memory. Release build; not part of CI.
# Usage: scripts/bench-cluster.sh MODEL_DIR [WORKERS=2] [THREADS=2]
set -euo pipefail
MODEL=$1; N=${2:-2}; T=${3:-2}
cd "$(dirname "$0")/.."
cargo build --release -q
BIN=target/release/switchyard
TMP=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
NE=$(python3 -c "import json,sys; print(json.load(open('$MODEL/config.json'))['num_local_experts'])")
SPEC=()
for ((w = 0; w < N; w++)); do
  lo=$((w * NE / N)); hi=$(((w + 1) * NE / N - 1))
  SWITCHYARD_THREADS=${WORKER_THREADS:-1} $BIN worker --model "$MODEL" --experts "$lo-$hi" --listen 127.0.0.1:0 --ready-file "$TMP/w$w" 2>"$TMP/w$w.log" &
  PIDS+=($!)
  SPEC+=("WAIT$w=$lo-$hi")
done
for ((w = 0; w < N; w++)); do
  for _ in $(seq 600); do [ -s "$TMP/w$w" ] && break; sleep 0.1; done
  SPEC[$w]=${SPEC[$w]/WAIT$w/$(cat "$TMP/w$w")}
done
WORKERS=$(IFS=,; echo "${SPEC[*]}")
echo "== embedded ($T threads)"
$BIN --threads "$T" bench --model "$MODEL" --runs 3 | grep median
echo "== cluster of $N loopback workers ($WORKERS), coordinator $T threads, ${WORKER_THREADS:-1} thread(s) per worker"
$BIN --threads "$T" bench --model "$MODEL" --runs 3 --workers "$WORKERS" | grep median
for ((w = 0; w < N; w++)); do
  rss=$(awk '/VmRSS/ {print $2}' /proc/"${PIDS[$w]}"/status)
  echo "worker $w (${SPEC[$w]}): RSS $((rss / 1024)) MiB"
done
