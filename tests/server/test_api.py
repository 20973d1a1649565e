"""The OpenAI-compatible server, driven with the official `openai` client (issue: server; S6.1-S6.3)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time

import httpx
import openai
import pytest

from loramux import LLM, LoRARequest, SamplingParams
from tests.server.conftest import start_server
from tests.utils import stop_across_chunks

STARTUP = ["r1_qv", "r8_all"]  # loaded with --lora-modules; the rest are loaded at run time
BASE = "base"


@pytest.fixture(scope="module")
def server(tiny_models, adapter_dirs, tmp_path_factory):
    tm = tiny_models["llama"]
    allowed, _ = adapter_dirs
    args = [
        str(tm.path),
        "--served-model-name",
        BASE,
        "--num-pages",
        "512",
        "--page-size",
        "4",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "5",
        "--max-num-seqs",
        "16",
        "--max-num-batched-tokens",
        "512",
        "--allowed-lora-dirs",
        str(allowed),
        "--device",
        "cpu",
        "--enable-lora",  # vLLM's flag: accepted (issue 16)
        "--lora-modules",
        *(f"{n}={allowed / n}" for n in STARTUP),
    ]
    s = start_server(args, tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(tiny_models, adapter_dirs):
    """The same model through the offline LLM path: the reference for greedy tokens."""
    allowed, _ = adapter_dirs
    llm = LLM(str(tiny_models["llama"].path), num_pages=512, page_size=4, device="cpu")

    def run(prompt: str | list[int], adapter: str | None, max_tokens: int = 8) -> list[int]:
        lora = None if adapter is None else LoRARequest(adapter, 1, str(allowed / adapter))
        out = llm.generate(
            [prompt],
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            lora,
            use_tqdm=False,
        )
        return out[0].outputs[0].token_ids

    run.llm = llm  # type: ignore[attr-defined]
    return run


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def words(seed: int, n: int = 6) -> str:
    rng = random.Random(seed)
    return " ".join(
        rng.choice(["lora", "page", "cache", "fox", "sql", "hello", "world", "batch"]) for _ in range(n)
    )


def completion_tokens(client, model: str, prompt: str, max_tokens: int = 8) -> list[int]:
    out = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return out.choices[0].model_extra["token_ids"]


# --- models, completions, chat ------------------------------------------------------------------


def test_models_lists_base_and_adapters_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(STARTUP) <= set(models) and BASE in models
    assert models["r8_all"].model_extra["parent"] == BASE
    assert models[BASE].model_extra["parent"] is None


def test_S6_1_each_adapter_reaches_the_model(client, offline):
    prompt = words(1)
    outs = {m: completion_tokens(client, m, prompt) for m in [BASE, *STARTUP]}
    for m, toks in outs.items():
        assert toks == offline(prompt, None if m == BASE else m), m
    assert outs["r8_all"] != outs[BASE]  # not silently served by the base model


def test_completion_fields_and_usage(client):
    out = client.completions.create(
        model="r8_all", prompt=words(2), max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.model == "r8_all"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + 5


def test_chat_per_adapter_equals_offline_with_the_chat_template(client, offline):
    tok = offline.llm.get_tokenizer()
    messages = [{"role": "user", "content": words(3)}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for model in [BASE, "r1_qv"]:
        out = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=6,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
        want = offline(rendered, None if model == BASE else model, 6)
        assert out.choices[0].model_extra["token_ids"] == want
        assert out.choices[0].message.content == tok.decode(want)


def test_streaming_completion_and_chat_add_up(client):
    prompt = words(4)
    full = client.completions.create(
        model="r8_all", prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.completions.create(
            model="r8_all",
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    msgs = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(
        model=BASE, messages=msgs, max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    parts = list(
        client.chat.completions.create(
            model=BASE,
            messages=msgs,
            max_tokens=7,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


def test_32_concurrent_mixed_adapter_requests_equal_the_offline_path(server, offline):
    models = [BASE, "r1_qv", "r8_all"]
    jobs = [(models[i % 3], words(100 + i, 3 + i % 5)) for i in range(32)]

    async def go():
        aclient = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0)
        outs = await asyncio.gather(
            *(
                aclient.completions.create(
                    model=m,
                    prompt=p,
                    max_tokens=8,
                    temperature=0,
                    extra_body={"return_token_ids": True, "ignore_eos": True},
                )
                for m, p in jobs
            )
        )
        await aclient.close()
        return outs

    outs = asyncio.run(go())
    for (m, p), out in zip(jobs, outs, strict=True):
        assert out.choices[0].model_extra["token_ids"] == offline(p, None if m == BASE else m), (m, p)
    metrics = server.metrics()
    assert metrics["loramux_max_adapters_per_step"] <= 2  # --max-loras 2 held under load


# --- errors ---------------------------------------------------------------------------------------


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=-1), "max_tokens=-1"),
        (dict(max_tokens=10**6), "exceeds the model's limit of 256"),
        (dict(temperature=5.0), "temperature=5.0"),
        (dict(prompt=[5] * 300), "exceeds the model's limit"),
        (dict(n=200), "n=200"),
        (dict(extra_body={"top_p": 0}), "top_p=0"),
        (dict(stream_options={"include_usage": True}), "stream_options applies to streamed answers only"),
        (dict(extra_body={"priority": 3}), "priority=3 needs priority scheduling"),
    ],
)
def test_bad_parameters_answer_400_in_openai_shape(client, kwargs, match):
    args = {"model": BASE, "prompt": "hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(**args)
    assert ei.value.status_code == 400 and match in error_of(ei.value)["message"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_logprobs=2), "top_logprobs=2 needs logprobs=true"),
        (dict(logprobs=False, top_logprobs=0), "top_logprobs=0 needs logprobs=true"),
        (dict(logprobs=True, top_logprobs=50), "top_logprobs=50; it must lie in [0, 20]"),
        (dict(logprobs=True, top_logprobs=-1), "top_logprobs=-1; it must lie in [0, 20]"),
    ],
)
def test_chat_top_logprobs_is_refused_by_its_own_name_and_never_ignored(client, kwargs, match):
    """Issue 16 (sampling options as vLLM takes them): chat's top_logprobs without logprobs=true
    answers 400, as OpenAI and vLLM do, rather than answering without the alternatives asked
    for; an out-of-range value is named as top_logprobs (the field sent), not as the sampler's
    logprobs."""
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kwargs
        )
    err = error_of(ei.value)
    assert match in err["message"] and err["param"] == "top_logprobs"


def test_malformed_json_and_missing_fields_answer_400(server):
    r = httpx.post(
        server.v1 + "/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server.v1 + "/completions", json={"model": BASE})  # no prompt (a model is optional)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_unknown_adapter_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    err = error_of(ei.value)
    assert err["code"] == "model_not_found" and "no-such-adapter" in err["message"]


def test_prompts_are_not_logged_by_default(client, server):
    client.completions.create(model=BASE, prompt="zebra quartz unique marker", max_tokens=2)
    assert "zebra quartz" not in server.log_text()


# --- adapters at run time (S6.3, S5.4) ---------------------------------------------------------------


def test_S6_3_runtime_load_unload_and_reload_with_different_weights(server, client, offline, adapter_dirs):
    allowed, _ = adapter_dirs
    prompt = words(7, 9)
    r = httpx.post(
        server.v1 + "/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(allowed / "rs4_attn")}
    )
    assert r.status_code == 200, r.text
    first = completion_tokens(client, "swap", prompt)
    assert first == offline(prompt, "rs4_attn")
    assert httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "swap"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="swap", prompt=prompt, max_tokens=2)
    hits = server.metrics()["loramux_prefix_cache_hit_tokens_total"]
    r = httpx.post(
        server.v1 + "/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(allowed / "r64_mlp")}
    )
    assert r.status_code == 200, r.text
    second = completion_tokens(client, "swap", prompt)
    assert second == offline(prompt, "r64_mlp") and second != first  # new weights, no stale KV
    assert server.metrics()["loramux_prefix_cache_hit_tokens_total"] == hits  # the old pages were not reused
    httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "swap"})


def test_S6_3_load_inplace_replaces_an_adapters_weights_without_a_gap(server, client, offline, adapter_dirs):
    """vLLM's `load_inplace` (what RL trainers send after each update): the name answers with the
    new weights at once; without it a loaded name is a 400 naming it; a failed one changes nothing."""
    allowed, _ = adapter_dirs
    prompt = words(11, 9)

    def load(path: str, **extra: object) -> httpx.Response:
        body = {"lora_name": "live", "lora_path": str(allowed / path), **extra}
        return httpx.post(server.v1 + "/load_lora_adapter", json=body, timeout=30)

    assert load("rs4_attn", load_inplace=True).status_code == 200  # nothing to replace: a plain load
    assert completion_tokens(client, "live", prompt) == offline(prompt, "rs4_attn")
    r = load("r64_mlp")
    assert r.status_code == 400 and "load_inplace" in r.json()["error"]["message"], r.text
    r = load("r64_mlp", load_inplace=True)
    assert r.status_code == 200 and r.json()["message"] == "adapter 'live' loaded in place", r.text
    assert completion_tokens(client, "live", prompt) == offline(prompt, "r64_mlp")
    r = load("missing", load_inplace=True)
    assert r.status_code == 400 and "is not a directory" in r.json()["error"]["message"], r.text
    assert completion_tokens(client, "live", prompt) == offline(prompt, "r64_mlp")
    assert httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "live"}).status_code == 200


def test_S5_2_cache_salt_shares_cached_prompts_only_within_one_salt(server, client, offline):
    """vLLM's `cache_salt`: a tenant's requests find each other's cached prompt pages, another
    salt (or none) finds none of them, even on the same adapter; answers do not change."""
    prompt = words(61, 30)

    def run(salt: str | None) -> tuple[list[int], float]:
        before = server.metrics()["loramux_prefix_cache_hit_tokens_total"]
        extra = {"ignore_eos": True, "return_token_ids": True}
        if salt is not None:
            extra["cache_salt"] = salt
        out = client.completions.create(
            model="r8_all", prompt=prompt, max_tokens=3, temperature=0, extra_body=extra
        )
        return out.choices[0].model_extra["token_ids"], server.metrics()[
            "loramux_prefix_cache_hit_tokens_total"
        ] - before

    first, _ = run("tenant-1")
    for other in ("tenant-2", None):
        ids, hits = run(other)
        assert hits == 0 and ids == first, other
    ids, hits = run("tenant-1")
    assert hits > 0 and ids == first == offline(prompt, "r8_all", 3)
    with pytest.raises(openai.BadRequestError, match="cache_salt=''; give a non-empty string"):
        client.completions.create(model="r8_all", prompt=prompt, max_tokens=1, extra_body={"cache_salt": ""})


def test_S6_3_S5_4_unload_while_a_request_runs_lets_it_finish_then_frees_it(server, adapter_dirs):
    allowed, _ = adapter_dirs
    r = httpx.post(
        server.v1 + "/load_lora_adapter", json={"lora_name": "busy", "lora_path": str(allowed / "r1_qv")}
    )
    assert r.status_code == 200
    body = {
        "model": "busy",
        "prompt": words(8),
        "max_tokens": 120,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    tokens, finish = [], None
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                tokens += __import__("json").loads(line[6:])["choices"][0]["token_ids"]
                if len(tokens) >= 3:
                    break
        assert httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "busy"}).status_code == 200
        for line in lines:
            if line.startswith("data: {"):
                choice = __import__("json").loads(line[6:])["choices"][0]
                tokens += choice["token_ids"]
                finish = choice["finish_reason"] or finish
    assert len(tokens) == 120 and finish == "length"  # it finished normally
    assert "busy" not in {m["id"] for m in httpx.get(server.v1 + "/models").json()["data"]}
    m = server.metrics()
    assert not any('adapter="busy"' in k and "adapter_resident" in k for k in m)  # weights gone
    assert m["loramux_kv_pages_in_use"] == 0


def test_runtime_load_outside_allowed_dirs_is_403(server, adapter_dirs, tmp_path):
    allowed, outside = adapter_dirs
    cases = [str(outside / "r1_qv"), str(allowed / ".." / "outside" / "r1_qv")]
    link = allowed / "sneaky"
    link.symlink_to(outside / "r1_qv")  # a symlink inside that points outside
    cases.append(str(link))
    try:
        for path in cases:
            r = httpx.post(server.v1 + "/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
            assert r.status_code == 403, path
            assert r.json()["error"]["type"] == "permission_error"
    finally:
        link.unlink()


def test_failed_loads_answer_400_and_the_server_keeps_serving(server, client, adapter_dirs, tiny_models):
    allowed, _ = adapter_dirs
    (allowed / "empty").mkdir(exist_ok=True)
    corrupt = allowed / "corrupt"
    if not corrupt.exists():
        shutil.copytree(allowed / "r1_qv", corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"garbage" * 9)
    big = allowed / "rank128"
    if not big.exists():  # rank 128 > the server's --max-lora-rank (64)
        from loramux.bench.artifacts import write_random_adapter

        write_random_adapter(big, tiny_models["llama"].path, 128, ("q_proj",), seed=3)
    for path, match in [
        (allowed / "empty", "no adapter_config.json"),
        (corrupt, "corrupt"),
        (allowed / "missing", "is not a directory"),
        (big, "above max_lora_rank=64; restart with --max-lora-rank 128"),
    ]:
        r = httpx.post(server.v1 + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(path)})
        assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
    out = client.completions.create(model="r8_all", prompt="still here", max_tokens=3)
    assert out.choices[0].finish_reason is not None
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="bad", prompt="x", max_tokens=2)
    r = httpx.post(server.v1 + "/unload_lora_adapter", json={"lora_name": "never-loaded"})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "model_not_found"
    assert "nothing to unload" in err["message"] and "Load it first" not in err["message"]


# --- disconnects, metrics, flags ---------------------------------------------------------------------


def wait_for(cond, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


ENGINE_ABORTS = 'loramux_engine_requests_finished_total{reason="abort"}'
ENGINE_LENGTH = 'loramux_engine_requests_finished_total{reason="length"}'


def test_client_disconnect_mid_stream_frees_its_pages(server):
    m0 = server.metrics()
    before = m0.get('loramux_requests_total{adapter="base",outcome="abort"}', 0)
    body = {"model": BASE, "prompt": words(9), "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 2:
                break  # leave mid-stream: the connection closes here
    assert wait_for(lambda: server.metrics()["loramux_kv_pages_in_use"] == 0)
    m = server.metrics()
    assert m['loramux_requests_total{adapter="base",outcome="abort"}'] == before + 1
    # The engine itself aborted it: it did not run on to its 200 tokens.
    assert m[ENGINE_ABORTS] == m0.get(ENGINE_ABORTS, 0) + 1 and m.get(ENGINE_LENGTH, 0) == m0.get(
        ENGINE_LENGTH, 0
    )
    assert not any(k.startswith("loramux_requests_running{") and v for k, v in m.items())


def test_client_disconnect_before_a_plain_answer_frees_its_pages(server):
    key = 'loramux_requests_total{adapter="base",outcome="abort"}'
    m0 = server.metrics()
    before = m0.get(key, 0)
    prompts = [words(200 + i) for i in range(32)]  # 32 requests of 200 tokens: far longer than 0.1 s
    body = {"model": BASE, "prompt": prompts, "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json=body, timeout=0.1)
    assert wait_for(lambda: server.metrics()["loramux_kv_pages_in_use"] == 0)
    m = server.metrics()
    assert m[key] == before + 32
    assert m[ENGINE_ABORTS] == m0.get(ENGINE_ABORTS, 0) + 32  # the engine ended all 32 early...
    assert m.get(ENGINE_LENGTH, 0) == m0.get(ENGINE_LENGTH, 0)  # ...and none ran on to its length


def test_metrics_are_prometheus_text_with_every_family(server, client):
    client.completions.create(model="r1_qv", prompt="metrics please", max_tokens=3)
    m = server.metrics()
    for name in [
        "loramux_requests_total",
        "loramux_prompt_tokens_total",
        "loramux_generation_tokens_total",
        "loramux_time_to_first_token_seconds_count",
        "loramux_time_per_output_token_seconds_count",
        "loramux_e2e_request_latency_seconds_count",
        "loramux_adapters_resident",
        "loramux_adapter_loads_total",
        "loramux_adapter_evictions_total",
        "loramux_adapter_load_seconds_count",
        "loramux_prefix_cache_hit_rate",
        "loramux_preemptions_total",
        "loramux_kv_pages_free",
        "loramux_adapter_switches_total",
        "loramux_adapter_switches_naive_total",
    ]:
        assert any(k == name or k.startswith(name + "{") for k in m), name
    assert m['loramux_requests_total{adapter="r1_qv",outcome="length"}'] >= 1
    assert m['loramux_adapters_resident{tier="device"}'] <= 2


def test_S6_2_command_line_limits_reach_the_engine(server):
    m = server.metrics()
    expect = {
        "max_loras": 2,
        "max_cpu_loras": 5,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 512,
        "num_pages": 512,
        "page_size": 4,
        "max_lora_rank": 64,
        "prefix_caching": 1,
    }
    for k, v in expect.items():
        assert m[f'loramux_config{{name="{k}"}}'] == v, k


def test_S6_2_every_serve_flag_lands_in_the_engine_config():
    import argparse

    from loramux.server.serve_args import add_serve_args, engine_config

    p = argparse.ArgumentParser()
    add_serve_args(p)
    a = p.parse_args(
        [
            "m",
            "--max-loras",
            "3",
            "--max-cpu-loras",
            "9",
            "--max-lora-rank",
            "16",
            "--max-lora-bytes",
            "1000",
            "--max-num-seqs",
            "7",
            "--max-num-batched-tokens",
            "99",
            "--max-prefill-tokens",
            "50",
            "--policy",
            "slo",
            "--ttft-slo",
            "3.5",
            "--slo-wait-factor",
            "1.5",
            "--starvation-timeout",
            "2.5",
            "--waiting-served-ratio",
            "0.3",
            "--max-waiting-steps",
            "4",
            "--max-queue-len",
            "11",
            "--page-size",
            "8",
            "--num-pages",
            "77",
            "--kv-cache-memory",
            "512M",
            "--no-enable-prefix-caching",
            "--enable-kv-events",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--max-model-len",
            "128",
            "--seed",
            "5",
        ]
    )
    c = engine_config(a, "m")
    assert (c.lora.max_loras, c.lora.max_cpu_loras, c.lora.max_lora_rank, c.lora.max_lora_bytes) == (
        3,
        9,
        16,
        1000,
    )
    s = c.scheduler
    assert (
        s.max_num_seqs,
        s.max_num_batched_tokens,
        s.max_prefill_tokens,
        s.policy,
        s.ttft_slo_s,
        s.slo_wait_factor,
        s.starvation_timeout_s,
        s.waiting_served_ratio,
        s.max_waiting_steps,
        s.max_queue_len,
    ) == (7, 99, 50, "slo", 3.5, 1.5, 2.5, 0.3, 4, 11)
    k = c.cache
    assert (k.page_size, k.num_pages, k.kv_cache_memory, k.enable_prefix_caching, k.enable_kv_events) == (
        8,
        77,
        512 * 2**20,
        False,
        True,
    )
    assert (c.model.dtype, c.model.device, c.model.max_model_len, c.model.seed) == ("float32", "cpu", 128, 5)


@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_equals_the_final_text_with_stop_strings(client, include):
    """Issue 12, point 1: a stop string that spans two chunks never leaks its start into the
    stream, for completions and chat, with and without include_stop_str_in_output."""
    prompt, extra = words(11), {"ignore_eos": True}
    kw = dict(model=BASE, max_tokens=20, temperature=0)
    ref = client.completions.create(prompt=prompt, stream=True, extra_body=extra, **kw)
    stop = stop_across_chunks([c.choices[0].text for c in ref if c.choices])
    extra = {**extra, "include_stop_str_in_output": include}
    whole = client.completions.create(prompt=prompt, stop=[stop], extra_body=extra, **kw)
    chunks = client.completions.create(prompt=prompt, stop=[stop], stream=True, extra_body=extra, **kw)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].text.endswith(stop) == include
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text

    msgs = [{"role": "user", "content": prompt}]
    ref = client.chat.completions.create(messages=msgs, stream=True, extra_body={"ignore_eos": True}, **kw)
    stop = stop_across_chunks([p.choices[0].delta.content or "" for p in ref if p.choices])
    whole = client.chat.completions.create(messages=msgs, stop=[stop], extra_body=extra, **kw)
    parts = client.chat.completions.create(messages=msgs, stop=[stop], stream=True, extra_body=extra, **kw)
    assert whole.choices[0].finish_reason == "stop"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content


# --- vLLM's extra endpoints and LLM.chat (issue 16, points 3 and 5) ----------------------------


def test_version_ping_docs_and_one_model_card(server, client):
    from loramux import __version__

    assert httpx.get(server.url + "/version", timeout=10).json() == {"version": __version__}
    assert httpx.get(server.url + "/ping", timeout=10).status_code == 200
    assert httpx.post(server.url + "/ping", timeout=10).status_code == 200
    docs = httpx.get(server.url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    paths = httpx.get(server.url + "/openapi.json", timeout=10).json()["paths"]
    assert {"/tokenize", "/detokenize", "/version", "/v1/models/{model_id}"} <= set(paths)
    card = client.models.retrieve("r8_all")
    assert card.id == "r8_all" and card.model_extra["parent"] == BASE
    assert client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"


def test_invocations_answers_each_api_by_the_bodys_shape(server, client, offline):
    """SageMaker's POST /invocations (vLLM's too): a completions, chat or Responses body answers
    as its own route does, streamed too; a body of none or two shapes is a 400 naming them."""
    url = server.url + "/invocations"
    prompt = words(61)
    want = offline(prompt, "r8_all", 6)
    body = {"model": "r8_all", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    got = httpx.post(url, json={**body, "return_token_ids": True}, timeout=60).json()
    assert got["object"] == "text_completion" and got["choices"][0]["token_ids"] == want
    msgs = [{"role": "user", "content": prompt}]
    kw = dict(model="r8_all", max_tokens=6, temperature=0)
    chat = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    got = httpx.post(url, json={"messages": msgs, **kw}, timeout=60).json()
    assert got["object"] == "chat.completion" and got["choices"][0]["message"]["content"] == chat
    resp = httpx.post(
        url, json={"input": prompt, "model": "r8_all", "max_output_tokens": 6, "temperature": 0}
    ).json()
    assert resp["object"] == "response" and resp["output"][0]["content"][0]["text"] == chat
    with httpx.stream("POST", url, json={"messages": msgs, "stream": True, **kw}, timeout=60) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(json.loads(c[6:])["choices"][0]["delta"].get("content") or "" for c in chunks) == chat
    for bad, words_ in [
        ({"model": "r8_all"}, "this one has 0"),
        ({"prompt": "x", "messages": msgs}, "has 2"),
    ]:
        r = httpx.post(url, json=bad, timeout=60)
        assert r.status_code == 400 and words_ in r.json()["error"]["message"] and "messages (chat)" in r.text
    r = httpx.post(url, json={"prompt": "x", "max_tokens": "5"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_tokenize_and_detokenize_in_vllms_shapes(server, offline):
    from loramux.engine.chat import render_chat

    tok = offline.llm.get_tokenizer()
    text = words(21)
    r = httpx.post(
        server.url + "/tokenize", json={"model": "r1_qv", "prompt": text, "return_token_strs": True}
    )
    body = r.json()
    assert (
        r.status_code == 200 and body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    )
    assert body["token_strs"] == tok.convert_ids_to_tokens(body["tokens"]) and body["max_model_len"] > 0
    msgs = [{"role": "user", "content": text}]
    chat = httpx.post(server.url + "/tokenize", json={"model": BASE, "messages": msgs}).json()
    assert chat["tokens"] == render_chat(tok, msgs) and chat["token_strs"] is None
    back = httpx.post(server.url + "/detokenize", json={"model": BASE, "tokens": body["tokens"]}).json()
    assert back == {"prompt": tok.decode(body["tokens"])}
    for path, payload, status in [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404),
        ("/tokenize", {"prompt": "x", "messages": msgs}, 400),
        ("/detokenize", {"tokens": [10**9]}, 400),
    ]:
        r = httpx.post(server.url + path, json=payload)
        assert r.status_code == status and "message" in r.json()["error"]


def test_llm_chat_equals_the_server_chat(client, offline, adapter_dirs):
    allowed, _ = adapter_dirs
    msgs = [{"role": "user", "content": words(22)}]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = offline.llm
    local = llm.chat(msgs, sp, LoRARequest("r1_qv", 1, str(allowed / "r1_qv")), use_tqdm=False)
    both = llm.chat([msgs, msgs], sp, use_tqdm=False)
    remote = client.chat.completions.create(
        model="r1_qv",
        messages=msgs,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert local[0].outputs[0].token_ids == remote.choices[0].model_extra["token_ids"]
    assert len(both) == 2 and both[0].outputs[0].token_ids == both[1].outputs[0].token_ids


def test_logprobs_in_openais_shapes_with_decoded_tokens_offsets_and_bytes(client, offline):
    """Issue 16, point 4: completions give decoded token text (no byte-level 'Ġ') in `tokens`
    and `top_logprobs`, and `text_offset` filled; chat fills `bytes` with the token's raw bytes."""
    tok = offline.llm.get_tokenizer()
    prompt = words(31)
    out = client.completions.create(
        model="r8_all",
        prompt=prompt,
        max_tokens=8,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ids, lp = out.choices[0].model_extra["token_ids"], out.choices[0].logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids] and not any("Ġ" in t for t in lp.tokens)
    assert len(lp.text_offset) == len(ids) and lp.text_offset[0] == 0
    steps = [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False)]
    assert steps == [len(t) for t in lp.tokens[:-1]]
    # (legacy dict shape: two ids that decode alike, e.g. to U+FFFD, share one key)
    assert all(1 <= len(top) <= 3 and not any("Ġ" in k for k in top) for top in lp.top_logprobs)
    assert all(lp.tokens[i] in lp.top_logprobs[i] for i in range(len(ids)))  # greedy: the top-1 is there

    chat = client.chat.completions.create(
        model="r8_all",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    cids, content = chat.choices[0].model_extra["token_ids"], chat.choices[0].logprobs.content
    for t, c in zip(cids, content, strict=True):
        # ids past the tokenizer's vocabulary (the random model has 512, the tokenizer fewer) are empty
        assert (
            c.token == tok.decode([t])
            and bool(c.bytes) == bool(c.token)
            and all(0 <= b < 256 for b in c.bytes)
        )
        if "\ufffd" not in c.token:
            assert bytes(c.bytes).decode("utf-8") == c.token
        assert len(c.top_logprobs) == 2 and all(bool(a.bytes) == bool(a.token) for a in c.top_logprobs)
    raw = b"".join(bytes(c.bytes) for c in content)
    assert raw.decode("utf-8", errors="replace") == tok.decode(cids)  # the bytes add up to the text


def test_streamed_logprobs_add_up_to_the_whole_answers(client):
    """Issue 16 (logprobs as vLLM gives them): a streamed answer's chunks carry their tokens'
    logprobs (they were all null) and, with return_token_ids, their ids (chat's were missing, and
    its first chunks carry the prompt's, as vLLM's); a choice's chunks add up to the same request
    answered whole: tokens, offsets and alternatives, completions and chat, with n = 2."""
    prompt = words(53)
    kw = dict(max_tokens=7, temperature=0, n=2, extra_body={"ignore_eos": True, "return_token_ids": True})
    whole = client.completions.create(model="r8_all", prompt=prompt, logprobs=2, **kw)
    parts: dict[int, dict[str, list]] = {}
    for ch in client.completions.create(model="r8_all", prompt=prompt, logprobs=2, stream=True, **kw):
        for c in ch.choices:
            got = parts.setdefault(c.index, {"tokens": [], "lp": [], "top": [], "offset": [], "ids": []})
            got["ids"] += c.model_extra.get("token_ids") or []
            assert c.logprobs is not None or (c.text == "" and c.finish_reason is not None)
            if c.logprobs is not None:
                got["tokens"] += c.logprobs.tokens
                got["lp"] += c.logprobs.token_logprobs
                got["top"] += c.logprobs.top_logprobs
                got["offset"] += c.logprobs.text_offset
    assert sorted(parts) == [0, 1]
    for c in whole.choices:
        got, want = parts[c.index], c.logprobs
        assert got["tokens"] == want.tokens and got["offset"] == want.text_offset and len(want.tokens) == 7
        assert got["ids"] == c.model_extra["token_ids"]
        assert got["lp"] == pytest.approx(want.token_logprobs, abs=1e-4)
        assert [sorted(t) for t in got["top"]] == [sorted(t) for t in want.top_logprobs]

    messages = [{"role": "user", "content": prompt}]
    whole = client.chat.completions.create(
        model="r8_all", messages=messages, logprobs=True, top_logprobs=2, **kw
    )
    content: dict[int, list] = {0: [], 1: []}
    ids: dict[int, list] = {0: [], 1: []}
    stream = list(
        client.chat.completions.create(
            model="r8_all", messages=messages, logprobs=True, top_logprobs=2, stream=True, **kw
        )
    )
    assert [ch.model_extra["prompt_token_ids"] for ch in stream[:2]] == [
        whole.model_extra["prompt_token_ids"]
    ] * 2
    for ch in stream:
        for c in ch.choices:
            ids[c.index] += c.model_extra.get("token_ids") or []
            if c.logprobs is not None:
                content[c.index] += c.logprobs.content
    for c in whole.choices:
        assert ids[c.index] == c.model_extra["token_ids"]
        got, want = content[c.index], c.logprobs.content
        assert [e.token for e in got] == [e.token for e in want] and len(want) == 7
        assert [e.bytes for e in got] == [e.bytes for e in want]
        assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want], abs=1e-4)
        assert [[a.token for a in e.top_logprobs] for e in got] == [
            [a.token for a in e.top_logprobs] for e in want
        ]


def test_continuous_usage_stats_put_each_choices_usage_so_far_on_its_chunks(client):
    """Issue 16 (vLLM's stream_options): with `continuous_usage_stats` every chunk of a choice
    carries that choice's usage so far (it was ignored); without it only the last chunk has one."""
    kw = dict(model=BASE, prompt=words(59), max_tokens=6, temperature=0, n=2, stream=True)
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(**kw, stream_options=opts, extra_body={"ignore_eos": True}))
    made = {0: [], 1: []}
    for ch in chunks[:-1]:
        (c,) = ch.choices
        made[c.index].append(ch.usage.completion_tokens)
        assert ch.usage.total_tokens == ch.usage.prompt_tokens + ch.usage.completion_tokens
    for counts in made.values():
        assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    plain = list(
        client.completions.create(
            **kw, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert all(ch.usage is None for ch in plain[:-1]) and plain[-1].usage.completion_tokens == 12


def test_skip_special_tokens_reaches_the_detokenizer(client, offline):
    """Issue 16 (sampling options as vLLM takes them): `skip_special_tokens: false` shows the
    special tokens in the text (it was ignored: they were always dropped)."""
    tok = offline.llm.get_tokenizer()
    bos = tok.bos_token_id
    kw = dict(model=BASE, prompt=words(57), max_tokens=3, temperature=0, logit_bias={str(bos): 100})
    shown = client.completions.create(
        **kw, extra_body={"ignore_eos": True, "skip_special_tokens": False, "return_token_ids": True}
    )
    assert shown.choices[0].model_extra["token_ids"] == [bos] * 3
    assert shown.choices[0].text == tok.bos_token * 3
    assert client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text == ""


def test_a_held_back_chunk_passes_its_tokens_logprobs_to_the_next():
    """Half a character is held back (no chunk), so its token's logprob rides on the next chunk:
    none is dropped and none is sent twice, whatever the outputs' lists hold by then."""
    from loramux.core.outputs import SampleLogprobs
    from loramux.engine.outputs import CompletionOutput, RequestOutput
    from loramux.server.generate import _chat_delta, _with_tokens

    ids = [7, 8, 9]
    lps = [SampleLogprobs(-0.1 * k, []) for k in range(1, 4)]  # the engine's growing lists

    def out(delta_ids: list[int], text: str, finish: str | None = None) -> RequestOutput:
        comp = CompletionOutput(0, "", ids, finish, None, lps, text, delta_ids)
        return RequestOutput("r", None, [1], [comp], finish is not None)

    shape = lambda i, t, lp: {"ids": t, "lp": [x.token_logprob for x in lp]}  # noqa: E731
    render = _with_tokens(_chat_delta, shape, token_ids=True)
    assert render(0, out([7], "")) is None  # held back
    second = render(0, out([8], "é"))
    assert second["logprobs"] == {"ids": [7, 8], "lp": [-0.1, -0.2]} and second["token_ids"] == [7, 8]
    last = render(0, out([9], "", "length"))
    assert last["logprobs"] == {"ids": [9], "lp": [pytest.approx(-0.3)]} and last["token_ids"] == [9]


def test_penalties_logit_bias_and_refusals_through_the_openai_client(client, offline):
    """Issue 16, point 2: the penalty fields and logit_bias reach the sampler for completions and
    chat and answer as the offline engine does; best_of > n is refused with the reason."""
    prompt = words(41)
    kw = dict(max_tokens=6, temperature=0, presence_penalty=1.0, frequency_penalty=0.5)
    extra = {"ignore_eos": True, "return_token_ids": True, "repetition_penalty": 1.3}
    got = client.completions.create(model=BASE, prompt=prompt, extra_body=extra, **kw)
    sp = SamplingParams(
        temperature=0,
        max_tokens=6,
        ignore_eos=True,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        repetition_penalty=1.3,
    )
    want = offline.llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert got.choices[0].model_extra["token_ids"] == want
    forced = client.completions.create(
        model="r8_all",
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        logit_bias={"77": 100},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert forced.choices[0].model_extra["token_ids"] == [77] * 4
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=3,
        temperature=0,
        logit_bias={"77": 100},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert chat.choices[0].model_extra["token_ids"] == [77] * 3
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=BASE, prompt=prompt, max_tokens=2, best_of=3)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=BASE, prompt=prompt, max_tokens=2, presence_penalty=5)
    with pytest.raises(openai.BadRequestError, match=r"min_p=1\.5; it must lie in \[0, 1\]"):
        client.completions.create(model=BASE, prompt=prompt, max_tokens=2, extra_body={"min_p": 1.5})
    kept = client.completions.create(model=BASE, prompt=prompt, max_tokens=2, extra_body={"min_p": 0.2})
    assert kept.usage.completion_tokens >= 1  # vLLM's min_p is taken (it was refused by name)
    cut = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=2, extra_body={"truncate_prompt_tokens": 2}
    )
    assert cut.usage.prompt_tokens == 2  # vLLM's left truncation (it was refused by name)
    with pytest.raises(openai.BadRequestError, match="truncate_prompt_tokens=0"):
        client.completions.create(
            model=BASE, prompt=prompt, max_tokens=2, extra_body={"truncate_prompt_tokens": 0}
        )
    for field, value in [("use_beam_search", True), ("suffix", "x")]:
        with pytest.raises(openai.BadRequestError, match=f"{field} is not supported"):  # named, never ignored
            client.chat.completions.create(
                model=BASE,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=2,
                extra_body={field: value},
            )


def test_allowed_token_ids_and_bad_words_through_the_openai_client(client, offline, adapter_dirs):
    """vLLM's allowed_token_ids and bad_words (they were refused by name) reach the sampler for
    completions and chat, with an adapter, and answer as the offline engine does; an id outside
    the vocabulary, an empty list and an empty word are 400s naming the field."""
    prompt = words(43)
    lora = LoRARequest("r8_all", 1, str(adapter_dirs[0] / "r8_all"))

    def offline_answer(**kw):
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **kw)
        return offline.llm.generate([prompt], sp, lora_request=lora, use_tqdm=False)[0].outputs[0]

    def answer(**extra):
        body = {"ignore_eos": True, "return_token_ids": True, **extra}
        out = client.completions.create(
            model="r8_all", prompt=prompt, max_tokens=8, temperature=0, extra_body=body
        )
        return out.choices[0]

    allowed = [11, 77, 300]
    ids = answer(allowed_token_ids=allowed).model_extra["token_ids"]
    assert set(ids) <= set(allowed) and ids == offline_answer(allowed_token_ids=allowed).token_ids
    tok = offline.llm.get_tokenizer()

    def one_token_word(ids: list[int]) -> tuple[str, int]:
        """A word of the answer that is one token as bad_words encodes it (bare, or after a space)."""
        for t in ids[1:]:
            w = tok.decode([t]).strip()
            if w and t in (tok.encode(v, add_special_tokens=False)[0] for v in (w, " " + w)):
                return w, t
        raise AssertionError(f"no one-token word in {ids}")

    free = answer().model_extra["token_ids"]
    bad, t = one_token_word(free)
    banned = answer(bad_words=[bad]).model_extra["token_ids"]
    assert t in free and t not in banned and banned == offline_answer(bad_words=[bad]).token_ids
    chat_kw = dict(model=BASE, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
    body = {"ignore_eos": True, "return_token_ids": True}
    free_chat = client.chat.completions.create(**chat_kw, extra_body=body).choices[0].model_extra["token_ids"]
    word, t = one_token_word(free_chat)
    chat = client.chat.completions.create(**chat_kw, extra_body={**body, "bad_words": [word]})
    assert t in free_chat and t not in chat.choices[0].model_extra["token_ids"]
    for extra, match in [
        ({"allowed_token_ids": [5, 10**6]}, "allowed_token_ids names token id 1000000"),
        ({"allowed_token_ids": []}, "allowed_token_ids is empty"),
        ({"bad_words": [" "]}, "bad_words must be non-empty"),
    ]:
        with pytest.raises(openai.BadRequestError, match=match):
            client.completions.create(model=BASE, prompt=prompt, max_tokens=2, extra_body=extra)


def test_n_samples_per_prompt_in_completions_and_chat(client):
    """Issue 16, point 2: n > 1 gives n choices (prompt-major indices), seeded samples differ and
    repeat, and the prompt counts once in usage; chat streams every choice under its index."""
    prompt = words(51)
    kw = dict(model=BASE, max_tokens=5, temperature=1.0, seed=3, n=3, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt=[prompt, words(52)], **kw)
    b = client.completions.create(prompt=[prompt, words(52)], **kw)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeds make it repeatable
    assert len({c.text for c in a.choices[:3]}) > 1  # the samples differ
    one = client.completions.create(model=BASE, prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True})
    two = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=5, n=2, extra_body={"ignore_eos": True}
    )
    assert two.usage.prompt_tokens == one.usage.prompt_tokens and two.usage.completion_tokens == 10
    msgs = [{"role": "user", "content": prompt}]
    ckw = dict(
        model=BASE, messages=msgs, max_tokens=5, temperature=1.0, seed=4, n=2, extra_body={"ignore_eos": True}
    )
    whole = client.chat.completions.create(**ckw)
    parts = list(client.chat.completions.create(stream=True, **ckw))
    for i in range(2):
        text = "".join(
            p.choices[0].delta.content or "" for p in parts if p.choices and p.choices[0].index == i
        )
        assert text == whole.choices[i].message.content


def test_echo_prepends_the_prompt_streamed_or_not(client):
    prompt = words(61)
    kw = dict(model=BASE, prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(echo=True, **kw).choices[0].text
    assert echoed == prompt + plain
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kw) if c.choices
    )
    assert streamed == echoed
    ids = client.completions.create(**{**kw, "prompt": [11, 42, 99]}, echo=True).choices[0].text
    assert ids.endswith(client.completions.create(**{**kw, "prompt": [11, 42, 99]}).choices[0].text)
    whole = client.completions.create(echo=True, logprobs=2, **kw).choices[0].logprobs
    chunks = client.completions.create(echo=True, logprobs=2, stream=True, **kw)
    parts = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    for key in ("tokens", "token_logprobs", "text_offset"):  # the prompt's tokens ride on the echo chunk
        assert [x for p in parts for x in getattr(p, key)] == getattr(whole, key), key
    assert whole.token_logprobs[0] is None and len(whole.tokens) > 5


def test_echo_with_logprobs_and_prompt_logprobs_score_the_prompt(client, offline):
    """What evaluation harnesses send to score an adapter on a text (lm-eval's loglikelihood:
    echo, logprobs, max_tokens 1): the prompt's tokens come first in `logprobs`, the first with
    null, as OpenAI's legacy API; vLLM's `prompt_logprobs` gives {id: {logprob, rank,
    decoded_token}} per prompt token (completions: per choice; chat: beside the choices). The
    values equal the offline LLM's, which tests/executor/test_prompt_logprobs.py holds to PEFT's."""
    prompt = [11, 42, 99, 7, 31, 64]
    llm = offline.llm
    ref = llm.generate(
        [prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2), use_tqdm=False
    )[0].prompt_logprobs
    r = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2
    ).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == len(prompt) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, want in zip(lp.token_logprobs[1 : len(prompt)], ref[1:], strict=True):
        assert abs(got - want.token_logprob) < 1e-4
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and r.text.startswith("".join(lp.tokens[: len(prompt)]))
    plain = client.completions.create(
        model=BASE, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 1}
    ).choices[0]
    shaped = plain.model_extra["prompt_logprobs"]
    assert shaped[0] is None and len(shaped) == len(prompt)
    for tok, entry, want in zip(prompt[1:], shaped[1:], ref[1:], strict=True):
        mine = entry[str(tok)]
        assert abs(mine["logprob"] - want.token_logprob) < 1e-4 and mine["rank"] == want.rank
        assert isinstance(mine["decoded_token"], str) and len(entry) in (1, 2)  # the token, the top 1
    chat = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 0, "return_token_ids": True},
    )
    assert len(chat.model_extra["prompt_logprobs"]) == len(chat.model_extra["prompt_token_ids"])
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs are not available when stream is true"):
        client.completions.create(model=BASE, prompt=prompt, stream=True, extra_body={"prompt_logprobs": 1})
    zero = client.completions.create(  # 0 with stream asks for nothing, as vLLM takes it
        model=BASE,
        prompt=prompt,
        max_tokens=2,
        stream=True,
        extra_body={"prompt_logprobs": 0, "return_token_ids": True, "ignore_eos": True},
    )
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in zero if c.choices) == 2
    with pytest.raises(openai.BadRequestError, match=r"prompt_logprobs=21; it must lie in \[0, 20\]"):
        client.completions.create(model=BASE, prompt=prompt, extra_body={"prompt_logprobs": 21})
