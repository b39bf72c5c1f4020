#!/usr/bin/env python3
"""Serving benchmark: N concurrent streaming completions against `switchyard serve`, started here on
MODEL (embedded, or with --workers K loopback workers). Reports aggregate generated tok/s, time to
first token and inter-token latency percentiles, per concurrency level, as JSON. Not part of CI.

    target/pyenv/bin/python scripts/bench-serve.py MODEL [--workers 2] [--concurrency 1,8,32]
"""
import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import subprocess
import tempfile
import time

import openai

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target" / "release" / "switchyard"))


def start(args, ready, log, threads):
    env = dict(os.environ, SWITCHYARD_THREADS=str(threads), SWITCHYARD_LOG="warn")
    p = subprocess.Popen([BIN, *args, "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    t = time.monotonic()
    while not (ready.exists() and ready.read_text().strip()):
        if p.poll() is not None or time.monotonic() - t > 600:
            raise SystemExit(f"{args[0]} failed to start:\n{log.read_text()}")
        time.sleep(0.1)
    return p, ready.read_text().strip()


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, round((len(v) - 1) * q))] if v else float("nan")


def one(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    stamps = []
    # logprobs=0 puts every token in its chunk, so tokens that are not yet whole UTF-8 characters
    # (common with random weights) are counted too.
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, logprobs=0, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].logprobs:
            now = time.perf_counter()
            stamps.extend([now] * len(chunk.choices[0].logprobs.tokens))
    return t0, stamps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    tmp = pathlib.Path(tempfile.mkdtemp())
    procs = []
    try:
        serve = ["serve", a.model, "--port", "0", "--max-running", "64", "--max-waiting", "512"]
        if a.workers:
            n = json.load(open(pathlib.Path(a.model) / "config.json"))["num_local_experts"]
            spec = []
            for w in range(a.workers):
                lo, hi = w * n // a.workers, (w + 1) * n // a.workers - 1
                p, addr = start(["worker", "--model", a.model, "--experts", f"{lo}-{hi}", "--listen", "127.0.0.1:0"],
                                tmp / f"w{w}", tmp / f"w{w}.log", a.threads)
                procs.append(p)
                spec.append(f"{addr}={lo}-{hi}")
            serve += ["--workers", ",".join(spec)]
        p, addr = start(serve, tmp / "srv", tmp / "srv.log", a.threads)
        procs.append(p)
        client = openai.OpenAI(base_url=f"http://{addr}/v1", api_key="x", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        words = "the file module list items return value object class function".split()
        results = []
        for c in [int(x) for x in a.concurrency.split(",")]:
            prompts = [" ".join(words[(i + j) % len(words)] for j in range(a.prompt_words)) + f" {i}" for i in range(c)]
            one(client, model, prompts[0], 4)  # warm-up
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(c) as ex:
                runs = list(ex.map(lambda pr: one(client, model, pr, a.max_tokens), prompts))
            wall = time.perf_counter() - t0
            tokens = sum(len(s) for _, s in runs)
            ttft = [(s[0] - t) * 1e3 for t, s in runs if s]
            itl = [(y - x) * 1e3 for _, s in runs for x, y in zip(s, s[1:])]
            r = {"concurrency": c, "aggregate_tok_s": tokens / wall, "ttft_ms_p50": pct(ttft, 0.5), "ttft_ms_p99": pct(ttft, 0.99),
                 "itl_ms_p50": pct(itl, 0.5), "itl_ms_p99": pct(itl, 0.99), "tokens": tokens, "wall_s": wall}
            print(f"concurrency {c:>3}: {r['aggregate_tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:7.1f} ms p99 {r['ttft_ms_p99']:7.1f} ms"
                  f"  ITL p50 {r['itl_ms_p50']:6.1f} ms p99 {r['itl_ms_p99']:6.1f} ms", flush=True)
            results.append(r)
        print(json.dumps({"model": a.model, "workers": a.workers, "threads": a.threads, "results": results}, indent=1))
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
