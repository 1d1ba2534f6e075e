#!/usr/bin/env python3
"""Writes the seed corpora of the libFuzzer targets (fuzz/corpus/TARGET/*) from real files: our test fixtures,
../shared/data, the default model's GGUF and llama.cpp's vocabulary GGUFs in the setup cache. Standard library
only; run from the repository root. The output is committed, so `make fuzz` needs none of the sources.

Large real files are trimmed to what a fuzzer can mutate usefully (tens of KB): tokenizers keep their first
ids, their added tokens and the merges among kept tokens; GGUFs keep every metadata key with trimmed token
arrays and a few tensors cut to a couple of rows; line files keep their first lines.
"""
import hashlib
import json
import lzma
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
CACHE = os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora"))
OUT = os.path.join(ROOT, "fuzz", "corpus")
KEEP_IDS = 600
written = {}


def put(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
    written[target] = written.get(target, 0) + 1


def read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def head_lines(data, n):
    return b"".join(data.splitlines(keepends=True)[:n])


def fixture(*parts):
    return read(ROOT, "Tests", *parts)


# ---------------------------------------------------------------- tokenizers

def trim_tokenizer(tok):
    model = tok.get("model", {})
    added = {t["id"] for t in tok.get("added_tokens", [])}
    if model.get("type") == "BPE":
        vocab = model["vocab"]
        keep = {k: v for k, v in vocab.items() if v < KEEP_IDS or v in added}
        model["vocab"] = keep
        merges = []
        for m in model.get("merges", []):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a in keep and b in keep and (a + b) in keep:
                merges.append(m)
        model["merges"] = merges
    elif model.get("type") == "Unigram":
        model["vocab"] = model["vocab"][:KEEP_IDS]
    return tok


def tokenizer_json(path):
    if path.endswith(".xz"):
        data = lzma.decompress(read(path))
    else:
        data = read(path)
    return json.loads(data)


def tokenizer_seeds():
    sources = [("smollm2", os.path.join(ROOT, "Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json"))]
    tdir = os.path.join(ROOT, "Tests/QLoRATokenizerTests/Resources/tokenizers")
    for n in sorted(os.listdir(tdir)):
        if n.endswith(".tokenizer.json.xz"):
            sources.append((n.split(".")[0], os.path.join(tdir, n)))
    for name, path in sources:
        tok = trim_tokenizer(tokenizer_json(path))
        put("tokenizer", name + ".json", json.dumps(tok, ensure_ascii=False, separators=(",", ":")))
        # A config-shaped seed for the JSON reader too.
        put("json", "tokenizer-" + name + ".json", json.dumps(tok, ensure_ascii=False)[:6000])


# ---------------------------------------------------------------- GGUF

GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class Reader:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, fmt):
        v = struct.unpack_from("<" + fmt, self.d, self.p)
        self.p += struct.calcsize("<" + fmt)
        return v[0]

    def string(self):
        n = self.take("Q")
        s = self.d[self.p:self.p + n]
        self.p += n
        return s

    def value(self, t):
        if t == 8:
            return self.string()
        if t == 9:
            et, n = self.take("I"), self.take("Q")
            return (et, [self.value(et) for _ in range(n)])
        return self.take(GGUF_SCALAR[t])


def w_string(s):
    return struct.pack("<Q", len(s)) + s


def w_value(t, v):
    if t == 8:
        return w_string(v)
    if t == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(w_value(et, x) for x in items)
    return struct.pack("<" + GGUF_SCALAR[t], v)


# ggml type -> (block elements, block bytes)
GGML_BLOCK = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 12: (256, 144), 30: (1, 2)}


def trim_gguf(path, keep_tensors):
    data = read(path)
    r = Reader(data)
    magic = r.take("4s")
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kvs = []
    for _ in range(n_kv):
        k = r.string()
        t = r.take("I")
        kvs.append([k, t, r.value(t)])
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.take("I")
        dims = [r.take("Q") for _ in range(nd)]
        infos.append((name, dims, r.take("I"), r.take("Q")))
    align = next((v for k, t, v in kvs if k == b"general.alignment"), 32)
    base = (r.p + align - 1) // align * align
    kept_tokens = None
    for kv in kvs:
        k, t, v = kv
        if t == 9 and k.startswith(b"tokenizer.ggml.") and k != b"tokenizer.ggml.merges":
            kv[2] = (v[0], v[1][:KEEP_IDS])
            if k == b"tokenizer.ggml.tokens":
                kept_tokens = set(kv[2][1])
    for kv in kvs:
        if kv[0] == b"tokenizer.ggml.merges" and kept_tokens is not None:
            merges = []
            for m in kv[2][1]:
                a, _, b = m.partition(b" ")
                if a in kept_tokens and b in kept_tokens and a + b in kept_tokens:
                    merges.append(m)
            kv[2] = (kv[2][0], merges)
    out_infos, blobs, offset = [], [], 0
    for name, dims, ty, off in infos:
        if name not in keep_tensors or ty not in GGML_BLOCK:
            continue
        rows = min(2, dims[1]) if len(dims) > 1 else None
        new_dims = [dims[0]] + ([rows] if rows is not None else [])
        be, bb = GGML_BLOCK[ty]
        size = (dims[0] * (rows or 1)) // be * bb
        blob = data[base + off: base + off + size]
        out_infos.append((name, new_dims, ty, offset))
        pad = (-size) % align
        blobs.append(blob + b"\0" * pad)
        offset += size + pad
    out = bytearray(magic + struct.pack("<IQQ", version, len(out_infos), len(kvs)))
    for k, t, v in kvs:
        out += w_string(k) + struct.pack("<I", t) + w_value(t, v)
    for name, dims, ty, off in out_infos:
        out += w_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
    out += b"\0" * ((-len(out)) % align)
    return bytes(out) + b"".join(blobs)


def gguf_seeds():
    res = os.path.join(ROOT, "Tests/QLoRAFormatsTests/Resources")
    put("gguf", "mixed-v2.gguf", read(res, "mixed-v2.gguf"))
    put("gguf", "mixed.gguf", read(res, "mixed.gguf"))
    model = os.path.join(CACHE, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if os.path.exists(model):
        put("gguf", "smollm2-trimmed.gguf",
            trim_gguf(model, {b"output_norm.weight", b"token_embd.weight", b"blk.0.attn_q.weight", b"blk.0.attn_norm.weight"}))
    else:
        print("make_corpus: no", model, "(run scripts/setup.sh); smollm2 GGUF seed left out", file=sys.stderr)
    vocab_dir = None
    ldir = os.path.join(CACHE, "llama.cpp")
    if os.path.isdir(ldir):
        for n in os.listdir(ldir):
            cand = os.path.join(ldir, n, "vendor", "llama.cpp", "models")
            if os.path.isdir(cand):
                vocab_dir = cand
    for n in ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-gpt-2.gguf", "ggml-vocab-phi-3.gguf"]:
        if vocab_dir and os.path.exists(os.path.join(vocab_dir, n)):
            put("gguf", n.replace("ggml-vocab-", "vocab-"), trim_gguf(os.path.join(vocab_dir, n), set()))


# ---------------------------------------------------------------- the rest

def safetensors_seeds():
    for rel in ["QLoRAFormatsTests/Resources/ggml_quant.safetensors", "QLoRAFormatsTests/Resources/ggml_q4k.safetensors",
                "QLoRAFormatsTests/Resources/tiny-llama-logits.safetensors",
                "QLoRAModelTests/Resources/tiny-llama-gqa-lora-rs/adapter_model.safetensors",
                "QLoRATrainingTests/Resources/lora_grads.safetensors"]:
        p = os.path.join(ROOT, "Tests", rel)
        if os.path.getsize(p) <= 64 << 10:
            put("safetensors", rel.replace("/", "_"), read(p))
    # A header only, and the smallest valid file.
    put("safetensors", "empty-header.safetensors", struct.pack("<Q", 2) + b"{}")
    header = b'{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}'
    put("safetensors", "bf16.safetensors", struct.pack("<Q", len(header)) + header + bytes(range(8)))


def config_seeds():
    for d in ["QLoRAFormatsTests/Resources", "QLoRAModelTests/Resources", "QLoRATrainingTests/Resources"]:
        base = os.path.join(ROOT, "Tests", d)
        for sub in sorted(os.listdir(base)):
            sd = os.path.join(base, sub)
            if not os.path.isdir(sd):
                continue
            for n in ["config.json", "generation_config.json", "adapter_config.json"]:
                if os.path.exists(os.path.join(sd, n)):
                    data = read(sd, n)
                    put("config", sub + "-" + n, data)
                    put("json", sub + "-" + n, data)
    for name in sorted(os.listdir(os.path.join(SHARED, "tokenizers"))):
        p = os.path.join(SHARED, "tokenizers", name, "tokenizer_config.json")
        if os.path.exists(p):
            put("json", name + "-tokenizer_config.json", read(p)[:16000])


def template_seeds():
    put("template", "llama-3.2.jinja", read(SHARED, "chat_templates", "meta-llama-Llama-3.2-3B-Instruct.jinja"))
    seen = set()
    index = json.loads(read(SHARED, "chat_templates", "ollama_template_index.json"))
    for entry in index:
        t = entry["template"]
        h = hashlib.sha1(t.encode()).hexdigest()[:8]
        if h not in seen:
            seen.add(h)
            put("template", "ollama-%s-%s.jinja" % (entry["name"], h), t)
    for name in sorted(os.listdir(os.path.join(SHARED, "tokenizers"))):
        p = os.path.join(SHARED, "tokenizers", name, "tokenizer_config.json")
        if os.path.exists(p):
            t = json.loads(read(p)).get("chat_template")
            if isinstance(t, list):
                t = t[0].get("template")
            if isinstance(t, str):
                put("template", name + ".jinja", t)


def yaml_seeds():
    put("yaml", "basic.yaml", "model: smollm2\ndataset: demo/quill.jsonl\nlora-r: 64\nlora-alpha: 16\nlearning-rate: 2e-4\n")
    put("yaml", "lists.yaml", "target-modules:\n  - q_proj\n  - v_proj\ngradient-checkpointing: true\ndouble-quant: false\nmax-steps: 10\n")
    put("yaml", "flow.yaml", "# comment\ntarget-modules: [q_proj, k_proj, 'o_proj']\nlearning-rate: !!float 1e-4\nmodel: \"a b\"\n")
    put("yaml", "anchors.yaml", "base: &b 64\nlora-r: *b\nlora-alpha: *b\n")


def dataset_seeds():
    # The selector byte: (format index << 1) | skipBadRecords, 0x80 for the Guanaco prompt. Formats in the order of
    # DatasetFormat.allCases: auto, alpaca, messages, sharegpt, prompt_completion, text.
    alpaca = head_lines(read(SHARED, "instruct", "alpaca_seed_tasks.jsonl"), 6)
    quill = head_lines(read(ROOT, "demo", "quill.jsonl"), 6)
    sharegpt = read(SHARED, "instruct", "sharegpt_dummy_conversation.json")[:8000]
    messages = b'{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello!"}]}\n'
    pc = b'{"prompt":"2+2=","completion":" 4"}\n{"prompt":"Capital of France?","completion":" Paris"}\n'
    text = b'{"text":"### Human: Hi### Assistant: Hello"}\n{"text":"plain"}\n'
    oasst = b'{"text":"### Human: What is NF4?### Assistant: A 4-bit data type.### Human: Why?### Assistant: Normal weights."}\n'
    for sel, name, body in [(0, "auto-alpaca", alpaca), (2, "alpaca", alpaca), (0, "auto-quill", quill), (4, "messages", messages),
                            (5, "messages-skip", messages + b"{bad\n" + messages), (6, "sharegpt", sharegpt), (8, "pc", pc),
                            (10, "text", text), (0x80, "auto-guanaco", oasst), (0x81, "auto-skip-guanaco", pc + b"[1]\n" + text)]:
        put("dataset", name + ".jsonl", bytes([sel]) + body)


def mmlu_seeds():
    dev = os.path.join(ROOT, "Tests/QLoRAEvaluationTests/Resources/mmlu/dev")
    for n in sorted(os.listdir(dev))[:6]:
        put("mmlu", n, read(dev, n))
    test = os.path.join(ROOT, "Tests/QLoRAEvaluationTests/Resources/mmlu/test")
    if os.path.isdir(test):
        for n in sorted(os.listdir(test))[:3]:
            put("mmlu", "test-" + n, head_lines(read(test, n), 8))
    put("mmlu", "val-head.jsonl", head_lines(fixture("QLoRAEvaluationTests/Resources/mmlu/qlora_zero_shot_mmlu_val_head.jsonl"), 4))


def judging_seeds():
    jd = os.path.join(ROOT, "Tests/QLoRAEvaluationTests/Resources/judge")
    for n in sorted(os.listdir(jd)):
        if n.endswith(".jsonl"):
            put("judging", n, head_lines(read(jd, n), 4))
    for n in ["fastchat_llm_judge_prompts.jsonl", "qlora_oa_prompt_threeclass.jsonl"]:
        put("judging", n, head_lines(read(SHARED, "eval", "judge_prompts", n), 4))
    put("judging", "mt_bench.jsonl", head_lines(read(SHARED, "eval", "mt_bench", "question.jsonl"), 3))
    put("judging", "judgments.jsonl",
        '{"question_id":1,"model_a":"a","model_b":"b","winner":"model_a","verdict":1}\n'
        '{"question_id":1,"model_a":"b","model_b":"a","winner":"tie","verdict":3}\n'
        '{"question_id":2,"model_a":"a","model_b":"b","winner":null,"error":"timeout"}\n')
    for i, review in enumerate(["[[A]]", "After comparing, [[B]] is better.", "8 7\nAssistant 1 is better.", "Final verdict: tie [[C]]"]):
        put("judging", "review-%d.txt" % i, review)


def encode_seeds():
    text = read(ROOT, "Tests/QLoRAEvaluationTests/Resources/war_and_peace_excerpt.txt").decode()
    samples = [text[:400], "Hello, world! 123 4567 don't  we'll\n\n\ttabs", "héllo wörld 世界 🦙 ﷺ \u200b\u00a0x",
               "<|im_start|>user\nhi<|im_end|>\n", "<s>[INST] hi [/INST]", "    def f(x):\n        return x**2\n",
               "A" * 300, "\u0301\u0302e\u0301", "1,000,000.00 $3 € ¥ 2026-12-04T20:59Z"]
    for s, sample in enumerate(samples):
        for sel in range(7):
            put("encode", "t%d-s%d.txt" % (sel, s), bytes([sel]) + sample.encode())


def request_seeds():
    reqs = [
        (0, {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}),
        (0, {"model": "quill", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "stop": ["\n", "User:"], "seed": 42, "stream": True}),
        (0, {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}], "stop": "x",
             "stream_options": {"include_usage": True}, "n": 1, "presence_penalty": 0}),
        (1, {"model": "base", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
        (1, {"model": "quill", "prompt": ["a", "b"], "stream": False, "echo": False}),
    ]
    for i, (sel, body) in enumerate(reqs):
        put("request", "r%d.json" % i, bytes([sel]) + json.dumps(body).encode())


def json_seeds():
    put("json", "numbers.json", b'[0, -0, 1e308, -1.5e-300, 123456789012345678901234567890, 0.1, true, false, null]')
    put("json", "strings.json", '{"a\\u00e9\\ud83e\\udd99": "\\n\\t\\"\\\\\\/", "": [[], {}], "k": "ü"}')


def main():
    tokenizer_seeds()
    gguf_seeds()
    safetensors_seeds()
    config_seeds()
    template_seeds()
    yaml_seeds()
    dataset_seeds()
    mmlu_seeds()
    judging_seeds()
    encode_seeds()
    request_seeds()
    json_seeds()
    total = 0
    for t in sorted(written):
        d = os.path.join(OUT, t)
        size = sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))
        total += size
        print("%-12s %4d files %8d bytes" % (t, written[t], size))
    print("total %d bytes" % total)


if __name__ == "__main__":
    main()
