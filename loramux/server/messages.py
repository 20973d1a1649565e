"""Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens (vLLM serves the
same), so clients built on Anthropic's SDK (agents, Claude Code's ANTHROPIC_BASE_URL) reach
every adapter as they reach Claude.

Boundary: a `MessagesRequest` in, made a chat request (messages_input.py) that `Generate` starts
on the engine; a Message out, whole or as Anthropic's server-sent events (message_start,
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

from loramux.engine.llm_engine import EngineDeadError
from loramux.engine.outputs import RequestOutput
from loramux.server.answer_parts import AnswerParts
from loramux.server.errors import anthropic_type, raise_if_ended_badly, to_api_error, validated
from loramux.server.generate import ClientGone, Generate, Streams, merge, tool_mode
from loramux.server.messages_input import (
    CountTokensRequest,
    MessagesRequest,
    chat_body,
    chat_messages,
    chat_tools,
)
from loramux.server.protocol import APIError, ChatCompletionRequest
from loramux.server.reasoning_parsers import split
from loramux.server.structured import tool_calls

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "abort": "end_turn"}


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
        fields = {"model": body.model, "messages": chat_messages(body), "tools": chat_tools(body.tools)}
        chat = validated(ChatCompletionRequest, fields)
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
        if calls is not None:
            text = ""  # a constrained answer is its calls' JSON: the calls say it all
        if self.parser is not None and (found := self.parser.parse(text)).calls:
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
        blocks, pieces = _Blocks(), AnswerParts(self.thinking, self.parser)
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
    except (json.JSONDecodeError, RecursionError):
        arguments = {}
    return {
        "type": "tool_use",
        "id": f"toolu_{uuid.uuid4().hex}",
        "name": call["function"]["name"],
        "input": arguments if isinstance(arguments, dict) else {},
    }


def _sse(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"
