"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens (vLLM serves the
same), so clients built on Anthropic's SDK (agents, Claude Code's ANTHROPIC_BASE_URL) reach
every adapter as they reach Claude.

Boundary: a `MessagesRequest` in, made a chat request (`chat_body`) that `Generate` starts on the
engine; a Message out, whole or as Anthropic's server-sent events (message_start,
content_block_start / _delta / _stop, message_delta, message_stop). Tools map to chat's: `auto`
is tool_choice "auto" (the server's --tool-call-parser finds the calls), `any` is "required" and
`tool` a named function (both constrained to the schemas), `none` is "none". `thinking` turns the
template's `enable_thinking` on or off (its budget is not enforced), and a reasoning parser's
reasoning comes back as a `thinking` block. Errors have Anthropic's shape (errors.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field

from loramux.engine.llm_engine import EngineDeadError
from loramux.engine.outputs import RequestOutput
from loramux.server.errors import anthropic_type, raise_if_ended_badly, to_api_error, validated
from loramux.server.generate import ClientGone, Generate, Streams, merge, tool_mode
from loramux.server.protocol import APIError, ChatCompletionRequest, _Request
from loramux.server.reasoning_parsers import reasoning_stream, split
from loramux.server.structured import tool_calls
from loramux.server.tool_parsers import PARSERS, parse

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "abort": "end_turn"}


class MessagesRequest(_Request):
    """Anthropic's body; vLLM's sampling extras (seed, min_p, ...) ride along to the chat request."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    service_tier: str | None = None


class CountTokensRequest(_Request):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


def _refuse(param: str, message: str) -> None:
    raise APIError(400, message, param=param)


def _text(content: Any, where: str) -> str:
    """Text content: a string, or text blocks."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _refuse(where, f"{where} is a string or a list of content blocks")
    texts = []
    for block in content:
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            _refuse(
                where,
                f"{where} holds a {kind!r} block here; loramux takes text blocks (no images or documents)",
            )
        texts.append(block["text"])
    return "".join(texts)


def chat_messages(body: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    """The chat messages the Anthropic ones amount to: the system prompt first; a user turn's
    tool_result blocks as tool messages (before its text); an assistant turn's tool_use blocks as
    tool_calls and its thinking as reasoning."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}]"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            _refuse(
                f"{where}.role",
                f"{where}.role is {role!r}; messages are 'user' or 'assistant' (system goes in system)",
            )
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            _refuse(f"{where}.content", f"{where}.content is a string or a list of content blocks")
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        thinking: list[str] = []
        for j, b in enumerate(blocks):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            elif kind == "tool_result" and role == "user" and isinstance(b.get("tool_use_id"), str):
                result = _text(b.get("content", ""), f"{where}.content[{j}].content")
                out.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": result})
            elif kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
                arguments = json.dumps(b.get("input") or {})
                calls.append(
                    {
                        "id": b.get("id"),
                        "type": "function",
                        "function": {"name": b["name"], "arguments": arguments},
                    }
                )
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                thinking.append(b.get("thinking") or "")
            else:
                _refuse(
                    f"{where}.content[{j}]",
                    f"{where}.content[{j}] is a {kind!r} block loramux does not take in a {role} turn; send "
                    "text, tool_use (assistant) or tool_result (user) blocks",
                )
        if text or calls or thinking or not blocks:
            msg: dict[str, Any] = {"role": role, "content": "".join(text)}
            if calls:
                msg["tool_calls"] = calls
            if thinking:
                msg["reasoning"] = "".join(thinking)
            out.append(msg)
    return out


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("name"), str)
            or t.get("type") not in (None, "custom")
        ):
            _refuse(
                f"tools[{i}]",
                f"tools[{i}] is not a client tool ({{'name', 'description', 'input_schema'}}); server tools "
                "(web search, code execution, ...) are not served by loramux",
            )
        fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool]:
    """(chat's tool_choice, parallel_tool_calls) of Anthropic's tool_choice."""
    if choice is None:
        return None, True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    _refuse(
        "tool_choice", 'tool_choice is {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}'
    )
    raise AssertionError  # unreachable


def chat_body(body: MessagesRequest) -> dict[str, Any]:
    """The chat completions body `body` amounts to."""
    thinking = (body.thinking or {}).get("type")
    if thinking not in (None, "enabled", "adaptive", "disabled"):
        _refuse("thinking", f"thinking type {thinking!r}: send 'enabled', 'adaptive' or 'disabled'")
    if body.max_tokens < 1:
        _refuse("max_tokens", f"max_tokens={body.max_tokens}; send 1 or more")
    extra = body.model_extra or {}
    for name in ("n", "best_of", "logprobs", "top_logprobs", "prompt_logprobs"):
        if extra.get(name) not in (None, False, 1, 0):
            _refuse(name, f"{name} has no place in a Message (one answer, no logprobs); leave it out")
    messages = chat_messages(body)
    prefill = messages[-1]["role"] == "assistant"  # the answer continues the last assistant turn
    choice, parallel = _tool_choice(body.tool_choice)
    chat: dict[str, Any] = {k: v for k, v in extra.items() if k not in ("container", "mcp_servers")}
    if thinking is not None:  # the switch Qwen3's template reads; its budget is not enforced
        kwargs = chat.get("chat_template_kwargs") or {}
        chat["chat_template_kwargs"] = {"enable_thinking": thinking != "disabled", **kwargs}
    chat.update(
        model=body.model,
        messages=messages,
        max_tokens=body.max_tokens,
        stream=body.stream,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        parallel_tool_calls=parallel,
    )
    for key, value in (
        ("stop", body.stop_sequences),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("top_k", body.top_k),
        ("tools", _tools(body.tools)),
        ("tool_choice", choice if body.tools else None),
        ("user", (body.metadata or {}).get("user_id")),
    ):
        if value is not None:
            chat[key] = value
    return chat


class Messages:
    def __init__(self, gen: Generate) -> None:
        self.gen = gen

    async def create(self, body: MessagesRequest, request: Request) -> Response:
        chat = validated(ChatCompletionRequest, chat_body(body))
        _, prompt, streams = await self.gen.start_chat(chat, request, kind="msg")
        answer = _Answer(self.gen, chat, len(prompt))
        if body.stream:
            return StreamingResponse(answer.events(streams), media_type="text/event-stream")
        try:
            outs = await self.gen.unless_gone(request, self.gen.final(streams, answer.model), answer.model, 1)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(answer.whole(outs[0]))

    async def count_tokens(self, body: CountTokensRequest) -> dict[str, int]:
        """The prompt's length in tokens, as the chat template renders it."""
        chat = validated(
            ChatCompletionRequest,
            {
                "model": body.model,
                "messages": chat_messages(body),
                **({"tools": _tools(body.tools)} if body.tools else {}),
            },
        )
        return {"input_tokens": len(self.gen.chat_prompt(chat))}


class _Answer:
    """One Message as it is made: whole, or as Anthropic's events."""

    def __init__(self, gen: Generate, chat: ChatCompletionRequest, prompt_len: int) -> None:
        self.gen, self.chat, self.prompt_len = gen, chat, prompt_len
        self.model = chat.model or ""
        self.id = f"msg_{uuid.uuid4().hex}"
        self.parser = gen.auto_parser(chat)
        self.thinking = gen.reasoning_parser(chat)

    def _message(self, content: list[dict[str, Any]], stop: str | None, out_tokens: int) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_len, "output_tokens": out_tokens},
        }

    def _stop(self, out: RequestOutput, called: bool) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) of a finished answer."""
        comp = out.outputs[0]
        if comp.finish_reason == "length":
            return "max_tokens", None
        if called:
            return "tool_use", None
        if isinstance(comp.stop_reason, str) and comp.stop_reason in (self.chat.stop or []):
            return "stop_sequence", comp.stop_reason
        return STOP_REASONS.get(comp.finish_reason or "stop", "end_turn"), None

    def blocks(self, text: str) -> tuple[list[dict[str, Any]], bool]:
        """The content blocks of a whole answer's text, and whether it called a tool."""
        out: list[dict[str, Any]] = []
        if self.thinking is not None:
            parts = split(self.thinking, text)
            text = parts.content
            if parts.reasoning:
                out.append({"type": "thinking", "thinking": parts.reasoning, "signature": ""})
        calls = tool_calls(self.chat, text) if tool_mode(self.chat) else None
        if self.parser is not None and (found := parse(self.parser, text)).calls:
            text, calls = found.content, found.calls
        if text or (calls is None and not out):
            out.append({"type": "text", "text": text})
        for c in calls or []:
            out.append(_tool_use(c))
        return out, bool(calls)

    def whole(self, out: RequestOutput) -> dict[str, Any]:
        comp = out.outputs[0]
        content, called = self.blocks(comp.text)
        stop, sequence = self._stop(out, called)
        message = self._message(content, stop, len(comp.token_ids))
        message["stop_sequence"] = sequence
        return message

    async def events(self, streams: Streams) -> AsyncIterator[str]:
        """Anthropic's events: text and thinking stream as they come (held back only where a tool
        call may begin); each tool call is one tool_use block, its input in one delta, once its
        text is complete (a constrained call: when the answer is done)."""
        yield _sse("message_start", message=self._message([], None, 0))
        blocks, pieces = _Blocks(), _Pieces(self.thinking, self.parser)
        constrained, whole, called = tool_mode(self.chat), "", False
        finals: list[RequestOutput] = []
        try:
            async with self.gen.closing(streams, finals, self.model):
                async for _, out in merge(streams):
                    raise_if_ended_badly(out, self.model)
                    delta = out.outputs[0].delta_text
                    if constrained:  # its calls are parsed from the whole answer
                        whole += delta
                    else:
                        reasoning, text, calls = pieces.step(delta, out.finished)
                        for e in blocks.add("thinking", reasoning) + blocks.add("text", text):
                            yield e
                        for c in calls:
                            called = True
                            for e in blocks.whole(_tool_use(c)):
                                yield e
                    if out.finished:
                        finals.append(out)
                        self.gen.metrics.finished(self.model, out)
        except (APIError, EngineDeadError) as e:
            err = to_api_error(e, self.model)
            yield _sse("error", error={"type": anthropic_type(err.status), "message": err.message})
            return
        out = finals[0]
        if constrained:
            content, called = self.blocks(whole)
            for block in content:
                for e in blocks.whole(block):
                    yield e
        for e in blocks.close():
            yield e
        stop, sequence = self._stop(out, called)
        usage = {"output_tokens": len(out.outputs[0].token_ids)}
        yield _sse("message_delta", delta={"stop_reason": stop, "stop_sequence": sequence}, usage=usage)
        yield _sse("message_stop")


class _Pieces:
    """A streamed answer's deltas split as they come: (reasoning, text, tool calls) of each."""

    def __init__(self, thinking: str | None, parser: str | None) -> None:
        self.thinking = reasoning_stream(thinking) if thinking is not None else None
        self.tools = PARSERS[parser]() if parser is not None else None

    def step(self, delta: str, final: bool) -> tuple[str, str, list[dict[str, Any]]]:
        reasoning, text, calls = "", delta, []
        if self.thinking is not None:
            parts = [self.thinking.feed(text), *([self.thinking.finish()] if final else [])]
            reasoning, text = "".join(p.reasoning for p in parts), "".join(p.content for p in parts)
        if self.tools is not None:
            steps = [self.tools.feed(text), *([self.tools.finish()] if final else [])]
            text, calls = "".join(s.content for s in steps), [c for s in steps for c in s.calls]
        return reasoning, text, calls


class _Blocks:
    """The open content block of a stream: text and thinking grow by deltas; a new kind closes it."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None

    def add(self, kind: Literal["text", "thinking"], text: str) -> list[str]:
        if not text:
            return []
        events = []
        if self.open != kind:
            events += self.close()
            self.index += 1
            self.open = kind
            start = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            events.append(_sse("content_block_start", index=self.index, content_block=start))
        delta = (
            {"type": "text_delta", "text": text}
            if kind == "text"
            else {"type": "thinking_delta", "thinking": text}
        )
        events.append(_sse("content_block_delta", index=self.index, delta=delta))
        return events

    def whole(self, block: dict[str, Any]) -> list[str]:
        """A block that is done before its first event: start, its content in one delta, stop."""
        if block["type"] in ("text", "thinking"):
            return self.add(block["type"], block[block["type"]])
        events = self.close()
        self.index += 1
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events += [
            _sse("content_block_start", index=self.index, content_block=start),
            _sse("content_block_delta", index=self.index, delta=delta),
            _sse("content_block_stop", index=self.index),
        ]
        return events

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_sse("content_block_stop", index=self.index)]


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as Anthropic's tool_use block (its arguments parsed: input is an object)."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        arguments = {}
    return {
        "type": "tool_use",
        "id": f"toolu_{uuid.uuid4().hex}",
        "name": call["function"]["name"],
        "input": arguments if isinstance(arguments, dict) else {},
    }


def _sse(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"
