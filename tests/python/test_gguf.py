"""GGUF files, made here without torch by the `gguf` package (llama.cpp's own writer) from the
trained fixture the way llama.cpp's converter lays them out (q/k rows permuted for its RoPE,
experts stacked per layer, a byte-level BPE vocabulary with its merges), load in switchyard and
give the same logits as the safetensors folder: bit for bit in f32, and in Q8_0 and Q4_0 the
same as quantizing the folder at load (the `gguf` package quantizes as llama.cpp's reference)."""
import json
import pathlib
import struct
import subprocess

import gguf
import numpy as np
import pytest

from conftest import BIN, MODEL

IDS = "1,17,300,5,42,99,7,256,3,11"


def read_safetensors(path):
    """The f32 tensors of a safetensors file, as numpy arrays."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=np.float32).reshape(info["shape"])
    return out


def permute(w, heads):
    """llama.cpp's converter's q/k permutation (rotate-half rows to interleaved pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_gguf(out, qtype, stacked=True):
    cfg = json.loads((MODEL / "config.json").read_text())
    tok = json.loads((MODEL / "tokenizer.json").read_text())
    t = read_safetensors(MODEL / "model.safetensors")
    layers, experts = cfg["num_hidden_layers"], cfg["num_local_experts"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    vocab = dict(tok["model"]["vocab"])
    special = set()
    for a in tok["added_tokens"]:
        vocab[a["content"]] = a["id"]
        special.add(a["id"])
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])

    def linear(name, a):
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qtype)
            w.add_tensor(name, q, raw_dtype=qtype)

    f32 = lambda name, a: w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    f32("token_embd.weight", t["model.embed_tokens.weight"])
    f32("output_norm.weight", t["model.norm.weight"])
    linear("output.weight", t["lm_head.weight"])
    for l in range(layers):
        p = f"model.layers.{l}."
        f32(f"blk.{l}.attn_norm.weight", t[p + "input_layernorm.weight"])
        f32(f"blk.{l}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        linear(f"blk.{l}.attn_q.weight", permute(t[p + "self_attn.q_proj.weight"], heads))
        linear(f"blk.{l}.attn_k.weight", permute(t[p + "self_attn.k_proj.weight"], kv_heads))
        linear(f"blk.{l}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
        linear(f"blk.{l}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        f32(f"blk.{l}.ffn_gate_inp.weight", t[p + "block_sparse_moe.gate.weight"])
        for gname, hf in [("gate", "w1"), ("up", "w3"), ("down", "w2")]:
            each = [t[p + f"block_sparse_moe.experts.{e}.{hf}.weight"] for e in range(experts)]
            if stacked:
                linear(f"blk.{l}.ffn_{gname}_exps.weight", np.stack(each))
            else:  # older files: one tensor per expert
                for e, a in enumerate(each):
                    linear(f"blk.{l}.ffn_{gname}.{e}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def forward(model, *flags):
    out = subprocess.run([BIN, "forward", "--model", str(model), "--ids", IDS, *flags], capture_output=True, check=True)
    return json.loads(out.stdout)


def generate(model, *flags):
    out = subprocess.run(
        [BIN, "generate", "--model", str(model), "--prompt", "Return the number of items in the", "--max-tokens", "12", *flags],
        capture_output=True,
        check=True,
    )
    return out.stdout


@pytest.mark.parametrize(
    "qtype,flags",
    [
        (gguf.GGMLQuantizationType.F32, []),
        (gguf.GGMLQuantizationType.Q8_0, ["--quantize", "q8_0", "--quantize-attention"]),
        (gguf.GGMLQuantizationType.Q4_0, ["--quantize", "q4_0", "--quantize-attention"]),
    ],
)
def test_gguf_equals_the_safetensors_folder(tmp_path, qtype, flags):
    path = tmp_path / f"model-{qtype.name}.gguf"
    make_gguf(path, qtype)
    got, want = forward(path), forward(MODEL, *flags)
    assert got["experts"] == want["experts"]
    assert got["logits"] == want["logits"]
    # The tokenizer from the metadata encodes and decodes as tokenizer.json does.
    assert generate(path) == generate(MODEL, *flags)


def test_older_gguf_files_with_one_tensor_per_expert(tmp_path):
    path = tmp_path / "unstacked.gguf"
    make_gguf(path, gguf.GGMLQuantizationType.Q8_0, stacked=False)
    assert forward(path)["logits"] == forward(MODEL, "--quantize", "q8_0", "--quantize-attention")["logits"]


def test_broken_gguf_files_get_named_errors(tmp_path):
    good = tmp_path / "good.gguf"
    make_gguf(good, gguf.GGMLQuantizationType.F32)
    raw = good.read_bytes()
    for name, data in [("truncated.gguf", raw[: len(raw) // 2]), ("header.gguf", raw[:40])]:
        bad = tmp_path / name
        bad.write_bytes(data)
        r = subprocess.run([BIN, "forward", "--model", str(bad), "--ids", "1"], capture_output=True)
        assert r.returncode != 0
        err = r.stderr.decode()
        assert "GGUF" in err and "panicked" not in err, err
