"""OpenAI's Responses API: POST /v1/responses; GET and DELETE /v1/responses/{id}, and its input_items.

Boundary: a `ResponsesRequest` in (responses_input.py makes it a chat request, which `Generate`
starts on the engine); a Response object out, whole or as the API's typed server-sent events
(response.created ... response.completed). Answers are kept, the last `max_stored_responses`
of them, so a later request can go on from one with `previous_response_id` (its conversation:
history, input and output) and a client can fetch or delete it.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loramux.engine.llm_engine import EngineDeadError
from loramux.engine.outputs import RequestOutput
from loramux.server.errors import raise_if_ended_badly, to_api_error, validated
from loramux.server.generate import ClientGone, Generate, Streams, merge, tool_mode
from loramux.server.protocol import APIError, ChatCompletionRequest
from loramux.server.responses_input import ResponsesRequest, chat_body, input_items, input_messages
from loramux.server.structured import tool_calls


@dataclass(frozen=True)
class _Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages up to and with this answer (no instructions)
    inputs: list[dict[str, Any]]  # this request's input items, as GET .../input_items lists them


class ResponseStore:
    """The last `size` finished responses by id (0: none are kept)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, _Stored] = OrderedDict()

    def put(self, rid: str, stored: _Stored) -> None:
        if self.size <= 0:
            return
        self._items[rid] = stored
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, rid: str) -> _Stored:
        stored = self._items.get(rid)
        if stored is None:
            kept = (
                f"it was deleted, never stored (store: false), or is older than the last {self.size} "
                "responses this server keeps"
                if self.size
                else "this server keeps no responses (--max-stored-responses 0, or --replicas, "
                "whose engines do not share them)"
            )
            raise APIError(
                404,
                f"no stored response {rid!r}: {kept}; send the conversation as input instead",
                code="response_not_found",
            )
        self._items.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> None:
        self.get(rid)
        del self._items[rid]


class Responses:
    def __init__(self, gen: Generate, store_size: int) -> None:
        self.gen = gen
        self.store = ResponseStore(store_size)

    # --- the routes ---
    async def create(self, body: ResponsesRequest, request: Request) -> Response:
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            try:
                history = self.store.get(body.previous_response_id).conversation
            except APIError as e:
                raise APIError(
                    400, e.message, code="previous_response_not_found", param="previous_response_id"
                ) from None
        chat = validated(ChatCompletionRequest, chat_body(body, history))
        _, _, streams = await self.gen.start_chat(chat, request, kind="resp")
        answer = _Answer(self, body, chat, history + input_messages(body.input))
        if body.stream:
            return StreamingResponse(answer.events(streams), media_type="text/event-stream")
        model = chat.model or ""
        try:
            outs = await self.gen.unless_gone(request, self.gen.final(streams, model), model, 1)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(answer.finish(outs[0]))

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        return self.store.get(response_id).response

    async def input_items(
        self,
        response_id: str,
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
        before: str | None = None,
    ) -> dict[str, Any]:
        """The response's input items, OpenAI's list page: newest first unless order is asc;
        `after` / `before` name an item of the list (a cursor)."""
        items = list(self.store.get(response_id).inputs)
        if order == "desc":
            items.reverse()
        ids = [it["id"] for it in items]
        for cursor, name in ((after, "after"), (before, "before")):
            if cursor is not None and cursor not in ids:
                raise APIError(400, f"{name}={cursor!r} is not an input item of {response_id!r}", param=name)
        start = ids.index(after) + 1 if after is not None else 0
        end = ids.index(before) if before is not None else len(ids)
        items = items[start:end]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    async def delete(self, response_id: str) -> dict[str, Any]:
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


class _Answer:
    """One response as it is made: its skeleton, its output items, and its events."""

    def __init__(
        self, api: Responses, body: ResponsesRequest, chat: ChatCompletionRequest, conversation: list[Any]
    ) -> None:
        self.api, self.body, self.chat, self.conversation = api, body, chat, conversation
        self.model = chat.model or ""
        self.message_id = f"msg_{uuid.uuid4().hex}"
        # A named function's call is known from the start: streamed, its arguments come as made.
        self.named = tool_mode(chat) and isinstance(chat.tool_choice, dict)
        self.call_ids = (f"fc_{uuid.uuid4().hex}", f"call_{uuid.uuid4().hex}")
        defaults = api.gen.defaults
        self.response: dict[str, Any] = {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "metadata": body.metadata or {},
            "model": self.model,
            "output": [],
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "prompt_cache_key": body.prompt_cache_key,
            "reasoning": None,
            "safety_identifier": body.safety_identifier,
            "service_tier": "default",
            "store": body.store and api.store.size > 0,
            "temperature": defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
            "text": {"format": body.output_format},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_logprobs": body.top_logprobs or 0,
            "top_p": defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": None,
            "user": body.user,
        }

    # --- whole ---
    def finish(self, out: RequestOutput) -> dict[str, Any]:
        """The finished response (stored when asked): its output items, status and usage."""
        comp = out.outputs[0]
        items = self._items(out)
        cut = comp.finish_reason == "length"
        response = {
            **self.response,
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": items,
            "usage": {
                "input_tokens": len(out.prompt_token_ids),
                "input_tokens_details": {"cached_tokens": out.num_cached_tokens},
                "output_tokens": len(comp.token_ids),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(out.prompt_token_ids) + len(comp.token_ids),
            },
        }
        if response["store"]:
            conversation = self.conversation + _as_messages(items)
            self.api.store.put(response["id"], _Stored(response, conversation, input_items(self.body.input)))
        return response

    def _items(self, out: RequestOutput) -> list[dict[str, Any]]:
        comp = out.outputs[0]
        calls = tool_calls(self.chat, comp.text) if tool_mode(self.chat) else None
        status = "incomplete" if comp.finish_reason == "length" else "completed"
        if calls is not None:
            items = [
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "call_id": c["id"],
                    "name": c["function"]["name"],
                    "arguments": c["function"]["arguments"],
                    "status": status,
                }
                for c in calls
            ]
            if self.named:  # the ids its streamed events already carried
                items[0]["id"], items[0]["call_id"] = self.call_ids
            return items
        part = {"type": "output_text", "text": comp.text, "annotations": [], "logprobs": self._logprobs(out)}
        return [
            {
                "type": "message",
                "id": self.message_id,
                "role": "assistant",
                "status": status,
                "content": [part],
            }
        ]

    def _logprobs(self, out: RequestOutput, a: int = 0, b: int | None = None) -> list[dict[str, Any]]:
        comp = out.outputs[0]
        if not self.body.logprobs or comp.logprobs is None:
            return []
        lp = self.api.gen.chat_logprobs(comp.token_ids[a:b], list(comp.logprobs)[a:b])
        return lp["content"] if lp is not None else []

    # --- streamed ---
    async def events(self, streams: Streams) -> AsyncIterator[str]:
        """The response as the Responses API's server-sent events. Text, and a named function's
        arguments, stream as they come; tool_choice "required"'s calls come whole once the answer
        is done (they are parsed from all of it)."""
        seq = itertools.count()

        def event(kind: str, **fields: Any) -> str:
            data = {"type": kind, "sequence_number": next(seq), **fields}
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

        yield event("response.created", response=self.response)
        yield event("response.in_progress", response=self.response)
        streaming_text = not tool_mode(self.chat)
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        if streaming_text:
            item = {**self._message([]), "status": "in_progress"}
            yield event("response.output_item.added", output_index=0, item=item)
            yield event("response.content_part.added", **where, part=_text_part(""))
        call = {"item_id": self.call_ids[0], "output_index": 0}
        if self.named:
            name = self.chat.tool_choice["function"]["name"]  # type: ignore[index]
            item = {"type": "function_call", "id": self.call_ids[0], "call_id": self.call_ids[1]}
            item.update(name=name, arguments="", status="in_progress")
            yield event("response.output_item.added", output_index=0, item=item)
        finals: list[RequestOutput] = []
        seen = sent = 0  # tokens come in, tokens gone out in deltas (half a character waits)
        try:
            async with self.api.gen.closing(streams, finals, self.model):
                async for _, out in merge(streams):
                    raise_if_ended_badly(out, self.model)
                    comp = out.outputs[0]
                    seen += len(comp.delta_token_ids)
                    if streaming_text and comp.delta_text:
                        lps = self._logprobs(out, sent, seen)
                        sent = seen
                        yield event(
                            "response.output_text.delta", **where, delta=comp.delta_text, logprobs=lps
                        )
                    elif self.named and comp.delta_text:
                        yield event("response.function_call_arguments.delta", **call, delta=comp.delta_text)
                    if out.finished:
                        finals.append(out)
                        self.api.gen.metrics.finished(self.model, out)
        except (APIError, EngineDeadError) as e:
            err = to_api_error(e, self.model)
            failed = {
                **self.response,
                "status": "failed",
                "error": {"code": err.code or err.type, "message": err.message},
            }
            yield event("response.failed", response=failed)
            return
        response = self.finish(finals[0])
        items = response["output"]
        if streaming_text:
            part = items[0]["content"][0]
            yield event("response.output_text.done", **where, text=part["text"], logprobs=part["logprobs"])
            yield event("response.content_part.done", **where, part=part)
            yield event("response.output_item.done", output_index=0, item=items[0])
        elif self.named and items[0]["type"] == "function_call":
            done = {"name": items[0]["name"], "arguments": items[0]["arguments"]}
            yield event("response.function_call_arguments.done", **call, **done)
            yield event("response.output_item.done", output_index=0, item=items[0])
        else:
            for i, item in enumerate(items):
                for kind, fields in _whole_item(i, item):
                    yield event(kind, **fields)
        yield event(
            f"response.{'incomplete' if response['status'] == 'incomplete' else 'completed'}",
            response=response,
        )

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "role": "assistant",
            "status": "completed",
            "content": content,
        }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _whole_item(i: int, item: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The events of an output item that is done before its first event: added, its content at
    once, done."""
    if item["type"] == "function_call":
        where = {"item_id": item["id"], "output_index": i}
        return [
            (
                "response.output_item.added",
                {"output_index": i, "item": {**item, "arguments": "", "status": "in_progress"}},
            ),
            ("response.function_call_arguments.delta", {**where, "delta": item["arguments"]}),
            (
                "response.function_call_arguments.done",
                {**where, "name": item["name"], "arguments": item["arguments"]},
            ),
            ("response.output_item.done", {"output_index": i, "item": item}),
        ]
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": i, "content_index": 0}
    return [
        (
            "response.output_item.added",
            {"output_index": i, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**where, "part": _text_part("")}),
        ("response.output_text.delta", {**where, "delta": part["text"], "logprobs": part["logprobs"]}),
        ("response.output_text.done", {**where, "text": part["text"], "logprobs": part["logprobs"]}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": i, "item": item}),
    ]


def _as_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items as the chat messages a later turn renders."""
    calls = [
        {
            "id": it["call_id"],
            "type": "function",
            "function": {"name": it["name"], "arguments": it["arguments"]},
        }
        for it in items
        if it["type"] == "function_call"
    ]
    if calls:
        return [{"role": "assistant", "content": None, "tool_calls": calls}]
    return [{"role": "assistant", "content": "".join(p["text"] for it in items for p in it["content"])}]
