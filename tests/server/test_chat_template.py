"""Chat renders what vLLM renders: tools, tool calls, continue_final_message, chat_template_kwargs.

Issue 16 (drop-in for vLLM users). A tool-calling conversation's second turn carries the
assistant's `tool_calls` and the tool's `tool_call_id`; templates such as Llama 3.1's and
Qwen2.5's write them, and the request's `tools`, into the prompt. vLLM hands all of them to the
template, parses a call's JSON `arguments` into an object, and takes `add_generation_prompt`,
`continue_final_message` and `chat_template_kwargs` (Qwen3's `enable_thinking`) per request.
Before this, loramux kept only each message's role and text and ignored those fields, so the
model saw another prompt than the one asked for, and no error said so.

The oracle is transformers' own `apply_chat_template` on the same tokenizer, called with the
arguments already as objects; every path (the chat endpoint, /tokenize, `LLM.chat`) must give
its token ids exactly.
"""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from loramux import LLM, SamplingParams
from tests.server.conftest import start_server

TEMPLATE = (
    "{% if tools %}<s>tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}{% if m.name %} ({{ m.name }}){% endif %}: "
    "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }};{% endfor %}"
    "{% elif m.tool_call_id %}[{{ m.tool_call_id }}] {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}"  # (trim_blocks eats a bare newline)
    "{% if add_generation_prompt %}<s>assistant: "
    "{% if enable_thinking is defined and not enable_thinking %}/no_think {% endif %}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ARGS = {"city": "lora adapter"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": json.dumps(ARGS)}}
# the second turn of a tool conversation, as OpenAI's clients send it (arguments as JSON text)
SENT = [
    {"role": "user", "content": "serve the model", "name": "ann"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
]
# the same, as the template must see it (vLLM parses the arguments; content None reads as "")
SEEN = [
    SENT[0],
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{**CALL, "function": {"name": "weather", "arguments": ARGS}}],
    },
    SENT[2],
]
PARTIAL = [{"role": "user", "content": "serve the model"}, {"role": "assistant", "content": "the adapter"}]


@pytest.fixture(scope="module")
def tool_model(tiny_models, tmp_path_factory):
    """The tiny llama with a chat template that writes tools, tool calls and a template kwarg."""
    path = tmp_path_factory.mktemp("tools") / "llama"
    shutil.copytree(tiny_models["llama"].path, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(tool_model):
    return AutoTokenizer.from_pretrained(tool_model)


def oracle(tok, messages, **kw) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, **kw)
    return tok.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def server(tool_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("tools-server") / "server.log"
    args = [str(tool_model), "--served-model-name", "base", "--num-pages", "128", "--page-size", "4"]
    s = start_server([*args, "--device", "cpu"], log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def tokenize(server, **body) -> list[int]:
    r = httpx.post(server.url + "/tokenize", json={"model": "base", **body}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_the_oracle_tells_the_fields_apart(tok):
    """The template really writes what these tests check: without the tool fields, or with the
    arguments left as text, or without the kwarg, the ids differ."""
    want = oracle(tok, SEEN, tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
    bare = [{"role": m["role"], "content": m["content"] or ""} for m in SENT]
    assert oracle(tok, bare, add_generation_prompt=True) != want
    assert oracle(tok, SENT, tools=TOOLS, add_generation_prompt=True, enable_thinking=False) != want
    assert oracle(tok, SEEN, tools=TOOLS, add_generation_prompt=True) != want


def test_chat_sends_the_tools_calls_and_kwargs_to_the_template(client, tok):
    """The chat endpoint's prompt is the oracle's, and the model answers it as it answers those
    ids sent to /v1/completions (greedy, same tokens)."""
    want = oracle(tok, SEEN, tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
    out = client.chat.completions.create(
        model="base",
        messages=SENT,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=5,
        temperature=0,
        extra_body={
            "ignore_eos": True,
            "return_token_ids": True,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    assert out.model_extra["prompt_token_ids"] == want
    assert out.usage.prompt_tokens == len(want)
    same = client.completions.create(
        model="base",
        prompt=want,
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert out.choices[0].model_extra["token_ids"] == same.choices[0].model_extra["token_ids"]


def test_continue_final_message_leaves_the_last_message_open(client, server, tok):
    want = oracle(tok, PARTIAL, continue_final_message=True)
    assert oracle(tok, PARTIAL, add_generation_prompt=False) != want  # it ends the turn
    out = client.chat.completions.create(
        model="base",
        messages=PARTIAL,
        max_tokens=3,
        temperature=0,
        extra_body={
            "add_generation_prompt": False,
            "continue_final_message": True,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert out.model_extra["prompt_token_ids"] == want
    assert (
        tokenize(server, messages=PARTIAL, add_generation_prompt=False, continue_final_message=True) == want
    )


def test_tokenize_renders_chat_as_the_chat_endpoint_does(server, tok):
    got = tokenize(server, messages=SENT, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert got == oracle(tok, SEEN, tools=TOOLS, add_generation_prompt=True, enable_thinking=False)


def test_llm_chat_takes_the_same_options(tool_model, tok):
    llm = LLM(str(tool_model), num_pages=64, page_size=4, device="cpu")
    sp = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    got = llm.chat(SENT, sp, use_tqdm=False, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert got[0].prompt_token_ids == oracle(
        tok, SEEN, tools=TOOLS, add_generation_prompt=True, enable_thinking=False
    )
    cont = llm.chat(PARTIAL, sp, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    assert cont[0].prompt_token_ids == oracle(tok, PARTIAL, continue_final_message=True)


@pytest.mark.parametrize(
    "messages, extra, match",
    [
        (PARTIAL, {"continue_final_message": True}, "add_generation_prompt and continue_final_message"),
        (PARTIAL, {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs may not set tools"),
        (
            [
                SENT[0],
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "weather", "arguments": "{"}}],
                },
            ],
            {},
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        (PARTIAL, {"chat_template": "{{ messages }}"}, "chat_template is not supported"),
        (PARTIAL, {"echo": True}, "echo is not supported"),
    ],
)
def test_chat_options_that_cannot_be_honoured_answer_400_by_name(client, server, messages, extra, match):
    """A clash, a kwarg that would override a request field, a call whose arguments are not JSON,
    and vLLM chat fields loramux does not take: each a 400 that names it, and the server serves on."""
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="base", messages=messages, max_tokens=2, extra_body=extra)
    assert match in ei.value.response.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_serve_chat_template_flag_and_llm_setting_replace_the_tokenizers(tiny_models, tmp_path):
    """vLLM's `--chat-template FILE` (and `LLM(..., chat_template=...)`): the model directory's
    tokenizer has a template of its own, and the given one is what renders the chat instead."""
    path = tiny_models["llama"].path
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.chat_template != TEMPLATE
    want = tok.encode(
        tok.apply_chat_template(
            SEEN, chat_template=TEMPLATE, tools=TOOLS, add_generation_prompt=True, tokenize=False
        ),
        add_special_tokens=False,
    )
    assert want != oracle(tok, SEEN, tools=TOOLS, add_generation_prompt=True)  # the templates differ
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    args = [str(path), "--served-model-name", "base", "--num-pages", "64", "--page-size", "4"]
    server = start_server(
        [*args, "--device", "cpu", "--chat-template", str(tmp_path / "t.jinja")], tmp_path / "log"
    )
    try:
        assert tokenize(server, messages=SENT, tools=TOOLS) == want
        out = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0).chat.completions.create(
            model="base",
            messages=SENT,
            tools=TOOLS,
            tool_choice="none",
            max_tokens=2,
            extra_body={"return_token_ids": True},
        )
        assert out.model_extra["prompt_token_ids"] == want
    finally:
        server.stop()
    llm = LLM(str(path), num_pages=64, page_size=4, device="cpu", chat_template=TEMPLATE)
    sp = SamplingParams(temperature=0, max_tokens=1)
    assert llm.chat(SENT, sp, use_tqdm=False, tools=TOOLS)[0].prompt_token_ids == want
    plain = LLM(str(path), num_pages=64, page_size=4, device="cpu")  # vLLM's LLM.chat(chat_template=)
    got = plain.chat(SENT, sp, use_tqdm=False, tools=TOOLS, chat_template=TEMPLATE)
    assert got[0].prompt_token_ids == want
