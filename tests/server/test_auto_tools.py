"""tool_choice "auto" on `loramux serve --enable-auto-tool-choice --tool-call-parser hermes` (and
llama3_json), through the official `openai` client: the answer is free text, and the calls the
model wrote in it come back as tool_calls (chat) or function_call items (Responses API), whole
and streamed, with the text around them as content.

The demo model was not trained to call tools, so a regular expression (structured_outputs) makes
it write in the parser's format, and chooses nothing else: names, arguments and words are the
model's own (greedy). The oracle is the same request with tool_choice "none" (the same prompt,
so the same greedy text, returned as it is), parsed here by hand.

S6.1: each adapter's answer is its own, base and adapters in one batch.
"""

from __future__ import annotations

import asyncio
import json
import re

import openai
import pytest

from loramux import demo
from tests.server.conftest import start_server
from tests.server.test_structured import CLOCK, WEATHER

MODELS = ("demo", "upper", "novowels")
# The model writes some words, then one or two calls in Hermes' format, choosing their names and
# arguments itself.
WEATHER_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{1,6}"\}\}</tool_call>'
TIME_CALL = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}</tool_call>'
HERMES_FORM = rf"[a-z]{{1,5}} ({WEATHER_CALL}|{TIME_CALL})( {TIME_CALL})?"
LLAMA_FORM = r'\{"name": "get_weather", "parameters": \{"city": "[a-z]{1,6}"\}\}'
PYTHONIC_FORM = r'\[get_(weather|time)\(city="[a-z]{1,6}"\)\]'
QWEN3_CODER_FORM = (
    r"<tool_call><function=get_weather><parameter=city>[a-z]{1,6}</parameter>"
    r"<parameter=days>[1-7]</parameter></function></tool_call>"
)
TOOLS = [WEATHER, CLOCK]


@pytest.fixture(scope="module")
def server(parsers_server):
    return parsers_server  # hermes (and deepseek_r1, which leaves these constrained answers whole)


def _by_hand(text: str) -> tuple[str, list[tuple[str, dict]]]:
    """The content and calls in a Hermes answer, as the oracle reads them."""
    calls = [json.loads(m) for m in re.findall(r"<tool_call>(.*?)</tool_call>", text)]
    return text[: text.index("<tool_call>")], [(c["name"], c["arguments"]) for c in calls]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls or []]


def test_S6_1_auto_tool_calls_are_found_in_each_adapters_answer_whole_and_streamed(server):
    """Base and two adapters at once: each answer's tool_calls and content are what its text (the
    same request with tool_choice "none") holds; finish_reason is tool_calls; the stream's deltas
    add up to the same content and calls, no call text among the content."""
    c = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    form = {"structured_outputs": {"regex": HERMES_FORM}}

    def ask(model: str, choice: str, **kw):
        return c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": demo.say("weather in paris")}],
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,
            max_tokens=170,
            extra_body=form,
            **kw,
        )

    async def streamed(model: str):
        content, calls, finish = "", {}, None
        async for chunk in await ask(model, "auto", stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                assert tc.index not in calls and tc.id and tc.function.name  # each call comes whole
                calls[tc.index] = tc
            finish = chunk.choices[0].finish_reason or finish
        return content, [calls[k] for k in sorted(calls)], finish

    async def run():
        return await asyncio.gather(
            asyncio.gather(*(ask(m, "none") for m in MODELS)),
            asyncio.gather(*(ask(m, "auto") for m in MODELS)),
            asyncio.gather(*(streamed(m) for m in MODELS)),
        )

    raws, autos, streams = asyncio.run(run())
    texts = {raw.choices[0].message.content for raw in raws}
    assert len(texts) > 1  # the adapters answered differently: each answer is its own
    for raw, auto, (content, calls, finish) in zip(raws, autos, streams, strict=True):
        text = raw.choices[0].message.content
        assert raw.choices[0].message.tool_calls is None and raw.choices[0].finish_reason == "stop"
        said, expected = _by_hand(text)
        assert 1 <= len(expected) <= 2, text
        got = auto.choices[0]
        assert got.finish_reason == "tool_calls" and got.message.content == said
        assert _calls(got.message.tool_calls) == expected
        assert len({tc.id for tc in got.message.tool_calls}) == len(expected)
        assert content == said and _calls(calls) == expected and finish == "tool_calls"
        assert [tc.type for tc in calls] == ["function"] * len(expected)


def test_an_answer_without_calls_is_content_and_the_responses_api_gives_function_call_items(server):
    """Free text with no call stays the content (finish_reason stop, no tool_calls); the Responses
    API's "auto" (its default with tools) gives the text as a message item and each call as a
    function_call item, whole and streamed."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    plain = {"structured_outputs": {"regex": "[a-z]{1,8} [a-z]{1,8}"}}
    msgs = [{"role": "user", "content": demo.say("good dog")}]
    raw = client.chat.completions.create(
        model="upper", messages=msgs, tools=TOOLS, tool_choice="none", temperature=0, extra_body=plain
    )
    auto = client.chat.completions.create(
        model="upper", messages=msgs, tools=TOOLS, temperature=0, extra_body=plain
    )
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "stop"
    assert auto.choices[0].message.content == raw.choices[0].message.content

    flat = [{"type": "function", **t["function"]} for t in TOOLS]  # the Responses API's tool shape
    form = {"structured_outputs": {"regex": HERMES_FORM}}
    kw = {"model": "novowels", "input": demo.say("weather in paris"), "temperature": 0, "tools": flat}
    text = (
        client.chat.completions.create(
            model="novowels",
            messages=[{"role": "user", "content": demo.say("weather in paris")}],
            tools=TOOLS,
            tool_choice="none",
            temperature=0,
            extra_body=form,
        )
        .choices[0]
        .message.content
    )
    said, expected = _by_hand(text)
    whole = client.responses.create(**kw, extra_body=form)
    with client.responses.stream(**kw, extra_body=form) as s:
        kinds = [e.type for e in s]
        streamed = s.get_final_response()
    assert kinds.count("response.output_text.delta") > 1  # the text streams as it is made
    assert kinds.index("response.output_text.done") < kinds.index("response.function_call_arguments.done")
    for r in (whole, streamed):
        assert r.status == "completed"
        kinds = [item.type for item in r.output]
        assert kinds == ["message"] + ["function_call"] * len(expected), kinds
        assert r.output[0].content[0].text == said
        calls = [(item.name, json.loads(item.arguments)) for item in r.output[1:]]
        assert calls == expected and all(item.call_id.startswith("chatcmpl-tool-") for item in r.output[1:])


def _llama3_by_hand(raw: str) -> list[tuple[str, dict]]:
    call = json.loads(raw)
    return [(call["name"], call["parameters"])]


def _pythonic_by_hand(raw: str) -> list[tuple[str, dict]]:
    name, city = re.fullmatch(r'\[(\w+)\(city="([a-z]+)"\)\]', raw).groups()  # type: ignore[union-attr]
    return [(name, {"city": city})]


def _qwen3_coder_by_hand(raw: str) -> list[tuple[str, dict]]:
    city, days = re.findall(r"<parameter=\w+>(\w+)</parameter>", raw)
    return [("get_weather", {"city": city, "days": int(days)})]  # days: an integer in its schema


@pytest.mark.parametrize(
    "parser,form,by_hand",
    [
        ("llama3_json", LLAMA_FORM, _llama3_by_hand),
        ("pythonic", PYTHONIC_FORM, _pythonic_by_hand),
        ("qwen3_coder", QWEN3_CODER_FORM, _qwen3_coder_by_hand),
    ],
)
def test_the_other_formats_llama3_json_pythonic_and_qwen3_coder(tmp_path, parser, form, by_hand):
    """--tool-call-parser llama3_json finds a Llama 3 call (the whole answer is its JSON),
    pythonic a Llama 3.2 / 4 call (a Python list of calls), and qwen3_coder a Qwen3-Coder call
    (its values typed by the tool's schema), whole and streamed."""
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    s = start_server(flags, tmp_path / "server.log", timeout=120)
    try:
        c = openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": demo.say("weather in paris")}]
        extra = {"structured_outputs": {"regex": form}}
        ask = {"model": "demo", "messages": msgs, "tools": TOOLS, "temperature": 0, "extra_body": extra}
        raw = c.chat.completions.create(tool_choice="none", **ask).choices[0].message.content
        got = c.chat.completions.create(tool_choice="auto", **ask).choices[0]
        assert got.finish_reason == "tool_calls" and got.message.content is None
        assert _calls(got.message.tool_calls) == by_hand(raw)
        chunks = list(c.chat.completions.create(tool_choice="auto", stream=True, **ask))
        streamed = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
        assert _calls(streamed) == by_hand(raw) and chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks)
    finally:
        s.stop()
