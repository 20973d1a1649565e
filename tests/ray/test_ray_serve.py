"""loramux on a real local Ray Serve: 2 replicas of the demo behind one OpenAI endpoint (issue 14;
S6.1, S6.3).

One Ray instance (loopback, 2 CPUs, no dashboard) for the module. The replicas serve the built-in
demo (shipped in the package; tests/demo/ checks it): the base model `demo`, its three adapters
and three more names for the same adapter folders, so six adapters, each replica holding at most
three (`--max-cpu-loras 3`): routing decides whether an adapter must be loaded again. Every loop
is bounded in count and time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import time

import httpx
import openai
import pytest

ray = pytest.importorskip("ray", reason="install the ray extra: pip install 'loramux[ray]'")
from ray import serve  # noqa: E402

from tests.server.conftest import free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

PROMPTS = ["say: hello world\n", "say: good night\n", "say: fast fair cache\n", "say: blue river\n"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(endpoint URL, single-engine answers, allowed folder for late adds, the demo's adapters)."""
    from loramux import demo
    from loramux.engine.llm import LLM
    from loramux.lora_request import LoRARequest
    from loramux.ray import APP_NAME, build_app
    from loramux.sampling_params import SamplingParams
    from loramux.server.serve_args import add_serve_args

    model_dir, demo_adapters = demo.demo_paths()
    names = {name: str(path) for name, path in demo_adapters.items()}
    extra = {f"{name[:3]}2": path for name, path in names.items()}  # same folders, other names
    late = tmp_path_factory.mktemp("ray-allowed")

    # The single-engine answers every replica's answer must equal (greedy).
    llm = LLM(str(model_dir), max_loras=2, max_cpu_loras=3)
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    expected = {}
    every = {**names, **extra, "late": names["upper"]}
    for k, (name, path) in enumerate(every.items()):
        outs = llm.generate(PROMPTS, sp, LoRARequest(name, k + 1, path), use_tqdm=False)
        expected.update({(name, p): o.outputs[0].text for p, o in zip(PROMPTS, outs, strict=True)})
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    expected.update({(demo.BASE_NAME, p): o.outputs[0].text for p, o in zip(PROMPTS, outs, strict=True)})
    del llm

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(
        [
            "--lora-modules",
            *(f"{n}={d}" for n, d in extra.items()),
            "--allowed-lora-dirs",
            str(late),
            "--max-loras",
            "2",
            "--max-cpu-loras",
            "3",
            "--replicas",
            "2",
            "--cpus-per-replica",
            "0.5",
        ]
    )
    os.environ["RAY_AUTH_MODE"] = "disabled"  # Ray 2.60 would write a token under $HOME
    ray.init(num_cpus=2, include_dashboard=False, namespace="loramux-test", logging_level="ERROR")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}", expected, late, names
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(url: str, model: str, prompt: str, stream: bool = False) -> tuple[str, str]:
    """(answer text, replica id) through the official openai client."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    if stream:
        with client.completions.with_streaming_response.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        ) as r:
            text = "".join(c.choices[0].text for c in r.parse() if c.choices)
            return text, r.headers["x-loramux-replica"]
    r = client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    return r.parse().choices[0].text, r.headers["x-loramux-replica"]


def _routing(url: str) -> dict[str, dict[str, float]]:
    """replica -> {"hit": n, "load": n} from the cluster's /metrics (real Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "loramux_ray_adapter_requests_total":
                out.setdefault(s.labels["replica"], {})[s.labels["outcome"]] = s.value
    return out


def _wait_reported(url: str, n_replicas: int, total: float) -> dict[str, dict[str, float]]:
    """Metrics once `n_replicas` have reported and their counts add up to `total` (bounded)."""
    deadline = time.time() + 30
    while True:
        m = _routing(url)
        if len(m) >= n_replicas and sum(sum(v.values()) for v in m.values()) >= total:
            return m
        assert time.time() < deadline, f"replicas' metrics did not arrive: {m}"
        time.sleep(0.5)


def test_S6_1_two_replicas_answer_like_one_engine_and_route_to_the_adapters_holder(cluster):
    url, expected, late, demo_adapters = cluster
    names = sorted({m for m, _ in expected} - {"demo", "late"})
    assert len(names) == 6
    models = {m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]}
    assert models == {"demo", *names}

    # Warm-up: each adapter once (loads), then the base model.
    replicas = set()
    for name in names:
        text, rep = _ask(url, name, PROMPTS[0])
        assert text == expected[(name, PROMPTS[0])]
        replicas.add(rep)
    assert _ask(url, "demo", PROMPTS[0])[0] == expected[("demo", PROMPTS[0])]
    before = _wait_reported(url, 2, len(names))

    # A mixed, concurrent workload: 8 requests per adapter, a third of them streamed.
    jobs = [(n, PROMPTS[i % len(PROMPTS)], i % 3 == 0) for i in range(8) for n in names]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda j: (j, _ask(url, *j)), jobs))
    for (name, prompt, _), (text, rep) in answers:
        assert text == expected[(name, prompt)], (name, prompt)
        replicas.add(rep)
    assert len(replicas) == 2  # both replicas served
    after = _wait_reported(url, 2, len(names) + len(jobs))
    hits = sum(after[r].get("hit", 0) - before.get(r, {}).get("hit", 0) for r in after)
    loads = sum(after[r].get("load", 0) - before.get(r, {}).get("load", 0) for r in after)
    assert hits + loads == len(jobs)
    print(f"routing: {hits} of {len(jobs)} requests found their adapter held ({loads} loads)")
    assert hits / len(jobs) >= 0.9, f"only {hits} of {len(jobs)} requests found their adapter held"

    # vLLM's names reach the cluster's /metrics per replica (issue 30), so a gateway in front of
    # the replicas can route by adapter: each replica's adapters in slots, labelled `replica`.
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.time() + 30
    while True:  # the replicas report every few seconds: wait for a report after the last request
        text = httpx.get(url + "/metrics", timeout=30).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        done = [s for s in fams["vllm:request_success"].samples if s.name == "vllm:request_success_total"]
        if sum(s.value for s in done) >= len(names) + len(jobs) + 1:
            break
        assert time.time() < deadline, f"vLLM's counters did not arrive: {fams['vllm:request_success']}"
        time.sleep(0.5)
    assert {s.labels["replica"] for s in done} == replicas
    info = fams["vllm:lora_requests_info"].samples
    assert {s.labels["replica"] for s in info} == replicas
    held = {a for s in info for a in s.labels["running_lora_adapters"].split(",") if a}
    assert held and held <= set(names), info

    # A new adapter folder in an allowed folder is served on demand; no replica restarts for it.
    shutil.copytree(demo_adapters["upper"], late / "late")
    for prompt in PROMPTS[:2]:
        text, rep = _ask(url, "late", prompt)
        assert text == expected[("late", prompt)]
        assert rep in replicas  # the same two replicas, still up

    # Clear errors, in OpenAI's shape, from the router and from a replica.
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="../upper", prompt="x", max_tokens=2)
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(late)}, timeout=30)
    assert r.status_code == 400 and "--lora-modules" in r.json()["error"]["message"]


def test_S6_1_the_responses_api_reaches_the_adapter_and_no_replica_keeps_answers(cluster):
    """/v1/responses goes through the router to the named adapter (answering as chat does). A
    later request may reach the other replica, so no replica keeps responses: `store` comes back
    false and previous_response_id is a 400 naming --replicas."""
    url, _, _, _ = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.responses.create(model="upp2", input="good night", max_output_tokens=MAX_TOKENS, temperature=0)
    chat = client.chat.completions.create(
        model="upp2",
        messages=[{"role": "user", "content": "good night"}],
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert r.output_text == chat.choices[0].message.content == "GOOD NIGHT"
    assert r.store is False
    with pytest.raises(openai.BadRequestError, match="--replicas") as e:
        client.responses.create(model="upp2", input="x", previous_response_id=r.id)
    assert e.value.body["param"] == "previous_response_id"


def _replica_actors() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "Replica" in a["name"] and "Router" not in a["name"]
    )


def test_S6_3_a_killed_replica_fails_clearly_the_other_serves_and_ray_restarts_it(cluster):
    url, expected, _, _ = cluster
    names = sorted({m for m, _ in expected} - {"demo", "late"})
    actors = _replica_actors()
    assert len(actors) == 2, actors
    victim = actors[0]

    def one(i: int) -> tuple[str, str | None]:
        name, prompt = names[i % len(names)], PROMPTS[i % len(PROMPTS)]
        try:
            text, rep = _ask(url, name, prompt, stream=i % 2 == 0)
        except openai.APIStatusError as e:
            assert e.status_code == 503 and "replica" in str(e), e  # a clear error, never a wrong answer
            return "failed", None
        except openai.APIError as e:  # a stream cut by the death: the error event names it
            assert "replica" in str(e), e
            return "failed", None
        assert text == expected[(name, prompt)], (name, prompt)
        return "ok", rep

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(one, i) for i in range(24)]
        time.sleep(0.5)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result(timeout=120) for f in running]
    ok = [rep for status, rep in results if status == "ok"]
    assert ok, results
    print(f"during the kill: {len(ok)} answered, {len(results) - len(ok)} failed with a clear error")

    # The survivor keeps serving at once.
    survivors = set()
    for i in range(6):
        status, rep = one(i)
        assert status == "ok"
        survivors.add(rep)
    assert len(survivors) == 1
    survivor_id = survivors.pop()

    # Ray Serve starts a new replica; within a bounded time it serves too. The adapters' requests
    # go to the survivor, which holds them; base-model requests go to either replica.
    deadline = time.time() + 180
    while True:
        actors_now = _replica_actors()
        if len(actors_now) == 2 and victim not in actors_now:
            break
        assert time.time() < deadline, f"no replacement replica: {actors_now}"
        time.sleep(1)
    seen = set()
    deadline = time.time() + 120
    i = 0
    while len(seen - {survivor_id}) == 0:
        assert time.time() < deadline, f"the new replica never answered; replicas seen {seen}"
        prompt = PROMPTS[i % len(PROMPTS)]
        text, rep = _ask(url, "demo", prompt)
        assert text == expected[("demo", prompt)]
        seen.add(rep)
        i += 1
