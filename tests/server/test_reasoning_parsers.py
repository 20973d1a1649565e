"""The reasoning parsers (vLLM's --reasoning-parser deepseek_r1 / qwen3) on text alone, and the
chat stream's rendering of an answer that reasons, then calls a tool (the reasoning wrapper over
the hermes tool-call parser), fed the engine outputs of that answer cut into any pieces: the
chunks add up to the whole answer's reasoning, content and calls.

S6.1 (whole and streamed answers agree).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.engine.outputs import CompletionOutput, RequestOutput
from loramux.server.generate import _auto_tool_delta, _chat_delta, _with_reasoning
from loramux.server.protocol import ChatMessage
from loramux.server.reasoning_parsers import PARSERS, Split, reasoning_stream, split
from loramux.server.tool_parsers import ToolParser

CASES = [  # (parser, answer, reasoning, content)
    ("deepseek_r1", "<think>\nhm, rain</think>\n\nTake a coat.", "\nhm, rain", "\n\nTake a coat."),
    ("deepseek_r1", "hm, rain</think>Coat.", "hm, rain", "Coat."),  # <think> was in the prompt
    ("deepseek_r1", "still thinking when cut", "still thinking when cut", ""),
    ("deepseek_r1", "  <think>a</think>b</think>c", "a", "b</think>c"),  # the first </think> ends it
    ("qwen3", "<think>\nhm</think>\n\nCoat.", "\nhm", "\n\nCoat."),
    ("qwen3", "Coat.", "", "Coat."),  # enable_thinking false: no think block in the answer
    ("qwen3", "a</think>b", "", "a</think>b"),  # no leading <think>: content as written
    ("qwen3", "<think>cut while thinking", "cut while thinking", ""),
    ("qwen3", "<thin", "", "<thin"),
]


@pytest.mark.parametrize("parser,answer,reasoning,content", CASES)
def test_each_parser_splits_reasoning_from_content(parser, answer, reasoning, content):
    assert split(parser, answer) == Split(reasoning, content)


def _cuts(text: str) -> st.SearchStrategy[list[str]]:
    return st.lists(st.integers(0, len(text)), max_size=12).map(
        lambda at: [text[a:b] for a, b in zip([0, *sorted(at)], [*sorted(at), len(text)], strict=True)]
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), which=st.integers(0, len(CASES) - 1))
def test_streamed_in_any_pieces_equals_whole(data, which):
    parser, answer, reasoning, content = CASES[which]
    stream = reasoning_stream(parser)
    steps = [stream.feed(p) for p in data.draw(_cuts(answer))] + [stream.finish()]
    assert "".join(s.reasoning for s in steps) == reasoning
    assert "".join(s.content for s in steps) == content


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(blacklist_characters="<"), max_size=60))
def test_text_without_think_tags_is_reasoning_for_deepseek_r1_and_content_for_qwen3(text):
    assert split("deepseek_r1", text) == Split(text, "")
    assert split("qwen3", text) == Split("", text)
    assert sorted(PARSERS) == ["deepseek_r1", "qwen3"]


ANSWER = (
    '<think>weather, so call the tool</think>ok <tool_call>{"name": "get_weather", "arguments": '
    '{"city": "paris"}}</tool_call>'
)


def _outputs(pieces: list[str]) -> list[RequestOutput]:
    """The engine outputs of ANSWER cut into `pieces` (one token per piece), the last finished."""
    outs, text, ids = [], "", []
    for k, piece in enumerate(pieces):
        text, ids = text + piece, [*ids, k]
        last = k == len(pieces) - 1
        comp = CompletionOutput(
            0, text, list(ids), "stop" if last else None, delta_text=piece, delta_token_ids=[k]
        )
        outs.append(RequestOutput("r", None, [1, 2], [comp], finished=last))
    return outs


@settings(max_examples=200, deadline=None)
@given(pieces=_cuts(ANSWER).filter(lambda p: len(p) > 0))
def test_a_streamed_answer_that_reasons_then_calls_a_tool_adds_up_to_the_whole(pieces):
    render = _with_reasoning(_auto_tool_delta(ToolParser("hermes")), "deepseek_r1")
    chunks = [c for c in (render(0, out) for out in _outputs(pieces)) if c is not None]
    deltas = [c["delta"] for c in chunks]
    assert "".join(d.get("reasoning", "") for d in deltas) == "weather, so call the tool"
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == "ok "
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "get_weather", {"city": "paris"})
    ]
    assert chunks[-1]["finish_reason"] == "tool_calls"
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_plain_text_rendering_passes_reasoning_and_content_through():
    render = _with_reasoning(_chat_delta, "qwen3")
    pieces = ["<thi", "nk>a", "b</th", "ink>c", "d"]
    deltas = [c["delta"] for c in (render(0, o) for o in _outputs(pieces)) if c is not None]
    assert "".join(d.get("reasoning", "") for d in deltas) == "ab"
    assert "".join(d.get("content", "") for d in deltas) == "cd"


def test_an_assistant_messages_reasoning_reaches_the_template_as_reasoning_content():
    for key in ("reasoning", "reasoning_content"):
        m = ChatMessage.model_validate({"role": "assistant", "content": "hi", key: "hm"})
        assert m.for_template() == {"role": "assistant", "content": "hi", "reasoning_content": "hm"}
    assert (
        "reasoning_content" not in ChatMessage.model_validate({"role": "user", "content": "x"}).for_template()
    )
