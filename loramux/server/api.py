"""The OpenAI-compatible HTTP API (FastAPI).

Boundary: HTTP in, engine commands out. Handlers validate bodies, map the
`model` field to the base model or an adapter, queue requests on the
`AsyncEngine` and render results (JSON or server-sent events). Every error is
answered in OpenAI's shape; the engine keeps serving everyone else.

Routes: GET /v1/models; POST /v1/completions and /v1/chat/completions (both
with `stream`); POST /v1/load_lora_adapter and /v1/unload_lora_adapter;
GET /health and GET /metrics (these two need no API key).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux import __version__
from loramux.core.adapters import AdapterNotFoundError
from loramux.core.scheduler import QueueFullError
from loramux.engine.chat import render_chat
from loramux.engine.llm_engine import EngineDeadError, RequestFailedError
from loramux.engine.outputs import RequestOutput
from loramux.sampling_params import SamplingParams
from loramux.server.async_engine import AsyncEngine
from loramux.server.metrics import Metrics
from loramux.server.paths import allowed_path
from loramux.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
)
from loramux.server.token_text import TokenText

logger = logging.getLogger("loramux.server")
T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    """The `model` id of the base model."""
    api_key: str | None = None
    """If set, every /v1 route needs `Authorization: Bearer <key>`."""
    allowed_lora_dirs: tuple[str, ...] = ()
    """Runtime adapter loads must resolve inside one of these; none: runtime loading is off."""
    log_prompts: bool = False
    """Write prompt text to the log (off: only ids and lengths)."""
    max_request_bytes: int = 8 << 20
    """Larger request bodies are refused with 413 before they are read whole."""


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


# Declared in the OpenAPI document: every error comes in OpenAI's shape; streams are SSE.
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in (
        (400, "invalid request"),
        (401, "missing or wrong API key"),
        (403, "not allowed (adapter folder)"),
        (404, "unknown model or adapter"),
        (413, "request body too large"),
        (503, "busy (queue full) or engine stopped"),
    )
}
_STREAMS = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}}


def build_app(aengine: AsyncEngine, cfg: ServerConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="loramux", version=__version__, docs_url="/docs", redoc_url=None, responses=_ERRORS)
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes)
    api = _API(aengine, cfg, metrics)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.check_key)])
    v1.add_api_route("/models", api.models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", api.model, methods=["GET"])
    v1.add_api_route("/completions", api.completions, methods=["POST"], responses=_STREAMS)
    v1.add_api_route("/chat/completions", api.chat, methods=["POST"], responses=_STREAMS)
    v1.add_api_route("/load_lora_adapter", api.load_lora, methods=["POST"])
    v1.add_api_route("/unload_lora_adapter", api.unload_lora, methods=["POST"])
    app.include_router(v1)
    keyed = [Depends(api.check_key)]
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"], dependencies=keyed)
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"], dependencies=keyed)
    app.add_api_route("/version", api.version, methods=["GET"])
    app.add_api_route("/ping", api.health, methods=["GET", "POST"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route(
        "/metrics", api.prometheus, methods=["GET"], responses={200: {"content": {"text/plain": {}}}}
    )
    return app


class _BodyLimit:
    """Refuse request bodies over `limit` bytes (413, OpenAI's shape) without reading them whole."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(int(declared), send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge as e:
            await self._refuse(e.size, send)

    async def _refuse(self, size: int, send: Any) -> None:
        err = APIError(
            413,
            f"the request body of {size} bytes or more exceeds the server's limit of {self.limit} bytes; "
            f"send less per request, or start the server with a larger --max-request-bytes",
        )
        await JSONResponse(err.body(), status_code=413)({"type": "http"}, None, send)  # type: ignore[arg-type]


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _install_error_handlers(app: FastAPI) -> None:
    def render(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api(_: Request, e: APIError) -> JSONResponse:
        return render(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return render(APIError(400, f"the request body is not valid JSON: {first.get('msg')}"))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return render(APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = str(e.detail)
        if e.status_code == 400 and "parsing the body" in detail:  # FastAPI could not decode it
            detail = "the request body is not valid JSON in UTF-8; send a UTF-8 encoded JSON object"
        return render(APIError(e.status_code, detail, code=None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return render(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))


def _to_api_error(e: Exception, model: str) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, AdapterNotFoundError):
        return APIError(
            404, f"the model {model!r} does not exist: {e}", code="model_not_found", param="model"
        )
    if isinstance(e, QueueFullError):
        return APIError(
            503,
            f"the server is busy: {e}",
            type_="server_error",
            code="server_busy",
            headers={"Retry-After": "1"},
        )
    if isinstance(e, ValueError | TypeError):
        return APIError(400, str(e))
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), type_="server_error", code="engine_dead")
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e), type_="server_error", code="request_failed")
    raise e


class _API:
    def __init__(self, aengine: AsyncEngine, cfg: ServerConfig, metrics: Metrics) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.cfg = cfg
        self.metrics = metrics
        self.created = int(time.time())
        self.allowed = [Path(d).resolve() for d in cfg.allowed_lora_dirs]

    async def check_key(self, request: Request) -> None:
        key = self.cfg.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {key}":
            raise APIError(
                401, "missing or wrong API key; send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    # --- adapters and models ---
    async def model(self, model_id: str) -> dict[str, Any]:
        for card in (await self.models())["data"]:
            if card["id"] == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found", param="model")

    async def models(self) -> dict[str, Any]:
        infos = await self.aengine.call(self.engine.list_loras)
        base = self.cfg.served_model_name
        data = [
            {
                "id": base,
                "object": "model",
                "created": self.created,
                "owned_by": "loramux",
                "root": self.engine.config.model.model,
                "parent": None,
                "max_model_len": self.engine.runtime.max_model_len,
            }
        ]
        data += [
            {
                "id": a.name,
                "object": "model",
                "created": self.created,
                "owned_by": "loramux",
                "root": a.path,
                "parent": base,
            }
            for a in infos
        ]
        return {"object": "list", "data": data}

    async def load_lora(self, body: LoadLoRARequest) -> dict[str, Any]:
        path = self._allowed_path(body.lora_path)
        try:
            info = await self.aengine.call(self.engine.add_lora, body.lora_name, str(path), body.pinned)
        except ValueError as e:
            raise APIError(400, f"cannot load adapter {body.lora_name!r}: {e}", param="lora_path") from e
        logger.info("loaded adapter %s (rank %d) from %s", info.name, info.rank, path)
        return {
            "object": "lora_adapter",
            "id": info.name,
            "rank": info.rank,
            "version": info.version,
            "message": f"adapter {info.name!r} loaded",
        }

    def _allowed_path(self, raw: str) -> Path:
        return allowed_path(raw, self.allowed)

    async def unload_lora(self, body: UnloadLoRARequest) -> dict[str, Any]:
        try:
            await self.aengine.call(self.engine.remove_lora, body.lora_name)
        except AdapterNotFoundError as e:
            known = ", ".join(sorted(await self.aengine.call(self.engine.lora_names))) or "none"
            raise APIError(
                404,
                f"adapter {body.lora_name!r} is not loaded, so there is nothing to unload; "
                f"loaded adapters: {known}",
                code="model_not_found",
                param="lora_name",
            ) from e
        logger.info("unloaded adapter %s", body.lora_name)
        return {
            "object": "lora_adapter",
            "id": body.lora_name,
            "message": f"adapter {body.lora_name!r} unloaded",
        }

    # --- tokenizer ---
    async def _tokenizer_for(self, model: str | None) -> Any:
        """The tokenizer (shared by every adapter); `model`, if given, must name a served model
        (asked on the engine thread: the adapters change there)."""
        if (
            model is not None
            and model != self.cfg.served_model_name
            and not await self.aengine.call(self.engine.has_lora, model)
        ):
            raise APIError(404, f"the model {model!r} does not exist", code="model_not_found", param="model")
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer; send and read token ids")
        return tok

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        tok = await self._tokenizer_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of `prompt` and `messages`", param="prompt")
        if body.messages is not None:
            try:
                ids = render_chat(tok, body.messages, body.add_generation_prompt)
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from e
        else:
            ids = list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return {
            "count": len(ids),
            "max_model_len": self.engine.runtime.max_model_len,
            "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None,
        }

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        tok = await self._tokenizer_for(body.model)
        vocab = self.engine.runtime.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} lie outside [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    async def version(self) -> dict[str, str]:
        return {"version": __version__}

    # --- health and metrics ---
    async def health(self) -> Response:
        if not self.aengine.alive:
            dead = self.engine.dead
            return JSONResponse(
                {"status": "engine stopped", "error": None if dead is None else str(dead)}, status_code=503
            )
        reading = self.engine.loras_loading()
        if reading:  # serving; requests for these adapters wait for their weights
            return JSONResponse({"status": "loading", "adapters_loading": reading})
        return JSONResponse({"status": "ok"})

    async def prometheus(self) -> Response:
        snap = await self.aengine.call(self.engine.snapshot)
        return Response(self.metrics.render(snap), media_type=CONTENT_TYPE_LATEST)

    # --- generation ---
    def _lora(self, model: str) -> str | None:
        return None if model == self.cfg.served_model_name else model

    async def _start(
        self,
        rid: str,
        prompt: str | list[int],
        params: SamplingParams,
        model: str,
        tenant: str,
        fill: bool = False,
    ) -> list[AsyncIterator[RequestOutput]]:
        lora = self._lora(model)
        if self.cfg.log_prompts:
            logger.info("request %s model=%s prompt=%r", rid, model, prompt)
        else:
            logger.debug("request %s model=%s", rid, model)
        try:
            return await self.aengine.add_request_n(rid, prompt, params, lora, tenant, fill)
        except Exception as e:
            err = _to_api_error(e, model)
            self.metrics.ended(model if err.status != 404 else "unknown", "rejected")
            raise err from e

    async def _start_all(
        self,
        rid: str,
        prompts: list[str | list[int]],
        params: SamplingParams,
        model: str,
        tenant: str,
        fill: bool = False,
    ) -> list[AsyncIterator[RequestOutput]]:
        """One stream per (prompt, sample), prompt-major: stream k is choice k."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for i, p in enumerate(prompts):
                streams += await self._start(f"{rid}-{i}", p, params, model, tenant, fill)
        except APIError:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]  # aborts what was started
            raise
        return streams

    async def _final(self, streams: list[AsyncIterator[RequestOutput]], model: str) -> list[RequestOutput]:
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
            raise _to_api_error(e, model) from e
        finally:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
        for out in outs:
            self.metrics.finished(model, out)
        for out in outs:
            _raise_if_ended_badly(out, model)
        return outs

    async def _unless_gone(self, request: Request, work: Awaitable[T], model: str, n: int) -> T:
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

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        if body.echo and body.logprobs is not None:
            raise APIError(
                400,
                "echo with logprobs needs the prompt's logprobs, which loramux does not compute; "
                "drop one of them",
                param="echo",
            )
        params = body.sampling_params(16 if body.max_tokens is None else body.max_tokens, body.logprobs)
        prompts = body.prompts()
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._start_all(rid, prompts, params, body.model, body.user or "")
        if body.stream:
            return _sse(self._stream_completion(rid, body, streams))
        try:
            outs = await self._unless_gone(
                request, self._final(streams, body.model), body.model, len(streams)
            )
        except ClientGone:
            return Response(status_code=499)
        choices = [self._completion_choice(i, o, body) for i, o in enumerate(outs)]
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": choices,
                "usage": _usage(outs, body.n),
            }
        )

    def _completion_choice(self, i: int, out: RequestOutput, body: CompletionRequest) -> dict[str, Any]:
        comp = out.outputs[0]
        choice: dict[str, Any] = {
            "index": i,
            "text": (self._prompt_text(out) if body.echo else "") + comp.text,
            "logprobs": None,
            "finish_reason": comp.finish_reason,
        }
        if body.logprobs is not None and comp.logprobs is not None:
            choice["logprobs"] = self._completion_logprobs(comp.token_ids, comp.logprobs)
        if body.return_token_ids:
            choice["token_ids"] = comp.token_ids
            choice["prompt_token_ids"] = out.prompt_token_ids
        return choice

    def _prompt_text(self, out: RequestOutput) -> str:
        """The prompt as text, for echo (token-id prompts are decoded)."""
        if out.prompt is not None:
            return out.prompt
        tok = self.engine.tokenizer
        return tok.decode(out.prompt_token_ids) if tok is not None else ""

    def _completion_logprobs(self, ids: list[int], lps: list[Any]) -> dict[str, Any]:
        """OpenAI's legacy shape: tokens as decoded text, their offsets in the completion text."""
        tt = TokenText(self.engine.tokenizer)
        texts = [tt.text(t) for t in ids]
        return {
            "tokens": texts,
            "token_logprobs": [lp.token_logprob for lp in lps],
            "top_logprobs": [{tt.text(a): v for a, v in lp.top} for lp in lps],
            "text_offset": tt.offsets(texts),
        }

    async def _stream_completion(
        self, rid: str, body: CompletionRequest, streams: list[AsyncIterator[RequestOutput]]
    ) -> AsyncIterator[str]:
        chunk = _Chunks(rid, "text_completion", body.model)
        finals: list[RequestOutput] = []
        echoed: set[int] = set()
        async with self._closing(streams, finals, body.model):
            async for i, out in _merge(streams):
                comp = out.outputs[0]
                _raise_if_ended_badly(out, body.model)
                head = ""
                if body.echo and i not in echoed:  # the prompt goes first, once per choice
                    echoed.add(i)
                    head = self._prompt_text(out)
                if not head and not comp.delta_text and not out.finished and not body.return_token_ids:
                    continue  # the detokenizer holds back a partial character: nothing to send yet
                choice = {
                    "index": i,
                    "text": head + comp.delta_text,
                    "logprobs": None,
                    "finish_reason": comp.finish_reason,
                }
                if body.return_token_ids:
                    choice["token_ids"] = comp.delta_token_ids
                yield chunk([choice])
                if out.finished:
                    finals.append(out)
                    self.metrics.finished(body.model, out)
        if body.include_usage:
            yield chunk([], usage=_usage(finals, body.n))

    @contextlib.asynccontextmanager
    async def _closing(
        self, streams: list[AsyncIterator[RequestOutput]], finals: list[RequestOutput], model: str
    ) -> AsyncIterator[None]:
        """Close every stream when a streaming response ends, aborting the unfinished ones."""
        try:
            yield
        finally:
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]
            for _ in range(len(streams) - len(finals)):
                self.metrics.ended(model, "abort")

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        prompt = self._render_chat(body)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(limit or 1, k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start_all(
            rid, [prompt], params, body.model, body.user or "", fill=limit is None
        )
        if body.stream:
            return _sse(self._stream_chat(rid, body, streams))
        try:
            outs = await self._unless_gone(
                request, self._final(streams, body.model), body.model, len(streams)
            )
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(outs):
            comp = out.outputs[0]
            choice: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": comp.text},
                "logprobs": self._chat_logprobs(comp) if body.logprobs else None,
                "finish_reason": comp.finish_reason,
            }
            if body.return_token_ids:
                choice["token_ids"] = comp.token_ids
            choices.append(choice)
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": choices,
                "usage": _usage(outs, body.n),
            }
        )

    def _render_chat(self, body: ChatCompletionRequest) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            return render_chat(tok, messages)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e

    def _chat_logprobs(self, comp: Any) -> dict[str, Any] | None:
        if comp.logprobs is None:
            return None
        tt = TokenText(self.engine.tokenizer)

        def entry(t: int, logprob: float) -> dict[str, Any]:
            return {"token": tt.text(t), "logprob": logprob, "bytes": tt.raw_bytes(t)}

        content = [
            {**entry(t, lp.token_logprob), "top_logprobs": [entry(a, v) for a, v in lp.top]}
            for t, lp in zip(comp.token_ids, comp.logprobs, strict=False)
        ]
        return {"content": content}

    async def _stream_chat(
        self, rid: str, body: ChatCompletionRequest, streams: list[AsyncIterator[RequestOutput]]
    ) -> AsyncIterator[str]:
        chunk = _Chunks(rid, "chat.completion.chunk", body.model)

        def choice(i: int, delta: dict[str, Any], finish: str | None) -> list[dict[str, Any]]:
            return [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]

        for i in range(len(streams)):
            yield chunk(choice(i, {"role": "assistant", "content": ""}, None))
        finals: list[RequestOutput] = []
        async with self._closing(streams, finals, body.model):
            async for i, out in _merge(streams):
                comp = out.outputs[0]
                _raise_if_ended_badly(out, body.model)
                if not comp.delta_text and not out.finished:
                    continue  # a partial character is held back: nothing to send yet
                yield chunk(
                    choice(i, {"content": comp.delta_text} if comp.delta_text else {}, comp.finish_reason)
                )
                if out.finished:
                    finals.append(out)
                    self.metrics.finished(body.model, out)
        if body.include_usage:
            yield chunk([], usage=_usage(finals, body.n))


@dataclass(frozen=True)
class _Chunks:
    """Server-sent events of one streamed response: same id, object, creation time and model."""

    rid: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def __call__(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj: dict[str, Any] = {
            "id": self.rid,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = usage
        return _event(obj)


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


def _raise_if_ended_badly(out: RequestOutput, model: str) -> None:
    """A request that failed on its own (finish_reason "error") or waited past its
    max_queue_time (no tokens) is answered as an error, not as a short completion."""
    if out.finished and out.error is not None:
        raise _to_api_error(out.error, model)
    if out.finished and out.outputs[0].finish_reason == "timeout":
        m = out.metrics
        waited = f"{(m.finished_time or m.arrival_time) - m.arrival_time:.2f} s " if m is not None else ""
        raise APIError(
            503,
            f"the request waited {waited}in the queue without starting, longer than its "
            f"max_queue_time; the server is busy: retry later or allow a longer max_queue_time",
            type_="server_error",
            code="queue_timeout",
            param="max_queue_time",
            headers={"Retry-After": "1"},
        )


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for e in events:
                yield e
        except (APIError, EngineDeadError) as err:
            api = _to_api_error(err, "")
            yield _event(api.body())
        finally:
            await events.aclose()  # type: ignore[attr-defined]  # a client that left: abort at once
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _usage(outs: list[RequestOutput], n: int = 1) -> dict[str, int]:
    p = sum(len(o.prompt_token_ids) for o in outs) // n  # each prompt counts once, whatever n
    c = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
