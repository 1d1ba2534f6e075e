"""The official `openai` Python client against `qlora serve` (not in CI: it needs `pip install openai`).

Starts `qlora serve` on a free port with an API key, then through the client: lists the models, asks a chat
completion (greedy) whole and streamed and checks that both give the same text, asks a text completion, and
checks that a wrong key and an unknown model raise the client's own error types.

Usage: python scripts/reference/check_openai_client.py [QLORA_BINARY]
"""
import os
import re
import subprocess
import sys

import openai

binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", ".build", "release", "qlora")
key = "check-key"
server = subprocess.Popen([binary, "serve", "--port", "0", "--api-key", key], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    line = server.stdout.readline()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key)
    models = [m.id for m in client.models.list()]
    print("models:", models)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=models[0], messages=messages, temperature=0, max_tokens=24)
    text = whole.choices[0].message.content
    print("chat:", repr(text), whole.choices[0].finish_reason, whole.usage)
    pieces = []
    for chunk in client.chat.completions.create(model=models[0], messages=messages, temperature=0, max_tokens=24, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    streamed = "".join(pieces)
    print("streamed:", repr(streamed), "chunks:", len(pieces))
    assert streamed == text, "the stream differs from the whole answer"
    completion = client.completions.create(model=models[0], prompt="The capital of France is", temperature=0, max_tokens=8)
    print("completion:", repr(completion.choices[0].text))
    try:
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        print("wrong key:", type(e).__name__, e.status_code)
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("an unknown model was accepted")
    except openai.BadRequestError as e:
        print("unknown model:", type(e).__name__, e.status_code, e.code)
    print(f"openai {openai.__version__}: all checks passed")
finally:
    server.terminate()
    server.wait()
