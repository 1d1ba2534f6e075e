#!/usr/bin/env python3
"""Tries `qlora serve` with the official `openai` Python client, field by field, as a new user would.

    python scripts/reference/check_openai_fields.py [QLORA_BINARY]     (starts `qlora serve` on a free port)

Each line: the field, what the client got (200 and the answer, or the status and the error's param and
message). A field the server does not implement must come back as a 400 naming it; the implemented ones must
act (greedy answers, a forced token). Exit status 1 when a check fails. Needs `pip install openai`; never run
by `make test` (the Swift tests speak HTTP themselves).
"""
import os
import re
import subprocess
import json
import sys

import openai

binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", ".build", "release", "qlora")
server = subprocess.Popen([binary, "serve", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
port = int(re.search(r"127\.0\.0\.1:(\d+)", server.stdout.readline()).group(1))
base = f"http://127.0.0.1:{port}/v1"
client = openai.OpenAI(base_url=base, api_key="unused")
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Name a primary color."}]
failures = 0


def check(label, expect_400, call):
    global failures
    try:
        r = call()
        got = "200 " + repr(summary(r))
        ok = not expect_400
    except openai.BadRequestError as e:
        err = e.body if isinstance(e.body, dict) else {}
        got = f"400 param={err.get('param')} code={err.get('code')}: {err.get('message')}"
        ok = expect_400
    except openai.APIStatusError as e:
        got = f"{e.status_code}: {e}"
        ok = False
    if not ok:
        failures += 1
    print(f"{'ok  ' if ok else 'FAIL'} {label:<44} {got}")
    return got


def summary(r):
    if hasattr(r, "choices"):
        c = r.choices
        if hasattr(c[0], "message"):
            return [x.message.content for x in c]
        return [x.text for x in c]
    return r


print(f"openai {openai.__version__} against {base} ({model})")
greedy = dict(model=model, messages=messages, temperature=0, max_tokens=8)
plain = check("chat, greedy", False, lambda: client.chat.completions.create(**greedy))
check("chat, defaults sent explicitly", False, lambda: client.chat.completions.create(
    **greedy, n=1, logprobs=False, response_format={"type": "text"}, presence_penalty=0, frequency_penalty=0,
    logit_bias={}, store=False, user="u1"))
check("stream", False, lambda: "".join(
    (ch.choices[0].delta.content or "") for ch in client.chat.completions.create(**greedy, stream=True) if ch.choices))
check("completions, logit_bias forcing ','", False, lambda: client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=1, temperature=0, logit_bias={"28": 100}))
check("frequency_penalty 2", False, lambda: client.chat.completions.create(**greedy, frequency_penalty=2))
check("n=3 (temperature 1)", False, lambda: client.chat.completions.create(**dict(greedy, temperature=1), n=3, seed=5))
check("logprobs=True, top_logprobs=3", False, lambda: [(t.token, round(t.logprob, 4), [a.token for a in t.top_logprobs])
                                                    for t in client.chat.completions.create(**greedy, logprobs=True, top_logprobs=3).choices[0].logprobs.content][:3])
check("logprobs with stream", False, lambda: [t.token for ch in client.chat.completions.create(**greedy, logprobs=True, stream=True)
                                               if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content][:4])
check("response_format json_object (the reply parses)", False, lambda: json.loads(client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Give the name and the capital of France as JSON."}], max_tokens=120, temperature=0,
    response_format={"type": "json_object"}).choices[0].message.content))
SCHEMA = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"},
                                           "population_millions": {"type": "number"},
                                           "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]}},
          "required": ["country", "capital", "population_millions", "continent"], "additionalProperties": False}


def schema_reply():
    text = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Describe France as JSON."}], max_tokens=160,
                                          temperature=0, response_format={"type": "json_schema", "json_schema": {
                                              "name": "country", "strict": True, "schema": SCHEMA}}).choices[0].message.content
    import jsonschema
    jsonschema.validate(json.loads(text), SCHEMA)  # raises when the reply does not follow the schema
    return json.loads(text)


check("response_format json_schema (jsonschema validates)", False, schema_reply)


def parsed_reply():
    # The client's own typed path: a pydantic model turned into a strict schema by the openai package.
    import pydantic

    class Country(pydantic.BaseModel):
        country: str
        capital: str
        population_millions: float
        languages: list[str]

    r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "Describe France."}], max_tokens=160, temperature=0,
                                      response_format=Country)
    return r.choices[0].message.parsed


check("chat.completions.parse(response_format=pydantic model)", False, parsed_reply)
check("json_schema with a pattern (cannot be enforced)", True, lambda: client.chat.completions.create(**greedy, response_format={
    "type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "string", "pattern": "^[a-z]+$"}}}))
check("top_k via extra_body", False, lambda: client.chat.completions.create(**greedy, extra_body={"top_k": 1}))
for label, kwargs in [
    ("tools (SmolLM2's template has no tool calls)", dict(tools=[{"type": "function", "function": {"name": "get_color", "parameters": {"type": "object", "properties": {}}}}])),
    ("tool_choice=required without tools", dict(tool_choice="required")),
    ("reasoning_effort", dict(reasoning_effort="low")),
    ("unknown field (extra_body)", dict(extra_body={"frobnicate": 1})),
]:
    check(label, True, lambda kwargs=kwargs: client.chat.completions.create(**greedy, **kwargs))
check("completions n=2", False, lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2, n=2))
check("n=9 (past the cap of 8)", True, lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2, n=9))
check("completions logprobs=1", False, lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2, logprobs=1).choices[0].logprobs.token_logprobs)
check("completions echo", True, lambda: client.completions.create(model=model, prompt="Hi", max_tokens=2, echo=True))
server.terminate()

# Tools through a template that writes Hermes calls: Qwen 2.5's (from the chat template fixtures) on the same model.
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
cases = json.load(open(os.path.join(here, "..", "..", "Tests", "QLoRATokenizerTests", "Resources", "chat_template_cases.json")))
template = tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False)
template.write(cases["templates"]["qwen2.5"]["template"])
template.close()
server = subprocess.Popen([binary, "serve", "--port", "0", "--chat-template", template.name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
port = int(re.search(r"127\.0\.0\.1:(\d+)", server.stdout.readline()).group(1))
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
import pydantic


class GetWeather(pydantic.BaseModel):
    """The weather in a city."""
    city: str
    unit: str


weather = openai.pydantic_function_tool(GetWeather, name="get_weather")
ask = dict(model=model, messages=[{"role": "user", "content": "What is the weather in Paris?"}], temperature=0, max_tokens=60, tools=[weather])


def calls(r):
    c = r.choices[0]
    return (c.finish_reason, [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []])


check("tools + tool_choice=required (pydantic_function_tool)", False, lambda: calls(client.chat.completions.create(**ask, tool_choice="required")))
check("tools + tool_choice naming the function", False, lambda: calls(client.chat.completions.create(
    **ask, tool_choice={"type": "function", "function": {"name": "get_weather"}})))
check("tools + tool_choice=auto", False, lambda: summary(client.chat.completions.create(**ask)))


def cut_call():
    # max_tokens ends a forced call inside its arguments: OpenAI's answer is the call with the arguments as far as they
    # got and finish_reason "length" (content null).
    c = client.chat.completions.create(**{**ask, "max_tokens": 12}, tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    assert c.finish_reason == "length" and c.message.content is None and len(c.message.tool_calls or []) == 1, c
    return (c.finish_reason, c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments)


check("a forced call cut by max_tokens", False, cut_call)


def streamed_call():
    parts = {}
    for ch in client.chat.completions.create(**ask, tool_choice="required", stream=True):
        for t in (ch.choices[0].delta.tool_calls or []) if ch.choices else []:
            p = parts.setdefault(t.index, {"name": "", "arguments": ""})
            p["name"] += t.function.name or ""
            p["arguments"] += t.function.arguments or ""
    return [(p["name"], json.loads(p["arguments"])) for p in parts.values()]


check("tools streamed (deltas joined by index)", False, streamed_call)
check("chat.completions.parse with a strict pydantic tool", False, lambda: client.chat.completions.parse(
    **ask, tool_choice="required").choices[0].message.tool_calls[0].function.parsed_arguments)
check("a tool call and its result sent back", False, lambda: summary(client.chat.completions.create(
    model=model, temperature=0, max_tokens=12, tools=[weather], messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}])))
server.terminate()
os.unlink(template.name)
print(f"{failures} failed")
sys.exit(1 if failures else 0)
