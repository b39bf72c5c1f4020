"""The operator's view: `/dashboard` rendered in headless Chromium against `serve` over two
workers under load (the heatmap shows every expert that was routed to, the workers table both
workers; a screenshot is saved), `/v1/cluster` behind the API key, and the Grafana dashboard in
deploy/monitoring querying only metrics the server exports."""
import json
import os
import pathlib
import re
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import MODEL_NAME, ROOT, Server, Worker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def get_json(url, key=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def complete(addr, prompt, max_tokens=24):
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"http://{addr}/v1/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def cluster():
    w1, w2 = Worker("0-3"), Worker("4-7")
    s = Server("--workers", f"{w1.addr}=0-3,{w2.addr}=4-7")
    yield s, w1, w2
    for p in (s, w1, w2):
        p.stop()


def load(addr, seconds, streams=4):
    stop_at = time.monotonic() + seconds
    prompts = ["Once upon a time", "The kernel returns an error when", "If the file does not exist, the",
               "She opened the door and"]

    def go(i):
        while time.monotonic() < stop_at:
            complete(addr, prompts[i % len(prompts)])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    return threads


def chrome(width, height):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


# The page re-renders every refresh, so it is read in one script call (no stale elements).
READ = """
const cells = [...document.querySelectorAll('#heatmap td.cell[data-count]')].map(
  c => [+c.dataset.layer, +c.dataset.expert, +c.dataset.count]);
const workers = [...document.querySelectorAll('#workers tr.worker')].map(r => [r.dataset.id, r.innerText]);
const spark = !!document.querySelector('#sparks .spark[data-field="tok_per_s"] polyline');
return {updated: document.body.dataset.updated || null, cells, workers, spark};
"""


def test_dashboard_shows_every_routed_expert_and_both_workers(cluster):
    from selenium.webdriver.support.ui import WebDriverWait

    s, w1, w2 = cluster
    threads = load(s.addr, 8)
    driver = chrome(1280, 1500)
    try:
        driver.get(f"{s.url}/dashboard")
        wait = WebDriverWait(driver, 60, poll_frequency=0.25)
        wait.until(lambda d: any(n > 0 for _, _, n in d.execute_script(READ)["cells"]))
        for t in threads:
            t.join()
        # Load has stopped: the next refresh shows everything that was routed.
        first = driver.execute_script("return document.body.dataset.updated")
        wait.until(lambda d: d.execute_script("return document.body.dataset.updated") != first)
        time.sleep(2.5)
        wait.until(lambda d: d.execute_script("return document.body.dataset.updated") != first)
        x = get_json(f"{s.url}/v1/cluster")
        page = driver.execute_script(READ)
        cells = {(l, e): n for l, e, n in page["cells"]}
        routed = x["experts"]["routed"]
        assert len(cells) == x["experts"]["layers"] * x["experts"]["experts"]
        for e in range(x["experts"]["experts"]):
            if x["experts"]["per_expert"][e]:
                assert any(cells[(l, e)] > 0 for l in range(x["experts"]["layers"])), f"expert {e} routed but blank"
        for (l, e), n in cells.items():
            assert (n > 0) == (routed[l][e] > 0), (l, e, n, routed[l][e])
        assert sum(x["experts"]["per_expert"]) > 0
        assert sorted(i for i, _ in page["workers"]) == sorted([w1.addr, w2.addr])
        assert all("up" in text for _, text in page["workers"]), page["workers"]
        assert page["spark"], "no tokens-per-second sparkline"
        out = ROOT / "target" / "dashboard.png"
        out.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(out))
        if os.environ.get("SWITCHYARD_UPDATE_DOCS"):
            shutil.copy(out, ROOT / "docs" / "dashboard.png")
        # A phone's width: the page does not scroll sideways (wide tables scroll within).
        driver.set_window_size(390, 844)
        time.sleep(0.5)
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
    finally:
        driver.quit()
        for t in threads:
            t.join()


def test_cluster_view_counts_what_was_routed_and_names_the_placement(cluster):
    s, w1, w2 = cluster
    complete(s.addr, "Counting routed tokens", 8)
    time.sleep(2.5)
    x = get_json(f"{s.url}/v1/cluster")
    assert x["mode"] == "cluster" and x["replicas"] == [1] * 8
    hosted = {w["id"]: w["experts"] for w in x["workers"]}
    assert hosted == {w1.addr: [0, 1, 2, 3], w2.addr: [4, 5, 6, 7]}
    assert all(sum(row) > 0 for row in x["experts"]["routed"]), x["experts"]
    assert x["requests"]["series"], "no sparkline points"


def test_cluster_view_needs_the_key_and_the_page_holds_no_data(make_server):
    s = make_server("--api-key", "sekrit")
    with pytest.raises(urllib.error.HTTPError) as e:
        get_json(f"{s.url}/v1/cluster")
    assert e.value.code == 401
    assert get_json(f"{s.url}/v1/cluster", key="sekrit")["mode"] == "embedded"
    with urllib.request.urlopen(f"{s.url}/dashboard", timeout=30) as r:
        page = r.read().decode()
        assert r.status == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    assert "tiny-mixtral" not in page and "/v1/cluster" in page


def promql_metrics(expr):
    return set(re.findall(r"\b(switchyard_[a-z0-9_]+)", expr))


def test_grafana_dashboard_queries_only_exported_metrics(cluster):
    s, _, _ = cluster
    complete(s.addr, "Metrics for Grafana", 8)
    with pytest.raises(urllib.error.HTTPError):  # an error, so the error counter has a series
        complete(s.addr, "x", -1)
    with urllib.request.urlopen(f"{s.url}/metrics", timeout=30) as r:
        exported = set()
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    board = json.loads((ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    panels = board["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = set().union(*map(promql_metrics, exprs))
    missing = sorted(m for m in used if m not in exported)
    assert not missing, f"queried but not exported: {missing}"
    titles = " ".join(p["title"] for p in panels)
    assert "expert" in titles.lower()
    heat = [p for p in panels if p["type"] == "heatmap"]
    assert heat and "switchyard_expert_routed_tokens_total" in " ".join(t["expr"] for t in heat[0]["targets"])
