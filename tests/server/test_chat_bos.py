"""Chat prompts get exactly one BOS when the chat template writes it (issue 12, point 3).

The tokenizer here adds BOS when it encodes (like Llama's and Mistral's) and its template writes
`{{ bos_token }}` too (like theirs): rendering the template to text and encoding that with special
tokens, as the server did, gave two.
"""

from __future__ import annotations

import shutil

import openai
import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from loramux import LLM, SamplingParams
from loramux.engine.chat import render_chat
from tests.server.conftest import start_server

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def bos_model(tiny_models, tmp_path_factory):
    """The tiny llama with a tokenizer that adds BOS on encode and a template that writes it."""
    path = tmp_path_factory.mktemp("bos") / "llama"
    shutil.copytree(tiny_models["llama"].path, path)
    tok = AutoTokenizer.from_pretrained(path)
    bos = tok.bos_token
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def test_render_chat_has_one_bos_where_encoding_the_text_would_give_two(bos_model):
    tok = AutoTokenizer.from_pretrained(bos_model)
    ids = render_chat(tok, MESSAGES)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tok.encode(text)[:2] == [tok.bos_token_id] * 2  # the old path: a second BOS


def test_chat_endpoint_sends_the_template_with_one_bos(bos_model, tmp_path):
    tok = AutoTokenizer.from_pretrained(bos_model)
    want_prompt = render_chat(tok, MESSAGES)
    llm = LLM(str(bos_model), num_pages=128, page_size=4, device="cpu")
    want = llm.generate(
        [want_prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False
    )
    server = start_server(
        [
            str(bos_model),
            "--served-model-name",
            "base",
            "--num-pages",
            "128",
            "--page-size",
            "4",
            "--device",
            "cpu",
        ],
        tmp_path / "server.log",
    )
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        out = client.chat.completions.create(
            model="base",
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
    finally:
        server.stop()
    assert out.usage.prompt_tokens == len(want_prompt)  # one BOS, not two
    assert out.choices[0].model_extra["token_ids"] == want[0].outputs[0].token_ids


def test_completions_add_special_tokens_false_sends_the_text_without_bos(bos_model, tmp_path):
    """Issue 16 (vLLM's request fields): a completions prompt already formatted with its BOS is
    sent with `add_special_tokens: false`; loramux ignored the field and added a second one."""
    tok = AutoTokenizer.from_pretrained(bos_model)
    text = tok.bos_token + "hello world"
    plain = tok.encode(text, add_special_tokens=False)
    assert plain.count(tok.bos_token_id) == 1 and tok.encode(text).count(tok.bos_token_id) == 2
    args = [str(bos_model), "--served-model-name", "base", "--num-pages", "64", "--page-size", "4"]
    server = start_server([*args, "--device", "cpu"], tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)

        def prompt_ids(**extra) -> list[int]:
            out = client.completions.create(
                model="base", prompt=text, max_tokens=1, extra_body={"return_token_ids": True, **extra}
            )
            return out.choices[0].model_extra["prompt_token_ids"]

        assert prompt_ids(add_special_tokens=False) == plain
        assert prompt_ids() == tok.encode(text)  # the default adds it, as vLLM's
    finally:
        server.stop()
