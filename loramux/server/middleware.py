"""ASGI middleware the server adds on request: X-Request-Id on answers, the load count behind
GET /load, and the user's own middleware named by import path (vLLM's --middleware).

Boundary: ASGI scopes and messages in and out; no engine, no routes.
"""

from __future__ import annotations

import importlib
import inspect
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

REQUEST_ID = b"x-request-id"


class RequestIdHeaders:
    """Every HTTP answer carries X-Request-Id: the request's own, or a new one, which is also put
    into the request's headers so the answer's `id` is built from the same value."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = list(scope.get("headers", []))
        rid = dict(headers).get(REQUEST_ID)
        if not rid:
            rid = uuid.uuid4().hex.encode()
            scope = {**scope, "headers": [*headers, (REQUEST_ID, rid)]}

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID, rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)


@dataclass
class ServerLoad:
    """vLLM's server_load: generation requests from arrival until their answer is sent whole."""

    in_flight: int = 0


class LoadTracker:
    """Counts the requests on `paths` into `load` from arrival until their answer is sent whole
    (a stream's last event included); GET /load reads it."""

    def __init__(self, app: Any, paths: frozenset[str], load: ServerLoad) -> None:
        self.app, self.paths, self.load = app, paths, load

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if scope["type"] != "http" or path.removeprefix(root) not in self.paths:
            return await self.app(scope, receive, send)
        self.load.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.in_flight -= 1


def add_user_middleware(app: FastAPI, paths: tuple[str, ...]) -> None:
    """vLLM's --middleware: each import path names a class (app.add_middleware) or an async
    function of (request, call_next) (an HTTP middleware). ValueError names one that does not
    import or is neither."""
    for path in paths:
        module, _, name = path.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name) if module else None
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--middleware {path}: cannot import it ({e})") from None
        if inspect.isclass(obj):
            app.add_middleware(obj)
        elif inspect.iscoroutinefunction(obj):
            app.middleware("http")(obj)
        else:
            raise ValueError(
                f"--middleware {path}: give module.Class (ASGI middleware) or module.function (an "
                "async function of request and call_next)"
            )
