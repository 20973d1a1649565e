"""The generation routes: /v1/completions and /v1/chat/completions, as JSON or streamed.

Boundary: a validated OpenAI body in; requests queued on the `AsyncEngine`
(`n` samples of each prompt); their outputs rendered as OpenAI's JSON or as
server-sent events. A client that leaves aborts its requests at once, and
every request is counted in the metrics once, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loramux.core.adapters import AdapterNotFoundError
from loramux.engine.chat import render_chat
from loramux.engine.llm_engine import EngineDeadError
from loramux.engine.outputs import RequestOutput
from loramux.sampling_params import MAX_LOGPROBS, SamplingParams
from loramux.server.async_engine import AsyncEngine
from loramux.server.errors import raise_if_ended_badly, to_api_error
from loramux.server.metrics import Metrics
from loramux.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from loramux.server.reasoning_parsers import ReasoningStream, reasoning_stream, split
from loramux.server.resolver import AdapterResolver
from loramux.server.server_config import ServerConfig
from loramux.server.structured import function_schemas, structured_params, tool_calls
from loramux.server.token_text import TokenText
from loramux.server.tool_parsers import ToolCallStream, ToolParser, call

logger = logging.getLogger("loramux.server")
T = TypeVar("T")
Body = CompletionRequest | ChatCompletionRequest
Streams = list[AsyncIterator[RequestOutput]]
# A choice of a streamed chunk from (choice index, output), or None when there is nothing to send.
Render = Callable[[int, RequestOutput], dict[str, Any] | None]
Shape = Callable[[int, list[int], list[Any]], dict[str, Any]]  # (choice, token ids, logprobs) -> JSON


def _streamed_prompt_logprobs(body: Body, params: SamplingParams) -> SamplingParams:
    """vLLM's prompt_logprobs come with a whole answer: with `stream`, above 0 is a 400 and 0 asks
    for nothing, as in vLLM (echo with logprobs streams: the prompt's tokens ride on its echo
    chunk)."""
    if not body.stream or body.prompt_logprobs is None:
        return params
    if body.prompt_logprobs > 0:
        raise APIError(
            400,
            "prompt_logprobs are not available when stream is true; set stream to false",
            param="prompt_logprobs",
        )
    return dataclasses.replace(params, prompt_logprobs=None)


def _request_ids(kind: str, request: Request, body: Body) -> tuple[str, str]:
    """(the answer's id, the engine's id prefix), as vLLM names requests: the X-Request-Id
    header, else the body's `request_id`, else a new one. A client's id gets a unique suffix in
    the engine, so two requests sent with one id never share a stream."""
    given = request.headers.get("x-request-id") or (body.model_extra or {}).get("request_id")
    if given is None:
        rid = f"{kind}-{uuid.uuid4().hex}"
        return rid, rid
    if not isinstance(given, str) or not given:
        raise APIError(400, "request_id must be a non-empty string", param="request_id")
    return f"{kind}-{given}", f"{kind}-{given}-{uuid.uuid4().hex[:12]}"


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class Generate:
    def __init__(
        self, aengine: AsyncEngine, metrics: Metrics, cfg: ServerConfig, resolver: AdapterResolver
    ) -> None:
        self.aengine, self.engine, self.metrics, self.cfg = aengine, aengine.engine, metrics, cfg
        self.resolver = resolver
        self.base_names = frozenset(cfg.base_names)
        self.details = cfg.prompt_tokens_details
        self.defaults = dict(self.engine.runtime.sampling_defaults)  # the model's generation_config

    # --- the routes ---
    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        body.model = body.model or self.cfg.served_model_name  # vLLM's default: the base model
        limit = 16 if body.max_tokens is None else body.max_tokens
        params = body.sampling_params(limit, body.logprobs, structured_params(body), self.defaults)
        params = _streamed_prompt_logprobs(body, params)
        if body.echo and body.logprobs is not None and params.prompt_logprobs is None:
            params = dataclasses.replace(params, prompt_logprobs=body.logprobs)  # the echoed tokens' too
        rid, engine_id = _request_ids("cmpl", request, body)
        prompts = body.prompts()
        if not body.add_special_tokens:  # the text as it is: no second BOS before a formatted prompt
            prompts = [self._plain_ids(p) if isinstance(p, str) else p for p in prompts]
        streams = await self._start_all(engine_id, prompts, params, body)
        if body.stream:
            chunk = _Chunks(rid, "text_completion", body.model)
            echoed: dict[int, tuple[list[int], list[Any]]] = {}  # choice -> its prompt's tokens, once
            shape = self._completion_logprobs_from(echoed) if body.logprobs is not None else None
            render = _with_tokens(self._completion_delta(body, echoed), shape, body.return_token_ids)
            return _sse(self._stream(chunk, body, streams, render))
        return await self._answer(request, rid, "text_completion", body, streams, self._completion_choice)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        rid, prompt, streams = await self.start_chat(body, request)
        if body.stream:
            head = {"prompt_token_ids": prompt} if body.return_token_ids else {}  # as vLLM's first chunk
            chunk = _Chunks(rid, "chat.completion.chunk", body.model)
            roles = [_delta(i, {"role": "assistant", "content": ""}, None) for i in range(len(streams))]
            shape: Shape | None = None
            if body.logprobs:
                shape = lambda i, ids, lps: self.chat_logprobs(ids, lps)  # noqa: E731
            parser, thinking = self.auto_parser(body), self.reasoning_parser(body)
            render = _chat_delta if not tool_mode(body) else _tool_delta(body)
            render = _auto_tool_delta(parser) if parser is not None else render
            if thinking is not None:
                render = _with_reasoning(render, thinking, body.include_reasoning)
            render = _with_tokens(render, shape, body.return_token_ids)
            return _sse(self._stream(chunk, body, streams, render, roles, head))
        return await self._answer(request, rid, "chat.completion", body, streams, self._chat_choice)

    # --- starting and ending requests ---
    async def start_chat(
        self, body: ChatCompletionRequest, request: Request, kind: str = "chatcmpl"
    ) -> tuple[str, list[int], Streams]:
        """(the answer's id, the rendered prompt, one stream per sample) of a chat request; the
        Responses API (responses.py) starts its requests here too."""
        body.model = body.model or self.cfg.served_model_name  # vLLM's default: the base model
        prompt = self.chat_prompt(body)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        k = _top_logprobs(body)
        auto = self.cfg.auto_tool_parser is not None
        params = body.sampling_params(limit or 1, k, structured_params(body, auto), self.defaults)
        params = _streamed_prompt_logprobs(body, params)
        rid, engine_id = _request_ids(kind, request, body)
        streams = await self._start_all(engine_id, [prompt], params, body, fill=limit is None)
        return rid, prompt, streams

    async def _start_all(
        self,
        rid: str,
        prompts: list[str | list[int]],
        params: SamplingParams,
        body: Body,
        fill: bool = False,
    ) -> Streams:
        """One stream per (prompt, sample), prompt-major: stream k is choice k. A refused prompt
        aborts the ones already started and answers for all."""
        model = body.model
        lora = None if model in self.base_names else model
        streams: Streams = []
        try:
            await self.aengine.prepare(params)  # a grammar compiles off the engine thread (400 if it can't)
            for i, prompt in enumerate(prompts):
                if self.cfg.log_prompts:
                    shown = prompt if self.cfg.max_log_len is None else prompt[: self.cfg.max_log_len]
                    logger.info("request %s-%d model=%s prompt=%r", rid, i, model, shown)
                else:
                    logger.debug("request %s-%d model=%s", rid, i, model)
                args = (
                    f"{rid}-{i}",
                    prompt,
                    params,
                    lora,
                    body.user or "",
                    fill,
                    body.cache_salt,
                    body.priority,
                )
                try:
                    streams += await self.aengine.add_request_n(*args)
                except AdapterNotFoundError:
                    if lora is None or not await self.resolver.load(lora):
                        raise
                    streams += await self.aengine.add_request_n(*args)  # found by name: loaded now
        except Exception as e:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            err = to_api_error(e, model)
            self.metrics.ended(model if err.status != 404 else "unknown", "rejected")
            raise err from e
        return streams

    async def final(self, streams: Streams, model: str) -> list[RequestOutput]:
        """Every stream's last output; closes (and so aborts) all of them if cancelled."""

        async def last(s: AsyncIterator[RequestOutput]) -> RequestOutput:
            final = None
            async for out in s:
                final = out
            assert final is not None
            return final

        try:
            outs = await asyncio.gather(*(last(s) for s in streams))
        except EngineDeadError as e:
            self.metrics.ended(model, "error")
            raise to_api_error(e, model) from e
        finally:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
        for out in outs:
            self.metrics.finished(model, out)
        for out in outs:
            raise_if_ended_badly(out, model)
        return outs

    async def unless_gone(self, request: Request, work: Awaitable[T], model: str, n: int) -> T:
        """Await `work`, but cancel it (aborting its requests) if the client disconnects."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(watch())
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            watcher.cancel()
            return task.result()
        task.cancel()
        for _ in range(n):
            self.metrics.ended(model, "abort")
        raise ClientGone()

    # --- answers ---
    async def _answer(
        self,
        request: Request,
        rid: str,
        obj: str,
        body: Body,
        streams: Streams,
        choice: Callable[[int, RequestOutput, Any], dict[str, Any]],
    ) -> Response:
        """The whole answer as one JSON object, once every choice is done."""
        try:
            outs = await self.unless_gone(request, self.final(streams, body.model), body.model, len(streams))
        except ClientGone:
            return Response(status_code=499)
        answer: dict[str, Any] = {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": body.model,
            "choices": [choice(i, o, body) for i, o in enumerate(outs)],
            "usage": _usage(outs, body.n, self.details),
        }
        if obj == "chat.completion" and body.return_token_ids:
            answer["prompt_token_ids"] = outs[0].prompt_token_ids  # the rendered chat, as vLLM's
        if obj == "chat.completion" and body.prompt_logprobs is not None:
            answer["prompt_logprobs"] = self._prompt_logprobs(outs[0])  # beside choices, as vLLM's
        return JSONResponse(answer)

    async def _stream(
        self,
        chunk: _Chunks,
        body: Body,
        streams: Streams,
        render: Render,
        opening: Sequence[dict[str, Any]] = (),
        head: dict[str, Any] | None = None,
    ) -> AsyncIterator[str]:
        """The answer as server-sent events: `opening` choices (their chunks with the fields in
        `head`), then each choice's deltas as they come, then the usage if asked for. Closing it
        (the client left) aborts what is unfinished."""
        finals: list[RequestOutput] = []
        made: Counter[int] = Counter()  # tokens per choice so far
        done: dict[int, RequestOutput] = {}  # finished choices, by index (they end in any order)
        async with self.closing(streams, finals, body.model):
            for c in opening:
                yield chunk([c], **(head or {}))
            async for i, out in merge(streams):
                raise_if_ended_badly(out, body.model)
                made[i] += len(out.outputs[0].delta_token_ids)
                c = render(i, out)
                if c is None:
                    continue  # e.g. the detokenizer holds back a partial character
                yield chunk([c], usage=_usage_so_far(out, made[i]) if body.continuous_usage else None)
                if out.finished:
                    finals.append(out)
                    done[i] = out
                    self.metrics.finished(body.model, out)
        if body.include_usage or self.cfg.force_include_usage:
            yield chunk([], usage=_usage([done[i] for i in sorted(done)], body.n, self.details))

    @contextlib.asynccontextmanager
    async def closing(self, streams: Streams, finals: list[RequestOutput], model: str) -> AsyncIterator[None]:
        """Close every stream when a streaming response ends, aborting the unfinished ones."""
        try:
            yield
        finally:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            for _ in range(len(streams) - len(finals)):
                self.metrics.ended(model, "abort")

    # --- completions ---
    def _completion_choice(self, i: int, out: RequestOutput, body: CompletionRequest) -> dict[str, Any]:
        comp = out.outputs[0]
        choice: dict[str, Any] = {
            "index": i,
            "text": (self._prompt_text(out) if body.echo else "") + comp.text,
            "logprobs": None,
            "finish_reason": comp.finish_reason,
        }
        if body.logprobs is not None and comp.logprobs is not None:
            ids, lps = comp.token_ids, list(comp.logprobs)
            if body.echo and out.prompt_logprobs is not None:  # the echoed prompt's tokens first
                ids, lps = out.prompt_token_ids + ids, out.prompt_logprobs + lps
            choice["logprobs"] = self._completion_logprobs(ids, lps)
        if body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self._prompt_logprobs(out)
        if body.return_token_ids:
            choice["token_ids"] = comp.token_ids
            choice["prompt_token_ids"] = out.prompt_token_ids
        return choice

    def _completion_delta(
        self, body: CompletionRequest, prompts: dict[int, tuple[list[int], list[Any]]]
    ) -> Render:
        """Each choice's text since its last chunk; with echo, its first chunk starts with the
        prompt, whose tokens and logprobs (when asked) it leaves in `prompts` for the logprobs."""
        echoed: set[int] = set()

        def render(i: int, out: RequestOutput) -> dict[str, Any] | None:
            comp = out.outputs[0]
            head = ""
            if body.echo and i not in echoed:  # the prompt goes first, once per choice
                echoed.add(i)
                head = self._prompt_text(out)
                if out.prompt_logprobs is not None:
                    prompts[i] = (out.prompt_token_ids, out.prompt_logprobs)
            if not head and not comp.delta_text and not out.finished:
                return None  # half a character is held back: its token rides on the next chunk
            return {
                "index": i,
                "text": head + comp.delta_text,
                "logprobs": None,
                "finish_reason": comp.finish_reason,
            }

        return render

    def _plain_ids(self, text: str) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer; send token ids", param="prompt")
        return list(tok.encode(text, add_special_tokens=False))

    def _prompt_text(self, out: RequestOutput) -> str:
        """The prompt as text, for echo (token-id prompts are decoded)."""
        if out.prompt is not None:
            return out.prompt
        tok = self.engine.tokenizer
        return tok.decode(out.prompt_token_ids) if tok is not None else ""

    def _completion_logprobs(self, ids: list[int], lps: list[Any], start: int = 0) -> dict[str, Any]:
        """OpenAI's legacy shape: tokens as decoded text, their offsets in the completion text
        (from `start`, where a streamed chunk's tokens begin)."""
        tt = TokenText(self.engine.tokenizer)
        texts = [tt.text(t) for t in ids]
        return {  # an echoed prompt's first token has no logprob: None, as OpenAI's
            "tokens": texts,
            "token_logprobs": [None if lp is None else _json_logprob(lp.token_logprob) for lp in lps],
            "top_logprobs": [
                None if lp is None else {tt.text(a): _json_logprob(v) for a, v in lp.top} for lp in lps
            ],
            "text_offset": tt.offsets(texts, start),
        }

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict[str, Any] | None] | None:
        """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
        decoded_token}} for the token itself and its top alternatives (ranks 1, 2, ...)."""
        if out.prompt_logprobs is None:
            return None
        tt = TokenText(self.engine.tokenizer)
        shaped: list[dict[str, Any] | None] = []
        for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
            if lp is None:
                shaped.append(None)
                continue
            entry = {str(t): {"logprob": _json_logprob(v), "rank": r} for r, (t, v) in enumerate(lp.top, 1)}
            entry[str(tok)] = {"logprob": _json_logprob(lp.token_logprob), "rank": lp.rank}
            for t, e in entry.items():
                e["decoded_token"] = tt.text(int(t))
            shaped.append(entry)
        return shaped

    def _completion_logprobs_from(self, prompts: dict[int, tuple[list[int], list[Any]]]) -> Shape:
        """The legacy shape chunk by chunk: each choice's offsets go on from its last chunk's; an
        echoed prompt's tokens (left in `prompts`) go first in the chunk that echoes it."""
        at: Counter[int] = Counter()

        def shape(i: int, ids: list[int], lps: list[Any]) -> dict[str, Any]:
            if i in prompts:
                prompt_ids, prompt_lps = prompts.pop(i)
                ids, lps = prompt_ids + ids, prompt_lps + lps
            lp = self._completion_logprobs(ids, lps, at[i])
            at[i] += sum(map(len, lp["tokens"]))
            return lp

        return shape

    # --- chat ---
    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        """The prompt's token ids: the messages as the chat template renders them."""
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions")
        messages = [m.for_template() for m in body.messages]
        options = body.template_options(self.cfg.default_chat_template_kwargs)
        if self.cfg.exclude_tools_when_tool_choice_none and body.tool_choice == "none":
            options["tools"] = None  # vLLM's --exclude-tools-when-tool-choice-none
        try:
            return render_chat(tok, messages, **options)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e

    def _chat_choice(self, i: int, out: RequestOutput, body: ChatCompletionRequest) -> dict[str, Any]:
        comp = out.outputs[0]
        text, thought = comp.text, None
        if (thinking := self.reasoning_parser(body)) is not None:
            parts = split(thinking, comp.text)
            text, thought = parts.content, (parts.reasoning or None) if body.include_reasoning else None
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = comp.finish_reason
        calls = tool_calls(body, comp.text) if tool_mode(body) else None
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls" if body.tool_choice == "required" and finish == "stop" else finish
        if (parser := self.auto_parser(body)) is not None and (found := parser.parse(text)).calls:
            message = {"role": "assistant", "content": found.content or None, "tool_calls": found.calls}
            finish = "tool_calls" if finish == "stop" else finish
        if thinking is not None:  # vLLM's field, and its older name that many clients read
            message.update(content=message["content"] or None, reasoning=thought, reasoning_content=thought)
        choice: dict[str, Any] = {
            "index": i,
            "message": message,
            "logprobs": self.chat_logprobs(comp.token_ids, comp.logprobs) if body.logprobs else None,
            "finish_reason": finish,
        }
        if body.return_token_ids:
            choice["token_ids"] = comp.token_ids
        return choice

    def auto_parser(self, body: ChatCompletionRequest) -> ToolParser | None:
        """The parser that finds this answer's tool calls: tools with tool_choice "auto" (or none
        given) on a server started with one; None: the answer is text, or constrained calls."""
        if not body.tools or body.tool_choice not in (None, "auto") or self.cfg.auto_tool_parser is None:
            return None
        return ToolParser(self.cfg.auto_tool_parser, function_schemas(body.tools))

    def reasoning_parser(self, body: ChatCompletionRequest) -> str | None:
        """The parser that splits this answer's reasoning from its content; None for an answer the
        request constrains (structured output, tool_choice "required" or named): the constraint
        holds from its first token, so it has no reasoning (vLLM starts the grammar after it)."""
        if self.cfg.reasoning_parser is None or tool_mode(body):
            return None
        if structured_params(body, self.cfg.auto_tool_parser is not None) is not None:
            return None
        return self.cfg.reasoning_parser

    def chat_logprobs(self, ids: list[int], lps: list[Any] | None) -> dict[str, Any] | None:
        if lps is None:
            return None
        tt = TokenText(self.engine.tokenizer)

        def entry(t: int, logprob: float) -> dict[str, Any]:
            return {"token": tt.text(t), "logprob": _json_logprob(logprob), "bytes": tt.raw_bytes(t)}

        content = [
            {**entry(t, lp.token_logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
            for t, lp in zip(ids, lps, strict=False)
        ]
        return {"content": content}


def _chat_delta(i: int, out: RequestOutput) -> dict[str, Any] | None:
    comp = out.outputs[0]
    if not comp.delta_text and not out.finished:
        return None  # a partial character is held back: nothing to send yet
    return _delta(i, {"content": comp.delta_text} if comp.delta_text else {}, comp.finish_reason)


def tool_mode(body: Any) -> bool:
    """Whether a chat answer is a tool call (tool_choice "required" or a named function)."""
    return bool(getattr(body, "tools", None)) and getattr(body, "tool_choice", None) not in (
        None,
        "none",
        "auto",
    )


def _tool_delta(body: ChatCompletionRequest) -> Render:
    """Streamed tool calls: a named function's arguments as they come (its name first); the
    calls of tool_choice "required" once each choice is done (they are parsed from its whole text)."""
    named = body.tool_choice != "required"
    ids: dict[int, str] = {}
    texts: dict[int, str] = {}

    def render(i: int, out: RequestOutput) -> dict[str, Any] | None:
        comp = out.outputs[0]
        texts[i] = texts.get(i, "") + comp.delta_text
        if named:
            head: dict[str, Any] = {"index": 0, "function": {"arguments": comp.delta_text}}
            if i not in ids:
                ids[i] = call(body.tool_choice["function"]["name"], "")["id"]  # type: ignore[index]
                head = {**call(body.tool_choice["function"]["name"], comp.delta_text), "index": 0}  # type: ignore[index]
                head["id"] = ids[i]
            elif not comp.delta_text and not out.finished:
                return None
            return _delta(i, {"tool_calls": [head]}, comp.finish_reason)
        if not out.finished:
            return None
        calls = tool_calls(body, texts[i])
        if calls is None:  # not a finished call (cut by max_tokens): the text as it is
            return _delta(i, {"content": texts[i]}, comp.finish_reason)
        finish = "tool_calls" if comp.finish_reason == "stop" else comp.finish_reason
        return _delta(i, {"tool_calls": [{**c, "index": k} for k, c in enumerate(calls)]}, finish)

    return render


def _auto_tool_delta(parser: ToolParser) -> Render:
    """Streamed answers to tool_choice "auto": the text as content, held back while it may be the
    start of a call; each call whole (name and arguments) once its text is complete."""
    streams: dict[int, ToolCallStream] = {}
    sent: dict[int, int] = {}  # calls sent per choice: the next call's index

    def render(i: int, out: RequestOutput) -> dict[str, Any] | None:
        comp = out.outputs[0]
        stream = streams.setdefault(i, parser.stream())
        step = stream.step(comp.delta_text, out.finished)
        delta: dict[str, Any] = {"content": step.content} if step.content else {}
        if step.calls:
            k = sent.get(i, 0)
            delta["tool_calls"] = [{**c, "index": k + j} for j, c in enumerate(step.calls)]
            sent[i] = k + len(step.calls)
        if not delta and not out.finished:
            return None  # held back: maybe a call
        finish = comp.finish_reason
        finish = "tool_calls" if finish == "stop" and stream.called else finish
        return _delta(i, delta, finish)

    return render


def _with_reasoning(render: Render, parser: str, include: bool = True) -> Render:
    """`render` given each chunk's content only, its reasoning sent beside it as `reasoning` (and
    `reasoning_content`, the older name; not at all unless `include`): the answer's reasoning
    streams as it is made, and what follows `</think>` goes on to `render` (text, or the auto
    tool-call parser)."""
    streams: dict[int, ReasoningStream] = {}

    def wrapped(i: int, out: RequestOutput) -> dict[str, Any] | None:
        comp = out.outputs[0]
        stream = streams.setdefault(i, reasoning_stream(parser))
        part = stream.step(comp.delta_text, out.finished)
        content_only = dataclasses.replace(comp, delta_text=part.content)
        choice = render(i, dataclasses.replace(out, outputs=[content_only]))
        if not part.reasoning or not include:
            return choice
        choice = choice or _delta(i, {}, None)
        choice["delta"] = {
            "reasoning": part.reasoning,
            "reasoning_content": part.reasoning,
            **choice["delta"],
        }
        return choice

    return wrapped


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    """Chat's (logprobs, top_logprobs) as the sampler's k: None when logprobs is off. As OpenAI and
    vLLM do, top_logprobs without logprobs=true is refused rather than ignored."""
    k = body.top_logprobs
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"top_logprobs={k}; it must lie in [0, {MAX_LOGPROBS}]", param="top_logprobs")
    if k is not None and not body.logprobs:
        raise APIError(
            400,
            f"top_logprobs={k} needs logprobs=true; set logprobs to true or leave top_logprobs out",
            param="top_logprobs",
        )
    return (k or 0) if body.logprobs else None


def _usage_so_far(out: RequestOutput, made: int) -> dict[str, int]:
    p = len(out.prompt_token_ids)
    return {"prompt_tokens": p, "completion_tokens": made, "total_tokens": p + made}


def _with_tokens(render: Render, shape: Shape | None, token_ids: bool) -> Render:
    """`render`, with each chunk it sends carrying the tokens that came since the choice's last
    chunk (a chunk held back, e.g. for half a character, passes its tokens on): their logprobs
    in `shape`'s form, and their ids when `token_ids`. A choice's chunks add up to the whole
    answer's."""
    if shape is None and not token_ids:
        return render
    seen: Counter[int] = Counter()  # tokens per choice so far (the outputs' deltas: the lists grow)
    sent: Counter[int] = Counter()

    def wrapped(i: int, out: RequestOutput) -> dict[str, Any] | None:
        comp = out.outputs[0]
        seen[i] += len(comp.delta_token_ids)
        choice = render(i, out)
        if choice is None:
            return None
        a, b = sent[i], seen[i]
        sent[i] = b
        if token_ids:
            choice["token_ids"] = comp.token_ids[a:b]
        if shape is not None and comp.logprobs is not None:
            choice["logprobs"] = shape(i, comp.token_ids[a:b], comp.logprobs[a:b])
        return choice

    return wrapped


def _delta(i: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}


@dataclass(frozen=True)
class _Chunks:
    """Server-sent events of one streamed response: same id, object, creation time and model."""

    rid: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(
        self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None, **extra: Any
    ) -> str:
        obj: dict[str, Any] = {
            "id": self.rid,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        if usage is not None:
            obj["usage"] = usage
        return _event(obj)


async def merge(streams: Streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                await q.put((i, out))
        finally:
            await q.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out = await q.get()
            if out is None:
                remaining -= 1
            else:
                yield i, out
        for t in tasks:
            t.result()  # re-raise a stream's error
    finally:
        for t in tasks:
            t.cancel()


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
        except (APIError, EngineDeadError) as err:
            yield _event(to_api_error(err, "").body())
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # a client that left: abort at once
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(outs: list[RequestOutput], n: int = 1, details: bool = False) -> dict[str, Any]:
    """Token counts of an answer (outs prompt-major, n per prompt); with `details`, the prompt
    tokens found in the prefix cache, each prompt's first sample's (vLLM's cached_tokens)."""
    p = sum(len(o.prompt_token_ids) for o in outs) // n  # each prompt counts once, whatever n
    c = sum(len(o.outputs[0].token_ids) for o in outs)
    usage: dict[str, Any] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if details:
        cached = sum(o.num_cached_tokens for o in outs[::n])
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _json_logprob(x: float) -> float:
    """A logprob JSON can carry: a token a grammar forbids has -inf, sent as -9999.0 (vLLM's value)."""
    return max(x, -9999.0)
