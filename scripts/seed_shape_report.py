"""Prints one `switchyard bench` JSON's figures for scripts/seed-shape.sh: batch-1 decode,
prefill, the batched run, and the per-layer times of a decode step."""
import json
import sys

d = json.load(open(sys.argv[1]))
m = d["modes"][0]
print(f"decode {m['decode_tok_s_median']:.2f} tok/s, prefill {m['prefill_tok_s_median']:.1f} tok/s")
for c in m.get("concurrency", []):
    print(f"{c['sequences']} sequences: {c['tok_s_median']:.2f} tok/s")
layer = m.get("decode_ms_per_layer") or {}
if layer:
    print("per layer, batch-1 decode (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in layer.items()))
