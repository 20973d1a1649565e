"""SageMaker's POST /invocations (vLLM serves it too): one route for the generation APIs.

Boundary: a JSON body in; by its shape, the chat route (`messages`), the completions route
(`prompt`) or the Responses API (`input`) answers it, as if it had been sent there. Unlike
vLLM's, the route asks for the API key like the /v1 routes do.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from loramux.server.errors import validated
from loramux.server.generate import Generate
from loramux.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from loramux.server.responses import Responses
from loramux.server.responses_input import ResponsesRequest

_KINDS = {"messages": "chat", "prompt": "completions", "input": "Responses API"}


class Invocations:
    def __init__(self, gen: Generate, responses: Responses) -> None:
        self.routes: dict[str, tuple[type, Callable[[Any, Request], Awaitable[Response]]]] = {
            "messages": (ChatCompletionRequest, gen.chat),
            "prompt": (CompletionRequest, gen.completions),
            "input": (ResponsesRequest, responses.create),
        }

    async def answer(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        keys = [k for k in _KINDS if isinstance(body, dict) and k in body]
        if len(keys) != 1:
            shapes = ", ".join(f"{k} ({v})" for k, v in _KINDS.items())
            raise APIError(400, f"/invocations takes a body with one of {shapes}; this one has {len(keys)}")
        cls, route = self.routes[keys[0]]
        return await route(validated(cls, body), request)
