"""Soak: 64 concurrent streaming clients against a real `loramux serve` (issue 13; S5.4, S6.3).

Mixed adapters (base, two named at start, two loaded and unloaded at runtime meanwhile), mixed
prompt and output lengths, some clients disconnecting mid-stream, some as soon as the answer
starts. Every request must end as exactly one of: completed with exactly its max_tokens, given up
by its own client, or refused with a clear error in OpenAI's shape (the adapter was unloaded at
that moment, the queue was full). Anything else is "lost" and must be 0. One request in ten is
hostile (issue 24): a token id past the vocabulary in logit_bias, stop_token_ids or the prompt,
a seed past 64 bits, a repetition penalty that would overflow, n=3 whose queue deadline has
passed; each must get its own clear answer (400 naming the field, or the queue_timeout error),
and the valid edge values among them (top_k past the vocabulary, a temperature of 1e-300) must
complete like any other request. Afterwards the server's
accounting is whole (every page free or held by the prefix cache, no adapter reference left),
and its memory after a second identical round is within a few percent of after the first.

Short mode (CI): two rounds of 192 requests. Long mode: LORAMUX_SOAK_S=300 runs each round for
that many seconds and writes the figures to LORAMUX_SOAK_REPORT (JSON) if set:

    LORAMUX_SOAK_S=300 LORAMUX_SOAK_REPORT=soak.json \
        .venv/bin/python -m pytest -q -s tests/reliability/test_soak.py
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import SOAK_S, assert_whole, serve_tiny

pytestmark = pytest.mark.timeout(max(300, int(SOAK_S * 3) + 300))

CLIENTS = 64
PER_CLIENT = 3  # short mode: requests per client per round
WORDS = "hello world page batch token cache the quick brown fox jumps over lazy dog".split()
HOSTILE_SHARE = 0.1
# (fields added to a request, (status, phrase) of the clear refusal it must get; None: it runs)
HOSTILE: list[tuple[dict, tuple[int, str] | None]] = [
    ({"logit_bias": {"512": 5}}, (400, "logit_bias")),
    ({"logit_bias": {"999999": 5}}, (400, "999999")),
    ({"stop_token_ids": [600]}, (400, "stop_token_ids")),
    ({"prompt": [5, 100000]}, (400, "100000")),
    ({"seed": 2**70, "temperature": 1.0}, (400, "seed")),
    ({"repetition_penalty": 1e-300, "temperature": 1.0}, (400, "repetition_penalty")),
    ({"n": 3, "max_queue_time": 1e-9}, (503, "queue_timeout")),
    ({"top_k": 2**70, "top_p": 0.5, "temperature": 1.0}, None),
    ({"temperature": 1e-300}, None),
]


@pytest.fixture(scope="module")
def server(tiny_models, folders, tmp_path_factory):
    s = serve_tiny(
        tiny_models,
        folders,
        tmp_path_factory.mktemp("soak") / "server.log",
        "--num-pages",
        "384",
        "--max-num-seqs",
        "24",
        "--max-queue-len",
        "48",
        "--max-model-len",
        "256",
    )
    yield s
    s.stop()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class _Round:
    """One round of the soak: outcomes by kind, latencies of completed requests."""

    def __init__(self, url: str, seed: int, seconds: float) -> None:
        self.url, self.seed, self.seconds = url, seed, seconds
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.lost: list[str] = []
        self.lock = threading.Lock()

    def _record(self, kind: str, latency: float | None = None, why: str = "") -> None:
        with self.lock:
            self.outcomes[kind] += 1
            if latency is not None:
                self.latencies.append(latency)
            if kind == "lost":
                self.lost.append(why)

    def one(self, http: httpx.Client, rng: random.Random) -> None:
        model = rng.choice(["base", "a", "b", "c", "d"])
        max_tokens = rng.randint(1, 40)
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
        leave_after = rng.choice([None] * 8 + [-1, 3])  # events after which the client leaves
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        expect = None
        if rng.random() < HOSTILE_SHARE:
            extra, expect = rng.choice(HOSTILE)
            body.update(extra)
        t0 = time.perf_counter()
        try:
            with http.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    err = json.loads(r.read())["error"]
                    clear = err["message"] and (
                        (r.status_code == 404 and "does not exist" in err["message"])
                        or (r.status_code == 503 and err.get("code") == "server_busy")
                    )
                    if expect is not None and r.status_code == expect[0] and expect[1] in err["message"]:
                        self._record(f"hostile refused {r.status_code}")
                        return
                    self._record(f"refused {r.status_code}" if clear else "lost", why=str(err))
                    return
                if leave_after == -1:
                    self._record("client left")  # before reading anything: the request is aborted
                    return
                chunks, usage, finish = 0, None, None
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        if expect is not None and event["error"].get("code") == expect[1]:
                            self._record("hostile refused 503")  # the stream's own error event
                        else:
                            self._record("lost", why=str(event))
                        return
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                    chunks += 1
                    if leave_after is not None and chunks > leave_after:
                        self._record("client left")  # closing the stream aborts the request
                        return
            if expect is not None:
                self._record("lost", why=f"hostile {body} was answered 200 without its error")
            elif finish == "length" and usage and usage["completion_tokens"] == max_tokens:
                self._record("completed", time.perf_counter() - t0)
            else:
                self._record("lost", why=f"finish={finish} usage={usage} wanted {max_tokens}")
        except httpx.HTTPError as e:
            self._record("lost", why=repr(e))

    def client(self, k: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + k)
        with httpx.Client() as http:
            n = 0
            while (n < PER_CLIENT) if not self.seconds else (time.time() < deadline):
                self.one(http, rng)
                n += 1

    def adapter_churn(self, stop: threading.Event, allowed: Path) -> None:
        """Load and unload c and d while the clients run (bounded: stops with the round)."""
        rng = random.Random(self.seed)
        with httpx.Client(timeout=60) as http:
            for _ in range(10_000):
                if stop.is_set():
                    return
                name = rng.choice(["c", "d"])
                src = {"c": "rs4_attn", "d": "r1_qv"}[name]
                r = http.post(
                    self.url + "/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": str(allowed / src)},
                )
                assert r.status_code in (200, 400), r.text  # 400: already loaded
                stop.wait(0.2)
                r = http.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name})
                assert r.status_code in (200, 404), r.text
                stop.wait(0.1)

    def run(self, allowed: Path) -> float:
        deadline = time.time() + self.seconds
        stop = threading.Event()
        churn = threading.Thread(target=self.adapter_churn, args=(stop, allowed))
        clients = [threading.Thread(target=self.client, args=(k, deadline)) for k in range(CLIENTS)]
        t0 = time.perf_counter()
        churn.start()
        for t in clients:
            t.start()
        for t in clients:
            t.join(timeout=self.seconds + 240)
            assert not t.is_alive(), "a client hung"
        stop.set()
        churn.join(timeout=60)
        return time.perf_counter() - t0


def test_soak_loses_nothing_leaks_no_page_or_reference_and_no_memory(server, folders):
    allowed, _ = folders
    # Warm-up (allocator, first loads), so the two measured rounds start from the same place.
    _Round(server.url, seed=0, seconds=0).run(allowed)
    assert_whole(server)
    rounds, rss, walls = [], [], []
    for seed in (1, 1):  # two identical rounds
        rnd = _Round(server.url, seed=seed, seconds=SOAK_S)
        walls.append(rnd.run(allowed))
        whole = assert_whole(server)  # pages and references are whole after each round
        rss.append(_rss_mb(server.proc.pid))
        rounds.append(rnd)
        assert rnd.lost == [], rnd.lost[:5]
        assert rnd.outcomes["completed"] > 0
        assert rnd.outcomes["hostile refused 400"] > 0  # the hostile tenth was there and refused
    growth = rss[1] / rss[0] - 1
    report = {
        "mode": f"{SOAK_S:.0f} s per round" if SOAK_S else f"{CLIENTS * PER_CLIENT} requests per round",
        "clients": CLIENTS,
        "rounds": [
            {
                "requests": sum(r.outcomes.values()),
                "outcomes": dict(r.outcomes),
                "lost": len(r.lost),
                "p50_s": statistics.median(r.latencies),
                "p99_s": statistics.quantiles(r.latencies, n=100)[98]
                if len(r.latencies) >= 2
                else r.latencies[0],
                "wall_s": w,
                "rss_mb_after": m,
            }
            for r, w, m in zip(rounds, walls, rss, strict=True)
        ],
        "pages_total": whole["loramux_kv_pages_total"],
        "pages_leaked": whole["loramux_kv_pages_total"]
        - whole["loramux_kv_pages_free"]
        - whole["loramux_kv_pages_cached"],
        "rss_growth": growth,
    }
    print(json.dumps(report, indent=1))
    if os.environ.get("LORAMUX_SOAK_REPORT"):
        Path(os.environ["LORAMUX_SOAK_REPORT"]).write_text(json.dumps(report, indent=1))
    assert growth < 0.05, f"RSS grew {growth:.1%} from round 1 to round 2 ({rss})"
