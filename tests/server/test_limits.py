"""API key (401), the waiting-queue bound (503), and no runtime loading without allowed folders (403)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import start_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    tm = tiny_models["llama"]
    args = [
        str(tm.path),
        "--served-model-name",
        "base",
        "--num-pages",
        "256",
        "--page-size",
        "4",
        "--api-key",
        KEY,
        "--max-num-seqs",
        "1",
        "--max-queue-len",
        "1",
        "--device",
        "cpu",
        "--lora-modules",
        f"r1={tm.adapters['r1_qv']}",
    ]
    s = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    s.stop()


def test_api_key_is_required_on_every_v1_route(server):
    routes = [
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "base", "prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "r1"}),
        ("POST", "/v1/responses", {"model": "base", "input": "hi"}),
        ("GET", "/v1/responses/resp_x", None),
        ("GET", "/v1/responses/resp_x/input_items", None),
        ("DELETE", "/v1/responses/resp_x", None),
        ("POST", "/invocations", {"model": "base", "prompt": "hi"}),  # vLLM leaves it open; not here
    ]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, server.url + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and "r1" in {m["id"] for m in ok.json()["data"]}
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics need no key
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_openai_client_with_the_key_works_and_without_fails(server):
    good = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
    assert good.completions.create(model="r1", prompt="hi", max_tokens=2).choices[0].text is not None
    bad = openai.OpenAI(base_url=server.v1, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="base", prompt="hi", max_tokens=2)


def test_a_full_waiting_queue_answers_503_and_the_rest_are_served(server):
    async def go():
        client = openai.AsyncOpenAI(base_url=server.v1, api_key=KEY, max_retries=0)
        calls = [
            client.completions.create(
                model="base", prompt=f"job {i}", max_tokens=120, extra_body={"ignore_eos": True}
            )
            for i in range(8)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        await client.close()
        return results

    results = asyncio.run(go())
    busy = [r for r in results if isinstance(r, openai.APIStatusError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert busy and all(e.status_code == 503 for e in busy)
    assert busy[0].response.headers.get("retry-after") == "1"
    assert busy[0].response.json()["error"]["code"] == "server_busy"
    assert served and all(r.usage.completion_tokens == 120 for r in served)
    assert len(busy) + len(served) == 8


def test_runtime_loading_is_off_without_allowed_dirs(server, tiny_models):
    r = httpx.post(
        server.v1 + "/load_lora_adapter",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"lora_name": "x", "lora_path": str(tiny_models["llama"].adapters["r8_all"])},
    )
    assert r.status_code == 403 and "--allowed-lora-dirs" in r.json()["error"]["message"]
