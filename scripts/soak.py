#!/usr/bin/env python3
"""Soak and chaos runs against real switchyard processes started here (not part of CI; a
shortened run of each is, in tests/python/test_soak.py).

soak:  `serve` (embedded, or over --workers K) under S concurrent clients for D seconds: streamed
       and whole completions and chats of mixed lengths, cancellations mid-stream and
       interleaved bad requests. Passes when no request fails unexpectedly, the server's RSS is
       flat after warm-up and no KV-cache block is in use at the end.
chaos: 3 workers with every expert on two of them, registered in a real etcd, `serve` over them
       with the f32 wire, S greedy streams for D seconds while faults are injected one at a
       time: kill -9 a worker (restarted after a pause), SIGSTOP one for a while (a hung
       worker), restart etcd. Passes when no request fails and every completion equals the
       failure-free run's text for its prompt.

    target/pyenv/bin/python scripts/soak.py soak  [--streams 64] [--duration 600] [--workers 0]
    target/pyenv/bin/python scripts/soak.py chaos [--streams 16] [--duration 300]

Prints a JSON report (also with --out FILE); exits 1 when the run fails its criteria.
"""
import argparse
import http.client
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "release" / "switchyard"))
FIXTURES = pathlib.Path(os.environ.get("SWITCHYARD_FIXTURES", ROOT.parent / "shared" / "fixtures"))
MODEL = FIXTURES / "tiny-mixtral-trained"
NAME = MODEL.name

WORDS = ("the file system returns an error when the process reads a block that was never written "
         "so the kernel retries the request and logs the failure before the user sees it").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A switchyard (or etcd) process with its log in `dir`."""

    def __init__(self, args, dir, name, ready=True, env=None):
        self.args, self.dir, self.name, self.ready = args, pathlib.Path(dir), name, ready
        self.env = dict(os.environ, SWITCHYARD_LOG="warn", **(env or {}))
        self.proc, self.addr = None, None
        self.start()

    def start(self):
        ready = self.dir / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        args = list(self.args) + (["--ready-file", str(ready)] if self.ready else [])
        log = open(self.dir / f"{self.name}.log", "a")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env=self.env)
        if self.ready:
            t = time.monotonic()
            while not (ready.exists() and ready.read_text().strip()):
                if self.proc.poll() is not None or time.monotonic() - t > 300:
                    raise SystemExit(f"{self.name} failed to start:\n{(self.dir / f'{self.name}.log').read_text()[-3000:]}")
                time.sleep(0.05)
            self.addr = ready.read_text().strip()

    def signal(self, sig):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self):
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def rss_kib(self):
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None

    def major_faults(self):
        try:
            return int(open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()[9])
        except (OSError, IndexError, ValueError):
            return None


def post(addr, path, body, timeout=300):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    c.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body).encode(),
              headers={"content-type": "application/json"})
    return c, c.getresponse()


def ready(addr):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    c.request("GET", "/ready")
    ok = c.getresponse().status == 200
    c.close()
    return ok


def metric(addr, name):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def stream(addr, path, body, cancel_after=None):
    """Streams one request. Returns (status, text, tokens, finish_reason, error, gaps): `error`
    is set for a non-200 answer, an error event, a stream without [DONE] or a choice without a
    finish reason; `gaps` are the seconds between token events."""
    c, r = post(addr, path, dict(body, stream=True))
    if r.status != 200:
        payload = r.read()
        c.close()
        return r.status, "", 0, None, payload.decode(errors="replace")[:300], []
    text, tokens, finish, done, error, gaps, last = "", 0, None, False, None, [], None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        ev = json.loads(data)
        if "error" in ev:
            error = json.dumps(ev["error"])[:300]
            continue
        for ch in ev.get("choices", []):
            piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
            if piece:
                text += piece
            lp = ch.get("logprobs")
            n = len(lp.get("tokens", [])) if isinstance(lp, dict) and "tokens" in lp else (
                len(lp.get("content") or []) if isinstance(lp, dict) else (1 if piece else 0))
            if n:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                tokens += n
            if ch.get("finish_reason"):
                finish = ch["finish_reason"]
        if cancel_after is not None and tokens >= cancel_after:
            c.close()
            return 200, text, tokens, "cancelled", None, gaps
    c.close()
    if error is None and not done:
        error = "the stream ended without [DONE]"
    if error is None and finish is None:
        error = "no finish_reason"
    return 200, text, tokens, finish, error, gaps


def prompt(rng, words):
    return " ".join(rng.choice(WORDS) for _ in range(words))


BAD = [
    (b"{not json", 400),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": -3}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": "x", "n": 1000}).encode(), 400),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": [[1, 99999999]]}).encode(), 400),
    (json.dumps({"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}).encode(), 400),
]


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * q))] if v else None


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts, self.unexpected, self.tokens, self.gaps = {}, [], 0, []

    def add(self, kind, ok, detail=None, tokens=0, gaps=()):
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            self.tokens += tokens
            self.gaps.extend(gaps)
            if not ok:
                self.unexpected.append(f"{kind}: {detail}")


def soak_client(addr, rng, tally, stop_at, kinds):
    while time.monotonic() < stop_at:
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        max_tokens = rng.choice([1, 4, 16, 32, 64, 128])
        words = rng.choice([3, 12, 40, 150])
        sampling = {"temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
        try:
            if kind == "bad":
                raw, want = rng.choice(BAD)
                c, r = post(addr, "/v1/completions", raw)
                payload = json.loads(r.read() or b"{}")
                c.close()
                ok = r.status == want and "error" in payload
                tally.add(kind, ok, f"{r.status} {payload}")
            elif kind == "whole":
                body = {"model": NAME, "prompt": prompt(rng, words), "max_tokens": max_tokens, "logprobs": 1, **sampling}
                c, r = post(addr, "/v1/completions", body)
                payload = json.loads(r.read())
                c.close()
                ok = r.status == 200 and payload["choices"][0]["finish_reason"] in ("length", "stop")
                tally.add(kind, ok, f"{r.status} {str(payload)[:200]}", payload.get("usage", {}).get("completion_tokens", 0))
            else:
                chat = kind == "chat"
                path = "/v1/chat/completions" if chat else "/v1/completions"
                body = {"model": NAME, "max_tokens": max_tokens, **sampling}
                if chat:
                    body["messages"] = [{"role": "user", "content": prompt(rng, words)}]
                    body["logprobs"] = True
                else:
                    body["prompt"] = prompt(rng, words)
                    body["logprobs"] = 0
                cancel = rng.randint(1, max(1, max_tokens // 2)) if kind == "cancel" else None
                status, _, tokens, finish, error, gaps = stream(addr, path, body, cancel)
                ok = status == 200 and error is None
                tally.add(kind, ok, f"{status} {finish} {error}", tokens, gaps)
        except Exception as e:  # a reset connection or a timeout is a failure too
            tally.add(kind, False, repr(e))


def sample_loop(procs, addr, samples, stop):
    t0 = time.monotonic()
    while not stop.is_set():
        row = {"t": round(time.monotonic() - t0, 1)}
        for name, p in procs.items():
            row[f"{name}_rss_mib"] = round((p.rss_kib() or 0) / 1024, 1)
        try:
            row["kv_used"] = metric(addr, 'switchyard_kv_cache_blocks{state="used"}')
            row["running"] = metric(addr, "switchyard_num_requests_running")
        except OSError:
            pass
        samples.append(row)
        stop.wait(5)


def soak(a, tmp):
    procs = {}
    workers = []
    for i in range(a.workers):
        w = Proc([BIN, "worker", "--model", str(MODEL), "--listen", "127.0.0.1:0"], tmp, f"worker{i}")
        procs[f"worker{i}"] = w
        workers.append(w)
    # The KV cache's pages are touched as blocks are first used (freed blocks stay cached for
    # prefix reuse until evicted), so RSS climbs until the whole cache is touched: a cache that
    # warm-up fills lets the rest of the run show whether anything else grows.
    args = [BIN, "serve", str(MODEL), "--port", "0", "--max-running", "64", "--kv-cache-mib", str(a.kv_cache_mib)]
    if workers:
        args += ["--workers", ",".join(f"{w.addr}=0-7" for w in workers)]
    server = Proc(args, tmp, "serve")
    procs["serve"] = server
    faults_before = {n: p.major_faults() for n, p in procs.items()}
    tally, samples, stop = Tally(), [], threading.Event()
    sampler = threading.Thread(target=sample_loop, args=(procs, server.addr, samples, stop), daemon=True)
    sampler.start()
    kinds = {"stream": 50, "chat": 20, "whole": 10, "cancel": 10, "bad": 10}
    stop_at = time.monotonic() + a.duration
    clients = [threading.Thread(target=soak_client, args=(server.addr, random.Random(i), tally, stop_at, kinds))
               for i in range(a.streams)]
    t0 = time.monotonic()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    elapsed = time.monotonic() - t0
    # Everything finished: every block must come back.
    deadline, kv = time.monotonic() + 15, None
    while time.monotonic() < deadline:
        kv = metric(server.addr, 'switchyard_kv_cache_blocks{state="used"}')
        if kv == 0:
            break
        time.sleep(0.5)
    stop.set()
    sampler.join()
    rss = [s["serve_rss_mib"] for s in samples if s["t"] >= a.warmup]
    quarter = max(1, len(rss) // 4)
    early, late = (sorted(rss[:quarter])[quarter // 2], sorted(rss[-quarter:])[quarter // 2]) if rss else (0, 0)
    growth = (late - early) / early if early else 0.0
    report = {
        "mode": "soak", "streams": a.streams, "duration_s": round(elapsed, 1), "workers": a.workers,
        "requests": tally.counts, "unexpected_errors": len(tally.unexpected),
        "first_unexpected": tally.unexpected[:10],
        "generated_tokens": tally.tokens, "tok_per_s": round(tally.tokens / elapsed, 1),
        "itl_p50_ms": round(1e3 * (pct(tally.gaps, 0.5) or 0), 1),
        "itl_p99_ms": round(1e3 * (pct(tally.gaps, 0.99) or 0), 1),
        "rss_after_warmup_mib": {"first_quarter_median": early, "last_quarter_median": late,
                                 "growth": round(growth, 4)},
        "major_faults": {n: (p.major_faults() or 0) - (faults_before[n] or 0) for n, p in procs.items()},
        "kv_blocks_used_at_end": kv,
        "samples": samples,
    }
    report["passed"] = (not tally.unexpected and kv == 0 and growth <= a.max_rss_growth
                        and all(p.proc.poll() is None for p in procs.values()))
    for p in procs.values():
        p.kill()
    return report


class Etcd:
    def __init__(self, tmp):
        self.dir = pathlib.Path(tmp)
        self.client, self.peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{self.client}"
        self.proc = None
        self.start()

    def start(self):
        url, peer = f"http://127.0.0.1:{self.client}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            [os.environ.get("SWITCHYARD_ETCD_BIN", "etcd"), "--data-dir", str(self.dir / "etcd"), "--name", "default",
             "--listen-client-urls", url, "--advertise-client-urls", url, "--listen-peer-urls", peer,
             "--initial-advertise-peer-urls", peer, "--initial-cluster", f"default={peer}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "etcd.log", "a"))
        t = time.monotonic()
        while time.monotonic() - t < 30:
            try:
                socket.create_connection(("127.0.0.1", self.client), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("etcd did not start")

    def kill(self):
        self.proc.kill()
        self.proc.wait()


# Every expert on two of the three workers.
CHAOS_EXPERTS = ["0-5", "2-7", "0-1,6-7"]


def chaos_prompts(n):
    rng = random.Random(7)
    return [prompt(rng, rng.choice([4, 12, 30])) for _ in range(n)]


def chaos_client(addr, prompts, idx, tally, stop_at, max_tokens, texts, reference):
    i = idx
    while time.monotonic() < stop_at:
        p = prompts[i % len(prompts)]
        body = {"model": NAME, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0}
        try:
            status, text, tokens, finish, error, gaps = stream(addr, "/v1/completions", body)
            ok = status == 200 and error is None
            tally.add("greedy", ok, f"{status} {error}", tokens, gaps)
            if ok and reference is not None:
                with tally.lock:
                    texts.append((i % len(prompts), text == reference[i % len(prompts)]))
            elif ok and texts is not None:
                with tally.lock:
                    texts.append((i % len(prompts), text))
        except Exception as e:
            tally.add("greedy", False, repr(e))
        i += len(prompts) // 3 + 1


def chaos(a, tmp):
    etcd = Etcd(tmp)
    reg = ["--etcd", etcd.endpoint, "--cluster", "chaos", "--lease-ttl", "2s"]
    workers = [Proc([BIN, "worker", "--model", str(MODEL), "--listen", f"127.0.0.1:{free_port()}", "--experts", e, *reg],
                    tmp, f"worker{i}") for i, e in enumerate(CHAOS_EXPERTS)]
    server = Proc([BIN, "serve", str(MODEL), "--port", "0", "--wire-dtype", "f32", "--expert-wait", "60s",
                   "--rpc-timeout", "2s", *reg], tmp, "serve")
    t = time.monotonic()
    while not ready(server.addr) and time.monotonic() - t < 30:
        time.sleep(0.2)
    prompts = chaos_prompts(24)
    # The failure-free reference: every prompt once, alone.
    reference = []
    for p in prompts:
        status, text, _, _, error, _ = stream(server.addr, "/v1/completions",
                                              {"model": NAME, "prompt": p, "max_tokens": a.max_tokens,
                                               "temperature": 0, "logprobs": 0})
        if status != 200 or error:
            raise SystemExit(f"the failure-free run failed: {status} {error}")
        reference.append(text)
    tally, texts, faults = Tally(), [], []
    stop_at = time.monotonic() + a.duration
    clients = [threading.Thread(target=chaos_client,
                                args=(server.addr, prompts, i, tally, stop_at, a.max_tokens, texts, reference))
               for i in range(a.streams)]
    t0 = time.monotonic()
    for c in clients:
        c.start()
    rng = random.Random(a.seed)
    cycle = []
    while time.monotonic() < stop_at - 5:
        time.sleep(rng.uniform(a.fault_every / 2, a.fault_every))
        if time.monotonic() >= stop_at - 5:
            break
        if not cycle:  # every kind of fault once per cycle, in a random order
            cycle = rng.sample(["kill", "stop", "etcd"], 3)
        kind = cycle.pop()
        at = round(time.monotonic() - t0, 1)
        if kind == "kill":
            w = rng.choice(workers)
            w.kill()
            time.sleep(rng.uniform(2, 6))
            w.start()
            faults.append({"t": at, "fault": f"kill -9 {w.name}, restarted"})
        elif kind == "stop":
            w = rng.choice(workers)
            w.signal(signal.SIGSTOP)
            time.sleep(a.stop_seconds)
            w.signal(signal.SIGCONT)
            faults.append({"t": at, "fault": f"SIGSTOP {w.name} for {a.stop_seconds} s"})
        else:
            etcd.kill()
            time.sleep(rng.uniform(1, 4))
            etcd.start()
            faults.append({"t": at, "fault": "etcd killed and restarted"})
    for c in clients:
        c.join()
    elapsed = time.monotonic() - t0
    mismatched = sum(1 for _, same in texts if not same)
    report = {
        "mode": "chaos", "streams": a.streams, "duration_s": round(elapsed, 1), "faults": faults,
        "requests": tally.counts, "failed": len(tally.unexpected), "first_failures": tally.unexpected[:10],
        "completions_compared": len(texts), "differing_from_failure_free": mismatched,
        "generated_tokens": tally.tokens, "tok_per_s": round(tally.tokens / elapsed, 1),
        "itl_p50_ms": round(1e3 * (pct(tally.gaps, 0.5) or 0), 1),
        "itl_p99_ms": round(1e3 * (pct(tally.gaps, 0.99) or 0), 1),
        "itl_max_ms": round(1e3 * (max(tally.gaps) if tally.gaps else 0), 1),
    }
    report["passed"] = not tally.unexpected and mismatched == 0 and server.proc.poll() is None
    for p in [server, *workers]:
        p.signal(signal.SIGCONT)
        p.kill()
    etcd.kill()
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["soak", "chaos"])
    ap.add_argument("--streams", type=int)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--workers", type=int, default=0, help="soak: serve over K loopback workers")
    ap.add_argument("--warmup", type=float, default=60, help="soak: seconds before RSS counts")
    ap.add_argument("--kv-cache-mib", type=int, default=128, help="soak: the server's KV cache")
    ap.add_argument("--max-rss-growth", type=float, default=0.10, help="soak: allowed RSS growth after warm-up")
    ap.add_argument("--max-tokens", type=int, default=24, help="chaos: tokens per completion")
    ap.add_argument("--fault-every", type=float, default=30, help="chaos: seconds between faults (at most)")
    ap.add_argument("--stop-seconds", type=float, default=20, help="chaos: how long a worker stays SIGSTOPped")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.streams is None:
        a.streams = 64 if a.mode == "soak" else 16
    if a.duration is None:
        a.duration = 600 if a.mode == "soak" else 300
    tmp = tempfile.mkdtemp(prefix=f"switchyard-{a.mode}-")
    try:
        report = soak(a, tmp) if a.mode == "soak" else chaos(a, tmp)
    except BaseException:
        print(f"logs kept in {tmp}", file=sys.stderr)
        raise
    text = json.dumps(report, indent=1)
    if a.out:
        pathlib.Path(a.out).write_text(text)
    print(text)
    if report["passed"]:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"FAILED; logs kept in {tmp}", file=sys.stderr)
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
