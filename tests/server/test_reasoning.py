"""`loramux serve --reasoning-parser` through the official `openai` client: the answer's reasoning
comes back as `reasoning` (and `reasoning_content`, its older name) beside the content, whole and
streamed, in chat and as a reasoning item in the Responses API; answers the request constrains are
left whole.

The demo model does not think in <think> blocks, so its answers show the two parsers' rule for an
answer without them: deepseek_r1 (whose template opens the block in the prompt) takes it all as
reasoning, qwen3 all as content. The split inside an answer is covered on text and on streamed
engine outputs in test_reasoning_parsers.py. The oracle is the answer's own tokens
(`return_token_ids`) detokenized by the server.

S6.1: each adapter's answer is its own, base and adapters in one batch.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from loramux import demo
from tests.server.conftest import start_server

MODELS = ("demo", "upper", "reverse")


@pytest.fixture(scope="module")
def server(parsers_server):
    return parsers_server  # deepseek_r1 (and hermes, which these requests without tools never use)


def _text(server, choice) -> str:
    """The text of a choice's tokens, less the end-of-text token of an answer that stopped."""
    ids = choice.token_ids[:-1] if choice.finish_reason == "stop" else choice.token_ids
    r = httpx.post(server.url + "/detokenize", json={"model": "demo", "tokens": ids}, timeout=30)
    return r.json()["prompt"]


def test_S6_1_deepseek_r1_gives_the_answer_as_reasoning_whole_and_streamed(server):
    """Base and adapters at once: each answer (no </think> in it) is all reasoning, equal to its
    own tokens' text; content is null; streamed, the reasoning deltas add up to the same."""
    c = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)

    def ask(model: str, **kw):
        msgs = [{"role": "user", "content": demo.say("good dog")}]
        return c.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=30, **kw)

    async def streamed(model: str):
        reasoning, older, content = "", "", ""
        async for chunk in await ask(model, stream=True):
            delta = chunk.choices[0].delta.model_dump()
            reasoning += delta.get("reasoning") or ""
            older += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
        return reasoning, older, content

    async def run():
        whole = asyncio.gather(*(ask(m, extra_body={"return_token_ids": True}) for m in MODELS))
        return await asyncio.gather(whole, asyncio.gather(*(streamed(m) for m in MODELS)))

    wholes, streams = asyncio.run(run())
    texts = [_text(server, w.choices[0]) for w in wholes]
    assert len(set(texts)) == len(MODELS)  # each adapter answered its own way
    for w, text, (reasoning, older, content) in zip(wholes, texts, streams, strict=True):
        message = w.choices[0].message.model_dump()
        assert message["reasoning"] == message["reasoning_content"] == text and message["content"] is None
        assert reasoning == older == text and content == ""


def test_constrained_answers_are_left_whole_and_the_responses_api_gives_a_reasoning_item(server):
    """An answer the request constrains (here a regular expression) is content, not reasoning;
    `include_reasoning: false` leaves the reasoning out, whole and streamed; the Responses API's
    answer is a reasoning item (whole and streamed), and the next turn goes on from it."""
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": demo.say("good dog")}]
    form = {"structured_outputs": {"regex": "[a-z]{2,6}"}}
    r = client.chat.completions.create(model="upper", messages=msgs, temperature=0, extra_body=form)
    message = r.choices[0].message.model_dump()
    assert message["content"] and message.get("reasoning") is None

    chat = client.chat.completions.create(model="upper", messages=msgs, temperature=0, max_tokens=30)
    thought = chat.choices[0].message.model_dump()["reasoning"]
    for stream in (False, True):  # vLLM's include_reasoning: false leaves it out
        left_out = client.chat.completions.create(
            model="upper",
            messages=msgs,
            temperature=0,
            max_tokens=30,
            stream=stream,
            extra_body={"include_reasoning": False},
        )
        chunks = list(left_out) if stream else [left_out]
        said = [c.choices[0].delta if stream else c.choices[0].message for c in chunks]
        assert thought and not any(m.model_dump().get("reasoning") for m in said)
    kw = {"model": "upper", "input": demo.say("good dog"), "temperature": 0, "max_output_tokens": 30}
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as s:
        kinds = [e.type for e in s]
        streamed = s.get_final_response()
    for resp in (whole, streamed):
        assert [item.type for item in resp.output] == ["reasoning", "message"]
        assert resp.output[0].content[0].text == thought and resp.output[1].content[0].text == ""
    assert kinds.count("response.reasoning_text.delta") > 1  # the reasoning streams as it is made
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.done")
    nxt = client.responses.create(
        model="upper", input="more", previous_response_id=whole.id, max_output_tokens=3
    )
    assert nxt.status in ("completed", "incomplete")


def test_qwen3_gives_an_answer_without_a_think_block_as_content(tmp_path):
    s = start_server(["--reasoning-parser", "qwen3"], tmp_path / "s.log")
    try:
        c = openai.OpenAI(base_url=s.v1, api_key="unused", max_retries=0, timeout=120)
        msgs = [{"role": "user", "content": demo.say("good dog")}]
        r = c.chat.completions.create(
            model="reverse",
            messages=msgs,
            temperature=0,
            max_tokens=30,
            extra_body={"return_token_ids": True},
        )
        message = r.choices[0].message.model_dump()
        assert message["content"] == _text(s, r.choices[0]) and message["reasoning"] is None
        assert "reasoning_content" in message  # the field is there, null
    finally:
        s.stop()
