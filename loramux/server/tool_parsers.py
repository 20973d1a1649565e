"""Tool calls found in free text: vLLM's `--enable-auto-tool-choice --tool-call-parser NAME`, for
chat requests with tools and tool_choice "auto" (the default when tools are sent).

Boundary: model text in (whole, or as deltas), OpenAI tool calls and the text that is not a call
out; no request, no engine. A parser reads the format a model family was trained to write:
- "hermes" (Qwen2.5, Qwen3, Hermes 2 Pro and 3): `<tool_call>{"name": ..., "arguments": {...}}
  </tool_call>`, any number of them, text around them being content;
- "llama3_json" (Llama 3.1, 3.2, 3.3): the answer is one or more `{"name": ..., "parameters":
  {...}}` objects, separated by ";", optionally after `<|python_tag|>`; anything else is content;
- "pythonic" (Llama 3.2, Llama 4): the answer is a Python list of calls, `[f(a=1, b="x")]`, whose
  keyword arguments are literals (read with `ast`, never run); anything else is content;
- "qwen3_coder" (Qwen3-Coder): Hermes' tags around `<function=NAME><parameter=KEY>value
  </parameter></function>`, values typed by the function's schema.
A call that does not parse (cut by max_tokens, not JSON, no name) is left as content, as vLLM
does: the client sees what the model wrote. The whole-text answer is the streamed one put
together (both run the same `ToolCallStream`), so a client never sees the two disagree.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from loramux.server.text_stream import PieceStream


def call(name: str, arguments: str) -> dict[str, Any]:
    """One OpenAI tool call."""
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _loads(text: str) -> Any:
    """JSON text's value; None if it is not JSON, or nested deeper than the decoder goes."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _as_call(obj: Any, args_keys: tuple[str, ...]) -> dict[str, Any] | None:
    """A call from one JSON value (None: not a call: no name, or arguments that are no object)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if not isinstance(args, dict):
        return None
    return call(obj["name"], json.dumps(args, ensure_ascii=False))


@dataclass
class Parsed:
    """One answer (or one delta of it): its content (text outside calls) and its calls."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __add__(self, later: Parsed) -> Parsed:
        return Parsed(self.content + later.content, self.calls + later.calls)


class ToolCallStream(PieceStream[Parsed]):
    """Each step gives the content that can be sent now and the calls completed so far. Text
    that may be the start of a call is held back until it is known."""

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.schemas = schemas or {}  # the request's functions: {name: argument schema}
        self.called = False  # a call was given out (the answer's finish reason is tool_calls)


class HermesStream(ToolCallStream):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(schemas)
        self.in_call = False

    def _step(self, final: bool) -> Parsed:
        out = Parsed()
        while True:
            if not self.in_call:
                at = self.held.find(self.OPEN)
                if at < 0:
                    out.content += self._content(self.take(final, self.OPEN), final)
                    return out
                out.content += self._content(self.held[:at], True)
                self.held, self.in_call = self.held[at:], True
            end = self.held.find(self.CLOSE)
            if end < 0 and not final:
                return out
            body = self.held[len(self.OPEN) : end if end >= 0 else len(self.held)]
            whole = self.held[: end + len(self.CLOSE)] if end >= 0 else self.held
            found = self._call(body)
            if found is not None:
                out.calls.append(found)
                self.called = True
            else:
                out.content += whole  # not a call: the text as the model wrote it
            self.held, self.in_call = self.held[len(whole) :], False
            if not self.held and final:
                return out

    def _call(self, body: str) -> dict[str, Any] | None:
        """The call between the tags (None: not one)."""
        return _as_call(_loads(body.strip()), ("arguments", "parameters"))

    def _content(self, text: str, settled: bool) -> str:
        """Content outside calls; after a call, blank text is dropped (it only separates calls),
        and held while it may be followed by more calls."""
        if not self.called:
            return text
        if not text.strip():
            if not settled:
                self.held = text + self.held
            return ""
        return text


class Qwen3CoderStream(HermesStream):
    """Qwen3-Coder's form: `<tool_call><function=NAME><parameter=KEY>value</parameter>...
    </function></tool_call>`. A value is typed by the function's schema where it names a type
    (a "string" stays as written, even `3`), else read as JSON where it is JSON."""

    FUNCTION = re.compile(r"\s*<function=([^>\s]+)>(.*)</function>\s*", re.DOTALL)
    PARAMETER = re.compile(r"\s*<parameter=([^>]+)>(.*?)</parameter>\s*", re.DOTALL)

    def _call(self, body: str) -> dict[str, Any] | None:
        m = self.FUNCTION.fullmatch(body)
        if m is None:
            return None
        name, inner = m.groups()
        props = (self.schemas.get(name) or {}).get("properties") or {}
        args: dict[str, Any] = {}
        at = 0
        for p in self.PARAMETER.finditer(inner):
            if p.start() != at:  # text between parameters: not this form
                return None
            key, raw = p.group(1).strip(), p.group(2).removeprefix("\n").removesuffix("\n")
            args[key] = _typed(raw, (props.get(key) or {}).get("type"))
            at = p.end()
        if inner[at:].strip():
            return None
        return call(name, json.dumps(args, ensure_ascii=False))


def _typed(raw: str, kind: Any) -> Any:
    """A Qwen3-Coder parameter's value: as written for a string, else JSON where it reads as JSON."""
    if kind == "string":
        return raw
    value = _loads(raw)
    return raw if value is None and raw.strip() != "null" else value


class WholeAnswerStream(ToolCallStream):
    """Formats where the answer is either calls and nothing else, or text: which is known from
    its first characters (`OPENINGS`); calls are held to the end and parsed whole."""

    OPENINGS: tuple[str, ...] = ()
    TAG = ""  # a marker that may come first (dropped)

    def __init__(self, schemas: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(schemas)
        self.mode: str | None = None  # "calls" or "text", once known

    def _step(self, final: bool) -> Parsed:
        if self.mode is None:
            start = self.held.lstrip()
            if not final and (not start or (self.TAG and self.TAG.startswith(start))):
                return Parsed()  # blank so far, or maybe the tag: not known yet
            openings = self.OPENINGS + ((self.TAG,) if self.TAG else ())
            self.mode = "calls" if start.startswith(openings) else "text"
        if self.mode == "text":
            text, self.held = self.held, ""
            return Parsed(content=text)
        if not final:
            return Parsed()
        calls = self._calls(self.held.strip().removeprefix(self.TAG).strip())  # "" removes nothing
        text, self.held = self.held, ""
        if calls is None:
            return Parsed(content=text)
        self.called = True
        return Parsed(calls=calls)

    @staticmethod
    def _calls(text: str) -> list[dict[str, Any]] | None:
        raise NotImplementedError


class Llama3JsonStream(WholeAnswerStream):
    OPENINGS, TAG = ("{",), "<|python_tag|>"

    @staticmethod
    def _calls(text: str) -> list[dict[str, Any]] | None:
        """The calls of `{...}; {...}`, or None if any part is not one."""
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(text):
            try:
                obj, end = decoder.raw_decode(text, i)
            except (json.JSONDecodeError, RecursionError):
                return None
            found = _as_call(obj, ("parameters", "arguments"))
            if found is None:
                return None
            calls.append(found)
            i = end
            while i < len(text) and text[i] in " \t\r\n;":
                i += 1
        return calls or None


class PythonicStream(WholeAnswerStream):
    """Llama 3.2's and Llama 4's form: `[get_weather(city="paris", days=3), ...]`, a Python list
    of calls with literal keyword arguments (read with `ast`, never run)."""

    OPENINGS = ("[",)

    @staticmethod
    def _calls(text: str) -> list[dict[str, Any]] | None:
        try:
            tree = ast.parse(text, mode="eval")
            if not isinstance(tree.body, ast.List):
                return None
            calls = []
            for node in tree.body.elts:
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                    return None
                if any(kw.arg is None for kw in node.keywords):  # **kwargs
                    return None
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
                calls.append(call(node.func.id, json.dumps(args, ensure_ascii=False)))
        except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
            return None  # not Python, not literals, or nested past the parser
        return calls or None


PARSERS: dict[str, type[ToolCallStream]] = {
    "hermes": HermesStream,
    "llama3_json": Llama3JsonStream,
    "pythonic": PythonicStream,
    "qwen3_coder": Qwen3CoderStream,
}


@dataclass(frozen=True)
class ToolParser:
    """A request's parser: the server's format, and the request's functions (their schemas)."""

    name: str
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stream(self) -> ToolCallStream:
        return PARSERS[self.name](self.schemas)

    def parse(self, text: str) -> Parsed:
        """A whole answer's content and calls: what its stream gives, put together."""
        return self.stream().step(text, final=True)


def parse(parser: str, text: str, schemas: dict[str, dict[str, Any]] | None = None) -> Parsed:
    return ToolParser(parser, schemas or {}).parse(text)
