"""The API through the official OpenAI Python client."""
import concurrent.futures as cf
import json
import subprocess
import urllib.request

from conftest import BIN, MODEL, MODEL_NAME

PROMPT = "If the file does not exist, the"


def post(server, path, body):
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def greedy(client, prompt, n):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=n, temperature=0)


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_NAME]


def test_greedy_completion_equals_switchyard_forward(client, server):
    ids = post(server, "/tokenize", {"prompt": PROMPT})["tokens"]
    out = subprocess.run(
        [BIN, "forward", "--model", str(MODEL), "--ids", ",".join(map(str, ids)), "--greedy", "16"],
        check=True, capture_output=True, text=True,
    )
    want_ids = json.loads(out.stdout)["greedy"]
    want = post(server, "/detokenize", {"tokens": want_ids})["prompt"]
    r = greedy(client, PROMPT, 16)
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want_ids)
    assert r.usage.total_tokens == len(ids) + len(want_ids)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What does this module do?"}], max_tokens=10, temperature=0
    )
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 5


def test_streaming_equals_non_streaming(client):
    full = greedy(client, PROMPT, 20).choices[0].text
    parts, finish = [], None
    for chunk in client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=0, stream=True):
        parts.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == full and finish == "length"

    msgs = [{"role": "user", "content": "Return the number of items"}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=15, temperature=0).choices[0].message.content
    deltas = []
    usage = None
    for chunk in client.chat.completions.create(
        model=MODEL_NAME, messages=msgs, max_tokens=15, temperature=0, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            deltas.append(ch.delta.content or "")
    assert "".join(deltas) == whole
    assert usage is not None and usage.completion_tokens == 15


def test_stop_strings_and_stop_token_ids(client, server):
    full = greedy(client, PROMPT, 24).choices[0].text
    word = full.split()[3]
    cut = full[: full.index(word)]
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[word, "zzzz"], stream=True))
        else:
            r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, stop=[word, "zzzz"])
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
        assert text == cut
    # A stop id: the 3rd generated token ends generation right after it.
    ids = post(server, "/tokenize", {"prompt": PROMPT})["tokens"]
    out = subprocess.run([BIN, "forward", "--model", str(MODEL), "--ids", ",".join(map(str, ids)), "--greedy", "8"],
                         check=True, capture_output=True, text=True)
    third = json.loads(out.stdout)["greedy"][2]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"stop_token_ids": [third]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens <= 3


def test_logit_bias_min_p_and_min_tokens(client, server):
    ids = post(server, "/tokenize", {"prompt": PROMPT})["tokens"]
    out = subprocess.run([BIN, "forward", "--model", str(MODEL), "--ids", ",".join(map(str, ids)), "--greedy", "8"],
                         check=True, capture_output=True, text=True)
    greedy_ids = json.loads(out.stdout)["greedy"]
    # A bias of +100 on one token makes greedy decoding choose it every time.
    forced = greedy_ids[1]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == post(server, "/detokenize", {"tokens": [forced] * 4})["prompt"]
    # -100 on the greedy first token makes the choice something else.
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1, temperature=0,
                                  logit_bias={str(greedy_ids[0]): -100})
    assert r.choices[0].text != post(server, "/detokenize", {"tokens": greedy_ids[:1]})["prompt"]
    # min_p 1 keeps only the most likely token: sampling at any temperature is greedy.
    want = greedy(client, PROMPT, 8).choices[0].text
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=3,
                                  extra_body={"min_p": 1.0})
    assert r.choices[0].text == want
    # The first greedy token as a stop id ends the choice at once, unless min_tokens holds it off.
    stop = {"stop_token_ids": [greedy_ids[0]]}
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=stop)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={**stop, "min_tokens": 3})
    assert r.usage.completion_tokens >= 3


def test_json_object_response_format_writes_json_objects(client):
    # The tiny model likes long strings, so some choices run out of tokens mid-object (as with
    # any server, `length` means the JSON may be cut); every one that stops is an object.
    stopped = 0
    for question in ["Describe a file as JSON.", "What happens if the file does not exist?"]:
        for temperature, seed in [(0, None), (0.9, 1), (0.9, 2), (0.9, 3)]:
            r = client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": question}], max_tokens=200,
                temperature=temperature, seed=seed, response_format={"type": "json_object"},
            )
            text = r.choices[0].message.content
            assert text.lstrip().startswith("{"), text
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict), text
                stopped += 1
            else:
                assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 200
    assert stopped >= 4
    # Completions take it too (as vLLM).
    r = client.completions.create(model=MODEL_NAME, prompt="A file as JSON:", max_tokens=200, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    assert r.choices[0].text.lstrip().startswith("{")
    # Streamed, the pieces add up to the same object.
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Describe a file as JSON."}], max_tokens=200,
              temperature=0, response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert streamed == whole


def test_json_schema_response_format_follows_the_schema(client):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "size": {"type": "integer"},
            "kind": {"enum": ["file", "folder"]},
            "hidden": {"type": "boolean"},
        },
        "required": ["kind", "size"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "entry", "schema": schema, "strict": True}}
    stopped = 0
    for temperature, seed in [(0, None), (0.9, 1), (0.9, 2), (0.9, 3)]:
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Describe a file as JSON."}],
            max_tokens=120, temperature=temperature, seed=seed, response_format=fmt,
        )
        text = r.choices[0].message.content
        if r.choices[0].finish_reason != "stop":
            continue
        stopped += 1
        obj = json.loads(text)
        assert set(obj) <= set(schema["properties"]) and {"kind", "size"} <= set(obj), text
        assert obj["kind"] in ("file", "folder") and isinstance(obj["size"], int), text
        assert isinstance(obj.get("name", ""), str) and isinstance(obj.get("hidden", False), bool), text
    assert stopped >= 2


def test_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    for tok, l, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert abs(max(top.values()) - l) < 1e-5
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_n2_and_seed_reproducibility(client):
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, n=2)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 24 and all(c.finish_reason for c in a.choices)
    c = client.completions.create(**{**kw, "seed": 99})
    assert [x.text for x in c.choices] != [x.text for x in a.choices]


def test_32_concurrent_streams_equal_their_single_request_outputs(client):
    prompts = [f"{w} the number of items in" for w in ("Return", "Compute", "Find", "Get")] * 8
    prompts = [p + " " * (i % 3) + str(i) for i, p in enumerate(prompts)]
    lengths = [8 + (i * 7) % 33 for i in range(32)]
    single = [greedy(client, p, n).choices[0].text for p, n in zip(prompts, lengths)]

    def run(i):
        s = client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in s)

    with cf.ThreadPoolExecutor(32) as ex:
        got = list(ex.map(run, range(32)))
    mismatches = [i for i in range(32) if got[i] != single[i]]
    assert not mismatches, [(single[i], got[i]) for i in mismatches]
