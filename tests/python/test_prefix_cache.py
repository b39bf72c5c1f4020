"""Automatic prefix caching through the API: prompt beginnings seen before are not computed again,
and `usage.prompt_tokens_details.cached_tokens` says how many prompt tokens were reused."""
import re
import urllib.request

from conftest import MODEL_NAME

BLOCK = 16  # positions per KV-cache block: only whole blocks are shared
QUESTION = (
    "If the file does not exist, the program creates it, writes the header line, and then appends "
    "every record it reads from the queue, flushing after each one. What happens when the disk is full?"
)


def metrics(server):
    with urllib.request.urlopen(server.url + "/metrics") as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)(?:\{[^}]*\})? (\S+)$", text, re.M)}


def complete(client, prompt, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, **kw)


def test_a_repeated_prompt_reuses_its_whole_blocks_and_answers_the_same(make_server):
    s = make_server()
    c = s.client()
    first = complete(c, QUESTION)
    n = first.usage.prompt_tokens
    assert n > 2 * BLOCK
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = complete(c, QUESTION)
    # Every whole block but the one holding the last prompt token, which is always computed.
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // BLOCK * BLOCK
    assert again.choices[0].text == first.choices[0].text
    m = metrics(s)
    assert m["switchyard_prefix_cache_hits_total"] == (n - 1) // BLOCK * BLOCK
    assert m["switchyard_prefix_cache_queries_total"] == 2 * n


def test_the_next_turn_of_a_chat_starts_from_the_cached_conversation(make_server):
    s = make_server()
    c = s.client()
    turn = [{"role": "user", "content": QUESTION}]
    first = c.chat.completions.create(model=MODEL_NAME, messages=turn, max_tokens=20, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And when the queue is empty?"},
    ]
    chunks = list(
        c.chat.completions.create(
            model=MODEL_NAME, messages=turn, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    # At least the first turn's whole prompt blocks; the answer's blocks too where its text
    # tokenizes back to the ids generated.
    assert usage.prompt_tokens_details.cached_tokens >= (first.usage.prompt_tokens - 1) // BLOCK * BLOCK
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_without_prefix_caching_every_prompt_is_computed(make_server):
    s = make_server("--no-prefix-caching")
    c = s.client()
    a, b = complete(c, QUESTION), complete(c, QUESTION)
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens == 0
    assert a.choices[0].text == b.choices[0].text
    assert metrics(s).get("switchyard_prefix_cache_hits_total", 0) == 0
