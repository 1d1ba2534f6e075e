"""Merged family GGUFs in llama.cpp: `qlora merge --format gguf --gguf-type f32 --onto original` of each tiny family
model (Tests/QLoRAModelTests/Resources) with its PEFT adapter, served by llama.cpp's llama-server (built by
bench/llama_cpp_setup.sh; f32 KV cache, flash attention off), must continue a token prompt greedily with our
tokens and give the chosen tokens our log-probabilities (`qlora-bench logits`).
Phi-3 is left out: this llama.cpp disables Phi-3's sliding window (its load warns so), and the tiny model's
SentencePiece vocabulary, trained without byte fallback, lacks the newline byte token llama.cpp's SPM vocabulary
needs (the converter's own GGUF of it fails to load the same way).
Run after `swift build -c release` and `bench/llama_cpp_setup.sh -`:
  $QLORA_CACHE/bench-venv/bin/python scripts/reference/check_family_llamacpp.py [qwen3 gemma3]
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RES = os.path.join(ROOT, "Tests", "QLoRAModelTests", "Resources")
CACHE = os.environ.get("QLORA_CACHE", os.path.expanduser("~/.cache/swift-qlora"))
BIN = os.path.join(CACHE, "llama.cpp", "llama_cpp_python-0.3.36", "vendor", "llama.cpp", "build", "bin")
QLORA = os.path.join(ROOT, ".build", "release", "qlora")
BENCH = os.path.join(ROOT, ".build", "release", "qlora-bench")
PROMPT = [1, 17, 250, 3, 99, 42, 7]
NEW = 8


def llama_cpp(model):
    srv = subprocess.Popen([os.path.join(BIN, "llama-server"), "-m", model, "--port", "18090", "-c", "64", "-np", "1",
                            "-ctk", "f32", "-ctv", "f32", "-fa", "off"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen("http://127.0.0.1:18090/health")
                break
            except Exception:
                time.sleep(0.1)
        req = {"prompt": PROMPT, "n_predict": NEW, "temperature": 0, "n_probs": 1, "post_sampling_probs": False,
               "return_tokens": True, "cache_prompt": False, "ignore_eos": True}
        r = json.load(urllib.request.urlopen(urllib.request.Request(
            "http://127.0.0.1:18090/completion", json.dumps(req).encode(), {"Content-Type": "application/json"})))
        return r["tokens"], [p["top_logprobs"][0]["logprob"] for p in r["completion_probabilities"]]
    finally:
        srv.terminate()
        srv.wait()


def ours(model, tmp):
    ids, tokens, logprobs = list(PROMPT), [], []
    out = os.path.join(tmp, "logits.safetensors")
    for _ in range(NEW):
        subprocess.run([BENCH, "logits", model, out, "--ids", ",".join(map(str, ids)), "--quant-type", "none"],
                       check=True, stdout=subprocess.DEVNULL)
        row = load_file(out)["logits"][-1].astype(np.float64)
        t = int(row.argmax())
        tokens.append(t)
        ids.append(t)
        logprobs.append(float(row[t] - row.max() - math.log(np.exp(row - row.max()).sum())))
    return tokens, logprobs


def main():
    for family in sys.argv[1:] or ["qwen3", "gemma3"]:
        with tempfile.TemporaryDirectory() as tmp:
            gguf = os.path.join(tmp, "merged.gguf")
            subprocess.run([QLORA, "merge", "--model", os.path.join(RES, "tiny-" + family), "--adapter",
                            os.path.join(RES, f"tiny-{family}-lora"), "--output", gguf, "--format", "gguf",
                            "--gguf-type", "f32", "--onto", "original", "--quiet"], check=True, stdout=subprocess.DEVNULL)
            theirs, their_lp = llama_cpp(gguf)
            mine, my_lp = ours(gguf, tmp)
        d = max(abs(a - b) for a, b in zip(their_lp, my_lp))
        print(f"{family}: greedy tokens equal {theirs == mine} ({mine}), max |log-probability difference| {d:.3g}")


if __name__ == "__main__":
    main()
