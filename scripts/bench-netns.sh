#!/usr/bin/env bash
# The cluster benchmark over a realistic network: each worker runs in its own Linux network
# namespace, joined to the coordinator's by a veth pair shaped with `tc netem` (one-way delay and a
# rate limit on both ends), so loopback does not flatter the design. Runs `switchyard bench` once
# per delay and prints decode tok/s at batch 1 and each concurrency.
#
#   sudo bash scripts/bench-netns.sh MODEL_DIR [WORKERS=2] [DELAYS_US="0 50 500"] [RATE=10gbit]
#
# Needs root, iproute2 and the kernel's sch_netem module (without it, only DELAYS_US=0 runs, on
# unshaped veth pairs). Uses target/release/switchyard (cargo build --release first).
# Extra bench flags via BENCH_ARGS (default: --concurrency 1,8,32 --runs 3).
set -euo pipefail
MODEL=$(cd "${1:?usage: bench-netns.sh MODEL_DIR [WORKERS] [DELAYS_US] [RATE]}" && pwd)
WORKERS=${2:-2}
DELAYS=${3:-"0 50 500"}
RATE=${4:-10gbit}
BENCH_ARGS=${BENCH_ARGS:---concurrency 1,8,32 --runs 3}
BIN=$(cd "$(dirname "$0")/.." && pwd)/target/release/switchyard
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces and tc)" >&2; exit 1; }
EXPERTS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_local_experts'])" "$MODEL/config.json")
TMP=$(mktemp -d)
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 1 "$WORKERS"); do
    ip link del "sy-h$i" 2>/dev/null || true
    ip netns del "sy-w$i" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

shape() { # DEV NETNS DELAY_US: netem delay + rate on DEV (in NETNS when given)
  local dev=$1 ns=$2 d=$3 run=()
  [ -n "$ns" ] && run=(ip netns exec "$ns")
  "${run[@]}" tc qdisc replace dev "$dev" root netem delay "${d}us" rate "$RATE" limit 100000
}

for i in $(seq 1 "$WORKERS"); do
  ip netns add "sy-w$i"
  ip link add "sy-h$i" type veth peer name "sy-n$i"
  ip link set "sy-n$i" netns "sy-w$i"
  ip addr add "10.77.$i.1/24" dev "sy-h$i"
  ip link set "sy-h$i" up
  ip netns exec "sy-w$i" ip addr add "10.77.$i.2/24" dev "sy-n$i"
  ip netns exec "sy-w$i" ip link set "sy-n$i" up
  ip netns exec "sy-w$i" ip link set lo up
done

SPEC=()
for i in $(seq 1 "$WORKERS"); do
  lo=$(( (i - 1) * EXPERTS / WORKERS )); hi=$(( i * EXPERTS / WORKERS - 1 ))
  ip netns exec "sy-w$i" "$BIN" worker --model "$MODEL" --experts "$lo-$hi" \
    --listen "10.77.$i.2:7001" --ready-file "$TMP/w$i" >"$TMP/w$i.log" 2>&1 &
  PIDS+=($!)
  SPEC+=("10.77.$i.2:7001=$lo-$hi")
done
for i in $(seq 1 "$WORKERS"); do
  for _ in $(seq 1 1200); do [ -s "$TMP/w$i" ] && break; sleep 0.1; done
  [ -s "$TMP/w$i" ] || { echo "worker $i did not start:"; cat "$TMP/w$i.log"; exit 1; }
done
WORKERS_SPEC=$(IFS=,; echo "${SPEC[*]}")

for d in $DELAYS; do
  if [ "$d" != 0 ]; then
    for i in $(seq 1 "$WORKERS"); do
      shape "sy-h$i" "" "$d" && shape "sy-n$i" "sy-w$i" "$d" || {
        echo "tc netem is not available in this kernel (sch_netem); skipping ${d}us" >&2; continue 2; }
    done
  fi
  # shellcheck disable=SC2086
  "$BIN" bench --model "$MODEL" --workers "$WORKERS_SPEC" $BENCH_ARGS >"$TMP/bench-$d.json"
  python3 - "$TMP/bench-$d.json" "$d" "$RATE" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["modes"][0]
conc = ", ".join(f'{c["sequences"]} seq {c["tok_s_median"]:.1f}' for c in m["concurrency"])
print(f'delay {sys.argv[2]} us one way, {sys.argv[3]}: batch-1 decode {m["decode_tok_s_median"]:.1f} tok/s; {conc} tok/s')
EOF
done
