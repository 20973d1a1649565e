"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) on a running `loramux serve`,
through the official `anthropic` client (its stream helper checks the event order and builds the
final message). Chat completions on the same server are the oracle: a message is the chat answer
to the same conversation.

S6.1: the adapter a request names is the one that answers, in one batch with others.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import jsonschema
import openai
import pytest

from loramux import demo
from tests.server.conftest import start_server
from tests.server.test_responses_api import ALL_ROLES
from tests.server.test_structured import CLOCK, WEATHER

KEY = "sekret"
GREEDY = {"temperature": 0}  # vLLM's sampling fields ride in the body (this client sends none of its own)
MODELS = ("demo", "upper", "reverse")
TOOLS = [  # Anthropic's tool shape
    {"name": t["function"]["name"], "description": "a tool", "input_schema": t["function"]["parameters"]}
    for t in (WEATHER, CLOCK)
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(["--api-key", KEY], tmp_path_factory.mktemp("messages") / "server.log", timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):  # sends the key as x-api-key, as Anthropic's clients do
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def chat(server):  # the oracle, with the key as a bearer token
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)


def test_S6_1_each_adapter_answers_as_its_chat_in_one_batch_whole_and_streamed(server, chat):
    """Greedy messages for the base and two adapters, sent at once, equal the chat answers to the
    same message (text, token counts, stop reason); streamed, the client's helper accepts the
    events and its text deltas add up to the same."""
    words = ["good dog", "quick brown fox", "lora adapter"]

    async def run():
        c = anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)

        async def streamed(model: str, text: str):
            msgs = [{"role": "user", "content": text}]
            async with c.messages.stream(model=model, messages=msgs, max_tokens=40, extra_body=GREEDY) as s:
                deltas = [t async for t in s.text_stream]
                return deltas, await s.get_final_message()

        def ask(model: str, text: str):
            msgs = [{"role": "user", "content": text}]
            return c.messages.create(model=model, messages=msgs, max_tokens=40, extra_body=GREEDY)

        pairs = list(zip(MODELS, words, strict=True))
        return await asyncio.gather(
            asyncio.gather(*(ask(m, w) for m, w in pairs)),
            asyncio.gather(*(streamed(m, w) for m, w in pairs)),
        )

    wholes, streams = asyncio.run(run())
    for model, word, m, (deltas, final) in zip(MODELS, words, wholes, streams, strict=True):
        oracle = chat.chat.completions.create(
            model=model, messages=[{"role": "user", "content": word}], max_tokens=40, temperature=0
        )
        expected = oracle.choices[0].message.content
        assert expected == demo.TASKS["echo" if model == "demo" else model](word)  # the adapter answered
        assert m.model == model and m.role == "assistant" and m.type == "message" and m.id.startswith("msg_")
        assert [b.type for b in m.content] == ["text"] and m.content[0].text == expected
        assert m.stop_reason == "end_turn" and m.stop_sequence is None
        assert m.usage.input_tokens == oracle.usage.prompt_tokens
        assert m.usage.output_tokens == oracle.usage.completion_tokens
        assert "".join(deltas) == expected and final.content[0].text == expected
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == m.usage.output_tokens


def test_system_turns_prefill_stop_sequences_and_count_tokens_are_chats(tmp_path):
    """With a template that writes every role: `system` is the system message; an answer
    continues a last assistant turn (prefill), as chat's continue_final_message does; a stop
    sequence ends it with stop_reason stop_sequence; `thinking` switches the template's
    enable_thinking; count_tokens is the rendered prompt's length (/tokenize)."""
    template = tmp_path / "t.jinja"  # every role, and <think> where thinking is switched on
    template.write_text(
        ALL_ROLES + "{% if enable_thinking is defined and enable_thinking %}<think>{% endif %}"
    )
    server = start_server(["--chat-template", str(template)], tmp_path / "server.log")
    try:
        client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        chat = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
        turns = [
            {"role": "user", "content": demo.say("good dog")},
            {"role": "assistant", "content": [{"type": "text", "text": "GOOD"}]},
        ]
        m = client.messages.create(
            model="upper", system="be brief", messages=turns, max_tokens=20, extra_body=GREEDY
        )
        as_chat = [
            {"role": "system", "content": "be brief"},
            turns[0],
            {"role": "assistant", "content": "GOOD"},
        ]
        oracle = chat.chat.completions.create(
            model="upper",
            messages=as_chat,
            max_tokens=20,
            temperature=0,
            extra_body={"continue_final_message": True, "add_generation_prompt": False},
        )
        assert m.content[0].text == oracle.choices[0].message.content
        assert m.usage.input_tokens == oracle.usage.prompt_tokens

        ask = {"model": "upper", "messages": turns[:1], "max_tokens": 20, "extra_body": GREEDY}
        whole = client.messages.create(**ask).content[0].text
        assert len(whole) >= 5, whole
        cut = client.messages.create(**ask, stop_sequences=[whole[3:5]])
        assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == whole[3:5]
        assert cut.content[0].text == whole[:3]

        # `thinking` switches the template's enable_thinking (Qwen3's), here 7 tokens of "<think>"
        ask = {"model": "upper", "messages": turns[:1], "max_tokens": 2, "extra_body": GREEDY}
        off = client.messages.create(**ask, thinking={"type": "disabled"}).usage.input_tokens
        on = client.messages.create(
            **ask, thinking={"type": "enabled", "budget_tokens": 1024}
        ).usage.input_tokens
        assert on == off + len("<think>")

        counted = client.messages.count_tokens(model="upper", system="be brief", messages=turns)
        tokens = httpx.post(server.url + "/tokenize", json={"model": "upper", "messages": as_chat})
        assert counted.input_tokens == len(tokens.json()["tokens"])
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_use_validates_and_a_tool_result_turn_goes_on(client, stream):
    """tool_choice `tool` (and `any`): tool_use blocks whose input validates against the tool's
    input_schema, stop_reason tool_use; streamed as input_json_delta, which the helper parses. The
    conversation goes on with the tool_use and a tool_result."""
    args = {"city": "paris", "days": 3}
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any"}):
        # The demo repeats what it is asked to say: it is asked for the call's JSON (as chat's test).
        said = args if choice["type"] == "tool" else [{"name": "get_weather", "parameters": args}]
        msgs = [{"role": "user", "content": json.dumps(said)}]
        kw = {"model": "demo", "messages": msgs, "max_tokens": 150, "tools": TOOLS, "tool_choice": choice}
        kw["extra_body"] = GREEDY
        if stream:
            with client.messages.stream(**kw) as s:
                m = s.get_final_message()
        else:
            m = client.messages.create(**kw)
        uses = [b for b in m.content if b.type == "tool_use"]
        assert m.stop_reason == "tool_use" and uses and all(b.id.startswith("toolu_") for b in uses), m
        assert [b.type for b in m.content] == ["tool_use"] * len(uses), m  # no text: the calls are it
        schemas = {t["name"]: t["input_schema"] for t in TOOLS}
        for b in uses:
            jsonschema.validate(b.input, schemas[b.name])
        if choice["type"] == "tool":
            assert [b.name for b in uses] == ["get_weather"]
    result = [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}]
    turns = [
        *msgs,
        {"role": "assistant", "content": [u.model_dump() for u in uses]},
        {"role": "user", "content": result},
    ]
    nxt = client.messages.create(
        model="demo", messages=turns, max_tokens=5, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert nxt.content and nxt.stop_reason in ("end_turn", "max_tokens")


def test_refusals_have_anthropics_error_shape(client, server):
    """Bad input is a 4xx in Anthropic's shape (the client raises the matching error), naming the
    problem; a wrong key is a 401; the server serves on."""
    hi = [{"role": "user", "content": "hi"}]
    image = [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}]
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="demo", messages=image, max_tokens=3)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "'image' block" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", messages=hi, max_tokens=3)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError, match="thinking type"):
        client.messages.create(
            model="demo", messages=hi, max_tokens=3, extra_body={"thinking": {"type": "deep"}}
        )
    with pytest.raises(anthropic.BadRequestError, match="server tools"):
        client.messages.create(
            model="demo",
            messages=hi,
            max_tokens=3,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    with pytest.raises(anthropic.BadRequestError, match="no place in a Message"):
        client.messages.create(model="demo", messages=hi, max_tokens=3, extra_body={"n": 2})
    r = httpx.post(
        server.url + "/v1/messages", json={"model": "demo", "messages": hi}, headers={"x-api-key": KEY}
    )
    assert (
        r.status_code == 400
        and r.json()["error"]["type"] == "invalid_request_error"
        and "max_tokens" in r.text
    )
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model="demo", messages=hi, max_tokens=3)
    ok = client.messages.create(model="demo", messages=hi, max_tokens=3)
    assert ok.usage.output_tokens >= 1


def test_auto_tools_and_thinking_come_back_as_blocks(parsers_server):
    """With --enable-auto-tool-choice --tool-call-parser hermes and --reasoning-parser deepseek_r1:
    tool_choice auto gives the calls the model wrote as tool_use blocks after its text, and a free
    answer (no </think>: all reasoning to deepseek_r1) is a thinking block; whole and streamed."""
    s = parsers_server
    c = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0, timeout=120)
    args = r'\{"city": "[a-z]{1,6}", "days": [1-7]\}'
    call = rf'<tool_call>\{{"name": "get_weather", "arguments": {args}\}}</tool_call>'
    msgs = [{"role": "user", "content": demo.say("weather in paris")}]
    kw = {"model": "demo", "messages": msgs, "max_tokens": 120, "tools": TOOLS}
    form = {"structured_outputs": {"regex": "[a-z]{1,5} " + call}, **GREEDY}
    whole = c.messages.create(**kw, tool_choice={"type": "auto"}, extra_body=form)
    with c.messages.stream(**kw, extra_body=form) as st:  # auto: the default with tools
        streamed = st.get_final_message()
    for m in (whole, streamed):
        assert [b.type for b in m.content] == ["text", "tool_use"] and m.stop_reason == "tool_use", m
        assert m.content[1].name == "get_weather" and set(m.content[1].input) == {"city", "days"}
        assert m.content[0].text.endswith(" ")
    assert whole.content[1].input == streamed.content[1].input

    plain = {"model": "upper", "messages": msgs, "max_tokens": 20, "extra_body": GREEDY}
    thought = c.messages.create(**plain)
    with c.messages.stream(**plain) as st:
        again = st.get_final_message()
    for m in (thought, again):
        assert [b.type for b in m.content] == ["thinking"] and m.content[0].thinking
    assert again.content[0].thinking == thought.content[0].thinking
