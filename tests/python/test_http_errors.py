"""Bad requests over raw HTTP: each gets OpenAI's error shape with the documented status, and
the server stays healthy. Also authentication, back-pressure, cancellation, worker loss and
graceful shutdown."""
import http.client
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import MODEL_NAME

M = MODEL_NAME
MSG = [{"role": "user", "content": "hi"}]


def request(addr, method, path, body=None, headers=None, raw=None):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"content-type": "application/json", **(headers or {})}
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    payload = r.read()
    c.close()
    try:
        j = json.loads(payload)
    except ValueError:
        j = None
    return r.status, dict(r.getheaders()), j


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
BAD = [
    # (name, path, body or raw bytes, status, error type)
    ("malformed JSON", CMPL, b'{"model": ', 400, "invalid_request_error"),
    ("body is an array", CMPL, [1, 2], 400, "invalid_request_error"),
    ("missing model", CMPL, {"prompt": "a"}, 400, "invalid_request_error"),
    ("unknown model", CMPL, {"model": "gpt-5", "prompt": "a"}, 404, "invalid_request_error"),
    ("missing prompt", CMPL, {"model": M}, 400, "invalid_request_error"),
    ("empty prompt list", CMPL, {"model": M, "prompt": []}, 400, "invalid_request_error"),
    ("prompt token out of vocabulary", CMPL, {"model": M, "prompt": [1, 999999]}, 400, "invalid_request_error"),
    ("prompt of wrong type", CMPL, {"model": M, "prompt": {"a": 1}}, 400, "invalid_request_error"),
    ("negative max_tokens", CMPL, {"model": M, "prompt": "a", "max_tokens": -5}, 400, "invalid_request_error"),
    ("zero max_tokens", CMPL, {"model": M, "prompt": "a", "max_tokens": 0}, 400, "invalid_request_error"),
    ("max_tokens beyond context", CMPL, {"model": M, "prompt": "a", "max_tokens": 100000}, 400, "invalid_request_error"),
    ("prompt longer than the context", CMPL, {"model": M, "prompt": "word " * 3000, "max_tokens": 4}, 400, "invalid_request_error"),
    ("temperature 'hot'", CMPL, {"model": M, "prompt": "a", "temperature": "hot"}, 400, "invalid_request_error"),
    ("temperature too high", CMPL, {"model": M, "prompt": "a", "temperature": 3.5}, 400, "invalid_request_error"),
    ("top_p zero", CMPL, {"model": M, "prompt": "a", "top_p": 0}, 400, "invalid_request_error"),
    ("top_p above one", CMPL, {"model": M, "prompt": "a", "top_p": 1.5}, 400, "invalid_request_error"),
    ("n zero", CMPL, {"model": M, "prompt": "a", "n": 0}, 400, "invalid_request_error"),
    ("n too large", CMPL, {"model": M, "prompt": "a", "n": 500}, 400, "invalid_request_error"),
    ("presence_penalty out of range", CMPL, {"model": M, "prompt": "a", "presence_penalty": 5}, 400, "invalid_request_error"),
    ("negative seed", CMPL, {"model": M, "prompt": "a", "seed": -1}, 400, "invalid_request_error"),
    ("logprobs too many", CMPL, {"model": M, "prompt": "a", "logprobs": 50}, 400, "invalid_request_error"),
    ("five stop strings", CMPL, {"model": M, "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request_error"),
    ("empty stop string", CMPL, {"model": M, "prompt": "a", "stop": ""}, 400, "invalid_request_error"),
    ("stop string over 1 KiB", CMPL, {"model": M, "prompt": "a", "stop": "x" * 1025}, 400, "invalid_request_error"),
    ("65 prompts", CMPL, {"model": M, "prompt": ["a"] * 65}, 400, "invalid_request_error"),
    ("65 stop_token_ids", CMPL, {"model": M, "prompt": "a", "stop_token_ids": [5] * 65}, 400, "invalid_request_error"),
    ("logit_bias of 1025 tokens", CMPL, {"model": M, "prompt": "a", "logit_bias": {str(i): 1 for i in range(1025)}}, 400, "invalid_request_error"),
    ("best_of", CMPL, {"model": M, "prompt": "a", "best_of": 3}, 400, "invalid_request_error"),
    ("logit_bias key not a token id", CMPL, {"model": M, "prompt": "a", "logit_bias": {"the": 10}}, 400, "invalid_request_error"),
    ("logit_bias key outside the vocabulary", CMPL, {"model": M, "prompt": "a", "logit_bias": {"99999999": 10}}, 400, "invalid_request_error"),
    ("logit_bias above 100", CMPL, {"model": M, "prompt": "a", "logit_bias": {"5": 101}}, 400, "invalid_request_error"),
    ("logit_bias not a number", CMPL, {"model": M, "prompt": "a", "logit_bias": {"5": "up"}}, 400, "invalid_request_error"),
    ("min_p above one", CMPL, {"model": M, "prompt": "a", "min_p": 1.5}, 400, "invalid_request_error"),
    ("negative min_tokens", CMPL, {"model": M, "prompt": "a", "min_tokens": -1}, 400, "invalid_request_error"),
    ("min_tokens above max_tokens", CMPL, {"model": M, "prompt": "a", "max_tokens": 2, "min_tokens": 3}, 400, "invalid_request_error"),
    ("stream_options without stream", CMPL, {"model": M, "prompt": "a", "stream_options": {"include_usage": True}}, 400, "invalid_request_error"),
    ("missing messages", CHAT, {"model": M}, 400, "invalid_request_error"),
    ("empty messages", CHAT, {"model": M, "messages": []}, 400, "invalid_request_error"),
    ("messages not a list", CHAT, {"model": M, "messages": "hi"}, 400, "invalid_request_error"),
    ("invalid role", CHAT, {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request_error"),
    ("roles not alternating", CHAT, {"model": M, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_request_error"),
    ("image content", CHAT, {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "invalid_request_error"),
    ("tools", CHAT, {"model": M, "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "invalid_request_error"),
    ("top_logprobs without logprobs", CHAT, {"model": M, "messages": MSG, "top_logprobs": 2}, 400, "invalid_request_error"),
    ("json_schema whose root is not an object", CHAT, {"model": M, "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, 400, "invalid_request_error"),
    ("json_schema with a pattern", CHAT, {"model": M, "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}}}}, 400, "invalid_request_error"),
    ("json_schema without a schema", CHAT, {"model": M, "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "invalid_request_error"),
    ("response_format without a type", CHAT, {"model": M, "messages": MSG, "response_format": {}}, 400, "invalid_request_error"),
    ("unknown route", "/v1/embeddings", {"model": M, "input": "a"}, 404, "invalid_request_error"),
]


@pytest.mark.parametrize("name,path,body,status,kind", BAD, ids=[b[0] for b in BAD])
def test_bad_request(server, name, path, body, status, kind):
    raw = body if isinstance(body, bytes) else None
    code, headers, j = request(server.addr, "POST", path, None if raw else body, raw=raw)
    assert code == status, (name, j)
    assert j is not None and set(j["error"]) >= {"message", "type", "param", "code"}, j
    assert j["error"]["type"] == kind and j["error"]["message"]


def test_ten_megabyte_body_is_refused_and_server_stays_healthy(server):
    big = json.dumps({"model": M, "prompt": "a" * (10 << 20)}).encode()
    host, port = server.addr.split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(big)).encode() + b"\r\n\r\n")
    try:
        sock.sendall(big)  # the server answers before reading it all and may close early
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = b""
    try:
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    except ConnectionResetError:
        pass
    sock.close()
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    # After every bad request above, the server still answers.
    assert request(server.addr, "GET", "/health")[0] == 200
    # ignore_eos: the default temperature samples, and may draw EOS before the third token.
    body = {"model": M, "prompt": "Return the", "max_tokens": 3, "ignore_eos": True}
    code, _, j = request(server.addr, "POST", CMPL, body)
    assert code == 200 and j["usage"]["completion_tokens"] == 3


def test_api_key(make_server):
    s = make_server("--api-key", "sekret")
    body = {"model": M, "prompt": "a", "max_tokens": 2}
    assert request(s.addr, "POST", CMPL, body)[0] == 401
    assert request(s.addr, "POST", CMPL, body, {"authorization": "Bearer wrong"})[0] == 401
    assert request(s.addr, "GET", "/v1/models")[0] == 401
    assert request(s.addr, "POST", CMPL, body, {"authorization": "Bearer sekret"})[0] == 200
    assert request(s.addr, "GET", "/health")[0] == 200
    s.client(api_key="sekret").models.list()


def test_several_api_keys_from_flags_and_a_file(make_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("from-file\n\n")
    s = make_server("--api-key", "one,two", "--api-key-file", str(keys))
    for key in ["one", "two", "from-file"]:
        assert request(s.addr, "GET", "/v1/models", None, {"authorization": f"Bearer {key}"})[0] == 200, key
    for key in ["", "on", "one,two", "from-fil"]:
        assert request(s.addr, "GET", "/v1/models", None, {"authorization": f"Bearer {key}"})[0] == 401, key


def test_queue_full_is_429_with_retry_after(make_server):
    s = make_server("--max-running", "1", "--max-waiting", "1")
    body = {"model": M, "prompt": "Return the", "max_tokens": 60, "ignore_eos": True}
    results = []

    def go():
        results.append(request(s.addr, "POST", CMPL, body))

    threads = [threading.Thread(target=go) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    codes = sorted(r[0] for r in results)
    assert 429 in codes and 200 in codes, codes
    for code, headers, j in results:
        if code == 429:
            assert headers.get("retry-after") and j["error"]["type"] == "rate_limit_error"


def test_two_hundred_requests_at_once_are_served_or_refused_cleanly(make_server):
    """200 requests arrive together at a server that runs 4 and queues 100: each is answered
    200 or 429 (with Retry-After), nothing else; every KV block comes back; it serves on."""
    s = make_server("--max-running", "4", "--max-waiting", "100")
    body = {"model": M, "prompt": "Return the", "max_tokens": 16, "ignore_eos": True}
    results = []
    lock = threading.Lock()
    start = threading.Barrier(200)

    def go():
        start.wait()
        r = request(s.addr, "POST", CMPL, body)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=go) for _ in range(200)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    codes = [r[0] for r in results]
    assert len(codes) == 200 and set(codes) <= {200, 429}, sorted(set(codes))
    assert codes.count(200) >= 100, codes.count(200)
    for code, headers, j in results:
        if code == 200:
            assert j["choices"][0]["finish_reason"] == "length"
        else:
            assert headers.get("retry-after") and j["error"]["type"] == "rate_limit_error"
    deadline = time.monotonic() + 10
    while metric(s.addr, 'switchyard_kv_cache_blocks{state="used"}') != 0:
        assert time.monotonic() < deadline, "KV blocks still in use"
        time.sleep(0.2)
    assert request(s.addr, "POST", CMPL, body)[0] == 200


def metric(addr, name):
    host, port = addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_client_disconnect_cancels_the_sequence(make_server):
    s = make_server()
    host, port = s.addr.split(":")
    body = json.dumps({"model": M, "prompt": "Return the", "max_tokens": 400, "ignore_eos": True, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    seen = b""
    while b"data:" not in seen:
        chunk = sock.recv(4096)
        assert chunk, "stream ended early"
        seen += chunk
    sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (metric(s.addr, "switchyard_requests_cancelled_total") >= 1 and metric(s.addr, "switchyard_num_requests_running") == 0
                and metric(s.addr, "switchyard_kv_cache_usage_perc") == 0):
            break
        time.sleep(0.1)
    assert metric(s.addr, "switchyard_requests_cancelled_total") >= 1
    assert metric(s.addr, "switchyard_generation_tokens_total") < 400
    assert metric(s.addr, "switchyard_kv_cache_usage_perc") == 0


def test_lost_workers_answer_503(make_server, make_worker):
    a, b = make_worker("0-3"), make_worker("4-7")
    s = make_server("--workers", f"{a.addr}=0-3,{b.addr}=4-7", "--rpc-timeout", "5s", "--expert-wait", "1s")
    body = {"model": M, "prompt": "Return the number of items", "max_tokens": 5}
    assert request(s.addr, "POST", CMPL, body)[0] == 200
    assert request(s.addr, "GET", "/ready")[0] == 200
    b.stop()
    code, headers, j = request(s.addr, "POST", CMPL, body)
    assert code == 503, j
    assert j["error"]["type"] == "service_unavailable" and "expert" in j["error"]["message"]
    assert headers.get("retry-after")
    assert request(s.addr, "GET", "/ready")[0] == 503
    assert request(s.addr, "GET", "/health")[0] == 200


def test_sigterm_finishes_in_flight_requests(make_server):
    s = make_server()
    out = {}

    def go():
        out["r"] = request(s.addr, "POST", CMPL, {"model": M, "prompt": "Return the", "max_tokens": 120, "ignore_eos": True})

    t = threading.Thread(target=go)
    t.start()
    deadline = time.monotonic() + 30
    while metric(s.addr, "switchyard_generation_tokens_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    s.signal(signal.SIGTERM)
    t.join(timeout=120)
    code, _, j = out["r"]
    assert code == 200 and j["usage"]["completion_tokens"] == 120
    assert s.proc.wait(timeout=60) == 0


def test_a_request_past_its_timeout_is_a_504_and_a_stream_ends_with_an_error_event(make_server):
    s = make_server("--request-timeout", "50ms")
    body = {"model": M, "prompt": "Return the", "max_tokens": 480, "ignore_eos": True}
    code, _, j = request(s.addr, "POST", CMPL, body)
    assert code == 504, (code, j)
    assert j["error"]["code"] == "SY:API:Timeout"
    host, port = s.addr.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=120)
    c.request("POST", CMPL, body=json.dumps({**body, "stream": True}), headers={"content-type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    c.close()
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["error"]["code"] == "SY:API:Timeout", events[-3:]
    # The server goes on serving.
    assert request(s.addr, "POST", CMPL, {**body, "max_tokens": 1})[0] == 200


def test_metrics_need_a_key_when_keys_are_set_or_live_on_their_own_port(make_server):
    s = make_server("--api-key", "k")
    assert request(s.addr, "GET", "/metrics")[0] == 401
    assert request(s.addr, "GET", "/metrics", None, {"authorization": "Bearer k"})[0] == 200
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = make_server("--api-key", "k", "--metrics-port", str(port))
    assert request(s.addr, "GET", "/metrics", None, {"authorization": "Bearer k"})[0] == 404
    deadline = time.time() + 30
    while True:
        try:
            code = request(f"127.0.0.1:{port}", "GET", "/metrics")[0]
            break
        except OSError:
            assert time.time() < deadline, "the metrics port never answered"
            time.sleep(0.05)
    assert code == 200


def test_a_client_that_trickles_its_headers_is_dropped_and_the_server_serves_on(make_server):
    s = make_server("--header-read-timeout", "300ms")
    host, port = s.addr.split(":")
    slow = socket.create_connection((host, int(port)), timeout=30)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    started = time.time()
    # hyper answers 408 or just closes; either way the connection ends, well before 30 s.
    data = b""
    try:
        while chunk := slow.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    slow.close()
    assert time.time() - started < 10, "the connection was held"
    assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
    assert request(s.addr, "GET", "/health")[0] == 200


def test_a_client_that_sends_its_whole_body_first_reads_the_413(server):
    # urllib writes the whole body before reading the answer: the server must read it too.
    big = json.dumps({"model": M, "prompt": "a" * (5 << 20)}).encode()
    req = urllib.request.Request(
        f"http://{server.addr}{CMPL}", data=big, headers={"content-type": "application/json"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 413
    assert json.loads(e.value.read())["error"]["code"] == "SY:API:BodyTooLarge"


def test_a_client_that_trickles_its_body_gets_a_408_and_the_server_serves_on(make_server):
    s = make_server("--body-read-timeout", "500ms")
    host, port = s.addr.split(":")
    slow = socket.create_connection((host, int(port)), timeout=30)
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 100\r\n\r\n{\"model\"")
    started = time.time()
    data = b""
    try:
        while chunk := slow.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    slow.close()
    assert time.time() - started < 10, "the connection was held"
    assert data.startswith(b"HTTP/1.1 408"), data[:80]
    assert b"SY:API:BodyTimeout" in data
    assert request(s.addr, "GET", "/health")[0] == 200
