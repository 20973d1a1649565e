"""Semantic fuzzing of a real `loramux serve` (issue 24, points 1-4 and 8; S6.1, S6.3).

The schema fuzzer (test_fuzz.py) draws bodies that fit the OpenAPI document, and a token id is
schema-valid: it never found that `logit_bias: {"999999": 5}` stopped the engine for everyone.
The strategies here know what each field means: token ids (prompt ids, logit_bias keys,
stop_token_ids, /detokenize tokens) drawn around the vocabulary's edges (-1, 0, V-1, V, V+1, 2^31,
2^63, 2^64, 2^70), lengths around max_model_len, seeds around 64 bits, probabilities and
temperatures around their ranges (1e-300, NaN, infinity), adapter names that exist, do not, or look
like paths; across completions, chat, /tokenize and /detokenize, combined with n, streaming,
echo, logprobs, stop strings and penalties, and structured output (every form, uncompilable and
unenforced schemas, bad regexes and grammars, tools and tool_choice, "auto" parsed by the hermes
tool-call parser, answers split by the deepseek_r1 reasoning parser; issue 28), and Anthropic's
Messages API (its blocks, tools and tool_choice). Each example's answer must be a 2xx, a 4xx in
OpenAI's error shape (Anthropic's on /v1/messages), or a documented 503 (server_busy,
queue_timeout); never engine_dead, never another 5xx, never a hang. After every example the
server must still answer a plain request.

CI runs LORAMUX_SEMFUZZ_EXAMPLES (default 120, derandomized). The long mode:

    LORAMUX_SEMFUZZ_EXAMPLES=20000 LORAMUX_FUZZ_RANDOM=1 LORAMUX_SEMFUZZ_REPORT=semfuzz.json \\
        .venv/bin/python -m pytest -q -s tests/reliability/test_semantic_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import (
    FUZZ_MAX_MODEL_LEN,
    FUZZ_SERVER_FLAGS,
    assert_whole,
    plain_request_completes,
    serve_tiny,
)

EXAMPLES = int(os.environ.get("LORAMUX_SEMFUZZ_EXAMPLES", "120"))
DERANDOMIZE = os.environ.get("LORAMUX_FUZZ_RANDOM", "") != "1"
REPORT = os.environ.get("LORAMUX_SEMFUZZ_REPORT")
VOCAB = 512  # the tiny Llama's (tests/hf_factory.py)
MAX_LEN = FUZZ_MAX_MODEL_LEN
ANSWER_S = 60  # an answer slower than this is a hang
# Anthropic's shape names no code: its 503 is an overloaded_error (a dead engine would still fail
# the plain request each example is followed by).
DOCUMENTED_503 = {"server_busy", "queue_timeout", "overloaded_error"}

pytestmark = pytest.mark.timeout(max(600, EXAMPLES * 3))


@pytest.fixture(scope="module")
def server(tiny_models, folders, tmp_path_factory):
    s = serve_tiny(
        tiny_models,
        folders,
        tmp_path_factory.mktemp("semfuzz") / "server.log",
        *FUZZ_SERVER_FLAGS,
        *("--enable-auto-tool-choice", "--tool-call-parser", "hermes"),  # tool_choice "auto" is valid
        *("--reasoning-parser", "deepseek_r1"),  # chat answers are split (all reasoning, here)
    )
    yield s
    s.stop()


# --- the issue's requests, one after another ----------------------------------------------------
def _issue_requests() -> list[tuple[str, dict, int, str]]:
    """(path, body, expected status, a phrase the error message must contain)."""
    say = {"model": "a", "prompt": "say: hi\n", "max_tokens": 5}
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    out = []
    for bias in (VOCAB, VOCAB + 1, 999999, 2**64):
        out += [
            ("/v1/completions", {**say, "logit_bias": {str(bias): 5}}, 400, str(bias)),
            ("/v1/chat/completions", {**chat, "logit_bias": {str(bias): 5}}, 400, str(bias)),
            ("/v1/completions", {**say, "n": 3, "logit_bias": {str(bias): 5}}, 400, str(bias)),
            ("/v1/completions", {**say, "stream": True, "logit_bias": {str(bias): 5}}, 400, str(bias)),
        ]
    out += [
        ("/v1/completions", {**say, "logit_bias": {"-1": 5}}, 400, "logit_bias"),
        ("/v1/completions", {**say, "stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
        ("/v1/chat/completions", {**chat, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
        ("/v1/completions", {**say, "seed": 2**70, "temperature": 1}, 400, "seed"),
        ("/v1/completions", {**say, "seed": -(2**63) - 1, "temperature": 1}, 400, "seed"),
        ("/v1/completions", {**say, "n": 3, "seed": 2**63 - 1, "temperature": 1}, 400, "seed"),
        ("/v1/completions", {**say, "n": 3, "max_tokens": 8, "max_queue_time": 1e-9}, 503, "max_queue_time"),
        ("/v1/completions", {**say, "n": 3, "stream": True, "max_queue_time": 1e-9}, 200, "max_queue_time"),
    ]
    return out


def test_S6_1_the_issues_hostile_requests_are_refused_and_the_server_serves_on(server):
    """Issue 24's 22 requests and their kin: each was an outage (503 engine_dead for everyone
    after it) or a hang (n=3 with a passed queue deadline)."""
    with httpx.Client(timeout=30) as http:
        for path, body, status, phrase in _issue_requests():
            t0 = time.monotonic()
            r = http.post(server.url + path, json=body)
            assert time.monotonic() - t0 < 20, (body, "slow")
            assert r.status_code == status, (body, r.status_code, r.text[:300])
            if status != 200:
                err = r.json()["error"]
                assert phrase in err["message"], (body, err)
            else:  # the stream carries the queue timeout as its error event, then [DONE]
                events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]"
                errs = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
                assert errs and errs[0]["code"] == "queue_timeout", r.text[:300]
            plain_request_completes(server)
    assert_whole(server)


# --- strategies that know what the fields mean --------------------------------------------------
# Each field has edge values that are valid (they reach the sampler and the kernels) and values
# past the edges (they must be refused with a 4xx). Half the examples draw every field from its
# valid edges, so they run; the other half mix in values past them.
EDGE_IDS = [-(2**63) - 1, -1, 0, 1, VOCAB - 1, VOCAB, VOCAB + 1, 2**31, 2**63 - 1, 2**63, 2**64, 2**70]
good_id = st.one_of(st.sampled_from([0, 1, 2, VOCAB - 1]), st.integers(0, VOCAB - 1))
any_id = st.one_of(st.sampled_from(EDGE_IDS), st.integers(-3, VOCAB + 3), good_id)
weird_float = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 1e-300, 5e-324])


def _field(valid: st.SearchStrategy, past: st.SearchStrategy) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """(values at the field's valid edges, values past them)."""
    return valid, past


FIELDS = {
    "temperature": _field(st.sampled_from([0.0, 5e-324, 1e-300, 1e-6, 1e-5, 0.7, 1.0, 2.0]), weird_float),
    "top_p": _field(
        st.sampled_from([5e-324, 1e-9, 0.5, 1.0]), st.sampled_from([0.0, 1.0001, -0.1, math.nan])
    ),
    "min_p": _field(
        st.sampled_from([0.0, 5e-324, 0.05, 1.0]), st.sampled_from([-0.1, 1.0001, math.nan, math.inf])
    ),
    "top_k": _field(
        st.sampled_from([-1, 0, 1, 5, VOCAB - 1, VOCAB, VOCAB + 1, 2**31, 2**63 - 1, 2**70]),
        st.sampled_from([-2, -(2**70)]),
    ),
    "seed": _field(
        st.sampled_from([None, 0, -1, 2**63 - 200, -(2**63)]),
        st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 2**70]),
    ),
    "n": _field(st.sampled_from([1, 2, 3, 8]), st.sampled_from([-1, 0, 128, 129])),
    "stream": _field(st.booleans(), None),
    "stream_options": _field(
        st.sampled_from([{"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}]),
        None,
    ),
    "cache_salt": _field(st.sampled_from([None, "t1", "x" * 4096]), st.sampled_from(["", 5, ["t"]])),
    "skip_special_tokens": _field(st.booleans(), None),
    "truncate_prompt_tokens": _field(
        st.sampled_from([None, 1, 5, -1]), st.sampled_from([0, -2, 2**70, True])
    ),
    "prompt_logprobs": _field(st.sampled_from([None, 0, 1, 20]), st.sampled_from([-1, 21, 2**70, True, "1"])),
    "request_id": _field(st.sampled_from(["r", "x" * 1000, "same"]), st.sampled_from(["", 5, ["r"]])),
    "stop": _field(
        st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=3), max_size=4)),
        st.sampled_from(["", [""], "x" * 2000, ["\x00", "🙂"]]),
    ),
    "stop_token_ids": _field(st.lists(good_id, max_size=4), st.lists(any_id, min_size=1, max_size=4)),
    "include_stop_str_in_output": _field(st.booleans(), None),
    "presence_penalty": _field(
        st.sampled_from([-2.0, 0.0, 0.5, 2.0]), st.sampled_from([-2.1, 2.1, math.nan])
    ),
    "frequency_penalty": _field(st.sampled_from([-2.0, 0.0, 2.0]), st.sampled_from([-2.1, 2.1, math.inf])),
    "repetition_penalty": _field(
        st.sampled_from([1e-6, 0.01, 0.5, 1.0, 2.0]), st.sampled_from([0.0, 5e-324, 1e-300, 2.1, math.nan])
    ),
    "logit_bias": _field(
        st.dictionaries(good_id.map(str), st.sampled_from([-100.0, -1.0, 0.0, 5.0, 100.0]), max_size=4),
        st.dictionaries(
            st.one_of(any_id.map(str), st.sampled_from(["", "abc", "1.5", " 3", "0x10", "1e3", "-0", "٣"])),
            st.one_of(st.floats(-101, 101), weird_float),
            min_size=1,
            max_size=4,
        ),
    ),
    "allowed_token_ids": _field(
        st.one_of(st.none(), st.lists(good_id, min_size=1, max_size=4)),
        st.one_of(st.just([]), st.lists(any_id, min_size=1, max_size=3)),
    ),
    "bad_words": _field(
        st.lists(st.sampled_from(["a", "the", " lora", "x" * 300, "é", "\u2603 z"]), max_size=3),
        st.sampled_from([[""], [" "], [5], "word"]),
    ),
    "priority": _field(st.just(0), st.sampled_from([1, -1, 2**70, "1", 1.5, None])),  # fcfs server: 0 only
    "ignore_eos": _field(st.booleans(), None),
    "min_tokens": _field(st.sampled_from([0, 1, 3]), st.sampled_from([-1, MAX_LEN + 1, 2**70])),
    "max_queue_time": _field(
        st.sampled_from([None, 1e-9, 0.5, 1e308, math.inf]), st.sampled_from([0.0, -1.0, math.nan, -math.inf])
    ),
    "return_token_ids": _field(st.booleans(), None),
    "max_tokens": _field(
        st.one_of(st.integers(1, 16), st.sampled_from([MAX_LEN - 24])),
        st.sampled_from([-1, 0, MAX_LEN, MAX_LEN + 1, 2**31, 2**63, 2**70]),
    ),
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
FIELDS["structured_outputs"] = _field(  # issue 28: every form, and forms a grammar engine refuses
    st.sampled_from(
        [{"json": SCHEMA}, {"regex": "[a-c]{1,3}"}, {"choice": ["x", "yy"]}, {"json_object": True},
         {"grammar": 'root ::= "a" | "b"'}, {"json": {"type": "string", "maxLength": 10**6}}]
    ),
    st.sampled_from(
        [{"regex": "(("}, {"choice": []}, {"grammar": "root ::="}, {"json": {"type": "nope"}},
         {"json": {"not": {"type": "string"}}}, {"json": SCHEMA, "regex": "a"}, {"json": 5},
         {"regex": "[a-z]{1,100000}"}, {}]
    ),
)  # fmt: skip
FIELDS["response_format"] = _field(
    st.sampled_from(
        [{"type": "text"}, {"type": "json_object"},
         {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}]
    ),
    st.sampled_from(
        [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "s"}},
         {"type": "json_schema", "json_schema": {"name": "s", "schema": []}}, "json"]
    ),
)  # fmt: skip
FIELDS["guided_regex"] = _field(st.just("[0-9]{1,4}"), st.sampled_from(["[", "(?<=a)b"]))
COMPLETION_ONLY = {
    "echo": _field(st.booleans(), None),
    "add_special_tokens": _field(st.booleans(), None),
    "logprobs": _field(st.sampled_from([None, 0, 1, 5, 20]), st.sampled_from([21, -1, VOCAB, VOCAB + 1])),
    "prompt": _field(
        st.one_of(
            st.text(min_size=1, max_size=40),
            st.lists(good_id, min_size=1, max_size=12),
            st.lists(st.lists(good_id, min_size=1, max_size=4), min_size=1, max_size=3),
        ),
        st.one_of(
            st.lists(any_id, min_size=0, max_size=12),
            st.lists(st.lists(any_id, max_size=4), min_size=1, max_size=3),
            st.just("w " * (MAX_LEN + 5)),
            st.just(""),
        ),
    ),
}
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}
)
CHAT_ONLY = {
    "messages": _field(
        st.lists(message, min_size=1, max_size=3),
        st.one_of(
            st.just([]),
            st.just([{"role": "root", "content": "x"}]),
            st.just([{"role": "user", "content": 5}]),
            st.just([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]),
            st.just([{"role": "assistant", "tool_calls": [{"type": "function"}]}]),
            st.just([{"role": "tool", "content": "x", "tool_call_id": "c", "tool_calls": [{}]}]),
        ),
    ),
    "max_completion_tokens": FIELDS["max_tokens"],
    "logprobs": _field(st.booleans(), None),
    "top_logprobs": _field(st.sampled_from([None, 0, 5, 20]), st.sampled_from([21, -1])),
    "continue_final_message": _field(st.booleans(), None),
    "chat_template_kwargs": _field(
        st.sampled_from([None, {"enable_thinking": False}]),
        st.sampled_from([{"tools": 1}, {"messages": []}, {"tokenize": True}, {"return_dict": True}]),
    ),
    "tools": _field(
        st.just([{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}]),
        st.sampled_from(
            [[], [{"type": "function"}], [{"type": "function", "function": {"name": "f", "parameters": 3}}]]
        ),
    ),
    "tool_choice": _field(
        st.sampled_from(["required", "none", "auto", {"type": "function", "function": {"name": "f"}}]),
        st.sampled_from(["sometimes", {"type": "function", "function": {"name": "g"}}]),
    ),
}
# The Responses API: the shared sampling fields (vLLM's extras ride along) but those it has no
# place for (n, max_tokens, ...: refused by name, so never drawn as valid), and its own.
RESPONSES = {
    **{k: v for k, v in FIELDS.items() if k not in ("n", "max_tokens", "stream_options", "prompt_logprobs")},
    "input": _field(
        st.one_of(st.text(max_size=20), st.lists(message, min_size=1, max_size=3)),
        st.sampled_from(
            [
                [],
                5,
                [{"type": "input_image"}],
                [{"type": "function_call", "call_id": 5}],
                [{"role": "user", "content": [{"type": "input_text"}]}],
                [{"role": "tool", "content": "x"}],
            ]
        ),
    ),
    "instructions": _field(st.sampled_from([None, "be brief", "x" * 2000]), st.just(5)),
    "max_output_tokens": FIELDS["max_tokens"],
    "include": _field(
        st.sampled_from([None, ["message.output_text.logprobs"]]), st.just(["file_search_call"])
    ),
    "top_logprobs": CHAT_ONLY["top_logprobs"],
    "previous_response_id": _field(st.none(), st.sampled_from(["resp_nope", "", 5])),
    "store": _field(st.booleans(), None),
    "background": _field(st.booleans(), st.just("yes")),
    "text": _field(
        st.sampled_from(
            [
                None,
                {"format": {"type": "json_object"}},
                {"format": {"type": "json_schema", "name": "p", "schema": SCHEMA}},
            ]
        ),
        st.sampled_from([{"format": {"type": "xml"}}, {"fmt": 1}, {"format": {"type": "json_schema"}}]),
    ),
    "tools": _field(
        st.just([{"type": "function", "name": "f", "parameters": SCHEMA}]),
        st.sampled_from([[{"type": "web_search"}], [{"type": "function"}], [{"name": "f", "parameters": 3}]]),
    ),
    "tool_choice": _field(
        st.sampled_from(["required", "none", "auto", {"type": "function", "name": "f"}]),
        st.sampled_from(["sometimes", {"type": "function", "name": "g"}]),
    ),
}
# Anthropic's Messages API: vLLM's sampling extras ride along (its own max_tokens is required).
_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
    st.fixed_dictionaries(
        {"type": st.just("tool_result"), "tool_use_id": st.just("t1"), "content": st.text(max_size=8)}
    ),
    st.fixed_dictionaries(
        {"type": st.just("tool_use"), "id": st.just("t1"), "name": st.just("f"), "input": st.just({"x": 1})}
    ),
    st.fixed_dictionaries(
        {"type": st.just("thinking"), "thinking": st.text(max_size=8), "signature": st.just("")}
    ),
)
anthropic_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant"]),
        "content": st.one_of(st.text(max_size=20), st.lists(_block, max_size=3)),
    }
)
MESSAGES = {
    **{k: v for k, v in FIELDS.items() if k not in ("n", "max_tokens", "stream_options", "prompt_logprobs")},
    "messages": _field(
        st.lists(anthropic_message, min_size=1, max_size=3),
        st.sampled_from(
            [
                [],
                5,
                [{"role": "system", "content": "x"}],
                [{"role": "user", "content": [{"type": "image", "source": {}}]}],
                [{"role": "user", "content": [{"type": "tool_result"}]}],
                [{"role": "assistant", "content": [{"type": "tool_use", "input": 3}]}],
            ]
        ),
    ),
    "max_tokens": FIELDS["max_tokens"],
    "system": _field(
        st.sampled_from([None, "be brief", [{"type": "text", "text": "x"}]]), st.sampled_from([5, [{}]])
    ),
    "stop_sequences": _field(st.sampled_from([None, [], ["e"]]), st.just("e")),
    "tools": _field(
        st.just([{"name": "f", "input_schema": SCHEMA}]),
        st.sampled_from([[{"type": "web_search_20250305", "name": "w"}], [{"name": 3}], "f"]),
    ),
    "tool_choice": _field(
        st.sampled_from([{"type": "any"}, {"type": "none"}, {"type": "auto"}, {"type": "tool", "name": "f"}]),
        st.sampled_from([{"type": "tool"}, {"type": "sometimes"}, "auto"]),
    ),
    "thinking": _field(
        st.sampled_from([None, {"type": "disabled"}]), st.just({"type": "enabled", "budget_tokens": 9})
    ),
}
MODELS = _field(
    st.sampled_from(["base", "a", "b"]),
    # and names of the allowed folder's: an adapter loaded on first use, a symlink out of it
    st.sampled_from(["nope", "", "../a", "a/b", "A", " a", "r1_qv", "escape", "x" * 300]),
)
REQUIRED = {"prompt", "messages", "input"}


def _consistent(body: dict) -> dict:
    """A valid body keeps the fields that only go with another one only where that one is set
    (OpenAI and vLLM refuse stream_options without stream, and top_logprobs without logprobs)."""
    if not body.get("stream"):
        body.pop("stream_options", None)
    if body.get("logprobs") is not True and "message.output_text.logprobs" not in (body.get("include") or ()):
        body.pop("top_logprobs", None)
    if body.get("continue_final_message"):
        body["add_generation_prompt"] = False  # the two exclude each other
    return body


def _body(
    path: str, fields: dict, hostile: bool, needed: frozenset[str] = frozenset()
) -> st.SearchStrategy[tuple[str, dict]]:
    """Every field at its valid edges; `hostile`: then one or two fields pushed past them, so the
    value reaches whatever checks (or fails to check) it, not a refusal of another field. The
    fields in REQUIRED and `needed` are always there in a valid body."""
    required = {k: v[0] for k, v in fields.items() if k in REQUIRED | needed}
    optional = {k: v[0] for k, v in fields.items() if k not in REQUIRED | needed}
    valid = st.builds(
        lambda m, body: _consistent({"model": m, **body}),
        MODELS[0],
        st.fixed_dictionaries(required, optional=optional),
    )
    if not hostile:
        return valid.map(lambda b: (path, b))
    pasts = [
        st.tuples(st.just(k), past)
        for k, (_, past) in {**fields, "model": MODELS}.items()
        if past is not None
    ]
    overrides = st.lists(st.one_of(pasts), min_size=1, max_size=2).map(dict)
    return st.builds(lambda b, o: (path, {**b, **o}), valid, overrides)


def _requests(hostile: bool) -> st.SearchStrategy[tuple[str, dict]]:
    ids = any_id if hostile else good_id
    return st.one_of(
        _body("/v1/completions", {**FIELDS, **COMPLETION_ONLY}, hostile),
        _body("/v1/completions", {**FIELDS, **COMPLETION_ONLY}, hostile),
        _body("/v1/chat/completions", {**FIELDS, **CHAT_ONLY}, hostile),
        _body("/v1/responses", RESPONSES, hostile),
        _body("/v1/messages", MESSAGES, hostile, frozenset({"max_tokens"})),
        st.builds(lambda t: ("/detokenize", {"tokens": t}), st.lists(ids, max_size=8)),
        st.builds(lambda p: ("/tokenize", {"prompt": p}), st.text(max_size=30)),
        st.builds(
            lambda n, p: ("/v1/load_lora_adapter", {"lora_name": n, "lora_path": p}),
            st.sampled_from(["a", "zz", "", "..", "x/y", "é"]),
            st.text(max_size=20),
        ),
    )


request = st.one_of(_requests(hostile=False), _requests(hostile=True))


class _Tally:
    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.bad: list[str] = []
        self.examples = 0
        self.slowest = 0.0


def _check(http: httpx.Client, server, path: str, body: dict, tally: _Tally) -> None:
    """Send one example and judge its answer; then a plain request must still work."""
    t0 = time.monotonic()
    content = json.dumps(body, allow_nan=True)  # NaN and Infinity are what a hostile client sends
    try:
        with http.stream(
            "POST", server.url + path, content=content, headers={"content-type": "application/json"}
        ) as r:
            raw = r.read()
    except httpx.TimeoutException:
        tally.bad.append(f"hang: {path} {content[:300]}")
        return
    took = time.monotonic() - t0
    tally.slowest = max(tally.slowest, took)
    tally.examples += 1
    code = r.status_code
    if code >= 400:
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), raw
        if path == "/v1/messages":  # Anthropic's shape: its error type stands for the code
            err = {**err, "code": err["type"]}
        tally.status[f"{code} {err.get('code') or ''}".strip()] += 1
        if code >= 500 and not (code == 503 and err.get("code") in DOCUMENTED_503):
            tally.bad.append(f"{code} {err}: {path} {content[:300]}")
    else:
        tally.status[str(code)] += 1
        if "text/event-stream" in r.headers.get("content-type", ""):
            for line in raw.decode().splitlines():
                err = _stream_error(line)
                if err is not None:
                    tally.status[f"stream error {err.get('code')}"] += 1
                    if err.get("code") not in DOCUMENTED_503:
                        tally.bad.append(f"stream {err}: {path} {content[:300]}")
    try:
        plain_request_completes(server)
    except (AssertionError, httpx.HTTPError) as e:
        tally.bad.append(f"server stopped serving after {path} {content[:300]}: {e}")


def _stream_error(line: str) -> dict | None:
    """The error a server-sent event carries: a chunk's `error`, a Responses API
    response.failed event's, or an Anthropic `error` event's (its type as the code)."""
    if not line.startswith("data: {"):
        return None
    event = json.loads(line[6:])
    if event.get("type") == "response.failed":
        return event["response"]["error"]
    if event.get("type") == "error" and isinstance(event.get("error"), dict):
        return {**event["error"], "code": event["error"].get("type")}
    return event.get("error") if "type" not in event else None


def test_S6_1_semantic_fuzzing_never_stops_the_server_nor_hangs_it(server):
    tally = _Tally()
    t0 = time.monotonic()
    with httpx.Client(timeout=ANSWER_S) as http:

        @given(req=request)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=DERANDOMIZE,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(req: tuple[str, dict]) -> None:
            path, body = req
            _check(http, server, path, body, tally)
            assert not tally.bad, tally.bad[:3]  # stop at the first: hypothesis shrinks it

        run()
    health = httpx.get(server.url + "/health", timeout=10)
    report = {
        "examples": tally.examples,
        "seconds": round(time.monotonic() - t0, 1),
        "slowest_answer_s": round(tally.slowest, 2),
        "answers": dict(sorted(tally.status.items())),
        "engine_deaths": 0 if health.status_code == 200 else 1,
        "bad": tally.bad[:20],
    }
    print(json.dumps(report, indent=1))
    if REPORT:
        Path(REPORT).write_text(json.dumps(report, indent=1))
    assert health.status_code == 200, health.text
    assert tally.examples >= min(EXAMPLES, 50)
    assert sum(v for k, v in tally.status.items() if k.startswith("4")) > 0  # it did probe the limits
    assert sum(v for k, v in tally.status.items() if k == "200") > 0  # and valid requests ran
    assert_whole(server)
