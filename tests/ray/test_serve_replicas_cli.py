"""`loramux serve --replicas N` starts a local Ray, serves the same API, and stops cleanly (issue 14).

A module of its own so that it runs after test_ray_serve.py's Ray instance is gone (2 cores).
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

pytest.importorskip("ray", reason="install the ray extra: pip install 'loramux[ray]'")

from tests.server.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _start(tm, log, *extra: str) -> tuple[subprocess.Popen, str]:
    """`loramux serve --replicas 1 ...` on a free port; returns once /v1/models answers (bounded)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "loramux.cli",
        "serve",
        str(tm.path),
        "--served-model-name",
        "llama",
        "--num-pages",
        "128",
        "--replicas",
        "1",
        "--cpus-per-replica",
        "0.5",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 150
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code in (200, 401):  # 401: --api-key
                return proc, url
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _stop(proc: subprocess.Popen, log) -> None:
    """SIGTERM: exit status 0 and no traceback."""
    proc.terminate()
    rc = proc.wait(timeout=90)
    assert rc == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


KEY = "sesame"


def _no_key_is_refused_before_routing(url: str) -> None:
    """Issue 24, point 6: every keyed path answers 401 in OpenAI's shape without a key, before a
    replica is asked: an adapter's name or an unknown one, runtime loads, tokenize, chat."""
    probes = [
        ("POST", "/v1/completions", {"model": "b", "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2}),
        ("POST", "/v1/chat/completions", {"model": "c", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "a"}),
        ("POST", "/tokenize", {"model": "a", "prompt": "hi"}),
        ("POST", "/detokenize", {"tokens": [1, 2]}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/a", None),
    ]
    for method, path, body in probes:
        for auth in ({}, {"authorization": "Bearer wrong"}):
            r = httpx.request(method, url + path, json=body, headers=auth, timeout=30)
            assert r.status_code == 401, (path, auth, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "invalid_api_key", r.text
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # probes need no key
    assert httpx.get(url + "/metrics", timeout=30).status_code == 200


def test_S6_1_serve_replicas_holds_at_most_max_cpu_loras_and_stops_on_sigterm(tiny_models, tmp_path):
    tm = tiny_models["llama"]
    log = tmp_path / "serve.log"
    modules = [f"a={tm.adapters['r8_all']}", f"b={tm.adapters['r1_qv']}", f"c={tm.adapters['rs4_attn']}"]
    proc, url = _start(
        tm, log, "--lora-modules", *modules, "--max-loras", "1", "--max-cpu-loras", "2", "--api-key", KEY
    )
    try:
        _no_key_is_refused_before_routing(url)
        deadline = time.time() + 30  # the replica reports once its health check started it
        while ("loramux_ray_adapters_held", "") not in (m := _samples(url + "/metrics")):
            assert time.time() < deadline, m
            time.sleep(0.5)
        assert m[("loramux_ray_adapters_held", "")] == 0  # nothing was loaded for the keyless requests
        assert m.get(("loramux_ray_adapter_requests_total", "load"), 0) == 0

        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert {m.id for m in client.models.list().data} == {"llama", "a", "b", "c"}
        for model in ("a", "b", "c", "a"):
            out = client.completions.create(model=model, prompt="hello world", max_tokens=4, temperature=0)
            assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
        # The replica holds at most --max-cpu-loras adapters (Ray's own default would be 3): loading
        # c evicted a, so a was loaded again.
        deadline = time.time() + 30
        while True:
            m = _samples(url + "/metrics")
            if (
                m.get(("loramux_ray_adapter_requests_total", "load"), 0)
                + m.get(("loramux_ray_adapter_requests_total", "hit"), 0)
                >= 4
            ):
                break
            assert time.time() < deadline, m
            time.sleep(0.5)
        assert m[("loramux_ray_adapters_capacity", "")] == 2
        assert m[("loramux_ray_adapters_held", "")] == 2
        assert m[("loramux_ray_adapter_requests_total", "load")] == 4

        # Three adapters, room for two, all at once: Ray evicts adapters that requests were just
        # routed to; each stays until its request is done, so every request is answered.
        def ask(i: int) -> int:
            r = httpx.post(
                url + "/v1/completions",
                json={"model": "abc"[i % 3], "prompt": "hello", "max_tokens": 3, "stream": i % 2 == 0},
                headers={"authorization": f"Bearer {KEY}"},
                timeout=120,
            )
            return r.status_code if "error" not in r.text else 599

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(ask, range(24)))
        assert codes == [200] * 24, codes
    finally:
        _stop(proc, log)


def test_S6_1_serve_replicas_joins_a_running_ray_cluster_given_by_ray_address(tiny_models, tmp_path):
    import ray
    from ray import serve

    tm = tiny_models["llama"]
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        address = ray.get_runtime_context().gcs_address
        log = tmp_path / "join.log"
        proc, url = _start(tm, log, "--ray-address", address)
        try:
            out = httpx.post(
                url + "/v1/completions", json={"model": "llama", "prompt": "hi", "max_tokens": 3}, timeout=60
            )
            assert out.status_code == 200
            assert "loramux" in serve.status().applications  # it runs on the cluster this test started
        finally:
            _stop(proc, log)
        assert ray.cluster_resources()["CPU"] == 2  # the cluster outlives the process that joined it
        assert "loramux" not in serve.status().applications  # which took its app down
    finally:
        serve.shutdown()
        ray.shutdown()


def _samples(url: str) -> dict[tuple[str, str], float]:
    """(sample name, outcome label) -> value, from real Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for s in fam.samples:
            out[(s.name, s.labels.get("outcome", ""))] = s.value
    return out


def test_S6_1_replicas_below_one_are_refused_with_the_reason():
    r = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "--replicas", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--replicas must be at least 1" in r.stderr


def test_S6_1_the_serve_config_builder_takes_serves_flags(tiny_models):
    from ray import serve

    from loramux.ray import app_builder

    app = app_builder({"argv": [str(tiny_models["llama"].path), "--replicas", "3", "--max-cpu-loras", "8"]})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="--replicas must be at least 1"):
        app_builder({"argv": ["model", "--replicas", "0"]})
    with pytest.raises(ValueError, match="--ssl-certfile is not supported with --replicas"):
        app_builder({"argv": ["model", "--replicas", "2", "--ssl_certfile", "c.pem"]})  # vLLM's spelling too


def test_S6_1_the_router_serves_every_served_model_name_and_any_api_key():
    """--served-model-name base alias and --api-key k1 k2 on the cluster's router, as on one engine."""
    import argparse

    from starlette.requests import Request

    from loramux.ray.deployment import Router
    from loramux.server.protocol import APIError
    from loramux.server.serve_args import add_serve_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["m", "--served-model-name", "base", "alias", "--api-key", "k1", "k2"])
    router = Router(None, args)
    cards = router.model_cards()
    assert [(c["id"], c["parent"]) for c in cards] == [("base", None), ("alias", None)]
    assert router.catalog.is_base("alias") and not router.catalog.is_base("other")

    def request(key: str) -> Request:
        return Request({"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]})

    router.check_key(request("k2"))
    with pytest.raises(APIError, match="missing or wrong API key"):
        router.check_key(request("k3"))


def test_S6_1_an_adapter_evicted_while_a_request_holds_it_goes_when_that_request_is_done():
    from loramux.ray.deployment import Pins

    gone = []
    pins = Pins(lambda held: gone.append(held.name))

    class Held:
        def __init__(self, name):
            self.name = name

    pins.enter("a")
    pins.enter("a")
    pins.release(Held("a"))  # Ray's LRU evicts a while two requests routed to it are in flight
    pins.release(Held("b"))  # b is held by none: unregistered at once
    assert gone == ["b"]
    pins.leave("a")
    assert gone == ["b"]
    pins.leave("a")  # the last request holding a is done
    assert gone == ["b", "a"] and not pins.count and not pins.evicted


def test_S6_1_replicas_that_stop_reporting_leave_the_routers_metrics(tiny_models, monkeypatch):
    import argparse

    from loramux.ray import deployment
    from loramux.server.serve_args import add_serve_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    router = deployment.Router(None, p.parse_args([str(tiny_models["llama"].path)]))
    now = [1000.0]
    monkeypatch.setattr(deployment.time, "monotonic", lambda: now[0])
    text = "# TYPE loramux_x gauge\nloramux_x 1\n"
    for replica in ("r1", "r2", "r3"):
        router.report(replica, text)
    for _ in range(40):  # r1 died: r2 and r3 go on reporting every second
        now[0] += 1.0
        router.report("r2", text)
        router.report("r3", text)
    assert set(router.reports) == {"r2", "r3"}
    assert 'replica="r1"' not in router.metrics_text() and 'replica="r2"' in router.metrics_text()
    now[0] += deployment.STALE_AFTER_S
    assert router.metrics_text() == "\n" and not router.reports  # all gone quiet: nothing kept


def test_S6_1_an_adapter_evicted_between_routing_and_the_engine_still_serves_its_request(
    tiny_models, monkeypatch
):
    """Issue 24, point 6, through the replica itself (its engine and app are real; only Ray Serve's
    context functions stand in): Ray's LRU evicts the adapter right after loading it for this
    request, before the request reaches the engine, as a concurrent load at capacity does. The
    request is answered, and the adapter goes once it is done; without the pin the eviction's
    unregister reaches the engine first and the request gets a 404."""
    import argparse
    import asyncio
    import json
    import types

    from loramux.ray import deployment
    from loramux.server.serve_args import add_serve_args

    tm = tiny_models["llama"]
    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(
        [str(tm.path), "--lora-modules", f"a={tm.adapters['r8_all']}", "--num-pages", "64", "--device", "cpu"]
    )
    replicas: list = []

    def multiplexed(max_num_models_per_replica):
        def wrap(load):
            async def adapter(name):
                held = await load(name)
                replicas[0].release(held)  # evicted at once by a concurrent load elsewhere
                return held

            return adapter

        return wrap

    ctx = types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id="r0"), app_name="loramux")
    monkeypatch.setattr(deployment.serve, "get_replica_context", lambda: ctx)
    monkeypatch.setattr(deployment.serve, "get_multiplexed_model_id", lambda: "a")
    monkeypatch.setattr(deployment.serve, "multiplexed", multiplexed)
    replica = deployment.Replica(args)
    replicas.append(replica)
    replica._reporter = object()  # no metrics reports to a router in this test
    engine, aengine = replica.engine, replica.built.aengine
    body = json.dumps({"model": "a", "prompt": "hello", "max_tokens": 3, "ignore_eos": True}).encode()

    async def go():
        items = [
            x
            async for x in replica.answer(
                "POST", "/v1/completions", "", [("content-type", "application/json")], body
            )
        ]
        for _ in range(100):  # the deferred unregister runs on the engine thread
            if not await aengine.call(engine.has_lora, "a"):
                break
            await asyncio.sleep(0.05)
        return items, await aengine.call(engine.has_lora, "a")

    try:
        items, still_there = asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        aengine.shutdown()
    status, answer = items[0][0], b"".join(x for x in items[1:] if isinstance(x, bytes))
    assert status == 200, answer[:300]
    assert json.loads(answer)["usage"]["completion_tokens"] == 3
    assert not still_there and not replica.pins.count and not replica.pins.evicted


def test_S6_1_the_routers_merge_keeps_every_familys_type_and_samples_per_replica():
    """Counters included: the merged text declares them as prometheus-client writes them (name
    with _total), or a parser files their samples under an untyped family (issue 30)."""
    import dataclasses

    from prometheus_client.parser import text_string_to_metric_families

    from loramux.engine.request_stats import RequestStats
    from loramux.engine.stats import EngineLimits, EngineSnapshot
    from loramux.ray.deployment import _merge_metrics
    from loramux.server.metrics import Metrics

    limits = EngineLimits(**{f.name: 1 for f in dataclasses.fields(EngineLimits)})
    counters = dict.fromkeys(
        "preemptions switches naive_switches device_loads host_loads device_evictions host_evictions "
        "prefix_query_tokens prefix_hit_tokens steps kv_offloaded kv_onloaded max_adapters_per_step "
        "kv_events_published kv_events_dropped kv_events_send_errors".split(),
        3,
    )
    snap = EngineSnapshot({"a": 1}, {}, ["a"], ["a"], 10, 5, 1, counters, {}, [], {}, RequestStats(64), 1.0)
    text = Metrics(limits, "base").render(snap).decode()
    one = {f.name: f for f in text_string_to_metric_families(text)}
    merged = {f.name: f for f in text_string_to_metric_families(_merge_metrics({"r1": text, "r2": text}))}
    assert merged.keys() == one.keys()
    for name, fam in one.items():
        assert merged[name].type == fam.type, name
        assert len(merged[name].samples) == 2 * len(fam.samples), name
        assert {s.labels["replica"] for s in merged[name].samples} == ({"r1", "r2"} if fam.samples else set())
    assert merged["vllm:num_preemptions"].samples[0].value == 3
