#!/usr/bin/env bash
# The cluster benchmark over a realistic network: each worker runs in its own Linux network
# namespace, joined to the coordinator's by a veth pair shaped with `tc netem` (one-way delay and a
# rate limit on both ends), so loopback does not flatter the design. Runs `switchyard bench` once
# per delay and prints decode tok/s at batch 1 and each concurrency, with dual-batch overlap on and
# off.
#
#   sudo bash scripts/bench-netns.sh MODEL_DIR [WORKERS=2] [DELAYS_US="0 50 500"] [RATE=10gbit]
#
# Needs root and iproute2. Kernels without sch_netem (CONFIG_NET_SCH_NETEM) get the same shape
# another way: `tc tbf` limits the rate on the veth pairs, and the delay comes from `netdelay`, a
# relay in the coordinator's namespace that holds each chunk for the delay in each direction. Then
# every delay, 0 included, goes through the relay, so the figures compare like with like.
# Uses target/release/{switchyard,netdelay}:
#   cargo build --release && cargo build --release -p switchyard-tests --bin netdelay
# Extra bench flags via BENCH_ARGS (default: --concurrency 1,8,32 --runs 3 --compare-overlap);
# each delay's bench JSON is kept as netns-bench-DELAY.json in OUT_DIR (default: not kept).
set -euo pipefail
MODEL=$(cd "${1:?usage: bench-netns.sh MODEL_DIR [WORKERS] [DELAYS_US] [RATE]}" && pwd)
WORKERS=${2:-2}
DELAYS=${3:-"0 50 500"}
RATE=${4:-10gbit}
BENCH_ARGS=${BENCH_ARGS:---concurrency 1,8,32 --runs 3 --compare-overlap}
BIN=$(cd "$(dirname "$0")/.." && pwd)/target/release/switchyard
RELAY=$(dirname "$BIN")/netdelay
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "needs root (network namespaces and tc)" >&2; exit 1; }
EXPERTS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_local_experts'])" "$MODEL/config.json")
TMP=$(mktemp -d)
PIDS=()

RELAY_PID=
cleanup() {
  if [ -n "$RELAY_PID" ]; then kill "$RELAY_PID" 2>/dev/null || true; fi
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for i in $(seq 1 "$WORKERS"); do
    ip link del "sy-h$i" 2>/dev/null || true
    ip netns del "sy-w$i" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

in_ns() { # NETNS CMD...: run CMD in NETNS, or here when NETNS is empty
  local ns=$1; shift
  if [ -n "$ns" ]; then ip netns exec "$ns" "$@"; else "$@"; fi
}
shape() { # DEV NETNS DELAY_US: netem delay + rate on DEV
  in_ns "$2" tc qdisc replace dev "$1" root netem delay "${3}us" rate "$RATE" limit 100000
}
rate_only() { # DEV NETNS: token-bucket rate limit on DEV
  in_ns "$2" tc qdisc replace dev "$1" root tbf rate "$RATE" burst 1mb latency 50ms
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

NETEM=1
if ! shape "sy-h1" "" 0 2>/dev/null; then
  NETEM=0
  [ -x "$RELAY" ] || { echo "no sch_netem here, and no relay: cargo build --release -p switchyard-tests --bin netdelay" >&2; exit 1; }
  echo "tc netem is not available in this kernel (sch_netem): rate by tc tbf, delay by the netdelay relay" >&2
  for i in $(seq 1 "$WORKERS"); do
    rate_only "sy-h$i" "" && rate_only "sy-n$i" "sy-w$i"
  done
fi

for d in $DELAYS; do
  spec=$WORKERS_SPEC
  how="netem"
  if [ "$NETEM" = 1 ]; then
    for i in $(seq 1 "$WORKERS"); do
      shape "sy-h$i" "" "$d" && shape "sy-n$i" "sy-w$i" "$d"
    done
  else
    # The relay listens on loopback ports 17001.. and forwards to each worker over its veth.
    routes=() relayed=()
    for i in $(seq 1 "$WORKERS"); do
      lo=$(( (i - 1) * EXPERTS / WORKERS )); hi=$(( i * EXPERTS / WORKERS - 1 ))
      routes+=("127.0.0.1:$((17000 + i))=10.77.$i.2:7001")
      relayed+=("127.0.0.1:$((17000 + i))=$lo-$hi")
    done
    "$RELAY" --delay-us "$d" "${routes[@]}" &
    RELAY_PID=$!
    sleep 0.3
    spec=$(IFS=,; echo "${relayed[*]}")
    how="tbf + netdelay relay"
  fi
  # shellcheck disable=SC2086
  "$BIN" bench --model "$MODEL" --workers "$spec" $BENCH_ARGS >"$TMP/bench-$d.json"
  if [ -n "$RELAY_PID" ]; then kill "$RELAY_PID"; wait "$RELAY_PID" 2>/dev/null || true; RELAY_PID=; fi
  if [ -n "${OUT_DIR:-}" ]; then cp "$TMP/bench-$d.json" "$OUT_DIR/netns-bench-$d.json"; fi
  python3 - "$TMP/bench-$d.json" "$d" "$RATE" "$how" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for m in r["modes"]:
    conc = ", ".join(f'{c["sequences"]} seq {c["tok_s_median"]:.1f}' for c in m["concurrency"])
    print(f'delay {sys.argv[2]} us one way, {sys.argv[3]} ({sys.argv[4]}), {m["mode"]}: '
          f'batch-1 decode {m["decode_tok_s_median"]:.1f} tok/s; {conc} tok/s')
EOF
done
