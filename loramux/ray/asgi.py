"""Run one HTTP request through an ASGI app in-process, streaming the answer.

Boundary: ASGI plumbing only, no Ray and no loramux internals. A Ray replica
uses it to answer a forwarded request with the very FastAPI app that
`loramux serve` runs, so there is one server, not two. The answer comes as
(status, headers) first, then the body's chunks as the app sends them (server-
sent events stay a stream). Closing the iterator early is the client leaving:
the app sees `http.disconnect`, as it would under uvicorn, and aborts its
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

Head = tuple[int, list[tuple[str, str]]]


async def call_asgi(
    app: Any, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
) -> AsyncIterator[Head | bytes]:
    """Yield the response head (status, headers), then its body chunks."""
    sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: sent.put_nowait(None))
    try:
        while True:
            message = await sent.get()
            if message is None:
                task.result()  # the app ended without finishing its answer: raise its error
                return
            if message["type"] == "http.response.start":
                raw = message.get("headers", [])
                yield message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=5)
            task.cancel()
