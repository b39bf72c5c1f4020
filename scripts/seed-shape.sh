#!/usr/bin/env bash
# Mixtral-8x7B's real shape (hidden 4096, intermediate 14336, 32/8 heads, vocab 32000) at a few
# layers: embedded, then over 2 and 4 loopback workers with the experts split evenly. For each:
# load time and resident memory of every process (workers against the bytes of the experts
# they host), `forward` output compared byte for byte with embedded mode's (f32 wire), and
# `bench`'s batch-1 decode, prefill and per-layer times. Release build; not part of CI.
#
#   scripts/seed-shape.sh [LAYERS=2] [DIR=target/seed-shape] [THREADS=2]
#
# COLD=1 (root) drops the page cache before each process loads, so load times read the disk.
#
# Needs about 3.5 GB of disk and memory per layer (bf16), twice that while a cluster runs.
set -euo pipefail
LAYERS=${1:-2}; DIR=${2:-target/seed-shape}; T=${3:-2}
cd "$(dirname "$0")/.."
[ -x target/release/switchyard ] || cargo build --release --locked -q
BIN=$PWD/target/release/switchyard
MODEL=$DIR/mixtral-8x7b-$LAYERS
mkdir -p "$DIR"
if [ ! -s "$MODEL/model.safetensors.index.json" ] && [ ! -s "$MODEL/model.safetensors" ]; then
  t0=$(date +%s.%N)
  "$BIN" gen-model --preset mixtral-8x7b --layers "$LAYERS" --dtype bf16 --out "$MODEL" >/dev/null
  echo "gen-model: $(du -sh "$MODEL" | cut -f1) in $(printf %.1f "$(echo "$(date +%s.%N) - $t0" | bc)") s"
fi
TMP=$(mktemp -d); PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
IDS=1,415,2936,9068,3186,28705,1014,264,1179,302,272,1080,11843,28723
# One expert of one layer: w1, w3 and w2 of intermediate × hidden bf16 elements.
EXPERT_BYTES=$((3 * 14336 * 4096 * 2))
cold() { # drops the page cache under COLD=1, so the next load reads the disk
  if [ "${COLD:-0}" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
}
rss_kb() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }
majflt() { awk '{print $12}' /proc/"$1"/stat; }

echo "== embedded ($T threads)"
cold
/usr/bin/time -f "forward: %e s, max RSS %M kB, %F major faults" \
  "$BIN" --threads "$T" forward --model "$MODEL" --ids "$IDS" --greedy 4 >"$TMP/embedded.json" 2>"$TMP/time"
tail -1 "$TMP/time"
"$BIN" --threads "$T" bench --model "$MODEL" --runs 3 --prompt-tokens 32 --decode-tokens 16 \
  --concurrency 4 --out "$TMP/bench-embedded" >/dev/null
python3 scripts/seed_shape_report.py "$TMP/bench-embedded/bench.json"

for N in 2 4; do
  PIDS=(); SPEC=()
  for ((w = 0; w < N; w++)); do
    lo=$((w * 8 / N)); hi=$(((w + 1) * 8 / N - 1))
    cold; t0=$(date +%s.%N); rm -f "$TMP/w$w"
    SWITCHYARD_THREADS=1 "$BIN" worker --model "$MODEL" --experts "$lo-$hi" --listen 127.0.0.1:0 \
      --ready-file "$TMP/w$w" 2>"$TMP/w$w.log" &
    PIDS+=($!)
    for _ in $(seq 3000); do [ -s "$TMP/w$w" ] && break; kill -0 "${PIDS[$w]}"; sleep 0.1; done
    echo "worker $w ($lo-$hi): ready in $(printf %.1f "$(echo "$(date +%s.%N) - $t0" | bc)") s"
    SPEC+=("$(cat "$TMP/w$w")=$lo-$hi")
  done
  WORKERS=$(IFS=,; echo "${SPEC[*]}")
  echo "== $N workers ($WORKERS), coordinator $T threads, 1 thread per worker"
  /usr/bin/time -f "forward: %e s, coordinator max RSS %M kB, %F major faults" \
    "$BIN" --threads "$T" forward --model "$MODEL" --ids "$IDS" --greedy 4 --workers "$WORKERS" \
    >"$TMP/cluster.json" 2>"$TMP/time"
  tail -1 "$TMP/time"
  if cmp -s "$TMP/embedded.json" "$TMP/cluster.json"; then
    echo "forward: equal to embedded byte for byte"
  else
    echo "forward: DIFFERS from embedded"
  fi
  "$BIN" --threads "$T" bench --model "$MODEL" --runs 3 --prompt-tokens 32 --decode-tokens 16 \
    --concurrency 4 --workers "$WORKERS" --out "$TMP/bench-$N" >/dev/null
  python3 scripts/seed_shape_report.py "$TMP/bench-$N/bench.json"
  for ((w = 0; w < N; w++)); do
    kb=$(rss_kb "${PIDS[$w]}")
    hosted=$((8 / N * LAYERS * EXPERT_BYTES))
    echo "worker $w: RSS $((kb / 1024)) MiB, experts $((hosted / 1048576)) MiB," \
      "$(python3 -c "print(f'{$kb * 1024 / $hosted:.3f}')")× of them, $(majflt "${PIDS[$w]}") major faults"
  done
  for p in "${PIDS[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
  PIDS=()
done
