"""The tool-call parsers of tool_choice "auto" (vLLM's --tool-call-parser hermes, llama3_json,
pythonic, qwen3_coder), on text alone: what each finds in the formats Qwen, Hermes, Llama 3,
Llama 3.2 / 4 and Qwen3-Coder write, what it leaves as content (a pythonic answer is read, never
run), and that a streamed answer, cut into any pieces, gives the same content and calls as the
whole answer, with no part of a call ever sent as content.

S6.1 (the answer a request gets is the model's, whole and streamed alike).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.server.tool_parsers import PARSERS, Parsed, ToolParser, parse


def _calls(p: Parsed) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in p.calls]


HERMES = [  # (answer, content, calls)
    (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris", "days": 3}}\n'
        "</tool_call>",
        "Let me look.\n",
        [("get_weather", {"city": "paris", "days": 3})],
    ),
    (  # two calls, blank text between and after them dropped
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": '
        '{"x": [1, 2]}}</tool_call>\n',
        "",
        [("a", {}), ("b", {"x": [1, 2]})],
    ),
    ("no calls here, just <b>text</b> and a < sign", "no calls here, just <b>text</b> and a < sign", []),
    (  # cut by max_tokens inside the call: what the model wrote, as content
        'ok <tool_call>{"name": "a", "arguments": {"x": 1',
        'ok <tool_call>{"name": "a", "arguments": {"x": 1',
        [],
    ),
    (  # not JSON, and JSON without a name: content; the good call still counts
        '<tool_call>not json</tool_call><tool_call>{"arguments": {}}</tool_call><tool_call>{"name": "c", '
        '"parameters": {"k": "v"}}</tool_call>',
        '<tool_call>not json</tool_call><tool_call>{"arguments": {}}</tool_call>',
        [("c", {"k": "v"})],
    ),
    (
        "<tool_call>" + "[" * 100000 + "</tool_call>",
        "<tool_call>" + "[" * 100000 + "</tool_call>",
        [],
    ),  # too deep
    (  # an unclosed last call that is whole JSON (the model stopped at EOS): a call
        'x <tool_call>{"name": "d", "arguments": {"q": "é"}}',
        "x ",
        [("d", {"q": "é"})],
    ),
    ('<tool_call>{"name": "e", "arguments": {}}</tool_call> and then words', " and then words", [("e", {})]),
]

LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "paris"}}', "", [("get_weather", {"city": "paris"})]),
    (
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"n": 2}}',
        "",
        [("a", {}), ("b", {"n": 2})],
    ),
    ("  The weather is fine.", "  The weather is fine.", []),
    ('{"city": "paris"}', '{"city": "paris"}', []),  # JSON, but no call: the text
    ('{"name": "a", "parameters": {}} trailing words', '{"name": "a", "parameters": {}} trailing words', []),
    ('{"name": "a", "parameters": {"x": 1', '{"name": "a", "parameters": {"x": 1', []),  # cut
    ('{"name": "a", "parameters": ' + "[" * 100000, '{"name": "a", "parameters": ' + "[" * 100000, []),
]


PYTHONIC = [
    (
        '[get_weather(city="paris", days=3), get_time(zone="utc")]',
        "",
        [("get_weather", {"city": "paris", "days": 3}), ("get_time", {"zone": "utc"})],
    ),
    ('[f(a=[1, {"b": None}], c=True)]', "", [("f", {"a": [1, {"b": None}], "c": True})]),
    ("The weather is fine.", "The weather is fine.", []),
    ("[f(1)]", "[f(1)]", []),  # a positional argument: no name to give it
    ('[os.system("rm")]', '[os.system("rm")]', []),  # not a plain name: text (and never run)
    ("[f(a=g())]", "[f(a=g())]", []),  # not a literal
    ("[1, 2]", "[1, 2]", []),
    ("[" * 3000, "[" * 3000, []),  # nested past the parser: text, no error
    ('[f(a="x"', '[f(a="x"', []),  # cut
]


QWEN3_CODER = [
    (
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nparis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        "Checking.\n",
        [("get_weather", {"city": "paris", "days": 3})],
    ),
    (  # typed by the schema: a string stays as written, even when it reads as a number
        "<tool_call><function=get_weather><parameter=city>1984</parameter></function></tool_call>",
        "",
        [("get_weather", {"city": "1984"})],
    ),
    (  # no schema for this function: JSON where it reads as JSON
        "<tool_call><function=f><parameter=a>[1, 2]</parameter><parameter=b>hi there</parameter>"
        "</function></tool_call>",
        "",
        [("f", {"a": [1, 2], "b": "hi there"})],
    ),
    (  # text between parameters, or no function: not this form, the text as written
        "<tool_call><function=f>x<parameter=a>1</parameter></function></tool_call>",
        "<tool_call><function=f>x<parameter=a>1</parameter></function></tool_call>",
        [],
    ),
    (
        "<tool_call><parameter=a>1</parameter></tool_call>",
        "<tool_call><parameter=a>1</parameter></tool_call>",
        [],
    ),
    (  # a value nested deeper than JSON decodes: kept as written
        "<tool_call><function=f><parameter=a>" + "[" * 100000 + "</parameter></function></tool_call>",
        "",
        [("f", {"a": "[" * 100000})],
    ),
]
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
}


@pytest.mark.parametrize("answer,content,calls", QWEN3_CODER)
def test_qwen3_coder_types_values_by_the_functions_schema(answer, content, calls):
    found = parse("qwen3_coder", answer, SCHEMAS)
    assert found.content == content and _calls(found) == calls
    stream = ToolParser("qwen3_coder", SCHEMAS).stream()
    steps = [stream.feed(ch) for ch in answer] + [stream.finish()]
    assert "".join(x.content for x in steps) == content
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for x in steps for c in x.calls
    ] == calls


@pytest.mark.parametrize(
    "parser,answer,content,calls",
    [("hermes", *c) for c in HERMES]
    + [("llama3_json", *c) for c in LLAMA3]
    + [("pythonic", *c) for c in PYTHONIC],
)
def test_each_parser_finds_the_calls_and_leaves_the_rest_as_content(parser, answer, content, calls):
    found = parse(parser, answer)
    assert found.content == content and _calls(found) == calls
    ids = [c["id"] for c in found.calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("chatcmpl-tool-") for i in ids)


def _streamed(parser: str, pieces: list[str]) -> tuple[list[str], Parsed]:
    stream = PARSERS[parser]()
    contents, calls = [], []
    for step in [*(stream.feed(p) for p in pieces), stream.finish()]:
        contents.append(step.content)
        calls += step.calls
    return contents, Parsed("".join(contents), calls)


def _cuts(text: str) -> st.SearchStrategy[list[str]]:
    return st.lists(st.integers(0, len(text)), max_size=12).map(
        lambda at: [text[a:b] for a, b in zip([0, *sorted(at)], [*sorted(at), len(text)], strict=True)]
    )


ANSWERS = (
    [("qwen3_coder", a) for a, _, _ in QWEN3_CODER]
    + [("hermes", a) for a, _, _ in HERMES]
    + [("llama3_json", a) for a, _, _ in LLAMA3]
    + [("pythonic", a) for a, _, _ in PYTHONIC]
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), which=st.integers(0, len(ANSWERS) - 1))
def test_streamed_in_any_pieces_equals_whole_and_never_sends_part_of_a_call_as_content(data, which):
    parser, answer = ANSWERS[which]
    pieces = data.draw(_cuts(answer))
    contents, total = _streamed(parser, pieces)
    whole = parse(parser, answer)
    # The pieces of content sent add up to the whole answer's content, so no text of a call that
    # parsed was ever sent as content, early or late.
    assert "".join(contents) == whole.content and _calls(total) == _calls(whole)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(st.characters(blacklist_characters="<{"), max_size=60),
    parser=st.sampled_from(sorted(PARSERS)),
)
def test_text_with_no_call_in_it_passes_through_unchanged(text, parser):
    found = parse(parser, text)
    assert found.content == text and found.calls == []
