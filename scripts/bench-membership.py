#!/usr/bin/env python3
"""Live-membership benchmark with a real etcd, loopback workers and `switchyard serve`. Not part of CI.

Three measurements, each on a fresh etcd:
  join       two workers (0-3, 4-7) under streaming load; a third (0-7) is spawned: seconds from
             spawning its process to its first routed batch (coordinator metrics, polled every 20 ms).
  failover   three workers (0-7, 0-3, 4-7) under 16 decoding streams; the one hosting everything
             is killed with SIGKILL: the longest pause between tokens of any stream across the
             kill, against the median inter-token latency, and whether every stream completed.
  rebalance  a `gen-model --hot-experts 0,1` checkpoint on two managed workers (memory for five
             experts each): aggregate tok/s under the first plan (blocks: both hot experts on one
             worker), then after the planner has replicated the hot experts.

    target/pyenv/bin/python scripts/bench-membership.py [--model DIR] [--only join,failover,rebalance]
"""
import argparse
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "release" / "switchyard"))
TRAINED = ROOT.parent / "shared" / "fixtures" / "tiny-mixtral-trained"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    def __init__(self, tmp):
        self.tmp, self.procs, self.n = tmp, [], 0

    def start(self, args, threads=1, ready=True):
        self.n += 1
        log = self.tmp / f"p{id(self)}-{self.n}.log"
        r = self.tmp / f"p{id(self)}-{self.n}.ready"
        extra = ["--ready-file", str(r)] if ready else []
        env = dict(os.environ, SWITCHYARD_THREADS=str(threads), SWITCHYARD_LOG=os.environ.get("BENCH_LOG", "info"))
        p = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
        self.procs.append(p)
        if not ready:
            return p, None
        t = time.monotonic()
        while not (r.exists() and r.read_text().strip()):
            if p.poll() is not None or time.monotonic() - t > 300:
                raise SystemExit(f"{args[:2]} failed to start:\n{log.read_text()}")
            time.sleep(0.02)
        return p, r.read_text().strip()

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def etcd(procs):
    exe = shutil.which("etcd") or "/usr/bin/etcd"
    c, pe = free_port(), free_port()
    cu, pu = f"http://127.0.0.1:{c}", f"http://127.0.0.1:{pe}"
    procs.start([exe, "--data-dir", str(procs.tmp / f"etcd{c}"), "--listen-client-urls", cu,
                 "--advertise-client-urls", cu, "--listen-peer-urls", pu,
                 "--initial-advertise-peer-urls", pu, "--initial-cluster", f"default={pu}"], ready=False)
    for _ in range(300):
        try:
            if b"true" in urllib.request.urlopen(f"{cu}/health", timeout=1).read():
                return f"127.0.0.1:{c}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("etcd did not start")


def get(addr, path):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_ready(addr, limit=120):
    t = time.monotonic()
    while get(addr, "/ready")[0] != 200:
        if time.monotonic() - t > limit:
            raise SystemExit("server never became ready")
        time.sleep(0.05)


def metric(addr, name, worker):
    m = re.search(rf'^{name}{{worker="{re.escape(worker)}"}} (\S+)$', get(addr, "/metrics")[1], re.M)
    return float(m.group(1)) if m else None


def total(addr, name):
    m = re.search(rf"^{name} (\S+)$", get(addr, "/metrics")[1], re.M)
    return float(m.group(1)) if m else 0.0


def stream(addr, model, prompt, max_tokens, out):
    """One streaming completion; appends (token arrival times, finished cleanly) to out."""
    c = http.client.HTTPConnection(addr, timeout=300)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "logprobs": 0})
    c.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = c.getresponse()
    stamps, done = [], False
    for line in r:
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        j = json.loads(data)
        if "error" in j:
            break
        lp = j["choices"][0].get("logprobs") if j.get("choices") else None
        if lp:
            stamps.extend([time.perf_counter()] * len(lp["tokens"]))
    out.append((stamps, done and r.status == 200))


def load(addr, model, n, max_tokens, seconds=None, stop=None):
    """n concurrent streams, restarted until `seconds` pass or `stop` is set; returns results."""
    out, t0 = [], time.perf_counter()

    def loop(i):
        while True:
            stream(addr, model, f"request {i} about the file and the", max_tokens, out)
            if (seconds and time.perf_counter() - t0 > seconds) or (stop and stop.is_set()):
                return

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return out, time.perf_counter() - t0


def bench_join(tmp, model):
    procs = Procs(tmp)
    try:
        e = etcd(procs)
        reg = ["--etcd", e, "--cluster", "bench", "--lease-ttl", "2s"]
        for ex in ["0-3", "4-7"]:
            procs.start([BIN, "worker", "--model", str(model), "--experts", ex, "--listen", "127.0.0.1:0", *reg])
        _, s = procs.start([BIN, "serve", str(model), "--port", "0", *reg], threads=2)
        wait_ready(s)
        stop = threading.Event()
        th = threading.Thread(target=load, args=(s, model.name, 4, 32), kwargs={"stop": stop})
        th.start()
        time.sleep(1)
        t0 = time.perf_counter()
        _, w = procs.start([BIN, "worker", "--model", str(model), "--experts", "0-7", "--listen", "127.0.0.1:0", *reg])
        t_ready = time.perf_counter() - t0
        while (metric(s, "switchyard_worker_dispatch_latency_seconds_count", w) or 0) == 0:
            time.sleep(0.02)
        t_first = time.perf_counter() - t0
        stop.set()
        th.join()
        return {"spawn_to_serving_s": round(t_ready, 3), "spawn_to_first_routed_batch_s": round(t_first, 3),
                "serving_to_first_routed_batch_s": round(t_first - t_ready, 3)}
    finally:
        procs.stop()


def bench_failover(tmp, model):
    procs = Procs(tmp)
    try:
        e = etcd(procs)
        reg = ["--etcd", e, "--cluster", "bench", "--lease-ttl", "2s"]
        victim, _ = procs.start([BIN, "worker", "--model", str(model), "--experts", "0-7", "--listen", "127.0.0.1:0", *reg])
        for ex in ["0-3", "4-7"]:
            procs.start([BIN, "worker", "--model", str(model), "--experts", ex, "--listen", "127.0.0.1:0", *reg])
        _, s = procs.start([BIN, "serve", str(model), "--port", "0", *reg], threads=2)
        wait_ready(s)
        results = []
        th = threading.Thread(target=lambda: results.append(load(s, model.name, 16, 200, seconds=1)))
        th.start()
        # Kill in steady decode: every stream past its prompt (a prefill step is long and would
        # be mistaken for the failover's pause).
        while total(s, "switchyard_generation_tokens_total") < 16 * 4:
            time.sleep(0.05)
        t_kill = time.perf_counter()
        victim.send_signal(signal.SIGKILL)
        th.join()
        out, _ = results[0]
        gaps, around = [], []
        for stamps, _ in out:
            for a, b in zip(stamps, stamps[1:]):
                gaps.append(b - a)
                if a <= t_kill <= b:
                    around.append(b - a)
        return {"streams": len(out), "completed": sum(1 for _, ok in out if ok),
                "median_itl_ms": round(statistics.median(gaps) * 1e3, 2),
                "longest_gap_across_kill_ms": round(max(around) * 1e3, 2) if around else None,
                "failure_to_reroute_ms": round((max(around) - statistics.median(gaps)) * 1e3, 2) if around else None}
    finally:
        procs.stop()


def bench_rebalance(tmp, args):
    procs = Procs(tmp)
    try:
        m = tmp / "skewed"
        subprocess.run([BIN, "gen-model", "--out", str(m), "--hidden", str(args.hidden), "--layers", "4",
                        "--heads", "8", "--kv-heads", "2", "--intermediate", str(args.intermediate),
                        "--vocab", "1000", "--dtype", "bf16", "--hot-experts", "0,1"],
                       check=True, stderr=subprocess.DEVNULL)
        per_expert = 3 * args.hidden * args.intermediate * 4 * 2
        e = etcd(procs)
        reg = ["--etcd", e, "--cluster", "bench", "--lease-ttl", "2s"]
        for _ in range(2):
            procs.start([BIN, "worker", "--model", str(m), "--listen", "127.0.0.1:0", "--memory-budget",
                         str(5 * per_expert), *reg])
        _, s = procs.start([BIN, "serve", str(m), "--port", "0", "--rebalance-interval", str(args.interval),
                            *reg], threads=2)
        wait_ready(s)

        def status():
            return json.loads(subprocess.run([BIN, "cluster", "status", *reg[:4], "--json"], check=True,
                                             capture_output=True, text=True).stdout)

        def tput():
            out, dt = load(s, "skewed", args.streams, 32, seconds=args.seconds)
            return round(sum(len(st) for st, _ in out) / dt, 1)

        before_plan = status()["plan"]
        before = tput()
        t = time.monotonic()
        while True:
            st = status()
            if st["plan"]["reason"].startswith("rebalance") and all(len(st["replicas"][e]) == 2 for e in (0, 1)):
                break
            if time.monotonic() - t > 120:
                raise SystemExit(f"no rebalance: {st}")
            load(s, "skewed", 2, 16, seconds=1)
        time.sleep(3)  # the hand-over grace
        after = tput()
        return {"model": f"hidden {args.hidden}, intermediate {args.intermediate}, 4 layers, bf16, hot experts 0,1",
                "streams": args.streams, "plan_before": before_plan["assign"], "plan_after": st["plan"]["assign"],
                "reason": st["plan"]["reason"], "tok_s_before": before, "tok_s_after": after,
                "ratio": round(after / before, 2)}
    finally:
        procs.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=pathlib.Path, default=TRAINED)
    ap.add_argument("--only", default="join,failover,rebalance")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--interval", default="5s")
    ap.add_argument("--keep", type=pathlib.Path, help="write processes' logs here instead of a temp dir")
    a = ap.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = a.keep or pathlib.Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        for what in a.only.split(","):
            if what == "join":
                res["join"] = bench_join(tmp, a.model)
            elif what == "failover":
                res["failover"] = bench_failover(tmp, a.model)
            elif what == "rebalance":
                res["rebalance"] = bench_rebalance(tmp, a)
            print(json.dumps({what: res[what]}), flush=True)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
