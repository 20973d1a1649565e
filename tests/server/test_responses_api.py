"""OpenAI's Responses API (/v1/responses) on a running `loramux serve`, through the official
`openai` client: its typed stream helper checks the event order, and chat completions on the same
server are the oracle (a response is the chat answer to the same messages).

S6.1: the adapter a Responses request names is the one that answers, in one batch with others.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jsonschema
import openai
import pydantic
import pytest

from loramux import demo
from tests.server.conftest import start_server
from tests.server.test_api import wait_for
from tests.server.test_structured import WEATHER as CHAT_WEATHER

MODELS = ("demo", *demo.ADAPTERS)
CALL_ARGS = {"city": "paris", "days": 3}
WEATHER = {"type": "function", **CHAT_WEATHER["function"]}  # the Responses API's flat shape
# A template that writes every role, so instructions and history show in the prompt's length.
ALL_ROLES = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server([], tmp_path_factory.mktemp("responses") / "server.log", timeout=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def _chat_text(client, model: str, messages: list[dict], **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=messages, temperature=0, **kw)


def test_S6_1_each_adapter_answers_as_its_chat_in_one_batch_whole_and_streamed(server):
    """Greedy responses for the base and every adapter, sent at once (one batch), equal the chat
    answers to the same message; streamed, the client's helper accepts the event order and the
    deltas add up to the same text."""
    words = ["hello world", "quick brown fox", "lora adapter", "good dog"]

    async def run():
        c = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)

        async def streamed(model: str, text: str):
            async with c.responses.stream(model=model, input=text, temperature=0) as s:
                deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
                return deltas, await s.get_final_response()

        whole = [
            c.responses.create(model=m, input=w, temperature=0) for m, w in zip(MODELS, words, strict=True)
        ]
        parts = [streamed(m, w) for m, w in zip(MODELS, words, strict=True)]
        chats = [
            c.chat.completions.create(model=m, messages=[{"role": "user", "content": w}], temperature=0)
            for m, w in zip(MODELS, words, strict=True)
        ]
        return await asyncio.gather(asyncio.gather(*whole), asyncio.gather(*parts), asyncio.gather(*chats))

    whole, parts, chats = asyncio.run(run())
    for model, word, r, (deltas, final), chat in zip(MODELS, words, whole, parts, chats, strict=True):
        expected = chat.choices[0].message.content
        assert r.model == model and r.status == "completed" and r.output_text == expected
        assert expected == demo.TASKS["echo" if model == "demo" else model](word)  # the adapter answered
        assert r.usage.input_tokens == chat.usage.prompt_tokens
        assert r.usage.output_tokens == chat.usage.completion_tokens
        assert final.output_text == expected and "".join(deltas) == expected and len(deltas) > 1
        assert final.id.startswith("resp_") and final.output[0].status == "completed"


def test_previous_response_id_goes_on_from_the_stored_conversation(client):
    """A second turn answers as chat does to [user, assistant, user]; GET returns the stored
    response and lists its input items (pages, newest first by default, as OpenAI's); DELETE
    forgets it, and then neither GET nor previous_response_id finds it."""
    first = client.responses.create(model="upper", input="hello world", temperature=0)
    second = client.responses.create(
        model="reverse",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "good dog"}]}],
        previous_response_id=first.id,
        temperature=0,
    )
    messages = [
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "good dog"},
    ]
    chat = _chat_text(client, "reverse", messages)
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens > first.usage.input_tokens
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    listed = client.responses.input_items.list(second.id, order="asc")  # this turn's input only
    assert [(i.type, i.role, i.content[0].text) for i in listed.data] == [("message", "user", "good dog")]
    items = [{"role": "user", "content": w} for w in ("a", "b", "c")]
    third = client.responses.create(model="upper", input=items, max_output_tokens=2)
    newest = client.responses.input_items.list(third.id, limit=2)  # newest first, by default
    assert [i.content[0].text for i in newest.data] == ["c", "b"] and newest.has_more
    rest = client.responses.input_items.list(third.id, after=newest.last_id)
    assert [i.content[0].text for i in rest.data] == ["a"] and not rest.has_more
    with pytest.raises(openai.BadRequestError, match="after='nope' is not an input item"):
        client.responses.input_items.list(third.id, after="nope")
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match=first.id):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="no stored response") as e:
        client.responses.create(model="upper", input="x", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    assert not client.responses.create(model="upper", input="x", store=False, max_output_tokens=2).store


def test_text_format_json_schema_parses_into_the_clients_model(client):
    """responses.parse with a pydantic model: text.format json_schema constrains the answer, whole
    and streamed."""

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=12)
        n: int = pydantic.Field(ge=0, le=999)

    prompt = demo.say(json.dumps({"name": "ann", "n": 7}))
    for model in ("demo", "upper"):
        r = client.responses.parse(
            model=model, input=prompt, text_format=Person, temperature=0.5, max_output_tokens=80
        )
        assert isinstance(r.output_parsed, Person), r.output_text
        with client.responses.stream(
            model=model, input=prompt, text_format=Person, temperature=0.5, max_output_tokens=80
        ) as s:
            assert isinstance(s.get_final_response().output_parsed, Person)
    obj = client.responses.create(model="demo", input=prompt, text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(obj.output_text), dict)


def test_function_tools_give_calls_and_take_their_outputs_back(client):
    """tool_choice "required" with parallel_tool_calls false: exactly one call whose arguments
    validate; a named function streamed (its arguments as they come); the calls and their
    outputs sent back as input items answer as chat does to the same assistant tool_calls and
    tool messages."""
    prompt = demo.say(json.dumps(CALL_ARGS))
    one = client.responses.create(
        model="demo",
        input=prompt,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0.5,
        max_output_tokens=150,
    )
    assert one.status == "completed" and [o.type for o in one.output] == ["function_call"]
    jsonschema.validate(json.loads(one.output[0].arguments), WEATHER["parameters"])
    named = {"type": "function", "name": "get_weather"}
    with client.responses.stream(
        model="upper",
        input=prompt,
        tools=[WEATHER],
        tool_choice=named,
        temperature=0.5,
        max_output_tokens=150,
    ) as s:
        kinds = [e.type for e in s]
        call = s.get_final_response().output[0]
    # the named function's arguments stream as they are made (the client's helper checks the ids)
    assert kinds[2] == "response.output_item.added" and kinds[-1] == "response.completed"
    assert kinds.count("response.function_call_arguments.delta") > 3
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert call.name == "get_weather" and call.status == "completed"
    items = [
        {"type": "message", "role": "user", "content": prompt},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        {"role": "user", "content": "and tomorrow"},
    ]
    back = client.responses.create(model="novowels", input=items, temperature=0)
    fn = {"name": call.name, "arguments": call.arguments}
    messages = [
        {"role": "user", "content": prompt},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.call_id, "type": "function", "function": fn}],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        {"role": "user", "content": "and tomorrow"},
    ]
    assert back.output_text == _chat_text(client, "novowels", messages).choices[0].message.content


def test_logprobs_equal_chats_and_a_cut_answer_is_incomplete(server, client):
    """include message.output_text.logprobs with top_logprobs gives chat's logprobs; an answer
    cut by max_output_tokens is "incomplete" (max_output_tokens), and its stream ends with
    response.incomplete."""
    r = client.responses.create(
        model="upper", input="hello", include=["message.output_text.logprobs"], top_logprobs=2, temperature=0
    )
    chat = _chat_text(client, "upper", [{"role": "user", "content": "hello"}], logprobs=True, top_logprobs=2)
    got = [
        (lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in r.output[0].content[0].logprobs
    ]
    want = [
        (lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in chat.choices[0].logprobs.content
    ]
    assert got == want and len(got) == chat.usage.completion_tokens
    cut = client.responses.create(model="demo", input="hello world lora", max_output_tokens=2, temperature=0)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 2 and cut.output[0].status == "incomplete"
    body = {"model": "demo", "input": "hello world lora", "max_output_tokens": 2, "stream": True}
    with httpx.stream("POST", server.v1 + "/responses", json=body, timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_adjacent_function_calls_are_one_assistant_turn():
    """Parallel calls (adjacent function_call items) render as one assistant message with two
    tool_calls, as chat sends them; a call after a tool's output starts a new turn."""
    from loramux.server.responses_input import input_messages

    def fc(i: int) -> dict:
        return {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"}

    out = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    msgs = input_messages([{"role": "user", "content": "go"}, fc(1), fc(2), out, fc(3)])
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    assert [c["id"] for c in msgs[3]["tool_calls"]] == ["c3"] and msgs[2]["tool_call_id"] == "c1"


REFUSED = [  # (extra request fields, param, words the message has)
    ({"tools": [{"type": "web_search"}]}, "tools", "function tools"),
    ({"tools": [WEATHER]}, "tool_choice", '"auto"'),
    ({"background": True, "store": False}, "background", "store: true"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input", "function_call_output"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input", "input_text"),
    ({"extra_body": {"messages": []}}, "messages", "send input"),
    ({"extra_body": {"max_tokens": 3}}, "max_tokens", "max_output_tokens"),
    ({"include": ["file_search_call.results"]}, "include", "message.output_text.logprobs"),
    ({"top_logprobs": 3}, "top_logprobs", "include"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search", "not supported"),
    ({"extra_body": {"top_k": "5"}}, "top_k", "integer"),
]


@pytest.mark.parametrize("extra,param,words", REFUSED, ids=[r[1] + str(i) for i, r in enumerate(REFUSED)])
def test_what_loramux_does_not_do_is_a_400_naming_it(client, extra, param, words):
    kw = {"model": "demo", "input": "hello", "max_output_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**kw)
    assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body


def _polled(client, rid: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while (r := client.responses.retrieve(rid)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, f"{rid} still {r.status} after {seconds} s"
        time.sleep(0.05)
    return r


def test_background_responses_are_polled_to_the_chat_answer_and_cancel_aborts_the_request(server, client):
    """`background: true`: answered at once as queued, made by the server, fetched with GET until it
    ends, equal to the chat answer. Cancelled while it is made, its request is aborted at once (its
    KV pages freed, no token more); a response still being made cannot be gone on from, and
    deleting one cancels it."""
    chat = _chat_text(client, "upper", [{"role": "user", "content": "good dog"}])
    r = client.responses.create(model="upper", input="good dog", temperature=0, background=True)
    assert r.status == "queued" and r.background and r.output == []
    done = _polled(client, r.id)
    assert (
        done.status == "completed" and done.background and done.output_text == chat.choices[0].message.content
    )
    assert client.responses.input_items.list(r.id).data[0].content[0].text == "good dog"
    assert client.responses.cancel(r.id).status == "completed"  # ended: answered as it is
    with pytest.raises(openai.BadRequestError, match="not made in the background"):
        client.responses.cancel(client.responses.create(model="demo", input="hi", max_output_tokens=2).id)

    m0 = server.metrics()
    long = {
        "model": "demo",
        "input": "go",
        "max_output_tokens": 200,
        "extra_body": {"ignore_eos": True},
    }
    running = client.responses.create(background=True, **long)
    with pytest.raises(openai.BadRequestError, match="still"):
        client.responses.create(model="demo", input="next", previous_response_id=running.id)
    cancelled = client.responses.cancel(running.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(running.id).status == "cancelled"
    gone = client.responses.create(background=True, **long)
    client.responses.delete(gone.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(gone.id)
    assert wait_for(lambda: server.metrics()["loramux_kv_pages_in_use"] == 0)
    m = server.metrics()
    aborts = 'loramux_engine_requests_finished_total{reason="abort"}'
    lengths = 'loramux_engine_requests_finished_total{reason="length"}'
    assert m[aborts] == m0.get(aborts, 0) + 2 and m.get(lengths, 0) == m0.get(lengths, 0)
    assert client.responses.retrieve(running.id).status == "cancelled"  # and it stays so


def _raw_events(client, rid: str, **kw) -> list[dict]:
    with client.responses.retrieve(rid, stream=True, **kw) as events:
        return [e.to_dict() for e in events]


def test_background_responses_stream_with_the_request_and_again_from_any_event(server, client):
    """`background` with `stream`: the request streams the events as a foreground stream would,
    created queued; `GET /v1/responses/{id}?stream=true&starting_after=N` streams them again from
    event N+1, the same events, live while the response is made. Leaving the stream does not stop
    the response (it runs to its length, no abort); a cancel ends the readers' streams with an
    error event naming it."""
    chat = _chat_text(client, "upper", [{"role": "user", "content": "good dog"}])
    with client.responses.create(
        model="upper", input="good dog", temperature=0, background=True, stream=True
    ) as events:
        first = [e.to_dict() for e in events]
    final = client.responses.retrieve(first[0]["response"]["id"])
    assert final.status == "completed" and final.background
    assert final.output_text == chat.choices[0].message.content
    kinds = [e["type"] for e in first]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert first[0]["response"]["status"] == "queued" and first[2]["response"]["status"] == "in_progress"
    assert [e["sequence_number"] for e in first] == list(range(len(first)))
    assert _raw_events(client, final.id) == first  # again, whole
    assert _raw_events(client, final.id, starting_after=4) == first[5:]  # from event 5
    with client.responses.stream(response_id=final.id, starting_after=6) as again:  # the helper's resume
        assert again.get_final_response().output_text == final.output_text
    with client.responses.stream(model="upper", input="good dog", temperature=0, background=True) as s:
        assert s.get_final_response().output_text == final.output_text  # the helper takes the order

    m0 = server.metrics()
    long = {"model": "demo", "input": "go", "max_output_tokens": 200, "extra_body": {"ignore_eos": True}}
    with client.responses.create(background=True, stream=True, **long) as events:
        read = []
        for e in events:  # the client leaves after the first token
            read.append(e.to_dict())
            if e.type == "response.output_text.delta":
                break
    rest = _raw_events(client, read[0]["response"]["id"], starting_after=read[-1]["sequence_number"])
    assert rest[-1]["type"] == "response.incomplete", rest[-1]  # all 200 tokens: nobody aborted it
    text = "".join(e["delta"] for e in read + rest if e["type"] == "response.output_text.delta")
    assert text == rest[-1]["response"]["output"][0]["content"][0]["text"]
    assert rest[-1]["response"]["usage"]["output_tokens"] == 200
    aborts = 'loramux_engine_requests_finished_total{reason="abort"}'
    assert server.metrics().get(aborts, 0) == m0.get(aborts, 0)

    async def follow_then_cancel() -> list[dict]:
        c = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=60)
        r = await c.responses.create(background=True, **long)
        seen: list[dict] = []

        async def follow() -> None:
            async with await c.responses.retrieve(r.id, stream=True) as events:
                async for e in events:
                    seen.append(e.to_dict())

        reader = asyncio.create_task(follow())
        for _ in range(600):  # at most 30 s to the first token
            if any(e["type"] == "response.output_text.delta" for e in seen):
                break
            await asyncio.sleep(0.05)
        assert (await c.responses.cancel(r.id)).status == "cancelled"
        await asyncio.wait_for(reader, 30)  # the cancel ended the reader's stream
        return seen

    seen = asyncio.run(follow_then_cancel())
    assert seen[-1]["type"] == "error" and seen[-1]["code"] == "response_cancelled", seen[-1]
    assert "response.incomplete" not in [e["type"] for e in seen]
    assert wait_for(lambda: server.metrics()["loramux_kv_pages_in_use"] == 0)
    assert server.metrics()[aborts] == m0.get(aborts, 0) + 1

    foreground = client.responses.create(model="demo", input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        _raw_events(client, foreground.id)
    assert e.value.body["param"] == "stream" and "not made in the background" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _raw_events(client, final.id, starting_after=-2)
    assert "starting_after" in str(e.value.body)


def test_instructions_go_first_and_are_not_carried_on_and_the_store_is_bounded(tmp_path):
    """With a template that writes every role: instructions come first as a system message and do
    not pass to the next turn (OpenAI's rule); --max-stored-responses 1 keeps only the newest."""
    template = tmp_path / "t.jinja"
    template.write_text(ALL_ROLES)
    s = start_server(["--chat-template", str(template), "--max-stored-responses", "1"], tmp_path / "log")
    try:
        c = openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=60)

        def length(messages: list[dict]) -> int:
            return len(
                httpx.post(s.url + "/tokenize", json={"model": "demo", "messages": messages}).json()["tokens"]
            )

        system = {"role": "system", "content": "be brief"}
        first = c.responses.create(model="upper", input="hi", instructions="be brief", max_output_tokens=3)
        turn = [{"role": "user", "content": "hi"}]
        assert first.usage.input_tokens == length([system, *turn]) > length(turn)
        second = c.responses.create(
            model="upper", input="yo", previous_response_id=first.id, max_output_tokens=3
        )
        turns = [
            *turn,
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "yo"},
        ]
        assert second.usage.input_tokens == length(turns)
        with pytest.raises(openai.NotFoundError, match="the last 1 responses"):
            c.responses.retrieve(first.id)
        assert c.responses.retrieve(second.id).id == second.id
    finally:
        s.stop()
