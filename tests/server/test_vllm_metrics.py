"""vLLM's metric names on a real `loramux serve`, and the inference gateway's LoRA protocol (issue 30).

The reference list below was recorded from vLLM's own metrics code (vllm/v1/metrics/loggers.py,
`PrometheusStatLogger`, v0.11-0.12): every family loramux has an equivalent of, with vLLM's type,
label names and (for the histograms) bucket bounds. The scrape is parsed with prometheus_client's
parser, as Prometheus would read it. S5.1 (metrics), S2.1 (adapter slots).
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import Server, start_server

ENGINE = ("model_name", "engine")
VLLM_FAMILIES = {  # name -> (type, label names)
    "vllm:num_requests_running": ("gauge", ENGINE),
    "vllm:num_requests_waiting": ("gauge", ENGINE),
    "vllm:kv_cache_usage_perc": ("gauge", ENGINE),
    "vllm:gpu_cache_usage_perc": ("gauge", ENGINE),  # the name before vLLM 0.10
    "vllm:lora_requests_info": ("gauge", ("max_lora", "waiting_lora_adapters", "running_lora_adapters")),
    "vllm:prefix_cache_queries": ("counter", ENGINE),
    "vllm:prefix_cache_hits": ("counter", ENGINE),
    "vllm:num_preemptions": ("counter", ENGINE),
    "vllm:prompt_tokens": ("counter", ENGINE),
    "vllm:generation_tokens": ("counter", ENGINE),
    "vllm:request_success": ("counter", (*ENGINE, "finished_reason")),
    "vllm:time_to_first_token_seconds": ("histogram", ENGINE),
    "vllm:inter_token_latency_seconds": ("histogram", ENGINE),
    "vllm:time_per_output_token_seconds": ("histogram", ENGINE),  # the name before vLLM 0.11
    "vllm:request_time_per_output_token_seconds": ("histogram", ENGINE),
    "vllm:e2e_request_latency_seconds": ("histogram", ENGINE),
    "vllm:request_queue_time_seconds": ("histogram", ENGINE),
    "vllm:request_inference_time_seconds": ("histogram", ENGINE),
    "vllm:request_prefill_time_seconds": ("histogram", ENGINE),
    "vllm:request_decode_time_seconds": ("histogram", ENGINE),
    "vllm:request_prompt_tokens": ("histogram", ENGINE),
    "vllm:request_generation_tokens": ("histogram", ENGINE),
    "vllm:request_params_max_tokens": ("histogram", ENGINE),
    "vllm:request_max_num_generation_tokens": ("histogram", ENGINE),
    "vllm:request_params_n": ("histogram", ENGINE),
    "vllm:iteration_tokens_total": ("histogram", ENGINE),
}
_LATENCY = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
_TTFT += [160, 640, 2560]
_GAP = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
VLLM_BUCKETS = {
    "vllm:time_to_first_token_seconds": _TTFT,
    "vllm:inter_token_latency_seconds": _GAP,
    "vllm:time_per_output_token_seconds": _GAP,
    "vllm:request_time_per_output_token_seconds": _GAP,
    "vllm:e2e_request_latency_seconds": _LATENCY,
    "vllm:request_queue_time_seconds": _LATENCY,
    "vllm:request_inference_time_seconds": _LATENCY,
    "vllm:request_prefill_time_seconds": _LATENCY,
    "vllm:request_decode_time_seconds": _LATENCY,
    "vllm:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "vllm:request_params_n": [1, 2, 5, 10, 20],
    # vLLM's build_1_2_5_buckets(max_model_len), here 512
    "vllm:request_prompt_tokens": [1, 2, 5, 10, 20, 50, 100, 200, 500],
}
MAX_MODEL_LEN = 512
DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "loramux.json"


@pytest.fixture(scope="module")
def gateway_server(tiny_models, tmp_path_factory):
    """Two device slots, three adapters: a third adapter's requests wait while two run."""
    tm = tiny_models["llama"]
    ad = tm.adapters
    args = [str(tm.path), "--served-model-name", "base", "--lora-modules"]
    args += [f"a={ad['r8_all']}", f"b={ad['r1_qv']}", f"c={ad['rs4_attn']}"]
    args += ["--max-loras", "2", "--max-cpu-loras", "3", "--max-num-seqs", "4", "--device", "cpu"]
    args += ["--page-size", "4", "--num-pages", "600", "--max-model-len", str(MAX_MODEL_LEN)]
    s = start_server(args, tmp_path_factory.mktemp("vllm_metrics") / "server.log")
    yield s
    s.stop()


def _families(server: Server) -> dict[str, object]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fams: dict, name: str, suffix: str = "", **labels: str) -> float:
    matches = [
        s.value
        for s in fams[name].samples
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(matches) == 1, (name, suffix, labels, fams[name].samples)
    return matches[0]


def _complete(server: Server, model: str, max_tokens: int, n: int = 1, **extra) -> dict:
    body = {"model": model, "prompt": "metrics for the gateway", "max_tokens": max_tokens, "n": n}
    r = httpx.post(server.v1 + "/completions", json={**body, "ignore_eos": True, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_S5_1_every_vllm_family_has_vllms_type_labels_buckets_and_counts(gateway_server):
    base = {"model_name": "base", "engine": "0"}
    counts = {  # (name, suffix, extra labels): the figures checked against the requests sent
        "success": ("vllm:request_success", "_total", {"finished_reason": "length"}),
        "gen": ("vllm:generation_tokens", "_total", {}),
        "prompt": ("vllm:prompt_tokens", "_total", {}),
        "ttft": ("vllm:time_to_first_token_seconds", "_count", {}),
        "itl": ("vllm:inter_token_latency_seconds", "_count", {}),
        "n": ("vllm:request_params_n", "_count", {}),
        "n_sum": ("vllm:request_params_n", "_sum", {}),
    }

    def read(fams: dict) -> dict[str, float]:
        return {k: _value(fams, name, suffix, **base, **kw) for k, (name, suffix, kw) in counts.items()}

    before = read(_families(gateway_server))
    jobs = [("base", 5, 1), ("a", 7, 1), ("b", 4, 2), ("c", 6, 3)]
    answers = [_complete(gateway_server, m, t, n) for m, t, n in jobs]
    fams = _families(gateway_server)
    for name, (kind, labels) in VLLM_FAMILIES.items():
        assert name in fams, f"{name} is missing"
        assert fams[name].type == kind, (name, fams[name].type)
        for s in fams[name].samples:
            assert {k for k in s.labels if k != "le"} == set(labels), (name, s.labels)
    for name, bounds in VLLM_BUCKETS.items():
        les = [s.labels["le"] for s in fams[name].samples if s.name.endswith("_bucket")]
        assert les == [*(str(float(b)) for b in bounds), "+Inf"], name

    samples = sum(n for _, _, n in jobs)
    tokens = sum(t * n for _, t, n in jobs)
    prompts = sum(a["usage"]["prompt_tokens"] * n for a, (_, _, n) in zip(answers, jobs, strict=True))
    assert sum(a["usage"]["completion_tokens"] for a in answers) == tokens
    after = read(fams)
    delta = {k: after[k] - before[k] for k in counts}
    assert delta["success"] == samples  # every sample is a request to vLLM's counters
    assert delta["gen"] == tokens
    assert delta["prompt"] == prompts  # each sample's prompt, as vLLM counts its n children
    assert delta["ttft"] == samples
    assert delta["itl"] == tokens - samples  # one gap between each pair of tokens
    assert delta["n"] == len(jobs) and delta["n_sum"] == samples  # once per request, its n
    got = lambda name, suffix="": _value(fams, name, suffix, **base)  # noqa: E731
    assert got("vllm:num_requests_running") == 0 and got("vllm:num_requests_waiting") == 0
    assert got("vllm:kv_cache_usage_perc") == 0.0  # idle: only cached pages, which vLLM counts free
    assert got("vllm:prefix_cache_hits", "_total") <= got("vllm:prefix_cache_queries", "_total")
    # the 1-2-5 token buckets stop at max_model_len, as vLLM's build_1_2_5_buckets does
    les = [s.labels["le"] for s in fams["vllm:request_generation_tokens"].samples if "le" in s.labels]
    assert les[-2:] == ["500.0", "+Inf"]
    # loramux's own names stay
    assert "loramux_requests" in fams and "loramux_adapter_resident" in fams


def test_S2_1_lora_requests_info_says_which_adapters_run_and_which_wait_behind_max_loras(gateway_server):
    results: list[dict] = []
    long = [
        threading.Thread(target=lambda m=m: results.append(_complete(gateway_server, m, 480)), daemon=True)
        for m in ("a", "b")
    ]
    for t in long:
        t.start()
    deadline = time.time() + 60
    while True:
        fams = _families(gateway_server)
        if _value(fams, "vllm:num_requests_running", model_name="base", engine="0") == 2:
            break
        assert time.time() < deadline, "the two long requests never ran together"
        time.sleep(0.05)
    waiter = threading.Thread(target=lambda: results.append(_complete(gateway_server, "c", 3)), daemon=True)
    waiter.start()
    seen = None
    while seen is None:
        fams = _families(gateway_server)
        info = fams["vllm:lora_requests_info"].samples
        assert len(info) == 1, info  # one series, kept current (not one per past state)
        if info[0].labels["waiting_lora_adapters"] == "c":
            seen = info[0]
        assert time.time() < deadline, f"c never waited: {info}"
        time.sleep(0.05)
    assert seen.labels == {"max_lora": "2", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"}
    assert abs(seen.value - time.time()) < 30  # the time of the snapshot it describes
    assert _value(fams, "vllm:num_requests_waiting", model_name="base", engine="0") == 1
    for t in [*long, waiter]:
        t.join(timeout=120)
        assert not t.is_alive()
    assert len(results) == 3
    info = _families(gateway_server)["vllm:lora_requests_info"].samples
    assert info[0].labels["waiting_lora_adapters"] == "" and "c" in info[0].labels["running_lora_adapters"]


def test_the_grafana_dashboard_queries_only_metrics_the_server_exposes(gateway_server):
    """Every PromQL expression in docs/grafana/loramux.json names exposed metric series."""
    _complete(gateway_server, "a", 2)
    exposed = set()  # declared families (a gauge per adapter has no series while idle) and series
    for fam in _families(gateway_server).values():
        exposed |= {fam.name} | {s.name for s in fam.samples}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    names = set()
    for e in exprs:
        found = set(re.findall(r"\b((?:vllm:|loramux_)[a-zA-Z0-9_:]+)", e))
        assert found, f"a query that names no metric: {e}"
        names |= found
    missing = sorted(names - exposed)
    assert not missing, f"the dashboard queries series the server does not expose: {missing}"
    assert {"vllm:num_requests_waiting", "vllm:lora_requests_info", "loramux_adapter_resident"} <= names
