#!/usr/bin/env bash
# The price of --deterministic: `switchyard bench` with it on and off, interleaved, in each CPU
# activation mode this CPU runs (auto, and f32 where auto means bf16), ROUNDS rounds of
# --runs 3 each; prints the median over rounds of batch-1 decode, prefill and the 32-stream
# aggregate, and on/off ratios. Release build; run it on an idle machine.
#
#   scripts/bench-determinism.sh MODEL [ROUNDS] [OUT_DIR]
set -euo pipefail
model=${1:?usage: scripts/bench-determinism.sh MODEL [ROUNDS] [OUT_DIR]}
rounds=${2:-3}
out=${3:-target/bench-determinism}
bin=${SWITCHYARD_BIN:-target/release/switchyard}
threads=${SWITCHYARD_THREADS:-2}
[ -x "$bin" ] || cargo build --release --locked
mkdir -p "$out"
modes=(auto)
# auto is bf16 where the CPU has AVX-512 BF16; measure f32 there too.
if grep -qw avx512_bf16 /proc/cpuinfo; then modes+=(f32); fi
for r in $(seq 1 "$rounds"); do
  for act in "${modes[@]}"; do
    for det in on off; do
      echo "round $r: activations $act, deterministic $det" >&2
      "$bin" --threads "$threads" --cpu-activations "$act" --deterministic "$det" bench \
        --model "$model" --concurrency 32 --runs 3 --out "$out/$act-$det-$r" >/dev/null
    done
  done
done
python3 - "$out" "$rounds" "${modes[@]}" <<'PY'
import json, statistics, sys
out, rounds, modes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def figures(path):
    d = json.load(open(path))
    m = d["modes"][0]
    return (d["cpu_kernels"], d["cpu_activations"], m["decode_tok_s_median"],
            m["prefill_tok_s_median"], m["concurrency"][0]["tok_s_median"])
print(f"{'activations':<12} {'figure':<22} {'on':>9} {'off':>9} {'on/off':>7}   per round")
for act in modes:
    runs = {det: [figures(f"{out}/{act}-{det}-{r}/bench.json") for r in range(1, rounds + 1)]
            for det in ("on", "off")}
    name = f"{runs['on'][0][1]} ({runs['on'][0][0]})"
    for i, fig in ((2, "batch-1 decode tok/s"), (3, "prefill tok/s"), (4, "32 streams tok/s")):
        on = [x[i] for x in runs["on"]]
        off = [x[i] for x in runs["off"]]
        per = " ".join(f"{a / b:.2f}" for a, b in zip(on, off))
        print(f"{name:<12} {fig:<22} {statistics.median(on):9.1f} {statistics.median(off):9.1f}"
              f" {statistics.median(on) / statistics.median(off):7.3f}   {per}")
PY
