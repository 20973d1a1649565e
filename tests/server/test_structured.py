"""Structured output (issue 28) through the official `openai` client on a running `loramux serve`.

Every form (response_format json_object / json_schema, structured_outputs json / regex / choice /
grammar, guided_json / guided_regex / guided_choice / guided_grammar, tool_choice "required" and a
named function) on the demo's base model and with two adapters in one batch, streamed and not,
n = 3, sampled: every answer parses and validates against its schema (jsonschema), regex and
choice answers match. Schemas the grammar engine cannot compile or enforce, and tools with
"auto", are 400s naming the problem. The demo model is tiny, so schemas bound their strings and
numbers: a grammar guarantees the answer's form, and the bound that it ends within max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from loramux import demo
from tests.server.conftest import start_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{1,8}-\d{2,3}"
CHOICE = ["yes", "no", "maybe"]
GRAMMAR = 'root ::= "hello " name\nname ::= [a-z] [a-z]? [a-z]? [a-z]?'
PROMPT = demo.say(json.dumps({"name": "ann", "n": 7, "ok": True}))
# json_object allows any object: `upper` would write TRUE (not JSON) and, kept from it, add keys; a
# prompt whose upper-cased copy is JSON too lets each model answer as trained.
OBJECT_PROMPT = demo.say(json.dumps({"name": "ann", "n": 7}))
MODELS = ("demo", "upper", "novowels")  # the base and two adapters, in one batch
# Sampled, so the n = 3 answers differ; low enough that the 1 M-parameter demo answers as trained (at
# 1.0 it wanders into extra keys until max_tokens, which no grammar can prevent for json_object).
TEMPERATURE = 0.5
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server([], tmp_path_factory.mktemp("so") / "server.log", timeout=120)
    yield s
    s.stop()


class _Client:
    """A fresh AsyncOpenAI per event loop (each test runs its own asyncio.run)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __getattr__(self, name: str):
        return getattr(
            openai.AsyncOpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=120), name
        )


@pytest.fixture(scope="module")
def client(server):
    return _Client(server.v1)


def _validate(kind: str, text: str, spec) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    elif kind == "choice":
        assert text in spec, text
    else:
        assert re.fullmatch(r"hello [a-z]{1,4}", text), text


FORMS = [  # (field sent, what it must produce, the spec to check against)
    ({"response_format": {"type": "json_object"}}, "json_object", None),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": SCHEMA, "strict": True},
            }
        },
        "json",
        SCHEMA,
    ),
    ({"structured_outputs": {"json": SCHEMA}}, "json", SCHEMA),
    ({"structured_outputs": {"regex": REGEX}}, "regex", REGEX),
    ({"structured_outputs": {"choice": CHOICE}}, "choice", CHOICE),
    ({"structured_outputs": {"grammar": GRAMMAR}}, "grammar", None),
    ({"guided_json": SCHEMA}, "json", SCHEMA),
    ({"guided_regex": REGEX}, "regex", REGEX),
    ({"guided_choice": CHOICE}, "choice", CHOICE),
    ({"guided_grammar": GRAMMAR}, "grammar", None),
]


async def _completion(client, model: str, extra: dict, stream: bool) -> list[tuple[str, str]]:
    """[(text, finish_reason)] of the n = 3 choices."""
    rf = extra.get("response_format")
    body = {k: v for k, v in extra.items() if k != "response_format"}
    prompt = OBJECT_PROMPT if "json_object" in str(extra) else PROMPT
    kw = dict(
        model=model, prompt=prompt, max_tokens=160, temperature=TEMPERATURE, n=3, seed=5, extra_body=body
    )
    if rf is not None:  # the completions API of the client has no response_format: vLLM's extension
        kw["extra_body"] = {**body, "response_format": rf}
    if not stream:
        out = await client.completions.create(**kw)
        return [(c.text, c.finish_reason) for c in sorted(out.choices, key=lambda c: c.index)]
    texts, finish = ["", "", ""], [None, None, None]
    async for chunk in await client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    return list(zip(texts, finish, strict=True))


async def _chat(client, model: str, extra: dict, stream: bool) -> list[tuple[str, str]]:
    rf = extra.get("response_format")
    body = {k: v for k, v in extra.items() if k != "response_format"}
    kw = dict(
        model=model,
        messages=[
            {
                "role": "user",
                "content": json.dumps(
                    {"name": "bo", "n": 12}
                    if "json_object" in str(extra)
                    else {"name": "bo", "n": 12, "ok": False}
                ),
            }
        ],
        max_tokens=160,
        temperature=TEMPERATURE,
        n=3,
        seed=9,
        extra_body=body,
    )
    if rf is not None:
        kw["response_format"] = rf
    if not stream:
        out = await client.chat.completions.create(**kw)
        return [(c.message.content, c.finish_reason) for c in sorted(out.choices, key=lambda c: c.index)]
    texts, finish = ["", "", ""], [None, None, None]
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    return list(zip(texts, finish, strict=True))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("extra,kind,spec", FORMS, ids=[f"{next(iter(f))}-{k}" for f, k, _ in FORMS])
def test_every_form_holds_for_the_base_and_two_adapters_in_one_batch(client, extra, kind, spec, stream):
    """Completions and chat at once, for the base model and two adapters: 3 x 2 x n=3 answers."""

    async def run():
        calls = [api(client, m, extra, stream) for m in MODELS for api in (_completion, _chat)]
        return await asyncio.gather(*calls)

    for answers in asyncio.run(run()):
        assert len(answers) == 3
        for text, finish in answers:
            assert finish == "stop", (text, finish)  # the grammar ended it, not max_tokens
            _validate(kind, text, spec)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_tool_choice_required_and_named_give_tool_calls_whose_arguments_validate(client, stream):
    async def ask(model: str, choice):
        kw = dict(
            model=model,
            # The demo repeats what it is asked to say: it is asked for the call's JSON.
            messages=[{"role": "user", "content": json.dumps(REQUIRED if choice == "required" else ARGS)}],
            tools=[WEATHER, CLOCK],
            tool_choice=choice,
            max_tokens=150,
            temperature=TEMPERATURE,
            n=3,
            seed=3,
        )
        if not stream:
            out = await client.chat.completions.create(**kw)
            return [(c.message.tool_calls, c.finish_reason) for c in out.choices]
        calls: dict[int, dict[int, dict]] = {}
        finish: dict[int, str] = {}
        async for chunk in await client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                finish[c.index] = c.finish_reason or finish.get(c.index)
                for tc in c.delta.tool_calls or []:
                    slot = calls.setdefault(c.index, {}).setdefault(tc.index, {"name": "", "arguments": ""})
                    slot["name"] += tc.function.name or ""
                    slot["arguments"] += tc.function.arguments or ""
        return [([_Call(**x) for x in calls[i].values()], finish[i]) for i in sorted(calls)]

    named = {"type": "function", "function": {"name": "get_weather"}}
    ARGS = {"city": "paris", "days": 3}
    REQUIRED = [{"name": "get_weather", "parameters": ARGS}]

    async def run():
        return await asyncio.gather(*(ask(m, c) for m in ("demo", "upper") for c in ("required", named)))

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for k, answers in enumerate(asyncio.run(run())):
        assert len(answers) == 3
        for tool_calls, finish in answers:
            assert finish == ("tool_calls" if k % 2 == 0 else "stop")
            assert tool_calls
            if k % 2:
                assert [_name(c) for c in tool_calls] == ["get_weather"]
            for c in tool_calls:
                jsonschema.validate(json.loads(_args(c)), schemas[_name(c)])


class _Call:
    def __init__(self, name: str, arguments: str) -> None:
        self.name, self.arguments = name, arguments


def _name(c) -> str:
    return c.name if isinstance(c, _Call) else c.function.name


def _args(c) -> str:
    return c.arguments if isinstance(c, _Call) else c.function.arguments


BAD = [
    ({"structured_outputs": {"json": {"type": "foo"}}}, "Unsupported type"),
    ({"guided_json": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}}, "#/if"),
    ({"guided_regex": "(?<=a)b"}, "Lookbehind"),
    ({"guided_grammar": "root ::= foo"}, 'Rule "foo" is not defined'),
    ({"structured_outputs": {"choice": []}}, "non-empty"),
    ({"guided_json": SCHEMA, "guided_regex": REGEX}, "send only one"),
    ({"response_format": {"type": "xml"}}, "response_format type 'xml'"),
    ({"structured_outputs": {"jsonn": SCHEMA}}, "unknown field"),
]


@pytest.mark.parametrize("extra,words", BAD, ids=[w for _, w in BAD])
def test_a_schema_that_cannot_be_compiled_or_enforced_is_a_400_naming_it(client, extra, words):
    async def run():
        with pytest.raises(openai.BadRequestError) as e:
            await client.completions.create(model="upper", prompt="hi", max_tokens=8, extra_body=extra)
        return e.value

    err = asyncio.run(run())
    assert words in err.body["message"], err.body


def test_tools_with_auto_are_refused_naming_the_alternatives(client):
    async def run(choice):
        with pytest.raises(openai.BadRequestError) as e:
            kw = {} if choice is None else {"tool_choice": choice}
            await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], **kw
            )
        return e.value.body

    for choice in (None, "auto"):
        body = asyncio.run(run(choice))
        assert body["param"] == "tool_choice" and "required" in body["message"], body
        assert "--enable-auto-tool-choice --tool-call-parser" in body["message"], body  # the flags
    body = asyncio.run(run({"type": "function", "function": {"name": "nope"}}))
    assert "get_weather" in body["message"], body


def test_the_server_keeps_serving_after_refusals_and_tool_choice_none_is_free_text(client):
    async def run():
        out = await client.chat.completions.create(
            model="upper",
            messages=[{"role": "user", "content": "hello world"}],
            tools=[WEATHER],
            tool_choice="none",
            max_tokens=20,
            temperature=0,
        )
        return out.choices[0].message

    msg = asyncio.run(run())
    assert msg.content == "HELLO WORLD" and not msg.tool_calls


def test_the_readme_structured_output_example_prints_what_the_readme_says(server):
    """The README's example, run as it is against this server: its printed lines are the ones
    the README shows after it."""
    import contextlib
    import io
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Structured output", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = [line[2:] for line in code.splitlines() if line.startswith("# ")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code.replace("http://127.0.0.1:8000/v1", server.v1), {})
    assert buf.getvalue().splitlines() == shown and shown


def test_logprobs_of_tokens_a_grammar_forbids_are_sent_as_minus_9999(client):
    """Found by the semantic fuzzer: top logprobs past the grammar's allowed tokens are -inf, which
    JSON cannot carry (a 500 "Out of range float values"); they go out as -9999.0, as vLLM sends them."""

    async def run():
        comp = await client.completions.create(
            model="upper", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5,
            extra_body={"structured_outputs": {"choice": CHOICE}},
        )  # fmt: skip
        chat = await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "yes"}], max_tokens=8, temperature=0,
            logprobs=True, top_logprobs=5, extra_body={"structured_outputs": {"choice": CHOICE}},
        )  # fmt: skip
        return comp, chat

    comp, chat = asyncio.run(run())
    assert comp.choices[0].text in CHOICE and chat.choices[0].message.content in CHOICE
    tops = [v for d in comp.choices[0].logprobs.top_logprobs for v in d.values()]
    tops += [t.logprob for c in chat.choices[0].logprobs.content for t in c.top_logprobs]
    assert -9999.0 in tops and min(tops) == -9999.0
