"""Time to first token for a repeated 1,000-token system prompt through `qlora serve`, with the prefix cache off
(--prefix-cache-mb 0: every prompt prefilled whole) and on (the default): six chat requests one after another, the
same system prompt (the opening of War and Peace, about 1,000 tokens) and a different short question each, greedy,
8 tokens, streamed; the time from sending the request to the first streamed piece of the reply, and the usage's
prompt_tokens and prompt_tokens_details.cached_tokens. Standard library only.
Usage: python3 bench/prefix_cache_bench.py [QLORA_BINARY] [MODEL.gguf]
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BINARY = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".build/release/qlora")
MODEL = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/swift-qlora/models/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = open(os.path.join(ROOT, "../shared/data/text/war_and_peace.txt"), encoding="utf-8").read()
SYSTEM = "Answer questions about this text.\n\n" + TEXT[TEXT.find("Well, Prince"):][:4300]
QUESTIONS = ["Who is speaking?", "Where does the scene take place?", "What year is it?", "Who is Anna Pavlovna?",
             "What is the mood of the conversation?", "Name one guest."]


def first_token(port, question):
    body = json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}], "max_tokens": 8,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, usage = None, None
    with urllib.request.urlopen(request) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]
    return ttft, usage["prompt_tokens"], usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)


def run(cache_mb, port):
    server = subprocess.Popen([BINARY, "serve", "--model", MODEL, "--port", str(port), "--prefix-cache-mb", str(cache_mb)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read()
                break
            except OSError:
                time.sleep(0.1)
        return [first_token(port, q) for q in QUESTIONS]
    finally:
        server.terminate()
        server.wait()


def main():
    off = run(0, 18431)
    on = run(512, 18432)
    cpu = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")][0]
    print(f"{cpu}, {os.cpu_count()} cores; {MODEL.split('/')[-1]}; prompts of {min(a[1] for a in off)} to {max(a[1] for a in off)} tokens")
    print()
    print("| request | prompt tokens | cache off: first token (s) | cache on: cached tokens | cache on: first token (s) | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(off, on)):
        print(f"| {i + 1} | {a[1]} | {a[0]:.3f} | {b[2]} | {b[0]:.3f} | {a[0] / b[0]:.1f}x |")
    json.dump({"off": off, "on": on}, open(os.path.join(ROOT, "bench/out/prefix_cache.json"), "w"))


if __name__ == "__main__":
    main()
