"""OpenAI's Responses API: POST /v1/responses; GET and DELETE /v1/responses/{id}, its input_items,
and POST /v1/responses/{id}/cancel.

Boundary: a `ResponsesRequest` in (responses_input.py makes it a chat request, which `Generate`
starts on the engine); a Response object out, whole or as the API's typed server-sent events
(response.created ... response.completed). Answers are kept, the last `max_stored_responses`
of them, so a later request can go on from one with `previous_response_id` (its conversation:
history, input and output) and a client can fetch or delete it. A background response
(`background: true`) is answered at once as "queued" and made by a task of its own; the store
holds it as it goes (queued, in_progress, then completed, incomplete, failed or cancelled), and
its events, which a client streams with the request (`stream: true`) or later (`GET
/v1/responses/{id}?stream=true&starting_after=N`), from the start or from where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
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
from loramux.server.answer_parts import AnswerParts
from loramux.server.errors import raise_if_ended_badly, to_api_error, validated
from loramux.server.generate import ClientGone, Generate, Streams, merge, tool_mode
from loramux.server.protocol import APIError, ChatCompletionRequest
from loramux.server.reasoning_parsers import split
from loramux.server.responses_input import ResponsesRequest, chat_body, input_items, input_messages
from loramux.server.structured import tool_calls

logger = logging.getLogger("loramux.server")


class _EventLog:
    """A background response's server-sent events, in order (event k has sequence number k), for
    any number of readers, each from where it starts; ended once the response is."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.ended = False
        self._grown = asyncio.Event()

    def add(self, data: dict[str, Any]) -> None:
        assert data["sequence_number"] == len(self.events) and not self.ended
        self.events.append(_sse(data))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._grown.set()
        self._grown = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[str]:
        """The events after sequence number `after` (-1: all), then each as it comes, until the end."""
        i = after + 1
        while True:
            grown = self._grown
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.ended:
                return
            await grown.wait()


@dataclass(frozen=True)
class _Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages up to and with this answer (no instructions)
    inputs: list[dict[str, Any]]  # this request's input items, as GET .../input_items lists them
    task: asyncio.Task[None] | None = None  # a background response's, until it ends
    log: _EventLog | None = None  # a background response's events

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


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

    def peek(self, rid: str) -> _Stored | None:
        """The stored response, if kept, without counting as a use."""
        return self._items.get(rid)


class Responses:
    def __init__(self, gen: Generate, store_size: int) -> None:
        self.gen = gen
        self.store = ResponseStore(store_size)
        self.tasks: set[asyncio.Task[None]] = set()  # background responses being made

    # --- the routes ---
    async def create(self, body: ResponsesRequest, request: Request) -> Response:
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            try:
                previous = self.store.get(body.previous_response_id)
            except APIError as e:
                raise APIError(
                    400, e.message, code="previous_response_not_found", param="previous_response_id"
                ) from None
            if previous.running:
                raise APIError(
                    400,
                    f"response {body.previous_response_id!r} is still {previous.response['status']}; "
                    "go on from it once GET /v1/responses/{id} says it is completed",
                    param="previous_response_id",
                )
            history = previous.conversation
        if body.background:
            self._check_background(body)
        chat = validated(ChatCompletionRequest, chat_body(body, history))
        _, _, streams = await self.gen.start_chat(chat, request, kind="resp")
        answer = _Answer(self, body, chat, history + input_messages(body.input))
        if body.background:
            queued, log = answer.start_background(streams)
            if body.stream:  # the client reads the log: leaving stops its reading, not the answer
                return StreamingResponse(log.follow(-1), media_type="text/event-stream")
            return JSONResponse(queued)
        if body.stream:
            return StreamingResponse(answer.events(streams), media_type="text/event-stream")
        model = chat.model or ""
        try:
            outs = await self.gen.unless_gone(request, self.gen.final(streams, model), model, 1)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse(answer.finish(outs[0]))

    async def retrieve(
        self,
        response_id: str,
        stream: bool = False,
        starting_after: int | None = Query(None, ge=0),
    ) -> Any:
        """The response; with `stream`, a background response's events after `starting_after` (all
        without it), then each as it is made, until it ends."""
        stored = self.store.get(response_id)
        if not stream:
            return stored.response
        if stored.log is None:
            raise APIError(
                400,
                f"response {response_id!r} was not made in the background, so it has no events to "
                "stream again; GET it without stream (it is whole), or create responses with "
                "background: true to stream them later",
                param="stream",
            )
        after = -1 if starting_after is None else starting_after
        return StreamingResponse(stored.log.follow(after), media_type="text/event-stream")

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
        """Forget a response; a background one still being made is cancelled first."""
        await self._stop(self.store.get(response_id))
        self.store.delete(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """Cancel a background response still being made (its request is aborted and its KV pages
        freed); one that has ended is answered as it is, as OpenAI does."""
        stored = self.store.get(response_id)
        if not stored.response["background"]:
            raise APIError(
                400,
                f"response {response_id!r} was not made in the background; only background "
                "responses can be cancelled (a client that closes its connection aborts its request)",
                param="response_id",
            )
        stopped = await self._stop(stored)
        now = self.store.get(response_id)
        if not stopped or now.response["status"] not in ("queued", "in_progress"):  # it had ended
            return now.response
        cancelled = {**now.response, "status": "cancelled"}
        self.store.put(response_id, _Stored(cancelled, [], now.inputs, log=now.log))
        return cancelled

    # --- background ---
    def _check_background(self, body: ResponsesRequest) -> None:
        if not body.store or self.store.size <= 0:
            why = (
                "send store: true"
                if self.store.size > 0
                else "this server keeps no responses (--max-stored-responses 0, or --replicas, "
                "whose engines do not share them); stream the answer instead"
            )
            raise APIError(
                400, f"a background response must be stored to be fetched: {why}", param="background"
            )

    @staticmethod
    async def _stop(stored: _Stored) -> bool:
        """Cancel a background response's task if it still runs; True if it did."""
        if not stored.running:
            return False
        assert stored.task is not None
        stored.task.cancel()  # not done (checked above, with no await since): it ends cancelled
        with contextlib.suppress(asyncio.CancelledError):
            await stored.task
        return True


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
        self.parser = api.gen.auto_parser(chat)  # tool_choice "auto": calls are found in the text
        self.thinking = api.gen.reasoning_parser(chat)  # --reasoning-parser: reasoning is split off
        self.call_ids = (f"fc_{uuid.uuid4().hex}", f"call_{uuid.uuid4().hex}")
        self.log: _EventLog | None = None  # a background response's events
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

    # --- in the background ---
    def start_background(self, streams: Streams) -> tuple[dict[str, Any], _EventLog]:
        """Store the response as queued and make it in a task of its own; returns it as queued,
        and the log its events go to."""
        self.response["background"] = True
        queued = {**self.response, "status": "queued"}
        inputs = input_items(self.body.input)
        self.log = _EventLog()
        task = asyncio.create_task(self._make(streams, inputs))
        self.api.tasks.add(task)  # held until done, even if the store lets the response go
        task.add_done_callback(self.api.tasks.discard)
        self.api.store.put(queued["id"], _Stored(queued, [], inputs, task, self.log))
        return queued, self.log

    async def _make(self, streams: Streams, inputs: list[dict[str, Any]]) -> None:
        """Make the response's events into its log, and store it as it goes: in_progress at its
        first token, then finished (finish() stores it), or failed (with the error an answer in
        the foreground would have given). Cancelled, the stream is closed (the request aborted)
        and the log ends with an error event saying so."""
        rid, store, log = self.response["id"], self.api.store, self.log
        try:
            async for data in self._events(streams, background=True):
                log.add(data)
                kind = data["type"]
                if kind == "response.in_progress" and (kept := store.peek(rid)) is not None:
                    store.put(rid, _Stored(data["response"], [], inputs, kept.task, log))
                elif kind == "response.failed":
                    store.put(rid, _Stored(data["response"], [], inputs, log=log))
        except asyncio.CancelledError:
            message = f"response {rid!r} was cancelled (POST /v1/responses/{{id}}/cancel or DELETE)"
            log.add(_error_event(len(log.events), "response_cancelled", message))
            raise
        except Exception as e:  # not an answer's error (those end as response.failed): a fault of ours
            logger.exception("background response %s failed", rid)
            error = {"code": "server_error", "message": f"the response failed: {e}"}
            failed = {**self.response, "status": "failed", "error": error}
            store.put(rid, _Stored(failed, [], inputs, log=log))
            log.add({"type": "response.failed", "sequence_number": len(log.events), "response": failed})
        finally:
            log.end()
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]

    # --- whole ---
    def finish(self, out: RequestOutput, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The finished response (stored when asked): its output items (`items`: as they were
        streamed), status and usage."""
        comp = out.outputs[0]
        items = self._items(out) if items is None else items
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
            stored = _Stored(response, conversation, input_items(self.body.input), log=self.log)
            self.api.store.put(response["id"], stored)
        return response

    def _items(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The answer's output items: its reasoning (with a reasoning parser), then its calls (the
        text outside them a message before them), or its message."""
        comp = out.outputs[0]
        status = "incomplete" if comp.finish_reason == "length" else "completed"
        text, head = comp.text, []
        if self.thinking is not None:
            parts = split(self.thinking, comp.text)
            text = parts.content
            if parts.reasoning:
                head.append(_reasoning_item(parts.reasoning, status))
        if self.parser is not None and (found := self.parser.parse(text)).calls:
            said = [self._message([_text_part(found.content)])] if found.content.strip() else []
            return head + said + [self._call_item(c, status) for c in found.calls]
        calls = tool_calls(self.chat, comp.text) if tool_mode(self.chat) else None
        if calls is not None:
            items = [self._call_item(c, status) for c in calls]
            if self.named:  # the ids its streamed events already carried
                items[0]["id"], items[0]["call_id"] = self.call_ids
            return items
        logprobs = self._logprobs(out) if self.thinking is None else []  # the reasoning's are not the text's
        part = {**_text_part(text), "logprobs": logprobs}
        return head + [{**self._message([part]), "status": status}]

    @staticmethod
    def _call_item(c: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex}",
            "call_id": c["id"],
            "name": c["function"]["name"],
            "arguments": c["function"]["arguments"],
            "status": status,
        }

    def _logprobs(self, out: RequestOutput, a: int = 0, b: int | None = None) -> list[dict[str, Any]]:
        comp = out.outputs[0]
        if not self.body.logprobs or comp.logprobs is None:
            return []
        lp = self.api.gen.chat_logprobs(comp.token_ids[a:b], list(comp.logprobs)[a:b])
        return lp["content"] if lp is not None else []

    # --- streamed ---
    async def events(self, streams: Streams) -> AsyncIterator[str]:
        """The response as the Responses API's server-sent events."""
        async for data in self._events(streams):
            yield _sse(data)

    async def _events(self, streams: Streams, background: bool = False) -> AsyncIterator[dict[str, Any]]:
        """The response's events. Text, and a named function's arguments, stream as they come;
        tool_choice "required"'s calls come whole once the answer is done (they are parsed from all
        of it). In the background, the response is created queued and is in progress from its
        first token."""
        seq = itertools.count()

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(seq), **fields}

        # Plain text streams as it comes; with a parser, each part as an item of its own (_ItemStream).
        parsed = not tool_mode(self.chat) and (self.parser is not None or self.thinking is not None)
        streaming_text = not tool_mode(self.chat) and not parsed
        parts = AnswerParts(self.thinking, self.parser) if parsed else None
        made = _ItemStream(self.message_id)
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        call = {"item_id": self.call_ids[0], "output_index": 0}

        def opening() -> list[dict[str, Any]]:
            opened = [event("response.in_progress", response=self.response)]
            if streaming_text:
                item = {**self._message([]), "status": "in_progress"}
                opened.append(event("response.output_item.added", output_index=0, item=item))
                opened.append(event("response.content_part.added", **where, part=_text_part("")))
            if self.named:
                name = self.chat.tool_choice["function"]["name"]  # type: ignore[index]
                item = {"type": "function_call", "id": self.call_ids[0], "call_id": self.call_ids[1]}
                item.update(name=name, arguments="", status="in_progress")
                opened.append(event("response.output_item.added", output_index=0, item=item))
            return opened

        if background:
            queued = {**self.response, "status": "queued"}
            yield event("response.created", response=queued)
            yield event("response.queued", response=queued)
        else:
            yield event("response.created", response=self.response)
            for e in opening():
                yield e
        opened = not background
        finals: list[RequestOutput] = []
        seen = sent = 0  # tokens come in, tokens gone out in deltas (half a character waits)
        try:
            async with self.api.gen.closing(streams, finals, self.model):
                async for _, out in merge(streams):
                    raise_if_ended_badly(out, self.model)
                    if not opened:
                        opened = True
                        for e in opening():
                            yield e
                    comp = out.outputs[0]
                    seen += len(comp.delta_token_ids)
                    if parts is not None:
                        reasoning, text, calls = parts.step(comp.delta_text, out.finished)
                        found = [self._call_item(c, "completed") for c in calls]
                        for kind, fields in made.grow(reasoning, text, found):
                            yield event(kind, **fields)
                    elif streaming_text and comp.delta_text:
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
        if parts is not None:
            cut = finals[0].outputs[0].finish_reason == "length"
            for kind, fields in made.end("incomplete" if cut else "completed"):
                yield event(kind, **fields)
            response = self.finish(finals[0], made.items)
        else:
            response = self.finish(finals[0])
        items = [] if parts is not None else response["output"]  # parsed: its items went out as made
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


def _sse(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"


def _error_event(seq: int, code: str, message: str) -> dict[str, Any]:
    """OpenAI's stream `error` event: why a stream ends without its response's last event."""
    return {"type": "error", "sequence_number": seq, "code": code, "message": message, "param": None}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


Events = list[tuple[str, dict[str, Any]]]  # (kind, fields) of server-sent events, unnumbered


class _ItemStream:
    """A parsed answer's output items as its parts come: reasoning and text each grow an item of
    their own by deltas (a new kind closes the open one); calls come as whole items. Text that is
    blank so far waits: it becomes a message only if more text follows, or if the answer has no
    other message or call (as `_Answer._items` makes the whole answer's)."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.items: list[dict[str, Any]] = []  # the items done, in order
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.text = ""  # the open item's text so far
        self.blank = ""  # blank text held back

    def grow(self, reasoning: str, text: str, calls: list[dict[str, Any]]) -> Events:
        events = self._add("reasoning", reasoning) if reasoning else []
        if text and (self._is_open("message") or (self.blank + text).strip()):
            events += self._add("message", self.blank + text)
            self.blank = ""
        elif text:
            self.blank += text
        for item in calls:
            events += self._close("completed")
            self.blank = ""
            events += _whole_item(len(self.items), item)
            self.items.append(item)
        return events

    def end(self, status: str) -> Events:
        """Close the open item with the answer's status; an answer with no message and no call
        gets its (blank, or empty) text as one."""
        said = any(it["type"] in ("message", "function_call") for it in self.items)
        if not said and not self._is_open("message"):
            return self._add("message", self.blank, force=True) + self._close(status)
        return self._close(status)

    def _is_open(self, kind: str) -> bool:
        return self.open is not None and self.open["type"] == kind

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0}

    def _add(self, kind: str, text: str, force: bool = False) -> Events:
        events: Events = []
        if not self._is_open(kind):
            events += self._close("completed")
            if kind == "reasoning":
                self.open = {**_reasoning_item("", "in_progress"), "content": []}
            else:
                again = any(it["type"] == "message" for it in self.items)  # text after calls: a new id
                mid = f"msg_{uuid.uuid4().hex}" if again else self.message_id
                self.open = {"type": "message", "id": mid, "role": "assistant", "content": []}
                self.open["status"] = "in_progress"
            self.text = ""
            events.append(
                ("response.output_item.added", {"output_index": len(self.items), "item": self.open})
            )
            if kind == "message":
                events.append(("response.content_part.added", {**self._where(), "part": _text_part("")}))
        if text or force:
            self.text += text
            if kind == "reasoning":
                events.append(("response.reasoning_text.delta", {**self._where(), "delta": text}))
            elif text:
                events.append(
                    ("response.output_text.delta", {**self._where(), "delta": text, "logprobs": []})
                )
        return events

    def _close(self, status: str) -> Events:
        if self.open is None:
            return []
        where, item = self._where(), self.open
        if item["type"] == "reasoning":
            done = {**item, "content": [{"type": "reasoning_text", "text": self.text}], "status": status}
            events = [("response.reasoning_text.done", {**where, "text": self.text})]
        else:
            part = _text_part(self.text)
            done = {**item, "content": [part], "status": status}
            events = [
                ("response.output_text.done", {**where, "text": self.text, "logprobs": []}),
                ("response.content_part.done", {**where, "part": part}),
            ]
        events.append(("response.output_item.done", {"output_index": len(self.items), "item": done}))
        self.items.append(done)
        self.open = None
        return events


def _reasoning_item(text: str, status: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "encrypted_content": None,
        "status": status,
    }


def _whole_item(i: int, item: dict[str, Any]) -> Events:
    """The events of an output item that is done before its first event: added, its content at
    once, done."""
    if item["type"] == "reasoning":
        text = item["content"][0]["text"]
        where = {"item_id": item["id"], "output_index": i, "content_index": 0}
        return [
            (
                "response.output_item.added",
                {"output_index": i, "item": {**item, "status": "in_progress", "content": []}},
            ),
            ("response.reasoning_text.delta", {**where, "delta": text}),
            ("response.reasoning_text.done", {**where, "text": text}),
            ("response.output_item.done", {"output_index": i, "item": item}),
        ]
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
    """Output items as the chat messages a later turn renders (reasoning is not carried on, as
    the templates of thinking models drop it from earlier turns)."""
    items = [it for it in items if it["type"] != "reasoning"]
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
