"""Ray Serve scale-out: requests/s of 1 vs 2 replicas, and the adapter hit rate of routing.

    python benchmarks/bench_ray.py [--cache-dir DIR] [--requests 120] [--rounds 2]

Not a test. Builds the bench's mid model (91M parameters, random weights) and 12 rank-8
adapters offline, starts a local Ray (loopback), and for 1 and 2 replicas, alternating, runs the
same seeded workload (adapters drawn with Zipf skew, 16 concurrent clients through the official
openai client, max_tokens 16) after a warm-up of one request per adapter. Each replica holds at
most 4 adapters (`--max-cpu-loras 4`), so where a request lands decides whether its adapter must
be loaded again. Reports requests/s and the share of adapter requests that found their adapter
already held (from the cluster's /metrics), next to a simulation of the same request sequence
under round-robin routing (each replica an LRU of 4 adapters) and under holder-first routing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import random
import time
from collections import OrderedDict
from pathlib import Path

N_ADAPTERS, CAPACITY, CONCURRENCY, MAX_TOKENS = 12, 4, 16, 16


def build(cache: Path) -> tuple[Path, dict[str, str]]:
    from loramux.bench.artifacts import build_random_model, write_random_adapter

    model = build_random_model(cache / "mid", "mid")
    adapters = {}
    for i in range(N_ADAPTERS):
        path = cache / f"mid-ad{i}"
        if not (path / "adapter_config.json").is_file():
            write_random_adapter(path, model, 8, ("q_proj", "v_proj"), seed=100 + i)
        adapters[f"ad{i}"] = str(path)
    return model, adapters


def workload(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(N_ADAPTERS)]
    words = "the quick brown fox jumps over the lazy dog page batch token cache".split()
    return [
        (f"ad{rng.choices(range(N_ADAPTERS), weights)[0]}", " ".join(rng.choices(words, k=24)))
        for _ in range(n)
    ]


def simulate(seq: list[str], replicas: int, affine: bool, skip: int) -> float:
    """Share of requests after the first `skip` whose adapter is already held, each replica an
    LRU of CAPACITY; holder-first (`affine`) or round-robin."""
    caches = [OrderedDict[str, None]() for _ in range(replicas)]
    hits = 0
    for i, name in enumerate(seq):
        holders = [c for c in caches if name in c]
        if affine:
            cache = holders[0] if holders else min(caches, key=len)
        else:
            cache = caches[i % replicas]
        if name in cache:
            hits += i >= skip
            cache.move_to_end(name)
        else:
            cache[name] = None
            if len(cache) > CAPACITY:
                cache.popitem(last=False)
    return hits / (len(seq) - skip)


def routing(url: str) -> tuple[float, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    hit = load = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "loramux_ray_adapter_requests_total":
                hit += s.value if s.labels["outcome"] == "hit" else 0
                load += s.value if s.labels["outcome"] == "load" else 0
    return hit, load


def run(url: str, jobs: list[tuple[str, str]]) -> float:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def one(job: tuple[str, str]) -> None:
        out = client.completions.create(
            model=job[0], prompt=job[1], max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == MAX_TOKENS

    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, jobs))
    return time.perf_counter() - t


def wait_metrics(url: str, total: float) -> tuple[float, float]:
    deadline = time.time() + 30
    while True:
        hit, load = routing(url)
        if hit + load >= total or time.time() > deadline:
            return hit, load
        time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loramux-bench")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()

    import ray
    from ray import serve

    from loramux.ray import APP_NAME, build_app
    from loramux.server.serve_args import add_serve_args

    model, adapters = build(a.cache_dir)
    jobs = workload(a.requests)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    port = 8127
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; {a.requests} requests, {N_ADAPTERS} adapters (Zipf), "
        f"{CONCURRENCY} clients, {MAX_TOKENS} tokens each, {CAPACITY} adapters per replica"
    )
    print(
        "| round | replicas | requests/s | adapter held on arrival (routing, measured) | "
        "simulated: holder-first | simulated: round-robin |"
    )
    print("|---|---|---|---|---|---|")
    seq = [name for name, _ in jobs]
    try:
        for rnd in range(1, a.rounds + 1):
            for n in (1, 2):
                args = parser.parse_args(
                    [
                        str(model),
                        "--lora-modules",
                        *(f"{k}={v}" for k, v in adapters.items()),
                        "--max-loras",
                        "4",
                        "--max-cpu-loras",
                        str(CAPACITY),
                        "--replicas",
                        str(n),
                        "--cpus-per-replica",
                        "0.5",
                        "--num-pages",
                        "1024",
                        "--max-model-len",
                        "512",
                    ]
                )
                serve.run(build_app(args), name=APP_NAME, route_prefix="/")
                warm = [(f"ad{i}", "warm up") for i in range(N_ADAPTERS)]
                run(url, warm)
                h0, l0 = wait_metrics(url, N_ADAPTERS)
                seconds = run(url, jobs)
                h1, l1 = wait_metrics(url, h0 + l0 + len(jobs))
                held = (h1 - h0) / max(1.0, (h1 - h0) + (l1 - l0))
                warm_seq = [name for name, _ in warm]
                print(
                    f"| {rnd} | {n} | {len(jobs) / seconds:.2f} | {held:.3f} | "
                    f"{simulate(warm_seq + seq, n, True, N_ADAPTERS):.3f} | "
                    f"{simulate(warm_seq + seq, n, False, N_ADAPTERS):.3f} |",
                    flush=True,
                )
                serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
