#!/usr/bin/env bash
# The README's Mixtral-8x7B table: `switchyard plan` for commodity hosts (each role on its own
# host of the kind named, the coordinators' too, 10 Gbit/s links 200 us apart, 32 streams at
# 1,024 positions each), from the shipped calibration or CALIBRATION=FILE. Prints Markdown.
#
#   bash scripts/plan-mixtral.sh
set -euo pipefail
BIN=$(cd "$(dirname "$0")/.." && pwd)/target/release/switchyard
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
CAL=()
[ -n "${CALIBRATION:-}" ] && CAL=(--calibration "$CALIBRATION")
echo "| workers | experts | coordinators | per worker | coordinator KV positions | MB/token on the wire | batch 1, tok/s | 32 streams, tok/s | limit |"
echo "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"
for spec in "4x24GiB:8c:40GBps bf16 1" "4x24GiB:8c:40GBps bf16 2" "3x24GiB:8c:40GBps q8_0 1" \
  "8x16GiB:4c:20GBps bf16 1" "8x16GiB:4c:20GBps q4_0 1" "2x64GiB:16c:80GBps bf16 1" \
  "3x24GiB:8c:40GBps bf16 1"; do
  set -- $spec
  q=(); [ "$2" = bf16 ] || q=(--quantize "$2")
  if ! out=$("$BIN" plan --preset mixtral-8x7b --hosts "$1" --coordinators "$3" "${q[@]}" "${CAL[@]}" --json 2>&1); then
    echo "| $1 | $2 | $3 | does not fit: ${out#error: } | | | | | |"
    continue
  fi
  python3 - "$1" "$2" "$3" "$out" <<'PY'
import json, sys
hosts, fmt, coords, v = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])["plan"]
n = max(len(p) for p in v["placement"])
per = f"{n} expert{'s' if n > 1 else ''}, {max(v['worker_bytes']) / 2**30:.1f} GiB"
print(f"| {hosts} | {fmt} | {coords} | {per} | {v['kv_tokens']:,} | {v['net_bytes_per_token'] / 1e6:.2f} "
      f"| {v['batch1']['tok_s']:.1f} | {v['at_streams']['tok_s']:.1f} | {v['at_streams']['limit'].replace('_', ' ')} |")
PY
done
