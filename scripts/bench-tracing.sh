#!/usr/bin/env bash
# What tracing costs: `switchyard bench` (embedded and over 2 loopback workers, batch-1 decode,
# prefill and 8 concurrent sequences) with tracing off, and with every step traced (sample ratio
# 1.0) into a local OTLP sink; with BASE_BIN=path also a build from before tracing existed.
# Configurations take turns, ROUNDS times; medians per configuration. Not part of CI.
#
#   scripts/bench-tracing.sh [MODEL] [ROUNDS]
#   BASE_BIN=/path/to/older/switchyard scripts/bench-tracing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-../shared/fixtures/tiny-mixtral-trained}
rounds=${2:-3}
cargo build --release --locked -p switchyard -p switchyard-tests --bin switchyard --bin otlp-sink >&2
bin=target/release/switchyard
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
out=$(mktemp -d)
target/release/otlp-sink "127.0.0.1:$port" 2>"$out/sink.log" &
sink=$!
trap 'kill $sink 2>/dev/null' EXIT
configs=(off on)
[ -n "${BASE_BIN:-}" ] && configs=(base "${configs[@]}")
for r in $(seq "$rounds"); do
  for c in "${configs[@]}"; do
    b=$bin
    env=()
    [ "$c" = base ] && b=$BASE_BIN
    [ "$c" = on ] && env=(SWITCHYARD_OTLP_ENDPOINT="http://127.0.0.1:$port" SWITCHYARD_OTLP_SAMPLE_RATIO=1.0)
    echo "round $r: $c" >&2
    env "${env[@]}" "$b" bench --model "$model" --runs 3 --local-workers 2 --concurrency 8 \
      --out "$out/$c-$r" >/dev/null 2>"$out/$c-$r.log"
  done
done
python3 - "$out" "$rounds" "${configs[@]}" <<'PY'
import json, statistics, sys
out, rounds, configs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = {}
for c in configs:
    for r in range(1, rounds + 1):
        d = json.load(open(f"{out}/{c}-{r}/bench.json"))
        for m in d["modes"]:
            for k, v in (("decode tok/s", m["decode_tok_s_median"]), ("prefill tok/s", m["prefill_tok_s_median"]),
                         ("8 seqs tok/s", m["concurrency"][0]["tok_s_median"])):
                rows.setdefault((m["mode"], k), {}).setdefault(c, []).append(v)
print(f"{'mode':22} {'figure':14} " + " ".join(f"{c:>10}" for c in configs) + "   on/off" + ("   off/base" if "base" in configs else ""))
for (mode, k), by in rows.items():
    med = {c: statistics.median(v) for c, v in by.items()}
    line = f"{mode:22} {k:14} " + " ".join(f"{med[c]:10.1f}" for c in configs) + f"   {med['on'] / med['off']:6.3f}"
    if "base" in med:
        line += f"   {med['off'] / med['base']:8.3f}"
    print(line)
spans = open(f"{out}/sink.log").read().split()
print(f"spans received by the sink: {spans[-1] if spans else 0}")
PY
