"""The OpenAI-compatible HTTP API (FastAPI): the app, its routes, and the routes that are not generation.

Boundary: HTTP in, engine commands out. Handlers validate bodies, map the
`model` field to the base model or an adapter and ask the `AsyncEngine`;
generation lives in generate.py, errors in OpenAI's shape in errors.py. Every
error is answered in OpenAI's shape; the engine keeps serving everyone else.

Routes: GET /v1/models; POST /v1/completions and /v1/chat/completions (both
with `stream`); POST /v1/load_lora_adapter and /v1/unload_lora_adapter;
POST /tokenize and /detokenize; GET /version; GET /health and GET /metrics
(these two need no API key); GET /load with --enable-server-load-tracking.
"""

from __future__ import annotations

import hmac
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loramux import __version__
from loramux.core.adapters import AdapterNotFoundError
from loramux.engine.chat import render_chat
from loramux.server.async_engine import AsyncEngine
from loramux.server.errors import DECLARED, BodyLimit, install_error_handlers
from loramux.server.generate import Generate
from loramux.server.invocations import Invocations
from loramux.server.messages import Messages
from loramux.server.metrics import Metrics
from loramux.server.middleware import LoadTracker, RequestIdHeaders, ServerLoad, add_user_middleware
from loramux.server.paths import allowed_path
from loramux.server.protocol import (
    APIError,
    DetokenizeRequest,
    LoadLoRARequest,
    TokenizeRequest,
    UnloadLoRARequest,
)
from loramux.server.resolver import AdapterResolver
from loramux.server.responses import Responses
from loramux.server.server_config import ServerConfig

logger = logging.getLogger("loramux.server")
_GENERATION = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages",
    "/invocations",
)  # what --enable-server-load-tracking counts
_STREAMS = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}}


def build_app(aengine: AsyncEngine, cfg: ServerConfig, metrics: Metrics) -> FastAPI:
    app = FastAPI(
        title="loramux",
        version=__version__,
        docs_url="/docs" if cfg.docs else None,
        openapi_url="/openapi.json" if cfg.docs else None,
        redoc_url=None,
        root_path=cfg.root_path,
        responses=DECLARED,
    )
    install_error_handlers(app)
    add_user_middleware(app, cfg.middleware)  # innermost: our middleware has acted before theirs
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    if cfg.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.allowed_origins),
            allow_methods=list(cfg.allowed_methods),
            allow_headers=list(cfg.allowed_headers),
            allow_credentials=cfg.allow_credentials,
        )
    load = ServerLoad()
    if cfg.load_tracking:
        app.add_middleware(LoadTracker, paths=frozenset(_GENERATION), load=load)

        async def server_load() -> dict[str, int]:
            return {"server_load": load.in_flight}

        app.add_api_route("/load", server_load, methods=["GET"])
    if cfg.request_id_headers:
        app.add_middleware(RequestIdHeaders)  # outermost: every answer, refusals included
    resolver = AdapterResolver(aengine, cfg)
    api = _API(aengine, cfg, metrics, resolver)
    gen = Generate(aengine, metrics, cfg, resolver)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.check_key)])
    v1.add_api_route("/models", api.models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", api.model, methods=["GET"])
    v1.add_api_route("/completions", gen.completions, methods=["POST"], responses=_STREAMS)
    v1.add_api_route("/chat/completions", gen.chat, methods=["POST"], responses=_STREAMS)
    responses = Responses(gen, cfg.max_stored_responses)
    v1.add_api_route("/responses", responses.create, methods=["POST"], responses=_STREAMS)
    v1.add_api_route("/responses/{response_id}", responses.retrieve, methods=["GET"])
    v1.add_api_route("/responses/{response_id}", responses.delete, methods=["DELETE"])
    v1.add_api_route("/responses/{response_id}/input_items", responses.input_items, methods=["GET"])
    v1.add_api_route("/responses/{response_id}/cancel", responses.cancel, methods=["POST"])
    messages = Messages(gen)
    v1.add_api_route("/messages", messages.create, methods=["POST"], responses=_STREAMS)
    v1.add_api_route("/messages/count_tokens", messages.count_tokens, methods=["POST"])
    v1.add_api_route("/load_lora_adapter", api.load_lora, methods=["POST"])
    v1.add_api_route("/unload_lora_adapter", api.unload_lora, methods=["POST"])
    app.include_router(v1)
    keyed = [Depends(api.check_key)]
    app.add_api_route(
        "/invocations",
        Invocations(gen, responses).answer,
        methods=["POST"],
        dependencies=keyed,
        responses=_STREAMS,
    )
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"], dependencies=keyed)
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"], dependencies=keyed)
    app.add_api_route("/version", api.version, methods=["GET"])
    app.add_api_route("/ping", api.health, methods=["GET", "POST"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route(
        "/metrics", api.prometheus, methods=["GET"], responses={200: {"content": {"text/plain": {}}}}
    )
    return app


def check_api_key(keys: tuple[str, ...], request: Request) -> None:
    """401 in OpenAI's shape unless `keys` is empty or the request sends one of them as a bearer
    token (compared in constant time)."""
    if not keys:
        return
    sent = request.headers.get("authorization", "").encode()
    anthropic = request.headers.get("x-api-key", "").encode()  # the header Anthropic's clients send
    if not any(
        hmac.compare_digest(sent, f"Bearer {k}".encode()) or hmac.compare_digest(anthropic, k.encode())
        for k in keys
    ):
        raise APIError(
            401,
            "missing or wrong API key; send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
            code="invalid_api_key",
        )


class _API:
    def __init__(
        self, aengine: AsyncEngine, cfg: ServerConfig, metrics: Metrics, resolver: AdapterResolver
    ) -> None:
        self.aengine = aengine
        self.engine = aengine.engine
        self.cfg = cfg
        self.metrics = metrics
        self.created = int(time.time())
        self.allowed = [Path(d).resolve() for d in cfg.allowed_lora_dirs]
        self.resolver = resolver

    async def check_key(self, request: Request) -> None:
        check_api_key(self.cfg.api_keys, request)

    # --- adapters and models ---
    async def model(self, model_id: str) -> dict[str, Any]:
        for card in (await self.models())["data"]:
            if card["id"] == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found", param="model")

    async def models(self) -> dict[str, Any]:
        infos = await self.aengine.call(self.engine.list_loras)
        base = self.cfg.served_model_name

        def card(name: str, root: str | None, parent: str | None, **extra: Any) -> dict[str, Any]:
            common = {"object": "model", "created": self.created, "owned_by": "loramux"}
            return {"id": name, **common, "root": root, "parent": parent, **extra}

        limit = self.engine.runtime.max_model_len
        root = self.engine.config.model.model
        data = [card(name, root, None, max_model_len=limit) for name in self.cfg.base_names]
        return {"object": "list", "data": data + [card(a.name, a.path, base) for a in infos]}

    async def load_lora(self, body: LoadLoRARequest) -> dict[str, Any]:
        if body.lora_name in self.cfg.base_names:
            raise APIError(
                400,
                f"{body.lora_name!r} is the base model's name; give the adapter another lora_name",
                param="lora_name",
            )
        path = allowed_path(body.lora_path, self.allowed)
        name, inplace = body.lora_name, body.load_inplace
        try:
            info = await self.aengine.call(self.engine.add_lora, name, str(path), body.pinned, inplace)
        except ValueError as e:
            raise APIError(400, f"cannot load adapter {name!r}: {e}", param="lora_path") from e
        logger.info("loaded adapter %s (rank %d) from %s%s", name, info.rank, path, " in place" * inplace)
        return {
            "object": "lora_adapter",
            "id": info.name,
            "rank": info.rank,
            "version": info.version,
            "message": f"adapter {info.name!r} loaded{' in place' * inplace}",
        }

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
            and model not in self.cfg.base_names
            and not await self.aengine.call(self.engine.has_lora, model)
            and self.resolver.find(model) is None  # served once asked for
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
                options = body.template_options(self.cfg.default_chat_template_kwargs)
                ids = render_chat(tok, body.messages, **options)
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
