#!/usr/bin/env python3
"""The official `openai` Python client against r1-run's server (run by tests/server_openai.rs).

Usage: server_openai_client.py BASE_URL MODEL TOOLS_BASE_URL
  BASE_URL        a server on a tiny random checkpoint (gibberish output)
  TOOLS_BASE_URL  a server whose engine is scripted to answer with reasoning + two tool calls
Exits non-zero (with a traceback) on the first failed check; prints one line per check.
"""

import concurrent.futures
import json
import sys

import openai

base, model, tools_base = sys.argv[1:4]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
tools_client = openai.OpenAI(base_url=tools_base, api_key="unused", max_retries=0, timeout=120)


def check(name):
    print(f"ok: {name}", flush=True)


# Models.
ids = [m.id for m in client.models.list()]
assert ids == [model], ids
check("models.list")

# Non-streamed chat with forced thinking: reasoning_content beside content.
msgs = [{"role": "user", "content": "Hello!"}]
r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=8, temperature=0, extra_body={"thinking": True}
)
msg = r.choices[0].message
assert msg.role == "assistant"
reasoning = getattr(msg, "reasoning_content", None)
assert isinstance(reasoning, str) and reasoning, msg
assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens
extra = r.usage.model_extra or {}
assert extra["prompt_cache_hit_tokens"] + extra["prompt_cache_miss_tokens"] == r.usage.prompt_tokens
check("chat.completions non-stream with reasoning_content and usage")

# Streamed: the same text, reasoning in delta.reasoning_content.
stream = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=8,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"thinking": True},
)
parts, content, finish, usage = [], [], None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    if not chunk.choices:
        continue
    d = chunk.choices[0].delta
    if getattr(d, "reasoning_content", None):
        parts.append(d.reasoning_content)
    if d.content:
        content.append(d.content)
    finish = chunk.choices[0].finish_reason or finish
assert "".join(parts) == reasoning, ("".join(parts), reasoning)
assert "".join(content) == (msg.content or "")
assert finish == r.choices[0].finish_reason
assert usage.completion_tokens == r.usage.completion_tokens
check("chat.completions stream == non-stream")

# deepseek-reasoner: sending reasoning_content back is a 400.
try:
    client.chat.completions.create(
        model=model,
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x", "reasoning_content": "thought"},
            {"role": "user", "content": "again"},
        ],
        max_tokens=2,
    )
    raise AssertionError("expected a 400")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body and e.body.get("message"), e
check("reasoning_content in messages -> 400")

try:
    client.chat.completions.create(model="nope", messages=msgs, max_tokens=2)
    raise AssertionError("expected a 404")
except openai.NotFoundError as e:
    assert e.status_code == 404
check("unknown model -> 404")

try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=2, logprobs=True)
    raise AssertionError("expected a 400")
except openai.BadRequestError:
    pass
check("logprobs -> 400")

# JSON mode.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Answer in JSON."}],
    max_tokens=32,
    temperature=0,
    response_format={"type": "json_object"},
)
text = r.choices[0].message.content
assert text.lstrip().startswith("{"), text
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(text), dict)
check("response_format json_object")

# n choices: sampled with a seed, choice i equals a single request with seed + i.
r = client.chat.completions.create(
    model=model, messages=msgs, max_tokens=6, temperature=1.0, seed=7, n=2
)
assert [c.index for c in r.choices] == [0, 1]
for i, c in enumerate(r.choices):
    alone = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=6, temperature=1.0, seed=7 + i
    ).choices[0].message
    assert (c.message.content, getattr(c.message, "reasoning_content", None)) == (
        alone.content,
        getattr(alone, "reasoning_content", None),
    ), (i, c.message, alone)
check("n = 2 choices")

# Structured output through the client's pydantic helper (response_format json_schema, strict).
from typing import Literal

from pydantic import BaseModel


class Verdict(BaseModel):
    ok: bool
    level: Literal["low", "high"]


# The scripted engine (it reasons, then writes tool-call markup) is steered into the schema.
r = tools_client.beta.chat.completions.parse(
    model=model, messages=[{"role": "user", "content": "Judge."}], response_format=Verdict,
    max_tokens=64, temperature=0,
)
assert isinstance(r.choices[0].message.parsed, Verdict), r
assert getattr(r.choices[0].message, "reasoning_content", None), r
check("response_format json_schema via client.beta.chat.completions.parse")

# Raw completions.
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens <= 5
check("completions")


# 16 concurrent streaming clients, each equal to the same request alone.
def run(i):
    s = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"Client {i} asks about topic {i * 13}"}],
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    out = []
    for chunk in s:
        if chunk.choices:
            d = chunk.choices[0].delta
            out.append((getattr(d, "reasoning_content", None) or "") + "|" + (d.content or ""))
    return "".join(out)


alone = [run(i) for i in range(16)]
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    together = list(pool.map(run, range(16)))
assert together == alone
check("16 concurrent streams == solo")

# Tool calls (scripted engine).
tools = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]
ask = [{"role": "user", "content": "Weather and time in Paris?"}]
r = tools_client.chat.completions.create(model=model, messages=ask, tools=tools)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
calls = choice.message.tool_calls
assert [c.function.name for c in calls] == ["get_weather", "get_time"]
assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
assert getattr(choice.message, "reasoning_content", None)
check("tool_calls non-stream")

stream = tools_client.chat.completions.create(model=model, messages=ask, tools=tools, stream=True)
acc, finish = {}, None
for chunk in stream:
    if not chunk.choices:
        continue
    for tc in chunk.choices[0].delta.tool_calls or []:
        a = acc.setdefault(tc.index, {"name": "", "arguments": ""})
        if tc.function and tc.function.name:
            a["name"] = tc.function.name
        if tc.function and tc.function.arguments:
            a["arguments"] += tc.function.arguments
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls"
assert [acc[i]["name"] for i in sorted(acc)] == ["get_weather", "get_time"]
assert json.loads(acc[1]["arguments"]) == {"tz": "Europe/Paris"}
check("tool_calls streamed")

follow = ask + [
    {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
    {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": calls[1].id, "content": '{"time": "12:00"}'},
]
r = tools_client.chat.completions.create(model=model, messages=follow, tools=tools)
assert r.usage.prompt_tokens > 0
check("tool results as role=tool messages")
print("all checks passed")
