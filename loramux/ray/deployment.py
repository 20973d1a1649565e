"""loramux on Ray Serve: many engines behind one OpenAI endpoint, routed by adapter.

Boundary: Ray Serve wiring. Two deployments:

- `Replica`: one loramux engine and the very FastAPI app `loramux serve` runs
  (built by `loramux.server.builder.build_server`), answering forwarded HTTP requests
  in-process (`loramux.ray.asgi`). Its adapters are Ray Serve *multiplexed
  models*: the first request for an adapter registers it through the engine's
  own load path (`LLMEngine.add_lora`), at most `max_cpu_loras` stay
  registered (the engine's host adapter capacity), and Ray's LRU eviction of one
  unregisters it (in-flight requests finish first, as with
  /v1/unload_lora_adapter).
- `Router`: the HTTP ingress. It checks the API key first (401 in OpenAI's
  shape for every keyed path, before any replica is asked or anything is
  loaded, so an unknown name without a key tells nothing either), then
  reads the `model` field of a request and
  forwards the raw request to a replica with that model as the multiplexed
  model id, so Ray's router prefers a replica that already holds the adapter
  and loads it elsewhere only when those are busy or gone. It answers
  /v1/models from the catalog, /health, and /metrics (every replica's
  loramux metrics, labelled `replica`, pushed to it once a second; a replica
  that stopped reporting leaves them after STALE_AFTER_S).

An adapter a request was routed to stays registered until that request is
done: if Ray's LRU evicts it meanwhile (a concurrent request for another
adapter), the replica unregisters it only when its last such request ends.

A replica that dies mid-request turns into a 503 (code `replica_failed`, in
OpenAI's shape; a stream ends with that error event); Ray Serve restarts it.
Runtime loading and unloading (/v1/load_lora_adapter) is per server, so on a
cluster it is refused with the fix: name adapters with --lora-modules or put
them in an --allowed-lora-dirs folder; they load where they are used.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# after Ray Serve has re-wrapped them, so they must be real objects, not strings.
import argparse
import asyncio
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from loramux.ray.asgi import call_asgi
from loramux.ray.catalog import Catalog
from loramux.server.api import check_api_key
from loramux.server.protocol import APIError

logger = logging.getLogger("loramux.ray")
APP_NAME = "loramux"
REPLICA_HEADER = "x-loramux-replica"
REPORT_EVERY_S = 1.0
STALE_AFTER_S = 15.0
OPEN_PATHS = frozenset({"/health", "/metrics", "/ping", "/version", "/docs", "/openapi.json"})  # no key


def _catalog(args: argparse.Namespace) -> Catalog:
    from loramux.server.builder import base_model, model_aliases

    _, name, loras = base_model(args)
    return Catalog.create(name, loras, args.allowed_lora_dirs, model_aliases(args))


class _Held:
    """One adapter a replica holds for Ray's multiplexer; Ray calls __del__ when it evicts it."""

    def __init__(self, replica: "Replica", name: str) -> None:
        self.replica, self.name, self.released = replica, name, False

    def __del__(self) -> None:
        if not self.released:  # Ray's eviction calls it, then the garbage collector may again
            self.released = True
            self.replica.release(self)


class Pins:
    """Adapters held by requests in flight on a replica. Ray's eviction of one (`release`) is
    carried out at once when no request holds it, else when the last one that does ends."""

    def __init__(self, unregister: Callable[["_Held"], None]) -> None:
        self.unregister = unregister
        self.count: Counter[str] = Counter()
        self.evicted: dict[str, _Held] = {}  # evicted while held: unregistered on the last leave

    def enter(self, name: str) -> None:
        self.count[name] += 1

    def leave(self, name: str) -> None:
        self.count[name] -= 1
        if self.count[name] <= 0:
            del self.count[name]
            held = self.evicted.pop(name, None)
            if held is not None:
                self.unregister(held)

    def release(self, held: "_Held") -> None:
        if self.count[held.name] > 0:
            self.evicted[held.name] = held  # a later holder of the name replaces an earlier one
        else:
            self.unregister(held)


class Replica:
    """One engine and its app; see the module docstring."""

    def __init__(self, args: argparse.Namespace) -> None:
        from loramux.server.builder import build_server

        self.args = args
        self.built = build_server(args, register_loras=False, keep_responses=False)
        self.engine = self.built.aengine.engine
        self.catalog = _catalog(args)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.held: dict[str, _Held] = {}  # adapters registered here, by name
        self.requests: Counter[str] = Counter()  # adapter requests: "hit" (held on arrival) or "load"
        self.pins = Pins(self._unregister)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.capacity = capacity = self.engine.limits().max_cpu_loras

        async def load(name: str) -> _Held:
            return await self._load(name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=capacity)(load)
        self._reporter: asyncio.Task[None] | None = None

    def _start_reporting(self) -> None:
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _load(self, name: str) -> _Held:
        path = self.catalog.path(name)
        held = _Held(self, name)
        await self.built.aengine.call(self._register, held, path)
        logger.info("replica %s registered adapter %s from %s", self.id, name, path)
        return held

    def _register(self, held: _Held, path: str) -> None:  # on the engine thread
        if self.engine.has_lora(held.name):  # an earlier holder's registration is still there
            self.engine.remove_lora(held.name)
        self.engine.add_lora(held.name, path)
        self.held[held.name] = held

    def release(self, held: _Held) -> None:
        """Ray evicted `held`: unregister it once no request in flight holds it (`Pins`). Called
        from Ray's eviction or the garbage collector, so it hops onto the replica's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._unregister(held)
        else:
            loop.call_soon_threadsafe(self.pins.release, held)

    def _unregister(self, held: _Held) -> None:
        """Unregister the adapter `held` stands for, unless it was registered again since."""

        def unregister() -> None:  # on the engine thread, between steps
            if self.held.get(held.name) is held:
                del self.held[held.name]
                self.engine.remove_lora(held.name)
                logger.info("replica %s unregistered adapter %s", self.id, held.name)

        self.built.aengine.submit(unregister)

    async def answer(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Any]:
        """Answer one forwarded HTTP request: (status, headers), then body chunks."""
        self._start_reporting()
        self._loop = asyncio.get_running_loop()
        model = serve.get_multiplexed_model_id()
        if model:
            self.pins.enter(model)  # held from before its load until this answer is done
        try:
            if model:
                held = model in self.held
                try:
                    await self._adapter(model)
                    self.requests["hit" if held else "load"] += 1
                except (APIError, ValueError) as e:
                    err = (
                        e
                        if isinstance(e, APIError)
                        else APIError(400, f"cannot load adapter {model!r}: {e}", param="model")
                    )
                    yield err.status, [("content-type", "application/json")]
                    yield json.dumps(err.body()).encode()
                    return
            first = True
            async for item in call_asgi(self.built.app, method, path, query, headers, body):
                if first:
                    status, head = item
                    item, first = (status, [*head, (REPLICA_HEADER, self.id)]), False
                yield item
        finally:
            if model:
                self.pins.leave(model)

    async def metrics_text(self) -> str:
        """This replica's loramux metrics (Prometheus text) and its adapter routing counts."""
        snap = await self.built.aengine.call(self.engine.snapshot)
        lines = [
            "# HELP loramux_ray_adapter_requests_total Adapter requests this replica got, by whether it "
            "already held the adapter (hit) or registered it for the request (load).",
            "# TYPE loramux_ray_adapter_requests_total counter",
        ]
        lines += [
            f'loramux_ray_adapter_requests_total{{outcome="{k}"}} {self.requests[k]}' for k in ("hit", "load")
        ]
        lines += [
            "# HELP loramux_ray_adapters_held Adapters registered on this replica (Ray multiplexed models).",
            "# TYPE loramux_ray_adapters_held gauge",
            f"loramux_ray_adapters_held {len(self.held)}",
            "# HELP loramux_ray_adapters_capacity Adapters this replica holds at most (max_cpu_loras).",
            "# TYPE loramux_ray_adapters_capacity gauge",
            f"loramux_ray_adapters_capacity {self.capacity}",
        ]
        return self.built.metrics.render(snap).decode() + "\n".join(lines) + "\n"

    async def _report_forever(self) -> None:
        router = serve.get_deployment_handle("Router", app_name=serve.get_replica_context().app_name)
        while True:
            try:
                await router.report.remote(self.id, await self.metrics_text())
            except Exception as e:  # the router restarts, or the app is going down
                logger.debug("metrics report failed: %s", e)
            await asyncio.sleep(REPORT_EVERY_S)

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine stopped is restarted."""
        self._start_reporting()
        if not self.built.aengine.alive:
            raise RuntimeError(f"engine stopped: {self.engine.dead}")

    def __del__(self) -> None:
        self.built.aengine.shutdown()


class Router:
    """The ingress; see the module docstring. Its routes are in `_router_app`."""

    def __init__(self, replica: Any, args: argparse.Namespace) -> None:
        self.replica = replica
        self.catalog = _catalog(args)
        self.api_keys = tuple(args.api_key or ())
        self.created = int(time.time())
        self.reports: dict[str, tuple[float, str]] = {}

    def report(self, replica_id: str, text: str) -> None:
        """A replica's metrics, pushed every REPORT_EVERY_S; replicas silent for STALE_AFTER_S
        (dead, or replaced) are dropped."""
        now = time.monotonic()
        self.reports[replica_id] = (now, text)
        self._prune(now)

    def _prune(self, now: float) -> None:
        for r in [r for r, (t, _) in self.reports.items() if now - t >= STALE_AFTER_S]:
            del self.reports[r]

    def check_key(self, request: Request) -> None:
        check_api_key(self.api_keys, request)

    def model_cards(self) -> list[dict[str, Any]]:
        base = {"id": self.catalog.base, "object": "model", "created": self.created, "owned_by": "loramux"}
        bases = [{**base, "id": n, "parent": None} for n in (self.catalog.base, *self.catalog.aliases)]
        return bases + [{**base, "id": n, "parent": self.catalog.base} for n in self.catalog.names()]

    def metrics_text(self) -> str:
        self._prune(time.monotonic())
        return _merge_metrics({r: text for r, (_, text) in self.reports.items()})

    async def forward(self, request: Request) -> Response:
        """Send the request to a replica, preferring one that holds its adapter; stream the answer."""
        body = await request.body()
        model = _model_of(body)
        handle = self.replica.options(stream=True)
        if model and not self.catalog.is_base(model):
            handle = handle.options(multiplexed_model_id=model)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        gen = handle.answer.remote(request.method, request.url.path, request.url.query, headers, body)
        try:
            status, head = await gen.__anext__()
        except ray.exceptions.RayError as e:
            raise _failure(e) from e
        media = dict(head).get("content-type", "")
        headers = {k: v for k, v in head if k.lower() not in ("content-length", "content-type")}
        if "text/event-stream" not in media:  # a plain answer: whole, or a 503 if the replica dies
            try:
                body = b"".join([chunk async for chunk in gen])
            except ray.exceptions.RayError as e:
                raise _failure(e) from e
            return Response(body, status_code=status, headers=headers, media_type=media or None)
        return StreamingResponse(_sse_body(gen), status_code=status, headers=headers, media_type=media)


def _router_app() -> FastAPI:
    """The router's HTTP routes, built in its replica (Ray Serve calls this at start)."""
    app = FastAPI(title="loramux on Ray Serve")

    def router() -> Router:
        return serve.get_replica_context().servable_object  # type: ignore[return-value]

    @app.exception_handler(APIError)
    async def error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router().metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        router().check_key(request)
        return JSONResponse({"object": "list", "data": router().model_cards()})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        router().check_key(request)
        for card in router().model_cards():
            if card["id"] == model_id:
                return JSONResponse(card)
        raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found", param="model")

    @app.post("/v1/load_lora_adapter")
    @app.post("/v1/unload_lora_adapter")
    async def no_runtime_loads(request: Request) -> Response:
        router().check_key(request)
        raise APIError(
            400,
            "on a Ray Serve cluster adapters are not loaded by hand: name them with --lora-modules or "
            "put their folders in an --allowed-lora-dirs folder, and each replica loads one where it "
            "is used",
            param="lora_name",
        )

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def forward(path: str, request: Request) -> Response:
        if request.url.path not in OPEN_PATHS:  # before routing: no replica is asked, nothing loads
            router().check_key(request)
        return await router().forward(request)

    return app


async def _sse_body(gen: Any) -> AsyncIterator[bytes]:
    """A stream's events as the replica sends them; if it dies, an error event and [DONE]."""
    try:
        async for chunk in gen:
            yield chunk
    except ray.exceptions.RayError as e:
        logger.warning("replica failed mid-stream: %s", e)
        yield f"data: {json.dumps(_failure(e).body())}\n\ndata: [DONE]\n\n".encode()


def _failure(e: Exception) -> APIError:
    return APIError(
        503,
        f"the replica serving this request stopped ({type(e).__name__}); Ray Serve restarts it: retry the "
        f"request",
        type_="server_error",
        code="replica_failed",
        headers={"Retry-After": "1"},
    )


def _model_of(body: bytes) -> str | None:
    """The `model` field of a JSON body, if it has one."""
    if not body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None  # the replica's app answers the bad body in OpenAI's shape
    model = obj.get("model") if isinstance(obj, dict) else None
    return model if isinstance(model, str) else None


def _merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one exposition, each sample labelled `replica`."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            _, _, samples = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                labels = {**s.labels, "replica": replica}
                rendered = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                samples.append(f"{s.name}{{{rendered}}} {s.value}")
    out = []
    for name, (kind, doc, samples) in families.items():
        head = name + "_total" if kind == "counter" else name  # as generate_latest writes a counter
        out += [f"# HELP {head} {doc}", f"# TYPE {head} {kind}", *samples]
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# flags of one engine's own HTTP server, which Ray Serve's proxy and the router replace
_ONE_SERVER_ONLY = (
    "uds",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_ca_certs",
    "root_path",
    "middleware",
    "enable_request_id_headers",
    "enable_server_load_tracking",
    "max_stored_responses",  # each replica would keep its own: a later request may reach another
)


def _replicas(args: argparse.Namespace) -> int:
    """--replicas (1 when unset); ValueError naming the fix below 1, or for a flag of one
    engine's own HTTP server (TLS, a Unix socket, ...), which Ray Serve's proxy does not take."""
    n = 1 if args.replicas is None else args.replicas
    if n < 1:
        raise ValueError(f"--replicas must be at least 1, got {n}")
    for name in _ONE_SERVER_ONLY:
        if getattr(args, name, None):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} is not supported with --replicas: Ray Serve's HTTP proxy answers there; "
                f"use {flag} with one engine, or put a proxy that does it in front of the cluster"
            )
    return n


def build_app(args: argparse.Namespace) -> Any:
    """The Ray Serve application for `loramux serve`'s flags (`args`), with `args.replicas` engines."""
    n = _replicas(args)
    replica = serve.deployment(
        Replica,
        name="Replica",
        num_replicas=n,
        max_ongoing_requests=max(args.max_num_seqs, 8) * 4,
        ray_actor_options={"num_cpus": args.cpus_per_replica, "num_gpus": args.gpus_per_replica},
        health_check_period_s=5,
    ).bind(args)
    router = serve.deployment(
        serve.ingress(_router_app)(Router),
        name="Router",
        max_ongoing_requests=10_000,
        logging_config={"enable_access_log": False},  # a line per metrics report otherwise
    )
    return router.options(ray_actor_options={"num_cpus": 0}).bind(replica, args)


def app_builder(config: dict[str, Any]) -> Any:
    """Ray Serve's application builder, for `serve run` / `serve deploy` config files:
    `import_path: loramux.ray:app_builder`, `args: {argv: [MODEL, --lora-modules, ..., --replicas, N]}`
    (the flags of `loramux serve`)."""
    from loramux.server.serve_args import add_serve_args
    from loramux.server.vllm_argv import expand_serve_argv

    parser = argparse.ArgumentParser(prog="loramux.ray:app_builder")
    add_serve_args(parser)
    argv = expand_serve_argv([str(a) for a in config.get("argv", [])], parser._option_string_actions)
    args = parser.parse_args(argv)
    return build_app(args)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the cluster app as Ctrl-C does


def run_cluster(args: argparse.Namespace) -> None:
    """`loramux serve --replicas N`: start (or join) Ray, run the app on host:port, block until
    Ctrl-C or SIGTERM, then take the app down (and the local Ray, if this process started it)."""
    _replicas(args)  # refuse a bad count before starting Ray
    ctx = ray.init(address=args.ray_address, namespace="loramux")
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs a handler that aborts
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        logger.info(
            "serving on http://%s:%d with %d replicas; Ray dashboard: %s",
            args.host,
            args.port,
            args.replicas,
            ctx.dashboard_url or "not running (pip install 'ray[default]' for it)",
        )
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        serve.delete(APP_NAME)
        ray.shutdown()
