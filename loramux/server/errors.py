"""Every error the HTTP API answers, in OpenAI's shape.

Boundary: exceptions in, `APIError`s and JSON responses out. The engine's
exceptions map to status codes here (`to_api_error`), FastAPI's own errors are
rewritten into the same shape (`install_error_handlers`), and oversized bodies
are refused before they are read (`BodyLimit`). No route lives here.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.core.adapters import AdapterNotFoundError
from loramux.core.scheduler import QueueFullError
from loramux.engine.llm_engine import EngineDeadError, RequestFailedError
from loramux.engine.outputs import RequestOutput
from loramux.server.protocol import APIError, ErrorResponse

logger = logging.getLogger("loramux.server")
B = TypeVar("B", bound=BaseModel)

# Declared in the OpenAPI document: every error comes in OpenAI's shape.
DECLARED: dict[int | str, dict[str, Any]] = {
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


def to_api_error(e: Exception, model: str) -> APIError:
    """The engine's exceptions as HTTP errors; anything else is re-raised (a 500 upstream)."""
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


def raise_if_ended_badly(out: RequestOutput, model: str) -> None:
    """A request that failed on its own (finish_reason "error") or waited past its
    max_queue_time (no tokens) is answered as an error, not as a short completion."""
    if out.finished and out.error is not None:
        raise to_api_error(out.error, model)
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


def validated(cls: type[B], data: Any) -> B:
    """`data` as the request body `cls`; invalid, the 400 FastAPI's own validation gives (for
    bodies a route reads itself: /invocations, the Responses API's chat request)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_type(status: int) -> str:
    """The error type Anthropic's Messages API gives an HTTP status."""
    return ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def install_error_handlers(app: FastAPI) -> None:
    def render(e: APIError, request: Request) -> JSONResponse:
        body = e.body()
        if "/v1/messages" in request.url.path:  # Anthropic's Messages API: its clients read its shape
            body = {"type": "error", "error": {"type": anthropic_type(e.status), "message": e.message}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api(request: Request, e: APIError) -> JSONResponse:
        return render(e, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return render(APIError(400, f"the request body is not valid JSON: {first.get('msg')}"), request)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return render(APIError(400, message, param=where or None), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = str(e.detail)
        if e.status_code == 400 and "parsing the body" in detail:  # FastAPI could not decode it
            detail = "the request body is not valid JSON in UTF-8; send a UTF-8 encoded JSON object"
        return render(APIError(e.status_code, detail, code=None), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return render(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"), request)


class BodyLimit:
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
