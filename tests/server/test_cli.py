"""The CLI speaks vLLM's dialect (issue 16, point 1; S6.2): --enable-lora and
--gpu-memory-utilization start the server, `loramux --version` answers, and every flag of
`loramux serve` has help text with its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from loramux import __version__
from loramux.config import CacheConfig, LoRAConfig, ModelConfig
from loramux.executor.model_runner import ModelRunner
from loramux.server.serve_args import add_serve_args, engine_config


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_args(p)
    return p


def test_every_serve_flag_has_help_and_the_help_shows_defaults():
    p = serve_parser()
    missing = [a.option_strings or a.dest for a in p._actions if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "(default: 4)" in out and "--gpu-memory-utilization" in out and "--enable-lora" in out


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"loramux {__version__}"


def test_vllm_flags_are_accepted_and_reach_the_engine_config():
    args = serve_parser().parse_args(["m", "--enable-lora", "--gpu-memory-utilization", "0.5"])
    c = engine_config(args, "m")
    assert c.cache.memory_utilization == 0.5 and c.cache.num_pages is None
    with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
        engine_config(serve_parser().parse_args(["m", "--gpu-memory-utilization", "1.5"]), "m")


def test_memory_utilization_sizes_the_kv_pool_from_available_memory(tiny_models):
    def pages(fraction: float) -> int:
        runner = ModelRunner(
            ModelConfig(str(tiny_models["llama"].path), device="cpu"),
            CacheConfig(page_size=16, memory_utilization=fraction),
            LoRAConfig(max_loras=1),
        )
        return runner.num_pages

    small, large = pages(0.002), pages(0.004)
    assert small > 0 and 1.6 < large / small < 2.4  # the pool follows the fraction
    with pytest.raises(ValueError, match="raise it"):
        pages(1e-12)


def _serve(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "m", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "flags,fix",
    [
        (["--tensor-parallel-size", "2"], "--replicas N"),
        (["--quantization", "awq"], "serve a bf16/fp16/fp32 checkpoint"),
        (["--kv-cache-dtype", "fp8"], "set --dtype"),
        (["--guided-decoding-backend", "outlines"], "xgrammar"),
        (["--task", "embed"], "text generation only"),
        (["--return-tokens-as-token-ids"], "send return_token_ids for the ids"),
        (["--enable-sleep-mode"], "sleep mode"),
        (["--otlp-traces-endpoint", "grpc://x:4317"], "GET /metrics has Prometheus histograms"),
        (["--disable-sliding-window"], "lower --max-model-len to the window instead"),
        (["--kv-transfer-config", "{}"], "KV transfer between engines"),
        (["--preemption-mode", "swap"], "recomputed"),
        (["--tool-server", "demo"], "send function tools"),
    ],
)
def test_vllm_flags_that_would_change_results_are_refused_naming_the_alternative(flags, fix):
    """Issue 28, point 3: refused at start (exit 2), the message naming what to use instead."""
    r = _serve(*flags)
    assert r.returncode == 2 and f"{' '.join(flags)} is not supported" in r.stderr and fix in r.stderr, (
        r.stderr
    )


def test_auto_tool_choice_needs_a_parser_and_the_parser_must_be_one_loramux_has():
    """vLLM's pair of flags: --enable-auto-tool-choice alone stops the start naming
    --tool-call-parser and the parsers; an unknown parser is argparse's error naming them."""
    r = _serve("--enable-auto-tool-choice")
    assert r.returncode == 2 and "needs --tool-call-parser" in r.stderr and "hermes" in r.stderr, r.stderr
    r = _serve("--enable-auto-tool-choice", "--tool-call-parser", "mistral")
    assert r.returncode == 2 and "invalid choice: 'mistral'" in r.stderr and "llama3_json" in r.stderr


@pytest.mark.parametrize(
    "value,fix",
    [
        ("t.jinja", "--chat-template 't.jinja': cannot read it (No such file or directory)"),
        ("{% for m in messages %}", "chat_template is not a Jinja template: Unexpected end of template"),
    ],
)
def test_a_chat_template_that_cannot_be_used_stops_the_start(value, fix):
    """vLLM's --chat-template (a file, or the template inline): a path that does not open, or a
    template that does not parse, is an error at start (exit 2), not at the first chat request."""
    r = _serve("--chat-template", value)
    assert r.returncode == 2 and fix in r.stderr, r.stderr


def test_a_vllm_command_line_starts_unchanged(tmp_path):
    """Issue 28, point 3: `vllm serve`'s usual flags start loramux: mapped ones set their loramux
    setting (--block-size is --page-size), ones with no effect here are logged once each."""
    from tests.server.conftest import start_server

    flags = [
        "--disable-log-requests",
        "--trust-remote-code",
        "--enforce-eager",
        "--tensor-parallel-size",
        "1",
        "--block-size",
        "32",
        "--swap-space",
        "4",
        "--max-logprobs",
        "20",
        "--uvicorn-log-level",
        "warning",
    ]
    server = start_server(flags, tmp_path / "log.txt")
    try:
        import httpx

        limits = httpx.get(server.url + "/metrics", timeout=30).text
        assert "loramux" in limits
    finally:
        server.stop()
    log = server.log_text()
    for flag in ("--disable-log-requests", "--trust-remote-code", "--swap-space 4"):
        assert log.count(f"{flag}: accepted, no effect") == 1, log
    assert "--tensor-parallel-size 1: accepted, no effect" in log
    assert "--block-size 32: vLLM's flag for page_size" in log and "pages of 32 tokens" in log, log
    # issue 28: the pool's size in whole requests ("11734.5 full-length sequences" before)
    import re

    assert re.search(r"room for \d+ requests of max_model_len \d+ tokens at once", log), log


def test_more_of_a_vllm_command_line_starts_and_does_what_it_says(tmp_path):
    """vLLM's --model form, hub and scheduler flags that change nothing here (logged, the token
    never), and the ones that do something: CORS (--allowed-origins), usage's cached prompt
    tokens (--enable-prompt-tokens-details) and no API docs (--disable-fastapi-docs). They were
    "unrecognized arguments"."""
    import httpx

    from loramux import demo
    from tests.server.conftest import start_server

    model_dir, _ = demo.demo_paths()
    flags = [
        "--model", str(model_dir), "--served-model-name", "base",
        "--download-dir", "/nowhere", "--revision", "main", "--hf-token", "hf_SECRET",
        "--task", "generate", "--scheduling-policy", "fcfs", "--response-role", "assistant",
        "--async-scheduling", "--allowed-origins", '["http://app.example"]',
        "--enable-prompt-tokens-details", "--disable-fastapi-docs",
    ]  # fmt: skip
    server = start_server(flags, tmp_path / "log.txt")
    try:
        prompt = {"model": "base", "prompt": "say: hello there lora adapters\n", "max_tokens": 2}
        usages = [
            httpx.post(server.v1 + "/completions", json=prompt, timeout=60).json()["usage"] for _ in "ab"
        ]
        assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
        assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0  # the same prompt, cached
        pre = httpx.options(
            server.v1 + "/completions",
            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
            timeout=30,
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(server.v1 + "/models", headers={"Origin": "http://elsewhere.example"}, timeout=30)
        assert "access-control-allow-origin" not in other.headers
        assert httpx.get(server.url + "/docs", timeout=30).status_code == 404
        assert httpx.get(server.url + "/openapi.json", timeout=30).status_code == 404
    finally:
        server.stop()
    log = server.log_text()
    assert "hf_SECRET" not in log and "--hf-token: accepted, no effect" in log
    for shown in (
        "--download-dir /nowhere",
        "--revision main",
        "--task generate",
    ):
        assert f"{shown}: accepted, no effect" in log, log
    assert "--scheduling-policy fcfs: vLLM's flag for policy" in log, log


def test_the_model_positional_and_model_flag_must_agree():
    r = _serve("--model", "other")  # _serve passes "m" as the positional
    assert r.returncode != 0 and "two models: 'm' and --model 'other'; give one of them" in r.stderr, r.stderr


def test_help_shows_a_default_once_and_simulate_explains_every_flag():
    """Issue 28's rough edges: no "(default: ...) (default: None)"; every simulate flag has help."""
    out = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "(default: None)" not in out
    idle = out.split("--idle-cache-pages IDLE_CACHE_PAGES\n", 1)[1].split("\n  --", 1)[0]
    assert idle.count("(default:") == 1, idle
    from loramux.sim.cli import add_simulate_args

    p = argparse.ArgumentParser()
    add_simulate_args(p)
    actions = [a for a in p._actions if a.option_strings and a.dest != "help"]
    for sub in p._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        actions += [a for a in sub._actions if a.dest != "help"]
    assert [a.option_strings or a.dest for a in actions if not a.help] == []


def test_step_log_flag_reaches_the_engine_config():
    """Issue 25, point 1: `loramux serve --step-log PATH` (off by default)."""
    assert engine_config(serve_parser().parse_args(["m"]), "m").logs.step_log is None
    args = serve_parser().parse_args(["m", "--step-log", "/tmp/steps.jsonl"])
    assert engine_config(args, "m").logs.step_log == "/tmp/steps.jsonl"
