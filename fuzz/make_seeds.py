#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/seeds/<target>/: small valid inputs
(and a few near misses) that the fuzzer mutates from. Run again after changing the formats:
    python3 fuzz/make_seeds.py [FIXTURES]"""
import json
import pathlib
import struct
import sys

ROOT = pathlib.Path(__file__).resolve().parent
FIXTURES = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent.parent / "shared" / "fixtures"
TRAINED = FIXTURES / "tiny-mixtral-trained"


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, value):
    """Protobuf field: int → varint, bytes/str → length-delimited."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def packed_u32(num, values):
    return field(num, b"".join(varint(v) for v in values))


def packed_f32(num, values):
    return field(num, struct.pack(f"<{len(values)}f", *values))


def bf16(xs):
    return b"".join(struct.pack("<f", x)[2:] for x in xs)


def batch(rows, experts_per_row, dtype=1, reply=1, layer=1, fp="fp", hidden=4):
    xs = [0.1 * i - 0.5 for i in range(rows * hidden)]
    data = struct.pack(f"<{len(xs)}f", *xs) if dtype == 1 else bf16(xs)
    offsets, experts, weights = [0], [], []
    for r in experts_per_row:
        experts += r
        weights += [1.0 / len(r)] * len(r) if r else []
        offsets.append(len(experts))
    return (field(1, 1) + field(2, fp) + field(3, layer) + field(4, rows) + field(5, hidden)
            + field(6, dtype) + field(7, data) + packed_u32(8, offsets) + packed_u32(9, experts)
            + packed_f32(10, weights) + field(11, reply))


def result(rows, hidden, dtype=1):
    xs = [0.25 * i for i in range(rows * hidden)]
    data = struct.pack(f"<{len(xs)}f", *xs) if dtype == 1 else bf16(xs)
    return field(1, rows) + field(2, hidden) + field(3, dtype) + field(4, data) + field(5, 120)


def worker(addr, hosted, managed=False):
    return json.dumps({
        "addr": addr, "instance": "a1", "hosted": hosted, "managed": managed, "device": "cpu",
        "memory_budget_bytes": 1 << 30, "bytes_per_expert": 1 << 26, "weight_bytes": 1 << 28,
        "model_fingerprint": "8x64-f32-abc", "weight_format": "f32", "protocol_version": 1,
        "worker_version": "0.1.0",
        "load": {"batches_total": 10, "rows_total": 40, "busy_micros": 900, "rows_per_sec": 4.0, "busy_fraction": 0.1},
    }).encode()


def safetensors(entries):
    header, data, at = {}, b"", 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(raw)]}
        data += raw
        at += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def gguf_empty():
    kv = struct.pack("<Q", len(b"general.architecture")) + b"general.architecture" + struct.pack("<I", 8)
    kv += struct.pack("<Q", 5) + b"llama"
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv


def main():
    config = (TRAINED / "config.json").read_bytes()
    template = json.loads((TRAINED / "tokenizer_config.json").read_text())["chat_template"]
    seeds = {
        "wire_request": {
            "f32": batch(2, [[0, 3], [1, 7]]),
            "bf16": batch(3, [[2], [4, 5], [6, 0]], dtype=2, reply=2),
            "duplicate_expert": batch(1, [[3, 3]]),
            "wrong_fingerprint": batch(1, [[1]], fp="other"),
        },
        "wire_reply": {
            "f32": bytes([2, 4]) + result(2, 4),
            "bf16": bytes([3, 4]) + result(3, 4, dtype=2),
            "short": bytes([2, 4]) + result(2, 3),
        },
        "registry_records": {
            "two_workers_and_load": worker("10.0.0.1:7001", [[0, 1, 2, 3]] * 2) + b"\0"
            + worker("10.0.0.2:7001", [[4, 5, 6, 7]] * 2, managed=True) + b"\0"
            + json.dumps({"coordinator": "c1", "experts": 8, "expert_tokens": list(range(16)), "unix_ms": 1700000000000}).encode(),
            "managed_only": worker("10.0.0.3:7001", [[]], managed=True) + b"\0{}",
        },
        "openai_request": {
            "completion": b'{"model":"m","prompt":"Once upon a time","max_tokens":8,"temperature":0.7,"top_p":0.9,"logprobs":2,"stop":["\\n"]}',
            "completion_ids": b'{"model":"m","prompt":[[1,415,2936],[1,22]],"max_tokens":4,"n":2,"seed":7,"echo":true}',
            "chat": b'{"model":"m","messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"tell me"}],"max_completion_tokens":16,"logprobs":true,"top_logprobs":3}',
            "chat_json": b'{"model":"m","messages":[{"role":"user","content":"json"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"type":"integer"},"b":{"type":"array","items":{"type":"string"}}},"required":["a"]}}}}',
            "penalties": b'{"model":"m","prompt":"x","presence_penalty":1.5,"frequency_penalty":-0.5,"repetition_penalty":1.1,"logit_bias":{"13":-100},"min_tokens":2,"stop_token_ids":[2],"ignore_eos":true}',
        },
        "json_schema": {
            "object": b'{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0}},"required":["name"]}\0{"name": "ada", "age": 36}',
            "enum_array": b'{"type":"array","items":{"enum":["a","b",1,null]},"maxItems":3}\0["a", 1, null]',
            "anyof": b'{"anyOf":[{"type":"number"},{"type":"boolean"},{"const":"x"}]}\0-12.5e3',
        },
        "chat_template": {
            "fixture": template.encode() + b"\0" + json.dumps([
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]).encode(),
            "loop": b"{% for m in messages %}{{ m.role|upper }}: {{ m.content }}{% if not loop.last %}\n{% endif %}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}{% endif %}",
            "raise": b"{% if messages|length > 1 %}{{ raise_exception('too many') }}{% endif %}",
        },
        "checkpoint": {
            "safetensors": safetensors([
                ("model.norm.weight", "F32", [4], struct.pack("<4f", 1, 1, 1, 1)),
                ("model.embed_tokens.weight", "BF16", [2, 4], bf16([0.5] * 8)),
                ("lm_head.weight", "F16", [2, 4], struct.pack("<8e", *[0.25] * 8)),
            ]),
            "gguf_header": gguf_empty(),
        },
        "config": {
            "fixture": config,
            "mixtral_8x7b": json.dumps({
                "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
                "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
                "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 1e6,
                "rms_norm_eps": 1e-5, "sliding_window": None, "tie_word_embeddings": False}).encode(),
        },
    }
    for target, files in seeds.items():
        d = ROOT / "seeds" / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)
    print(f"wrote {sum(map(len, seeds.values()))} seeds for {len(seeds)} targets under {ROOT / 'seeds'}")


if __name__ == "__main__":
    main()
