#!/usr/bin/env bash
# Hosts smaller than the model, on one machine: the coordinator and each expert worker run as
# if on their own host, each in a cgroup of its own with a CPU quota and a memory limit below
# the checkpoint's size, and each worker in its own network namespace behind a veth pair with a
# rate limit (and `tc netem` delay where the kernel has sch_netem). Measures 32-stream aggregate
# throughput (and batch-1 decode) with 1, 2 and 4 workers of equal quota, the experts split
# evenly, then with every expert on every worker; reports each role's peak memory and major
# page faults. Then several coordinators sharing 2 workers (data-parallel attention): 1 and 2
# coordinators of SHARED_STREAMS streams each (default 4), each in a cgroup of COORD_CPU, with the
# workers coalescing batches and with `--coalesce off` (the workers' counters, logged as they
# stop, go to workers.log beside each shared run's plan.json). Writes bench JSON per run to OUT_DIR and
# a summary table to stdout. First it calibrates the planner on this machine (`bench
# --calibrate`) and predicts every layout with `switchyard plan` (plan.json beside each
# bench.json): measured and predicted decode rates side by side.
#
#   sudo bash scripts/bench-hosts.sh MODEL_DIR [OUT_DIR=target/bench-hosts]
#
# Environment: WORKER_CPU (cores per worker, default 0.25), COORD_CPU (default 1), WORKER_MEM
# and COORD_MEM (bytes, default: 95 % of the checkpoint's size), RATE (default 10gbit), DELAY_US
# (one way, default 0; needs sch_netem), COUNTS (default "1 2 4"; "" for the shared runs
# alone), SHARED (0 to skip the shared runs), SHARED_WORKER_CPU (cores per worker in the shared
# runs, default WORKER_CPU), COALESCE (the workers' --coalesce settings for the shared runs, in
# order, default "on off"), PERIOD_US (the CPU quota's period, default 100000: a role may run
# at full speed until its quota of each period is spent; shorter periods make it run more
# evenly, like a slower host), CALIBRATION (a calibration.json to predict
# from instead of measuring one), PREDICT_ONLY (1: only predict OUT_DIR's layouts again, from
# its calibration.json), CONTEXT (positions per stream for the predictions, 48), SHARED_STREAMS (4), SHARED_COORD_CPU (0.75
# each), BENCH_ARGS (default
# "--concurrency 32 --runs 2 --decode-tokens 32"). Needs root, iproute2 and cgroup v1 (cpu,
# memory) or v2.
set -euo pipefail
MODEL=$(cd "${1:?usage: bench-hosts.sh MODEL_DIR [OUT_DIR]}" && pwd)
OUT=${2:-target/bench-hosts}
BIN=$(cd "$(dirname "$0")/.." && pwd)/target/release/switchyard
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORKER_CPU=${WORKER_CPU:-0.25}; COORD_CPU=${COORD_CPU:-1}; RATE=${RATE:-10gbit}
DELAY_US=${DELAY_US:-0}; COUNTS=${COUNTS-"1 2 4"}; SHARED_STREAMS=${SHARED_STREAMS:-4}
SHARED_COORD_CPU=${SHARED_COORD_CPU:-0.75}; SHARED_WORKER_CPU=${SHARED_WORKER_CPU:-$WORKER_CPU}
COALESCE=${COALESCE:-"on off"}; PERIOD_US=${PERIOD_US:-100000}
BENCH_ARGS=${BENCH_ARGS:---concurrency 32 --runs 2 --decode-tokens 32}
# Positions a stream holds while decoding, on average: the bench's 32-token prompts and 32
# decoded tokens.
CONTEXT=${CONTEXT:-48}
SIZE=$(du -sb --apparent-size "$MODEL" | cut -f1)
WORKER_MEM=${WORKER_MEM:-$((SIZE * 95 / 100))}; COORD_MEM=${COORD_MEM:-$((SIZE * 95 / 100))}
CAL=${CALIBRATION:-$OUT/calibration.json}
predict() { # NAME WORKERS REPLICAS COORDINATORS STREAMS COORD_CPU [WORKER_CPU]: plan.json for one layout
  mkdir -p "$OUT/$1"
  "$BIN" plan --model "$MODEL" --calibration "$CAL" --hosts "$2x${WORKER_MEM}:${7:-$WORKER_CPU}c" \
    --coordinator-host "${COORD_MEM}:$6c" --coordinators "$4" --streams "$5" \
    --net "$RATE,${DELAY_US}us" --context "$CONTEXT" --replicas "$3" --reserve 0 --json >"$OUT/$1/plan.json"
}
# PREDICT_ONLY=1: predict an earlier sitting's layouts again from its calibration (after a
# change to the planner), measuring nothing.
if [ "${PREDICT_ONLY:-0}" = 1 ]; then
  for n in $COUNTS; do
    predict "split-$n" "$n" none 1 32 "$COORD_CPU"
    [ "$n" = 1 ] || predict "replicated-$n" "$n" fill 1 32 "$COORD_CPU"
  done
  for coalesce in $COALESCE; do
    for c in 1 2; do predict "shared-$coalesce-$c" 2 none "$c" "$SHARED_STREAMS" "$SHARED_COORD_CPU" "$SHARED_WORKER_CPU"; done
  done
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "needs root (cgroups, network namespaces, tc)" >&2; exit 1; }
EXPERTS=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_local_experts'])" "$MODEL/config.json")
TMP=$(mktemp -d); PIDS=(); GROUPS_MADE=(); NS_MADE=()

V2=0; [ -f /sys/fs/cgroup/cgroup.controllers ] && V2=1
group() { # NAME CPUS BYTES: make a cgroup with a CPU quota and a memory limit
  local name=sy-$1 quota; quota=$(python3 -c "print(int($2 * $PERIOD_US))")
  if [ "$V2" = 1 ]; then
    mkdir -p "/sys/fs/cgroup/$name"
    echo "$quota $PERIOD_US" >"/sys/fs/cgroup/$name/cpu.max"
    echo "$3" >"/sys/fs/cgroup/$name/memory.max"
    echo 0 >"/sys/fs/cgroup/$name/memory.swap.max" 2>/dev/null || true
  else
    mkdir -p "/sys/fs/cgroup/cpu/$name" "/sys/fs/cgroup/memory/$name"
    echo "$PERIOD_US" >"/sys/fs/cgroup/cpu/$name/cpu.cfs_period_us"
    echo "$quota" >"/sys/fs/cgroup/cpu/$name/cpu.cfs_quota_us"
    echo "$3" >"/sys/fs/cgroup/memory/$name/memory.limit_in_bytes"
  fi
  GROUPS_MADE+=("$name")
}
enter() { # NAME: the shell command that moves itself into cgroup NAME (then execs "$@")
  local name=sy-$1
  if [ "$V2" = 1 ]; then echo "echo \$\$ >/sys/fs/cgroup/$name/cgroup.procs"
  else echo "echo \$\$ >/sys/fs/cgroup/cpu/$name/tasks; echo \$\$ >/sys/fs/cgroup/memory/$name/tasks"; fi
}
peak_kb() { # NAME: the cgroup's peak memory in kB
  local name=sy-$1
  if [ "$V2" = 1 ]; then
    f=/sys/fs/cgroup/$name/memory.peak; [ -f "$f" ] && echo $(($(cat "$f") / 1024)) || echo "?"
  else echo $(($(cat "/sys/fs/cgroup/memory/$name/memory.max_usage_in_bytes") / 1024)); fi
}
stop_all() { # stops this layout's processes and removes its cgroups
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
  for g in "${GROUPS_MADE[@]}"; do
    if [ "$V2" = 1 ]; then rmdir "/sys/fs/cgroup/$g" 2>/dev/null || true
    else rmdir "/sys/fs/cgroup/cpu/$g" "/sys/fs/cgroup/memory/$g" 2>/dev/null || true; fi
  done
  GROUPS_MADE=()
}
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${NS_MADE[@]:-}"; do [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null || true; done
  for i in 1 2 3 4 5 6 7 8; do ip link del "sy-h$i" 2>/dev/null || true; done
  for g in "${GROUPS_MADE[@]:-}"; do
    [ -n "$g" ] || continue
    if [ "$V2" = 1 ]; then rmdir "/sys/fs/cgroup/$g" 2>/dev/null || true
    else rmdir "/sys/fs/cgroup/cpu/$g" "/sys/fs/cgroup/memory/$g" 2>/dev/null || true; fi
  done
  rm -rf "$TMP"
}
trap cleanup EXIT

# One namespace and veth pair per worker slot, shaped once.
MAXW=$(echo "$COUNTS 2" | tr ' ' '\n' | sort -n | tail -1)
for i in $(seq 1 "$MAXW"); do
  ip netns add "sy-w$i"; NS_MADE+=("sy-w$i")
  ip link add "sy-h$i" type veth peer name "sy-n$i"
  ip link set "sy-n$i" netns "sy-w$i"
  ip addr add "10.78.$i.1/24" dev "sy-h$i"; ip link set "sy-h$i" up
  ip netns exec "sy-w$i" ip addr add "10.78.$i.2/24" dev "sy-n$i"
  ip netns exec "sy-w$i" ip link set "sy-n$i" up
  ip netns exec "sy-w$i" ip link set lo up
  for end in "sy-h$i:" "sy-n$i:sy-w$i"; do
    dev=${end%%:*}; ns=${end#*:}
    run=(); [ -n "$ns" ] && run=(ip netns exec "$ns")
    if ! "${run[@]}" tc qdisc replace dev "$dev" root netem delay "${DELAY_US}us" rate "$RATE" limit 100000 2>/dev/null; then
      [ "$DELAY_US" = 0 ] || { echo "DELAY_US needs sch_netem, which this kernel lacks" >&2; exit 1; }
      "${run[@]}" tc qdisc replace dev "$dev" root tbf rate "$RATE" burst 1mb latency 50ms
    fi
  done
done

# The planner's costs, measured on this machine now (one core, no cgroup), unless CALIBRATION
# names a file: every layout below is predicted from them beside its measurement.
if [ -z "${CALIBRATION:-}" ]; then
  "$BIN" --threads 1 bench --model "$MODEL" --calibrate --out "$OUT" 2>"$TMP/calibrate.log" \
    || { echo "calibration failed:"; tail -n 5 "$TMP/calibrate.log"; exit 1; }
fi
echo "model $(basename "$MODEL"): $((SIZE / 1048576)) MiB; workers ${WORKER_CPU} CPU and $((WORKER_MEM / 1048576)) MiB each; coordinator ${COORD_CPU} CPU and $((COORD_MEM / 1048576)) MiB; link $RATE, ${DELAY_US} us one way"
printf '%-16s %9s %9s %9s %9s %9s %9s  %s\n' run "32 agg" "32 steady" "predicted" "batch-1" "predicted" "" "roles: peak MiB / major faults"
for layout in split replicated; do
  for n in $COUNTS; do
    [ "$layout" = replicated ] && [ "$n" = 1 ] && continue
    PIDS=(); SPEC=(); ROLES=()
    # Page cache is charged to the cgroup that first reads a page: drop the checkpoint's, so
    # each role's limit covers the weights it maps.
    sync; echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || echo "could not drop the page cache: peaks leave out cached weights" >&2
    wthreads=$(python3 -c "import math; print(max(1, math.ceil($WORKER_CPU)))")
    for i in $(seq 1 "$n"); do
      if [ "$layout" = split ]; then lo=$(( (i - 1) * EXPERTS / n )); hi=$(( i * EXPERTS / n - 1 ))
      else lo=0; hi=$((EXPERTS - 1)); fi
      group "w$i" "$WORKER_CPU" "$WORKER_MEM"
      rm -f "$TMP/w$i"
      # Into the cgroup first: `ip netns exec` mounts the namespace's own /sys.
      sh -c "$(enter "w$i"); exec \"\$0\" \"\$@\"" ip netns exec "sy-w$i" "$BIN" --threads "$wthreads" \
        worker --model "$MODEL" --experts "$lo-$hi" --listen "10.78.$i.2:7001" \
        --ready-file "$TMP/w$i" >"$TMP/w$i.log" 2>&1 &
      PIDS+=($!); SPEC+=("10.78.$i.2:7001=$lo-$hi"); ROLES+=("w$i")
    done
    for i in $(seq 1 "$n"); do
      for _ in $(seq 1 3000); do [ -s "$TMP/w$i" ] && break; sleep 0.1; done
      [ -s "$TMP/w$i" ] || { echo "worker $i did not start:"; cat "$TMP/w$i.log"; exit 1; }
    done
    group coord "$COORD_CPU" "$COORD_MEM"
    cthreads=$(python3 -c "import math; print(max(1, math.ceil($COORD_CPU)))")
    name="$layout-$n"
    predict "$name" "$n" "$([ "$layout" = split ] && echo none || echo fill)" 1 32 "$COORD_CPU"
    # shellcheck disable=SC2086
    sh -c "$(enter coord); exec \"\$0\" \"\$@\"" /usr/bin/time -f %F -o "$TMP/coord.faults" \
      "$BIN" --threads "$cthreads" bench --model "$MODEL" \
      --workers "$(IFS=,; echo "${SPEC[*]}")" --bandwidth-probe-mib 64 $BENCH_ARGS --out "$OUT/$name" >/dev/null 2>"$TMP/coord.log" \
      || { echo "bench failed:"; tail -n 5 "$TMP/coord.log" "$TMP"/w*.log; exit 1; }
    roles="coord $(($(peak_kb coord) / 1024))/$(tail -1 "$TMP/coord.faults")"
    for i in $(seq 1 "$n"); do
      roles+=", w$i $(($(peak_kb "w$i") / 1024))/$(awk '{print $12}' "/proc/${PIDS[$((i - 1))]}/stat")"
    done
    echo "$roles" >"$OUT/$name/roles.txt"
    python3 - "$OUT/$name" "$name" "$roles" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/bench.json"))
p = json.load(open(sys.argv[1] + "/plan.json"))["plan"]
m = d["modes"][0]
c = m["concurrency"][0] if m["concurrency"] else {}
print(f"{sys.argv[2]:<16} {c.get('tok_s_median', float('nan')):9.1f} {c.get('decode_tok_s_from_itl_p50', float('nan')):9.1f} "
      f"{p['at_streams']['tok_s']:9.1f} {m['decode_tok_s_median']:9.1f} {p['batch1']['tok_s']:9.1f} {'':>9}  {sys.argv[3]}")
PY
    stop_all
  done
done

# Several coordinators on the same two workers (experts split 4+4).
start_workers() { # N COALESCE: N split workers; sets PIDS and SPEC
  PIDS=(); SPEC=()
  sync; echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || true
  for i in $(seq 1 "$1"); do
    lo=$(( (i - 1) * EXPERTS / $1 )); hi=$(( i * EXPERTS / $1 - 1 ))
    group "w$i" "$SHARED_WORKER_CPU" "$WORKER_MEM"; rm -f "$TMP/w$i"
    sh -c "$(enter "w$i"); exec \"\$0\" \"\$@\"" ip netns exec "sy-w$i" "$BIN" --threads 1 \
      --log warn,switchyard_worker=info \
      worker --model "$MODEL" --experts "$lo-$hi" --listen "10.78.$i.2:7001" --coalesce "$2" \
      --ready-file "$TMP/w$i" >"$TMP/w$i.log" 2>&1 &
    PIDS+=($!); SPEC+=("10.78.$i.2:7001=$lo-$hi")
  done
  for i in $(seq 1 "$1"); do
    for _ in $(seq 1 3000); do [ -s "$TMP/w$i" ] && break; sleep 0.1; done
    [ -s "$TMP/w$i" ] || { echo "worker $i did not start:"; cat "$TMP/w$i.log"; exit 1; }
  done
}
[ "${SHARED:-1}" = 0 ] && exit 0
echo
echo "coordinators sharing 2 workers of ${SHARED_WORKER_CPU} CPU, $SHARED_STREAMS streams each, coordinators ${SHARED_COORD_CPU} CPU each: aggregate tok/s"
for coalesce in $COALESCE; do
  for c in 1 2; do
    start_workers 2 "$coalesce"
    cpids=()
    predict "shared-$coalesce-$c" 2 none "$c" "$SHARED_STREAMS" "$SHARED_COORD_CPU" "$SHARED_WORKER_CPU"
    for k in $(seq 1 "$c"); do
      group "coord$k" "$SHARED_COORD_CPU" "$COORD_MEM"
      sh -c "$(enter "coord$k"); exec \"\$0\" \"\$@\"" "$BIN" --threads 1 bench --model "$MODEL" \
        --workers "$(IFS=,; echo "${SPEC[*]}")" --bandwidth-probe-mib 64 --concurrency "$SHARED_STREAMS" \
        --runs 3 --decode-tokens 32 --out "$OUT/shared-$coalesce-$c-$k" >/dev/null 2>"$TMP/coord$k.log" &
      cpids+=($!)
    done
    for p in "${cpids[@]}"; do wait "$p" || { echo "bench failed:"; tail -n 5 "$TMP"/coord*.log; exit 1; }; done
    python3 - "$OUT" "$coalesce" "$c" <<'PY'
import json, sys
out, coalesce, c = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = [json.load(open(f"{out}/shared-{coalesce}-{c}-{k}/bench.json"))["modes"][0]["concurrency"][0]
        for k in range(1, c + 1)]
figs = [r["tok_s_median"] for r in runs]
steady = sum(r["decode_tok_s_from_itl_p50"] for r in runs)
p = json.load(open(f"{out}/shared-{coalesce}-{c}/plan.json"))["plan"]["at_streams"]["tok_s"]
print(f"coalesce {coalesce}, {c} coordinator(s): {sum(figs):.1f} tok/s ({' + '.join(f'{f:.1f}' for f in figs)}); steady {steady:.1f}, predicted {p:.1f}")
PY
    stop_all
    # The workers' counters, logged as they stop: batches, expert calls, coalesced and joined.
    { grep -h "worker stopped" "$TMP"/w[12].log || true; } | sed 's/\x1b\[[0-9;]*m//g' \
      | tee "$OUT/shared-$coalesce-$c/workers.log" | sed 's/^.*worker stopped/  worker stopped/'
  done
done
