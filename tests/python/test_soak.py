"""Shortened soak and chaos runs (scripts/soak.py; the full ones run outside CI): under mixed
load with cancellations and bad requests nothing fails unexpectedly and every KV block comes
back; with workers killed, hung and etcd restarted, no request fails and every greedy
completion equals the failure-free run's."""
import json
import os
import subprocess
import sys

from conftest import BIN, FIXTURES, ROOT


def run(*args, timeout):
    env = dict(os.environ, SWITCHYARD_BIN=BIN, SWITCHYARD_FIXTURES=str(FIXTURES))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    report = json.loads(out.stdout) if out.stdout.strip().startswith("{") else {}
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return report


def test_a_short_soak_has_no_unexpected_errors_and_returns_every_block():
    # A 32 MiB cache (16,000 positions here) is touched whole within the warm-up even on a
    # loaded machine; a bigger one kept growing the RSS past it as its blocks were first used.
    r = run("soak", "--streams", "16", "--duration", "24", "--warmup", "8", "--kv-cache-mib", "32",
            "--max-rss-growth", "0.5", timeout=300)
    assert r["unexpected_errors"] == 0 and r["kv_blocks_used_at_end"] == 0
    assert r["requests"].get("bad", 0) > 0 and r["requests"].get("cancel", 0) > 0


def test_a_short_chaos_run_fails_no_request_and_changes_no_output():
    r = run("chaos", "--streams", "8", "--duration", "50", "--fault-every", "8", "--stop-seconds", "4",
            "--seed", "3", timeout=400)
    assert r["failed"] == 0 and r["differing_from_failure_free"] == 0
    kinds = " ".join(f["fault"] for f in r["faults"])
    assert "kill -9" in kinds and "SIGSTOP" in kinds and "etcd" in kinds, r["faults"]
