#!/usr/bin/env bash
# switchyard against llama.cpp on the same checkpoint, same machine, same thread count, in one
# sitting: ROUNDS interleaved rounds (the order alternating) of `switchyard bench` (embedded,
# batch 1) and the peers' llama-bench (pp128, tg64), then the medians and their ratios.
# llama-bench's tg64 decodes from an empty context, so switchyard's decode figure comes from a
# run with a one-token prompt (positions 1-64), its prefill figure from a 128-token prompt.
#
#   bash scripts/bench-vs-llamacpp.sh HF_DIR [THREADS=2] [ROUNDS=3]
#
# HF_DIR must be a checkpoint llama.cpp's converter accepts (../shared/peers/make_checkpoint.py
# writes one). Needs ../shared/peers/setup.sh run once, and `cargo build --release`.
set -euo pipefail
DIR=$(cd "${1:?usage: bench-vs-llamacpp.sh HF_DIR [THREADS] [ROUNDS]}" && pwd)
T=${2:-2}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS_SCRIPTS=${PEERS_SCRIPTS:-$ROOT/../shared/peers}
BIN=$ROOT/target/release/switchyard
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
sy() {
  "$BIN" --threads "$T" bench --model "$DIR" --runs 3 >"$OUT/sy-$1.json" 2>/dev/null
  "$BIN" --threads "$T" bench --model "$DIR" --runs 3 --prompt-tokens 1 >"$OUT/sy-tg-$1.json" 2>/dev/null
}
lc() { bash "$PEERS_SCRIPTS/llamacpp.sh" "$DIR" "$T" >"$OUT/lc-$1.txt" 2>&1; }
# The order alternates between rounds, so that neither engine always runs in the other's wake
# (page cache, the host's bandwidth trend over a sitting).
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS" >&2
  if [ $((r % 2)) = 1 ]; then sy "$r"; lc "$r"; else lc "$r"; sy "$r"; fi
done
python3 - "$OUT" "$ROUNDS" "$T" <<'EOF'
import json, re, statistics, sys
out, rounds, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sy_pp, sy_tg, lc_pp, lc_tg, pct = [], [], [], [], []
for r in range(1, rounds + 1):
    s = json.load(open(f"{out}/sy-{r}.json"))
    tg = json.load(open(f"{out}/sy-tg-{r}.json"))
    sy_pp.append(s["prefill_tok_s_median"]); sy_tg.append(tg["decode_tok_s_median"])
    pct.append(tg["decode_pct_of_bandwidth_bound"])
    text = open(f"{out}/lc-{r}.txt").read()
    for test, acc in (("pp128", lc_pp), ("tg64", lc_tg)):
        m = re.search(rf"\|\s*{test}\s*\|\s*([\d.]+)", text)
        if not m:
            sys.exit(f"no {test} figure in llama-bench's output:\n{text[-2000:]}")
        acc.append(float(m.group(1)))
med = statistics.median
print(f"threads {threads}, {rounds} interleaved rounds, medians")
print(f"decode  switchyard {med(sy_tg):7.1f} tok/s  llama.cpp tg64  {med(lc_tg):7.1f}  ratio {med(sy_tg) / med(lc_tg):.2f}x")
print(f"prefill switchyard {med(sy_pp):7.1f} tok/s  llama.cpp pp128 {med(lc_pp):7.1f}  ratio {med(sy_pp) / med(lc_pp):.2f}x")
# Both engines of a round ran minutes apart, so a round's ratio cancels the host's bandwidth of
# that moment; on a host whose bandwidth swings, this is the steadier figure.
print(f"median of per-round ratios: decode {med([a / b for a, b in zip(sy_tg, lc_tg)]):.2f}x, prefill {med([a / b for a, b in zip(sy_pp, lc_pp)]):.2f}x")
print(f"switchyard decode at {med(pct):.0f}% of the measured bandwidth bound")
print("per round (switchyard tg / llama.cpp tg):", ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(sy_tg, lc_tg)))
EOF
