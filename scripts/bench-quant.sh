#!/usr/bin/env bash
# One sitting, quantized weights against llama.cpp on the same checkpoint: llama-bench (pp128, tg64)
# and llama-batched-bench (32 sequences) on llama.cpp's own Q8_0/Q4_0 of the bf16 GGUF, then
# `switchyard bench` with --quantize of the same format (attention and LM head too, as llama.cpp
# quantizes them) and `switchyard bench` on llama.cpp's GGUF file itself, ROUNDS times interleaved. Needs ../shared/peers set up and llamacpp.sh run on DIR.
# Usage: bash scripts/bench-quant.sh DIR [THREADS] [ROUNDS]   (prints a table; JSON in $OUT)
set -euo pipefail
DIR=$(cd "$1" && pwd); T=${2:-2}; ROUNDS=${3:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd); BIN=$ROOT/target/release/switchyard
PEERS=${PEERS:-$HOME/.cache/switchyard-peers}; LB=$PEERS/src/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"; echo "results in $OUT" >&2
[ -x "$BIN" ] || cargo build --release -p switchyard --manifest-path "$ROOT/Cargo.toml"
bash "$ROOT/../shared/peers/llamacpp-quant.sh" "$DIR" "$T" >/dev/null   # makes the GGUFs once
for r in $(seq "$ROUNDS"); do
  for q in Q8_0 Q4_0; do
    G=$PEERS/gguf/$(basename "$DIR")-$q.gguf
    "$LB/llama-bench" -m "$G" -t "$T" -p 128 -n 64 -r 3 -o json 2>/dev/null >"$OUT/llama-$q-$r.json"
    "$LB/llama-batched-bench" -m "$G" -t "$T" -c 4096 -b 2048 -ub 512 -npp 32 -ntg 32 -npl 32 2>/dev/null \
      | grep -E '^\|\s+32' >"$OUT/llama-batched-$q-$r.txt" || true
    lq=$(echo "$q" | tr 'A-Z' 'a-z')
    "$BIN" --threads "$T" bench --model "$DIR" --quantize "$lq" --quantize-attention --runs 3 \
      --concurrency 32 2>/dev/null >"$OUT/switchyard-$q-$r.json"
    "$BIN" --threads "$T" bench --model "$G" --runs 3 --concurrency 32 2>/dev/null >"$OUT/gguf-$q-$r.json"
  done
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics as st
out, rounds = sys.argv[1], int(sys.argv[2])
print("| format | engine | pp128 tok/s | tg64 tok/s | 32 seq: decode tok/s | 32 seq: all tok/s | bytes/token | % of bound |")
print("|---|---|---|---|---|---|---|---|")
for q in ["Q8_0", "Q4_0"]:
    med = lambda v: st.median(v) if v else float("nan")
    pp, tg, d32, a32 = [], [], [], []
    for r in range(1, rounds + 1):
        for t in json.load(open(f"{out}/llama-{q}-{r}.json")):
            (pp if t["n_prompt"] > 0 else tg).append(t["avg_ts"])
        row = open(f"{out}/llama-batched-{q}-{r}.txt").read().split("|")
        if len(row) > 10: d32.append(float(row[8])); a32.append(float(row[10]))
    print(f"| {q} | llama.cpp | {med(pp):.1f} | {med(tg):.1f} | {med(d32):.1f} (S_TG) | {med(a32):.1f} (S) | | |")
    for kind, label in [("switchyard", "switchyard --quantize"), ("gguf", "switchyard on the GGUF")]:
        pp, tg, d32, a32, pct = [], [], [], [], []
        for r in range(1, rounds + 1):
            d = json.load(open(f"{out}/{kind}-{q}-{r}.json"))
            pp.append(d["prefill_tok_s_median"]); tg.append(d["decode_tok_s_median"]); pct.append(d["decode_pct_of_bandwidth_bound"])
            for c in d["modes"][0].get("concurrency", []):
                if c["sequences"] == 32: d32.append(c["decode_tok_s_from_itl_p50"]); a32.append(c["tok_s_median"])
            bpt = d["decode_bytes_per_token"]
        print(f"| {q} | {label} | {med(pp):.1f} | {med(tg):.1f} | {med(d32):.1f} (32 / ITL p50) | {med(a32):.1f} (generated / wall) | {bpt / 1e6:.0f} MB | {med(pct):.0f} |")
PY
